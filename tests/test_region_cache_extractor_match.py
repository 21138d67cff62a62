"""A region cache made by another extractor than the model's own (other grids, other backbone weights) is named in
one warning wherever a model meets it (fine-tuning, evaluation); the model's own extractor, saved and read again,
and caches or models that record no extractor, give none."""

import copy
import json
import shutil

import numpy as np
import pytest
import torch
from transformers.testing_utils import CaptureLogger
from transformers.utils import logging

from imagebert_hf import ImageBERTForImageTextRetrieval, ImageBERTRoIExtractor, write_npz_regions
from imagebert_hf.data.retrieval_corpus import check_region_cache_fits
from imagebert_hf.models.imagebert.processing_imagebert import ImageBERTProcessor
from imagebert_hf.regions import cache_reader, extract_regions, load_region_cache
from imagebert_hf.regions.cache_reader import cache_extractor_record, extractor_differences, saved_extractor_record

from .test_region_cache_scale import build


WHERE = "--region_cache regions"
OTHER_EXTRACTOR = "holds regions of another extractor than the processor saved with"


@pytest.fixture(scope="module")
def setup(tmp_path_factory, make_tiny_extractor, make_tiny_config, tokenizer):
    """A manifest of 6 images (4 train, 2 test), a model saved with its processor, the region cache of its
    extractor read back from the model's folder (on another device setting and batch size), and models whose
    processors differ from it by the grid only or by the backbone weights only."""
    from PIL import Image

    root = tmp_path_factory.mktemp("extractor_match")
    (root / "images").mkdir()
    rng = np.random.default_rng(0)
    words = ["red", "blue", "green", "yellow", "circle", "square"]
    lines = []
    for i, split in enumerate(["train"] * 4 + ["test"] * 2):
        Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(root / "images" / f"{i:03d}.png")
        lines.append({"image": f"images/{i:03d}.png", "captions": [f"a {words[i]} shape"], "split": split})
    (root / "captions.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))

    torch.manual_seed(0)
    extractor = make_tiny_extractor(grid_sizes=[1], device="cpu")
    config = make_tiny_config(vocab_size=len(tokenizer), **extractor.config_kwargs())

    def save_model(name, image_processor):
        folder = root / name
        ImageBERTForImageTextRetrieval(config).save_pretrained(folder)
        ImageBERTProcessor.from_model_config(config, tokenizer, image_processor).save_pretrained(folder)
        return folder

    model = save_model("model", extractor)
    reloaded = ImageBERTRoIExtractor.from_pretrained(model, device=None, batch_size=2)
    extract_regions(root / "captions.jsonl", root / "regions", reloaded, progress=False)
    # The same weights (the model folder's file), a finer grid.
    save_model("grid", ImageBERTRoIExtractor.from_pretrained(model, grid_sizes=[1, 2]))
    torch.manual_seed(1)
    save_model("weights", make_tiny_extractor(grid_sizes=[1]))
    return {"root": root, "config": config, "cache": load_region_cache(root / "regions")}


def warnings_of(call):
    with CaptureLogger(cache_reader.logger) as captured:
        call()
    return captured.out


def test_the_model_s_own_extractor_saved_and_read_again_gives_no_warning(setup):
    root, cache = setup["root"], setup["cache"]
    recorded, _ = cache_extractor_record(cache.info)
    saved, _ = saved_extractor_record(root / "model")
    # The device and batch size differ (None and 2 in the cache, "cpu" and 8 in the model's); the regions do not.
    assert (recorded["batch_size"], saved["batch_size"], saved["device"]) == (2, 8, "cpu")
    assert recorded["weights_sha256"] == saved["weights_sha256"]
    assert extractor_differences(recorded, saved) == []
    assert warnings_of(lambda: check_region_cache_fits(cache, setup["config"], WHERE, str(root / "model"))) == ""


def test_another_grid_is_named_with_both_values(setup):
    root = setup["root"]
    out = warnings_of(lambda: check_region_cache_fits(setup["cache"], setup["config"], WHERE, str(root / "grid")))
    assert out.count(OTHER_EXTRACTOR) == 1, out
    assert out.startswith(f"{WHERE} {OTHER_EXTRACTOR} {root / 'grid'}")
    assert "grid_sizes: [1] in the cache, [1, 2] in the model's processor" in out
    assert "weights:" not in out  # the same weights file
    assert f"imagebert-extract-regions --extractor {root / 'grid'}" in out


def test_other_backbone_weights_are_named(setup):
    root = setup["root"]
    out = warnings_of(lambda: check_region_cache_fits(setup["cache"], setup["config"], WHERE, str(root / "weights")))
    assert out.count(OTHER_EXTRACTOR) == 1, out
    assert "backbone weights: sha256 " in out
    assert "grid_sizes" not in out


def test_other_weights_without_a_weights_file_compare_by_their_setting(setup):
    recorded, _ = cache_extractor_record(setup["cache"].info)
    saved = {**saved_extractor_record(setup["root"] / "model")[0], "weights_sha256": None}
    assert extractor_differences(recorded, saved) == []
    assert extractor_differences(recorded, {**saved, "backbone_weights": "timm"}) == [
        "backbone_weights: None in the cache, 'timm' in the model's processor"
    ]


def test_region_limits_count_only_where_the_model_takes_more(setup):
    recorded, _ = cache_extractor_record(setup["cache"].info)
    saved, _ = saved_extractor_record(setup["root"] / "model")
    assert extractor_differences(recorded, {**saved, "max_regions": 50}, max_regions=20) == []
    assert extractor_differences(recorded, {**saved, "max_regions": 10}, max_regions=20) == [
        "max_regions: 20 in the cache, 10 in the model's processor"
    ]


@pytest.fixture
def debug_logs():
    level = cache_reader.logger.level
    cache_reader.logger.setLevel(logging.DEBUG)
    yield
    cache_reader.logger.setLevel(level)


def test_caches_and_models_that_record_no_extractor_give_no_warning(setup, tmp_path, debug_logs):
    root, config = setup["root"], setup["config"]
    # Regions read from precomputed files: the files do not say which extractor made them.
    (tmp_path / "npz").mkdir()
    cache = setup["cache"]
    for i in range(6):
        write_npz_regions(tmp_path / "npz" / f"{i:03d}.npz", dict(cache[f"images/{i:03d}.png"]))
    precomputed = ImageBERTRoIExtractor(backend="precomputed", precomputed_path=str(tmp_path / "npz"))
    extract_regions(root / "captions.jsonl", tmp_path / "precomputed", precomputed, progress=False)
    # A cache whose cache_info.json has no extractor (an older one).
    shutil.copytree(root / "regions", tmp_path / "older")
    info = json.loads((tmp_path / "older" / "cache_info.json").read_text())
    del info["extractor"], info["weights_sha256"]
    (tmp_path / "older" / "cache_info.json").write_text(json.dumps(info))
    # A cache of another extractor class (which records settings of its own).
    build(tmp_path / "generated", num_images=2)

    for folder in ("precomputed", "older", "generated"):
        other = load_region_cache(tmp_path / folder)
        sized = copy.deepcopy(config)
        sized.region_feature_size = other.info["region_feature_size"]
        out = warnings_of(lambda: check_region_cache_fits(other, sized, WHERE, str(root / "weights")))
        assert OTHER_EXTRACTOR not in out and "its extractor is not compared with the model's" in out, folder
    # A model folder without a processor.
    bare = tmp_path / "bare"
    shutil.copytree(root / "weights", bare)
    for name in ("processor_config.json", "roi_extractor.safetensors"):
        (bare / name).unlink()
    out = warnings_of(lambda: check_region_cache_fits(cache, config, WHERE, str(bare)))
    assert OTHER_EXTRACTOR not in out and f"is not compared with that of {bare}: it holds no saved" in out


def test_evaluation_warns_once_and_still_evaluates(setup, tmp_path):
    from imagebert_hf.evaluation.full_ranking import EvaluationArguments, run_retrieval_evaluation

    root = setup["root"]
    args = EvaluationArguments(
        output_dir=str(tmp_path / "out"), model_name_or_path=str(root / "grid"), dataset="manifest",
        manifest=str(root / "captions.jsonl"), split="test", region_cache=str(root / "regions"), cpu=True,
    )  # fmt: skip
    with CaptureLogger(cache_reader.logger) as captured:
        returned = run_retrieval_evaluation(args)
    assert captured.out.count(OTHER_EXTRACTOR) == 1, captured.out
    assert f"--region_cache {root / 'regions'} {OTHER_EXTRACTOR}" in captured.out and "grid_sizes" in captured.out
    assert returned["results"][0]["num_images"] == 2


def test_fine_tuning_warns_before_it_builds_its_corpora(setup, tmp_path, tokenizer):
    from imagebert_hf.training import RetrievalArguments
    from imagebert_hf.training.retrieval_finetuning import build_corpora

    root = setup["root"]
    args = RetrievalArguments(
        output_dir=str(tmp_path / "out"), model_name_or_path=str(root / "weights"),
        train_file=str(root / "captions.jsonl"), region_cache=str(root / "regions"), train_split="train",
        eval_split="test", report_to="none", cpu=True,
    )  # fmt: skip
    with CaptureLogger(cache_reader.logger) as captured:
        train, held_out = build_corpora(args, tokenizer, setup["config"])
    assert (train.num_images, held_out.num_images) == (4, 2)
    assert captured.out.count(OTHER_EXTRACTOR) == 1, captured.out
    assert "backbone weights: sha256 " in captured.out


def test_pretraining_warns_once_per_stage_cache_of_another_extractor_than_its_processor(
    tmp_path, make_tiny_extractor, tokenizer
):
    from imagebert_hf.data.synthetic import write_synthetic_manifest
    from imagebert_hf.training import PretrainingRunOptions, recipe_from_dict, run_pretraining

    from .test_moc_targets_in_mixed_batches import _cache_recipe

    torch.manual_seed(0)
    extractor = make_tiny_extractor(grid_sizes=[1])
    manifest = write_synthetic_manifest(tmp_path / "shapes", 4, seed=0, image_size=64)
    extract_regions(manifest, tmp_path / "regions", extractor, progress=False)
    extractor.save_pretrained(tmp_path / "extractor")

    def run(name, image_processor):
        processor = ImageBERTProcessor(image_processor, tokenizer, max_text_length=20, max_regions=10)
        processor.save_pretrained(tmp_path / f"{name}_processor")
        data = _cache_recipe(tmp_path / name, (manifest, tmp_path / "regions", None, extractor), "cross_entropy")
        data["stages"][0]["sources"] = data["stages"][0]["sources"][:1]
        data["stages"].append({**data["stages"][0], "name": "again"})  # the same cache in a second stage
        data["model"]["processor"] = str(tmp_path / f"{name}_processor")
        return warnings_of(lambda: run_pretraining(recipe_from_dict(data), PretrainingRunOptions(cpu=True)))

    own = ImageBERTRoIExtractor.from_pretrained(tmp_path / "extractor")
    assert run("own", own) == ""
    out = run("grid", ImageBERTRoIExtractor.from_pretrained(tmp_path / "extractor", grid_sizes=[1, 2]))
    assert out.count(OTHER_EXTRACTOR) == 1, out
    assert f"stage 'regions', source 'with_probs': region cache {tmp_path / 'regions'} {OTHER_EXTRACTOR}" in out
    assert "grid_sizes: [1] in the cache, [1, 2] in the model's processor" in out
