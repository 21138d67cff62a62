"""Padded model-input batches of a gallery of images, read on demand from a region cache's memory-mapped shards."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from ..models.imagebert.region_batching import pad_region_records


if TYPE_CHECKING:
    from .cache_reader import RegionCache


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


__all__ = ["RegionGallery"]
