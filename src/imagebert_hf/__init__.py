"""ImageBERT for the Hugging Face ecosystem: a single-stream BERT over text and image regions.

Importing the package is cheap: the public names below load their module (and torch, transformers, torchvision) on
first access, so `imagebert-curate --help` or `import imagebert_hf.formats.files` stays light. ImageBERT is still
known to `AutoConfig`, `AutoModel`, `AutoModelForPreTraining`, `AutoImageProcessor`, `AutoProcessor` and
`pipeline("image-text-retrieval")` with no further call: `register()` runs as soon as transformers' Auto classes
are loaded (now, when they already are, or right after the import that loads them).
"""

import sys
import threading
from typing import TYPE_CHECKING

from .models.imagebert.lazy_names import lazy_names as _lazy_names


if TYPE_CHECKING:
    from .data.collator import DataCollatorForImageBERTPretraining
    from .evaluation.hub import build_model_card, push_to_hub
    from .evaluation.recall import retrieval_metrics
    from .models.imagebert.configuration_imagebert import ImageBERTConfig
    from .models.imagebert.image_processing_imagebert import WEIGHTS_NAME, ImageBERTRoIExtractor, check_region_sizes
    from .models.imagebert.modeling_auto import AutoModelForImageTextRetrieval
    from .models.imagebert.modeling_imagebert import (
        ImageBERTForImageTextRetrieval,
        ImageBERTForImageTextRetrievalOutput,
        ImageBERTForPreTraining,
        ImageBERTForPreTrainingOutput,
        ImageBERTModel,
        ImageBERTModelOutput,
        ImageBERTPreTrainedModel,
    )
    from .models.imagebert.pipeline_image_text_retrieval import (
        MODES,
        ImageTextRetrievalPipeline,
        RetrievalIndex,
        register_pipeline,
    )
    from .models.imagebert.processing_imagebert import ImageBERTProcessor, check_processor_config, register_processing
    from .models.imagebert.region_batching import RegionRecord
    from .models.imagebert.roi_boxes import as_boxes, box_locations, clip_boxes, grid_boxes
    from .models.imagebert.roi_image_loading import ImageLoadError, LoadedImage, RegionExtractionError, load_image
    from .models.imagebert.roi_offline_weights import offline_default_config_kwargs
    from .models.imagebert.roi_precomputed import read_npz_regions, write_npz_regions, write_tsv_regions
    from .regions.cache_reader import load_region_cache, load_region_dataset
    from .regions.cache_writer import extract_regions


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

_MODULES = {
    "data.collator": ["DataCollatorForImageBERTPretraining"],
    "evaluation.hub": ["build_model_card", "push_to_hub"],
    "evaluation.recall": ["retrieval_metrics"],
    "models.imagebert.configuration_imagebert": ["ImageBERTConfig"],
    "models.imagebert.image_processing_imagebert": ["WEIGHTS_NAME", "ImageBERTRoIExtractor", "check_region_sizes"],
    "models.imagebert.modeling_auto": ["AutoModelForImageTextRetrieval"],
    "models.imagebert.modeling_imagebert": [
        "ImageBERTForImageTextRetrieval",
        "ImageBERTForImageTextRetrievalOutput",
        "ImageBERTForPreTraining",
        "ImageBERTForPreTrainingOutput",
        "ImageBERTModel",
        "ImageBERTModelOutput",
        "ImageBERTPreTrainedModel",
    ],
    "models.imagebert.pipeline_image_text_retrieval": [
        "MODES",
        "ImageTextRetrievalPipeline",
        "RetrievalIndex",
        "register_pipeline",
    ],
    "models.imagebert.processing_imagebert": ["ImageBERTProcessor", "check_processor_config", "register_processing"],
    "models.imagebert.region_batching": ["RegionRecord"],
    "models.imagebert.roi_boxes": ["as_boxes", "box_locations", "clip_boxes", "grid_boxes"],
    "models.imagebert.roi_image_loading": ["ImageLoadError", "LoadedImage", "RegionExtractionError", "load_image"],
    "models.imagebert.roi_offline_weights": ["offline_default_config_kwargs"],
    "models.imagebert.roi_precomputed": ["read_npz_regions", "write_npz_regions", "write_tsv_regions"],
    "regions.cache_reader": ["load_region_cache", "load_region_dataset"],
    "regions.cache_writer": ["extract_regions"],
}
__getattr__, __dir__ = _lazy_names(__name__, _MODULES, globals())


def register() -> None:
    """Makes the Auto classes and `pipeline("image-text-retrieval")` know ImageBERT. Safe to call twice.

    It runs by itself once transformers' Auto classes are loaded (see the module docstring); calling it by hand is
    never needed, only harmless.
    """
    from transformers import AutoConfig, AutoModel, AutoModelForPreTraining

    from .models.imagebert.configuration_imagebert import ImageBERTConfig
    from .models.imagebert.modeling_auto import AutoModelForImageTextRetrieval
    from .models.imagebert.modeling_imagebert import (
        ImageBERTForImageTextRetrieval,
        ImageBERTForPreTraining,
        ImageBERTModel,
    )
    from .models.imagebert.pipeline_image_text_retrieval import register_pipeline
    from .models.imagebert.processing_imagebert import register_processing

    AutoConfig.register("imagebert", ImageBERTConfig, exist_ok=True)
    AutoModel.register(ImageBERTConfig, ImageBERTModel, exist_ok=True)
    AutoModelForPreTraining.register(ImageBERTConfig, ImageBERTForPreTraining, exist_ok=True)
    AutoModelForImageTextRetrieval.register(ImageBERTConfig, ImageBERTForImageTextRetrieval, exist_ok=True)
    register_processing()
    register_pipeline()


# Registration without an import-time cost. `register()` needs torch and transformers' Auto classes; importing them
# here would cost seconds on every `import imagebert_hf` (and every console script's `--help`). Instead, a finder
# watches the imports of transformers and of this package, and once the outermost of them has finished (so no module
# is half-initialized) while transformers' Auto configuration module is loaded, it calls `register()` once. Anyone
# who can reach `AutoConfig`, `AutoModel`, `AutoProcessor` or `pipeline` has loaded that module, so ImageBERT is
# registered before their first call.
_AUTO_MODULE = "transformers.models.auto.configuration_auto"
_WATCHED = ("transformers", "imagebert_hf")
_state = threading.local()  # depth: how many watched imports are running in this thread
_registered = False
_registering = False


def _register_when_ready() -> None:
    global _registered, _registering
    if _registered or _registering or _AUTO_MODULE not in sys.modules:
        return
    _registering = True
    try:
        register()
        _registered = True
    except ImportError as error:  # a module it needs is still being imported: the next finished import retries
        from transformers.utils import logging

        logging.get_logger(__name__).debug("ImageBERT Auto registration postponed: %s", error)
    finally:
        _registering = False
    if _registered:
        _uninstall_finder()


class _WatchedLoader:
    """Mixin over the original loader's class: runs the module, then registers when the outermost import ends."""

    def exec_module(self, module) -> None:
        _state.depth = getattr(_state, "depth", 0) + 1
        try:
            super().exec_module(module)
        finally:
            _state.depth -= 1
        if _state.depth == 0:
            _register_when_ready()


_loader_classes: dict[type, type] = {}


class _RegistrationFinder:
    """Finds nothing itself: asks the other finders, then wraps a watched module's loader (see `_WatchedLoader`)."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname.partition(".")[0] not in _WATCHED or getattr(_state, "finding", False):
            return None
        _state.finding = True
        try:
            spec = None
            for finder in sys.meta_path:
                if finder is not self and hasattr(finder, "find_spec"):
                    spec = finder.find_spec(fullname, path, target)
                    if spec is not None:
                        break
        finally:
            _state.finding = False
        loader = getattr(spec, "loader", None) if spec is not None else None
        if (
            loader is None
            or isinstance(loader, (type, _WatchedLoader))  # a class (builtin, frozen) or already watched
            or not hasattr(loader, "exec_module")
        ):
            return spec
        base = type(loader)
        watched = _loader_classes.get(base)
        if watched is None:
            try:
                watched = type(f"Watched{base.__name__}", (_WatchedLoader, base), {})
                loader.__class__ = watched
            except TypeError:  # a loader class that cannot take a mixin: leave that module unwatched
                return spec
            _loader_classes[base] = watched
        else:
            loader.__class__ = watched
        return spec


_finder = _RegistrationFinder()


def _uninstall_finder() -> None:
    if _finder in sys.meta_path:
        sys.meta_path.remove(_finder)


if _AUTO_MODULE in sys.modules:  # transformers' Auto classes are already loaded: register now, as before
    _register_when_ready()
if not _registered:
    sys.meta_path.insert(0, _finder)
