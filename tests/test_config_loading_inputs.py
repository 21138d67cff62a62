"""Configs loaded from a folder get the checks `ImageBERTConfig(...)` gives: keyword overrides of `from_pretrained`
and wrongly typed fields in config.json fail before the model is built, naming the field, what it got and what was
expected."""

import json
import math
import shutil

import pytest
import torch
from transformers import AutoConfig

from imagebert_hf import ImageBERTConfig, ImageBERTForImageTextRetrieval


@pytest.fixture(scope="module")
def saved(tmp_path_factory, make_tiny_config):
    """A tiny retrieval model saved as today's `save_pretrained` writes it, and its scores on a fixed input."""
    torch.manual_seed(0)
    model = ImageBERTForImageTextRetrieval(make_tiny_config()).eval()
    folder = tmp_path_factory.mktemp("saved") / "model"
    model.save_pretrained(folder)
    return folder, _scores(model)


def _scores(model) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    config = model.config
    with torch.no_grad():
        return model(
            input_ids=torch.randint(1, config.vocab_size, (2, 8), generator=generator),
            region_features=torch.rand(2, 3, config.region_feature_size, generator=generator),
            region_locations=torch.rand(2, 3, config.region_location_size, generator=generator),
        ).logits


def _copy(saved, tmp_path, **config_changes):
    folder = tmp_path / "model"
    shutil.copytree(saved[0], folder)
    config = json.loads((folder / "config.json").read_text())
    config.update(config_changes)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


OVERRIDES = [
    ("layer_norm_eps", math.nan, ValueError, "layer_norm_eps must be a finite number, got nan"),
    ("max_regions", 0, ValueError, "max_regions must be >= 1, got 0"),
    ("contrastive_temperature", 0.0, ValueError, "contrastive_temperature must be positive, got 0.0"),
    ("hidden_size", -1, ValueError, "hidden_size must be >= 1, got -1"),
    ("hidden_act", "nope", ValueError, "hidden_act must be one of"),
    ("num_hidden_layers", "2", TypeError, "num_hidden_layers must be an integer, got '2' (str)"),
    ("region_position_embedding", "no", TypeError, "region_position_embedding must be true or false, got 'no'"),
    ("retrieval_loss_weights", "binary", TypeError, "retrieval_loss_weights must map loss names"),
]


@pytest.mark.parametrize(
    "load", [ImageBERTForImageTextRetrieval.from_pretrained, AutoConfig.from_pretrained], ids=["model", "AutoConfig"]
)
@pytest.mark.parametrize(
    ("name", "value", "error", "message"), OVERRIDES, ids=[f"{n}={v!r}" for n, v, _, _ in OVERRIDES]
)
def test_a_bad_from_pretrained_override_fails_as_the_constructor_does(
    saved, make_tiny_config, load, name, value, error, message
):
    with pytest.raises(error) as from_constructor:
        make_tiny_config(**{name: value})
    with pytest.raises(error) as from_folder:
        load(saved[0], **{name: value})
    assert message in str(from_folder.value)
    assert str(from_folder.value) == str(from_constructor.value)


def test_good_overrides_apply_and_unknown_ones_are_returned(saved):
    config, unused = ImageBERTConfig.from_pretrained(
        saved[0], return_unused_kwargs=True, contrastive_temperature=0.1, not_a_field=3
    )
    assert config.contrastive_temperature == 0.1 and unused == {"not_a_field": 3}


def test_a_saved_model_loads_with_equal_outputs(saved):
    model = ImageBERTForImageTextRetrieval.from_pretrained(saved[0]).eval()
    torch.testing.assert_close(_scores(model), saved[1], rtol=0, atol=0)


@pytest.mark.parametrize("value", [["binary"], "binary", 1.0])
def test_retrieval_loss_weights_that_are_not_a_mapping_are_named(saved, tmp_path, value):
    with pytest.raises(TypeError) as from_constructor:
        ImageBERTConfig(retrieval_loss_weights=value)
    message = str(from_constructor.value)
    assert message.startswith("retrieval_loss_weights must map loss names among ('binary', 'multiclass', 'triplet')")
    assert f'e.g. {{"binary": 1.0}}, got {value!r} ({type(value).__name__}).' in message
    with pytest.raises(TypeError, match="^retrieval_loss_weights must map"):
        ImageBERTForImageTextRetrieval.from_pretrained(_copy(saved, tmp_path, retrieval_loss_weights=value))


@pytest.mark.parametrize("value", [None, {}])
def test_no_retrieval_loss_weights_give_the_default(value):
    assert ImageBERTConfig(retrieval_loss_weights=value).retrieval_loss_weights == {"binary": 1.0}
