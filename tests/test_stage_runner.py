"""The stage runner on a task of its own: a small regression, to show what any task gets from it (schedule, resume,
the final folder) without the pretraining or retrieval pieces."""

import json
from pathlib import Path

import pytest
import torch
from transformers.utils import ModelOutput

from imagebert_hf.training import LoopSettings, Schedule, Stage, TrainingStopped, build_accelerator, run_stage
from imagebert_hf.training.checkpointing import COMPLETE_FILE, STATE_FILE, list_checkpoints
from imagebert_hf.training.runner import save_final


class Regression(torch.nn.Module):
    """A linear model whose forward returns `loss` and `mse_loss`, the outputs `train_loop` reads."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.linear = torch.nn.Linear(3, 1)

    def forward(self, x, y):
        loss = (self.linear(x).squeeze(-1) - y).pow(2).mean()
        return ModelOutput(loss=loss, mse_loss=loss)

    def save_pretrained(self, folder, is_main_process=True, state_dict=None, save_function=torch.save):
        Path(folder).mkdir(parents=True, exist_ok=True)
        if is_main_process:
            save_function(state_dict if state_dict is not None else self.state_dict(), Path(folder) / "weights.pt")


class Companion:
    """Stands for the processor or tokenizer saved beside the model."""

    def save_pretrained(self, folder):
        (Path(folder) / "companion.json").write_text("{}")


def _stage(folder: Path, max_steps: int | None = 6, num_epochs: float | None = None) -> Stage:
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(10, 3, generator=generator)
    y = x @ torch.tensor([1.0, -2.0, 0.5]) + 0.1 * torch.randn(10, generator=generator)
    dataset = [{"x": x[i], "y": y[i]} for i in range(10)]
    dataloader = torch.utils.data.DataLoader(dataset, batch_size=4)  # 3 batches an epoch, the last one short
    schedule = Schedule(learning_rate=0.05, max_steps=max_steps, num_epochs=num_epochs, warmup_steps=1)
    return Stage(name="regression", model=Regression(), dataloader=dataloader, schedule=schedule, folder=folder)


def _settings(**overrides) -> LoopSettings:
    return LoopSettings(loss_names=("mse",), logging_steps=1, checkpointing_steps=2, save_total_limit=5, **overrides)


def test_schedule_length_from_steps_or_epochs():
    loader = list(range(10))  # 10 micro-batches
    assert Schedule(learning_rate=1.0, max_steps=7).total_steps(loader) == 7
    assert Schedule(learning_rate=1.0, max_steps=None, num_epochs=2).total_steps(loader) == 20
    # A partial accumulation still steps at the end of an epoch: 10 micro-batches by 4 are 3 steps.
    schedule = Schedule(learning_rate=1.0, max_steps=None, num_epochs=1.5, gradient_accumulation_steps=4)
    assert schedule.total_steps(loader) == 5
    assert Schedule(learning_rate=1.0, warmup_ratio=0.25).warmup(8) == 2
    assert Schedule(learning_rate=1.0, warmup_steps=3, warmup_ratio=0.25).warmup(8) == 3
    with pytest.raises(ValueError, match="max_steps or num_epochs"):
        Schedule(learning_rate=1.0, max_steps=None, num_epochs=None).total_steps(loader)


def test_a_stopped_stage_resumes_to_the_same_weights_and_saves_its_final_folder(tmp_path):
    accelerator = build_accelerator(tmp_path, report_to="none", cpu=True)
    straight_model, straight = run_stage(accelerator, _stage(tmp_path / "straight"), _settings())
    straight_weights = {k: v.clone() for k, v in accelerator.unwrap_model(straight_model).state_dict().items()}
    accelerator.free_memory()  # a checkpoint saves everything the accelerator prepared: one stage at a time
    # 3 batches an epoch: the 6th step ends the second epoch (0-based 1), its 3 batches used.
    assert (straight.completed_steps, straight.epoch, straight.batches_in_epoch) == (6, 1, 3)
    assert [entry["step"] for entry in straight.history] == list(range(1, 7))

    with pytest.raises(TrainingStopped, match="step 3"):
        run_stage(accelerator, _stage(tmp_path / "resumed"), _settings(stop_after_global_step=3))
    accelerator.free_memory()
    assert [path.name for path in list_checkpoints(tmp_path / "resumed" / "checkpoints")] == ["step_00000002"]
    model, state = run_stage(accelerator, _stage(tmp_path / "resumed"), _settings(), resume=True)
    assert state.completed_steps == 6
    assert state.history == straight.history
    for name, value in accelerator.unwrap_model(model).state_dict().items():
        assert torch.equal(value, straight_weights[name]), name

    final = save_final(accelerator, model, state, tmp_path / "resumed" / "final", Companion())
    assert sorted(path.name for path in final.iterdir()) == sorted(
        ["weights.pt", "companion.json", STATE_FILE, COMPLETE_FILE]
    )
    assert json.loads((final / COMPLETE_FILE).read_text()) == {"stage": "regression", "steps": 6}
    assert not any(path.name.startswith(".tmp-") for path in final.parent.iterdir())


def test_checkpoint_at_end_saves_the_last_step_once(tmp_path):
    accelerator = build_accelerator(tmp_path, report_to="none", cpu=True)
    _, state = run_stage(
        accelerator, _stage(tmp_path, max_steps=None, num_epochs=1), _settings(), checkpoint_at_end=True
    )
    assert state.total_steps == 3
    # Step 2 by checkpointing_steps, step 3 as the last one.
    assert [path.name for path in list_checkpoints(tmp_path / "checkpoints")] == ["step_00000002", "step_00000003"]


class Mean(torch.nn.Module):
    """One weight `w`; a micro-batch's loss is `(w - x)^2`, so its gradient is `2 (w - x)`."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))

    def forward(self, x):
        loss = (self.w - x).pow(2).mean()
        return ModelOutput(loss=loss, x_loss=loss)


@pytest.mark.parametrize(
    ("epoch_batches", "accumulation", "scales"),
    [(5, 2, [1, 1, 1, 1, 2]), (7, 3, [1, 1, 1, 1, 1, 1, 3]), (8, 3, [1, 1, 1, 1, 1, 1, 1.5, 1.5]), (4, 2, [1] * 4)],
)
def test_window_loss_scale(epoch_batches, accumulation, scales):
    from imagebert_hf.training.loop import window_loss_scale

    assert [window_loss_scale(p, epoch_batches, accumulation) for p in range(1, epoch_batches + 1)] == scales
    assert window_loss_scale(3, None, accumulation) == 1.0 and window_loss_scale(5, 5, 1) == 1.0


def test_a_short_last_accumulation_window_steps_with_the_mean_of_its_micro_batches(tmp_path):
    """Five micro-batches with two per step: windows {1, 2}, {3, 4} and {5}. With plain SGD at rate 1 each step moves
    the weight by minus the gradient it applied, which must be the mean over the window's micro-batches."""
    from imagebert_hf.training.checkpointing import TrainState
    from imagebert_hf.training.loop import train_loop

    accelerator = build_accelerator(tmp_path, report_to="none", cpu=True, gradient_accumulation_steps=2)
    model = Mean()
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    values = [1.0, 2.0, 3.0, 4.0, 10.0]
    loader = torch.utils.data.DataLoader([{"x": torch.tensor([value])} for value in values], batch_size=1)
    model, optimizer, scheduler, loader = accelerator.prepare(model, optimizer, scheduler, loader)
    weights = []
    settings = LoopSettings(loss_names=("x",), logging_steps=1, max_grad_norm=None)
    train_loop(
        accelerator, model, optimizer, scheduler, loader, TrainState(total_steps=3, num_processes=1), settings,
        on_step=lambda state, losses: weights.append(accelerator.unwrap_model(model).w.item()),
    )  # fmt: skip
    expected, w = [], 0.0
    for window in ([1.0, 2.0], [3.0, 4.0], [10.0]):
        w -= sum(2 * (w - x) for x in window) / len(window)
        expected.append(w)
    assert weights == pytest.approx(expected)
