"""Fitting the curation's two small filter models: the natural-photo classifier and the weak relevance model.

Both train in seconds on CPU from a folder of captioned photos in the `captions.jsonl` layout of COCO/Flickr
(`{"image": "images/x.jpg", "captions": [...]}` per line). examples/train_curation_models.py is the script.
"""

from __future__ import annotations

import itertools
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from ..formats.manifest import iter_manifest
from ..models.imagebert.roi_image_loading import load_image
from .image_filters import STAT_NAMES, image_statistics
from .linear import LinearModel, fit_linear_model
from .relevance import FEATURE_NAMES, relevance_features
from .synthetic import GRAPHIC_KINDS, encode_image, graphic_image, web_sentences


@dataclass
class CaptionedImage:
    path: Path
    captions: list[str]
    split: str
    stats: np.ndarray | None = None


def load_captioned_images(
    data_dir: str | Path, with_stats: bool = True, limit: int | None = None
) -> list[CaptionedImage]:
    """Reads a `captions.jsonl` folder; with `with_stats`, computes every image's statistics."""
    data_dir = Path(data_dir)
    items = []
    # The manifest reader checks every line (captions a list of non-empty strings), naming file:line and field.
    for record in itertools.islice(iter_manifest(data_dir / "captions.jsonl"), limit):
        items.append(CaptionedImage(record.image_path, list(record.captions), record.extra.get("split", "val")))
    if with_stats:
        for item in items:
            item.stats = photo_statistics(item.path)
    return items


def photo_statistics(path: str | Path, analysis_size: int = 320) -> np.ndarray:
    """Statistics of an image file decoded as the image-filter stage decodes it."""
    loaded = load_image(path, max_decode_side=analysis_size, draft_margin=1, min_image_side=1, max_aspect_ratio=1e9)
    return image_statistics(loaded.image)


def graphic_statistics(n: int, seed: int = 0) -> np.ndarray:
    """Statistics of `n` generated non-photos, JPEG-compressed like web graphics often are."""
    from io import BytesIO

    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        image = graphic_image(GRAPHIC_KINDS[i % len(GRAPHIC_KINDS)], rng)
        if rng.random() < 0.5:
            image = Image.open(BytesIO(encode_image(image, quality=int(rng.integers(60, 95))))).convert("RGB")
        image.thumbnail((320, 320))
        rows.append(image_statistics(image))
    return np.stack(rows)


def train_natural_photo_model(photo_stats: np.ndarray, graphic_stats: np.ndarray, c: float = 1.0) -> LinearModel:
    """Photos (label 1) against generated graphics (label 0)."""
    x = np.concatenate([photo_stats, graphic_stats])
    y = np.concatenate([np.ones(len(photo_stats)), np.zeros(len(graphic_stats))])
    return fit_linear_model(x, y, list(STAT_NAMES), c=c, metadata={"task": "natural_photo", "n": int(len(y))})


def relevance_training_set(
    images: list[CaptionedImage], noise_fraction: float = 0.25, seed: int = 0
) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Pairs for the relevance model: every true caption (1), the same caption on another image (0), and
    generic web prose on random images (0)."""
    rng = random.Random(seed)
    texts, stats, labels = [], [], []
    n = len(images)
    for i, item in enumerate(images):
        for caption in item.captions:
            texts.append(caption)
            stats.append(item.stats)
            labels.append(1)
            j = (i + rng.randrange(1, n)) % n
            texts.append(caption)
            stats.append(images[j].stats)
            labels.append(0)
    n_noise = int(noise_fraction * sum(labels))
    for k, sentence in enumerate(web_sentences(n_noise, seed=seed + 1)):
        texts.append(sentence)
        stats.append(images[k % n].stats)
        labels.append(0)
    return texts, np.stack(stats), np.asarray(labels)


def train_relevance_model(images: list[CaptionedImage], c: float = 0.05, seed: int = 0) -> LinearModel:
    texts, stats, labels = relevance_training_set(images, seed=seed)
    features = relevance_features(texts, stats)
    return fit_linear_model(
        features, labels, list(FEATURE_NAMES), c=c, metadata={"task": "relevance", "n": int(len(labels))}, seed=seed
    )


def ranking_accuracy(model: LinearModel, images: list[CaptionedImage], seed: int = 0) -> float:
    """How often a true caption scores above the same caption on a random other image."""
    rng = random.Random(seed)
    texts, stats_true, stats_other = [], [], []
    for i, item in enumerate(images):
        for caption in item.captions:
            j = (i + rng.randrange(1, len(images))) % len(images)
            texts.append(caption)
            stats_true.append(item.stats)
            stats_other.append(images[j].stats)
    p_true = model.predict_proba(relevance_features(texts, np.stack(stats_true)))
    p_other = model.predict_proba(relevance_features(texts, np.stack(stats_other)))
    return float(np.mean(p_true > p_other) + 0.5 * np.mean(p_true == p_other))


__all__ = [
    "graphic_statistics",
    "load_captioned_images",
    "photo_statistics",
    "ranking_accuracy",
    "train_natural_photo_model",
    "train_relevance_model",
]
