import numpy as np
import pytest
import torch

from imagebert_hf.data.collator import DataCollatorForImageBERTPretraining


FEATURE_SIZE = 6


def make_features(tokenizer, num_samples, num_regions=(3, 7), num_classes=None, seed=0, long_text=False):
    rng = np.random.default_rng(seed)
    words = ["red", "blue", "circle", "square", "left", "right", "above", "a", "of", "the"]
    features = []
    for i in range(num_samples):
        length = int(rng.integers(20, 30)) if long_text else int(rng.integers(3, 9))
        text = " ".join(rng.choice(words, size=length))
        count = int(rng.integers(num_regions[0], num_regions[1] + 1))
        feature = {
            "input_ids": tokenizer(text)["input_ids"],
            "region_features": rng.standard_normal((count, FEATURE_SIZE)).astype(np.float32) + 5.0,
            "region_locations": rng.uniform(0, 1, (count, 5)).astype(np.float32),
            "region_class_labels": rng.integers(0, 5, count),
            "image_id": f"img{i}",
        }
        if num_classes:
            probs = rng.uniform(0, 1, (count, num_classes))
            feature["region_class_probs"] = (probs / probs.sum(1, keepdims=True)).astype(np.float32)
        features.append(feature)
    return features


def test_shapes_and_padding_to_longest(tokenizer):
    features = make_features(tokenizer, 5, num_classes=4)
    batch = DataCollatorForImageBERTPretraining(tokenizer, itm_negative_probability=0.0, seed=0)(features)
    longest_text = max(len(f["input_ids"]) for f in features)
    most_regions = max(len(f["region_features"]) for f in features)
    assert batch["input_ids"].shape == (5, longest_text)
    for key in ("attention_mask", "token_type_ids", "labels"):
        assert batch[key].shape == (5, longest_text)
    assert batch["region_features"].shape == (5, most_regions, FEATURE_SIZE)
    assert batch["region_feature_targets"].shape == (int(batch["masked_regions"].sum()), FEATURE_SIZE)
    assert batch["region_locations"].shape == (5, most_regions, 5)
    assert batch["region_class_probs"].shape == (5, most_regions, 4)
    for key in ("region_attention_mask", "masked_regions", "region_class_labels"):
        assert batch[key].shape == (5, most_regions)
    assert batch["masked_regions"].dtype == torch.bool
    assert batch["itm_labels"].shape == (5,)
    for i, feature in enumerate(features):
        length, count = len(feature["input_ids"]), len(feature["region_features"])
        assert batch["attention_mask"][i].sum() == length
        assert (batch["input_ids"][i, length:] == tokenizer.pad_token_id).all()
        assert batch["region_attention_mask"][i].sum() == count
        assert not batch["masked_regions"][i, count:].any()
        assert (batch["region_class_labels"][i, count:] == -100).all()

    padded = DataCollatorForImageBERTPretraining(tokenizer, seed=0, pad_to_multiple_of=8)(features)
    assert padded["input_ids"].shape[1] % 8 == 0 and padded["region_features"].shape[1] % 8 == 0

    fixed = DataCollatorForImageBERTPretraining(
        tokenizer, itm_negative_probability=0.0, seed=0, max_text_length=16, max_regions=9, pad_to_max_length=True
    )(features)
    assert fixed["input_ids"].shape == (5, 16) and fixed["region_features"].shape == (5, 9, FEATURE_SIZE)
    assert torch.equal(fixed["input_ids"][:, :longest_text], batch["input_ids"])
    assert torch.equal(fixed["region_attention_mask"][:, :most_regions], batch["region_attention_mask"])
    assert not fixed["region_attention_mask"][:, most_regions:].any()
    with pytest.raises(ValueError, match="pad_to_max_length needs max_text_length and max_regions"):
        DataCollatorForImageBERTPretraining(tokenizer, max_regions=9, pad_to_max_length=True)


def test_mlm_rates_and_never_special_tokens(tokenizer):
    features = make_features(tokenizer, 400, long_text=True, seed=1)
    collator = DataCollatorForImageBERTPretraining(tokenizer, itm_negative_probability=0.0, seed=3)
    batch = collator(features)
    original = torch.full_like(batch["input_ids"], tokenizer.pad_token_id)
    for i, feature in enumerate(features):
        original[i, : len(feature["input_ids"])] = torch.tensor(feature["input_ids"])
    special = torch.isin(original, torch.tensor(tokenizer.all_special_ids))
    chosen = batch["labels"] != -100
    assert not (chosen & special).any(), "special or pad tokens were masked"
    assert torch.equal(batch["labels"][chosen], original[chosen])
    assert torch.equal(batch["input_ids"][~chosen], original[~chosen])
    rate = chosen.sum().item() / (~special).sum().item()
    assert 0.13 < rate < 0.17
    as_mask = (batch["input_ids"][chosen] == tokenizer.mask_token_id).float().mean().item()
    unchanged = (batch["input_ids"][chosen] == original[chosen]).float().mean().item()
    assert 0.75 < as_mask < 0.85
    assert 0.06 < unchanged < 0.15
    random_ids = batch["input_ids"][chosen & (batch["input_ids"] != tokenizer.mask_token_id)]
    assert not torch.isin(random_ids, torch.tensor(tokenizer.all_special_ids)).any()


def test_region_masking_rates_and_targets(tokenizer):
    features = make_features(tokenizer, 400, num_regions=(20, 30), seed=2)
    batch = DataCollatorForImageBERTPretraining(tokenizer, itm_negative_probability=0.0, seed=0)(features)
    real = batch["region_attention_mask"].bool()
    masked = batch["masked_regions"]
    assert 0.13 < masked.sum().item() / real.sum().item() < 0.17
    # MRFR targets: the masked rows' features before masking, one per True of masked_regions, in its order.
    originals = torch.zeros(batch["region_features"].shape)
    for i, feature in enumerate(features):
        originals[i, : len(feature["region_features"])] = torch.from_numpy(feature["region_features"])
    assert torch.equal(batch["region_feature_targets"], originals[masked])
    zeroed = (batch["region_features"] == 0).all(-1) & masked
    kept = masked & ~zeroed
    assert 0.85 < zeroed.sum().item() / masked.sum().item() < 0.95
    assert torch.equal(batch["region_features"][kept], originals[kept])
    assert torch.equal(batch["region_features"][real & ~masked], originals[real & ~masked])

    # The full layout, for code that indexes targets by region: the same batch, targets for every region.
    full = DataCollatorForImageBERTPretraining(
        tokenizer, itm_negative_probability=0.0, seed=0, full_region_feature_targets=True
    )(features)
    assert torch.equal(full["region_feature_targets"], originals)
    for key, value in batch.items():
        if key != "region_feature_targets":
            assert torch.equal(full[key], value), key


def test_itm_negatives_swap_text_or_regions_and_are_masked_like_positives(tokenizer):
    features = make_features(tokenizer, 300, num_classes=3, seed=4)
    collator = DataCollatorForImageBERTPretraining(tokenizer, itm_negative_probability=0.3, seed=0)
    batch = collator(features)
    negatives = batch["itm_labels"] == 0
    assert 0.2 < negatives.float().mean().item() < 0.4
    # Negatives keep their targets (the model leaves them out of the losses, see test_conditional_masking.py).
    assert (batch["labels"] != -100).any(-1).all()
    assert batch["masked_regions"].any(-1).all()
    # Inputs of negatives are masked as often as those of positives, so [MASK] cannot give the ITM label away.
    mask_share = (batch["input_ids"] == tokenizer.mask_token_id).float().sum(-1) / batch["attention_mask"].sum(-1)
    assert abs(mask_share[negatives].mean() - mask_share[~negatives].mean()) < 0.05
    assert (batch["input_ids"][negatives] == tokenizer.mask_token_id).any()

    # Without masking, the swapped side can be told exactly.
    collator = DataCollatorForImageBERTPretraining(
        tokenizer, itm_negative_probability=0.3, mlm_probability=0.0, region_mask_probability=0.0, seed=0
    )
    batch = collator(features)
    negatives = batch["itm_labels"] == 0
    swapped_text = swapped_regions = 0
    for i in negatives.nonzero().flatten().tolist():
        feature = features[i]
        length = int(batch["attention_mask"][i].sum())
        same_text = length == len(feature["input_ids"]) and batch["input_ids"][i, :length].tolist() == list(
            feature["input_ids"]
        )
        count = int(batch["region_attention_mask"][i].sum())
        same_regions = count == len(feature["region_features"]) and torch.allclose(
            batch["region_features"][i, :count], torch.from_numpy(feature["region_features"])
        )
        # Exactly one side is another sample's.
        assert same_text != same_regions
        swapped_text += not same_text
        swapped_regions += not same_regions
    assert swapped_text > 10 and swapped_regions > 10


def test_no_negative_from_the_same_image(tokenizer):
    features = make_features(tokenizer, 4)
    for feature in features:
        feature["image_id"] = "same"
    batch = DataCollatorForImageBERTPretraining(tokenizer, itm_negative_probability=1.0, seed=0)(features)
    assert (batch["itm_labels"] == 1).all()


def test_dataset_given_itm_labels_are_kept(tokenizer):
    features = make_features(tokenizer, 6)
    for i, feature in enumerate(features):
        feature["itm_labels"] = i % 2
    batch = DataCollatorForImageBERTPretraining(tokenizer, itm_negative_probability=1.0, seed=0)(features)
    assert batch["itm_labels"].tolist() == [0, 1, 0, 1, 0, 1]
    # Nothing was swapped: each sample's own text and regions, masked alike whatever its label.
    unmasked = DataCollatorForImageBERTPretraining(
        tokenizer, itm_negative_probability=1.0, mlm_probability=0.0, region_mask_probability=0.0, seed=0
    )(features)
    for i, feature in enumerate(features):
        assert unmasked["input_ids"][i, : len(feature["input_ids"])].tolist() == list(feature["input_ids"])
        count = len(feature["region_features"])
        assert torch.equal(unmasked["region_features"][i, :count], torch.from_numpy(feature["region_features"]))
    assert (batch["labels"] != -100).any(-1).all()


def test_deterministic_for_a_seed(tokenizer):
    features = make_features(tokenizer, 16, num_classes=3)
    first = DataCollatorForImageBERTPretraining(tokenizer, seed=7)(features)
    second = DataCollatorForImageBERTPretraining(tokenizer, seed=7)(features)
    other = DataCollatorForImageBERTPretraining(tokenizer, seed=8)(features)
    assert all(torch.equal(first[key], second[key]) for key in first)
    assert any(not torch.equal(first[key], other[key]) for key in ("labels", "masked_regions", "itm_labels"))


def test_sample_seeds_make_masks_independent_of_batch_split(tokenizer):
    features = make_features(tokenizer, 8)
    for i, feature in enumerate(features):
        feature["sample_seed"] = 1000 + i
        feature["itm_labels"] = 1
    collator = DataCollatorForImageBERTPretraining(tokenizer)
    whole = collator(features)
    halves = [collator(features[:4]), collator(features[4:])]
    for offset, half in zip((0, 4), halves):
        for i in range(4):
            length = int(half["attention_mask"][i].sum())
            assert torch.equal(half["input_ids"][i, :length], whole["input_ids"][offset + i, :length])
            assert torch.equal(half["labels"][i, :length], whole["labels"][offset + i, :length])
            count = int(half["region_attention_mask"][i].sum())
            assert torch.equal(half["masked_regions"][i, :count], whole["masked_regions"][offset + i, :count])


def test_failed_records_are_dropped_and_counted(tokenizer):
    features = make_features(tokenizer, 3)
    collator = DataCollatorForImageBERTPretraining(tokenizer, seed=0, count_failed=True)
    batch = collator([features[0], None, features[1], None, features[2]])
    assert batch["input_ids"].shape[0] == 3
    assert batch["num_failed_records"].item() == 2
    with pytest.raises(ValueError, match="failed to load"):
        collator([None, None])


def test_truncation_keeps_sep_and_bad_inputs(tokenizer):
    features = make_features(tokenizer, 2, long_text=True, num_regions=(12, 12))
    batch = DataCollatorForImageBERTPretraining(tokenizer, seed=0, max_text_length=10, max_regions=5)(features)
    assert batch["input_ids"].shape[1] == 10 and batch["region_features"].shape[1] == 5
    assert (batch["input_ids"][:, -1] == tokenizer.sep_token_id).all()
    with pytest.raises(ValueError, match="mlm_probability"):
        DataCollatorForImageBERTPretraining(tokenizer, mlm_probability=1.5)
    with pytest.raises(KeyError, match="region_features"):
        DataCollatorForImageBERTPretraining(tokenizer)([{"input_ids": [2, 5, 3]}])
    broken = make_features(tokenizer, 1)[0]
    broken["region_locations"] = broken["region_locations"][:1]
    if len(broken["region_features"]) > 1:
        with pytest.raises(ValueError, match="region_locations"):
            DataCollatorForImageBERTPretraining(tokenizer)([broken])


def test_pad_to_multiple_never_exceeds_the_model_limits(tokenizer):
    # 100 regions rounded to a multiple of 8 would be 104, which the model refuses: the cap is max_regions.
    features = make_features(tokenizer, 3, num_regions=(100, 100), long_text=True)
    collator = DataCollatorForImageBERTPretraining(
        tokenizer, max_regions=100, max_text_length=21, pad_to_multiple_of=8, seed=0
    )
    batch = collator(features)
    assert batch["region_features"].shape[1] == 100 and batch["input_ids"].shape[1] == 21
    fewer = DataCollatorForImageBERTPretraining(tokenizer, max_regions=100, pad_to_multiple_of=8, seed=0)(
        make_features(tokenizer, 3, num_regions=(9, 9))
    )
    assert fewer["region_features"].shape[1] == 16 and fewer["input_ids"].shape[1] % 8 == 0


def test_one_region_batch_for_processor_collator_and_corpus(tokenizer):
    from imagebert_hf.data.retrieval_corpus import stack_region_records
    from imagebert_hf.models.imagebert.region_batching import pad_region_records

    records = make_features(tokenizer, 4, num_classes=3)
    records[1].pop("region_class_labels")
    counts = [len(r["region_features"]) for r in records]
    longest = pad_region_records(records, return_labels=True, return_probs=True)
    assert longest["region_features"].shape == (4, max(counts), FEATURE_SIZE)
    assert longest["region_attention_mask"].sum(1).tolist() == counts
    assert (longest["region_class_labels"][1] == -100).all()  # no labels: ignored by MOC
    assert longest["region_class_probs"].shape == (4, max(counts), 3)
    np.testing.assert_array_equal(longest["region_locations"][2, : counts[2]], records[2]["region_locations"])
    fixed = pad_region_records(records, "max_length", max_regions=10, return_tensors="np")
    assert isinstance(fixed["region_features"], np.ndarray) and fixed["region_features"].shape[1] == 10
    capped = pad_region_records(records, max_regions=4, pad_to_multiple_of=3)
    assert capped["region_features"].shape[1] == 4 and capped["region_attention_mask"].sum(1).max() == 4
    torch.testing.assert_close(stack_region_records(records), pad_region_records(records))
    with pytest.raises(ValueError, match=r"sample 0 \(broken\) failed: unreadable"):
        pad_region_records([{"image_id": "broken", "error": "unreadable"}])
    with pytest.raises(ValueError, match="region_locations of shape"):
        pad_region_records([{"region_features": np.zeros((2, 3)), "region_locations": np.zeros((3, 5))}])
    with pytest.raises(ValueError, match="padding='max_length' needs"):
        pad_region_records(records, "max_length")


def test_float16_regions_give_a_float16_batch_of_the_same_values(tokenizer):
    """A float16 cache row (a read-only view of the mapped file) is copied once, into a float16 batch (half the
    bytes to fill and move; float16 -> float32 is exact, so the model sees the same numbers): it equals the batch made
    from the same values in float32, and the row is never written to. `feature_dtype` converts on the CPU instead."""
    features = make_features(tokenizer, 6, seed=4)
    halves = []
    for feature in features:
        half = feature["region_features"].astype(np.float16)
        half.flags.writeable = False
        halves.append({**feature, "region_features": half})
    exact = [{**f, "region_features": h["region_features"].astype(np.float32)} for f, h in zip(features, halves)]
    collate = lambda items, **kw: DataCollatorForImageBERTPretraining(tokenizer, seed=0, **kw)(items)  # noqa: E731
    from_half, from_float = collate(halves), collate(exact)
    assert from_half["region_features"].dtype == from_half["region_feature_targets"].dtype == torch.float16
    assert from_float["region_features"].dtype == from_float["region_feature_targets"].dtype == torch.float32
    for key in from_float:
        assert torch.equal(from_half[key].float() if from_half[key].is_floating_point() else from_half[key],
                           from_float[key]), key  # fmt: skip
    assert from_half["masked_regions"].any() and from_half["region_feature_targets"].abs().sum() > 0
    converted = collate(halves, feature_dtype=torch.float32)
    assert converted["region_features"].dtype == converted["region_feature_targets"].dtype == torch.float32
    for key in from_float:
        assert torch.equal(converted[key], from_float[key]), key
    for half, original in zip(halves, features):
        assert np.array_equal(half["region_features"], original["region_features"].astype(np.float16))


def test_non_finite_regions_are_named_by_their_image_and_large_finite_ones_pass(tokenizer):
    features = make_features(tokenizer, 4, seed=5)
    features[2]["region_features"] = features[2]["region_features"].astype(np.float16)
    features[2]["region_features"][1, 3] = np.inf
    collate = DataCollatorForImageBERTPretraining(tokenizer, seed=0, itm_negative_probability=0.0)
    with pytest.raises(ValueError, match="sample 'img2': region_features hold NaN or infinite values"):
        collate(features)
    # Finite values whose sum overflows float32 are not an error: the batch-wide sum only decides when to look.
    features = make_features(tokenizer, 4, seed=5)
    for feature in features:
        feature["region_features"][:] = 3e38
    batch = collate(features)
    assert torch.isinf(batch["region_features"].sum()) and torch.isfinite(batch["region_features"]).all()


def test_region_values_are_checked_where_the_batch_is_made(tokenizer):
    """Locations outside [0, 1] and broken class distributions raise in the collator, naming the image: the model
    reads no values, so this is where a bad record stops, on any device."""
    collate = DataCollatorForImageBERTPretraining(tokenizer, seed=0, itm_negative_probability=0.0)
    features = make_features(tokenizer, 4, num_classes=3, seed=7)
    features[1]["region_locations"] = features[1]["region_locations"] * 640  # pixels, not normalised
    with pytest.raises(ValueError, match="sample 'img1': region_locations hold values outside"):
        collate(features)
    features = make_features(tokenizer, 4, num_classes=3, seed=7)
    features[3]["region_class_probs"][0, 0] = -0.5
    with pytest.raises(ValueError, match="sample 'img3': region_class_probs hold NaN, infinite or negative"):
        collate(features)
    # The same records, well formed, pass.
    collate(make_features(tokenizer, 4, num_classes=3, seed=7))


class _CollateAndReportSharing:
    """The collator, plus whether its two feature tensors were in shared memory where they were made."""

    def __init__(self, collator):
        self.collator = collator

    def __call__(self, features):
        batch = self.collator(features)
        batch["made_shared"] = torch.tensor(
            [batch["region_features"].is_shared(), batch["region_feature_targets"].is_shared()]
        )
        return batch


def test_dataloader_workers_collate_the_features_straight_into_shared_memory(tokenizer):
    features = make_features(tokenizer, 8, seed=6)
    for i, feature in enumerate(features):
        feature["sample_seed"] = i  # a worker draws other seeds than the process for features without one

    def collate():
        return _CollateAndReportSharing(DataCollatorForImageBERTPretraining(tokenizer, seed=0))

    in_process = collate()(features[:4])
    assert not in_process["made_shared"].any()
    loader = torch.utils.data.DataLoader(features, batch_size=4, collate_fn=collate(), num_workers=1)
    batches = list(loader)
    assert all(batch["made_shared"].all() for batch in batches)
    for key, value in in_process.items():
        if key != "made_shared":
            assert torch.equal(batches[0][key], value), key


class _CollateAndCountSegments:
    """The collator, plus how many storages (shared-memory segments, in a worker) its batch's tensors use."""

    def __init__(self, collator):
        self.collator = collator

    def __call__(self, features):
        batch = self.collator(features)
        tensors = [value for value in batch.values() if isinstance(value, torch.Tensor)]
        segments = {value.untyped_storage().data_ptr() for value in tensors}
        return {**batch, "num_tensors": len(tensors), "num_segments": len(segments)}


def test_a_worker_hands_the_small_batch_tensors_over_in_one_shared_block(tokenizer):
    features = make_features(tokenizer, 8, seed=6)
    for i, feature in enumerate(features):
        feature["sample_seed"] = i  # a worker draws other seeds than the process for features without one

    def collate():
        return _CollateAndCountSegments(DataCollatorForImageBERTPretraining(tokenizer, seed=0))

    in_process = collate()(features[:4])
    assert in_process["num_segments"] == in_process["num_tensors"] >= 10
    batches = list(torch.utils.data.DataLoader(features, batch_size=4, collate_fn=collate(), num_workers=1))
    # The features and the MRFR targets, collated straight into shared memory, and one block for the rest.
    assert batches[0]["num_segments"] == 3
    for key, value in in_process.items():
        if isinstance(value, torch.Tensor):
            assert batches[0][key].dtype == value.dtype and torch.equal(batches[0][key], value), key


def test_share_batch_tensors_packs_unshared_tensors_aligned_and_leaves_the_rest(monkeypatch):
    from imagebert_hf.models.imagebert.region_batching import share_batch_tensors

    already_shared = torch.arange(6, dtype=torch.float32).share_memory_()
    batch = {
        "flags": torch.tensor([True, False, True]),
        "ids": torch.arange(5, dtype=torch.int64).view(1, 5),
        "half": torch.linspace(-1, 1, 7, dtype=torch.float16),
        "scalar": torch.tensor(3.5),
        "strided_view": torch.arange(12, dtype=torch.int32).view(3, 4)[:, 1],
        "shared": already_shared,
        "group_size": 4,
    }
    assert share_batch_tensors(batch) is batch  # outside a DataLoader worker: untouched
    monkeypatch.setattr(torch.utils.data, "get_worker_info", lambda: object())
    packed = share_batch_tensors(batch)
    assert packed["shared"] is already_shared and packed["group_size"] == 4
    block = {packed[name].untyped_storage().data_ptr() for name in ("flags", "ids", "half", "scalar", "strided_view")}
    assert len(block) == 1 and packed["flags"].is_shared()
    for name in ("flags", "ids", "half", "scalar", "strided_view"):
        assert packed[name].dtype == batch[name].dtype and packed[name].shape == batch[name].shape, name
        assert torch.equal(packed[name], batch[name]), name
        assert packed[name].data_ptr() % 64 == 0, name
