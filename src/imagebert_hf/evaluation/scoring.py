"""Batched cross-encoder scoring of (image, text) pairs from cached regions and cached tokenization.

The functions live in `models/imagebert/retrieval_index.py`, next to the retrieval pipeline that uses them too (that
folder travels as remote code); this module is their evaluation-side name.
"""

from ..models.imagebert.retrieval_index import (
    REGION_KEYS,
    TEXT_KEYS,
    RegionBatches,
    gather_pair_inputs,
    model_device,
    num_region_images,
    prepare_region_inputs,
    prepare_text_inputs,
    score_all_pairs,
    score_pairs,
)


__all__ = [
    "REGION_KEYS",
    "TEXT_KEYS",
    "RegionBatches",
    "gather_pair_inputs",
    "model_device",
    "num_region_images",
    "prepare_region_inputs",
    "prepare_text_inputs",
    "score_all_pairs",
    "score_pairs",
]
