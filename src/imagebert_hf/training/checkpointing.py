"""Crash-safe checkpoints: the training state is written to a hidden folder and renamed into place.

A rename is atomic on one filesystem, so a reader sees either the previous checkpoint or the complete new one; a
folder left half-written by a kill keeps its hidden name and is ignored (and cleaned up) by the next run.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..formats.files import atomic_write_json, publish_folder, publish_folder_keeping_others


STATE_FILE = "trainer_state.json"
COMPLETE_FILE = "stage_complete.json"
_PREFIX = "step_"
_TMP_PREFIX = ".tmp-"


@dataclass
class TrainState:
    """Where a stage is: what resuming needs beyond the accelerate state, and the loss history for the plot.

    Attributes:
        stage_index: Position of the stage in the recipe (0-based).
        stage_name: Its name.
        completed_steps: Optimizer steps done in this stage.
        total_steps: Optimizer steps this stage runs.
        epoch: Current epoch of the stage's sampler.
        batches_in_epoch: Micro-batches of the current epoch already consumed (skipped on resume).
        global_step_offset: Optimizer steps of the earlier stages, for run-wide step numbers.
        records_seen: Records requested from the data so far (this stage, all processes).
        records_failed: Of those, records that failed to load.
        history: One dict per logged step: `step` (run-wide), `stage`, `lr`, `loss` and each task's loss.
    """

    stage_index: int = 0
    stage_name: str = ""
    completed_steps: int = 0
    total_steps: int = 0
    epoch: int = 0
    batches_in_epoch: int = 0
    global_step_offset: int = 0
    records_seen: int = 0
    records_failed: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)

    @property
    def global_step(self) -> int:
        return self.global_step_offset + self.completed_steps

    def save(self, folder: str | Path) -> None:
        atomic_write_json(Path(folder) / STATE_FILE, dataclasses.asdict(self), indent=1)

    @classmethod
    def load(cls, folder: str | Path) -> TrainState:
        with open(Path(folder) / STATE_FILE, encoding="utf-8") as handle:
            return cls(**json.load(handle))


def checkpoint_name(step: int) -> str:
    return f"{_PREFIX}{step:08d}"


def list_checkpoints(root: str | Path) -> list[Path]:
    """Complete checkpoints under `root`, oldest first (half-written ones are never listed)."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [
        path
        for path in root.iterdir()
        if path.is_dir() and path.name.startswith(_PREFIX) and (path / STATE_FILE).is_file()
    ]
    return sorted(found, key=lambda path: int(path.name[len(_PREFIX) :]))


def latest_checkpoint(root: str | Path) -> Path | None:
    """The newest complete checkpoint under `root`, or None."""
    checkpoints = list_checkpoints(root)
    return checkpoints[-1] if checkpoints else None


def remove_partial_checkpoints(root: str | Path) -> None:
    root = Path(root)
    if root.is_dir():
        for path in root.iterdir():
            if path.name.startswith(_TMP_PREFIX):
                shutil.rmtree(path, ignore_errors=True)


def save_checkpoint(accelerator, root: str | Path, state: TrainState, save_total_limit: int | None = None) -> Path:
    """Saves `accelerator.save_state` plus `state` as `root/step_NNNNNNNN`, atomically. Call on every process.

    Args:
        accelerator: The run's `Accelerator` (model, optimizer, scheduler and RNG states are saved).
        root: The stage's checkpoint folder.
        state: The stage's `TrainState`.
        save_total_limit: Keep only this many newest checkpoints (None keeps all).

    Returns:
        The checkpoint's final path.
    """
    root = Path(root)
    final = root / checkpoint_name(state.completed_steps)
    tmp = root / f"{_TMP_PREFIX}{final.name}"
    if accelerator.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    # The MLM decoder is tied to the word embeddings, so safetensors stores it once and accelerate warns about the
    # "removed shared tensor" at every checkpoint; loading re-ties it (resumption is tested bit-exact).
    accelerate_logger = logging.getLogger("accelerate.utils.other")
    level = accelerate_logger.level
    accelerate_logger.setLevel(logging.ERROR)
    try:
        accelerator.save_state(str(tmp))
    finally:
        accelerate_logger.setLevel(level)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        state.save(tmp)
        publish_folder(tmp, final)
        if save_total_limit is not None and save_total_limit > 0:
            for old in list_checkpoints(root)[:-save_total_limit]:
                shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(accelerator, checkpoint: str | Path) -> TrainState:
    """Restores the accelerate state saved by `save_checkpoint` and returns its `TrainState`."""
    _check_random_states(Path(checkpoint), accelerator.process_index)
    accelerator.load_state(str(checkpoint))
    return TrainState.load(checkpoint)


def _check_random_states(checkpoint: Path, process_index: int) -> None:
    """Raises if this process's random-state file is there but cannot be read as accelerate reads it (weights only).

    accelerate skips such a file without a word, and the run would then go on with other random streams than the
    checkpoint's: a resumed run that is silently not the run it continues. Its format is a pickle, so a tampered
    file is refused here, never executed.
    """
    path = checkpoint / f"random_states_{process_index}.pkl"
    if not path.is_file():
        return
    try:
        _load_weights_only(path)
    except Exception as error:  # noqa: BLE001 - any failure to read it means the same to the user
        # torch's message opens with advice to drop the weights-only guard (never for a file we did not write);
        # the line after "WeightsUnpickler error" says what was refused.
        lines = [line.strip() for line in str(error).splitlines() if line.strip()]
        marker = next((i for i, line in enumerate(lines) if "WeightsUnpickler error" in line), None)
        detail = lines[marker + 1] if marker is not None and marker + 1 < len(lines) else (lines or [""])[0]
        raise ValueError(
            f"{path}: this checkpoint's random-state file does not load as tensors and plain values "
            f"({type(error).__name__}: {detail[:200]}); resuming would silently change the run's random streams. "
            "Delete the file to resume with fresh random streams."
        ) from error


def _load_weights_only(path: Path):
    """`torch.load(path, weights_only=True)` with numpy's arrays and dtypes allowed: what accelerate's RNG files hold.
    Read here rather than through accelerate, whose 1.0 release unpickles them fully."""
    import codecs

    import numpy as np
    import torch

    multiarray = getattr(np, "_core", None) or np.core
    allowed = [multiarray.multiarray._reconstruct, np.ndarray, np.dtype, codecs.encode]
    allowed += [np.dtypes.UInt32DType] if hasattr(np, "dtypes") else []
    if not hasattr(torch.serialization, "safe_globals"):  # torch 2.4 has only the process-wide registry
        torch.serialization.add_safe_globals(allowed)
        return torch.load(path, weights_only=True)
    with torch.serialization.safe_globals(allowed):
        return torch.load(path, weights_only=True)


# What `save_pretrained` writes or, when it is stale, removes: a new save drops these from the folder when it lacks
# them (an old shard, an index for a layout no longer used); any other file there (a tokenizer, logs) is kept.
_MODEL_FILE = re.compile(
    r"^(config\.json|generation_config\.json|(model|pytorch_model)(-\d{5}-of-\d{5})?\.(safetensors|bin)"
    r"(\.index\.json)?)$"
)


def save_model(accelerator, model, folder: str | Path, submodule: str | None = None) -> None:
    """`save_pretrained` of a prepared model into `folder`, correct when its parameters are sharded, and atomic.
    Call on every process.

    The full state dict is gathered with `accelerator.get_state_dict` (a collective under FSDP and DeepSpeed
    ZeRO-3; a plain `state_dict()` under DDP). The model is written to a hidden sibling of `folder`
    (`.NAME.tmp-save`), which then replaces `folder` in one rename: the files of the model's earlier save there are
    replaced or dropped, every other file of the folder is kept (hard-linked into the new folder). A save that fails
    or is killed leaves `folder` as it was.

    Args:
        accelerator: The run's `Accelerator`.
        model: The prepared model.
        folder: Where to write (`config.json`, `model.safetensors`).
        submodule: Save only this attribute of the unwrapped model (its keys lose the `submodule.` prefix), for a
            training wrapper around the model to publish.

    Raises:
        ValueError: `folder` is an existing file, `submodule` is not an attribute of the model with
            `save_pretrained` (checked on every process before anything is written).
    """
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"save_model: folder {str(folder)!r} is an existing file, expected a folder.")
    target = accelerator.unwrap_model(model)
    if submodule is not None:
        inner = getattr(target, submodule, None) if isinstance(submodule, str) else None
        if not hasattr(inner, "save_pretrained"):
            raise ValueError(
                f"save_model: submodule {submodule!r} is not an attribute of {type(target).__name__} with "
                f"save_pretrained; got {type(inner).__name__}."
            )
        target = inner
    state_dict = accelerator.get_state_dict(model)
    if submodule is not None:
        prefix = submodule + "."
        state_dict = {k[len(prefix) :]: v for k, v in (state_dict or {}).items() if k.startswith(prefix)}
    tmp = folder.with_name(f".{folder.name}.tmp-save")
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        folder.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    try:
        target.save_pretrained(
            tmp, is_main_process=accelerator.is_main_process, state_dict=state_dict, save_function=accelerator.save
        )
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            publish_folder_keeping_others(tmp, folder, owned=lambda name: bool(_MODEL_FILE.match(name)))
    except BaseException:
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    accelerator.wait_for_everyone()


__all__ = [
    "COMPLETE_FILE",
    "STATE_FILE",
    "TrainState",
    "latest_checkpoint",
    "list_checkpoints",
    "load_checkpoint",
    "remove_partial_checkpoints",
    "save_checkpoint",
    "save_model",
]
