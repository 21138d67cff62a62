"""The stage runner both kinds of training share: prepare, resume, train, save.

A task (pretraining's stages, retrieval fine-tuning) builds its pieces into a `Stage` (the module to train with its
data, a `Schedule` and the folder the stage writes to) and hands it to `run_stage`, which builds the optimizer and the
schedule, prepares everything with Accelerate, resumes from the stage's last checkpoint when asked, runs `train_loop`
and returns the trained, prepared module with its `TrainState`. `save_final` then writes the stage's model folder.

Folder of a stage: `checkpoints/step_N` (full training state, `save_checkpoint`) and `final/` (the model with its
processor or tokenizer, their code for `trust_remote_code=True`, and `trainer_state.json`, published atomically).
"""

from __future__ import annotations

import contextlib
import math
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers.utils import logging

from ..formats.files import atomic_write_json, exclusive_folder, publish_folder
from ..models.imagebert.pipeline_image_text_retrieval import saving_code
from .checkpointing import (
    COMPLETE_FILE,
    DAMAGED_ADVICE,
    STATE_FILE,
    TrainState,
    latest_checkpoint,
    load_checkpoint,
    published_module,
    remove_partial_checkpoints,
    save_checkpoint,
    save_model,
)
from .loop import LoopSettings, build_optimizer, build_scheduler, steps_per_epoch, train_loop


logger = logging.get_logger(__name__)


@dataclass
class Schedule:
    """How long a stage trains and how its AdamW learning rate moves.

    Attributes:
        learning_rate: Peak learning rate.
        max_steps: Optimizer steps of the stage; None trains `num_epochs` over the (prepared) dataloader.
        num_epochs: Epochs when `max_steps` is None (fractions allowed).
        gradient_accumulation_steps: Micro-batches per optimizer step.
        weight_decay: AdamW weight decay (never on biases and LayerNorm weights).
        adam_beta1, adam_beta2, adam_epsilon: AdamW's betas and epsilon.
        lr_scheduler_type: A transformers scheduler name (`"linear"`, `"cosine"`, ...).
        warmup_steps: Steps of warmup; None takes `warmup_ratio` of the stage's steps.
        warmup_ratio: Share of the steps with warmup when `warmup_steps` is None.
        per_device_train_batch_size: Examples per process and micro-batch, as the stage's data gives them (what
            DeepSpeed is told, see `fit_deepspeed_to_stage`); None where unknown.
    """

    learning_rate: float
    max_steps: int | None = None
    num_epochs: float | None = 1.0
    gradient_accumulation_steps: int = 1
    weight_decay: float = 0.01
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    lr_scheduler_type: str = "linear"
    warmup_steps: int | None = None
    warmup_ratio: float = 0.0
    per_device_train_batch_size: int | None = None

    def total_steps(self, dataloader) -> int:
        """`max_steps`, else `num_epochs` over `dataloader` (a partial accumulation still steps at an epoch's end)."""
        if self.max_steps is not None:
            return self.max_steps
        if self.num_epochs is None:
            raise ValueError("a Schedule needs max_steps or num_epochs; both are None.")
        return math.ceil(self.num_epochs * steps_per_epoch(len(dataloader), self.gradient_accumulation_steps))

    def warmup(self, total_steps: int) -> int:
        return self.warmup_steps if self.warmup_steps is not None else int(self.warmup_ratio * total_steps)

    def warn_if_warmup_outlasts(self, total_steps: int, where: str) -> None:
        """Warns, naming `where` (the field that set `warmup_steps`), when the warmup is longer than the stage: its
        learning rate never reaches `learning_rate`. A warning, not a refusal: a short trial run of a recipe made for
        a long one (`--max_steps 20`) is legitimate. (`warmup_ratio` is below 1, so it never is.)"""
        if self.warmup_steps is not None and self.warmup_steps > total_steps:
            logger.warning(
                "%s is %d, longer than the stage's %d steps: the learning rate never reaches %g (it ends at %.3g).",
                where,
                self.warmup_steps,
                total_steps,
                self.learning_rate,
                self.learning_rate * total_steps / self.warmup_steps,
            )


@dataclass
class Stage:
    """What a task hands `run_stage`: the module to train, its data, its schedule and where the stage writes.

    Attributes:
        name: The stage's name (progress bar, logs, `TrainState.stage_name`).
        model: The module trained: its forward takes a batch and returns `loss` and `<task>_loss` outputs.
        dataloader: The stage's DataLoader (not yet prepared).
        schedule: Length, optimizer and learning-rate schedule.
        folder: The stage's folder; `checkpoints/` and `final/` go inside.
        index: Position of the stage in its run (0-based).
        sampler: The sampler inside `dataloader`, whose `set_epoch` the loop calls; None for a stream.
        shard_dataloader: Let accelerate shard the dataloader across processes; False for streams that every
            process already reads its own part of.
        global_step_offset: Optimizer steps of the run's earlier stages (run-wide step numbers).
        history: The logged steps of the earlier stages; the stage's own are appended.
        describe: Gives the line printed when the stage starts, from its total steps.
        on_prepared: Called with the prepared module and the stage's state before training (e.g. to hand the
            model to a collator that scores with it, or to start trackers that log the number of steps).
    """

    name: str
    model: torch.nn.Module
    dataloader: Any
    schedule: Schedule
    folder: Path
    index: int = 0
    sampler: Any = None
    shard_dataloader: bool = True
    global_step_offset: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    describe: Callable[[int], str] | None = None
    on_prepared: Callable[[torch.nn.Module, TrainState], None] | None = None

    @property
    def checkpoint_dir(self) -> Path:
        return Path(self.folder) / "checkpoints"

    @property
    def final_dir(self) -> Path:
        return Path(self.folder) / "final"


def run_stage(
    accelerator, stage: Stage, settings: LoopSettings, resume: bool = False, checkpoint_at_end: bool = False
) -> tuple[torch.nn.Module, TrainState]:
    """Trains `stage` to its end and returns the prepared module and the final `TrainState`.

    A checkpoint holds everything the accelerator has prepared, so it must hold no earlier stage's objects: after
    `save_final`, call `accelerator.free_memory()` before the next stage.

    Args:
        accelerator: The run's `Accelerator`; its gradient accumulation is set to the stage's.
        stage: The task's pieces.
        settings: The loop's settings; `checkpoint_dir` is set to the stage's.
        resume: Continue from the stage's newest complete checkpoint (same data order, same random draws).
        checkpoint_at_end: Also save a checkpoint at the last step (a run killed while it writes the final model
            then resumes without repeating a step).
    """
    settings.checkpoint_dir = stage.checkpoint_dir
    schedule = stage.schedule
    optimizer = build_optimizer(
        stage.model,
        schedule.learning_rate,
        schedule.weight_decay,
        (schedule.adam_beta1, schedule.adam_beta2),
        schedule.adam_epsilon,
    )
    accelerator.gradient_accumulation_steps = schedule.gradient_accumulation_steps
    fit_deepspeed_to_stage(accelerator, schedule)
    # Scheduler lengths need the per-process batch count, known once the dataloader is sharded.
    dataloader = accelerator.prepare(stage.dataloader) if stage.shard_dataloader else stage.dataloader
    total_steps = schedule.total_steps(dataloader)
    # A stage of `num_epochs` has its length only now, with its data built.
    schedule.warn_if_warmup_outlasts(total_steps, f"stages[{stage.index}].warmup_steps")
    scheduler = build_scheduler(
        optimizer, schedule.lr_scheduler_type, total_steps, schedule.warmup(total_steps), accelerator.num_processes
    )
    model, optimizer, scheduler = accelerator.prepare(stage.model, optimizer, scheduler)
    state = _start_state(accelerator, stage, total_steps, resume, dataloader)
    if stage.on_prepared is not None:
        stage.on_prepared(model, state)
    if stage.describe is not None:
        accelerator.print(stage.describe(total_steps))
    state = train_loop(accelerator, model, optimizer, scheduler, dataloader, state, settings, sampler=stage.sampler)
    if checkpoint_at_end:
        newest = latest_checkpoint(stage.checkpoint_dir)
        if newest is None or TrainState.load(newest).completed_steps != state.completed_steps:
            save_checkpoint(accelerator, stage.checkpoint_dir, state, settings.save_total_limit)
    return model, state


def fit_deepspeed_to_stage(accelerator, schedule: Schedule) -> None:
    """Under DeepSpeed, writes the stage's micro-batch, gradient accumulation and global batch into the plugin's
    config. accelerate fills their `"auto"` values only in a `prepare` call that also holds a dataloader (the stage
    prepares its dataloader first, for the scheduler's length, and a stream's loader not at all), and only once: a
    later stage would keep the first one's. Numbers the DeepSpeed config gives for them are replaced: the recipe
    decides."""
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    if plugin is None:
        return
    values = {"gradient_accumulation_steps": schedule.gradient_accumulation_steps}
    if schedule.per_device_train_batch_size is not None:
        micro = schedule.per_device_train_batch_size
        values["train_micro_batch_size_per_gpu"] = micro
        values["train_batch_size"] = micro * schedule.gradient_accumulation_steps * accelerator.num_processes
    plugin.deepspeed_config.update(values)


def _start_state(accelerator, stage: Stage, total_steps: int, resume: bool, dataloader) -> TrainState:
    """A fresh state, or the newest checkpoint's with `resume` (its accelerate state restored)."""
    state = TrainState(
        stage_index=stage.index,
        stage_name=stage.name,
        total_steps=total_steps,
        global_step_offset=stage.global_step_offset,
        num_processes=accelerator.num_processes,
        history=list(stage.history),
    )
    if accelerator.is_main_process:
        remove_partial_checkpoints(stage.checkpoint_dir)
    accelerator.wait_for_everyone()
    checkpoint = latest_checkpoint(stage.checkpoint_dir, warn=accelerator.is_main_process) if resume else None
    if checkpoint is not None:
        fresh = state
        state = load_checkpoint(
            accelerator, checkpoint, check=lambda saved: _check_resumable(checkpoint, saved, fresh, dataloader)
        )
        if state.num_processes is None:
            if accelerator.is_main_process:
                logger.warning(
                    f"{checkpoint / STATE_FILE} does not say how many processes saved it (an earlier version wrote "
                    f"it); resuming with {accelerator.num_processes}. With another number than the run had, the "
                    "global batch and the learning-rate schedule change from here on."
                )
            state.num_processes = accelerator.num_processes
        accelerator.print(
            f"resumed stage {stage.index + 1} ({stage.name}) from {checkpoint} at step {state.completed_steps}"
        )
    return state


def _processes(count: int) -> str:
    return f"{count} process" if count == 1 else f"{count} processes"


def _check_resumable(checkpoint: Path, saved: TrainState, fresh: TrainState, dataloader) -> None:
    """Raises `ValueError`, naming the checkpoint's state file, unless the checkpoint was saved by as many processes
    as this run has (when it says so), is of this stage (its position, name and length) and where it stands lies
    inside it (its steps; its micro-batches of the epoch, where the dataloader has a length)."""
    path = checkpoint / STATE_FILE
    # First: with another process count, an epoch-long stage also has another length.
    if saved.num_processes is not None and saved.num_processes != fresh.num_processes:
        raise ValueError(
            f"{path}: this checkpoint was saved by a run of {_processes(saved.num_processes)}, this run has "
            f"{_processes(fresh.num_processes)}; the global batch and the learning-rate schedule would change "
            f"mid-stage. Resume with {_processes(saved.num_processes)} (accelerate launch --num_processes "
            f"{saved.num_processes}), or move {checkpoint.parent} away to train the stage afresh."
        )
    which = [(state.stage_index, state.stage_name, state.total_steps) for state in (saved, fresh)]
    if which[0] != which[1]:
        raise ValueError(
            f"{path}: this checkpoint is of stage {saved.stage_index + 1} ({saved.stage_name!r}, "
            f"{saved.total_steps} steps), not of the stage resumed, stage {fresh.stage_index + 1} "
            f"({fresh.stage_name!r}, {fresh.total_steps} steps); resume with the recipe and flags that wrote it, or "
            f"move {checkpoint.parent} away to train the stage afresh."
        )
    if saved.completed_steps > saved.total_steps:
        raise ValueError(
            f"{path}: completed_steps ({saved.completed_steps}) must be <= total_steps ({saved.total_steps}); "
            f"the checkpoint is damaged: {DAMAGED_ADVICE}."
        )
    if isinstance(getattr(dataloader, "dataset", None), torch.utils.data.IterableDataset):
        return  # a stream: its length, when it has one, is an estimate
    try:
        batches = len(dataloader)
    except TypeError:  # a sampler without a length
        return
    if saved.batches_in_epoch > batches:
        raise ValueError(
            f"{path}: batches_in_epoch ({saved.batches_in_epoch}) must be <= {batches}, the stage's micro-batches "
            f"per epoch; the checkpoint is damaged: {DAMAGED_ADVICE}."
        )


def save_final(
    accelerator,
    model,
    state: TrainState,
    final_dir: str | Path,
    companion,
    submodule: str | None = None,
    leave_out: Sequence[str] = (),
) -> Path:
    """Writes the trained model with its processor or tokenizer (`companion`), `trainer_state.json` and the
    completion marker to a hidden folder, then renames it to `final_dir`. Call on every process.

    The model and an `ImageBERTProcessor` companion are saved with their code and `auto_map` (`saving_code`), so
    the folder, and what `--push_to_hub` uploads of it, loads with `trust_remote_code=True` where `imagebert_hf` is
    not installed.

    Args:
        model: The prepared module; its full state dict is gathered when the parameters are sharded.
        submodule: Save only this attribute of it (a training wrapper around the model to publish).
        leave_out: Modules of the saved model whose weights are left out (`save_model`).
    """
    final_dir = Path(final_dir)
    tmp = final_dir.parent / f".tmp-{final_dir.name}"
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    with saving_code(published_module(accelerator, model, submodule), companion):
        save_model(accelerator, model, tmp, submodule=submodule, leave_out=leave_out)
        if accelerator.is_main_process:
            companion.save_pretrained(tmp)
    if accelerator.is_main_process:
        state.save(tmp)
        atomic_write_json(tmp / COMPLETE_FILE, {"stage": state.stage_name, "steps": state.completed_steps})
        publish_folder(tmp, final_dir)
    accelerator.wait_for_everyone()
    return final_dir


def hold_run_folder(accelerator, output_dir: str | Path) -> contextlib.AbstractContextManager:
    """The run lock of `output_dir` on the main process (`formats.files.exclusive_folder`): enter it before the
    first write into a run's folder and keep it until the run ends. The other processes write only where the main
    one leads them; when the lock is refused the main process raises and the launcher ends the others."""
    if accelerator.is_main_process:
        return exclusive_folder(output_dir)
    return contextlib.nullcontext()


__all__ = ["Schedule", "Stage", "hold_run_folder", "run_stage", "save_final"]
