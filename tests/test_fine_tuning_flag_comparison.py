"""How a resumed fine-tuning compares its flags with those it started with: a file or folder flag by the location it
names (from the working directory each invocation ran in), so the same place written another way resumes and the
same words naming another place do not; a Hub id as written. And the `inverse_sqrt` schedule: accepted with warmup,
whose length is its time scale, stepped and resumed as transformers defines it, at one rate per optimizer step
whatever the number of processes."""

import dataclasses
import json
import math
import re

import pytest
import torch

from imagebert_hf import ImageBERTConfig, ImageBERTForImageTextRetrieval
from imagebert_hf.data.synthetic import make_synthetic_tokenizer
from imagebert_hf.training import recipe_from_dict
from imagebert_hf.training.arguments import RetrievalArguments
from imagebert_hf.training.checkpointing import TrainState
from imagebert_hf.training.loop import build_scheduler
from imagebert_hf.training.retrieval_finetuning import RUN_ARGS_FILE, check_resumed_flags

from .test_run_level_inputs import folder_snapshot, retrieval_flags, run_script, tiny_recipe
from .testing_utils import tiny_config_kwargs


# Tiny models gain nothing from threads, and extra threads crawl when the CI cores are shared.
pytestmark = pytest.mark.usefixtures("one_thread")


def _stopped_run(output_dir, monkeypatch, *flags: str) -> list[str]:
    """Fine-tunes into `output_dir` and stops after step 1, with a checkpoint there; returns the run's flags."""
    run_flags = [*retrieval_flags(output_dir), "--checkpointing_steps", "1", "--eval_images", "0", *flags]
    stop = run_script("run_retrieval", [*run_flags, "--stop_after_steps", "1"], monkeypatch)
    assert isinstance(stop, SystemExit) and stop.code == 3, getattr(stop, "code", stop)
    return run_flags


def _recorded_args(output_dir, **changes) -> RetrievalArguments:
    """The flags `output_dir`'s run recorded, as the resume that gives them again (with `changes`) parses them."""
    stored = json.loads((output_dir / RUN_ARGS_FILE).read_text())
    names = [item.name for item in dataclasses.fields(RetrievalArguments)]
    return RetrievalArguments(**{**{name: stored[name] for name in names}, "resume": True, **changes})


def _edit_recorded_flags(output_dir, edit) -> None:
    path = output_dir / RUN_ARGS_FILE
    path.write_text(json.dumps(edit(json.loads(path.read_text()))))


def _save_tiny_model(folder) -> None:
    tokenizer = make_synthetic_tokenizer()
    model = ImageBERTForImageTextRetrieval(ImageBERTConfig(**tiny_config_kwargs(vocab_size=len(tokenizer))))
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


# -------------------------------------------------------------------------------------- the same place, written


def test_a_resume_naming_the_same_folders_another_way_continues(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _save_tiny_model(tmp_path / "base")
    (tmp_path / "images").mkdir()
    output_dir = tmp_path / "run"
    flags = _stopped_run(output_dir, monkeypatch, "--model_name_or_path", "base", "--image_root", "images")
    other_spelling = ["--model_name_or_path", f"{tmp_path / 'base'}/", "--image_root", "./images/"]
    namespace = run_script("run_retrieval", [*flags, *other_spelling, "--resume"], monkeypatch)
    assert not isinstance(namespace, SystemExit), namespace.code
    assert TrainState.load(output_dir / "final").completed_steps == 2


@pytest.mark.parametrize(
    ("recorded", "given"),
    [
        ("data/train.json", "./data/train.json"),
        ("data/train.json", "data/../data/train.json"),
        ("data/train.json", "{cwd}/data/train.json"),
        ("{cwd}/data/train.json", "data/train.json"),
    ],
)
def test_a_file_flag_compares_by_the_file_it_names(recorded, given, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    output_dir = tmp_path / "run"
    _stopped_run(output_dir, monkeypatch)
    _edit_recorded_flags(output_dir, lambda flags: {**flags, "train_file": recorded.format(cwd=tmp_path)})
    check_resumed_flags(_recorded_args(output_dir, train_file=given.format(cwd=tmp_path)))
    with pytest.raises(ValueError, match=r"train_file is '.*train\.json' there, '.*valid\.json' now"):
        check_resumed_flags(_recorded_args(output_dir, train_file="data/valid.json"))


def test_a_relative_path_from_another_working_directory_is_another_place(tmp_path, monkeypatch):
    first, second = tmp_path / "first", tmp_path / "second"
    for cwd in (first, second):
        (cwd / "images").mkdir(parents=True)
    monkeypatch.chdir(first)
    output_dir = tmp_path / "run"
    flags = _stopped_run(output_dir, monkeypatch, "--image_root", "images")
    before = folder_snapshot(output_dir)
    monkeypatch.chdir(second)
    stop = run_script("run_retrieval", [*flags, "--resume"], monkeypatch)
    assert isinstance(stop, SystemExit)
    assert str(stop.code) == (
        f"run_retrieval: error: --resume: {output_dir} holds a run started with other flags: image_root is "
        f"'{first / 'images'}' there, '{second / 'images'}' now. Resume with the flags it was started with "
        f"({output_dir / RUN_ARGS_FILE}), or give a new --output_dir."
    )
    assert folder_snapshot(output_dir) == before
    # The same folder named from here resumes.
    namespace = run_script("run_retrieval", [*flags, "--image_root", "../first/images", "--resume"], monkeypatch)
    assert not isinstance(namespace, SystemExit), namespace.code


def test_a_hub_id_compares_as_written(tmp_path, monkeypatch):
    first, second = tmp_path / "first", tmp_path / "second"
    first.mkdir()
    second.mkdir()
    monkeypatch.chdir(first)
    output_dir = tmp_path / "run"
    _stopped_run(output_dir, monkeypatch)
    # As if the run had started from a Hub checkpoint.
    _edit_recorded_flags(output_dir, lambda flags: {**flags, "model_name_or_path": "org/name"})
    monkeypatch.chdir(second)
    check_resumed_flags(_recorded_args(output_dir))  # not a folder in either working directory
    with pytest.raises(ValueError, match="model_name_or_path is 'org/name' there, 'org/other' now"):
        check_resumed_flags(_recorded_args(output_dir, model_name_or_path="org/other"))
    # Here the same words name a local folder, which from_pretrained would load instead of the Hub's.
    (second / "org" / "name").mkdir(parents=True)
    expected = f"model_name_or_path is 'org/name' there, '{second / 'org' / 'name'}' now"
    with pytest.raises(ValueError, match=re.escape(expected)):
        check_resumed_flags(_recorded_args(output_dir))


def test_flags_recorded_without_a_working_directory_resume_when_nothing_changed(tmp_path, monkeypatch):
    # run_args.json as an earlier version wrote it: the flags only, relative paths read from the working directory.
    monkeypatch.chdir(tmp_path)
    (tmp_path / "images").mkdir()
    output_dir = tmp_path / "run"
    flags = _stopped_run(output_dir, monkeypatch, "--image_root", "images")
    names = {item.name for item in dataclasses.fields(RetrievalArguments)}
    _edit_recorded_flags(output_dir, lambda stored: {key: stored[key] for key in names})
    check_resumed_flags(_recorded_args(output_dir))
    check_resumed_flags(_recorded_args(output_dir, image_root=str(tmp_path / "images")))
    with pytest.raises(ValueError, match="image_root is"):
        check_resumed_flags(_recorded_args(output_dir, image_root=str(tmp_path)))
    namespace = run_script(
        "run_retrieval", [*flags, "--image_root", f"{tmp_path / 'images'}/", "--resume"], monkeypatch
    )
    assert not isinstance(namespace, SystemExit), namespace.code


# -------------------------------------------------------------------------------------------- inverse_sqrt


def test_inverse_sqrt_with_warmup_steps_and_resumes_as_transformers_defines_it(tmp_path, monkeypatch):
    # Three steps, the first of them warmup: the time scale is one step, so after step k the rate is lr / sqrt(k).
    schedule = ["--lr_scheduler_type", "inverse_sqrt", "--warmup_ratio", "0.34", "--max_steps", "3"]
    flags = [*schedule, "--logging_steps", "1", "--learning_rate", "0.01"]
    expected = [0.01 / math.sqrt(step) for step in (1, 2, 3)]
    whole = tmp_path / "whole"
    namespace = run_script("run_retrieval", [*retrieval_flags(whole), "--eval_images", "0", *flags], monkeypatch)
    assert not isinstance(namespace, SystemExit), namespace.code
    rates = [entry["lr"] for entry in TrainState.load(whole / "final").history]
    assert rates == pytest.approx(expected, rel=1e-6)
    resumed = tmp_path / "resumed"
    run_flags = _stopped_run(resumed, monkeypatch, *flags)
    namespace = run_script("run_retrieval", [*run_flags, "--resume"], monkeypatch)
    assert not isinstance(namespace, SystemExit), namespace.code
    state = TrainState.load(resumed / "final")
    assert [entry["lr"] for entry in state.history] == rates


@pytest.mark.parametrize("warmup_steps", [0, 3])
def test_inverse_sqrt_gives_each_optimizer_step_one_rate_whatever_the_number_of_processes(warmup_steps):
    def rates(num_processes):
        optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
        scheduler = build_scheduler(optimizer, "inverse_sqrt", 50, warmup_steps, num_processes)
        by_step = []
        for _ in range(50):
            by_step.append(optimizer.param_groups[0]["lr"])
            for _ in range(num_processes):  # Accelerate's prepared scheduler: one step per process
                scheduler.step()
        return by_step

    assert rates(4) == pytest.approx(rates(1), rel=1e-9)
    assert rates(1)[-1] < rates(1)[warmup_steps + 1]  # it decays


def test_a_recipe_stage_takes_inverse_sqrt(tmp_path):
    data = tiny_recipe(tmp_path / "run", num_stages=1)
    data["stages"][0].update(lr_scheduler_type="inverse_sqrt", warmup_steps=0)
    assert recipe_from_dict(data).stages[0].lr_scheduler_type == "inverse_sqrt"
