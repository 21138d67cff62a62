"""The region feature cache under its first module name: the names it has always exported, now defined in
`cache_writer` (extraction, merge, the report), `cache_reader` (`RegionCache`, loading, verification), `gallery`
(`RegionGallery`) and `cli` (`imagebert-extract-regions`). The folder layout is in `cache_layout`.
"""

from .cache_layout import RegionCacheError
from .cache_reader import RegionCache, load_region_cache, load_region_dataset, verify_region_cache
from .cache_writer import CacheReport, extract_regions, merge_region_caches, shards_of
from .cli import ExtractRegionsArguments, main
from .gallery import RegionGallery


__all__ = [
    "CacheReport",
    "ExtractRegionsArguments",
    "RegionCache",
    "RegionCacheError",
    "RegionGallery",
    "extract_regions",
    "load_region_cache",
    "load_region_dataset",
    "main",
    "merge_region_caches",
    "shards_of",
    "verify_region_cache",
]
