"""Inputs read back from disk or handed to the pretraining collator: a corpus cache whose tensors were changed
(indices beyond the split, another dtype or shape, NaN regions, a missing or unknown tensor), a saved embedding index
with a NaN row or an .npz in place of its .npy, and region records whose arrays disagree in width, dtype or rows
(also when `max_regions` would cut the difference away). Each fails naming the file and tensor, or the image."""

import io
import json

import numpy as np
import pytest
import torch
from safetensors.torch import load, save

from imagebert_hf.data.collator import DataCollatorForImageBERTPretraining
from imagebert_hf.data.retrieval_corpus import RetrievalCorpus, stack_region_records
from imagebert_hf.evaluation.full_ranking import CorpusCacheError, load_corpus_cache, save_corpus_cache
from imagebert_hf.models.imagebert.region_batching import check_region_record, pad_region_records
from imagebert_hf.models.imagebert.retrieval_index import EmbeddingIndex


# ------------------------------------------------------------------------------------------------ corpus cache

RECORDS = [{"image_id": "1", "captions": ["a red circle"]}, {"image_id": "2", "captions": ["a blue square"]}]


def _region_record(count: int = 3) -> dict:
    return {
        "region_features": np.ones((count, 4), np.float32),
        "region_locations": np.full((count, 5), 0.5, np.float32),
    }


@pytest.fixture
def cache(tmp_path, tokenizer):
    """A corpus cache of two images, as `save_corpus_cache` writes it, and the fingerprint it was built from."""
    corpus = RetrievalCorpus.from_records(RECORDS, tokenizer, [_region_record(), _region_record(2)], 44, 3)
    fingerprint = {
        "num_images": 2,
        "tokenizer": f"{type(tokenizer).__name__}/{len(tokenizer)}",
        "max_text_length": 44,
        "max_regions": 3,
        "region_feature_size": 4,
    }
    path = tmp_path / "corpus.safetensors"
    save_corpus_cache(path, corpus, fingerprint)
    return path, fingerprint


def _tamper(path, **changes) -> None:
    """Rewrites the cache with tensors replaced (None: removed), its metadata kept."""
    data = path.read_bytes()
    metadata = json.loads(data[8 : 8 + int.from_bytes(data[:8], "little")])["__metadata__"]
    tensors = dict(load(data))
    for name, value in changes.items():
        name = name.replace("__", ".")
        if value is None:
            tensors.pop(name)
        else:
            tensors[name] = value
    path.write_bytes(save(tensors, metadata=metadata))


def _nan_features():
    features = torch.ones(2, 3, 4)
    features[1, 0, 2] = float("nan")
    return features


TAMPERED = [
    ("index beyond the split", {"text_to_image": torch.tensor([0, 7])}, r"text_to_image holds image indices 0\.\.7"),
    ("negative index", {"text_to_image": torch.tensor([-1, 1])}, r"text_to_image holds image indices -1\.\.1"),
    ("float indices", {"text_to_image": torch.tensor([0.0, 1.0])}, r"text_to_image has dtype float32; expected int64"),
    ("image without caption", {"text_to_image": torch.tensor([0, 0])}, r"image '2' has no caption in .*text_to_image"),
    ("float ids", {"text_inputs__input_ids": torch.ones(2, 44)}, r"text_inputs.input_ids has dtype float32"),
    (
        "ids of 5 texts",
        {"text_inputs__input_ids": torch.ones(5, 4, dtype=torch.long)},
        r"input_ids has shape \(5, 4\)",
    ),
    ("ids beyond vocab", {"text_inputs__input_ids": torch.full((2, 44), 10**6)}, r"input_ids holds values 1000000"),
    ("mask of 2s", {"text_inputs__attention_mask": torch.full((2, 44), 2)}, r"attention_mask holds values 2\.\.2"),
    (
        "token type 1",
        {"text_inputs__token_type_ids": torch.ones(2, 44, dtype=torch.long)},
        r"token_type_ids holds values 1\.\.1",
    ),
    (
        "features of 7 images",
        {"region_inputs__region_features": torch.ones(7, 3, 4)},
        r"features has shape \(7, 3, 4\)",
    ),
    ("NaN features", {"region_inputs__region_features": _nan_features()}, r"features hold NaN .*\(image '2'\)"),
    ("pixel locations", {"region_inputs__region_locations": torch.full((2, 3, 5), 640.0)}, r"locations hold values"),
    (
        "locations removed",
        {"region_inputs__region_locations": None},
        r"tensor region_inputs.region_locations is missing",
    ),
    ("unknown tensor", {"extra": torch.ones(1)}, r"it holds tensors \['extra'\], which a corpus cache does not"),
]


@pytest.mark.parametrize(("changes", "message"), [c[1:] for c in TAMPERED], ids=[c[0] for c in TAMPERED])
def test_a_corpus_cache_with_changed_tensors_is_refused_naming_file_and_tensor(cache, changes, message):
    path, fingerprint = cache
    load_corpus_cache(path, fingerprint)  # as written, it loads
    _tamper(path, **changes)
    with pytest.raises(CorpusCacheError, match=rf"--corpus_cache .*corpus.safetensors is damaged: .*{message}"):
        load_corpus_cache(path, fingerprint)


def test_regions_of_another_feature_size_than_the_fingerprint_are_refused(cache):
    path, fingerprint = cache
    _tamper(path, region_inputs__region_features=torch.ones(2, 3, 8))
    with pytest.raises(CorpusCacheError, match=r"regions of 8 features; region_feature_size=4"):
        load_corpus_cache(path, fingerprint)


def test_every_cache_the_writer_makes_loads(tmp_path, tokenizer, cache):
    path, fingerprint = cache
    loaded = load_corpus_cache(path, fingerprint)
    expected = stack_region_records([_region_record(), _region_record(2)], 3)
    assert loaded.text_to_image.tolist() == [0, 1] and loaded.image_ids == ["1", "2"]
    for key, value in expected.items():
        assert torch.equal(loaded.region_inputs[key], value), key
    # Without masks and token types (scoring defaults them), and without any text or region tensor at all.
    _tamper(path, text_inputs__token_type_ids=None, region_inputs__region_attention_mask=None)
    assert set(load_corpus_cache(path, fingerprint).region_inputs) == {"region_features", "region_locations"}
    bare = tmp_path / "bare.safetensors"
    save_corpus_cache(bare, RetrievalCorpus.from_records(RECORDS), {"num_images": 2})
    assert load_corpus_cache(bare, {"num_images": 2}).text_inputs == {}


# ------------------------------------------------------------------------------------------------ embedding index

GALLERY = torch.nn.functional.normalize(torch.randn(10, 8, generator=torch.Generator().manual_seed(0)), dim=-1)


def test_a_saved_index_with_a_nan_row_is_refused_at_load(tmp_path):
    EmbeddingIndex(GALLERY, use_faiss=False).save(tmp_path / "i")
    vectors = np.load(tmp_path / "i" / "embeddings.npy")
    vectors[3] = np.nan
    np.save(tmp_path / "i" / "embeddings.npy", vectors)  # the same size: the recorded size agrees
    with pytest.raises(ValueError, match=r"embeddings.npy has 1 row\(s\) with NaN or inf \(first: row 3\)"):
        EmbeddingIndex.load(tmp_path / "i")


def test_an_npz_in_place_of_the_embeddings_is_named(tmp_path):
    EmbeddingIndex(GALLERY, use_faiss=False).save(tmp_path / "i")
    buffer = io.BytesIO()
    np.savez(buffer, embeddings=GALLERY.numpy())
    (tmp_path / "i" / "embeddings.npy").write_bytes(buffer.getvalue())
    config = json.loads((tmp_path / "i" / "index_config.json").read_text())
    config["files"]["embeddings.npy"]["size"] = len(buffer.getvalue())
    (tmp_path / "i" / "index_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"embeddings.npy is damaged or not a float32 matrix \(it is an .npz archive"):
        EmbeddingIndex.load(tmp_path / "i")


def test_large_finite_embeddings_pass_the_finite_check(tmp_path):
    # Their row sums overflow float32; only a value that is not finite is an error.
    large = np.full((3, 4), 3e38, np.float32)
    EmbeddingIndex(large, use_faiss=False).save(tmp_path / "i")
    assert np.array_equal(EmbeddingIndex.load(tmp_path / "i").embeddings.numpy(), large)


# ------------------------------------------------------------------------------------------------ collator


def _feature(tokenizer, image_id="img-1", count=3, **changes) -> dict:
    feature = {
        "image_id": image_id,
        "input_ids": tokenizer("a red circle")["input_ids"],
        "region_features": np.ones((count, 6), np.float32),
        "region_locations": np.full((count, 5), 0.5, np.float32),
        "region_class_labels": np.arange(count) % 24,
        "region_class_probs": np.full((count, 24), 1 / 24, np.float32),
    }
    feature.update(changes)
    return feature


BAD_RECORDS = [
    (
        "probs of 7 classes",
        {"region_class_probs": np.full((3, 7), 1 / 7, np.float32)},
        r"sample 'img-2': region_class_probs hold 7 classes per region; expected 24 \(num_object_classes\)",
    ),
    (
        "float labels",
        {"region_class_labels": np.array([0.0, 5.9, 1.0])},
        r"sample 'img-2': region_class_labels has dtype float64; expected integer class ids",
    ),
    (
        "labels of 2 rows",
        {"region_class_labels": np.array([0, 1])},
        r"sample 'img-2': region_class_labels has 2 rows but region_features has 3",
    ),
    (
        "labels 2-D",
        {"region_class_labels": np.zeros((3, 2), np.int64)},
        r"sample 'img-2': region_class_labels has shape \(3, 2\); expected \(R,\)",
    ),
    (
        "no regions but labels",
        {"region_features": np.zeros((0, 6), np.float32), "region_locations": np.zeros((0, 5), np.float32)},
        r"sample 'img-2': region_features is empty \(shape \(0, 6\)\) but region_class_labels has shape \(3,\)",
    ),
]


@pytest.mark.parametrize(("changes", "message"), [c[1:] for c in BAD_RECORDS], ids=[c[0] for c in BAD_RECORDS])
def test_a_malformed_region_record_is_named_by_its_image(tokenizer, changes, message):
    collator = DataCollatorForImageBERTPretraining(tokenizer, num_object_classes=24, seed=0)
    with pytest.raises(ValueError, match=message):
        collator([_feature(tokenizer), _feature(tokenizer, "img-2", **changes)])


def test_rows_that_disagree_are_found_before_the_cut_to_max_regions(tokenizer):
    record = _feature(tokenizer, "img-2", count=10, region_class_labels=np.array([0, 1, 2]))
    collator = DataCollatorForImageBERTPretraining(tokenizer, max_regions=3, seed=0)
    with pytest.raises(ValueError, match=r"sample 'img-2': region_class_labels has 3 rows but region_features has 10"):
        collator([_feature(tokenizer), record])
    with pytest.raises(ValueError, match=r"region record 0 \(img-2\): region_class_labels has 3 rows"):
        pad_region_records([record], max_regions=2, return_labels=True)
    with pytest.raises(ValueError, match=r"region record of 'img-2': region_class_labels has 3 rows"):
        check_region_record(record, "region record of 'img-2'")


def test_class_distributions_of_another_width_are_named_without_num_object_classes(tokenizer):
    collator = DataCollatorForImageBERTPretraining(tokenizer, seed=0)
    other = _feature(tokenizer, "img-2", region_class_probs=np.full((3, 7), 1 / 7, np.float32))
    with pytest.raises(ValueError, match=r"region_class_probs of region record 1 \(img-2\) has rows of shape \(7,\)"):
        collator([_feature(tokenizer), other])


def test_well_formed_records_batch_as_given_and_are_cut_to_max_regions(tokenizer):
    records = [
        _feature(tokenizer, count=5),
        _feature(tokenizer, "img-2", region_class_labels=[4, 5, 6]),  # a list of ints is integer class ids
        _feature(tokenizer, "img-3", count=2, region_features=np.ones((2, 6), np.float16)),
    ]
    collator = DataCollatorForImageBERTPretraining(
        tokenizer, num_object_classes=24, max_regions=4, seed=0, itm_negative_probability=0.0
    )
    batch = collator(records)
    assert batch["region_class_labels"].tolist() == [[0, 1, 2, 3], [4, 5, 6, -100], [0, 1, -100, -100]]
    assert batch["region_attention_mask"].sum(1).tolist() == [4, 3, 2]
    assert batch["region_class_probs"].shape == (3, 4, 24)
