import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from dataclasses import fields
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from imagebert_hf.training import (
    PretrainingArguments,
    PretrainingRunOptions,
    RecipeError,
    TooManyFailedRecords,
    TrainState,
    latest_checkpoint,
    load_recipe,
    recipe_from_dict,
    run_pretraining,
)
from imagebert_hf.training import pretraining as pretraining_module

from .testing_utils import PROJECT_ROOT


TINY_RECIPE = PROJECT_ROOT / "examples" / "configs" / "pretrain_tiny_synthetic.yaml"
RUN_PRETRAINING = PROJECT_ROOT / "examples" / "run_pretraining.py"


def tiny_recipe(output_dir, **top_level) -> dict:
    data = yaml.safe_load(TINY_RECIPE.read_text())
    data["output_dir"] = str(output_dir)
    data["report_to"] = "none"
    data.update(top_level)
    return data


def final_weights(run_dir) -> dict[str, torch.Tensor]:
    return load_file(Path(run_dir) / "stage2-clean" / "final" / "model.safetensors")


def history(run_dir) -> list[dict]:
    return TrainState.load(Path(run_dir) / "stage2-clean" / "final").history


def script_env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(PROJECT_ROOT / "src") + os.pathsep + env.get("PYTHONPATH", "")
    env["OMP_NUM_THREADS"] = "1"
    env.pop("ACCELERATE_USE_CPU", None)
    return env


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # Tiny models gain nothing from threads, and extra threads crawl when the CI cores are shared.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# --------------------------------------------------------------------------------------------------- recipes


def test_shipped_recipes_are_valid():
    for path in sorted((PROJECT_ROOT / "examples" / "configs").glob("pretrain_*.yaml")):
        # The paper's and the real-data recipes name data and caches that are built elsewhere.
        recipe = load_recipe(path, check_paths=False)
        assert recipe.stages, path
    paper = load_recipe(PROJECT_ROOT / "examples" / "configs" / "pretrain_paper_lait_ccsbu.yaml", check_paths=False)
    assert [stage.name for stage in paper.stages] == ["lait", "cc_sbu"]
    assert {source.name for source in paper.stages[1].sources} == {"conceptual_captions", "sbu"}
    assert paper.model.config["max_regions"] == 100 and paper.model.config["max_text_length"] == 44
    for stage in paper.stages:
        # The paper's global batch of 48 on 4 GPUs.
        assert stage.per_device_train_batch_size * stage.gradient_accumulation_steps * 4 == 48
        assert stage.learning_rate == 1e-4


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda r: r.update(colour="red"), r"unknown key\(s\) \['colour'\]"),
        (lambda r: r["stages"][0].update(max_step=3), r"stages\[0\]: unknown key\(s\) \['max_step'\]"),
        (lambda r: r["stages"][1].pop("sources"), r"stages\[1\]: missing required key\(s\) \['sources'\]"),
        (lambda r: r["stages"][0].update(sources=[]), r"stages\[0\]\.sources must be a non-empty list"),
        (lambda r: r["stages"][0].update(max_steps=0), r"stages\[0\]\.max_steps must be a positive integer"),
        (lambda r: r["stages"][0].update(num_epochs=2), r"stages\[0\]: give exactly one of max_steps and num_epochs"),
        (lambda r: r["stages"][1]["sources"][1].update(weight=0), r"stages\[1\]\.sources\[1\]\.weight must be"),
        (lambda r: r["stages"][0]["sources"][0].update(type="csv"), r"sources\[0\]\.type is 'csv'"),
        (lambda r: r["stages"][0].update(loss_weights={"nsp": 1.0}), r"loss_weights: unknown task\(s\) \['nsp'\]"),
        (lambda r: r["stages"][0].update(learning_rate=0), r"stages\[0\]\.learning_rate must be positive"),
        (
            lambda r: r["stages"][0]["sources"][0].update(type="manifest", path="x.jsonl", regions=None),
            r"sources\[0\]\.region_cache is required",
        ),
        (lambda r: r.pop("stages"), r"missing required key\(s\) \['stages'\]"),
        (
            lambda r: r["stages"][0].update(group_by_length="yes"),
            r"stages\[0\]\.group_by_length must be true or false",
        ),
        (lambda r: r["stages"][1].update(length_group_pool=0), r"stages\[1\]\.length_group_pool must be a positive"),
    ],
)
def test_bad_recipes_fail_fast_naming_the_field(tmp_path, edit, message):
    recipe = tiny_recipe(tmp_path)
    edit(recipe)
    with pytest.raises(RecipeError, match=message):
        recipe_from_dict(recipe)


def test_overrides_and_every_flag_has_help(tmp_path):
    recipe = load_recipe(TINY_RECIPE, ["stages.1.max_steps=3", "model.config.hidden_size=16", "seed=7"])
    assert recipe.stages[1].max_steps == 3 and recipe.model.config["hidden_size"] == 16 and recipe.seed == 7
    with pytest.raises(RecipeError, match="dotted.key=value"):
        load_recipe(TINY_RECIPE, ["stages.1.max_steps"])
    for flag in fields(PretrainingArguments):
        assert flag.metadata.get("help"), f"--{flag.name} has no help text"


def test_cli_flags_override_the_recipe(tmp_path, monkeypatch):
    sys.path.insert(0, str(RUN_PRETRAINING.parent))
    try:
        import run_pretraining as script
    finally:
        sys.path.pop(0)
    captured = {}
    monkeypatch.setattr(
        script, "run_pretraining", lambda recipe, options: captured.update(recipe=recipe, options=options)
    )
    script.main(
        ["--config", str(TINY_RECIPE), "--output_dir", str(tmp_path), "--max_steps", "2", "--learning_rate", "0.1"]
        + ["--resume", "--gradient_checkpointing", "--set", "stages.0.per_device_train_batch_size=2"]
    )
    recipe, options = captured["recipe"], captured["options"]
    assert recipe.output_dir == str(tmp_path)
    assert [stage.max_steps for stage in recipe.stages] == [2, 2]
    assert all(stage.learning_rate == 0.1 for stage in recipe.stages)
    assert recipe.stages[0].per_device_train_batch_size == 2
    assert options.resume and options.gradient_checkpointing


# --------------------------------------------------------------------------------------------------- runs


def test_optimizer_skips_decay_on_biases_and_layernorm_and_matches_plain_adamw(make_tiny_config):
    from imagebert_hf import ImageBERTForPreTraining
    from imagebert_hf.training import build_optimizer

    torch.manual_seed(0)
    model = ImageBERTForPreTraining(make_tiny_config())
    reference = ImageBERTForPreTraining(model.config)
    reference.load_state_dict(model.state_dict())
    optimizer = build_optimizer(model, 1e-2, weight_decay=0.1)
    assert optimizer.defaults["fused"] is True
    decay, no_decay = optimizer.param_groups
    names = {id(p): n for n, p in model.named_parameters()}
    assert all(p.ndim >= 2 and "LayerNorm" not in names[id(p)] for p in decay["params"]) and decay["weight_decay"]
    assert any("LayerNorm" in names[id(p)] for p in no_decay["params"]) and no_decay["weight_decay"] == 0.0
    # The fused kernel computes what torch's plain loop does.
    plain = torch.optim.AdamW(
        [
            {"params": [dict(reference.named_parameters())[names[id(p)]] for p in group["params"]],
             "weight_decay": group["weight_decay"]}
            for group in (decay, no_decay)
        ],
        lr=1e-2, foreach=False,
    )  # fmt: skip
    for step in range(3):
        for net, opt in ((model, optimizer), (reference, plain)):
            torch.manual_seed(step)
            net(input_ids=torch.randint(5, 30, (2, 6)), labels=torch.randint(5, 30, (2, 6))).loss.backward()
            opt.step()
            opt.zero_grad()
    for (name, a), b in zip(model.named_parameters(), reference.parameters()):
        # A key bias shifts every score of a query alike, so softmax gives it no gradient, only rounding noise, which
        # Adam's normalisation blows up into full steps of either sign.
        if not name.endswith("key.bias"):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    """An uninterrupted run of the tiny recipe, in this process."""
    output_dir = tmp_path_factory.mktemp("reference")
    result = run_pretraining(recipe_from_dict(tiny_recipe(output_dir)))
    return output_dir, result


def test_two_stage_run_writes_models_checkpoints_and_plot(reference_run):
    from imagebert_hf import ImageBERTForImageTextRetrieval, ImageBERTForPreTraining

    output_dir, result = reference_run
    assert result["steps_per_stage"] == [6, 6]
    for stage in ("stage1-noisy", "stage2-clean"):
        final = output_dir / stage / "final"
        assert (final / "model.safetensors").is_file() and (final / "tokenizer.json").is_file()
        assert (final / "stage_complete.json").is_file()
        # A checkpoint at the stage end, and the older ones rotated out beyond save_total_limit=2.
        checkpoints = sorted(p.name for p in (output_dir / stage / "checkpoints").iterdir())
        assert checkpoints == ["step_00000004", "step_00000006"]
    model = ImageBERTForPreTraining.from_pretrained(output_dir / "stage2-clean" / "final")
    assert model.config.mrfr_loss_weight == 0.5 and model.config.mlm_loss_weight == 1.0
    ImageBERTForImageTextRetrieval.from_pretrained(output_dir / "stage2-clean" / "final")
    assert (output_dir / "losses.png").stat().st_size > 1000
    steps = [entry["step"] for entry in result["history"]]
    assert steps == list(range(1, 13))
    assert {entry["stage"] for entry in result["history"]} == {"noisy", "clean"}
    for entry in result["history"]:
        for task in ("mlm", "mrfr", "itm"):
            assert entry[task] is not None and entry[task] > 0
    # The synthetic whole-image region has no class: a batch whose few masked regions are all of that kind has no
    # MOC target, and logs None rather than a made-up zero.
    moc = [entry["moc"] for entry in result["history"]]
    assert sum(value is not None for value in moc) >= len(moc) - 2 and all(v > 0 for v in moc if v is not None)


def test_stage_two_starts_from_stage_one_weights(tmp_path):
    recipe = tiny_recipe(tmp_path, checkpointing_steps=None)
    recipe["stages"][0]["max_steps"] = 2
    recipe["stages"][1].update(max_steps=1, learning_rate=1e-12, weight_decay=0.0)
    run_pretraining(recipe_from_dict(recipe))
    first = load_file(tmp_path / "stage1-noisy" / "final" / "model.safetensors")
    second = load_file(tmp_path / "stage2-clean" / "final" / "model.safetensors")
    # A recipe without checkpoints gets no end-of-stage one either (a training state 3.5 times the model's).
    assert not list(tmp_path.glob("stage*/checkpoints/step_*"))
    assert first.keys() == second.keys()
    for key in first:
        torch.testing.assert_close(first[key], second[key], atol=1e-6, rtol=0)


def test_interrupted_checkpoint_write_leaves_the_last_good_one(tmp_path, monkeypatch):
    recipe = tiny_recipe(tmp_path, checkpointing_steps=2)
    recipe["stages"] = recipe["stages"][:1]
    from accelerate import Accelerator

    original = Accelerator.save_state
    calls = {"count": 0}

    def dying_save_state(self, output_dir=None, **kwargs):
        calls["count"] += 1
        if calls["count"] == 2:
            Path(output_dir).mkdir(parents=True, exist_ok=True)
            (Path(output_dir) / "model.safetensors").write_bytes(b"half a file")
            raise KeyboardInterrupt("killed while writing")
        return original(self, output_dir, **kwargs)

    monkeypatch.setattr(Accelerator, "save_state", dying_save_state)
    with pytest.raises(KeyboardInterrupt):
        run_pretraining(recipe_from_dict(recipe))
    checkpoints = tmp_path / "stage1-noisy" / "checkpoints"
    assert latest_checkpoint(checkpoints).name == "step_00000002"
    assert any(path.name.startswith(".tmp-") for path in checkpoints.iterdir())
    monkeypatch.setattr(Accelerator, "save_state", original)
    result = run_pretraining(recipe_from_dict(recipe), PretrainingRunOptions(resume=True))
    assert result["steps_per_stage"] == [6]
    assert not any(path.name.startswith(".tmp-") for path in checkpoints.iterdir())


@pytest.fixture
def fresh_accelerate_state():
    # Accelerate keeps one process-wide state; a run with other precision settings needs it cleared.
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


def test_gradient_checkpointing_and_bf16_flags(tmp_path, fresh_accelerate_state):
    recipe = tiny_recipe(tmp_path, checkpointing_steps=None)
    recipe["stages"] = recipe["stages"][:1]
    recipe["stages"][0]["max_steps"] = 2
    result = run_pretraining(
        recipe_from_dict(recipe), PretrainingRunOptions(gradient_checkpointing=True, mixed_precision="bf16")
    )
    assert all(torch.isfinite(torch.tensor(entry["loss"])) for entry in result["history"])
    from imagebert_hf import ImageBERTForPreTraining

    model = ImageBERTForPreTraining.from_pretrained(tmp_path / "stage1-noisy" / "final")
    assert model.dtype == torch.float32


def test_an_existing_run_needs_resume(reference_run):
    output_dir, _ = reference_run
    with pytest.raises(FileExistsError, match="--resume"):
        run_pretraining(recipe_from_dict(tiny_recipe(output_dir)))


def test_failed_records_are_counted_and_stop_the_run_past_the_rate(tmp_path, monkeypatch):
    original = pretraining_module.build_source

    def lossy_source(spec, feature_size):
        source, store = original(spec, feature_size)
        for key in source.image_keys()[: len(source.image_keys()) // 4]:
            store.pop(key)
        return source, store

    monkeypatch.setattr(pretraining_module, "build_source", lossy_source)
    recipe = tiny_recipe(tmp_path / "strict", max_failure_rate=0.05, checkpointing_steps=None)
    with pytest.raises(TooManyFailedRecords, match=r"failed to load in stage 'noisy'.*max_failure_rate=5\.0%"):
        run_pretraining(recipe_from_dict(recipe))
    recipe = tiny_recipe(tmp_path / "lenient", max_failure_rate=0.5, checkpointing_steps=None)
    recipe["stages"] = recipe["stages"][:1]
    run_pretraining(recipe_from_dict(recipe))
    state = TrainState.load(tmp_path / "lenient" / "stage1-noisy" / "final")
    assert 0.1 < state.records_failed / state.records_seen < 0.4
    assert state.records_seen >= 6 * 8


def _checkpointed(process, output_dir: Path, step: int, timeout: float = 240) -> bool:
    """Waits until the run has a checkpoint at run-wide `step` or later, then a random moment more (mid-step);
    False if the run ended or the time ran out first."""
    deadline = time.time() + timeout
    while process.poll() is None and time.time() < deadline:
        states = sorted(output_dir.glob("stage*/checkpoints/step_*/trainer_state.json"))
        reached = max(
            (json.loads(p.read_text())["global_step_offset"] + int(p.parent.name[5:]) for p in states), default=0
        )
        if reached >= step:
            time.sleep(random.uniform(0.0, 0.3))
            return True
        time.sleep(0.02)
    return False


def test_kill_9_at_a_random_step_then_resume_gives_the_same_weights(reference_run, tmp_path):
    reference_dir, _ = reference_run
    output_dir = tmp_path / "killed"
    command = [sys.executable, str(RUN_PRETRAINING), "--config", str(TINY_RECIPE), "--output_dir", str(output_dir)]
    command += ["--report_to", "none", "--checkpointing_steps", "2"]
    # Kill once the run has reached a random point past its first checkpoint (stage 1 or 2), mid-step.
    kill_after = random.Random().randint(2, 10)
    process = subprocess.Popen(command, env=script_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    if _checkpointed(process, output_dir, kill_after):
        process.send_signal(signal.SIGKILL)
    process.wait(timeout=60)
    assert process.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    resumed = subprocess.run(command + ["--resume"], env=script_env(), capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    reference, weights = final_weights(reference_dir), final_weights(output_dir)
    assert reference.keys() == weights.keys()
    for key in reference:
        torch.testing.assert_close(weights[key], reference[key], atol=1e-6, rtol=1e-5, msg=f"{key} differs")
    assert [e["loss"] for e in history(output_dir)] == pytest.approx(
        [e["loss"] for e in history(reference_dir)], rel=1e-5
    )


def test_sigterm_to_the_job_saves_a_checkpoint_and_the_resumed_run_gives_the_same_weights(reference_run, tmp_path):
    """As a scheduler preempts a job: SIGTERM to every process of the run, data worker included, at a random
    point. The run saves a checkpoint at the end of its step and exits with status 3; resumed, it ends as the run
    never stopped."""
    reference_dir, _ = reference_run
    output_dir = tmp_path / "preempted"
    command = [sys.executable, str(RUN_PRETRAINING), "--config", str(TINY_RECIPE), "--output_dir", str(output_dir)]
    command += ["--report_to", "none", "--checkpointing_steps", "3", "--num_workers", "1"]
    signal_after = random.Random().randint(3, 6)  # stage 1 (its checkpoints: 3, 6), far from the run's end
    process = subprocess.Popen(command, env=script_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                               text=True, start_new_session=True)  # fmt: skip
    if _checkpointed(process, output_dir, signal_after):
        os.killpg(process.pid, signal.SIGTERM)
    stderr = process.communicate(timeout=120)[1]
    assert process.returncode == 3, stderr[-3000:]
    stopped = re.search(r"stopped on SIGTERM (after|before) ([^\n]*); continue with --resume", stderr)
    assert stopped, stderr[-3000:]
    if stopped.group(1) == "after":  # mid-stage (else between two stages, with the first one's final saved)
        step = int(re.match(r"run-wide step (\d+) ", stopped.group(2)).group(1))
        checkpoint = Path(re.search(r"\(checkpoint (\S+) saved\)", stderr).group(1))
        state = TrainState.load(checkpoint)
        assert state.global_step_offset + state.completed_steps == step
    else:
        assert stopped.group(2) in ("stage 2 (clean), nothing left to save", "run-wide step 7, nothing left to save")
    resumed = subprocess.run(command + ["--resume"], env=script_env(), capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    reference, weights = final_weights(reference_dir), final_weights(output_dir)
    for key in reference:
        torch.testing.assert_close(weights[key], reference[key], atol=1e-6, rtol=1e-5, msg=f"{key} differs")


def test_two_cpu_processes_match_one_at_the_same_global_batch(reference_run, tmp_path):
    reference_dir, _ = reference_run
    output_dir = tmp_path / "ddp"
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", str(RUN_PRETRAINING),
        "--config", str(TINY_RECIPE), "--output_dir", str(output_dir), "--report_to", "none",
        # Half the per-process batch: the same 8 samples per optimizer step, split over the two processes.
        "--per_device_train_batch_size", "4",
    ]  # fmt: skip
    result = subprocess.run(command, env=script_env(), capture_output=True, text=True, timeout=400)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "global batch 8" in result.stdout
    single, double = history(reference_dir), history(output_dir)
    assert [e["step"] for e in single] == [e["step"] for e in double]
    for task in ("mlm", "moc", "mrfr", "itm"):
        # A step without targets for a task (MOC, now and then) logs None in both runs.
        assert [e[task] is None for e in double] == [e[task] is None for e in single], task
        # Step 1 sees identical weights and samples: only float summation order differs.
        if single[0][task] is not None:
            assert double[0][task] == pytest.approx(single[0][task], rel=1e-4), task
        # Later steps average gradients per process rather than per target, so they drift a little.
        for a, b in zip(single, double):
            if a[task] is not None:
                assert b[task] == pytest.approx(a[task], rel=0.05), (task, a["step"])
    assert [e["lr"] for e in double] == pytest.approx([e["lr"] for e in single])


def test_sigterm_to_two_processes_stops_both_after_the_same_step_and_the_run_resumes(tmp_path):
    """Under `accelerate launch`, the launcher passes SIGTERM on to its processes, which may see it at different
    points: they agree through the step's reduction (a disagreement would hang a collective), stop together, and
    the resumed run finishes both stages."""
    output_dir = tmp_path / "ddp"
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", str(RUN_PRETRAINING),
        "--config", str(TINY_RECIPE), "--output_dir", str(output_dir), "--report_to", "none",
        "--per_device_train_batch_size", "4", "--checkpointing_steps", "2", "--cpu",
    ]  # fmt: skip
    process = subprocess.Popen(command, env=script_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                               text=True, start_new_session=True)  # fmt: skip
    deadline = time.time() + 240
    while process.poll() is None and time.time() < deadline:
        if list(output_dir.glob("stage1-noisy/checkpoints/step_00000002/trainer_state.json")):
            time.sleep(random.uniform(0.0, 0.3))
            os.killpg(process.pid, signal.SIGTERM)
            break
        time.sleep(0.02)
    stderr = process.communicate(timeout=120)[1]
    assert process.returncode != 0, "the run ended before the signal"
    stops = re.findall(r"stopped on SIGTERM (?:after|before) [^,(]+", stderr)
    assert len(stops) == 2 and stops[0] == stops[1], stderr[-3000:]
    resumed = subprocess.run(command + ["--resume"], env=script_env(), capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert TrainState.load(output_dir / "stage2-clean" / "final").completed_steps == 6


# --------------------------------------------------------------------------------------------------- examples


def _demo_module():
    sys.path.insert(0, str(PROJECT_ROOT / "examples"))
    try:
        import demo
    finally:
        sys.path.pop(0)
    return demo


@pytest.mark.examples
def test_demo_runs_end_to_end_small(tmp_path, capsys):
    demo = _demo_module()
    summary = demo.main(
        ["--output_dir", str(tmp_path / "demo"), "--num_train_images", "48", "--num_test_images", "12"]
        + ["--noisy_steps", "3", "--clean_steps", "3", "--batch_size", "8", "--report_to", "none"]
    )
    printed = capsys.readouterr().out
    assert "| chance |" in printed and "| after stage2-clean |" in printed
    results = summary["results"]
    assert set(results) == {"chance", "untrained", "after stage1-noisy_web", "after stage2-clean"}
    assert results["chance"]["ir_r10"] == pytest.approx(100 * 10 / 12)
    for metrics in results.values():
        assert set(metrics) >= {"tr_r1", "tr_r5", "tr_r10", "ir_r1", "ir_r5", "ir_r10", "rsum"}
    assert summary["steps_per_stage"] == [3, 3]
    for path in (
        "pretraining/losses.png",
        "retrieval.png",
        "results.json",
        "pretraining/stage2-clean/final/config.json",
    ):
        assert (tmp_path / "demo" / path).is_file(), path


def test_demo_retrieval_is_clearly_better_than_chance(tmp_path):
    demo = _demo_module()
    results = demo.main(["--output_dir", str(tmp_path / "demo"), "--report_to", "none"])["results"]
    final, chance = results["after stage2-clean"], results["chance"]
    for key in ("tr_r5", "tr_r10", "ir_r5", "ir_r10"):
        assert final[key] > 3 * chance[key], (key, final[key], chance[key])
    assert final["rsum"] > results["after stage1-noisy_web"]["rsum"]


def test_recipe_reads_exponent_floats_and_rejects_words():
    from imagebert_hf.training.recipe import RecipeError, apply_overrides, recipe_from_dict

    data = {
        "stages": [
            {
                "name": "s",
                "sources": [{"name": "a", "type": "synthetic", "num_images": 8, "regions": "annotations"}],
                "max_steps": 2,
                "learning_rate": 1.0,
            }
        ]
    }
    recipe = recipe_from_dict(apply_overrides(data, ["stages.0.learning_rate=3e-4"]))
    assert recipe.stages[0].learning_rate == pytest.approx(3e-4)
    with pytest.raises(RecipeError, match=r"stages\[0\]\.learning_rate must be a number"):
        recipe_from_dict(apply_overrides(data, ["stages.0.learning_rate=fast"]))
