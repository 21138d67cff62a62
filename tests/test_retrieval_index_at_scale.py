"""The retrieval engine at gallery scale: full ranking without a list of every pair, a shortlist that fills what an
approximate index misses, saving without a copy of the embeddings, and a faiss file whose header lies."""

import hashlib
import json
import struct
import tracemalloc
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from imagebert_hf.evaluation.recall import retrieval_metrics
from imagebert_hf.evaluation.shortlist import shortlist_rerank
from imagebert_hf.models.imagebert import retrieval_index
from imagebert_hf.models.imagebert.retrieval_index import (
    EmbeddingIndex,
    encode_images,
    encode_texts,
    score_all_pairs,
    score_pairs,
)

from .test_shortlist import setup  # noqa: F401 (the fixture: a tiny model and a synthetic corpus)
from .testing_utils import require_module


# -- full ranking ---------------------------------------------------------------------------------------------------


class FreeScorer(torch.nn.Module):
    """A cross-encoder that costs nothing and records the pairs of every batch it is given (its texts' first token
    is the text's number, its images' first feature the image's)."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.batches = []

    def forward(self, input_ids, region_features, **kwargs):
        pairs = torch.stack([region_features[:, 0, 0].long(), input_ids[:, 0]], 1)
        self.batches.append(pairs)
        return SimpleNamespace(logits=(pairs[:, 0] * 1000 + pairs[:, 1]).float())


def numbered_inputs(num_images: int, num_texts: int, seed: int = 0):
    """Texts of uneven lengths (numbered by their first token) and images numbered by their first feature."""
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, 6, (num_texts,), generator=generator)
    width = int(lengths.max())
    input_ids = torch.arange(num_texts)[:, None].expand(num_texts, width).clone()
    attention_mask = (torch.arange(width)[None, :] < lengths[:, None]).long()
    features = torch.arange(num_images, dtype=torch.float32)[:, None, None].expand(num_images, 1, 2).clone()
    regions = {"region_features": features, "region_locations": torch.rand(num_images, 1, 5, generator=generator)}
    return {"input_ids": input_ids, "attention_mask": attention_mask}, regions


class LargestTensor(TorchDispatchMode):
    """Records the largest tensor any torch operation makes, apart from the `(num_pairs,)` float32 scores."""

    def __init__(self, num_pairs: int):
        super().__init__()
        self.num_pairs, self.largest = num_pairs, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for value in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(value, torch.Tensor) and not (
                value.dtype == torch.float32 and value.numel() == self.num_pairs
            ):
                self.largest = max(self.largest, value.numel() * value.element_size())
        return out


def test_full_ranking_lists_no_pairs_and_batches_them_as_the_list_would_be():
    num_images, num_texts, batch_size = 150, 400, 64
    texts, regions = numbered_inputs(num_images, num_texts)
    listed = FreeScorer()
    images = torch.arange(num_images).repeat_interleave(num_texts)
    expected = score_pairs(listed, texts, regions, images, torch.arange(num_texts).repeat(num_images), batch_size)
    model = FreeScorer()
    with LargestTensor(num_images * num_texts) as tracked:
        scores = score_all_pairs(model, texts, regions, batch_size)
    # A list of every pair is 8 bytes a pair per index; a batch, the texts and the images are a small part of that.
    assert tracked.largest < num_images * num_texts, (
        f"a {tracked.largest}-byte tensor for {num_images * num_texts} pairs"
    )
    assert torch.equal(scores.flatten(), expected)
    assert len(model.batches) == len(listed.batches)
    assert all(torch.equal(a, b) for a, b in zip(model.batches, listed.batches))


def test_full_ranking_shared_out_over_processes_lists_no_pairs():
    from imagebert_hf.evaluation.across_processes import score_pairs_across_processes

    num_images, num_texts = 150, 400
    texts, regions = numbered_inputs(num_images, num_texts, seed=1)
    with LargestTensor(num_images * num_texts) as tracked:
        scores = score_all_pairs(FreeScorer(), texts, regions, 64, scorer=score_pairs_across_processes)
    assert tracked.largest < num_images * num_texts
    assert torch.equal(scores, score_all_pairs(FreeScorer(), texts, regions, 64))


@pytest.mark.parametrize("shares", [2, 3, 7])
def test_each_share_of_the_pairs_is_batched_as_its_slice_of_the_list(shares):
    """What each process of a launch scores: a contiguous share of the pair list, batched as `score_pairs` batches
    that slice."""
    from imagebert_hf.models.imagebert.retrieval_index import score_pair_range

    num_images, num_texts, batch_size = 9, 13, 5
    texts, regions = numbered_inputs(num_images, num_texts, seed=shares)
    images = torch.arange(num_images).repeat_interleave(num_texts)
    text_list = torch.arange(num_texts).repeat(num_images)
    count = num_images * num_texts
    for share in range(shares):
        start, end = count * share // shares, count * (share + 1) // shares
        listed, ranged = FreeScorer(), FreeScorer()
        expected = score_pairs(listed, texts, regions, images[start:end], text_list[start:end], batch_size)
        assert torch.equal(score_pair_range(ranged, texts, regions, start, end, batch_size), expected)
        assert all(torch.equal(a, b) for a, b in zip(ranged.batches, listed.batches))
        assert len(ranged.batches) == len(listed.batches)


def test_full_ranking_scores_are_those_of_the_listed_pairs_bit_for_bit(setup):  # noqa: F811
    model, corpus = setup
    images = torch.arange(corpus.num_images).repeat_interleave(corpus.num_texts)
    texts = torch.arange(corpus.num_texts).repeat(corpus.num_images)
    for batch_size in (1, 7, 64):
        listed = score_pairs(model, corpus.text_inputs, corpus.region_inputs, images, texts, batch_size)
        full = score_all_pairs(model, corpus.text_inputs, corpus.region_inputs, batch_size)
        assert torch.equal(full.flatten(), listed)


# -- shortlist + re-rank --------------------------------------------------------------------------------------------


@require_module("faiss")
def test_an_approximate_shortlist_of_the_whole_gallery_scores_every_pair_as_full_ranking(setup):  # noqa: F811
    model, corpus = setup
    settings = {"nlist": 4, "nprobe": 1}
    # The index alone leaves slots empty: one cell of four holds fewer than every item.
    texts = encode_texts(model, corpus.text_inputs)
    images = encode_images(model, corpus.region_inputs)
    assert (EmbeddingIndex(texts, "ivf", **settings).search(images, corpus.num_texts)[1] < 0).any()
    full = score_all_pairs(model, corpus.text_inputs, corpus.region_inputs, batch_size=16)
    k = max(corpus.num_texts, corpus.num_images)
    result = shortlist_rerank(
        model, corpus.text_inputs, corpus.region_inputs, k=k, batch_size=16, index_type="ivf", show_progress=False,
        **settings,
    )  # fmt: skip
    assert result.num_pairs_scored == corpus.num_images * corpus.num_texts
    assert torch.equal(result.i2t_scores, full)
    assert torch.equal(result.t2i_scores, full)
    assert retrieval_metrics(result.i2t_scores, corpus.text_to_image, ir_scores=result.t2i_scores) == (
        retrieval_metrics(full, corpus.text_to_image)
    )
    # Without its float32 embeddings an index has nothing to fill with: the empty slots stay out, as in the pipeline.
    unfilled = shortlist_rerank(
        model, corpus.text_inputs, corpus.region_inputs, k=k, batch_size=16, index_type="ivf", show_progress=False,
        keep_vectors=False, **settings,
    )  # fmt: skip
    assert unfilled.num_pairs_scored < corpus.num_images * corpus.num_texts


# -- saving ---------------------------------------------------------------------------------------------------------


def test_save_hashes_the_embeddings_without_a_copy(tmp_path):
    embeddings = np.random.default_rng(0).standard_normal((200_000, 64)).astype(np.float32)  # 51 MB
    index = EmbeddingIndex(embeddings, use_faiss=False)
    tracemalloc.start()
    try:
        index.save(tmp_path / "index")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < embeddings.nbytes // 2, f"saving {embeddings.nbytes} bytes of embeddings took {peak} more"
    config = json.loads((tmp_path / "index" / "index_config.json").read_text())
    assert config["built_from"]["embeddings_sha256"] == hashlib.sha256(embeddings.tobytes()).hexdigest()


# -- a faiss file whose header lies ---------------------------------------------------------------------------------


def lying_faiss_index(folder, claimed: int) -> None:
    """An index folder whose `index.faiss` is a flat index of 50 vectors of dimension 8 (as its config says) whose
    header claims a codes array of `claimed` bytes that the file does not hold."""
    EmbeddingIndex(np.eye(50, 8, dtype=np.float32), use_faiss=True).save(folder)
    (folder / "embeddings.npy").unlink()
    header = b"IxFI" + struct.pack("<iqqqBi", 8, 50, 1 << 20, 1 << 20, 1, 0)
    (folder / "index.faiss").write_bytes(header + struct.pack("<Q", claimed) + b"\0" * 64)
    config = json.loads((folder / "index_config.json").read_text())
    config["files"] = {"index.faiss": {"size": (folder / "index.faiss").stat().st_size, "sha256": "unchecked"}}
    (folder / "index_config.json").write_text(json.dumps(config))


@require_module("faiss")
@pytest.mark.parametrize(
    "claimed, said",
    [
        (1 << 36, r"reading it needs more than \d+ MB of memory, more than any faiss file of 109 bytes needs: its "
                  r"header claims arrays its bytes do not hold"),
        (100_000_000, r"read error"),
    ],
    ids=["64GB", "100MB"],
)  # fmt: skip
def test_a_faiss_file_whose_header_claims_a_huge_array_is_refused_before_this_process_reads_it(
    tmp_path, monkeypatch, claimed, said
):
    folder = tmp_path / "index"
    lying_faiss_index(folder, claimed)

    def read_here(path, *args):
        raise AssertionError(f"{path} was read in the process that loads it")

    monkeypatch.setattr(retrieval_index.faiss, "read_index", read_here)
    with pytest.raises(ValueError, match=rf"index.faiss is damaged or not a faiss index \(.*{said}"):
        EmbeddingIndex.load(folder)


@require_module("faiss")
def test_running_out_of_memory_while_reading_a_faiss_file_names_it(tmp_path, monkeypatch):
    EmbeddingIndex(np.eye(50, 8, dtype=np.float32), use_faiss=True).save(tmp_path / "index")

    def out_of_memory(path, *args):
        raise MemoryError("std::bad_alloc")

    EmbeddingIndex.load(tmp_path / "index")  # the file itself is sound
    monkeypatch.setattr(retrieval_index.faiss, "read_index", out_of_memory)
    with pytest.raises(ValueError, match=r"index.faiss could not be read: faiss ran out of memory reading this"):
        EmbeddingIndex.load(tmp_path / "index")
