"""Bad input at the pair sources and the Karpathy split reader: webdataset captions that are not strings, shards
cut short, keys repeated across shards, `datasets` rows with captions or ids that are not usable or a saved folder
that does not load, and Karpathy entries that leave the image root or hold no caption. Every error names the shard,
key, source, row, column, or `images[i]` and its field."""

import json
import logging

import pytest

from imagebert_hf.data.pair_sources import DatasetPairSource, DatasetStream, WebDatasetPairSource, WebDatasetStream
from imagebert_hf.data.retrieval_corpus import load_karpathy_split

from .test_hostile_sources_and_curation import write_shard
from .testing_utils import require_module


JPEG = b"\xff\xd8jpeg"


def stream_pairs(urls):
    return list(WebDatasetStream(urls, name="wds", shuffle_shards=False).epoch_pairs(0))


def both_readers(urls):
    """The pairs of the listing source and of the stream, which must agree."""
    listed = WebDatasetPairSource(urls, name="wds").pairs
    assert stream_pairs(urls) == listed
    return listed


# ------------------------------------------------------------------------------------------------ webdataset


@require_module("webdataset")
@pytest.mark.parametrize(
    ("caption", "kind"),
    [(["a", "b"], "list"), ({"x": 1}, "dict"), (123, "int"), (True, "bool")],
    ids=["list", "dict", "number", "bool"],
)
@pytest.mark.parametrize("reader", ["source", "stream"])
def test_a_json_caption_that_is_not_a_string_names_its_shard_and_key(tmp_path, caption, kind, reader):
    shard = write_shard(
        tmp_path / "00000.tar",
        {"k0.jpg": JPEG, "k0.txt": b"a cat", "k1.jpg": JPEG, "k1.json": json.dumps({"caption": caption}).encode()},
    )
    message = rf"webdataset shard .*00000.tar, key 'k1': unreadable caption .*\"caption\" .* is a {kind}, not a string"
    with pytest.raises(ValueError, match=message):
        WebDatasetPairSource(shard, name="wds") if reader == "source" else stream_pairs(shard)


@require_module("webdataset")
def test_a_json_caption_that_is_a_string_or_absent_reads_as_before(tmp_path):
    shard = write_shard(
        tmp_path / "00000.tar",
        {
            "k1.jpg": JPEG,
            "k1.json": json.dumps({"caption": " a cat "}).encode(),
            "k2.jpg": JPEG,
            "k2.json": json.dumps({"caption": None}).encode(),
            "k3.jpg": JPEG,
            "k3.json": json.dumps({"caption": ""}).encode(),
            "k4.jpg": JPEG,
            "k4.txt": b"a dog",
        },
    )
    assert both_readers(shard) == [("k1", "a cat"), ("k4", "a dog")]


@pytest.fixture
def three_samples(tmp_path):
    """A shard of three samples (members at 0..6144, end marker at 6144..7168) and its bytes."""
    path = tmp_path / "00000.tar"
    members = {}
    for key in range(1, 4):
        members.update({f"k{key}.jpg": JPEG, f"k{key}.txt": b"caption %d" % key})
    write_shard(path, members)
    return str(path), path.read_bytes()


@require_module("webdataset")
@pytest.mark.parametrize(
    "cut", [2048, 2100, 4096, 6144, 6656], ids=["block", "header", "block2", "no-end", "one-zero"]
)
@pytest.mark.parametrize("reader", ["source", "stream"])
def test_a_shard_cut_where_tar_sees_an_end_is_named_truncated(three_samples, cut, reader):
    shard, data = three_samples
    with open(shard, "wb") as handle:
        handle.write(data[:cut])
    message = r"webdataset source 'wds': webdataset shard .*00000.tar is truncated: its members stop at byte"
    with pytest.raises(ValueError, match=message):
        WebDatasetPairSource(shard, name="wds") if reader == "source" else stream_pairs(shard)


@require_module("webdataset")
def test_a_shard_with_its_end_marker_but_no_padding_reads_whole(three_samples):
    shard, data = three_samples
    expected = [(f"k{key}", f"caption {key}") for key in range(1, 4)]
    assert both_readers(shard) == expected
    with open(shard, "wb") as handle:
        handle.write(data[:7168])
    assert both_readers(shard) == expected
    assert both_readers([f"pipe:cat {shard}"]) == expected


@require_module("webdataset")
def test_a_key_in_two_shards_is_refused_naming_both(tmp_path):
    first = write_shard(tmp_path / "a.tar", {"k1.jpg": b"IMAGE-ONE", "k1.txt": b"caption of image one"})
    second = write_shard(tmp_path / "b.tar", {"k1.jpg": b"IMAGE-TWO", "k1.txt": b"caption of image two"})
    with pytest.raises(
        ValueError, match=r"webdataset source 'wds': key 'k1' appears in shard .*a.tar and in shard .*b.tar"
    ):
        WebDatasetPairSource([first, second], name="wds")


@require_module("webdataset")
def test_a_key_twice_in_one_shard_is_refused(tmp_path):
    shard = write_shard(
        tmp_path / "a.tar",
        {"k1.jpg": JPEG, "k1.txt": b"one", "k2.jpg": JPEG, "k2.txt": b"two", "k1.png": JPEG, "k1.json": b"{}"},
    )
    with pytest.raises(ValueError, match=r"key 'k1' appears twice in shard .*a.tar; keys must be unique"):
        WebDatasetPairSource(shard, name="wds")


# ------------------------------------------------------------------------------------------------ datasets sources


def saved(path, data):
    import datasets

    datasets.Dataset.from_dict(data).save_to_disk(str(path))
    return str(path)


BAD_ROWS = [
    (
        {"captions": [1, 2]},
        None,
        r", row 0 \(key 'row-0'\): 'captions' must be a string or a list of strings, got int",
    ),
    ({"captions": [[1, 2]]}, None, r", row 0 \(key 'row-0'\): captions\[0\] must be a string, got int 1"),
    (
        {"captions": [{"text": "a cat"}]},
        None,
        r", row 0 \(key 'row-0'\): 'captions' must be a string or a list of strings, got dict",
    ),
    (
        {"captions": ["a", "b"], "key": ["k", None]},
        "key",
        r", row 1: 'key' must be a non-empty string or an integer \(the image key\), got None",
    ),
    ({"captions": ["a", "b"], "key": ["k", " "]}, "key", r", row 1: 'key' must be a non-empty string or an integer"),
    ({"captions": ["", "  "]}, None, r": no row has a caption \('captions' is null or blank in all 2\)"),
]


@pytest.mark.parametrize(
    ("data", "id_column", "message"),
    BAD_ROWS,
    ids=["ints", "list of ints", "dict", "null id", "blank id", "all blank"],
)
def test_a_dataset_row_with_unusable_captions_or_id_is_named(tmp_path, data, id_column, message):
    path = saved(tmp_path / "saved", data)
    with pytest.raises(ValueError, match=r"dataset source 'web' \(.*saved\)" + message):
        DatasetPairSource(path, id_column=id_column, name="web")


def test_null_and_blank_captions_are_dropped_as_the_stream_drops_them(tmp_path, caplog):
    data = {"key": ["a", "b", "c", "d"], "captions": [["a cat", None, " "], None, [""], ["a dog"]]}
    path = saved(tmp_path / "saved", data)
    with caplog.at_level(logging.WARNING):
        source = DatasetPairSource(path, id_column="key", name="web")
    assert source.pairs == [("a", "a cat"), ("d", "a dog")]
    assert "2 row(s) without a caption (null or blank) skipped; first: row 1" in caplog.text
    rows = [dict(zip(data, values)) for values in zip(*data.values())]
    assert list(DatasetStream(rows, name="rows").epoch_pairs(0)) == source.pairs


def test_rows_that_share_an_id_are_one_image_with_their_captions_pooled(tmp_path):
    path = saved(tmp_path / "saved", {"key": ["k", "j", "k"], "captions": ["a cat", "a dog", "a black cat"]})
    source = DatasetPairSource(path, id_column="key", name="web")
    assert source.pairs == [("k", "a cat"), ("j", "a dog"), ("k", "a black cat")]


@pytest.mark.parametrize(
    ("row", "message"),
    [
        (
            {"key": "k", "captions": ["a cat", 5]},
            r"streaming source 'rows', row 0 \(key 'k'\): captions\[1\] must be a string, got int",
        ),
        (
            {"key": None, "captions": ["a cat"]},
            r"streaming source 'rows', row 0: 'key' must be a non-empty string or an integer",
        ),
    ],
    ids=["int in list", "null key"],
)
def test_the_stream_checks_rows_as_the_listing_source_does(row, message):
    with pytest.raises(ValueError, match=message):
        list(DatasetStream([row], name="rows").epoch_pairs(0))


def test_a_saved_dataset_that_does_not_load_names_its_folder(tmp_path):
    lying = saved(tmp_path / "lying", {"captions": ["a", "b"]})
    info_path = tmp_path / "lying" / "dataset_info.json"
    info = json.loads(info_path.read_text())
    info["features"] = {"captions": {"dtype": "int64", "_type": "Value"}}
    info_path.write_text(json.dumps(info))
    with pytest.raises(
        ValueError, match=r"dataset source 'web' \(.*lying\): cannot load the saved dataset \(ArrowInvalid"
    ):
        DatasetPairSource(lying, name="web")
    garbage = saved(tmp_path / "garbage", {"captions": ["a"]})
    (tmp_path / "garbage" / "dataset_info.json").write_text("{oops")
    with pytest.raises(
        ValueError, match=r"dataset source 'web' \(.*garbage\): cannot load the saved dataset \(JSONDecodeError"
    ):
        DatasetPairSource(garbage, name="web")
    with pytest.raises(
        FileNotFoundError, match=r"dataset source 'web' \(.*missing\): no dataset saved with save_to_disk"
    ):
        DatasetPairSource(tmp_path / "missing", name="web")


def test_a_valid_dataset_reads_as_before(tmp_path):
    path = saved(tmp_path / "lists", {"captions": [["a cat", "a mat"], ["a dog"]], "id": [7, 8]})
    assert DatasetPairSource(path, id_column="id").pairs == [("7", "a cat"), ("7", "a mat"), ("8", "a dog")]
    path = saved(tmp_path / "strings", {"captions": [" a cat ", "a dog"]})
    assert DatasetPairSource(path).pairs == [("row-0", " a cat "), ("row-1", "a dog")]


# ------------------------------------------------------------------------------------------------ Karpathy files

SENTENCES = [{"raw": "a cat"}]
KARPATHY = [
    (
        {"filename": "../../../etc/passwd"},
        r"images\[0\]: 'filepath/filename' '../../../etc/passwd' points outside the image root",
    ),
    (
        {"filepath": "/etc", "filename": "passwd"},
        r"images\[0\]: 'filepath/filename' '/etc/passwd' points outside",
    ),
    ({"filepath": 5}, r"images\[0\] \(a.jpg\): 'filepath' must be a folder name string, got 5"),
    ({"sentences": []}, r"images\[0\] \(a.jpg\): 'sentences' is empty; every image needs at least one caption"),
    ({"sentences": [{"raw": "a cat"}, {"raw": "  "}]}, r"images\[0\] \(a.jpg\): sentences\[1\].raw is blank"),
    ({"cocoid": None}, r"images\[0\] \(a.jpg\): 'cocoid' must be an integer or a non-empty string, got None"),
    ({"imgid": True}, r"images\[0\] \(a.jpg\): 'imgid' must be an integer or a non-empty string, got True"),
]


def write_karpathy(tmp_path, images):
    path = tmp_path / "dataset.json"
    path.write_text(json.dumps({"images": images}))
    return path


@pytest.mark.parametrize(
    ("changes", "message"),
    KARPATHY,
    ids=["escape", "absolute", "filepath", "no sentences", "blank raw", "cocoid", "imgid"],
)
def test_a_bad_karpathy_entry_names_its_index_and_field(tmp_path, changes, message):
    entry = {"split": "test", "filename": "a.jpg", "sentences": SENTENCES, **changes}
    path = write_karpathy(tmp_path, [entry])
    with pytest.raises(ValueError, match=r"dataset.json: " + message):
        load_karpathy_split(path, "test")


@pytest.mark.parametrize("entry", [42, "x", None, ["a.jpg"]], ids=["int", "string", "null", "list"])
def test_a_karpathy_entry_that_is_not_an_object_is_named_in_any_split(tmp_path, entry):
    path = write_karpathy(tmp_path, [{"split": "test", "filename": "a.jpg", "sentences": SENTENCES}, entry])
    with pytest.raises(
        ValueError, match=r"dataset.json: images\[1\] must be an object with 'filename', 'split' and 'sentences', got"
    ):
        load_karpathy_split(path, "test")


def test_a_karpathy_path_outside_the_root_is_followed_when_allowed(tmp_path):
    path = write_karpathy(
        tmp_path, [{"split": "test", "filepath": "..", "filename": "a.jpg", "cocoid": 3, "sentences": SENTENCES}]
    )
    records = load_karpathy_split(path, "test", image_root=tmp_path / "coco", allow_outside_root=True)
    image = str(tmp_path / "coco" / ".." / "a.jpg")
    assert records == [{"image_id": "3", "image": image, "manifest_image": "../a.jpg", "captions": ["a cat"]}]


def test_region_arrays_check_the_whole_record_before_cutting_it():
    import numpy as np

    from imagebert_hf.data.pair_sources import region_arrays

    features, locations = np.zeros((10, 4), np.float32), np.zeros((10, 5), np.float32)
    short_labels = {
        "region_features": features,
        "region_locations": locations,
        "region_class_labels": np.zeros(3, np.int64),
    }
    with pytest.raises(ValueError, match=r"region record of 'k': region_class_labels has 3 rows but region_features"):
        region_arrays({"k": short_labels}, "k", max_regions=3)
    whole = {**short_labels, "region_class_labels": np.arange(10)}
    cut = region_arrays({"k": whole}, "k", max_regions=3)
    assert {name: value.shape for name, value in cut.items()} == {
        "region_features": (3, 4),
        "region_locations": (3, 5),
        "region_class_labels": (3,),
    }
    assert cut["region_class_labels"].tolist() == [0, 1, 2]
