"""Retrieval data: image-caption corpora, negative sampling (random or hard-mined) and the grouped collator.

A `RetrievalCorpus` holds each image once and each caption once, tokenized once and with its regions loaded once,
so that training batches, evaluation and hard-negative mining all gather rows instead of recomputing anything. The
regions are either stacked in memory or, for a gallery too large for that, a `RegionGallery` over the
memory-mapped region cache (`RetrievalCorpus.from_region_cache`).
Sources: the Karpathy split files everyone uses for COCO and Flickr30k (`dataset_coco.json`,
`dataset_flickr30k.json`) and our jsonl manifests (the layout of the real data and the synthetic set).
"""

from __future__ import annotations

import json
import os
import re
import weakref
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers.utils import logging

from ..formats.files import DuplicateJSONKeyError, loads_json
from ..formats.manifest import check_id_text, image_path_inside_root, iter_manifest
from ..models.imagebert.processing_imagebert import tokenize_as_text
from ..models.imagebert.region_batching import pad_region_records
from ..models.imagebert.retrieval_index import RegionBatches, gather_pair_inputs, is_region_batches, score_pairs
from ..models.imagebert.roi_image_loading import ImageLoadError, image_content_hash
from ..regions.cache_reader import load_region_cache, warn_if_other_extractor


logger = logging.get_logger(__name__)

KARPATHY_SPLITS = ("train", "restval", "val", "test")
# Captions per image of the standard protocols on the Karpathy splits (COCO 1k and 5k, Flickr30k 1k): a few COCO
# images have 6 or 7, which the protocols leave out.
PROTOCOL_CAPTIONS_PER_IMAGE = 5
# The `split` of a manifest that keeps every line, for manifests whose lines name no split (the COCO 128 set).
ALL_SPLITS = "all"
NEGATIVE_TYPES = ("text", "image", "both")


# ------------------------------------------------------------------------------------------------------------------
# Sources
# ------------------------------------------------------------------------------------------------------------------


def check_max_images(max_images) -> None:
    """`max_images` must be None (every image) or a positive integer: 0 would evaluate nothing (or one image)."""
    if max_images is not None and (isinstance(max_images, bool) or not isinstance(max_images, int) or max_images < 1):
        raise ValueError(f"max_images must be a positive integer or None (every image), got {max_images!r}.")


def evaluation_captions_per_image(karpathy: bool, cut: int | None = None) -> int | None:
    """The captions per image an evaluation ranks, one rule for `evaluate_retrieval` and the evaluation at the end of
    fine-tuning, so that both measure the same gallery: the protocol's first `PROTOCOL_CAPTIONS_PER_IMAGE` of a
    Karpathy split's images, every caption of a manifest's; `cut` (a number asked for, or None) keeps fewer."""
    limits = [limit for limit in (PROTOCOL_CAPTIONS_PER_IMAGE if karpathy else None, cut) if limit is not None]
    return min(limits) if limits else None


def _karpathy_image_id(entry: Mapping, where: str) -> str:
    """The id of a Karpathy entry: its `cocoid`, else `imgid`, else its filename."""
    for name in ("cocoid", "imgid"):
        if name in entry:
            value = entry[name]
            if isinstance(value, bool) or not isinstance(value, (int, str)) or not str(value).strip():
                raise ValueError(f"{where}: {name!r} must be an integer or a non-empty string, got {value!r:.60}.")
            return str(value)
    return entry["filename"]


def load_karpathy_split(
    path: str | os.PathLike,
    split: str | Sequence[str] = "test",
    image_root: str | os.PathLike | None = None,
    max_images: int | None = None,
    allow_outside_root: bool = False,
    dataset: str | None = None,
) -> list[dict[str, Any]]:
    """Reads one split of a Karpathy split file (`dataset_coco.json`, `dataset_flickr30k.json`).

    Every entry must be an object; those of the split read must have a `filename`, a `filepath` (if any) that is a
    folder name, and at least one sentence with a non-blank `raw`. An error names the file, `images[i]` and the field.

    Args:
        path: the json file: `{"images": [{"filepath"?, "filename", "split", "sentences": [{"raw"}], ...}]}`.
        split: `"train"`, `"restval"`, `"val"` or `"test"`, or several (COCO's usual training set is
            `("train", "restval")`).
        image_root: folder the image paths are relative to (COCO: the folder holding `val2014/`, `train2014/`;
            Flickr30k: the image folder). Defaults to the json's folder.
        max_images: keep only the first images (quick runs).
        allow_outside_root: follow image paths that leave `image_root` (absolute, or `../`); refused by default,
            as in manifests.
        dataset: the dataset the file must be of (`"coco"`, `"flickr30k"`): a file whose own `"dataset"` names
            another (Karpathy's `dataset_flickr8k.json` has a 1k test split too) is refused, so that its results are
            never reported under another benchmark's name. Not checked when None or when the file names none.

    Returns:
        Records `{"image_id", "image" (path), "manifest_image" (`filepath/filename`, the path a manifest in the
        Karpathy layout writes: a region cache keyed by such a manifest's paths finds the record by it),
        "captions"}` in file order: the order the 1k folds are cut from.
    """
    check_max_images(max_images)
    splits = (split,) if isinstance(split, str) else tuple(split)
    unknown = set(splits) - set(KARPATHY_SPLITS)
    if unknown:
        raise ValueError(f"unknown split(s) {sorted(unknown)}; the Karpathy files use {KARPATHY_SPLITS}.")
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"karpathy_file {path} does not exist (expected dataset_coco.json or similar).")
    try:
        data = loads_json(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{path} is not a Karpathy split file: not JSON ({error}).") from error
    except DuplicateJSONKeyError as duplicate:
        raise ValueError(
            f"{path} gives the key {duplicate.key!r} twice in one object, so which value holds is unclear; expected a "
            "Karpathy split file."
        ) from None
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise ValueError(f"{path} is not a Karpathy split file: it has no 'images' list.")
    named = data.get("dataset")
    if dataset is not None and named is not None and named != dataset:
        raise ValueError(
            f"{path} is the Karpathy split file of {named!r}, not of {dataset!r}: its results would be reported "
            f"under {dataset!r}'s name. Give the {dataset} file, or evaluate this one as a manifest."
        )
    root = Path(image_root) if image_root is not None else path.parent
    records = []
    for number, entry in enumerate(data["images"]):
        entry_where = where = f"{path}: images[{number}]"
        if not isinstance(entry, dict):
            raise ValueError(
                f"{where} must be an object with 'filename', 'split' and 'sentences', got {type(entry).__name__} "
                f"{entry!r:.60}."
            )
        if entry.get("split") not in splits:
            continue
        if not isinstance(entry.get("filename"), str) or not entry["filename"]:
            raise ValueError(f"{where} has no 'filename' string, got {entry.get('filename')!r}.")
        where = f"{where} ({entry['filename']})"
        sentences = entry.get("sentences")
        if not isinstance(sentences, list) or not all(
            isinstance(s, dict) and isinstance(s.get("raw"), str) for s in sentences
        ):
            raise ValueError(f"{where}: 'sentences' must be a list of {{'raw': str}}.")
        if not sentences:
            raise ValueError(f"{where}: 'sentences' is empty; every image needs at least one caption.")
        captions = [sentence["raw"].strip() for sentence in sentences]
        if not all(captions):
            raise ValueError(f"{where}: sentences[{captions.index('')}].raw is blank.")
        filepath = entry.get("filepath", "")
        if not isinstance(filepath, str):
            raise ValueError(f"{where}: 'filepath' must be a folder name string, got {filepath!r:.60}.")
        written = str(Path(filepath) / entry["filename"])
        # The manifests' rule for image paths, so a split file cannot point at files outside the image root.
        image = image_path_inside_root(written, root, entry_where, allow_outside_root, field="filepath/filename")
        records.append(
            {
                "image_id": _karpathy_image_id(entry, where),
                "image": str(image),
                "manifest_image": written,
                "captions": captions,
            }
        )
        if max_images is not None and len(records) >= max_images:
            break
    if not records:
        raise ValueError(f"{path} has no image in split(s) {splits}.")
    return records


def load_manifest_records(
    path: str | os.PathLike,
    split: str | None = None,
    max_images: int | None = None,
    image_root: str | os.PathLike | None = None,
    allow_outside_root: bool = False,
) -> list[dict[str, Any]]:
    """Reads a jsonl manifest (the layout of the real data and the synthetic set) with the package's manifest reader.

    Args:
        path: the `.jsonl` file (`{"image", "captions", "split"?, "image_id"?, ...}` per line).
        split: keep only lines with this `split` (e.g. `"dev"`, `"test"`); all lines when None or `"all"`.
        max_images: keep only the first images.
        image_root: folder the image paths are relative to; the manifest's folder by default.
        allow_outside_root: follow image paths that leave `image_root` (absolute, or `../`); refused by default.

    Returns:
        Records `{"image_id", "image" (resolved path), "manifest_image" (the path as written, the region cache
        key), "captions"}` in file order. `image_id` is the line's `image_id`, else its `coco_id`, else its image
        path as written (a string or an integer; the manifest reader refuses other ids). An id written as an
        integer on one line of the split and as a string on another (`1`, `"1"`) raises `ManifestError` naming both
        lines, as pretraining's manifest source does.
    """
    check_max_images(max_images)
    split = None if split == ALL_SPLITS else split
    records = []
    ids_as_text: dict[str, tuple[Any, str, str]] = {}
    splits_seen: set = set()
    for record in iter_manifest(path, image_root, allow_outside_root):
        if split is not None and record.extra.get("split") != split:
            splits_seen.add(record.extra.get("split"))
            continue
        if record.id_field is not None:  # `1` and `"1"` would be merged as one image: refused, as in pretraining
            check_id_text(record.extra[record.id_field], record.id_field, record.where, ids_as_text)
        if not record.captions:
            raise ValueError(f"{path}: image {record.image} has no captions.")
        records.append(
            {
                "image_id": record.image_id,
                "image": str(record.image_path),
                "manifest_image": record.image,
                "captions": list(record.captions),
            }
        )
        if max_images is not None and len(records) >= max_images:
            break
    if not records and split is not None:
        named = sorted(str(name) for name in splits_seen if name is not None)
        found = f"its lines' splits are {named}" if named else "its lines name no split"
        if None in splits_seen and named:
            found += " (some lines name none)"
        raise ValueError(f"{path} has no record with split {split!r}: {found}; split {ALL_SPLITS!r} keeps every line.")
    if not records:
        raise ValueError(f"{path} has no record.")
    return records


# ------------------------------------------------------------------------------------------------------------------
# Corpus
# ------------------------------------------------------------------------------------------------------------------


def _image_file(record: Mapping) -> str | None:
    """The image file a record shows: its resolved path (`image`), else its path as written (`manifest_image`);
    None for a record without one (an in-memory image, or ids and captions only)."""
    for key in ("image", "manifest_image"):
        value = record.get(key)
        if isinstance(value, (str, os.PathLike)):
            return os.fspath(value)
    return None


class SameImageGroups:
    """`same_image_groups` one item at a time, for a source read as a stream (a manifest of millions of lines):
    `add` gives an item's group as `same_image_groups` would, keeping only each name's first group.

    Names are `(kind, value)` pairs, kept one table per kind, so a name costs a table entry and no tuple."""

    def __init__(self):
        self._first_of: dict[Hashable, dict[Hashable, int]] = {}
        self.count = 0

    def add(self, names: Iterable[tuple[Hashable, Hashable] | None]) -> int:
        """The group of an item going by `names` (`None` names match nothing): the first group of the earlier
        items it shares a name with, else a new one (numbered `count` before the call)."""
        group, named = None, []
        for name in names:
            if name is None:
                continue
            kind, value = name
            table = self._first_of.get(kind)
            if table is None:
                table = self._first_of[kind] = {}
            earlier = table.get(value)
            if earlier is not None and (group is None or earlier < group):
                group = earlier
            named.append((table, value))
        if group is None:
            group, self.count = self.count, self.count + 1
        for table, value in named:
            table.setdefault(value, group)
        return group


def same_image_groups(names: Iterable[Iterable[tuple[Hashable, Hashable] | None]]) -> list[int]:
    """The image each item shows, by the names it goes by: an item that shares a name with an earlier item is that
    item's image, else a new one. Returns one group number per item, groups numbered in first-seen order (an item
    sharing names with two earlier images joins the first of them). `None` names match nothing.

    Names are `(kind, value)` pairs, so names of different kinds are told apart, e.g. `("id", "1")` and
    `("file", "x/a.jpg")`: the rule of `merge_duplicate_images` (one image per id, and per file) and of
    `ManifestPairSource` (which groups its lines while reading them, with `SameImageGroups`)."""
    grouping = SameImageGroups()
    return [grouping.add(item_names) for item_names in names]


def caption_text(caption: str) -> str:
    """A caption as the tokenizer reads it: spacing aside."""
    return " ".join(caption.split())


def _pool_groups(records: Sequence[Mapping], groups: Sequence[int]) -> tuple[list[dict], list[int], list[int], int]:
    """The first record of each group, with the captions of the group's later records added to it, less those the
    group holds already (spacing aside: a line listed twice would count each caption twice, and split its credit
    between two identical texts); the positions of the records kept and of those merged into another, and how many
    captions were dropped as repeats. The first record's own captions are kept as they are (a protocol's texts)."""
    merged: list[dict] = []
    kept, pooled = [], []
    held: dict[int, set[str]] = {}  # groups grown so far: the texts they hold (their caption list is their own copy)
    dropped = 0
    for number, (record, group) in enumerate(zip(records, groups)):
        if group == len(merged):
            merged.append(dict(record))
            kept.append(number)
            continue
        target = merged[group]
        # Copied at the group's first merge, then grown in place: a copy at every merge is quadratic in the records
        # of one picture (every dead link of a crawl that saved the same placeholder shares one cache row).
        if group not in held:
            target["captions"] = list(target["captions"])
            held[group] = {caption_text(caption) for caption in target["captions"]}
        for caption in record["captions"]:
            text = caption_text(caption) if isinstance(caption, str) else caption
            if text in held[group]:
                dropped += 1
                continue
            held[group].add(text)
            target["captions"].append(caption)
        pooled.append(number)
    return merged, kept, pooled, dropped


def merge_duplicate_images(records: Sequence[Mapping]) -> list[Mapping]:
    """Each image once: a record whose `image_id` or image file (`image`, else `manifest_image`, compared as
    normalised paths: `./a.jpg` is `a.jpg`) came earlier has its captions added to the first record of that id or
    file, with a warning naming them. An image listed twice would otherwise be two gallery items, each a wrong
    answer for the other's captions, which lowers recall without a word; the same rule serves full-ranking and
    zero-shot evaluation, so both rank the same gallery."""
    names = []
    for number, record in enumerate(records):
        if not isinstance(record, Mapping) or "image_id" not in record or "captions" not in record:
            raise ValueError(f"record {number} must be a dict with 'image_id' and 'captions', got {record!r:.200}.")
        image_file = _image_file(record)
        names.append(
            [("id", str(record["image_id"])), None if image_file is None else ("file", os.path.normpath(image_file))]
        )
    groups = same_image_groups(names)
    merged, kept, pooled, dropped = _pool_groups(records, groups)
    if pooled:
        record, target = records[pooled[0]], merged[groups[pooled[0]]]
        image_id, image_file = str(record["image_id"]), _image_file(record)
        if str(target["image_id"]) == image_id:
            first = repr(image_id)
        else:
            shown = f"image {image_file}, " if image_file is not None else ""
            first = f"{image_id!r} ({shown}merged into {str(target['image_id'])!r})"
        logger.warning(
            "%d record(s) repeat an image listed earlier (first: %s); their captions were merged into the first "
            "record of that image, so each image is one gallery item%s.",
            len(pooled),
            first,
            _repeats_note(dropped),
        )
    return merged


def _repeats_note(dropped: int) -> str:
    return f" ({dropped} caption(s) the image held already were kept once)" if dropped else ""


def merge_same_pictures(records: list[dict], pictures: Sequence[Hashable | None]) -> list[int] | None:
    """Merges (in place, into `records`' first of each) records whose regions are one region-cache row: the cache
    stores a picture once whatever its names (it deduplicates by content), so a byte-identical copy under another
    file name or id is the same picture, and two gallery items of it would each be a wrong answer for the other's
    captions. Returns the positions kept (None when no two records share a row), after a warning naming them."""
    groups = same_image_groups([[("picture", picture)] if picture is not None else [] for picture in pictures])
    if len(set(groups)) == len(groups):
        return None
    merged, kept, pooled, dropped = _pool_groups(records, groups)
    record, target = records[pooled[0]], merged[groups[pooled[0]]]
    shown = _image_file(record)
    logger.warning(
        "%d record(s) show the picture of an earlier record under another id or file (first: %r%s, merged into "
        "%r): the region cache holds one row for both; their captions were merged into the first record of that "
        "picture, so each picture is one gallery item%s.",
        len(pooled),
        str(record["image_id"]),
        f" (image {shown})" if shown is not None else "",
        str(target["image_id"]),
        _repeats_note(dropped),
    )
    records[:] = merged
    return kept


def stack_region_records(records: Sequence[Mapping], max_regions: int | None = None) -> dict[str, torch.Tensor]:
    """Pads region records (extractor output or cache rows) into model inputs: `region_features` (N, R, F),
    `region_locations` (N, R, 5), `region_attention_mask` (N, R), R the most regions of any record (at most
    `max_regions`). See `pad_region_records`."""
    return pad_region_records(records, "longest", max_regions)


@dataclass
class RetrievalCorpus:
    """Images and captions of a retrieval split, each stored once.

    Attributes:
        image_ids: one id per image (the region cache key).
        texts: every caption, image by image.
        text_to_image: `(num_texts,)` long, the image index of each caption.
        text_inputs: tokenized captions (`input_ids`, `attention_mask`, `token_type_ids`), padded to one length.
        region_inputs: regions of each image: stacked tensors (`region_features`, `region_locations`,
            `region_attention_mask`), or a `RegionBatches` gallery (a `RegionGallery` over the memory-mapped region
            cache) that pads them by index; scoring, mining and the collator take either, with the same results.
    """

    image_ids: list[str]
    texts: list[str]
    text_to_image: torch.Tensor
    text_inputs: dict[str, torch.Tensor] = field(default_factory=dict)
    region_inputs: dict[str, torch.Tensor] | RegionBatches = field(default_factory=dict)

    @property
    def num_images(self) -> int:
        return len(self.image_ids)

    @property
    def num_texts(self) -> int:
        return len(self.texts)

    def text_keys(self) -> list[Hashable]:
        """Each caption as the model reads it: its token ids without the padding, so that captions the tokenizer
        normalises alike (an uncased one: `A Dog` and `a  dog`) are one query; the caption as written when the
        corpus holds no tokenized texts."""
        return token_id_keys(self.text_inputs) if self.text_inputs else list(self.texts)

    @classmethod
    def from_records(
        cls,
        records: Sequence[Mapping],
        tokenizer=None,
        regions: Mapping[str, Mapping] | Callable[[str], Mapping] | Sequence[Mapping] | RegionBatches | None = None,
        max_text_length: int = 44,
        max_regions: int | None = None,
        captions_per_image: int | None = None,
    ) -> RetrievalCorpus:
        """Builds a corpus from image records (`{"image_id", "captions", ...}`).

        Args:
            records: image records, e.g. from `load_karpathy_split` or `load_manifest_records`.
            tokenizer: a BERT tokenizer; captions are tokenized once, padded to `max_text_length`.
            regions: the regions of each image: a mapping by `image_id`, a function given the record (e.g.
                `region_cache_lookup(load_region_cache(path))`), or a sequence aligned with `records`, all stacked
                into memory; or a `RegionBatches` gallery aligned with `records` (`cache.gallery(keys)`), kept as
                it is (see `from_region_cache`). Records whose regions carry an `error` are rejected with their id,
                rather than silently dropped: filter them out before building the corpus. Records whose regions are
                one region-cache row (the cache stores a picture once, so a copy of a file under another name or id
                is that row too; a row's `cache_key`, a gallery's row) are merged into the first of them with a
                warning, as `merge_duplicate_images` merges records of one id or file.
            max_text_length: tokens per caption, [CLS] and [SEP] included.
            max_regions: most regions per image (a gallery applies its own `max_regions`).
            captions_per_image: keep the first captions of each image only (COCO has a few images with 6 or 7;
                the standard protocol uses 5).
        """
        if not records:
            raise ValueError("no records: a retrieval corpus needs at least one image with a caption.")
        if is_region_batches(regions) or isinstance(regions, Sequence):
            ids = [str(record["image_id"]) for record in records]
            if len(set(ids)) != len(ids):
                repeated = next(i for n, i in enumerate(ids) if i in ids[:n])
                raise ValueError(
                    f"image_id {repeated!r} is listed more than once, and the regions are aligned with the records: "
                    "merge the records first (merge_duplicate_images) so that each image is one gallery item."
                )
            records = [dict(record) for record in records]
        else:
            records = merge_duplicate_images(records)
        region_records = None
        if is_region_batches(regions):
            if len(regions) != len(records):
                raise ValueError(f"the region gallery has {len(regions)} images; the records have {len(records)}.")
            if max_regions is not None and getattr(regions, "max_regions", max_regions) != max_regions:
                raise ValueError(
                    f"max_regions={max_regions}, but the gallery keeps {regions.max_regions}: set it on the gallery "
                    "(cache.gallery(keys, max_regions))."
                )
            # A region cache's gallery: one row per picture, whatever names the records give it.
            rows = getattr(regions, "rows", None)
            kept = None if rows is None else merge_same_pictures(records, [int(row) for row in rows])
            if kept is not None:
                regions = GallerySubset(regions, kept)
        elif regions is not None:
            if isinstance(regions, Mapping):
                region_records = [regions[str(record["image_id"])] for record in records]
            elif callable(regions):
                region_records = [regions(record) for record in records]
            else:
                region_records = list(regions)
                if len(region_records) != len(records):
                    raise ValueError(f"{len(region_records)} region records for {len(records)} images.")
            failed = [(r.get("image_id"), r.get("error")) for r in region_records if r.get("error")]
            if failed:
                raise ValueError(f"{len(failed)} image(s) have no regions (first: {failed[0][0]}: {failed[0][1]}).")
            # Rows of a region cache carry the key they are stored under: one per picture.
            pictures = [r.get("cache_key") if isinstance(r.get("cache_key"), str) else None for r in region_records]
            kept = merge_same_pictures(records, pictures)
            if kept is not None:
                region_records = [region_records[index] for index in kept]
        image_ids, texts, text_to_image = [], [], []
        for index, record in enumerate(records):
            captions = list(record["captions"])[:captions_per_image]
            if not captions:
                raise ValueError(f"record {index} ({record.get('image_id')}) has no caption.")
            image_ids.append(str(record["image_id"]))
            texts.extend(captions)
            text_to_image.extend([index] * len(captions))
        corpus = cls(image_ids, texts, torch.tensor(text_to_image, dtype=torch.long))
        if tokenizer is not None:
            corpus.text_inputs = tokenize_texts(tokenizer, texts, max_text_length)
        if is_region_batches(regions):
            corpus.region_inputs = regions
        elif region_records is not None:
            corpus.region_inputs = stack_region_records(region_records, max_regions)
        return corpus

    @classmethod
    def from_region_cache(
        cls,
        records: Sequence[Mapping],
        region_cache,
        tokenizer=None,
        max_text_length: int = 44,
        max_regions: int | None = None,
        captions_per_image: int | None = None,
    ) -> RetrievalCorpus:
        """A corpus whose regions stay in the region cache: `region_inputs` is a `RegionGallery` (a row number and a
        region count per image) that reads each batch's regions from the memory-mapped shards, so the gallery's
        features are never copied into RAM. Scores, mined negatives and batches equal those of the stacked corpus
        `from_records(records, tokenizer, region_cache_lookup(cache), ...)`, whose records are merged by the same
        rules: by id or file, then by cache row (one picture under several names is one gallery item).

        Args:
            records: image records, found in the cache by their manifest path, image path or id (as
                `region_cache_lookup`); an image missing from the cache or whose extraction failed raises `KeyError`.
            region_cache: a `RegionCache` (`load_region_cache`) or its folder.
            tokenizer, max_text_length, max_regions, captions_per_image: as in `from_records`.
        """
        if isinstance(region_cache, (str, os.PathLike)):
            region_cache = load_region_cache(region_cache)
        records = merge_duplicate_images(records)
        keys = [region_cache_key(region_cache, record) for record in records]
        gallery = region_cache.gallery(keys, max_regions)
        return cls.from_records(records, tokenizer, gallery, max_text_length, None, captions_per_image)

    def subset(self, image_indices: Sequence[int]) -> RetrievalCorpus:
        """The corpus of the given images and their captions (e.g. one 1k fold of COCO 5k)."""
        image_indices = torch.as_tensor(image_indices, dtype=torch.long)
        new_index = torch.full((self.num_images,), -1, dtype=torch.long)
        new_index[image_indices] = torch.arange(image_indices.numel())
        keep = torch.nonzero(new_index[self.text_to_image] >= 0).flatten()
        order = keep[torch.argsort(new_index[self.text_to_image[keep]], stable=True)]
        return RetrievalCorpus(
            image_ids=[self.image_ids[i] for i in image_indices.tolist()],
            texts=[self.texts[t] for t in order.tolist()],
            text_to_image=new_index[self.text_to_image[order]],
            text_inputs={key: value[order] for key, value in self.text_inputs.items()},
            region_inputs=(
                GallerySubset(self.region_inputs, image_indices.numpy())
                if is_region_batches(self.region_inputs)
                else {key: value[image_indices] for key, value in self.region_inputs.items()}
            ),
        )


class GallerySubset:
    """Some images of a `RegionBatches` gallery, in the given order; itself a gallery (`len`, `batch(indices)`)."""

    def __init__(self, gallery: RegionBatches, positions: Sequence[int] | np.ndarray):
        self.gallery = gallery
        self.positions = np.asarray(positions, dtype=np.int64).reshape(-1)
        self.max_regions = getattr(gallery, "max_regions", None)

    def __len__(self) -> int:
        return len(self.positions)

    def batch(self, indices) -> dict[str, torch.Tensor]:
        selected = self.positions[indices] if isinstance(indices, slice) else self.positions[np.asarray(indices)]
        return self.gallery.batch(selected.reshape(-1))


def region_cache_key(cache, record: Mapping) -> str:
    """The key a record's regions have in a region cache: its manifest path (a Karpathy record's `filepath/filename`),
    image path or id, whichever the cache was written with; else a key naming the record's image file under another
    spelling of its path (`_PathKeys`: `./x`, `a/../x`, relative or absolute, a symlinked folder), its trailing
    folders and file name where the picture is confirmed, or its bare file name unless the picture there is another.

    Raises:
        KeyError: the image has no regions; the message names it and, when the cache recorded why its extraction
            failed (`RegionCache.errors`), that reason.
    """
    candidates = [record.get("manifest_image"), record.get("image"), record.get("image_id")]
    if isinstance(record.get("image"), str):
        candidates.append(os.path.basename(record["image"]))
    for key in candidates[:3]:
        if isinstance(key, str) and key in cache:
            return key
    # The record's own failure, before any key of another spelling or another folder: those could lend it the
    # regions of another picture, or hide why its own image has none.
    failures = getattr(cache, "errors", None) or {}
    for key in candidates[:3]:
        if isinstance(key, str) and key in failures:
            raise _failed_extraction(record, key, failures[key])
    image = record.get("image")
    image = os.fspath(image) if isinstance(image, (str, os.PathLike)) else None
    if image:
        key = _key_of_same_file(cache, image)
        if key is not None:
            return key
        if failures:
            failed = _failed_keys(cache, failures)
            key = failed.by_normal_path(image) or failed.by_real_path(image)
            if key is not None:
                raise _failed_extraction(record, key, failures[key])
        key = _key_of_trailing_path(cache, image)
        if key is not None:
            return key
    # A bare file name is the weakest key: `B/1.jpg` must not take the regions of the cache's `1.jpg` from another
    # folder. Where both pictures can be read, their contents decide; caches keyed by file name alone (precomputed
    # features of files not at hand) are taken as written.
    name = candidates[3] if len(candidates) > 3 else None
    if isinstance(name, str) and name in cache and _same_picture(cache, name, record["image"]):
        return name
    if isinstance(name, str) and name in failures:
        raise _failed_extraction(record, name, failures[name])
    raise KeyError(
        f"image {record.get('image_id')!r} is not in the region cache (looked up as {candidates}); extract the "
        "split's images into it (imagebert-extract-regions)."
    )


def _failed_extraction(record: Mapping, key: str, reason: str) -> KeyError:
    return KeyError(
        f"image {record.get('image_id')!r} has no regions: its extraction failed ({reason}, recorded for {key!r}); "
        "replace the image file and extract its regions again, or leave it out of the split."
    )


class _PathKeys:
    """A region cache's keys by the file they name, for records that spell a path another way than the cache was
    keyed with. An absolute key names one file whatever the working folder: it matches by its normalised path where
    both resolve to one file, or by its real path (symlinks resolved, computed on first need: one filesystem call per
    key) once the picture is confirmed. A relative key is relative to the folder of the manifest it was extracted
    from, which the cache does not record: it matches by its normalised text only, as the trailing part of a
    record's path, and only once the picture is confirmed. `confirmed` keeps the (key, path) pairs whose pictures
    were found alike, so that a record looked up twice (a corpus's fingerprint, then the corpus) reads its image
    once."""

    def __init__(self, keys: Iterable[str]):
        self.absolute: dict[str, str] = {}
        self.relative: dict[str, str] = {}
        for key in keys:
            table = self.absolute if os.path.isabs(key) else self.relative
            table.setdefault(os.path.normpath(key), key)
        self._real: dict[str, str] | None = None
        self.confirmed: set[tuple[str, str]] = set()
        self.failed: _PathKeys | None = None  # the same tables of the cache's recorded failures

    def by_normal_path(self, path: str) -> str | None:
        """The absolute key that is `path` once both are made absolute and normalised (`./`, `a/../`, `//`)."""
        return self.absolute.get(os.path.normpath(os.path.abspath(path)))

    def by_real_path(self, path: str) -> str | None:
        """The absolute key whose real path is that of `path`: the same file reached through other symlinks."""
        if not self.absolute:
            return None
        if self._real is None:
            self._real = {}
            for written in self.absolute.values():
                self._real.setdefault(os.path.realpath(written), written)
        return self._real.get(os.path.realpath(path))


class _RegionsByKey(dict):
    """A copy of a dict of regions that can be weakly referenced and is hashed by identity, as a region cache is, so
    that its key tables are kept (`_PATH_KEYS`)."""

    __hash__ = object.__hash__
    __eq__ = object.__eq__


# The key tables of each region cache a lookup needed them for, built at its first record that no key names as
# written and kept as long as the cache; a cache that cannot be weakly referenced (a plain dict) builds them each time.
_PATH_KEYS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _kept_path_keys(cache) -> _PathKeys | None:
    try:
        table = _PATH_KEYS.get(cache)
    except TypeError:
        return None
    if table is None:
        table = _PATH_KEYS[cache] = _PathKeys(cache.keys())
    return table


def _path_keys(cache) -> _PathKeys:
    return _kept_path_keys(cache) or _PathKeys(cache.keys())


def _failed_keys(cache, failures: Mapping[str, str]) -> _PathKeys:
    table = _kept_path_keys(cache)
    if table is None:
        return _PathKeys(failures)
    if table.failed is None:
        table.failed = _PathKeys(failures)
    return table.failed


def _key_of_same_file(cache, path: str) -> str | None:
    """The key that names the file at `path` under another spelling: its normalised absolute path where both resolve
    to one file (`link/../x` is not `x` when `link` is a symlink into another folder), then its real path, as written
    in the cache or as the cache's keys normalise to. A match through symlinks is taken only once the picture is
    confirmed (`_confirmed_picture`): a link retargeted since the extraction names another file than the cache read."""
    normal = os.path.normpath(os.path.abspath(path))
    key = normal if normal in cache else _path_keys(cache).by_normal_path(path)
    real = os.path.realpath(path)
    if key is not None and os.path.realpath(key) == real:
        return key
    key = real if real in cache else _path_keys(cache).by_real_path(path)
    if key is not None and _confirmed_picture(cache, key, path):
        return key
    return None


def _key_of_trailing_path(cache, path: str) -> str | None:
    """The relative key that is the longest trailing part of `path` of two parts or more (its last folders and file
    name) and whose picture is confirmed to be the one at `path` (`_confirmed_picture`): the cache does not record
    the folder its relative keys start from, so another dataset's `images/1.jpg` must not lend its regions."""
    parts = Path(os.path.normpath(path)).parts
    parts = parts[1:] if os.path.isabs(path) else parts
    table = None
    for start in range(len(parts) - 1):
        trailing = os.path.join(*parts[start:])
        key = trailing if trailing in cache else None
        if key is None:
            table = table or _path_keys(cache)
            key = table.relative.get(trailing)
        if key is not None and _confirmed_picture(cache, key, path):
            return key
    return None


def _confirmed_picture(cache, key: str, path: str) -> bool:
    """Whether the picture at `path` was read and found to be the one the cache holds under `key` (`_same_picture`,
    strict): False where either cannot be read. A confirmation is kept in the cache's key table; a refusal is not,
    as the file may be put in place before the next lookup."""
    table = _kept_path_keys(cache)
    if table is not None and (key, path) in table.confirmed:
        return True
    same = _same_picture(cache, key, path, strict=True)
    if same and table is not None:
        table.confirmed.add((key, path))
    return same


def _same_picture(cache, key: str, path: str, strict: bool = False) -> bool:
    """Whether the picture at `path` is the one the cache holds under `key`, by the content hash the cache recorded
    for it (`image_id`). Where either cannot be read (regions of files not at hand, precomputed ids): True, or False
    when `strict`."""
    stored = cache[key].get("image_id")
    if not os.path.isfile(path) or not isinstance(stored, str) or not re.fullmatch(r"[0-9a-f]{40}", stored):
        return not strict
    try:
        return image_content_hash(path) == stored
    except (ImageLoadError, OSError):
        return not strict


def check_region_cache_fits(cache, config, where: str, model_name_or_path: str | None = None) -> None:
    """Raises ValueError, naming `where` (the flag and the folder), when the cache's regions have another feature size
    than the model takes: refused before any corpus is built, rather than at the first forward pass. With
    `model_name_or_path`, also warns when another extractor than the model's made them (`warn_if_other_extractor`)."""
    size = cache.info["region_feature_size"]
    if size != config.region_feature_size:
        raise ValueError(
            f"{where} holds regions of {size} features; the model takes region_feature_size="
            f"{config.region_feature_size} (extract them with the model's extractor)."
        )
    if model_name_or_path is not None:
        warn_if_other_extractor(cache.info, where, model_name_or_path, config.max_regions)


def region_cache_lookup(cache) -> Callable[[Mapping], Mapping]:
    """A function finding a record's regions in a region cache (`load_region_cache`): by its manifest path, image
    path or id, the keys the cache may have been written with (see `region_cache_key`). A plain dict of regions is
    read as it is when this is called (a copy, whose key tables are built once for all the records)."""
    if type(cache) is dict:
        cache = _RegionsByKey(cache)

    def lookup(record: Mapping) -> Mapping:
        return cache[region_cache_key(cache, record)]

    return lookup


# Cased words, an accent, punctuation, a number and a word no vocabulary splits the same way: two tokenizers that give
# these the same ids, and hold the same vocabulary and special tokens, give a model the same input.
_TOKENIZER_PROBE = "A red Circle, to the LEFT of 2 blue squares by a Café; unbelievably-tokenized!"


def tokenizer_fingerprint(tokenizer) -> str:
    """A sha256 of what decides the ids a tokenizer gives: its vocabulary (every token and its id), the ids of a probe
    text (its casing and accent rules at work) and the ids of its special tokens. Two tokenizers of one class and
    size with another vocabulary order, or another casing, differ here; one saved and read again does not."""
    import hashlib

    state = {
        "vocab": sorted(tokenizer.get_vocab().items()),
        "probe": list(tokenize_as_text(tokenizer, [_TOKENIZER_PROBE])["input_ids"][0]),
        "special": [
            tokenizer.convert_tokens_to_ids(getattr(tokenizer, role))
            for role in ("cls_token", "sep_token", "pad_token", "unk_token")
        ],
    }
    return hashlib.sha256(json.dumps(state, sort_keys=True).encode()).hexdigest()


def token_id_keys(text_inputs: Mapping[str, torch.Tensor]) -> list[tuple[int, ...]]:
    """Each tokenized text as the model reads it, its token ids without the padding: texts a tokenizer normalises
    alike (an uncased one: `A Dog` and `a  dog`) give one key."""
    ids, mask = text_inputs["input_ids"], text_inputs["attention_mask"].bool()
    return [tuple(ids[t][mask[t]].tolist()) for t in range(len(ids))]


def tokenize_texts(tokenizer, texts: Sequence[str], max_length: int = 44) -> dict[str, torch.Tensor]:
    """Tokenizes captions once: `input_ids`, `attention_mask`, `token_type_ids`, padded to `max_length` on the
    right whatever the tokenizer's `padding_side` (the model reads the pair's summary at position 0, and scoring
    trims the padding at the end of each batch). A special token's spelling in a caption is read as text (see
    `tokenize_as_text`)."""
    if not texts:
        raise ValueError("no texts to tokenize.")
    encoded = tokenize_as_text(
        tokenizer,
        texts,
        padding="max_length",
        truncation=True,
        max_length=max_length,
        padding_side="right",
        return_tensors="pt",
    )
    if "token_type_ids" not in encoded:
        encoded["token_type_ids"] = torch.zeros_like(encoded["input_ids"])
    return {key: encoded[key].long() for key in ("input_ids", "attention_mask", "token_type_ids")}


# ------------------------------------------------------------------------------------------------------------------
# Negatives
# ------------------------------------------------------------------------------------------------------------------


class _Candidates:
    """Valid negatives of a positive pair: never the pair's image, nor a caption identical to the positive one
    (short captions repeat across images, and a duplicate counted as a negative teaches the model a falsehood)."""

    def __init__(self, corpus: RetrievalCorpus):
        self.corpus = corpus
        signature: dict[tuple, int] = {}
        if corpus.text_inputs:
            keys = corpus.text_keys()
        else:
            keys = [(text.strip().lower(),) for text in corpus.texts]
        self.text_group = torch.tensor([signature.setdefault(key, len(signature)) for key in keys], dtype=torch.long)
        self.images_of_group: dict[int, set[int]] = {}
        for t, group in enumerate(self.text_group.tolist()):
            self.images_of_group.setdefault(group, set()).add(int(corpus.text_to_image[t]))

    def text_is_valid(self, text: int, positive_text: int, image: int) -> bool:
        # Any caption that describes `image` (its own, or an identical caption of another image) is a positive.
        return image not in self.images_of_group[int(self.text_group[text])]

    def image_is_valid(self, image: int, positive_text: int) -> bool:
        return image not in self.images_of_group[int(self.text_group[positive_text])]

    def caption_matches(self, texts: list[int]) -> torch.Tensor:
        """`(B, B)` bool: True where caption `texts[a]` describes the image of caption `texts[b]` (its own image, or
        an image with an identical caption): the pairs of a batch's positives that in-batch mining must not use."""
        images = [int(self.corpus.text_to_image[text]) for text in texts]
        described = [self.images_of_group[int(self.text_group[text])] for text in texts]
        return torch.tensor([[image in images_of_caption for image in images] for images_of_caption in described])

    def sample(self, positive_text: int, kind: str, count: int, generator: torch.Generator) -> list[tuple[int, int]]:
        """`count` negative pairs `(image, text)` of one kind, drawn with replacement-free rejection sampling."""
        image = int(self.corpus.text_to_image[positive_text])
        size = self.corpus.num_texts if kind == "text" else self.corpus.num_images
        pairs, tried = [], set()
        while len(pairs) < count and len(tried) < size:
            candidate = int(torch.randint(size, (1,), generator=generator))
            if candidate in tried:
                continue
            tried.add(candidate)
            if kind == "text" and self.text_is_valid(candidate, positive_text, image):
                pairs.append((image, candidate))
            elif kind == "image" and self.image_is_valid(candidate, positive_text):
                pairs.append((candidate, positive_text))
        if len(pairs) < count:
            raise ValueError(
                f"caption {positive_text} has only {len(pairs)} valid {kind} negatives, {count} needed; the corpus "
                "is too small (or too repetitive) for this many negatives."
            )
        return pairs


class RandomNegativeSampler:
    """Negatives drawn uniformly: other images' captions (`"text"`), other images (`"image"`), or either
    (`"both"`, half and half on average), as in the paper's ITM.

    Args:
        corpus: the training corpus.
        num_negatives: negatives per positive (the paper's P).
        negative_type: `"text"`, `"image"` or `"both"`.
        seed: seed of the sampler's own generator.
    """

    def __init__(self, corpus: RetrievalCorpus, num_negatives: int = 3, negative_type: str = "both", seed: int = 0):
        if num_negatives < 1:
            raise ValueError(f"num_negatives must be at least 1, got {num_negatives}.")
        if negative_type not in NEGATIVE_TYPES:
            raise ValueError(f"negative_type must be one of {NEGATIVE_TYPES}, got {negative_type!r}.")
        self.corpus = corpus
        self.num_negatives = num_negatives
        self.negative_type = negative_type
        self.candidates = _Candidates(corpus)
        self.seed = int(seed)
        self.generator = torch.Generator().manual_seed(self.seed)

    def _draw(self, positive_text: int, count: int, generator: torch.Generator) -> list[tuple[int, int]]:
        if self.negative_type == "both":
            kinds = ["text" if bit else "image" for bit in torch.randint(2, (count,), generator=generator).tolist()]
        else:
            kinds = [self.negative_type] * count
        pairs = []
        for kind in ("text", "image"):
            wanted = kinds.count(kind)
            if wanted:
                pairs += self.candidates.sample(positive_text, kind, wanted, generator)
        return pairs

    def _generators(self, count: int, seeds: Sequence[int] | None) -> list[torch.Generator]:
        if seeds is None:
            return [self.generator] * count
        # One generator per sample seed: the same negatives on resume and however batches are split.
        return [torch.Generator().manual_seed(int(seed) ^ self.seed) for seed in seeds]

    def __call__(
        self, positive_texts: Sequence[int], seeds: Sequence[int] | None = None
    ) -> list[list[tuple[int, int]]]:
        """For each positive caption, `num_negatives` negative `(image, text)` pairs.

        Args:
            positive_texts: caption indices of the positives.
            seeds: one seed per positive (`MixtureSampler`'s sample seeds); the sampler's own generator otherwise.
        """
        generators = self._generators(len(positive_texts), seeds)
        return [self._draw(int(t), self.num_negatives, g) for t, g in zip(positive_texts, generators)]


class HardNegativeSampler(RandomNegativeSampler):
    """Hard negatives: draw a random pool of `pool_size` candidates per positive, score it with the current model
    (no gradients), keep the `num_negatives` the model finds most relevant.

    The model is read from the attribute `model` at every call, so a training loop sets it once (the unwrapped
    model) and mining always uses the current weights. Mining runs where the collator runs: keep the data loader
    in the main process (`num_workers=0`).

    Args:
        corpus: the training corpus (with `text_inputs` and `region_inputs`).
        num_negatives: negatives kept per positive.
        pool_size: random candidates scored per positive; `pool_size == num_negatives` is random sampling.
        negative_type: `"text"`, `"image"` or `"both"`.
        model: the cross-encoder (settable later).
        batch_size: pairs per scoring forward pass.
        seed: seed of the sampler's generator.
    """

    def __init__(
        self,
        corpus: RetrievalCorpus,
        num_negatives: int = 3,
        pool_size: int = 16,
        negative_type: str = "both",
        model=None,
        batch_size: int = 256,
        seed: int = 0,
    ):
        super().__init__(corpus, num_negatives, negative_type, seed)
        if pool_size < num_negatives:
            raise ValueError(f"pool_size ({pool_size}) must be at least num_negatives ({num_negatives}).")
        if not corpus.text_inputs or not corpus.region_inputs:
            raise ValueError("hard-negative mining scores pairs: the corpus needs text_inputs and region_inputs.")
        self.pool_size = pool_size
        self.model = model
        self.batch_size = batch_size

    def __call__(
        self, positive_texts: Sequence[int], seeds: Sequence[int] | None = None
    ) -> list[list[tuple[int, int]]]:
        if self.model is None:
            raise ValueError("HardNegativeSampler.model is not set: give it the model to mine with.")

        generators = self._generators(len(positive_texts), seeds)
        pools = [self._draw(int(t), self.pool_size, g) for t, g in zip(positive_texts, generators)]
        flat = [pair for pool in pools for pair in pool]
        scores = score_pairs(
            self.model,
            self.corpus.text_inputs,
            self.corpus.region_inputs,
            [image for image, _ in flat],
            [text for _, text in flat],
            self.batch_size,
        ).view(len(pools), self.pool_size)
        hardest = scores.topk(self.num_negatives, dim=1).indices
        return [[pool[i] for i in keep] for pool, keep in zip(pools, hardest.tolist())]


# ------------------------------------------------------------------------------------------------------------------
# Datasets and collator
# ------------------------------------------------------------------------------------------------------------------


class RetrievalPairDataset(torch.utils.data.Dataset):
    """One item per caption: a positive (caption, image) pair of the corpus, as `{"text_index", "sample_seed"}`.

    Indexed by a caption index, or by what `MixtureSampler` yields, `(index, sample_seed)`; the seed then fixes the
    sample's negatives.
    """

    def __init__(self, corpus: RetrievalCorpus):
        self.corpus = corpus

    def __len__(self) -> int:
        return self.corpus.num_texts

    def __getitem__(self, index: int | tuple[int, int]) -> dict[str, int | None]:
        index, seed = index if isinstance(index, tuple) else (index, None)
        if not 0 <= int(index) < len(self):
            raise IndexError(f"caption index {index} out of range for {len(self)} captions.")
        return {"text_index": int(index), "sample_seed": seed}


@dataclass
class DataCollatorForImageTextRetrieval:
    """Builds retrieval batches of groups: each positive (caption, image) pair followed by its negatives.

    The batch holds the model inputs of `B * (1 + P)` pairs, `labels` (1 for the first pair of each group, 0 for
    the others) and `group_size = 1 + P`, which is what `ImageBERTForImageTextRetrieval` needs for the binary,
    multi-class and triplet losses. `positive_index` (B,) points at each group's positive, for the contrastive
    loss of the unimodal heads, `positive_images` (B,) gives its image and `positive_caption_matches` (B, B) marks
    where positive a's caption also describes positive b's image (identical captions), for in-batch negative mining.
    Text and regions are trimmed to the longest in the batch.

    Args:
        corpus: the corpus the caption indices refer to (with `text_inputs` and `region_inputs`).
        sampler: a `RandomNegativeSampler` or `HardNegativeSampler` (its `num_negatives` is P).
    """

    corpus: RetrievalCorpus
    sampler: RandomNegativeSampler

    def __call__(self, samples: Iterable[int | Mapping]) -> dict[str, Any]:
        samples = [s if isinstance(s, Mapping) else {"text_index": int(s), "sample_seed": None} for s in samples]
        if not samples:
            raise ValueError("an empty batch: no positive caption to build groups from.")
        positive_texts = [int(s["text_index"]) for s in samples]
        seeds = [s.get("sample_seed") for s in samples]
        negatives = self.sampler(positive_texts, None if any(seed is None for seed in seeds) else seeds)
        image_index, text_index = [], []
        for text, group in zip(positive_texts, negatives):
            image_index.append(int(self.corpus.text_to_image[text]))
            text_index.append(text)
            image_index += [image for image, _ in group]
            text_index += [negative_text for _, negative_text in group]
        group_size = 1 + self.sampler.num_negatives

        batch = gather_pair_inputs(
            self.corpus.text_inputs,
            self.corpus.region_inputs,
            torch.tensor(text_index),
            torch.tensor(image_index),
            torch.device("cpu"),
        )
        labels = torch.zeros(len(text_index), dtype=torch.float32)
        labels[::group_size] = 1.0
        batch["labels"] = labels
        batch["group_size"] = group_size
        batch["positive_index"] = torch.arange(0, len(text_index), group_size)
        batch["positive_images"] = torch.tensor(image_index[::group_size])
        batch["positive_caption_matches"] = self.sampler.candidates.caption_matches(positive_texts)
        return batch


__all__ = [
    "caption_text",
    "check_region_cache_fits",
    "token_id_keys",
    "tokenizer_fingerprint",
    "ALL_SPLITS",
    "KARPATHY_SPLITS",
    "NEGATIVE_TYPES",
    "PROTOCOL_CAPTIONS_PER_IMAGE",
    "DataCollatorForImageTextRetrieval",
    "GallerySubset",
    "HardNegativeSampler",
    "RandomNegativeSampler",
    "RetrievalCorpus",
    "RetrievalPairDataset",
    "SameImageGroups",
    "check_max_images",
    "evaluation_captions_per_image",
    "load_karpathy_split",
    "load_manifest_records",
    "merge_duplicate_images",
    "merge_same_pictures",
    "region_cache_key",
    "region_cache_lookup",
    "same_image_groups",
    "stack_region_records",
    "tokenize_texts",
]
