"""The ImageBERT retrieval app on a Hugging Face Space: the same page as `imagebert-app`.

The Space holds (see README.md and docs/app.md of the project):
- `model/`: a retrieval model folder with its processor (e.g. the `make demo` checkpoint), or set the Space variable
  `IMAGEBERT_MODEL` to a Hub id;
- `gallery/`: a folder of photos or a jsonl manifest with its images (`IMAGEBERT_GALLERY`, `IMAGEBERT_SPLIT`);
  a manifest's photos are pooled over its object boxes, the regions the `make demo` checkpoint trained on
  (`IMAGEBERT_GALLERY_REGIONS=extractor` for a model trained on its processor's regions);
- optionally a region cache of the gallery's photos (`IMAGEBERT_REGION_CACHE`, a folder written by
  `imagebert-extract-regions`): the regions are then read from it rather than extracted when the Space starts.
"""

import os

from imagebert_hf.app import build_app, launch_app
from imagebert_hf.app.cli import AppArguments, check_arguments, load_demo


args = AppArguments(
    model=os.environ.get("IMAGEBERT_MODEL", "model"),
    gallery=os.environ.get("IMAGEBERT_GALLERY", "gallery/captions.jsonl"),
    split=os.environ.get("IMAGEBERT_SPLIT", "test") or None,
    max_gallery=int(os.environ["IMAGEBERT_MAX_GALLERY"]) if os.environ.get("IMAGEBERT_MAX_GALLERY") else None,
    gallery_regions=os.environ.get("IMAGEBERT_GALLERY_REGIONS", "boxes"),
    region_cache=os.environ.get("IMAGEBERT_REGION_CACHE") or None,
)
check_arguments(args)
demo = build_app(load_demo(args), title=os.environ.get("IMAGEBERT_TITLE", "ImageBERT image-text retrieval"))

if __name__ == "__main__":
    # A Space sets GRADIO_SERVER_NAME and GRADIO_SERVER_PORT; elsewhere this serves on the loopback address.
    # `launch_app`, not `demo.launch`: it lets gradio serve the gallery's photo files, which a gallery outside the
    # working folder (IMAGEBERT_GALLERY) would otherwise have refused.
    launch_app(demo, server_name=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"))
