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

from ..formats.files import (
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
    atomic_writer,
    file_checksum,
    publish_folder,
)
from ..formats.manifest import iter_manifest
from ..models.imagebert.image_processing_imagebert import ImageBERTRoIExtractor, extract_in_batches
from ..models.imagebert.region_batching import RegionRecord, as_feature_tensor, pad_region_records
from ..models.imagebert.roi_boxes import as_boxes
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


def _manifest_items(
    path: str | os.PathLike, image_root, use_boxes: bool, allow_outside_root: bool = False
) -> list[dict[str, Any]]:
    return [
        {
            "key": record.image,
            "image": str(record.image_path),
            "boxes": np.asarray(record.boxes, dtype=np.float32).reshape(-1, 4) if use_boxes and record.boxes else None,
        }
        for record in iter_manifest(path, image_root, allow_outside_root)
    ]


def _dataset_items(dataset, image_column: str, key_column: str | None, boxes_column: str | None, box_format: str):
    from datasets import Image as ImageFeature

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
    units: list[dict[str, Any]],
    extractor_config: dict[str, Any],
    store_class_probs: bool,
    shard_size: int,
    storage_dtype: str = "float32",
):
    digest = hashlib.sha1()
    # The device is where a process runs, not what it computes: every device of a run shares one cache.
    digest.update(json.dumps({**extractor_config, "device": None}, sort_keys=True, default=str).encode())
    # float32 caches, written before the storage dtype was a setting, keep their fingerprint.
    digest.update(
        f"{store_class_probs}|{shard_size}{'' if storage_dtype == 'float32' else '|' + storage_dtype}".encode()
    )
    for unit in units:
        digest.update(unit["cache_key"].encode() + b"\n")
    return digest.hexdigest()


# ------------------------------------------------------------------------------------------------ shards


def _check_positive(name: str, value, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer{' or None' if allow_none else ''}, got {value!r}.")


_WORKER_EXTRACTOR = None


STORAGE_DTYPES = ("float16", "float32")


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


def _shard_dir(output_dir: Path, shard: int) -> Path:
    return output_dir / SHARDS_DIR / f"shard-{shard:05d}"


def _extract_shard(
    extractor,
    units: list[dict[str, Any]],
    shard_path: Path,
    batch_size: int,
    store_class_probs: bool,
    on_batch: Callable[[int], None] | None = None,
    storage_dtype: str = "float32",
) -> dict[str, Any]:
    import datasets
    from datasets import Dataset

    feature_size, num_classes = extractor.region_feature_size, extractor.num_object_classes
    features = _features(feature_size, num_classes, store_class_probs, storage_dtype)
    columns: dict[str, list[Any]] = {name: [] for name in features}
    failures = []
    stream = extract_in_batches(
        extractor,
        [unit["image"] for unit in units],
        batch_size,
        boxes=[unit["boxes"] for unit in units],
        image_ids=[unit["image_id"] for unit in units],
        on_error="record",
        return_class_probs=store_class_probs,
    )
    for start, records in zip(range(0, len(units), batch_size), stream):
        batch = units[start : start + batch_size]
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
        "first_cache_key": units[0]["cache_key"] if units else None,
        "last_cache_key": units[-1]["cache_key"] if units else None,
        "files": {file.name: file_checksum(file) for file in sorted(tmp_path.glob("data-*.arrow"))},
    }
    atomic_write_json(tmp_path / SHARD_REPORT_NAME, shard_report)
    # The rename is the commit: a shard folder without the .tmp suffix is always complete.
    publish_folder(tmp_path, shard_path, replace=False)
    return shard_report


def _init_worker(extractor_dir: str, num_threads: int, devices) -> None:
    global _WORKER_EXTRACTOR
    import torch

    torch.set_num_threads(max(1, num_threads))
    # Worker k takes the k-th device from the queue, so N workers on N GPUs use one GPU each.
    device = devices.get() if devices is not None else None
    _WORKER_EXTRACTOR = ImageBERTRoIExtractor.from_pretrained(extractor_dir, device=device)


def _worker_task(task: tuple[int, list[dict[str, Any]], str, int, bool, str]) -> tuple[int, int, dict[str, Any]]:
    shard, units, shard_path, batch_size, store_class_probs, storage_dtype = task
    report = _extract_shard(
        _WORKER_EXTRACTOR, units, Path(shard_path), batch_size, store_class_probs, storage_dtype=storage_dtype
    )
    return shard, len(units), report


# ------------------------------------------------------------------------------------------------ entry point


def _resolve_extractor(extractor):
    if extractor is None:
        return ImageBERTRoIExtractor()
    if isinstance(extractor, (str, os.PathLike)):
        return ImageBERTRoIExtractor.from_pretrained(extractor)
    return extractor


def launch_process() -> tuple[int, int, int]:
    """`(rank, world_size, local_rank)` of this process as `torchrun` / `accelerate launch` set them ((0, 1, 0) alone)."""
    rank = int(os.environ.get("RANK", 0))
    world = int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    return rank, world, local_rank


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


def _start_cache(output_dir: Path, extractor, index, shard_of, info: dict[str, Any]) -> None:
    """Writes the extractor, `index.jsonl` and `cache_info.json` of a new cache; safe when several processes or
    machines start the same cache at once (each writes identical files and renames them into place)."""
    output_dir.mkdir(parents=True, exist_ok=True)
    if not (output_dir / EXTRACTOR_DIR).is_dir():
        tmp = output_dir / f".{EXTRACTOR_DIR}.tmp-{os.getpid()}"
        extractor.save_pretrained(tmp)
        try:
            publish_folder(tmp, output_dir / EXTRACTOR_DIR, replace=False)
        except OSError:  # another process published it first
            shutil.rmtree(tmp, ignore_errors=True)
    lines = "".join(json.dumps({"key": key, "cache_key": ck, "shard": shard_of[ck]}) + "\n" for key, ck in index)
    atomic_write_text(output_dir / INDEX_NAME, lines)
    data = lines.encode("utf-8")
    info = {**info, "index": {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}}
    atomic_write_json(output_dir / CACHE_INFO_NAME, info, indent=2, default=str)


def _finish_cache(output_dir: Path, report: CacheReport, num_shards: int, started: float | None = None) -> CacheReport:
    """Counts every finished shard into `report`; once all are there, marks the cache complete and builds its
    key table. Run by whichever process finishes last (running it twice writes the same files). With `started`
    (a `time.perf_counter()` value), `report.seconds` is the wall time since then, in `report.json` too."""
    finished = [shard for shard in range(num_shards) if _shard_dir(output_dir, shard).is_dir()]
    rows = 0
    report.failures = []
    for shard in finished:
        shard_report = json.loads((_shard_dir(output_dir, shard) / SHARD_REPORT_NAME).read_text())
        report.failures.extend(shard_report["failures"])
        rows += shard_report["rows"]
    report.num_failed = len(report.failures)
    report.num_extracted = rows - report.num_failed
    if len(finished) == num_shards:
        info = json.loads((output_dir / CACHE_INFO_NAME).read_text())
        if not info.get("complete"):
            RegionCache(output_dir)  # builds lookup.arrow from the shards and the index
            info["complete"] = True
            atomic_write_json(output_dir / CACHE_INFO_NAME, info, indent=2, default=str)
    if started is not None:
        report.seconds = round(time.perf_counter() - started, 3)
    atomic_write_json(output_dir / REPORT_NAME, asdict(report), indent=2)
    return report


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
        source: A jsonl manifest path (the `../shared/data` layout, see `formats.manifest`) or a `datasets.Dataset`
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
        ValueError: When `output_dir` holds a cache of another source, extractor or storage dtype.
    """
    from tqdm.auto import tqdm

    if storage_dtype not in STORAGE_DTYPES:
        raise ValueError(f"storage_dtype must be one of {STORAGE_DTYPES}, got {storage_dtype!r}.")
    for name, value in (("shard_size", shard_size), ("num_proc", num_proc), ("num_shards", num_shards)):
        _check_positive(name, value)
    _check_positive("batch_size", batch_size, allow_none=True)
    _check_positive("max_shards", max_shards, allow_none=True)
    if box_format not in ("xyxy", "xywh"):
        raise ValueError(f"box_format must be 'xyxy' or 'xywh', got {box_format!r}.")
    if isinstance(source, (str, os.PathLike)) and not Path(source).is_file():
        raise FileNotFoundError(f"source {source} does not exist (expected a jsonl manifest or a datasets.Dataset).")
    output_dir = Path(output_dir)
    if output_dir.exists() and not output_dir.is_dir():
        raise NotADirectoryError(f"output_dir {output_dir} exists and is not a folder.")
    started = time.perf_counter()
    output_dir = Path(output_dir)
    extractor = _resolve_extractor(extractor)
    rank, world, local_rank = launch_process()
    if world > 1 and extractor.device in (None, "cuda"):
        import torch

        if torch.cuda.is_available():
            extractor.device = f"cuda:{local_rank % torch.cuda.device_count()}"
    batch_size = batch_size or extractor.batch_size
    if isinstance(source, (str, os.PathLike)):
        items = _manifest_items(source, image_root, use_boxes, allow_outside_root)
    else:
        items = _dataset_items(source, image_column, key_column, boxes_column, box_format)
    units, index = _plan(items, extractor.max_file_bytes)
    extractor_config = extractor.to_dict()
    fingerprint = _fingerprint(units, extractor_config, store_class_probs, shard_size, storage_dtype)
    shards = [units[i : i + shard_size] for i in range(0, len(units), shard_size)]
    shard_of = {unit["cache_key"]: shard for shard, chunk in enumerate(shards) for unit in chunk}

    info_path = output_dir / CACHE_INFO_NAME
    if info_path.is_file():
        previous = json.loads(info_path.read_text())
        if previous.get("fingerprint") != fingerprint:
            raise ValueError(
                f"{output_dir} holds a region cache of another source, extractor, shard size or storage dtype (it "
                f"stores {previous.get('feature_dtype', 'float32')}; pass storage_dtype to match); use a new "
                "output_dir or delete it."
            )
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
        }
        _start_cache(output_dir, extractor, index, shard_of, info)
    (output_dir / SHARDS_DIR).mkdir(exist_ok=True)
    if world == 1:  # with several processes, another one's temporary folder may be in use
        for stale in (output_dir / SHARDS_DIR).glob("*.tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)

    mine = shards_of(len(shards), num_shards, shard_index, rank, world)
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
    try:
        if num_proc > 1 and len(todo) > 1:
            import multiprocessing

            # Spawned workers: forking a process whose torch already ran OpenMP threads can deadlock.
            context = multiprocessing.get_context("spawn")
            workers = min(num_proc, len(todo))
            threads = max(1, (os.cpu_count() or 1) // workers)
            tasks = [
                (
                    shard,
                    shards[shard],
                    str(_shard_dir(output_dir, shard)),
                    batch_size,
                    store_class_probs,
                    storage_dtype,
                )
                for shard in todo
            ]
            initargs = (str(output_dir / EXTRACTOR_DIR), threads, _device_queue(context, workers, extractor))
            with context.Pool(workers, initializer=_init_worker, initargs=initargs) as pool:
                for _, count, _ in pool.imap_unordered(_worker_task, tasks):
                    bar.update(count)
        else:
            for shard in todo:
                _extract_shard(
                    extractor,
                    shards[shard],
                    _shard_dir(output_dir, shard),
                    batch_size,
                    store_class_probs,
                    bar.update,
                    storage_dtype=storage_dtype,
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

    Raises:
        ValueError: When the parts are of different caches, or together miss shards.
    """
    started = time.perf_counter()
    parts = [Path(part) for part in parts]
    output_dir = Path(output_dir)
    infos = [_read_info(part) for part in parts]
    fingerprints = {info["fingerprint"] for info in infos}
    if len(fingerprints) != 1:
        raise ValueError(
            f"the parts {[str(p) for p in parts]} are of different caches (source, extractor or settings differ)."
        )
    info = dict(infos[0], complete=False)
    if (output_dir / CACHE_INFO_NAME).is_file() and _read_info(output_dir)["fingerprint"] not in fingerprints:
        raise ValueError(f"{output_dir} holds another region cache; merge into a new folder.")
    output_dir.mkdir(parents=True, exist_ok=True)
    if not (output_dir / EXTRACTOR_DIR).is_dir():
        shutil.copytree(parts[0] / EXTRACTOR_DIR, output_dir / EXTRACTOR_DIR)
    atomic_write_bytes(output_dir / INDEX_NAME, (parts[0] / INDEX_NAME).read_bytes())
    if not (output_dir / CACHE_INFO_NAME).is_file():
        atomic_write_json(output_dir / CACHE_INFO_NAME, info, indent=2, default=str)
    (output_dir / SHARDS_DIR).mkdir(exist_ok=True)
    for part in parts:
        for shard in range(info["num_shards"]):
            source, target = _shard_dir(part, shard), _shard_dir(output_dir, shard)
            if source.is_dir() and not target.exists() and source.resolve() != target.resolve():
                tmp = target.with_name(f"{target.name}.tmp-{os.getpid()}")
                shutil.copytree(source, tmp, copy_function=_link_or_copy)
                publish_folder(tmp, target, replace=False)
    missing = [shard for shard in range(info["num_shards"]) if not _shard_dir(output_dir, shard).is_dir()]
    if missing:
        raise ValueError(
            f"the parts hold {info['num_shards'] - len(missing)} of {info['num_shards']} shards (missing e.g. "
            f"shard {missing[0]}); run the missing shard_index values first."
        )
    report = CacheReport(output_dir=str(output_dir), num_shards=info["num_shards"])
    with open(output_dir / INDEX_NAME, encoding="utf-8") as handle:
        report.num_items = sum(1 for _ in handle)
    report.num_unique = sum(
        json.loads((_shard_dir(output_dir, s) / SHARD_REPORT_NAME).read_text())["rows"]
        for s in range(info["num_shards"])
    )
    report.num_duplicates = report.num_items - report.num_unique
    return _finish_cache(output_dir, report, info["num_shards"], started)


def _link_or_copy(source: str, target: str) -> None:
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


# ------------------------------------------------------------------------------------------------ reading


class RegionCacheError(ValueError):
    """A region cache folder that cannot be read: missing, incomplete or damaged (the message says how to fix it)."""


def _read_info(path: Path) -> dict[str, Any]:
    info_path = path / CACHE_INFO_NAME
    if not info_path.is_file():
        raise RegionCacheError(
            f"{path} is not a region cache (no {CACHE_INFO_NAME}); build it with imagebert-extract-regions."
        )
    try:
        info = json.loads(info_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise RegionCacheError(
            f"{info_path} is damaged ({error}); delete the cache folder {path} and rerun imagebert-extract-regions."
        ) from error
    problem = _info_problem(info)
    if problem:
        raise RegionCacheError(
            f"{info_path} is damaged ({problem}); delete the cache folder {path} and rerun imagebert-extract-regions."
        )
    return info


_INFO_FIELDS = {"fingerprint": str, "num_shards": int, "region_feature_size": int, "num_object_classes": int}


def _info_problem(info) -> str | None:
    """What is wrong with a parsed `cache_info.json`, or None."""
    if not isinstance(info, dict):
        return f"expected a JSON object, got {type(info).__name__}"
    for name, kind in _INFO_FIELDS.items():
        value = info.get(name)
        if isinstance(value, bool) or not isinstance(value, kind):
            return f"field {name!r} should be {kind.__name__}, got {value!r}"
    if info["num_shards"] < 0 or info["region_feature_size"] < 1 or info["num_object_classes"] < 0:
        return (
            f"num_shards={info['num_shards']}, region_feature_size={info['region_feature_size']}, "
            f"num_object_classes={info['num_object_classes']} out of range"
        )
    if info.get("feature_dtype", "float32") not in STORAGE_DTYPES:
        return f"feature_dtype {info.get('feature_dtype')!r} is not one of {STORAGE_DTYPES}"
    return None


def _shard_dirs(path: Path, info: dict[str, Any]) -> list[Path]:
    shards = [_shard_dir(path, shard) for shard in range(info["num_shards"])]
    missing = [s.name for s in shards if not s.is_dir()]
    if missing:
        raise RegionCacheError(
            f"region cache {path} is incomplete ({len(missing)} shards missing, e.g. {missing[0]}); rerun "
            "extract_regions with the same arguments to finish it (finished shards are kept)."
        )
    if not shards:
        raise RegionCacheError(f"region cache {path} is empty.")
    return shards


def load_region_dataset(path: str | os.PathLike):
    """The cache's region records as one `datasets.Dataset` (all shards, in order; memory-mapped)."""
    from datasets import concatenate_datasets, load_from_disk

    path = Path(path)
    shards = _shard_dirs(path, _read_info(path))
    return concatenate_datasets([load_from_disk(str(s)) for s in shards])


def _damaged(file: Path, error: Exception) -> RegionCacheError:
    shard = file.parent
    return RegionCacheError(
        f"region cache file {file} is damaged ({type(error).__name__}: {error}). Delete its shard folder {shard} "
        f"and rerun extract_regions (imagebert-extract-regions) with the same arguments into {shard.parent.parent}: "
        "only that shard is recomputed."
    )


def _open_shard_table(shard: Path):
    """A shard's Arrow table, memory-mapped (no copy, nothing decoded)."""
    import pyarrow as pa

    files = sorted(shard.glob("data-*.arrow"))
    if not files:
        raise _damaged(shard / "data-00000-of-00001.arrow", FileNotFoundError("no Arrow file in the shard"))
    tables = []
    for file in files:
        try:
            with pa.memory_map(str(file)) as source:
                tables.append(pa.ipc.open_stream(source).read_all())
        except (OSError, pa.ArrowException) as error:
            raise _damaged(file, error) from error
    return pa.concat_tables(tables) if len(tables) > 1 else tables[0]


def _storage(chunk):
    import pyarrow as pa

    return chunk.storage if isinstance(chunk.type, pa.ExtensionType) else chunk


class _ListColumn:
    """Zero-copy row access to a list column (a datasets `Array2D(shape=(None, D))` or `Sequence`) of one table."""

    def __init__(self, column, width: int | None):
        self.width = width
        self.starts, self.parts = [], []
        start = 0
        for chunk in column.chunks:
            array = _storage(chunk)
            outer = array.offsets.to_numpy()
            if width is None:  # list<value>
                self.parts.append((outer, None, array.values.to_numpy(zero_copy_only=True)))
            else:  # list<list<value>>, every inner list of `width` values
                inner = array.values.offsets.to_numpy()
                self.parts.append((outer, inner, array.values.values.to_numpy(zero_copy_only=True)))
            self.starts.append(start)
            start += len(array)
        self.starts = np.asarray(self.starts, dtype=np.int64)

    def __getitem__(self, row: int) -> np.ndarray:
        part = int(np.searchsorted(self.starts, row, side="right") - 1)
        outer, inner, values = self.parts[part]
        local = row - int(self.starts[part])
        if inner is None:
            return values[outer[local] : outer[local + 1]]
        first, last = inner[outer[local]], inner[outer[local + 1]]
        return values[first:last].reshape(-1, self.width)


def _half_to_float(values: np.ndarray) -> np.ndarray:
    """float16 -> float32 through torch's vectorised kernel: 20x numpy's `astype` on one core."""
    import torch

    return as_feature_tensor(values).to(torch.float32).numpy()


_KIND_ITEM, _KIND_CACHE_KEY, _KIND_IMAGE_ID = 0, 1, 2
LOOKUP_NAME = "lookup.arrow"


def _key_hash(key: str) -> int:
    return int.from_bytes(hashlib.blake2b(key.encode("utf-8"), digest_size=8).digest(), "little")


def _build_lookup(path: Path, cache_keys: list[str], image_ids: list[str]):
    """The key -> row table: every item key of `index.jsonl`, cache key and image id, sorted by a 64-bit hash.

    Built once (at the end of extraction, or at the first open of a cache written before it existed) and stored as
    `lookup.arrow`, so opening a cache later maps it rather than reading every key into Python.
    """
    import pyarrow as pa

    index_path = path / INDEX_NAME
    info = _read_info(path)
    if not index_path.is_file():
        raise RegionCacheError(f"region cache {path} has no {INDEX_NAME}; rerun extract_regions into a new folder.")
    data = index_path.read_bytes()
    recorded = info.get("index")
    if recorded and (len(data) != recorded.get("size") or hashlib.sha256(data).hexdigest() != recorded.get("sha256")):
        raise RegionCacheError(
            f"{index_path} does not match the checksum in {CACHE_INFO_NAME} (the key table was changed or swapped); "
            "its keys would point at other images' regions. Rebuild the cache into a new folder."
        )
    row_of = {cache_key: row for row, cache_key in enumerate(cache_keys)}
    keys, rows, kinds = [], [], []
    seen = set()
    for number, line in enumerate(data.decode("utf-8").splitlines(), 1):
        try:
            entry = json.loads(line)
            key, row = entry["key"], row_of[entry["cache_key"]]
        except (json.JSONDecodeError, KeyError, TypeError) as error:
            raise RegionCacheError(
                f"{index_path}:{number} is damaged ({type(error).__name__}: {error}); rebuild the cache into a new "
                "folder."
            ) from error
        if key in seen:  # the first line of a repeated key decides, as in the index
            continue
        seen.add(key)
        keys.append(key), rows.append(row), kinds.append(_KIND_ITEM)
    keys += cache_keys + image_ids
    rows += list(range(len(cache_keys))) * 2
    kinds += [_KIND_CACHE_KEY] * len(cache_keys) + [_KIND_IMAGE_ID] * len(image_ids)
    hashes = np.fromiter((_key_hash(key) for key in keys), dtype=np.uint64, count=len(keys))
    order_in_index = np.arange(len(keys), dtype=np.int64)
    order = np.lexsort((order_in_index, np.asarray(kinds), hashes))
    table = pa.table(
        {
            "hash": pa.array(hashes[order]),
            "key": pa.array(keys).take(pa.array(order)),
            "row": pa.array(np.asarray(rows, dtype=np.int64)[order]),
            "kind": pa.array(np.asarray(kinds, dtype=np.int8)[order]),
            "position": pa.array(order_in_index[order]),
            # The cache key of each entry's row: every lookup checks the row it lands on against it.
            "cache_key": pa.array(cache_keys).take(pa.array(np.asarray(rows, dtype=np.int64)[order])),
        },
        metadata={"fingerprint": info["fingerprint"], "num_rows": str(len(cache_keys))},
    )
    try:
        with atomic_writer(path / LOOKUP_NAME) as sink, pa.ipc.new_file(sink, table.schema) as writer:
            writer.write_table(table)
    except OSError as error:  # a read-only cache works, with the table in memory
        logger.warning("could not store %s in %s (%s); it is rebuilt at each open", LOOKUP_NAME, path, error)
    return table


def _open_lookup(path: Path, fingerprint: str, num_rows: int):
    """The stored key table, or None (rebuilt from `index.jsonl`) when it is missing, damaged, of another cache or
    of another number of rows."""
    import pyarrow as pa

    file = path / LOOKUP_NAME
    if not file.is_file():
        return None
    try:
        with pa.memory_map(str(file)) as source:
            table = pa.ipc.open_file(source).read_all().combine_chunks()
    except (OSError, pa.ArrowException) as error:
        logger.warning("%s is damaged (%s); rebuilding it from %s", file, error, INDEX_NAME)
        return None
    metadata = table.schema.metadata or {}
    stored = (metadata.get(b"fingerprint", b"").decode(), metadata.get(b"num_rows", b"").decode())
    if stored != (fingerprint, str(num_rows)) or "cache_key" not in table.column_names:
        logger.warning(
            "%s is of another cache or an older version (fingerprint %s, %s rows; this cache: %s, %d rows); "
            "rebuilding it from %s",
            file,
            stored[0] or "none",
            stored[1] or "?",
            fingerprint,
            num_rows,
            INDEX_NAME,
        )
        return None
    return table


READ_DTYPES = (None, "float16", "float32", "float64")


def _shard_report(shard: Path) -> dict[str, Any] | None:
    """A shard's `shard_report.json` (None for shards written before it existed)."""
    file = shard / SHARD_REPORT_NAME
    if not file.is_file():
        return None
    try:
        report = json.loads(file.read_text(encoding="utf-8"))
        if not isinstance(report, dict) or not isinstance(report.get("rows"), int):
            raise ValueError(f"expected an object with an integer 'rows', got {str(report)[:80]}")
    except (ValueError, UnicodeDecodeError) as error:
        raise _damaged(file, error) from error
    return report


def _check_shard_files(shard: Path, number: int, report: dict[str, Any] | None) -> None:
    """Cheap checks at every open: the shard is where it was written and its files have their recorded sizes."""
    if not report or "files" not in report:
        return
    if report.get("shard") != number:
        raise RegionCacheError(
            f"region cache shard folder {shard} holds shard {report.get('shard')} (its {SHARD_REPORT_NAME} says so), "
            f"not shard {number}: shard folders were renamed or swapped, and would return other images' regions. "
            f"Delete {shard} and rerun extract_regions with the same arguments."
        )
    present = {file.name for file in shard.glob("data-*.arrow")}
    if present != set(report["files"]):
        raise _damaged(
            shard / SHARD_REPORT_NAME, ValueError(f"files {sorted(present)}, {sorted(report['files'])} recorded")
        )
    for name, recorded in report["files"].items():
        size = (shard / name).stat().st_size
        if size != recorded.get("size"):
            raise _damaged(shard / name, ValueError(f"{size} bytes, {recorded.get('size')} recorded when written"))


def _check_shard_rows(shard: Path, table, report: dict[str, Any] | None) -> None:
    """The table has the recorded rows, and its first and last rows the recorded cache keys."""
    if report is None:
        return
    file = sorted(shard.glob("data-*.arrow"))[0]
    if table.num_rows != report["rows"]:
        raise _damaged(file, ValueError(f"{table.num_rows} rows, {report['rows']} expected"))
    if table.num_rows and "first_cache_key" in report:
        keys = table.column("cache_key")
        ends = (keys[0].as_py(), keys[table.num_rows - 1].as_py())
        if ends != (report["first_cache_key"], report["last_cache_key"]):
            raise RegionCacheError(
                f"region cache file {file} holds rows {ends[0]} .. {ends[1]}, but {SHARD_REPORT_NAME} recorded "
                f"{report['first_cache_key']} .. {report['last_cache_key']}: the file was swapped or replaced. Delete "
                f"{shard} and rerun extract_regions with the same arguments."
            )


def verify_region_cache(path: str | os.PathLike) -> int:
    """The full integrity check of a region cache: reads every shard file and `index.jsonl` and compares their
    sha256 with the checksums recorded when they were written. Slow (it reads the whole cache): run it after copying
    a cache or when in doubt; opening a cache only checks sizes, shard places and key ranges.

    Returns:
        The number of files checked.

    Raises:
        RegionCacheError: naming the first file that is missing or whose contents differ.
    """
    path = Path(path)
    info = _read_info(path)
    checked = 0
    recorded = info.get("index")
    if recorded:
        actual = file_checksum(path / INDEX_NAME) if (path / INDEX_NAME).is_file() else None
        if actual != {"size": recorded.get("size"), "sha256": recorded.get("sha256")}:
            raise RegionCacheError(
                f"{path / INDEX_NAME} does not match the checksum recorded in {CACHE_INFO_NAME}; rebuild the cache."
            )
        checked += 1
    for number, shard in enumerate(_shard_dirs(path, info)):
        report = _shard_report(shard)
        if not report or "files" not in report:
            logger.warning("%s was written without checksums; only its rows can be checked", shard)
            continue
        _check_shard_files(shard, number, report)
        for name, expected in report["files"].items():
            if file_checksum(shard / name) != expected:
                raise _damaged(shard / name, ValueError("its sha256 differs from the one recorded when written"))
            checked += 1
    return checked


class RegionCache:
    """Region records by key: the manifest path (or dataset key) of an item, its `cache_key`, or its content hash
    (`image_id`).

    `cache[key]` returns the region record (numpy arrays: `region_features` (R, F), `region_boxes` (R, 4),
    `region_locations` (R, 5), `region_class_labels` (R,), `region_class_probs` (R, C) when stored; ints
    `image_width`, `image_height`, `num_regions`; `image_id`, `cache_key`, `source`, `error`). An image that
    failed raises KeyError with its reason; `errors` lists them. `keys()` are the item keys with regions.

    Opening maps the shards' Arrow files and a key table sorted by hash (`lookup.arrow`) into memory: no Python
    object per key is made, so a cache of millions of images opens in milliseconds and costs no RAM until read.
    A record is read straight from the Arrow buffers (no `datasets` row formatting).

    Args:
        path: The cache folder written by `extract_regions`.
        dtype: Dtype of the returned features and class distributions: `"float32"` (the default, what models
            take) or None for the stored dtype (`info["feature_dtype"]`, float16 by default), as read-only views of
            the memory-mapped file; the collator converts them when it fills the batch.
    """

    def __init__(self, path: str | os.PathLike, dtype: str | None = "float32"):
        import pyarrow as pa
        import pyarrow.compute as pc

        if dtype not in READ_DTYPES:
            raise ValueError(
                f"dtype must be one of {READ_DTYPES} (None: the stored dtype), got {dtype!r}; the regions are floats."
            )
        self.path = Path(path)
        self.info = _read_info(self.path)
        self.dtype = None if dtype is None else np.dtype(dtype)
        self.feature_dtype = np.dtype(self.info.get("feature_dtype", "float32"))
        shards = _shard_dirs(self.path, self.info)
        tables = []
        self._shard_rows = []
        for number, shard in enumerate(shards):
            report = _shard_report(shard)
            _check_shard_files(shard, number, report)
            table = _open_shard_table(shard)
            _check_shard_rows(shard, table, report)
            tables.append(table)
            self._shard_rows.append(table.num_rows)
        self.table = pa.concat_tables(tables)
        feature_size = self.info["region_feature_size"]
        self._lists = {
            "region_features": _ListColumn(self.table.column("region_features"), feature_size),
            "region_boxes": _ListColumn(self.table.column("region_boxes"), 4),
            "region_locations": _ListColumn(self.table.column("region_locations"), 5),
            "region_class_labels": _ListColumn(self.table.column("region_class_labels"), None),
        }
        if "region_class_probs" in self.table.column_names:
            width = max(self.info["num_object_classes"], 1)
            self._lists["region_class_probs"] = _ListColumn(self.table.column("region_class_probs"), width)
        self._num_regions = self.table.column("num_regions").to_numpy().astype(np.int64)
        self._width = self.table.column("image_width").to_numpy()
        self._height = self.table.column("image_height").to_numpy()
        errors = self.table.column("error")
        self._failed = pc.fill_null(pc.greater(pc.utf8_length(errors), 0), False).to_numpy(zero_copy_only=False)
        self._strings = {name: self.table.column(name) for name in ("cache_key", "image_id", "source", "error")}

        lookup = _open_lookup(self.path, self.info["fingerprint"], self.table.num_rows)
        if lookup is None or lookup.num_rows == 0:
            lookup = _build_lookup(
                self.path, self._strings["cache_key"].to_pylist(), self._strings["image_id"].to_pylist()
            )
        # One chunk each: numpy views of the mapped file, not copies.
        self._hashes = lookup.column("hash").chunk(0).to_numpy()
        self._lookup_rows = lookup.column("row").chunk(0).to_numpy()
        self._lookup_keys = lookup.column("key").chunk(0)
        self._lookup_cache_keys = lookup.column("cache_key").chunk(0)
        kinds, positions = lookup.column("kind").chunk(0).to_numpy(), lookup.column("position").chunk(0).to_numpy()
        items = np.flatnonzero(kinds == _KIND_ITEM)
        good = items[~self._failed[self._lookup_rows[items]]]
        #: Lookup-table positions of the item keys with regions, in source order.
        self._good_items = good[np.argsort(positions[good], kind="stable")]
        bad = items[self._failed[self._lookup_rows[items]]]
        #: Item key -> why its image has no regions (failures are few; this is small).
        self.errors: dict[str, str] = {
            self._lookup_keys[int(i)].as_py(): self._string("error", int(self._lookup_rows[i])) for i in bad
        }

    @property
    def dataset(self):
        """The records as a `datasets.Dataset` (memory-mapped), for `map`, `filter` or export."""
        return load_region_dataset(self.path)

    def _string(self, column: str, row: int) -> str | None:
        chunks = self._strings[column]
        return chunks[row].as_py()

    def _find(self, key: str) -> int | None:
        target = np.uint64(_key_hash(key))
        position = int(np.searchsorted(self._hashes, target, side="left"))
        while position < len(self._hashes) and self._hashes[position] == target:
            if self._lookup_keys[position].as_py() == key:
                row = int(self._lookup_rows[position])
                expected = self._lookup_cache_keys[position].as_py()
                if self._string("cache_key", row) != expected:
                    shard = self._shard_of_row(row)
                    raise RegionCacheError(
                        f"region cache {self.path}: key {key!r} should read the regions of {expected}, but row {row} "
                        f"({shard}) holds {self._string('cache_key', row)}: shard files were swapped or replaced. "
                        f"Delete {shard} and rerun extract_regions with the same arguments."
                    )
                return row
            position += 1
        return None

    def _shard_of_row(self, row: int) -> Path:
        offsets = np.cumsum([0] + [int(n) for n in self._shard_rows])
        return _shard_dir(self.path, int(np.searchsorted(offsets, row, side="right") - 1))

    def verify(self) -> None:
        """Reads every file of the cache and checks its sha256 against the one recorded when it was written (shard
        files in each shard's report, `index.jsonl` in `cache_info.json`). Opening a cache checks sizes, shard
        places and key ranges only: this full read is the explicit, slow check (see `verify_region_cache`).

        Raises:
            RegionCacheError: naming the first file whose contents differ.
        """
        verify_region_cache(self.path)

    def _row(self, key: str) -> int:
        row = self._find(key)
        if row is None:
            raise KeyError(f"{key!r} is not in the region cache {self.path}")
        if self._failed[row]:
            raise KeyError(f"{key!r} has no regions: {self._string('error', row)}")
        return row

    def _array(self, name: str, row: int, dtype) -> np.ndarray:
        values = self._lists[name][row]
        if dtype is None:
            return values
        if values.dtype == np.float16 and dtype == np.float32:
            return _half_to_float(values)
        return values.astype(dtype)  # a writable copy, as a caller (or torch.as_tensor) may expect

    def __getitem__(self, key: str) -> RegionRecord:
        row = self._row(key)
        record: RegionRecord = {
            "image_id": self._string("image_id", row),
            "cache_key": self._string("cache_key", row),
            "source": self._string("source", row),
            "region_features": self._array("region_features", row, self.dtype),
            "region_boxes": self._array("region_boxes", row, np.float32),
            "region_locations": self._array("region_locations", row, np.float32),
            "region_class_labels": self._array("region_class_labels", row, np.int64),
            "image_width": int(self._width[row]),
            "image_height": int(self._height[row]),
            "num_regions": int(self._num_regions[row]),
            "error": None,
        }
        if "region_class_probs" in self._lists:
            record["region_class_probs"] = self._array("region_class_probs", row, self.dtype)
        return record

    def num_regions(self, key: str) -> int:
        """How many regions `key` has, read from one small column (no features are decoded)."""
        return int(self._num_regions[self._row(key)])

    def __contains__(self, key: object) -> bool:
        row = self._find(str(key))
        return row is not None and not self._failed[row]

    def get(self, key: str, default: Any = None) -> RegionRecord | Any:
        try:
            return self[key]
        except KeyError:
            return default

    def keys(self) -> list[str]:
        """Item keys (manifest paths or dataset keys) that have regions, in source order."""
        return self._lookup_keys.take(self._good_items).to_pylist()

    def __len__(self) -> int:
        return len(self._good_items)

    def __iter__(self):
        return iter(self.keys())

    def records(self, keys: Iterable[str]) -> list[RegionRecord]:
        """The records of several keys, e.g. for `ImageBERTProcessor(regions=...)`."""
        return [self[key] for key in keys]

    def gallery(self, keys: Sequence[str] | None = None, max_regions: int | None = None) -> RegionGallery:
        """The regions of the images `keys` as a `RegionGallery`: padded batches read on demand, for scoring a
        gallery too large to stack in memory."""
        if isinstance(keys, (str, bytes)):
            raise TypeError(
                f"keys must be a list of keys, got the single string {keys!r}; pass [{keys!r}] for one image."
            )
        return RegionGallery(self, keys, max_regions)


class RegionGallery:
    """The regions of a gallery of images as model inputs, read from a region cache on demand.

    Holds one row number and one region count per image (16 bytes), not their features: a gallery of millions of
    images costs megabytes, and the operating system pages the mapped shards in as batches are read. `batch(...)`
    pads the regions of some images into the tensors `stack_region_records` would give for them.

    Args:
        cache (`RegionCache`): The open cache.
        keys (`Sequence[str]`, *optional*): The gallery's images, by any key of the cache (failed images raise
            `KeyError`); one lookup each. None: every image with regions, in the order of `cache.keys()`, found
            without a lookup per key.
        max_regions (`int`, *optional*): Most regions per image.
    """

    def __init__(self, cache: RegionCache, keys: Sequence[str] | None = None, max_regions: int | None = None):
        self.cache = cache
        self.max_regions = max_regions
        if isinstance(keys, (str, bytes)):
            raise TypeError(
                f"keys must be a list of keys, got the single string {keys!r}; pass [{keys!r}] for one image."
            )
        if max_regions is not None and (
            isinstance(max_regions, bool) or not isinstance(max_regions, int) or max_regions < 1
        ):
            raise ValueError(f"max_regions must be a positive integer or None, got {max_regions!r}.")
        if keys is None:
            self.rows = np.asarray(cache._lookup_rows[cache._good_items], dtype=np.int64)
        else:
            self.rows = np.fromiter((cache._row(key) for key in keys), dtype=np.int64, count=len(keys))
        counts = cache._num_regions[self.rows]
        self.num_regions = np.minimum(counts, max_regions) if max_regions else counts

    def __len__(self) -> int:
        return len(self.rows)

    def batch(self, indices, padding: str = "longest") -> dict[str, Any]:
        """`region_features` (B, R, F) float32, `region_locations` (B, R, 5), `region_attention_mask` (B, R) of the
        gallery images at `indices` (a slice, or a sequence / tensor of positions), padded by `pad_region_records`
        (`padding="max_length"` pads to `max_regions`)."""
        import warnings

        positions = np.arange(len(self))[indices] if isinstance(indices, slice) else np.asarray(indices).reshape(-1)
        features, locations = self.cache._lists["region_features"], self.cache._lists["region_locations"]
        records = [
            {"region_features": features[int(row)], "region_locations": locations[int(row)]}
            for row in self.rows[positions]
        ]
        with warnings.catch_warnings():
            # Views of the read-only mapped file, only ever copied from.
            warnings.simplefilter("ignore", UserWarning)
            return pad_region_records(
                records, padding, self.max_regions, feature_size=features.width, location_size=locations.width
            )


def load_region_cache(path: str | os.PathLike, dtype: str | None = "float32", verify: bool = False) -> RegionCache:
    """Opens a region cache written by `extract_regions` for lookups by key (see `RegionCache`).

    Opening checks what is cheap at any scale: `cache_info.json`, each shard's place, file sizes and first and last
    keys, and every lookup's row. With `verify=True` every file is read first and its sha256 compared with the one
    recorded when it was written (`verify_region_cache`): the full check, as slow as reading the cache once.
    """
    if verify:
        verify_region_cache(path)
    return RegionCache(path, dtype=dtype)


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
    allow_outside_root: bool = field(
        default=False, metadata={"help": "Follow manifest image paths outside the image root (absolute, ../)."}
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
    storage_dtype: str = field(
        default="float16",
        metadata={"help": "float16 (half the size) or float32 for features and class distributions."},
    )
    num_shards: int = field(default=1, metadata={"help": "Machines the extraction is split across."})
    shard_index: int = field(default=0, metadata={"help": "This machine's part (0 .. num_shards - 1)."})
    merge: list[str] = field(
        default_factory=list,
        metadata={
            "help": "Instead of extracting, join these part folders (one per shard_index) into output_dir.",
            "nargs": "*",
        },
    )


def main(argv: Sequence[str] | None = None) -> int:
    """`imagebert-extract-regions --output_dir cache --manifest data/captions.jsonl [--num_proc 2]`.

    On several GPUs: `torchrun --nproc_per_node 8 -m imagebert_hf.regions ...` (or `accelerate
    launch`); on several machines add `--num_shards M --shard_index K`, then `--merge part0 part1 ...` when the
    machines wrote separate folders.

    Returns 0 when the command ran (images that failed are counted and listed in `report.json`); a bad argument or
    input (a missing manifest, a cache of another source in `output_dir`) ends it with one line naming it and exit
    status 1.
    """
    from transformers import HfArgumentParser

    (args,) = HfArgumentParser(ExtractRegionsArguments).parse_args_into_dataclasses(args=argv)
    try:
        if args.merge:
            report = merge_region_caches(args.merge, args.output_dir)
            print(f"merged {len(args.merge)} parts: {report.num_unique} distinct images, {report.num_failed} failed")
            return 0
        if (args.manifest is None) == (args.dataset_path is None):
            raise ValueError("give exactly one of --manifest and --dataset_path")
        if args.dataset_path is not None:
            from datasets import load_from_disk

            source = load_from_disk(args.dataset_path)
        else:
            if not Path(args.manifest).is_file():
                raise FileNotFoundError(f"--manifest {args.manifest}: no such file (expected a jsonl manifest)")
            source = args.manifest
        extractor = args.extractor or ImageBERTRoIExtractor(max_regions=args.max_regions)
        report = extract_regions(
            source,
            args.output_dir,
            extractor,
            image_root=args.image_root,
            allow_outside_root=args.allow_outside_root,
            use_boxes=args.use_boxes,
            image_column=args.image_column,
            key_column=args.key_column,
            shard_size=args.shard_size,
            num_proc=args.num_proc,
            batch_size=args.batch_size,
            store_class_probs=not args.no_class_probs,
            storage_dtype=args.storage_dtype,
            num_shards=args.num_shards,
            shard_index=args.shard_index,
        )
    except (ImportError, OSError, ValueError) as error:  # ImportError: the offline weights package is missing
        raise SystemExit(f"imagebert-extract-regions: error: {error}") from None
    print(
        f"{report.num_items} items, {report.num_unique} distinct images, {report.num_extracted} extracted, "
        f"{report.num_failed} failed, {report.num_shards_skipped} shards reused in {report.seconds:.1f} s; report: "
        f"{Path(args.output_dir) / REPORT_NAME}"
    )
    return 0


__all__ = [
    "CacheReport",
    "ExtractRegionsArguments",
    "RegionCache",
    "RegionCacheError",
    "RegionGallery",
    "extract_regions",
    "load_region_cache",
    "load_region_dataset",
    "main",
    "merge_region_caches",
    "shards_of",
    "verify_region_cache",
]


if __name__ == "__main__":
    raise SystemExit(main())
