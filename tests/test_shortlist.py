"""Batched full ranking, the faiss shortlist and shortlist + re-rank against full ranking."""

import pytest
import torch

from imagebert_hf import ImageBERTForImageTextRetrieval
from imagebert_hf.data.retrieval_corpus import RetrievalCorpus
from imagebert_hf.data.synthetic import make_synthetic_examples, synthetic_region_record
from imagebert_hf.evaluation.recall import retrieval_metrics, retrieval_ranks
from imagebert_hf.evaluation.shortlist import shortlist_rerank
from imagebert_hf.models.imagebert.retrieval_index import (
    EmbeddingIndex,
    encode_images,
    encode_texts,
    score_all_pairs,
    score_pairs,
)

from .testing_utils import require_module


@pytest.fixture(scope="module")
def setup(make_tiny_config, tokenizer):
    examples = make_synthetic_examples(10, seed=3, image_size=32, captions_per_image=2)
    regions = [synthetic_region_record(example, 24) for example in examples]
    # Uneven region counts, so that padding and per-batch trimming are exercised.
    regions[3] = {**regions[3], "region_features": regions[3]["region_features"][:1]}
    regions[3]["region_locations"] = regions[3]["region_locations"][:1]
    corpus = RetrievalCorpus.from_records(examples, tokenizer, regions, max_text_length=16)
    torch.manual_seed(0)
    model = ImageBERTForImageTextRetrieval(make_tiny_config(vocab_size=len(tokenizer))).eval()
    return model, corpus


def test_full_ranking_equals_one_pair_at_a_time(setup):
    model, corpus = setup
    scores = score_all_pairs(model, corpus.text_inputs, corpus.region_inputs, batch_size=7)
    assert scores.shape == (corpus.num_images, corpus.num_texts)
    with torch.no_grad():
        for image, text in [(0, 0), (3, 5), (9, 19), (3, 0)]:
            single = model(
                input_ids=corpus.text_inputs["input_ids"][text : text + 1],
                attention_mask=corpus.text_inputs["attention_mask"][text : text + 1],
                region_features=corpus.region_inputs["region_features"][image : image + 1],
                region_locations=corpus.region_inputs["region_locations"][image : image + 1],
                region_attention_mask=corpus.region_inputs["region_attention_mask"][image : image + 1],
            ).logits
            torch.testing.assert_close(scores[image, text], single[0], rtol=1e-5, atol=1e-5)
    pairs = score_pairs(model, corpus.text_inputs, corpus.region_inputs, [3, 0], [5, 0], batch_size=1)
    torch.testing.assert_close(pairs, scores[[3, 0], [5, 0]], rtol=1e-5, atol=1e-5)
    assert not model.training


def test_shortlist_with_k_equal_to_gallery_is_full_ranking(setup):
    model, corpus = setup
    full = score_all_pairs(model, corpus.text_inputs, corpus.region_inputs, batch_size=16)
    result = shortlist_rerank(model, corpus.text_inputs, corpus.region_inputs, k=corpus.num_texts, batch_size=16)
    assert result.num_pairs_scored == corpus.num_images * corpus.num_texts
    assert torch.equal(result.i2t_scores, full)
    assert torch.equal(result.t2i_scores, full)
    assert retrieval_metrics(result.i2t_scores, corpus.text_to_image, ir_scores=result.t2i_scores) == (
        retrieval_metrics(full, corpus.text_to_image)
    )


def test_small_shortlist_scores_only_candidates(setup):
    model, corpus = setup
    k = 3
    result = shortlist_rerank(model, corpus.text_inputs, corpus.region_inputs, k=k, batch_size=16)
    full = score_all_pairs(model, corpus.text_inputs, corpus.region_inputs, batch_size=16)
    floor = torch.finfo(torch.float32).min
    assert ((result.i2t_scores > floor).sum(1) == k).all()
    assert ((result.t2i_scores > floor).sum(0) == k).all()
    assert result.num_pairs_scored <= k * (corpus.num_images + corpus.num_texts)
    kept = result.i2t_scores > floor
    torch.testing.assert_close(result.i2t_scores[kept], full[kept], rtol=1e-5, atol=1e-5)
    # The shortlist is the embedding top k of each query.
    image_embeddings = encode_images(model, corpus.region_inputs)
    text_embeddings = encode_texts(model, corpus.text_inputs)
    expected = (image_embeddings @ text_embeddings.T).topk(k, dim=1).indices.sort(dim=1).values
    assert torch.equal(kept.nonzero()[:, 1].view(-1, k).sort(dim=1).values, expected)
    # A query whose answer missed the shortlist ranks it after every candidate.
    tr_ranks, _ = retrieval_ranks(result.i2t_scores, corpus.text_to_image)
    for image in range(corpus.num_images):
        captions = (corpus.text_to_image == image).nonzero().flatten()
        if not kept[image, captions].any():
            assert tr_ranks[image] >= k


def test_embeddings_are_normalised_and_batch_independent(setup):
    model, corpus = setup
    whole = encode_texts(model, corpus.text_inputs, batch_size=64)
    pieces = encode_texts(model, corpus.text_inputs, batch_size=3)
    torch.testing.assert_close(whole, pieces, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(whole.norm(dim=1), torch.ones(corpus.num_texts))
    images = encode_images(model, corpus.region_inputs, batch_size=4)
    assert images.shape == (corpus.num_images, model.config.contrastive_embedding_size)


@pytest.mark.parametrize("use_faiss", [False, pytest.param(True, marks=require_module("faiss"))])
def test_exact_index_matches_brute_force(use_faiss):
    generator = torch.Generator().manual_seed(0)
    gallery = torch.nn.functional.normalize(torch.randn(200, 16, generator=generator), dim=1)
    queries = torch.nn.functional.normalize(torch.randn(7, 16, generator=generator), dim=1)
    index = EmbeddingIndex(gallery, "flat", use_faiss=use_faiss)
    assert index.backend == ("faiss" if use_faiss else "torch")
    values, indices = index.search(queries, 5)
    expected = (queries @ gallery.T).topk(5, dim=1)
    assert torch.equal(indices, expected.indices)
    torch.testing.assert_close(values, expected.values, rtol=1e-5, atol=1e-5)
    # k beyond the gallery is clamped.
    assert index.search(queries, 500)[1].shape == (7, 200)


@require_module("faiss")
@pytest.mark.parametrize("index_type", ["ivf", "hnsw"])
def test_approximate_indexes_find_the_nearest_items(index_type):
    generator = torch.Generator().manual_seed(1)
    gallery = torch.nn.functional.normalize(torch.randn(2000, 16, generator=generator), dim=1)
    # Queries close to known gallery items: any reasonable index finds them first.
    targets = torch.arange(0, 2000, 97)
    queries = torch.nn.functional.normalize(gallery[targets] + 0.01 * torch.randn(len(targets), 16), dim=1)
    index = EmbeddingIndex(gallery, index_type, nprobe=8)
    _, indices = index.search(queries, 10)
    assert (indices[:, 0] == targets).float().mean() >= 0.9


@require_module("faiss")
@pytest.mark.parametrize(
    ("index_type", "factory"), [("ivfpq", "IVF51,PQ4x5"), ("IVF32,PQ8x4", "IVF32,PQ8x4"), ("HNSW16,Flat", None)]
)
def test_factory_strings_and_ivfpq_find_the_nearest_items(index_type, factory):
    generator = torch.Generator().manual_seed(2)
    gallery = torch.nn.functional.normalize(torch.randn(2000, 16, generator=generator), dim=1)
    targets = torch.arange(0, 2000, 97)
    queries = torch.nn.functional.normalize(gallery[targets] + 0.01 * torch.randn(len(targets), 16), dim=1)
    index = EmbeddingIndex(gallery, index_type, nprobe=8)
    assert index.factory == (factory or index_type)
    _, indices = index.search(queries, 10)
    # Product quantization is lossy: the target is among the first ten, not always the first.
    assert (indices == targets[:, None]).any(1).float().mean() >= 0.9


@pytest.mark.parametrize(
    "index_type",
    ["flat", pytest.param("ivf", marks=require_module("faiss")), pytest.param("ivfpq", marks=require_module("faiss"))],
)
def test_index_saves_and_loads(tmp_path, index_type):
    generator = torch.Generator().manual_seed(3)
    gallery = torch.nn.functional.normalize(torch.randn(600, 16, generator=generator), dim=1)
    queries = torch.nn.functional.normalize(torch.randn(5, 16, generator=generator), dim=1)
    index = EmbeddingIndex(gallery, index_type, nprobe=4)
    index.save(tmp_path / "index")
    loaded = EmbeddingIndex.load(tmp_path / "index")
    assert (loaded.factory, loaded.nprobe, loaded.backend, len(loaded)) == (index.factory, 4, index.backend, 600)
    for got, expected in zip(loaded.search(queries, 7), index.search(queries, 7)):
        assert torch.equal(got, expected)
    with pytest.raises(FileNotFoundError, match="index_config.json"):
        EmbeddingIndex.load(tmp_path)


@require_module("faiss")
def test_missing_approximate_hits_are_filled_by_exact_search():
    generator = torch.Generator().manual_seed(4)
    gallery = torch.nn.functional.normalize(torch.randn(400, 8, generator=generator), dim=1)
    index = EmbeddingIndex(gallery, "ivf", nlist=10, nprobe=1)
    queries = gallery[:3]
    _, raw = index.search(queries, 400)
    assert (raw < 0).any()  # one cell of ten holds far fewer than 400 items
    _, filled = index.search(queries, 400, fill_missing=True)
    assert (filled >= 0).all()


@require_module("faiss")
def test_gpu_is_asked_for_plainly():
    import faiss

    if faiss.get_num_gpus() > 0:
        pytest.skip("a GPU is visible to faiss; tests/test_gpu.py covers it")
    index = EmbeddingIndex(torch.randn(50, 4), "flat")
    assert index.backend == "faiss" and not index.on_gpu
    with pytest.raises(RuntimeError, match="faiss sees no GPU"):
        EmbeddingIndex(torch.randn(50, 4), "flat", use_gpu=True)


def test_index_errors_name_the_problem():
    with pytest.raises(ValueError, match="index_type"):
        EmbeddingIndex(torch.randn(3, 4), "lsh")
    with pytest.raises(ValueError, match="non-empty"):
        EmbeddingIndex(torch.randn(0, 4))
    with pytest.raises(ValueError, match="queries must have shape"):
        EmbeddingIndex(torch.randn(3, 4)).search(torch.randn(2, 5), 1)
