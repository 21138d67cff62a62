"""A Gradio app over the retrieval pipeline (`imagebert-app`, `make app`; the `imagebert_hf[app]` extra).

`RetrievalDemo` (engine) holds the model and the prebuilt gallery, `RelationView` (relations) scores a gallery
photo's true relation caption against its swapped twin, `build_app` makes the page, `launch_app` serves it; gradio is
imported only when the page is built, so this package imports without it.

The names below load their module on first access, so `imagebert-app --help` imports neither torch nor gradio.
"""

from typing import TYPE_CHECKING

from ..models.imagebert.lazy_names import lazy_names


if TYPE_CHECKING:
    from .engine import AppInputError, GalleryImage, RetrievalDemo, read_gallery
    from .relations import RelationView
    from .ui import build_app, launch_app


__all__ = ["AppInputError", "GalleryImage", "RelationView", "RetrievalDemo", "build_app", "launch_app", "read_gallery"]

_MODULES = {
    "engine": ["AppInputError", "GalleryImage", "RetrievalDemo", "read_gallery"],
    "relations": ["RelationView"],
    "ui": ["build_app", "launch_app"],
}
__getattr__, __dir__ = lazy_names(__name__, _MODULES, globals())
