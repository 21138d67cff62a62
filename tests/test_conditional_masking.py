"""Conditional masking end to end: the collator masks negatives like positives, the model leaves their targets out of
MLM, MOC and MRFR, and the training loop counts exactly the targets the model used."""

import numpy as np
import pytest
import torch

from imagebert_hf import ImageBERTConfig, ImageBERTForPreTraining
from imagebert_hf.data.collator import DataCollatorForImageBERTPretraining
from imagebert_hf.training.loop import pretraining_loss_counts

from .testing_utils import tiny_config_kwargs


NUM_CLASSES = 5


def _features(tokenizer, num_samples=24, seed=0):
    rng = np.random.default_rng(seed)
    words = ["red", "blue", "circle", "square", "left", "right", "above", "a", "of", "the"]
    features = []
    for i in range(num_samples):
        count = int(rng.integers(3, 8))
        probs = rng.uniform(0, 1, (count, NUM_CLASSES))
        features.append(
            {
                "input_ids": tokenizer(" ".join(rng.choice(words, size=int(rng.integers(4, 12)))))["input_ids"],
                "region_features": rng.standard_normal((count, 24)).astype(np.float32),
                "region_locations": rng.uniform(0, 1, (count, 5)).astype(np.float32),
                "region_class_labels": rng.integers(0, NUM_CLASSES, count),
                "region_class_probs": (probs / probs.sum(1, keepdims=True)).astype(np.float32),
                "image_id": f"img{i}",
            }
        )
    return features


def _model(tokenizer, **overrides):
    torch.manual_seed(0)
    config = ImageBERTConfig(
        **tiny_config_kwargs(vocab_size=len(tokenizer), num_object_classes=NUM_CLASSES, **overrides)
    )
    return ImageBERTForPreTraining(config).eval()


def _batch(tokenizer, moc_loss_type):
    collator = DataCollatorForImageBERTPretraining(
        tokenizer,
        itm_negative_probability=0.5,
        mlm_probability=0.3,
        region_mask_probability=0.3,
        return_region_class_probs=moc_loss_type == "kl",
        seed=0,
    )
    batch = collator(_features(tokenizer))
    negatives = batch["itm_labels"] == 0
    assert 4 <= int(negatives.sum()) <= 20, "the batch needs negatives and positives"
    # The collator leaves the negatives' targets in: without the model's rule they would count.
    assert (batch["labels"][negatives] != -100).any() and batch["masked_regions"][negatives].any()
    return batch, negatives


MASKED_LOSSES = ("mlm_loss", "moc_loss", "mrfr_loss")


@pytest.mark.parametrize("moc_loss_type", ["cross_entropy", "kl"])
@pytest.mark.parametrize("sparse_prediction", [False, True])
def test_a_negatives_targets_never_reach_the_masked_losses(tokenizer, moc_loss_type, sparse_prediction):
    model = _model(tokenizer, moc_loss_type=moc_loss_type)
    batch, negatives = _batch(tokenizer, moc_loss_type)
    # The collator gives MRFR targets for the masked rows only, one per True of masked_regions, in its order.
    row_is_negative = negatives[batch["masked_regions"].nonzero()[:, 0]]
    with torch.no_grad():
        out = model(**batch, sparse_prediction=sparse_prediction)

        # The negatives' targets taken out by hand give the same losses ...
        blanked = dict(batch)
        blanked["labels"] = batch["labels"].masked_fill(negatives[:, None], -100)
        blanked["masked_regions"] = batch["masked_regions"] & ~negatives[:, None]
        blanked["region_feature_targets"] = batch["region_feature_targets"][~row_is_negative]
        out_blanked = model(**blanked, sparse_prediction=sparse_prediction)
        # ... and so do other targets on the negatives.
        scrambled = dict(batch)
        scrambled["labels"] = torch.where(
            negatives[:, None] & (batch["labels"] != -100), (batch["labels"] + 1) % len(tokenizer), batch["labels"]
        )
        scrambled["region_feature_targets"] = batch["region_feature_targets"] + 10.0 * row_is_negative[:, None]
        scrambled["region_class_labels"] = torch.where(
            negatives[:, None] & (batch["region_class_labels"] != -100),
            (batch["region_class_labels"] + 1) % NUM_CLASSES,
            batch["region_class_labels"],
        )
        if "region_class_probs" in batch:
            scrambled["region_class_probs"] = torch.where(
                negatives[:, None, None], batch["region_class_probs"].flip(-1), batch["region_class_probs"]
            )
        out_scrambled = model(**scrambled, sparse_prediction=sparse_prediction)
        for name in MASKED_LOSSES:
            torch.testing.assert_close(getattr(out_blanked, name), getattr(out, name), msg=name)
            torch.testing.assert_close(getattr(out_scrambled, name), getattr(out, name), msg=name)
        torch.testing.assert_close(out_scrambled.itm_loss, out.itm_loss)

        # The same targets on pairs marked matched do count (the checks above are not vacuous).
        all_matched = dict(scrambled, itm_labels=torch.ones_like(batch["itm_labels"]))
        out_matched = model(**all_matched, sparse_prediction=sparse_prediction)
        for name in MASKED_LOSSES:
            assert not torch.allclose(getattr(out_matched, name), getattr(out, name)), name


def test_a_negative_given_to_the_model_directly_has_no_masked_loss(tokenizer):
    """The model's own contract, without the collator: targets only on a negative give zero masked losses."""
    model = _model(tokenizer)
    batch, _ = _batch(tokenizer, "cross_entropy")
    only_first = batch["itm_labels"].clone()
    only_first[:] = 1
    only_first[0] = 0
    keep = torch.zeros_like(only_first, dtype=torch.bool)
    keep[0] = True
    direct = dict(batch, itm_labels=only_first)
    direct["labels"] = batch["labels"].masked_fill(~keep[:, None], -100)
    direct["masked_regions"] = batch["masked_regions"] & keep[:, None]
    direct["region_feature_targets"] = batch["region_feature_targets"][keep[batch["masked_regions"].nonzero()[:, 0]]]
    with torch.no_grad():
        out = model(**direct)
    for name in MASKED_LOSSES:
        assert float(getattr(out, name)) == 0.0, name
    counts = pretraining_loss_counts(direct)
    assert counts["mlm"] == 0 and counts["mrfr"] == 0 and counts["moc"] == 0


@pytest.mark.parametrize("moc_loss_type", ["cross_entropy", "kl"])
def test_loss_counts_are_the_targets_the_model_used(tokenizer, moc_loss_type):
    # A sparse model returns its head outputs flattened over the positions it computed losses at.
    model = _model(tokenizer, moc_loss_type=moc_loss_type)
    batch, negatives = _batch(tokenizer, moc_loss_type)
    batch["region_class_labels"][~negatives, 0] = -100  # some masked regions without a class (MOC skips them)
    with torch.no_grad():
        out = model(**batch, sparse_prediction=True)
    counts = pretraining_loss_counts(batch)
    assert counts["mlm"] == out.mlm_logits.shape[0]
    assert counts["mrfr"] == out.mrfr_predictions.shape[0]
    assert counts["itm"] == batch["itm_labels"].numel()

    # Stated independently: masked tokens and masked real regions of the matched pairs only.
    positives = ~negatives
    regions = batch["masked_regions"][positives] & batch["region_attention_mask"][positives].bool()
    assert counts["mlm"] == (batch["labels"][positives] != -100).sum()
    assert counts["mrfr"] == regions.sum()
    if moc_loss_type == "cross_entropy":
        assert counts["moc"] == (regions & (batch["region_class_labels"][positives] != -100)).sum()
        assert counts["moc"] < counts["mrfr"]
    else:
        assert counts["moc"] == counts["mrfr"]
    # Blanking the negatives' targets changes no count.
    blanked = dict(batch)
    blanked["labels"] = batch["labels"].masked_fill(negatives[:, None], -100)
    blanked["masked_regions"] = batch["masked_regions"] & positives[:, None]
    assert pretraining_loss_counts(blanked) == counts
