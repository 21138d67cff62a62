"""The Spark runner gives the same pairs and counts as the local runner (PySpark local mode)."""

import pytest

from imagebert_hf.curation import CurationConfig, run_local, synthetic
from imagebert_hf.curation.tally import INPUT, KEPT

from .test_curation import lenient_config, select_photos
from .testing_utils import COCO_DIR, require_module, require_shared_data


pytestmark = [require_module("pyspark"), require_module("fastwarc"), require_module("warcio"), require_shared_data]


@pytest.fixture(scope="module")
def spark():
    from imagebert_hf.curation.spark import local_spark_session

    session = local_spark_session("local[2]", shuffle_partitions=2)
    session.sparkContext.setLogLevel("ERROR")
    yield session
    session.stop()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    if not (COCO_DIR / "captions.jsonl").is_file():
        pytest.skip("shared data not available")
    return synthetic.build_corpus(tmp_path_factory.mktemp("corpus"), select_photos(synthetic.PHOTOS_NEEDED))


def test_spark_and_local_runs_agree(spark, corpus, tmp_path):
    from imagebert_hf.curation.spark import run_spark

    config: CurationConfig = lenient_config()
    local = run_local(corpus["inputs"], tmp_path / "local", config, batch_size=7)
    distributed = run_spark(corpus["inputs"], tmp_path / "spark", config, spark=spark, num_partitions=2, batch_size=16)
    assert len(distributed.dataset) == len(corpus["expected"])
    assert distributed.dataset.to_list() == local.dataset.to_list()
    assert distributed.tally == local.tally
    assert distributed.tally.get_count("parse", "page", INPUT) == local.tally.get_count("read", "record", KEPT)
    assert sorted(p.name for p in (tmp_path / "spark").iterdir()) == [
        "config.json",
        "data",
        "funnel.json",
        "funnel.md",
        "funnel.png",
    ]
