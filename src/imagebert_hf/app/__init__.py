"""A Gradio app over the retrieval pipeline (`imagebert-app`, `make app`; the `imagebert_hf[app]` extra).

`RetrievalDemo` (engine) holds the model and the prebuilt gallery, `build_app` makes the page, `launch_app` serves
it; gradio is imported only when the page is built, so this package imports without it.

The names below load their module on first access, so `imagebert-app --help` imports neither torch nor gradio.
"""

import importlib
from typing import TYPE_CHECKING


if TYPE_CHECKING:
    from .engine import AppInputError, GalleryImage, RetrievalDemo, read_gallery
    from .ui import build_app, launch_app


__all__ = ["AppInputError", "GalleryImage", "RetrievalDemo", "build_app", "launch_app", "read_gallery"]

_MODULES = {
    "engine": ["AppInputError", "GalleryImage", "RetrievalDemo", "read_gallery"],
    "ui": ["build_app", "launch_app"],
}
# public name -> the module (in this package) that defines it
_LAZY_NAMES = {name: module for module, names in _MODULES.items() for name in names}


def __getattr__(name: str):
    module = _LAZY_NAMES.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
