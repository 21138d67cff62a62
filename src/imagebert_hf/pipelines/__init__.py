"""The `image-text-retrieval` pipeline; `register_pipeline()` makes `transformers.pipeline` know it."""

from .image_text_retrieval import MODES, ImageTextRetrievalPipeline, RetrievalIndex, register_pipeline


__all__ = ["MODES", "ImageTextRetrievalPipeline", "RetrievalIndex", "register_pipeline"]
