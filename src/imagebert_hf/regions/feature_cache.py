"""The region feature cache: run the RoI extractor once over a dataset and keep its regions as Arrow shards.

Layout of a cache folder:

```
cache/
  cache_info.json      # extractor settings, sizes, plan fingerprint, counts; "complete": true when done
  index.jsonl          # one line per source item: {"key": ..., "cache_key": ..., "shard": ...}
  extractor/           # the extractor that made the regions (save_pretrained, weights included)
  shards/shard-00000/  # a datasets.Dataset (save_to_disk) of region records, one row per distinct image
  report.json          # counts and every failure with its reason
```

Items are keyed by their manifest path (or a dataset column) and deduplicated by content: the sha1 of the image
bytes (with a digest of the boxes when boxes are given), so an image listed twice is extracted once. Each shard is
written under a temporary name and renamed when complete: a rerun after a kill skips the finished shards and gives
the same cache. A bad image becomes a row with its reason in `error` and a line of the report; it never stops the
run. Consumers read regions with `load_region_cache(path)[key]`.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from transformers.utils import logging

from ..models.imagebert.roi_image_loading import ImageLoadError, image_content_hash


logger = logging.get_logger(__name__)

CACHE_INFO_NAME = "cache_info.json"
INDEX_NAME = "index.jsonl"
REPORT_NAME = "report.json"
EXTRACTOR_DIR = "extractor"
SHARDS_DIR = "shards"
SHARD_REPORT_NAME = "shard_report.json"
CACHE_FORMAT_VERSION = 1


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


def _manifest_items(path: str | os.PathLike, image_root, use_boxes: bool) -> list[dict[str, Any]]:
    from ..data.manifest import iter_manifest

    return [
        {
            "key": record.image,
            "image": str(record.image_path),
            "boxes": np.asarray(record.boxes, dtype=np.float32).reshape(-1, 4) if use_boxes and record.boxes else None,
        }
        for record in iter_manifest(path, image_root)
    ]


def _dataset_items(dataset, image_column: str, key_column: str | None, boxes_column: str | None, box_format: str):
    from datasets import Image as ImageFeature

    from ..models.imagebert.roi_boxes import as_boxes

    if isinstance(dataset.features.get(image_column), ImageFeature):
        # Undecoded, the column gives the file bytes: hashed as they are, decoded once by the extractor.
        dataset = dataset.cast_column(image_column, ImageFeature(decode=False))
    columns = [c for c in (image_column, key_column, boxes_column) if c]
    items = []
    for row_index, row in enumerate(dataset.select_columns(columns)):
        image = row[image_column]
        if key_column:
            key = str(row[key_column])
        elif isinstance(image, str):
            key = image
        elif isinstance(image, dict) and image.get("path"):
            key = str(image["path"])
        else:
            key = f"row-{row_index}"
        boxes = row[boxes_column] if boxes_column else None
        boxes = as_boxes(boxes, box_format) if boxes is not None and len(boxes) else None
        items.append({"key": key, "image": image, "boxes": boxes})
    return items


def _plan(items: list[dict[str, Any]], max_file_bytes: int) -> tuple[list[dict[str, Any]], list[tuple[str, str]]]:
    """Deduplicates items into units (one per distinct image and boxes); returns units and (key, cache_key)."""
    units: dict[str, dict[str, Any]] = {}
    index: list[tuple[str, str]] = []
    for item in items:
        try:
            content = image_content_hash(item["image"], max_file_bytes)
        except ImageLoadError:
            # Unreadable: its own unit, so the worker records the reason in the error column.
            content = "unreadable-" + hashlib.sha1(item["key"].encode()).hexdigest()
        cache_key = content
        if item["boxes"] is not None:
            cache_key += (
                "-" + hashlib.sha1(np.ascontiguousarray(item["boxes"], dtype=np.float32).tobytes()).hexdigest()[:12]
            )
        if cache_key not in units:
            units[cache_key] = {
                "cache_key": cache_key,
                "image_id": content,
                "key": item["key"],
                "image": item["image"],
                "boxes": item["boxes"],
            }
        index.append((item["key"], cache_key))
    return list(units.values()), index


def _fingerprint(
    units: list[dict[str, Any]], extractor_config: dict[str, Any], store_class_probs: bool, shard_size: int
):
    digest = hashlib.sha1()
    digest.update(json.dumps(extractor_config, sort_keys=True, default=str).encode())
    digest.update(f"{store_class_probs}|{shard_size}".encode())
    for unit in units:
        digest.update(unit["cache_key"].encode() + b"\n")
    return digest.hexdigest()


# ------------------------------------------------------------------------------------------------ shards

_WORKER_EXTRACTOR = None


def _features(feature_size: int, num_classes: int, store_class_probs: bool):
    from datasets import Array2D, Features, Sequence, Value

    features = {
        "cache_key": Value("string"),
        "image_id": Value("string"),
        "source": Value("string"),
        "region_features": Array2D(shape=(None, feature_size), dtype="float32"),
        "region_boxes": Array2D(shape=(None, 4), dtype="float32"),
        "region_locations": Array2D(shape=(None, 5), dtype="float32"),
        "region_class_labels": Sequence(Value("int64")),
    }
    if store_class_probs:
        features["region_class_probs"] = Array2D(shape=(None, max(num_classes, 1)), dtype="float32")
    features.update(
        image_width=Value("int32"), image_height=Value("int32"), num_regions=Value("int32"), error=Value("string")
    )
    return Features(features)


def _shard_dir(output_dir: Path, shard: int) -> Path:
    return output_dir / SHARDS_DIR / f"shard-{shard:05d}"


def _extract_shard(
    extractor,
    units: list[dict[str, Any]],
    shard_path: Path,
    batch_size: int,
    store_class_probs: bool,
    on_batch: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    import datasets
    from datasets import Dataset

    feature_size, num_classes = extractor.region_feature_size, extractor.num_object_classes
    columns: dict[str, list[Any]] = {name: [] for name in _features(feature_size, num_classes, store_class_probs)}
    failures = []
    for start in range(0, len(units), batch_size):
        batch = units[start : start + batch_size]
        images = [unit["image"] for unit in batch]
        boxes = [unit["boxes"] for unit in batch]
        ids = [unit["image_id"] for unit in batch]
        records = extractor.extract(
            images, boxes=boxes, image_ids=ids, on_error="record", return_class_probs=store_class_probs
        )
        for unit, record in zip(batch, records):
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
        if on_batch is not None:
            on_batch(len(batch))
    tmp_path = shard_path.with_name(f"{shard_path.name}.tmp-{os.getpid()}")
    if tmp_path.exists():
        shutil.rmtree(tmp_path)
    shard = Dataset.from_dict(columns, features=_features(feature_size, num_classes, store_class_probs))
    bars_were_on = not datasets.utils.are_progress_bars_disabled()
    datasets.utils.disable_progress_bars()  # one bar per shard would drown the run's own bar
    try:
        shard.save_to_disk(str(tmp_path))
    finally:
        if bars_were_on:
            datasets.utils.enable_progress_bars()
    shard_report = {"rows": len(units), "failures": failures}
    (tmp_path / SHARD_REPORT_NAME).write_text(json.dumps(shard_report))
    # The rename is the commit: a shard folder without the .tmp suffix is always complete.
    os.replace(tmp_path, shard_path)
    return shard_report


def _init_worker(extractor_dir: str, num_threads: int) -> None:
    global _WORKER_EXTRACTOR
    import torch

    from ..models.imagebert.image_processing_imagebert import ImageBERTRoIExtractor

    torch.set_num_threads(max(1, num_threads))
    _WORKER_EXTRACTOR = ImageBERTRoIExtractor.from_pretrained(extractor_dir)


def _worker_task(task: tuple[int, list[dict[str, Any]], str, int, bool]) -> tuple[int, int, dict[str, Any]]:
    shard, units, shard_path, batch_size, store_class_probs = task
    report = _extract_shard(_WORKER_EXTRACTOR, units, Path(shard_path), batch_size, store_class_probs)
    return shard, len(units), report


# ------------------------------------------------------------------------------------------------ entry point


def _resolve_extractor(extractor):
    from ..models.imagebert.image_processing_imagebert import ImageBERTRoIExtractor

    if extractor is None:
        return ImageBERTRoIExtractor()
    if isinstance(extractor, (str, os.PathLike)):
        return ImageBERTRoIExtractor.from_pretrained(extractor)
    return extractor


def extract_regions(
    source: str | os.PathLike | Any,
    output_dir: str | os.PathLike,
    extractor=None,
    *,
    image_root: str | os.PathLike | None = None,
    use_boxes: bool = False,
    image_column: str = "image",
    key_column: str | None = None,
    boxes_column: str | None = None,
    box_format: str = "xyxy",
    shard_size: int = 512,
    num_proc: int = 1,
    batch_size: int | None = None,
    store_class_probs: bool = True,
    progress: bool = True,
    max_shards: int | None = None,
) -> CacheReport:
    """Extracts the regions of every image of `source` into a region cache at `output_dir`.

    Args:
        source: A jsonl manifest path (the `../shared/data` layout, see `data.manifest`) or a `datasets.Dataset`
            whose `image_column` holds paths, `Image()` values or `{"bytes", "path"}` dicts.
        output_dir: The cache folder; an unfinished cache there is resumed.
        extractor: An `ImageBERTRoIExtractor`, a folder saved from one, or None for the offline default.
        image_root: Folder the manifest's image paths are relative to (the manifest's folder by default).
        use_boxes: Use the manifest's object boxes as regions (else the extractor's own: grid or detections).
        image_column: Dataset column of the images.
        key_column: Dataset column giving each row's key (default: the image path, else `row-<index>`).
        boxes_column: Dataset column of per-image boxes in `box_format`.
        box_format: `"xyxy"` or `"xywh"` for `boxes_column`.
        shard_size: Distinct images per shard (the unit of resumption and of parallel work).
        num_proc: Worker processes (each loads the saved extractor and takes whole shards).
        batch_size: Images per extractor forward (the extractor's `batch_size` by default).
        store_class_probs: Keep `region_class_probs` (regions x classes floats per image; MOC's KL variant).
        progress: Show a tqdm progress bar.
        max_shards: Stop after computing this many shards in this call (a partial run, resumed by the next).

    Returns:
        A `CacheReport`; the same numbers are in `output_dir/report.json`.

    Raises:
        ValueError: When `output_dir` holds a cache of another source or extractor.
    """
    from tqdm.auto import tqdm

    started = time.perf_counter()
    output_dir = Path(output_dir)
    extractor = _resolve_extractor(extractor)
    batch_size = batch_size or extractor.batch_size
    if isinstance(source, (str, os.PathLike)):
        items = _manifest_items(source, image_root, use_boxes)
    else:
        items = _dataset_items(source, image_column, key_column, boxes_column, box_format)
    units, index = _plan(items, extractor.max_file_bytes)
    extractor_config = extractor.to_dict()
    fingerprint = _fingerprint(units, extractor_config, store_class_probs, shard_size)
    shards = [units[i : i + shard_size] for i in range(0, len(units), shard_size)]
    shard_of = {unit["cache_key"]: shard for shard, chunk in enumerate(shards) for unit in chunk}

    info_path = output_dir / CACHE_INFO_NAME
    if info_path.is_file():
        previous = json.loads(info_path.read_text())
        if previous.get("fingerprint") != fingerprint:
            raise ValueError(
                f"{output_dir} holds a region cache of another source, extractor or shard size; "
                "use a new output_dir or delete it."
            )
    else:
        output_dir.mkdir(parents=True, exist_ok=True)
        extractor.save_pretrained(output_dir / EXTRACTOR_DIR)
        with open(output_dir / INDEX_NAME, "w", encoding="utf-8") as handle:
            for key, cache_key in index:
                handle.write(json.dumps({"key": key, "cache_key": cache_key, "shard": shard_of[cache_key]}) + "\n")
        info = {
            "format_version": CACHE_FORMAT_VERSION,
            "fingerprint": fingerprint,
            "complete": False,
            "region_feature_size": extractor.region_feature_size,
            "num_object_classes": extractor.num_object_classes,
            "store_class_probs": store_class_probs,
            "shard_size": shard_size,
            "num_shards": len(shards),
            "extractor": extractor_config,
        }
        info_path.write_text(json.dumps(info, indent=2, default=str))
    (output_dir / SHARDS_DIR).mkdir(exist_ok=True)
    for stale in (output_dir / SHARDS_DIR).glob("*.tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)

    todo = [shard for shard in range(len(shards)) if not _shard_dir(output_dir, shard).is_dir()]
    skipped = len(shards) - len(todo)
    if max_shards is not None:
        todo = todo[:max_shards]
    bar = tqdm(total=sum(len(shards[s]) for s in todo), desc="extracting regions", unit="img", disable=not progress)
    try:
        if num_proc > 1 and len(todo) > 1:
            import multiprocessing

            # Spawned workers: forking a process whose torch already ran OpenMP threads can deadlock.
            context = multiprocessing.get_context("spawn")
            threads = max(1, (os.cpu_count() or 1) // num_proc)
            tasks = [
                (shard, shards[shard], str(_shard_dir(output_dir, shard)), batch_size, store_class_probs)
                for shard in todo
            ]
            with context.Pool(
                min(num_proc, len(todo)), initializer=_init_worker, initargs=(str(output_dir / EXTRACTOR_DIR), threads)
            ) as pool:
                for _, count, _ in pool.imap_unordered(_worker_task, tasks):
                    bar.update(count)
        else:
            for shard in todo:
                _extract_shard(
                    extractor, shards[shard], _shard_dir(output_dir, shard), batch_size, store_class_probs, bar.update
                )
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
    finished = [shard for shard in range(len(shards)) if _shard_dir(output_dir, shard).is_dir()]
    for shard in finished:
        shard_report = json.loads((_shard_dir(output_dir, shard) / SHARD_REPORT_NAME).read_text())
        report.failures.extend(shard_report["failures"])
    report.num_failed = len(report.failures)
    report.num_extracted = sum(len(shards[s]) for s in finished) - report.num_failed
    report.seconds = round(time.perf_counter() - started, 3)
    if len(finished) == len(shards):
        info = json.loads(info_path.read_text())
        info["complete"] = True
        info_path.write_text(json.dumps(info, indent=2, default=str))
    (output_dir / REPORT_NAME).write_text(json.dumps(asdict(report), indent=2))
    if report.num_failed:
        logger.warning(
            "%d of %d images failed; reasons in %s", report.num_failed, len(units), output_dir / REPORT_NAME
        )
    return report


# ------------------------------------------------------------------------------------------------ reading


def load_region_dataset(path: str | os.PathLike):
    """The cache's region records as one `datasets.Dataset` (all shards, in order; memory-mapped)."""
    from datasets import concatenate_datasets, load_from_disk

    path = Path(path)
    info = json.loads((path / CACHE_INFO_NAME).read_text())
    shards = [_shard_dir(path, shard) for shard in range(info["num_shards"])]
    missing = [s.name for s in shards if not s.is_dir()]
    if missing:
        raise ValueError(f"region cache {path} is incomplete ({len(missing)} shards missing); rerun extract_regions.")
    if not shards:
        raise ValueError(f"region cache {path} is empty.")
    return concatenate_datasets([load_from_disk(str(s)) for s in shards])


class RegionCache:
    """Region records by key: the manifest path (or dataset key) of an item, its `cache_key`, or its content hash
    (`image_id`).

    `cache[key]` returns the region record (numpy arrays: `region_features` (R, F), `region_boxes` (R, 4),
    `region_locations` (R, 5), `region_class_labels` (R,), `region_class_probs` (R, C) when stored; ints
    `image_width`, `image_height`, `num_regions`; `image_id`, `cache_key`, `source`, `error`). An image that
    failed raises KeyError with its reason; `errors` lists them. `keys()` are the item keys with regions.

    Args:
        path: The cache folder written by `extract_regions`.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.info = json.loads((self.path / CACHE_INFO_NAME).read_text())
        self.dataset = load_region_dataset(self.path)
        self._rows = self.dataset.with_format("numpy")
        small = self.dataset.select_columns(["cache_key", "image_id", "error", "num_regions"])
        self._num_regions = np.asarray(small["num_regions"], dtype=np.int64)
        self._row_of: dict[str, int] = {}
        self._failed: dict[str, str] = {}
        for row, (cache_key, image_id, error) in enumerate(zip(small["cache_key"], small["image_id"], small["error"])):
            self._row_of[cache_key] = row
            self._row_of.setdefault(image_id, row)
            if error:
                self._failed[cache_key] = error
        self._key_to_cache: dict[str, str] = {}
        with open(self.path / INDEX_NAME, encoding="utf-8") as handle:
            for line in handle:
                entry = json.loads(line)
                self._key_to_cache.setdefault(entry["key"], entry["cache_key"])
        #: Item key -> why its image has no regions.
        self.errors: dict[str, str] = {
            key: self._failed[cache_key] for key, cache_key in self._key_to_cache.items() if cache_key in self._failed
        }

    def _row(self, key: str) -> int:
        cache_key = self._key_to_cache.get(key, key)
        if cache_key not in self._row_of:
            raise KeyError(f"{key!r} is not in the region cache {self.path}")
        if cache_key in self._failed:
            raise KeyError(f"{key!r} has no regions: {self._failed[cache_key]}")
        return self._row_of[cache_key]

    def __getitem__(self, key: str) -> dict[str, Any]:
        row = self._rows[self._row(key)]
        feature_size = self.info["region_feature_size"]
        record = {
            "image_id": str(row["image_id"]),
            "cache_key": str(row["cache_key"]),
            "source": str(row["source"]),
            "region_features": np.asarray(row["region_features"], dtype=np.float32).reshape(-1, feature_size),
            "region_boxes": np.asarray(row["region_boxes"], dtype=np.float32).reshape(-1, 4),
            "region_locations": np.asarray(row["region_locations"], dtype=np.float32).reshape(-1, 5),
            "region_class_labels": np.asarray(row["region_class_labels"], dtype=np.int64).reshape(-1),
            "image_width": int(row["image_width"]),
            "image_height": int(row["image_height"]),
            "num_regions": int(row["num_regions"]),
            "error": None,
        }
        if "region_class_probs" in row:
            count = record["num_regions"]
            record["region_class_probs"] = np.asarray(row["region_class_probs"], dtype=np.float32).reshape(count, -1)
        return record

    def num_regions(self, key: str) -> int:
        """How many regions `key` has, read from one small column (no features are decoded)."""
        return int(self._num_regions[self._row(key)])

    def __contains__(self, key: object) -> bool:
        try:
            self._row(str(key))
        except KeyError:
            return False
        return True

    def get(self, key: str, default: Any = None) -> dict[str, Any] | Any:
        try:
            return self[key]
        except KeyError:
            return default

    def keys(self) -> list[str]:
        """Item keys (manifest paths or dataset keys) that have regions, in source order."""
        return [key for key, cache_key in self._key_to_cache.items() if cache_key not in self._failed]

    def __len__(self) -> int:
        return len(self.keys())

    def __iter__(self):
        return iter(self.keys())

    def records(self, keys: Iterable[str]) -> list[dict[str, Any]]:
        """The records of several keys, e.g. for `ImageBERTProcessor(regions=...)`."""
        return [self[key] for key in keys]


def load_region_cache(path: str | os.PathLike) -> RegionCache:
    """Opens a region cache written by `extract_regions` for lookups by key (see `RegionCache`)."""
    return RegionCache(path)


# ------------------------------------------------------------------------------------------------ command line


@dataclass
class ExtractRegionsArguments:
    """Arguments of `imagebert-extract-regions`."""

    output_dir: str = field(metadata={"help": "Folder of the region cache (an unfinished one is resumed)."})
    manifest: str | None = field(
        default=None, metadata={"help": "A jsonl manifest (one image per line, as in ../shared/data)."}
    )
    dataset_path: str | None = field(
        default=None, metadata={"help": "A datasets folder saved with save_to_disk, instead of a manifest."}
    )
    image_root: str | None = field(
        default=None, metadata={"help": "Folder the manifest's image paths are relative to (its own by default)."}
    )
    image_column: str = field(default="image", metadata={"help": "Dataset column of the images."})
    key_column: str | None = field(default=None, metadata={"help": "Dataset column naming each row."})
    use_boxes: bool = field(
        default=False, metadata={"help": "Pool over the manifest's object boxes instead of the extractor's regions."}
    )
    extractor: str | None = field(
        default=None,
        metadata={"help": "A saved ImageBERTRoIExtractor folder; the offline EfficientNet-Lite0 default if unset."},
    )
    max_regions: int = field(default=100, metadata={"help": "Most regions per image (for the default extractor)."})
    shard_size: int = field(default=512, metadata={"help": "Distinct images per shard."})
    num_proc: int = field(default=1, metadata={"help": "Worker processes."})
    batch_size: int = field(default=8, metadata={"help": "Images per extractor forward."})
    no_class_probs: bool = field(
        default=False, metadata={"help": "Do not store region class distributions (smaller cache)."}
    )


def main(argv: Sequence[str] | None = None) -> CacheReport:
    """`imagebert-extract-regions --output_dir cache --manifest data/captions.jsonl [--num_proc 2]`."""
    from transformers import HfArgumentParser

    from ..models.imagebert.image_processing_imagebert import ImageBERTRoIExtractor

    (args,) = HfArgumentParser(ExtractRegionsArguments).parse_args_into_dataclasses(args=argv)
    if (args.manifest is None) == (args.dataset_path is None):
        raise SystemExit("give exactly one of --manifest and --dataset_path")
    if args.dataset_path is not None:
        from datasets import load_from_disk

        source = load_from_disk(args.dataset_path)
    else:
        source = args.manifest
    extractor = args.extractor or ImageBERTRoIExtractor(max_regions=args.max_regions)
    report = extract_regions(
        source,
        args.output_dir,
        extractor,
        image_root=args.image_root,
        use_boxes=args.use_boxes,
        image_column=args.image_column,
        key_column=args.key_column,
        shard_size=args.shard_size,
        num_proc=args.num_proc,
        batch_size=args.batch_size,
        store_class_probs=not args.no_class_probs,
    )
    print(
        f"{report.num_items} items, {report.num_unique} distinct images, {report.num_extracted} extracted, "
        f"{report.num_failed} failed, {report.num_shards_skipped} shards reused; report: "
        f"{Path(args.output_dir) / REPORT_NAME}"
    )
    return report


if __name__ == "__main__":
    main()
