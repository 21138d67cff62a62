"""Data for ImageBERT: pretraining pair sources and the collator, retrieval corpora, and the synthetic demo set."""

__all__: list[str] = []  # nothing of its own: import the modules
