"""Stage 4: weak image-text relevance scoring.

A logistic regression over text-only features (length, vocabulary, function words, person, concept words),
image-only features (`image_filters.STAT_NAMES`) and cross-modal features: each concept group of the text
(colour words, snow, water, sky, grass, people, animals, ...) times the image's colour layout and texture. The
cross features are what separates a true caption from a mismatched one: "a man skiing down a snowy slope" goes
with a white, low-saturation image, "a red bus on a city street" with red in the lower half and many edges.
It is weak on purpose: cheap enough for billions of pairs, and trained on a small supervised set.
"""

from __future__ import annotations

import functools
import re

import numpy as np

from .config import RELEVANCE_DETERMINERS, RELEVANCE_PREPOSITIONS, RelevanceConfig
from .image_filters import COLOUR_NAMES, STAT_NAMES, load_packaged_model
from .linear import LinearModel
from .tally import INPUT, KEPT, Tally
from .text_cleaning import WORD_PATTERN, file_version, load_vocabulary, rare_word_ratio


STAGE = "relevance"

_COLOUR_WORDS = {
    "black": "black",
    "white": "white",
    "gray": "gray",
    "grey": "gray",
    "silver": "gray",
    "red": "red",
    "orange": "orange",
    "yellow": "yellow",
    "golden": "yellow",
    "green": "green",
    "blue": "blue",
    "purple": "purple",
    "pink": "pink",
    "brown": "brown",
    "tan": "brown",
}
CONCEPTS: dict[str, tuple[str, ...]] = {
    **{f"colour_{c}": tuple(w for w, name in _COLOUR_WORDS.items() if name == c) for c in COLOUR_NAMES},
    "snow": ("snow", "snowy", "ski", "skis", "skier", "skiing", "snowboard", "snowboarder", "winter", "ice", "slope"),
    "water": (
        "water",
        "ocean",
        "sea",
        "lake",
        "river",
        "wave",
        "surf",
        "surfer",
        "surfing",
        "surfboard",
        "pool",
        "boat",
        "swimming",
        "swim",
        "splash",
        "splashing",
        "fountain",
    ),
    "sky": ("sky", "kite", "airplane", "plane", "jet", "flying", "cloud", "clouds", "bird", "air", "jumping"),
    "grass": (
        "grass",
        "grassy",
        "field",
        "park",
        "tree",
        "trees",
        "forest",
        "garden",
        "lawn",
        "meadow",
        "hill",
        "woods",
        "leaves",
    ),
    "sand": ("sand", "sandy", "desert", "dirt", "beach", "rock", "rocks", "mountain"),
    "night": ("night", "dark", "lights", "evening", "sunset", "lit"),
    "street": (
        "street",
        "road",
        "city",
        "building",
        "buildings",
        "traffic",
        "car",
        "cars",
        "bus",
        "truck",
        "sidewalk",
        "train",
        "station",
        "sign",
        "parked",
        "motorcycle",
    ),
    "indoor": (
        "room",
        "kitchen",
        "table",
        "bed",
        "bathroom",
        "living",
        "couch",
        "desk",
        "office",
        "indoors",
        "inside",
        "counter",
        "window",
        "toilet",
        "sink",
        "laptop",
    ),
    "food": (
        "food",
        "pizza",
        "plate",
        "sandwich",
        "cake",
        "bowl",
        "vegetables",
        "fruit",
        "banana",
        "bananas",
        "broccoli",
        "donut",
        "meal",
        "dish",
    ),
    "people": (
        "man",
        "woman",
        "men",
        "women",
        "people",
        "person",
        "boy",
        "girl",
        "child",
        "children",
        "kid",
        "kids",
        "player",
        "crowd",
        "baby",
        "lady",
        "guy",
        "boys",
        "girls",
        "face",
    ),
    "animal": (
        "dog",
        "dogs",
        "cat",
        "cats",
        "horse",
        "horses",
        "cow",
        "cows",
        "sheep",
        "elephant",
        "elephants",
        "giraffe",
        "giraffes",
        "zebra",
        "zebras",
        "bear",
        "animal",
        "puppy",
    ),
    "sports": (
        "ball",
        "tennis",
        "baseball",
        "soccer",
        "football",
        "frisbee",
        "racket",
        "bat",
        "game",
        "playing",
        "skateboard",
        "skateboarder",
        "bike",
        "bicycle",
        "runs",
        "running",
    ),
}
_WORD_TO_CONCEPTS: dict[str, list[int]] = {}
for _index, _words in enumerate(CONCEPTS.values()):
    for _word in _words:
        _WORD_TO_CONCEPTS.setdefault(_word, []).append(_index)

_CROSS_STATS = (
    *(f"colour_{c}" for c in COLOUR_NAMES),
    *(f"top_colour_{c}" for c in COLOUR_NAMES),
    *(f"bottom_colour_{c}" for c in COLOUR_NAMES),
    "mean_v",
    "mean_s",
    "edge_fraction",
    "grad_mean",
    "flat_fraction",
    "skin_fraction",
)
_CROSS_INDEX = np.array([STAT_NAMES.index(name) for name in _CROSS_STATS])
# Fixed word lists (not the configurable text-cleaning ones: the shipped weights were fitted on exactly these).
_DETERMINERS = frozenset(RELEVANCE_DETERMINERS)
_PREPOSITIONS = frozenset(RELEVANCE_PREPOSITIONS)
_FIRST_PERSON = frozenset(["i", "we", "our", "us", "my", "me", "mine", "ours"])
_SECOND_PERSON = frozenset(["you", "your", "yours"])
_WORD = re.compile(rf"{WORD_PATTERN}(?:'{WORD_PATTERN})?")

TEXT_FEATURES = (
    "log_words",
    "log_chars",
    "rare_word_ratio",
    "determiner_ratio",
    "preposition_ratio",
    "first_person_ratio",
    "second_person_ratio",
    "ing_ratio",
    "capitalized_ratio",
    "digit_ratio",
    "punctuation_ratio",
    "mean_word_length",
    "question_or_exclamation",
    "concept_hits",
    *(f"has_{name}" for name in CONCEPTS),
)
FEATURE_NAMES = (
    *(f"text_{name}" for name in TEXT_FEATURES),
    *(f"image_{name}" for name in STAT_NAMES),
    *(f"cross_{concept}_x_{stat}" for concept in CONCEPTS for stat in _CROSS_STATS),
)


def text_features(text: str) -> tuple[np.ndarray, np.ndarray]:
    """Text-only features and the concept indicator vector of one text."""
    lower = text.lower()
    words = _WORD.findall(lower)
    n = max(1, len(words))
    concepts = np.zeros(len(CONCEPTS), dtype=np.float64)
    for word in words:
        for index in _WORD_TO_CONCEPTS.get(word, ()) or _WORD_TO_CONCEPTS.get(word.rstrip("s"), ()):
            concepts[index] = 1.0
    raw_words = text.split()
    vocabulary = load_vocabulary("wordfreq", 100_000)
    feats = [
        np.log1p(len(words)),
        np.log1p(len(text)),
        rare_word_ratio(words, vocabulary),
        sum(w in _DETERMINERS for w in words) / n,
        sum(w in _PREPOSITIONS for w in words) / n,
        sum(w in _FIRST_PERSON for w in words) / n,
        sum(w in _SECOND_PERSON for w in words) / n,
        sum(w.endswith("ing") for w in words) / n,
        sum(w[:1].isupper() for w in raw_words[1:]) / max(1, len(raw_words) - 1),
        sum(c.isdigit() for c in text) / max(1, len(text)),
        sum(not c.isalnum() and not c.isspace() for c in text) / max(1, len(text)),
        sum(map(len, words)) / n,
        float("?" in text or "!" in text),
        concepts.sum(),
        *concepts,
    ]
    return np.asarray(feats, dtype=np.float64), concepts


def relevance_features(texts: list[str], image_stats: np.ndarray) -> np.ndarray:
    """Feature matrix (`FEATURE_NAMES`) of pairs: texts[i] with the image whose statistics are image_stats[i]."""
    image_stats = np.asarray(image_stats, dtype=np.float64).reshape(len(texts), len(STAT_NAMES))
    rows = []
    for text, stats in zip(texts, image_stats):
        tfeats, concepts = text_features(text)
        cross = np.outer(concepts, stats[_CROSS_INDEX]).ravel()
        rows.append(np.concatenate([tfeats, stats, cross]))
    if not rows:
        return np.zeros((0, len(FEATURE_NAMES)))
    return np.stack(rows)


def load_relevance_model(path: str | None = None) -> LinearModel:
    """The relevance model at `path` (the packaged one when None), read again when the file changes."""
    return _load_relevance_model(path, file_version(path))


@functools.lru_cache(maxsize=4)
def _load_relevance_model(path: str | None, version: tuple | None) -> LinearModel:
    model = load_packaged_model("relevance.json") if path is None else LinearModel.load(path)
    if tuple(model.feature_names) != FEATURE_NAMES:
        raise ValueError(
            f"{path or 'the packaged model'} is a model of other features than this version's relevance features; "
            "expected a relevance model written by examples/train_curation_models.py."
        )
    return model


def score_relevance(batch: dict[str, list], config: RelevanceConfig) -> tuple[dict[str, list], Tally]:
    """Stage 4 over a batch of pair records: adds `relevance_score` and drops pairs below the threshold.

    Args:
        batch: Columns of `text_cleaning.PAIR_COLUMNS` records.
        config: Relevance configuration.

    Returns:
        The kept pair records as columns, and the counts of this batch.
    """
    tally = Tally()
    n = len(batch["pair_id"])
    tally.add(STAGE, "pair", INPUT, n)
    columns = list(batch)
    out = {name: [] for name in [*columns, "relevance_score"]}
    if n == 0:
        return out, tally
    model = load_relevance_model(config.relevance_model_path)
    scores = model.predict_proba(relevance_features(batch["text"], np.asarray(batch["image_stats"])))
    for i, score in enumerate(scores):
        if score < config.relevance_threshold:
            tally.drop(STAGE, "pair", "low_relevance")
            continue
        for name in columns:
            out[name].append(batch[name][i])
        out["relevance_score"].append(float(score))
        tally.add(STAGE, "pair", KEPT)
    return out, tally


__all__ = ["FEATURE_NAMES", "STAGE", "load_relevance_model", "relevance_features", "score_relevance"]
