"""What the app computes, without any UI: the gallery, its prebuilt indexes, the two searches and region importance.

Everything goes through the package's public pieces: `pipeline("image-text-retrieval")` (with a `RetrievalIndex`
of the gallery images and one of the gallery captions), the pipeline's `ImageBERTProcessor` and its
`ImageBERTRoIExtractor`, and the region records they exchange.
"""

from __future__ import annotations

import os
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers.utils import logging

from ..data.retrieval_corpus import check_region_cache_fits, merge_duplicate_images, region_cache_key
from ..formats.manifest import read_manifest
from ..models.imagebert.image_processing_imagebert import LOAD_SETTINGS
from ..models.imagebert.pipeline_image_text_retrieval import load_retrieval_model, untrained_heads
from ..models.imagebert.roi_boxes import clip_boxes, grid_boxes
from ..models.imagebert.roi_image_loading import ImageLoadError, RegionExtractionError, image_header_size, load_image
from ..regions.cache_reader import load_region_cache


logger = logging.get_logger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
# What one request may ask of a shared server: each pasted caption is a cross-encoder pass, and a text is cut to the
# model's `max_text_length` tokens anyway (44 by default, a few hundred characters).
MAX_PASTED_CAPTIONS = 500
MAX_TEXT_CHARACTERS = 2000
# The most results a search shows (the page's photo slider stops there): a larger `top_k` would widen the shortlist
# the cross-encoder re-ranks, up to the whole gallery.
MAX_RESULTS = 32


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
        size: the width and height the manifest states (the frame its boxes are in), or None.
    """

    key: str
    path: Path
    captions: tuple[str, ...] = ()
    boxes: tuple[tuple[float, float, float, float], ...] | None = None
    box_labels: tuple[str, ...] | None = None
    size: tuple[int, int] | None = None


def read_gallery(
    source: str | os.PathLike,
    split: str | None = None,
    limit: int | None = None,
    use_boxes: bool = True,
    allow_outside_root: bool = False,
) -> list[GalleryImage]:
    """The gallery of a folder of images (sorted by name) or of a jsonl manifest (`imagebert_hf.formats.manifest`).

    With `use_boxes`, a manifest's object boxes are used as the regions, with the whole image added as one more
    region, as `make demo` trains on (a photo with more objects than the model's regions keeps its first objects and
    the whole image, see `RetrievalDemo`); otherwise, and for a folder's images, the extractor's own regions (the
    grid, or the detections), as a model trained on its processor's regions saw them. An image
    a manifest lists on several lines (one line per caption, say) is one photo with the captions of all its lines,
    by the evaluation's rule (`merge_duplicate_images`, which warns): the app ranks the gallery an evaluation of the
    same split ranks.

    Args:
        source: a folder or a `.jsonl` manifest.
        split: keep only the manifest lines whose `"split"` is this (e.g. `"test"`); all lines when None.
        limit: keep at most this many images (the first ones).
        use_boxes: pool a manifest's photos over its annotated boxes (and the whole image).
        allow_outside_root: follow a manifest's image paths that leave its folder (absolute, or `../`); refused by
            default.
    """
    source = Path(source)
    if source.is_dir():
        paths = sorted(p for p in source.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        gallery = [GalleryImage(key=p.name, path=p) for p in paths]
        where = f"the folder {source}"
    elif source.is_file() and source.suffix == ".jsonl":
        gallery = _manifest_gallery(source, split, use_boxes, allow_outside_root)
        where = f"the manifest {source}"
    else:
        raise AppInputError(f"gallery must be a folder of images or a .jsonl manifest, got {str(source)!r}.")
    if limit is not None:
        gallery = gallery[:limit]
    if not gallery:
        raise AppInputError(f"{where} holds no images (looked for {', '.join(IMAGE_SUFFIXES)}).")
    return gallery


def _manifest_gallery(
    source: Path, split: str | None, use_boxes: bool = True, allow_outside_root: bool = False
) -> list[GalleryImage]:
    lines = read_manifest(source, allow_outside_root=allow_outside_root)
    kept = [record for record in lines if split is None or record.extra.get("split") == split]
    if not kept:
        if not lines:
            raise AppInputError(f"the manifest {source} has no lines.")
        splits = sorted({repr(record.extra["split"]) for record in lines if "split" in record.extra})
        have = f"its splits are {', '.join(splits)}" if splits else "its lines have no 'split' field"
        raise AppInputError(f"split {split!r} matches no line of the manifest {source}: {have}.")
    # The records `load_manifest_records` makes for an evaluation, so that the merge joins the lines it joins.
    records = []
    for record in kept:
        records.append(
            {
                "image_id": record.image_id,
                "image": str(record.image_path),
                "manifest_image": record.image,
                "captions": list(record.captions),
                "line": record,
            }
        )
    entries = merge_duplicate_images(records)
    gallery = []
    for entry in entries:
        record = entry["line"]  # the image's first line: its boxes and size
        boxes = labels = None
        if record.boxes and use_boxes:
            boxes = record.boxes
            labels = record.box_labels
            if record.width and record.height:  # the whole image as one more region
                boxes = boxes + ((0.0, 0.0, float(record.width), float(record.height)),)
                labels = (labels or ("",) * len(record.boxes)) + ("whole image",)
        size = (record.width, record.height) if record.width and record.height else None
        gallery.append(GalleryImage(record.image, record.image_path, tuple(entry["captions"]), boxes, labels, size))
    return gallery


def load_retriever(model: str, device=None):
    """The `image-text-retrieval` pipeline on `model` (a folder or Hub id), served by the installed package's
    classes: a published folder declares its own pipeline, which `pipeline(model=path)` would run as remote code."""
    from transformers import pipeline

    return pipeline("image-text-retrieval", model=load_retrieval_model(model), device=device)


def gallery_captions(gallery: Sequence[GalleryImage]) -> list[str]:
    """Every caption of the gallery once, in gallery order."""
    return list(dict.fromkeys(caption for image in gallery for caption in image.captions))


def parse_caption_list(text: str | None) -> list[str]:
    """Pasted captions, one per line; lines without visible text (`has_visible_text`) dropped. More than
    `MAX_PASTED_CAPTIONS` captions, one longer than `MAX_TEXT_CHARACTERS`, or a line holding a lone surrogate, is
    refused with `AppInputError`."""
    lines = (text or "").splitlines()
    for number, line in enumerate(lines, start=1):
        check_no_surrogates(line, f"line {number} of the pasted captions")
    captions = [line.strip() for line in lines if has_visible_text(line)]
    if len(captions) > MAX_PASTED_CAPTIONS:
        raise AppInputError(
            f"{len(captions)} captions pasted; at most {MAX_PASTED_CAPTIONS} are ranked per request: paste fewer."
        )
    for line, caption in enumerate(captions, start=1):
        check_text_length(caption, f"caption {line}")
    return captions


def has_visible_text(text: str) -> bool:
    """Whether `text` holds a letter, digit, punctuation mark or symbol: what the tokenizer makes a word of.

    Pasted text is full of characters it drops (zero-width spaces, byte order marks, joiners, controls, U+FFFD),
    and of combining marks and variation selectors, which it strips or reads alone as an unknown token: a text of
    nothing else would reach the model with no word in it.
    """
    return any(unicodedata.category(character)[0] in "LNPS" and character != "\ufffd" for character in text)


def check_no_surrogates(text: str, what: str) -> None:
    """Refuses (`AppInputError`) a text holding a lone surrogate, half of a UTF-16 pair that a client can send as a
    JSON escape (`"\\ud83d"`): it is no character, and the tokenizer cannot encode it."""
    surrogate = next((character for character in text if "\ud800" <= character <= "\udfff"), None)
    if surrogate is not None:
        raise AppInputError(
            f"{what} holds U+{ord(surrogate):04X}, half of a UTF-16 surrogate pair and not a character: paste the "
            "text again."
        )


def check_result_count(top_k, what: str) -> int:
    """`top_k` as an int in [1, `MAX_RESULTS`], else `AppInputError` (the page's API takes any value a client sends)."""
    if isinstance(top_k, bool) or not isinstance(top_k, (int, float)) or not float(top_k).is_integer():
        raise AppInputError(f"the number of {what} must be a whole number, got {top_k!r}.")
    if not 1 <= top_k <= MAX_RESULTS:
        raise AppInputError(f"the number of {what} must be from 1 to {MAX_RESULTS}, got {top_k:g}.")
    return int(top_k)


def check_text_length(text: str, what: str) -> None:
    """Refuses (`AppInputError`) a text longer than `MAX_TEXT_CHARACTERS`: the model reads its first few hundred
    characters only, and tokenizing megabytes would hold the server."""
    if len(text) > MAX_TEXT_CHARACTERS:
        raise AppInputError(
            f"{what} has {len(text):,} characters; at most {MAX_TEXT_CHARACTERS:,} are accepted (the model reads "
            "only the first few hundred)."
        )


# ------------------------------------------------------------------------------------ regions that cover a photo


def covering_grid(width: float, height: float, grid_sizes: Sequence[int], max_regions: int) -> np.ndarray:
    """Grid boxes `x1, y1, x2, y2` that cover the whole photo with at most `max_regions` boxes.

    The extractor's own grid is `grid_boxes(width, height, grid_sizes)[:max_regions]`, which cuts the last level
    short: with `grid_sizes=(1, 2, ...)` and `max_regions=4` it keeps the whole image and three of the four quarters,
    and the fourth quarter is never seen. Here a level (n x n cells) is taken whole or not at all, coarse to fine, so
    every part of the photo is in some region: each level of `grid_sizes` that fits whole into the regions left, and,
    when none past the whole image fits but two more boxes do, the two halves along the longer side (left and right
    for a square photo). The whole image always comes first.
    """
    if max_regions < 1:
        raise ValueError(f"max_regions must be at least 1, got {max_regions}.")
    whole = grid_boxes(width, height, [1])
    boxes = [whole]
    count = 1
    for n in dict.fromkeys(int(n) for n in grid_sizes):
        if n > 1 and count + n * n <= max_regions:
            boxes.append(grid_boxes(width, height, [n]))
            count += n * n
    if count == 1 and max_regions >= 3:
        if width >= height:
            halves = [(0.0, 0.0, width / 2, height), (width / 2, 0.0, width, height)]
        else:
            halves = [(0.0, 0.0, width, height / 2), (0.0, height / 2, width, height)]
        boxes.append(np.asarray(halves, dtype=np.float32))
    return np.concatenate(boxes).astype(np.float32)


_QUARTERS = ("top-left quarter", "top-right quarter", "bottom-left quarter", "bottom-right quarter")


def grid_cell_name(box: Sequence[float], width: float, height: float) -> str | None:
    """The name of a grid box by its place in the photo ("whole image", "left half", "top-right quarter", "row 2,
    col 3 of 4x4"), or None when the box is not a cell of a regular grid (up to 8 x 8) or a half."""
    x1, y1, x2, y2 = (float(v) for v in box)
    tolerance = 0.01 * max(width, height, 1.0)

    def near(a: float, b: float) -> bool:
        return abs(a - b) <= tolerance

    if near(x1, 0) and near(y1, 0) and near(x2, width) and near(y2, height):
        return "whole image"
    halves = {
        "left half": (0, 0, width / 2, height),
        "right half": (width / 2, 0, width, height),
        "top half": (0, 0, width, height / 2),
        "bottom half": (0, height / 2, width, height),
    }
    for name, (a, b, c, d) in halves.items():
        if near(x1, a) and near(y1, b) and near(x2, c) and near(y2, d):
            return name
    for n in range(2, 9):
        column, row = round(x1 * n / width), round(y1 * n / height)
        cell = (column * width / n, row * height / n, (column + 1) * width / n, (row + 1) * height / n)
        if all(near(v, c) for v, c in zip((x1, y1, x2, y2), cell)):
            return _QUARTERS[2 * row + column] if n == 2 else f"row {row + 1}, col {column + 1} of {n}x{n}"
    return None


# ---------------------------------------------------------------------------------------------- region labels


def region_class_names(extractor) -> list[str] | None:
    """Names of a detector's object classes where its label set is known (COCO for a torchvision detector with 91
    classes); None otherwise (detections are then labelled `class N`).

    The backbone backend's ImageNet classes are not used as labels: its regions are grid cells, and the classifier's
    guess for a cell (a "joystick" for a square of colour) says nothing about it.
    """
    try:
        if extractor.backend == "detector" and extractor.detector_num_classes == 91:
            from torchvision.models.detection import FasterRCNN_ResNet50_FPN_Weights

            return list(FasterRCNN_ResNet50_FPN_Weights.COCO_V1.meta["categories"][1:])
    except Exception as error:  # an older torchvision without the label files: ids instead of names
        logger.warning("no class names for the detector's labels (%s: %s)", type(error).__name__, error)
    return None


# Where a region's name comes from; the region picture's legend explains each source it shows.
LABEL_SOURCES = {
    "annotation": "names: the gallery's object annotations",
    "whole image": "whole image: the photo as one region",
    "grid": "names: the cell's place in a grid over the photo",
    "detector": "names: the detector's class; %: its probability",
    "box": "region N: a box without a name",
}


@dataclass
class RegionLabel:
    """What the region picture writes next to one box.

    Attributes:
        name: the region's name.
        source: where the name comes from, a key of `LABEL_SOURCES`: `"annotation"` (the manifest's object label),
            `"whole image"`, `"grid"` (the cell's place), `"detector"` (the detector's class) or `"box"`.
        score: the detector's probability for that class (detector labels only), else None.
    """

    name: str
    source: str = "box"
    score: float | None = None


def region_labels(
    record: dict[str, Any],
    backend: str,
    class_names: Sequence[str] | None = None,
    box_labels: Sequence[str] | None = None,
) -> list[RegionLabel]:
    """One label per region of `record`, saying where it comes from.

    A gallery photo's annotated objects keep the manifest's name (no number: nothing was predicted); the full-image
    box is "whole image"; the backbone backend's grid cells are named by their place ("top-left quarter"); a
    detector's regions (`backend` "detector", "butd" or "precomputed") by their class (`class_names`, or `class N`)
    with the class probability where the record carries a distribution.
    """
    boxes = np.asarray(record["region_boxes"], dtype=np.float32).reshape(-1, 4)
    labels = np.asarray(record.get("region_class_labels", np.full(len(boxes), -100))).reshape(-1)
    probs = record.get("region_class_probs")
    probs = None if probs is None else np.asarray(probs, dtype=np.float32).reshape(len(boxes), -1)
    width, height = float(record.get("image_width") or 0), float(record.get("image_height") or 0)
    out = []
    for i, box in enumerate(boxes):
        given = box_labels[i] if box_labels is not None and i < len(box_labels) else None
        place = grid_cell_name(box, width, height) if width and height else None
        if given == "whole image" or (not given and place == "whole image"):
            out.append(RegionLabel("whole image", "whole image"))
        elif given:
            out.append(RegionLabel(given, "annotation"))
        elif backend == "backbone":
            out.append(RegionLabel(place, "grid") if place else RegionLabel(f"region {i + 1}", "box"))
        else:
            label = int(labels[i]) if i < len(labels) else -100
            if label < 0:
                out.append(RegionLabel(f"region {i + 1}", "box"))
                continue
            score = None
            if probs is not None and probs.shape[1] > label and probs[i].sum() > 0:
                score = float(probs[i, label])
            name = class_names[label] if class_names is not None and label < len(class_names) else f"class {label}"
            out.append(RegionLabel(name, "detector", score))
    return out


def fit_regions(image: GalleryImage, max_regions: int) -> GalleryImage:
    """`image` with at most `max_regions` boxes: its first objects and, where its boxes end with the whole image
    (`read_gallery` adds it last), the whole image kept among them, labels cut the same way. The extractor keeps
    the first `max_regions` boxes, which would drop the whole image of a photo with many objects."""
    if image.boxes is None or len(image.boxes) <= max_regions:
        return image
    labels = image.box_labels
    if labels is not None and len(labels) == len(image.boxes) and labels[-1] == "whole image":
        keep = max_regions - 1
        return replace(image, boxes=image.boxes[:keep] + image.boxes[-1:], box_labels=labels[:keep] + labels[-1:])
    return replace(image, boxes=image.boxes[:max_regions], box_labels=None if labels is None else labels[:max_regions])


def check_stated_sizes(gallery: Sequence[GalleryImage], apply_exif_orientation: bool = True) -> None:
    """Refuses (`AppInputError`, naming each photo, the manifest's size and the photo's) a gallery whose photos
    pooled over the manifest's boxes are not the size the manifest states (photos resized after it was written, or
    a phone photo whose EXIF turns it): the boxes are in the stated frame, and rescaling them would be a guess."""
    wrong = []
    for image in gallery:
        if image.boxes is None or image.size is None:
            continue
        size = image_header_size(image.path, apply_exif_orientation)
        if size is None or tuple(size) == tuple(image.size):
            continue  # an unreadable header is named by the extractor
        turned = apply_exif_orientation and image_header_size(image.path, False) != size
        note = " once its EXIF orientation turns it (the manifest must give the photo as shown)" if turned else ""
        wrong.append(
            f"{image.key}: the manifest says {image.size[0]}x{image.size[1]}, the photo is {size[0]}x{size[1]}{note}"
        )
    if wrong:
        shown = "; ".join(wrong[:10]) + (f"; and {len(wrong) - 10} more" if len(wrong) > 10 else "")
        raise AppInputError(
            f"{len(wrong)} gallery photo(s) are not the size their manifest lines state, so their boxes would be "
            f"misplaced: {shown}. Give each line the photo's width, height and boxes; boxes are not rescaled."
        )


# ---------------------------------------------------------------------------------------------------- cached regions

# The parts of a region record that hold one row per region.
_PER_REGION = ("region_features", "region_boxes", "region_locations", "region_class_labels", "region_class_probs")


def first_regions(record: dict[str, Any], count: int) -> dict[str, Any]:
    """`record` with its first `count` regions, the ones a model of `max_regions=count` reads."""
    if record.get("num_regions", count) <= count:
        return record
    cut = {
        name: value[:count] if name in _PER_REGION and value is not None else value for name, value in record.items()
    }
    cut["num_regions"] = count
    return cut


class CachedGalleryRecords(Sequence):
    """The region records of a gallery's photos in a region cache, in gallery order, each read from the cache's
    memory-mapped shards when it is asked for (a photo shown, a hit re-ranked): a gallery of millions of photos
    holds its keys, not its features. A record has the first `max_regions` regions, the ones the model reads."""

    def __init__(self, cache, keys: Sequence[str], max_regions: int):
        self.cache = cache
        self.keys = list(keys)
        self.max_regions = max_regions

    def __len__(self) -> int:
        return len(self.keys)

    def __getitem__(self, position):
        if isinstance(position, slice):
            return [self[i] for i in range(*position.indices(len(self)))]
        return first_regions(self.cache[self.keys[position]], self.max_regions)


def open_gallery_cache(path: str | os.PathLike, retriever, model_name_or_path: str, where: str):
    """The region cache at `path`, opened for a gallery: refused (`ValueError` naming `where`) when its regions have
    another feature size than the retriever's model takes, with a warning when another extractor than the model's
    made them (an upload, read by the model's, would then be ranked in another space)."""
    cache = load_region_cache(path)
    check_region_cache_fits(cache, retriever.model.config, where, model_name_or_path)
    return cache


def cached_gallery_keys(cache, gallery: Sequence[GalleryImage], where: str) -> list[str]:
    """The key of each gallery photo's regions in a region cache (`load_region_cache`), found by the photo's
    manifest path or file as an evaluation finds them (`region_cache_key`). Raises `AppInputError`, naming `where`
    and the first photos, when some photos have no regions there (not extracted, or their extraction failed)."""
    keys, missing = [], []
    for image in gallery:
        try:
            keys.append(region_cache_key(cache, {"manifest_image": image.key, "image": str(image.path)}))
        except KeyError as error:
            missing.append(f"{image.key}: {str(error.args[0]).rstrip('.')}")
    if missing:
        shown = "; ".join(missing[:10]) + (f"; and {len(missing) - 10} more" if len(missing) > 10 else "")
        raise AppInputError(
            f"{where}: {len(missing)} of {len(gallery)} gallery photo(s) have no regions there: {shown}. Extract "
            "the gallery's regions into it with imagebert-extract-regions (the same manifest, the model's extractor)."
        )
    return keys


def annotated_labels(image: GalleryImage, record: dict[str, Any]) -> list[str | None]:
    """The gallery's label of each region of `record` pooled over the box the gallery annotates at that place (the
    box clipped to the photo, as the extractor clips it); None for the others. Regions made over other boxes (a
    region cache extracted over the extractor's grid or detections) get no annotation's name."""
    boxes = np.asarray(record["region_boxes"], dtype=np.float32).reshape(-1, 4)
    if image.boxes is None or image.box_labels is None:
        return [None] * len(boxes)
    width, height = float(record.get("image_width") or 0), float(record.get("image_height") or 0)
    given = np.asarray(image.boxes[: len(boxes)], dtype=np.float32).reshape(-1, 4)
    if width > 0 and height > 0:
        given = clip_boxes(given, width, height)
    return [
        image.box_labels[i] or None
        if i < min(len(given), len(image.box_labels)) and np.allclose(box, given[i], atol=0.5)
        else None
        for i, box in enumerate(boxes)
    ]


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
            the prebuilt index; a gallery no larger is ranked in full, and so is every gallery when the model's
            unimodal heads are untrained (a pretraining checkpoint: `uses_shortlist` says which).
        batch_size: images per extraction batch and pairs per forward pass.
        records: the gallery's region records, one per photo in gallery order, when they were made another way;
            with neither these nor `region_cache` the photos are read and extracted at start: then a photo pooled
            over its manifest boxes must be the size its line states (`check_stated_sizes`), and keeps at most
            `max_regions` boxes, the whole image among them (`fit_regions`).
        region_cache: an open region cache (`load_region_cache`) holding the gallery's regions: they are read from
            its memory-mapped shards (found by `cached_gallery_keys`, cut to the model's first `max_regions` as an
            evaluation over the cache cuts them), never extracted nor held in memory; the photos' files are read
            only to be shown.
    """

    def __init__(
        self,
        retriever,
        gallery: Sequence[GalleryImage],
        shortlist_k: int = 128,
        batch_size: int = 32,
        records: Sequence[dict[str, Any]] | None = None,
        region_cache=None,
    ):
        if not gallery:
            raise AppInputError("the gallery is empty.")
        if records is not None and region_cache is not None:
            raise ValueError("give the gallery's regions as records or as a region_cache, not both.")
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
        # The same test the pipeline makes: untrained projection heads rank everything with the cross-encoder.
        self.untrained_heads = untrained_heads(retriever.model)
        self.class_names = region_class_names(self.extractor)
        if region_cache is not None:
            keys = cached_gallery_keys(region_cache, self.gallery, f"the region cache {region_cache.path}")
            self.records = CachedGalleryRecords(region_cache, keys, self.max_regions)
            indexed = region_cache.gallery(keys, self.max_regions)
        elif records is None:
            check_stated_sizes(self.gallery, self.extractor.apply_exif_orientation)
            self.gallery = [fit_regions(image, self.max_regions) for image in self.gallery]
            self.records = indexed = self._extract_gallery()
        elif len(records) != len(self.gallery):
            raise AppInputError(f"got {len(records)} region records for a gallery of {len(self.gallery)} photos.")
        else:
            self.records = indexed = list(records)
        self._positions = {image.key: position for position, image in reversed(list(enumerate(self.gallery)))}
        self.image_index = retriever.build_index(images=indexed, batch_size=batch_size)
        self.captions = gallery_captions(self.gallery)
        self.caption_index = (
            retriever.build_index(texts=self.captions, batch_size=batch_size) if self.captions else None
        )
        self._examples: list[str] | None = None

    @property
    def max_regions(self) -> int:
        """Regions a photo gets: the model's limit, within the extractor's own (`regions_to_extract`)."""
        return int(self.processor.regions_to_extract())

    @property
    def num_caption_lines(self) -> int:
        """The gallery's captions counted per photo (a text two photos share counts twice), as an evaluation of the
        same split counts them; `captions` holds each distinct text once."""
        return sum(len(image.captions) for image in self.gallery)

    def _grid_for(self, width: float, height: float) -> np.ndarray | None:
        """The boxes a photo without annotations is pooled over: a grid covering it (`covering_grid`) for the
        backbone backend; None (the extractor's own detections) for the others."""
        if self.extractor.backend != "backbone":
            return None
        return covering_grid(width, height, self.extractor.grid_sizes, self.max_regions)

    def _extract_gallery(self) -> list[dict[str, Any]]:
        from tqdm.auto import tqdm

        records: list[dict[str, Any]] = []
        failures = []
        for start in tqdm(range(0, len(self.gallery), self.batch_size), desc="gallery regions", unit="batch"):
            chunk = self.gallery[start : start + self.batch_size]
            boxes = []
            for image in chunk:
                if image.boxes is not None:
                    boxes.append(np.asarray(image.boxes, dtype=np.float32))
                    continue
                size = image_header_size(image.path, self.extractor.apply_exif_orientation)
                boxes.append(None if size is None else self._grid_for(*size))
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
                if self.extractor.backend == "backbone":
                    # Grid cells are named by their place, never by a class: the distributions (1,000 classes per
                    # region for an ImageNet backbone) would take more memory than the features.
                    record.pop("region_class_probs", None)
                records.append(record)
        if failures:
            raise AppInputError(
                f"{len(failures)} gallery image(s) could not be read:\n  " + "\n  ".join(failures[:10])
            )
        return records

    # ------------------------------------------------------------------------------------------------ what it does

    def uses_shortlist(self, gallery_size: int) -> bool:
        """Whether a query over `gallery_size` candidates is shortlisted by the unimodal embeddings before the
        cross-encoder re-ranks it (the pipeline's rule), rather than scored against every candidate."""
        return not self.untrained_heads and self.shortlist_k < gallery_size

    def ranking_summary(self) -> str:
        """One sentence, for the page's header, on how a query is ranked here: what the engine does, not what it
        could do (no shortlist is claimed where the model's unimodal heads are untrained)."""
        num_images, num_captions = len(self.gallery), len(self.captions)
        if self.untrained_heads:
            return (
                f"Every query is scored against all {num_images} photos (a photo against all {num_captions} "
                "captions) by the cross-encoder: this model's unimodal heads are untrained (a pretraining "
                "checkpoint), so no index shortlist is used."
            )
        parts = []
        for kind, size in (("photos", num_images), ("captions", num_captions)):
            if not size:
                continue
            if self.uses_shortlist(size):
                parts.append(
                    f"the {self.shortlist_k} {kind} nearest by the unimodal embeddings (a prebuilt index of "
                    f"{size}) are re-ranked by the cross-encoder"
                )
            else:
                parts.append(f"all {size} {kind} are scored by the cross-encoder")
        return "Per query, " + "; ".join(parts) + "."

    def example_queries(self, count: int = 3, max_tries: int = 40) -> list[str]:
        """Gallery captions the app answers: up to `count` of them (the first caption of one photo after another,
        at most `max_tries` searched) whose best match is a photo carrying that caption. Empty for a gallery
        without captions. Computed once; the page shows the first as the query box's placeholder."""
        if self._examples is None:
            tried = list(dict.fromkeys(image.captions[0] for image in self.gallery if image.captions))[:max_tries]
            self._examples = []
            if tried:
                results = self.retriever(
                    texts=tried,
                    index=self.image_index,
                    top_k=1,
                    shortlist_k=self.shortlist_k,
                    batch_size=self.batch_size,
                )
                for query, result in zip(tried, results):
                    if query in self.gallery[result[0]["index"]].captions:
                        self._examples.append(query)
                    if len(self._examples) == count:
                        break
            logger.info(
                "example queries: %d of %d gallery captions tried are answered", len(self._examples), len(tried)
            )
        return list(self._examples)

    # ------------------------------------------------------------------------------------------------ photos

    def load_photo(self, image: Any):
        """An uploaded or picked photo as a PIL image, checked with the extractor's limits (size, pixels,
        decompression bombs) and turned by its EXIF rule (`apply_exif_orientation`), as the extractor reads it;
        raises `AppInputError` with the reason when it is not a usable image."""
        if image is None or (isinstance(image, str) and not image):
            raise AppInputError("Upload a photo or pick one from the gallery first.")
        try:
            loaded = load_image(image, **{name: getattr(self.extractor, name) for name in LOAD_SETTINGS})
        except ImageLoadError as error:
            name = Path(str(image)).name if isinstance(image, (str, os.PathLike)) else "the photo"
            raise AppInputError(f"{name} is not a usable image: {error.reason.rstrip('.')}.") from None
        return loaded.image

    def photo_regions(self, photo) -> dict[str, Any]:
        """The region record of a PIL photo: a grid covering all of it (`covering_grid`, at most the model's
        `max_regions` boxes) for the backbone backend, the detections for a detector."""
        try:
            boxes = self._grid_for(photo.width, photo.height)
            return self.extractor.extract(photo, boxes=boxes, max_regions=self.max_regions)[0]
        except RegionExtractionError as error:
            raise AppInputError(f"no regions could be extracted from the photo: {error.reason.rstrip('.')}.") from None

    def gallery_image(self, key: str) -> tuple[GalleryImage, dict[str, Any]]:
        position = self._positions.get(key)
        if position is None:
            raise AppInputError(f"{key!r} is not a photo of the gallery.")
        return self.gallery[position], self.records[position]

    # ------------------------------------------------------------------------------------------------ searches

    def search_images(self, query: str, top_k: int = 8) -> list[ImageHit]:
        """The `top_k` gallery photos for a text query, best first."""
        query = (query or "").strip()
        check_no_surrogates(query, "the query")
        if not has_visible_text(query):
            raise AppInputError("Type a query first: the search needs some words describing a photo.")
        check_text_length(query, "the query")
        results = self.retriever(
            texts=query,
            index=self.image_index,
            top_k=check_result_count(top_k, "photos"),
            shortlist_k=self.shortlist_k,
            batch_size=self.batch_size,
        )
        return [
            ImageHit(rank, r["score"], r["probability"], self.gallery[r["index"]], self.records[r["index"]])
            for rank, r in enumerate(results, start=1)
        ]

    def rank_captions(self, record: dict[str, Any], captions: Sequence[str] | None = None, top_k: int = 5):
        """The best `top_k` captions for a photo's region record: of `captions`, or of the gallery's."""
        kwargs = {"top_k": check_result_count(top_k, "captions"), "batch_size": self.batch_size}
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
        """The region labels of a record: a gallery photo's annotated names where its regions are its boxes."""
        box_labels = annotated_labels(image, record) if image is not None else None
        return region_labels(record, self.extractor.backend, self.class_names, box_labels)


__all__ = [
    "AppInputError",
    "CachedGalleryRecords",
    "CaptionHit",
    "GalleryImage",
    "LABEL_SOURCES",
    "MAX_PASTED_CAPTIONS",
    "MAX_RESULTS",
    "MAX_TEXT_CHARACTERS",
    "ImageHit",
    "RegionImportance",
    "RegionLabel",
    "RetrievalDemo",
    "annotated_labels",
    "cached_gallery_keys",
    "check_result_count",
    "check_stated_sizes",
    "check_text_length",
    "covering_grid",
    "first_regions",
    "fit_regions",
    "gallery_captions",
    "grid_cell_name",
    "load_retriever",
    "open_gallery_cache",
    "parse_caption_list",
    "read_gallery",
    "region_class_names",
    "region_labels",
]
