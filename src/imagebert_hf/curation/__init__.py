"""LAIT-style curation: web pages (WARC files, saved HTML) -> clean image-text pairs, locally or on Spark.

Five stages, each a pure function over a batch of records returning the kept records and a `Tally` of what it
received, kept and dropped (by reason): `parse_pages`, `filter_images`, `clean_texts`, `score_relevance`, then
the corpus-wide `aggregate`. `run_local` and `run_spark` run them and write the same parquet shards and funnel
report. Heavy dependencies (fastwarc, resiliparse, nudenet, pyspark) are imported only where used.

The names below load their module on first access, so `imagebert-curate --help` imports none of the stages.
"""

from typing import TYPE_CHECKING

from ..models.imagebert.lazy_names import lazy_package


if TYPE_CHECKING:
    from .aggregation import aggregate, aggregate_image_group, aggregate_text_group
    from .config import (
        AggregationConfig,
        CurationConfig,
        ImageFilterConfig,
        ParseConfig,
        RelevanceConfig,
        TextCleaningConfig,
    )
    from .image_filters import filter_images, image_statistics
    from .inputs import discover_sources, scan_source
    from .linear import LinearModel
    from .parse import parse_pages
    from .pipeline import CurationResult, load_curated, run_local
    from .relevance import relevance_features, score_relevance
    from .spark import run_spark
    from .tally import Tally, funnel_markdown, write_funnel_report
    from .text_cleaning import check_text, clean_texts


# The names above, read back from that block: the table they load from, and `__all__`.
__all__, __getattr__, __dir__ = lazy_package(__file__, __name__, globals())
