"""Precomputed region files that disagree with each other or hold hostile values: the feature size and the class
distribution size come from the extractor's settings or the first readable file, every other file is checked
against them, and a file that cannot be used is refused naming it, never taking the run down or passing bad values
on to the collator."""

import zipfile

import numpy as np
import pytest

from imagebert_hf import ImageBERTRoIExtractor, RegionExtractionError, write_npz_regions, write_tsv_regions
from imagebert_hf.models.imagebert.roi_precomputed import (
    BOTTOM_UP_TSV_FIELDS,
    LXMERT_TSV_FIELDS,
    TsvRegionIndex,
    read_npz_regions,
)

from .test_precomputed_region_files import CLASSES, FEATURES, NUM_BOXES, _extractor, _record


WITH_PROBS_TSV_FIELDS = (*BOTTOM_UP_TSV_FIELDS, "cls_prob")


def _probs(classes):
    return np.full((NUM_BOXES, classes), 1.0 / classes, np.float32)


def _features(size):
    return np.ones((NUM_BOXES, size), np.float32)


def _errors(extractor, ids):
    return [record["error"] for record in extractor.extract(image_ids=ids, on_error="record")]


def _raw_npz(path, **overrides):
    values = {
        "x": _features(FEATURES),
        "bbox": np.tile(np.array([[1, 2, 30, 40]], np.float32), (NUM_BOXES, 1)),
        "image_w": 100,
        "image_h": 80,
    }
    values.update(overrides)
    np.savez(path, **{key: value for key, value in values.items() if value is not None})


# ---------------------------------------------------------------------------------------------- feature size


def test_a_corrupt_first_file_does_not_decide_the_sizes(tmp_path):
    (tmp_path / "a_corrupt.npz").write_bytes(b"not an archive")
    write_npz_regions(tmp_path / "b_good.npz", _record())
    extractor = _extractor(tmp_path)
    records = extractor.extract(image_ids=["a_corrupt", "b_good", "missing"], on_error="record")
    assert "a_corrupt.npz: not a .npz archive" in records[0]["error"]
    assert records[1]["error"] is None and records[1]["region_features"].shape == (NUM_BOXES, FEATURES)
    assert "no precomputed regions for 'missing'" in records[2]["error"]
    assert [record["region_features"].shape[1] for record in records] == [FEATURES] * 3
    assert [record["region_class_probs"].shape[1] for record in records] == [CLASSES] * 3
    assert (extractor.region_feature_size, extractor.num_object_classes) == (FEATURES, CLASSES)


def test_a_damaged_archive_gives_an_error_record_naming_it(tmp_path):
    write_npz_regions(tmp_path / "a_good.npz", _record())
    write_npz_regions(tmp_path / "b_cut.npz", _record())
    data = (tmp_path / "b_cut.npz").read_bytes()
    (tmp_path / "b_cut.npz").write_bytes(data[: len(data) // 2])
    write_npz_regions(tmp_path / "c_crc.npz", _record())
    data = bytearray((tmp_path / "c_crc.npz").read_bytes())
    data[100:160] = bytes(60)  # inside the first member's compressed bytes: its CRC no longer matches
    (tmp_path / "c_crc.npz").write_bytes(bytes(data))
    errors = _errors(_extractor(tmp_path), ["a_good", "b_cut", "c_crc"])
    assert errors[0] is None
    assert "b_cut.npz: not a .npz archive" in errors[1]
    assert "c_crc.npz: cannot read the .npz archive" in errors[2]


def test_a_corrupt_first_row_of_a_tsv_does_not_decide_the_sizes(tmp_path):
    path = tmp_path / "lxmert.tsv"
    rows = [_record("bad", region_class_labels=np.arange(3)), _record("good"), _record("other")]
    write_tsv_regions(path, rows, LXMERT_TSV_FIELDS)
    extractor = _extractor(path)
    errors = _errors(extractor, ["bad", "good", "missing"])
    assert "(image id bad): 'objects_id' has 3 labels" in errors[0]
    assert errors[1] is None and "no precomputed regions for 'missing'" in errors[2]
    assert extractor.region_feature_size == FEATURES


def test_nothing_readable_and_nothing_declared_is_one_clear_error(tmp_path):
    (tmp_path / "a.npz").write_bytes(b"not an archive")
    extractor = _extractor(tmp_path)
    with pytest.raises(
        ValueError, match=r"holds no readable \.npz files with regions \(the first unreadable: .*a\.npz"
    ):
        extractor.extract(image_ids=["a", "b"], on_error="record")
    with pytest.raises(ValueError, match=r"set precomputed_feature_size and precomputed_num_classes"):
        extractor.region_feature_size
    declared = ImageBERTRoIExtractor(
        backend="precomputed", precomputed_path=str(tmp_path), precomputed_feature_size=6, precomputed_num_classes=3
    )
    records = declared.extract(image_ids=["a", "b"], on_error="record")
    assert [record["region_features"].shape for record in records] == [(0, 6), (0, 6)]
    assert [record["region_class_probs"].shape for record in records] == [(0, 3), (0, 3)]


def test_a_file_of_another_feature_size_is_refused_naming_it_and_the_first_file(tmp_path):
    write_npz_regions(tmp_path / "a.npz", _record())
    write_npz_regions(tmp_path / "b.npz", _record(region_features=_features(2 * FEATURES)))
    extractor = _extractor(tmp_path)
    with pytest.raises(RegionExtractionError, match=rf"b\.npz: features of size {2 * FEATURES}, expected {FEATURES}"):
        extractor.extract(image_ids=["b"])
    error = _errors(extractor, ["b"])[0]
    assert f"as in {tmp_path / 'a.npz'}, the first readable file" in error


def test_the_declared_feature_size_wins_over_an_odd_first_file(tmp_path):
    write_npz_regions(tmp_path / "a_odd.npz", _record(region_features=_features(2 * FEATURES)))
    write_npz_regions(tmp_path / "b_good.npz", _record())
    extractor = ImageBERTRoIExtractor(
        backend="precomputed", precomputed_path=str(tmp_path), precomputed_feature_size=FEATURES
    )
    records = extractor.extract(image_ids=["a_odd", "b_good", "missing"], on_error="record")
    expected = f"a_odd.npz: features of size {2 * FEATURES}, expected {FEATURES} (precomputed_feature_size)"
    assert expected in records[0]["error"]
    assert records[1]["error"] is None
    assert [record["region_features"].shape[1] for record in records] == [FEATURES] * 3


def test_a_tsv_row_of_another_feature_size_is_refused_naming_the_image_id(tmp_path):
    path = tmp_path / "regions.tsv"
    write_tsv_regions(path, [_record("a"), _record("b", region_features=_features(FEATURES + 2))])
    errors = _errors(_extractor(path), ["a", "b"])
    assert errors[0] is None
    assert f"regions.tsv (image id b): features of size {FEATURES + 2}, expected {FEATURES}" in errors[1]


@pytest.mark.parametrize(
    ("setting", "value", "error", "message"),
    [
        ("precomputed_feature_size", "8", TypeError, "precomputed_feature_size must be an integer, got '8'"),
        ("precomputed_feature_size", 0, ValueError, "precomputed_feature_size must be >= 1, got 0"),
        ("precomputed_num_classes", 2.5, TypeError, "precomputed_num_classes must be an integer, got 2.5"),
        ("precomputed_num_classes", -1, ValueError, "precomputed_num_classes must be >= 0, got -1"),
    ],
)
def test_declared_sizes_are_checked_when_the_extractor_is_made(tmp_path, setting, value, error, message):
    with pytest.raises(error, match=message):
        ImageBERTRoIExtractor(backend="precomputed", precomputed_path=str(tmp_path), **{setting: value})


# ---------------------------------------------------------------------------------------------- class distributions


def test_class_distributions_of_another_size_are_refused_naming_the_file(tmp_path):
    write_npz_regions(tmp_path / "a.npz", _record())
    write_npz_regions(tmp_path / "b.npz", _record(region_class_probs=_probs(CLASSES + 2)))
    extractor = _extractor(tmp_path)
    errors = _errors(extractor, ["a", "b"])
    assert errors[0] is None
    assert f"b.npz: class distributions of {CLASSES + 2} classes, expected {CLASSES}" in errors[1]
    assert f"as in {tmp_path / 'a.npz'}" in errors[1]
    with pytest.raises(RegionExtractionError, match=r"b\.npz: class distributions"):
        extractor(image_ids=["a", "b"], return_tensors="pt")


def test_the_declared_class_count_is_checked(tmp_path):
    write_npz_regions(tmp_path / "a.npz", _record())
    write_npz_regions(tmp_path / "b.npz", _record(region_class_probs=_probs(7), region_class_labels=None))
    extractor = ImageBERTRoIExtractor(backend="precomputed", precomputed_path=str(tmp_path), precomputed_num_classes=7)
    errors = _errors(extractor, ["a", "b"])
    assert f"a.npz: class distributions of {CLASSES} classes, expected 7 (precomputed_num_classes)" in errors[0]
    assert errors[1] is None


def test_class_distributions_where_the_first_file_has_none_are_refused(tmp_path):
    write_npz_regions(tmp_path / "a.npz", _record(region_class_probs=None))
    write_npz_regions(tmp_path / "b.npz", _record())
    errors = _errors(_extractor(tmp_path), ["a", "b"])
    assert errors[0] is None
    assert f"b.npz: class distributions of {CLASSES} classes, expected none" in errors[1]


def test_tsv_class_distributions_of_another_size_name_the_image_id(tmp_path):
    path = tmp_path / "regions.tsv"
    rows = [_record("a"), _record("b", region_class_probs=_probs(CLASSES + 1))]
    write_tsv_regions(path, rows, WITH_PROBS_TSV_FIELDS)
    extractor = ImageBERTRoIExtractor(
        backend="precomputed", precomputed_path=str(path), tsv_fieldnames=list(WITH_PROBS_TSV_FIELDS)
    )
    errors = _errors(extractor, ["a", "b"])
    assert errors[0] is None
    assert f"(image id b): class distributions of {CLASSES + 1} classes, expected {CLASSES}" in errors[1]


def test_class_labels_outside_the_distribution_are_refused(tmp_path):
    write_npz_regions(tmp_path / "a.npz", _record())
    write_npz_regions(tmp_path / "b.npz", _record(region_class_labels=np.array([0, 1, CLASSES, 2])))
    errors = _errors(_extractor(tmp_path), ["a", "b"])
    assert errors[0] is None
    assert f"b.npz: class label {CLASSES} (1 such labels), expected class ids in [0, {CLASSES})" in errors[1]


# ---------------------------------------------------------------------------------------------- hostile values


@pytest.mark.parametrize(
    ("probs", "shown"),
    [
        (np.full((NUM_BOXES, CLASSES), np.nan, np.float32), "sums to nan"),
        (np.full((NUM_BOXES, CLASSES), np.inf, np.float32), "sums to inf"),
        (np.tile(np.array([[1.5, -0.5, 0, 0, 0]], np.float32), (NUM_BOXES, 1)), "lowest value -0.5"),
        (np.full((NUM_BOXES, CLASSES), 0.5, np.float32), "sums to 2.5"),
    ],
)
def test_class_distributions_that_are_not_distributions_are_refused(tmp_path, probs, shown):
    write_npz_regions(tmp_path / "a.npz", _record())
    write_npz_regions(tmp_path / "b.npz", _record(region_class_probs=probs, region_class_labels=None))
    # Rows of zeros are what the extractor stores for regions without a distribution.
    write_npz_regions(tmp_path / "c.npz", _record(region_class_probs=np.zeros((NUM_BOXES, CLASSES), np.float32)))
    errors = _errors(_extractor(tmp_path), ["b", "c"])
    assert "b.npz: 'cls_prob' row 0" in errors[0] and shown in errors[0] and "probability distribution" in errors[0]
    assert errors[1] is None


def test_boxes_outside_the_image_are_refused_but_rounding_is_not(tmp_path):
    # The boxes of a resized input (600 px wide) stored with the original size (100 x 80).
    far = np.tile(np.array([[10, 10, 590, 70]], np.float32), (NUM_BOXES, 1))
    write_npz_regions(tmp_path / "far.npz", _record(region_boxes=far))
    near = np.tile(np.array([[-0.5, 0, 100.6, 80.4]], np.float32), (NUM_BOXES, 1))
    write_npz_regions(tmp_path / "near.npz", _record(region_boxes=near))
    records = _extractor(tmp_path).extract(image_ids=["far", "near"], on_error="record")
    assert (
        "far.npz: 'bbox' row 0 is [10.0, 10.0, 590.0, 70.0], outside the 100x80 image (4 such rows)"
        in (records[0]["error"])
    )
    assert records[1]["error"] is None and records[1]["num_regions"] == NUM_BOXES


@pytest.mark.parametrize(
    ("value", "shown"), [(np.inf, "inf"), (-80, "-80"), (100.5, "100.5"), (np.array([100, 80]), "shape (2,)")]
)
def test_image_sizes_that_are_not_pixel_counts_give_an_error_record(tmp_path, value, shown):
    write_npz_regions(tmp_path / "a.npz", _record())
    _raw_npz(tmp_path / "b.npz", image_w=value)
    error = _errors(_extractor(tmp_path), ["a", "b"])[1]
    assert "b.npz: 'image_w' is" in error and shown in error and "a whole number > 0" in error


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"x": np.full((NUM_BOXES, FEATURES), "a")}, "'x' has dtype <U1, expected numbers"),
        ({"bbox": np.zeros((NUM_BOXES, 4), bool)}, "'bbox' has dtype bool, expected numbers"),
        ({"objects_id": np.array([0, 1, 2.5, 3])}, "'objects_id' holds 2.5, expected whole numbers"),
        ({"objects_id": np.array([0, 1, np.nan, 3])}, "'objects_id' holds nan, expected whole numbers"),
        ({"objects_id": np.array([0, -3, 1, 2])}, "'objects_id' holds the class id -3, expected class ids >= 0"),
        ({"image_id": np.array(["a", "b"])}, "'image_id' has shape (2,), expected one image id"),
    ],
)
def test_values_of_the_wrong_kind_are_refused_naming_the_file_and_key(tmp_path, overrides, message):
    write_npz_regions(tmp_path / "a.npz", _record())
    _raw_npz(tmp_path / "b.npz", **overrides)
    error = _errors(_extractor(tmp_path), ["a", "b"])[1]
    assert f"b.npz: {message}" in error


def test_whole_float_labels_and_a_bytes_image_id_are_read(tmp_path):
    _raw_npz(tmp_path / "a.npz", objects_id=np.array([0.0, 1.0, -100.0, 3.0]), image_id=np.bytes_(b"img-a"))
    raw = read_npz_regions(tmp_path / "a.npz")
    assert raw["region_class_labels"].tolist() == [0, 1, -100, 3] and raw["image_id"] == "img-a"


@pytest.mark.parametrize("layout", ["npz", "flat npz", "tsv"])
def test_an_image_without_regions_gives_an_empty_record(tmp_path, layout):
    empty = _record(
        "empty",
        region_features=np.zeros((0, FEATURES), np.float32),
        region_boxes=np.zeros((0, 4), np.float32),
        region_class_probs=np.zeros((0, CLASSES), np.float32),
        region_class_labels=np.zeros(0, np.int64),
    )
    if layout == "tsv":
        path = tmp_path / "regions.tsv"
        write_tsv_regions(path, [_record("good"), empty], LXMERT_TSV_FIELDS)
    else:
        path = tmp_path
        write_npz_regions(tmp_path / "good.npz", _record())
        if layout == "npz":
            write_npz_regions(tmp_path / "empty.npz", empty)
        else:
            _raw_npz(tmp_path / "empty.npz", x=np.zeros(0, np.float32), bbox=np.zeros(0, np.float32))
    extractor = _extractor(path)
    records = extractor.extract(image_ids=["good", "empty"], on_error="record")
    assert [record["error"] for record in records] == [None, None]
    assert records[1]["num_regions"] == 0 and records[1]["region_features"].shape == (0, FEATURES)
    assert records[1]["region_class_probs"].shape[0] == 0 and records[1]["region_locations"].shape == (0, 5)
    batch = extractor(image_ids=["good", "empty"], return_tensors="pt")
    assert batch["region_attention_mask"][1].sum() == 0


def test_a_tsv_row_with_a_negative_box_count_names_it(tmp_path):
    path = tmp_path / "regions.tsv"
    write_tsv_regions(path, [_record("a")])
    path.write_text(path.read_text().replace(f"\t{NUM_BOXES}\t", "\t-4\t", 1))
    with pytest.raises(ValueError, match=r"\(image id a\): column 'num_boxes' is '-4', expected a count of boxes"):
        TsvRegionIndex(path)["a"]


# ---------------------------------------------------------------------------------------------- duplicated keys


def test_two_keys_for_one_field_that_differ_are_refused(tmp_path):
    _raw_npz(tmp_path / "same.npz", features=_features(FEATURES), image_width=100)
    assert read_npz_regions(tmp_path / "same.npz")["region_features"].shape == (NUM_BOXES, FEATURES)
    _raw_npz(tmp_path / "differ.npz", features=np.zeros((NUM_BOXES, FEATURES), np.float32))
    with pytest.raises(ValueError, match=r"differ\.npz: 'features' and 'x' both hold the features and differ"):
        read_npz_regions(tmp_path / "differ.npz")


def test_an_archive_holding_one_key_twice_is_refused(tmp_path):
    path = tmp_path / "twice.npz"
    _raw_npz(path)
    np.save(tmp_path / "other.npy", np.zeros((NUM_BOXES, FEATURES), np.float32))
    with pytest.warns(UserWarning, match="Duplicate name"), zipfile.ZipFile(path, "a") as archive:
        archive.write(tmp_path / "other.npy", "x.npy")
    with pytest.raises(ValueError, match=r"twice\.npz: the archive holds 'x' twice"):
        read_npz_regions(path)


def test_a_key_never_reads_a_file_outside_the_folder(tmp_path):
    folder, outside = tmp_path / "regions", tmp_path / "elsewhere"
    folder.mkdir()
    outside.mkdir()
    write_npz_regions(folder / "a.npz", _record())
    write_npz_regions(tmp_path / "secret.npz", _record())
    write_npz_regions(outside / "b.npz", _record())
    extractor = _extractor(folder)
    keys = ["../secret", str(outside / "b"), "../elsewhere/b", "a"]
    errors = _errors(extractor, keys)
    assert [error is None for error in errors] == [False, False, False, True], errors
    for key, error in zip(keys[:3], errors):
        assert f"no precomputed regions for {key!r}" in error
