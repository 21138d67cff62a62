"""How pretraining makes the model it trains and checks what it ships with it: a model loaded from a folder trains in
float32 whatever dtype it was saved in, `model.init_from` takes the recipe's config settings and refuses those its
weights fix (and `text_pretrained` or `config_path` beside it), and `model.processor` must fit the model and hold
the run's tokenizer before anything is written."""

import pytest
import torch
from safetensors.torch import load_file
from transformers.testing_utils import CaptureLogger

from imagebert_hf import ImageBERTForPreTraining, ImageBERTProcessor
from imagebert_hf.data.synthetic import synthetic_vocabulary
from imagebert_hf.training import recipe_from_dict, run_pretraining
from imagebert_hf.training.pretraining import build_model, load_tokenizer
from imagebert_hf.training.recipe import ModelSpec

from .test_modeling_imagebert import _tiny_bert_with_nsp_head
from .test_pretraining import tiny_recipe


# Tiny models gain nothing from threads (conftest's fixture).
pytestmark = pytest.mark.usefixtures("one_thread")


def short_recipe(output_dir, **model) -> dict:
    """The tiny recipe with one step per stage, no checkpoints, `model` entries set."""
    recipe = tiny_recipe(output_dir, checkpointing_steps=None)
    for stage in recipe["stages"]:
        stage["max_steps"] = 1
    recipe["model"].update(model)
    return recipe


def tiny_model_spec(**fields) -> ModelSpec:
    return ModelSpec(**{**short_recipe("unused")["model"], **fields})


def saved_model(folder, dtype=torch.float32, **config) -> str:
    """A fresh model of the tiny recipe (config entries changed by `config`), saved in `dtype`."""
    spec = tiny_model_spec()
    spec.config = {**spec.config, **config}
    torch.manual_seed(0)
    build_model(spec, load_tokenizer(spec)).to(dtype).save_pretrained(folder)
    return str(folder)


def saved_dtypes(folder) -> set[torch.dtype]:
    return {tensor.dtype for tensor in load_file(folder / "model.safetensors").values()}


# --------------------------------------------------------------------------------------------------- dtype


def test_a_bfloat16_init_from_trains_and_saves_every_stage_in_float32(tmp_path):
    start = saved_model(tmp_path / "bf16", torch.bfloat16)
    assert saved_dtypes(tmp_path / "bf16") == {torch.bfloat16}
    spec = tiny_model_spec(init_from=start)
    assert {p.dtype for p in build_model(spec, load_tokenizer(spec)).parameters()} == {torch.float32}

    run_pretraining(recipe_from_dict(short_recipe(tmp_path / "run", init_from=start)))
    for stage in ("stage1-noisy", "stage2-clean"):
        assert saved_dtypes(tmp_path / "run" / stage / "final") == {torch.float32}, stage
    # The previous stage's folder loads in float32 too, whatever it was saved in.
    later = build_model(spec, None, init_from=start)
    assert {p.dtype for p in later.parameters()} == {torch.float32}


def test_a_bfloat16_text_checkpoint_loads_in_float32(tmp_path):
    _tiny_bert_with_nsp_head(tmp_path / "bert")
    from transformers import BertForPreTraining

    BertForPreTraining.from_pretrained(tmp_path / "bert").to(torch.bfloat16).save_pretrained(tmp_path / "bert16")
    spec = ModelSpec(
        text_pretrained=str(tmp_path / "bert16"),
        tokenizer="synthetic",
        config={"region_feature_size": 24, "num_object_classes": 11, "max_text_length": 16},
    )
    model = build_model(spec, load_tokenizer(spec))
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert model.config.region_feature_size == 24


# ------------------------------------------------------------------------------------------- init_from config


def test_init_from_takes_the_recipes_config_settings(tmp_path):
    start = saved_model(tmp_path / "start")
    spec = tiny_model_spec(init_from=start)
    spec.config = {**spec.config, "hidden_dropout_prob": 0.3, "moc_loss_type": "kl", "max_text_length": 12}
    model = build_model(spec, load_tokenizer(spec))
    assert model.config.hidden_dropout_prob == 0.3 and model.config.moc_loss_type == "kl"
    assert model.config.max_text_length == 12
    assert {m.p for m in model.modules() if isinstance(m, torch.nn.Dropout)} >= {0.3}
    # The weights are the saved ones.
    saved = ImageBERTForPreTraining.from_pretrained(start).state_dict()
    assert all(torch.equal(value, saved[name]) for name, value in model.state_dict().items())


def test_init_from_refuses_config_entries_its_weights_fix(tmp_path):
    start = saved_model(tmp_path / "start")
    spec = tiny_model_spec(init_from=start)
    spec.config = {**spec.config, "hidden_size": 64, "num_object_classes": 3}
    with pytest.raises(ValueError) as info:
        build_model(spec, load_tokenizer(spec))
    message = str(info.value)
    assert "model.config.hidden_size is 64 but the model has 32" in message
    assert "model.config.num_object_classes is 3 but the model has 24" in message
    assert "model.init_from" in message


@pytest.mark.parametrize("field", ["text_pretrained", "config_path"])
def test_init_from_beside_another_start_says_which_one_is_used(tmp_path, field):
    # `--set model.init_from=FOLDER` on a recipe that starts from a text checkpoint: the trained model wins, and the
    # field it replaces is named as unused rather than dropped without a word.
    from imagebert_hf.training import recipe as recipe_module

    recipe = short_recipe(tmp_path, init_from=str(tmp_path), **{field: str(tmp_path)})
    with CaptureLogger(recipe_module.logger) as captured:
        loaded = recipe_from_dict(recipe)
    assert loaded.model.init_from == str(tmp_path)
    assert "recipe.model.init_from" in captured.out and f"recipe.model.{field}" in captured.out
    assert "is not used" in captured.out


# ------------------------------------------------------------------------------------------------ processor


@pytest.fixture
def extractor(make_tiny_extractor):
    return make_tiny_extractor()


def processor_recipe(tmp_path, extractor, processor, **model) -> dict:
    """The short recipe with the extractor's region sizes, shipping `processor` (saved under tmp_path)."""
    processor.save_pretrained(tmp_path / "processor")
    recipe = short_recipe(tmp_path / "run", processor=str(tmp_path / "processor"), **model)
    sizes = extractor.config_kwargs()
    recipe["model"]["config"].update(
        region_feature_size=sizes["region_feature_size"], num_object_classes=sizes["num_object_classes"]
    )
    return recipe


def test_a_processor_longer_than_the_model_is_refused_before_anything_is_written(tmp_path, extractor, tokenizer):
    processor = ImageBERTProcessor(extractor, tokenizer, max_text_length=44, max_regions=10)
    recipe = processor_recipe(tmp_path, extractor, processor)
    with pytest.raises(ValueError) as info:
        run_pretraining(recipe_from_dict(recipe))
    assert f"model.processor ({tmp_path / 'processor'})" in str(info.value)
    assert "max_text_length 44 exceeds the model config's max_text_length 20" in str(info.value)
    assert not (tmp_path / "run").exists()


def test_a_processor_with_another_tokenizer_is_refused_and_the_runs_own_ships(tmp_path, extractor, tokenizer):
    from transformers import AutoProcessor, BertTokenizer

    # The same words under other ids: as many tokens, other input ids.
    words = synthetic_vocabulary()
    red, blue = words.index("red"), words.index("blue")
    words[red], words[blue] = words[blue], words[red]
    BertTokenizer(vocab={word: index for index, word in enumerate(words)}).save_pretrained(tmp_path / "swapped")
    processor = ImageBERTProcessor(extractor, tokenizer, max_text_length=20, max_regions=10)
    recipe = processor_recipe(tmp_path, extractor, processor, tokenizer=str(tmp_path / "swapped"))
    with pytest.raises(ValueError) as info:
        run_pretraining(recipe_from_dict(recipe))
    message = str(info.value)
    assert f"model.processor ({tmp_path / 'processor'}) holds another tokenizer" in message
    assert f"model.tokenizer ({tmp_path / 'swapped'}" in message
    assert not (tmp_path / "run").exists()

    # With the processor's own tokenizer the run trains and ships it with every stage.
    recipe["model"]["tokenizer"] = "synthetic"
    run_pretraining(recipe_from_dict(recipe))
    shipped = AutoProcessor.from_pretrained(tmp_path / "run" / "stage2-clean" / "final")
    text = "a red circle to the left of a blue square"
    assert shipped.tokenizer(text)["input_ids"] == tokenizer(text)["input_ids"]


def test_init_from_a_text_only_bert_is_refused_pointing_at_text_pretrained(tmp_path):
    # Loaded as a trained model, its region side would start fresh without a word and the recipe's config settings
    # would decide how its next-sentence head is read; `text_pretrained` is the way in for it.
    _tiny_bert_with_nsp_head(tmp_path / "bert")
    spec = tiny_model_spec(init_from=str(tmp_path / "bert"))
    with pytest.raises(ValueError, match=r"model\.init_from \(.*bert\) is a bert checkpoint, not an ImageBERT one.*"
                       r"model\.text_pretrained"):  # fmt: skip
        build_model(spec, load_tokenizer(spec))
