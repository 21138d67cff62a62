"""One batch of regions from many region records: the padding every part of the package shares.

A region record is what the extractor returns, a region-cache row or a precomputed file gives: `region_features`
(R, F), `region_locations` (R, 5; UNITER's 7-d boxes: R, 7) and optionally `region_class_labels` (R,) and `region_class_probs` (R, C). The
processor, the pretraining collator, the retrieval corpus, zero-shot evaluation and the retrieval pipeline all turn a
list of them into model inputs with `pad_region_records`. This file travels as remote code with the processor and
the pipeline, so it imports only torch and numpy.
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Mapping, Sequence
from typing import Any, TypedDict

import numpy as np
import torch


PADDING = ("longest", "max_length")
# Rounding slack of normalised box coordinates (a box edge at the image border may land a hair outside [0, 1]).
LOCATION_TOLERANCE = 1e-4
# How far a class distribution's sum may be from 1: float16 storage rounds each entry by up to 2^-11 of its value.
PROB_SUM_TOLERANCE = 1e-2

# numpy arrays from the extractor and the cache; lists and tensors are accepted wherever records are padded.
RegionArray = np.ndarray | torch.Tensor | Sequence[Any]


class RegionRecord(TypedDict, total=False):
    """The regions of one image: what the extractor returns, a region-cache row or a precomputed file gives.

    Only `region_features` and `region_locations` are needed to pad a record into model inputs; the rest is there
    when its source has it (see docs/architecture.md, "Region records").

    Attributes:
        image_id (`str`): Content hash (sha1 of the image bytes) unless the source gives an id.
        region_features (float32 (R, F)): Pooled features (float16 in a cache stored as float16).
        region_boxes (float32 (R, 4)): Pixel boxes `x1, y1, x2, y2`.
        region_locations (float32 (R, 5) or (R, 7)): As the model input (7 with `region_location_size=7`).
        region_class_labels (int64 (R,)): Arg-max class of each region.
        region_class_probs (float32 (R, C)): Class distribution (optional: large).
        region_attribute_labels (int64 (R,)): BUTD backend only: best Visual Genome attribute.
        region_attribute_scores (float32 (R,)): BUTD backend only: that attribute's probability.
        image_width (`int`), image_height (`int`): Size of the image the boxes refer to.
        num_regions (`int`): R.
        error (`str | None`): Why extraction failed for this record (its arrays are then empty).
        cache_key (`str`), source (`str`): Region-cache rows only: the content key the row is stored under and
            the source item (manifest path or dataset key) that first gave it.
    """

    image_id: str
    region_features: RegionArray
    region_boxes: RegionArray
    region_locations: RegionArray
    region_class_labels: RegionArray
    region_class_probs: RegionArray
    region_attribute_labels: RegionArray
    region_attribute_scores: RegionArray
    image_width: int
    image_height: int
    num_regions: int
    error: str | None
    cache_key: str
    source: str


def _as_tensor(value: Any, dtype: torch.dtype) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value.to(dtype)
    return torch.as_tensor(np.asarray(value), dtype=dtype)


def empty_batch_tensor(shape: Sequence[int], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """An uninitialised tensor for a batch. Inside a DataLoader worker it is allocated in shared memory, as torch's
    `default_collate` does there: the batch then reaches the training process as a handle, where otherwise every
    tensor is copied into shared memory on its way (at paper size that copy costs as much as collating)."""
    shape = tuple(int(size) for size in shape)
    if torch.utils.data.get_worker_info() is None:
        return torch.empty(shape, dtype=dtype)
    storage = torch.UntypedStorage._new_shared(math.prod(shape) * dtype.itemsize)
    return torch.empty(0, dtype=dtype).set_(storage, 0, shape)


def share_batch_tensors(batch: dict[str, Any]) -> dict[str, Any]:
    """Inside a DataLoader worker, moves the batch's tensors that are not yet in shared memory into one shared block
    and returns views of it; elsewhere returns `batch` as it is.

    A worker's batch reaches the training process through shared memory, one segment and one file descriptor per
    tensor storage; a descriptor travels over a socket, which costs as much for a (48,) label tensor as for the
    features. One block for the small tensors makes that one handle (at paper size the worker path then delivers
    1.25x the samples per CPU-second; `benchmarks/bench_loader.py`). Values, dtypes and shapes are unchanged.
    """
    if torch.utils.data.get_worker_info() is None:
        return batch
    moving = {
        name: value
        for name, value in batch.items()
        if isinstance(value, torch.Tensor) and not value.is_shared() and value.layout == torch.strided
    }
    if len(moving) < 2:
        return batch
    # Each tensor starts on a 64-byte boundary, so every dtype stays aligned.
    offsets, total = {}, 0
    for name, value in moving.items():
        offsets[name] = total
        total += -(-value.numel() * value.element_size() // 64) * 64
    block = torch.UntypedStorage._new_shared(total)
    shared = dict(batch)
    for name, value in moving.items():
        view = torch.empty(0, dtype=value.dtype).set_(block, offsets[name] // value.element_size(), value.shape)
        shared[name] = view.copy_(value)
    return shared


# The dtypes a feature tensor keeps: float32, and the half-precision ones a cache stores (no copy, half the bytes).
_KEPT_FEATURE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def as_feature_tensor(value: Any) -> torch.Tensor:
    """`value` as a floating tensor without a copy where it already is one (a float16 cache row stays float16, a
    read-only view of the mapped file): the padded batch converts it once, while it is filled. Other dtypes become
    float32: lists (a region-cache row read as a dataset, which numpy makes float64), float64 and integers."""
    if isinstance(value, torch.Tensor):
        return value if value.dtype in _KEPT_FEATURE_DTYPES else value.to(torch.float32)
    array = np.asarray(value)
    if array.dtype.kind != "f" or array.dtype.itemsize > 4:
        return torch.as_tensor(array, dtype=torch.float32)
    if array.flags.writeable:
        return torch.from_numpy(array)
    with warnings.catch_warnings():
        # A read-only view is only read (into a batch or a converted copy); torch warns because it cannot know that.
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(array)


def padded_length(
    lengths: Sequence[int],
    padding: str = "longest",
    max_length: int | None = None,
    pad_to_multiple_of: int | None = None,
) -> int:
    """The padded size of a batch whose samples have `lengths`: `max_length` with `padding="max_length"`, else the
    longest (at least 1), rounded up to a multiple of `pad_to_multiple_of` but never beyond `max_length` (a model
    checks its inputs against that limit, so 100 regions rounded to a multiple of 8 stay 100, not 104)."""
    if padding not in PADDING:
        raise ValueError(f"padding must be one of {PADDING}, got {padding!r}.")
    if pad_to_multiple_of is not None and pad_to_multiple_of < 1:
        raise ValueError(f"pad_to_multiple_of must be at least 1, got {pad_to_multiple_of}.")
    if padding == "max_length":
        if max_length is None:
            raise ValueError("padding='max_length' needs a maximum length (max_regions / max_text_length).")
        return max_length
    length = max(max(lengths, default=0), 1)
    if pad_to_multiple_of:
        length = -(-length // pad_to_multiple_of) * pad_to_multiple_of
    return length if max_length is None else min(length, max(max_length, 1))


# The per-region arrays of a record: dimensions, layout and the kind of numbers each holds.
_REGION_ARRAY_LAYOUTS = {
    "region_features": (2, "(R, F)", "numbers"),
    "region_locations": (2, "(R, L), L the location size (5, or UNITER's 7)", "numbers"),
    "region_class_labels": (1, "(R,)", "integer class ids"),
    "region_class_probs": (2, "(R, C)", "numbers"),
}
_DTYPE_KINDS = {"numbers": "iuf", "integer class ids": "iu"}


def _shape_and_kind(value: Any) -> tuple[tuple[int, ...], str, Any]:
    """The shape, numpy dtype kind and dtype of an array, tensor or list, without converting an array (the dtype is
    named only in an error: naming a numpy dtype costs more than the rest of the check)."""
    if isinstance(value, torch.Tensor):
        dtype = value.dtype
        kind = "b" if dtype == torch.bool else "c" if dtype.is_complex else "f" if dtype.is_floating_point else "i"
        return tuple(value.shape), kind, dtype
    array = value if isinstance(value, np.ndarray) else np.asarray(value)
    return array.shape, array.dtype.kind, array.dtype


def check_region_record(
    record: Mapping[str, Any],
    name: str,
    num_classes: int | None = None,
    keys: Sequence[str] = tuple(_REGION_ARRAY_LAYOUTS),
) -> None:
    """Checks the shapes and dtypes of one region record's per-region arrays (`keys`; absent or None ones are
    skipped), on the whole record, before anything is cut to `max_regions`: a cut would hide rows that disagree.
    `region_features` (R, F) and `region_locations` (R, L) hold numbers, `region_class_labels` (R,) integers (a
    float label is never rounded into a class), `region_class_probs` (R, C), C = `num_classes` when given. A record
    without regions needs every array empty.

    Raises:
        ValueError: naming `name` (the record: its image or position), the array, what it holds and what was
            expected.
    """
    shapes = {}
    for key in keys:
        value = record.get(key)
        if value is None:
            continue
        _, layout, numbers = _REGION_ARRAY_LAYOUTS[key]
        try:
            shape, kind, dtype = _shape_and_kind(value)
        except (TypeError, ValueError) as error:
            raise ValueError(f"{name}: {key} is not an array of {numbers} {layout} ({error}).") from error
        if kind not in _DTYPE_KINDS[numbers]:
            raise ValueError(f"{name}: {key} has dtype {str(dtype).replace('torch.', '')}; expected {numbers}.")
        shapes[key] = shape
    features = shapes.get("region_features")
    if features is not None and math.prod(features) == 0:
        non_empty = {key: shape for key, shape in shapes.items() if math.prod(shape)}
        if non_empty:
            key, shape = next(iter(non_empty.items()))
            raise ValueError(f"{name}: region_features is empty (shape {features}) but {key} has shape {shape}.")
        return
    for key, shape in shapes.items():
        ndim, layout, _ = _REGION_ARRAY_LAYOUTS[key]
        if len(shape) != ndim:
            raise ValueError(f"{name}: {key} has shape {shape}; expected {layout}.")
        if features is not None and shape[0] != features[0]:
            raise ValueError(
                f"{name}: {key} has {shape[0]} rows but region_features has {features[0]} ({key} of shape {shape}, "
                f"region_features of shape {features}); every array has one row per region."
            )
    probs = shapes.get("region_class_probs")
    if probs is not None and num_classes is not None and probs[1] != num_classes:
        raise ValueError(
            f"{name}: region_class_probs hold {probs[1]} classes per region; expected {num_classes} "
            "(num_object_classes)."
        )


def _record_arrays(
    records: list[RegionRecord],
    max_regions: int | None,
    feature_size: int | None,
    location_size: int,
    keys: Sequence[str] = ("region_features", "region_locations"),
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Each record's (R, F) features and (R, L) locations as tensors, cut to `max_regions`; a failed or malformed
    record (its `keys` checked by `check_region_record` before the cut) raises, naming it."""
    features, locations = [], []
    for index, record in enumerate(records):
        if record.get("error"):
            raise ValueError(f"regions of sample {index} ({record.get('image_id')}) failed: {record['error']}")
        if "region_features" not in record or "region_locations" not in record:
            raise ValueError(
                f"region record {index} ({record.get('image_id')}) needs region_features and region_locations; got "
                f"keys {sorted(record)}."
            )
        check_region_record(record, f"region record {index} ({record.get('image_id')})", keys=keys)
        feature = as_feature_tensor(record["region_features"])
        location = _as_tensor(record["region_locations"], torch.float32)
        if feature.numel() == 0:
            feature = feature.reshape(0, feature.shape[-1] if feature.ndim == 2 else feature_size or 0)
            location = location.reshape(0, location.shape[-1] if location.ndim == 2 else location_size)
        features.append(feature[:max_regions] if max_regions is not None else feature)
        locations.append(location[: features[-1].shape[0]])
    return features, locations


def _pad_per_region(
    key: str,
    fill: float | int,
    values: list,
    counts: list[int],
    width: int,
    num_classes: int | None,
    names: Sequence[Any],
) -> torch.Tensor:
    """One per-region array of every record (None: the record has none) padded to (N, `width`, ...) with `fill`;
    a record without `region_class_labels` gets -100 (no MOC target) on every region. A record whose rows are
    shaped unlike the others' (class distributions of another width) raises, naming it (`names`)."""
    if key == "region_class_labels":
        values = [
            torch.full((count,), -100) if v is None else _as_tensor(v, torch.long) for v, count in zip(values, counts)
        ]
    else:
        values = [
            _as_tensor(v, torch.float32 if isinstance(fill, float) else torch.long)
            if not isinstance(v, torch.Tensor)
            else v
            for v in values
        ]
    trailing = next((v.shape[1:] for v in values if v.shape[0]), None)
    if trailing is None:
        trailing = (num_classes or 0,) if key == "region_class_probs" else values[0].shape[1:]
    padded = torch.full((len(values), width, *trailing), fill, dtype=values[0].dtype)
    for i, (value, count) in enumerate(zip(values, counts)):
        if value.shape[0] < count:
            raise ValueError(f"{key} of region record {i} has {value.shape[0]} rows but it has {count} regions.")
        if count and value.shape[1:] != trailing:
            raise ValueError(
                f"{key} of region record {i} ({names[i]}) has rows of shape {tuple(value.shape[1:])}; the other "
                f"records' have {tuple(trailing)}."
            )
        padded[i, :count] = value[:count].reshape(count, *trailing)
    return padded


def pad_region_records(
    records: Sequence[RegionRecord],
    padding: str = "longest",
    max_regions: int | None = None,
    pad_to_multiple_of: int | None = None,
    return_labels: bool = False,
    return_probs: bool = False,
    extra_keys: Mapping[str, Any] | None = None,
    feature_size: int | None = None,
    num_classes: int | None = None,
    location_size: int = 5,
    return_tensors: str = "pt",
    feature_dtype: torch.dtype | None = torch.float32,
) -> dict[str, Any]:
    """Pads region records into `region_features` (N, R, F), `region_locations` (N, R, L) and
    `region_attention_mask` (N, R), zero on padding.

    Args:
        records: Region records (dicts with `region_features` and `region_locations`, numpy arrays, lists or
            tensors). A record whose extraction failed (its `error` set) raises, naming it.
        padding: `"longest"` (the most regions of any record) or `"max_length"` (`max_regions`).
        max_regions: Regions kept per record; also the cap of any rounding.
        pad_to_multiple_of: Round R up to a multiple of this (capped by `max_regions`).
        return_labels: Add `region_class_labels` (N, R): the records' labels, -100 on padding and where a record
            has none (MOC ignores those).
        return_probs: Add `region_class_probs` (N, R, C) when every record has them.
        extra_keys: Other per-region arrays to pad, `{name: fill_value}` (the collator's MRFR targets and masks).
        feature_size, num_classes, location_size: F, C and L where no record has a region to read them from.
        return_tensors: `"pt"` (torch tensors) or `"np"` (numpy arrays).
        feature_dtype: The dtype of the padded `region_features`; None keeps the records' own floating dtype (a
            float16 cache gives a float16 batch: exact, half the bytes to write and move; the model converts it).

    Returns:
        A dict of the padded arrays.
    """
    if return_tensors not in ("pt", "np"):
        raise ValueError(f"return_tensors must be 'pt' or 'np', got {return_tensors!r}.")
    records = list(records)
    if not records:
        raise ValueError("no region records to pad.")
    padded = dict(extra_keys or {})
    if return_labels:
        padded["region_class_labels"] = -100
    if return_probs and all(record.get("region_class_probs") is not None for record in records):
        padded["region_class_probs"] = 0.0
    checked = ("region_features", "region_locations", *(key for key in padded if key in _REGION_ARRAY_LAYOUTS))
    features, locations = _record_arrays(records, max_regions, feature_size, location_size, checked)
    sizes = {f.shape[1] for f in features if len(f)} or {feature_size or 0}
    if len(sizes) > 1:
        raise ValueError(f"the region records have different feature sizes {sorted(sizes)}.")
    dim = sizes.pop()
    location_sizes = {loc.shape[1] for loc in locations if len(loc)} or {location_size}
    if len(location_sizes) > 1:
        raise ValueError(f"the region records have different location sizes {sorted(location_sizes)}.")
    counts = [f.shape[0] for f in features]
    width = padded_length(counts, padding, max_regions, pad_to_multiple_of)
    batch = len(records)
    out = {
        # Filled row by row (converting to `feature_dtype` on the way) and zeroed only on padding: the features are
        # most of a batch's bytes (40 MB at 48 x 100 x 2048 in float32), so they are written once.
        "region_features": empty_batch_tensor(
            (batch, width, dim),
            feature_dtype or functools.reduce(torch.promote_types, [f.dtype for f in features], torch.float16),
        ),
        "region_locations": torch.zeros(batch, width, location_sizes.pop()),
        "region_attention_mask": torch.zeros(batch, width, dtype=torch.long),
    }
    for i, (feature, location, count) in enumerate(zip(features, locations, counts)):
        out["region_features"][i, :count] = feature
        out["region_features"][i, count:] = 0.0
        out["region_locations"][i, :count] = location
        out["region_attention_mask"][i, :count] = 1

    names = [record.get("image_id") for record in records]
    for key, fill in padded.items():
        values = [record.get(key) for record in records]
        out[key] = _pad_per_region(key, fill, values, counts, width, num_classes, names)
    if return_tensors == "np":
        return {key: value.numpy() for key, value in out.items()}
    return out


def _non_finite_rows(values: torch.Tensor) -> torch.Tensor:
    """(B, R) True where a region's vector in `values` (B, R, D) holds NaN or inf, exactly, in about two reads of
    `values` in its own dtype: a row's sum is non-finite if the row is (inf and NaN propagate), and only rows whose
    sum is not finite (a bad value, or a float16 sum that overflowed) are looked at element by element."""
    rows = values.sum(dim=-1)
    suspect = ~torch.isfinite(rows)
    if suspect.any():
        suspect[suspect.clone()] = ~torch.isfinite(values[suspect]).all(dim=-1)
    return suspect


def _bad_prob_rows(probs: torch.Tensor) -> torch.Tensor | None:
    """(B, R) True where a class distribution holds NaN, inf or a negative entry, or does not sum to 1 (within
    `PROB_SUM_TOLERANCE`); None when none does. A row of zeros passes: it is what the extractor and the region cache
    store for a region without a distribution (a backbone without a classifier)."""
    # Summed in the stored dtype: torch accumulates float16 and bfloat16 reductions in float32 on every device, so
    # only the result is rounded (by at most 4e-3, within the tolerance), and no float32 copy of the batch is made.
    sums = probs.sum(dim=-1).float()
    bad = ~torch.isfinite(sums) | (((sums - 1).abs() > PROB_SUM_TOLERANCE) & (sums != 0)) | (probs < 0).any(dim=-1)
    return bad if bad.any() else None


def _bad_location_rows(locations: torch.Tensor) -> torch.Tensor | None:
    """(B, R) True where a location is not finite or outside [0, 1] (give or take `LOCATION_TOLERANCE`); None after
    one read when every one is fine."""
    low, high = -LOCATION_TOLERANCE, 1 + LOCATION_TOLERANCE
    if torch.isfinite(locations.sum()) and locations.min() >= low and locations.max() <= high:
        return None
    good = torch.isfinite(locations) & (locations >= low) & (locations <= high)
    return ~good.all(dim=-1)


# What `check_region_values` checks: the array, its bad rows (None: none), what they hold and what was expected.
_REGION_VALUE_CHECKS = (
    ("region_features", _non_finite_rows, "NaN or infinite values", "finite numbers"),
    (
        "region_class_probs",
        _bad_prob_rows,
        "NaN, infinite or negative values, or rows that do not sum to 1",
        f"a probability distribution per region (summing to 1 within {PROB_SUM_TOLERANCE}; all zeros for none)",
    ),
    (
        "region_locations",
        _bad_location_rows,
        "values outside [0, 1] or not finite",
        "box coordinates and area normalised by the image size, all in [0, 1]",
    ),
)


def check_region_values(batch: Mapping[str, Any], names: Sequence[str] | None = None) -> None:
    """Checks the values of a padded region batch, where it is made (on the CPU): finite `region_features`,
    `region_class_probs` without negative or non-finite entries whose rows sum to 1 (or are all zero: no
    distribution), and `region_locations` in [0, 1] (normalised by the
    image size), in the real regions (`region_attention_mask`). The model checks only shapes and dtypes, so the same
    batch behaves alike on every device; the processor, the collators and the pipeline call this.

    The features are read once in their own dtype (a sum per region; a region whose sum is not finite is then looked
    at element by element); the message names the first bad sample by its position or, with `names`, by its name.

    Raises:
        ValueError: naming the array, the sample and what was expected.
    """
    real = batch.get("region_attention_mask")
    real = None if real is None else torch.as_tensor(real).bool()

    def first_bad(bad_rows: torch.Tensor) -> str | None:
        """The first sample with a bad real region (`bad_rows` (B, R)), named; None when there is none."""
        bad = (bad_rows & real).any(dim=1) if real is not None else bad_rows.any(dim=1)
        if not bad.any():
            return None
        index = int(bad.nonzero()[0, 0])
        return repr(names[index]) if names is not None else str(index)

    for name, bad_rows, problem, expected in _REGION_VALUE_CHECKS:
        values = batch.get(name)
        if values is None or not torch.as_tensor(values).numel():
            continue
        rows = bad_rows(torch.as_tensor(values))
        sample = None if rows is None else first_bad(rows)
        if sample is not None:
            raise ValueError(f"sample {sample}: {name} hold {problem} in real regions; expected {expected}.")


__all__ = [
    "PADDING",
    "RegionArray",
    "RegionRecord",
    "as_feature_tensor",
    "check_region_record",
    "check_region_values",
    "empty_batch_tensor",
    "pad_region_records",
    "padded_length",
    "share_batch_tensors",
]
