"""ImageBERT for the Hugging Face ecosystem: a single-stream BERT over text and image regions."""

from .configuration_imagebert import ImageBERTConfig
from .data.collator import DataCollatorForImageBERTPretraining
from .data.feature_cache import extract_regions, load_region_cache, load_region_dataset
from .evaluation import retrieval_metrics
from .hub import build_model_card, push_to_hub
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
from .pipelines import ImageTextRetrievalPipeline, RetrievalIndex, register_pipeline
from .processing_imagebert import ImageBERTProcessor, check_processor_config, register_processing
from .roi_boxes import as_boxes, box_locations, clip_boxes, grid_boxes
from .roi_image_loading import ImageLoadError, LoadedImage, RegionExtractionError, load_image
from .roi_offline_weights import offline_default_config_kwargs
from .roi_precomputed import read_npz_regions, write_npz_regions, write_tsv_regions


__version__ = "0.1.0"


def register() -> None:
    """Makes the Auto classes and `pipeline("image-text-retrieval")` know ImageBERT. Safe to call twice."""
    from transformers import AutoConfig, AutoModel, AutoModelForPreTraining

    AutoConfig.register("imagebert", ImageBERTConfig, exist_ok=True)
    AutoModel.register(ImageBERTConfig, ImageBERTModel, exist_ok=True)
    AutoModelForPreTraining.register(ImageBERTConfig, ImageBERTForPreTraining, exist_ok=True)
    AutoModelForImageTextRetrieval.register(ImageBERTConfig, ImageBERTForImageTextRetrieval, exist_ok=True)
    register_processing()
    register_pipeline()


register()
