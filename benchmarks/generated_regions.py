"""A stand-in for `ImageBERTRoIExtractor` in `extract_regions`, for benchmarks: region records generated from each
image's content hash (no CNN runs), so a region cache of any size and layout can be written quickly."""

from __future__ import annotations

from pathlib import Path

import numpy as np


class GeneratedExtractor:
    """Writes `min_regions`..`max_regions` regions of `feature_size`-d features per image (ReLU-like with `relu`)."""

    batch_size, max_file_bytes, device = 256, 1, None

    def __init__(self, feature_size: int, num_classes: int, min_regions: int, max_regions: int, relu: bool = False):
        self.region_feature_size, self.num_object_classes = feature_size, num_classes
        self.min_regions, self.max_regions, self.relu = min_regions, max_regions, relu

    def to_dict(self):
        return {"generated": True, **{k: v for k, v in vars(self).items() if not k.startswith("_")}}

    def save_pretrained(self, folder):
        Path(folder).mkdir(parents=True, exist_ok=True)

    def extract(self, images, boxes=None, image_ids=None, on_error="record", return_class_probs=False):
        records = []
        for image_id in image_ids:
            rng = np.random.default_rng(int(image_id[:12], 16))
            count = int(rng.integers(self.min_regions, self.max_regions + 1))
            corners = np.sort(rng.random((count, 4), dtype=np.float32), axis=1)
            area = (corners[:, 2] - corners[:, 0]) * (corners[:, 3] - corners[:, 1])
            features = rng.standard_normal((count, self.region_feature_size), dtype=np.float32)
            records.append(
                {
                    "region_features": np.maximum(features, 0) if self.relu else features,
                    "region_boxes": corners * 640,
                    "region_locations": np.concatenate([corners, area[:, None]], axis=1),
                    "region_class_labels": rng.integers(0, self.num_object_classes, count),
                    "image_width": 640,
                    "image_height": 480,
                    "num_regions": count,
                    "error": None,
                }
            )
        return records


def image_table(num_images: int):
    """A `datasets` table of `num_images` distinct tiny "images" keyed `img0000000`, ... (their bytes differ)."""
    import datasets

    return datasets.Dataset.from_dict(
        {
            "key": [f"img{i:07d}" for i in range(num_images)],
            "image": [{"bytes": b"%d" % i, "path": None} for i in range(num_images)],
        }
    )
