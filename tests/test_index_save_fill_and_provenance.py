"""The embedding index's save never takes a folder that is not its own and never loses an earlier index; filled
searches hold distinct items; a prebuilt gallery is tied to the model that built it; and the serving side's other
boundaries (an index without float32 embeddings, text that is not valid Unicode, precomputed embeddings of the
wrong size) answer with fewer results or a named error rather than a crash or a silent mistake."""

import copy
import json
import logging
import os

import numpy as np
import pytest
import torch

from imagebert_hf import ImageBERTForImageTextRetrieval
from imagebert_hf.evaluation.shortlist import shortlist_rerank
from imagebert_hf.models.imagebert import retrieval_index
from imagebert_hf.models.imagebert.pipeline_image_text_retrieval import (
    RetrievalIndex,
    embedding_fingerprint,
    gallery_fingerprint,
    projection_fingerprint,
    register_pipeline,
)
from imagebert_hf.models.imagebert.retrieval_index import EmbeddingIndex, faiss

from .test_kill9_writers import folder_bytes, kill_during


needs_faiss = pytest.mark.skipif(faiss is None, reason="faiss is not installed")
RNG = np.random.default_rng(0)
FIRST = RNG.standard_normal((20, 8)).astype(np.float32)
SECOND = RNG.standard_normal((30, 8)).astype(np.float32)
TEXTS = ["a red circle", "a blue square above a green cross", "there is a yellow triangle", "an orange cross"]


def _photos(folder):
    folder.mkdir()
    (folder / "holiday.jpg").write_bytes(b"\xff\xd8 a photo")
    (folder / "notes.txt").write_text("precious")
    (folder / "sub").mkdir()
    (folder / "sub" / "more.jpg").write_bytes(b"\xff\xd8 another")
    return folder_bytes(folder)


# ------------------------------------------------------------------------------------------------ saving


def test_save_refuses_a_folder_that_is_not_an_index_and_leaves_it_untouched(tmp_path):
    photos = tmp_path / "photos"
    before = _photos(photos)
    with pytest.raises(ValueError, match=rf"{photos} is not an index folder \(it holds 3 entries: holiday.jpg, notes"):
        EmbeddingIndex(FIRST).save(photos)
    assert folder_bytes(photos) == before and sorted(os.listdir(tmp_path)) == ["photos"]
    (tmp_path / "empty").mkdir()  # an empty folder is taken
    EmbeddingIndex(FIRST).save(tmp_path / "empty")
    np.testing.assert_array_equal(EmbeddingIndex.load(tmp_path / "empty", verify=True).embeddings.numpy(), FIRST)


def test_save_refuses_an_index_folder_that_holds_other_files(tmp_path):
    EmbeddingIndex(FIRST).save(tmp_path / "index")
    (tmp_path / "index" / "README.md").write_text("my notes")
    before = folder_bytes(tmp_path / "index")
    with pytest.raises(ValueError, match=r"holds an index and other files \(README.md\)"):
        EmbeddingIndex(SECOND).save(tmp_path / "index")
    assert folder_bytes(tmp_path / "index") == before


def test_save_refuses_the_empty_path_and_the_working_folder(tmp_path, monkeypatch):
    work = tmp_path / "project"
    before = _photos(work)
    monkeypatch.chdir(work)
    with pytest.raises(ValueError, match=r"save\(\) needs a folder to write the index to, got ''"):
        EmbeddingIndex(FIRST).save("")
    for target in (".", str(tmp_path)):
        with pytest.raises(ValueError, match="holds the current working folder"):
            EmbeddingIndex(FIRST).save(target)
    assert folder_bytes(work) == before and sorted(os.listdir(tmp_path)) == ["project"]


def test_a_failed_rename_of_the_new_index_keeps_the_earlier_one(tmp_path, monkeypatch):
    folder = tmp_path / "index"
    EmbeddingIndex(FIRST).save(folder)
    real_replace = os.replace
    failed = []

    def replace(source, target):
        if ".tmp-" in os.fspath(source) and not failed:  # the new index going in
            failed.append(source)
            raise OSError("simulated failure of the rename")
        return real_replace(source, target)

    monkeypatch.setattr(retrieval_index.os, "replace", replace)
    with pytest.raises(OSError, match="simulated failure"):
        EmbeddingIndex(SECOND).save(folder)
    assert failed
    np.testing.assert_array_equal(EmbeddingIndex.load(folder, verify=True).embeddings.numpy(), FIRST)
    assert sorted(os.listdir(tmp_path)) == ["index"]
    EmbeddingIndex(SECOND).save(folder)  # the next save replaces the earlier index, and leaves nothing aside
    np.testing.assert_array_equal(EmbeddingIndex.load(folder, verify=True).embeddings.numpy(), SECOND)
    assert sorted(os.listdir(tmp_path)) == ["index"]


def test_a_save_killed_between_its_two_renames_leaves_the_earlier_index_readable(tmp_path):
    folder = tmp_path / "index"
    EmbeddingIndex(FIRST).save(folder)
    np.save(tmp_path / "second.npy", SECOND)
    kill_during(
        f"""
        import os
        import numpy as np
        import imagebert_hf.models.imagebert.retrieval_index as retrieval_index
        real_replace = os.replace
        def replace(source, target):
            if ".tmp-" in os.fspath(source):
                pause()  # the earlier index is aside, the new one not yet in
            return real_replace(source, target)
        retrieval_index.os.replace = replace
        retrieval_index.EmbeddingIndex(np.load({str(tmp_path / "second.npy")!r})).save({str(folder)!r})
        """,
        tmp_path,
    )
    assert not folder.exists() and list(tmp_path.glob(".index.old-*"))
    np.testing.assert_array_equal(EmbeddingIndex.load(folder, verify=True).embeddings.numpy(), FIRST)
    EmbeddingIndex(SECOND).save(folder)
    np.testing.assert_array_equal(EmbeddingIndex.load(folder, verify=True).embeddings.numpy(), SECOND)
    assert not list(tmp_path.glob(".index.old-*"))


# ------------------------------------------------------------------------------------------------ filled searches


@needs_faiss
def test_filled_rows_hold_distinct_items_the_approximate_ones_kept_in_score_order():
    gallery = torch.nn.functional.normalize(torch.randn(400, 8, generator=torch.Generator().manual_seed(4)), dim=1)
    index = EmbeddingIndex(gallery, "ivf", nlist=10, nprobe=1)
    queries = gallery[:20]
    approximate = index.search(queries, 100)[1]
    assert (approximate < 0).any(1).all()  # every row has empty slots to fill
    values, filled = index.search(queries, 100, fill_missing=True)
    for row, found, row_values in zip(filled, approximate, values):
        assert (row >= 0).all() and len(set(row.tolist())) == 100
        assert torch.all(row_values[:-1] >= row_values[1:])
        assert set(found[found >= 0].tolist()) <= set(row.tolist())  # the approximate hits are kept
    torch.testing.assert_close(values, (queries @ gallery.T).gather(1, filled))


@needs_faiss
def test_a_row_whose_approximate_hits_are_among_the_exact_ones_is_filled_to_the_exact_top_k():
    # Ten tight clusters of 40 around orthogonal directions: an IVF cell holds about one, so most queries find their
    # cluster, all among their exact top 60, and leave slots of k=60 to fill from the exact search.
    generator = torch.Generator().manual_seed(0)
    gallery = torch.eye(16)[:10].repeat_interleave(40, 0) + 0.01 * torch.randn(400, 16, generator=generator)
    gallery = torch.nn.functional.normalize(gallery, dim=1)
    index = EmbeddingIndex(gallery, "ivf", nlist=10, nprobe=1)
    queries = gallery[::40]
    approximate = index.search(queries, 60)[1]
    exact = (queries @ gallery.T).topk(60, dim=1).indices
    filled = index.search(queries, 60, fill_missing=True)[1]
    checked = 0
    for found, row, row_exact in zip(approximate, filled, exact):
        found = set(found[found >= 0].tolist())
        if len(found) < 60 and found <= set(row_exact.tolist()):
            checked += 1
            assert set(row.tolist()) == set(row_exact.tolist())
    assert checked >= 5


@needs_faiss
def test_fill_missing_without_float32_embeddings_raises_for_every_query():
    index = EmbeddingIndex(FIRST, "Flat", keep_vectors=False)
    assert index.search(FIRST[:2], 3)[1].shape == (2, 3)
    # Nothing is missing here, yet the request cannot be honoured: it fails the same way for every query.
    with pytest.raises(ValueError, match="fill_missing=True needs the gallery's float32 embeddings"):
        index.search(FIRST[:2], 3, fill_missing=True)


# ------------------------------------------------------------------------------------------------ the pipeline


def _save_model(folder, tokenizer, extractor, make_tiny_config, seed, **overrides):
    from imagebert_hf.models.imagebert.processing_imagebert import ImageBERTProcessor

    config = make_tiny_config(vocab_size=len(tokenizer), **extractor.config_kwargs(), **overrides)
    torch.manual_seed(seed)
    ImageBERTForImageTextRetrieval(config).save_pretrained(folder)
    ImageBERTProcessor.from_model_config(config, tokenizer, extractor).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def pipelines(tmp_path_factory, tokenizer, make_tiny_extractor, make_tiny_config):
    """Three retrieval pipelines: A, B (A's config, other weights) and C (another embedding size)."""
    from transformers import pipeline

    from imagebert_hf.models.imagebert.processing_imagebert import register_processing

    register_processing()
    register_pipeline()
    extractor = make_tiny_extractor(max_regions=10, return_class_probs=False)
    folders = {
        "A": _save_model(tmp_path_factory.mktemp("A"), tokenizer, extractor, make_tiny_config, 0),
        "B": _save_model(tmp_path_factory.mktemp("B"), tokenizer, extractor, make_tiny_config, 1),
        "C": _save_model(
            tmp_path_factory.mktemp("C"), tokenizer, extractor, make_tiny_config, 2, contrastive_embedding_size=8
        ),
    }
    return {name: pipeline("image-text-retrieval", model=str(folder), device=-1) for name, folder in folders.items()}


def _records(pipe, count, seed=0):
    rng = np.random.default_rng(seed)
    config = pipe.model.config
    return [
        {
            "image_id": f"img{i}",
            "region_features": rng.standard_normal((3, config.region_feature_size)).astype(np.float32),
            "region_locations": rng.uniform(0, 1, (3, config.region_location_size)).astype(np.float32),
        }
        for i in range(count)
    ]


@needs_faiss
def test_the_pipeline_never_returns_an_image_twice_from_an_approximate_index(pipelines):
    retriever = pipelines["A"]
    gallery = retriever.build_index(images=_records(retriever, 200), index_type="ivf", nlist=8, nprobe=1)
    for results in retriever(texts=TEXTS, index=gallery, top_k=32, shortlist_k=60):
        indices = [result["index"] for result in results]
        assert len(indices) == 32 and len(set(indices)) == 32


def test_an_index_built_by_another_model_is_refused(pipelines):
    records = _records(pipelines["A"], 12)
    gallery = pipelines["A"].build_index(images=records)
    own = pipelines["A"](texts=TEXTS[0], index=gallery, top_k=3, shortlist_k=5)
    assert len(own) == 3
    for other, size in (("B", 16), ("C", 8)):
        with pytest.raises(ValueError, match=rf"this index was built by another model: it holds 16-d .* {size}-d"):
            pipelines[other](texts=TEXTS[0], index=gallery, top_k=3, shortlist_k=5)
    texts_gallery = pipelines["A"].build_index(texts=TEXTS)
    with pytest.raises(ValueError, match="this index was built by another model"):
        pipelines["B"](images=records[0], index=texts_gallery, top_k=2, shortlist_k=2)


def test_the_model_a_saved_index_records_is_checked_and_an_older_index_is_used_with_a_notice(
    pipelines, tmp_path, caplog
):
    retriever = pipelines["A"]
    records = _records(retriever, 12)
    built = retriever.build_index(images=records)
    expected = retriever(texts=TEXTS, index=built, top_k=3, shortlist_k=5)
    expected_one = retriever(texts=TEXTS[0], index=built, top_k=3, shortlist_k=5)
    built.index.save(tmp_path / "index")
    loaded = EmbeddingIndex.load(tmp_path / "index")
    assert loaded.model_fingerprint == built.index.model_fingerprint == embedding_fingerprint(retriever.model)
    with pytest.raises(ValueError, match="this index was built by another model"):
        pipelines["B"](texts=TEXTS[0], index=RetrievalIndex("images", records, built.inputs, loaded), shortlist_k=5)

    # An index saved before the model was recorded: its config has no model_fingerprint.
    config_path = tmp_path / "index" / "index_config.json"
    config = json.loads(config_path.read_text())
    del config["model_fingerprint"]
    config_path.write_text(json.dumps(config))
    older = RetrievalIndex("images", records, built.inputs, EmbeddingIndex.load(tmp_path / "index"))
    assert older.index.model_fingerprint is None
    with caplog.at_level(logging.WARNING):
        assert retriever(texts=TEXTS, index=older, top_k=3, shortlist_k=5) == expected
        assert retriever(texts=TEXTS[0], index=older, top_k=3, shortlist_k=5) == expected_one
    notices = [r.getMessage() for r in caplog.records if "records no model" in r.getMessage()]
    assert len(notices) == 1  # once per index, not once per query
    # An older index of another embedding size is still refused by name, not by a shape error.
    with pytest.raises(
        ValueError, match="this index was built by another model: it holds 16-d embeddings and records no"
    ):
        pipelines["C"](texts=TEXTS[0], index=older, shortlist_k=5)


def test_the_embedding_fingerprint_covers_the_encoder_and_the_heads_not_the_dtype(pipelines):
    model = pipelines["A"].model
    fingerprint = embedding_fingerprint(model)
    assert embedding_fingerprint(copy.deepcopy(model).to(torch.bfloat16)) == fingerprint
    for name in ("cls.region_projection.bias", "bert.encoder.layer.0.attention.self.query.weight",
                 "bert.embeddings.word_embeddings.weight"):  # fmt: skip
        changed = copy.deepcopy(model)
        with torch.no_grad():
            changed.get_parameter(name).add_(1e-2)
        assert embedding_fingerprint(changed) != fingerprint, name
    assert fingerprint != embedding_fingerprint(pipelines["B"].model)


def test_the_embedding_fingerprint_is_read_again_only_when_a_weight_changed(pipelines, monkeypatch):
    """Remembered per model, so a query with an index costs no read of the encoder; any in-place write (an optimizer
    step, `load_state_dict`) or a new dtype is seen."""
    from imagebert_hf.models.imagebert import pipeline_image_text_retrieval as module

    model = copy.deepcopy(pipelines["A"].model)
    before = embedding_fingerprint(model)
    reads = []
    read = module._encoder_and_heads_fingerprint
    monkeypatch.setattr(module, "_encoder_and_heads_fingerprint", lambda m: reads.append(1) or read(m))
    assert embedding_fingerprint(model) == before and reads == []
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    model.bert.encoder.layer[0].output.dense.weight.sum().backward()
    optimizer.step()
    stepped = embedding_fingerprint(model)
    assert stepped != before and len(reads) == 1
    model.load_state_dict(pipelines["A"].model.state_dict())
    assert embedding_fingerprint(model) == before and len(reads) == 2
    assert embedding_fingerprint(model.to(torch.bfloat16)) == before and len(reads) == 3


def test_an_index_is_refused_after_the_encoder_changed_and_an_older_heads_only_one_is_used_with_a_notice(
    pipelines, caplog
):
    """Fine-tuning with the contrastive loss off keeps the heads and changes the encoder, and with it every
    embedding: the index of the model before is another model's."""
    retriever = pipelines["A"]
    records = _records(retriever, 12)
    built = retriever.build_index(images=records)
    tuned = copy.deepcopy(retriever.model)
    with torch.no_grad():
        tuned.bert.encoder.layer[0].output.dense.weight.mul_(1.05)
    assert projection_fingerprint(tuned) == projection_fingerprint(retriever.model)
    other = type(retriever)(model=tuned, tokenizer=retriever.tokenizer, image_processor=retriever.image_processor)
    with pytest.raises(ValueError, match="this index was built by another model"):
        other(texts=TEXTS[0], index=built, shortlist_k=5)
    # An index of an earlier version recorded the heads alone: still compared by them, with a notice once.
    built.index.model_fingerprint = projection_fingerprint(retriever.model)
    with caplog.at_level(logging.WARNING):
        retriever(texts=TEXTS[0], index=built, top_k=3, shortlist_k=5)
        retriever(texts=TEXTS[0], index=built, top_k=3, shortlist_k=5)
    assert len([r for r in caplog.records if "records only the projection heads" in r.getMessage()]) == 1
    with pytest.raises(ValueError, match="this index was built by another model"):
        pipelines["B"](texts=TEXTS[0], index=built, shortlist_k=5)


def test_the_projection_fingerprint_follows_the_weights_not_the_dtype(pipelines):
    model = pipelines["A"].model
    fingerprint = projection_fingerprint(model)
    assert projection_fingerprint(copy.deepcopy(model).to(torch.bfloat16)) == fingerprint
    changed = copy.deepcopy(model)
    with torch.no_grad():
        changed.cls.region_projection.bias[0] += 1.0
    assert projection_fingerprint(changed) != fingerprint
    assert fingerprint != projection_fingerprint(pipelines["B"].model)


@needs_faiss
def test_an_index_without_float32_embeddings_gives_fewer_candidates_with_one_notice(pipelines, caplog):
    retriever = pipelines["A"]
    gallery = retriever.build_index(
        images=_records(retriever, 300), index_type="ivfpq", nlist=8, nprobe=1, keep_vectors=False
    )
    with caplog.at_level(logging.WARNING):
        results = retriever(texts=TEXTS, index=gallery, top_k=80, shortlist_k=80)
        retriever(texts=TEXTS[0], index=gallery, top_k=80, shortlist_k=80)
    for row in results:
        indices = [result["index"] for result in row]
        assert 0 < len(indices) < 80 and len(set(indices)) == len(indices) and min(indices) >= 0
        assert all(np.isfinite(result["score"]) for result in row)
    notices = [r.getMessage() for r in caplog.records if "keep_vectors=False" in r.getMessage()]
    assert len(notices) == 1 and "fewer results" in notices[0]


def test_text_that_is_not_valid_unicode_is_named(pipelines):
    retriever = pipelines["A"]
    record = _records(retriever, 1)[0]
    for text, position in (("\ud83d", 0), ("a red \udcff circle", 6)):
        message = rf"texts\[1\] .* character {position} .* cannot be encoded as UTF-8"
        with pytest.raises(ValueError, match=message):
            retriever(images=record, texts=[TEXTS[0], text])
        with pytest.raises(ValueError, match=message):
            retriever.build_index(texts=[TEXTS[0], text])
    with pytest.raises(ValueError, match="has no words"):  # combining marks alone: no words, as before
        retriever(images=record, texts=[TEXTS[0], "\u0301\u0302"])


# ------------------------------------------------------------------------------------------------ shortlist


def test_shortlist_rerank_refuses_precomputed_embeddings_of_another_count(make_tiny_config):
    torch.manual_seed(0)
    config = make_tiny_config()
    model = ImageBERTForImageTextRetrieval(config).eval()
    text_inputs = {"input_ids": torch.randint(5, config.vocab_size, (6, 8))}
    region_inputs = {
        "region_features": torch.randn(5, 3, config.region_feature_size),
        "region_locations": torch.rand(5, 3, config.region_location_size),
    }
    texts = torch.nn.functional.normalize(torch.randn(8, config.contrastive_embedding_size), dim=1)
    images = torch.nn.functional.normalize(torch.randn(5, config.contrastive_embedding_size), dim=1)
    cases = (
        ({"text_embeddings": texts[:4]}, r"text_embeddings has shape \(4, 16\), but text_inputs holds 6 texts"),
        ({"text_embeddings": texts}, r"text_embeddings has shape \(8, 16\), but text_inputs holds 6 texts"),
        ({"image_embeddings": images[:3]}, r"image_embeddings has shape \(3, 16\), but region_inputs holds 5 images"),
    )
    for kwargs, message in cases:
        with pytest.raises(ValueError, match=message):
            shortlist_rerank(model, text_inputs, region_inputs, k=2, show_progress=False, **kwargs)
    result = shortlist_rerank(
        model, text_inputs, region_inputs, k=2, show_progress=False, text_embeddings=texts[:6], image_embeddings=images
    )
    assert result.i2t_scores.shape == (5, 6)


def test_a_saved_index_paired_with_another_gallery_is_refused(pipelines, tmp_path):
    retriever = pipelines["A"]
    built = retriever.build_index(images=_records(retriever, 12))
    built.index.save(tmp_path / "index")
    grown = retriever.build_index(images=_records(retriever, 20))
    with pytest.raises(ValueError, match=r"do not match \(20 items, 12 embeddings in the index, 20 inputs\)"):
        RetrievalIndex("images", grown.items, grown.inputs, EmbeddingIndex.load(tmp_path / "index"))
    with pytest.raises(ValueError, match=r"do not match \(12 items, 12 embeddings in the index, 20 inputs\)"):
        RetrievalIndex("images", built.items, grown.inputs, built.index)
    with pytest.raises(ValueError, match="kind must be 'images' or 'texts'"):
        RetrievalIndex("photos", built.items, built.inputs, built.index)


def test_a_saved_index_paired_with_other_items_of_the_same_count_or_kind_is_refused(pipelines, tmp_path):
    retriever = pipelines["A"]
    records = _records(retriever, 12)
    built = retriever.build_index(images=records)
    built.index.save(tmp_path / "index")
    loaded = EmbeddingIndex.load(tmp_path / "index")
    assert loaded.gallery_fingerprint == built.index.gallery_fingerprint == gallery_fingerprint("images", built.inputs)
    paired = RetrievalIndex("images", built.items, built.inputs, loaded)  # its own gallery is taken
    assert retriever(texts=TEXTS[0], index=paired, shortlist_k=5) == retriever(
        texts=TEXTS[0], index=built, shortlist_k=5
    )

    others = retriever.build_index(images=_records(retriever, 12, seed=1))
    reordered = retriever.build_index(images=records[1:] + records[:1])
    for gallery in (others, reordered):
        with pytest.raises(
            ValueError, match="built from another gallery: its images are other images, or the same in"
        ):
            RetrievalIndex("images", gallery.items, gallery.inputs, loaded)

    texts = retriever.build_index(texts=TEXTS)
    other_texts = retriever.build_index(texts=TEXTS[::-1])
    with pytest.raises(ValueError, match="built from another gallery: its texts are other texts"):
        RetrievalIndex("texts", other_texts.items, other_texts.inputs, texts.index)
    as_images = retriever.build_index(images=records[:4])
    with pytest.raises(ValueError, match="it is an index of texts, and this gallery holds images"):
        RetrievalIndex("images", as_images.items, as_images.inputs, texts.index)

    # An index saved before galleries were recorded is checked by its size alone.
    config_path = tmp_path / "index" / "index_config.json"
    config = json.loads(config_path.read_text())
    del config["gallery_fingerprint"]
    config_path.write_text(json.dumps(config))
    older = EmbeddingIndex.load(tmp_path / "index")
    assert older.gallery_fingerprint is None
    RetrievalIndex("images", reordered.items, reordered.inputs, older)
    config["gallery_fingerprint"] = 7
    config_path.write_text(json.dumps(config))
    with pytest.raises(ValueError, match="field 'gallery_fingerprint' must be a string or null, got 7"):
        EmbeddingIndex.load(tmp_path / "index")
