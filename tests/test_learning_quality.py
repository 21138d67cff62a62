"""Learning quality as a feature: pretraining must learn to match captions to images, not only run.

The fast guard trains the shipped recipe `examples/configs/learning_quality_synthetic.yaml` (a small model on the
generated shapes set) and ranks held-out images zero-shot with its ITM head; the slow one runs the shipped
real-photo example on Flickr8k. Both floors come from measured runs (docs/pretraining.md, "Learning-quality
guards"), with a margin, so a change that slows or breaks learning fails here instead of in a user's run.
"""

import json
import math
import os
import runpy
import subprocess
import sys

import pytest

from imagebert_hf.evaluation.zero_shot import chance_metrics, synthetic_retrieval_inputs, zero_shot_retrieval
from imagebert_hf.training import PretrainingRunOptions, load_recipe, run_pretraining

from .testing_utils import PROJECT_ROOT, SHARED_DATA, require_shared_data


GUARD_RECIPE = PROJECT_ROOT / "examples" / "configs" / "learning_quality_synthetic.yaml"
HELD_OUT_IMAGES = 100
# Ten seeds of the guard recipe (one thread; docs/learning_quality/synthetic_plateau.jsonl): all left the ITM plateau
# by step 280-675 and reached held-out RSUM 233.5-512.5 (chance 31.7); the run here (seed 0) leaves it at step 400
# and reaches 398.0. Runs that never leave it (ITM alone, or lr 1e-3 in 6 of 10 seeds) rank 6.5-109.5, one at 204.5
# with an ITM loss of 0.655. On an earlier code version one seed in ten never left it, so a change that reshuffles
# the random draws can fail here by chance: rerun with another seed before concluding (docs/pretraining.md).
SYNTHETIC_RSUM_FLOOR = 200.0
SYNTHETIC_ITM_CEILING = 0.62
# Every pretraining task must train, not only the matching it helps: a run with MLM silently off matched better
# (held-out RSUM 427.5, ITM 0.308) while its MLM head never learned. Over ten seeds of the guard recipe (one thread),
# the mean loss of the last 100 steps over that of the first 100 was 0.20-0.33 for MLM, 0.23-0.69 for MOC and
# 0.19-0.65 for MRFR (seed 0: 0.29, 0.47, 0.42), with every task logged at every logged step; a task that stays on
# but stops learning sits near 1.
SYNTHETIC_TASK_LOSS_RATIO_CEILINGS = {"mlm": 0.6, "moc": 0.85, "mrfr": 0.85}
# The shipped real-photo example (region alignment warm start, 300 steps of ITM alone at lr 1e-4, ten epochs of all
# four tasks), seeds 42, 1, 2, 3, 4 (docs/learning_quality/itm_stage/): the ITM loss over steps 126-150 is 0.328,
# 0.422, 0.423, 0.361, 0.343, and the dev RSUM after the ten-epoch stage 319.5, 337.2, 318.6, 347.8, 309.7 (mean
# 326.5, std 15.5; chance 28.3). The recipe before the warm start and the ITM stage held the ITM loss at 0.69-0.70
# there in all six seeds measured and ranked at 130.1-214.2 after its ten-epoch stage, so it fails both checks. An
# ITM stage whose [CLS] output collapses fails the first (at lr 2e-4 on one of the six warm starts tried: 0.66 over
# steps 126-150).
REAL_ITM_CEILING_BY_STEP_150 = 0.6
REAL_RSUM_FLOOR = 240.0


def held_out_synthetic_inputs(recipe):
    """Captions and annotation regions of the shapes images generated after the training ones (same generator)."""
    source = recipe.stages[0].sources[0]
    return synthetic_retrieval_inputs(
        source.num_images, HELD_OUT_IMAGES, source.seed, recipe.model.config["region_feature_size"]
    )


def mean_task_loss(history, task: str, last: bool, steps: int = 100) -> float:
    """A task's mean logged loss over the first or the last `steps` steps of a run."""
    final_step = history[-1]["step"]
    window = [
        entry[task] for entry in history if (entry["step"] > final_step - steps if last else entry["step"] <= steps)
    ]
    return sum(window) / len(window)


def mean_itm_loss(history, last_steps: int) -> float:
    final_step = history[-1]["step"]
    values = [entry["itm"] for entry in history if entry["step"] > final_step - last_steps and "itm" in entry]
    return sum(values) / len(values)


def test_synthetic_pretraining_learns_to_match(tmp_path, one_thread):
    recipe = load_recipe(GUARD_RECIPE, [f"output_dir={tmp_path}"])
    run = run_pretraining(recipe, PretrainingRunOptions())
    text_inputs, region_inputs, text_to_image = held_out_synthetic_inputs(recipe)
    metrics = zero_shot_retrieval(run["final_model"], text_inputs, region_inputs, text_to_image, progress=False)
    chance = chance_metrics(text_to_image)["rsum"]
    itm = mean_itm_loss(run["history"], last_steps=100)
    first_below = next((entry["step"] for entry in run["history"] if entry["itm"] < 0.6), None)
    report = (
        f"held-out RSUM {metrics['rsum']:.1f} (floor {SYNTHETIC_RSUM_FLOOR}, chance {chance:.1f}); ITM loss over "
        f"the last 100 steps {itm:.3f} (ceiling {SYNTHETIC_ITM_CEILING}, ln 2 = {math.log(2):.3f}); ITM first "
        f"below 0.6 at step {first_below}"
    )
    assert metrics["rsum"] >= SYNTHETIC_RSUM_FLOOR, "learning quality fell: " + report
    assert itm <= SYNTHETIC_ITM_CEILING, "learning quality fell: " + report
    for task, ceiling in SYNTHETIC_TASK_LOSS_RATIO_CEILINGS.items():
        missing = [entry["step"] for entry in run["history"] if entry.get(task) is None]
        assert not missing, f"the {task} loss is missing at steps {missing[:5]}: the recipe trains all four tasks"
        ratio = mean_task_loss(run["history"], task, last=True) / mean_task_loss(run["history"], task, last=False)
        assert ratio <= ceiling, (
            f"the {task} loss no longer falls: its last 100 steps average {ratio:.2f} of its first 100 (ceiling "
            f"{ceiling})"
        )


@pytest.mark.slow
@require_shared_data
def test_real_photo_pretraining_learns_to_match(tmp_path):
    """The shipped real-data example as a user runs it (stage 3 cut to one step): 49 minutes on 2 CPU cores beside
    one other one-thread job, warm start included."""
    output_dir = tmp_path / "run"
    command = [
        sys.executable, str(PROJECT_ROOT / "examples" / "pretrain_shared_data.py"), "--output_dir", str(output_dir),
        "--cache_dir", str(tmp_path / "regions"), "--data_dir", str(SHARED_DATA), "--eval_captions_per_image", "1",
        "--set", "stages.2.max_steps=1", "stages.2.num_epochs=null",
    ]  # fmt: skip
    completed = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert completed.returncode == 0, completed.stderr[-2000:]
    written = json.loads((output_dir / "results.json").read_text())
    results, history = written["results"], written["history"]
    ten_epochs = results["after stage2-flickr8k"]
    chance = results["chance"]["rsum"]
    early_itm = [entry["itm"] for entry in history if 126 <= entry["step"] <= 150]
    assert sum(early_itm) / len(early_itm) <= REAL_ITM_CEILING_BY_STEP_150, (
        f"the ITM loss no longer falls early: {sum(early_itm) / len(early_itm):.3f} over steps 126-150 "
        f"(ceiling {REAL_ITM_CEILING_BY_STEP_150}, ln 2 = 0.693)"
    )
    assert ten_epochs["rsum"] >= REAL_RSUM_FLOOR, (
        f"learning quality fell: Flickr8k dev RSUM after the ten-epoch stage {ten_epochs['rsum']:.1f} "
        f"(floor {REAL_RSUM_FLOOR}, chance {chance:.1f})"
    )


def _subset_manifest(source_dir, target_dir, rows_by_split):
    """A copy of a real manifest with its first rows of each split, its images reached through a link to the real
    folder (nothing copied)."""
    target_dir.mkdir(parents=True)
    (target_dir / "images").symlink_to(source_dir / "images", target_is_directory=True)
    kept, counts = [], {}
    for line in (source_dir / "captions.jsonl").read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        split = row.get("split", "train")
        if counts.get(split, 0) < rows_by_split.get(split, 0):
            counts[split] = counts.get(split, 0) + 1
            kept.append(line)
    (target_dir / "captions.jsonl").write_text("\n".join(kept) + "\n", encoding="utf-8")


@require_shared_data
def test_real_photo_example_runs_end_to_end_on_a_subset(tmp_path, one_thread):
    """The shipped real-data example's plumbing, fast: 12 Flickr8k train images, 4 COCO ones, 4 dev images; two
    region alignment steps, then two steps of the ITM stage, three of stage 2 and one of stage 3. What it learns is
    the slow test's business."""
    data_dir = tmp_path / "data"
    _subset_manifest(SHARED_DATA / "flickr8k_trainval", data_dir / "flickr8k_trainval", {"train": 12, "dev": 4})
    _subset_manifest(SHARED_DATA / "coco_val2017_128", data_dir / "coco_val2017_128", {"train": 4})
    output_dir = tmp_path / "run"
    main = runpy.run_path(str(PROJECT_ROOT / "examples" / "pretrain_shared_data.py"))["main"]
    arguments = [
        "--output_dir", str(output_dir), "--data_dir", str(data_dir), "--cache_dir", str(tmp_path / "regions"),
        "--eval_captions_per_image", "1", "--region_alignment_steps", "2", "--set", "stages.0.max_steps=2",
        "stages.0.per_device_train_batch_size=4", "stages.1.max_steps=3", "stages.1.num_epochs=null",
        "stages.1.per_device_train_batch_size=4", "stages.2.max_steps=1", "stages.2.num_epochs=null",
        "stages.2.per_device_train_batch_size=4", "logging_steps=1", "report_to=none",
    ]  # fmt: skip
    summary = main(arguments)
    written = json.loads((output_dir / "results.json").read_text())
    assert written["steps_per_stage"] == summary["steps_per_stage"] == [2, 3, 1]
    stages = ["stage1-flickr8k_itm", "stage2-flickr8k", "stage3-flickr8k_coco"]
    assert set(written["results"]) == {"chance"} | {f"after {stage}" for stage in stages}
    assert written["results"]["chance"]["rsum"] == pytest.approx(chance_metrics(list(range(4)))["rsum"])
    # The loss history travels with the run file, so that its curves can be drawn (examples/plot_loss_curves.py).
    assert [entry["step"] for entry in written["history"]] == [1, 2, 3, 4, 5, 6]
    assert all(0.0 < entry["itm"] < 2.0 for entry in written["history"])
    # Pretraining started from the region alignment warm start, which the run file reports.
    assert written["region_alignment"]["settings"]["max_steps"] == 2
    assert load_recipe(output_dir / "recipe.yaml", check_paths=False).model.init_from == str(
        output_dir / "region_alignment"
    )
    # Each stage's folder ships the extractor its regions came from, so it serves photos with the training grid.
    from imagebert_hf import ImageBERTProcessor

    served = ImageBERTProcessor.from_pretrained(output_dir / stages[-1] / "final")
    assert list(served.image_processor.grid_sizes) == [1, 2, 3, 4] and served.max_regions == 30
    # A grid of more cells than the model keeps is refused before anything is extracted.
    with pytest.raises(ValueError, match=r"^--grid_sizes 1 3 5: 35 cells, more regions than the model keeps"):
        main([*arguments, "--grid_sizes", "1", "3", "5", "--output_dir", str(tmp_path / "other")])
    assert not (tmp_path / "other").exists()
    # A resumed run starts from the same warm start, and refuses one fitted for another number of steps.
    assert arguments[8:10] == ["--region_alignment_steps", "2"]
    other_steps = [*arguments[:9], "3", *arguments[10:], "--resume"]
    with pytest.raises(ValueError, match="fitted for 2 steps, not --region_alignment_steps 3"):
        main(other_steps)
    with pytest.raises(ValueError, match="fitted with seed 42, not this run's seed 7"):
        main([*arguments, "seed=7", "--resume"])
    # A second call over the same folder is refused before anything is extracted, aligned or trained.
    (output_dir / "region_alignment" / "region_alignment.json").unlink()
    with pytest.raises(FileExistsError, match="already holds a run"):
        main(arguments)
    assert not (output_dir / "region_alignment" / "region_alignment.json").exists()
