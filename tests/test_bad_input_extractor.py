"""Bad input at the extractor boundary: settings of the wrong type or range, boxes of the wrong shape, with NaN or
with no area inside the image, and missing or damaged weights files fail naming the setting, box or file."""

import math

import numpy as np
import pytest
from PIL import Image

from imagebert_hf import ImageBERTRoIExtractor
from imagebert_hf.models.imagebert.roi_image_loading import RegionExtractionError


# On top of conftest's tiny extractor.
SMALL = {"max_regions": 5, "return_class_probs": False}

INT_SETTINGS = {
    "max_regions": 1,
    "min_regions": 0,
    "roi_pool_size": 1,
    "batch_size": 1,
    "max_image_pixels": 1,
    "max_file_bytes": 1,
    "min_image_side": 1,
    "max_decode_side": 1,
}
UNIT_FLOATS = ("score_threshold", "nms_threshold")
BOOL_SETTINGS = ("return_class_probs", "apply_exif_orientation")


def _setting_cases():
    for name, lowest in INT_SETTINGS.items():
        yield name, lowest - 1, ValueError
        yield name, float(lowest + 3), TypeError
        yield name, "8", TypeError
    for name in UNIT_FLOATS:
        yield name, -0.1, ValueError
        yield name, 1.5, ValueError
        yield name, math.nan, ValueError
        yield name, "0.3", TypeError
    for name in BOOL_SETTINGS:
        yield name, "no", TypeError
        yield name, 0, TypeError
    yield "max_aspect_ratio", 0.5, ValueError
    yield "max_aspect_ratio", math.inf, ValueError
    yield "detector_num_classes", 1, ValueError
    yield "grid_sizes", [], ValueError
    yield "grid_sizes", [1, 0], ValueError
    yield "grid_sizes", [2.5], TypeError
    yield "grid_sizes", 3, ValueError
    yield "size", {"height": 0, "width": 64}, ValueError
    yield "size", {"height": 64}, ValueError
    yield "size", {"height": 64, "width": "64"}, TypeError
    yield "size", {"shortest_edge": 320, "longest_edge": 100}, ValueError
    yield "size", {"shortest_edge": -1}, ValueError
    yield "size", [64, 64], ValueError
    yield "image_mean", [0.5, 0.5], ValueError
    yield "image_mean", [0.5, "a", 0.5], TypeError
    yield "image_std", [0.2, 0.0, 0.2], ValueError
    yield "image_std", [0.2, math.nan, 0.2], ValueError
    yield "backbone_weights", 5, TypeError


SETTING_CASES = list(_setting_cases())
_ids = [f"{name}={value!r}" for name, value, _ in SETTING_CASES]


@pytest.mark.parametrize(("name", "value", "error"), SETTING_CASES, ids=_ids)
def test_bad_setting_fails_at_construction_naming_it(make_tiny_extractor, name, value, error):
    with pytest.raises(error) as info:
        make_tiny_extractor(**{**SMALL, name: value})
    assert name in str(info.value) and "got" in str(info.value), str(info.value)


CALL_CASES = [
    (name, value, error)
    for name, value, error in SETTING_CASES
    if name not in ("detector_num_classes", "backbone_weights")
]


@pytest.fixture(scope="module")
def extractor(make_tiny_extractor):
    return make_tiny_extractor(**SMALL)


@pytest.fixture(scope="module")
def image():
    return Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 60, 3), dtype=np.uint8))


@pytest.mark.parametrize(
    ("name", "value", "error"), CALL_CASES[::3], ids=[f"{n}={v!r}" for n, v, _ in CALL_CASES[::3]]
)
def test_bad_per_call_setting_fails_naming_it(extractor, image, name, value, error):
    with pytest.raises(error, match=name.replace("[", r"\[")):
        extractor.extract(image, **{name: value})


# Boxes for a 60 x 40 image.
BOX_CASES = [
    ("three numbers", [[1.0, 2.0, 3.0]], "shape (R, 4)"),
    ("five columns", np.zeros((2, 5)), "shape (R, 4)"),
    ("three dimensions", np.zeros((1, 2, 4)), "shape (R, 4)"),
    ("NaN", [[0.0, 0.0, math.nan, 10.0]], "NaN"),
    ("infinite", [[0.0, 0.0, math.inf, 10.0]], "NaN or infinite"),
    ("inverted", [[30.0, 10.0, 10.0, 20.0]], "x2 >= x1"),
    ("right of the image", [[70.0, 5.0, 90.0, 30.0]], "boxes[0]"),
    ("below the image", [[0.0, 0.0, 10.0, 10.0], [5.0, 45.0, 20.0, 60.0]], "boxes[1]"),
    ("left of the image", [[-30.0, 0.0, -5.0, 10.0]], "boxes[0]"),
    ("above the image", [[10.0, -20.0, 20.0, -1.0]], "boxes[0]"),
    ("zero width", [[10.0, 10.0, 10.0, 20.0]], "boxes[0]"),
    ("on the right edge", [[60.0, 0.0, 80.0, 40.0]], "boxes[0]"),
    ("strings", [["a", "b", "c", "d"]], "could not convert"),
]


@pytest.mark.parametrize(("boxes", "named"), [c[1:] for c in BOX_CASES], ids=[c[0] for c in BOX_CASES])
def test_bad_boxes_fail_naming_them(extractor, image, boxes, named):
    with pytest.raises(RegionExtractionError) as info:
        extractor.extract(image, boxes=boxes)
    assert named in str(info.value), str(info.value)
    (record,) = extractor.extract([image], boxes=[boxes], on_error="record")
    assert record["num_regions"] == 0 and named in record["error"]


def test_boxes_partly_outside_are_clipped(extractor, image):
    (record,) = extractor.extract([image], boxes=[[[-10.0, -10.0, 30.0, 20.0], [50.0, 30.0, 100.0, 100.0]]])
    np.testing.assert_allclose(record["region_boxes"], [[0, 0, 30, 20], [50, 30, 60, 40]])
    assert (record["region_locations"][:, 4] > 0).all()


def test_a_box_count_mismatch_names_both_counts(extractor, image):
    with pytest.raises(ValueError, match="boxes for 1 images and 2 images"):
        extractor.extract([image, image], boxes=[None])


WEIGHTS_CASES = [
    ("missing file", None, "not found"),
    ("empty file", b"", "roi.safetensors"),
    ("random bytes", b"\x00\x01garbage" * 50, "roi.safetensors"),
    ("text", b"not weights at all\n", "roi.safetensors"),
]


@pytest.mark.parametrize(("data", "named"), [c[1:] for c in WEIGHTS_CASES], ids=[c[0] for c in WEIGHTS_CASES])
def test_missing_or_damaged_weights_name_the_file_and_setting(make_tiny_extractor, tmp_path, image, data, named):
    path = tmp_path / "roi.safetensors"
    if data is not None:
        path.write_bytes(data)
    extractor = make_tiny_extractor(**SMALL, backbone_weights=str(path))
    with pytest.raises(ValueError) as info:
        extractor.extract(image)
    message = str(info.value)
    assert "backbone_weights" in message and str(path) in message and named in message, message


def test_weights_of_another_model_name_the_file(make_tiny_extractor, tmp_path, image):
    import torch
    from safetensors.torch import save_file

    path = tmp_path / "other.safetensors"
    save_file({"fc.weight": torch.zeros(2, 2)}, str(path))
    with pytest.raises(ValueError, match=r"backbone_weights: cannot load weights file .*other\.safetensors"):
        make_tiny_extractor(**SMALL, backbone_weights=str(path)).extract(image)


def test_a_saved_extractor_with_damaged_weights_names_the_file(tmp_path, extractor, image):
    extractor.save_pretrained(tmp_path)
    (tmp_path / "roi_extractor.safetensors").write_bytes(b"damaged")
    with pytest.raises(ValueError, match=r"roi_extractor\.safetensors"):
        ImageBERTRoIExtractor.from_pretrained(tmp_path).extract(image)


@pytest.mark.parametrize(
    ("name", "value"), [("region_features", math.nan), ("region_features", math.inf), ("region_boxes", math.nan)]
)
def test_precomputed_regions_with_nan_are_refused_naming_the_file(tmp_path, name, value):
    from imagebert_hf.models.imagebert.roi_precomputed import write_npz_regions

    record = {
        "region_features": np.ones((3, 8), dtype=np.float32),
        "region_boxes": np.array([[0, 0, 10, 10], [5, 5, 20, 20], [0, 0, 30, 30]], dtype=np.float32),
        "image_width": 40,
        "image_height": 40,
    }
    record[name][1, 2] = value
    write_npz_regions(tmp_path / "img_a.npz", record)
    extractor = ImageBERTRoIExtractor(backend="precomputed", precomputed_path=str(tmp_path))
    with pytest.raises(RegionExtractionError, match=rf"img_a: {name} in the file contain NaN or infinite"):
        extractor.extract(image_ids=["img_a"])
    assert "NaN" in extractor.extract(image_ids=["img_a"], on_error="record")[0]["error"]
