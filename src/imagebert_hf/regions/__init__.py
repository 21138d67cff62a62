"""Region extraction at scale: the resumable, deduplicated region cache (Arrow shards) and its command-line tool.

The extractor itself (`ImageBERTRoIExtractor`, its backends and the precomputed bottom-up-attention formats) lives in
`imagebert_hf.models.imagebert`, because saved processors carry it as remote code.
"""

from typing import TYPE_CHECKING

from ..models.imagebert.lazy_names import lazy_package


if TYPE_CHECKING:
    from .cache_reader import load_region_cache, load_region_dataset
    from .cache_writer import extract_regions

# The names load their module on first access, so `imagebert-extract-regions --help` imports no torch. The table
# they load from, and `__all__`, are read back from the block above.
__all__, __getattr__, __dir__ = lazy_package(__file__, __name__, globals())
