"""ImageBERT: configuration, model, region extraction, processor and the retrieval pipeline.

Everything here imports only same-folder modules and third-party packages, so a saved model, processor or pipeline
carries these files as remote code and loads with `trust_remote_code=True` where the package is not installed.
The names imported under `TYPE_CHECKING` below (the one list of them) load their module on first access, so importing one module of this folder (the UNITER converter,
the region helpers) does not import every other one.
"""

from typing import TYPE_CHECKING

from .lazy_names import lazy_package


if TYPE_CHECKING:
    from .configuration_imagebert import ImageBERTConfig
    from .image_processing_imagebert import WEIGHTS_NAME, ImageBERTRoIExtractor, check_region_sizes
    from .modeling_auto import AutoModelForImageTextRetrieval
    from .modeling_imagebert import (
        ImageBERTForImageTextRetrieval,
        ImageBERTForImageTextRetrievalOutput,
        ImageBERTForPreTraining,
        ImageBERTForPreTrainingOutput,
        ImageBERTModel,
        ImageBERTModelOutput,
        ImageBERTPreTrainedModel,
    )
    from .pipeline_image_text_retrieval import MODES, ImageTextRetrievalPipeline, RetrievalIndex, register_pipeline
    from .processing_imagebert import ImageBERTProcessor, check_processor_config, register_processing


# The names above, read back from that block: the table they load from, and `__all__`.
__all__, __getattr__, __dir__ = lazy_package(__file__, __name__, globals())
