"""Precomputed region files as users get them: records that disagree with their boxes, and `.tsv` files with
quoted or repeated image ids, a byte-order mark, or a row cut short."""

import numpy as np
import pytest

from imagebert_hf import ImageBERTRoIExtractor, RegionExtractionError, write_npz_regions, write_tsv_regions
from imagebert_hf.models.imagebert.roi_precomputed import LXMERT_TSV_FIELDS, TsvRegionIndex, read_npz_regions


NUM_BOXES, FEATURES, CLASSES = 4, 8, 5


def _record(image_id="img", value=0.0, **overrides):
    rng = np.random.default_rng(0)
    probs = rng.random((NUM_BOXES, CLASSES)).astype(np.float32)
    record = {
        "image_id": image_id,
        "region_features": np.full((NUM_BOXES, FEATURES), value, np.float32) + rng.random((NUM_BOXES, FEATURES)),
        "region_boxes": np.tile(np.array([[1, 2, 30, 40]], np.float32), (NUM_BOXES, 1)),
        "region_class_probs": probs / probs.sum(1, keepdims=True),
        "region_class_labels": np.arange(NUM_BOXES),
        "image_width": 100,
        "image_height": 80,
    }
    record.update(overrides)
    return record


def _extractor(path):
    return ImageBERTRoIExtractor(backend="precomputed", precomputed_path=str(path))


def _npz_error(tmp_path, **overrides):
    # The good file sorts first: the extractor reads the feature size from the first file.
    write_npz_regions(tmp_path / "a_good.npz", _record())
    write_npz_regions(tmp_path / "b_bad.npz", _record(**overrides))
    extractor = _extractor(tmp_path)
    with pytest.raises(RegionExtractionError):
        extractor.extract(image_ids=["b_bad"])
    records = extractor.extract(image_ids=["a_good", "b_bad"], on_error="record")
    assert records[0]["error"] is None and records[0]["num_regions"] == NUM_BOXES
    assert "b_bad.npz" in records[1]["error"]
    return records[1]["error"]


def test_npz_labels_not_matching_the_boxes_give_an_error_record(tmp_path):
    error = _npz_error(tmp_path, region_class_labels=np.arange(3))
    assert "'objects_id' has 3 labels for 4 boxes" in error


@pytest.mark.parametrize("shape", [(NUM_BOXES // 2, 2 * CLASSES), (NUM_BOXES + 1, CLASSES)])
def test_npz_class_probabilities_not_one_row_per_box_give_an_error_record(tmp_path, shape):
    error = _npz_error(tmp_path, region_class_probs=np.full(shape, 0.1, np.float32))
    assert f"'cls_prob' has shape {shape}" in error and "4 boxes" in error


def test_npz_boxes_stored_as_width_and_height_are_refused(tmp_path):
    # (x, y, width, height) with the corner right of and below the size: x2 < x1 once read as corners.
    boxes = np.tile(np.array([[60, 50, 10, 5]], np.float32), (NUM_BOXES, 1))
    error = _npz_error(tmp_path, region_boxes=boxes)
    assert "'bbox' row 0" in error and "x2 < x1" in error


def test_npz_boxes_with_a_score_column_are_refused(tmp_path):
    bbox = np.zeros((4, 5), np.float32)
    np.savez(tmp_path / "bad.npz", x=np.zeros((4, FEATURES), np.float32), bbox=bbox, image_w=100, image_h=80)
    with pytest.raises(ValueError, match=r"bad\.npz: 'bbox' has shape \(4, 5\)"):
        read_npz_regions(tmp_path / "bad.npz")


def test_npz_flat_boxes_and_degenerate_boxes_are_still_read(tmp_path):
    boxes = np.array([[1, 2, 30, 40], [5, 5, 5, 5], [0, 0, 100, 80], [10, 10, 20, 20]], np.float32)
    np.savez(
        tmp_path / "flat.npz",
        x=np.zeros((4, FEATURES), np.float32),
        bbox=boxes.reshape(-1),
        cls_prob=np.full(4 * CLASSES, 0.2, np.float32),
        image_w=100,
        image_h=80,
    )
    raw = read_npz_regions(tmp_path / "flat.npz")
    np.testing.assert_array_equal(raw["region_boxes"], boxes)
    assert raw["region_class_probs"].shape == (4, CLASSES)


def test_tsv_labels_not_matching_the_boxes_name_the_image_id(tmp_path):
    path = tmp_path / "lxmert.tsv"
    write_tsv_regions(path, [_record("good"), _record("bad", region_class_labels=np.arange(3))], LXMERT_TSV_FIELDS)
    records = _extractor(path).extract(image_ids=["good", "bad"], on_error="record")
    assert records[0]["error"] is None
    assert "(image id bad): 'objects_id' has 3 labels for 4 boxes" in records[1]["error"]


@pytest.mark.parametrize("image_id", ['img "a"', '"quoted"', "tab\there", "two\nlines", "plain"])
def test_tsv_ids_quoted_by_the_writer_are_found(tmp_path, image_id):
    path = tmp_path / "regions.tsv"
    write_tsv_regions(path, [_record("before", 1.0), _record(image_id, 2.0), _record("after", 3.0)])
    index = TsvRegionIndex(path)
    assert index.keys() == ["before", image_id, "after"]
    for key, value in (("before", 1.0), (image_id, 2.0), ("after", 3.0)):
        features = index[key]["region_features"]
        assert features.shape == (NUM_BOXES, FEATURES) and abs(features.mean() - value - 0.5) < 0.5
    records = _extractor(path).extract(image_ids=[image_id, "after"], on_error="record")
    assert [record["error"] for record in records] == [None, None]


def test_tsv_with_a_byte_order_mark_reads_its_first_row(tmp_path):
    write_tsv_regions(tmp_path / "plain.tsv", [_record("a"), _record("b")])
    path = tmp_path / "bom.tsv"
    path.write_bytes(b"\xef\xbb\xbf" + (tmp_path / "plain.tsv").read_bytes())
    assert TsvRegionIndex(path).keys() == ["a", "b"]
    records = _extractor(path).extract(image_ids=["a", "b"], on_error="record")
    assert [record["error"] for record in records] == [None, None]


def test_tsv_with_a_repeated_id_is_refused_naming_both_lines(tmp_path):
    path = tmp_path / "regions.tsv"
    write_tsv_regions(path, [_record("x", 0.0), _record("y"), _record("x", 100.0)])
    with pytest.raises(ValueError, match=r"regions\.tsv: image id 'x' is on line 1 and again on line 3"):
        TsvRegionIndex(path)


def test_tsv_row_cut_short_names_the_column_and_the_id(tmp_path):
    write_tsv_regions(tmp_path / "whole.tsv", [_record("a"), _record("b")])
    path = tmp_path / "cut.tsv"
    data = (tmp_path / "whole.tsv").read_bytes()
    path.write_bytes(data[: len(data) - 37])
    records = _extractor(path).extract(image_ids=["a", "b"], on_error="record")
    assert records[0]["error"] is None
    assert "cut.tsv (image id b): column 'features'" in records[1]["error"]


def test_tsv_row_missing_named_columns_is_an_error(tmp_path):
    path = tmp_path / "regions.tsv"
    write_tsv_regions(path, [_record("a")])
    index = TsvRegionIndex(path, fieldnames=["image_id", "image_w", "image_h", "num_boxes", "boxes", "features", "x"])
    with pytest.raises(ValueError, match=r"\(image id a\): the row has 6 columns, no x;"):
        index["a"]


def test_tsv_quote_never_closed_is_refused_naming_the_line(tmp_path):
    write_tsv_regions(tmp_path / "whole.tsv", [_record("a"), _record("b")])
    path = tmp_path / "open.tsv"
    path.write_bytes((tmp_path / "whole.tsv").read_bytes().replace(b"\nb\t", b'\n"b\t', 1))
    with pytest.raises(ValueError, match=r"open\.tsv: the row on line 2 is not valid TSV"):
        TsvRegionIndex(path)
