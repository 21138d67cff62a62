import io
import json
import logging
import tarfile
from collections import Counter

import numpy as np
import pytest
import torch

from imagebert_hf.data.collator import DataCollatorForImageBERTPretraining
from imagebert_hf.data.pair_sources import (
    DatasetPairSource,
    ManifestPairSource,
    MixtureSampler,
    PretrainingPairDataset,
    SyntheticPairSource,
    WebDatasetPairSource,
    group_by_length,
    length_groups,
)
from imagebert_hf.data.synthetic import (
    make_synthetic_dataset,
    make_synthetic_examples,
    make_synthetic_tokenizer,
    write_synthetic_manifest,
)

from .testing_utils import COCO_DIR, FLICKR_DIR, require_shared_data


def write_img2dataset_shards(folder, examples, per_shard=3):
    """Tar shards laid out as img2dataset writes them: KEY.jpg, KEY.txt, KEY.json per sample."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for shard, start in enumerate(range(0, len(examples), per_shard)):
        path = folder / f"{shard:05d}.tar"
        with tarfile.open(path, "w") as tar:
            for offset, example in enumerate(examples[start : start + per_shard]):
                key = f"{shard:05d}{offset:04d}"
                buffer = io.BytesIO()
                example["image"].save(buffer, format="JPEG")
                meta = {"key": key, "caption": example["captions"][0], "status": "success"}
                for suffix, data in (
                    ("jpg", buffer.getvalue()),
                    ("txt", example["captions"][0].encode()),
                    ("json", json.dumps(meta).encode()),
                ):
                    info = tarfile.TarInfo(f"{key}.{suffix}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        paths.append(path)
    return paths


def test_manifest_source_pairs_splits_and_images(tmp_path):
    manifest = write_synthetic_manifest(tmp_path / "shapes", 10, seed=0, captions_per_image=2, test_fraction=0.2)
    source = ManifestPairSource(manifest, splits=["train"])
    assert len(source) == 16 and len(source.image_keys()) == 8
    key, caption = source[0]
    assert key.startswith("images/") and isinstance(caption, str)
    assert source.open_image(key).size == (96, 96)
    assert len(ManifestPairSource(manifest, max_captions_per_image=1)) == 10
    with pytest.raises(FileNotFoundError):
        ManifestPairSource(tmp_path / "missing.jsonl")
    with pytest.raises(ValueError, match="no image-caption pairs"):
        ManifestPairSource(manifest, splits=["val"])


def test_dataset_source_from_memory_and_disk(tmp_path):
    dataset = make_synthetic_dataset(4, seed=1, image_size=48)
    source = DatasetPairSource(dataset, text_column="captions", id_column="image_id")
    assert len(source) == 8 and source.image_keys() == dataset["image_id"]
    assert source.open_image(dataset["image_id"][2]).size == (48, 48)
    dataset.save_to_disk(tmp_path / "saved")
    single = DatasetPairSource(str(tmp_path / "saved"), text_column="captions")
    assert single.image_keys() == ["row-0", "row-1", "row-2", "row-3"]
    with pytest.raises(ValueError, match="no column 'text'"):
        DatasetPairSource(dataset, text_column="text")


def test_webdataset_source_reads_img2dataset_shards(tmp_path):
    examples = make_synthetic_examples(7, seed=2)
    write_img2dataset_shards(tmp_path / "shards", examples)
    source = WebDatasetPairSource(str(tmp_path / "shards" / "{00000..00002}.tar"))
    assert len(source) == 7
    assert [text for _, text in source.pairs] == [example["captions"][0] for example in examples]
    key = source.pairs[4][0]
    image = np.asarray(source.open_image(key)).astype(int)
    # JPEG is lossy: the decoded image is close to, not equal to, the original.
    assert np.abs(image - np.asarray(examples[4]["image"]).astype(int)).mean() < 8
    assert len(WebDatasetPairSource(str(tmp_path / "shards" / "*.tar"))) == 7
    table = source.image_table()
    assert table["key"] == source.image_keys()
    assert table[4]["image"]["bytes"] == source.image_bytes(key)
    with pytest.raises(FileNotFoundError):
        WebDatasetPairSource(str(tmp_path / "shards" / "{00005..00006}.tar"))


def test_mixture_sampler_is_reproducible_weighted_and_covers_sources():
    sampler = MixtureSampler([100, 50], [3.0, 1.0], seed=0, num_samples=4000)
    first = sampler.indices(0)
    assert first == MixtureSampler([100, 50], [3.0, 1.0], seed=0, num_samples=4000).indices(0)
    assert first != sampler.indices(1)
    from_first = sum(index < 100 for index, _ in first) / len(first)
    assert 0.72 < from_first < 0.78
    # Within a source, every item comes once before any comes twice.
    second_source = [index for index, _ in first if index >= 100][:50]
    assert sorted(second_source) == list(range(100, 150))
    seeds = [seed for _, seed in first]
    assert len(set(seeds)) == len(seeds)
    assert len(MixtureSampler([5, 5], [1, 1], seed=0)) == 10
    with pytest.raises(ValueError, match="positive"):
        MixtureSampler([5], [0.0], seed=0)


def _padded_cost(order, lengths, group_size):
    """Sum over groups of group_size x (longest first length + longest second length): what padding costs."""
    total = 0
    for start in range(0, len(order), group_size):
        group = np.asarray([lengths[i] for i in order[start : start + group_size]])
        total += len(group) * int(group.max(axis=0).sum())
    return total


def test_length_groups_pad_less_than_sorting_by_the_first_entry():
    rng = np.random.default_rng(0)
    # The benchmark's lengths: 10-100 regions (log-uniform), captions of 10-32 tokens.
    regions = np.exp(rng.uniform(np.log(10), np.log(100), 400)).round().astype(int)
    lengths = np.stack([regions, rng.integers(8, 31, 400) + 2], axis=1)
    groups = length_groups(lengths, 8)
    assert sorted(np.concatenate(groups).tolist()) == list(range(400))
    assert all(len(group) == 8 for group in groups)
    for group in groups:
        assert [tuple(row) for row in lengths[group]] == sorted(map(tuple, lengths[group]), reverse=True)
    plain = np.lexsort(-lengths.T[::-1])
    grouped_cost = _padded_cost(np.concatenate(groups), lengths.tolist(), 8)
    plain_cost = _padded_cost(plain, lengths.tolist(), 8)
    real = int(lengths.sum())
    # Sorting by region count alone leaves about 9 positions of padding per sample here; the second pass halves it.
    assert grouped_cost - real < 0.7 * (plain_cost - real)
    # One entry: the plain sort; a short last group; no samples.
    single = rng.integers(1, 50, (21, 1))
    cut = length_groups(single, 4)
    assert [len(group) for group in cut] == [4, 4, 4, 4, 4, 1]
    assert np.concatenate(cut).tolist() == np.lexsort(-single.T[::-1]).tolist()
    # A fixed region count (a grid extractor): the same order as the plain sort, so such runs train as before.
    fixed = np.stack([np.full(300, 30), rng.integers(5, 40, 300)], axis=1)
    assert np.concatenate(length_groups(fixed, 8)).tolist() == np.lexsort(-fixed.T[::-1]).tolist()
    assert length_groups(np.zeros((0, 2), dtype=int), 4) == []


def test_group_by_length_sorts_within_pools_and_keeps_every_sample():
    rng = np.random.default_rng(0)
    lengths = [(int(r), int(t)) for r, t in zip(rng.integers(10, 101, 1000), rng.integers(8, 31, 1000))]
    samples = list(range(1000))
    grouped = group_by_length(samples, lengths, group_size=8, pool_size=400, rng=np.random.default_rng(1))
    assert sorted(grouped) == samples
    assert grouped == group_by_length(samples, lengths, 8, 400, np.random.default_rng(1))
    assert grouped != group_by_length(samples, lengths, 8, 400, np.random.default_rng(2))
    # The group that pads to the longest leads; every group is sorted longest first.
    padded = [sum(np.max([lengths[s] for s in grouped[start : start + 8]], axis=0)) for start in range(0, 1000, 8)]
    assert padded[0] == max(padded)
    pool_of = {sample: sample // 400 for sample in samples}
    for start in range(0, 1000, 8):
        group = grouped[start : start + 8]
        assert len({pool_of[sample] for sample in group}) == 1 or start == 0
        assert [lengths[s] for s in group] == sorted((lengths[s] for s in group), reverse=True)
    assert _padded_cost(grouped, lengths, 8) < 0.75 * _padded_cost(samples, lengths, 8)
    # Unreadable samples (length None) spread over the groups instead of filling groups of their own.
    unknown = [None if i % 4 == 0 else length for i, length in enumerate(lengths)]
    spread = group_by_length(samples, unknown, 8, 400, np.random.default_rng(1))
    assert sorted(spread) == samples
    assert max(sum(s % 4 == 0 for s in spread[i : i + 8]) for i in range(0, 1000, 8)) <= 6
    assert group_by_length(samples[:5], [None] * 5, 2, 4, np.random.default_rng(0)) == samples[:5]
    # The last pool may be short, the last group too.
    assert sorted(group_by_length(samples[:13], lengths[:13], 4, 8, np.random.default_rng(0))) == samples[:13]
    with pytest.raises(ValueError, match="one length per sample"):
        group_by_length(samples, lengths[:10], 8, 400, np.random.default_rng(0))


def test_grouped_mixture_sampler_reorders_the_same_samples_and_seeds():
    lengths = {index: (index % 7, index % 3) for index in range(150)}
    plain = MixtureSampler([100, 50], [3.0, 1.0], seed=0, num_samples=960)
    grouped = MixtureSampler(
        [100, 50],
        [3.0, 1.0],
        seed=0,
        num_samples=960,
        sample_lengths=lambda samples: [lengths[index] for index, _ in samples],
        group_size=16,
        pool_groups=10,
    )
    assert sorted(grouped.indices(0)) == sorted(plain.indices(0))
    assert grouped.indices(0) == list(iter(grouped)) and grouped.indices(0) != plain.indices(0)
    order = [index for index, _ in grouped.indices(0)]
    ungrouped = [index for index, _ in plain.indices(0)]
    assert _padded_cost(order, lengths, 16) < 0.8 * _padded_cost(ungrouped, lengths, 16)
    with pytest.raises(ValueError, match="group_size"):
        MixtureSampler([5], [1.0], seed=0, group_size=0)


def _dataset(num_images=12, negative=0.5, drop=()):
    source = SyntheticPairSource(num_images, seed=3)
    store = source.annotation_regions(feature_size=16)
    for key in drop:
        store.pop(key)
    tokenizer = make_synthetic_tokenizer()
    dataset = PretrainingPairDataset(
        [source], [store], tokenizer, max_text_length=16, max_regions=5, itm_negative_probability=negative
    )
    return source, dataset, tokenizer


def test_pretraining_dataset_negatives_come_from_other_images():
    source, dataset, tokenizer = _dataset()
    items = [dataset[(i % len(dataset), 1000 + i)] for i in range(400)]
    negatives = [item for item in items if item["itm_labels"] == 0]
    assert 0.4 < len(negatives) / len(items) < 0.6
    for position, item in enumerate(items):
        key, caption = source[position % len(dataset)]
        text_same = item["input_ids"] == tokenizer(caption)["input_ids"]
        regions_same = item["image_id"] == key
        if item["itm_labels"] == 1:
            assert text_same and regions_same
        else:
            assert text_same != regions_same
    assert dataset[(5, 42)]["input_ids"] == dataset[(5, 42)]["input_ids"]
    assert dataset[(5, 42)]["sample_seed"] == 42


def test_sample_lengths_replay_the_sample_negatives_included():
    source, dataset, _ = _dataset(num_images=30)
    store = dataset.region_stores[0]
    # Synthetic images all have 3 regions; keep 1 to 3 of them so that negatives change the region count.
    for number, key in enumerate(source.image_keys()):
        store[key] = {name: store[key][name][: 1 + number % 3] for name in ("region_features", "region_locations")}
    samples = [(position % len(dataset), 7000 + position) for position in range(300)]
    lengths = dataset.sample_lengths(samples)
    for sample, length in zip(samples, lengths):
        loaded = dataset[sample]
        assert length == (len(loaded["region_features"]), len(loaded["input_ids"]))
    assert dataset.sample_lengths(samples[::-1]) == lengths[::-1]


def test_failed_records_are_skipped_counted_and_warned(caplog):
    source, _, _ = _dataset()
    missing = source.image_keys()[0]
    _, dataset, tokenizer = _dataset(negative=0.0, drop=[missing])
    with caplog.at_level(logging.WARNING, logger="imagebert_hf.data.pair_sources"):
        items = [dataset[i] for i in range(len(dataset))]
    failed = [i for i, item in enumerate(items) if item is None]
    assert failed == [i for i, (key, _) in enumerate(source.pairs) if key == missing]
    assert missing in caplog.text
    batch = DataCollatorForImageBERTPretraining(tokenizer, count_failed=True, seed=0)(items[:6])
    assert batch["num_failed_records"].item() == sum(item is None for item in items[:6])
    assert batch["input_ids"].shape[0] == 6 - batch["num_failed_records"].item()


def test_failure_warnings_stop_at_the_budget_and_say_so(caplog):
    source, _, _ = _dataset()
    dropped = source.image_keys()[:3]
    _, dataset, _ = _dataset(negative=0.0, drop=dropped)
    dataset._warnings.limit = 2
    with caplog.at_level(logging.WARNING, logger="imagebert_hf.data.pair_sources"):
        items = [dataset[i] for i in range(len(dataset))]
    failures = sum(item is None for item in items)
    messages = [record.getMessage() for record in caplog.records]
    assert failures > 2 and dataset._warnings.count == failures
    assert len(messages) == 2
    assert "counted silently" in messages[1] and "counted silently" not in messages[0]


@require_shared_data
def test_real_manifests_give_the_documented_pairs():
    flickr = ManifestPairSource(FLICKR_DIR / "captions.jsonl", splits=["train"])
    assert len(flickr.image_keys()) == 753 and len(flickr) == 753 * 5
    coco = ManifestPairSource(COCO_DIR / "captions.jsonl")
    assert len(coco.image_keys()) == 128 and len(coco) == 641
    counts = Counter(key for key, _ in coco.pairs)
    assert max(counts.values()) == 6
    assert coco.open_image(coco.image_keys()[0]).mode == "RGB"


def test_manifest_pairs_find_their_regions_in_the_region_cache(tokenizer, make_tiny_extractor, tmp_path):
    from imagebert_hf.data.pair_sources import open_region_store
    from imagebert_hf.regions import extract_regions

    manifest = write_synthetic_manifest(tmp_path / "shapes", 6, seed=0, image_size=64)
    # Random weights keep the test fast; only the keys and shapes matter here.
    extractor = make_tiny_extractor()
    extract_regions(manifest, tmp_path / "cache", extractor, store_class_probs=False, progress=False)
    source = ManifestPairSource(manifest)
    dataset = PretrainingPairDataset(
        [source], [open_region_store(tmp_path / "cache")], tokenizer, 16, 3, itm_negative_probability=0.0
    )
    items = [dataset[i] for i in range(len(dataset))]
    assert all(item is not None for item in items)
    assert {item["region_features"].shape for item in items} == {(3, extractor.region_feature_size)}
    store = dataset.region_stores[0]
    assert all(store.num_regions(key) == len(store[key]["region_features"]) == 5 for key in source.image_keys())
    assert {length[0] for length in dataset.sample_lengths([(i, i) for i in range(len(dataset))])} == {3}
    batch = DataCollatorForImageBERTPretraining(tokenizer, seed=0)(items)
    assert batch["region_features"].shape == (len(items), 3, extractor.region_feature_size)


def test_training_reads_float16_caches_without_a_float32_copy(tokenizer, make_tiny_extractor, tmp_path):
    """`open_region_store` (what training opens) yields the stored float16 rows; the collated batch is the same as
    from the cache opened as float32."""
    from imagebert_hf.data.pair_sources import open_region_store
    from imagebert_hf.regions import extract_regions, load_region_cache

    manifest = write_synthetic_manifest(tmp_path / "shapes", 4, seed=1, image_size=64)
    extractor = make_tiny_extractor()
    extract_regions(manifest, tmp_path / "cache", extractor, store_class_probs=False, progress=False)
    batches = []
    for store in (open_region_store(tmp_path / "cache"), load_region_cache(tmp_path / "cache", dtype="float32")):
        dataset = PretrainingPairDataset([ManifestPairSource(manifest)], [store], tokenizer, 16, 5)
        items = dataset.__getitems__(list(range(len(dataset))))
        batches.append((items, DataCollatorForImageBERTPretraining(tokenizer, seed=0)(items)))
    (stored_items, stored), (float_items, as_float) = batches
    assert {item["region_features"].dtype for item in stored_items} == {np.dtype(np.float16)}
    assert {item["region_features"].dtype for item in float_items} == {np.dtype(np.float32)}
    assert stored.keys() == as_float.keys()
    for key in stored:
        assert torch.equal(stored[key], as_float[key]), key


def test_a_dataset_whose_captions_are_a_string_on_one_row_and_a_list_on_another_reads_each_caption():
    # datasets stores such a column as Json (encoded text): read through Arrow it gave '"a cat"' and the list as one
    # caption; the same rows with plain columns, reselected and shuffled, read as datasets gives them.
    import datasets

    mixed = datasets.Dataset.from_dict(
        {"id": ["a", "b"], "captions": ["a cat", ["a dog", "two dogs"]]}, on_mixed_types="use_json"
    )
    assert DatasetPairSource(mixed, id_column="id").pairs == [("a", "a cat"), ("b", "a dog"), ("b", "two dogs")]
    plain = datasets.Dataset.from_dict({"id": ["a", "b", "c", "d"], "captions": [["1"], ["2"], ["3"], ["4"]]})
    reordered = plain.select([3, 1]).shuffle(seed=0)
    assert DatasetPairSource(reordered, id_column="id").pairs == [(key, text) for key, (text,) in
                                                                  zip(reordered["id"], reordered["captions"])]  # fmt: skip
