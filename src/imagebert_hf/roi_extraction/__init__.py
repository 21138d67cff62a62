"""Region extraction for ImageBERT: image loading, box geometry, backends and the RoI extractor."""

from .boxes import as_boxes, box_locations, clip_boxes, grid_boxes
from .image_loading import ImageLoadError, LoadedImage, RegionExtractionError, load_image
from .image_processing_imagebert import WEIGHTS_NAME, ImageBERTRoIExtractor, check_region_sizes
from .offline_weights import offline_default_config_kwargs
from .precomputed import read_npz_regions, write_npz_regions, write_tsv_regions


__all__ = [
    "ImageBERTRoIExtractor",
    "ImageLoadError",
    "LoadedImage",
    "RegionExtractionError",
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
]
