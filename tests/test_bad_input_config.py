"""Bad input at the config boundary: every wrong type, range or combination fails in `ImageBERTConfig`, naming
the field, what it got and what was expected."""

import math

import pytest

from imagebert_hf import ImageBERTConfig


INT_FIELDS = {
    "vocab_size": 1,
    "hidden_size": 1,
    "num_hidden_layers": 1,
    "num_attention_heads": 1,
    "intermediate_size": 1,
    "max_position_embeddings": 2,
    "type_vocab_size": 1,
    "region_feature_size": 1,
    "region_location_size": 1,
    "num_object_classes": 1,
    "max_regions": 1,
    "max_text_length": 2,
    "contrastive_embedding_size": 1,
}
DROPOUTS = ("hidden_dropout_prob", "attention_probs_dropout_prob")
WEIGHTS = ("mlm_loss_weight", "moc_loss_weight", "mrfr_loss_weight", "itm_loss_weight", "triplet_margin")
POSITIVE_FLOATS = ("layer_norm_eps", "contrastive_temperature")
BOOLS = ("tie_word_embeddings",)


def _cases():
    for name, lowest in INT_FIELDS.items():
        yield name, lowest - 1, ValueError
        yield name, -5, ValueError
        yield name, float(lowest + 7), TypeError
        yield name, "12", TypeError
        yield name, True, TypeError
    for name in DROPOUTS:
        yield name, 1.0, ValueError
        yield name, -0.01, ValueError
        yield name, math.nan, ValueError
        yield name, "0.1", TypeError
        yield name, None, TypeError
    for name in WEIGHTS:
        yield name, -1.0, ValueError
        yield name, math.inf, ValueError
        yield name, [1.0], TypeError
    for name in POSITIVE_FLOATS:
        yield name, 0.0, ValueError
        yield name, -1e-5, ValueError
    for name in BOOLS:
        yield name, "yes", TypeError
        yield name, 1, TypeError
    yield "initializer_range", -0.02, ValueError
    yield "hidden_act", "gleu", ValueError
    yield "hidden_act", None, ValueError
    yield "moc_loss_type", "mse", ValueError
    yield "pad_token_id", -1, ValueError
    yield "pad_token_id", 30522, ValueError
    yield "region_position_id", -1, ValueError
    yield "region_position_id", 512, ValueError
    yield "region_token_type_id", 2, ValueError


CASES = list(_cases())


@pytest.mark.parametrize(("name", "value", "error"), CASES, ids=[f"{n}={v!r}" for n, v, _ in CASES])
def test_bad_field_is_refused_naming_it(name, value, error):
    with pytest.raises(error) as info:
        ImageBERTConfig(**{name: value})
    assert name in str(info.value) and "got" in str(info.value)


@pytest.mark.parametrize(
    ("kwargs", "named"),
    [
        ({"hidden_size": 30, "num_attention_heads": 4}, "num_attention_heads"),
        ({"max_text_length": 600}, "max_text_length"),
        ({"retrieval_loss_weights": {"binary": 1.0, "contrastive": 1.0}}, "retrieval_loss_weights"),
        ({"retrieval_loss_weights": {"binary": -1.0}}, "retrieval_loss_weights['binary']"),
        ({"retrieval_loss_weights": {"triplet": "1"}}, "retrieval_loss_weights['triplet']"),
    ],
)
def test_fields_that_must_agree(kwargs, named):
    with pytest.raises((ValueError, TypeError)) as info:
        ImageBERTConfig(**kwargs)
    assert named in str(info.value)


def test_a_saved_config_is_checked_when_loaded(tmp_path):
    ImageBERTConfig(hidden_size=32, num_attention_heads=4, intermediate_size=64).save_pretrained(tmp_path)
    path = tmp_path / "config.json"
    path.write_text(path.read_text().replace('"num_hidden_layers": 12', '"num_hidden_layers": 0'))
    with pytest.raises(ValueError, match="num_hidden_layers"):
        ImageBERTConfig.from_pretrained(tmp_path)


def test_valid_edges_are_accepted():
    config = ImageBERTConfig(hidden_dropout_prob=0.0, itm_loss_weight=0.0, max_text_length=2, pad_token_id=None)
    assert config.max_text_length == 2
