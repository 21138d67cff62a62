"""Helpers shared by the tests: tiny configs, the real-data location and skip markers."""

import os
from pathlib import Path

import pytest


PROJECT_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("IMAGEBERT_SHARED_DATA", PROJECT_ROOT.parent / "shared" / "data"))
COCO_DIR = SHARED_DATA / "coco_val2017_128"
FLICKR_DIR = SHARED_DATA / "flickr8k_trainval"

require_shared_data = pytest.mark.skipif(
    not (COCO_DIR / "captions.jsonl").is_file() or not (FLICKR_DIR / "captions.jsonl").is_file(),
    reason=f"real data not found at {SHARED_DATA} (set IMAGEBERT_SHARED_DATA to the folder holding "
    "coco_val2017_128/ and flickr8k_trainval/)",
)


def _module_available(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


def require_module(name: str):
    return pytest.mark.skipif(not _module_available(name), reason=f"the optional package {name!r} is not installed")


def tiny_config_kwargs(**overrides) -> dict:
    """A configuration small enough for unit tests (tester-class practice of transformers)."""
    kwargs = {
        "vocab_size": 99,
        "hidden_size": 32,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "intermediate_size": 37,
        "max_position_embeddings": 64,
        "region_feature_size": 24,
        "num_object_classes": 11,
        "max_regions": 10,
        "max_text_length": 16,
        "hidden_dropout_prob": 0.0,
        "attention_probs_dropout_prob": 0.0,
        "contrastive_embedding_size": 16,
    }
    kwargs.update(overrides)
    return kwargs
