"""Writing a region cache: run the RoI extractor once over a dataset and keep its regions as Arrow shards.

Items are keyed by their manifest path (or a dataset column) and deduplicated by content: the sha1 of the image
bytes (with a digest of the boxes when boxes are given), so an image listed twice is extracted once; one key names
one image. Precomputed regions are read by each item's key (their files are named after it). Each shard is
written under a temporary name and renamed when complete: a rerun after a kill skips the finished shards and gives
the same cache. A bad image becomes a row with its reason in `error` and a line of the report; it never stops the
run. Machines of a split run join their folders with `merge_region_caches`. The folder layout is in
`cache_layout`; reading is `cache_reader`.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import os
import shutil
import signal
import sys
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from transformers.utils import IMAGE_PROCESSOR_NAME, logging

from ..formats.files import (
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
    check_folder_or_hub_id,
    check_output_dir,
    file_checksum,
    publish_folder,
)
from ..formats.manifest import iter_manifest
from ..models.imagebert.folder_publishing import fsync_folder, fsync_tree
from ..models.imagebert.image_processing_imagebert import WEIGHTS_NAME, ImageBERTRoIExtractor, extract_in_batches
from ..models.imagebert.region_batching import as_feature_tensor, check_region_record, check_region_values
from ..models.imagebert.roi_boxes import as_boxes
from ..models.imagebert.roi_image_loading import image_header_size
from .cache_layout import (
    CACHE_FORMAT_VERSION,
    CACHE_INFO_NAME,
    EXTRACTOR_DIR,
    INDEX_NAME,
    REPORT_NAME,
    SHARD_REPORT_NAME,
    SHARDS_DIR,
    STORAGE_DTYPES,
    RegionCacheError,
    _shard_dir,
    read_cache_info,
)
from .cache_reader import (
    LOOKUP_NAME,
    _check_shard_fingerprint,
    _lookup_problem,
    _shard_report,
    _weights_file_sha256,
    _write_lookup,
    tensors_sha256,
)
from .image_hashes import PLAN_DIR, DatasetImage, content_hash, image_of, share_content_hashes


logger = logging.get_logger(__name__)

# Rows of a stored dataset listed at a time while planning (their paths and byte lengths, not their images).
_LISTING_BATCH = 4096


@dataclass
class CacheReport:
    """What `extract_regions` did.

    Attributes:
        output_dir: The cache folder.
        num_items: Source items (manifest lines or dataset rows).
        num_unique: Distinct images (by content hash and boxes) after deduplication.
        num_duplicates: Items that reused another item's regions.
        num_extracted: Distinct images with regions.
        num_failed: Distinct images that failed (see `failures`).
        num_shards: Shards of the cache.
        num_shards_skipped: Shards found finished from an earlier run and not recomputed.
        seconds: Wall time of this call.
        failures: One `{"key", "cache_key", "error"}` per failed image.
    """

    output_dir: str
    num_items: int = 0
    num_unique: int = 0
    num_duplicates: int = 0
    num_extracted: int = 0
    num_failed: int = 0
    num_shards: int = 0
    num_shards_skipped: int = 0
    seconds: float = 0.0
    failures: list[dict[str, str]] = field(default_factory=list)


# ------------------------------------------------------------------------------------------------ planning


def _manifest_items(
    path: str | os.PathLike, image_root, use_boxes: bool, allow_outside_root: bool = False
) -> list[dict[str, Any]]:
    items = []
    for record in iter_manifest(path, image_root, allow_outside_root):
        boxes = np.asarray(record.boxes, dtype=np.float32).reshape(-1, 4) if use_boxes and record.boxes else None
        # The frame the boxes are given in: a file of another size (a resized copy) would misplace them.
        stated = boxes is not None and record.width is not None and record.height is not None
        items.append(
            {
                "key": record.image,
                "image": str(record.image_path),
                "boxes": boxes,
                "size": (record.width, record.height) if stated else None,
                "where": f"manifest line {record.where}",
            }
        )
    return items


def dataset_row_key(image: Any, row_index: int) -> str:
    """The key of a dataset row without a key column: its image's path (a string cell, or the `"path"` of an
    undecoded `datasets.Image` cell), else `row-<index>`. `DatasetPairSource` keys its rows by this same rule, so a
    source without `id_column` finds the regions `extract_regions` wrote for its dataset without `key_column`."""
    if isinstance(image, str):
        return image
    if isinstance(image, dict) and image.get("path"):
        return str(image["path"])
    return f"row-{row_index}"


def _stored_image_cells(images) -> Iterator[tuple[Any, Any]]:
    """`(cell the key is read from, image as planning keeps it)` of each row of a dataset stored in its own Arrow
    files (`images`: its image column alone), found from the column's paths and byte lengths: the images' bytes stay
    on disk (memory-mapped, untouched) until they are hashed and extracted. A path stays a path; bytes or pixels
    become a `DatasetImage`."""
    import pyarrow as pa
    import pyarrow.compute as pc

    table = images.with_format("arrow")
    # A selection of rows (`select`, `shuffle`) is read by copying them: a few at a time.
    batch = _LISTING_BATCH if images._indices is None else 16
    for start in range(0, len(images), batch):
        column = table[start : start + batch].column(0)
        kind = column.type
        if pa.types.is_string(kind) or pa.types.is_large_string(kind):
            for path in column.to_pylist():
                yield path, path
        elif pa.types.is_struct(kind) and {kind.field(i).name for i in range(kind.num_fields)} == {"bytes", "path"}:
            present = column.is_valid().to_pylist()
            paths = pc.struct_field(column, "path").to_pylist()
            lengths = pc.binary_length(pc.struct_field(column, "bytes")).to_pylist()
            for offset, (valid, path, length) in enumerate(zip(present, paths, lengths)):
                cell = {"bytes": None, "path": path} if valid else None  # a row without an image stays one
                yield cell, DatasetImage(images, start + offset) if length else cell
        else:  # pixels (an array column): nothing to list them by
            for offset in range(len(column)):
                yield None, DatasetImage(images, start + offset)


def _dataset_items(
    dataset,
    image_column: str,
    key_column: str | None,
    boxes_column: str | None,
    box_format: str,
):
    from datasets import Image as ImageFeature

    if isinstance(dataset.features.get(image_column), ImageFeature):
        # Undecoded, the column gives the file bytes: hashed as they are, decoded once by the extractor.
        dataset = dataset.cast_column(image_column, ImageFeature(decode=False))
    if dataset.cache_files:
        cells = _stored_image_cells(dataset.select_columns([image_column]))
    else:  # in memory, the dataset holds its images already: its cells are kept as they are
        cells = ((row[image_column],) * 2 for row in dataset.select_columns([image_column]))
    others = [column for column in (key_column, boxes_column) if column]
    rows = dataset.select_columns(others) if others else itertools.repeat({}, len(dataset))
    items = []
    for row_index, ((cell, image), row) in enumerate(zip(cells, rows)):
        key = str(row[key_column]) if key_column else dataset_row_key(cell, row_index)
        boxes = row[boxes_column] if boxes_column else None
        try:
            boxes = as_boxes(boxes, box_format) if boxes is not None and len(boxes) else None
        except (TypeError, ValueError) as error:
            raise ValueError(
                f"boxes_column {boxes_column!r}, dataset row {row_index} (key {key!r}): {str(error).rstrip('.')}."
            ) from error
        items.append({"key": key, "image": image, "boxes": boxes, "where": f"dataset row {row_index}"})
    return items


def _remove_new_plan(output_dir: Path, hashes: Path | None, output_existed: bool) -> None:
    """Removes the image hashes of a planning that was refused where this call made their folder (`hashes`), then
    the plan folder and the output folder where they are left empty and this call made the output folder. Another
    plan's hashes, and a cache, are left as they were."""
    if hashes is not None:
        shutil.rmtree(hashes, ignore_errors=True)
    for folder in (output_dir / PLAN_DIR, output_dir) if not output_existed else (output_dir / PLAN_DIR,):
        with contextlib.suppress(OSError):
            folder.rmdir()


def _check_keys(items: list[dict[str, Any]]) -> None:
    """Raises ValueError naming the first item whose key cannot be stored, before any image is read."""
    for item in items:
        try:
            item["key"].encode("utf-8")
        except UnicodeEncodeError:
            # A file name in another encoding, read as surrogate escapes: Arrow stores UTF-8 only.
            raise ValueError(
                f"{item.get('where', 'an item')}: the image key {item['key']!r} is not valid UTF-8 text (a file name "
                "in another encoding?); rename the file or give UTF-8 keys."
            ) from None


def _plan(
    items: list[dict[str, Any]], max_file_bytes: int, by_key: bool = False
) -> tuple[list[dict[str, Any]], list[tuple[str, str]]]:
    """Deduplicates items into units (one per distinct image and boxes); returns units and (key, cache_key).

    With `by_key` (regions read from precomputed files named by key), an image whose file cannot be read is still
    extracted, deduplicated by its key rather than its content.

    Raises:
        ValueError: When a key names two different images or boxes.
    """
    units: dict[str, dict[str, Any]] = {}
    index: list[tuple[str, str]] = []
    first_of: dict[str, tuple[str, str]] = {}  # key -> (cache_key, where)
    for item in items:
        key, where = item["key"], item.get("where", "an item")
        digest = hashlib.sha1(key.encode()).hexdigest()
        content = item["content"] if "content" in item else content_hash(item["image"], max_file_bytes)
        if content is None:
            # Unreadable: its own unit, so the worker records the reason in the error column (or, read by key, the
            # precomputed files give its regions).
            content = ("key-" if by_key else "unreadable-") + digest
        cache_key = content
        if item["boxes"] is not None:
            cache_key += (
                "-" + hashlib.sha1(np.ascontiguousarray(item["boxes"], dtype=np.float32).tobytes()).hexdigest()[:12]
            )
        if key in first_of and first_of[key][0] != cache_key:
            # The cache serves one record per key: the second image would silently get the first one's regions.
            raise ValueError(
                f"the key {key!r} names two different images (or boxes): {first_of[key][1]} and {where}; give each "
                "image its own key."
            )
        first_of.setdefault(key, (cache_key, where))
        if cache_key not in units:
            units[cache_key] = {
                "cache_key": cache_key,
                "image_id": content,
                "key": key,
                "image": item["image"],
                "boxes": item["boxes"],
                "size": item.get("size"),
            }
        index.append((key, cache_key))
    return list(units.values()), index


def _fingerprint(
    units: list[dict[str, Any]],
    extractor_config: dict[str, Any],
    store_class_probs: bool,
    shard_size: int,
    storage_dtype: str = "float32",
    weights_sha256: str | None = None,
):
    digest = hashlib.sha1()
    # The device is where a process runs, not what it computes: every device of a run shares one cache.
    digest.update(json.dumps({**extractor_config, "device": None}, sort_keys=True, default=str).encode())
    # float32 caches, written before the storage dtype was a setting, keep their fingerprint.
    digest.update(
        f"{store_class_probs}|{shard_size}{'' if storage_dtype == 'float32' else '|' + storage_dtype}".encode()
    )
    if weights_sha256 is not None:
        # Settings alone do not tell a retrained backbone from the one that wrote the cache.
        digest.update(f"|weights:{weights_sha256}".encode())
    for unit in units:
        digest.update(unit["cache_key"].encode() + b"\n")
    return digest.hexdigest()


# Precomputed `.npz` files read whole into their fingerprint, evenly spaced by name; and blocks of a `.tsv`, evenly
# spaced over it. Regenerated regions (another detector run) differ in every file, so a sample shows them, at a cost
# that does not grow with millions of files.
PRECOMPUTED_FILES_READ = 64
TSV_BLOCKS_READ = 64
TSV_BLOCK_BYTES = 1 << 20


def _precomputed_files_sha256(path: str, output_dir: str | os.PathLike | None = None) -> str | None:
    """The sha256 of the precomputed regions a cache is read from: for a folder, the name and size of every `.npz`
    file under it (none under `output_dir`, the cache's own folder, which may lie inside it) and the bytes of
    `PRECOMPUTED_FILES_READ` of them evenly spaced by name; for a `.tsv`, its size and `TSV_BLOCKS_READ` blocks of
    its bytes evenly spaced over it (all of a small one). Regenerated files change it, so a resume never mixes regions
    of two runs of the detector; modification times are left out, so byte-identical copies of the files (each
    machine of a sharded extraction with its own) give the same."""
    root = Path(path)
    digest = hashlib.sha256(b"precomputed\n")
    if root.is_file():
        size = root.stat().st_size
        digest.update(f"{root.name}|{size}\n".encode("utf-8", "surrogateescape"))
        blocks = max(1, min(TSV_BLOCKS_READ, -(-size // TSV_BLOCK_BYTES)))
        with open(root, "rb") as handle:
            for block in range(blocks):
                handle.seek(block * size // blocks)
                digest.update(handle.read(min(TSV_BLOCK_BYTES, size)))
        return digest.hexdigest()
    if not root.is_dir():
        return None
    skip = None if output_dir is None else os.path.abspath(output_dir)
    files = []
    for folder, subfolders, names in os.walk(root):
        if skip is not None:
            subfolders[:] = [name for name in subfolders if os.path.abspath(os.path.join(folder, name)) != skip]
        files.extend(
            (os.path.relpath(os.path.join(folder, name), root), Path(folder) / name)
            for name in names
            if name.endswith(".npz")
        )
    files.sort()
    for name, file in files:
        digest.update(f"{name}|{file.stat().st_size}\n".encode("utf-8", "surrogateescape"))
    for position in sorted({i * len(files) // PRECOMPUTED_FILES_READ for i in range(PRECOMPUTED_FILES_READ)}):
        if position < len(files):
            digest.update(files[position][1].read_bytes())
    return digest.hexdigest()


def _weights_sha256(extractor, output_dir: str | os.PathLike | None = None) -> str | None:
    """The sha256 of the extractor's backend weights (names, dtypes, shapes and values), or for precomputed regions
    of their files (`_precomputed_files_sha256`, leaving out the cache's own `output_dir`); None for an object that
    only has `extract`."""
    if getattr(extractor, "backend", None) == "precomputed" and getattr(extractor, "precomputed_path", None):
        return _precomputed_files_sha256(extractor.precomputed_path, output_dir)
    get_backend = getattr(extractor, "get_backend", None)
    if get_backend is None:
        return None
    backend = get_backend()
    if not getattr(backend, "has_weights", False):
        return None
    return tensors_sha256(sorted(backend.state_dict().items()))


# ------------------------------------------------------------------------------------------------ shards


def _check_positive(name: str, value, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer{' or None' if allow_none else ''}, got {value!r}.")


_WORKER_EXTRACTOR = None
# Where a worker process names each shard it takes, as `(pid, shard)`: a pool only says that a worker died, and
# the parent needs to know which shard it was extracting.
_WORKER_STARTED = None


def _features(feature_size: int, num_classes: int, store_class_probs: bool, storage_dtype: str = "float32"):
    from datasets import Array2D, Features, Sequence, Value

    features = {
        "cache_key": Value("string"),
        "image_id": Value("string"),
        "source": Value("string"),
        "region_features": Array2D(shape=(None, feature_size), dtype=storage_dtype),
        "region_boxes": Array2D(shape=(None, 4), dtype="float32"),
        "region_locations": Array2D(shape=(None, 5), dtype="float32"),
        "region_class_labels": Sequence(Value("int64")),
    }
    if store_class_probs:
        features["region_class_probs"] = Array2D(shape=(None, max(num_classes, 1)), dtype=storage_dtype)
    features.update(
        image_width=Value("int32"), image_height=Value("int32"), num_regions=Value("int32"), error=Value("string")
    )
    return Features(features)


# The stored width of each per-region array (`_features`): a record of another width cannot be written.
_STORED_WIDTHS = {"region_boxes": 4, "region_locations": 5}


def _storage_problem(
    record: dict[str, Any], key: str, feature_size: int, num_classes: int, store_class_probs: bool, storage_dtype: str
) -> tuple[str | None, dict[str, Any]]:
    """Why an extracted record cannot be stored (None when it can), and the record as it is stored: float arrays
    cast to `storage_dtype`, a class distribution of zeros where the extractor has none.

    The record's shapes and dtypes (`check_region_record`), its feature width, `num_regions`, boxes and class labels
    (-100, none, or one of the `num_classes`) are checked, then its values after the cast (`check_region_values`): a
    feature that overflows float16 is stored as inf, and would stop training at the first batch that reads it.
    """
    import torch

    name = f"image {key!r}"
    record = dict(record)
    try:
        for array in ("region_features", "region_boxes", "region_locations", "region_class_labels"):
            if record.get(array) is None:
                raise ValueError(f"{name}: {array} is missing; every stored record has it.")
        check_region_record(record, name, keys=("region_features", "region_locations", "region_class_labels"))
        count = np.shape(record["region_features"])[0]
        if store_class_probs:
            probs = record.get("region_class_probs")
            if probs is None or np.shape(probs)[-1:] == (0,):  # an extractor without classes
                record["region_class_probs"] = np.zeros((count, max(num_classes, 1)), np.float32)
            check_region_record(record, name, max(num_classes, 1), keys=("region_features", "region_class_probs"))
        else:
            record.pop("region_class_probs", None)
        shapes = {"region_features": (count, feature_size)}
        shapes.update({array: (count, width) for array, width in _STORED_WIDTHS.items()})
        for array, shape in shapes.items():
            if np.shape(record[array]) != shape:
                raise ValueError(
                    f"{name}: {array} has shape {np.shape(record[array])}; expected {shape} ({count} regions)."
                )
        if record.get("num_regions") != count:
            raise ValueError(
                f"{name}: num_regions is {record.get('num_regions')!r}, but region_features has {count} rows (one per "
                "region)."
            )
        if not np.isfinite(np.asarray(record["region_boxes"], dtype=np.float32)).all():
            raise ValueError(f"{name}: region_boxes hold NaN or infinite values; expected pixel coordinates.")
        labels = np.asarray(record["region_class_labels"])
        bad = labels[(labels != -100) & ((labels < 0) | (labels >= num_classes))]
        if bad.size:
            # Precomputed files with class ids but no distributions (LXMERT's `objects_id`) leave the class count
            # unknown until it is declared.
            hint = (
                " Set the extractor's precomputed_num_classes to the detector's class count."
                if not num_classes
                else ""
            )
            raise ValueError(
                f"{name}: region_class_labels {bad[:5].tolist()} are outside [0, {num_classes}) (the extractor's "
                f"classes; -100 for none).{hint}"
            )
        dtype = getattr(torch, storage_dtype)
        cast = {
            array: as_feature_tensor(record[array]).to(dtype)
            for array in ("region_features", "region_class_probs")
            if array in record
        }
        locations = torch.as_tensor(np.asarray(record["region_locations"], dtype=np.float32))
        try:
            check_region_values(
                {array: values[None] for array, values in {**cast, "region_locations": locations}.items()},
                names=[key],
            )
        except ValueError as error:
            raise ValueError(f"{str(error).rstrip('.')} (as stored, in {storage_dtype}).") from error
    except ValueError as error:
        return f"the extractor returned regions that cannot be stored: {error}", {}
    return None, record | {array: values.numpy() for array, values in cast.items()}


def _failed_record(reason: str, feature_size: int, num_classes: int) -> dict[str, Any]:
    """A row for an image without regions, as the extractor gives for one it cannot read."""
    return {
        "region_features": np.zeros((0, feature_size), np.float32),
        "region_boxes": np.zeros((0, 4), np.float32),
        "region_locations": np.zeros((0, 5), np.float32),
        "region_class_labels": np.zeros((0,), np.int64),
        "region_class_probs": np.zeros((0, max(num_classes, 1)), np.float32),
        "image_width": 0,
        "image_height": 0,
        "num_regions": 0,
        "error": reason,
    }


def _stated_size_problem(
    unit: dict[str, Any], apply_exif_orientation: bool, max_image_pixels: int | None = None
) -> str | None:
    """Why a unit's boxes cannot be used on its image file: the manifest states the frame of its boxes (its width and
    height), and the file is another size (a resized copy, or a photo its EXIF orientation turns). Rescaling the
    boxes would be a guess, so the image fails instead. None when the sizes agree or nothing is stated."""
    stated = unit.get("size")
    if stated is None or unit["boxes"] is None or not isinstance(unit["image"], (str, os.PathLike)):
        return None
    found = image_header_size(unit["image"], apply_exif_orientation, max_image_pixels)
    if found is None or found == tuple(stated):
        return None
    turned = apply_exif_orientation and image_header_size(unit["image"], False, max_image_pixels) != found
    note = " once its EXIF orientation turns it (the manifest must give the image as shown)" if turned else ""
    return (
        f"the manifest states {stated[0]}x{stated[1]}, but the image file is {found[0]}x{found[1]}{note}: its boxes "
        "are in the manifest's frame and would be misplaced (boxes are not rescaled); give the line the file's width, "
        "height and boxes"
    )


@dataclass(frozen=True)
class _ShardSettings:
    """How every shard of one cache is extracted and written, in this process and in its workers alike."""

    batch_size: int
    store_class_probs: bool
    storage_dtype: str
    # The plan's shard count and fingerprint, recorded in each shard's report (see `_write_shard`).
    num_shards: int
    fingerprint: str


def _shard_columns(
    extractor,
    units: list[dict[str, Any]],
    features,
    settings: _ShardSettings,
    on_batch: Callable[[int], None] | None = None,
) -> tuple[dict[str, list[Any]], list[dict[str, str]]]:
    """Runs the extractor over a shard's units: the shard's columns, and one failure entry per image that failed
    (unreadable, of another size than its manifest line states for its boxes, or whose regions cannot be stored: see
    `_stated_size_problem` and `_storage_problem`)."""
    num_classes, feature_size = extractor.num_object_classes, extractor.region_feature_size
    batch_size, store_class_probs = settings.batch_size, settings.store_class_probs
    columns: dict[str, list[Any]] = {name: [] for name in features}
    failures = []

    def add(unit: dict[str, Any], record: dict[str, Any]) -> None:
        columns["cache_key"].append(unit["cache_key"])
        columns["image_id"].append(unit["image_id"])
        columns["source"].append(unit["key"])
        for name in ("region_features", "region_boxes", "region_locations"):
            columns[name].append(record[name])
        columns["region_class_labels"].append(record["region_class_labels"])
        if store_class_probs:
            probs = record.get("region_class_probs")
            columns["region_class_probs"].append(
                np.zeros((record["num_regions"], max(num_classes, 1)), np.float32)
                if probs is None or probs.shape[1] == 0
                else probs
            )
        columns["image_width"].append(record["image_width"])
        columns["image_height"].append(record["image_height"])
        columns["num_regions"].append(record["num_regions"])
        columns["error"].append(record["error"])
        if record["error"]:
            failures.append({"key": unit["key"], "cache_key": unit["cache_key"], "error": record["error"]})

    # Precomputed files are named by the item's key (a manifest path's file name, a dataset key), not by content.
    by_key = getattr(extractor, "backend", None) == "precomputed"
    apply_exif = getattr(extractor, "apply_exif_orientation", True)
    limit = getattr(extractor, "max_image_pixels", None)
    refused = {} if by_key else {i: _stated_size_problem(unit, apply_exif, limit) for i, unit in enumerate(units)}
    refused = {i: problem for i, problem in refused.items() if problem is not None}
    todo = [unit for i, unit in enumerate(units) if i not in refused]
    stream = extract_in_batches(
        extractor,
        [unit["key"] if by_key else image_of(unit["image"]) for unit in todo],
        batch_size,
        boxes=[unit["boxes"] for unit in todo],
        image_ids=None if by_key else [unit["image_id"] for unit in todo],
        on_error="record",
        return_class_probs=store_class_probs,
    )
    position = 0  # rows stay in the units' order, refused ones in their place

    def add_refused() -> None:
        nonlocal position
        while position in refused:
            add(units[position], _failed_record(refused[position], feature_size, num_classes))
            position += 1

    for _, records in zip(range(0, len(todo), batch_size), stream):
        for record in records:
            add_refused()
            unit = units[position]
            position += 1
            if not record["error"]:
                problem, stored = _storage_problem(
                    record, unit["key"], feature_size, num_classes, store_class_probs, settings.storage_dtype
                )
                record = stored if problem is None else _failed_record(problem, feature_size, num_classes)
            add(unit, record)
        if on_batch is not None:
            on_batch(len(records))
    add_refused()
    if refused and on_batch is not None:
        on_batch(len(refused))
    return columns, failures


def _write_shard(
    columns: dict[str, list[Any]],
    features,
    units: list[dict[str, Any]],
    failures,
    shard_path: Path,
    settings: _ShardSettings,
) -> dict[str, Any]:
    """Saves the columns under a temporary name with their `shard_report.json`, then renames the folder into place."""
    import datasets
    from datasets import Dataset

    tmp_path = shard_path.with_name(f"{shard_path.name}.tmp-{os.getpid()}")
    if tmp_path.exists():
        shutil.rmtree(tmp_path)
    shard = Dataset.from_dict(columns, features=features)
    bars_were_on = not datasets.utils.are_progress_bars_disabled()
    datasets.utils.disable_progress_bars()  # one bar per shard would drown the run's own bar
    try:
        shard.save_to_disk(str(tmp_path))
    finally:
        if bars_were_on:
            datasets.utils.enable_progress_bars()
    shard_report = {
        "rows": len(units),
        "failures": failures,
        # What a reader checks: the shard's place, the keys of its first and last rows (cheap, at every open), and
        # each file's size (at every open) and sha256 (`verify_region_cache`).
        "shard": int(shard_path.name.rsplit("-", 1)[-1]),
        # The plan's shard count, so a reader can tell an edited count in cache_info.json from a missing shard.
        "num_shards": settings.num_shards,
        # The plan it was extracted for: a shard of another plan (other settings, images or weights) is refused.
        "fingerprint": settings.fingerprint,
        "first_cache_key": units[0]["cache_key"] if units else None,
        "last_cache_key": units[-1]["cache_key"] if units else None,
        "files": {file.name: file_checksum(file) for file in sorted(tmp_path.glob("data-*.arrow"))},
    }
    atomic_write_json(tmp_path / SHARD_REPORT_NAME, shard_report)
    # The rename is the commit: a shard folder without the .tmp suffix is always complete.
    try:
        publish_folder(tmp_path, shard_path, replace=False)
    except OSError:
        # Published meanwhile by another run of the same plan (a requeued job while the first still runs, two
        # machines given the same shard_index): its shard holds the same regions, so this one is dropped.
        published = _finished_shard_report(shard_path) if shard_path.is_dir() else None
        if published is None or published.get("fingerprint") != settings.fingerprint:
            raise
        shutil.rmtree(tmp_path, ignore_errors=True)
        return published
    return shard_report


def _extract_shard(
    extractor,
    units: list[dict[str, Any]],
    shard_path: Path,
    settings: _ShardSettings,
    on_batch: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    features = _features(
        extractor.region_feature_size, extractor.num_object_classes, settings.store_class_probs, settings.storage_dtype
    )
    columns, failures = _shard_columns(extractor, units, features, settings, on_batch)
    return _write_shard(columns, features, units, failures, shard_path, settings)


def _init_worker(
    extractor_dir: str,
    num_threads: int,
    devices,
    extractor_class=ImageBERTRoIExtractor,
    device: str | None = None,
    started=None,
) -> None:
    global _WORKER_EXTRACTOR, _WORKER_STARTED
    import torch

    _WORKER_STARTED = started

    torch.set_num_threads(max(1, num_threads))
    # Worker k takes the k-th device from the queue, so N workers on N GPUs use one GPU each; without a queue (a
    # device the user pinned, or no GPU) every worker runs where the extractor was asked to.
    if devices is not None:
        device = devices.get()
    _WORKER_EXTRACTOR = extractor_class.from_pretrained(extractor_dir, device=device)


def _check_worker_class(extractor, num_proc: int) -> None:
    """Refuses `num_proc > 1` with an extractor class the spawned workers cannot import by name (defined in a
    function, or in an interactive session): they would load another class's regions into the cache."""
    if num_proc == 1:
        return
    cls = type(extractor)
    module = sys.modules.get(cls.__module__)
    if cls.__module__ == "__main__" and not getattr(module, "__file__", None):
        module = None  # an interactive session: spawned workers cannot re-import it
    found = module
    for part in cls.__qualname__.split("."):
        found = getattr(found, part, None)
    if found is not cls or not callable(getattr(cls, "from_pretrained", None)):
        raise ValueError(
            f"num_proc={num_proc} needs an extractor class the worker processes can import and load with "
            f"from_pretrained; {cls.__module__}.{cls.__qualname__} is not (defined inside a function or an "
            "interactive session?): define it at the top level of a module, or pass num_proc=1."
        )


def _worker_task(task: tuple[int, list[dict[str, Any]], str, _ShardSettings]) -> tuple[int, int, dict[str, Any]]:
    shard, units, shard_path, settings = task
    if _WORKER_STARTED is not None:
        # A SimpleQueue writes at once (no feeder thread): a worker killed the next moment has named its shard.
        _WORKER_STARTED.put((os.getpid(), shard))
    return shard, len(units), _extract_shard(_WORKER_EXTRACTOR, units, Path(shard_path), settings)


# ------------------------------------------------------------------------------------------------ entry point


def _resolve_extractor(extractor):
    if extractor is None:
        return ImageBERTRoIExtractor()
    if isinstance(extractor, (str, os.PathLike)):
        check_folder_or_hub_id(extractor, "extractor", "a folder saved with ImageBERTRoIExtractor.save_pretrained")
        return ImageBERTRoIExtractor.from_pretrained(extractor)
    return extractor


def launch_process() -> tuple[int, int, int]:
    """`(rank, world_size, local_rank)` of this process as `torchrun` / `accelerate launch` set them ((0, 1, 0) alone)."""
    rank = int(os.environ.get("RANK", 0))
    world = int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    return rank, world, local_rank


def _split_process(num_shards: int, rank: int, world: int, local_rank: int) -> tuple[int, int]:
    """The `(rank, world)` that splits this machine's shards among its processes. Without `num_shards` the launcher's
    global ranks split every shard; with it, `shard_index` already names the machine, so its processes split its
    shards by their machine-local ranks (`LOCAL_RANK` of `LOCAL_WORLD_SIZE`): under one multi-machine `torchrun` the
    global ranks would leave every machine's shards of the other ranks undone."""
    if num_shards == 1:
        return rank, world
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    if not 0 <= local_rank < local_world:
        raise ValueError(
            f"LOCAL_RANK={local_rank} is outside LOCAL_WORLD_SIZE={local_world} (as the launcher set them); expected "
            "0 <= LOCAL_RANK < LOCAL_WORLD_SIZE."
        )
    return local_rank, local_world


def shards_of(num_cache_shards: int, num_shards: int = 1, shard_index: int = 0, rank: int = 0, world: int = 1):
    """The cache shards one process extracts: machine `shard_index` of `num_shards` takes every `num_shards`-th
    shard, and process `rank` of the `world` processes on that machine every `world`-th of those.

    Deterministic and independent of how many processes the other machines run, so any set of machines covers
    every shard exactly once.
    """
    if num_shards < 1 or not 0 <= shard_index < num_shards:
        raise ValueError(
            f"need 0 <= shard_index < num_shards, got shard_index={shard_index}, num_shards={num_shards}."
        )
    mine = list(range(shard_index, num_cache_shards, num_shards))
    return mine[rank::world]


def _device_queue(context, num_proc: int, extractor):
    import torch

    if extractor.device not in (None, "cuda") or not torch.cuda.is_available():
        return None
    devices = context.Queue()
    for worker in range(num_proc):
        devices.put(f"cuda:{worker % torch.cuda.device_count()}")
    return devices


def _publish_new_file(path: Path, text: str) -> bool:
    """Puts `text` at `path` unless a file is there already; True when this call put it there. The file is written
    and synced under a unique temporary name, then hard-linked into place: a link never replaces a file, so of
    several processes publishing at once exactly one succeeds, and readers only ever see a complete file. Where the
    filesystem has no hard links, the file is created exclusively (`O_EXCL`) and written in place."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    data = text.encode("utf-8")
    try:
        with open(tmp, "xb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        try:
            os.link(tmp, path)
        except FileExistsError:
            return False
        except OSError:
            try:
                with open(path, "xb") as handle:
                    handle.write(data)
                    handle.flush()
                    os.fsync(handle.fileno())
            except FileExistsError:
                return False
    finally:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
    fsync_folder(path.parent)
    return True


def _start_cache(output_dir: Path, info: dict[str, Any]) -> dict[str, Any] | None:
    """Claims `output_dir` for a new cache by publishing its `cache_info.json` (never over another one): None when
    this process's info is the cache's, else the info another process published first, for the caller to compare.
    Two machines starting one folder at the same moment with other settings cannot both go on."""
    output_dir.mkdir(parents=True, exist_ok=True)
    if _publish_new_file(output_dir / CACHE_INFO_NAME, json.dumps(info, indent=2, default=str)):
        return None
    return read_cache_info(output_dir)


def _saved_extractor_matches(folder: Path, info: dict[str, Any]) -> bool:
    """Whether `folder` holds the extractor `info` (`cache_info.json`) records: the same saved settings (the device
    aside: it is where a process runs) and weights of the recorded sha256. False for a folder that is missing, does
    not parse, or was saved by an extractor whose file does not record its settings."""
    from safetensors import SafetensorError

    recorded = info.get("extractor")
    try:
        saved = json.loads((folder / IMAGE_PROCESSOR_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    if not isinstance(saved, dict) or not isinstance(recorded, dict):
        return False
    recorded = json.loads(json.dumps(recorded, default=str))
    if {**saved, "device": None} != {**recorded, "device": None}:
        return False
    weights = folder / WEIGHTS_NAME
    if not weights.is_file():
        # Precomputed regions record the sha256 of their files, and save no weights.
        return info.get("weights_sha256") is None or recorded.get("backend") == "precomputed"
    try:
        return _weights_file_sha256(str(weights)) == info.get("weights_sha256")
    except (OSError, ValueError, SafetensorError):
        return False


def _same_saved_extractor(folder: Path, fresh: Path) -> bool:
    """Whether `folder` holds what this process just saved at `fresh`: the same files, with equal bytes, for JSON
    files equal values once the device is left out, and for weights equal tensors (two saves of the same tensors may
    order their header's metadata otherwise)."""
    from safetensors import SafetensorError

    if not folder.is_dir() or folder.is_symlink():
        return False
    names = sorted(str(path.relative_to(fresh)) for path in fresh.rglob("*") if path.is_file())
    if names != sorted(str(path.relative_to(folder)) for path in folder.rglob("*") if path.is_file()):
        return False
    for name in names:
        there, here = (folder / name).read_bytes(), (fresh / name).read_bytes()
        if there == here:
            continue
        if name.endswith(".safetensors"):
            try:
                if _weights_file_sha256(str(folder / name)) == _weights_file_sha256(str(fresh / name)):
                    continue
            except (OSError, ValueError, SafetensorError):
                pass
            return False
        if not name.endswith(".json"):
            return False
        try:
            there, here = json.loads(there), json.loads(here)
        except ValueError:
            return False
        if not isinstance(there, dict) or not isinstance(here, dict):
            return False
        if {**there, "device": None} != {**here, "device": None}:
            return False
    return True


def _remove_path(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            path.unlink()


def _place_extractor(output_dir: Path, save: Callable[[Path], Any], info: dict[str, Any]) -> None:
    """Puts the extractor `save(folder)` saves at `output_dir/extractor` unless the one there is the extractor `info`
    records. The replaced one is renamed aside before the new one is published, never overwritten: another process
    that just put the same extractor there keeps a complete folder (the one it put, or this process's identical
    one)."""
    final = output_dir / EXTRACTOR_DIR
    if _saved_extractor_matches(final, info):
        return
    # Unique: machines sharing the folder may run processes of the same id.
    tmp = output_dir / f".{EXTRACTOR_DIR}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    stale = output_dir / f".{EXTRACTOR_DIR}.stale-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        save(tmp)
        fsync_tree(tmp)  # before the stale folder goes aside, so that the folder is missing only between two renames
        # Compared again after the save: another process may have placed it meanwhile.
        if os.path.lexists(final) and not _same_saved_extractor(final, tmp):
            logger.warning(
                "%s holds an extractor of other settings or weights than %s records (left by a start that was cut "
                "short?): replacing it",
                final,
                CACHE_INFO_NAME,
            )
            with contextlib.suppress(FileNotFoundError):  # another process set it aside first
                os.replace(final, stale)
        if not os.path.lexists(final):
            with contextlib.suppress(FileExistsError):  # another process published the same extractor first
                publish_folder(tmp, final, replace=False)
    finally:
        _remove_path(tmp)
        _remove_path(stale)


def _complete_skeleton(output_dir: Path, extractor, lines: str, info: dict[str, Any]) -> None:
    """Makes the extractor and `index.jsonl` of a cache agree with its `cache_info.json` (`info`, checked to match
    this run's plan, `lines` its index): writes them where they are missing (a process killed just after publishing
    the info), and replaces those of other settings or another source (a start killed before publishing its info,
    which it once wrote last). Several processes may do it at once: each puts identical content in place, and one
    that finds them right leaves them alone."""
    index_path = output_dir / INDEX_NAME
    recorded = info.get("index")  # absent from older caches, whose index `_check_same_index` compared whole
    if not index_path.is_file():
        atomic_write_text(index_path, lines)
    elif recorded is not None and file_checksum(index_path) != recorded:
        logger.warning(
            "%s does not match the checksum in %s (left by a start that was cut short?): writing it again",
            index_path,
            CACHE_INFO_NAME,
        )
        atomic_write_text(index_path, lines)
    _place_extractor(output_dir, extractor.save_pretrained, info)


def _index_text(index, shard_of) -> str:
    return "".join(json.dumps({"key": key, "cache_key": ck, "shard": shard_of[ck]}) + "\n" for key, ck in index)


def _index_checksum(lines: str) -> dict[str, Any]:
    data = lines.encode("utf-8")
    return {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def _first_index_difference(old_lines: list[str], new_lines: list[str]) -> str:
    """Names the first line where two `index.jsonl` texts differ, by the key each gives."""
    for number, (old, new) in enumerate(zip(old_lines, new_lines), start=1):
        if old != new:
            old_key, new_key = json.loads(old).get("key"), json.loads(new).get("key")
            if old_key == new_key:
                return f"the key {new_key!r} (index line {number}) names another image"
            return f"index line {number} is the key {old_key!r} there, {new_key!r} here"
    if len(old_lines) > len(new_lines):
        key = json.loads(old_lines[len(new_lines)]).get("key")
        return f"the key {key!r} (index line {len(new_lines) + 1}) is not in this source"
    if len(new_lines) > len(old_lines):
        key = json.loads(new_lines[len(old_lines)]).get("key")
        return f"the key {key!r} (index line {len(old_lines) + 1}) is new"
    return "the recorded index checksum does not match"


def _first_plan_difference(output_dir: Path, index: list[tuple[str, str]]) -> str | None:
    """Names the first item whose key reads another image in this run's plan than in the cache's `index.jsonl` (an
    image replaced or restored, a key added or dropped); None when they agree item for item or the index cannot be
    read (the caller then names the settings)."""
    try:
        recorded = [
            json.dumps({"key": entry["key"], "cache_key": entry["cache_key"]})
            for entry in map(json.loads, (output_dir / INDEX_NAME).read_text(encoding="utf-8").splitlines())
        ]
    except (OSError, ValueError, TypeError, KeyError):
        return None
    planned = [json.dumps({"key": key, "cache_key": cache_key}) for key, cache_key in index]
    return None if recorded == planned else _first_index_difference(recorded, planned)


def _check_same_index(output_dir: Path, previous: dict[str, Any], lines: str) -> None:
    """Refuses to resume a cache whose key -> image index differs from this source's: the same images under other
    keys (or a key added to an image) would keep the old index, so a key would read another image's regions."""
    if previous.get("index") == _index_checksum(lines):
        return
    index_path = output_dir / INDEX_NAME
    recorded = index_path.read_text(encoding="utf-8") if index_path.is_file() else ""
    if recorded == lines and "index" not in previous:  # a cache written before the checksum was recorded
        return
    raise ValueError(
        f"{output_dir} holds a region cache of the same images under other keys: "
        f"{_first_index_difference(recorded.splitlines(), lines.splitlines())}; a cache keeps the keys it was "
        "started with: use another output_dir (or delete this one)."
    )


def _count_finished(output_dir: Path, report: CacheReport, num_shards: int, fingerprint: str) -> int:
    """Counts every finished shard's rows and failures into `report`; returns how many shards are finished."""
    rows, finished = 0, 0
    report.failures = []
    for shard in range(num_shards):
        shard_report = _finished_shard_report(_shard_dir(output_dir, shard))
        if shard_report is None:
            continue
        _check_shard_fingerprint(_shard_dir(output_dir, shard), shard_report, fingerprint)
        finished += 1
        report.failures.extend(shard_report.get("failures") or [])
        rows += shard_report["rows"]
    report.num_failed = len(report.failures)
    report.num_extracted = rows - report.num_failed
    return finished


def _finish_cache(output_dir: Path, report: CacheReport, num_shards: int, started: float | None = None) -> CacheReport:
    """Counts every finished shard into `report`; once all are there, marks the cache complete and builds its
    key table, recording its checksum. Run by whichever process finishes last (running it twice writes the same
    files); on a complete cache, builds the key table again where it does not match its recorded checksum. With
    `started` (a `time.perf_counter()` value), `report.seconds` is the wall time since then, in `report.json` too.

    Raises:
        RegionCacheError: When `cache_info.json` or a shard's report is damaged, or a shard was written for another
            plan (its report records another fingerprint), naming the file or the shard folder.
    """
    info = read_cache_info(output_dir)
    finished = _count_finished(output_dir, report, num_shards, info["fingerprint"])
    if finished == num_shards:
        if not info.get("complete"):
            info["lookup"] = _write_lookup(output_dir)
            info["complete"] = True
            atomic_write_json(output_dir / CACHE_INFO_NAME, info, indent=2, default=str)
        else:
            problem = _lookup_problem(output_dir, info) if info.get("lookup") else "no checksum of it was recorded"
            if problem is not None:
                if info.get("lookup"):
                    logger.warning("%s: %s; building it again from %s", output_dir / LOOKUP_NAME, problem, INDEX_NAME)
                info["lookup"] = _write_lookup(output_dir)
                atomic_write_json(output_dir / CACHE_INFO_NAME, info, indent=2, default=str)
    if started is not None:
        report.seconds = round(time.perf_counter() - started, 3)
    atomic_write_json(output_dir / REPORT_NAME, asdict(report), indent=2)
    if finished < num_shards and read_cache_info(output_dir).get("complete"):
        # Another process completed the cache, and wrote its report, after this one counted the shards: this
        # report, of fewer shards, may have replaced it. Counted again, the cache's report covers every shard.
        _count_finished(output_dir, report, num_shards, info["fingerprint"])
        atomic_write_json(output_dir / REPORT_NAME, asdict(report), indent=2)
    return report


def _check_extract_arguments(
    source,
    output_dir,
    *,
    image_root,
    storage_dtype: str,
    box_format: str,
    shard_size,
    num_proc,
    num_shards,
    shard_index,
    batch_size,
    max_shards,
) -> None:
    """Refuses bad arguments of `extract_regions` before any work, each with a message naming it."""
    if storage_dtype not in STORAGE_DTYPES:
        raise ValueError(f"storage_dtype must be one of {STORAGE_DTYPES}, got {storage_dtype!r}.")
    for name, value in (("shard_size", shard_size), ("num_proc", num_proc), ("num_shards", num_shards)):
        _check_positive(name, value)
    # Here rather than only in `shards_of`, which runs once the cache's skeleton is written.
    if isinstance(shard_index, bool) or not isinstance(shard_index, int) or not 0 <= shard_index < num_shards:
        raise ValueError(
            f"shard_index must be an integer from 0 to num_shards - 1 = {num_shards - 1}, got {shard_index!r}."
        )
    _check_positive("batch_size", batch_size, allow_none=True)
    _check_positive("max_shards", max_shards, allow_none=True)
    if box_format not in ("xyxy", "xywh"):
        raise ValueError(f"box_format must be 'xyxy' or 'xywh', got {box_format!r}.")
    if not isinstance(source, (str, os.PathLike)):
        from datasets import DatasetDict

        if isinstance(source, DatasetDict):  # its splits hold the rows, and it has no `features` of its own
            splits = list(source)
            raise ValueError(
                f"source is a DatasetDict of the splits {splits}; pass one split's Dataset (e.g. "
                f"source[{(splits or ['train'])[0]!r}]) or a manifest."
            )
    if isinstance(source, (str, os.PathLike)) and not Path(source).is_file():
        found = "is a folder" if Path(source).is_dir() else "does not exist"
        raise FileNotFoundError(f"source {source} {found} (expected a jsonl manifest or a datasets.Dataset).")
    if image_root is not None and not Path(image_root).is_dir():
        found = "is not a folder" if Path(image_root).exists() else "does not exist"
        raise FileNotFoundError(
            f"image_root {image_root} {found} (expected the folder the manifest's image paths are relative to)."
        )
    if Path(output_dir).exists() and not Path(output_dir).is_dir():
        raise NotADirectoryError(f"output_dir {output_dir} exists and is not a folder.")
    check_output_dir(output_dir, "output_dir")  # the empty path, which the OS reads as the current folder


def _place_on_launch_device(extractor, world: int, local_rank: int) -> None:
    """Under a launcher with several processes, moves an extractor without a fixed GPU to `cuda:LOCAL_RANK`."""
    if world > 1 and extractor.device in (None, "cuda"):
        import torch

        if torch.cuda.is_available():
            extractor.device = f"cuda:{local_rank % torch.cuda.device_count()}"


def _open_cache(
    output_dir: Path,
    extractor,
    units: list[dict[str, Any]],
    index: list[tuple[str, str]],
    shards: list[list[dict[str, Any]]],
    *,
    store_class_probs: bool,
    shard_size: int,
    storage_dtype: str,
) -> str:
    """Starts the cache at `output_dir`, or checks that the one there (found at the start, or published by another
    process while this one started it) is of the same plan (its fingerprint and its index); returns the plan's
    fingerprint."""
    extractor_config = extractor.to_dict()
    weights_sha256 = _weights_sha256(extractor, output_dir)
    fingerprint = _fingerprint(units, extractor_config, store_class_probs, shard_size, storage_dtype, weights_sha256)
    shard_of = {unit["cache_key"]: shard for shard, chunk in enumerate(shards) for unit in chunk}
    lines = _index_text(index, shard_of)
    if (output_dir / CACHE_INFO_NAME).is_file():
        previous = read_cache_info(output_dir)
    else:
        info = {
            "format_version": CACHE_FORMAT_VERSION,
            "fingerprint": fingerprint,
            "complete": False,
            "region_feature_size": extractor.region_feature_size,
            "num_object_classes": extractor.num_object_classes,
            "store_class_probs": store_class_probs,
            "feature_dtype": storage_dtype,
            "shard_size": shard_size,
            "num_shards": len(shards),
            "extractor": {**extractor_config, "device": None},
            "weights_sha256": weights_sha256,
            "index": _index_checksum(lines),
        }
        previous = _start_cache(output_dir, info)
    if previous is not None:
        if previous.get("fingerprint") != fingerprint:
            if (
                weights_sha256 is not None
                and isinstance(previous.get("weights_sha256"), str)
                and previous.get("fingerprint")
                == _fingerprint(
                    units, extractor_config, store_class_probs, shard_size, storage_dtype, previous["weights_sha256"]
                )
            ):
                # Named apart: with identical settings (a retrained backbone) the generic message would mislead.
                if getattr(extractor, "backend", None) == "precomputed":
                    raise ValueError(
                        f"{output_dir} holds a region cache made from other precomputed files: the files under "
                        f"{extractor.precomputed_path} changed (names, sizes or contents) since it was "
                        "started, or an earlier version started it (it compared the files' modification times); one "
                        "cache holds the regions of one set of files: use a new output_dir or delete it."
                    )
                raise ValueError(
                    f"{output_dir} holds a region cache made with other extractor weights (sha256 "
                    f"{previous['weights_sha256'][:12]}..., this extractor's {weights_sha256[:12]}...); one cache "
                    "holds the regions of one extractor: use a new output_dir or delete it."
                )
            difference = _first_plan_difference(output_dir, index)
            if difference is not None:
                raise ValueError(
                    f"{output_dir} holds a region cache of another source: {difference} (an image replaced, restored "
                    "or given other boxes since the cache was started, or another manifest); a cache keeps the images "
                    "it was started with: use a new output_dir or delete it."
                )
            raise ValueError(
                f"{output_dir} holds a region cache of another source, extractor (settings or weights), shard size "
                f"or storage dtype (it stores {previous.get('feature_dtype', 'float32')}; pass storage_dtype to "
                "match); use a new output_dir or delete it."
            )
        _check_same_index(output_dir, previous, lines)
        info = previous
    _complete_skeleton(output_dir, extractor, lines, info)
    (output_dir / SHARDS_DIR).mkdir(exist_ok=True)
    return fingerprint


def _finished_shard_report(folder: Path) -> dict[str, Any] | None:
    """The `shard_report.json` of a finished shard folder, or None where the folder is missing or unfinished: without
    its report or the data files the report lists (a copy or move cut short; the writer renames a shard into place
    only with both).

    Raises:
        RegionCacheError: When the report is there but damaged, naming it.
    """
    if not (folder / SHARD_REPORT_NAME).is_file():
        return None
    report = _shard_report(folder)
    files = report.get("files")
    names = list(files) if isinstance(files, dict) else [file.name for file in folder.glob("data-*.arrow")]
    if not names or not all((folder / name).is_file() for name in names):
        return None
    return report


def _recompute_unfinished_shards(output_dir: Path, mine: list[int]) -> None:
    """Removes the shard folders of this process that hold no finished shard, so that they are extracted again."""
    for shard in mine:
        folder = _shard_dir(output_dir, shard)
        if folder.is_dir() and _finished_shard_report(folder) is None:
            logger.warning(
                "%s has no %s or lacks data files (a copy cut short?): extracting that shard again",
                folder,
                SHARD_REPORT_NAME,
            )
            shutil.rmtree(folder)


def _remove_stale_tmp(output_dir: Path, mine: list[int]) -> None:
    """Removes the temporary folders a killed run left for the shards this process extracts. Only those: another
    machine writing the same folder may be writing its own shards' temporary folders right now."""
    owned = {_shard_dir(output_dir, shard).name for shard in mine}
    for stale in (output_dir / SHARDS_DIR).glob("*.tmp-*"):
        if stale.name.split(".tmp-", 1)[0] in owned:
            shutil.rmtree(stale, ignore_errors=True)


def _run_shards(
    extractor,
    output_dir: Path,
    shards: list[list[dict[str, Any]]],
    todo: list[int],
    on_images: Callable[[int], Any],
    num_proc: int,
    settings: _ShardSettings,
) -> None:
    """Extracts the shards `todo`: in this process, or with `num_proc > 1` in spawned workers, one shard a task;
    `on_images(n)` is called as images are done. A worker that dies (the out-of-memory killer, a crash in an image
    decoder) ends the run with a `ChildProcessError` naming its shard; `multiprocessing.Pool` would wait for its
    result forever.

    Raises:
        ChildProcessError: When a worker process died, naming the shard it was extracting.
    """
    if num_proc <= 1 or len(todo) <= 1:
        for shard in todo:
            _extract_shard(extractor, shards[shard], _shard_dir(output_dir, shard), settings, on_images)
        return
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed
    from concurrent.futures.process import BrokenProcessPool

    # Spawned workers: forking a process whose torch already ran OpenMP threads can deadlock.
    context = multiprocessing.get_context("spawn")
    workers = min(num_proc, len(todo))
    threads = max(1, (os.cpu_count() or 1) // workers)
    started = context.SimpleQueue()
    initargs = (
        str(output_dir / EXTRACTOR_DIR),
        threads,
        _device_queue(context, workers, extractor),
        type(extractor),  # a subclass's workers run the subclass (pickled by name)
        extractor.device,
        started,
    )
    executor = ProcessPoolExecutor(workers, mp_context=context, initializer=_init_worker, initargs=initargs)
    processes: dict[int, Any] = {}
    finished: set[int] = set()
    taken: dict[int, int] = {}  # pid -> the last shard the worker took, the one it is on

    def drain() -> None:
        # Read as the shards finish, so the pipe never fills and blocks a worker.
        while not started.empty():
            pid, shard = started.get()
            taken[pid] = shard

    try:
        futures = [
            executor.submit(_worker_task, (shard, shards[shard], str(_shard_dir(output_dir, shard)), settings))
            for shard in todo
        ]
        # The workers start as the tasks are submitted. Kept for their exit codes: the pool does not say which died.
        processes = {process.pid: process for process in multiprocessing.active_children()}
        for future in as_completed(futures):
            drain()
            shard, count, _ = future.result()
            finished.add(shard)
            on_images(count)
    except BrokenProcessPool as error:
        executor.shutdown(wait=True)  # the pool stops the other workers; every exit code is known after
        drain()
        raise ChildProcessError(
            _dead_worker_message(output_dir, processes, taken, finished, todo, num_proc)
        ) from error
    except BaseException:
        # Stop at once, as Pool.terminate did: a shard cut short leaves a temporary folder a rerun removes.
        executor.shutdown(wait=False, cancel_futures=True)
        for process in processes.values():
            if process.is_alive():
                process.terminate()
        raise
    finally:
        executor.shutdown(wait=True)


def _exit_reason(exitcode: int | None) -> str:
    if exitcode is None or exitcode >= 0:
        return f"exit code {exitcode}"
    try:
        name = signal.Signals(-exitcode).name
    except ValueError:
        name = f"signal {-exitcode}"
    hint = {
        "SIGKILL": ", as the out-of-memory killer kills",
        "SIGSEGV": ": a crash in native code (an image decoder?)",
    }
    return f"killed by {name}{hint.get(name, '')}"


def _dead_worker_message(
    output_dir: Path,
    processes: dict[int, Any],
    taken: dict[int, int],
    finished: set[int],
    todo: list[int],
    num_proc: int,
) -> str:
    """Names the shards whose worker died, how it died, and that a rerun resumes."""
    # The pool stops its other workers with SIGTERM once one has died.
    dead = {
        pid: process.exitcode for pid, process in processes.items() if process.exitcode not in (None, -signal.SIGTERM)
    }
    running = {pid: shard for pid, shard in taken.items() if shard not in finished}
    culprits = {pid: running[pid] for pid in dead if pid in running}
    if culprits:
        what = "; ".join(
            f"{_shard_dir(output_dir, shard).name} ({_exit_reason(dead[pid])})" for pid, shard in culprits.items()
        )
        what = f"a worker process died while extracting {what}"
    elif dead:  # before it took a shard: while loading the extractor, whose error it printed
        what = (
            f"a worker process ended before taking a shard ({_exit_reason(next(iter(dead.values())))}; the error it "
            "printed, if any, is above)"
        )
    elif running:  # its exit code is not known: every shard that was being extracted
        names = ", ".join(_shard_dir(output_dir, shard).name for shard in sorted(running.values()))
        what = f"a worker process died while extracting one of {names}"
    else:
        what = "a worker process died"
    left = len([shard for shard in todo if shard not in finished])
    hint = (
        " A worker that dies again on the same shard points at one of its images or at memory: num_proc=1 shows the "
        "error in the process itself, and fewer workers need less memory."
        if culprits or running
        else ""
    )
    return (
        f"{what}, and extract_regions(num_proc={num_proc}) stopped with {left} of its {len(todo)} shards in "
        f"{output_dir} unfinished. The finished shards are kept: rerun with the same arguments to resume.{hint}"
    )


def extract_regions(
    source: str | os.PathLike | Any,
    output_dir: str | os.PathLike,
    extractor=None,
    *,
    image_root: str | os.PathLike | None = None,
    allow_outside_root: bool = False,
    use_boxes: bool = False,
    image_column: str = "image",
    key_column: str | None = None,
    boxes_column: str | None = None,
    box_format: str = "xyxy",
    shard_size: int = 512,
    num_proc: int = 1,
    batch_size: int | None = None,
    store_class_probs: bool = True,
    storage_dtype: str = "float16",
    num_shards: int = 1,
    shard_index: int = 0,
    progress: bool = True,
    max_shards: int | None = None,
) -> CacheReport:
    """Extracts the regions of every image of `source` into a region cache at `output_dir`.

    Across devices and machines: started by `torchrun` or `accelerate launch`, process `k` of a machine runs on
    device `k` (`cuda:LOCAL_RANK`) and takes its share of the shards; with `num_shards` / `shard_index`, each
    machine takes a deterministic share (see `shards_of`). All processes may write into one `output_dir` on a shared
    filesystem (the cache completes when its last shard lands), or each machine into its own folder, joined by
    `merge_region_caches`; either way the cache equals that of a single-machine run.

    Args:
        source: A jsonl manifest path (the layout of `formats.manifest`) or a `datasets.Dataset`
            whose `image_column` holds paths, `Image()` values or `{"bytes", "path"}` dicts.
        output_dir: The cache folder; an unfinished cache there is resumed.
        extractor: An `ImageBERTRoIExtractor`, a folder saved from one, or None for the offline default.
        image_root: Folder the manifest's image paths are relative to (the manifest's folder by default).
        allow_outside_root: Follow manifest image paths that leave `image_root` (absolute, or `../`).
        use_boxes: Use the manifest's object boxes as regions (else the extractor's own: grid or detections).
        image_column: Dataset column of the images.
        key_column: Dataset column giving each row's key (default: the image path, else `row-<index>`).
        boxes_column: Dataset column of per-image boxes in `box_format`.
        box_format: `"xyxy"` or `"xywh"` for `boxes_column`.
        shard_size: Distinct images per shard (the unit of resumption and of parallel work).
        num_proc: Worker processes on this machine (each loads the saved extractor, takes whole shards and, with
            GPUs, one GPU: worker k uses `cuda:k`).
        batch_size: Images per extractor forward (the extractor's `batch_size` by default).
        store_class_probs: Keep `region_class_probs` (regions x classes floats per image; MOC's KL variant).
        storage_dtype: `"float16"` (half the disk and page cache; features and class distributions lose nothing a
            model trained in mixed precision would see) or `"float32"`. Boxes and locations stay float32.
        num_shards: Machines the work is split across.
        shard_index: This machine's part, `0 <= shard_index < num_shards`.
        progress: Show a tqdm progress bar.
        max_shards: Stop after computing this many shards in this call (a partial run, resumed by the next).

    Returns:
        A `CacheReport` of this process's work (failures and counts of every shard finished so far); the same
        numbers are in `output_dir/report.json`.

    Raises:
        ValueError: When `output_dir` holds a cache of another source (the first key reading another image is
            named), extractor (settings or weights) or storage dtype, or another process started it meanwhile with
            other settings; when a key names two different images (or boxes), is not valid UTF-8, or a row's boxes
            are malformed; when `source` is a `DatasetDict` (pass one split); when the extractor's
            `region_location_size` is not 5 (the cache stores 5-d locations). A `RegionCacheError` (a `ValueError`)
            names a damaged `cache_info.json` or shard report, or a shard written for another plan.
        ChildProcessError: When one of the `num_proc` worker processes died (killed by the out-of-memory killer, a
            crash in native code), naming the shard it was extracting; the finished shards are kept for a rerun.
    """
    from tqdm.auto import tqdm

    # "~" as datasets and fsspec read it, so that every file of the cache lands in one folder.
    source, output_dir, image_root, extractor = (
        os.path.expanduser(value) if isinstance(value, (str, os.PathLike)) else value
        for value in (source, output_dir, image_root, extractor)
    )
    _check_extract_arguments(
        source,
        output_dir,
        image_root=image_root,
        storage_dtype=storage_dtype,
        box_format=box_format,
        shard_size=shard_size,
        num_proc=num_proc,
        num_shards=num_shards,
        shard_index=shard_index,
        batch_size=batch_size,
        max_shards=max_shards,
    )
    started = time.perf_counter()
    output_dir = Path(output_dir)
    extractor = _resolve_extractor(extractor)
    location_size = getattr(extractor, "region_location_size", 5)
    if location_size != 5:
        raise ValueError(
            f"the extractor's region_location_size is {location_size!r}, but a region cache stores 5-d locations "
            "(x1/W, y1/H, x2/W, y2/H, area); extract with region_location_size=5 (boxes and image sizes are stored: "
            "box_locations(boxes, width, height, 7) gives 7-d ones)."
        )
    rank, world, local_rank = launch_process()
    split_rank, split_world = _split_process(num_shards, rank, world, local_rank)
    _check_worker_class(extractor, num_proc)
    _place_on_launch_device(extractor, world, local_rank)
    if isinstance(source, (str, os.PathLike)):
        items = _manifest_items(source, image_root, use_boxes, allow_outside_root)
    else:
        items = _dataset_items(source, image_column, key_column, boxes_column, box_format)
    if not items:  # refused before output_dir is touched: an empty cache is never what was asked for
        named = f"manifest {source}" if isinstance(source, (str, os.PathLike)) else "the dataset"
        raise ValueError(f"{named} lists no images: nothing to extract.")
    _check_keys(items)
    output_existed = output_dir.is_dir()
    hashes = share_content_hashes(items, output_dir, extractor.max_file_bytes, split_rank, split_world, progress)
    try:
        by_key = getattr(extractor, "backend", None) == "precomputed"
        units, index = _plan(items, extractor.max_file_bytes, by_key=by_key)
        shards = [units[i : i + shard_size] for i in range(0, len(units), shard_size)]
        fingerprint = _open_cache(
            output_dir,
            extractor,
            units,
            index,
            shards,
            store_class_probs=store_class_probs,
            shard_size=shard_size,
            storage_dtype=storage_dtype,
        )
    except ValueError:
        # A refused source or folder: the image hashes this call left (in a folder it made) go with it.
        _remove_new_plan(output_dir, hashes, output_existed)
        raise

    mine = shards_of(len(shards), num_shards, shard_index, split_rank, split_world)
    _remove_stale_tmp(output_dir, mine)
    _recompute_unfinished_shards(output_dir, mine)
    todo = [shard for shard in mine if not _shard_dir(output_dir, shard).is_dir()]
    skipped = len(mine) - len(todo)
    if max_shards is not None:
        todo = todo[:max_shards]
    bar = tqdm(
        total=sum(len(shards[s]) for s in todo),
        desc="extracting regions" + (f" (process {rank}/{world})" if world > 1 else ""),
        unit="img",
        disable=not progress,
    )
    settings = _ShardSettings(
        batch_size or extractor.batch_size, store_class_probs, storage_dtype, len(shards), fingerprint
    )
    try:
        _run_shards(extractor, output_dir, shards, todo, bar.update, num_proc, settings)
    finally:
        bar.close()

    report = CacheReport(
        output_dir=str(output_dir),
        num_items=len(items),
        num_unique=len(units),
        num_duplicates=len(items) - len(units),
        num_shards=len(shards),
        num_shards_skipped=skipped,
    )
    report = _finish_cache(output_dir, report, len(shards), started)
    if report.num_failed:
        logger.warning(
            "%d of %d images failed; reasons in %s", report.num_failed, len(units), output_dir / REPORT_NAME
        )
    return report


def merge_region_caches(parts: Sequence[str | os.PathLike], output_dir: str | os.PathLike) -> CacheReport:
    """Joins the folders that machines of one split run (`num_shards` / `shard_index`) wrote into one cache.

    Every part must come from the same source, extractor and settings (the same fingerprint); the shards are copied
    (hard-linked where the filesystem allows) into `output_dir`, which then equals a single-machine run's cache.
    Every part is checked before anything is written.

    Raises:
        ValueError: When the parts are of different caches, together miss shards, or a part is damaged (its
            `cache_info.json` or `index.jsonl`, or a shard folder without its report or data files, or written for
            another plan), naming the file or folder.
    """
    started = time.perf_counter()
    parts = [Path(part).expanduser() for part in parts]
    output_dir = Path(output_dir).expanduser()
    infos = [read_cache_info(part) for part in parts]
    fingerprints = {info["fingerprint"] for info in infos}
    if len(fingerprints) != 1:
        raise ValueError(
            f"the parts {[str(p) for p in parts]} are of different caches (source, extractor or settings differ, or "
            "the precomputed regions they were read from)."
        )
    (fingerprint,) = fingerprints
    extractor_dir = _part_extractor(parts, infos[0])
    for part in parts:
        if not (part / INDEX_NAME).is_file():
            raise RegionCacheError(
                f"the part {part} has no {INDEX_NAME} (a folder copied in part?); copy it again from the machine "
                "that wrote it, or rerun that machine's extraction."
            )
    first_index = (parts[0] / INDEX_NAME).read_text(encoding="utf-8")
    for part, part_info in zip(parts[1:], infos[1:]):
        # The fingerprint covers the images, not their keys: parts of one run share their index too.
        if part_info.get("index") is not None and part_info.get("index") == infos[0].get("index"):
            continue
        part_index = (part / INDEX_NAME).read_text(encoding="utf-8")
        if part_index != first_index:
            raise ValueError(
                f"the parts {parts[0]} and {part} key their images differently: "
                f"{_first_index_difference(first_index.splitlines(), part_index.splitlines())}; merge the parts of "
                "one run (one source) only."
            )
    info = dict(infos[0], complete=False)
    info.pop("lookup", None)  # a complete part's key table is not the merged cache's file
    num_shards = info["num_shards"]
    if (output_dir / CACHE_INFO_NAME).is_file() and read_cache_info(output_dir)["fingerprint"] != fingerprint:
        raise ValueError(f"{output_dir} holds another region cache; merge into a new folder.")
    # Where each shard comes from, every shard folder of every part checked before anything is written.
    sources: dict[int, Path] = {}
    for folder in (output_dir, *parts):  # shards of an earlier, interrupted merge first
        for shard in range(num_shards):
            shard_folder = _shard_dir(folder, shard)
            if not shard_folder.is_dir():
                continue
            shard_report = _finished_shard_report(shard_folder)
            if shard_report is None:
                raise RegionCacheError(
                    f"{folder} holds an unfinished shard folder {shard_folder} (no {SHARD_REPORT_NAME}, or without "
                    "the data files it lists: a copy cut short?); copy it again from the machine that wrote it, or "
                    "delete it and rerun that machine's extraction."
                )
            _check_shard_fingerprint(shard_folder, shard_report, fingerprint)
            sources.setdefault(shard, shard_folder)
    missing = [shard for shard in range(num_shards) if shard not in sources]
    if missing:
        raise ValueError(
            f"the parts hold {num_shards - len(missing)} of {num_shards} shards (missing e.g. "
            f"shard {missing[0]}); run the missing shard_index values first."
        )
    output_dir.mkdir(parents=True, exist_ok=True)
    _place_extractor(output_dir, lambda folder: shutil.copytree(extractor_dir, folder), info)
    atomic_write_bytes(output_dir / INDEX_NAME, (parts[0] / INDEX_NAME).read_bytes())
    if not (output_dir / CACHE_INFO_NAME).is_file():
        atomic_write_json(output_dir / CACHE_INFO_NAME, info, indent=2, default=str)
    (output_dir / SHARDS_DIR).mkdir(exist_ok=True)
    # Copies a killed merge left: the merge owns its output folder, and nothing else writes shards there.
    for stale in (output_dir / SHARDS_DIR).glob("shard-*.tmp-*"):
        _remove_path(stale)
    for shard, source in sources.items():
        target = _shard_dir(output_dir, shard)
        if not target.exists() and source.resolve() != target.resolve():
            # Unique: a rerun in a container may get the pid of the merge that was killed.
            tmp = target.with_name(f"{target.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
            shutil.copytree(source, tmp, copy_function=_link_or_copy)
            publish_folder(tmp, target, replace=False)
    report = CacheReport(output_dir=str(output_dir), num_shards=num_shards)
    with open(output_dir / INDEX_NAME, encoding="utf-8") as handle:
        report.num_items = sum(1 for _ in handle)
    report.num_unique = sum(_shard_report(_shard_dir(output_dir, s))["rows"] for s in range(num_shards))
    report.num_duplicates = report.num_items - report.num_unique
    return _finish_cache(output_dir, report, num_shards, started)


def _part_extractor(parts: list[Path], info: dict[str, Any]) -> Path:
    """The parts' `extractor/` folder that the merged cache's readers will load: the first that is the extractor
    `info` records, passing over copies cut short or edited; else (none can be confirmed, as for an extractor whose
    saved file does not record its settings) the first there is, with a warning."""
    folders = [part / EXTRACTOR_DIR for part in parts if (part / EXTRACTOR_DIR).is_dir()]
    if not folders:
        raise RegionCacheError(
            f"no part holds its {EXTRACTOR_DIR}/ folder (copied in part?); copy one again from a machine that wrote it."
        )
    confirmed = next((folder for folder in folders if _saved_extractor_matches(folder, info)), None)
    if confirmed is None:
        logger.warning(
            "no part's %s/ folder could be confirmed as the extractor %s records (cut short, edited, or saved "
            "without its settings); the merged cache gets the copy in %s",
            EXTRACTOR_DIR,
            CACHE_INFO_NAME,
            folders[0].parent,
        )
    return confirmed or folders[0]


def _link_or_copy(source: str, target: str) -> None:
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


__all__ = [
    "CacheReport",
    "dataset_row_key",
    "extract_regions",
    "launch_process",
    "merge_region_caches",
    "shards_of",
]
