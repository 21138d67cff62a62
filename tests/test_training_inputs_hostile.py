"""Training inputs that would go wrong without a word: a loss that diverges to NaN, a checkpoint whose weights are NaN
or do not fit the model, a stage name that leads out of output_dir, loss weights that train nothing, recipe keys that
are not strings, and JSON with a key given twice. Each ends in one error naming what is wrong."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file, save_model
from transformers.utils import ModelOutput

from imagebert_hf.formats.files import read_json_file
from imagebert_hf.training import (
    LoopSettings,
    RecipeError,
    Schedule,
    Stage,
    TrainState,
    build_accelerator,
    load_recipe,
    recipe_from_dict,
    run_stage,
)
from imagebert_hf.training.checkpointing import _first_misfit_model_file
from imagebert_hf.training.loop import NON_FINITE_STEPS_UNDER_SCALER, NonFiniteLossError
from imagebert_hf.training.pretraining import stage_directory

from .test_checkpoint_inputs import _copy, _resume, trained  # noqa: F401 - fixture
from .test_pretraining import RUN_PRETRAINING, script_env
from .test_stage_runner import _settings, _stage


TINY_MODEL = {
    "hidden_size": 32,
    "num_hidden_layers": 1,
    "num_attention_heads": 4,
    "intermediate_size": 64,
    "max_position_embeddings": 64,
    "region_feature_size": 24,
    "num_object_classes": 24,
    "max_regions": 10,
    "max_text_length": 20,
    "contrastive_embedding_size": 16,
}


def small_recipe(output_dir: Path, **stage_fields) -> dict:
    """One stage of 4 steps on 16 synthetic images: about 5 s on one CPU thread."""
    stage = {
        "name": "s1",
        "sources": [{"name": "s", "type": "synthetic", "num_images": 16, "seed": 0, "regions": "annotations"}],
        "max_steps": 4,
        "per_device_train_batch_size": 4,
        **stage_fields,
    }
    return {
        "output_dir": str(output_dir),
        "seed": 1,
        "checkpointing_steps": None,
        "logging_steps": 1,
        "report_to": "none",
        "model": {"tokenizer": "synthetic", "config": dict(TINY_MODEL)},
        "stages": [stage],
    }


# ------------------------------------------------------------------------------------------- non-finite losses


def test_a_diverging_stage_stops_at_the_first_non_finite_loss_and_saves_nothing(tmp_path):
    accelerator = build_accelerator(tmp_path, report_to="none", cpu=True)
    stage = _stage(tmp_path / "stage")
    stage.schedule.learning_rate = 1e30
    stage.schedule.warmup_steps = 0
    with pytest.raises(NonFiniteLossError) as stopped:
        run_stage(accelerator, stage, _settings(), checkpoint_at_end=True)
    accelerator.free_memory()
    message = str(stopped.value)
    assert "the mse loss is not finite" in message and "run-wide step 2 of stage 'regression'" in message
    assert "learning_rate" in message and "resume from the last checkpoint" in message
    # Step 2 is a checkpointing step: a NaN model must not be saved as one.
    assert not (tmp_path / "stage" / "checkpoints").exists() or not any((tmp_path / "stage" / "checkpoints").iterdir())


class _ScaledLinear(torch.nn.Module):
    """`w * x`: the first batch's huge `x` gives a finite loss but a gradient that overflows once scaled."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor([0.1]))

    def forward(self, x):
        loss = (self.w * x).sum()
        return ModelOutput(loss=loss, scaled_loss=loss)


def test_steps_a_gradient_scaler_skips_do_not_stop_the_run(tmp_path):
    # fp16's scaler meets infinite gradients by design and skips those steps; the loss stays finite. Accelerate
    # builds the scaler only on an accelerator, so the same scaler is given to a CPU run here.
    accelerator = build_accelerator(tmp_path, report_to="none", cpu=True)
    accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    batches = [{"x": torch.tensor([1e34])}] + [{"x": torch.tensor([1.0])}] * 3
    loader = torch.utils.data.DataLoader(batches, batch_size=None)
    schedule = Schedule(learning_rate=1e-2, max_steps=4, lr_scheduler_type="constant")
    stage = Stage(name="scaled", model=_ScaledLinear(), dataloader=loader, schedule=schedule, folder=tmp_path / "s")
    settings = LoopSettings(loss_names=("scaled",), logging_steps=1, max_grad_norm=None)
    model, state = run_stage(accelerator, stage, settings)
    weight = accelerator.unwrap_model(model).w.detach().clone()
    scale = accelerator.scaler.get_scale()
    accelerator.free_memory()
    assert state.completed_steps == 4
    assert scale < 2.0**16  # the first step was skipped
    assert torch.isfinite(weight).all() and weight.item() != pytest.approx(0.1)


def _scaled_run(tmp_path, values: list[float], steps: int):
    accelerator = build_accelerator(tmp_path, report_to="none", cpu=True)
    accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    loader = torch.utils.data.DataLoader([{"x": torch.tensor([v])} for v in values], batch_size=None)
    schedule = Schedule(learning_rate=1e-2, max_steps=steps, lr_scheduler_type="constant")
    stage = Stage(name="scaled", model=_ScaledLinear(), dataloader=loader, schedule=schedule, folder=tmp_path / "s")
    settings = LoopSettings(loss_names=("scaled",), logging_steps=1, max_grad_norm=None)
    try:
        model, state = run_stage(accelerator, stage, settings)
        return accelerator.unwrap_model(model).w.detach().clone(), state
    finally:
        accelerator.free_memory()


def test_under_a_gradient_scaler_a_lone_nan_loss_is_skipped_with_its_step(tmp_path):
    weight, state = _scaled_run(tmp_path, [float("nan"), 1.0, 1.0, 1.0], steps=4)
    assert state.completed_steps == 4 and torch.isfinite(weight).all()


def test_under_a_gradient_scaler_nan_losses_in_a_row_stop_the_run(tmp_path):
    steps = NON_FINITE_STEPS_UNDER_SCALER + 2
    message = rf"at run-wide step {NON_FINITE_STEPS_UNDER_SCALER} \(the \d+th step in a row\)"
    with pytest.raises(NonFiniteLossError, match=message):
        _scaled_run(tmp_path, [float("nan")] * steps, steps=steps)


def test_the_script_ends_a_diverging_run_with_one_line_and_publishes_no_final_model(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(small_recipe(tmp_path / "run", learning_rate=1.0e30)))
    result = subprocess.run(
        [sys.executable, str(RUN_PRETRAINING), "--config", str(recipe), "--cpu"],
        capture_output=True,
        text=True,
        env=script_env(),
        timeout=300,
    )
    assert result.returncode == 1, result.stderr[-2000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("run_pretraining: error: the mlm, moc, mrfr, itm losses are not finite"), last
    assert "of stage 's1'" in last and "Traceback" not in result.stderr
    assert not (tmp_path / "run" / "stage1-s1" / "final").exists()


# ---------------------------------------------------------------------------------- checkpoints that cannot be


def _edit_weights(checkpoint: Path, edit) -> None:
    path = checkpoint / "model.safetensors"
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path)


def test_a_checkpoint_with_non_finite_weights_is_refused(trained, tmp_path):  # noqa: F811
    folder, checkpoint = _copy(trained, tmp_path)
    _edit_weights(checkpoint, lambda tensors: tensors["linear.weight"].fill_(float("nan")))
    with pytest.raises(ValueError) as refused:
        _resume(tmp_path, folder)
    message = str(refused.value)
    assert f"checkpoint {checkpoint}: model.safetensors holds NaN or infinite values in 'linear.weight'" in message
    assert "delete the checkpoint folder" in message and "\n" not in message


def _drop_bias(tensors):
    del tensors["linear.bias"]


def _widen_weight(tensors):
    tensors["linear.weight"] = torch.zeros(1, 4)


def _add_key(tensors):
    tensors["extra.weight"] = torch.zeros(2)


@pytest.mark.parametrize(
    ("edit", "detail"),
    [
        (_drop_bias, "the model's 'linear.bias' is missing"),
        (_widen_weight, "'linear.weight' has shape [1, 4], the model's [1, 3]"),
        (_add_key, "it holds 'extra.weight', which the model does not have"),
    ],
)
def test_a_checkpoint_whose_weights_do_not_fit_the_model_is_named_in_one_line(trained, tmp_path, edit, detail):  # noqa: F811
    folder, checkpoint = _copy(trained, tmp_path)
    _edit_weights(checkpoint, edit)
    with pytest.raises(ValueError) as refused:
        _resume(tmp_path, folder)
    message = str(refused.value)
    assert message.startswith(f"checkpoint {checkpoint}: model.safetensors does not fit the model ({detail})")
    assert "delete the checkpoint folder" in message and "\n" not in message


class _Tied(torch.nn.Module):
    def __init__(self, width: int = 3):
        super().__init__()
        self.embed = torch.nn.Linear(width, width, bias=False)
        self.decoder = torch.nn.Linear(width, width, bias=False)
        self.decoder.weight = self.embed.weight
        self.head = torch.nn.Linear(width, 1)


def test_a_tied_weight_saved_once_is_not_reported_missing(tmp_path):
    save_model(_Tied(), tmp_path / "model.safetensors")  # stores the shared weight under one name
    assert _first_misfit_model_file(tmp_path, [_Tied()]) is None
    tensors = load_file(tmp_path / "model.safetensors")
    tensors["head.bias"] = torch.zeros(2)
    save_file(tensors, tmp_path / "model.safetensors")
    path, detail = _first_misfit_model_file(tmp_path, [_Tied()])
    assert path.name == "model.safetensors" and detail == "'head.bias' has shape [2], the model's [1]"


# ------------------------------------------------------------------------------------------------- recipes


@pytest.mark.parametrize(
    "name", ["../../../escaped", "", "   ", "a/b", "a\\b", "..", "x..y", "a\x00b", "tab\there", "a:b", " lead"]
)
def test_a_stage_name_that_cannot_be_a_folder_name_is_refused(tmp_path, name):
    with pytest.raises(RecipeError, match=r"^recipe\.stages\[0\]\.name is "):
        recipe_from_dict(small_recipe(tmp_path / "run", name=name))


def test_ordinary_stage_names_are_accepted(tmp_path):
    for name in ("s1", "cc_sbu", "stage-2.clean", "étape"):
        recipe_from_dict(small_recipe(tmp_path / "run", name=name))


def test_a_stage_built_in_code_cannot_lead_out_of_output_dir(tmp_path):
    recipe = recipe_from_dict(small_recipe(tmp_path / "run"))
    recipe.stages[0].name = "../../escaped"
    with pytest.raises(RecipeError, match=r"stages\[0\]\.name"):
        stage_directory(recipe.output_dir, 0, recipe.stages[0])


def test_loss_weights_that_are_all_zero_are_refused(tmp_path):
    zero = dict.fromkeys(("mlm", "moc", "mrfr", "itm"), 0)
    with pytest.raises(RecipeError, match=r"^recipe\.stages\[0\]\.loss_weights are all zero"):
        recipe_from_dict(small_recipe(tmp_path / "run", loss_weights=zero))
    recipe_from_dict(small_recipe(tmp_path / "run", loss_weights={**zero, "itm": 1.0}))  # some zero is fine


def test_recipe_keys_that_are_not_strings_are_named(tmp_path):
    path = tmp_path / "recipe.yaml"
    text = yaml.safe_dump(small_recipe(tmp_path / "run")) + "1: x\noutptu_dir: y\n"
    path.write_text(text)
    with pytest.raises(RecipeError, match=r"^recipe\.yaml: unknown key\(s\) \['outptu_dir', 1\]"):
        load_recipe(path, check_paths=False)
    with pytest.raises(RecipeError, match=r"^recipe\.stages\[0\]\.loss_weights: unknown task\(s\) \['x', 1\]"):
        recipe_from_dict(small_recipe(tmp_path / "run", loss_weights={1: 0.5, "x": 1.0}))
    data = small_recipe(tmp_path / "run")
    data["model"]["config"][True] = 3
    with pytest.raises(RecipeError, match=r"^recipe\.model\.config: keys must be config field names, got \[True\]"):
        recipe_from_dict(data)


# ------------------------------------------------------------------------------------------------ JSON files


def test_a_training_state_with_a_key_given_twice_is_refused(tmp_path):
    TrainState(stage_name="s1", total_steps=4).save(tmp_path)
    path = tmp_path / "trainer_state.json"
    text = path.read_text()
    assert TrainState.load(tmp_path).total_steps == 4  # what save writes has each key once
    path.write_text(text.replace('"total_steps": 4', '"total_steps": 4, "total_steps": 400', 1))
    with pytest.raises(ValueError, match=rf"^{path} gives the key 'total_steps' twice in one object"):
        TrainState.load(tmp_path)


def test_a_key_given_twice_in_a_nested_object_is_refused(tmp_path):
    path = tmp_path / "data.json"
    path.write_text('{"a": [{"b": 1, "b": 2}], "c": {"d": 1}}')
    with pytest.raises(
        ValueError,
        match=r"gives the key 'b' twice in one object, so which value holds is unclear; expected a test file",
    ):
        read_json_file(path, "a test file")
    path.write_text(json.dumps({"a": [{"b": 1}, {"b": 2}], "c": {"d": 1}}))
    assert read_json_file(path, "a test file") == {"a": [{"b": 1}, {"b": 2}], "c": {"d": 1}}
