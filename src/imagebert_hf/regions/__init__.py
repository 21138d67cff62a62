"""Region extraction at scale: the resumable, deduplicated region cache (Arrow shards) and its command-line tool.

The extractor itself (`ImageBERTRoIExtractor`, its backends and the precomputed bottom-up-attention formats) lives in
`imagebert_hf.models.imagebert`, because saved processors carry it as remote code.
"""

import importlib
from typing import TYPE_CHECKING


if TYPE_CHECKING:
    from .cache_reader import load_region_cache, load_region_dataset
    from .cache_writer import extract_regions

# The names load their module on first access, so `imagebert-extract-regions --help` imports no torch.
_LAZY_NAMES = {
    "extract_regions": "cache_writer",
    "load_region_cache": "cache_reader",
    "load_region_dataset": "cache_reader",
}


def __getattr__(name: str):
    module = _LAZY_NAMES.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


__all__ = ["extract_regions", "load_region_cache", "load_region_dataset"]
