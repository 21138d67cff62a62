"""Hostile input at the embedding index: faiss factory strings that would abort the process, settings that are not
counts, NaN embeddings and queries, and saved indexes that are damaged, swapped or inconsistent with their config.
Every error names the argument or the file; nothing crashes the interpreter or searches the wrong gallery."""

import json
import os
import shutil

import numpy as np
import pytest
import torch

from imagebert_hf.models.imagebert.retrieval_index import EmbeddingIndex, check_factory_string, faiss


needs_faiss = pytest.mark.skipif(faiss is None, reason="faiss is not installed")
RNG = np.random.default_rng(0)
GALLERY = RNG.standard_normal((40, 8)).astype(np.float32)
OTHER = RNG.standard_normal((25, 8)).astype(np.float32)


# ------------------------------------------------------------------------------------------------ building

FACTORIES = [
    ("HNSW0,Flat", r"faiss aborted the process \(signal 6\)"),
    ("Foo", "could not parse index string Foo"),
    ("PQ3", "should be a multiple of the number of subquantizers"),
    ("IVF4,PQ8x99", "nbits larger than 24"),
]


@needs_faiss
@pytest.mark.parametrize(("factory", "said"), FACTORIES, ids=[f for f, _ in FACTORIES])
def test_a_factory_string_faiss_cannot_build_is_refused_without_a_crash(factory, said):
    with pytest.raises(ValueError, match=rf"faiss cannot build index_type '{factory}' for 8-d embeddings: .*{said}"):
        EmbeddingIndex(GALLERY, factory)


@pytest.mark.parametrize("factory", ["IVF4,Flat; import os", "HNSW32,Flat\n", "Flat'", "I" * 300])
def test_a_factory_string_with_foreign_characters_is_refused_before_any_probe(factory):
    with pytest.raises(ValueError, match=r"is not a faiss index_factory string \(letters, digits"):
        check_factory_string(factory, 8)


PARAMETERS = [
    ({"index_type": "hnsw", "hnsw_m": 0}, ValueError, "hnsw_m must be an integer >= 2, got 0"),
    ({"index_type": "hnsw", "hnsw_m": 1}, ValueError, "hnsw_m must be an integer >= 2, got 1"),
    ({"index_type": "ivf", "nlist": 0}, ValueError, "nlist must be an integer >= 1, got 0"),
    ({"index_type": "ivf", "nlist": 2.5}, ValueError, "nlist must be an integer >= 1, got 2.5"),
    ({"index_type": "ivfpq", "pq_m": 0}, ValueError, "pq_m must be an integer >= 1, got 0"),
    ({"index_type": "ivfpq", "pq_m": 3}, ValueError, "pq_m=3 must divide the embedding size 8"),
    ({"index_type": 3}, TypeError, "index_type must be a string, got int: 3"),
    ({"index_type": "exact"}, ValueError, "index_type must be one of"),
]


@pytest.mark.parametrize(("kwargs", "error", "message"), PARAMETERS, ids=[m for _, _, m in PARAMETERS])
def test_index_settings_that_are_not_counts_are_named(kwargs, error, message):
    with pytest.raises(error, match=message.replace("(", r"\(").replace(")", r"\)").replace(".", r"\.")):
        EmbeddingIndex(GALLERY, **kwargs)


@needs_faiss
def test_too_few_embeddings_to_train_is_named():
    with pytest.raises(ValueError, match=r"faiss could not build index_type 'IVF512,Flat' .* over 40 embeddings"):
        EmbeddingIndex(GALLERY, "IVF512,Flat")


@pytest.mark.parametrize(("value", "where"), [(np.nan, 3), (np.inf, 0), (-np.inf, 39)], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("use_faiss", [False, None], ids=["torch", "default"])
def test_embeddings_with_nan_or_inf_are_refused_at_add(value, where, use_faiss):
    bad = GALLERY.copy()
    bad[where, 2] = value
    with pytest.raises(ValueError, match=rf"embeddings has 1 row\(s\) with NaN or inf \(first: row {where}\)"):
        EmbeddingIndex(bad, use_faiss=use_faiss)


@pytest.mark.parametrize("value", [np.nan, np.inf], ids=["nan", "inf"])
def test_queries_with_nan_are_refused_not_answered_with_minus_one(value):
    queries = GALLERY[:3].copy()
    queries[1, 0] = value
    with pytest.raises(ValueError, match=r"queries has 1 row\(s\) with NaN or inf \(first: row 1\)"):
        EmbeddingIndex(GALLERY).search(queries, 2)


SEARCH_CASES = [
    ({"k": 0}, ValueError, "k must be at least 1, got 0"),
    ({"k": -3}, ValueError, "k must be at least 1, got -3"),
    ({"k": "3"}, TypeError, "k must be an integer, got str: '3'"),
    ({"k": 2.0}, TypeError, "k must be an integer, got float: 2.0"),
    ({"k": True}, TypeError, "k must be an integer, got bool: True"),
    ({"queries": np.ones((2, 5), np.float32)}, ValueError, r"queries must have shape \(num_queries, 8\)"),
    ({"queries": np.ones(8, np.float32)}, ValueError, r"queries must be a \(num_items, dim\) matrix"),
    ({"queries": "a dog"}, TypeError, "queries must be a numeric"),
]


@pytest.mark.parametrize(("change", "error", "message"), SEARCH_CASES, ids=[c[2][:40] for c in SEARCH_CASES])
def test_bad_searches_are_named(change, error, message):
    arguments = {"queries": GALLERY[:2], "k": 2, **change}
    with pytest.raises(error, match=message):
        EmbeddingIndex(GALLERY).search(**arguments)


@pytest.mark.parametrize(
    ("embeddings", "error", "message"),
    [
        (np.zeros((0, 8), np.float32), ValueError, "embeddings must be a non-empty"),
        (np.ones(8, np.float32), ValueError, r"embeddings must be a \(num_items, dim\) matrix, got shape \(8,\)"),
        ([["a", "b"]], TypeError, "embeddings must be a numeric"),
    ],
    ids=["empty", "1-d", "strings"],
)
def test_bad_galleries_are_named(embeddings, error, message):
    with pytest.raises(error, match=message):
        EmbeddingIndex(embeddings)


# ------------------------------------------------------------------------------------------------ saving and loading


@pytest.fixture(params=["torch", "faiss"])
def saved(request, tmp_path):
    if request.param == "faiss" and faiss is None:
        pytest.skip("faiss is not installed")
    folder = tmp_path / "index"
    EmbeddingIndex(GALLERY, use_faiss=request.param == "faiss").save(folder, metadata={"gallery": "test"})
    return folder


def _edit_config(folder, **changes):
    path = folder / "index_config.json"
    config = json.loads(path.read_text())
    for key, value in changes.items():
        if value is None:
            config.pop(key)
        else:
            config[key] = value
    path.write_text(json.dumps(config))


def test_save_records_what_the_index_was_built_from(saved):
    config = json.loads((saved / "index_config.json").read_text())
    assert config["built_from"]["gallery"] == "test" and config["built_from"]["num_items"] == 40
    assert len(config["built_from"]["embeddings_sha256"]) == 64
    assert all(set(entry) == {"size", "sha256"} for entry in config["files"].values())


CONFIG_CASES = [
    ({"dim": "8"}, r"field 'dim' must be int, got '8'"),
    ({"num_items": 0}, r"field 'num_items' must be at least 1, got 0"),
    ({"faiss": "yes"}, r"field 'faiss' must be bool, got 'yes'"),
    ({"factory": None}, r"field 'factory' must be str, got None"),
    ({"files": ["embeddings.npy"]}, r"field 'files' must map file names"),
    ({"files": {"../../etc/passwd": {"size": 1}}}, r"field 'files' names a file outside the index folder"),
]


@pytest.mark.parametrize(("changes", "message"), CONFIG_CASES, ids=[c[1][:30] for c in CONFIG_CASES])
def test_a_damaged_config_is_named(saved, changes, message):
    _edit_config(saved, **changes)
    with pytest.raises(ValueError, match=rf"index_config.json: {message}"):
        EmbeddingIndex.load(saved)


@pytest.mark.parametrize(
    ("text", "message"),
    [("{", r"index_config.json is damaged \(not JSON"), ("[1]", r"index_config.json must hold a JSON object")],
    ids=["not json", "a list"],
)
def test_a_config_that_is_not_an_object_is_named(saved, text, message):
    (saved / "index_config.json").write_text(text)
    with pytest.raises(ValueError, match=message):
        EmbeddingIndex.load(saved)


def test_a_config_that_disagrees_with_its_arrays_is_refused(saved):
    _edit_config(saved, num_items=41, files={})  # sizes unchecked: the shape check still catches it
    with pytest.raises(ValueError, match=r"says \(41, 8\) float32: they belong to different indexes|says 41 of dim"):
        EmbeddingIndex.load(saved)


def test_embeddings_of_another_index_are_refused(saved, tmp_path):
    EmbeddingIndex(OTHER).save(tmp_path / "other")
    shutil.copy(tmp_path / "other" / "embeddings.npy", saved / "embeddings.npy")
    with pytest.raises(ValueError, match=r"embeddings.npy does not match index_config.json \(\d+ bytes, \d+ recorded"):
        EmbeddingIndex.load(saved)


@needs_faiss
def test_a_faiss_file_of_another_index_is_refused_even_without_recorded_sizes(tmp_path):
    EmbeddingIndex(GALLERY, use_faiss=True).save(tmp_path / "a")
    EmbeddingIndex(OTHER, use_faiss=True).save(tmp_path / "b")
    shutil.copy(tmp_path / "b" / "index.faiss", tmp_path / "a" / "index.faiss")
    _edit_config(tmp_path / "a", files={})  # an index saved by an older version: no recorded sizes
    with pytest.raises(ValueError, match=r"index.faiss holds 25 vectors of dimension 8, but .* says 40"):
        EmbeddingIndex.load(tmp_path / "a")


def test_a_truncated_file_is_named(saved):
    target = saved / "embeddings.npy"
    target.write_bytes(target.read_bytes()[:-16])
    with pytest.raises(ValueError, match=r"embeddings.npy does not match index_config.json \(\d+ bytes"):
        EmbeddingIndex.load(saved)


def test_a_changed_byte_is_found_with_verify(saved):
    target = saved / "embeddings.npy"
    data = bytearray(target.read_bytes())
    data[-1] ^= 0x01
    target.write_bytes(bytes(data))
    EmbeddingIndex.load(saved)  # sizes agree
    with pytest.raises(ValueError, match=r"embeddings.npy does not match index_config.json \(sha256\)"):
        EmbeddingIndex.load(saved, verify=True)


def test_a_missing_file_is_named(saved):
    os.remove(saved / "embeddings.npy")
    with pytest.raises(ValueError, match=r"embeddings.npy is missing; index_config.json lists it"):
        EmbeddingIndex.load(saved)


def test_a_pickled_embeddings_file_is_never_loaded(tmp_path):
    EmbeddingIndex(GALLERY).save(tmp_path / "i")
    np.save(tmp_path / "i" / "embeddings.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    _edit_config(tmp_path / "i", files={})
    with pytest.raises(ValueError, match=r"embeddings.npy is damaged or not a float32 matrix \(Object arrays"):
        EmbeddingIndex.load(tmp_path / "i")


def test_a_folder_without_an_index_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"holds no index_config.json: not a folder written by save"):
        EmbeddingIndex.load(tmp_path)


@pytest.mark.parametrize(
    ("metadata", "error", "message"),
    [
        ("gallery", TypeError, "metadata must be a dict"),
        ({"when": object()}, TypeError, "not JSON serializable"),
    ],
    ids=["a string", "not json"],
)
def test_save_refuses_bad_metadata_before_writing(tmp_path, metadata, error, message):
    with pytest.raises(error, match=message):
        EmbeddingIndex(GALLERY).save(tmp_path / "i", metadata=metadata)
    assert not (tmp_path / "i").exists() and not list(tmp_path.iterdir())


def test_save_onto_a_file_is_named(tmp_path):
    (tmp_path / "i").write_text("x")
    with pytest.raises(NotADirectoryError, match=r"exists and is not a folder; save\(\) writes a folder"):
        EmbeddingIndex(GALLERY).save(tmp_path / "i")


def test_a_failed_save_leaves_the_earlier_index(saved, monkeypatch):
    import imagebert_hf.models.imagebert.retrieval_index as retrieval_index

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(retrieval_index.np, "save", broken)
    with pytest.raises(OSError, match="disk full"):
        EmbeddingIndex(OTHER).save(saved)
    monkeypatch.undo()
    loaded = EmbeddingIndex.load(saved, verify=True)
    assert torch.equal(loaded.embeddings, torch.from_numpy(GALLERY))
    assert not list(saved.parent.glob(".index.tmp-*"))
