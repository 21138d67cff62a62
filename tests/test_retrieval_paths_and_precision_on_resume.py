"""Paths and precision at the edges of a run: `~` in the fine-tuning and evaluation flags names the home folder for
every check and every reader (a shell leaves `--output_dir=~/run` as typed); a checkpoint saved without fp16 resumes
under fp16 with a fresh gradient scaler, while one that had a scaler and lost it is refused; fp16 on the CPU, which
accelerate would run in float32, is refused before anything is written."""

import re
from pathlib import Path

import pytest
import torch
from transformers.testing_utils import CaptureLogger

from imagebert_hf.evaluation.full_ranking import EvaluationArguments
from imagebert_hf.formats.files import check_nothing_left_unexpanded
from imagebert_hf.training import RetrievalArguments, build_accelerator, checkpointing, run_stage
from imagebert_hf.training.checkpointing import FILES_RECORD, SCALER_FILE
from imagebert_hf.training.retrieval_finetuning import check_flags, flag_differences, load_model_and_tokenizer

from .test_checkpoint_inputs import NEWEST, _copy, trained  # noqa: F401 - trained: a fixture
from .test_launch import fresh_accelerate_state  # noqa: F401 - a fixture
from .test_run_level_inputs import pretraining_flags, retrieval_flags, run_script
from .test_stage_runner import _settings, _stage


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    """A home folder for `~`, and a working directory apart from it, where a `~` left unexpanded would land."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    return home


def _save_start_model(folder: Path) -> None:
    args = RetrievalArguments(output_dir=str(folder.parent / "unused"), synthetic_images=8)
    model, tokenizer, _ = load_model_and_tokenizer(args, {"binary": 1.0})
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


# ------------------------------------------------------------------------------------------------------ `~` in paths


def test_the_fine_tuning_flags_are_checked_and_used_with_tilde_expanded(home):
    (home / "split.json").write_text("{}")
    args = RetrievalArguments(
        output_dir="~/run",
        model_name_or_path="~/init",
        train_file="~/split.json",
        image_root="~/images",
        region_cache="~/regions",
    )
    checked = check_flags(args)
    assert (checked.output_dir, checked.model_name_or_path, checked.train_file) == (
        str(home / "run"),
        str(home / "init"),
        str(home / "split.json"),
    )
    assert (checked.image_root, checked.region_cache) == (str(home / "images"), str(home / "regions"))
    assert not Path("~").exists()


def test_a_fine_tuning_run_given_tilde_paths_reads_and_writes_under_home(home, monkeypatch):
    _save_start_model(home / "init")
    flags = ["--output_dir=~/run", "--model_name_or_path=~/init", "--synthetic_images", "8", "--eval_images", "0"]
    namespace = run_script("run_retrieval", [*flags, "--max_steps", "1", "--report_to", "none"], monkeypatch)
    assert not isinstance(namespace, SystemExit), namespace.code
    assert (home / "run" / "final" / "model.safetensors").is_file()
    assert not Path("~").exists()


def test_a_resumed_run_compares_a_recorded_tilde_path_by_the_folder_it_names(home):
    # An earlier version recorded `--region_cache ~/regions` as typed, and read the cache from the home folder.
    args = RetrievalArguments(output_dir=str(home / "run"), synthetic_images=8, region_cache=str(home / "regions"))
    stored = {"synthetic_images": 8, "region_cache": "~/regions"}
    assert flag_differences(args, stored) == []


def _leave_unexpanded_run(name: str) -> Path:
    """A run as an earlier version wrote `--output_dir=~/<name>`: under a folder named `~` in the working folder."""
    folder = Path.cwd() / "~" / name
    (folder / "checkpoints").mkdir(parents=True)
    (folder / "recipe.yaml").write_text("seed: 0\n")
    return folder


def test_resuming_a_run_an_earlier_version_left_under_a_folder_named_tilde_is_refused(home):
    left = _leave_unexpanded_run("run")
    with pytest.raises(ValueError, match=r"--resume: nothing to resume in .*home/run, but .*work/~/run holds files"):
        check_nothing_left_unexpanded(home / "run")
    check_nothing_left_unexpanded(home / "other")  # nothing left for this one
    check_nothing_left_unexpanded(Path.cwd() / "run")  # not under the home folder: no `~` was typed
    for item in sorted(left.rglob("*"), reverse=True):
        item.rmdir() if item.is_dir() else item.unlink()
    check_nothing_left_unexpanded(home / "run")  # an empty folder holds nothing to lose


@pytest.mark.parametrize("script", ["run_pretraining", "run_retrieval"])
def test_the_training_scripts_refuse_to_restart_a_run_left_under_tilde(script, home, monkeypatch):
    left = _leave_unexpanded_run("run")
    flags = pretraining_flags("~/run") if script == "run_pretraining" else retrieval_flags("~/run")
    stop = run_script(script, [*flags, "--resume"], monkeypatch)
    assert isinstance(stop, SystemExit) and f"{script}: error: --resume: nothing to resume" in str(stop.code)
    assert f"but {left} holds files" in str(stop.code)
    assert not any((home / "run").rglob("*.safetensors"))


def test_the_evaluation_flags_are_expanded_where_they_are_checked(home):
    args = EvaluationArguments(
        output_dir="~/eval",
        model_name_or_path="~/init",
        dataset="coco",
        karpathy_file="~/dataset_coco.json",
        image_root="~/images",
        manifest="~/captions.jsonl",
        region_cache="~/regions",
        corpus_cache="~/corpus.safetensors",
    )
    names = ("output_dir", "model_name_or_path", "karpathy_file", "image_root", "manifest", "region_cache")
    expected = ("eval", "init", "dataset_coco.json", "images", "captions.jsonl", "regions")
    assert [getattr(args, name) for name in names] == [str(home / name) for name in expected]
    assert args.corpus_cache == str(home / "corpus.safetensors")


def test_an_evaluation_given_tilde_paths_reads_and_writes_under_home(home, monkeypatch):
    _save_start_model(home / "init")
    flags = ["--output_dir=~/eval", "--model_name_or_path=~/init", "--dataset", "synthetic", "--synthetic_images", "4"]
    namespace = run_script("evaluate_retrieval", [*flags, "--corpus_cache=~/corpus.safetensors"], monkeypatch)
    assert not isinstance(namespace, SystemExit), namespace.code
    assert (home / "eval" / "results.json").is_file() and (home / "corpus.safetensors").is_file()
    assert not Path("~").exists()


# ------------------------------------------------------------------------------- the gradient scaler on resume


def _scaled_accelerator(tmp_path: Path):
    """A CPU accelerator holding the gradient scaler `Accelerator(mixed_precision="fp16")` holds on CUDA (accelerate
    builds none on the CPU)."""
    accelerator = build_accelerator(tmp_path, report_to="none", cpu=True)
    accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    return accelerator


def _resume_under_fp16(tmp_path: Path, folder: Path):
    accelerator = _scaled_accelerator(tmp_path)
    scaler = accelerator.scaler
    try:
        with CaptureLogger(checkpointing.logger) as captured:
            _, state = run_stage(accelerator, _stage(folder), _settings(), resume=True)
        assert accelerator.scaler is scaler  # the run goes on with it
        return state, captured.out
    finally:
        accelerator.free_memory()


def test_a_checkpoint_saved_without_fp16_resumes_under_fp16_with_a_fresh_scaler(trained, tmp_path):  # noqa: F811
    folder, checkpoint = _copy(trained, tmp_path)
    state, logged = _resume_under_fp16(tmp_path, folder)
    assert state.completed_steps == 6
    assert f"checkpoint {checkpoint} has no {SCALER_FILE}: it was saved without fp16 mixed precision, and " in logged
    assert "(--mixed_precision or the launch config) resumes it with a fresh gradient scaler" in logged


def test_a_checkpoint_of_an_earlier_version_without_a_scaler_resumes_under_fp16(trained, tmp_path):  # noqa: F811
    folder, checkpoint = _copy(trained, tmp_path)
    (checkpoint / FILES_RECORD).unlink(missing_ok=True)
    state, logged = _resume_under_fp16(tmp_path, folder)
    assert state.completed_steps == 6
    assert "saved without fp16 mixed precision (an earlier version's checkpoint lists no files" in logged


def test_a_checkpoint_that_lost_the_scaler_its_run_saved_is_refused_as_damaged(tmp_path):
    folder = tmp_path / "stage"
    accelerator = _scaled_accelerator(tmp_path)
    try:
        run_stage(accelerator, _stage(folder), _settings())
    finally:
        accelerator.free_memory()
    checkpoint = folder / "checkpoints" / NEWEST
    assert f'"{SCALER_FILE}"' in (checkpoint / FILES_RECORD).read_text()
    (checkpoint / SCALER_FILE).unlink()
    expected = f"checkpoint {checkpoint}: {SCALER_FILE} is missing; delete the checkpoint folder to resume from"
    with pytest.raises(ValueError, match=re.escape(expected)):
        _resume_under_fp16(tmp_path, folder)


def test_an_unreadable_record_of_the_checkpoint_files_is_named(trained, tmp_path):  # noqa: F811
    folder, checkpoint = _copy(trained, tmp_path)
    (checkpoint / FILES_RECORD).write_text('{"files": "model.safetensors"}')
    with pytest.raises(ValueError, match=rf"{re.escape(str(checkpoint / FILES_RECORD))} is not .*damaged: delete"):
        _resume_under_fp16(tmp_path, folder)


# ---------------------------------------------------------------------------------------------- fp16 on the CPU


CPU_FP16 = (
    "does not work on the CPU: accelerate makes no fp16 autocast and no gradient scaler there, so the run would "
    "train in float32; use --mixed_precision bf16, which works on the CPU, or no."
)


def test_fp16_on_the_cpu_is_refused_whether_a_flag_or_the_launch_config_asks(
    tmp_path,
    monkeypatch,
    fresh_accelerate_state,  # noqa: F811
):
    with pytest.raises(ValueError, match=re.escape(f"--mixed_precision fp16 {CPU_FP16}")):
        build_accelerator(tmp_path, mixed_precision="fp16", cpu=True)
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "fp16")
    with pytest.raises(ValueError, match=re.escape(f"mixed precision fp16 (the launch config's) {CPU_FP16}")):
        build_accelerator(tmp_path, cpu=True)


@pytest.mark.parametrize("script", ["run_retrieval", "run_pretraining"])
def test_the_training_scripts_refuse_fp16_on_the_cpu_before_writing(
    script,
    tmp_path,
    monkeypatch,
    fresh_accelerate_state,  # noqa: F811
):
    from .test_run_level_inputs import pretraining_flags

    output_dir = tmp_path / "run"
    flags = retrieval_flags(output_dir) if script == "run_retrieval" else pretraining_flags(output_dir)
    stop = run_script(script, [*flags, "--mixed_precision", "fp16"], monkeypatch)
    assert isinstance(stop, SystemExit) and stop.code == f"{script}: error: --mixed_precision fp16 {CPU_FP16}", stop
    assert not output_dir.exists()


def test_an_untied_head_checkpoint_of_an_earlier_version_is_named_as_such_not_as_damaged(
    tmp_path,
    fresh_accelerate_state,  # noqa: F811
):
    # An earlier untied head kept an unused `cls.predictions.bias` in the model and optimizer states. Calling such a
    # checkpoint damaged, with advice to delete it, would have had a user delete every checkpoint of the run.
    from accelerate import Accelerator
    from safetensors.torch import load_file, save_file

    from imagebert_hf import ImageBERTConfig, ImageBERTForPreTraining
    from imagebert_hf.training.checkpointing import TrainState, load_checkpoint, save_checkpoint

    from .testing_utils import tiny_config_kwargs

    torch.manual_seed(0)
    accelerator = Accelerator(cpu=True)
    model = ImageBERTForPreTraining(ImageBERTConfig(**tiny_config_kwargs(tie_word_embeddings=False)))
    model, optimizer = accelerator.prepare(model, torch.optim.AdamW(model.parameters(), lr=1e-3))
    saved = save_checkpoint(accelerator, tmp_path, TrainState(completed_steps=1, total_steps=4, num_processes=1))
    weights = load_file(saved / "model.safetensors")
    weights["cls.predictions.bias"] = torch.zeros_like(weights["cls.predictions.decoder.bias"])
    save_file(weights, saved / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"was saved by an earlier version, whose untied MLM head .*itself is sound"):
        load_checkpoint(accelerator, saved)
