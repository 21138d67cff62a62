"""Bad input at the recipe boundary: every field of the wrong type or out of range, keys given twice, sources whose
files do not exist and malformed overrides fail at load time with a `RecipeError` naming the field."""

import copy
import dataclasses
import json
import math
import re

import pytest
import yaml

from imagebert_hf.training.recipe import (
    ModelSpec,
    Recipe,
    RecipeError,
    SourceSpec,
    StageSpec,
    apply_overrides,
    load_recipe,
    recipe_from_dict,
)

from .testing_utils import PROJECT_ROOT


TINY = yaml.safe_load((PROJECT_ROOT / "examples" / "configs" / "pretrain_tiny_synthetic.yaml").read_text())
NESTED = {"stages", "sources", "model"}

# One value of the wrong type per annotation: a string where a list belongs must not become a list of characters.
WRONG_VALUES = {
    "str": [5, ["a"]],
    "int": ["three", 2.5, True],
    "float": ["fast", [1.0], math.nan],
    "bool": ["yes", 1],
    "list[str]": ["train", [1, 2]],
    "dict[str, float]": [[1.0], {"mlm": "high"}],
    "dict[str, Any]": [["hidden_size", 32]],
}


def _wrong_values(annotation: str):
    for option in annotation.split("|"):
        yield from WRONG_VALUES.get(option.strip(), [])


def _locate(recipe: dict, cls):
    """The mapping of `recipe` that builds `cls`, and the dotted path the error must name."""
    if cls is Recipe:
        return recipe, "recipe"
    if cls is ModelSpec:
        return recipe["model"], "recipe.model"
    if cls is StageSpec:
        return recipe["stages"][0], "recipe.stages[0]"
    return recipe["stages"][0]["sources"][0], "recipe.stages[0].sources[0]"


def _type_cases():
    for cls in (Recipe, ModelSpec, StageSpec, SourceSpec):
        for f in dataclasses.fields(cls):
            if f.name in NESTED:
                continue
            for value in _wrong_values(str(f.type)):
                if str(f.type).startswith("int") and isinstance(value, float) and "float" in str(f.type):
                    continue
                yield cls, f.name, value


RANGE_CASES = [
    (StageSpec, "per_device_train_batch_size", 0),
    (StageSpec, "gradient_accumulation_steps", -1),
    (StageSpec, "max_steps", 0),
    (StageSpec, "learning_rate", 0.0),
    (StageSpec, "learning_rate", -1e-4),
    (StageSpec, "warmup_ratio", 1.0),
    (StageSpec, "warmup_steps", -1),
    (StageSpec, "weight_decay", -0.01),
    (StageSpec, "adam_beta1", 1.5),
    (StageSpec, "adam_beta2", -0.1),
    (StageSpec, "adam_epsilon", 0.0),
    (StageSpec, "max_grad_norm", -1.0),
    (StageSpec, "samples_per_epoch", 0),
    (StageSpec, "mlm_probability", 1.5),
    (StageSpec, "region_mask_probability", -0.5),
    (StageSpec, "region_zero_probability", 2.0),
    (StageSpec, "itm_negative_probability", -0.1),
    (StageSpec, "text_negative_share", 1.1),
    (StageSpec, "length_group_pool", 0),
    (StageSpec, "lr_scheduler_type", "step"),
    (StageSpec, "loss_weights", {"mlm": -1.0}),
    (SourceSpec, "weight", -2.0),
    (SourceSpec, "num_images", 0),
    (SourceSpec, "caption_noise", 1.5),
    (SourceSpec, "first_image", -1),
    (SourceSpec, "image_size", 0),
    (SourceSpec, "captions_per_image", 0),
    (SourceSpec, "max_captions_per_image", 0),
    (SourceSpec, "type", "csv"),
    (SourceSpec, "regions", "detector"),
    (Recipe, "checkpointing_steps", 0),
    (Recipe, "save_total_limit", 0),
    (Recipe, "logging_steps", 0),
    (Recipe, "max_failure_rate", 1.5),
    (Recipe, "min_records_for_failure_check", -1),
    (Recipe, "num_workers", -2),
    (Recipe, "seed", -1),
    (Recipe, "seed", 2**32),
    (SourceSpec, "seed", -5),
]
MODEL_CONFIG_CASES = [
    ("hidden_size", 0),
    ("hidden_size", "32"),
    ("num_hidden_layers", -1),
    ("hidden_dropout_prob", 1.0),
    ("max_regions", 2.5),
    ("layer_norm_eps", 0.0),
]
CASES = [(cls, name, value) for cls, name, value in _type_cases()] + RANGE_CASES


@pytest.mark.parametrize(
    ("cls", "name", "value"), CASES, ids=[f"{cls.__name__}.{name}={value!r}" for cls, name, value in CASES]
)
def test_bad_field_fails_naming_it(cls, name, value):
    recipe = copy.deepcopy(TINY)
    mapping, where = _locate(recipe, cls)
    if name == "max_steps" or (cls is StageSpec and name == "num_epochs"):
        mapping.pop("max_steps", None)
    mapping[name] = value
    with pytest.raises(RecipeError) as info:
        recipe_from_dict(recipe)
    message = str(info.value)
    assert f"{where}.{name}" in message and ("got" in message or "expected" in message), message


@pytest.mark.parametrize(("name", "value"), MODEL_CONFIG_CASES, ids=[f"{n}={v!r}" for n, v in MODEL_CONFIG_CASES])
def test_bad_model_config_field_fails_at_load_time(name, value):
    recipe = copy.deepcopy(TINY)
    recipe["model"]["config"][name] = value
    with pytest.raises(RecipeError, match=rf"recipe\.model\.config\.{name} must be"):
        recipe_from_dict(recipe)


DUPLICATES = [
    ("top level", "seed: 1\nseed: 2\n", "seed", 2),
    ("model", "model:\n  tokenizer: a\n  tokenizer: b\n", "tokenizer", 3),
    ("model config", "model:\n  config:\n    hidden_size: 32\n    hidden_size: 64\n", "hidden_size", 4),
    (
        "stage",
        "stages:\n  - name: a\n    max_steps: 2\n    max_steps: 3\n",
        "max_steps",
        4,
    ),
    ("flow mapping", "stages:\n  - {name: a, sources: [{name: s, name: t}]}\n", "name", 2),
]


@pytest.mark.parametrize(("text", "key", "line"), [d[1:] for d in DUPLICATES], ids=[d[0] for d in DUPLICATES])
def test_a_key_given_twice_fails_naming_key_and_line(tmp_path, text, key, line):
    path = tmp_path / "dup.yaml"
    path.write_text(text)
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    assert f"dup.yaml:{line}: key {key!r} is given twice" in str(info.value)


def _written(tmp_path, recipe: dict):
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def _manifest_recipe(tmp_path, **source) -> dict:
    recipe = copy.deepcopy(TINY)
    recipe["stages"][0]["sources"] = [{"name": "m", "type": "manifest", "path": "x.jsonl", "region_cache": "c"}]
    recipe["stages"][0]["sources"][0].update(source)
    return recipe


def _ok_files(tmp_path):
    (tmp_path / "m.jsonl").write_text(json.dumps({"image": "a.jpg", "captions": ["x"]}) + "\n")
    (tmp_path / "cache").mkdir()
    (tmp_path / "shard-0.tar").write_bytes(b"")
    (tmp_path / "saved").mkdir()
    return {"path": str(tmp_path / "m.jsonl"), "region_cache": str(tmp_path / "cache")}


PATH_CASES = [
    ("missing manifest", {"path": "missing.jsonl"}, "sources[0].path", "missing.jsonl"),
    ("missing region cache", {"region_cache": "no_cache"}, "sources[0].region_cache", "imagebert-extract-regions"),
    ("missing image root", {"image_root": "no_images"}, "sources[0].image_root", "no_images"),
    ("missing shards", {"type": "webdataset", "path": "shard-{0..3}.tar"}, "sources[0].path", "shard-1.tar"),
    ("missing dataset", {"type": "hf_dataset", "path": "nothing_saved"}, "sources[0].path", "save_to_disk"),
]


@pytest.mark.parametrize(("edit", "field", "named"), [c[1:] for c in PATH_CASES], ids=[c[0] for c in PATH_CASES])
def test_a_missing_source_path_fails_at_load_time(tmp_path, monkeypatch, edit, field, named):
    monkeypatch.chdir(tmp_path)
    recipe = _manifest_recipe(tmp_path, **_ok_files(tmp_path))
    load_recipe(_written(tmp_path, recipe))  # the valid recipe loads
    if edit.get("type") == "webdataset":
        edit = {**edit, "path": str(tmp_path / edit["path"])}
    recipe["stages"][0]["sources"][0].update(edit)
    with pytest.raises(RecipeError) as info:
        load_recipe(_written(tmp_path, recipe))
    assert f"recipe.yaml.stages[0].{field}" in str(info.value) and named in str(info.value)
    load_recipe(_written(tmp_path, recipe), check_paths=False)  # the check can be left for later


@pytest.mark.parametrize("field", ["text_pretrained", "init_from", "tokenizer", "processor"])
def test_a_model_folder_that_is_missing_or_a_file_fails_at_load_time(tmp_path, monkeypatch, field):
    monkeypatch.chdir(tmp_path)
    recipe = _manifest_recipe(tmp_path, **_ok_files(tmp_path))
    recipe["model"] = {**recipe.get("model", {}), field: str(tmp_path / "saved")}
    load_recipe(_written(tmp_path, recipe))  # an existing folder (or a Hub id) passes
    for value, named in (("no/such/folder/here", "no such folder"), (str(tmp_path / "m.jsonl"), "is a file")):
        recipe["model"][field] = value
        with pytest.raises(RecipeError, match=rf"recipe\.yaml\.model\.{field}: .*{named}"):
            load_recipe(_written(tmp_path, recipe))


OVERRIDE_CASES = [
    ("stages.7.max_steps=3", "expected an index below 2"),
    ("stages.first.max_steps=3", "got 'first'"),
    ("seed.value=3", "seed is not a mapping"),
    ("stages.0.max_steps=[1", "not valid YAML"),
    ("stages.0.max_steps", "dotted.key=value"),
]


@pytest.mark.parametrize(("override", "named"), OVERRIDE_CASES, ids=[c[0] for c in OVERRIDE_CASES])
def test_a_bad_override_names_itself(override, named):
    with pytest.raises(RecipeError) as info:
        apply_overrides(TINY, [override])
    assert override in str(info.value) and named in str(info.value)


def test_invalid_yaml_names_the_file_on_one_line(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("stages:\n  - name: a\n  b: [1,\n")
    with pytest.raises(RecipeError, match="broken.yaml is not valid YAML") as info:
        load_recipe(path)
    # PyYAML's message spans lines; a script prints it as its one error line, with the line and column kept.
    assert "\n" not in str(info.value) and "line 3, column 3" in str(info.value)
    with pytest.raises(RecipeError, match="the value is not valid YAML") as info:
        apply_overrides(TINY, ["seed=[1,"])
    assert "\n" not in str(info.value)


def test_a_recipe_path_that_is_a_folder_or_not_text_is_named(tmp_path):
    with pytest.raises(IsADirectoryError, match=r"is a folder; expected a YAML recipe file\.$"):
        load_recipe(tmp_path)
    binary = tmp_path / "recipe.yaml"
    binary.write_bytes(b"stages:\n  - name: \xff\xfe\n")
    with pytest.raises(ValueError, match=r"recipe.yaml is not a UTF-8 text file; expected a YAML recipe file\.$"):
        load_recipe(binary)


@pytest.mark.parametrize(
    ("weights", "switched_off"),
    [
        ({"mlm": 0.0, "moc": 0.0, "mrfr": 0.0}, ["mlm_probability", "region_mask_probability"]),
        ({"mlm": 0.0}, ["mlm_probability"]),
        ({"moc": 0.0}, []),  # MRFR still predicts the masked regions
        ({"moc": 0.0, "mrfr": 0.0}, ["region_mask_probability"]),
        ({"itm": 0.0}, ["itm_negative_probability"]),
    ],
)
def test_a_task_at_weight_zero_changes_no_input_of_the_others(weights, switched_off):
    """Masked words or regions that no loss predicts, or mismatched pairs whose masked losses are skipped, only take
    signal from the tasks that train: a stage that leaves a task out does not change its inputs for it."""
    from transformers.testing_utils import CaptureLogger

    from imagebert_hf.training import recipe as recipe_module

    data = copy.deepcopy(TINY)
    data["stages"][0]["loss_weights"] = {**data["stages"][0].get("loss_weights", {}), **weights}
    with CaptureLogger(recipe_module.logger) as captured:
        stage = recipe_from_dict(data).stages[0]
    settings = ("mlm_probability", "region_mask_probability", "itm_negative_probability")
    assert [name for name in settings if getattr(stage, name) == 0.0] == switched_off
    for name in switched_off:
        assert f"{name} is " in captured.out and "set to 0" in captured.out


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"mlm_probability": 0.0}, r"mlm_probability is 0: no word is masked for MLM to predict"),
        (
            {"region_mask_probability": 0.0},
            r"region_mask_probability is 0: no region is masked for MOC to predict; region_mask_probability is 0: "
            r"no region is masked for MRFR",
        ),
        ({"itm_negative_probability": 0.0}, r"itm_negative_probability is 0.0: every pair is matched, so ITM learns"),
        (
            {"itm_negative_probability": 1.0},
            r"every pair is mismatched, so ITM learns one label; itm_negative_probability is 1: every pair is "
            r"mismatched, and the masked losses of mismatched pairs are skipped, so MLM, MOC, MRFR learn nothing",
        ),
    ],
)
def test_a_trained_task_whose_inputs_leave_it_no_targets_is_refused(settings, message):
    """The mirror of the switch-off above: a task at a weight above 0 that its stage's settings give nothing to
    learn would train silently on nothing (its loss missing at every step) or on one label."""
    data = copy.deepcopy(TINY)
    data["stages"][0].update(settings)
    with pytest.raises(RecipeError, match=r"stages\[0\]"):
        recipe_from_dict(data)
    with pytest.raises(RecipeError, match=message):
        recipe_from_dict(data)
    # The same settings with those tasks left out train the others.
    data["stages"][0]["loss_weights"] = {"mlm": 0.0, "moc": 0.0, "mrfr": 0.0, "itm": 1.0}
    if settings.get("itm_negative_probability") in (0.0, 1.0):
        data["stages"][0]["loss_weights"] = {"mlm": 1.0, "moc": 1.0, "mrfr": 1.0, "itm": 0.0}
    recipe_from_dict(data)


@pytest.mark.parametrize(
    ("name", "message"),
    [
        (
            "hiden_size",
            r"hiden_size is not a field of ImageBERTConfig, so it would do nothing\. Did you mean 'hidden_size'",
        ),
        ("position_embedding_type", "position_embedding_type is not a field of ImageBERTConfig"),
        ("mlm_probability", r"mlm_probability: the model never reads it; it is a stage's setting \(stages\[i\]"),
        (
            "itm_loss_weight",
            r"itm_loss_weight: each stage sets it from its loss_weights \(stages\[i\]\.loss_weights\.itm\)",
        ),
    ],
)
def test_a_model_config_key_that_would_do_nothing_is_refused_naming_where_it_belongs(name, message):
    recipe = copy.deepcopy(TINY)
    recipe["model"]["config"][name] = 0.5
    with pytest.raises(RecipeError, match=message):
        recipe_from_dict(recipe)


def test_a_run_an_earlier_version_started_with_a_task_at_weight_zero_is_not_resumed_with_its_inputs_changed(tmp_path):
    """Its recipe.yaml records the masking it trained with; read back, the rate would now be switched off on both
    sides of the comparison, and the resumed steps would mask otherwise than the first ones did."""
    from imagebert_hf.training.pretraining import check_resumed_recipe
    from imagebert_hf.training.recipe import recipe_to_dict

    data = copy.deepcopy(TINY)
    data["output_dir"] = str(tmp_path)
    data["stages"][0]["loss_weights"] = {"mlm": 0.0}
    recipe = recipe_from_dict(data)
    written = recipe_to_dict(recipe)
    check_resumed_recipe(recipe)  # no recipe.yaml yet: nothing to compare
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(written))
    check_resumed_recipe(recipe)  # written by this version: the same recipe
    written["stages"][0]["mlm_probability"] = 0.15  # as an earlier version wrote it
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(written))
    with pytest.raises(ValueError, match=r"stages\.0\.mlm_probability is 0\.15 there, 0\.0 now"):
        check_resumed_recipe(recipe)


def test_a_run_an_earlier_version_trained_with_a_task_without_targets_resumes_with_that_task_at_weight_zero(tmp_path):
    """An earlier version trained an ITM-only stage set up by its masking rates alone (MLM, MOC and MRFR at weight 1
    learned nothing); its recipe.yaml reads back as that run trained, so the recipe this version asks for resumes."""
    from imagebert_hf.training.pretraining import check_resumed_recipe
    from imagebert_hf.training.recipe import Recipe, SourceSpec, StageSpec, recipe_to_dict

    source = SourceSpec(name="s", type="synthetic", num_images=8, regions="annotations")
    written = StageSpec(name="a", sources=[source], max_steps=20, mlm_probability=0.0, region_mask_probability=0.0)
    written.loss_weights = dict.fromkeys(("mlm", "moc", "mrfr", "itm"), 1.0)
    (tmp_path / "recipe.yaml").write_text(
        yaml.safe_dump(recipe_to_dict(Recipe(stages=[written], output_dir=str(tmp_path))), sort_keys=False)
    )
    asked = {
        "output_dir": str(tmp_path),
        "stages": [
            {
                "name": "a",
                "max_steps": 20,
                "sources": [{"name": "s", "type": "synthetic", "num_images": 8, "regions": "annotations"}],
                "mlm_probability": 0.0,
                "region_mask_probability": 0.0,
                "loss_weights": {"mlm": 0.0, "moc": 0.0, "mrfr": 0.0, "itm": 1.0},
            }
        ],
    }
    check_resumed_recipe(recipe_from_dict(asked))
    asked["stages"][0]["loss_weights"]["itm"] = 0.5  # a real change is still refused
    with pytest.raises(ValueError, match=r"holds a run of another recipe: stages\.0\.loss_weights\.itm is 1\.0 there"):
        check_resumed_recipe(recipe_from_dict(asked))


@pytest.mark.parametrize(
    "source",
    [
        {"type": "webdataset", "path": "shards/{00000..00001}.tar", "region_cache": "regions"},
        {"type": "synthetic", "num_images": 4, "regions": "annotations"},
    ],
)
def test_split_at_its_default_is_taken_on_sources_that_do_not_read_it(source):
    # Only a manifest's `split` means something it does not do (keep one split: its key is `splits`).
    stage = {"name": "a", "max_steps": 1, "sources": [{"name": "s", "split": "train", **source}]}
    recipe_from_dict({"output_dir": "out", "stages": [stage]})
    stage["sources"][0]["split"] = "test"
    with pytest.raises(RecipeError, match=r"split is 'test', but only an hf_dataset source reads it"):
        recipe_from_dict({"output_dir": "out", "stages": [stage]})


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"lr_scheduler_type": "constant", "warmup_ratio": 0.1}, "'constant' has no warmup, so its warmup_ratio 0.1"),
        ({"lr_scheduler_type": "constant", "warmup_steps": 3}, "'constant' has no warmup, so its warmup_steps 3"),
        ({"warmup_steps": 3, "warmup_ratio": 0.1}, "gives warmup_steps 3 and warmup_ratio 0.1; the steps would"),
    ],
)
def test_warmup_settings_the_schedule_would_ignore_are_refused(settings, message):
    recipe = copy.deepcopy(TINY)
    del recipe["stages"][0]["warmup_steps"]
    recipe["stages"][0].update(settings)
    with pytest.raises(
        RecipeError, match=re.escape(f"recipe.stages[0]{'.lr_scheduler_type' * ('constant' in message)}")
    ):
        recipe_from_dict(recipe)
    with pytest.raises(RecipeError, match=re.escape(message)):
        recipe_from_dict(recipe)
    recipe["stages"][0].update(lr_scheduler_type="constant_with_warmup", warmup_ratio=0.0)
    recipe_from_dict(recipe)


@pytest.mark.parametrize("output_dir", ["", "  "])
def test_an_empty_output_dir_in_a_recipe_is_refused(output_dir):
    recipe = {**copy.deepcopy(TINY), "output_dir": output_dir}
    with pytest.raises(
        RecipeError, match=re.escape(f"recipe.output_dir must be a non-empty path, got {output_dir!r}")
    ):
        recipe_from_dict(recipe)
