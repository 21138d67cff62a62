"""A saved model folder is user input: its tokenizer files, `processor_config.json` and `config.json` may be edited,
damaged or written by other tools. Each defect is refused when the folder is loaded, naming the file or setting,
rather than serving texts with equal scores or failing later with an error that names neither."""

import json
from pathlib import Path

import pytest
from PIL import Image

from imagebert_hf import ImageBERTConfig, ImageBERTForImageTextRetrieval
from imagebert_hf.models.imagebert.processing_imagebert import ImageBERTProcessor

from .test_pipeline_retrieval import TEXTS, retriever, saved_model  # noqa: F401 - fixtures
from .test_processor_pipeline_inputs import _edit_processor_config, folder  # noqa: F401 - fixture


def _pipeline(path):
    from transformers import pipeline

    return pipeline("image-text-retrieval", model=str(path), device=-1)


def _edit_json(path, change) -> None:
    data = json.loads(path.read_text())
    path.write_text(json.dumps(change(data)))


# ------------------------------------------------------------------------------------------------ tokenizer


def test_a_left_padding_tokenizer_config_still_pads_on_the_right(folder, retriever, saved_model):  # noqa: F811
    _edit_json(folder / "tokenizer_config.json", lambda data: {**data, "padding_side": "left"})
    left = _pipeline(folder)
    assert left.processor.tokenizer.padding_side == "left"
    ids = left.processor(text=["a red circle"], return_tensors="np")["input_ids"][0]
    assert ids[0] == left.processor.tokenizer.cls_token_id and ids[-1] == left.processor.tokenizer.pad_token_id
    image = saved_model[1][0]
    scores = [r["score"] for r in left(images=image, texts=TEXTS)]
    assert scores == pytest.approx([r["score"] for r in retriever(images=image, texts=TEXTS)], abs=1e-6)
    assert len(set(scores)) > 1  # left-padded, every text got the very same score


def test_a_folder_without_processor_or_vocabulary_is_refused(folder):  # noqa: F811
    (folder / "processor_config.json").unlink()
    (folder / "tokenizer.json").unlink()
    (folder / "vocab.txt").unlink(missing_ok=True)
    with pytest.raises(ValueError, match=r"knows only its \d+ special tokens"):
        _pipeline(folder)


def test_a_tokenizer_larger_than_the_models_vocabulary_is_refused_at_load(folder):  # noqa: F811
    def grow(data):
        vocab = data["model"]["vocab"]
        vocab.update({f"word{i}": len(vocab) + i for i in range(50)})
        return data

    _edit_json(folder / "tokenizer.json", grow)
    vocab_size = json.loads((folder / "config.json").read_text())["vocab_size"]
    with pytest.raises(ValueError, match=rf"has \d+ tokens but the model config's vocab_size is {vocab_size}"):
        _pipeline(folder)


def test_a_tokenizer_without_its_special_tokens_is_refused(folder):  # noqa: F811
    (folder / "tokenizer_config.json").unlink()
    with pytest.raises(ValueError, match=r"has no cls_token, sep_token(, pad_token)?; the model.s text input"):
        _pipeline(folder)


@pytest.mark.parametrize("name", ["tokenizer.json", "tokenizer_config.json"])
def test_a_tokenizer_file_that_is_not_json_is_named(folder, name):  # noqa: F811
    (folder / name).write_text("{")
    with pytest.raises(ValueError, match=rf"{name} is not valid JSON"):
        _pipeline(folder)
    with pytest.raises(ValueError, match=rf"{name} is not valid JSON"):
        ImageBERTProcessor.from_pretrained(folder)


INVISIBLE = ["\u200b", "\ufeff", "\u2060", "\x00\x07", " \u200b\t"]


@pytest.mark.parametrize("text", INVISIBLE)
def test_a_text_of_invisible_characters_is_refused_not_ranked(retriever, saved_model, text):  # noqa: F811
    with pytest.raises(ValueError, match=r"text\[1\] .* has no words"):
        retriever.processor(text=["a red circle", text])
    with pytest.raises(ValueError, match=r"has no words|is empty"):
        retriever(images=saved_model[1][0], texts=["a red circle", text])


def test_a_text_of_unknown_words_is_still_scored(retriever, saved_model):  # noqa: F811
    # Emoji are one unknown-word token for a BERT vocabulary: a word, not an empty text.
    assert len(retriever(images=saved_model[1][0], texts=["\U0001f600", "a red circle"])) == 2


# ------------------------------------------------------------------------------------ processor_config.json


PROCESSOR_CONFIG_DEFECTS = [
    ("not JSON", lambda path: path.write_text("{"), r"processor_config.json is not valid JSON"),
    ("a list", lambda path: path.write_text("[1]"), r"processor_config.json must hold a JSON object, got list"),
    (
        "image_processor a list",
        lambda path: _edit_json(path, lambda data: {**data, "image_processor": [1]}),
        r"processor_config.json: image_processor must be an object, got \[1\]",
    ),
    (
        "another processor class",
        lambda path: _edit_json(path, lambda data: {**data, "processor_class": "CLIPProcessor"}),
        r"processor_config.json names processor_class 'CLIPProcessor'",
    ),
]


@pytest.mark.parametrize(
    ("defect", "damage", "message"), PROCESSOR_CONFIG_DEFECTS, ids=[c[0] for c in PROCESSOR_CONFIG_DEFECTS]
)
def test_a_damaged_processor_config_is_named_not_served_without_it(folder, defect, damage, message):  # noqa: F811
    damage(folder / "processor_config.json")
    with pytest.raises(ValueError, match=message):
        _pipeline(folder)
    if defect != "another processor class":  # transformers picks the class named there itself
        with pytest.raises(ValueError, match=message):
            ImageBERTProcessor.from_pretrained(folder)


EXTRACTOR_SETTING_DEFECTS = [
    ({"device": 5}, TypeError, r"device must be a device name .* got 5"),
    ({"device": "gpu please"}, ValueError, r"device 'gpu please' cannot be used here"),
    ({"device": "meta"}, ValueError, r"device 'meta' cannot be used here"),
    ({"backbone_name": "no_such_model"}, ValueError, r"backbone_name 'no_such_model' is not a timm model name"),
    ({"backbone_out_indices": "12"}, ValueError, r"backbone_out_indices must be a non-empty list .* got '12'"),
    ({"backbone_out_indices": [1, "2"]}, TypeError, r"backbone_out_indices\[1\] must be an integer"),
    ({"backbone_kwargs": [1, 2]}, TypeError, r"backbone_kwargs must be a mapping .* got \[1, 2\]"),
    ({"detector_kwargs": "x"}, TypeError, r"detector_kwargs must be a mapping"),
]


@pytest.mark.parametrize(("setting", "error", "message"), EXTRACTOR_SETTING_DEFECTS, ids=lambda v: str(v)[:30])
def test_a_bad_extractor_setting_is_named_not_blamed_on_the_weights(folder, saved_model, setting, error, message):  # noqa: F811
    _edit_processor_config(folder, lambda data: data["image_processor"].update(setting))
    with pytest.raises(error, match=message) as info:
        _pipeline(folder)(images=saved_model[1][0], texts=TEXTS[:2])
    assert "weights file" not in str(info.value)


def test_a_region_layout_the_model_cannot_take_is_refused_at_load(folder):  # noqa: F811
    _edit_processor_config(folder, lambda data: data["image_processor"].update(region_location_size=7))
    with pytest.raises(ValueError, match=r"region location size 7 != the model config's region_location_size 5"):
        _pipeline(folder)


def test_region_features_the_model_cannot_take_are_refused_before_extraction(folder, saved_model):  # noqa: F811
    _edit_json(folder / "config.json", lambda data: {**data, "region_feature_size": data["region_feature_size"] + 1})
    (folder / "model.safetensors").unlink()  # the weights of the other size no longer fit
    model = ImageBERTForImageTextRetrieval(ImageBERTConfig.from_pretrained(folder))
    model.save_pretrained(folder)
    other = _pipeline(folder)  # texts and cached regions of the right size need no extractor
    with pytest.raises(ValueError, match=r"region feature size \d+ != the model config's region_feature_size"):
        other(images=saved_model[1][0], texts=TEXTS[:2])


# ------------------------------------------------------------------------------------------------ images


def test_a_lazily_opened_truncated_image_is_named(retriever, saved_model, tmp_path):  # noqa: F811
    good = saved_model[1][0]
    data = Path(good).read_bytes()
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"images\[1\] .*truncated or corrupt image data"):
        retriever(images=[good, Image.open(truncated)], texts=TEXTS[0])


# ------------------------------------------------------------------------------------------------ config.json


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda data: [1, 2], r"a model config \(config.json\) must be a JSON object of fields, got list"),
        (lambda data: {**data, "dtype": "foo"}, r"dtype must be one of .* got 'foo'"),
        (lambda data: {**data, "dtype": "float8_e4m3fn"}, r"dtype must be one of .* got 'float8_e4m3fn'"),
    ],
)
def test_a_damaged_model_config_is_named(folder, change, message):  # noqa: F811
    _edit_json(folder / "config.json", change)
    with pytest.raises(ValueError, match=message):
        ImageBERTForImageTextRetrieval.from_pretrained(folder)


def test_a_half_precision_dtype_in_the_config_still_loads(folder):  # noqa: F811
    _edit_json(folder / "config.json", lambda data: {**data, "dtype": "bfloat16"})
    assert ImageBERTConfig.from_pretrained(folder).dtype is not None
