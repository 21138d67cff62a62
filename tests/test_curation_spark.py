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


@pytest.fixture(scope="module")
def local(corpus, tmp_path_factory):
    """The local runner's result, which every Spark run must reproduce."""
    return run_local(corpus["inputs"], tmp_path_factory.mktemp("local"), lenient_config(), batch_size=7)


def test_spark_and_local_runs_agree(spark, corpus, local, tmp_path):
    from imagebert_hf.curation.spark import run_spark

    config: CurationConfig = lenient_config()
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


def test_spark_writes_to_a_url_in_parts_and_a_rerun_redoes_only_unfinished_parts(spark, corpus, local, tmp_path):
    from imagebert_hf.curation.spark import run_spark

    config: CurationConfig = lenient_config()
    inputs = [f"file://{item}" for item in corpus["inputs"]]
    output = f"file://{tmp_path / 'out'}"
    with pytest.raises(FileNotFoundError, match="input not found: memory://curation-test/nowhere"):
        run_spark(["memory://curation-test/nowhere"], output, config, spark=spark)
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


def test_spark_executors_read_inputs_through_fsspec(spark, corpus, local, tmp_path):
    """`local://` is fsspec's local filesystem under a URL the runner does not shortcut, so the driver lists it and
    the executors (separate Python workers) open every WARC and page through fsspec, as they would `s3://`."""
    from pathlib import Path

    from imagebert_hf.curation.spark import discover_inputs, run_spark

    config: CurationConfig = lenient_config()
    inputs = [f"local://{item}" for item in corpus["inputs"]]
    sources = discover_inputs(inputs)
    assert sources and all(source["path"].startswith("local:///") for source in sources)
    assert [s["path"].removeprefix("local://") for s in sources] == [
        s["path"] for s in discover_inputs(corpus["inputs"])
    ]
    result = run_spark(inputs, tmp_path / "out", config, spark=spark, num_partitions=2, batch_size=16)
    assert result.tally == local.tally
    assert set(result.dataset["source"]) == {f"local://{source}" for source in local.dataset["source"]}

    def rows(dataset):  # pair ids hash the page id, which names the input as given
        kept = [{k: v for k, v in row.items() if k not in ("pair_id", "source")} for row in dataset.to_list()]
        return sorted(kept, key=lambda row: (row["image_hash"], row["text"]))

    assert rows(result.dataset) == rows(local.dataset)
    assert Path(tmp_path / "out" / "funnel.json").is_file()
