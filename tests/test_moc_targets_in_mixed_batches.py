"""MOC targets in batches whose samples come from sources of different kinds: class labels are kept per sample
(-100 where a sample has none), class distributions (MOC's KL targets) from every sample or none, and a KL stage
whose region cache holds no distributions is refused before it trains."""

import pytest
import torch

from imagebert_hf.data.collator import DataCollatorForImageBERTPretraining
from imagebert_hf.data.synthetic import write_synthetic_manifest
from imagebert_hf.regions.cache_layout import RegionCacheError
from imagebert_hf.training import PretrainingRunOptions, RecipeError, recipe_from_dict, run_pretraining
from imagebert_hf.training.loop import pretraining_loss_counts
from imagebert_hf.training.pretraining import build_model, build_stage_data, load_tokenizer

from .test_conditional_masking import _features, _model
from .test_pretraining import tiny_recipe


def _without(feature: dict, key: str) -> dict:
    return {name: value for name, value in feature.items() if name != key}


def _seeded(features: list[dict]) -> list[dict]:
    """The features with their own seeds and ITM labels: each sample's masks are then the same in any batch."""
    return [dict(feature, sample_seed=100 + i, itm_labels=1) for i, feature in enumerate(features)]


# ------------------------------------------------------------------------------------------------ class labels


def test_a_labelled_sample_keeps_its_labels_next_to_one_without(tokenizer):
    labelled, unlabelled = _seeded(_features(tokenizer, num_samples=2))
    unlabelled = _without(unlabelled, "region_class_labels")
    collator = DataCollatorForImageBERTPretraining(tokenizer, seed=0, return_region_class_probs=False)
    batch = collator([labelled, unlabelled])
    count = len(labelled["region_class_labels"])
    assert batch["region_class_labels"][0, :count].tolist() == labelled["region_class_labels"].tolist()
    assert (batch["region_class_labels"][0, count:] == -100).all()
    assert (batch["region_class_labels"][1] == -100).all()

    # In-batch negatives swap regions: the labels go with them (each sample here takes the other's regions).
    swapped = DataCollatorForImageBERTPretraining(
        tokenizer, seed=0, itm_negative_probability=1.0, text_negative_share=0.0, return_region_class_probs=False
    )
    plain = [_without(feature, "itm_labels") for feature in (labelled, unlabelled)]
    batch = swapped(plain)
    assert batch["itm_labels"].tolist() == [0, 0]
    assert (batch["region_class_labels"][0] == -100).all()
    assert batch["region_class_labels"][1, :count].tolist() == labelled["region_class_labels"].tolist()


def test_cross_entropy_moc_learns_from_the_labelled_samples_of_a_mixed_batch(tokenizer):
    """Samples without labels add no MOC target and take none away: the loss and its count are those of the
    labelled samples alone."""
    features = _seeded(_features(tokenizer, num_samples=12))
    mixed = [feature if i % 2 == 0 else _without(feature, "region_class_labels") for i, feature in enumerate(features)]
    collator = DataCollatorForImageBERTPretraining(tokenizer, seed=0, return_region_class_probs=False)
    batch, labelled_only = collator(mixed), collator(mixed[::2])
    model = _model(tokenizer, moc_loss_type="cross_entropy")
    with torch.no_grad():
        out, expected = model(**batch), model(**labelled_only)
    assert out.moc_loss is not None
    torch.testing.assert_close(out.moc_loss, expected.moc_loss)
    assert pretraining_loss_counts(batch)["moc"] == pretraining_loss_counts(labelled_only)["moc"] > 0


# ------------------------------------------------------------------------------------------ class distributions


@pytest.mark.parametrize("order", ["missing_in_the_middle", "missing_first"])
def test_a_sample_without_class_distributions_next_to_samples_with_them_is_refused(tokenizer, order):
    features = _seeded(_features(tokenizer, num_samples=3))
    features[1] = _without(features[1], "region_class_probs")
    if order == "missing_first":
        features = features[1:] + features[:1]
    collator = DataCollatorForImageBERTPretraining(tokenizer, seed=0)
    with pytest.raises(ValueError, match=r"^sample 'img1' has no region_class_probs but 2 of the 3 samples") as error:
        collator(features)
    assert "return_region_class_probs=False" in str(error.value) and "\n" not in str(error.value)

    # Without distributions anywhere the batch has none; without KL targets asked for, they are left out.
    assert "region_class_probs" not in collator([_without(feature, "region_class_probs") for feature in features])
    plain = DataCollatorForImageBERTPretraining(tokenizer, seed=0, return_region_class_probs=False)(features)
    assert "region_class_probs" not in plain and "region_class_labels" in plain


# ------------------------------------------------------------------------------------------------- recipes


@pytest.fixture(scope="module")
def caches(tmp_path_factory, make_tiny_extractor):
    """One manifest's regions in two caches: with class distributions and without."""
    from imagebert_hf.regions import extract_regions

    root = tmp_path_factory.mktemp("kl_caches")
    manifest = write_synthetic_manifest(root / "shapes", 4, seed=0, image_size=64)
    extractor = make_tiny_extractor()
    for name, store in (("with_probs", True), ("without_probs", False)):
        extract_regions(manifest, root / name, extractor, store_class_probs=store, progress=False)
    return manifest, root / "with_probs", root / "without_probs", extractor


def _cache_recipe(output_dir, caches, moc_loss_type: str, cache_names=("with_probs", "without_probs")) -> dict:
    manifest, *folders, extractor = caches
    folders = dict(zip(("with_probs", "without_probs"), folders))
    config = {
        "hidden_size": 32,
        "num_hidden_layers": 1,
        "num_attention_heads": 4,
        "intermediate_size": 64,
        "max_position_embeddings": 64,
        "region_feature_size": extractor.region_feature_size,
        "num_object_classes": extractor.num_object_classes,
        "max_regions": 10,
        "max_text_length": 20,
        "contrastive_embedding_size": 16,
        "moc_loss_type": moc_loss_type,
    }
    sources = [
        {"name": name, "type": "manifest", "path": str(manifest), "region_cache": str(folders[name])}
        for name in cache_names
    ]
    return {
        "output_dir": str(output_dir),
        "seed": 1,
        "checkpointing_steps": None,
        "report_to": "none",
        "model": {"tokenizer": "synthetic", "config": config},
        "stages": [{"name": "regions", "sources": sources, "max_steps": 1, "per_device_train_batch_size": 4}],
    }


def _first_batch(recipe):
    tokenizer = load_tokenizer(recipe.model)
    config = build_model(recipe.model, tokenizer).config
    dataloader, _, _ = build_stage_data(recipe.stages[0], tokenizer, config, seed=0)
    return next(iter(dataloader))


def test_a_kl_stage_on_a_cache_without_class_distributions_is_refused_before_training(caches, tmp_path):
    output_dir = tmp_path / "run"
    recipe = recipe_from_dict(_cache_recipe(output_dir, caches, "kl"))
    with pytest.raises(RecipeError) as error:
        run_pretraining(recipe, PretrainingRunOptions(cpu=True))
    message = str(error.value)
    assert message.startswith("stage 'regions': moc_loss_type 'kl' needs class distributions")
    assert f"region cache {caches[2]} of source 'without_probs'" in message
    assert "store_class_probs: false" in message and "moc_loss_type: cross_entropy" in message
    assert "\n" not in message
    assert not output_dir.exists()

    # The cache with distributions alone trains KL; cross-entropy trains on both caches.
    batch = _first_batch(recipe_from_dict(_cache_recipe(output_dir, caches, "kl", ("with_probs",))))
    assert batch["region_class_probs"].shape[-1] == caches[3].num_object_classes
    batch = _first_batch(recipe_from_dict(_cache_recipe(output_dir, caches, "cross_entropy")))
    assert "region_class_probs" not in batch and "region_class_labels" in batch


def test_a_later_kl_stage_on_a_cache_without_class_distributions_is_refused_before_the_first_trains(caches, tmp_path):
    output_dir = tmp_path / "run"
    data = _cache_recipe(output_dir, caches, "kl", ("with_probs",))
    later = _cache_recipe(output_dir, caches, "kl", ("without_probs",))["stages"][0]
    data["stages"].append({**later, "name": "later"})
    with pytest.raises(RecipeError) as error:
        run_pretraining(recipe_from_dict(data), PretrainingRunOptions(cpu=True))
    message = str(error.value)
    assert message.startswith("stage 'later': moc_loss_type 'kl' needs class distributions")
    assert f"region cache {caches[2]} of source 'without_probs'" in message
    assert not output_dir.exists()

    # A later stage's cache that is not written yet is its own stage's business: the first stage trains.
    data["stages"][1]["sources"][0]["region_cache"] = str(tmp_path / "extracted_later")
    with pytest.raises(FileNotFoundError, match="extracted_later"):
        run_pretraining(recipe_from_dict(data), PretrainingRunOptions(cpu=True))
    assert (output_dir / "stage1-regions" / "final").is_dir()
    # So is one whose folder a job script made ahead, empty until the extraction writes its cache_info.json.
    (tmp_path / "made_ahead").mkdir()
    data["stages"][1]["sources"][0]["region_cache"] = str(tmp_path / "made_ahead")
    data["output_dir"] = str(tmp_path / "second_run")
    with pytest.raises(RegionCacheError, match="made_ahead is not a region cache"):
        run_pretraining(recipe_from_dict(data), PretrainingRunOptions(cpu=True))
    assert (tmp_path / "second_run" / "stage1-regions" / "final").is_dir()


def test_a_kl_stage_on_annotation_regions_is_refused(tmp_path):
    data = tiny_recipe(tmp_path / "run")
    data["model"]["config"]["moc_loss_type"] = "kl"
    recipe = recipe_from_dict(data)
    with pytest.raises(RecipeError, match=r"^stage 'noisy': .*source 'shapes_noisy' has no region_cache"):
        _first_batch(recipe)
    assert not (tmp_path / "run").exists()


def test_kl_moc_counts_every_masked_region_of_a_batch_with_mixed_labels(tokenizer):
    """Distributions in every sample and labels in some: the batch keeps both, and KL MOC counts every masked
    region, labelled or not."""
    features = _seeded(_features(tokenizer, num_samples=4))
    features[1] = _without(features[1], "region_class_labels")
    batch = DataCollatorForImageBERTPretraining(tokenizer, seed=0)(features)
    assert batch["region_class_probs"].shape[:2] == batch["region_attention_mask"].shape
    assert (batch["region_class_labels"][1] == -100).all()
    with torch.no_grad():
        loss = _model(tokenizer, moc_loss_type="kl")(**batch).moc_loss
    assert loss is not None and torch.isfinite(loss)
    real = batch["masked_regions"] & batch["region_attention_mask"].bool()
    assert pretraining_loss_counts(batch)["moc"] == real.sum()


def test_a_moc_stage_on_a_cache_without_object_classes_is_refused_before_training(tmp_path, make_tiny_extractor):
    from imagebert_hf.regions import extract_regions

    manifest = write_synthetic_manifest(tmp_path / "shapes", 4, seed=0, image_size=64)
    extractor = make_tiny_extractor(backbone_out_indices=[-1])  # feature maps only: no classifier, labels -100
    assert extractor.num_object_classes == 0
    extract_regions(manifest, tmp_path / "no_classes", extractor, store_class_probs=False, progress=False)
    data = _cache_recipe(tmp_path / "run", (manifest, tmp_path / "no_classes", None, extractor), "cross_entropy")
    data["stages"][0]["sources"] = data["stages"][0]["sources"][:1]
    data["model"]["config"]["num_object_classes"] = 10
    with pytest.raises(RecipeError) as error:
        run_pretraining(recipe_from_dict(data), PretrainingRunOptions(cpu=True))
    message = str(error.value)
    assert message.startswith("stage 'regions': MOC needs object classes, but the region cache")
    assert "num_object_classes: 0" in message and "loss_weights.moc: 0" in message
    assert not (tmp_path / "run").exists()

    # Without MOC the same cache trains the other tasks.
    data["stages"][0]["loss_weights"] = {"moc": 0.0}
    run_pretraining(recipe_from_dict(data), PretrainingRunOptions(cpu=True))
    assert (tmp_path / "run" / "stage1-regions" / "final").is_dir()


def test_a_source_without_object_classes_beside_one_with_them_trains_moc_on_the_other_with_a_warning():
    from transformers.testing_utils import CaptureLogger

    from imagebert_hf import ImageBERTConfig
    from imagebert_hf.training import pretraining
    from imagebert_hf.training.recipe import SourceSpec, StageSpec

    sources = [
        SourceSpec(name=name, type="manifest", path="m.jsonl", region_cache=f"{name}_regions")
        for name in ("plain", "classified")
    ]
    stage = StageSpec(name="mixed", sources=sources, max_steps=1)
    config = ImageBERTConfig(moc_loss_type="cross_entropy")
    with CaptureLogger(pretraining.logger) as captured:
        pretraining._check_moc_targets(stage, [{"num_object_classes": 0}, {"num_object_classes": 10}], config)
    assert "plain_regions of source 'plain' holds no object classes" in captured.out
    assert "MOC learns from the stage's other sources only" in captured.out
    with pytest.raises(RecipeError, match="MOC needs object classes"):
        pretraining._check_moc_targets(stage, [{"num_object_classes": 0}, {"num_object_classes": 0}], config)
    stage.loss_weights = {"moc": 0.0}
    pretraining._check_moc_targets(stage, [{"num_object_classes": 0}, {"num_object_classes": 0}], config)
