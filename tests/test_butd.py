"""The bottom-up-attention Visual Genome Faster R-CNN backend (`backend="butd"`).

The checkpoint layout below is derived from the public model code of LXMERT's FRCNN demo (ResNet-101 C4 with the
caffe stride, an RPN with 512 hidden channels and 12 anchors, Res5 RoI head, 1600 classes, 400 attributes), written
out here independently of `roi_butd.py`. The detector runs with random weights: the steps are checked by hand
(anchors, box decoding, proposal order, class-wise NMS and thresholds), not the boxes' meaning.
"""

import math

import numpy as np
import pytest
import torch
from PIL import Image

from imagebert_hf import ImageBERTForImageTextRetrieval, ImageBERTRoIExtractor
from imagebert_hf.models.imagebert import roi_butd
from imagebert_hf.models.imagebert.processing_imagebert import ImageBERTProcessor, register_processing
from imagebert_hf.models.imagebert.roi_backends import select_detections
from imagebert_hf.models.imagebert.roi_butd import BUTDDetector, cell_anchors, decode_boxes, grid_anchors

from .testing_utils import run_without_the_package


# Small inputs keep the random-weight runs short: about 10 proposals on a 96-pixel image.
SMALL = {"size": {"shortest_edge": 96, "longest_edge": 128}, "detector_kwargs": {"rpn_post_nms_top_n": 10}}


def published_shapes() -> dict[str, tuple[int, ...]]:
    """Key -> shape of the `unc-nlp/frcnn-vg-finetuned` state dict (BatchNorm counters aside)."""
    shapes = {}

    def conv(prefix, out_channels, in_channels, kernel):
        shapes[f"{prefix}.weight"] = (out_channels, in_channels, kernel, kernel)
        for name in ("weight", "bias", "running_mean", "running_var"):
            shapes[f"{prefix}.norm.{name}"] = (out_channels,)

    def stage(prefix, blocks, in_channels, bottleneck, out_channels):
        for index in range(blocks):
            block = f"{prefix}.{index}"
            if index == 0:
                conv(f"{block}.shortcut", out_channels, in_channels, 1)
            conv(f"{block}.conv1", bottleneck, in_channels if index == 0 else out_channels, 1)
            conv(f"{block}.conv2", bottleneck, bottleneck, 3)
            conv(f"{block}.conv3", out_channels, bottleneck, 1)

    conv("backbone.stem.conv1", 64, 3, 7)
    stage("backbone.res2", 3, 64, 64, 256)
    stage("backbone.res3", 4, 256, 128, 512)
    stage("backbone.res4", 23, 512, 256, 1024)
    stage("roi_heads.res5", 3, 1024, 512, 2048)
    rpn = "proposal_generator."
    shapes[rpn + "anchor_generator.cell_anchors.0"] = (12, 4)
    shapes.update({rpn + "rpn_head.conv.weight": (512, 1024, 3, 3), rpn + "rpn_head.conv.bias": (512,)})
    shapes.update(
        {rpn + "rpn_head.objectness_logits.weight": (12, 512, 1, 1), rpn + "rpn_head.objectness_logits.bias": (12,)}
    )
    shapes.update({rpn + "rpn_head.anchor_deltas.weight": (48, 512, 1, 1), rpn + "rpn_head.anchor_deltas.bias": (48,)})
    head = "roi_heads.box_predictor."
    for name, shape in {
        "cls_score": (1601, 2048),
        "bbox_pred": (6400, 2048),
        "fc_attr": (512, 2304),
        "attr_score": (401, 512),
    }.items():
        shapes[f"{head}{name}.weight"], shapes[f"{head}{name}.bias"] = shape, shape[:1]
    shapes[head + "cls_embedding.weight"] = (1601, 256)
    return shapes


def random_checkpoint(seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights under the published keys, BatchNorm counters included as a PyTorch BatchNorm saves them."""
    generator = torch.Generator().manual_seed(seed)
    state_dict = {}
    for key, shape in published_shapes().items():
        if key.endswith("running_var"):
            value = 1 + torch.rand(shape, generator=generator)
        elif key.endswith("norm.weight"):
            value = 1 + 0.1 * torch.randn(shape, generator=generator)
        elif key.endswith("cell_anchors.0"):
            value = cell_anchors()
        elif key.endswith(("anchor_deltas.weight", "bbox_pred.weight")):
            # Small box deltas, as detectron2 initialises them: proposals stay near their anchors.
            value = 0.001 * torch.randn(shape, generator=generator)
        else:
            fan_in = math.prod(shape[1:]) if len(shape) > 1 else 100
            value = torch.randn(shape, generator=generator) / math.sqrt(fan_in)
        state_dict[key] = value
        if key.endswith("norm.running_var"):
            state_dict[key.replace("running_var", "num_batches_tracked")] = torch.tensor(0)
    return state_dict


@pytest.fixture(scope="module")
def checkpoint_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("frcnn-vg-finetuned")
    torch.save(random_checkpoint(), folder / "pytorch_model.bin")
    return folder


@pytest.fixture(scope="module")
def extractor(checkpoint_folder):
    return ImageBERTRoIExtractor(backend="butd", detector_weights=str(checkpoint_folder), device="cpu", **SMALL)


def test_module_tree_has_the_published_keys_and_shapes():
    detector = BUTDDetector()
    assert {key: tuple(value.shape) for key, value in detector.state_dict().items()} == published_shapes()


def test_checkpoint_loads_strictly_from_a_folder_or_a_hub_name(extractor, checkpoint_folder, monkeypatch):
    backend = extractor.get_backend()
    saved = torch.load(checkpoint_folder / "pytorch_model.bin", weights_only=True)
    loaded = backend.state_dict()
    for key in ("backbone.res4.22.conv3.weight", "roi_heads.box_predictor.attr_score.bias"):
        assert torch.equal(loaded[key], saved[key])
    assert extractor.config_kwargs() == {
        "region_feature_size": 2048,
        "num_object_classes": 1600,
        "max_regions": 100,
        "region_location_size": 5,
    }
    calls = []

    def fake_download(repo_id, filename, **kwargs):
        calls.append((repo_id, filename))
        return str(checkpoint_folder / "pytorch_model.bin")

    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    assert roi_butd.resolve_butd_weights("unc-nlp/frcnn-vg-finetuned") == checkpoint_folder / "pytorch_model.bin"
    assert calls == [("unc-nlp/frcnn-vg-finetuned", "pytorch_model.bin")]
    with pytest.raises(FileNotFoundError, match="no BUTD checkpoint"):
        roi_butd.resolve_butd_weights(checkpoint_folder.parent)


def test_checkpoint_with_wrong_keys_is_refused_naming_them(extractor):
    detector = extractor.get_backend().model
    state_dict = detector.state_dict()
    missing = {k: v for k, v in state_dict.items() if k != "roi_heads.box_predictor.cls_embedding.weight"}
    with pytest.raises(ValueError, match="1 keys missing: roi_heads.box_predictor.cls_embedding.weight"):
        detector.load_checkpoint(missing)
    with pytest.raises(ValueError, match="1 keys unexpected: roi_heads.box_head.fc6.weight"):
        detector.load_checkpoint({**state_dict, "roi_heads.box_head.fc6.weight": torch.zeros(1)})
    coco = {**state_dict, "roi_heads.box_predictor.cls_score.weight": torch.zeros(81, 2048)}
    with pytest.raises(ValueError, match=r"cls_score.weight \(81, 2048\) \(expected \(1601, 2048\)\)"):
        detector.load_checkpoint(coco)


def test_anchors_by_hand():
    base = cell_anchors()
    assert base.shape == (12, 4)
    # Size 64, ratio 0.5 (height / width): area 4096, width sqrt(8192) = 90.51, height 45.25, centred on 0.
    torch.testing.assert_close(base[0], torch.tensor([-45.2548, -22.6274, 45.2548, 22.6274]), atol=1e-4, rtol=0)
    widths, heights = base[:, 2] - base[:, 0], base[:, 3] - base[:, 1]
    torch.testing.assert_close(widths * heights, torch.tensor([64.0, 128, 256, 512]).repeat_interleave(3) ** 2)
    torch.testing.assert_close(heights / widths, torch.tensor([0.5, 1.0, 2.0]).repeat(4))
    grid = grid_anchors(base, height=2, width=3, stride=16)
    assert grid.shape == (2 * 3 * 12, 4)
    # Cell (row 1, column 2), anchor 7: base anchor 7 shifted by (2 * 16, 1 * 16).
    torch.testing.assert_close(grid[(1 * 3 + 2) * 12 + 7], base[7] + torch.tensor([32.0, 16, 32, 16]))


def test_box_decoding_by_hand():
    box = torch.tensor([[0.0, 0.0, 10.0, 20.0]])  # centre (5, 10), 10 x 20
    # RoI weights (10, 10, 5, 5): dx = 0.1, dy = -0.2, width x2, height x0.5.
    deltas = torch.tensor([[1.0, -2.0, 5 * math.log(2), 5 * math.log(0.5)]])
    decoded = decode_boxes(deltas, box, (10.0, 10.0, 5.0, 5.0))
    # centre (5 + 0.1 * 10, 10 - 0.2 * 20) = (6, 6); size 20 x 10.
    torch.testing.assert_close(decoded, torch.tensor([[-4.0, 1.0, 16.0, 11.0]]))
    # Two class-specific boxes per row; a huge dw is clamped at log(1000 / 16).
    two = decode_boxes(torch.tensor([[0.0, 0, 0, 0, 0, 0, 100.0, 0]]), box)
    torch.testing.assert_close(two[0, :4], box[0])
    assert float(two[0, 6] - two[0, 4]) == pytest.approx(10 * 1000 / 16, rel=1e-5)


def _greedy_nms(boxes, scores, threshold):
    from torchvision.ops import box_iou

    order = [int(i) for i in torch.argsort(scores, descending=True, stable=True)]
    kept = []
    for i in order:
        if all(float(box_iou(boxes[i : i + 1], boxes[j : j + 1])) <= threshold for j in kept):
            kept.append(i)
    return kept


class FixedRPNHead(torch.nn.Module):
    def __init__(self, logits, deltas):
        super().__init__()
        self.logits, self.deltas = logits, deltas

    def forward(self, features):
        return self.logits, self.deltas


def test_rpn_proposal_layout_and_order_by_hand():
    detector = BUTDDetector(settings={"rpn_pre_nms_top_n": 50, "rpn_post_nms_top_n": 20})
    height, width, anchors = 3, 4, 12
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(1, anchors, height, width, generator=generator)
    deltas = torch.zeros(1, anchors * 4, height, width)
    # Anchor 4 of cell (row 2, column 1) is moved right by a fifth of its width (dx = 0.2, RPN weights 1).
    deltas[0, 4 * 4 + 0, 2, 1] = 0.2
    detector.proposal_generator.rpn_head = FixedRPNHead(logits, deltas)
    image_height, image_width = 40, 60
    proposals = detector.proposal_generator(torch.zeros(1, 1024, height, width), [(image_height, image_width)])[0]

    base = cell_anchors()
    boxes, scores = [], []
    for row in range(height):
        for column in range(width):
            for a in range(anchors):
                box = base[a] + torch.tensor([16.0 * column, 16 * row, 16 * column, 16 * row])
                if (row, column, a) == (2, 1, 4):
                    box = box + 0.2 * (box[2] - box[0]) * torch.tensor([1.0, 0, 1, 0])
                box = torch.stack([box[0].clamp(0, 60), box[1].clamp(0, 40), box[2].clamp(0, 60), box[3].clamp(0, 40)])
                boxes.append(box)
                scores.append(logits[0, a, row, column])
    boxes, scores = torch.stack(boxes), torch.stack(scores)
    top = torch.argsort(scores, descending=True, stable=True)[:50]
    expected = [int(top[i]) for i in _greedy_nms(boxes[top], scores[top], 0.7)][:20]
    torch.testing.assert_close(proposals, boxes[expected])


def test_class_wise_nms_and_thresholds_by_hand():
    generator = torch.Generator().manual_seed(1)
    num_proposals, num_classes = 30, 4
    probs = torch.softmax(3 * torch.randn(num_proposals, num_classes + 1, generator=generator), dim=1)
    foreground = probs[:, :-1]
    corners = torch.rand(num_proposals, num_classes, 2, generator=generator) * 50
    class_boxes = torch.cat([corners, corners + 20 + 10 * torch.rand(num_proposals, num_classes, 2)], dim=-1)
    settings = {"nms_threshold": 0.3, "score_threshold": 0.2, "min_regions": 3, "max_regions": 8}
    confidence = torch.zeros(num_proposals)
    for c in range(num_classes):
        for i in _greedy_nms(class_boxes[:, c], foreground[:, c], 0.3):
            confidence[i] = max(confidence[i], foreground[i, c])
    ranked = sorted(range(num_proposals), key=lambda i: (-float(confidence[i]), -float(foreground[i].max())))
    passing = int((confidence >= 0.2).sum())
    assert 3 < passing < 30
    for low, high in ((3, 8), (3, 100), (passing + 2, 100)):
        settings.update(min_regions=low, max_regions=high)
        count = min(max(passing, low), high)
        assert select_detections(foreground, class_boxes, settings).tolist() == ranked[:count]


def generate_tsv_selection(foreground, class_boxes, nms_threshold, conf_thresh, min_boxes, max_boxes):
    """bottom-up-attention's tools/generate_tsv.py, best first: `max_conf` from per-class NMS over every proposal,
    `keep_boxes = np.where(max_conf >= conf_thresh)`, else `np.argsort(max_conf)[::-1][:MIN_BOXES]` (or
    `[:MAX_BOXES]`); returns the kept indices and `max_conf`."""
    max_conf = np.zeros(foreground.shape[0])
    for c in range(foreground.shape[1]):
        for i in _greedy_nms(class_boxes[:, c], foreground[:, c], nms_threshold):
            max_conf[i] = max(max_conf[i], float(foreground[i, c]))
    keep = np.where(max_conf >= conf_thresh)[0]
    if len(keep) < min_boxes:
        keep = np.argsort(max_conf)[::-1][:min_boxes]
    elif len(keep) > max_boxes:
        keep = np.argsort(max_conf)[::-1][:max_boxes]
    return sorted(keep.tolist(), key=lambda i: -max_conf[i]), max_conf


def test_slots_under_the_threshold_are_filled_by_confidence_not_by_class_probability():
    """Proposal 1 lies on proposal 0: its best class (0.04) is suppressed by proposal 0's 0.9 in that class, and
    what survives of it is 0.01. Proposal 2 keeps 0.03. One proposal passes 0.2 and two are wanted: the second slot
    goes to the higher confidence, proposal 2 (filling it by best class probability would pick proposal 1)."""
    foreground = torch.tensor([[0.9, 0.0], [0.04, 0.01], [0.02, 0.03]])
    boxes = torch.tensor([[0.0, 0, 10, 10], [0, 0, 10, 10], [50, 50, 60, 60]])
    class_boxes = boxes[:, None, :].expand(3, 2, 4).contiguous()
    settings = {"nms_threshold": 0.3, "score_threshold": 0.2, "min_regions": 2, "max_regions": 36}
    assert select_detections(foreground, class_boxes, settings).tolist() == [0, 2]
    assert generate_tsv_selection(foreground, class_boxes, 0.3, 0.2, 2, 36)[0] == [0, 2]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_selection_equals_generate_tsv_when_few_pass(seed):
    """Many classes, so most class probabilities are under 0.05 (below which pairs skip the first NMS pass) and few
    proposals pass the threshold: the selection still equals generate_tsv's, in order."""
    generator = torch.Generator().manual_seed(seed)
    num_proposals, num_classes = 40, 60
    foreground = torch.softmax(0.5 * torch.randn(num_proposals, num_classes + 1, generator=generator), dim=1)[:, :-1]
    corners = torch.rand(num_proposals, num_classes, 2, generator=generator) * 40
    class_boxes = torch.cat([corners, corners + 15 + 10 * torch.rand(num_proposals, num_classes, 2)], dim=-1)
    for min_regions, max_regions in ((10, 36), (1, 5), (36, 36)):
        settings = {
            "nms_threshold": 0.3,
            "score_threshold": 0.2,
            "min_regions": min_regions,
            "max_regions": max_regions,
        }
        expected, max_conf = generate_tsv_selection(foreground, class_boxes, 0.3, 0.2, min_regions, max_regions)
        assert select_detections(foreground, class_boxes, settings).tolist() == expected
    assert max_conf[expected].min() < 0.05  # the last case (36 of 40) keeps proposals of confidence under 0.05


def test_extracted_records_have_the_model_fields(extractor):
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in ((90, 120), (70, 60))]
    records = extractor.extract(images, region_location_size=7)
    for image, record in zip(images, records):
        count = record["num_regions"]
        # 10 proposals, all kept: min_regions is 10.
        assert count == 10 and record["error"] is None
        assert record["region_features"].shape == (count, 2048)
        assert record["region_locations"].shape == (count, 7)
        boxes = record["region_boxes"]
        assert boxes.shape == (count, 4) and (boxes[:, 2:] >= boxes[:, :2]).all()
        assert (boxes[:, [0, 2]] <= image.width + 1e-3).all() and (boxes[:, [1, 3]] <= image.height + 1e-3).all()
        probs = record["region_class_probs"]
        assert probs.shape == (count, 1600)
        np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-5)
        np.testing.assert_array_equal(record["region_class_labels"], probs.argmax(axis=1))
        assert ((record["region_attribute_labels"] >= 0) & (record["region_attribute_labels"] < 400)).all()
        assert ((record["region_attribute_scores"] > 0) & (record["region_attribute_scores"] <= 1)).all()
    with pytest.raises(ValueError, match="resizes by the shortest edge"):
        extractor.extract(images[0], size={"height": 64, "width": 64})
    given = np.array([[0, 0, 60, 45], [30, 20, 120, 90], [10, 10, 20, 30]], dtype=np.float32)
    record = extractor.extract(images[0], boxes=given)[0]
    np.testing.assert_allclose(record["region_boxes"], given, rtol=1e-5, atol=1e-3)
    assert record["region_features"].shape == (3, 2048) and record["region_locations"].shape == (3, 5)


def test_pipeline_with_the_butd_backend_saves_and_loads_as_remote_code(
    make_tiny_config, tokenizer, extractor, tmp_path
):
    from transformers import pipeline

    from imagebert_hf.models.imagebert.pipeline_image_text_retrieval import register_pipeline

    register_processing()
    register_pipeline()
    butd = ImageBERTRoIExtractor(
        backend="butd", detector_weights=extractor.detector_weights, max_regions=10, region_location_size=7, **SMALL
    )
    config = make_tiny_config(vocab_size=len(tokenizer), **butd.config_kwargs())
    assert (config.region_feature_size, config.num_object_classes, config.region_location_size) == (2048, 1600, 7)
    torch.manual_seed(0)
    model = ImageBERTForImageTextRetrieval(config)
    folder = tmp_path / "model"
    model.save_pretrained(folder)
    ImageBERTProcessor.from_model_config(config, tokenizer, butd).save_pretrained(folder)
    retriever = pipeline("image-text-retrieval", model=str(folder), device=-1)
    assert retriever.processor.image_processor.backend == "butd"
    image_path = tmp_path / "photo.png"
    Image.fromarray(np.random.default_rng(2).integers(0, 256, (80, 100, 3), dtype=np.uint8)).save(image_path)
    texts = ["a red circle", "a blue square"]
    expected = retriever(images=str(image_path), texts=texts)
    record = {"region_features": np.zeros((2, 2048), np.float32), "region_locations": np.full((2, 7), 0.5, np.float32)}
    assert retriever.processor(regions=record, text=texts[0])["region_locations"].shape == (1, 10, 7)

    saved = tmp_path / "saved"
    retriever.save_pretrained(saved)
    assert "roi_butd.py" in {path.name for path in saved.iterdir()}
    script = f"""
import json, sys
from transformers import pipeline
pipe = pipeline(model={str(saved)!r}, trust_remote_code=True, device=-1)
extractor = pipe.processor.image_processor
assert type(extractor.get_backend()).__module__.startswith("transformers_modules"), type(extractor.get_backend())
assert extractor.backend == "butd"
print(json.dumps(pipe(images={str(image_path)!r}, texts={texts!r})))
"""
    remote = run_without_the_package(script, tmp_path)
    assert [r["text"] for r in remote] == [r["text"] for r in expected]
    assert [r["score"] for r in remote] == pytest.approx([r["score"] for r in expected], abs=1e-5)
