import io
import json
import logging
import tarfile
from collections import Counter

import numpy as np
import pytest

from imagebert_hf.data.collator import DataCollatorForImageBERTPretraining
from imagebert_hf.data.sources import (
    DatasetPairSource,
    ManifestPairSource,
    MixtureSampler,
    PretrainingPairDataset,
    SyntheticPairSource,
    WebDatasetPairSource,
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
    assert single.image_keys() == ["0", "1", "2", "3"]
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


def test_failed_records_are_skipped_counted_and_warned(caplog):
    source, _, _ = _dataset()
    missing = source.image_keys()[0]
    _, dataset, tokenizer = _dataset(negative=0.0, drop=[missing])
    with caplog.at_level(logging.WARNING, logger="imagebert_hf.data.sources"):
        items = [dataset[i] for i in range(len(dataset))]
    failed = [i for i, item in enumerate(items) if item is None]
    assert failed == [i for i, (key, _) in enumerate(source.pairs) if key == missing]
    assert missing in caplog.text
    batch = DataCollatorForImageBERTPretraining(tokenizer, count_failed=True, seed=0)(items[:6])
    assert batch["num_failed_records"].item() == sum(item is None for item in items[:6])
    assert batch["input_ids"].shape[0] == 6 - batch["num_failed_records"].item()


@require_shared_data
def test_real_manifests_give_the_documented_pairs():
    flickr = ManifestPairSource(FLICKR_DIR / "captions.jsonl", splits=["train"])
    assert len(flickr.image_keys()) == 753 and len(flickr) == 753 * 5
    coco = ManifestPairSource(COCO_DIR / "captions.jsonl")
    assert len(coco.image_keys()) == 128 and len(coco) == 641
    counts = Counter(key for key, _ in coco.pairs)
    assert max(counts.values()) == 6
    assert coco.open_image(coco.image_keys()[0]).mode == "RGB"


def test_manifest_pairs_find_their_regions_in_the_region_cache(tmp_path):
    from imagebert_hf import ImageBERTRoIExtractor
    from imagebert_hf.data.feature_cache import extract_regions
    from imagebert_hf.data.sources import open_region_store

    manifest = write_synthetic_manifest(tmp_path / "shapes", 6, seed=0, image_size=64)
    # Random weights keep the test fast; only the keys and shapes matter here.
    extractor = ImageBERTRoIExtractor(backbone_weights=None, size={"height": 64, "width": 64}, grid_sizes=[1, 2])
    extract_regions(manifest, tmp_path / "cache", extractor, store_class_probs=False, progress=False)
    source = ManifestPairSource(manifest)
    tokenizer = make_synthetic_tokenizer()
    dataset = PretrainingPairDataset(
        [source], [open_region_store(tmp_path / "cache")], tokenizer, 16, 3, itm_negative_probability=0.0
    )
    items = [dataset[i] for i in range(len(dataset))]
    assert all(item is not None for item in items)
    assert {item["region_features"].shape for item in items} == {(3, extractor.region_feature_size)}
    batch = DataCollatorForImageBERTPretraining(tokenizer, seed=0)(items)
    assert batch["region_features"].shape == (len(items), 3, extractor.region_feature_size)
