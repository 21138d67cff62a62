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
        "parts",
    ]


def assert_same_rows(actual: list[dict], expected: list[dict]) -> None:
    assert len(actual) == len(expected)
    for index, (row, wanted) in enumerate(zip(actual, expected)):
        differing = sorted(name for name in wanted if row.get(name) != wanted[name])
        assert not differing, (index, {name: (row.get(name), wanted[name]) for name in differing if name != "image"})


def test_spark_writes_to_a_url_in_parts_and_a_rerun_redoes_only_unfinished_parts(spark, corpus, tmp_path):
    from imagebert_hf.curation.spark import run_spark

    config: CurationConfig = lenient_config()
    local = run_local(corpus["inputs"], tmp_path / "local", config, batch_size=7)
    inputs = [f"file://{item}" for item in corpus["inputs"]]
    output = f"file://{tmp_path / 'out'}"
    with pytest.raises(ValueError, match="local paths or file:// URLs"):
        run_spark(["s3://bucket/crawl"], output, config, spark=spark)
    first = run_spark(inputs, output, config, spark=spark, num_partitions=2, batch_size=16, sources_per_part=1)
    assert_same_rows(first.dataset.to_list(), local.dataset.to_list())
    assert first.tally == local.tally
    parts = sorted((tmp_path / "out" / "parts").iterdir())
    from imagebert_hf.curation.spark import discover_inputs

    assert len(parts) == len(discover_inputs(inputs)) > 1 and all((part / "_SUCCESS").is_file() for part in parts)
    written = {path: path.stat().st_mtime_ns for path in (tmp_path / "out" / "parts").rglob("records-*.parquet")}
    # A crash after the last part: its marker is missing, so it alone is redone; the others are reused as they are.
    (parts[-1] / "_SUCCESS").unlink()
    again = run_spark(inputs, output, config, spark=spark, num_partitions=2, batch_size=16, sources_per_part=1)
    assert_same_rows(again.dataset.to_list(), local.dataset.to_list())
    assert again.tally == local.tally
    for path, mtime in written.items():
        if path.parent != parts[-1]:
            assert path.stat().st_mtime_ns == mtime, f"{path} was rewritten"
