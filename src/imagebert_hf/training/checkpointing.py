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
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from transformers.utils import logging as transformers_logging

from ..formats.files import atomic_write_json, publish_folder, publish_folder_keeping_others, read_json_file
from ..models.imagebert.configuration_imagebert import check_field


logger = transformers_logging.get_logger(__name__)

STATE_FILE = "trainer_state.json"
COMPLETE_FILE = "stage_complete.json"
_PREFIX = "step_"
_NAME = re.compile(rf"^{_PREFIX}(\d+)$")
_TMP_PREFIX = ".tmp-"
# The files `accelerator.save_state` wrote into a checkpoint, listed beside them by the run that saved it: which files
# a checkpoint must hold depends on that run (the gradient scaler's only under fp16), so a missing one is damage only
# when the list names it.
FILES_RECORD = "checkpoint_files.json"
# accelerate's name for the gradient scaler's state (fp16 on an accelerator).
SCALER_FILE = "scaler.pt"
# What ends every message about a damaged checkpoint: the newest checkpoints can go, the run resumes from an older one.
DAMAGED_ADVICE = "delete the checkpoint folder to resume from the one before"


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
        num_processes: Processes of the run that saved the state, which with the batch size makes the global batch
            and sets how far the learning-rate schedule moves per step; None in a state an earlier version saved.
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
    num_processes: int | None = None
    history: list[dict[str, Any]] = field(default_factory=list)

    @property
    def global_step(self) -> int:
        return self.global_step_offset + self.completed_steps

    def save(self, folder: str | Path) -> None:
        atomic_write_json(Path(folder) / STATE_FILE, dataclasses.asdict(self), indent=1)

    @classmethod
    def load(cls, folder: str | Path) -> TrainState:
        """Reads `folder/trainer_state.json`, as `save` writes it.

        Raises:
            OSError: The file cannot be read.
            ValueError: It is not JSON, or not what `save` writes: a key missing or unknown, a count that is not an
                integer >= 0, more failed records than records seen, a history that is not a list of objects. The
                message names the file. A state without `num_processes` (saved by an earlier version) loads with
                None there.
        """
        path = Path(folder) / STATE_FILE
        data = read_json_file(path, "the training state saved with a checkpoint or a stage's final model")
        try:
            _check_state_fields(cls, data)
        except (TypeError, ValueError) as error:
            raise ValueError(f"{path} is not a training state: {error}") from None
        return cls(**data)


# Keys a state saved by an earlier version lacks: such a state loads with None there (unknown).
_KEYS_ADDED_LATER = ("num_processes",)


def _check_state_fields(cls, data) -> None:
    names = [f.name for f in dataclasses.fields(cls)]
    if not isinstance(data, dict):
        raise TypeError(f"expected a JSON object with the keys {', '.join(names)}; got {type(data).__name__}.")
    missing = [name for name in names if name not in data and name not in _KEYS_ADDED_LATER]
    unknown = [key for key in data if key not in names]
    if missing or unknown:
        which = f"key {missing[0]!r} is missing" if missing else f"key {unknown[0]!r} is unknown"
        raise ValueError(f"{which}; expected the keys {', '.join(names)}.")
    if not isinstance(data["stage_name"], str):
        raise TypeError(f"stage_name must be a string, got {data['stage_name']!r}.")
    for name in _KEYS_ADDED_LATER:
        data.setdefault(name, None)
    if data["num_processes"] is not None:
        check_field("num_processes", data["num_processes"], "int", 1, None)
    for name in names:
        if name not in ("stage_name", "history", "num_processes"):
            check_field(name, data[name], "int", 0, None)
    if data["records_failed"] > data["records_seen"]:
        raise ValueError(
            f"records_failed ({data['records_failed']}) must be <= records_seen ({data['records_seen']})."
        )
    history = data["history"]
    if not isinstance(history, list) or not all(isinstance(entry, dict) for entry in history):
        raise TypeError(f"history must be a list of objects, got {json.dumps(history)[:80]}.")


def checkpoint_name(step: int) -> str:
    return f"{_PREFIX}{step:08d}"


def list_checkpoints(root: str | Path) -> list[Path]:
    """Complete checkpoints under `root`, oldest first (half-written ones are never listed)."""
    return _scan_checkpoints(root)[0]


def latest_checkpoint(root: str | Path, warn: bool = False) -> Path | None:
    """The newest complete checkpoint under `root`, or None.

    Args:
        warn: Log a warning for each entry skipped that would otherwise be resumed from: a `step_N` newer than the
            checkpoint returned that is not a folder or has no readable `trainer_state.json`, and a `step_*` entry
            whose name is not `step_` and a number.
    """
    checkpoints, skipped = _scan_checkpoints(root)
    newest = checkpoints[-1] if checkpoints else None
    if warn:
        for path, step, reason in skipped:
            if step is None or newest is None or step > _checkpoint_step(newest):
                fallback = f"resuming from {newest.name}" if newest is not None else "starting the stage afresh"
                logger.warning(f"skipping checkpoint {path}: {reason}; {fallback}.")
    return newest


def _checkpoint_step(path: Path) -> int:
    return int(_NAME.match(path.name).group(1))


def _scan_checkpoints(root: str | Path) -> tuple[list[Path], list[tuple[Path, int | None, str]]]:
    """The complete checkpoints under `root`, oldest first, and the entries that look like checkpoints but are not:
    `(path, step or None, why)`."""
    root = Path(root)
    if not root.is_dir():
        return [], []
    found, skipped = [], []
    for path in root.iterdir():
        if not path.name.startswith(_PREFIX):
            continue
        match = _NAME.match(path.name)
        step = int(match.group(1)) if match else None
        state = path / STATE_FILE
        if match is None:
            skipped.append((path, None, f"its name is not {_PREFIX} followed by a number"))
        elif not path.is_dir():
            why = "a link to a missing folder" if path.is_symlink() and not path.exists() else "not a folder"
            skipped.append((path, step, f"it is {why}"))
        elif not state.is_file():
            why = "a link to a missing file" if state.is_symlink() and not state.exists() else "missing"
            skipped.append((path, step, f"its {STATE_FILE} is {why}"))
        else:
            found.append(path)
    return sorted(found, key=_checkpoint_step), skipped


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
        save_total_limit: Keep only this many checkpoints: this one and the newest of the older ones (None keeps
            all). A checkpoint with a higher step than this one is left alone.

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
        saved = sorted(path.name for path in tmp.iterdir())
        atomic_write_json(tmp / FILES_RECORD, {"files": saved}, indent=1)
        state.save(tmp)
        publish_folder(tmp, final)
        if save_total_limit is not None and save_total_limit > 0:
            # Only checkpoints older than this one count against the limit: one with a higher step is not of this
            # run's past, and pruning by step number would otherwise delete the checkpoint just written.
            older = [path for path in list_checkpoints(root) if _checkpoint_step(path) < state.completed_steps]
            for old in older[: max(len(older) - (save_total_limit - 1), 0)]:
                shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(
    accelerator, checkpoint: str | Path, check: Callable[[TrainState], None] | None = None
) -> TrainState:
    """Restores the accelerate state saved by `save_checkpoint` and returns its `TrainState`.

    Args:
        check: Called with the checkpoint's `TrainState` before anything is restored; raises to refuse it.

    Raises:
        ValueError: A file of the checkpoint is damaged or missing (its `trainer_state.json` and random states
            are checked before anything is restored), its model weights do not fit the model or hold NaN or
            infinite values, or its optimizer state holds other parameters than the run's optimizer; the message
            names the file or the checkpoint. A missing random-state file is not an error: the process
            resumes with fresh random streams, with a warning. Nor is a missing gradient scaler under fp16 when the
            checkpoint was saved without one (`FILES_RECORD`): the scaler starts afresh, with a warning.
    """
    checkpoint = Path(checkpoint)
    try:
        state = TrainState.load(checkpoint)
    except ValueError as error:
        raise ValueError(f"{error} The checkpoint is damaged: {DAMAGED_ADVICE}.") from None
    if check is not None:
        check(state)
    _check_random_states(checkpoint, accelerator.process_index)
    scaler = getattr(accelerator, "scaler", None)
    fresh_scaler = scaler is not None and _saved_without_scaler(checkpoint)
    try:
        # accelerate restores the scaler whenever the run has one; this checkpoint holds none to restore.
        if fresh_scaler:
            accelerator.scaler = None
        accelerator.load_state(str(checkpoint))
    except FileNotFoundError as error:
        name = _missing_file_name(Path(error.filename or ""), checkpoint)
        raise ValueError(f"checkpoint {checkpoint}: {name} is missing; {DAMAGED_ADVICE}.") from error
    except Exception as error:
        # accelerate's errors for a damaged file (torch's reader, the unpickler, safetensors) name no file: find it.
        damaged = _first_unreadable_file(checkpoint)
        if damaged is not None:
            path, detail = damaged
            raise ValueError(
                f"checkpoint {checkpoint}: {path.name} is damaged ({detail}); {DAMAGED_ADVICE}."
            ) from error
        # The prepared models, as accelerate restores them (file `model_i` into the i-th): no public accessor.
        misfit = _first_misfit_model_file(checkpoint, accelerator._models)
        if misfit is None and isinstance(error, ValueError) and "parameter group" in str(error):
            # torch's optimizer refuses a state whose parameter groups hold other counts of parameters.
            raise ValueError(
                f"checkpoint {checkpoint}: its optimizer state trains other parameters than this run does ({error}): "
                "the run that saved it left other parts of the model frozen or trainable (an earlier version of "
                "this package also kept the projection heads of a --contrastive_weight 0 run in the optimizer). "
                "Resume it with the version and flags that saved it, or start the run again in a new output folder."
            ) from error
        if misfit is None:
            raise
        path, detail = misfit
        if detail == "it holds 'cls.predictions.bias', which the model does not have":
            # Not damage: the untied MLM head lost a parameter it never used, and the saved optimizer holds it too.
            raise ValueError(
                f"checkpoint {checkpoint} was saved by an earlier version, whose untied MLM head "
                "(tie_word_embeddings=False) kept an unused cls.predictions.bias that this version's head no longer "
                "has, so its training state cannot be restored here. Resume it with the version that saved it, or "
                "start the stage again from the model it started from; the checkpoint itself is sound."
            ) from error
        raise ValueError(
            f"checkpoint {checkpoint}: {path.name} does not fit the model ({detail}); {DAMAGED_ADVICE}."
        ) from error
    finally:
        if fresh_scaler:
            accelerator.scaler = scaler
    non_finite = _first_non_finite_weight(checkpoint)
    if non_finite is not None:
        path, name = non_finite
        raise ValueError(
            f"checkpoint {checkpoint}: {path.name} holds NaN or infinite values in {name!r} (the run had diverged "
            f"when it was saved); {DAMAGED_ADVICE}, and lower learning_rate."
        )
    return state


def _saved_without_scaler(checkpoint: Path) -> bool:
    """Whether `checkpoint`, lacking the gradient scaler a run under fp16 restores, was saved by a run that had none
    (without fp16): the model and optimizer states are the same in every precision, so the run resumes with a fresh
    scaler, and a warning naming `--mixed_precision` is logged here. A checkpoint whose `FILES_RECORD` names the
    scaler's file lost it (False: refused as damaged when it is loaded); one without the record (saved by an earlier
    version) is taken as saved without fp16, whose checkpoints never hold it.

    Raises:
        ValueError: The record does not read, or is not a list of file names.
    """
    if (checkpoint / SCALER_FILE).exists():
        return False
    record = checkpoint / FILES_RECORD
    recorded = None
    if record.exists():
        try:
            data = read_json_file(record, "the files of the checkpoint, as {'files': [names]}")
            recorded = data.get("files") if isinstance(data, dict) else None
            if not isinstance(recorded, list) or not all(isinstance(name, str) for name in recorded):
                raise ValueError(f"{record} is not {{'files': [names]}}: got {json.dumps(data)[:80]}.")
        except (OSError, ValueError) as error:
            raise ValueError(f"{error} The checkpoint is damaged: {DAMAGED_ADVICE}.") from None
        if SCALER_FILE in recorded:
            return False
    taken = "" if recorded is not None else " (an earlier version's checkpoint lists no files: taken to be)"
    logger.warning(
        f"checkpoint {checkpoint} has no {SCALER_FILE}: it was saved without fp16 mixed precision{taken}, and this "
        "run's fp16 (--mixed_precision or the launch config) resumes it with a fresh gradient scaler, which finds its "
        "scale within a few steps; the model and optimizer states are the same in every precision."
    )
    return True


def _missing_file_name(path: Path, checkpoint: Path) -> str:
    """The name of the file accelerate did not find. For model weights it falls back from `model.safetensors` to
    `pytorch_model.bin` and names the fallback; a checkpoint holding no `.bin` weights was written with safetensors,
    so the safetensors name is the one to report."""
    fallback = re.fullmatch(r"pytorch_model(_\d+)?\.bin", path.name)
    if fallback and not any(checkpoint.glob("pytorch_model*.bin")):
        return f"model{fallback.group(1) or ''}.safetensors"
    return path.name or "a file"


def _first_unreadable_file(checkpoint: Path) -> tuple[Path, str] | None:
    """The first file of `checkpoint`, in the order accelerate restores them, that does not read, with why."""
    from safetensors.torch import load_file

    order = ("model", "optimizer", "scheduler")
    files = [path for path in checkpoint.iterdir() if path.suffix in (".safetensors", ".bin", ".pt")]
    files.sort(key=lambda path: (next((i for i, n in enumerate(order) if path.name.startswith(n)), 3), path.name))
    for path in files:
        try:
            if path.suffix == ".safetensors":
                load_file(path)
            else:
                _load_weights_only(path, map_location="cpu")
        except Exception as error:  # noqa: BLE001 - any failure to read it means the same to the user
            return path, _load_error_detail(error)
    return None


def _model_weight_files(checkpoint: Path, index: int) -> list[Path]:
    """The files accelerate restores model `index` from: `model[_i].safetensors`, else `pytorch_model[_i].bin`."""
    ending = f"_{index}" if index > 0 else ""
    safetensors = checkpoint / f"model{ending}.safetensors"
    return [safetensors] if safetensors.is_file() else [checkpoint / f"pytorch_model{ending}.bin"]


def _first_misfit_model_file(checkpoint: Path, models) -> tuple[Path, str] | None:
    """The first model file of `checkpoint` that reads but does not fit its model, with the first key missing from
    it, the first key the model lacks, or the first shape that differs. Tensors the model shares (a tied decoder)
    are saved once, so one of their names may be absent."""
    from safetensors import safe_open

    for index, model in enumerate(models):
        path = _model_weight_files(checkpoint, index)[0]
        if path.suffix == ".safetensors":
            with safe_open(path, framework="pt") as handle:
                saved = {name: tuple(handle.get_slice(name).get_shape()) for name in handle.keys()}  # noqa: SIM118
        elif path.is_file():
            saved = {name: tuple(tensor.shape) for name, tensor in _load_weights_only(path, "cpu").items()}
        else:
            continue
        expected = model.state_dict()
        storages: dict[int, list[str]] = {}
        for name, tensor in expected.items():
            storages.setdefault(tensor.untyped_storage().data_ptr(), []).append(name)
        for name, tensor in expected.items():
            if name not in saved:
                if not any(alias in saved for alias in storages[tensor.untyped_storage().data_ptr()]):
                    return path, f"the model's {name!r} is missing"
            elif saved[name] != tuple(tensor.shape):
                return path, f"{name!r} has shape {list(saved[name])}, the model's {list(tensor.shape)}"
        unexpected = [name for name in saved if name not in expected]
        if unexpected:
            return path, f"it holds {unexpected[0]!r}, which the model does not have"
    return None


def _first_non_finite_weight(checkpoint: Path) -> tuple[Path, str] | None:
    """The first model file of `checkpoint` holding a NaN or infinite value, with the first tensor that does; read
    from the files, so every process finds the same whatever part of the model it holds."""
    import torch
    from safetensors import safe_open

    index = 0
    while (path := _model_weight_files(checkpoint, index)[0]).is_file():
        if path.suffix == ".safetensors":
            with safe_open(path, framework="pt") as handle:
                for name in handle.keys():  # noqa: SIM118 - a safetensors handle is not a mapping
                    tensor = handle.get_tensor(name)
                    if tensor.is_floating_point() and not torch.isfinite(tensor).all():
                        return path, name
        else:
            for name, tensor in _load_weights_only(path, "cpu").items():
                if torch.is_tensor(tensor) and tensor.is_floating_point() and not torch.isfinite(tensor).all():
                    return path, name
        index += 1
    return None


def _check_random_states(checkpoint: Path, process_index: int) -> None:
    """Raises if this process's random-state file is there but cannot be read as accelerate reads it (weights only).

    accelerate skips such a file without a word, and the run would then go on with other random streams than the
    checkpoint's: a resumed run that is silently not the run it continues. Its format is a pickle, so a tampered
    file is refused here, never executed.
    """
    path = checkpoint / f"random_states_{process_index}.pkl"
    if not path.exists():
        logger.warning(
            f"checkpoint {checkpoint} has no {path.name}: process {process_index} resumes with fresh random streams, "
            "so the run will not repeat the uninterrupted one (masking, negatives and dropout differ)."
        )
        return
    try:
        _load_weights_only(path)
    except Exception as error:  # noqa: BLE001 - any failure to read it means the same to the user
        raise ValueError(
            f"{path}: this checkpoint's random-state file does not load as tensors and plain values "
            f"({_load_error_detail(error)}); resuming would silently change the run's random streams. "
            "Delete the file to resume with fresh random streams."
        ) from error


def _load_error_detail(error: Exception) -> str:
    """`error`'s type and its telling sentence, at most 200 characters: torch's weights-only message opens with
    advice to drop the guard (never for a file we did not write); what follows "WeightsUnpickler error:" (on its
    line or the next), or else the line after that advice, says what was refused."""
    text = str(error)
    if "WeightsUnpickler error" in text:
        text = text.split("WeightsUnpickler error", 1)[1].lstrip(" :")
    elif text.startswith("Weights only load failed"):
        text = text.split("\n", 1)[-1]
    detail = next((line.strip() for line in text.splitlines() if line.strip()), "")
    detail = detail.split(". ")[0][:200]  # torch's reader goes on with several sentences of advice
    return f"{type(error).__name__}: {detail}" if detail else type(error).__name__


def _load_weights_only(path: Path, map_location=None):
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
        return torch.load(path, map_location=map_location, weights_only=True)
    with torch.serialization.safe_globals(allowed):
        return torch.load(path, map_location=map_location, weights_only=True)


# What `save_pretrained` writes or, when it is stale, removes: a new save drops these from the folder when it lacks
# them (an old shard, an index for a layout no longer used); any other file there (a tokenizer, logs) is kept.
_MODEL_FILE = re.compile(
    r"^(config\.json|generation_config\.json|(model|pytorch_model)(-\d{5}-of-\d{5})?\.(safetensors|bin)"
    r"(\.index\.json)?)$"
)


def published_module(accelerator, model, submodule: str | None = None):
    """The module a save of the prepared `model` writes: the unwrapped model, or its attribute `submodule` (a
    training wrapper around the model to publish).

    Raises:
        ValueError: `submodule` is not an attribute of the model with `save_pretrained`.
    """
    target = accelerator.unwrap_model(model)
    if submodule is None:
        return target
    inner = getattr(target, submodule, None) if isinstance(submodule, str) else None
    if not hasattr(inner, "save_pretrained"):
        raise ValueError(
            f"save_model: submodule {submodule!r} is not an attribute of {type(target).__name__} with "
            f"save_pretrained; got {type(inner).__name__}."
        )
    return inner


def save_model(
    accelerator, model, folder: str | Path, submodule: str | None = None, leave_out: Sequence[str] = ()
) -> None:
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
        leave_out: Modules (names in the saved model) whose weights are not saved, such as heads nothing trained:
            a later load then reports them missing, as in the checkpoint they came from.

    Raises:
        ValueError: `folder` is an existing file, `submodule` is not an attribute of the model with
            `save_pretrained` (checked on every process before anything is written).
    """
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"save_model: folder {str(folder)!r} is an existing file, expected a folder.")
    target = published_module(accelerator, model, submodule)
    state_dict = accelerator.get_state_dict(model)
    if submodule is not None:
        prefix = submodule + "."
        state_dict = {k[len(prefix) :]: v for k, v in (state_dict or {}).items() if k.startswith(prefix)}
    if leave_out and state_dict is not None:
        prefixes = tuple(name + "." for name in leave_out)
        state_dict = {key: value for key, value in state_dict.items() if not key.startswith(prefixes)}
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
    "FILES_RECORD",
    "SCALER_FILE",
    "STATE_FILE",
    "TrainState",
    "latest_checkpoint",
    "list_checkpoints",
    "load_checkpoint",
    "published_module",
    "remove_partial_checkpoints",
    "save_checkpoint",
    "save_model",
]
