"""What the training scripts check about the run as a whole before they train: a resumed folder holding a run of
another recipe, a `--resume` with nothing to resume, and `--push_to_hub` settings that could only fail once training
is over. Each refusal is one line naming the flag, and leaves the output folder as it was."""

import logging
import os
import runpy
import shutil
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from imagebert_hf.evaluation.hub import check_push_to_hub
from imagebert_hf.formats.files import RUN_LOCK_FILE, exclusive_folder
from imagebert_hf.training import recipe_from_dict, run_pretraining
from imagebert_hf.training.arguments import PretrainingRunOptions
from imagebert_hf.training.pretraining import check_resumed_recipe
from imagebert_hf.training.recipe import recipe_to_dict

from .testing_utils import PROJECT_ROOT


EXAMPLES = PROJECT_ROOT / "examples"
TINY_RECIPE = EXAMPLES / "configs" / "pretrain_tiny_synthetic.yaml"


# Tiny models gain nothing from threads, and extra threads crawl when the CI cores are shared.
pytestmark = pytest.mark.usefixtures("one_thread")


def pretraining_flags(output_dir) -> list[str]:
    return ["--config", str(TINY_RECIPE), "--output_dir", str(output_dir), "--max_steps", "1", "--report_to", "none"]


def retrieval_flags(output_dir) -> list[str]:
    return ["--synthetic_images", "8", "--max_steps", "2", "--output_dir", str(output_dir), "--report_to", "none"]


def run_script(script: str, flags: list[str], monkeypatch):
    """Runs `examples/<script>.py` as the command line does; returns what `main` returned, or the `SystemExit`."""
    monkeypatch.setattr(sys, "argv", [f"{script}.py", *flags, "--cpu"])
    try:
        return runpy.run_path(str(EXAMPLES / f"{script}.py"), run_name="__main__")
    except SystemExit as stop:
        return stop


def folder_snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*")}


def tiny_recipe(output_dir, num_stages: int = 2) -> dict:
    data = yaml.safe_load(TINY_RECIPE.read_text())
    data.update(output_dir=str(output_dir), report_to="none")
    data["stages"] = data["stages"][:num_stages]
    for stage in data["stages"]:
        stage["max_steps"] = 1
    return data


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A finished two-stage run of the tiny recipe, one step per stage, made by the script's `main`."""
    output_dir = tmp_path_factory.mktemp("finished") / "run"
    main = runpy.run_path(str(EXAMPLES / "run_pretraining.py"))["main"]
    main([*pretraining_flags(output_dir), "--cpu"])
    return output_dir


# --------------------------------------------------------------------------------------- resuming another recipe


@pytest.mark.parametrize(
    ("flags", "named"),
    [
        (["--set", "model.config.hidden_size=64"], "model.config.hidden_size is 32 there, 64 now"),
        (["--seed", "7"], "seed is 42 there, 7 now"),
        (["--per_device_train_batch_size", "4"], "stages.0.per_device_train_batch_size is 8 there, 4 now"),
    ],
)
def test_resuming_a_folder_of_another_recipe_is_refused_before_anything_is_written(
    finished_run, flags, named, monkeypatch
):
    before = folder_snapshot(finished_run)
    stop = run_script("run_pretraining", [*pretraining_flags(finished_run), "--resume", *flags], monkeypatch)
    assert isinstance(stop, SystemExit)
    message = str(stop.code)
    assert message.startswith(f"run_pretraining: error: --resume: {finished_run} holds a run of another recipe: ")
    assert named in message and "\n" not in message
    assert message.endswith(
        f"Resume with the recipe it was started with ({finished_run / 'recipe.yaml'}), or give a new --output_dir."
    )
    assert folder_snapshot(finished_run) == before


def test_resuming_with_other_logging_and_checkpointing_settings_continues(finished_run, tmp_path, monkeypatch):
    copy = tmp_path / "run"
    shutil.copytree(finished_run, copy)
    flags = ["--logging_steps", "5", "--checkpointing_steps", "3", "--num_workers", "2", "--report_to", "none"]
    namespace = run_script("run_pretraining", [*pretraining_flags(copy), "--resume", *flags], monkeypatch)
    assert not isinstance(namespace, SystemExit), namespace.code
    assert (copy / "recipe.yaml").read_bytes() == (finished_run / "recipe.yaml").read_bytes()


def test_num_workers_may_change_on_resume_only_without_streams(tmp_path):
    data = tiny_recipe(tmp_path, num_stages=1)
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(data))
    check_resumed_recipe(recipe_from_dict({**data, "num_workers": 2}))
    data["stages"][0]["sources"] = [
        {"name": "web", "type": "webdataset", "path": "shards", "streaming": True, "region_cache": "regions"}
    ]
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(data))
    with pytest.raises(ValueError, match=r"holds a run of another recipe: num_workers is 0 there, 2 now\. Resume"):
        check_resumed_recipe(recipe_from_dict({**data, "num_workers": 2}))


def test_an_unreadable_recipe_of_the_resumed_run_is_named(tmp_path):
    (tmp_path / "recipe.yaml").write_text("stages: [\n")
    with pytest.raises(ValueError, match=r"--resume: .*recipe\.yaml \(the recipe of the run being resumed\) cannot"):
        check_resumed_recipe(recipe_from_dict(tiny_recipe(tmp_path)))
    assert (tmp_path / "recipe.yaml").read_text() == "stages: [\n"


# -------------------------------------------------------------------------------------------- nothing to resume


@pytest.mark.parametrize("folder", ["missing", "empty", "only recipe.yaml"])
def test_resume_with_nothing_to_resume_warns_and_starts_from_the_beginning(folder, tmp_path, caplog):
    output_dir = tmp_path / "run"
    data = tiny_recipe(output_dir, num_stages=1)
    if folder != "missing":
        output_dir.mkdir()
    if folder == "only recipe.yaml":
        (output_dir / "recipe.yaml").write_text(yaml.safe_dump(recipe_to_dict(recipe_from_dict(data))))
    with caplog.at_level(logging.WARNING, logger="imagebert_hf.training.pretraining"):
        result = run_pretraining(recipe_from_dict(data), PretrainingRunOptions(resume=True, cpu=True))
    expected = f"--resume: nothing to resume in {output_dir} (no finished stage, no complete checkpoint); the run "
    assert [r.getMessage() for r in caplog.records if "nothing to resume" in r.getMessage()] == [
        expected + "starts from the beginning."
    ]
    assert result["steps_per_stage"] == [1]


def test_resume_of_a_fine_tuning_without_checkpoints_warns_and_starts_from_the_beginning(
    tmp_path, caplog, monkeypatch
):
    output_dir = tmp_path / "run"
    with caplog.at_level(logging.WARNING, logger="imagebert_hf.training.retrieval_finetuning"):
        namespace = run_script("run_retrieval", [*retrieval_flags(output_dir), "--resume"], monkeypatch)
    assert not isinstance(namespace, SystemExit), namespace.code
    warnings = [r.getMessage() for r in caplog.records if "nothing to resume" in r.getMessage()]
    assert warnings == [
        f"--resume: nothing to resume in {output_dir / 'checkpoints'} (no complete checkpoint); the run starts from "
        "the beginning."
    ]
    assert (output_dir / "final" / "model.safetensors").is_file()


# ----------------------------------------------------------------------------------------- a folder in use


@pytest.mark.parametrize(
    ("script", "flags"), [("run_pretraining", pretraining_flags), ("run_retrieval", retrieval_flags)]
)
def test_a_run_into_a_folder_another_run_holds_is_refused_before_writing(script, flags, tmp_path, monkeypatch):
    output_dir = tmp_path / "run"
    with exclusive_folder(output_dir):
        stop = run_script(script, [*flags(output_dir), "--resume"], monkeypatch)
        written = sorted(path.name for path in output_dir.iterdir())
    assert isinstance(stop, SystemExit)
    assert str(stop.code) == (
        f"{script}: error: output_dir {output_dir} is in use by another run (process {os.getpid()} on "
        f"{os.uname().nodename}); wait for it to end or choose another output_dir."
    )
    assert written == [RUN_LOCK_FILE]
    namespace = run_script(script, flags(output_dir), monkeypatch)  # the same run once the folder is free
    assert not isinstance(namespace, SystemExit), namespace.code


# ------------------------------------------------------------------------------------------------- push_to_hub


@pytest.fixture
def hub_settings(monkeypatch, tmp_path):
    """Online, with a token in HF_TOKEN and none stored; `hub_settings(offline=..., token=...)` changes them."""
    from huggingface_hub import constants

    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no_token"))

    def settings(offline: str | None = None, token: str | None = "hf_test"):
        if offline is not None:
            monkeypatch.setenv(offline, "1")
        if token is not None:
            monkeypatch.setenv("HF_TOKEN", token)

    return settings


@pytest.mark.parametrize(
    ("flags", "settings", "message"),
    [
        ([], {}, "--push_to_hub needs --hub_model_id (the Hub repository, such as 'user/name'), got none."),
        (
            ["--hub_model_id", "me/x/y"],
            {},
            "--hub_model_id must be a Hub id such as 'user/name', got 'me/x/y': Repo id must be in the form",
        ),
        (
            ["--hub_model_id", "me/x"],
            {"offline": "HF_HUB_OFFLINE"},
            "--push_to_hub cannot upload to 'me/x': HF_HUB_OFFLINE is set (offline mode); unset it or drop "
            "--push_to_hub.",
        ),
        (
            ["--hub_model_id", "me/x"],
            {"offline": "TRANSFORMERS_OFFLINE"},
            "--push_to_hub cannot upload to 'me/x': TRANSFORMERS_OFFLINE is set",
        ),
        (
            ["--hub_model_id", "me/x"],
            {"token": None},
            "--push_to_hub needs a Hugging Face token to upload to 'me/x', and none was found; set HF_TOKEN",
        ),
    ],
)
def test_pretraining_refuses_hub_settings_before_training(
    flags, settings, message, hub_settings, tmp_path, monkeypatch
):
    hub_settings(**settings)
    output_dir = tmp_path / "run"
    stop = run_script("run_pretraining", [*pretraining_flags(output_dir), "--push_to_hub", *flags], monkeypatch)
    assert isinstance(stop, SystemExit)
    assert str(stop.code).startswith(f"run_pretraining: error: {message}"), stop.code
    assert not output_dir.exists()


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        ([], "--push_to_hub needs --hub_model_id"),
        (["--hub_model_id", "me/x"], "--push_to_hub publishes the model with its processor"),
    ],
)
def test_fine_tuning_refuses_hub_settings_before_training(flags, message, hub_settings, tmp_path, monkeypatch):
    hub_settings()
    output_dir = tmp_path / "run"
    stop = run_script("run_retrieval", [*retrieval_flags(output_dir), "--push_to_hub", *flags], monkeypatch)
    assert isinstance(stop, SystemExit)
    assert str(stop.code).startswith(f"run_retrieval: error: {message}"), stop.code
    assert not output_dir.exists() or not any(output_dir.iterdir())


def test_hub_check_passes_settings_that_can_upload_without_a_request(hub_settings, monkeypatch):
    import socket

    def no_connection(*args, **kwargs):
        raise AssertionError("the check opened a connection")

    monkeypatch.setattr(socket.socket, "connect", no_connection)
    hub_settings()
    check_push_to_hub("me/x")
    check_push_to_hub("x", SimpleNamespace(image_processor=object()), needs_processor=True)
    with pytest.raises(ValueError, match="this run has none"):
        check_push_to_hub("me/x", SimpleNamespace(image_processor=None), needs_processor=True)
