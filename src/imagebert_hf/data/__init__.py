"""Data for ImageBERT: pair sources, the region cache, the pretraining collator and the synthetic demo set."""
