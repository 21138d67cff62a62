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
import math
import os
import sys
import zipfile
import zlib
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .region_batching import PROB_SUM_TOLERANCE


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


def _found(mapping: dict[str, Any], field: str) -> str:
    """The key under which `field` was found, so that messages name what the file holds."""
    return next((alias for alias in _ALIASES[field] if alias in mapping), field)


def _check_aliases(values: dict[str, Any], source: str) -> None:
    # Two keys for one field that disagree (features under both `features` and `x`, say) mean the file mixes two
    # extractions; reading either would be a guess.
    for field, aliases in _ALIASES.items():
        present = [alias for alias in aliases if alias in values]
        for alias in present[1:]:
            first, other = np.asarray(values[present[0]]), np.asarray(values[alias])
            if first.shape != other.shape or not np.array_equal(first, other):
                raise ValueError(
                    f"{source}: {present[0]!r} and {alias!r} both hold the {field.replace('_', ' ')} and differ; "
                    "keep one of them"
                )


def _numbers(value: Any, key: str, source: str, dtype=np.float32) -> np.ndarray:
    """`value` as an array of `dtype`; float32 takes any real numbers, int64 whole numbers only (a float label is
    never rounded into a class)."""
    array = np.asarray(value)
    kinds = "iu" if dtype is np.int64 else "iuf"
    whole_floats = dtype is np.int64 and array.dtype.kind == "f"
    if array.dtype.kind not in kinds and not whole_floats:
        expected = "integers" if dtype is np.int64 else "numbers"
        raise ValueError(f"{source}: {key!r} has dtype {array.dtype}, expected {expected}")
    if whole_floats:
        odd = ~np.isfinite(array) | (array != np.round(array))
        if odd.any():
            raise ValueError(
                f"{source}: {key!r} holds {array[odd].reshape(-1)[0].item()!r}, expected whole numbers (class ids)"
            )
    return array.astype(dtype)


def _size(value: Any, name: str, source: str) -> int:
    array = np.asarray(value)
    try:
        number = float(array.item()) if array.dtype.kind in "iufUS" else math.nan
    except (TypeError, ValueError):
        number = math.nan
    if array.dtype.kind == "b" or not math.isfinite(number) or number != int(number) or number <= 0:
        shown = repr(array.item()) if array.size == 1 else f"an array of shape {array.shape}"
        raise ValueError(f"{source}: {name!r} is {shown}, expected the image size in pixels (a whole number > 0)")
    return int(number)


def _image_id(value: Any, key: str, source: str) -> str | None:
    if value is None:
        return None
    array = np.asarray(value)
    if array.size != 1:
        raise ValueError(f"{source}: {key!r} has shape {array.shape}, expected one image id")
    item = array.item()
    return item.decode("utf-8", "replace") if isinstance(item, bytes) else str(item)


# A box corner may overshoot the image by rounding (boxes scaled back from the detector's input); one further out
# means boxes in another frame than the stored image size (the resized input, say), which clipping would hide.
BOX_TOLERANCE = 0.01


def _check_boxes_inside(boxes: np.ndarray, key: str, width: int, height: int, source: str) -> None:
    limits = np.array([width, height, width, height], dtype=np.float32)
    slack = np.maximum(1.0, BOX_TOLERANCE * limits)
    with np.errstate(invalid="ignore"):
        # NaN and infinite corners are left to the check of non-finite values, which names them as such.
        outside = np.isfinite(boxes) & ((boxes < -slack) | (boxes > limits + slack))
    rows = np.flatnonzero(outside.any(axis=1))
    if rows.size:
        raise ValueError(
            f"{source}: {key!r} row {int(rows[0])} is {boxes[rows[0]].tolist()}, outside the {width}x{height} image "
            f"({rows.size} such rows); boxes must be pixel corners of the image whose size the file gives"
        )


def _check_distributions(probs: np.ndarray, key: str, source: str) -> None:
    with np.errstate(invalid="ignore", over="ignore"):
        sums = probs.sum(axis=1, dtype=np.float64)
        bad = (
            ~np.isfinite(probs).all(axis=1)
            | (probs < 0).any(axis=1)
            | ((np.abs(sums - 1) > PROB_SUM_TOLERANCE) & (sums != 0))
        )
    rows = np.flatnonzero(bad)
    if rows.size:
        row = int(rows[0])
        raise ValueError(
            f"{source}: {key!r} row {row} sums to {sums[row]:.4g} (lowest value {probs[row].min():.4g}; "
            f"{rows.size} such rows), expected a probability distribution per region: finite, non-negative values "
            f"summing to 1 within {PROB_SUM_TOLERANCE} (all zeros for none)"
        )


def _to_raw(values: dict[str, Any], source: str) -> dict[str, Any]:
    _check_aliases(values, source)
    features = _first(values, "features")
    boxes = _first(values, "boxes")
    width, height = _first(values, "width"), _first(values, "height")
    missing = [name for name, value in (("features", features), ("boxes", boxes)) if value is None]
    missing += [name for name, value in (("image width", width), ("image height", height)) if value is None]
    if missing:
        raise ValueError(f"{source}: no {', '.join(missing)} (keys: {sorted(values)})")
    image_width = _size(width, _found(values, "width"), source)
    image_height = _size(height, _found(values, "height"), source)
    boxes_key = _found(values, "boxes")
    features = _numbers(features, _found(values, "features"), source)
    boxes = _numbers(boxes, boxes_key, source)
    # A flat array of corners is common; a 2-D one with other than 4 columns (a score column, say) is not boxes.
    if (boxes.ndim == 2 and boxes.shape[1] != 4) or boxes.ndim > 2 or boxes.size % 4:
        raise ValueError(f"{source}: {boxes_key!r} has shape {boxes.shape}, expected (num_boxes, 4)")
    boxes = boxes.reshape(-1, 4)
    num_boxes = boxes.shape[0]
    if num_boxes == 0 and features.size == 0 and features.ndim != 2:
        # An image without regions, stored flat: its feature size is unknown (0 columns) rather than wrong.
        features = features.reshape(0, 0)
    if features.ndim != 2 or features.shape[0] != num_boxes:
        raise ValueError(f"{source}: features {features.shape} do not match {num_boxes} boxes")
    # NaN compares false here and is reported by the extractor as a non-finite value instead.
    inverted = np.flatnonzero((boxes[:, 2] < boxes[:, 0]) | (boxes[:, 3] < boxes[:, 1]))
    if inverted.size:
        raise ValueError(
            f"{source}: {boxes_key!r} row {int(inverted[0])} is {boxes[inverted[0]].tolist()}, with x2 < x1 or "
            f"y2 < y1 ({inverted.size} such rows); boxes must be (x1, y1, x2, y2) corners, not (x, y, width, height)"
        )
    _check_boxes_inside(boxes, boxes_key, image_width, image_height, source)
    probs = _first(values, "class_probs")
    if probs is not None:
        probs_key = _found(values, "class_probs")
        probs = _numbers(probs, probs_key, source)
        rows = probs.shape[0] if probs.ndim == 2 else None
        if probs.ndim == 1 and num_boxes and probs.size % num_boxes == 0:
            rows, probs = num_boxes, probs.reshape(num_boxes, -1)
        elif probs.ndim == 1 and num_boxes == 0 and probs.size == 0:
            rows, probs = 0, probs.reshape(0, 0)
        if rows != num_boxes:
            raise ValueError(
                f"{source}: {probs_key!r} has shape {probs.shape}, expected one row per box ({num_boxes} boxes)"
            )
        _check_distributions(probs, probs_key, source)
    labels = _first(values, "class_labels")
    if labels is not None:
        labels_key = _found(values, "class_labels")
        labels = _numbers(labels, labels_key, source, np.int64).reshape(-1)
        if labels.shape[0] != num_boxes:
            raise ValueError(f"{source}: {labels_key!r} has {labels.shape[0]} labels for {num_boxes} boxes")
        negative = labels[(labels < 0) & (labels != -100)]
        if negative.size:
            raise ValueError(
                f"{source}: {labels_key!r} holds the class id {int(negative[0])}, expected class ids >= 0 "
                "(-100 for none)"
            )
    return {
        "image_id": _image_id(_first(values, "image_id"), _found(values, "image_id"), source),
        "region_features": features,
        "region_boxes": boxes,
        "region_class_probs": probs,
        "region_class_labels": labels,
        "image_width": image_width,
        "image_height": image_height,
    }


def read_npz_regions(path: str | os.PathLike) -> dict[str, Any]:
    """Reads one per-image `.npz` (pickled objects are refused: such files can run code on load).

    Returns:
        A dict with `region_features`, `region_boxes`, `region_class_probs` (or None), `region_class_labels`
        (or None), `image_width`, `image_height` and `image_id` (or None).
    """
    try:
        with open(path, "rb") as handle:
            # Anything else (a lone .npy, a pickle, a cut file) would reach numpy's pickle fallback or its messages.
            if not zipfile.is_zipfile(handle):
                raise ValueError(f"{path}: not a .npz archive (a zip of .npy arrays, as numpy.savez writes)")
            handle.seek(0)
            with np.load(handle, allow_pickle=False) as npz:
                repeated = sorted(key for key, count in Counter(npz.files).items() if count > 1)
                if repeated:
                    # Two arrays of one name: which one numpy returns is an accident of the zip's layout.
                    raise ValueError(f"{path}: the archive holds {repeated[0]!r} twice; each key must appear once")
                values = {key: npz[key] for key in npz.files}
    except (OSError, EOFError, KeyError, NotImplementedError, zipfile.BadZipFile, zlib.error) as error:
        raise ValueError(f"{path}: cannot read the .npz archive ({type(error).__name__}: {error})") from None
    except ValueError as error:  # pickled arrays (refused), damaged .npy headers
        message = str(error)
        raise ValueError(message if message.startswith(f"{path}: ") else f"{path}: {message}") from None
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
    try:
        num_boxes = int(row["num_boxes"])
    except (KeyError, ValueError):
        num_boxes = -1
    if num_boxes < 0:
        raise ValueError(f"{source}: column 'num_boxes' is {row.get('num_boxes')!r}, expected a count of boxes >= 0")
    values: dict[str, Any] = {key: value for key, value in row.items() if key not in _TSV_DTYPES}
    for key, dtype in _TSV_DTYPES.items():
        if key in ("boxes", "features") and key in row and not row[key] and num_boxes == 0:
            # An image without regions: base64 of no bytes is the empty string (its feature size is unknown).
            values[key] = np.zeros((0, 4 if key == "boxes" else 0), dtype=dtype)
        elif row.get(key):
            try:
                array = np.frombuffer(base64.b64decode(row[key]), dtype=dtype)
                if key in ("boxes", "features", "cls_prob"):
                    array = array.reshape(num_boxes, -1)
            except ValueError as error:  # binascii.Error included
                raise ValueError(
                    f"{source}: column {key!r} does not decode to {num_boxes} rows of {np.dtype(dtype).name} "
                    f"({error}); the row may be cut short"
                ) from None
            values[key] = array
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

    Image ids are read as `csv` reads them, so ids that `write_tsv_regions` quoted are found; a leading UTF-8
    byte-order mark is skipped.

    Args:
        path: The `.tsv` file.
        fieldnames: Column names in order; by default the original bottom-up layout, or LXMERT's when a row has
            its number of columns.

    Raises:
        ValueError: An image id is on two rows (the message names both lines), a line is not UTF-8, or a quoted
            field is never closed.
    """

    def __init__(self, path: str | os.PathLike, fieldnames: Sequence[str] | None = None):
        _set_csv_field_limit()
        self.path = Path(path)
        self.fieldnames = tuple(fieldnames) if fieldnames else None
        self._offsets: dict[str, int] = {}
        lines: dict[str, int] = {}
        with open(self.path, "rb") as handle:
            reader = _RecordReader(handle, self.path)
            while (start := reader.next_record_head()) is not None:
                offset, line_number, key = start
                if not key:
                    continue
                if key in lines:
                    # Serving either row would silently give some images the regions of another extraction.
                    raise ValueError(
                        f"{self.path}: image id {key!r} is on line {lines[key]} and again on line {line_number}; "
                        "each image id must appear once"
                    )
                lines[key] = line_number
                self._offsets[key] = offset

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
        with open(self.path, "rb") as handle:
            handle.seek(self._offsets[key])
            columns = _RecordReader(handle, self.path).read_record()
        row = dict(zip(self._fields_for(len(columns)), columns))
        missing = [name for name in self._fields_for(len(columns)) if name not in row]
        if missing:
            raise ValueError(
                f"{self.path} (image id {key}): the row has {len(columns)} columns, no {', '.join(missing)}; "
                "the row may be cut short"
            )
        return _decode_tsv_row(row, f"{self.path} (image id {key})")


class _RecordReader:
    """Reads a `.tsv` record by record from a binary handle, as `csv` parses it, keeping byte offsets.

    A record is one line unless a quoted field holds a line break; only lines with a quote go through `csv`, so
    indexing a file of long base64 rows stays a scan of lines.
    """

    def __init__(self, handle, path: Path):
        self.handle = handle
        self.path = path
        self.line_number = 0
        if handle.tell() == 0 and handle.read(3) != b"\xef\xbb\xbf":
            # The BOM some editors write would otherwise become part of the first image id.
            handle.seek(0)

    def _lines(self, first: bytes):
        line = first
        while line:
            try:
                yield line.decode("utf-8")
            except UnicodeDecodeError as error:
                raise ValueError(f"{self.path}: line {self.line_number} is not UTF-8 ({error})") from None
            line = self.handle.readline()
            if line:
                self.line_number += 1

    def _parse(self, first: bytes) -> list[str]:
        line_number = self.line_number
        try:
            # Strict, so that a quote never closed is an error rather than the rest of the file read as one id.
            return next(csv.reader(self._lines(first), delimiter="\t", strict=True), [])
        except csv.Error as error:
            raise ValueError(f"{self.path}: the row on line {line_number} is not valid TSV ({error})") from None

    def read_record(self) -> list[str]:
        line = self.handle.readline()
        self.line_number += 1
        return self._parse(line) if line else []

    def next_record_head(self) -> tuple[int, int, str] | None:
        """(byte offset, line number, image id) of the next record, or None at the end of the file."""
        offset = self.handle.tell()
        line = self.handle.readline()
        if not line:
            return None
        self.line_number += 1
        line_number = self.line_number
        if b'"' in line:
            columns = self._parse(line)
            return offset, line_number, columns[0] if columns else ""
        end = line.find(b"\t")
        head = line[:end] if end >= 0 else line.rstrip(b"\r\n")
        try:
            return offset, line_number, head.decode("utf-8")
        except UnicodeDecodeError as error:
            raise ValueError(f"{self.path}: line {line_number} is not UTF-8 ({error})") from None


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
