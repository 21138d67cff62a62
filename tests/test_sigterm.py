"""SIGTERM, what a job scheduler sends before it kills a job: the loop finishes its optimizer step, saves a
checkpoint there and raises `TrainingStopped`, and the run resumed from that checkpoint ends with the weights of
the run never stopped. The stage runner's small regression task stands for any task (the pretraining script, with a
data worker and the signal sent to the whole process group, is in tests/test_pretraining.py)."""

import os
import re
import signal

import pytest
import torch
import yaml

from imagebert_hf.training import (
    LoopSettings,
    TrainingStopped,
    build_accelerator,
    build_optimizer,
    build_scheduler,
    recipe_from_dict,
    run_stage,
    train_loop,
)
from imagebert_hf.training.checkpointing import TrainState, list_checkpoints
from imagebert_hf.training.loop import ignore_sigterm, stop_on_sigterm
from imagebert_hf.training.pretraining import build_model, build_stage_data, load_tokenizer

from .test_pretraining import TINY_RECIPE
from .test_stage_runner import Regression, _settings, _stage


class SignalledRegression(Regression):
    """The regression model, sending this process SIGTERM during its `at`-th forward (mid-step)."""

    def __init__(self, at: int):
        super().__init__()
        self.at, self.calls = at, 0

    def forward(self, x, y):
        self.calls += 1
        if self.calls == self.at:
            os.kill(os.getpid(), signal.SIGTERM)
        return super().forward(x, y)


def _signalled_stage(folder, at: int, **schedule):
    stage = _stage(folder, **schedule)
    stage.model = SignalledRegression(at)
    return stage


def _weights(accelerator, model) -> dict[str, torch.Tensor]:
    return {key: value.clone() for key, value in accelerator.unwrap_model(model).state_dict().items()}


@pytest.mark.parametrize("step", [1, 3, 4])
def test_sigterm_saves_a_checkpoint_at_the_step_and_the_resumed_run_ends_the_same(tmp_path, step):
    accelerator = build_accelerator(tmp_path, report_to="none", cpu=True)
    straight_model, _ = run_stage(accelerator, _stage(tmp_path / "straight"), _settings())
    straight = _weights(accelerator, straight_model)
    accelerator.free_memory()
    handler = signal.getsignal(signal.SIGTERM)

    folder = tmp_path / "signalled"
    with pytest.raises(TrainingStopped) as stopped:
        run_stage(accelerator, _signalled_stage(folder, at=step), _settings())
    accelerator.free_memory()
    checkpoint = folder / "checkpoints" / f"step_{step:08d}"
    assert str(stopped.value) == f"stopped on SIGTERM after run-wide step {step} (checkpoint {checkpoint} saved)"
    assert TrainState.load(checkpoint).completed_steps == step
    assert signal.getsignal(signal.SIGTERM) is handler  # the process's own handler is back

    resumed_model, resumed = run_stage(accelerator, _stage(folder), _settings(), resume=True)
    assert resumed.completed_steps == 6
    for key, value in _weights(accelerator, resumed_model).items():
        torch.testing.assert_close(value, straight[key], msg=key)
    assert [entry["step"] for entry in resumed.history] == list(range(1, 7))
    accelerator.free_memory()


def test_sigterm_at_a_stages_last_step_ends_the_stage_and_stops_before_the_next(tmp_path):
    accelerator = build_accelerator(tmp_path, report_to="none", cpu=True)
    with stop_on_sigterm():  # the run functions hold it for the whole run, across stages
        _, state = run_stage(accelerator, _signalled_stage(tmp_path / "first", at=6), _settings())
        accelerator.free_memory()
        assert state.completed_steps == 6
        second = _stage(tmp_path / "second")
        second.global_step_offset = 6
        with pytest.raises(TrainingStopped, match=re.escape("before run-wide step 7, nothing left to save")):
            run_stage(accelerator, second, _settings())
        accelerator.free_memory()
        assert list_checkpoints(tmp_path / "second" / "checkpoints") == []
    # The signal is forgotten with the block: the next run trains.
    _, state = run_stage(accelerator, _stage(tmp_path / "third"), _settings())
    assert state.completed_steps == 6


def test_without_a_checkpoint_folder_the_stop_says_nothing_was_saved(tmp_path):
    accelerator = build_accelerator(tmp_path, report_to="none", cpu=True)
    stage = _signalled_stage(tmp_path / "stage", at=2)
    model, loader = accelerator.prepare(stage.model, stage.dataloader)
    optimizer = accelerator.prepare(build_optimizer(model, 0.05))
    scheduler = accelerator.prepare(build_scheduler(optimizer, "linear", 6, 1, accelerator.num_processes))
    settings = LoopSettings(loss_names=("mse",))  # no checkpoint_dir
    with pytest.raises(TrainingStopped, match=r"after run-wide step 2 \(no checkpoint_dir: nothing saved\)$"):
        train_loop(accelerator, model, optimizer, scheduler, loader, TrainState(total_steps=6), settings)
    accelerator.free_memory()


class _Numbers(torch.utils.data.Dataset):
    def __len__(self):
        return 64

    def __getitem__(self, index):
        return torch.tensor([index])


@pytest.mark.parametrize("init, survives", [(ignore_sigterm, True), (None, False)])
def test_a_data_worker_outlives_the_jobs_sigterm_only_with_the_loops_worker_init(init, survives):
    """A scheduler's SIGTERM reaches every process of the job, data workers too; a step that still needs batches
    after it (gradient accumulation) must get them, so the training loaders' workers ignore it."""
    loader = torch.utils.data.DataLoader(_Numbers(), batch_size=2, num_workers=1, worker_init_fn=init)
    batches = iter(loader)
    assert next(batches).tolist() == [[0], [1]]
    os.kill(batches._workers[0].pid, signal.SIGTERM)
    batches._workers[0].join(timeout=5)
    if survives:
        assert [next(batches).tolist() for _ in range(3)] == [[[2], [3]], [[4], [5]], [[6], [7]]]
    else:
        with pytest.raises(RuntimeError, match="DataLoader worker"):
            for _ in range(32):
                next(batches)
    del batches


def test_the_pretraining_loaders_workers_ignore_sigterm():
    recipe = recipe_from_dict(yaml.safe_load(TINY_RECIPE.read_text()))
    tokenizer = load_tokenizer(recipe.model)
    config = build_model(recipe.model, tokenizer).config
    dataloader, _, _ = build_stage_data(recipe.stages[0], tokenizer, config, seed=0, num_workers=1)
    assert dataloader.worker_init_fn is ignore_sigterm


def test_a_sigterm_nothing_answered_is_passed_on_to_the_previous_handler(tmp_path):
    """A signal during a stage's last step lets the stage end; with no later loop to answer it, the block hands it
    to the handler it replaced (the default one ends the process, as SIGTERM always did)."""
    received = []
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: received.append(signum))
    try:
        accelerator = build_accelerator(tmp_path, report_to="none", cpu=True)
        _, state = run_stage(accelerator, _signalled_stage(tmp_path / "stage", at=6), _settings())
        accelerator.free_memory()
        assert state.completed_steps == 6
        assert received == [signal.SIGTERM]
    finally:
        signal.signal(signal.SIGTERM, previous)
