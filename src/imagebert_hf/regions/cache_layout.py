"""The region cache's folder layout, shared by its writer and its reader.

Layout of a cache folder:

```
cache/
  cache_info.json      # extractor settings, sizes, plan fingerprint, counts; "complete": true when done
  index.jsonl          # one line per source item: {"key": ..., "cache_key": ..., "shard": ...}
  extractor/           # the extractor that made the regions (save_pretrained, weights included)
  shards/shard-00000/  # a datasets.Dataset (save_to_disk) of region records, one row per distinct image
  lookup.arrow         # key -> row table sorted by key hash (built when the cache completes)
  report.json          # counts and every failure with its reason
```
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


CACHE_INFO_NAME = "cache_info.json"
INDEX_NAME = "index.jsonl"
REPORT_NAME = "report.json"
EXTRACTOR_DIR = "extractor"
SHARDS_DIR = "shards"
SHARD_REPORT_NAME = "shard_report.json"
CACHE_FORMAT_VERSION = 1

STORAGE_DTYPES = ("float16", "float32")


def _shard_dir(output_dir: Path, shard: int) -> Path:
    return output_dir / SHARDS_DIR / f"shard-{shard:05d}"


class RegionCacheError(ValueError):
    """A region cache folder that cannot be read: missing, incomplete or damaged (the message says how to fix it)."""


def read_cache_info(path: Path) -> dict[str, Any]:
    """A cache folder's parsed `cache_info.json`, its fields checked (not against the shards: see the reader)."""
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
    problem = _info_problem(info) or _shard_count_problem(path, info)
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


def _shard_count_problem(path: Path, info: dict[str, Any]) -> str | None:
    """Whether `num_shards` is more than `index.jsonl` could list (every shard holds at least one item, a line of the
    index): a damaged count would otherwise have a reader build and stat that many shard paths."""
    index = path / INDEX_NAME
    if not index.is_file():  # a reader with a stored lookup.arrow needs no index; its shard check is bounded too
        return None
    size = index.stat().st_size
    if info["num_shards"] > size:
        return f"num_shards={info['num_shards']}, more than the {size} bytes of {INDEX_NAME} could list"
    return None


def _present_shards(path: Path) -> set[int]:
    """The numbers of the finished shard folders in `shards/` (temporary `.tmp-<pid>` folders are not finished)."""
    folder = path / SHARDS_DIR
    if not folder.is_dir():
        return set()
    numbers = set()
    with os.scandir(folder) as entries:
        for entry in entries:
            digits = entry.name.removeprefix("shard-")
            if digits.isdigit() and entry.name == _shard_dir(path, int(digits)).name and entry.is_dir():
                numbers.add(int(digits))
    return numbers


def _info_mismatch(path: Path, name: str, recorded: Any, found: Any, where: str) -> RegionCacheError:
    """`cache_info.json` disagrees with what the cache holds: its `name` says `recorded`, `where` holds `found`."""
    return RegionCacheError(
        f"{path / CACHE_INFO_NAME} says {name}={recorded!r}, but {where} holds {found!r}: {CACHE_INFO_NAME} was "
        "edited or belongs to another cache, and would misread every record. Restore it from an intact copy of this "
        "cache, or rebuild the cache into a new folder."
    )


def _recorded_num_shards(path: Path, present: set[int]) -> int | None:
    """The shard count the writer recorded in the `shard_report.json` of the first shard on disk (None for caches
    written before it was recorded, or when that report does not parse: the reader names it later)."""
    if not present:
        return None
    try:
        report = json.loads((_shard_dir(path, min(present)) / SHARD_REPORT_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    count = report.get("num_shards") if isinstance(report, dict) else None
    return count if isinstance(count, int) and not isinstance(count, bool) else None


def _shard_dirs(path: Path, info: dict[str, Any]) -> list[Path]:
    num_shards = info["num_shards"]
    # Counted from the folder's entries, so the work is bounded by what is on disk, not by the recorded count.
    on_disk = _present_shards(path)
    if on_disk and max(on_disk) >= num_shards:
        last = _shard_dir(path, max(on_disk))
        raise _info_mismatch(path, "num_shards", num_shards, max(on_disk) + 1, f"{SHARDS_DIR}/ (up to {last.name})")
    present = {shard for shard in on_disk if shard < num_shards}
    recorded = _recorded_num_shards(path, present)
    if recorded is not None and recorded != num_shards:
        first = _shard_dir(path, min(present)) / SHARD_REPORT_NAME
        raise _info_mismatch(path, "num_shards", num_shards, recorded, f"{first} (written with the shards)")
    if len(present) < num_shards:
        first = next(shard for shard in range(num_shards) if shard not in present)
        raise RegionCacheError(
            f"region cache {path} is incomplete ({num_shards - len(present)} shards missing, e.g. "
            f"{_shard_dir(path, first).name}); rerun extract_regions with the same arguments to finish it (finished "
            "shards are kept)."
        )
    if not num_shards:
        raise RegionCacheError(f"region cache {path} is empty.")
    return [_shard_dir(path, shard) for shard in range(num_shards)]


def _damaged(file: Path, error: Exception) -> RegionCacheError:
    shard = file.parent
    return RegionCacheError(
        f"region cache file {file} is damaged ({type(error).__name__}: {error}). Delete its shard folder {shard} "
        f"and rerun extract_regions (imagebert-extract-regions) with the same arguments into {shard.parent.parent}: "
        "only that shard is recomputed."
    )


__all__ = [
    "CACHE_FORMAT_VERSION",
    "CACHE_INFO_NAME",
    "EXTRACTOR_DIR",
    "INDEX_NAME",
    "REPORT_NAME",
    "SHARDS_DIR",
    "SHARD_REPORT_NAME",
    "STORAGE_DTYPES",
    "RegionCacheError",
    "read_cache_info",
]
