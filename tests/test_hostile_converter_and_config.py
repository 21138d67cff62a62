"""Hostile input at the UNITER converter (text files, truncated or pickled checkpoints, nested weights, `module.`
prefixes, a plain BERT checkpoint, an output that cannot be written) and at `ImageBERTConfig` (probabilities above
1, negative counts, typo'd keys): every error names the file or field, and nothing says "saved" when it was not."""

import json
import pickle

import pytest
import torch
from transformers.testing_utils import CaptureLogger

from imagebert_hf import ImageBERTConfig
from imagebert_hf.models.imagebert import configuration_imagebert
from imagebert_hf.models.imagebert.convert_uniter_checkpoint import (
    convert_uniter_checkpoint,
    load_uniter_model,
    main,
    prepare_uniter_state_dict,
    read_uniter_checkpoint,
)

from .test_uniter_conversion import HEADS, uniter_state_dict


@pytest.fixture(scope="module")
def state_dict():
    return uniter_state_dict("retrieval", seed=3)


def _touch(path):
    with open(path, "w") as handle:
        handle.write("ran")


class _RunsCode:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (_touch, (self.marker,))


# ------------------------------------------------------------------------------------------------ checkpoint files

FILES = [
    ("a text file", "uniter.pt", lambda sd, tmp: b"this is the README, not weights\n" * 3),
    ("empty", "uniter.pt", lambda sd, tmp: b""),
    ("random bytes", "uniter.pt", lambda sd, tmp: bytes(range(256)) * 4),
    ("bad safetensors", "uniter.safetensors", lambda sd, tmp: b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}"),
]


@pytest.mark.parametrize(("name", "make"), [c[1:] for c in FILES], ids=[c[0] for c in FILES])
def test_a_file_that_is_not_a_checkpoint_is_named(tmp_path, state_dict, name, make):
    path = tmp_path / name
    path.write_bytes(make(state_dict, tmp_path))
    with pytest.raises(ValueError, match=rf"checkpoint .*{name} (is empty|\(\d+ bytes\) cannot be read)"):
        read_uniter_checkpoint(path)


def test_a_truncated_checkpoint_is_named(tmp_path, state_dict):
    path = tmp_path / "uniter.pt"
    torch.save(state_dict, path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(ValueError, match=r"uniter.pt \(\d+ bytes\) cannot be read.*truncated download"):
        read_uniter_checkpoint(path)


def test_a_checkpoint_holding_code_is_refused_and_never_runs(tmp_path, state_dict):
    marker = tmp_path / "ran.txt"
    path = tmp_path / "uniter.pt"
    torch.save({**state_dict, "trap": _RunsCode(marker)}, path)
    with pytest.raises(ValueError, match=r"cannot be read as a PyTorch or safetensors state dict.*UnpicklingError"):
        read_uniter_checkpoint(path)
    assert not marker.exists()
    path.write_bytes(pickle.dumps(_RunsCode(marker)))
    with pytest.raises(ValueError, match="cannot be read"):
        read_uniter_checkpoint(path)
    assert not marker.exists()


def test_a_missing_checkpoint_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"checkpoint .*nope.pt does not exist \(expected UNITER's .pt"):
        read_uniter_checkpoint(tmp_path / "nope.pt")


@pytest.mark.parametrize(
    "wrap",
    [
        lambda sd: {"model": sd},
        lambda sd: {"state_dict": sd, "epoch": 3},
        lambda sd: {"module": dict(sd)},
        lambda sd: {f"module.{k}": v for k, v in sd.items()},
        lambda sd: {"state_dict": {f"module.{k}": v for k, v in sd.items()}, "optimizer": {}},
    ],
    ids=["under model", "under state_dict", "under module", "module. prefix", "both"],
)
def test_nested_and_prefixed_weights_are_unwrapped(tmp_path, state_dict, wrap):
    path = tmp_path / "uniter.pt"
    torch.save(wrap(state_dict), path)
    loaded = read_uniter_checkpoint(path)
    assert set(loaded) == set(state_dict)
    model = load_uniter_model(loaded, uniter_config={"num_attention_heads": HEADS})
    assert type(model).__name__ == "ImageBERTForImageTextRetrieval"


STATE_DICTS = [
    ("bert", {"bert.embeddings.word_embeddings.weight": torch.zeros(3, 2)}, r"is a plain BERT checkpoint.*not UNITER"),
    ("hf bert", {"embeddings.word_embeddings.weight": torch.zeros(3, 2)}, r"plain BERT checkpoint"),
    ("other model", {"fc.weight": torch.zeros(2, 2)}, r"is not a UNITER checkpoint.*keys start \['fc.weight'\]"),
    ("a list", [torch.zeros(2)], r"holds list, not a non-empty dict of weight tensors"),
    ("empty", {}, r"holds dict, not a non-empty dict"),
    ("strings", {"a": "b", "c": torch.zeros(1)}, r"holds non-tensor entries \['a'\]"),
    (
        "nested elsewhere",
        {"weights": {"x": torch.zeros(1)}},
        r"non-tensor entries \['weights'\].*nested under another",
    ),
]


@pytest.mark.parametrize(("value", "message"), [c[1:] for c in STATE_DICTS], ids=[c[0] for c in STATE_DICTS])
def test_a_state_dict_that_is_not_uniter_is_explained(value, message):
    with pytest.raises(ValueError, match=message):
        prepare_uniter_state_dict(value, "test.pt")


def test_an_incomplete_uniter_checkpoint_names_what_it_lacks(state_dict):
    incomplete = {k: v for k, v in state_dict.items() if not k.startswith("uniter.img_embeddings.pos_linear")}
    with pytest.raises(
        ValueError, match=r"incomplete UNITER checkpoint: it lacks \['uniter.img_embeddings.pos_linear"
    ):
        prepare_uniter_state_dict(incomplete)


def test_an_unknown_task_is_named(state_dict):
    with pytest.raises(ValueError, match=r"task must be one of \('pretraining', 'retrieval'\) or None"):
        load_uniter_model(state_dict, task="captioning")


# ------------------------------------------------------------------------------------------------ saving


@pytest.fixture
def checkpoint(tmp_path, state_dict):
    path = tmp_path / "uniter.pt"
    torch.save(state_dict, path)
    (tmp_path / "uniter.json").write_text(json.dumps({"num_attention_heads": HEADS}))
    return path


def test_an_output_that_is_a_file_fails_and_prints_nothing_saved(tmp_path, checkpoint, capsys):
    (tmp_path / "out").write_text("x")
    args = ["--checkpoint", str(checkpoint), "--output", str(tmp_path / "out")]
    with pytest.raises(
        SystemExit, match=r"^imagebert-convert-uniter: error: --output .*out is a file; expected a folder"
    ):
        main([*args, "--uniter_config", str(tmp_path / "uniter.json")])
    assert "saved" not in capsys.readouterr().out


def test_a_save_that_fails_raises_and_leaves_no_half_folder(tmp_path, checkpoint, monkeypatch, capsys):
    from imagebert_hf.models.imagebert.modeling_imagebert import ImageBERTForImageTextRetrieval

    monkeypatch.setattr(ImageBERTForImageTextRetrieval, "save_pretrained", lambda self, folder, **kw: None)
    args = ["--checkpoint", str(checkpoint), "--output", str(tmp_path / "out")]
    with pytest.raises(
        SystemExit, match=r"^imagebert-convert-uniter: error: saving the model to .*out.tmp-\d+ failed"
    ):
        main([*args, "--uniter_config", str(tmp_path / "uniter.json")])
    assert "saved" not in capsys.readouterr().out
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.tmp-*"))


@pytest.mark.parametrize(
    ("text", "message"), [("{oops", r"uniter_config .* cannot be read as JSON"), ("[1]", r"must hold a JSON object")]
)
def test_a_uniter_config_that_is_not_an_object_is_named(tmp_path, checkpoint, text, message):
    (tmp_path / "bad.json").write_text(text)
    with pytest.raises(ValueError, match=message):
        convert_uniter_checkpoint(checkpoint, tmp_path / "out", uniter_config=tmp_path / "bad.json")


# ------------------------------------------------------------------------------------------------ config

CONFIG_CASES = [
    ("hidden_dropout_prob", 1.5, ValueError, r"hidden_dropout_prob must be in \[0, 1\), got 1.5"),
    ("attention_probs_dropout_prob", -0.1, ValueError, r"attention_probs_dropout_prob must be in \[0, 1\)"),
    ("hidden_dropout_prob", 1.0, ValueError, r"hidden_dropout_prob must be in \[0, 1\), got 1.0"),
    ("num_hidden_layers", -1, ValueError, r"num_hidden_layers must be >= 1, got -1"),
    ("max_regions", 0, ValueError, r"max_regions must be >= 1, got 0"),
    ("vocab_size", 0, ValueError, r"vocab_size must be >= 1, got 0"),
    ("num_object_classes", -5, ValueError, r"num_object_classes must be >= 1, got -5"),
    ("mlm_loss_weight", -1.0, ValueError, r"mlm_loss_weight must be >= 0.0, got -1.0"),
    ("contrastive_temperature", 0.0, ValueError, r"contrastive_temperature must be positive, got 0.0"),
    ("max_regions", "100", TypeError, r"max_regions must be an integer, got '100'"),
    ("layer_norm_eps", float("nan"), ValueError, r"layer_norm_eps must be a finite number, got nan"),
]


@pytest.mark.parametrize(
    ("name", "value", "error", "message"), CONFIG_CASES, ids=[f"{n}={v!r}" for n, v, _, _ in CONFIG_CASES]
)
def test_config_fields_out_of_range_are_named(make_tiny_config, name, value, error, message):
    with pytest.raises(error, match=message):
        make_tiny_config(**{name: value})


@pytest.mark.parametrize(
    ("key", "hint"),
    [("hiden_size", "did you mean 'hidden_size'"), ("max_region", "did you mean 'max_regions'"), ("foo_bar", "")],
)
def test_unknown_config_keys_are_warned_with_a_suggestion(make_tiny_config, key, hint):
    with CaptureLogger(configuration_imagebert.logger) as captured:
        config = make_tiny_config(**{key: 3})
    assert f"ImageBERTConfig got unknown field(s) '{key}'" in captured.out
    assert hint in captured.out and "no part of ImageBERT reads them" in captured.out
    assert getattr(config, key) == 3  # kept, as transformers does


def test_a_saved_config_and_bert_fields_load_without_a_warning(tmp_path, make_tiny_config):
    make_tiny_config().save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    saved.update(position_embedding_type="absolute", use_cache=True, classifier_dropout=None)
    (tmp_path / "config.json").write_text(json.dumps(saved))
    with CaptureLogger(configuration_imagebert.logger) as captured:
        ImageBERTConfig.from_pretrained(tmp_path)
    assert "unknown field" not in captured.out
