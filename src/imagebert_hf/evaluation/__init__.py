"""Retrieval evaluation: recall@K, full ranking, shortlist re-ranking, zero-shot retrieval, plots and Hub cards.

The scoring itself (the cross-encoder over pairs, the unimodal embeddings and the index) is
`models/imagebert/retrieval_index.py`, shared with the pipeline. Only the metric is imported here; full ranking,
shortlisting (faiss) and plotting (matplotlib) load on first use.
"""

from .recall import DEFAULT_KS, format_metrics_table, recall_at_k, retrieval_metrics, retrieval_ranks
from .relation_swaps import relation_swap_accuracy


__all__ = [
    "DEFAULT_KS",
    "format_metrics_table",
    "recall_at_k",
    "relation_swap_accuracy",
    "retrieval_metrics",
    "retrieval_ranks",
]
