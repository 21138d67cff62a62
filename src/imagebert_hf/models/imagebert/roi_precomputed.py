"""Readers and writers for precomputed bottom-up-attention region files.

Two layouts are common among vision-language projects:

* one `.npz` per image (named after the image), with the features, the boxes, the class distribution and the
  image size. Key names vary between extraction scripts, so several aliases are accepted (`features`/`x`,
  `boxes`/`bbox`, `cls_prob`/`class_probs`, `image_w`/`image_width`, ...);
* one `.tsv` file with a row per image and no header, arrays stored as base64 of their raw bytes (float32 boxes
  and features, int64 object ids, float32 confidences). The original field order is
  `image_id, image_w, image_h, num_boxes, boxes, features`; LXMERT's adds object and attribute columns.

Both map onto the region record schema of `docs/architecture.md`.
"""

from __future__ import annotations

import base64
import csv
import os
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np


BOTTOM_UP_TSV_FIELDS = ("image_id", "image_w", "image_h", "num_boxes", "boxes", "features")
LXMERT_TSV_FIELDS = (
    "img_id",
    "img_h",
    "img_w",
    "objects_id",
    "objects_conf",
    "attrs_id",
    "attrs_conf",
    "num_boxes",
    "boxes",
    "features",
)

_ALIASES = {
    "image_id": ("image_id", "img_id"),
    "features": ("features", "x", "feat", "region_features"),
    "boxes": ("boxes", "bbox", "region_boxes"),
    "class_probs": ("cls_prob", "class_probs", "region_class_probs"),
    "class_labels": ("objects_id", "objects", "class_labels", "region_class_labels"),
    "width": ("image_w", "img_w", "image_width", "width"),
    "height": ("image_h", "img_h", "image_height", "height"),
}
# Column dtypes of the base64 TSV layouts.
_TSV_DTYPES = {
    "boxes": np.float32,
    "features": np.float32,
    "cls_prob": np.float32,
    "objects_id": np.int64,
    "objects_conf": np.float32,
    "attrs_id": np.int64,
    "attrs_conf": np.float32,
}


def _first(mapping: dict[str, Any], field: str):
    for alias in _ALIASES[field]:
        if alias in mapping:
            return mapping[alias]
    return None


def _to_raw(values: dict[str, Any], source: str) -> dict[str, Any]:
    features = _first(values, "features")
    boxes = _first(values, "boxes")
    width, height = _first(values, "width"), _first(values, "height")
    missing = [name for name, value in (("features", features), ("boxes", boxes)) if value is None]
    missing += [name for name, value in (("image width", width), ("image height", height)) if value is None]
    if missing:
        raise ValueError(f"{source}: no {', '.join(missing)} (keys: {sorted(values)})")
    features = np.asarray(features, dtype=np.float32)
    boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
    if features.ndim != 2 or features.shape[0] != boxes.shape[0]:
        raise ValueError(f"{source}: features {features.shape} do not match {boxes.shape[0]} boxes")
    probs = _first(values, "class_probs")
    labels = _first(values, "class_labels")
    probs = None if probs is None else np.asarray(probs, dtype=np.float32).reshape(boxes.shape[0], -1)
    labels = None if labels is None else np.asarray(labels, dtype=np.int64).reshape(-1)
    image_id = _first(values, "image_id")
    return {
        "image_id": None if image_id is None else str(np.asarray(image_id).item()),
        "region_features": features,
        "region_boxes": boxes,
        "region_class_probs": probs,
        "region_class_labels": labels,
        "image_width": int(np.asarray(width).item()),
        "image_height": int(np.asarray(height).item()),
    }


def read_npz_regions(path: str | os.PathLike) -> dict[str, Any]:
    """Reads one per-image `.npz` (pickled objects are refused: such files can run code on load).

    Returns:
        A dict with `region_features`, `region_boxes`, `region_class_probs` (or None), `region_class_labels`
        (or None), `image_width`, `image_height` and `image_id` (or None).
    """
    with np.load(path, allow_pickle=False) as npz:
        values = {key: npz[key] for key in npz.files}
    return _to_raw(values, str(path))


def write_npz_regions(path: str | os.PathLike, record: dict[str, Any]) -> None:
    """Writes a region record in the bottom-up-attention `.npz` naming (`x`, `bbox`, `cls_prob`, `image_w`, ...)."""
    values = {
        "x": np.asarray(record["region_features"], dtype=np.float32),
        "bbox": np.asarray(record["region_boxes"], dtype=np.float32),
        "num_bbox": np.int64(len(record["region_boxes"])),
        "image_w": np.int64(record["image_width"]),
        "image_h": np.int64(record["image_height"]),
    }
    if record.get("region_class_probs") is not None:
        values["cls_prob"] = np.asarray(record["region_class_probs"], dtype=np.float32)
    if record.get("region_class_labels") is not None:
        values["objects_id"] = np.asarray(record["region_class_labels"], dtype=np.int64)
    np.savez_compressed(path, **values)


def _decode_tsv_row(row: dict[str, str], source: str) -> dict[str, Any]:
    num_boxes = int(row["num_boxes"])
    values: dict[str, Any] = {key: value for key, value in row.items() if key not in _TSV_DTYPES}
    for key, dtype in _TSV_DTYPES.items():
        if row.get(key):
            array = np.frombuffer(base64.b64decode(row[key]), dtype=dtype)
            values[key] = array.reshape(num_boxes, -1) if key in ("boxes", "features", "cls_prob") else array
    return _to_raw(values, source)


def _set_csv_field_limit():
    # Base64 feature columns are megabytes long, far beyond csv's default field limit.
    limit = sys.maxsize
    while True:
        try:
            csv.field_size_limit(limit)
            return
        except OverflowError:
            limit //= 10


class TsvRegionIndex:
    """Random access to the rows of a bottom-up-attention `.tsv` by image id (byte offsets are indexed once).

    Args:
        path: The `.tsv` file.
        fieldnames: Column names in order; by default the original bottom-up layout, or LXMERT's when a row has
            its number of columns.
    """

    def __init__(self, path: str | os.PathLike, fieldnames: Sequence[str] | None = None):
        _set_csv_field_limit()
        self.path = Path(path)
        self.fieldnames = tuple(fieldnames) if fieldnames else None
        self._offsets: dict[str, int] = {}
        with open(self.path, "rb") as handle:
            offset = handle.tell()
            for line in iter(handle.readline, b""):
                key = line.split(b"\t", 1)[0].decode("utf-8")
                if key:
                    self._offsets[key] = offset
                offset = handle.tell()

    def _fields_for(self, num_columns: int) -> tuple[str, ...]:
        if self.fieldnames:
            return self.fieldnames
        for candidate in (BOTTOM_UP_TSV_FIELDS, LXMERT_TSV_FIELDS):
            if len(candidate) == num_columns:
                return candidate
        raise ValueError(f"{self.path}: rows have {num_columns} columns; pass `tsv_fieldnames` to name them")

    def keys(self) -> list[str]:
        return list(self._offsets)

    def __contains__(self, key: str) -> bool:
        return key in self._offsets

    def __getitem__(self, key: str) -> dict[str, Any]:
        if key not in self._offsets:
            raise KeyError(f"image id {key!r} is not in {self.path}")
        with open(self.path, encoding="utf-8", newline="") as handle:
            handle.seek(self._offsets[key])
            columns = next(csv.reader([handle.readline().rstrip("\r\n")], delimiter="\t"))
        row = dict(zip(self._fields_for(len(columns)), columns))
        return _decode_tsv_row(row, f"{self.path} (image id {key})")


def write_tsv_regions(
    path: str | os.PathLike, records: Iterable[dict[str, Any]], fieldnames: Sequence[str] = BOTTOM_UP_TSV_FIELDS
) -> None:
    """Writes region records as a bottom-up-attention `.tsv` (base64 arrays, no header)."""
    columns = {
        "image_id": lambda r: r["image_id"],
        "img_id": lambda r: r["image_id"],
        "image_w": lambda r: r["image_width"],
        "img_w": lambda r: r["image_width"],
        "image_h": lambda r: r["image_height"],
        "img_h": lambda r: r["image_height"],
        "num_boxes": lambda r: len(r["region_boxes"]),
        "boxes": lambda r: r["region_boxes"],
        "features": lambda r: r["region_features"],
        "cls_prob": lambda r: r.get("region_class_probs"),
        "objects_id": lambda r: r.get("region_class_labels"),
        "objects_conf": lambda r: (
            None if r.get("region_class_probs") is None else np.asarray(r["region_class_probs"]).max(axis=1)
        ),
        "attrs_id": lambda r: np.zeros(len(r["region_boxes"]), dtype=np.int64),
        "attrs_conf": lambda r: np.zeros(len(r["region_boxes"]), dtype=np.float32),
    }
    with open(path, "w", encoding="utf-8", newline="") as handle:
        writer = csv.writer(handle, delimiter="\t", lineterminator="\n")
        for record in records:
            row = []
            for name in fieldnames:
                value = columns[name](record)
                if name in _TSV_DTYPES:
                    value = (
                        ""
                        if value is None
                        else base64.b64encode(np.ascontiguousarray(value, dtype=_TSV_DTYPES[name]).tobytes()).decode(
                            "ascii"
                        )
                    )
                row.append(value)
            writer.writerow(row)


__all__ = ["LXMERT_TSV_FIELDS", "TsvRegionIndex", "read_npz_regions", "write_npz_regions", "write_tsv_regions"]
