"""ImageBERT for the Hugging Face ecosystem: a single-stream BERT over text and image regions."""

from .data.collator import DataCollatorForImageBERTPretraining
from .evaluation.hub import build_model_card, push_to_hub
from .evaluation.recall import retrieval_metrics
from .models.imagebert import (
    MODES,
    WEIGHTS_NAME,
    AutoModelForImageTextRetrieval,
    ImageBERTConfig,
    ImageBERTForImageTextRetrieval,
    ImageBERTForImageTextRetrievalOutput,
    ImageBERTForPreTraining,
    ImageBERTForPreTrainingOutput,
    ImageBERTModel,
    ImageBERTModelOutput,
    ImageBERTPreTrainedModel,
    ImageBERTProcessor,
    ImageBERTRoIExtractor,
    ImageTextRetrievalPipeline,
    RetrievalIndex,
    check_processor_config,
    check_region_sizes,
    register_pipeline,
    register_processing,
)
from .models.imagebert.region_batching import RegionRecord
from .models.imagebert.roi_boxes import as_boxes, box_locations, clip_boxes, grid_boxes
from .models.imagebert.roi_image_loading import ImageLoadError, LoadedImage, RegionExtractionError, load_image
from .models.imagebert.roi_offline_weights import offline_default_config_kwargs
from .models.imagebert.roi_precomputed import read_npz_regions, write_npz_regions, write_tsv_regions
from .regions import extract_regions, load_region_cache, load_region_dataset


__version__ = "0.1.0"

__all__ = [
    # The model: configuration, model classes and their outputs, the Auto class of the retrieval head
    "AutoModelForImageTextRetrieval",
    "ImageBERTConfig",
    "ImageBERTForImageTextRetrieval",
    "ImageBERTForImageTextRetrievalOutput",
    "ImageBERTForPreTraining",
    "ImageBERTForPreTrainingOutput",
    "ImageBERTModel",
    "ImageBERTModelOutput",
    "ImageBERTPreTrainedModel",
    "register",
    # Images to regions: loading, the RoI extractor, boxes, precomputed region files and the region record
    "ImageBERTRoIExtractor",
    "ImageLoadError",
    "LoadedImage",
    "RegionExtractionError",
    "RegionRecord",
    "WEIGHTS_NAME",
    "as_boxes",
    "box_locations",
    "check_region_sizes",
    "clip_boxes",
    "grid_boxes",
    "load_image",
    "offline_default_config_kwargs",
    "read_npz_regions",
    "write_npz_regions",
    "write_tsv_regions",
    # The region cache: extraction at scale and reading it back
    "extract_regions",
    "load_region_cache",
    "load_region_dataset",
    # Model inputs: the processor (text + regions) and the pretraining collator
    "DataCollatorForImageBERTPretraining",
    "ImageBERTProcessor",
    "check_processor_config",
    "register_processing",
    # Retrieval: the pipeline and its prebuilt index
    "MODES",
    "ImageTextRetrievalPipeline",
    "RetrievalIndex",
    "register_pipeline",
    # Evaluation and publishing: recall@K, the model card, the Hub upload
    "build_model_card",
    "push_to_hub",
    "retrieval_metrics",
]


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
