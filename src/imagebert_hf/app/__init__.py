"""A Gradio app over the retrieval pipeline (`imagebert-app`, `make app`; the `imagebert_hf[app]` extra).

`RetrievalDemo` (engine) holds the model and the prebuilt gallery, `build_app` makes the page, `launch_app` serves
it; gradio is imported only when the page is built, so this package imports without it.
"""

from .engine import AppInputError, GalleryImage, RetrievalDemo, read_gallery
from .ui import build_app, launch_app


__all__ = ["AppInputError", "GalleryImage", "RetrievalDemo", "build_app", "launch_app", "read_gallery"]
