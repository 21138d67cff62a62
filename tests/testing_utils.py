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


def run_without_the_package(script: str, cwd, *args: str):
    """Runs `script` in a fresh offline interpreter where `imagebert_hf` cannot be imported, as on a machine that only
    has a saved folder's remote code, and returns the JSON its last printed line holds."""
    import json
    import subprocess
    import sys

    preamble = 'import sys\nsys.modules["imagebert_hf"] = None  # as if the package were not installed\n'
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(Path(cwd) / "modules"))
    done = subprocess.run(
        [sys.executable, "-c", preamble + script, *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    # A saved extractor's weights come from the folder, not from a fresh random initialisation.
    assert "randomly initialised" not in done.stderr, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])
