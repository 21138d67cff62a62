"""The bottom-up-attention Visual Genome Faster R-CNN (Anderson et al. 2018), the detector ImageBERT's regions come from.

A ResNet-101 C4 network on torchvision ops: the backbone up to res4 (stride 16, frozen BatchNorm, the stride in the
first 1x1 conv as in the Caffe model), a region proposal network with one 3x3 conv of 512 channels and 12 anchors
per cell (sizes 64..512, ratios 0.5, 1, 2), RoIPool 14x14 on res4, then res5 (stride 1, dilation 2) mean-pooled to a
2048-d feature, a 1601-way object classifier (1600 Visual Genome classes, background last), 1600 class-specific box
regressors and a 401-way attribute classifier fed with the feature and an embedding of the predicted class.

Module and parameter names are those of the checkpoint that LXMERT's demo loads from the Hub as
`unc-nlp/frcnn-vg-finetuned` (`backbone.res2.0.conv1.weight`, `proposal_generator.rpn_head.conv.weight`,
`roi_heads.box_predictor.attr_score.weight`, ...), so that file loads with a strict key check.

Inference, per image: caffe preprocessing (BGR, minus the pixel means, shortest side 600 and longest 1000), RPN
proposals (top 6000 by objectness, decoded, clipped, NMS at 0.7, top 300), the RoI head, then the bottom-up-attention
selection: class-wise NMS at 0.3 over the class-specific boxes gives every proposal its best surviving class
confidence; the proposals at or above 0.2 are kept, at least 10 and at most 100, best first.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from transformers.utils import logging

from .roi_backends import RegionBackend, group_by_shape, load_state_dict_file, select_detections
from .roi_boxes import scale_boxes


logger = logging.get_logger(__name__)

BUTD_HUB_NAME = "unc-nlp/frcnn-vg-finetuned"
BUTD_CHECKPOINT_FILES = ("pytorch_model.bin", "model.safetensors", "roi_extractor.safetensors")
BUTD_NUM_CLASSES = 1600
BUTD_NUM_ATTRIBUTES = 400
BUTD_FEATURE_SIZE = 2048
# Caffe's ImageNet means in BGR order, on 0..255 pixels (no division by a standard deviation).
BUTD_PIXEL_MEAN = (102.9801, 115.9465, 122.7717)
BUTD_SIZE = {"shortest_edge": 600, "longest_edge": 1000}
# Settings of the network that are not weights (`detector_kwargs` may override them).
BUTD_DEFAULTS = {
    "anchor_sizes": (64, 128, 256, 512),
    "anchor_ratios": (0.5, 1.0, 2.0),
    "rpn_pre_nms_top_n": 6000,
    "rpn_post_nms_top_n": 300,
    "rpn_nms_threshold": 0.7,
    "rpn_min_size": 0.0,
    "caffe_maxpool": True,
}
RPN_BOX_WEIGHTS = (1.0, 1.0, 1.0, 1.0)
ROI_BOX_WEIGHTS = (10.0, 10.0, 5.0, 5.0)
# dw, dh are clamped so that a 16-pixel box cannot grow beyond 1000 pixels.
SCALE_CLAMP = math.log(1000.0 / 16)
# (blocks, bottleneck channels, output channels, first stride) of res2..res4; res5 lives in the RoI head.
RESNET101_STAGES = ((3, 64, 256, 1), (4, 128, 512, 2), (23, 256, 1024, 2))


# --------------------------------------------------------------------------------------------------------------------
# Box geometry (pure functions, tested step by step)
# --------------------------------------------------------------------------------------------------------------------


def cell_anchors(sizes=BUTD_DEFAULTS["anchor_sizes"], ratios=BUTD_DEFAULTS["anchor_ratios"]) -> torch.Tensor:
    """The anchors of one feature cell, centred on (0, 0): for each size s and ratio r (height / width), a box of
    area s**2 with width sqrt(s**2 / r) and height r * width. Sizes outer, ratios inner: (len(sizes) * len(ratios), 4).
    """
    anchors = []
    for size in sizes:
        for ratio in ratios:
            width = math.sqrt(size**2 / ratio)
            height = ratio * width
            anchors.append((-width / 2, -height / 2, width / 2, height / 2))
    return torch.tensor(anchors, dtype=torch.float32)


def grid_anchors(base: torch.Tensor, height: int, width: int, stride: int) -> torch.Tensor:
    """The anchors of a `height` x `width` feature map: `base` shifted to every cell's top-left pixel (offset 0),
    ordered (row, column, anchor), the order of the RPN outputs once permuted to (H, W, A). Shape (H * W * A, 4)."""
    shift_x = torch.arange(width, dtype=torch.float32, device=base.device) * stride
    shift_y = torch.arange(height, dtype=torch.float32, device=base.device) * stride
    grid_y, grid_x = torch.meshgrid(shift_y, shift_x, indexing="ij")
    shifts = torch.stack([grid_x, grid_y, grid_x, grid_y], dim=-1).reshape(-1, 1, 4)
    return (shifts + base.view(1, -1, 4)).reshape(-1, 4)


def decode_boxes(deltas: torch.Tensor, boxes: torch.Tensor, weights=RPN_BOX_WEIGHTS) -> torch.Tensor:
    """Applies (dx, dy, dw, dh) deltas to boxes, R-CNN style: the centre moves by (dx / wx) * width, the width scales
    by exp(dw / ww) (dw clamped at log(1000 / 16)); likewise in y.

    Args:
        deltas: (N, 4 * K) deltas, K boxes per row (class-specific regression).
        boxes: (N, 4) source boxes `x1, y1, x2, y2`.
        weights: (wx, wy, ww, wh).

    Returns:
        (N, 4 * K) boxes.
    """
    boxes = boxes.to(deltas.dtype)
    widths = boxes[:, 2] - boxes[:, 0]
    heights = boxes[:, 3] - boxes[:, 1]
    center_x = boxes[:, 0] + 0.5 * widths
    center_y = boxes[:, 1] + 0.5 * heights
    wx, wy, ww, wh = weights
    dx, dy = deltas[:, 0::4] / wx, deltas[:, 1::4] / wy
    dw = (deltas[:, 2::4] / ww).clamp(max=SCALE_CLAMP)
    dh = (deltas[:, 3::4] / wh).clamp(max=SCALE_CLAMP)
    pred_x = dx * widths[:, None] + center_x[:, None]
    pred_y = dy * heights[:, None] + center_y[:, None]
    pred_w = dw.exp() * widths[:, None]
    pred_h = dh.exp() * heights[:, None]
    decoded = torch.stack([pred_x - 0.5 * pred_w, pred_y - 0.5 * pred_h, pred_x + 0.5 * pred_w, pred_y + 0.5 * pred_h])
    # (4, N, K) -> (N, K, 4) -> (N, 4K)
    return decoded.permute(1, 2, 0).reshape(deltas.shape)


def clip_to_image(boxes: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Clamps `x` to [0, width] and `y` to [0, height] (any leading shape, last dim a multiple of 4)."""
    shape = boxes.shape
    boxes = boxes.reshape(-1, 4)
    boxes = torch.stack(
        [
            boxes[:, 0].clamp(0, width),
            boxes[:, 1].clamp(0, height),
            boxes[:, 2].clamp(0, width),
            boxes[:, 3].clamp(0, height),
        ],
        dim=1,
    )
    return boxes.reshape(shape)


def resized_shape(height: int, width: int, shortest: int, longest: int) -> tuple[int, int]:
    """(new_height, new_width): the shortest side scaled to `shortest` unless the longest would pass `longest`, then
    that one to `longest`; rounded half up, as detectron2's ResizeShortestEdge does."""
    scale = shortest / min(height, width)
    new_h, new_w = height * scale, width * scale
    if max(new_h, new_w) > longest:
        scale = longest / max(new_h, new_w)
        new_h, new_w = new_h * scale, new_w * scale
    return int(new_h + 0.5), int(new_w + 0.5)


def caffe_pixels(image: Image.Image, height: int, width: int, mean=BUTD_PIXEL_MEAN) -> torch.Tensor:
    """A (3, height, width) float tensor: the RGB image resized bilinearly, channels in BGR order, on 0..255 minus
    the Caffe pixel means."""
    if image.size != (width, height):
        image = image.resize((width, height), Image.Resampling.BILINEAR)
    pixels = torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32)[:, :, ::-1].copy())
    return pixels.permute(2, 0, 1) - torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)


# --------------------------------------------------------------------------------------------------------------------
# The network (checkpoint names)
# --------------------------------------------------------------------------------------------------------------------


class NormConv2d(nn.Conv2d):
    """A bias-free convolution followed by its frozen BatchNorm, stored as `<conv>.norm` as in the checkpoint."""

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1):
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, bias=False)
        from torchvision.ops import FrozenBatchNorm2d

        self.norm = FrozenBatchNorm2d(out_channels, eps=1e-5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(super().forward(x))


class BottleneckBlock(nn.Module):
    """ResNet bottleneck (1x1, 3x3, 1x1) with the stride in the first 1x1, as in the MSRA/Caffe ResNets."""

    def __init__(self, in_channels, bottleneck_channels, out_channels, stride=1, dilation=1):
        super().__init__()
        self.shortcut = NormConv2d(in_channels, out_channels, 1, stride) if in_channels != out_channels else None
        self.conv1 = NormConv2d(in_channels, bottleneck_channels, 1, stride)
        self.conv2 = NormConv2d(bottleneck_channels, bottleneck_channels, 3, 1, dilation, dilation)
        self.conv3 = NormConv2d(bottleneck_channels, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu_(self.conv1(x))
        out = F.relu_(self.conv2(out))
        out = self.conv3(out)
        return F.relu_(out + (self.shortcut(x) if self.shortcut is not None else x))


def make_stage(blocks, in_channels, bottleneck_channels, out_channels, first_stride, dilation=1) -> nn.Sequential:
    layers = []
    for index in range(blocks):
        stride = first_stride if index == 0 else 1
        layers.append(BottleneckBlock(in_channels, bottleneck_channels, out_channels, stride, dilation))
        in_channels = out_channels
    return nn.Sequential(*layers)


class BasicStem(nn.Module):
    def __init__(self, caffe_maxpool: bool = True):
        super().__init__()
        self.conv1 = NormConv2d(3, 64, 7, 2, 3)
        self.caffe_maxpool = caffe_maxpool

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu_(self.conv1(x))
        if self.caffe_maxpool:
            # Caffe pools with no padding and rounds the output size up.
            return F.max_pool2d(x, kernel_size=3, stride=2, padding=0, ceil_mode=True)
        return F.max_pool2d(x, kernel_size=3, stride=2, padding=1)


class ResNetC4(nn.Module):
    """Stem and res2..res4 of ResNet-101 (output: res4, 1024 channels, stride 16)."""

    stride = 16

    def __init__(self, caffe_maxpool: bool = True):
        super().__init__()
        self.stem = BasicStem(caffe_maxpool)
        in_channels = 64
        for index, (blocks, bottleneck, out_channels, stride) in enumerate(RESNET101_STAGES):
            self.add_module(f"res{index + 2}", make_stage(blocks, in_channels, bottleneck, out_channels, stride))
            in_channels = out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.res4(self.res3(self.res2(self.stem(x))))


class AnchorGenerator(nn.Module):
    """Holds the cell anchors as the checkpoint does (`cell_anchors.0`, one entry per feature level)."""

    def __init__(self, sizes, ratios):
        super().__init__()
        self.cell_anchors = nn.Module()
        self.cell_anchors.register_buffer("0", cell_anchors(sizes, ratios))

    @property
    def base(self) -> torch.Tensor:
        return getattr(self.cell_anchors, "0")


class RPNHead(nn.Module):
    def __init__(self, in_channels: int, hidden_channels: int, num_anchors: int):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, hidden_channels, 3, padding=1)
        self.objectness_logits = nn.Conv2d(hidden_channels, num_anchors, 1)
        self.anchor_deltas = nn.Conv2d(hidden_channels, num_anchors * 4, 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        hidden = F.relu(self.conv(x))
        return self.objectness_logits(hidden), self.anchor_deltas(hidden)


class RPN(nn.Module):
    def __init__(self, settings: dict[str, Any]):
        super().__init__()
        self.settings = settings
        num_anchors = len(settings["anchor_sizes"]) * len(settings["anchor_ratios"])
        self.anchor_generator = AnchorGenerator(settings["anchor_sizes"], settings["anchor_ratios"])
        self.rpn_head = RPNHead(1024, 512, num_anchors)

    def forward(self, features: torch.Tensor, image_sizes: list[tuple[int, int]]) -> list[torch.Tensor]:
        """Proposals per image in its resized frame, best objectness first."""
        from torchvision.ops import nms

        logits, deltas = self.rpn_head(features)
        batch, num_anchors, height, width = logits.shape
        anchors = grid_anchors(self.anchor_generator.base.to(features.device), height, width, ResNetC4.stride)
        # (N, A, H, W) -> (N, H*W*A); (N, A*4, H, W) -> (N, H*W*A, 4): the anchor order of grid_anchors.
        logits = logits.permute(0, 2, 3, 1).reshape(batch, -1)
        deltas = deltas.view(batch, num_anchors, 4, height, width).permute(0, 3, 4, 1, 2).reshape(batch, -1, 4)
        settings = self.settings
        proposals = []
        for index, (image_height, image_width) in enumerate(image_sizes):
            count = min(int(settings["rpn_pre_nms_top_n"]), logits.shape[1])
            scores, order = logits[index].sort(descending=True)
            scores, order = scores[:count], order[:count]
            boxes = decode_boxes(deltas[index, order], anchors[order], RPN_BOX_WEIGHTS)
            boxes = clip_to_image(boxes, image_height, image_width)
            sides = torch.minimum(boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1])
            valid = sides > float(settings["rpn_min_size"])
            boxes, scores = boxes[valid], scores[valid]
            # One feature level, so the per-level NMS is one NMS; its output is in descending score order.
            keep = nms(boxes, scores, float(settings["rpn_nms_threshold"]))[: int(settings["rpn_post_nms_top_n"])]
            proposals.append(boxes[keep])
        return proposals


class FastRCNNOutputLayers(nn.Module):
    """Object scores (classes + background, background last), class-specific box deltas and attribute scores."""

    def __init__(self, input_size: int, num_classes: int, num_attributes: int):
        super().__init__()
        self.cls_score = nn.Linear(input_size, num_classes + 1)
        self.bbox_pred = nn.Linear(input_size, num_classes * 4)
        self.cls_embedding = nn.Embedding(num_classes + 1, input_size // 8)
        self.fc_attr = nn.Linear(input_size + input_size // 8, input_size // 4)
        self.attr_score = nn.Linear(input_size // 4, num_attributes + 1)

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        scores = self.cls_score(features)
        deltas = self.bbox_pred(features)
        # The attribute head sees the feature and the embedding of the highest-scoring class (background included).
        embedded = self.cls_embedding(scores.argmax(dim=-1))
        attributes = self.attr_score(F.relu(self.fc_attr(torch.cat([features, embedded], dim=-1))))
        return scores, attributes, deltas


class Res5ROIHeads(nn.Module):
    """RoIPool 14x14 on res4, res5 with stride 1 and dilation 2 (the Visual Genome variant), mean-pooled."""

    pool_size = 14

    def __init__(self, num_classes: int, num_attributes: int):
        super().__init__()
        self.res5 = make_stage(3, 1024, 512, 2048, first_stride=1, dilation=2)
        self.box_predictor = FastRCNNOutputLayers(2048, num_classes, num_attributes)

    def forward(self, features: torch.Tensor, proposals: list[torch.Tensor]):
        from torchvision.ops import roi_pool

        pooled = roi_pool(features, [p.to(features.dtype) for p in proposals], self.pool_size, 1.0 / ResNetC4.stride)
        region_features = self.res5(pooled).mean(dim=(2, 3))
        return (region_features, *self.box_predictor(region_features))


class BUTDDetector(nn.Module):
    """The bottom-up-attention Faster R-CNN: `backbone`, `proposal_generator`, `roi_heads` (checkpoint names).

    Args:
        num_classes: Object classes without background (1600 for Visual Genome).
        num_attributes: Attribute classes without "no attribute" (400).
        settings: Network settings beyond the weights; `BUTD_DEFAULTS` for the missing ones.
    """

    def __init__(
        self,
        num_classes: int = BUTD_NUM_CLASSES,
        num_attributes: int = BUTD_NUM_ATTRIBUTES,
        settings: dict[str, Any] | None = None,
    ):
        super().__init__()
        unknown = sorted(set(settings or {}) - set(BUTD_DEFAULTS))
        if unknown:
            raise ValueError(f"unknown BUTD detector settings {unknown}; expected among {sorted(BUTD_DEFAULTS)}.")
        self.settings = {**BUTD_DEFAULTS, **(settings or {})}
        self.num_classes = num_classes
        self.num_attributes = num_attributes
        self.backbone = ResNetC4(self.settings["caffe_maxpool"])
        self.proposal_generator = RPN(self.settings)
        self.roi_heads = Res5ROIHeads(num_classes, num_attributes)

    def load_checkpoint(self, state_dict: dict[str, torch.Tensor], source: str = "the checkpoint") -> None:
        """Loads a state dict with exactly this network's keys and shapes; raises ValueError naming the missing,
        unexpected and misshapen keys otherwise. BatchNorm's `num_batches_tracked` counters, which a frozen
        BatchNorm does not keep, may be present or not."""
        state_dict = {k: v for k, v in state_dict.items() if not k.endswith("num_batches_tracked")}
        expected = self.state_dict()
        missing = sorted(set(expected) - set(state_dict))
        unexpected = sorted(set(state_dict) - set(expected))
        misshapen = [
            f"{key} {tuple(state_dict[key].shape)} (expected {tuple(expected[key].shape)})"
            for key in sorted(set(expected) & set(state_dict))
            if tuple(state_dict[key].shape) != tuple(expected[key].shape)
        ]
        if missing or unexpected or misshapen:
            problems = []
            for name, keys in (("missing", missing), ("unexpected", unexpected), ("with the wrong shape", misshapen)):
                if keys:
                    shown = ", ".join(keys[:8]) + (f" and {len(keys) - 8} more" if len(keys) > 8 else "")
                    problems.append(f"{len(keys)} keys {name}: {shown}")
            raise ValueError(
                f"{source} is not a bottom-up-attention Visual Genome Faster R-CNN state dict "
                f"({self.num_classes} classes, {self.num_attributes} attributes): " + "; ".join(problems) + "."
            )
        self.load_state_dict(state_dict, strict=True)

    @torch.inference_mode()
    def forward(self, pixels: torch.Tensor, image_sizes: list[tuple[int, int]], proposals=None):
        """Runs the network on a padded batch.

        Args:
            pixels: (N, 3, H, W) caffe-normalised pixels, each image at the top left, zeros beyond it.
            image_sizes: (height, width) of each image inside the batch.
            proposals: Boxes per image in that frame to use instead of the RPN's.

        Returns:
            Per image a dict: `proposals` (P, 4), `features` (P, 2048), `scores` (P, C + 1) object logits,
            `attribute_scores` (P, A + 1) logits, `class_boxes` (P, C, 4) clipped class-specific boxes.
        """
        features = self.backbone(pixels)
        if proposals is None:
            proposals = self.proposal_generator(features, image_sizes)
        region_features, scores, attribute_scores, deltas = self.roi_heads(features, proposals)
        counts = [len(p) for p in proposals]
        outputs = []
        for image_proposals, (height, width), feats, logits, attributes, image_deltas in zip(
            proposals,
            image_sizes,
            region_features.split(counts),
            scores.split(counts),
            attribute_scores.split(counts),
            deltas.split(counts),
        ):
            boxes = decode_boxes(image_deltas, image_proposals, ROI_BOX_WEIGHTS).view(len(image_proposals), -1, 4)
            outputs.append(
                {
                    "proposals": image_proposals,
                    "features": feats,
                    "scores": logits,
                    "attribute_scores": attributes,
                    "class_boxes": clip_to_image(boxes, height, width),
                }
            )
        return outputs


# --------------------------------------------------------------------------------------------------------------------
# Weights
# --------------------------------------------------------------------------------------------------------------------


def resolve_butd_weights(weights: str | os.PathLike, cache_dir: str | None = None) -> Path:
    """The checkpoint file of `weights`: a local file, a local folder holding one of `BUTD_CHECKPOINT_FILES`, or a
    Hub repository name (e.g. `unc-nlp/frcnn-vg-finetuned`, fetched with `huggingface_hub`; needs the network or a
    filled cache)."""
    path = Path(weights)
    if path.is_file():
        return path
    if path.is_dir():
        for name in BUTD_CHECKPOINT_FILES:
            if (path / name).is_file():
                return path / name
        raise FileNotFoundError(f"no BUTD checkpoint in {path}: expected one of {list(BUTD_CHECKPOINT_FILES)}.")
    if str(weights).count("/") != 1 or str(weights).startswith((".", "/")):
        raise FileNotFoundError(
            f"BUTD weights {str(weights)!r} are neither a local file or folder nor a Hub repository name "
            f"(owner/name, e.g. {BUTD_HUB_NAME!r})."
        )
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(str(weights), BUTD_CHECKPOINT_FILES[0], cache_dir=cache_dir))
    except Exception as error:
        raise OSError(
            f"could not fetch {BUTD_CHECKPOINT_FILES[0]} of the Hub repository {str(weights)!r} ({error}); "
            "download it where the network is reachable and pass the local file or folder instead."
        ) from error


def build_butd_detector(
    weights: str | os.PathLike | None, settings: dict[str, Any] | None = None, device: str = "cpu"
) -> BUTDDetector:
    """A `BUTDDetector` with the weights of `weights` (see `resolve_butd_weights`), or random ones for None."""
    detector = BUTDDetector(settings=settings)
    if weights is None:
        logger.warning(
            "the BUTD detector is randomly initialised: its regions carry no visual meaning. Random weights are for "
            "tests only; pass detector_weights (a local checkpoint file or folder, or %r when online).",
            BUTD_HUB_NAME,
        )
    else:
        path = resolve_butd_weights(weights)
        detector.load_checkpoint(load_state_dict_file(path), source=str(path))
    return detector.eval().to(device)


# --------------------------------------------------------------------------------------------------------------------
# The extractor backend
# --------------------------------------------------------------------------------------------------------------------


class BUTDBackend(RegionBackend):
    """Regions from the bottom-up-attention Visual Genome detector (`backend="butd"`).

    A region's box is its proposal box in original pixels, its feature the mean-pooled res5 output (2048-d), its
    class distribution the softmax over the 1600 object classes without background (renormalised), and its
    attribute the best of the 400 attributes (softmax without the "no attribute" column) with that probability.
    With given boxes, the boxes replace the proposals and are all kept.

    The images of a batch run in groups of equal resized shape, without padding: padded to a larger partner at the
    bottom and right (as detectron2 batches), an image's regions near that border would differ from a one-image run.

    Args:
        weights: A local checkpoint file or folder, a Hub repository name (`unc-nlp/frcnn-vg-finetuned`), or None
            for random weights (tests only; a warning is logged).
        settings: Network settings (`BUTD_DEFAULTS` keys: anchors, RPN top-n and NMS, `caffe_maxpool`).
        device: Torch device.
    """

    has_weights = True

    def __init__(self, weights: str | None, settings: dict[str, Any] | None = None, device: str = "cpu"):
        self.model = build_butd_detector(weights, settings, device)
        self.device = device

    @property
    def feature_size(self) -> int:
        return BUTD_FEATURE_SIZE

    @property
    def num_classes(self) -> int:
        return self.model.num_classes

    @property
    def num_attributes(self) -> int:
        return self.model.num_attributes

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {key: value.detach().cpu().contiguous() for key, value in self.model.state_dict().items()}

    def load_state_dict(self, state_dict: dict[str, torch.Tensor]) -> None:
        self.model.load_checkpoint(state_dict)

    def input_shape(self, image, settings) -> tuple[int, int]:
        """(height, width) of `image` at the network's input."""
        size = settings["size"]
        if "shortest_edge" not in size:
            raise ValueError(
                f"the BUTD detector resizes by the shortest edge: size must be {{'shortest_edge': ..., "
                f"'longest_edge': ...}} (default {BUTD_SIZE}), got {size}."
            )
        return resized_shape(
            image.height, image.width, int(size["shortest_edge"]), int(size.get("longest_edge", 10**9))
        )

    def preprocess(self, images, settings) -> tuple[torch.Tensor, list[tuple[int, int]], list[tuple[float, float]]]:
        """Padded caffe pixels, each image's (height, width) in them, and its (x, y) scale from original pixels."""
        mean = settings.get("image_mean") or BUTD_PIXEL_MEAN
        sizes, scales, tensors = [], [], []
        for image in images:
            height, width = self.input_shape(image, settings)
            tensors.append(caffe_pixels(image.image, height, width, mean))
            sizes.append((height, width))
            scales.append((width / image.width, height / image.height))
        batch = torch.zeros(len(tensors), 3, max(h for h, _ in sizes), max(w for _, w in sizes))
        for index, tensor in enumerate(tensors):
            batch[index, :, : tensor.shape[1], : tensor.shape[2]] = tensor
        return batch.to(self.device), sizes, scales

    def extract(self, images, boxes, settings):
        given = [b is not None for b in boxes]
        if any(given) and not all(given):
            raise ValueError("give boxes for every image of a batch or for none.")
        results: list[dict | None] = [None] * len(images)
        shapes = [self.input_shape(image, settings) for image in images]
        for indices in group_by_shape(shapes).values():
            group = self._extract_unpadded([images[i] for i in indices], [boxes[i] for i in indices], settings)
            for index, result in zip(indices, group):
                results[index] = result
        return results

    def _extract_unpadded(self, images, boxes, settings):
        """Regions of images of one resized shape."""
        pixels, sizes, scales = self.preprocess(images, settings)
        given = boxes[0] is not None
        proposals = None
        if given:
            proposals = [
                torch.from_numpy(scale_boxes(b, sx, sy)).to(self.device) for b, (sx, sy) in zip(boxes, scales)
            ]
        results = []
        for output, (sx, sy) in zip(self.model(pixels, sizes, proposals), scales):
            probs = F.softmax(output["scores"].float(), dim=-1)
            foreground = probs[:, :-1]
            if given:
                keep = torch.arange(min(len(foreground), int(settings["max_regions"])), device=foreground.device)
            else:
                keep = select_detections(foreground, output["class_boxes"], settings)
            foreground = foreground[keep]
            foreground = foreground / foreground.sum(dim=1, keepdim=True).clamp_min(1e-12)
            attributes = F.softmax(output["attribute_scores"][keep].float()[:, :-1], dim=-1)
            attribute_scores, attribute_labels = attributes.max(dim=1)
            results.append(
                {
                    "region_features": output["features"][keep].float().cpu().numpy(),
                    "region_boxes": scale_boxes(output["proposals"][keep].float().cpu().numpy(), 1 / sx, 1 / sy),
                    "region_class_labels": foreground.argmax(dim=1).cpu().numpy().astype(np.int64),
                    "region_class_probs": foreground.cpu().numpy().astype(np.float32),
                    "region_attribute_labels": attribute_labels.cpu().numpy().astype(np.int64),
                    "region_attribute_scores": attribute_scores.cpu().numpy().astype(np.float32),
                }
            )
        return results


__all__ = [
    "BUTDBackend",
    "BUTDDetector",
    "BUTD_HUB_NAME",
    "build_butd_detector",
    "cell_anchors",
    "decode_boxes",
    "grid_anchors",
    "resolve_butd_weights",
]
