"""What the app computes, without any UI: the gallery, its prebuilt indexes, the two searches and region importance.

Everything goes through the package's public pieces: `pipeline("image-text-retrieval")` (with a `RetrievalIndex`
of the gallery images and one of the gallery captions), the pipeline's `ImageBERTProcessor` and its
`ImageBERTRoIExtractor`, and the region records they exchange.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers.utils import logging

from ..formats.manifest import read_manifest
from ..models.imagebert.roi_image_loading import ImageLoadError, RegionExtractionError, load_image


logger = logging.get_logger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
# A box covering at least this share of the image is the "whole image" region.
WHOLE_IMAGE_SHARE = 0.98


class AppInputError(ValueError):
    """A bad input from the person using the app; its message is shown in the page as it is."""


# ---------------------------------------------------------------------------------------------------- the gallery


@dataclass
class GalleryImage:
    """One photo of the gallery.

    Attributes:
        key: its name in the app (the manifest's `image` path, or the file name in a folder).
        path: the image file.
        captions: its captions (a manifest's; none for a plain folder).
        boxes: object boxes `x1, y1, x2, y2` in pixels to pool regions over, or None for the extractor's own.
        box_labels: the objects' names, one per box (shown on the region picture), or None.
    """

    key: str
    path: Path
    captions: tuple[str, ...] = ()
    boxes: tuple[tuple[float, float, float, float], ...] | None = None
    box_labels: tuple[str, ...] | None = None


def read_gallery(source: str | os.PathLike, split: str | None = None, limit: int | None = None) -> list[GalleryImage]:
    """The gallery of a folder of images (sorted by name) or of a jsonl manifest (`imagebert_hf.formats.manifest`).

    A manifest's object boxes are used as the regions, with the whole image added as one more region, as
    `make demo` trains on; a folder's images get the extractor's own regions (the grid, or the detections).

    Args:
        source: a folder or a `.jsonl` manifest.
        split: keep only the manifest lines whose `"split"` is this (e.g. `"test"`); all lines when None.
        limit: keep at most this many images (the first ones).
    """
    source = Path(source)
    if source.is_dir():
        paths = sorted(p for p in source.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        gallery = [GalleryImage(key=p.name, path=p) for p in paths]
        where = f"the folder {source}"
    elif source.is_file() and source.suffix == ".jsonl":
        gallery = []
        for record in read_manifest(source):
            if split is not None and record.extra.get("split") != split:
                continue
            boxes = labels = None
            if record.boxes:
                boxes = record.boxes
                labels = record.box_labels
                if record.width and record.height:  # the whole image as one more region
                    boxes = boxes + ((0.0, 0.0, float(record.width), float(record.height)),)
                    labels = (labels or ("",) * len(record.boxes)) + ("whole image",)
            gallery.append(GalleryImage(record.image, record.image_path, record.captions, boxes, labels))
        where = f"the manifest {source}" + (f" (split {split!r})" if split else "")
    else:
        raise AppInputError(f"gallery must be a folder of images or a .jsonl manifest, got {str(source)!r}.")
    if limit is not None:
        gallery = gallery[:limit]
    if not gallery:
        raise AppInputError(f"{where} holds no images (looked for {', '.join(IMAGE_SUFFIXES)}).")
    return gallery


def gallery_captions(gallery: Sequence[GalleryImage]) -> list[str]:
    """Every caption of the gallery once, in gallery order."""
    return list(dict.fromkeys(caption for image in gallery for caption in image.captions))


def parse_caption_list(text: str | None) -> list[str]:
    """Pasted captions, one per line; blank lines dropped."""
    return [line.strip() for line in (text or "").splitlines() if line.strip()]


# ---------------------------------------------------------------------------------------------- region class names


def region_class_names(extractor) -> list[str] | None:
    """Names of the extractor's object classes, where its backend has a known label set.

    ImageNet-1k for the backbone backend with a 1000-way classifier (names from timm), COCO for a torchvision
    detector with 91 classes; None otherwise (regions are then labelled by class id).
    """
    num_classes = extractor.num_object_classes
    try:
        if extractor.backend == "backbone" and num_classes == 1000:
            from timm.data import ImageNetInfo

            info = ImageNetInfo()
            return [info.index_to_description(i).split(",")[0] for i in range(num_classes)]
        if extractor.backend == "detector" and extractor.detector_num_classes == 91:
            from torchvision.models.detection import FasterRCNN_ResNet50_FPN_Weights

            return list(FasterRCNN_ResNet50_FPN_Weights.COCO_V1.meta["categories"][1:])
    except Exception as error:  # an older timm or torchvision without the label files: ids instead of names
        logger.warning("no class names for the extractor's labels (%s: %s)", type(error).__name__, error)
    return None


@dataclass
class RegionLabel:
    """What the region picture writes next to one box."""

    name: str
    score: float | None = None


def region_labels(
    record: dict[str, Any], class_names: Sequence[str] | None, box_labels: Sequence[str] | None = None
) -> list[RegionLabel]:
    """One label per region of `record`: the gallery's object name where it has one, else the backend's class
    (its name, or `class N`) with the class probability where the record carries a distribution."""
    boxes = np.asarray(record["region_boxes"], dtype=np.float32).reshape(-1, 4)
    labels = np.asarray(record.get("region_class_labels", np.full(len(boxes), -100))).reshape(-1)
    probs = record.get("region_class_probs")
    probs = None if probs is None else np.asarray(probs, dtype=np.float32).reshape(len(boxes), -1)
    area = float(record.get("image_width", 0)) * float(record.get("image_height", 0))
    out = []
    for i, box in enumerate(boxes):
        label = int(labels[i]) if i < len(labels) else -100
        score = None
        if probs is not None and probs.shape[1] > label >= 0 and probs[i].sum() > 0:
            score = float(probs[i, label])
        if box_labels is not None and i < len(box_labels) and box_labels[i]:
            name = box_labels[i]
        elif area and (box[2] - box[0]) * (box[3] - box[1]) >= WHOLE_IMAGE_SHARE * area:
            name = "whole image"
        elif label < 0:
            name = "region"
        elif class_names is not None and label < len(class_names):
            name = class_names[label]
        else:
            name = f"class {label}"
        out.append(RegionLabel(name, score))
    return out


# ---------------------------------------------------------------------------------------------------- the engine


@dataclass
class ImageHit:
    """One result of a text query."""

    rank: int
    score: float
    probability: float
    image: GalleryImage
    record: dict[str, Any]


@dataclass
class CaptionHit:
    """One result of an image query."""

    rank: int
    score: float
    probability: float
    text: str


@dataclass
class RegionImportance:
    """How much each region of an image mattered for one (text, image) match.

    Attributes:
        score: the pair's score with every region.
        drops: per region, `score` minus the pair's score with that region masked out (positive: the region
            supported the match).
    """

    score: float
    drops: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.float32))

    def ranking(self) -> list[int]:
        """Region indices, the most supporting first."""
        return [int(i) for i in np.argsort(-self.drops, kind="stable")]


class RetrievalDemo:
    """A retrieval pipeline with a gallery whose regions and indexes are built once, at start.

    Args:
        retriever: an `ImageTextRetrievalPipeline` (`pipeline("image-text-retrieval", model=...)`).
        gallery: the photos (`read_gallery`).
        shortlist_k: candidates re-ranked by the cross-encoder per query, taken by the unimodal embeddings from
            the prebuilt index; a gallery no larger is ranked in full.
        batch_size: images per extraction batch and pairs per forward pass.
    """

    def __init__(self, retriever, gallery: Sequence[GalleryImage], shortlist_k: int = 128, batch_size: int = 32):
        if not gallery:
            raise AppInputError("the gallery is empty.")
        self.retriever = retriever
        self.processor = retriever.processor
        self.extractor = getattr(self.processor, "image_processor", None)
        if self.extractor is None:
            raise AppInputError(
                "the model was saved without its region extractor (no processor in its folder), so the app cannot "
                "read photos; save it with its ImageBERTProcessor."
            )
        self.gallery = list(gallery)
        self.shortlist_k = shortlist_k
        self.batch_size = batch_size
        self.class_names = region_class_names(self.extractor)
        self.records = self._extract_gallery()
        self.image_index = retriever.build_index(images=self.records, batch_size=batch_size)
        self.captions = gallery_captions(self.gallery)
        self.caption_index = (
            retriever.build_index(texts=self.captions, batch_size=batch_size) if self.captions else None
        )

    @property
    def max_regions(self) -> int:
        return int(self.processor.max_regions)

    def _extract_gallery(self) -> list[dict[str, Any]]:
        from tqdm.auto import tqdm

        records: list[dict[str, Any]] = []
        failures = []
        for start in tqdm(range(0, len(self.gallery), self.batch_size), desc="gallery regions", unit="batch"):
            chunk = self.gallery[start : start + self.batch_size]
            boxes = [None if image.boxes is None else np.asarray(image.boxes, dtype=np.float32) for image in chunk]
            out = self.extractor.extract(
                [str(image.path) for image in chunk],
                boxes=boxes,
                image_ids=[image.key for image in chunk],
                on_error="record",
                max_regions=self.max_regions,
            )
            for image, record in zip(chunk, out):
                if record.get("error"):
                    failures.append(f"{image.key}: {record['error']}")
                records.append(record)
        if failures:
            raise AppInputError(
                f"{len(failures)} gallery image(s) could not be read:\n  " + "\n  ".join(failures[:10])
            )
        return records

    # ------------------------------------------------------------------------------------------------ photos

    def load_photo(self, image: Any):
        """An uploaded or picked photo as a PIL image, checked with the extractor's limits (size, pixels,
        decompression bombs); raises `AppInputError` with the reason when it is not a usable image."""
        if image is None or (isinstance(image, str) and not image):
            raise AppInputError("Upload a photo or pick one from the gallery first.")
        settings = ("max_image_pixels", "max_file_bytes", "min_image_side", "max_aspect_ratio", "max_decode_side")
        try:
            loaded = load_image(image, **{name: getattr(self.extractor, name) for name in settings})
        except ImageLoadError as error:
            name = Path(str(image)).name if isinstance(image, (str, os.PathLike)) else "the photo"
            raise AppInputError(f"{name} is not a usable image: {error.reason.rstrip('.')}.") from None
        return loaded.image

    def photo_regions(self, photo) -> dict[str, Any]:
        """The region record of a PIL photo (the extractor's own regions, at most the model's `max_regions`)."""
        try:
            return self.extractor.extract(photo, max_regions=self.max_regions)[0]
        except RegionExtractionError as error:
            raise AppInputError(f"no regions could be extracted from the photo: {error.reason.rstrip('.')}.") from None

    def gallery_image(self, key: str) -> tuple[GalleryImage, dict[str, Any]]:
        for image, record in zip(self.gallery, self.records):
            if image.key == key:
                return image, record
        raise AppInputError(f"{key!r} is not a photo of the gallery.")

    # ------------------------------------------------------------------------------------------------ searches

    def search_images(self, query: str, top_k: int = 8) -> list[ImageHit]:
        """The `top_k` gallery photos for a text query, best first."""
        query = (query or "").strip()
        if not query:
            raise AppInputError("Type a query first: the search needs some words describing a photo.")
        results = self.retriever(
            texts=query,
            index=self.image_index,
            top_k=int(top_k),
            shortlist_k=self.shortlist_k,
            batch_size=self.batch_size,
        )
        return [
            ImageHit(rank, r["score"], r["probability"], self.gallery[r["index"]], self.records[r["index"]])
            for rank, r in enumerate(results, start=1)
        ]

    def rank_captions(self, record: dict[str, Any], captions: Sequence[str] | None = None, top_k: int = 5):
        """The best `top_k` captions for a photo's region record: of `captions`, or of the gallery's."""
        kwargs = {"top_k": int(top_k), "batch_size": self.batch_size}
        if captions:
            results = self.retriever(images=record, texts=list(captions), **kwargs)
        elif self.caption_index is not None:
            results = self.retriever(images=record, index=self.caption_index, shortlist_k=self.shortlist_k, **kwargs)
        else:
            raise AppInputError("The gallery has no captions: paste the captions to rank, one per line.")
        return [CaptionHit(rank, r["score"], r["probability"], r["text"]) for rank, r in enumerate(results, start=1)]

    def region_importance(self, text: str, record: dict[str, Any]) -> RegionImportance:
        """The drop in the (text, photo) score when each region is masked out in turn, in one batched pass."""
        inputs = self.processor(text=[text], regions=[record], return_tensors="pt")
        count = int(inputs["region_attention_mask"][0].sum())
        batch = {key: value.repeat(count + 1, *([1] * (value.dim() - 1))) for key, value in inputs.items()}
        for region in range(count):
            batch["region_attention_mask"][region + 1, region] = 0
        model = self.retriever.model
        model.eval()
        with torch.no_grad():
            batch = {key: value.to(model.device) for key, value in batch.items()}
            scores = model(**batch).logits.float().cpu().numpy()
        return RegionImportance(float(scores[0]), (scores[0] - scores[1:]).astype(np.float32))

    def labels_for(self, record: dict[str, Any], image: GalleryImage | None = None) -> list[RegionLabel]:
        return region_labels(record, self.class_names, image.box_labels if image is not None else None)


__all__ = [
    "AppInputError",
    "CaptionHit",
    "GalleryImage",
    "ImageHit",
    "RegionImportance",
    "RegionLabel",
    "RetrievalDemo",
    "gallery_captions",
    "parse_caption_list",
    "read_gallery",
    "region_class_names",
    "region_labels",
]
