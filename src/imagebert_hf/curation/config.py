"""Configuration of the curation stages, one dataclass per stage.

The dataclasses are flat so that `transformers.HfArgumentParser` can expose every field as a command-line flag;
field names are unique across all of them for the same reason. `CurationConfig` bundles them for the Python API.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..formats.files import atomic_write_text, read_json_file


def _help(text: str, default=dataclasses.MISSING, factory=dataclasses.MISSING):
    if factory is not dataclasses.MISSING:
        return field(default_factory=factory, metadata={"help": text})
    return field(default=default, metadata={"help": text})


DEFAULT_SPAM_PHRASES = (
    "click here",
    "buy now",
    "order now",
    "shop now",
    "free shipping",
    "best price",
    "lowest price",
    "cheap",
    "discount",
    "coupon",
    "promo code",
    "limited offer",
    "sign up",
    "sign in",
    "login",
    "subscribe",
    "download",
    "casino",
    "viagra",
    "bitcoin",
    "payday loan",
    "% off",
)
DEFAULT_PORN_WORDS = (
    "porn",
    "porno",
    "xxx",
    "nude",
    "nudes",
    "naked",
    "sex",
    "sexy",
    "nsfw",
    "erotic",
    "escort",
    "hentai",
    "milf",
    "camgirl",
    "onlyfans",
    "fetish",
)
DEFAULT_BOILERPLATE_PHRASES = (
    "stock photo",
    "stock image",
    "stock picture",
    "royalty free",
    "image may contain",
    "photo credit",
    "photo by",
    "image courtesy",
    "copyright",
    "all rights reserved",
    "placeholder",
    "thumbnail",
    "logo",
    "icon",
    "avatar",
    "banner",
    "untitled",
    "no image",
    "image not found",
    "loading",
    "advertisement",
    "sponsored",
    "screenshot",
    "click to enlarge",
    "view larger",
    "read more",
    "cookie",
    "privacy policy",
    "terms of use",
    "posted by",
    "share this",
)
# The determiners and prepositions whose share of a text is a feature of the relevance model. Fixed: the shipped
# weights were fitted on exactly these words, so they do not follow a user's cleaning rules.
RELEVANCE_DETERMINERS = (
    "a",
    "an",
    "the",
    "this",
    "that",
    "these",
    "those",
    "some",
    "two",
    "three",
    "several",
    "many",
    "his",
    "her",
    "their",
    "its",
)
RELEVANCE_PREPOSITIONS = (
    "in",
    "on",
    "at",
    "with",
    "of",
    "for",
    "by",
    "from",
    "near",
    "under",
    "over",
    "into",
    "onto",
    "behind",
    "beside",
    "through",
)
DEFAULT_FUNCTION_WORDS = (
    *RELEVANCE_DETERMINERS,
    *RELEVANCE_PREPOSITIONS,
    *("next", "across", "along", "around", "inside", "outside", "while"),
)
# Words whose repetition is never keyword stuffing, on top of `function_words`: articles and conjunctions.
REPETITION_EXEMPT_WORDS = frozenset({"a", "an", "the", "and", "or", "but", "nor"})
# Languages written without spaces between words (codes of resiliparse's detector): the text-cleaning rules count
# words between spaces, so each of their texts would read as one word and be dropped as `too_short`.
UNSEGMENTED_LANGUAGES = ("bo", "ja", "km", "my", "th", "zh")


class _StageConfig:
    """What every stage configuration does when it is built, in Python, from a file or from flags: check its fields
    (`check_stage_config`)."""

    def __post_init__(self):
        check_stage_config(self)


@dataclass
class ParseConfig(_StageConfig):
    """Stage 1: reading WARC files or saved HTML pages and choosing each page's dominant image."""

    max_page_bytes: int = _help("Pages larger than this many bytes are skipped (reason `page_too_large`).", 2_000_000)
    max_image_bytes: int = _help(
        "Image payloads larger than this many bytes are skipped (reason `image_too_large`).", 20_000_000
    )
    max_images_per_page: int = _help(
        "Only the first N <img> tags of a page are considered; the rest are counted as `beyond_image_limit`.", 300
    )
    max_dominant_images: int = _help("How many dominant images to keep per page (the paper keeps one).", 1)
    languages: list[str] = _help(
        "Languages to keep (codes of resiliparse's offline detector).", factory=lambda: ["en"]
    )
    max_language_rank: int = _help(
        "Pages whose language-detection rank (a distance: lower is surer) exceeds this are dropped.", 1200
    )
    min_page_text_chars: int = _help("Pages with less visible text than this are dropped (`no_text`).", 40)
    max_replacement_char_ratio: float = _help(
        "Pages whose decoded text has more U+FFFD characters than this ratio are dropped (`bad_encoding`).", 0.02
    )
    min_declared_side: int = _help(
        "Images whose declared width or height (HTML attributes or inline CSS) is below this are not candidates.",
        100,
    )
    real_size_candidates: int = _help(
        "How many top candidates (by DOM score) have their bytes fetched to read their real size.", 3
    )
    max_context_chars: int = _help(
        "Surrounding text is taken from the closest block element holding at most this many characters.", 1500
    )
    max_context_sentences: int = _help("How many surrounding sentences become text candidates.", 2)
    text_sources: list[str] = _help(
        "Where candidate texts come from, among alt, title, figcaption and context.",
        factory=lambda: ["alt", "title", "figcaption", "context"],
    )
    max_resyncs_per_file: int = _help(
        "After this many unreadable segments in one WARC file the rest of the file is skipped.", 1000
    )


@dataclass
class ImageFilterConfig(_StageConfig):
    """Stage 2: decoding and image-content filters."""

    min_side: int = _help("Width and height must both be strictly greater than this (the paper uses 300).", 300)
    max_aspect_ratio: float = _help("Longer side over shorter side must not exceed this.", 3.0)
    max_image_pixels: int = _help(
        "Images declaring more pixels than this are rejected from their header, before decoding (`decompression_bomb`).",
        89_478_485,
    )
    analysis_size: int = _help("Images are decoded to at most this side for the statistics and the classifiers.", 320)
    nsfw_detector: str = _help(
        "NSFW detector: `nudenet` (offline ONNX model), `none`, or `module:Class` of your own implementation.",
        "nudenet",
    )
    nsfw_threshold: float = _help("Images with an NSFW score at or above this are dropped.", 0.5)
    natural_classifier: str = _help(
        "Natural-photo classifier: `default` (linear model on image statistics), `none`, or `module:Class`.",
        "default",
    )
    natural_model_path: str | None = _help(
        "JSON weights for the default natural-photo classifier; the packaged weights when unset.", None
    )
    natural_threshold: float = _help("Images whose natural-photo probability is below this are dropped.", 0.5)


@dataclass
class TextCleaningConfig(_StageConfig):
    """Stage 3: sentence cleaning rules (from the paper and Conceptual Captions)."""

    min_words: int = _help("Texts with fewer words are dropped (`too_short`).", 3)
    max_words: int = _help("Texts with more words are dropped (`too_long`).", 40)
    min_chars: int = _help("Texts with fewer characters are dropped (`too_short`).", 12)
    max_chars: int = _help("Texts with more characters are dropped (`too_long`).", 300)
    spam_phrases: list[str] = _help(
        "Whole-word phrases marking spam (`spam`).", factory=lambda: list(DEFAULT_SPAM_PHRASES)
    )
    porn_words: list[str] = _help(
        "Whole words marking adult content (`porn`).", factory=lambda: list(DEFAULT_PORN_WORDS)
    )
    boilerplate_phrases: list[str] = _help(
        "Whole-word phrases marking boilerplate (`boilerplate`).", factory=lambda: list(DEFAULT_BOILERPLATE_PHRASES)
    )
    drop_filename_like: bool = _help("Drop texts that look like file names, e.g. `IMG_1234.jpg`.", True)
    drop_url_like: bool = _help("Drop texts that contain URLs or domain names.", True)
    require_function_word: bool = _help(
        "Require a determiner or preposition, as Conceptual Captions requires (drops keyword lists).", True
    )
    function_words: list[str] = _help(
        "Determiners and prepositions for `require_function_word` (matched ignoring case).",
        factory=lambda: list(DEFAULT_FUNCTION_WORDS),
    )
    max_capitalized_ratio: float = _help(
        "Drop texts where more than this ratio of the words after the first are capitalised (title case, shouting).",
        0.5,
    )
    max_repeated_word_ratio: float = _help(
        "Drop texts where the most frequent word (3+ times) makes up more than this ratio of the words.", 0.3
    )
    max_digit_ratio: float = _help("Drop texts where more than this ratio of the characters are digits.", 0.2)
    vocabulary: str = _help(
        "Vocabulary for the rare-word ratio: `wordfreq` (its top `vocabulary_size` English words) or a text file "
        "with one word per line (e.g. a BERT vocab.txt; `##` pieces are ignored).",
        "wordfreq",
    )
    vocabulary_size: int = _help("Number of wordfreq words forming the vocabulary.", 100_000)
    max_rare_word_ratio: float = _help(
        "Drop texts where more than this ratio of words is outside the vocabulary.", 0.25
    )


@dataclass
class RelevanceConfig(_StageConfig):
    """Stage 4: weak image-text relevance scoring."""

    relevance_model_path: str | None = _help(
        "JSON weights of the relevance model (see examples/train_curation_models.py); the packaged weights when unset.",
        None,
    )
    relevance_threshold: float = _help("Pairs whose relevance probability is below this are dropped.", 0.2)


@dataclass
class AggregationConfig(_StageConfig):
    """Stage 5: aggregation over the whole corpus."""

    max_images_per_text: int = _help(
        "A text attached to more than this many distinct images is dropped with all its pairs.", 5
    )


@dataclass
class CurationConfig:
    """All stage configurations together; what the stage functions and runners receive."""

    parse: ParseConfig = field(default_factory=ParseConfig)
    images: ImageFilterConfig = field(default_factory=ImageFilterConfig)
    text: TextCleaningConfig = field(default_factory=TextCleaningConfig)
    relevance: RelevanceConfig = field(default_factory=RelevanceConfig)
    aggregation: AggregationConfig = field(default_factory=AggregationConfig)

    def __post_init__(self):
        for name, cls in STAGE_CLASSES.items():
            if not isinstance(getattr(self, name), cls):
                value = getattr(self, name)
                raise TypeError(f"{name} must be a {cls.__name__}, got {value!r} ({type(value).__name__}).")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> CurationConfig:
        """Builds the configuration from `{section: {field: value}}` (what `to_dict` and `save` write); an unknown
        section or field, and every value of the wrong type or out of range, is named in the error."""
        if not isinstance(data, dict):
            raise TypeError(f"the curation configuration must be a mapping of sections, got {type(data).__name__}.")
        unknown = sorted(set(data) - set(STAGE_CLASSES))
        if unknown:
            raise ValueError(f"unknown section(s) {unknown}; expected sections among {list(STAGE_CLASSES)}.")
        stages = {}
        for name, stage_cls in STAGE_CLASSES.items():
            section = data.get(name, {})
            if not isinstance(section, dict):
                raise TypeError(f"{name} must be a mapping of fields, got {section!r} ({type(section).__name__}).")
            known = {f.name for f in dataclasses.fields(stage_cls)}
            unknown = sorted(set(section) - known)
            if unknown:
                raise ValueError(f"{name}: unknown field(s) {unknown}; allowed fields are {sorted(known)}.")
            stages[name] = stage_cls(**section)
        return cls(**stages)

    def save(self, path: str | Path) -> None:
        atomic_write_text(path, json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> CurationConfig:
        """Reads a file written by `save`; a file that cannot be read, is not JSON, or holds a bad value, is named in
        the error."""
        expected = "a JSON curation configuration (the config.json written by `CurationConfig.save`)"
        data = read_json_file(path, expected)
        try:
            return cls.from_dict(data)
        except (TypeError, ValueError) as error:
            raise type(error)(f"{path}: {error}") from None


STAGE_CLASSES = {
    "parse": ParseConfig,
    "images": ImageFilterConfig,
    "text": TextCleaningConfig,
    "relevance": RelevanceConfig,
    "aggregation": AggregationConfig,
}
TEXT_SOURCES = ("alt", "title", "figcaption", "context")
_SECTIONS = {cls.__name__: name for name, cls in STAGE_CLASSES.items()}

# Numeric fields: (lowest, highest), both inclusive, None for no bound. Sizes and counts that must let something
# through are at least 1; ratios, probabilities and thresholds lie in [0, 1].
_RANGES: dict[str, tuple[float | None, float | None]] = {
    "max_page_bytes": (1, None),
    "max_image_bytes": (1, None),
    "max_images_per_page": (1, None),
    "max_dominant_images": (1, None),
    "max_language_rank": (0, None),
    "min_page_text_chars": (0, None),
    "max_replacement_char_ratio": (0.0, 1.0),
    "min_declared_side": (0, None),
    "real_size_candidates": (1, None),
    "max_context_chars": (1, None),
    "max_context_sentences": (1, None),
    "max_resyncs_per_file": (0, None),
    "min_side": (0, None),
    "max_aspect_ratio": (1.0, None),
    "max_image_pixels": (1, None),
    "analysis_size": (1, None),
    "nsfw_threshold": (0.0, 1.0),
    "natural_threshold": (0.0, 1.0),
    "min_words": (0, None),
    "max_words": (1, None),
    "min_chars": (0, None),
    "max_chars": (1, None),
    "max_capitalized_ratio": (0.0, 1.0),
    "max_repeated_word_ratio": (0.0, 1.0),
    "max_digit_ratio": (0.0, 1.0),
    "vocabulary_size": (1, None),
    "max_rare_word_ratio": (0.0, 1.0),
    "relevance_threshold": (0.0, 1.0),
    "max_images_per_text": (1, None),
}
# Lists that must hold at least one entry (an empty one would drop every page).
_NON_EMPTY_LISTS = ("languages", "text_sources")
# Scorer choices: a built-in name or `module:Class`.
_SCORERS = {"nsfw_detector": ("nudenet", "none"), "natural_classifier": ("default", "none")}
_MIN_MAX = (("min_words", "max_words"), ("min_chars", "max_chars"))


def check_stage_config(config: Any) -> None:
    """Checks every field of a stage configuration, naming it (`text.max_words`) with what it got and what was
    expected: its type by the dataclass annotation, numeric ranges, lists of non-empty strings, known text sources
    and scorers, and that each minimum is at most its maximum. Runs in every stage's `__post_init__`, so a config
    built in Python, by `CurationConfig.from_dict` / `load` or from command-line flags is checked the same way."""
    section = _SECTIONS[type(config).__name__]
    for f in dataclasses.fields(config):
        name, value = f"{section}.{f.name}", getattr(config, f.name)
        annotation, optional = _field_kinds(type(config))[f.name]
        if optional and value is None:
            continue
        if annotation == "str":
            expected = "a non-empty string" + (" or null" if optional else "")
            if not isinstance(value, str):
                raise TypeError(f"{name} must be {expected}, got {value!r} ({type(value).__name__}).")
            if not value.strip():
                raise ValueError(f"{name} must be {expected}, got {value!r}.")
        elif annotation == "list[str]":
            if not isinstance(value, (list, tuple)) or not all(isinstance(item, str) for item in value):
                raise TypeError(f"{name} must be a list of strings, got {value!r} ({type(value).__name__}).")
            if not all(item.strip() for item in value):
                raise ValueError(f"{name} must be a list of non-empty strings, got {value!r}.")
            if not value and f.name in _NON_EMPTY_LISTS:
                raise ValueError(f"{name} must hold at least one entry, got an empty list.")
        else:
            # imported here: the config module loads transformers (and torch); `imagebert-curate --help` does not
            from ..models.imagebert.configuration_imagebert import check_field

            check_field(name, value, annotation, *_RANGES.get(f.name, (None, None)))
    if isinstance(config, ParseConfig):
        unsegmented = sorted(set(config.languages) & set(UNSEGMENTED_LANGUAGES))
        if unsegmented:
            raise ValueError(
                f"parse.languages must not name languages written without spaces between words, got "
                f"{config.languages!r} (unsupported: {unsegmented}): the text-cleaning rules count words between "
                "spaces, so every text in these languages would be dropped as too_short."
            )
        unknown = sorted(set(config.text_sources) - set(TEXT_SOURCES))
        if unknown:
            raise ValueError(
                f"parse.text_sources must be some of {TEXT_SOURCES}, got {config.text_sources!r} (unknown: {unknown})."
            )
    for field_name, builtins in _SCORERS.items():
        value = getattr(config, field_name, None)
        if value is not None and value not in builtins and not _is_import_path(value):
            raise ValueError(f"{section}.{field_name} must be one of {builtins} or `module:Class`, got {value!r}.")
    for low_name, high_name in _MIN_MAX:
        if hasattr(config, low_name) and getattr(config, low_name) > getattr(config, high_name):
            raise ValueError(
                f"{section}.{low_name} ({getattr(config, low_name)}) must be at most {section}.{high_name} "
                f"({getattr(config, high_name)})."
            )
    if isinstance(config, TextCleaningConfig) and config.require_function_word and not config.function_words:
        raise ValueError(
            "text.function_words is empty while text.require_function_word is true: every text would be dropped; "
            "give function words or set require_function_word to false."
        )


@functools.cache
def _field_kinds(cls: type) -> dict[str, tuple[str, bool]]:
    """Each field's type as `int`, `float`, `bool`, `str` or `list[str]`, and whether None is allowed. Read from the
    resolved hints, since `HfArgumentParser` replaces the fields' string annotations with types."""
    kinds = {}
    for name, hint in typing.get_type_hints(cls).items():
        args = typing.get_args(hint)
        optional = type(None) in args
        if optional:
            (hint,) = [arg for arg in args if arg is not type(None)]
        kinds[name] = ("list[str]" if typing.get_origin(hint) is list else hint.__name__, optional)
    return kinds


def _is_import_path(value: str) -> bool:
    module, _, attr = value.partition(":")
    return bool(attr) and all(part.isidentifier() for part in module.split(".")) and attr.isidentifier()


__all__ = [
    "AggregationConfig",
    "CurationConfig",
    "ImageFilterConfig",
    "ParseConfig",
    "RelevanceConfig",
    "STAGE_CLASSES",
    "TextCleaningConfig",
    "check_stage_config",
]
