"""What keeps a resumed run the run it continues: fine-tuning refuses to resume with flags that decide weights or
data other than the run's, a new run into a folder holding another's checkpoints, a schedule the loop cannot step;
a finished fine-tuning resumed is evaluated, not trained again; a checkpoint saved by another number of processes is
refused; pruning never deletes the checkpoint just saved; and a model saved in bf16 is fine-tuned in float32."""

import json
import logging
import re

import pytest
import torch
from transformers.testing_utils import CaptureLogger

from imagebert_hf import ImageBERTConfig, ImageBERTForImageTextRetrieval
from imagebert_hf.data.synthetic import make_synthetic_tokenizer
from imagebert_hf.training import build_accelerator, runner
from imagebert_hf.training.arguments import RetrievalArguments
from imagebert_hf.training.checkpointing import STATE_FILE, TrainState, list_checkpoints, save_checkpoint
from imagebert_hf.training.retrieval_finetuning import RUN_ARGS_FILE, check_flags, load_model_and_tokenizer

from .test_checkpoint_inputs import NEWEST, _copy, _edit_state, _resume, trained  # noqa: F401 - trained: a fixture
from .test_run_level_inputs import folder_snapshot, retrieval_flags, run_script
from .testing_utils import tiny_config_kwargs


# Tiny models gain nothing from threads, and extra threads crawl when the CI cores are shared.
pytestmark = pytest.mark.usefixtures("one_thread")


def _stopped_run(output_dir, monkeypatch, *flags: str) -> list[str]:
    """Fine-tunes into `output_dir` and stops after step 1, with a checkpoint there; returns the run's flags."""
    run_flags = [*retrieval_flags(output_dir), "--checkpointing_steps", "1", "--eval_images", "0", *flags]
    stop = run_script("run_retrieval", [*run_flags, "--stop_after_steps", "1"], monkeypatch)
    assert isinstance(stop, SystemExit) and stop.code == 3
    return run_flags


# ------------------------------------------------------------------------------------- flags of a resumed run


def test_resuming_with_flags_that_change_the_run_is_refused_naming_each(tmp_path, monkeypatch):
    output_dir = tmp_path / "run"
    flags = _stopped_run(output_dir, monkeypatch)
    before = folder_snapshot(output_dir)
    other = ["--learning_rate", "0.05", "--seed", "7", "--loss_weights", "triplet=1"]
    stop = run_script("run_retrieval", [*flags, *other, "--per_device_train_batch_size", "4", "--resume"], monkeypatch)
    assert isinstance(stop, SystemExit)
    assert str(stop.code) == (
        f"run_retrieval: error: --resume: {output_dir} holds a run started with other flags: loss_weights is "
        "'binary=1' there, 'triplet=1' now; seed is 42 there, 7 now; per_device_train_batch_size is 8 there, 4 now; "
        f"learning_rate is 5e-05 there, 0.05 now. Resume with the flags it was started with "
        f"({output_dir / RUN_ARGS_FILE}), or give a new --output_dir."
    )
    assert folder_snapshot(output_dir) == before
    # How the run is logged, checkpointed and evaluated may change.
    resumable = ["--logging_steps", "2", "--save_total_limit", "3", "--eval_images", "4", "--resume"]
    namespace = run_script("run_retrieval", [*flags, *resumable], monkeypatch)
    assert not isinstance(namespace, SystemExit), namespace.code
    assert (output_dir / "final" / "model.safetensors").is_file() and (output_dir / "eval_results.json").is_file()


def test_a_run_folder_without_its_flags_resumes_with_a_warning(tmp_path, monkeypatch, caplog):
    # A run started by an earlier version has no run_args.json: nothing to compare with.
    output_dir = tmp_path / "run"
    flags = _stopped_run(output_dir, monkeypatch)
    (output_dir / RUN_ARGS_FILE).unlink()
    with caplog.at_level(logging.WARNING, logger="imagebert_hf.training.retrieval_finetuning"):
        namespace = run_script("run_retrieval", [*flags, "--learning_rate", "0.05", "--resume"], monkeypatch)
    assert not isinstance(namespace, SystemExit), namespace.code
    assert [r.getMessage() for r in caplog.records if RUN_ARGS_FILE in r.getMessage()] == [
        f"--resume: {output_dir} has no {RUN_ARGS_FILE} (a run started by an earlier version), so the flags it was "
        "started with cannot be compared with these; resume with the same ones."
    ]
    assert json.loads((output_dir / RUN_ARGS_FILE).read_text())["learning_rate"] == 0.05  # recorded from now on


# ------------------------------------------------------------------------------ another run's checkpoints


def test_a_new_run_into_a_folder_holding_an_interrupted_run_is_refused_before_writing(tmp_path, monkeypatch):
    output_dir = tmp_path / "run"
    flags = _stopped_run(output_dir, monkeypatch)
    before = folder_snapshot(output_dir)
    stop = run_script("run_retrieval", [*flags, "--learning_rate", "0.01"], monkeypatch)
    assert isinstance(stop, SystemExit)
    assert str(stop.code) == (
        f"run_retrieval: error: --output_dir {output_dir} holds an interrupted run (step_00000001): pass --resume to "
        "continue it or choose another --output_dir."
    )
    assert folder_snapshot(output_dir) == before


def test_pruning_never_deletes_the_checkpoint_just_saved(tmp_path):
    accelerator = build_accelerator(tmp_path, report_to="none", cpu=True)
    accelerator.prepare(torch.nn.Linear(4, 2))
    root = tmp_path / "checkpoints"
    save_checkpoint(accelerator, root, TrainState(completed_steps=6))  # another run's, further on
    save_checkpoint(accelerator, root, TrainState(completed_steps=2), save_total_limit=1)
    assert [path.name for path in list_checkpoints(root)] == ["step_00000002", "step_00000006"]
    save_checkpoint(accelerator, root, TrainState(completed_steps=4), save_total_limit=1)
    assert [path.name for path in list_checkpoints(root)] == ["step_00000004", "step_00000006"]
    save_checkpoint(accelerator, root, TrainState(completed_steps=5), save_total_limit=2)
    assert [path.name for path in list_checkpoints(root)] == ["step_00000004", "step_00000005", "step_00000006"]
    accelerator.free_memory()


# ------------------------------------------------------------------------------------------ a finished run


def test_resuming_a_finished_fine_tuning_evaluates_it_without_training(tmp_path, monkeypatch, capsys):
    output_dir = tmp_path / "run"
    flags = [*retrieval_flags(output_dir), "--eval_images", "4"]
    first = run_script("run_retrieval", flags, monkeypatch)
    assert not isinstance(first, SystemExit), first.code
    final = {name: path.stat().st_mtime_ns for name, path in _files(output_dir / "final").items()}
    evaluation = (output_dir / "eval_results.json").read_text()
    (output_dir / "eval_results.json").unlink()  # as when a run is stopped while it evaluates
    capsys.readouterr()
    # The other processes do not wait at a barrier while the main one evaluates: hours on a large gallery, past the
    # process group's timeout, which ended the run with its evaluation unwritten.
    from accelerate import Accelerator

    def no_barrier(self):
        raise AssertionError("a finished run's evaluation is waited for at a barrier")

    monkeypatch.setattr(Accelerator, "wait_for_everyone", no_barrier)
    namespace = run_script("run_retrieval", [*flags, "--resume"], monkeypatch)
    assert not isinstance(namespace, SystemExit), namespace.code
    assert f"{output_dir / 'final'} holds the finished run (2 steps): nothing to train; evaluating it" in (
        capsys.readouterr().out
    )
    assert {name: path.stat().st_mtime_ns for name, path in _files(output_dir / "final").items()} == final
    assert (output_dir / "eval_results.json").read_text() == evaluation


def _files(folder):
    return {str(path.relative_to(folder)): path for path in folder.rglob("*") if path.is_file()}


# ----------------------------------------------------------------------------------------- process count


def test_a_checkpoint_saved_by_another_number_of_processes_is_refused(trained, tmp_path):  # noqa: F811
    folder, checkpoint = _copy(trained, tmp_path)
    assert TrainState.load(checkpoint).num_processes == 1
    _edit_state(checkpoint, lambda data: {**data, "num_processes": 2})
    expected = (
        f"{checkpoint / STATE_FILE}: this checkpoint was saved by a run of 2 processes, this run has 1 process; the "
        "global batch and the learning-rate schedule would change mid-stage. Resume with 2 processes (accelerate "
        f"launch --num_processes 2), or move {checkpoint.parent} away to train the stage afresh."
    )
    with pytest.raises(ValueError, match=f"^{re.escape(expected)}$"):
        _resume(tmp_path, folder)


def test_a_training_state_without_the_process_count_resumes_with_a_warning(trained, tmp_path):  # noqa: F811
    # As an earlier version saved it: the count is unknown, so the run goes on and says so.
    folder, checkpoint = _copy(trained, tmp_path)
    _edit_state(checkpoint, lambda data: {key: value for key, value in data.items() if key != "num_processes"})
    assert TrainState.load(checkpoint).num_processes is None
    with CaptureLogger(runner.logger) as captured:
        _, state = _resume(tmp_path, folder)
    assert f"{checkpoint / STATE_FILE} does not say how many processes saved it" in captured.out
    assert state.completed_steps == 6 and state.num_processes == 1
    _edit_state(checkpoint, lambda data: {**data, "num_processes": 0})
    with pytest.raises(ValueError, match="num_processes"):
        TrainState.load(checkpoint)


# ------------------------------------------------------------------------------------------- other flags


@pytest.mark.parametrize(
    "scheduler",
    ["reduce_lr_on_plateau", "greedy", "warmup_stable_decay", "cosine_with_min_lr", "cosine_warmup_with_min_lr"],
)
def test_a_schedule_the_loop_cannot_step_is_refused(scheduler, tmp_path):
    args = RetrievalArguments(output_dir=str(tmp_path / "run"), synthetic_images=8, lr_scheduler_type=scheduler)
    with pytest.raises(
        ValueError, match=rf"^--lr_scheduler_type must be one of \[.*'polynomial'\], got '{scheduler}'"
    ):
        check_flags(args)
    assert not (tmp_path / "run").exists()


def test_a_model_saved_in_bf16_is_fine_tuned_in_float32(tmp_path):
    tokenizer = make_synthetic_tokenizer()
    model = ImageBERTForImageTextRetrieval(ImageBERTConfig(**tiny_config_kwargs(vocab_size=len(tokenizer))))
    model.to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
    tokenizer.save_pretrained(tmp_path / "bf16")
    args = RetrievalArguments(output_dir=str(tmp_path / "run"), model_name_or_path=str(tmp_path / "bf16"))
    loaded, _, _ = load_model_and_tokenizer(args, {"binary": 1.0})
    assert {p.dtype for p in loaded.parameters()} == {torch.float32}


def test_a_checkpoint_whose_optimizer_trains_other_parameters_is_refused_naming_it(tmp_path):
    """A checkpoint of a run that trained more parameters (an earlier version kept the frozen projection heads of a
    --contrastive_weight 0 run in its optimizer) ends the resume with one line naming it, not torch's traceback."""
    from accelerate import Accelerator

    from imagebert_hf.training.checkpointing import load_checkpoint
    from imagebert_hf.training.loop import build_optimizer

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
    saving = Accelerator(cpu=True)
    saving.prepare(model, build_optimizer(model, 1e-3))
    checkpoint = save_checkpoint(saving, tmp_path / "checkpoints", TrainState(completed_steps=1))
    model[1].requires_grad_(False)
    resuming = Accelerator(cpu=True)
    resuming.prepare(model, build_optimizer(model, 1e-3))
    with pytest.raises(ValueError, match=r"step_00000001: its optimizer state trains other parameters than this run"):
        load_checkpoint(resuming, checkpoint)
    model[1].requires_grad_(True)  # the same parameters: it resumes
    same = Accelerator(cpu=True)
    same.prepare(model, build_optimizer(model, 1e-3))
    assert load_checkpoint(same, checkpoint).completed_steps == 1


def test_a_constant_schedule_with_a_warmup_is_refused_naming_both_flags(tmp_path):
    args = RetrievalArguments(output_dir=str(tmp_path / "run"), lr_scheduler_type="constant")
    with pytest.raises(ValueError, match=r"--lr_scheduler_type constant has no warmup, so --warmup_ratio 0\.1"):
        check_flags(args)
    check_flags(RetrievalArguments(output_dir=str(tmp_path / "run"), lr_scheduler_type="constant", warmup_ratio=0.0))
