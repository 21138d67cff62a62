"""Configuration of the curation stages, one dataclass per stage.

The dataclasses are flat so that `transformers.HfArgumentParser` can expose every field as a command-line flag;
field names are unique across all of them for the same reason. `CurationConfig` bundles them for the Python API.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path


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
DEFAULT_FUNCTION_WORDS = (
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
    "next",
    "through",
    "across",
    "along",
    "around",
    "inside",
    "outside",
    "while",
)


@dataclass
class ParseConfig:
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
class ImageFilterConfig:
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
class TextCleaningConfig:
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
        "Determiners and prepositions for `require_function_word`.", factory=lambda: list(DEFAULT_FUNCTION_WORDS)
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
class RelevanceConfig:
    """Stage 4: weak image-text relevance scoring."""

    relevance_model_path: str | None = _help(
        "JSON weights of the relevance model (see examples/train_curation_models.py); the packaged weights when unset.",
        None,
    )
    relevance_threshold: float = _help("Pairs whose relevance probability is below this are dropped.", 0.2)


@dataclass
class AggregationConfig:
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

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> CurationConfig:
        return cls(
            parse=ParseConfig(**data.get("parse", {})),
            images=ImageFilterConfig(**data.get("images", {})),
            text=TextCleaningConfig(**data.get("text", {})),
            relevance=RelevanceConfig(**data.get("relevance", {})),
            aggregation=AggregationConfig(**data.get("aggregation", {})),
        )

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> CurationConfig:
        return cls.from_dict(json.loads(Path(path).read_text()))
