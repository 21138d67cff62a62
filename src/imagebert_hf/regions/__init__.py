"""Region extraction at scale: the resumable, deduplicated region cache (Arrow shards) and its command-line tool.

The extractor itself (`ImageBERTRoIExtractor`, its backends and the precomputed bottom-up-attention formats) lives in
`imagebert_hf.models.imagebert`, because saved processors carry it as remote code.
"""

from typing import TYPE_CHECKING

from ..models.imagebert.lazy_names import lazy_names


if TYPE_CHECKING:
    from .cache_reader import load_region_cache, load_region_dataset
    from .cache_writer import extract_regions

# The names load their module on first access, so `imagebert-extract-regions --help` imports no torch.
_MODULES = {"cache_reader": ["load_region_cache", "load_region_dataset"], "cache_writer": ["extract_regions"]}
__getattr__, __dir__ = lazy_names(__name__, _MODULES, globals())


__all__ = ["extract_regions", "load_region_cache", "load_region_dataset"]
