"""Reading a region cache: `load_region_cache` opens it for lookups by key (`RegionCache`), `verify_region_cache`
checks every file against the checksums recorded when it was written, `load_region_dataset` gives the records as a
`datasets.Dataset`. Consumers read regions with `load_region_cache(path)[key]`.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from transformers.utils import logging

from ..formats.files import atomic_writer, file_checksum
from ..models.imagebert.image_processing_imagebert import WEIGHTS_NAME, ImageBERTRoIExtractor
from ..models.imagebert.region_batching import RegionRecord, as_feature_tensor
from .cache_layout import (
    CACHE_INFO_NAME,
    EXTRACTOR_DIR,
    INDEX_NAME,
    SHARD_REPORT_NAME,
    RegionCacheError,
    _damaged,
    _info_mismatch,
    _shard_dir,
    _shard_dirs,
    read_cache_info,
)
from .gallery import RegionGallery


logger = logging.get_logger(__name__)


def load_region_dataset(path: str | os.PathLike):
    """The cache's region records as one `datasets.Dataset` (all shards, in order; memory-mapped)."""
    from datasets import concatenate_datasets, load_from_disk

    path = Path(path).expanduser()
    shards = _shard_dirs(path, read_cache_info(path))
    return concatenate_datasets([load_from_disk(str(s)) for s in shards])


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


def _storage_type(data_type):
    import pyarrow as pa

    return data_type.storage_type if isinstance(data_type, pa.ExtensionType) else data_type


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
    info = read_cache_info(path)
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


def _lookup_problem(path: Path, info: dict[str, Any]) -> str | None:
    """Why `lookup.arrow` is not the one whose size and sha256 `cache_info.json` records (read whole: the slow
    check); None when it is, or when none was recorded (a cache written before they were)."""
    recorded = info.get("lookup")
    if not recorded:
        return None
    file = path / LOOKUP_NAME
    if not file.is_file():
        return "it is missing"
    actual = file_checksum(file)
    if actual != {"size": recorded.get("size"), "sha256": recorded.get("sha256")}:
        return f"its sha256 or size differs from the one recorded in {CACHE_INFO_NAME}"
    return None


def _write_lookup(path: Path) -> dict[str, Any] | None:
    """Builds `lookup.arrow` from the shards' keys and `index.jsonl`, checking every shard as an open does, and
    returns its checksum (None where it could not be stored). One already there is built again, not trusted: it may
    be damaged in a way only its checksum shows, and the table is the same for the same cache."""
    existed = (path / LOOKUP_NAME).is_file()
    cache = RegionCache(path)  # builds the table where there is none
    if existed:
        _build_lookup(path, cache._strings["cache_key"].to_pylist(), cache._strings["image_id"].to_pylist())
    file = path / LOOKUP_NAME
    return file_checksum(file) if file.is_file() else None


READ_DTYPES = (None, "float16", "float32", "float64")


def _shard_report(shard: Path) -> dict[str, Any]:
    """A shard's `shard_report.json`, checked to parse. The writer writes it before it renames the shard folder into
    place, so a folder without one is a shard copied or moved in part, whose rows cannot be trusted."""
    file = shard / SHARD_REPORT_NAME
    if not file.is_file():
        raise RegionCacheError(
            f"region cache shard folder {shard} has no {SHARD_REPORT_NAME} (a shard folder copied or moved in part?). "
            f"Rerun extract_regions (imagebert-extract-regions) with the same arguments into {shard.parent.parent}: "
            "it recomputes that shard (or copy the whole folder again from an intact cache)."
        )
    try:
        report = json.loads(file.read_text(encoding="utf-8"))
        if not isinstance(report, dict) or not isinstance(report.get("rows"), int):
            raise ValueError(f"expected an object with an integer 'rows', got {str(report)[:80]}")
    except (ValueError, UnicodeDecodeError) as error:
        raise _damaged(file, error) from error
    return report


def _check_shard_files(shard: Path, number: int, report: dict[str, Any], fingerprint: str | None = None) -> None:
    """Cheap checks at every open: the shard was written for this cache's plan (`fingerprint`, where its report
    records one), is where it was written, and its files have their recorded sizes."""
    _check_shard_fingerprint(shard, report, fingerprint)
    if "files" not in report:
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


def _check_shard_fingerprint(shard: Path, report: dict[str, Any], fingerprint: str | None) -> None:
    """Refuses a shard whose `shard_report.json` records another plan fingerprint than its cache's: regions made
    with other settings, images or weights (two runs that started one folder at once, or a shard copied from
    another cache). Shards written before the fingerprint was recorded pass."""
    recorded = report.get("fingerprint")
    if fingerprint is None or recorded is None or recorded == fingerprint:
        return
    raise RegionCacheError(
        f"region cache shard folder {shard} was written for another cache (its {SHARD_REPORT_NAME} records the "
        f"fingerprint {str(recorded)[:12]}..., {CACHE_INFO_NAME} {fingerprint[:12]}...): its regions come from "
        f"another source, extractor or settings. Delete {shard} and rerun extract_regions with this cache's "
        "arguments: only that shard is recomputed."
    )


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


def _region_widths(column) -> tuple[int, int | None]:
    """Regions and values per region of a (R, D) list column, from its offsets alone (no value is read); the width
    is the first region's, and None when every region does not hold the same number (or there is no region)."""
    regions, values, first = 0, 0, None
    for chunk in column.chunks:
        inner = _storage(chunk).values
        if not len(inner):
            continue
        offsets = inner.offsets
        regions += len(inner)
        values += offsets[len(inner)].as_py() - offsets[0].as_py()
        if first is None:
            first = offsets[1].as_py() - offsets[0].as_py()
    if not regions:
        return 0, None
    return regions, first if values == regions * first else None


def _check_shard_against_info(path: Path, info: dict[str, Any], shard: Path, table) -> None:
    """The sizes and dtype `cache_info.json` gives against what a shard's Arrow schema and offsets hold (nothing is
    decoded): an edited or swapped `cache_info.json` would otherwise cut every record into rows of the wrong width."""
    file = sorted(shard.glob("data-*.arrow"))[0]
    recorded_dtype = info.get("feature_dtype", "float32")
    checks = [("region_features", "region_feature_size", info["region_feature_size"])]
    if "region_class_probs" in table.column_names:  # without them no stored array shows the class count
        checks.append(("region_class_probs", "num_object_classes", info["num_object_classes"]))
    for column, name, recorded in checks:
        stored_dtype = str(
            np.dtype(_storage_type(table.schema.field(column).type).value_type.value_type.to_pandas_dtype())
        )
        if stored_dtype != recorded_dtype:
            raise _info_mismatch(path, "feature_dtype", recorded_dtype, stored_dtype, f"{file} ({column})")
        regions, width = _region_widths(table.column(column))
        # A cache without classes stores one zero per region.
        if regions and width != (max(recorded, 1) if name == "num_object_classes" else recorded):
            found = width if width is not None else "rows of differing widths"
            raise _info_mismatch(path, name, recorded, found, f"{file} ({column}: values per region)")


def _parse_problem(file: Path) -> Exception | None:
    """Why a file written without a recorded checksum cannot be read: a JSON file that does not parse, a safetensors
    file whose header does not cover the file (a truncated or cut one); None when it reads."""
    if file.suffix == ".json":
        try:
            json.loads(file.read_bytes())
        except (ValueError, UnicodeDecodeError) as error:
            return error
    elif file.suffix == ".safetensors":
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(file), framework="numpy"):
                pass
        except (OSError, SafetensorError) as error:
            return error
    return None


def _check_unrecorded_files(path: Path, shards: list[Path]) -> None:
    """The files no checksum was recorded for must at least parse: the extractor that made the regions (its
    settings and weights) and each shard's `datasets` metadata (`state.json`, `dataset_info.json`, read by
    `load_region_dataset`)."""
    extractor = path / EXTRACTOR_DIR
    if not extractor.is_dir():
        raise RegionCacheError(
            f"region cache {path} has no {EXTRACTOR_DIR}/ folder (the extractor that made its regions); rebuild the "
            "cache into a new folder."
        )
    for file in sorted(extractor.iterdir()):
        error = _parse_problem(file)
        if error is not None:
            raise RegionCacheError(
                f"region cache file {file} is damaged ({type(error).__name__}: {error}); the extractor that made the "
                f"regions cannot be loaded from it. Rebuild the cache into a new folder (or copy {EXTRACTOR_DIR}/ "
                "from an intact copy of this cache)."
            )
    for shard in shards:
        for file in sorted(shard.glob("*.json")):
            error = _parse_problem(file) if file.name != SHARD_REPORT_NAME else None  # parsed by _shard_report
            if error is not None:
                raise _damaged(file, error)


def verify_region_cache(path: str | os.PathLike) -> int:
    """The full integrity check of a region cache: reads every shard file, `index.jsonl` and `lookup.arrow` and
    compares their sha256 with the checksums recorded when they were written, and parses the files written without
    one (the extractor's settings and weights, each shard's `datasets` metadata). Slow (it reads the whole cache):
    run it after copying a cache or when in doubt; opening a cache only checks sizes, shard places and key ranges.
    A cache completed before `lookup.arrow`'s checksum was recorded has that file left unchecked, with a warning;
    a missing `lookup.arrow` is no damage (an open builds it from `index.jsonl`).

    Returns:
        The number of data files compared with their recorded checksums: `index.jsonl` and the shards' Arrow files.
        `lookup.arrow`, built from them, is compared too but not counted, so the count is that of every cache.

    Raises:
        RegionCacheError: naming the first file that is missing, does not parse or whose contents differ, or the
            field of `cache_info.json` that disagrees with what the shards hold (feature size, class count, feature
            dtype, shard count).
    """
    path = Path(path).expanduser()
    info = read_cache_info(path)
    checked = 0
    recorded = info.get("index")
    if recorded:
        actual = file_checksum(path / INDEX_NAME) if (path / INDEX_NAME).is_file() else None
        if actual != {"size": recorded.get("size"), "sha256": recorded.get("sha256")}:
            raise RegionCacheError(
                f"{path / INDEX_NAME} does not match the checksum recorded in {CACHE_INFO_NAME}; rebuild the cache."
            )
        checked += 1
    lookup = path / LOOKUP_NAME
    if info.get("lookup") and lookup.is_file():
        problem = _lookup_problem(path, info)
        if problem is not None:
            raise RegionCacheError(
                f"region cache file {lookup} is damaged ({problem}): lookups could miss keys or find other images. "
                f"Rerun extract_regions (imagebert-extract-regions) with the same arguments into {path}: it builds "
                f"the table again from {INDEX_NAME} (or delete {lookup}: the next open builds it)."
            )
    elif info.get("complete") and lookup.is_file():
        logger.warning(
            "%s: no checksum of %s was recorded (a cache completed by an earlier version), so it is not checked; "
            "a rerun of extract_regions with the same arguments records one",
            path,
            LOOKUP_NAME,
        )
    shards = _shard_dirs(path, info)
    _check_unrecorded_files(path, shards)
    for number, shard in enumerate(shards):
        report = _shard_report(shard)
        _check_shard_fingerprint(shard, report, info["fingerprint"])
        if "files" not in report:
            logger.warning("%s was written without checksums; only its rows can be checked", shard)
            continue
        _check_shard_files(shard, number, report)
        for name, expected in report["files"].items():
            if file_checksum(shard / name) != expected:
                raise _damaged(shard / name, ValueError("its sha256 differs from the one recorded when written"))
            checked += 1
    # cache_info.json has no recorded checksum: it is checked against what the shards hold, as at every open.
    for shard in shards:
        _check_shard_against_info(path, info, shard, _open_shard_table(shard))
    return checked


class RegionCache:
    """Region records by key: the manifest path (or dataset key) of an item, its `cache_key`, or its content hash
    (`image_id`).

    `cache[key]` returns the region record (numpy arrays: `region_features` (R, F), `region_boxes` (R, 4),
    `region_locations` (R, 5), `region_class_labels` (R,), `region_class_probs` (R, C) when stored; ints
    `image_width`, `image_height`, `num_regions`; `image_id`, `cache_key`, `source`, `error`). An image that
    failed raises KeyError with its reason; `errors` lists them. `keys()` are the item keys with regions.

    Opening maps the shards' Arrow files and a key table sorted by hash (`lookup.arrow`) into memory: no Python
    object per key is made, and the regions cost no RAM until read. Its time grows with the shard count: each
    shard's report is parsed and its Arrow file mapped and checked, about 0.9 ms per shard with a warm page cache
    (1.8 s for 2,000 shards on 2 CPU cores; 1.4 ms per shard while other jobs loaded them), so 19,500 shards (10M
    images at the default 512 per shard) take 18 to 28 s to open; a larger `shard_size` opens faster. A record is
    read straight from the Arrow buffers (no `datasets` row formatting).

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
        self.path = Path(path).expanduser()
        self.info = read_cache_info(self.path)
        self.dtype = None if dtype is None else np.dtype(dtype)
        self.feature_dtype = np.dtype(self.info.get("feature_dtype", "float32"))
        shards = _shard_dirs(self.path, self.info)
        tables = []
        self._shard_rows = []
        for number, shard in enumerate(shards):
            report = _shard_report(shard)
            _check_shard_files(shard, number, report, self.info["fingerprint"])
            table = _open_shard_table(shard)
            _check_shard_rows(shard, table, report)
            _check_shard_against_info(self.path, self.info, shard, table)
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
        files in each shard's report, `index.jsonl` and `lookup.arrow` in `cache_info.json`). Opening a cache checks sizes, shard
        places and key ranges only: this full read is the explicit, slow check (see `verify_region_cache`).

        Raises:
            RegionCacheError: naming the first file whose contents differ.
        """
        verify_region_cache(self.path)

    def _row(self, key: str) -> int:
        if not isinstance(key, str):
            raise TypeError(
                f"region cache keys are strings (the manifest's image paths or the image ids), got {key!r} "
                f"({type(key).__name__})."
            )
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


def load_region_cache(path: str | os.PathLike, dtype: str | None = "float32", verify: bool = False) -> RegionCache:
    """Opens a region cache written by `extract_regions` for lookups by key (see `RegionCache`).

    Opening checks what is cheap at any scale: `cache_info.json`, each shard's place, file sizes and first and last
    keys, and every lookup's row. With `verify=True` every file is read first and its sha256 compared with the one
    recorded when it was written (`verify_region_cache`): the full check, as slow as reading the cache once.
    """
    if verify:
        verify_region_cache(path)
    return RegionCache(path, dtype=dtype)


# ------------------------------------------------------------------------------------------------ extractor identity

# The extractor settings that decide an image's regions, by backend, as the backends read them: the backbone resizes
# to `size`, normalises, and pools `roi_pool_size` bins over the boxes or the `grid_sizes` grid; the detectors keep
# the proposals that `score_threshold`, `nms_threshold` and `min_regions` select (torchvision's resizes by its
# `detector_kwargs`, BUTD's by `size`, with only a pixel mean). Settings that change where or how fast regions are
# made (`device`, `batch_size`), or only which images are accepted (`max_file_bytes`, `max_image_pixels`,
# `min_image_side`, `max_aspect_ratio`), are left out, and so is `return_class_probs`, which keeps or drops the class
# distributions without changing a feature.
_REGION_SETTINGS = {
    "backbone": (
        "backbone_name",
        "backbone_out_indices",
        "backbone_kwargs",
        "size",
        "image_mean",
        "image_std",
        "roi_pool_size",
        "grid_sizes",
    ),
    "detector": (
        "detector_name",
        "detector_num_classes",
        "detector_kwargs",
        "score_threshold",
        "nms_threshold",
        "min_regions",
    ),
    "butd": ("detector_kwargs", "size", "image_mean", "score_threshold", "nms_threshold", "min_regions"),
}
# What every backend's regions depend on: the decoded pixels (EXIF rotation, the longest side kept) and the location
# layout.
_DECODING_SETTINGS = ("apply_exif_orientation", "max_decode_side", "region_location_size")
_WEIGHTS_SETTINGS = {"backbone": "backbone_weights", "detector": "detector_weights", "butd": "detector_weights"}


def _normalised_extractor(settings: dict[str, Any]) -> dict[str, Any]:
    """`settings` as an extractor built from them gives them back: the defaults of settings an older version did not
    save filled in, a backend's own `size` default. Settings that no longer build an extractor are kept as they are."""
    given = {key: value for key, value in settings.items() if key not in ("image_processor_type", "weights_sha256")}
    try:
        normalised = ImageBERTRoIExtractor(**given).to_dict()
    except (TypeError, ValueError):
        normalised = dict(given)
    return {**normalised, "weights_sha256": settings.get("weights_sha256")}


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def extractor_differences(
    cache_extractor: dict[str, Any], model_extractor: dict[str, Any], max_regions: int | None = None
) -> list[str]:
    """The settings of two `ImageBERTRoIExtractor`s that give an image other regions, one line per setting naming
    both values: a region cache's extractor (`cache_extractor_record`) and a model's (`saved_extractor_record`).

    Only the settings the backend reads are compared (all of them only when both have the same `backend`; else the
    backend alone is named). The weights compare by their sha256 (`weights_sha256`) where both record one, else by
    their setting (`backbone_weights` or `detector_weights`). `max_regions` is the most regions the model takes: the
    extractors' own limits differ only where one of them keeps fewer than that.

    Returns:
        `list[str]`: e.g. `["grid_sizes: [1, 2] in the cache, [1, 2, 3] in the model's processor"]`; empty when both
        give the same regions.
    """
    cache, model = _normalised_extractor(cache_extractor), _normalised_extractor(model_extractor)

    def line(name: str, there: Any, here: Any) -> str:
        return f"{name}: {_short(there)} in the cache, {_short(here)} in the model's processor"

    backend = cache.get("backend")
    if backend != model.get("backend"):
        return [line("backend", backend, model.get("backend"))]
    differences = []
    for name in (*_REGION_SETTINGS.get(backend, ()), *_DECODING_SETTINGS):
        there, here = cache.get(name), model.get(name)
        if name.endswith("_kwargs"):  # no extra arguments, however they were saved
            there, here = there or None, here or None
        if there != here:
            differences.append(line(name, there, here))
    there, here = cache.get("max_regions"), model.get("max_regions")
    if max_regions is not None and isinstance(there, int) and isinstance(here, int):
        there, here = min(there, max_regions), min(here, max_regions)
    if there != here:
        differences.append(line("max_regions", there, here))
    weights = _WEIGHTS_SETTINGS.get(backend)
    there, here = cache["weights_sha256"], model["weights_sha256"]
    if isinstance(there, str) and isinstance(here, str):
        # A saved folder's weights file wins over its weights setting, so the setting alone can name other weights.
        if there != here:
            differences.append(
                f"{weights.replace('_', ' ')}: sha256 {there[:12]}... in the cache, {here[:12]}... in the model's "
                "processor"
            )
    elif weights is not None and cache.get(weights) != model.get(weights):
        differences.append(line(weights, cache.get(weights), model.get(weights)))
    return differences


def cache_extractor_record(info: dict[str, Any]) -> tuple[dict[str, Any] | None, str]:
    """The extractor a region cache's `info` (`cache_info.json`) records, with its weights' sha256 as
    `weights_sha256`, for `extractor_differences`; or None, with the reason, where the cache records none that can be
    compared: an older cache, one written by another extractor class, or regions read from precomputed files, whose
    settings describe the files' reader and not the detector that made the features."""
    recorded = info.get("extractor")
    if not isinstance(recorded, dict) or not isinstance(recorded.get("backend"), str):
        return None, "it records no ImageBERTRoIExtractor settings (an older cache, or another extractor's)"
    if recorded["backend"] == "precomputed":
        return None, "its regions were read from precomputed files, which do not record the extractor that made them"
    return {**recorded, "weights_sha256": info.get("weights_sha256")}, ""


def tensors_sha256(named_tensors) -> str:
    """The sha256 of `(name, tensor)` pairs given in name order: each tensor's name, dtype, shape and bytes. The one
    digest of extractor weights, whether they are in memory (the cache writer) or in a saved file."""
    import torch

    digest = hashlib.sha256()
    for name, tensor in named_tensors:
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}\n".encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def _weights_file_sha256(path: str) -> str:
    """`tensors_sha256` of a saved extractor's weights file, read one tensor at a time: equal to the cache writer's
    digest of the weights a cache was extracted with."""
    from safetensors import safe_open

    with safe_open(path, framework="pt") as weights:
        return tensors_sha256((name, weights.get_tensor(name)) for name in sorted(weights.keys()))


def saved_extractor_record(name_or_path: str | os.PathLike) -> tuple[dict[str, Any] | None, str]:
    """The extractor saved with a model (a folder or a Hub id): its processor's image processor
    (`processor_config.json`) or an extractor saved on its own (`preprocessor_config.json`), with the sha256 of its
    weights (`roi_extractor.safetensors`) as `weights_sha256` where the folder holds them; or None, with the reason,
    where it holds none that can be compared (no processor, one that does not parse, precomputed regions)."""
    from safetensors import SafetensorError
    from transformers.utils import IMAGE_PROCESSOR_NAME, PROCESSOR_NAME, cached_file

    def find(name: str) -> str | None:
        return cached_file(
            str(name_or_path),
            name,
            _raise_exceptions_for_missing_entries=False,
            _raise_exceptions_for_connection_errors=False,
        )

    settings = None
    try:
        for name, nested in ((PROCESSOR_NAME, True), (IMAGE_PROCESSOR_NAME, False)):
            file = find(name)
            if file is not None:
                saved = json.loads(Path(file).read_text(encoding="utf-8"))
                settings = saved.get("image_processor") if nested and isinstance(saved, dict) else saved
                if settings is not None:
                    break
        if not isinstance(settings, dict) or not isinstance(settings.get("backend"), str):
            return None, "it holds no saved ImageBERTRoIExtractor"
        if settings["backend"] == "precomputed":
            return None, "its processor reads precomputed regions, which do not record the extractor that made them"
        weights = find(WEIGHTS_NAME)
        sha256 = _weights_file_sha256(weights) if weights is not None else None
    except (OSError, ValueError, SafetensorError) as error:  # loading the model's processor names what is damaged
        return None, f"its processor cannot be read ({type(error).__name__}: {str(error)[:200]})"
    return {**settings, "weights_sha256": sha256}, ""


def warn_if_other_extractor(
    cache_info: Mapping[str, Any], where: str, model_name_or_path: str, max_regions: int | None = None
) -> list[str]:
    """Logs one warning, naming `where` and each setting with both values, when the regions of the cache whose
    `cache_info.json` is `cache_info` were made by another extractor than the one saved with the model
    (`extractor_differences`; `max_regions`: the most the model takes). Not an error: fine-tuning on another extractor's regions is legitimate, but the model then reads
    features unlike those it learned from (or, once fine-tuned, unlike those its saved processor gives). A cache or
    a model that records no comparable extractor is said so at debug level only.

    Returns:
        `list[str]`: the differing settings (empty when the extractors agree or cannot be compared).
    """
    recorded, reason = cache_extractor_record(cache_info)
    if recorded is None:
        logger.debug("%s: its extractor is not compared with the model's: %s.", where, reason)
        return []
    saved, reason = saved_extractor_record(model_name_or_path)
    if saved is None:
        logger.debug("%s: its extractor is not compared with that of %s: %s.", where, model_name_or_path, reason)
        return []
    differences = extractor_differences(recorded, saved, max_regions)
    if differences:
        logger.warning(
            "%s holds regions of another extractor than the processor saved with %s (%s). A model ranks worse on "
            "another extractor's regions than on those it learned from, and the processor saved with it extracts "
            "photos as its own. Extract the split with the model's processor (imagebert-extract-regions --extractor "
            "%s); or, to adapt the model to these regions by fine-tuning, accept this and then save the cache's "
            "extractor (its extractor/ folder) as the fine-tuned model's image processor.",
            where,
            model_name_or_path,
            "; ".join(differences),
            model_name_or_path,
        )
    return differences


__all__ = [
    "RegionCache",
    "RegionCacheError",
    "cache_extractor_record",
    "extractor_differences",
    "load_region_cache",
    "load_region_dataset",
    "saved_extractor_record",
    "tensors_sha256",
    "verify_region_cache",
    "warn_if_other_extractor",
]
