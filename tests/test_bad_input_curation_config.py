"""Bad input at the curation-configuration boundary: every stage field of the wrong type or out of range, a minimum
above its maximum, unknown sections and fields, and damaged files fail with a `TypeError` / `ValueError` naming the
field (`text.max_words`), what it got and what was expected, whether the configuration is built in Python, by
`CurationConfig.from_dict`, by `CurationConfig.load` or from `imagebert-curate` flags."""

import dataclasses
import json
import math
import typing

import pytest

from imagebert_hf.curation.cli import parse_args
from imagebert_hf.curation.config import (
    AggregationConfig,
    CurationConfig,
    ImageFilterConfig,
    ParseConfig,
    RelevanceConfig,
    TextCleaningConfig,
)


SECTIONS = {
    "parse": ParseConfig,
    "images": ImageFilterConfig,
    "text": TextCleaningConfig,
    "relevance": RelevanceConfig,
    "aggregation": AggregationConfig,
}

# What each numeric field must satisfy, written out here as the specification (not read from the code).
AT_LEAST_ONE = (
    "max_page_bytes",
    "max_image_bytes",
    "max_images_per_page",
    "max_dominant_images",
    "real_size_candidates",
    "max_context_chars",
    "max_context_sentences",
    "max_image_pixels",
    "analysis_size",
    "max_words",
    "max_chars",
    "vocabulary_size",
    "max_images_per_text",
)
AT_LEAST_ZERO = ("max_language_rank", "min_page_text_chars", "min_declared_side", "max_resyncs_per_file", "min_side")
UNIT_INTERVAL = (
    "max_replacement_char_ratio",
    "nsfw_threshold",
    "natural_threshold",
    "max_capitalized_ratio",
    "max_repeated_word_ratio",
    "max_digit_ratio",
    "max_rare_word_ratio",
    "relevance_threshold",
)

# Values of the wrong type per annotation: a string where a word list belongs must not become a list of characters.
WRONG_TYPES = {
    int: ["three", 2.5, True, None, [3]],
    float: ["high", [0.5], True, None],
    bool: ["yes", 1, None],
    str: [5, ["wordfreq"]],
    list[str]: ["cheap", [1, 2], None, {"a": 1}],
}


def _section_of(name: str) -> str:
    (section,) = [section for section, cls in SECTIONS.items() if name in {f.name for f in dataclasses.fields(cls)}]
    return section


def _kinds(cls):
    """(field, annotation without None, whether None is allowed) of every field of a stage class."""
    for name, hint in typing.get_type_hints(cls).items():
        args = typing.get_args(hint)
        optional = type(None) in args
        if optional:
            (hint,) = [arg for arg in args if arg is not type(None)]
        yield name, hint, optional


def _type_cases():
    for section, cls in SECTIONS.items():
        for name, hint, optional in _kinds(cls):
            for value in WRONG_TYPES[hint]:
                if optional and value is None:
                    continue
                yield pytest.param(section, name, value, TypeError, id=f"{section}.{name}={value!r}")


def _value_cases():
    for name in AT_LEAST_ONE:
        yield name, 0
        yield name, -3
    for name in AT_LEAST_ZERO:
        yield name, -1
    for name in UNIT_INTERVAL:
        yield name, -0.01
        yield name, 1.5
        yield name, math.nan
        yield name, math.inf
    yield "max_aspect_ratio", 0.5
    yield "max_aspect_ratio", -3.0
    yield "max_aspect_ratio", math.inf
    for section, cls in SECTIONS.items():
        for name, hint, _ in _kinds(cls):
            if hint is str:
                yield name, ""
                yield name, "   "
            if hint == list[str]:
                yield name, ["fine", ""]
    yield "languages", []
    yield "text_sources", []
    yield "text_sources", ["alt", "caption"]
    yield "nsfw_detector", "nudnet"
    yield "nsfw_detector", "my detector:Class"
    yield "natural_classifier", "defualt"
    yield "natural_classifier", "module:"


def _value_params():
    for name, value in _value_cases():
        section = _section_of(name)
        yield pytest.param(section, name, value, ValueError, id=f"{section}.{name}={value!r}")


# (section, fields, the fields the message must name): combinations that are wrong together.
COMBINATIONS = [
    ("text", {"min_words": 41, "max_words": 40}, ("text.min_words", "text.max_words", "41", "40")),
    ("text", {"min_words": 5, "max_words": 4}, ("text.min_words", "text.max_words")),
    ("text", {"min_chars": 301}, ("text.min_chars", "text.max_chars", "301")),
    ("text", {"min_chars": 20, "max_chars": 10}, ("text.min_chars", "text.max_chars")),
    ("text", {"function_words": []}, ("text.function_words", "text.require_function_word")),
]

TYPE_CASES = list(_type_cases())
VALUE_CASES = list(_value_params())
FIELD_CASES = TYPE_CASES + VALUE_CASES


def _assert_names(error: pytest.ExceptionInfo, section: str, name: str, value) -> None:
    message = str(error.value)
    assert f"{section}.{name}" in message, message
    assert repr(value) in message or (value == [] and "empty" in message), message
    assert "must" in message, message


@pytest.mark.parametrize("section, name, value, error", FIELD_CASES)
def test_field_checked_in_python(section, name, value, error):
    with pytest.raises(error) as info:
        SECTIONS[section](**{name: value})
    _assert_names(info, section, name, value)


@pytest.mark.parametrize("section, name, value, error", FIELD_CASES)
def test_field_checked_by_from_dict(section, name, value, error):
    with pytest.raises(error) as info:
        CurationConfig.from_dict({section: {name: value}})
    _assert_names(info, section, name, value)


@pytest.mark.parametrize("section, name, value, error", FIELD_CASES)
def test_field_checked_by_load_naming_the_file(tmp_path, section, name, value, error):
    data = CurationConfig().to_dict()
    data[section][name] = value
    path = tmp_path / "config.json"
    path.write_text(json.dumps(data))
    with pytest.raises(error) as info:
        CurationConfig.load(path)
    _assert_names(info, section, name, value)
    assert str(path) in str(info.value)


def _flag_cases():
    """Out-of-range numbers given as flags (what argparse lets through: it already refuses `--min_side three`)."""
    for param in VALUE_CASES:
        section, name, value, error = param.values
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            yield pytest.param(section, name, value, error, id=param.id)


FLAG_CASES = list(_flag_cases())


@pytest.mark.parametrize("section, name, value, error", FLAG_CASES)
def test_field_checked_from_flags(tmp_path, section, name, value, error):
    argv = ["--inputs", "pages/", "--output_dir", str(tmp_path), f"--{name}", str(value)]
    with pytest.raises(error) as info:
        parse_args(argv)
    assert f"{section}.{name}" in str(info.value)


@pytest.mark.parametrize("section, name, value, error", FLAG_CASES)
def test_field_checked_from_config_file_under_flags(tmp_path, section, name, value, error):
    """A bad value in `--config_file` is named with the file; a good flag does not hide it."""
    data = CurationConfig().to_dict()
    data[section][name] = value
    path = tmp_path / "run.json"
    path.write_text(json.dumps(data))
    other = "max_images_per_text" if name != "max_images_per_text" else "min_side"
    argv = ["--inputs", "pages/", "--output_dir", str(tmp_path), "--config_file", str(path), f"--{other}", "4"]
    with pytest.raises(error) as info:
        parse_args(argv)
    assert f"{section}.{name}" in str(info.value) and str(path) in str(info.value)


@pytest.mark.parametrize("section, fields, names", COMBINATIONS)
def test_combination_checked(section, fields, names):
    with pytest.raises(ValueError) as info:
        CurationConfig.from_dict({section: fields})
    for name in names:
        assert name in str(info.value), str(info.value)


def test_flag_over_a_good_config_file_is_checked(tmp_path):
    path = tmp_path / "run.json"
    CurationConfig().save(path)
    argv = ["--inputs", "p/", "--output_dir", str(tmp_path), "--config_file", str(path), "--min_words", "99"]
    with pytest.raises(ValueError, match=r"text\.min_words \(99\) must be at most text\.max_words \(40\)"):
        parse_args(argv)


STRUCTURE_CASES = [
    pytest.param(
        {"parse": {"max_page_byte": 10}}, ValueError, ("parse", "max_page_byte", "max_page_bytes"), id="typo"
    ),
    pytest.param({"text": {"min_side": 300}}, ValueError, ("text", "min_side"), id="field-of-another-section"),
    pytest.param({"image": {}}, ValueError, ("image", "images"), id="unknown-section"),
    pytest.param({"parse": [1, 2]}, TypeError, ("parse", "mapping", "[1, 2]"), id="section-not-a-mapping"),
    pytest.param({"relevance": None}, TypeError, ("relevance", "None"), id="section-null"),
    pytest.param([{"parse": {}}], TypeError, ("mapping", "list"), id="config-a-list"),
    pytest.param("parse", TypeError, ("mapping", "str"), id="config-a-string"),
]


@pytest.mark.parametrize("data, error, names", STRUCTURE_CASES)
def test_structure_checked(data, error, names):
    with pytest.raises(error) as info:
        CurationConfig.from_dict(data)
    for name in names:
        assert name in str(info.value), str(info.value)


DAMAGED_FILES = [
    pytest.param(b'{"parse": {"max_page_bytes": 10', ValueError, "line 1", id="truncated"),
    pytest.param(b"", ValueError, "JSON", id="empty"),
    pytest.param(b"\x89PNG\r\n\x1a\n\x00\x00\xff\xfe", ValueError, "JSON", id="binary"),
    pytest.param(b"parse:\n  max_page_bytes: 10\n", ValueError, "JSON", id="yaml"),
    pytest.param(b"[1, 2, 3]", TypeError, "mapping", id="json-list"),
    pytest.param(b'{"parse": {"max_page_bytes": 10}, "extra": 1}', ValueError, "extra", id="unknown-section"),
]


@pytest.mark.parametrize("content, error, expected", DAMAGED_FILES)
def test_damaged_file_named(tmp_path, content, error, expected):
    path = tmp_path / "config.json"
    path.write_bytes(content)
    with pytest.raises(error) as info:
        CurationConfig.load(path)
    assert str(path) in str(info.value) and expected in str(info.value), str(info.value)


def test_section_object_of_the_wrong_class():
    with pytest.raises(TypeError, match=r"images must be a ImageFilterConfig, got ParseConfig"):
        CurationConfig(images=ParseConfig())


def test_good_values_still_accepted(tmp_path):
    """The edges of every range, tuples of words and plug-in scorers pass, and a saved config round-trips."""
    config = CurationConfig(
        parse=ParseConfig(max_language_rank=0, min_declared_side=0, max_resyncs_per_file=0, text_sources=["alt"]),
        images=ImageFilterConfig(
            min_side=0, max_aspect_ratio=1.0, nsfw_threshold=1.0, natural_threshold=0.0, nsfw_detector="pkg.mod:Cls"
        ),
        text=TextCleaningConfig(
            min_words=0,
            max_words=1,
            min_chars=0,
            max_chars=1,
            spam_phrases=[],
            require_function_word=False,
            function_words=[],
            max_digit_ratio=0,
            max_rare_word_ratio=1,
        ),
        relevance=RelevanceConfig(relevance_threshold=0.0, relevance_model_path=None),
        aggregation=AggregationConfig(max_images_per_text=1),
    )
    assert TextCleaningConfig(porn_words=("xxx",)).porn_words == ("xxx",)
    path = tmp_path / "config.json"
    config.save(path)
    assert CurationConfig.load(path) == config
