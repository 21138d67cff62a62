"""Stage 2: image decoding and content filters (size, aspect ratio, NSFW, natural photo).

Images are read by the package's one loader (`models/imagebert/roi_image_loading.load_image`, as region extraction
and the retrieval pipeline read them): decompression bombs, tiny images and extreme aspect ratios are rejected from
the header before any pixel is decoded, and JPEGs are decoded at reduced scale (`draft`) to the analysis size, which
is all the statistics and the classifiers need.

The NSFW detector and the natural-photo classifier are plug-ins named in the config: a built-in name, `none`, or
`package.module:Class` (a class whose no-argument constructor builds it and whose `score(images, stats)` returns
one probability per image). Plug-ins are built lazily once per process, which suits `datasets` workers and Spark
executors alike; the runners check them before reading any page (`check_plugin`), so a plug-in whose class takes
arguments or has no `score` ends the run before any work is done.
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import numbers
from importlib import resources
from typing import Protocol

import numpy as np
from transformers.utils import logging

from ..models.imagebert.roi_image_loading import ImageLoadError, load_image
from .config import ImageFilterConfig
from .linear import LinearModel
from .tally import INPUT, KEPT, Tally
from .text_cleaning import file_version


logger = logging.get_logger(__name__)

STAGE = "images"
ADDED_COLUMNS = ("image_hash", "width", "height", "nsfw_score", "natural_score", "image_stats")

COLOUR_NAMES = ("black", "white", "gray", "red", "orange", "yellow", "green", "blue", "purple", "pink", "brown")
_STATS_SIDE = 96


def _stat_names() -> list[str]:
    names = ["mean_r", "mean_g", "mean_b", "std_r", "std_g", "std_b", "mean_s", "std_s", "mean_v", "std_v"]
    names += ["unique_colours", "top_colour", "top5_colours", "luma_entropy", "hue_entropy"]
    names += ["grad_mean", "flat_fraction", "edge_fraction", "laplacian_mean", "vivid_fraction", "skin_fraction"]
    names += [f"colour_{c}" for c in COLOUR_NAMES]
    names += [f"top_colour_{c}" for c in COLOUR_NAMES]
    names += [f"bottom_colour_{c}" for c in COLOUR_NAMES]
    return names


STAT_NAMES = tuple(_stat_names())


def colour_name_map(hsv: np.ndarray) -> np.ndarray:
    """Index into `COLOUR_NAMES` of every pixel of an HSV array (PIL scale: all channels 0-255)."""
    h = hsv[..., 0].astype(np.float32) * (360.0 / 256.0)
    s = hsv[..., 1].astype(np.float32) / 255.0
    v = hsv[..., 2].astype(np.float32) / 255.0
    hue_edges = np.array([15, 45, 70, 165, 260, 290, 345], dtype=np.float32)
    hue_names = np.array([3, 4, 5, 6, 7, 8, 9, 3])  # red, orange, yellow, green, blue, purple, pink, red again
    out = hue_names[np.searchsorted(hue_edges, h, side="right")]
    out = np.where((out <= 4) & (v < 0.55) & (s > 0.25), 10, out)  # dark red/orange reads as brown
    grey = s < 0.15
    out = np.where(grey, np.where(v > 0.8, 1, 2), out)
    return np.where(v < 0.2, 0, out)


def skin_mask(rgb: np.ndarray) -> np.ndarray:
    """Pixels with skin tones under daylight (the RGB rule of Kovac et al. 2003)."""
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    spread = rgb.max(axis=-1) - rgb.min(axis=-1)
    return (r > 95) & (g > 40) & (b > 20) & (spread > 15) & (np.abs(r - g) > 15) & (r > g) & (r > b)


def _entropy(counts: np.ndarray) -> float:
    p = counts[counts > 0] / max(1, counts.sum())
    return float(-(p * np.log2(p)).sum())


def image_statistics(image) -> np.ndarray:
    """Colour, texture and layout statistics of an RGB PIL image (`STAT_NAMES`), all roughly in [0, 1]."""
    from PIL import Image

    small = image.convert("RGB").resize((_STATS_SIDE, _STATS_SIDE), Image.Resampling.BILINEAR)
    rgb = np.asarray(small, dtype=np.float32) / 255.0
    hsv = np.asarray(small.convert("HSV"))
    s, v = hsv[..., 1] / 255.0, hsv[..., 2] / 255.0
    feats = [*rgb.mean(axis=(0, 1)), *rgb.std(axis=(0, 1)), s.mean(), s.std(), v.mean(), v.std()]

    quant = (np.asarray(small) >> 4).astype(np.int32)
    codes = (quant[..., 0] << 8) | (quant[..., 1] << 4) | quant[..., 2]
    counts = np.sort(np.bincount(codes.ravel(), minlength=4096))[::-1]
    n = codes.size
    feats += [np.count_nonzero(counts) / n, counts[0] / n, counts[:5].sum() / n]
    luma = rgb @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    feats.append(_entropy(np.bincount((luma * 31.99).astype(np.int32).ravel(), minlength=32)) / 5.0)
    feats.append(_entropy(np.bincount((hsv[..., 0] >> 4).ravel(), minlength=16)) / 4.0)

    gx = np.abs(np.diff(luma, axis=1))[:-1, :]
    gy = np.abs(np.diff(luma, axis=0))[:, :-1]
    grad = gx + gy
    lap = np.abs(4 * luma[1:-1, 1:-1] - luma[:-2, 1:-1] - luma[2:, 1:-1] - luma[1:-1, :-2] - luma[1:-1, 2:])
    feats += [grad.mean(), (grad < 1.0 / 255).mean(), (grad > 0.15).mean(), lap.mean()]
    feats.append(((s > 0.85) & (v > 0.5)).mean())
    feats.append(skin_mask(np.asarray(small, dtype=np.int32)).mean())

    names = colour_name_map(hsv)
    half = _STATS_SIDE // 2
    for part in (names, names[:half], names[half:]):
        feats += list(np.bincount(part.ravel(), minlength=len(COLOUR_NAMES)) / part.size)
    return np.asarray(feats, dtype=np.float32)


class ImageScorer(Protocol):
    """What a plug-in implements: one probability per image (NSFW, or natural photo)."""

    def score(self, images: list, stats: np.ndarray) -> list[float]: ...


class NoScorer:
    """Turns a filter off: NSFW probability 0 (and, for the natural-photo filter, probability 1)."""

    def __init__(self, value: float = 0.0):
        self.value = value

    def score(self, images: list, stats: np.ndarray) -> list[float]:
        return [self.value] * len(images)


class NudeNetDetector:
    """NSFW probability from nudenet's offline ONNX detector (shipped inside the wheel; no download).

    The probability is the highest detection score among the exposed-body classes. A detection is trusted only
    when the detector also finds another kind of body part (face, belly, feet, ...) or is very sure
    (`sure_score`); otherwise it is halved: alone, the detector flags e.g. a bowl of green apples.
    """

    EXPOSED = frozenset(
        {
            "FEMALE_GENITALIA_EXPOSED",
            "MALE_GENITALIA_EXPOSED",
            "FEMALE_BREAST_EXPOSED",
            "BUTTOCKS_EXPOSED",
            "ANUS_EXPOSED",
        }
    )
    sure_score = 0.9
    corroboration_score = 0.3

    def __init__(self):
        from nudenet import NudeDetector

        self.detector = NudeDetector()

    def score_detections(self, detections: list[dict]) -> float:
        exposed = [d for d in detections if d["class"] in self.EXPOSED]
        if not exposed:
            return 0.0
        top = max(exposed, key=lambda d: d["score"])
        corroborated = any(d["class"] != top["class"] and d["score"] >= self.corroboration_score for d in detections)
        return float(top["score"] if corroborated or top["score"] >= self.sure_score else 0.5 * top["score"])

    def score(self, images: list, stats: np.ndarray) -> list[float]:
        scores = []
        for image in images:
            bgr = np.ascontiguousarray(np.asarray(image.convert("RGB"))[:, :, ::-1])
            scores.append(self.score_detections(self.detector.detect(bgr)))
        return scores


class LinearNaturalPhotoClassifier:
    """Natural-photo probability from a logistic regression over `image_statistics` (trainable; see
    examples/train_curation_models.py)."""

    def __init__(self, model_path: str | None = None):
        self.model = load_packaged_model("natural_photo.json") if model_path is None else LinearModel.load(model_path)
        if list(self.model.feature_names) != list(STAT_NAMES):
            raise ValueError(
                f"{model_path or 'the packaged model'} is a model of other features than this version's image "
                "statistics; expected a natural-photo model written by examples/train_curation_models.py."
            )

    def score(self, images: list, stats: np.ndarray) -> list[float]:
        if len(stats) == 0:
            return []
        return [float(p) for p in self.model.predict_proba(stats)]


def load_packaged_model(name: str) -> LinearModel:
    """Loads one of the JSON models shipped in `imagebert_hf/curation/weights/`."""
    with resources.as_file(resources.files(__package__) / "weights" / name) as path:
        return LinearModel.load(path)


def import_plugin(spec: str) -> type:
    """The class a `module:Class` plug-in names. A module that cannot be imported or a missing class raises
    `ValueError` naming `spec`: the plug-in is the user's code, not one of the package's extras."""
    module_name, _, attr = spec.partition(":")
    if not attr:
        raise ValueError(f"plug-in {spec!r} must be a built-in name or `module:Class`")
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise ValueError(
            f"cannot import the module {module_name!r} of the plug-in {spec!r} ({error}); expected `module:Class` "
            "naming a class importable in this environment."
        ) from None
    plugin = getattr(module, attr, None)
    if not callable(plugin):
        raise ValueError(
            f"the module {module_name!r} has no class {attr!r} (plug-in {spec!r}); expected `module:Class` naming a "
            "class importable in this environment."
        )
    return plugin


def check_plugin(spec: str) -> type:
    """The class a `module:Class` plug-in names, checked without building it: its constructor must take no argument
    and the class must define a callable `score`. Building it is left to each worker, where its constructor may
    open a GPU context that a process forked after it could not use. Raises `ValueError` naming `spec`."""
    import inspect

    plugin = import_plugin(spec)
    try:
        inspect.signature(plugin).bind()
    except TypeError as error:
        raise ValueError(
            f"the plug-in {spec!r} cannot be built without arguments ({error}); expected `module:Class` naming a "
            "class whose no-argument constructor builds the scorer."
        ) from None
    except ValueError:  # a built-in without a signature: building it will tell
        pass
    if not inspect.isclass(plugin) or not callable(getattr(plugin, "score", None)):
        raise ValueError(
            f"the plug-in {spec!r} is a {type(plugin).__name__} without a callable `score`; expected a class with a "
            "method `score(images, stats)` returning one probability per image."
        )
    return plugin


@functools.lru_cache(maxsize=8)
def get_nsfw_detector(spec: str) -> ImageScorer:
    if spec == "nudenet":
        return NudeNetDetector()
    if spec == "none":
        return NoScorer(0.0)
    return check_plugin(spec)()


def get_natural_classifier(spec: str, model_path: str | None = None) -> ImageScorer:
    """The natural-photo classifier `spec` names; the default one is built again when its model file changes."""
    return _get_natural_classifier(spec, model_path, file_version(model_path) if spec == "default" else None)


@functools.lru_cache(maxsize=8)
def _get_natural_classifier(spec: str, model_path: str | None, version: tuple | None) -> ImageScorer:
    if spec == "default":
        return LinearNaturalPhotoClassifier(model_path)
    if spec == "none":
        return NoScorer(1.0)
    return check_plugin(spec)()


def plugin_scores(field: str, spec: str, scorer: ImageScorer, images: list, stats: np.ndarray) -> list[float]:
    """`scorer.score(images, stats)` as a list of floats, checked: anything but one number per image raises naming the
    scorer (`images.<field>` and `spec`), since a score cannot then be matched to its image. A non-finite score (a
    scorer that failed on one image) is returned as it is, for the caller to drop that image with a reason."""
    what = f"images.{field} {spec!r}"
    expected = f"expected a sequence of {len(images)} probabilities, one per image"
    result = scorer.score(images, stats)
    try:
        scores = list(result)
    except TypeError:
        raise ValueError(f"{what} returned {result!r:.80} ({type(result).__name__}); {expected}.") from None
    if len(scores) != len(images):
        raise ValueError(f"{what} returned {len(scores)} scores for {len(images)} images; {expected}.")
    wrong = [s for s in scores if not isinstance(s, numbers.Real) or isinstance(s, bool)]
    if wrong:
        raise ValueError(f"{what} returned {wrong[0]!r} ({type(wrong[0]).__name__}) among its scores; {expected}.")
    return [float(s) for s in scores]


def decode_image(data: bytes, config: ImageFilterConfig):
    """Decodes image bytes for analysis with the package's one image loader (`load_image`: its size, pixel-count,
    side and aspect checks run on the header, before any pixel is decoded). Returns `(image, width, height, None)`
    or `(None, 0, 0, reason)`, the reason being the loader's `ImageLoadError.code`."""
    try:
        loaded = load_image(
            data,
            max_image_pixels=config.max_image_pixels,
            min_image_side=config.min_side + 1,  # both sides strictly greater than min_side
            max_aspect_ratio=config.max_aspect_ratio,
            max_decode_side=config.analysis_size,
            draft_margin=1,
            # The parse stage bounds the bytes it fetches (`parse.max_image_bytes`); the loader's own default limit
            # (64 MiB) would drop, as `file_too_large`, images that setting lets through.
            max_file_bytes=max(len(data), 1),
        )
    except ImageLoadError as error:
        return None, 0, 0, error.code
    return loaded.image, loaded.width, loaded.height, None


def filter_images(batch: dict[str, list], config: ImageFilterConfig) -> tuple[dict[str, list], Tally]:
    """Stage 2 over a batch of dominant-image records; adds `ADDED_COLUMNS` to the records it keeps.

    Args:
        batch: Columns of `parse.IMAGE_COLUMNS` records.
        config: Image-filter configuration.

    Returns:
        The kept records as columns, and the counts of this batch.
    """
    tally = Tally()
    columns = list(batch)
    n = len(batch["image"])
    kept_rows, images, stats = [], [], []
    for i in range(n):
        tally.add(STAGE, "image", INPUT)
        try:
            image, width, height, reason = decode_image(batch["image"][i], config)
            if reason is None:
                image_stats = image_statistics(image)
        except Exception as err:  # one bad image must never stop a run
            logger.debug("image analysis failed: %r", err)
            image, reason = None, "corrupt_image"
        if reason is not None:
            tally.drop(STAGE, "image", reason)
            continue
        kept_rows.append((i, width, height))
        images.append(image)
        stats.append(image_stats)

    stats_arr = np.stack(stats) if stats else np.zeros((0, len(STAT_NAMES)), dtype=np.float32)
    natural_classifier = get_natural_classifier(config.natural_classifier, config.natural_model_path)
    natural = plugin_scores("natural_classifier", config.natural_classifier, natural_classifier, images, stats_arr)
    keep_natural = []
    for j, p in enumerate(natural):
        if not np.isfinite(p):
            tally.drop(STAGE, "image", "bad_natural_score")
        elif p < config.natural_threshold:
            tally.drop(STAGE, "image", "not_natural_photo")
        else:
            keep_natural.append(j)
    nsfw_input = [images[j] for j in keep_natural]
    nsfw = []
    if nsfw_input:
        detector = get_nsfw_detector(config.nsfw_detector)
        nsfw = plugin_scores("nsfw_detector", config.nsfw_detector, detector, nsfw_input, stats_arr[keep_natural])

    out = {name: [] for name in columns + list(ADDED_COLUMNS)}
    for j, nsfw_score in zip(keep_natural, nsfw):
        if not np.isfinite(nsfw_score):
            # An image the detector could not score is not known to be safe.
            tally.drop(STAGE, "image", "bad_nsfw_score")
            continue
        if nsfw_score >= config.nsfw_threshold:
            tally.drop(STAGE, "image", "nsfw")
            continue
        i, width, height = kept_rows[j]
        for name in columns:
            out[name].append(batch[name][i])
        out["image_hash"].append(hashlib.sha1(batch["image"][i]).hexdigest())
        out["width"].append(int(width))
        out["height"].append(int(height))
        out["nsfw_score"].append(float(nsfw_score))
        out["natural_score"].append(float(natural[j]))
        out["image_stats"].append([float(x) for x in stats[j]])
        tally.add(STAGE, "image", KEPT)
    return out, tally


__all__ = [
    "ADDED_COLUMNS",
    "COLOUR_NAMES",
    "NudeNetDetector",
    "STAGE",
    "STAT_NAMES",
    "check_plugin",
    "decode_image",
    "filter_images",
    "get_natural_classifier",
    "image_statistics",
    "import_plugin",
    "load_packaged_model",
    "plugin_scores",
]
