"""Resuming from a damaged checkpoint: a file that does not read, a training state that is not one or is of another
stage, ends in one error naming the file; a newest checkpoint that is incomplete is skipped with a warning naming it.
A checkpoint of the runner's small regression stage is trained once and copied for each damage."""

import json
import random
import re
import shutil
from pathlib import Path

import pytest
import torch
from transformers.testing_utils import CaptureLogger

from imagebert_hf.training import build_accelerator, checkpointing, run_stage
from imagebert_hf.training.checkpointing import STATE_FILE, TrainState

from .test_no_pickle import MARKER_NAME, _RunsCode
from .test_stage_runner import _settings, _stage


NEWEST = "step_00000004"  # the stage trains 6 steps and checkpoints every 2: steps 2 and 4 are kept


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("trained") / "stage"
    accelerator = build_accelerator(folder.parent, report_to="none", cpu=True)
    run_stage(accelerator, _stage(folder), _settings())
    accelerator.free_memory()
    assert sorted(path.name for path in (folder / "checkpoints").iterdir()) == ["step_00000002", NEWEST]
    return folder


def _copy(trained: Path, tmp_path: Path) -> tuple[Path, Path]:
    """A copy of the trained stage's folder and its newest checkpoint, to damage."""
    folder = tmp_path / "stage"
    shutil.copytree(trained, folder, symlinks=True)
    return folder, folder / "checkpoints" / NEWEST


def _resume(tmp_path: Path, folder: Path, **stage_overrides):
    accelerator = build_accelerator(tmp_path, report_to="none", cpu=True)
    try:
        return run_stage(accelerator, _stage(folder, **stage_overrides), _settings(), resume=True)
    finally:
        accelerator.free_memory()


def _edit_state(checkpoint: Path, edit) -> None:
    path = checkpoint / STATE_FILE
    data = json.loads(path.read_text())
    data = edit(data)
    path.write_text(json.dumps(data))


def test_an_undamaged_checkpoint_resumes_from_the_newest(trained, tmp_path, capsys):
    folder, _ = _copy(trained, tmp_path)
    _, state = _resume(tmp_path, folder)
    assert f"from {folder / 'checkpoints' / NEWEST} at step 4" in capsys.readouterr().out
    assert state.completed_steps == 6
    assert [entry["step"] for entry in state.history] == list(range(1, 7))


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:100])


def _empty(path: Path) -> None:
    path.write_bytes(b"")


def _random_bytes(path: Path) -> None:
    path.write_bytes(random.Random(0).randbytes(3000))


def _crafted_pickle(path: Path) -> None:
    torch.save({"state": _RunsCode(path.parents[3] / MARKER_NAME), "param_groups": []}, path)


def _link_to_text_file(path: Path) -> None:
    outside = path.parents[3] / "notes.txt"  # beside the stage's folder
    outside.write_text("some text\n")
    path.unlink()
    path.symlink_to(outside)


@pytest.mark.parametrize(
    "name, damage",
    [
        ("optimizer.bin", _truncate),
        ("optimizer.bin", _empty),
        ("optimizer.bin", _random_bytes),
        ("optimizer.bin", _crafted_pickle),
        ("optimizer.bin", _link_to_text_file),
        ("scheduler.bin", _truncate),
        ("scheduler.bin", _crafted_pickle),
        ("model.safetensors", _truncate),
        ("model.safetensors", _random_bytes),
    ],
)
def test_a_damaged_file_of_the_checkpoint_is_named(trained, tmp_path, name, damage):
    folder, checkpoint = _copy(trained, tmp_path)
    damage(checkpoint / name)
    with pytest.raises(ValueError, match=re.escape(f"checkpoint {checkpoint}: {name} is damaged (")) as caught:
        _resume(tmp_path, folder)
    message = str(caught.value)
    assert "\n" not in message and "weights_only" not in message
    assert "delete the checkpoint folder to resume from the one before" in message
    assert not (tmp_path / MARKER_NAME).exists()


@pytest.mark.parametrize("name", ["model.safetensors", "optimizer.bin", "scheduler.bin"])
def test_a_missing_file_of_the_checkpoint_is_named(trained, tmp_path, name):
    folder, checkpoint = _copy(trained, tmp_path)
    (checkpoint / name).unlink()
    expected = (
        f"checkpoint {checkpoint}: {name} is missing; delete the checkpoint folder to resume from the one before."
    )
    with pytest.raises(ValueError, match=re.escape(expected)):
        _resume(tmp_path, folder)


def test_a_missing_random_state_file_resumes_with_a_warning(trained, tmp_path):
    folder, checkpoint = _copy(trained, tmp_path)
    (checkpoint / "random_states_0.pkl").unlink()
    with CaptureLogger(checkpointing.logger) as captured:
        _, state = _resume(tmp_path, folder)
    assert f"checkpoint {checkpoint} has no random_states_0.pkl: process 0 resumes with fresh random" in captured.out
    assert state.completed_steps == 6


@pytest.mark.parametrize(
    "edit, expected",
    [
        (lambda data: [], "expected a JSON object"),
        (lambda data: {**data, "bogus": 1}, "key 'bogus' is unknown"),
        (lambda data: {k: v for k, v in data.items() if k != "epoch"}, "key 'epoch' is missing"),
        (lambda data: {**data, "completed_steps": "two"}, "completed_steps must be an integer, got 'two'"),
        (lambda data: {**data, "completed_steps": 2.0}, "completed_steps must be an integer"),
        (lambda data: {**data, "completed_steps": -5}, "completed_steps must be >= 0, got -5"),
        (lambda data: {**data, "stage_name": 3}, "stage_name must be a string"),
        (lambda data: {**data, "history": [1]}, "history must be a list of objects"),
        (lambda data: {**data, "records_failed": data["records_seen"] + 1}, "records_failed"),
    ],
)
def test_a_training_state_that_is_not_one_is_refused_before_anything_is_restored(trained, tmp_path, edit, expected):
    folder, checkpoint = _copy(trained, tmp_path)
    _edit_state(checkpoint, edit)
    with pytest.raises(ValueError, match=re.escape(f"{checkpoint / STATE_FILE} is not a training state: ")) as caught:
        _resume(tmp_path, folder)
    assert expected in str(caught.value)
    assert "delete the checkpoint folder" in str(caught.value)


def test_a_training_state_that_is_not_json_is_named(trained, tmp_path):
    folder, checkpoint = _copy(trained, tmp_path)
    (checkpoint / STATE_FILE).write_text('{"stage_index": 0, "stage_na')
    with pytest.raises(ValueError, match=re.escape(f"{checkpoint / STATE_FILE} is not valid JSON")):
        _resume(tmp_path, folder)


@pytest.mark.parametrize(
    "edit, expected",
    [
        (lambda data: {**data, "completed_steps": 999}, "completed_steps (999) must be <= total_steps (6)"),
        (lambda data: {**data, "batches_in_epoch": 10**6}, "batches_in_epoch (1000000) must be <= 3"),
        (lambda data: {**data, "stage_index": 1}, "this checkpoint is of stage 2 ('regression', 6 steps)"),
        (lambda data: {**data, "stage_name": "other"}, "this checkpoint is of stage 1 ('other', 6 steps)"),
        (lambda data: {**data, "total_steps": 8}, "this checkpoint is of stage 1 ('regression', 8 steps)"),
    ],
)
def test_a_training_state_outside_the_stage_resumed_is_refused(trained, tmp_path, edit, expected):
    folder, checkpoint = _copy(trained, tmp_path)
    _edit_state(checkpoint, edit)
    with pytest.raises(ValueError, match=re.escape(f"{checkpoint / STATE_FILE}: ")) as caught:
        _resume(tmp_path, folder)
    assert expected in str(caught.value)


def test_a_checkpoint_of_another_length_of_the_stage_is_refused(trained, tmp_path):
    folder, checkpoint = _copy(trained, tmp_path)
    with pytest.raises(ValueError, match=re.escape(f"{checkpoint / STATE_FILE}: this checkpoint is of stage 1")):
        _resume(tmp_path, folder, max_steps=9)


def _remove_state(checkpoint: Path) -> str:
    (checkpoint / STATE_FILE).unlink()
    return f"its {STATE_FILE} is missing"


def _dangling_state(checkpoint: Path) -> str:
    (checkpoint / STATE_FILE).unlink()
    (checkpoint / STATE_FILE).symlink_to(checkpoint / "nowhere.json")
    return f"its {STATE_FILE} is a link to a missing file"


def _file_instead(checkpoint: Path) -> str:
    shutil.rmtree(checkpoint)
    checkpoint.write_text("x")
    return "it is not a folder"


@pytest.mark.parametrize("damage", [_remove_state, _dangling_state, _file_instead])
def test_an_incomplete_newest_checkpoint_is_skipped_with_a_warning(trained, tmp_path, capsys, damage):
    folder, checkpoint = _copy(trained, tmp_path)
    reason = damage(checkpoint)
    with CaptureLogger(checkpointing.logger) as captured:
        _, state = _resume(tmp_path, folder)
    assert f"skipping checkpoint {checkpoint}: {reason}; resuming from step_00000002." in captured.out
    assert "at step 2" in capsys.readouterr().out
    assert state.completed_steps == 6


def test_a_folder_not_named_as_a_checkpoint_is_skipped_with_a_warning(trained, tmp_path, capsys):
    folder, checkpoint = _copy(trained, tmp_path)
    stray = folder / "checkpoints" / "step_abc"
    shutil.copytree(checkpoint, stray)
    with CaptureLogger(checkpointing.logger) as captured:
        _resume(tmp_path, folder)
    assert f"skipping checkpoint {stray}: its name is not step_ followed by a number" in captured.out
    assert f"from {checkpoint} at step 4" in capsys.readouterr().out


def test_a_saved_training_state_loads_as_it_was(trained, tmp_path):
    state = TrainState.load(trained / "checkpoints" / NEWEST)
    assert (state.completed_steps, state.total_steps, state.stage_name, len(state.history)) == (4, 6, "regression", 4)
    state.save(tmp_path)
    assert TrainState.load(tmp_path) == state
