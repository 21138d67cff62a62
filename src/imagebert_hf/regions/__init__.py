"""Region extraction at scale: the resumable, deduplicated region cache (Arrow shards) and its command-line tool.

The extractor itself (`ImageBERTRoIExtractor`, its backends and the precomputed bottom-up-attention formats) lives in
`imagebert_hf.models.imagebert`, because saved processors carry it as remote code.
"""

from .feature_cache import extract_regions, load_region_cache, load_region_dataset


__all__ = ["extract_regions", "load_region_cache", "load_region_dataset"]
