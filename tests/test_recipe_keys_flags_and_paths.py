"""What a pretraining recipe refuses at load time, and how the pretraining script's flags reach it: a source key that
only another kind of source reads, paths under `~`, flag values taken as the flag's type (not read as YAML), a
recipe that leaves each stage's length to `--max_steps`, values the optimizer or the schedule would refuse only when
their stage starts, and a warmup longer than its stage."""

import sys

import pytest
import torch
import yaml

from imagebert_hf.training import build_accelerator, run_stage
from imagebert_hf.training.pretraining import check_resumed_recipe
from imagebert_hf.training.recipe import (
    POLYNOMIAL_LR_END,
    RecipeError,
    check_source_paths,
    recipe_from_dict,
    recipe_to_dict,
)

from .test_stage_runner import _settings, _stage
from .testing_utils import PROJECT_ROOT


TINY_RECIPE = PROJECT_ROOT / "examples" / "configs" / "pretrain_tiny_synthetic.yaml"

SYNTHETIC = {"name": "s", "type": "synthetic", "num_images": 8, "regions": "annotations"}
MANIFEST = {"name": "m", "type": "manifest", "path": "captions.jsonl", "region_cache": "regions"}
WEB = {"name": "w", "type": "webdataset", "path": "shards/{0..1}.tar", "region_cache": "regions"}
HF = {"name": "h", "type": "hf_dataset", "path": "saved", "region_cache": "regions"}


def recipe_with(*sources, **stage) -> dict:
    return {"report_to": "none", "stages": [{"name": "a", "sources": list(sources), "max_steps": 4, **stage}]}


def script_module():
    sys.path.insert(0, str(PROJECT_ROOT / "examples"))
    try:
        import run_pretraining
    finally:
        sys.path.pop(0)
    return run_pretraining


def run_script(flags: list[str], monkeypatch):
    """The recipe `examples/run_pretraining.py` would run with `flags` (the run itself is not started)."""
    script = script_module()
    captured = {}
    monkeypatch.setattr(script, "run_pretraining", lambda recipe, options: captured.update(recipe=recipe))
    script.main(flags)
    return captured["recipe"]


# --------------------------------------------------------------------------------------------------- source keys


@pytest.mark.parametrize(
    ("source", "message"),
    [
        (
            {**MANIFEST, "split": "train"},
            r"sources\[0\]\.split is 'train', but only an hf_dataset source reads it \(.*give `splits: \[train\]` "
            r"instead\)\. Source 'm' is a manifest source",
        ),
        (
            {**MANIFEST, "caption_noise": 0.5, "num_images": 2, "captions_per_image": 1},
            r"sources\[0\]\.caption_noise is 0.5, but only a synthetic source reads it; .*sources\[0\]\.num_images is "
            r"2, .*sources\[0\]\.captions_per_image is 1, .*manifest source, which would ignore them",
        ),
        ({**MANIFEST, "split": "test", "splits": ["train"]}, r"sources\[0\]\.split is 'test', but only an hf_dataset"),
        ({**MANIFEST, "seed": 7}, r"sources\[0\]\.seed is 7, but only a synthetic source or a stream"),
        ({**WEB, "seed": 7}, r"sources\[0\]\.seed is 7, .*Source 'w' is a webdataset source, which"),
        ({**SYNTHETIC, "max_captions_per_image": 1}, r"max_captions_per_image is 1, but only a manifest source"),
        ({**SYNTHETIC, "splits": ["train"]}, r"sources\[0\]\.splits is \['train'\], but only a manifest source"),
        ({**SYNTHETIC, "key_field": "id"}, r"sources\[0\]\.key_field is 'id', but only a manifest source"),
        ({**SYNTHETIC, "path": "x.jsonl"}, r"path is 'x.jsonl', but only a manifest, hf_dataset or webdataset source"),
        ({**WEB, "splits": ["train"]}, r"sources\[0\]\.splits is \['train'\].*is a webdataset source"),
        ({**WEB, "regions": "annotations"}, r"sources\[0\]\.regions is 'annotations', but only a synthetic source"),
        ({**HF, "splits": ["test"]}, r"sources\[0\]\.splits is \['test'\].*give `split: NAME` instead"),
        (
            {**HF, "streaming": True, "image_column": "img"},
            r"image_column is 'img', but only an hf_dataset source not read as a stream reads it\. Source 'h' is an? "
            r"hf_dataset source read as a stream",
        ),
    ],
)
def test_a_source_key_its_kind_does_not_read_is_refused_naming_key_and_source(source, message):
    with pytest.raises(RecipeError, match=message):
        recipe_from_dict(recipe_with(source))


def test_keys_at_their_default_and_keys_a_stream_reads_are_taken():
    recipe = recipe_from_dict(
        recipe_with(
            {**MANIFEST, "caption_noise": 0.0, "seed": 0, "splits": ["train"]},
            {**HF, "name": "h2"},
            {**WEB, "text_column": "captions"},
        )
    )
    manifest, dataset, _ = recipe.stages[0].sources
    assert manifest.splits == ["train"] and dataset.split == "train"
    streamed = recipe_from_dict(recipe_with({**HF, "streaming": True, "seed": 3, "split": "validation"}))
    assert (streamed.stages[0].sources[0].seed, streamed.stages[0].sources[0].split) == (3, "validation")


def test_the_recipe_yaml_of_a_run_reads_back_and_resumes(tmp_path):
    # It spells out every key of every source, at its value or default: `split: train` beside `splits` on a manifest.
    recipe = recipe_from_dict({**recipe_with(SYNTHETIC, MANIFEST, WEB), "output_dir": str(tmp_path)})
    written = recipe_to_dict(recipe)
    assert {source["split"] for source in written["stages"][0]["sources"]} == {"train"}
    assert recipe_to_dict(recipe_from_dict(written)) == written
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(written, sort_keys=False))
    check_resumed_recipe(recipe)


def test_samples_per_epoch_on_a_streamed_stage_is_refused():
    with pytest.raises(RecipeError, match=r"stages\[0\]\.samples_per_epoch is 100, but a stage over streaming"):
        recipe_from_dict(recipe_with({**WEB, "streaming": True}, samples_per_epoch=100))
    assert recipe_from_dict(recipe_with(WEB, samples_per_epoch=100)).stages[0].samples_per_epoch == 100


# --------------------------------------------------------------------------------------------------- paths under ~


def test_a_leading_tilde_is_the_home_folder_in_every_path_field(tmp_path, monkeypatch):
    home = tmp_path / "home"
    for folder in ("regions", "images", "init", "tok", "proc", "bert"):
        (home / folder).mkdir(parents=True)
    (home / "captions.jsonl").write_text("")
    monkeypatch.setenv("HOME", str(home))
    data = recipe_with(
        {**MANIFEST, "path": "~/captions.jsonl", "region_cache": "~/regions", "image_root": "~/images"},
        {**SYNTHETIC, "region_cache": "~/regions"},
    )
    data["output_dir"] = "~/run"
    data["model"] = {"init_from": "~/init", "tokenizer": "~/tok", "processor": "~/proc", "text_pretrained": "~/bert"}
    data["model"]["config_path"] = "~/config.json"
    recipe = recipe_from_dict(data)
    manifest, synthetic = recipe.stages[0].sources
    assert recipe.output_dir == str(home / "run")
    assert (manifest.path, manifest.region_cache, manifest.image_root, synthetic.region_cache) == (
        str(home / "captions.jsonl"),
        str(home / "regions"),
        str(home / "images"),
        str(home / "regions"),
    )
    model = recipe.model
    assert [model.init_from, model.tokenizer, model.processor, model.text_pretrained, model.config_path] == [
        str(home / name) for name in ("init", "tok", "proc", "bert", "config.json")
    ]
    check_source_paths(recipe)  # what is checked is what is used
    # Short names and Hub ids are left as they are.
    named = recipe_from_dict({**recipe_with(SYNTHETIC), "model": {"tokenizer": "synthetic", "init_from": "org/m"}})
    assert (named.model.tokenizer, named.model.init_from) == ("synthetic", "org/m")


def test_the_scripts_output_dir_flag_under_tilde_is_the_home_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    recipe = run_script(["--config", str(TINY_RECIPE), "--output_dir=~/px", "--max_steps", "1"], monkeypatch)
    assert recipe.output_dir == str(tmp_path / "px")


# --------------------------------------------------------------------------------------------------- flags


@pytest.mark.parametrize("folder", ["exp #2", "2024-05-01", "0x10", "yes", "null"])
def test_a_flag_value_is_taken_as_the_flags_type_not_as_yaml(folder, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    recipe = run_script(["--config", str(TINY_RECIPE), "--output_dir", folder, "--max_steps", "1"], monkeypatch)
    assert recipe.output_dir == folder


def test_set_still_reads_its_value_as_yaml(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    flags = ["--config", str(TINY_RECIPE), "--set", "stages.0.loss_weights={mlm: 0.5}", "stages.1.max_steps=0x10"]
    recipe = run_script(flags, monkeypatch)
    assert recipe.stages[0].loss_weights["mlm"] == 0.5 and recipe.stages[1].max_steps == 16


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--report_to", "no"], r"report_to is 'no'; expected 'none' or one of .* \(set by --report_to no\)\.$"),
        (
            ["--learning_rate", "5e-8", "--set", "stages.1.lr_scheduler_type=polynomial"],
            r"stages\[1\]\.learning_rate is 5e-08, but the polynomial schedule .* \(set by --learning_rate 5e-08\)",
        ),
    ],
)
def test_a_recipe_refusing_a_flags_value_names_the_flag(flags, message, tmp_path, monkeypatch):
    with pytest.raises(RecipeError, match=message):
        run_script(["--config", str(TINY_RECIPE), "--output_dir", str(tmp_path / "run"), *flags], monkeypatch)
    assert not (tmp_path / "run").exists()


def test_max_steps_completes_a_recipe_that_leaves_the_stage_lengths_to_it(tmp_path, monkeypatch):
    data = yaml.safe_load(TINY_RECIPE.read_text())
    for stage in data["stages"]:
        del stage["max_steps"]
    config = tmp_path / "no_lengths.yaml"
    config.write_text(yaml.safe_dump(data))
    recipe = run_script(
        ["--config", str(config), "--output_dir", str(tmp_path / "run"), "--max_steps", "2"], monkeypatch
    )
    assert [(stage.max_steps, stage.num_epochs) for stage in recipe.stages] == [(2, None), (2, None)]
    with pytest.raises(RecipeError, match=r"stages\[0\]: give exactly one of max_steps and num_epochs"):
        run_script(["--config", str(config), "--output_dir", str(tmp_path / "run")], monkeypatch)


# --------------------------------------------------------------------------------------------------- optimizer, schedule


@pytest.mark.parametrize("name", ["adam_beta1", "adam_beta2"])
def test_an_adam_beta_of_1_is_refused_at_load(name):
    with pytest.raises(RecipeError, match=rf"stages\[0\]\.{name} must be in \[0, 1\), got 1.0"):
        recipe_from_dict(recipe_with(SYNTHETIC, **{name: 1.0}))
    with pytest.raises(ValueError):  # what torch says when the stage starts
        torch.optim.AdamW(
            [torch.nn.Parameter(torch.zeros(1))], betas=(0.9, 1.0) if name == "adam_beta2" else (1.0, 0.9)
        )
    assert getattr(recipe_from_dict(recipe_with(SYNTHETIC, **{name: 0.0})).stages[0], name) == 0.0


def test_a_polynomial_schedule_needs_a_learning_rate_above_its_end_rate():
    from transformers import get_scheduler

    for rate in (POLYNOMIAL_LR_END, 5e-8):
        with pytest.raises(RecipeError, match=rf"stages\[0\]\.learning_rate is {rate!r}, but the polynomial"):
            recipe_from_dict(recipe_with(SYNTHETIC, lr_scheduler_type="polynomial", learning_rate=rate))
    recipe_from_dict(recipe_with(SYNTHETIC, lr_scheduler_type="polynomial", learning_rate=1e-6))
    recipe_from_dict(recipe_with(SYNTHETIC, lr_scheduler_type="linear", learning_rate=5e-8))
    # The end rate is transformers' own: it refuses the same learning rate when the stage starts.
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=POLYNOMIAL_LR_END)
    with pytest.raises(ValueError, match="lr_end"):
        get_scheduler("polynomial", optimizer=optimizer, num_warmup_steps=0, num_training_steps=4)


@pytest.mark.parametrize(("max_steps", "num_epochs"), [(3, None), (None, 1)])
def test_warmup_steps_longer_than_the_stage_are_named_in_a_warning_when_it_starts(tmp_path, max_steps, num_epochs):
    # A warning, not a refusal: a short trial of a recipe made for a long run (`--max_steps 20`) is legitimate, and
    # a run started by an earlier version resumes.
    from transformers.testing_utils import CaptureLogger

    from imagebert_hf.training import runner

    assert recipe_from_dict(recipe_with(SYNTHETIC, warmup_steps=5)).stages[0].warmup_steps == 5
    accelerator = build_accelerator(tmp_path, report_to="none", cpu=True)
    for warmup, warned in ((5, True), (3, False)):
        stage = _stage(tmp_path / f"stage{warmup}", max_steps=max_steps, num_epochs=num_epochs)  # 3 steps
        stage.schedule.warmup_steps = warmup
        with CaptureLogger(runner.logger) as captured:
            _, state = run_stage(accelerator, stage, _settings())
        assert state.completed_steps == 3
        expected = "stages[0].warmup_steps is 5, longer than the stage's 3 steps: the learning rate never reaches"
        assert (expected in captured.out) == warned, captured.out
    accelerator.free_memory()


@pytest.mark.parametrize("name", ["dtype", "torch_dtype"])
def test_a_model_config_dtype_which_training_would_ignore_is_refused(name):
    # The weights train in float32 whatever it says: a recipe asking bfloat16 here would get float32 without a word.
    with pytest.raises(RecipeError, match=rf"model\.config\.{name}: the weights train in float32 .*--mixed_precision"):
        recipe_from_dict({**recipe_with(SYNTHETIC), "model": {"tokenizer": "synthetic", "config": {name: "bfloat16"}}})


def test_a_run_whose_recipe_yaml_set_a_dtype_an_earlier_version_ignored_resumes(tmp_path):
    from imagebert_hf.training.recipe import recipe_to_dict

    recipe = recipe_from_dict(
        {**recipe_with(SYNTHETIC), "output_dir": str(tmp_path), "model": {"tokenizer": "synthetic"}}
    )
    written = recipe_to_dict(recipe)
    written["model"]["config"] = {"dtype": "bfloat16"}  # what an earlier version took, and trained in float32
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(written, sort_keys=False))
    check_resumed_recipe(recipe)
