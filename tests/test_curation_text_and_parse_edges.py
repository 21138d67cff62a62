"""Edge cases of the curation stages on ordinary web input: captions that repeat "a" or "the", texts in other scripts,
unknown HTTP charsets, one malformed image URL, percentage sizes, model files rewritten in the same process, and
plug-in scorers that return too few or non-finite scores."""

import json
import os

import numpy as np
import pytest

from imagebert_hf.curation import (
    ImageFilterConfig,
    ParseConfig,
    TextCleaningConfig,
    check_text,
    filter_images,
    parse_pages,
    synthetic,
)
from imagebert_hf.curation.image_filters import STAT_NAMES, get_natural_classifier, load_packaged_model
from imagebert_hf.curation.relevance import load_relevance_model, text_features
from imagebert_hf.curation.tally import INPUT, KEPT
from imagebert_hf.curation.text_cleaning import load_vocabulary

from .test_curation import DictResolver, image_batch, page_batch, photo_bytes
from .testing_utils import COCO_DIR, FLICKR_DIR, require_module, require_shared_data


# Text rules ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        "A woman standing in a kitchen by a window",
        "A bulldog , a sheep dog , and a boxer standing in a yard .",
        "The man throws the ball to the dog on the beach",
        "A cat and a dog and a bird on a bench",
    ],
)
def test_repeated_articles_and_conjunctions_are_not_keyword_stuffing(text):
    assert check_text(text, TextCleaningConfig()) == (None, 0.0)


@pytest.mark.parametrize(
    "text", ["shoes in the shoes with shoes and shoes", "the the the the the", "red shoes, blue shoes, green shoes"]
)
def test_repeated_content_words_are_still_dropped(text):
    assert check_text(text, TextCleaningConfig(require_function_word=False))[0] == "repeated_words"


def test_a_users_function_words_do_not_count_as_repetition(tmp_path):
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("der\nhund\nund\nkatze\nvogel\nauf\nbank\n", encoding="utf-8")
    config = TextCleaningConfig(vocabulary=str(vocab), function_words=["der", "und", "auf"], max_capitalized_ratio=1.0)
    assert check_text("Der Hund und der Vogel auf der Bank", config)[0] is None
    assert check_text("Katze und Katze auf der Katze", config)[0] == "repeated_words"


@require_shared_data
def test_no_true_caption_of_the_shared_data_is_keyword_stuffing():
    config = TextCleaningConfig()
    for folder in (COCO_DIR, FLICKR_DIR):
        for line in (folder / "captions.jsonl").read_text(encoding="utf-8").splitlines():
            for caption in json.loads(line)["captions"]:
                assert check_text(" ".join(caption.split()), config)[0] != "repeated_words", caption


TEXTS_IN_OTHER_SCRIPTS = {
    "ru": "Коричневая собака бежит по пляжу у моря",
    "el": "Ένας καφέ σκύλος τρέχει στην παραλία κοντά στη θάλασσα",
    "de": "Ein brauner Hund läuft über den Strand am Meer",
    "fr": "Un chien brun court sur la plage près de la mer à Nîmes",
    "hi": "एक भूरा कुत्ता समुद्र के किनारे दौड़ रहा है",
    "en": "A man drinking coffee at a café in São Paulo",
}


@pytest.mark.parametrize("language", sorted(TEXTS_IN_OTHER_SCRIPTS))
def test_words_of_any_script_are_whole_words(language, tmp_path):
    text = TEXTS_IN_OTHER_SCRIPTS[language]
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(w.strip(".,").lower() for w in text.split()) + "\n", encoding="utf-8")
    config = TextCleaningConfig(vocabulary=str(vocab), require_function_word=False)
    assert check_text(text, config) == (None, 0.0)
    assert text_features(text)[0][0] == pytest.approx(np.log1p(len(text.split())))


@pytest.mark.parametrize("language", ["zh", "ja", "th"])
def test_languages_without_spaces_between_words_are_refused(language):
    with pytest.raises(ValueError, match=rf"parse\.languages .*without spaces between words.*\['{language}'\]"):
        ParseConfig(languages=["en", language])


# Parsing ---------------------------------------------------------------------------------------------------------

PHOTO_URL = "https://news.example.com/img/harbour.jpg"
GOOD_IMAGE = '<figure><img src="/img/harbour.jpg" alt="Boats in the café harbour at sunset"></figure>'


def parse(body: str, charset=None, head=""):
    html = (
        f"<html><head><title>t</title>{head}</head><body><main><article><p>{synthetic.FILLER_PARAGRAPHS[0]}</p>"
        f"{body}<p>{synthetic.FILLER_PARAGRAPHS[1]}</p></article></main></body></html>"
    )
    batch = page_batch(html)
    batch["charset"] = [charset]
    return parse_pages(batch, ParseConfig(), DictResolver({PHOTO_URL: photo_bytes()}))


@require_module("resiliparse")
@pytest.mark.parametrize("charset", ["utf8mb4", "none", "x-bogus", "base64", "utf-8", None])
def test_a_charset_python_cannot_decode_falls_back_to_detection(charset):
    out, tally = parse(GOOD_IMAGE, charset=charset)
    assert out["image_url"] == [PHOTO_URL] and tally.drops("parse", "page") == {}
    assert out["texts"][0][0] == "Boats in the café harbour at sunset"


@require_module("resiliparse")
@pytest.mark.parametrize(
    "bad", ['<img src="http://[cdn.example.com/big.jpg" width="900" height="700">', '<img src="https://[::1/x.jpg">']
)
def test_one_malformed_image_url_drops_only_that_image(bad):
    out, tally = parse(GOOD_IMAGE + bad)
    assert out["image_url"] == [PHOTO_URL]
    assert tally.drops("parse", "image") == {"bad_src": 1}
    assert tally.get_count("parse", "image", INPUT) == tally.get_count("parse", "image", KEPT) + 1


@require_module("resiliparse")
def test_a_malformed_base_href_is_ignored():
    out, tally = parse(GOOD_IMAGE, head='<base href="http://[broken/">')
    assert out["image_url"] == [PHOTO_URL] and tally.drops("parse", "page") == {}


@require_module("resiliparse")
@pytest.mark.parametrize(("width", "kept"), [("60%", True), ("20em", True), ("640px", True), ("50", False)])
def test_only_pixel_sizes_count_as_declared(width, kept):
    out, tally = parse(GOOD_IMAGE.replace("<img ", f'<img width="{width}" '))
    assert out["image_url"] == ([PHOTO_URL] if kept else [])
    assert ("small_declared_size" in tally.drops("parse", "image")) is not kept


# Model and vocabulary files --------------------------------------------------------------------------------------


def rewrite(path, text: str) -> None:
    """Rewrites a file and moves its modification time on, as a later write would (coarse clocks may not)."""
    before = path.stat().st_mtime_ns if path.exists() else 0
    path.write_text(text, encoding="utf-8")
    os.utime(path, ns=(before + 10**9, before + 10**9))


def test_a_vocabulary_rewritten_at_the_same_path_is_read_again(tmp_path):
    vocab = tmp_path / "vocab.txt"
    rewrite(vocab, "dog\n")
    assert load_vocabulary(str(vocab), 10) == {"dog"}
    rewrite(vocab, "cat\n")
    assert load_vocabulary(str(vocab), 10) == {"cat"}


@pytest.mark.parametrize("kind", ["relevance", "natural_photo"])
def test_a_model_rewritten_at_the_same_path_is_read_again(kind, tmp_path):
    path = tmp_path / f"{kind}.json"
    model = load_packaged_model(f"{kind}.json")
    load = (
        (lambda: load_relevance_model(str(path)))
        if kind == "relevance"
        else (lambda: get_natural_classifier("default", str(path)).model)
    )
    for intercept in (-3.0, 4.0):
        model.intercept = intercept
        rewrite(path, json.dumps(model.to_dict()))
        assert load().intercept == intercept


# Plug-in scorers -------------------------------------------------------------------------------------------------


class ShortNatural:
    def score(self, images, stats):
        return [0.9] * (len(images) - 1)


class NanNSFW:
    def score(self, images, stats):
        return [float("nan")] + [0.0] * (len(images) - 1)


class InfNatural:
    def score(self, images, stats):
        return [float("inf")] + [1.0] * (len(images) - 1)


class TextNatural:
    def score(self, images, stats):
        return ["high"] * len(images)


class ArrayNSFW:
    def score(self, images, stats):
        return np.zeros(len(images), dtype=np.float32)


def filter_two(natural="none", nsfw="none"):
    config = ImageFilterConfig(natural_classifier=natural, nsfw_detector=nsfw)
    return filter_images(image_batch([photo_bytes(), photo_bytes(seed=1)]), config)


@pytest.mark.parametrize(
    ("natural", "nsfw", "message"),
    [
        ("ShortNatural", "none", r"images\.natural_classifier '.*:ShortNatural' returned 1 scores for 2 images"),
        ("TextNatural", "none", r"images\.natural_classifier '.*:TextNatural' returned 'high' \(str\)"),
    ],
)
def test_a_plugin_returning_other_than_one_number_per_image_is_named(natural, nsfw, message):
    with pytest.raises(ValueError, match=message):
        filter_two(f"{__name__}:{natural}")


@pytest.mark.parametrize(
    ("natural", "nsfw", "reason"), [("none", "NanNSFW", "bad_nsfw_score"), ("InfNatural", "none", "bad_natural_score")]
)
def test_an_image_with_a_non_finite_score_is_dropped_and_counted(natural, nsfw, reason):
    spec = {name: name if name == "none" else f"{__name__}:{name}" for name in (natural, nsfw)}
    out, tally = filter_two(spec[natural], spec[nsfw])
    assert out["image_id"] == ["1"]
    assert tally.drops("images", "image") == {reason: 1}
    assert tally.get_count("images", "image", INPUT) == 2 and tally.get_count("images", "image", KEPT) == 1


def test_a_plugin_may_return_a_numpy_array():
    out, tally = filter_two(nsfw=f"{__name__}:ArrayNSFW")
    assert out["image_id"] == ["0", "1"] and out["nsfw_score"] == [0.0, 0.0]
    assert len(out["image_stats"][0]) == len(STAT_NAMES)


def test_a_text_far_beyond_the_length_limit_is_too_long_before_any_pattern_reads_it(monkeypatch):
    """A page may carry megabytes of alt text; the URL pattern's cost grows with the square of a hyphenated run."""
    from imagebert_hf.curation import text_cleaning

    config = TextCleaningConfig()
    hostile = "a-" * (4 * config.max_chars)
    assert check_text("see www.example.com for the photo", config)[0] == "url_like"  # the order of the rules holds

    class Untouchable:
        def search(self, text):
            raise AssertionError("a pattern read a text far beyond max_chars")

    monkeypatch.setattr(text_cleaning, "_URL", Untouchable())
    assert check_text(hostile, config) == ("too_long", 1.0)
