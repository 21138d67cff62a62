"""ImageBERT for the Hugging Face ecosystem: a single-stream BERT over text and image regions.

Importing the package is cheap: the public names below load their module (and torch, transformers, torchvision) on
first access, so `imagebert-curate --help` or `import imagebert_hf.formats.files` stays light. ImageBERT is still
known to `AutoConfig`, `AutoModel`, `AutoModelForPreTraining`, `AutoModelForZeroShotImageClassification` (the
retrieval head, as transformers files BLIP-2's), `AutoImageProcessor`, `AutoProcessor` and
`pipeline("image-text-retrieval")` with no further call: `register()` runs as soon as transformers' Auto classes
are loaded (now, when they already are, or right after the import that loads them).
"""

import sys
import threading
from typing import TYPE_CHECKING

from .models.imagebert.lazy_names import lazy_names as _lazy_names
from .models.imagebert.lazy_names import type_checking_imports as _type_checking_imports


# The public names: each loads its module on first access. This block is their one list (`_MODULES` and `__all__`
# are read back from it).
if TYPE_CHECKING:
    # Model inputs: the pretraining collator
    from .data.collator import DataCollatorForImageBERTPretraining

    # Evaluation and publishing: recall@K, the model card, the Hub upload
    from .evaluation.hub import build_model_card, push_to_hub
    from .evaluation.recall import retrieval_metrics

    # Everything `models.imagebert` exports: the configuration, the model classes and their outputs, the Auto class
    # of the retrieval head, the RoI extractor, the processor and the retrieval pipeline
    from .models.imagebert import *  # noqa: F403

    # Images to regions: loading, boxes, precomputed region files and the region record
    from .models.imagebert.region_batching import RegionRecord
    from .models.imagebert.roi_boxes import as_boxes, box_locations, clip_boxes, grid_boxes
    from .models.imagebert.roi_image_loading import ImageLoadError, LoadedImage, RegionExtractionError, load_image
    from .models.imagebert.roi_offline_weights import offline_default_config_kwargs
    from .models.imagebert.roi_precomputed import read_npz_regions, write_npz_regions, write_tsv_regions

    # The region cache: extraction at scale and reading it back
    from .regions.cache_reader import load_region_cache, load_region_dataset
    from .regions.cache_writer import extract_regions


__version__ = "0.1.0"

_MODULES = _type_checking_imports(__file__, __name__)
__all__ = [*(name for names in _MODULES.values() for name in names), "register"]
__getattr__, __dir__ = _lazy_names(__name__, _MODULES, globals())


def register() -> None:
    """Makes the Auto classes and `pipeline("image-text-retrieval")` know ImageBERT. Safe to call twice.

    It runs by itself once transformers' Auto classes are loaded (see the module docstring); calling it by hand is
    never needed, only harmless.
    """
    import transformers
    from transformers import AutoConfig

    from .models.imagebert import modeling_imagebert
    from .models.imagebert.configuration_imagebert import ImageBERTConfig
    from .models.imagebert.modeling_auto import AutoModelForImageTextRetrieval
    from .models.imagebert.pipeline_image_text_retrieval import MODEL_AUTO_CLASSES, register_pipeline
    from .models.imagebert.processing_imagebert import register_processing

    AutoConfig.register("imagebert", ImageBERTConfig, exist_ok=True)
    # The Auto classes a saved folder's `auto_map` names (`AutoModel`, `AutoModelForPreTraining`, and transformers'
    # class for the retrieval head): registered here, they load the folder in-process as its code does elsewhere.
    for model_class, auto_class in MODEL_AUTO_CLASSES.items():
        getattr(transformers, auto_class).register(
            ImageBERTConfig, getattr(modeling_imagebert, model_class), exist_ok=True
        )
    AutoModelForImageTextRetrieval.register(
        ImageBERTConfig, modeling_imagebert.ImageBERTForImageTextRetrieval, exist_ok=True
    )
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
