"""ImageBERT for the Hugging Face ecosystem."""

from .configuration_imagebert import ImageBERTConfig


__version__ = "0.1.0"
