"""Stage 3: sentence cleaning. Turns each image's candidate texts into image-text pairs, dropping noisy texts.

Rules follow the paper (noise words, normal-length sentences, rare-word ratio) and Conceptual Captions (keyword
lists without determiner or preposition, title case, token repetition). Each text gets the first rule it breaks
as its drop reason; every rule is a field of `TextCleaningConfig`.
"""

from __future__ import annotations

import functools
import hashlib
import re
import unicodedata
from collections import Counter

from ..formats.files import read_text_file
from .config import REPETITION_EXEMPT_WORDS, TextCleaningConfig
from .inputs import input_version, is_url
from .tally import INPUT, KEPT, Tally


STAGE = "text"
PAIR_COLUMNS = (
    "pair_id",
    "image_id",
    "page_url",
    "source",
    "image_url",
    "image",
    "image_hash",
    "width",
    "height",
    "text",
    "text_source",
    "dom_score",
    "language_rank",
    "nsfw_score",
    "natural_score",
    "rare_word_ratio",
    "image_stats",
)


def _combining_marks() -> str:
    r"""The combining marks of the Basic Multilingual Plane as character-class ranges. `\w` does not match them, yet
    they belong to the letter before them: Devanagari or Tamil vowel signs, decomposed accents."""
    ranges, start = [], None
    for code in range(0x10001):
        is_mark = code < 0x10000 and unicodedata.category(chr(code)).startswith("M")
        if is_mark and start is None:
            start = code
        elif not is_mark and start is not None:
            ranges.append(f"\\u{start:04x}-\\u{code - 1:04x}")
            start = None
    return "".join(ranges)


_MARKS = _combining_marks()
# A word: letters of any script, each with its combining marks (ASCII text splits exactly as `[A-Za-z]+` would).
WORD_PATTERN = rf"(?:[^\W\d_][{_MARKS}]*)+"
# Where a word does not go on: neither a letter nor a combining mark before (or after) this point.
_NO_LETTER_BEFORE = rf"(?<![^\W\d_])(?<![{_MARKS}])"
_NO_LETTER_AFTER = rf"(?![^\W\d_]|[{_MARKS}])"
_WORD = re.compile(rf"{WORD_PATTERN}(?:['’]{WORD_PATTERN})?")
_TOKEN = re.compile(r"\S+")
_SPACE = re.compile(r"\s+")
_FILE_EXT = re.compile(r"\.(jpe?g|png|gif|webp|bmp|tiff?|svg|heic|avif)\b", re.IGNORECASE)
_CAMERA_NAME = re.compile(r"^(img|dsc|dscn|dscf|dcim|pict|pic|photo|image|screenshot|scan|p)[\s_\-]*\d{2,}", re.I)
_SLUG = re.compile(r"^[\w]+([_\-][\w]+){2,}$")
_URL = re.compile(r"(https?://|www\.|\b[\w\-]+\.(com|net|org|io|co|info|biz|ru|de|uk|html?|php)\b)", re.IGNORECASE)


def _continuation_characters() -> str:
    """What UTF-8's continuation bytes (0x80-0xBF) become when UTF-8 is read as cp1252 or Latin-1."""
    found = {chr(byte) for byte in range(0x80, 0xC0)}
    for byte in range(0x80, 0xC0):
        found.update(bytes([byte]).decode("cp1252", errors="ignore"))
    return "".join(sorted(found))


# UTF-8 read as cp1252 or Latin-1: "é" becomes "Ã©", "É" "Ã‰", a no-break space "Â" and a space. "Ã" or "Â" before an
# ASCII letter is no such pair ("SÃO", "NÃO", "CÂMARA"): no continuation byte reads as one.
_MOJIBAKE = re.compile(rf"\ufffd|â€|[ÃÂ][{re.escape(_continuation_characters())}]|Â(?!\S)")
# "Ã" then a space or the end is "à" read as cp1252, unless it ends a word in capitals ("IRMÃ", "AMANHÃ").
_A_TILDE_AT_WORD_END = re.compile(r"Ã(?!\S)")
# Control characters (C0 but tab and line breaks, DEL, C1), surrogates, private-use characters (icon fonts' glyphs).
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\ud800-\udfff\ue000-\uf8ff\U000f0000-\U0010ffff]")


def normalize_text(text: str) -> str:
    return _SPACE.sub(" ", text).strip()


def text_key(text: str) -> str:
    """The form under which texts count as the same (aggregation's shared-text rule uses it too)."""
    return normalize_text(text).lower().rstrip(" .!")


def _has_mojibake(text: str) -> bool:
    if _MOJIBAKE.search(text):
        return True
    return any(m.start() == 0 or not text[m.start() - 1].isupper() for m in _A_TILDE_AT_WORD_END.finditer(text))


def _caseless(text: str) -> str:
    """The form in which phrases are looked for: composed accents (as typed or decomposed), lower case. Not
    `casefold`: it turns German "aß" into the word "ass"."""
    return unicodedata.normalize("NFC", text).lower()


def _phrase_pattern(phrases: tuple[str, ...]) -> re.Pattern | None:
    parts = [re.escape(_caseless(p)) for p in phrases if p.strip()]
    if not parts:
        return None
    # Whole words of any script, as `WORD_PATTERN` splits them: "ad" does not match "bread", "sex" not "Essex", "секс"
    # not "сексуальный", "cafe" not the "café" written with a combining accent.
    alternatives = "|".join(sorted(parts, key=len, reverse=True))
    return re.compile(f"{_NO_LETTER_BEFORE}({alternatives}){_NO_LETTER_AFTER}")


@functools.lru_cache(maxsize=32)
def _caseless_words(words: tuple[str, ...]) -> frozenset[str]:
    """Configured words as the text's words are compared with them: "Der" in a list matches "der" in a text."""
    return frozenset(_caseless(word.strip()) for word in words)


@functools.lru_cache(maxsize=32)
def _patterns(spam: tuple[str, ...], porn: tuple[str, ...], boilerplate: tuple[str, ...]):
    return _phrase_pattern(spam), _phrase_pattern(porn), _phrase_pattern(boilerplate)


def file_version(path: str | None) -> tuple | None:
    """What the caches of loaded models and vocabularies are keyed by besides the path, so that a file rewritten at
    the same path is read again: its size and modification time. None for no path, a URL (the loaders read local
    files only, and say so) and a file that cannot be read (its loader raises naming it)."""
    if path is None or is_url(path):
        return None
    try:
        return input_version(path)
    except OSError:
        return None


def load_vocabulary(vocabulary: str, size: int) -> frozenset[str]:
    """The set of known lowercase words: wordfreq's top English words (offline) or a one-word-per-line file."""
    return _load_vocabulary(vocabulary, size, None if vocabulary == "wordfreq" else file_version(vocabulary))


@functools.lru_cache(maxsize=4)
def _load_vocabulary(vocabulary: str, size: int, version: tuple | None) -> frozenset[str]:
    if vocabulary == "wordfreq":
        from wordfreq import top_n_list

        return frozenset(top_n_list("en", size))
    expected = "`wordfreq` or a UTF-8 text file with one word per line"
    words = set()
    for line in read_text_file(vocabulary, expected).splitlines():
        word = line.strip().lower()
        if word and not word.startswith("##") and not word.startswith("["):
            words.add(word)
    if not words:
        # An empty vocabulary makes every word rare, so every text would be dropped.
        raise ValueError(f"{vocabulary} holds no words; expected {expected}.")
    return frozenset(words)


def rare_word_ratio(words: list[str], vocabulary: frozenset[str]) -> float:
    if not words:
        return 1.0
    rare = sum(1 for w in words if w.lower().replace("’", "'") not in vocabulary and w.lower() not in vocabulary)
    return rare / len(words)


# A text this many times `max_chars` is refused as too long before any pattern reads it.
_HOSTILE_LENGTH_FACTOR = 4


def check_text(text: str, config: TextCleaningConfig) -> tuple[str | None, float]:
    """The first rule `text` breaks (or None) and its rare-word ratio."""
    if len(text) > _HOSTILE_LENGTH_FACTOR * config.max_chars:
        # Far too long for any rule to matter, and the URL pattern's cost grows with the square of such a text.
        return "too_long", 1.0
    if _CONTROL.search(text) or _has_mojibake(text):
        return "bad_characters", 1.0
    tokens = _TOKEN.findall(text)
    words = _WORD.findall(text)
    # File names and URLs first: they are usually also too short, and this reason says more.
    if config.drop_url_like and _URL.search(text):
        return "url_like", 1.0
    if config.drop_filename_like and (
        _FILE_EXT.search(text) or _CAMERA_NAME.match(text) or (len(tokens) == 1 and _SLUG.match(text))
    ):
        return "filename_like", 1.0
    if len(tokens) < config.min_words or len(text) < config.min_chars or not words:
        return "too_short", 1.0
    if len(tokens) > config.max_words or len(text) > config.max_chars:
        return "too_long", 1.0
    lower = _caseless(text)
    spam, porn, boilerplate = _patterns(
        tuple(config.spam_phrases), tuple(config.porn_words), tuple(config.boilerplate_phrases)
    )
    if porn is not None and porn.search(lower):
        return "porn", 1.0
    if spam is not None and spam.search(lower):
        return "spam", 1.0
    if boilerplate is not None and boilerplate.search(lower):
        return "boilerplate", 1.0
    if sum(c.isdigit() for c in text) > config.max_digit_ratio * len(text):
        return "too_many_digits", 1.0
    lower_words = [_caseless(w) for w in words]
    function_words = _caseless_words(tuple(config.function_words))
    if config.require_function_word and not function_words.intersection(lower_words):
        return "no_function_word", 1.0
    later = words[1:]
    if later and sum(w[0].isupper() for w in later) > config.max_capitalized_ratio * len(later):
        return "capitalized", 1.0
    # Keyword stuffing repeats content words; "a", "the" or "and" three times is an ordinary sentence. A text of
    # function words alone is judged on all of them.
    exempt = REPETITION_EXEMPT_WORDS | function_words
    counted = [w for w in lower_words if w not in exempt] or lower_words
    top_count = Counter(counted).most_common(1)[0][1]
    if top_count >= 3 and top_count > config.max_repeated_word_ratio * len(lower_words):
        return "repeated_words", 1.0
    ratio = rare_word_ratio(words, load_vocabulary(config.vocabulary, config.vocabulary_size))
    if ratio > config.max_rare_word_ratio:
        return "rare_words", ratio
    return None, ratio


def pair_id(image_id: str, text: str) -> str:
    return hashlib.sha1(f"{image_id}|{text}".encode()).hexdigest()[:24]


def clean_texts(batch: dict[str, list], config: TextCleaningConfig) -> tuple[dict[str, list], Tally]:
    """Stage 3 over a batch of filtered image records -> one pair record (`PAIR_COLUMNS`) per clean text.

    Args:
        batch: Columns of image records with `texts` and `text_sources` lists.
        config: Text-cleaning configuration.

    Returns:
        The pair records as columns, and the counts of this batch (units `image` and `pair`).
    """
    tally = Tally()
    out = {name: [] for name in PAIR_COLUMNS}
    shared = [name for name in PAIR_COLUMNS if name in batch]
    for i in range(len(batch["image_id"])):
        tally.add(STAGE, "image", INPUT)
        seen: set[str] = set()
        n_kept = 0
        for raw, origin in zip(batch["texts"][i] or [], batch["text_sources"][i] or []):
            tally.add(STAGE, "pair", INPUT)
            text = normalize_text(raw)
            key = text_key(text)
            if key in seen:
                tally.drop(STAGE, "pair", "duplicate_text")
                continue
            seen.add(key)
            try:
                reason, ratio = check_text(text, config)
            except Exception:  # one bad text must never stop a run
                reason, ratio = "text_error", 1.0
            if reason is not None:
                tally.drop(STAGE, "pair", reason)
                continue
            for name in shared:
                out[name].append(batch[name][i])
            out["pair_id"].append(pair_id(batch["image_id"][i], text))
            out["text"].append(text)
            out["text_source"].append(origin)
            out["rare_word_ratio"].append(float(ratio))
            n_kept += 1
        tally.add(STAGE, "pair", KEPT, n_kept)
        if n_kept:
            tally.add(STAGE, "image", KEPT)
        else:
            tally.drop(STAGE, "image", "no_clean_text")
    return out, tally


__all__ = [
    "PAIR_COLUMNS",
    "STAGE",
    "check_text",
    "clean_texts",
    "load_vocabulary",
    "pair_id",
    "rare_word_ratio",
    "text_key",
]
