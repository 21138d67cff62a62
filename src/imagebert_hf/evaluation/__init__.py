"""Retrieval evaluation: recall@K, batched cross-encoder scoring, shortlist re-ranking and plots.

Only the metric is imported here; scoring, shortlisting (faiss) and plotting (matplotlib) load on first use.
"""

from .retrieval import DEFAULT_KS, format_metrics_table, recall_at_k, retrieval_metrics, retrieval_ranks


__all__ = ["DEFAULT_KS", "format_metrics_table", "recall_at_k", "retrieval_metrics", "retrieval_ranks"]
