"""Region extraction at scale: the resumable, deduplicated region cache (Arrow shards) and its command-line tool.

The extractor itself (`ImageBERTRoIExtractor`, its backends and the precomputed bottom-up-attention formats) lives in
`imagebert_hf.models.imagebert`, because saved processors carry it as remote code.
"""

from .cache_reader import load_region_cache, load_region_dataset
from .cache_writer import extract_regions


__all__ = ["extract_regions", "load_region_cache", "load_region_dataset"]
