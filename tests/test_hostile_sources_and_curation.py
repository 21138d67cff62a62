"""Hostile input at the data sources and curation: streaming shards that are truncated or hold bad captions, data
files that are damaged, patterns that match nothing, curation inputs that are missing (the earlier output stays),
given as one string, or globs; zero-region records at the processor and the pipeline. Every error names the shard,
key, row, input or record."""

import io
import json
import tarfile

import numpy as np
import pytest

from imagebert_hf.curation.inputs import discover_sources
from imagebert_hf.curation.pipeline import run_local
from imagebert_hf.data.pair_sources import DatasetStream, WebDatasetPairSource, WebDatasetStream, expand_urls

from .test_bad_input_processor import F, processor, record  # noqa: F401 - fixture
from .test_pipeline_retrieval import TEXTS, retriever, saved_model  # noqa: F401 - fixtures
from .testing_utils import require_module


def write_shard(path, members: dict[str, bytes]) -> str:
    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return str(path)


GOOD = {"k1.jpg": b"\xff\xd8jpeg", "k1.txt": b"a cat on a mat", "k2.jpg": b"\xff\xd8jpeg", "k2.txt": b"a dog"}


# ------------------------------------------------------------------------------------------------ webdataset


@require_module("webdataset")
def test_a_truncated_shard_is_named(tmp_path):
    shard = write_shard(tmp_path / "00000.tar", {**GOOD, "k3.jpg": b"\xff\xd8" + bytes(4000), "k3.txt": b"x"})
    path = tmp_path / "00000.tar"
    path.write_bytes(path.read_bytes()[:6000])  # cut inside k3.jpg (at bytes 4608 .. 8610)
    with pytest.raises(ValueError, match=r"webdataset source 'wds': webdataset shard .*00000.tar cannot be read"):
        WebDatasetPairSource(shard, name="wds")


@require_module("webdataset")
@pytest.mark.parametrize("streamed", [False, True])
def test_the_unreadable_shard_is_named_not_the_one_read_before_it(tmp_path, streamed):
    # A corrupt third shard was reported as "after shard 00001.tar": the user would copy a good shard again.
    for index in range(3):
        write_shard(tmp_path / f"0000{index}.tar", {f"s{index}.jpg": b"\xff\xd8jpeg", f"s{index}.txt": b"a cat"})
    (tmp_path / "00002.tar").write_bytes(b"<html>403 Forbidden</html>" * 40)
    urls = str(tmp_path / "0000{0..2}.tar")
    with pytest.raises(ValueError, match=r"webdataset shard .*00002\.tar cannot be read .*not a tar file") as raised:
        if streamed:
            list(WebDatasetStream(urls, name="stream", shuffle_shards=False).epoch_pairs(0))
        else:
            WebDatasetPairSource(urls, name="wds")
    assert "00001.tar" not in str(raised.value)


@require_module("webdataset")
def test_a_file_that_is_not_a_tar_is_named(tmp_path):
    (tmp_path / "00000.tar").write_bytes(b"not a tar at all" * 100)
    stream = WebDatasetStream(str(tmp_path / "00000.tar"), name="stream")
    with pytest.raises(ValueError, match=r"webdataset source 'stream': webdataset shard .*00000.tar .*not a tar"):
        list(stream.epoch_pairs(0))


@require_module("webdataset")
@pytest.mark.parametrize(
    ("members", "message"),
    [
        ({"k1.jpg": b"x", "k1.txt": b"\xff\xfe caption"}, r"key 'k1': unreadable caption \(UnicodeDecodeError"),
        ({"k1.jpg": b"x", "k1.json": b"{oops"}, r"key 'k1': unreadable caption \(JSONDecodeError"),
        (
            {"k1.jpg": b"x", "k1.json": b"[1, 2]"},
            r"key 'k1': unreadable caption \(ValueError: the .json member is a list",
        ),
    ],
    ids=["not utf-8", "bad json", "json list"],
)
def test_a_bad_caption_names_its_shard_and_key(tmp_path, members, message):
    shard = write_shard(tmp_path / "00000.tar", members)
    with pytest.raises(ValueError, match=rf"webdataset shard .*00000.tar, {message}"):
        list(WebDatasetStream(shard, shuffle_shards=False).epoch_pairs(0))


@pytest.mark.parametrize(
    ("urls", "error", "message"),
    [
        ("PATTERN/*.tar", FileNotFoundError, r"no file matches '.*\*.tar' \(a local pattern is expanded with glob"),
        ("PATTERN/{00000..00002}.tar", FileNotFoundError, r"webdataset shards not found: \[.*00000.tar.*\(3 of 3"),
        (["PATTERN/missing.tar"], FileNotFoundError, r"webdataset shards not found: \[.*missing.tar'\] \(1 of 1"),
        ([], FileNotFoundError, r"no file matches \[\]"),
        (3, TypeError, r"urls must be a string \(pattern\) or a list of shard paths/URLs, got int"),
    ],
    ids=["glob", "braces", "list", "empty", "number"],
)
def test_shards_that_are_not_there_are_named(tmp_path, urls, error, message):
    if isinstance(urls, str):
        urls = urls.replace("PATTERN", str(tmp_path))
    elif isinstance(urls, list):
        urls = [u.replace("PATTERN", str(tmp_path)) for u in urls]
    with pytest.raises(error, match=message):
        expand_urls(urls)


def test_a_quoted_local_glob_of_shards_is_expanded(tmp_path):
    for number in range(3):
        write_shard(tmp_path / f"{number:05d}.tar", GOOD)
    assert expand_urls(str(tmp_path / "*.tar")) == [str(tmp_path / f"{n:05d}.tar") for n in range(3)]


# ------------------------------------------------------------------------------------------------ datasets streams


def test_a_damaged_data_file_names_the_source_and_row(tmp_path):
    rows = [json.dumps({"key": f"k{i}", "captions": ["a cat"]}) for i in range(3)]
    (tmp_path / "pairs.jsonl").write_text("\n".join(rows) + "\n{broken json\n")
    stream = DatasetStream(str(tmp_path / "pairs.jsonl"), name="jsonl")
    with pytest.raises(ValueError, match=r"streaming source 'jsonl' \(.*pairs.jsonl\): reading failed after row"):
        list(stream.epoch_pairs(0))


def test_a_missing_data_file_is_named(tmp_path):
    stream = DatasetStream(str(tmp_path / "nope.jsonl"), name="jsonl")
    with pytest.raises(ValueError, match=r"streaming source 'jsonl': cannot open .*nope.jsonl"):
        list(stream.epoch_pairs(0))


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ({"key": "k", "text": "a cat"}, r"rows need columns 'captions' and 'key'; got \['key', 'text'\]"),
        ({"key": "k", "captions": 5}, r"row 0 \(key 'k'\): 'captions' must be a string or a list of strings, got int"),
    ],
    ids=["no column", "a number"],
)
def test_rows_without_usable_captions_are_named(row, message):
    with pytest.raises(ValueError, match=message):
        list(DatasetStream([row], name="rows").epoch_pairs(0))


def test_a_stream_never_leaks_stop_iteration():
    stream = DatasetStream([{"key": "k", "captions": ["a", "", "  ", "b"]}], name="rows")
    assert list(stream.epoch_pairs(0)) == [("k", "a"), ("k", "b")]


# ------------------------------------------------------------------------------------------------ curation inputs


@pytest.fixture
def earlier_run(tmp_path):
    from .test_kill9_writers import _html_inputs, folder_bytes

    output = tmp_path / "out"
    run_local(_html_inputs(tmp_path / "pages", 1), output)
    return output, folder_bytes(output)


CURATION_CASES = [
    (["MISSING/crawl.warc.gz"], FileNotFoundError, r"input not found: .*crawl.warc.gz"),
    (["MISSING/page.html"], FileNotFoundError, r"input not found: .*page.html"),
    (["MISSING/*.warc.gz"], FileNotFoundError, r"no file matches the pattern .*\*.warc.gz"),
    ("MISSING/crawl.warc", TypeError, r"inputs must be a list of paths or URLs, got the single str"),
    ([], ValueError, r"inputs is empty: give WARC files"),
    ([None], TypeError, r"every input must be a non-empty path or URL string, got None"),
    ([""], TypeError, r"every input must be a non-empty path or URL string, got ''"),
]


@pytest.mark.parametrize(("inputs", "error", "message"), CURATION_CASES, ids=[str(c[0])[:30] for c in CURATION_CASES])
def test_bad_curation_inputs_are_named_and_the_earlier_output_stays(tmp_path, earlier_run, inputs, error, message):
    from .test_kill9_writers import folder_bytes

    output, before = earlier_run
    if isinstance(inputs, str):
        inputs = inputs.replace("MISSING", str(tmp_path / "missing"))
    else:
        inputs = [i.replace("MISSING", str(tmp_path / "missing")) if isinstance(i, str) else i for i in inputs]
    with pytest.raises(error, match=message):
        run_local(inputs, output)
    assert folder_bytes(output) == before


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"num_proc": 0}, "num_proc must be a positive integer, got 0"),
        ({"batch_size": -1}, "batch_size must be a positive integer, got -1"),
        ({"rows_per_shard": 0}, "rows_per_shard must be a positive integer, got 0"),
        ({"config": {"parse": {}}}, "config must be a CurationConfig, got dict"),
    ],
    ids=["num_proc", "batch_size", "rows_per_shard", "config"],
)
def test_bad_run_settings_are_named_before_the_output_is_touched(earlier_run, settings, message):
    from .test_kill9_writers import folder_bytes

    output, before = earlier_run
    with pytest.raises((ValueError, TypeError), match=message):
        run_local([str(output.parent / "pages")], output, **settings)
    assert folder_bytes(output) == before


def test_an_output_dir_that_is_a_file_is_named(tmp_path):
    (tmp_path / "out").write_text("x")
    (tmp_path / "a.html").write_text("<html></html>")
    with pytest.raises(NotADirectoryError, match=r"output_dir .*out exists and is not a folder"):
        run_local([str(tmp_path / "a.html")], tmp_path / "out")


def test_a_quoted_local_glob_finds_the_files_it_matches(tmp_path):
    for name in ("a.warc.gz", "b.warc.gz", "c.html"):
        (tmp_path / name).write_bytes(b"x")
    found = discover_sources([str(tmp_path / "*.warc.gz")])
    assert [(s.kind, s.path) for s in found] == [("warc", str(tmp_path / n)) for n in ("a.warc.gz", "b.warc.gz")]


def test_a_folder_without_warcs_or_pages_is_named(tmp_path):
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match=r"no WARC \(.warc, .warc.gz\) or HTML file in inputs"):
        discover_sources([str(tmp_path)])


# ------------------------------------------------------------------------------------------------ zero regions


@pytest.mark.parametrize("features", [np.zeros((0, F), np.float32), np.zeros(0, np.float32)], ids=["(0, F)", "(0,)"])
def test_the_processor_refuses_a_record_without_regions(processor, features):  # noqa: F811
    empty = record(rows=0, region_features=features)
    with pytest.raises(
        ValueError, match=r"regions\[1\] \(img\): the record has no regions \(region_features of shape"
    ):
        processor(regions=[record(), empty], text=["a", "b"])


def test_the_pipeline_refuses_a_record_without_regions(retriever):  # noqa: F811
    size = retriever.processor.image_processor.region_feature_size
    empty = {
        "image_id": "none",
        "region_features": np.zeros((0, size), np.float32),
        "region_locations": np.zeros((0, 5)),
    }
    with pytest.raises(ValueError, match=r"images\[0\] \(cached regions 'none'\): the record has no regions"):
        retriever(images=[empty], texts=TEXTS[0])
