"""A reusable Accelerate training loop: gradient accumulation, clipping, logging, checkpoints, resumption and a
budget for records that fail to load. Pretraining and retrieval fine-tuning both run on it."""

from __future__ import annotations

import contextlib
import math
import os
import signal
import threading
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers.utils import logging

from ..models.imagebert.modeling_imagebert import IGNORE_INDEX, pretraining_targets
from .checkpointing import TrainState, save_checkpoint


logger = logging.get_logger(__name__)


class TooManyFailedRecords(RuntimeError):
    """More records failed to load than the run allows."""


# Optimizer steps in a row whose loss is not finite after which a run with a gradient scaler (fp16) stops: the scaler
# skips each such step and halves its scale, so a few are an overflow it recovers from, and this many a divergence.
NON_FINITE_STEPS_UNDER_SCALER = 10


class NonFiniteLossError(ValueError):
    """A loss came out NaN or infinite: training diverged (too high a learning rate, bad data), and every step after
    it would train the weights into NaN. A `ValueError`, like the other bad values a run refuses: the scripts end on
    it with one line."""


class TrainingStopped(Exception):
    """Raised when a run stops before its end and can continue with `resume`: `stop_after_steps` was reached, or the
    process got SIGTERM (a scheduler preempting or cancelling the job), after which the loop saved a checkpoint."""


# Set by SIGTERM inside `stop_on_sigterm`; a loop stops at the end of its optimizer step once every process knows.
_SIGTERM_RECEIVED = threading.Event()
_sigterm_blocks = 0  # how many `stop_on_sigterm` blocks are open: the outermost one installs and restores


def _request_stop(signum, frame) -> None:
    # Only the flag: a handler that wrote to a stream the interrupted code was writing to (a progress bar, a log)
    # would raise a reentrant-write error in the middle of the step. The loop says what it does once it sees it.
    _SIGTERM_RECEIVED.set()


@contextlib.contextmanager
def stop_on_sigterm():
    """While the block runs, SIGTERM sets a flag instead of ending the process: `train_loop` finishes its optimizer
    step, saves a checkpoint and raises `TrainingStopped`; `stop_if_sigterm_received` answers it at other points
    every process reaches (pretraining checks before each stage). Schedulers send SIGTERM before they kill a job
    (SLURM on preemption, time limit or `scancel`; Kubernetes on eviction; torchrun passes it on to every process),
    with a grace period that must cover a step and a checkpoint. Pretraining holds it for the whole run, fine-tuning
    for its training, `train_loop` for itself; blocks nest, and the outermost restores the previous handler and,
    when a signal came that nothing answered (during the last step, or after it), passes it on to that handler, which
    by default ends the process as SIGTERM always did. Outside the main thread, where no handler can be installed,
    nothing changes. A process blocked in a collective or a read answers only once the call returns."""
    global _sigterm_blocks
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    if _sigterm_blocks == 0:
        _SIGTERM_RECEIVED.clear()
        previous = signal.signal(signal.SIGTERM, _request_stop)
    _sigterm_blocks += 1
    try:
        yield
    finally:
        _sigterm_blocks -= 1
        if _sigterm_blocks == 0:
            # None: a handler installed outside Python, which cannot be put back; the default is the closest.
            signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)
            if _SIGTERM_RECEIVED.is_set():
                _SIGTERM_RECEIVED.clear()
                signal.raise_signal(signal.SIGTERM)


def stop_if_sigterm_received(accelerator, before: str) -> None:
    """Raises `TrainingStopped` ("stopped on SIGTERM before <before>") when any process got SIGTERM inside
    `stop_on_sigterm`, and counts the signal answered. A collective: call it on every process at the same point."""
    received = torch.tensor([float(_SIGTERM_RECEIVED.is_set())], device=accelerator.device)
    if accelerator.reduce(received, reduction="sum").item() > 0:
        _SIGTERM_RECEIVED.clear()
        raise TrainingStopped(f"stopped on SIGTERM before {before}, nothing left to save")


def ignore_sigterm(worker_id: int) -> None:
    """`worker_init_fn` of the training loaders: a scheduler's SIGTERM reaches a job's every process, and a data
    worker it ended would take the run down before the checkpoint. The workers end with their loader as usual."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def build_accelerator(
    output_dir: str | Path,
    mixed_precision: str | None = None,
    report_to: str | None = "tensorboard",
    cpu: bool = False,
    gradient_accumulation_steps: int = 1,
):
    """An `Accelerator` logging under `output_dir/logs`, configured by `accelerate launch`.

    The launch config (or `accelerate config`'s default, or the `ACCELERATE_*` variables it sets) decides the device
    (CUDA, MPS, XPU or CPU), the mixed precision and the distributed engine (DDP, FSDP, DeepSpeed); `mixed_precision`
    and `cpu` override it only when given. One fallback: a multi-process launch on a machine without an
    accelerator runs on the CPU (gloo), since accelerate would otherwise start every process as a separate run.

    Args:
        output_dir: The run's folder; trackers log to `output_dir/logs`.
        mixed_precision: `"no"`, `"fp16"` or `"bf16"` to override the launch config; None keeps it.
        report_to: Accelerate tracker (`"tensorboard"`), or None / `"none"` for no tracking.
        cpu: Run on the CPU even when an accelerator is present.
        gradient_accumulation_steps: Micro-batches per optimizer step.

    Raises:
        ValueError: fp16 mixed precision (given or from the launch config) on the CPU, where accelerate makes neither
            an fp16 autocast nor a gradient scaler: the run would train in float32 while saying fp16. bf16 works
            there. Nothing is written before.
    """
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration

    if mixed_precision not in (None, "no", "fp16", "bf16"):
        raise ValueError(f"mixed_precision must be None, 'no', 'fp16' or 'bf16', got {mixed_precision!r}.")
    log_with = None if report_to in (None, "", "none") else report_to
    overrides = {} if mixed_precision is None else {"mixed_precision": mixed_precision}
    accelerator = Accelerator(
        cpu=cpu or _multi_process_without_accelerator(),
        gradient_accumulation_steps=gradient_accumulation_steps,
        log_with=log_with,
        project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(Path(output_dir) / "logs")),
        **overrides,
    )
    if accelerator.mixed_precision == "fp16" and accelerator.device.type == "cpu":
        given = "--mixed_precision fp16" if mixed_precision == "fp16" else "mixed precision fp16 (the launch config's)"
        raise ValueError(
            f"{given} does not work on the CPU: accelerate makes no fp16 autocast and no gradient scaler there, so "
            "the run would train in float32; use --mixed_precision bf16, which works on the CPU, or no."
        )
    return accelerator


def _multi_process_without_accelerator() -> bool:
    world_size = max(
        int(os.environ.get(name, "1") or 1) for name in ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE")
    )
    return world_size > 1 and not torch.accelerator.is_available()


def describe_accelerator(accelerator) -> str:
    """One line naming what the launch config chose, e.g. `2 processes, MULTI_CPU on cpu, mixed precision bf16`."""
    processes = f"{accelerator.num_processes} process{'es' if accelerator.num_processes > 1 else ''}"
    return (
        f"{processes}, {accelerator.distributed_type.value} on {accelerator.device.type}, "
        f"mixed precision {accelerator.mixed_precision}"
    )


def build_optimizer(
    model: torch.nn.Module,
    learning_rate: float,
    weight_decay: float = 0.01,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
) -> torch.optim.Optimizer:
    """AdamW with no weight decay on biases and LayerNorm weights (BERT's practice).

    Uses torch's fused kernel where every parameter allows it (CPU or CUDA, floating point): one pass over each
    tensor instead of a dozen, 3x faster for a base-size model on CPU.
    """
    decay, no_decay = [], []
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        (no_decay if parameter.ndim < 2 or "LayerNorm" in name else decay).append(parameter)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    fused = all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in decay + no_decay)
    return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, eps=eps, fused=fused or None)


def build_scheduler(optimizer, name: str, total_steps: int, warmup_steps: int, num_processes: int):
    """A transformers schedule over `total_steps` optimizer steps.

    Accelerate's prepared scheduler advances `num_processes` times per optimizer step, so the lengths are scaled by
    it, `inverse_sqrt`'s time scale too (the warmup, else transformers' 10,000 steps); the learning rate is then the
    same at each step whatever the number of processes.
    """
    from transformers import get_scheduler

    specific = {"timescale": (warmup_steps or 10_000) * num_processes} if name == "inverse_sqrt" else None
    return get_scheduler(
        name,
        optimizer=optimizer,
        num_warmup_steps=warmup_steps * num_processes,
        num_training_steps=total_steps * num_processes,
        scheduler_specific_kwargs=specific,
    )


def steps_per_epoch(num_batches: int, gradient_accumulation_steps: int) -> int:
    """Optimizer steps in an epoch of `num_batches` micro-batches (a partial accumulation still steps at the end)."""
    return max(1, math.ceil(num_batches / gradient_accumulation_steps))


@dataclass
class LoopSettings:
    """How `train_loop` runs a stage: what it logs, when it checkpoints, and when it stops early.

    Attributes:
        loss_names: The tasks whose losses are logged; the model's output may have `<name>_loss` for each.
        checkpoint_dir: Where `save_checkpoint` writes every `checkpointing_steps` steps (None: never).
        checkpointing_steps: Save the full training state every this many optimizer steps (None: never).
        save_total_limit: Keep at most this many step checkpoints (oldest deleted; None keeps all).
        logging_steps: Every this many steps (and at the last), that step's losses go to the trackers and to
            `state.history` (the step's own, not a mean over the steps since the last log).
        max_grad_norm: Clip the gradient norm to this before each optimizer step (None or 0: no clipping).
        max_failure_rate: Raise `TooManyFailedRecords` when a larger share of records fails to load (batches carry
            `num_failed_records` from the collator); checked over all processes.
        min_records_for_failure_check: Records to see before the failure rate is first checked (all are checked
            at the end).
        stop_after_global_step: Raise `TrainingStopped` once the run-wide step reaches this (tests of resumption).
        loss_counts: Maps a batch to the number of targets behind each task's loss (e.g.
            `pretraining_loss_counts`). Logged losses are then averages over targets rather than over batches, so
            they do not depend on how a global batch is split across processes.
        task_weights: When given, the logged total is the weighted sum of the logged task losses (consistent with
            them) instead of the average of the model's `loss`.
        model_kwargs: Keyword arguments added to every forward call (e.g. `{"sparse_prediction": True}`).
    """

    loss_names: Sequence[str] = ("mlm", "moc", "mrfr", "itm")
    checkpoint_dir: str | Path | None = None
    checkpointing_steps: int | None = None
    save_total_limit: int | None = None
    logging_steps: int = 10
    max_grad_norm: float | None = 1.0
    max_failure_rate: float = 1.0
    min_records_for_failure_check: int = 200
    stop_after_global_step: int | None = None
    loss_counts: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]] | None = None
    task_weights: dict[str, float] | None = None
    model_kwargs: dict[str, Any] | None = None


class _StepTally:
    """Losses and record counts of the micro-batches of one optimizer step, summed on the device and reduced over
    the processes once per step."""

    def __init__(self, names: Sequence[str], device):
        self.names = list(names)
        self.sums = torch.zeros(len(self.names), device=device)
        self.counts = torch.zeros(len(self.names), device=device)
        # Micro-batches whose loss was NaN or infinite, per name: reduced with the sums, so every process agrees.
        self.non_finite = torch.zeros(len(self.names), device=device)
        self.non_finite_steps_in_a_row = 0
        self.records = torch.zeros(2, device=device)
        self.stop = torch.zeros(1, device=device)

    def add_records(self, batch_size: int, failed) -> None:
        self.records[0] += batch_size + (0 if failed is None else float(failed))
        self.records[1] += 0 if failed is None else float(failed)

    def add_losses(self, outputs, weights: dict[str, torch.Tensor]) -> None:
        for i, name in enumerate(self.names):
            value = getattr(outputs, "loss" if name == "loss" else f"{name}_loss", None)
            if value is None:
                continue
            value = value.detach().float()
            weight = torch.as_tensor(weights.get(name, 1.0), dtype=torch.float32, device=value.device)
            # Selected on the device rather than tested on the host: no sync per micro-batch.
            counted, finite = weight > 0, torch.isfinite(value)
            self.sums[i] += torch.where(counted & finite, value * weight, 0.0)
            self.counts[i] += torch.where(counted & finite, weight, 0.0)
            self.non_finite[i] += (counted & ~finite).float()

    def reduce(self, accelerator, state: TrainState) -> tuple[dict[str, float | None], bool, list[str]]:
        """Adds the step's records to `state`, returns its average losses over all processes, whether any process
        got SIGTERM, and the names whose loss was not finite on some process (all in the same reduction: the
        processes agree on them at no extra cost); starts afresh."""
        n = len(self.names)
        self.stop.fill_(float(_SIGTERM_RECEIVED.is_set()))
        totals = accelerator.reduce(
            torch.cat([self.sums, self.counts, self.non_finite, self.records, self.stop]), reduction="sum"
        )
        step_sums, step_counts, step_non_finite = totals[:n], totals[n : 2 * n], totals[2 * n : 3 * n]
        state.records_seen += int(totals[-3])
        state.records_failed += int(totals[-2])
        self.sums.zero_(), self.counts.zero_(), self.non_finite.zero_(), self.records.zero_()
        losses = {
            name: (float(step_sums[i] / step_counts[i]) if step_counts[i] > 0 else None)
            for i, name in enumerate(self.names)
        }
        not_finite = [name for i, name in enumerate(self.names) if step_non_finite[i] > 0]
        return losses, bool(totals[-1] > 0), not_finite


def train_loop(
    accelerator,
    model: torch.nn.Module,
    optimizer,
    scheduler,
    dataloader,
    state: TrainState,
    settings: LoopSettings | None = None,
    *,
    sampler=None,
    on_step: Callable[[TrainState, dict[str, Any]], None] | None = None,
) -> TrainState:
    """Trains until `state.completed_steps == state.total_steps`, resuming from `state` (epoch, micro-batches).
    On SIGTERM it saves a checkpoint at the end of the optimizer step and raises `TrainingStopped`
    (`stop_on_sigterm`).

    The model's output must have `loss` and may have `<name>_loss` for each of `settings.loss_names`.

    Args:
        accelerator: The run's `Accelerator`; `model`, `optimizer`, `scheduler` and `dataloader` are prepared by it.
        state: Where the stage is; updated in place and returned.
        settings: Logging, checkpoints, clipping, the failure budget and early stop (`LoopSettings()` if None).
        sampler: The sampler inside `dataloader`; its `set_epoch` (and the prepared loader's) is called at each
            epoch, so a resumed run walks each epoch in the order an uninterrupted one does.
        on_step: Called after each optimizer step with the state and that step's averaged losses.

    Returns:
        The final `state`.

    Raises:
        NonFiniteLossError: A step's loss (on any process) is NaN or infinite; nothing of that step is saved.
        TooManyFailedRecords: More records failed to load than `settings.max_failure_rate` allows.
        TrainingStopped: SIGTERM, or `settings.stop_after_global_step` reached.
    """
    from tqdm.auto import tqdm

    settings = settings or LoopSettings()
    progress = tqdm(
        total=state.total_steps,
        initial=state.completed_steps,
        desc=f"stage {state.stage_index + 1} ({state.stage_name})",
        disable=not accelerator.is_local_main_process,
        dynamic_ncols=True,
    )
    tally = _StepTally(["loss", *settings.loss_names], accelerator.device)
    epoch_batches = _epoch_batches(dataloader)
    model.train()
    try:
        with stop_on_sigterm():
            if state.completed_steps < state.total_steps:
                # A signal since the previous loop (a stage's final save, this stage's build): nothing to save.
                stop_if_sigterm_received(accelerator, f"run-wide step {state.global_step + 1}")
            while state.completed_steps < state.total_steps:
                _set_epoch(dataloader, sampler, state.epoch)
                loader = dataloader
                if state.batches_in_epoch:
                    loader = accelerator.skip_first_batches(dataloader, state.batches_in_epoch)
                for batch in loader:
                    scale = window_loss_scale(
                        state.batches_in_epoch + 1, epoch_batches, accelerator.gradient_accumulation_steps
                    )
                    _train_micro_batch(accelerator, model, optimizer, scheduler, batch, state, settings, tally, scale)
                    if not accelerator.sync_gradients:
                        continue
                    losses, stop_requested = _finish_step(accelerator, scheduler, state, settings, tally)
                    progress.update(1)
                    progress.set_postfix(loss=f"{losses['loss']:.3f}" if losses["loss"] is not None else "n/a")
                    if on_step is not None:
                        on_step(state, losses)
                    _checkpoint_or_stop(accelerator, state, settings, stop_requested)
                    if state.completed_steps >= state.total_steps:
                        break
                else:
                    state.epoch += 1
                    state.batches_in_epoch = 0
    except BaseException as error:
        # The frames of the error's traceback hold the loader's iterator, whose DataLoader workers ignore SIGTERM:
        # kept alive until the interpreter exits, they would block its final join forever. Cleared, the iterator
        # shuts its workers down now, as at the end of an epoch.
        traceback.clear_frames(error.__traceback__)
        raise
    finally:
        progress.close()
    _check_failures(state, settings.max_failure_rate, 0)
    return state


def _set_epoch(dataloader, sampler, epoch: int) -> None:
    """Puts the data order at `epoch`. A loader accelerate prepared sets its own epoch counter on the sampler each
    time it is iterated (overriding any earlier `sampler.set_epoch`); the counter starts at 0 and only advances when
    that same loader is exhausted, and `skip_first_batches` copies it into the loader it makes. So a resumed epoch,
    and every epoch after one walked through such a copy, would replay another epoch's order unless the loader's
    counter is set here, before the copy is made."""
    if hasattr(dataloader, "set_epoch"):
        dataloader.set_epoch(epoch)
    if sampler is not None and hasattr(sampler, "set_epoch"):
        sampler.set_epoch(epoch)


def _epoch_batches(dataloader) -> int | None:
    """Micro-batches per epoch of a loader accelerate prepared, where it ends the accumulation window at the end of
    the loader; None for a stream (used as it is: its windows run on across epochs, and its length is an estimate)."""
    from accelerate.data_loader import DataLoaderStateMixin

    if not isinstance(dataloader, DataLoaderStateMixin):
        return None
    if isinstance(getattr(dataloader, "dataset", None), torch.utils.data.IterableDataset):
        return None
    try:
        return len(dataloader)
    except TypeError:  # a sampler without a length
        return None


def window_loss_scale(position: int, epoch_batches: int | None, accumulation_steps: int) -> float:
    """The factor on the loss of the micro-batch at `position` (1-based) of an epoch of `epoch_batches`, so that
    every optimizer step applies the mean gradient of the micro-batches of its window.

    `accelerator.backward` divides each loss by `accumulation_steps`, and accelerate steps at the end of the loader
    whatever the window holds: the last window of an epoch whose length the steps do not divide would otherwise
    step with its mean scaled down by its size over `accumulation_steps`."""
    if accumulation_steps <= 1 or not epoch_batches:
        return 1.0
    start = (position - 1) // accumulation_steps * accumulation_steps
    size = min(accumulation_steps, epoch_batches - start)
    return accumulation_steps / size if 0 < size < accumulation_steps else 1.0


def _train_micro_batch(accelerator, model, optimizer, scheduler, batch, state, settings, tally, scale=1.0) -> None:
    """Forward and backward of one micro-batch; the optimizer steps when the accumulation is complete."""
    # A loader that accelerate did not prepare (a stream each process reads its own part of) is moved here.
    batch = {k: v.to(accelerator.device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}
    failed = batch.pop("num_failed_records", None)
    tally.add_records(next(iter(batch.values())).shape[0], failed)
    state.batches_in_epoch += 1
    weights = settings.loss_counts(batch) if settings.loss_counts is not None else {}
    with accelerator.accumulate(model):
        outputs = model(**batch, **(settings.model_kwargs or {}))
        accelerator.backward(outputs.loss * scale if scale != 1.0 else outputs.loss)
        if accelerator.sync_gradients and settings.max_grad_norm:
            accelerator.clip_grad_norm_(model.parameters(), settings.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
    tally.add_losses(outputs, weights)


def _finish_step(
    accelerator, scheduler, state: TrainState, settings: LoopSettings, tally
) -> tuple[dict[str, float | None], bool]:
    """Counts the optimizer step, checks its losses are finite and the failure budget, logs; returns the step's
    losses and whether a process got SIGTERM."""
    state.completed_steps += 1
    losses, stop_requested, not_finite = tally.reduce(accelerator, state)
    tally.non_finite_steps_in_a_row = tally.non_finite_steps_in_a_row + 1 if not_finite else 0
    # A gradient scaler (fp16) skips a step whose gradients are not finite, as a NaN loss's are, so one such step
    # leaves the weights as they were; without one, the optimizer would write NaN into every weight at once.
    allowed = NON_FINITE_STEPS_UNDER_SCALER if getattr(accelerator, "scaler", None) is not None else 1
    if tally.non_finite_steps_in_a_row >= allowed:
        _raise_non_finite(state, not_finite, tally.non_finite_steps_in_a_row)
    if settings.task_weights is not None:
        parts = [
            settings.task_weights.get(name, 1.0) * losses[name]
            for name in settings.loss_names
            if losses[name] is not None
        ]
        losses["loss"] = float(sum(parts)) if parts else None
    _check_failures(state, settings.max_failure_rate, settings.min_records_for_failure_check)
    if state.completed_steps % settings.logging_steps == 0 or state.completed_steps == state.total_steps:
        entry = {"step": state.global_step, "stage": state.stage_name, "lr": scheduler.get_last_lr()[0], **losses}
        state.history.append(entry)
        accelerator.log({f"train/{k}": v for k, v in entry.items() if isinstance(v, float)}, step=state.global_step)
    return losses, stop_requested


def _raise_non_finite(state: TrainState, names: list[str], steps_in_a_row: int) -> None:
    """Stops the run at a step whose loss is NaN or infinite, before it is logged or checkpointed.

    The loss itself is what is checked, not the gradients: under fp16, accelerate's gradient scaler meets infinite
    gradients by design, skips those steps and lowers its scale, while the loss stays finite. A loss that is not
    finite comes from the forward pass; the scaler skips its step too, so under fp16 the run stops only when that
    happens `NON_FINITE_STEPS_UNDER_SCALER` steps in a row, and at the first one otherwise."""
    tasks = [name for name in names if name != "loss"]
    which = f"the {', '.join(tasks)} loss{'es are' if len(tasks) > 1 else ' is'}" if tasks else "the loss is"
    streak = f" (the {steps_in_a_row}th step in a row)" if steps_in_a_row > 1 else ""
    raise NonFiniteLossError(
        f"{which} not finite (NaN or infinite) at run-wide step {state.global_step}{streak} of stage "
        f"{state.stage_name!r}: training diverged. Lower learning_rate, check the data for extreme values, and resume "
        "from the last checkpoint."
    )


def _checkpoint_or_stop(accelerator, state: TrainState, settings: LoopSettings, stop_requested: bool) -> None:
    """Saves a checkpoint every `checkpointing_steps` and, on SIGTERM, one at this step before stopping (at a
    stage's last step the stage ends as usual, and the next loop stops before it starts)."""
    unfinished = state.completed_steps < state.total_steps
    due = bool(settings.checkpointing_steps) and state.completed_steps % settings.checkpointing_steps == 0
    if stop_requested and unfinished:
        logger.warning(f"SIGTERM: stopping after run-wide step {state.global_step}, with a checkpoint of it.")
    saved = None
    if settings.checkpoint_dir is not None and unfinished and (due or stop_requested):
        saved = save_checkpoint(accelerator, settings.checkpoint_dir, state, settings.save_total_limit)
    if stop_requested and unfinished:
        _SIGTERM_RECEIVED.clear()  # answered
        what = f"checkpoint {saved} saved" if saved is not None else "no checkpoint_dir: nothing saved"
        raise TrainingStopped(f"stopped on SIGTERM after run-wide step {state.global_step} ({what})")
    if settings.stop_after_global_step is not None and state.global_step >= settings.stop_after_global_step:
        raise TrainingStopped(f"stopped after run-wide step {state.global_step} as asked")


def pretraining_loss_counts(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Targets behind each pretraining loss in a collated batch: the positions the model computes its losses at
    (`pretraining_targets`, which leaves out the targets of negatives), so the counts match the losses."""
    text_targets, region_targets = pretraining_targets(
        batch.get("itm_labels"), batch["labels"], batch["masked_regions"], batch.get("region_attention_mask")
    )
    counts = {
        "mlm": text_targets.sum(),
        "mrfr": region_targets.sum(),
        "itm": torch.tensor(batch["labels"].shape[0]),
        "moc": region_targets.sum(),
    }
    if "region_class_labels" in batch and "region_class_probs" not in batch:
        counts["moc"] = (region_targets & (batch["region_class_labels"] != IGNORE_INDEX)).sum()
    return {name: value.float() for name, value in counts.items()}


def _check_failures(state: TrainState, max_failure_rate: float, min_records: int) -> None:
    if state.records_failed == 0 or state.records_seen < max(min_records, 1):
        return
    rate = state.records_failed / state.records_seen
    if rate > max_failure_rate:
        raise TooManyFailedRecords(
            f"{state.records_failed} of {state.records_seen} records ({rate:.1%}) failed to load in stage "
            f"{state.stage_name!r}, above max_failure_rate={max_failure_rate:.1%}; check the sources and the region "
            "cache (the warnings above name the first failures), or raise max_failure_rate."
        )


__all__ = [
    "LoopSettings",
    "NonFiniteLossError",
    "TooManyFailedRecords",
    "TrainingStopped",
    "build_accelerator",
    "describe_accelerator",
    "build_optimizer",
    "build_scheduler",
    "ignore_sigterm",
    "pretraining_loss_counts",
    "steps_per_epoch",
    "stop_if_sigterm_received",
    "stop_on_sigterm",
    "train_loop",
]
