"""The three ways of getting regions: a timm backbone pooled over boxes, a torchvision detector, precomputed files.

A backend turns a batch of `LoadedImage`s (plus optional boxes in original pixels) into, per image, region
features, boxes, class labels and class distributions. `ImageBERTRoIExtractor` builds one from its settings.
"""

from __future__ import annotations

import functools
import os
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from transformers.utils import logging

from .roi_boxes import scale_boxes
from .roi_image_loading import LoadedImage
from .roi_offline_weights import OFFLINE_WEIGHTS, load_efficientnet_lite0_state_dict
from .roi_precomputed import TsvRegionIndex, read_npz_regions


logger = logging.get_logger(__name__)

# The special weight sources; anything else is a local file path.
RANDOM_WEIGHTS_WARNING = (
    "%s is randomly initialised: its regions carry no visual meaning. Random weights are for tests only; pass "
    "weights (a local file, %r for the packaged EfficientNet-Lite0, or a registry name when online)."
)


def load_state_dict_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Loads a state dict from `.safetensors`, or from a `.pt`/`.pth`/`.bin` file without unpickling code."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    state_dict = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model"):
        # Training checkpoints often nest the weights one level down.
        if isinstance(state_dict, dict) and isinstance(state_dict.get(key), dict):
            state_dict = state_dict[key]
    return state_dict


def _surviving_confidence(
    foreground: torch.Tensor, class_boxes: torch.Tensor, nms_threshold: float, candidate: torch.Tensor
) -> torch.Tensor:
    """(P,) each proposal's best class probability that survives per-class NMS among the `candidate` (P, C) pairs;
    0 for a proposal with none."""
    from torchvision.ops import batched_nms

    confidence = torch.zeros(foreground.shape[0], device=foreground.device)
    pairs = candidate.nonzero()
    if len(pairs):
        proposal_index, class_index = pairs[:, 0], pairs[:, 1]
        scores = foreground[proposal_index, class_index]
        keep = batched_nms(class_boxes[proposal_index, class_index], scores, class_index, nms_threshold)
        confidence.scatter_reduce_(0, proposal_index[keep], scores[keep], reduce="amax")
    return confidence


def select_detections(foreground: torch.Tensor, class_boxes: torch.Tensor, settings: dict[str, Any]) -> torch.Tensor:
    """The bottom-up-attention selection of detections: indices of the kept proposals, best first.

    As `generate_tsv.py` of bottom-up-attention: per-class NMS (`nms_threshold`) over the class-specific boxes gives
    each proposal its confidence, the best class probability of it that survives NMS (`max_conf`); the proposals
    whose confidence reaches `score_threshold` are kept, at most `max_regions` of them, by confidence. When fewer
    than `min_regions` reach it, the `min_regions` proposals of highest confidence are kept, whatever their
    confidence. Ties (and proposals with no surviving class, confidence 0) go by their best class probability.

    Args:
        foreground: (P, C) class probabilities without the background column.
        class_boxes: (P, C, 4) class-specific boxes, the same columns.
        settings: `nms_threshold`, `score_threshold`, `min_regions`, `max_regions`.
    """
    num_proposals = foreground.shape[0]
    threshold, nms_threshold = float(settings["score_threshold"]), float(settings["nms_threshold"])
    # NMS over (proposal, class) pairs at or above a floor only: a pair is suppressed only by pairs of its class
    # scoring higher, so every confidence at or above the floor is exact, and the floor keeps NMS small.
    floor = min(threshold, 0.05)
    confidence = _surviving_confidence(foreground, class_boxes, nms_threshold, foreground >= floor)
    passing = int((confidence >= threshold).sum())
    count = min(max(passing, int(settings["min_regions"])), int(settings["max_regions"]), num_proposals)
    if floor > 0 and int((confidence >= floor).sum()) < count:
        # Slots left for proposals under the floor: they are ranked by their own confidence, which needs every pair.
        confidence = _surviving_confidence(foreground, class_boxes, nms_threshold, foreground > 0)
    best = foreground.max(dim=1).values
    order = np.lexsort((-best.cpu().numpy(), -confidence.cpu().numpy()))
    return torch.from_numpy(order[:count].copy()).to(foreground.device)


class RegionBackend:
    """Interface of a region backend."""

    #: Whether the backend owns weights that `save_pretrained` should store.
    has_weights = False

    @property
    def feature_size(self) -> int:
        raise NotImplementedError

    @property
    def num_classes(self) -> int:
        """Size of the class distribution per region (0 when the backend has no classifier)."""
        raise NotImplementedError

    def extract(
        self, images: list[LoadedImage], boxes: list[np.ndarray | None], settings: dict[str, Any]
    ) -> list[dict[str, np.ndarray | None]]:
        """Regions of a batch: per image `region_features`, `region_boxes`, `region_class_labels`,
        `region_class_probs` (or None)."""
        raise NotImplementedError

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {}


def _resize_target(width: int, height: int, size: dict[str, int]) -> tuple[int, int]:
    if "height" in size and "width" in size:
        return int(size["width"]), int(size["height"])
    if "shortest_edge" in size:
        scale = size["shortest_edge"] / min(width, height)
        if "longest_edge" in size:
            scale = min(scale, size["longest_edge"] / max(width, height))
        return max(1, round(width * scale)), max(1, round(height * scale))
    raise ValueError(f"size must have height and width, or shortest_edge (and longest_edge); got {size}.")


def group_by_shape(shapes: list[Any]) -> dict[Any, list[int]]:
    """Indices of the items of each distinct shape, in order of first appearance (and in order within a group).

    A network run on a batch padded to its largest image gives the other images of the batch other features at their
    bottom and right; running one forward per group of equal input shapes keeps each image's regions what they are
    when it is extracted alone."""
    groups: dict[Any, list[int]] = defaultdict(list)
    for index, shape in enumerate(shapes):
        groups[shape].append(index)
    return groups


def resized_pixels(image: LoadedImage, size: dict[str, int]) -> torch.Tensor:
    """The backbone input of one image before normalisation: (H, W, 3) uint8, resized (bicubic) to `size`.

    Cheap to hand between processes (a quarter of the float32 pixels); `BackboneBackend.extract` uses it as given
    when `image.pixels` holds it (decoded ahead in a worker process), else computes it."""
    target = _resize_target(image.width, image.height, size)
    pixels = image.pixels
    if pixels is not None and (int(pixels.shape[1]), int(pixels.shape[0])) == target:
        return pixels
    pil = image.image
    if pil.size != target:
        pil = pil.resize(target, Image.Resampling.BICUBIC)
    return torch.from_numpy(np.array(pil, dtype=np.uint8))


def _axis_weights(start: torch.Tensor, length: torch.Tensor, pooled: int, size: int) -> torch.Tensor:
    """(R, pooled, size): bin p's bilinear sampling weights along one axis, averaged over the bin's samples, with
    torchvision's `roi_align` rules (aligned, adaptive sampling: ceil(length / pooled) samples per bin; a sample
    more than one cell outside the map counts zero; samples clamp to the border)."""
    grid = torch.ceil(length / pooled).long()
    samples = max(int(grid.max()) if len(grid) else 1, 1)
    bins = length / pooled
    p = torch.arange(pooled, device=start.device, dtype=start.dtype).view(1, -1, 1)
    i = torch.arange(samples, device=start.device, dtype=start.dtype).view(1, 1, -1)
    divisor = grid.clamp_min(1).to(start.dtype).view(-1, 1, 1)
    position = start.view(-1, 1, 1) + p * bins.view(-1, 1, 1) + (i + 0.5) * bins.view(-1, 1, 1) / divisor
    valid = (position >= -1.0) & (position <= size) & (i < grid.view(-1, 1, 1))
    position = position.clamp_min(0.0)
    low = position.floor()
    edge = low >= size - 1
    low = torch.where(edge, torch.full_like(low, size - 1), low)
    position = torch.where(edge, low, position)
    high = torch.where(edge, low, low + 1)
    fraction = position - low
    weight = valid.to(start.dtype) / divisor
    weights = torch.zeros(len(start), pooled, size, device=start.device, dtype=start.dtype)
    weights.scatter_add_(2, low.long(), (1.0 - fraction) * weight)
    weights.scatter_add_(2, high.long(), fraction * weight)
    return weights


def roi_align_mean(feature_map: torch.Tensor, rois: list[torch.Tensor], output_size: int) -> torch.Tensor:
    """`roi_align(feature_map, rois, output_size, spatial_scale=1, sampling_ratio=0, aligned=True).mean((2, 3))`
    (torchvision's RoIAlign, then the average over its bins) as one matrix product per image.

    Bilinear sampling is separable and linear: a region's average over its P x P bins is `a^T F b`, with `a` (over
    rows) and `b` (over columns) the sampling weights summed over all the region's samples (a sample more than
    one cell outside the map zeroes both). So an image's R regions are `(R, H*W) @ (H*W, C)`: one small matrix
    product, multi-threaded on any device, instead of R*P*P*C bilinear gathers and the (R, C, P, P) output. Same
    result up to float rounding (~1e-6).

    Args:
        feature_map: (N, C, H, W), any memory format.
        rois: N tensors of (R_i, 4) boxes `x1, y1, x2, y2` in feature-map cells.
        output_size: P, the bins per side.

    Returns:
        (sum R_i, C), in the order of `rois`.
    """
    _, channels, height, width = feature_map.shape
    outputs = []
    for image_map, boxes in zip(feature_map, rois):
        boxes = boxes.to(feature_map.dtype) - 0.5  # aligned=True: pixel centres at +0.5
        rows = _axis_weights(boxes[:, 1], boxes[:, 3] - boxes[:, 1], output_size, height).mean(1)  # (R, H)
        cols = _axis_weights(boxes[:, 0], boxes[:, 2] - boxes[:, 0], output_size, width).mean(1)  # (R, W)
        weights = (rows[:, :, None] * cols[:, None, :]).reshape(len(boxes), height * width)
        outputs.append(weights @ image_map.permute(1, 2, 0).reshape(height * width, channels))
    if not outputs:
        return feature_map.new_zeros(0, channels)
    return torch.cat(outputs)


def fold_batch_norms(model: torch.nn.Module, example: torch.Tensor, forward=None) -> tuple[torch.nn.Module, int]:
    """An inference copy of `model` with each batch norm that directly follows a convolution folded into it.

    Pairs are found by running `forward(copy, example)` (default: the copy's `forward`) once: a `BatchNorm2d` (or
    timm's `BatchNormAct2d`, whose dropout and activation are kept) whose input is exactly the output of a `Conv2d`,
    read by no other module, becomes `conv(x) * s + t` in the convolution's own weights and bias. A use of that
    output outside modules (functional code) is not seen here: compare the copy's outputs with the model's, as
    `BackboneBackend` does, before trusting it. The original model is not changed, so its parameter names, its
    training behaviour and its `state_dict` stay as they are.

    Returns:
        The folded copy (in eval mode) and the number of folded pairs.
    """
    import copy

    from torch import nn

    try:
        from timm.layers import BatchNormAct2d
    except ImportError:  # pragma: no cover - timm is a dependency of the backbone backend
        BatchNormAct2d = None

    folded = copy.deepcopy(model).eval()
    foldable = (nn.BatchNorm2d,) if BatchNormAct2d is None else (nn.BatchNorm2d, BatchNormAct2d)
    names = {module: name for name, module in folded.named_modules()}
    producer: dict[int, tuple[nn.Conv2d, torch.Tensor]] = {}
    pairs: list[tuple[nn.Conv2d, nn.BatchNorm2d, int]] = []
    consumers: defaultdict[int, int] = defaultdict(int)

    def after_conv(module, inputs, output):
        producer[id(output)] = (module, output)

    def before_norm(module, inputs):
        found = producer.get(id(inputs[0]))
        if found is not None and found[1] is inputs[0]:
            pairs.append((found[0], module, id(inputs[0])))

    # Every tensor a hook sees stays referenced until the pass ends: a freed one's id() would be handed to a later
    # tensor, mixing up their counts (which convolutions fold would then depend on memory addresses).
    seen: list[torch.Tensor] = []

    def count_uses(module, inputs):
        for value in inputs:
            if isinstance(value, torch.Tensor):
                seen.append(value)
                consumers[id(value)] += 1

    hooks = []
    for module in folded.modules():
        is_norm = type(module) in foldable
        if is_norm and module.track_running_stats and module.running_mean is not None:
            hooks.append(module.register_forward_pre_hook(before_norm))
        elif isinstance(module, nn.Conv2d):
            hooks.append(module.register_forward_hook(after_conv))
        # Uses are counted at the leaves, and at the norms: timm's BatchNormAct2d has children (its dropout and
        # activation), which read the norm's output, not the convolution's.
        if is_norm or not list(module.children()):
            hooks.append(module.register_forward_pre_hook(count_uses))
    try:
        with torch.no_grad():
            (forward or type(folded).forward)(folded, example)
    finally:
        for hook in hooks:
            hook.remove()
    convs = [conv for conv, _, _ in pairs]
    count = 0
    for conv, norm, output in pairs:
        if convs.count(conv) != 1 or consumers[output] != 1:
            continue  # a convolution run twice, or an output another module also reads (or changes): not foldable
        with torch.no_grad():
            inverse_std = 1.0 / torch.sqrt(norm.running_var + norm.eps)
            scale = norm.weight * inverse_std if norm.affine else inverse_std
            shift = (norm.bias if norm.affine else 0.0) - norm.running_mean * scale
            bias = conv.bias if conv.bias is not None else torch.zeros_like(norm.running_mean)
            weight = conv.weight * scale.reshape(-1, *([1] * (conv.weight.ndim - 1)))
            conv.weight = nn.Parameter(weight.to(conv.weight.dtype), requires_grad=False)
            conv.bias = nn.Parameter((bias * scale + shift).to(conv.weight.dtype), requires_grad=False)
        replacement = (
            nn.Sequential(norm.drop, norm.act)
            if BatchNormAct2d is not None and type(norm) is BatchNormAct2d
            else nn.Identity()
        )
        parent_name, _, attribute = names[norm].rpartition(".")
        setattr(folded.get_submodule(parent_name) if parent_name else folded, attribute, replacement)
        count += 1
    return folded, count


class BackboneBackend(RegionBackend):
    """A timm classification backbone pooled with RoIAlign over boxes (given, or the multi-scale grid).

    With `out_indices=None` the regions are pooled on the last feature map (`forward_features`) and passed through
    the model's own head: the pre-logits vector is the region feature (1280-d for EfficientNet-Lite0, 2048-d for a
    ResNet-50) and the classifier's softmax the region's class distribution (ImageNet-1k for ImageNet weights).
    With `out_indices` the feature maps of those stages (as timm's `features_only` exposes them) are pooled and
    concatenated; there is no classifier then, labels are -100.

    Args:
        name: timm model name.
        weights: `"efficientnet_lite0_package"`, a local state dict file, `"timm"` (timm's pretrained weights,
            needs the network or a filled cache), or None for random weights (tests only; a warning is logged).
        out_indices: Feature stages to pool instead of the head.
        model_kwargs: Extra `timm.create_model` arguments.
        device: Torch device.
        fuse: The fast inference path: an inference copy with batch norms folded into the convolutions, in
            channels-last memory (`inference_model`), and RoIAlign averaged while pooling (`roi_align_mean`) when
            the head only averages the bins. False runs `model` and torchvision's `roi_align` as they are. Either
            gives the same regions within 1e-4.
    """

    has_weights = True

    def __init__(
        self,
        name: str,
        weights: str | None,
        out_indices: list[int] | None = None,
        model_kwargs: dict[str, Any] | None = None,
        device: str = "cpu",
        fuse: bool = True,
    ):
        import timm

        self.name = name
        self.out_indices = list(out_indices) if out_indices is not None else None
        self.model = timm.create_model(name, pretrained=weights == "timm", **(model_kwargs or {}))
        if weights is None:
            logger.warning(RANDOM_WEIGHTS_WARNING, f"RoI backbone {name!r}", OFFLINE_WEIGHTS)
        elif weights == OFFLINE_WEIGHTS:
            stage_depths = [len(stage) for stage in self.model.blocks]
            self.model.load_state_dict(load_efficientnet_lite0_state_dict(stage_depths), strict=True)
        elif weights != "timm":
            self.model.load_state_dict(load_state_dict_file(weights), strict=True)
        self.model.eval().to(device)
        self.device = device
        self.reductions = [info["reduction"] for info in self.model.feature_info]
        self.channels = [info["num_chs"] for info in self.model.feature_info]
        if self.out_indices is not None:
            for index in self.out_indices:
                if not -len(self.channels) <= index < len(self.channels):
                    raise ValueError(
                        f"out_indices {self.out_indices} out of range for {name} ({len(self.channels)} stages)"
                    )
        self.fuse = fuse
        self._inference_model: torch.nn.Module | None = None
        self._head_mean: bool | None = None
        self.mean = tuple(self.model.pretrained_cfg.get("mean", (0.485, 0.456, 0.406)))
        self.std = tuple(self.model.pretrained_cfg.get("std", (0.229, 0.224, 0.225)))

    @property
    def feature_size(self) -> int:
        if self.out_indices is not None:
            return sum(self.channels[index] for index in self.out_indices)
        return int(self.model.num_features)

    @property
    def num_classes(self) -> int:
        return 0 if self.out_indices is not None else int(self.model.num_classes)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {key: value.detach().cpu().contiguous() for key, value in self.model.state_dict().items()}

    def _pool(self, feature_map, boxes, sizes, resized, reduction, pool_size, mean=False):
        from torchvision.ops import roi_align

        rois = []
        for image_boxes, (width, height), (resized_w, resized_h) in zip(boxes, sizes, resized):
            # Original pixels -> resized pixels -> feature cells (one stride = `reduction` pixels).
            sx, sy = resized_w / (width * reduction), resized_h / (height * reduction)
            rois.append(torch.from_numpy(scale_boxes(image_boxes, sx, sy)).to(feature_map.device))
        # Adaptive sampling (ceil(roi size / bins) points per bin): dense enough for large boxes, cheap for grid cells.
        if mean:
            return roi_align_mean(feature_map, rois, pool_size)
        return roi_align(feature_map, rois, output_size=pool_size, spatial_scale=1.0, sampling_ratio=0, aligned=True)

    def inference_model(self) -> torch.nn.Module:
        """The network `extract` runs: with `fuse` (default), an eval-only copy with batch norms folded into their
        convolutions, in channels-last memory format, checked once against `model` (within 1e-4, else `model`
        itself is used and a warning says why). `model` keeps its parameter names and training behaviour. The copy
        is made on first use: after changing `model`'s weights other than through `load_state_dict`, set
        `backend.fuse = False` or rebuild the backend."""
        if not self.fuse:
            return self.model
        if self._inference_model is None:
            self._inference_model = self._build_inference_model()
        return self._inference_model

    def _forward_maps(self, model, pixels):
        if self.out_indices is None:
            return [model.forward_features(pixels)]
        return model.forward_intermediates(pixels, indices=self.out_indices, intermediates_only=True)

    @torch.inference_mode(False)
    @torch.no_grad()
    def _build_inference_model(self) -> torch.nn.Module:
        parameter = next(self.model.parameters())
        generator = torch.Generator().manual_seed(0)
        example = torch.randn(2, 3, 96, 128, generator=generator).to(parameter.device, parameter.dtype)
        try:
            folded, count = fold_batch_norms(self.model, example, forward=lambda m, x: self._forward_maps(m, x))
            folded = folded.to(memory_format=torch.channels_last)
            # Compared in full float32: TF32 convolutions (cuDNN's default) would differ by more than folding does.
            allow_tf32, torch.backends.cudnn.allow_tf32 = torch.backends.cudnn.allow_tf32, False
            try:
                expected = self._forward_maps(self.model, example)
                got = self._forward_maps(folded, example.contiguous(memory_format=torch.channels_last))
            finally:
                torch.backends.cudnn.allow_tf32 = allow_tf32
            error = max(float((a.float() - b.float()).abs().max()) for a, b in zip(expected, got))
        except Exception as failure:  # an unusual network: the plain model still works
            logger.warning("%s: batch norm folding failed (%s); running the model unfused.", self.name, failure)
            return self.model
        if not error <= 1e-4:
            logger.warning(
                "%s: the model with %d folded batch norms differs from the plain one by %.3g (> 1e-4); running the "
                "model unfused.",
                self.name,
                count,
                error,
            )
            return self.model
        logger.info(
            "%s: %d batch norms folded into their convolutions (max difference %.2g).", self.name, count, error
        )
        return folded

    def load_state_dict(self, state_dict: dict[str, torch.Tensor]) -> None:
        self.model.load_state_dict(state_dict, strict=True)
        self._inference_model = None
        self._head_mean = None

    @torch.inference_mode(False)
    @torch.no_grad()
    def _head_is_mean(self, model) -> bool:
        """Whether `forward_head(x, pre_logits=True)` is the average over x's bins (EfficientNet's, a ResNet's):
        checked once on random input, so any other head is run as it is."""
        if self._head_mean is None:
            parameter = next(model.parameters())
            generator = torch.Generator().manual_seed(0)
            bins = torch.randn(3, self.channels[-1], 5, 5, generator=generator).to(parameter.device, parameter.dtype)
            try:
                head = model.forward_head(bins, pre_logits=True)
                self._head_mean = head.shape == (3, self.channels[-1]) and bool(
                    (head - bins.mean((2, 3))).abs().max() <= 1e-5
                )
            except Exception:  # a head that cannot take this input is run as it is
                self._head_mean = False
        return self._head_mean

    def _pixels(self, images: list[LoadedImage], size, mean, std) -> torch.Tensor:
        """Normalised (B, 3, H, W) float pixels (channels-last memory with `fuse`), from uint8 that cross to the
        device."""
        batch = torch.stack([resized_pixels(image, size) for image in images]).to(self.device, non_blocking=True)
        pixels = batch.permute(0, 3, 1, 2).float() / 255.0
        mean = torch.tensor(mean, device=self.device).view(1, 3, 1, 1)
        std = torch.tensor(std, device=self.device).view(1, 3, 1, 1)
        dtype = next(self.model.parameters()).dtype
        layout = torch.channels_last if self.fuse else torch.contiguous_format
        return ((pixels - mean) / std).to(dtype).contiguous(memory_format=layout)

    @torch.inference_mode()
    def extract(self, images, boxes, settings):
        mean = settings.get("image_mean") or self.mean
        std = settings.get("image_std") or self.std
        targets = [_resize_target(image.width, image.height, settings["size"]) for image in images]
        results: list[dict | None] = [None] * len(images)
        model = self.inference_model()
        # Images of one resized shape are stacked; no padding, so a batch gives what one-at-a-time gives.
        for target, indices in group_by_shape(targets).items():
            pixels = self._pixels([images[i] for i in indices], settings["size"], mean, std)
            sizes = [(images[i].width, images[i].height) for i in indices]
            group_boxes = [boxes[i] for i in indices]
            resized = [target] * len(indices)
            pool_size = int(settings["roi_pool_size"])
            maps = self._forward_maps(model, pixels)
            if self.out_indices is None:
                feature_map = maps[0]
                if feature_map.ndim != 4:
                    raise ValueError(
                        f"{self.name} gives no spatial feature map ({tuple(feature_map.shape)}); "
                        "set backbone_out_indices to pool intermediate feature maps instead."
                    )
                if self.fuse and self._head_is_mean(model):
                    # The head only averages the pooled bins: average while pooling (`roi_align_mean`).
                    features = self._pool(
                        feature_map, group_boxes, sizes, resized, self.reductions[-1], pool_size, True
                    )
                else:
                    pooled = self._pool(feature_map, group_boxes, sizes, resized, self.reductions[-1], pool_size)
                    features = model.forward_head(pooled, pre_logits=True)
                classifier = model.get_classifier()
                logits = classifier(features) if self.num_classes else None
            else:
                levels = []
                for feature_map, index in zip(maps, self.out_indices):
                    reduction = self.reductions[index]
                    if self.fuse:
                        levels.append(self._pool(feature_map, group_boxes, sizes, resized, reduction, pool_size, True))
                    else:
                        pooled = self._pool(feature_map, group_boxes, sizes, resized, reduction, pool_size)
                        levels.append(pooled.mean((2, 3)))
                features = torch.cat(levels, dim=1)
                logits = None
            counts = [len(b) for b in group_boxes]
            features = np.split(features.float().cpu().numpy(), np.cumsum(counts)[:-1])
            probs = (
                np.split(F.softmax(logits.float(), dim=-1).cpu().numpy(), np.cumsum(counts)[:-1])
                if logits is not None
                else [None] * len(indices)
            )
            for local, index in enumerate(indices):
                image_probs = probs[local]
                labels = (
                    image_probs.argmax(axis=1).astype(np.int64)
                    if image_probs is not None
                    else np.full(counts[local], -100, dtype=np.int64)
                )
                results[index] = {
                    "region_features": features[local].astype(np.float32),
                    "region_boxes": group_boxes[local].astype(np.float32),
                    "region_class_labels": labels,
                    "region_class_probs": None if image_probs is None else image_probs.astype(np.float32),
                }
        return results


class DetectorBackend(RegionBackend):
    """A torchvision two-stage detector (Faster R-CNN family) in the bottom-up-attention manner.

    Every proposal is scored by the box head; per-class NMS (`nms_threshold`) over the class-specific boxes gives
    each proposal its best surviving class confidence; the proposals whose confidence reaches `score_threshold`
    are kept, at least `min_regions` and at most `max_regions`, best first. A region's box is its proposal box, its
    feature the box head's output for it (1024-d for torchvision's `TwoMLPHead`) and its class distribution the
    box classifier's softmax without the background column, renormalised. With given boxes, the boxes replace the
    proposals and are all kept. The images of a batch run in groups of equal input shape (after the transform's
    resizing and rounding up), so none is padded to a larger partner: an image gets the regions it gets alone.

    Args:
        name: A `torchvision.models.get_model` detection model name, e.g. `fasterrcnn_resnet50_fpn`.
        weights: A local state dict file; a torchvision weights name (e.g. `"DEFAULT"`, needs the network or a
            filled cache); or None for random weights (tests only; a warning is logged).
        num_classes: Classes of the detector, background included (91 for torchvision's COCO models).
        model_kwargs: Extra `get_model` arguments (e.g. `min_size`, `max_size`, `rpn_post_nms_top_n_test`).
        device: Torch device.
    """

    has_weights = True

    def __init__(
        self,
        name: str,
        weights: str | None,
        num_classes: int = 91,
        model_kwargs: dict[str, Any] | None = None,
        device: str = "cpu",
    ):
        import torchvision

        self.name = name
        kwargs = dict(model_kwargs or {})
        local_file = weights is not None and (os.path.sep in weights or Path(weights).suffix != "")
        if weights is None or local_file:
            self.model = torchvision.models.get_model(
                name, weights=None, weights_backbone=None, num_classes=num_classes, **kwargs
            )
            if weights is None:
                logger.warning(RANDOM_WEIGHTS_WARNING, f"detector {name!r}", OFFLINE_WEIGHTS)
            else:
                self.model.load_state_dict(load_state_dict_file(weights), strict=True)
        else:
            self.model = torchvision.models.get_model(name, weights=weights, **kwargs)
        self.model.eval().to(device)
        self.device = device
        predictor = self.model.roi_heads.box_predictor
        self._feature_size = int(predictor.cls_score.in_features)
        self._num_classes = int(predictor.cls_score.out_features) - 1

    @property
    def feature_size(self) -> int:
        return self._feature_size

    @property
    def num_classes(self) -> int:
        return self._num_classes

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {key: value.detach().cpu().contiguous() for key, value in self.model.state_dict().items()}

    def load_state_dict(self, state_dict: dict[str, torch.Tensor]) -> None:
        self.model.load_state_dict(state_dict, strict=True)

    @torch.inference_mode()
    def extract(self, images, boxes, settings):
        from torchvision.models.detection.image_list import ImageList

        given = [b is not None for b in boxes]
        if any(given) and not all(given):
            raise ValueError("give boxes for every image of a batch or for none.")
        # The transform resizes each image, then pads a batch to its largest one (sides rounded up to a multiple of
        # its `size_divisible`): run alone, each image is padded to its own rounded size. One forward per padded
        # shape gives every image of a batch the features it has alone.
        inputs = [
            self.model.transform(
                [torch.from_numpy(np.array(image.image, dtype=np.float32)).permute(2, 0, 1).div(255.0).to(self.device)]
            )[0]
            for image in images
        ]
        results: list[dict | None] = [None] * len(images)
        for indices in group_by_shape([tuple(single.tensors.shape[-2:]) for single in inputs]).values():
            image_list = ImageList(
                torch.cat([inputs[i].tensors for i in indices]), [inputs[i].image_sizes[0] for i in indices]
            )
            group = self._extract_padded(
                image_list, [images[i] for i in indices], [boxes[i] for i in indices], settings
            )
            for index, result in zip(indices, group):
                results[index] = result
        return results

    def _extract_padded(self, image_list, images, boxes, settings):
        """Regions of the images of one padded batch (`image_list`, the transform's output)."""
        from torchvision.ops import boxes as box_ops

        features = self.model.backbone(image_list.tensors)
        # (scale from original pixels to the detector's input frame) per image
        scales = [
            (width / image.width, height / image.height)
            for image, (height, width) in zip(images, image_list.image_sizes)
        ]
        given = boxes[0] is not None
        if given:
            proposals = [
                torch.from_numpy(scale_boxes(b, sx, sy)).to(self.device) for b, (sx, sy) in zip(boxes, scales)
            ]
        else:
            proposals, _ = self.model.rpn(image_list, features)
        roi_heads = self.model.roi_heads
        box_features = roi_heads.box_head(roi_heads.box_roi_pool(features, proposals, image_list.image_sizes))
        class_logits, box_regression = roi_heads.box_predictor(box_features)
        probs = F.softmax(class_logits.float(), dim=-1)
        class_boxes = roi_heads.box_coder.decode(box_regression, proposals)
        counts = [len(p) for p in proposals]
        results = []
        for i, (image_proposals, image_probs, image_features, image_boxes, image_size) in enumerate(
            zip(
                proposals,
                probs.split(counts),
                box_features.split(counts),
                class_boxes.split(counts),
                image_list.image_sizes,
            )
        ):
            if given:
                keep = torch.arange(min(len(image_proposals), int(settings["max_regions"])), device=self.device)
            else:
                image_boxes = box_ops.clip_boxes_to_image(image_boxes, image_size)
                keep = select_detections(image_probs[:, 1:], image_boxes[:, 1:], settings)
            foreground = image_probs[keep, 1:]
            foreground = foreground / foreground.sum(dim=1, keepdim=True).clamp_min(1e-12)
            sx, sy = scales[i]
            region_boxes = scale_boxes(image_proposals[keep].float().cpu().numpy(), 1.0 / sx, 1.0 / sy)
            results.append(
                {
                    "region_features": image_features[keep].float().cpu().numpy(),
                    "region_boxes": region_boxes,
                    "region_class_labels": foreground.argmax(dim=1).cpu().numpy().astype(np.int64),
                    "region_class_probs": foreground.cpu().numpy().astype(np.float32),
                }
            )
        return results


class PrecomputedBackend(RegionBackend):
    """Regions read from bottom-up-attention files: a folder of per-image `.npz`, or a base64 `.tsv`.

    Images are looked up by key: the image id given to the extractor, else the input's file name without
    extension (`images/000000000139.jpg` -> `000000000139`), else the file name.

    Every file must give features of one size and class distributions of one size: `read` refuses a file of
    another size, naming it, its size and the expected one, and class labels outside the class distribution.

    Args:
        path: A folder of `<key>.npz` files, or a `.tsv` file.
        tsv_fieldnames: Column names of the `.tsv` when neither standard layout fits.
        feature_size: Expected feature size; when None, that of the first readable file (in name order; the first
            readable row of a `.tsv`) holding regions.
        num_classes: Expected size of the class distribution (0: none); when None, that of the same first file.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        tsv_fieldnames: list[str] | None = None,
        feature_size: int | None = None,
        num_classes: int | None = None,
    ):
        self.path = Path(path)
        if not self.path.exists():
            raise FileNotFoundError(f"precomputed region path not found: {self.path}")
        self._tsv = TsvRegionIndex(self.path, tsv_fieldnames) if self.path.is_file() else None
        self.declared_feature_size, self.declared_num_classes = feature_size, num_classes
        self._feature_size, self._num_classes = feature_size, num_classes
        # (file, feature size, class distribution size) of the first readable file holding regions.
        self._reference: tuple[str, int, int] | None = None

    def _sources(self):
        """(name for messages, reader) of every file (or row), in order."""
        if self._tsv is not None:
            keys = self._tsv.keys()  # a list in file order (the index has no iterator)
            for key in keys:
                yield f"{self.path} (image id {key})", functools.partial(self._tsv.__getitem__, key)
        else:
            for file in sorted(self.path.glob("*.npz")):
                yield str(file), functools.partial(read_npz_regions, file)

    def _reference_sizes(self) -> tuple[str, int, int]:
        """The first readable file (or row) holding regions, its feature size and its class distribution size (0:
        none): the sizes not declared."""
        if self._reference is None:
            first_problem = None
            for source, read in self._sources():
                try:
                    raw = read()
                except (ValueError, OSError) as error:
                    # A damaged file must not decide the size of every other: the next readable one does.
                    first_problem = first_problem or str(error)
                    continue
                if len(raw["region_features"]):
                    probs = raw["region_class_probs"]
                    self._reference = (source, raw["region_features"].shape[1], 0 if probs is None else probs.shape[1])
                    break
            else:
                what = "rows" if self._tsv is not None else ".npz files"
                empty = first_problem is None and next(self._sources(), None) is None
                found = f"no {what}" if empty else f"no readable {what} with regions"
                problem = f" (the first unreadable: {first_problem})" if first_problem else ""
                raise ValueError(
                    f"{self.path} holds {found}{problem} to read the region sizes from; set "
                    "precomputed_feature_size and precomputed_num_classes"
                )
        return self._reference

    @property
    def feature_size(self) -> int:
        if self._feature_size is None:
            self._feature_size = int(self._reference_sizes()[1])
        return self._feature_size

    @property
    def num_classes(self) -> int:
        if self._num_classes is None:
            self._num_classes = int(self._reference_sizes()[2])
        return self._num_classes

    def _expected(self, declared: int | None, setting: str) -> str:
        """Where an expected size comes from, for messages."""
        if declared is not None:
            return setting
        return f"as in {self._reference_sizes()[0]}, the first readable file; set {setting} to choose"

    def _check_sizes(self, raw: dict[str, Any], source: str) -> None:
        """Raises ValueError, naming `source`, when `raw` (from `read_npz_regions` or a `.tsv` row) disagrees with
        the feature size or the class distribution size of the other files, or has a class label outside it."""
        features = raw["region_features"]
        # A file without regions may not tell its feature size (a .tsv row stores none): 0 columns are unknown.
        if (len(features) or features.shape[1]) and features.shape[1] != self.feature_size:
            raise ValueError(
                f"{source}: features of size {features.shape[1]}, expected {self.feature_size} "
                f"({self._expected(self.declared_feature_size, 'precomputed_feature_size')})"
            )
        probs = raw["region_class_probs"]
        if probs is not None and (len(probs) or probs.shape[1]) and probs.shape[1] != self.num_classes:
            expected = self.num_classes or "none"
            raise ValueError(
                f"{source}: class distributions of {probs.shape[1]} classes, expected {expected} "
                f"({self._expected(self.declared_num_classes, 'precomputed_num_classes')})"
            )
        labels = raw["region_class_labels"]
        if labels is not None and self.num_classes:
            outside = labels[(labels != -100) & (labels >= self.num_classes)]
            if outside.size:
                raise ValueError(
                    f"{source}: class label {int(outside[0])} ({outside.size} such labels), expected class ids in "
                    f"[0, {self.num_classes}), the classes of the class distributions (-100 for none)"
                )

    def candidate_keys(self, key: str) -> list[str]:
        """The names `key` is looked up under; never one that leads out of the folder (`../x`, an absolute path):
        a key names an image, not a file to read wherever it lies."""
        path = Path(key)
        candidates = dict.fromkeys([key, path.stem, path.name])
        return [name for name in candidates if name and not Path(name).is_absolute() and ".." not in Path(name).parts]

    def read(self, key: str) -> dict[str, Any]:
        """The raw record of `key`; raises KeyError naming the key and the place searched, ValueError naming the
        file when it cannot be read or disagrees with the others."""
        for candidate in self.candidate_keys(key):
            if self._tsv is not None:
                if candidate in self._tsv:
                    raw = self._tsv[candidate]
                    self._check_sizes(raw, f"{self.path} (image id {candidate})")
                    return raw
            elif (self.path / f"{candidate}.npz").is_file():
                raw = read_npz_regions(self.path / f"{candidate}.npz")
                self._check_sizes(raw, str(self.path / f"{candidate}.npz"))
                return raw
        raise KeyError(f"no precomputed regions for {key!r} in {self.path}")

    def extract(self, images, boxes, settings):
        raise TypeError("precomputed regions are read by key, not computed from pixels")


__all__ = [
    "BackboneBackend",
    "DetectorBackend",
    "PrecomputedBackend",
    "RegionBackend",
    "fold_batch_norms",
    "group_by_shape",
    "load_state_dict_file",
    "resized_pixels",
    "roi_align_mean",
    "select_detections",
]
