"""Flags the training scripts, the demo, the app and the loss plot cannot work with: each is refused with one line
naming the flag, exit status 1, before anything is written."""

import json
import math
import runpy
import sys

import pytest

from imagebert_hf.app.cli import AppArguments, check_arguments
from imagebert_hf.training import RetrievalArguments, recipe_from_dict, run_pretraining
from imagebert_hf.training.arguments import PretrainingRunOptions
from imagebert_hf.training.retrieval_finetuning import check_flags

from .test_run_level_inputs import EXAMPLES, TINY_RECIPE, pretraining_flags, retrieval_flags, run_script, tiny_recipe


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize(
    ("flags", "line"),
    [
        (["--logging_steps", "0"], "--logging_steps must be >= 1, got 0."),
        (["--eval_batch_size", "0"], "--eval_batch_size must be >= 1, got 0."),
        (["--eval_shortlist_k", "-1"], "--eval_shortlist_k must be >= 1, got -1."),
        (["--eval_shortlist_k", "0"], "--eval_shortlist_k must be >= 1, got 0."),
        (["--max_grad_norm", "nan"], "--max_grad_norm must be a finite number, got nan."),
        (["--max_grad_norm", "-1"], "--max_grad_norm must be >= 0.0, got -1.0."),
        (["--contrastive_weight", "nan"], "--contrastive_weight must be a finite number, got nan."),
        (["--contrastive_weight", "-1"], "--contrastive_weight must be >= 0.0, got -1.0."),
        (["--checkpointing_steps", "0"], "--checkpointing_steps must be >= 1, got 0."),
        (["--save_total_limit", "0"], "--save_total_limit must be >= 1, got 0."),
        (["--max_images", "0"], "--max_images must be >= 1, got 0."),
        (["--captions_per_image", "0"], "--captions_per_image must be >= 1, got 0."),
        (["--stop_after_steps", "0"], "--stop_after_steps must be >= 1, got 0."),
        (["--eval_images", "-1"], "--eval_images must be >= 0, got -1."),
        (["--synthetic_images", "-5"], "--synthetic_images must be >= 1, got -5."),
        (["--warmup_ratio", "1"], "--warmup_ratio must be in [0, 1), got 1.0."),
        (["--warmup_ratio", "-0.1"], "--warmup_ratio must be in [0, 1), got -0.1."),
        (["--seed", "-1"], "--seed must be in [0, 4294967295], got -1."),
        (["--seed", str(2**32)], f"--seed must be in [0, 4294967295], got {2**32}."),
        (
            ["--hard_negatives", "--num_negatives", "4", "--hard_pool_size", "2"],
            "--hard_pool_size (2) must be at least --num_negatives (4): the hard negatives are the best-scored of "
            "that many candidates.",
        ),
    ],
)
def test_fine_tuning_refuses_a_flag_out_of_range_before_writing(flags, line, tmp_path, monkeypatch):
    output_dir = tmp_path / "run"
    stop = run_script("run_retrieval", [*retrieval_flags(output_dir), *flags], monkeypatch)
    assert isinstance(stop, SystemExit) and stop.code == f"run_retrieval: error: {line}", stop
    assert not output_dir.exists()


@pytest.mark.parametrize("output_dir", ["", "a_file"])
def test_fine_tuning_refuses_an_output_dir_that_cannot_be_a_folder(output_dir, tmp_path, monkeypatch):
    (tmp_path / "a_file").write_text("x")
    monkeypatch.chdir(tmp_path)
    stop = run_script("run_retrieval", [*retrieval_flags(output_dir)], monkeypatch)
    assert isinstance(stop, SystemExit) and str(stop.code).startswith("run_retrieval: error: --output_dir"), stop
    assert sorted(path.name for path in tmp_path.iterdir()) == ["a_file"]


def test_fine_tuning_takes_the_documented_edges(tmp_path):
    # 0 evaluation images: no evaluation; 0 contrastive weight: no contrastive loss; 0 clipping norm: no clipping
    check_flags(
        RetrievalArguments(
            output_dir=str(tmp_path / "run"),
            synthetic_images=4,
            eval_images=0,
            contrastive_weight=0.0,
            max_grad_norm=0.0,
            seed=2**32 - 1,
        )
    )


@pytest.mark.parametrize(
    ("flags", "line"),
    [
        (["--stop_after_steps", "0"], "--stop_after_steps must be >= 1, got 0."),
        (["--stop_after_steps", "-1"], "--stop_after_steps must be >= 1, got -1."),
        (["--seed", "-1"], "--seed must be in [0, 4294967295], got -1."),
        (["--logging_steps", "0"], "--logging_steps must be >= 1, got 0."),
        (["--num_workers", "-1"], "--num_workers must be >= 0, got -1."),
        (["--max_failure_rate", "2"], "--max_failure_rate must be in [0.0, 1.0], got 2.0."),
    ],
)
def test_pretraining_refuses_a_flag_out_of_range_naming_the_flag(flags, line, tmp_path, monkeypatch):
    output_dir = tmp_path / "run"
    stop = run_script("run_pretraining", [*pretraining_flags(output_dir), *flags], monkeypatch)
    assert isinstance(stop, SystemExit) and stop.code == f"run_pretraining: error: {line}", stop
    assert not output_dir.exists()


def test_pretraining_names_a_config_folder_and_an_empty_output_dir(tmp_path, monkeypatch):
    stop = run_script(
        "run_pretraining", [*pretraining_flags(tmp_path / "run"), "--config", str(tmp_path)], monkeypatch
    )
    assert stop.code == f"run_pretraining: error: --config {tmp_path} is a folder; expected a YAML recipe file.", stop
    monkeypatch.chdir(tmp_path)
    stop = run_script("run_pretraining", ["--config", str(TINY_RECIPE), "--output_dir", ""], monkeypatch)
    assert stop.code == "run_pretraining: error: --output_dir must be a non-empty path, got ''.", stop
    assert not any(tmp_path.iterdir())


def test_run_pretraining_refuses_a_stop_step_below_one(tmp_path):
    recipe = recipe_from_dict(tiny_recipe(tmp_path / "run", num_stages=1))
    with pytest.raises(ValueError, match=r"--stop_after_steps must be >= 1, got 0"):
        run_pretraining(recipe, PretrainingRunOptions(stop_after_steps=0, cpu=True))
    assert not (tmp_path / "run").exists()


DEMO_FLAGS = ["--report_to", "none", "--num_train_images", "10", "--num_test_images", "5", "--noisy_steps", "1"]


@pytest.mark.parametrize(
    ("flags", "line"),
    [
        (["--num_threads", "0"], "--num_threads must be >= 1, got 0."),
        (["--caption_noise", "2"], "--caption_noise must be in [0.0, 1.0], got 2.0."),
        (["--batch_size", "0"], "--batch_size must be >= 1, got 0."),
        (["--num_train_images", "0"], "--num_train_images must be >= 1, got 0."),
        (["--num_test_images", "0"], "--num_test_images must be >= 1, got 0."),
        (["--image_size", "0"], "--image_size must be >= 32, got 0."),
        (["--hidden_size", "30"], "--hidden_size must be a multiple of the 4 attention heads, got 30."),
        (["--seed", "-1"], "--seed must be in [0, 4294967295], got -1."),
        (["--report_to", "bogus"], "--report_to must be 'tensorboard' or 'none', got 'bogus'."),
        (["--output_dir", "a_file"], "--output_dir a_file is a file; expected a folder (created when missing)."),
    ],
)
def test_the_demo_refuses_a_bad_flag_with_one_line_before_writing(flags, line, tmp_path, monkeypatch):
    (tmp_path / "a_file").write_text("x")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["demo.py", *DEMO_FLAGS, "--clean_steps", "1", "--output_dir", "demo", *flags])
    with pytest.raises(SystemExit) as stop:
        runpy.run_path(str(EXAMPLES / "demo.py"), run_name="__main__")
    assert stop.value.code == f"demo: error: {line}"
    assert sorted(path.name for path in tmp_path.iterdir()) == ["a_file"]


@pytest.mark.parametrize(("demo_dir", "message"), [("a_file", "is a file"), ("", "must be a non-empty path")])
def test_the_app_checks_the_demo_folder_it_would_build_into(demo_dir, message, tmp_path, monkeypatch):
    (tmp_path / "a_file").write_text("x")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match=f"^--demo_dir .*{message}"):
        check_arguments(AppArguments(demo_dir=demo_dir, gallery=str(tmp_path)))


def _plot(tmp_path, output: str, capsys):
    run = tmp_path / "run.json"
    run.write_text(json.dumps({"history": [{"step": 5, "itm": 0.6}, {"step": 10, "itm": math.log(2)}]}))
    main = runpy.run_path(str(EXAMPLES / "plot_loss_curves.py"))["main"]
    try:
        result = main(["--group", "a", str(run), "--smoothing", "1", "--output", output])
    except SystemExit as stop:
        result = stop
    return result, capsys.readouterr()


@pytest.mark.parametrize(
    ("output", "line"),
    [
        (
            "a_file/x.png",
            "plot_loss_curves: error: --output {tmp}/a_file/x.png: {tmp}/a_file is a file, not a folder.",
        ),
        ("folder", "plot_loss_curves: error: --output {tmp}/folder is a folder; expected the path of a PNG file."),
    ],
)
def test_the_loss_plot_refuses_an_output_it_cannot_write(output, line, tmp_path, capsys):
    (tmp_path / "a_file").write_text("x")
    (tmp_path / "folder").mkdir()
    stop, captured = _plot(tmp_path, str(tmp_path / output), capsys)
    assert isinstance(stop, SystemExit) and stop.code == 1
    assert captured.err.strip() == line.format(tmp=tmp_path)
    assert not (tmp_path / "folder.png").exists() and not any((tmp_path / "folder").iterdir())


def test_the_loss_plot_prints_the_file_it_wrote(tmp_path, capsys):
    path, captured = _plot(tmp_path, str(tmp_path / "curves"), capsys)
    assert path == tmp_path / "curves.png" and path.is_file()
    assert captured.out.strip() == f"wrote {tmp_path / 'curves.png'}"
