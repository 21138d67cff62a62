"""An Auto class for image-text retrieval cross-encoders; transformers has none for this task."""

from collections import OrderedDict

from transformers.models.auto.auto_factory import _BaseAutoModelClass, _LazyAutoMapping
from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES


MODEL_FOR_IMAGE_TEXT_RETRIEVAL_MAPPING_NAMES = OrderedDict()
MODEL_FOR_IMAGE_TEXT_RETRIEVAL_MAPPING = _LazyAutoMapping(
    CONFIG_MAPPING_NAMES, MODEL_FOR_IMAGE_TEXT_RETRIEVAL_MAPPING_NAMES
)


class AutoModelForImageTextRetrieval(_BaseAutoModelClass):
    """`AutoModelForImageTextRetrieval.from_pretrained(path)` builds the retrieval model registered for the config."""

    _model_mapping = MODEL_FOR_IMAGE_TEXT_RETRIEVAL_MAPPING


__all__ = ["AutoModelForImageTextRetrieval"]
