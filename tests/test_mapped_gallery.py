"""Retrieval over a gallery left in the region cache (memory-mapped `RegionGallery`): every scorer, the corpus, the
collator, hard-negative mining, zero-shot evaluation and the pipeline give exactly what the stacked regions give."""

import json

import pytest
import torch

from imagebert_hf import ImageBERTForImageTextRetrieval
from imagebert_hf.data.retrieval_corpus import (
    DataCollatorForImageTextRetrieval,
    HardNegativeSampler,
    RetrievalCorpus,
    region_cache_lookup,
)
from imagebert_hf.evaluation.shortlist import dual_encoder_scores, shortlist_rerank
from imagebert_hf.models.imagebert.retrieval_index import (
    RegionBatches,
    encode_images,
    gather_pair_inputs,
    score_all_pairs,
    score_pairs,
)
from imagebert_hf.regions.cache_reader import load_region_cache

from .test_region_cache_scale import FEATURES, build


NUM_IMAGES, MAX_REGIONS = 9, 6
CAPTIONS = ["a red circle", "a blue square", "a green cross", "two yellow triangles", "an orange circle"]


@pytest.fixture(scope="module")
def setup(make_tiny_config, tokenizer, tmp_path_factory):
    folder = tmp_path_factory.mktemp("region-cache")
    build(folder, num_images=NUM_IMAGES)  # float16 storage, 1 to 8 regions an image, 5 images a shard
    cache = load_region_cache(folder)
    # Two captions an image, not in key order, so that positions and keys differ.
    records = [
        {"image_id": f"img{i:05d}", "captions": [CAPTIONS[i % 5], CAPTIONS[(i + 2) % 5]]}
        for i in (4, 0, 8, 2, 7, 1, 6, 3, 5)
    ]
    stacked = RetrievalCorpus.from_records(
        records, tokenizer, region_cache_lookup(cache), max_text_length=16, max_regions=MAX_REGIONS
    )
    mapped = RetrievalCorpus.from_region_cache(records, folder, tokenizer, 16, MAX_REGIONS)
    config = make_tiny_config(vocab_size=len(tokenizer), region_feature_size=FEATURES)
    torch.manual_seed(0)
    model = ImageBERTForImageTextRetrieval(config).eval()
    return model, stacked, mapped, folder, tokenizer


def test_the_corpus_keeps_the_gallery_instead_of_stacking(setup):
    _, stacked, mapped, _, _ = setup
    assert isinstance(mapped.region_inputs, RegionBatches) and len(mapped.region_inputs) == NUM_IMAGES
    assert not hasattr(mapped.region_inputs, "keys")  # not a dict of tensors
    assert mapped.image_ids == stacked.image_ids and mapped.texts == stacked.texts
    assert torch.equal(mapped.text_to_image, stacked.text_to_image)
    whole = mapped.region_inputs.batch(slice(None))
    for name, value in stacked.region_inputs.items():
        assert torch.equal(whole[name], value), name
    with pytest.raises(ValueError, match="gallery has 9 images; the records have 2"):
        RetrievalCorpus.from_records(stacked_records(2), regions=mapped.region_inputs)
    with pytest.raises(ValueError, match="max_regions=3, but the gallery keeps 6"):
        RetrievalCorpus.from_records(stacked_records(9), regions=mapped.region_inputs, max_regions=3)


def stacked_records(count):
    return [{"image_id": f"img{i:05d}", "captions": ["a red circle"]} for i in range(count)]


def test_scores_and_embeddings_are_identical_to_the_stacked_path(setup):
    model, stacked, mapped, _, _ = setup
    for batch_size in (5, 64):
        full = score_all_pairs(model, stacked.text_inputs, stacked.region_inputs, batch_size)
        assert torch.equal(score_all_pairs(model, mapped.text_inputs, mapped.region_inputs, batch_size), full)
    images, texts = [3, 3, 0, 8, 5], [1, 7, 0, 17, 2]  # repeats: one read per distinct image of a batch
    assert torch.equal(
        score_pairs(model, mapped.text_inputs, mapped.region_inputs, images, texts, 4),
        score_pairs(model, stacked.text_inputs, stacked.region_inputs, images, texts, 4),
    )
    for batch_size in (2, 16):
        assert torch.equal(
            encode_images(model, mapped.region_inputs, batch_size),
            encode_images(model, stacked.region_inputs, batch_size),
        )
    assert torch.equal(
        dual_encoder_scores(model, mapped.text_inputs, mapped.region_inputs, 4),
        dual_encoder_scores(model, stacked.text_inputs, stacked.region_inputs, 4),
    )
    for k in (3, stacked.num_texts):
        expected = shortlist_rerank(model, stacked.text_inputs, stacked.region_inputs, k=k, batch_size=8)
        result = shortlist_rerank(model, mapped.text_inputs, mapped.region_inputs, k=k, batch_size=8)
        assert torch.equal(result.i2t_scores, expected.i2t_scores)
        assert torch.equal(result.t2i_scores, expected.t2i_scores)
        assert result.num_pairs_scored == expected.num_pairs_scored


def test_subset_collator_and_hard_negatives_match(setup):
    model, stacked, mapped, _, _ = setup
    fold, stacked_fold = mapped.subset([6, 2, 0, 4]), stacked.subset([6, 2, 0, 4])
    assert len(fold.region_inputs) == 4 and fold.image_ids == stacked_fold.image_ids
    assert torch.equal(
        score_all_pairs(model, fold.text_inputs, fold.region_inputs, 7),
        score_all_pairs(model, stacked_fold.text_inputs, stacked_fold.region_inputs, 7),
    )
    text_index, image_index = torch.tensor([0, 5, 5, 2]), torch.tensor([1, 1, 3, 0])
    mapped_batch = gather_pair_inputs(
        fold.text_inputs, fold.region_inputs, text_index, image_index, torch.device("cpu")
    )
    stacked_batch = gather_pair_inputs(
        stacked_fold.text_inputs, stacked_fold.region_inputs, text_index, image_index, torch.device("cpu")
    )
    assert mapped_batch.keys() == stacked_batch.keys()
    for name, value in stacked_batch.items():
        assert torch.equal(mapped_batch[name], value), name
    batches = []
    for corpus in (stacked, mapped):
        sampler = HardNegativeSampler(corpus, num_negatives=2, pool_size=5, model=model, seed=3)
        collator = DataCollatorForImageTextRetrieval(corpus, sampler)
        batches.append(collator([{"text_index": t, "sample_seed": 10 + t} for t in (0, 7, 12)]))
    for name, value in batches[0].items():
        assert torch.equal(torch.as_tensor(batches[1][name]), torch.as_tensor(value)), name


def test_zero_shot_inputs_from_the_mapped_cache(setup, tmp_path):
    from imagebert_hf.evaluation.zero_shot import manifest_retrieval_inputs, zero_shot_retrieval

    model, _, _, folder, tokenizer = setup
    manifest = tmp_path / "captions.jsonl"
    lines = [{"image": f"img{i:05d}", "captions": [CAPTIONS[i % 5]], "split": "test"} for i in range(NUM_IMAGES)]
    manifest.write_text("".join(json.dumps(line) + "\n" for line in lines))
    stacked = manifest_retrieval_inputs(manifest, folder, tokenizer, "test", 16, MAX_REGIONS)
    mapped = manifest_retrieval_inputs(manifest, folder, tokenizer, "test", 16, MAX_REGIONS, memory_mapped=True)
    assert isinstance(mapped[1], RegionBatches) and mapped[2] == stacked[2]
    assert zero_shot_retrieval(model, *mapped, batch_size=7) == zero_shot_retrieval(model, *stacked, batch_size=7)
    cache = load_region_cache(folder)
    as_dict = {key: cache[key] for key in cache}
    with pytest.raises(TypeError, match="memory_mapped=True reads regions from a region cache"):
        manifest_retrieval_inputs(manifest, as_dict, tokenizer, memory_mapped=True)


def test_the_pipeline_indexes_and_queries_a_mapped_gallery(setup, tmp_path):
    from transformers import pipeline

    from imagebert_hf.models.imagebert.pipeline_image_text_retrieval import register_pipeline

    model, _, mapped, folder, tokenizer = setup
    register_pipeline()
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")  # no processor: images as region records or a gallery
    retriever = pipeline("image-text-retrieval", model=str(tmp_path / "model"), device=-1)
    cache = load_region_cache(folder)
    records = [cache[image_id] for image_id in mapped.image_ids]
    gallery = cache.gallery(mapped.image_ids, max_regions=model.config.max_regions)  # as the processor pads
    queries = ["a blue square", "an orange circle"]
    for shortlist_k in (4, None):
        by_records = retriever(texts=queries, index=retriever.build_index(images=records), shortlist_k=shortlist_k)
        index = retriever.build_index(images=gallery)
        assert index.items == range(NUM_IMAGES) and index.inputs is gallery
        # The same gallery, memory-mapped in float16 or stacked in float32, is the same gallery to an index.
        assert index.index.gallery_fingerprint == retriever.build_index(images=records).index.gallery_fingerprint
        by_gallery = retriever(texts=queries, index=index, shortlist_k=shortlist_k)
        for expected, got in zip(by_records, by_gallery):
            assert [(r["index"], r["score"]) for r in got] == [(r["index"], r["score"]) for r in expected]
            assert [r["image"] for r in got] == [r["index"] for r in got]
    direct = retriever(images=gallery, texts="a green cross")
    assert [r["score"] for r in direct] == [r["score"] for r in retriever(images=records, texts="a green cross")]


def test_the_evaluation_reads_a_mapped_corpus_with_the_same_scores(setup, tmp_path):
    from imagebert_hf.evaluation.full_ranking import EvaluationArguments, load_evaluation_corpus

    model, _, _, folder, tokenizer = setup
    manifest = tmp_path / "captions.jsonl"
    lines = [{"image": f"img{i:05d}", "captions": [CAPTIONS[i % 5]], "split": "test"} for i in range(NUM_IMAGES)]
    manifest.write_text("".join(json.dumps(line) + "\n" for line in lines))
    flags = {"output_dir": str(tmp_path), "manifest": str(manifest), "region_cache": str(folder)}
    stacked = load_evaluation_corpus(EvaluationArguments(**flags), tokenizer, model.config)
    mapped = load_evaluation_corpus(EvaluationArguments(**flags, memory_mapped=True), tokenizer, model.config)
    assert isinstance(mapped.region_inputs, RegionBatches) and not isinstance(stacked.region_inputs, RegionBatches)
    assert torch.equal(
        score_all_pairs(model, mapped.text_inputs, mapped.region_inputs, 16),
        score_all_pairs(model, stacked.text_inputs, stacked.region_inputs, 16),
    )
    with pytest.raises(ValueError, match="--memory_mapped reads the regions from --region_cache"):
        args = EvaluationArguments(**flags, memory_mapped=True, corpus_cache=str(tmp_path / "c.pt"))
        load_evaluation_corpus(args, tokenizer, model.config)
