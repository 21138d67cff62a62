"""Shortlist + re-rank retrieval: unimodal embeddings pick each query's top k, the cross-encoder re-scores them.

Full ranking runs the cross-encoder on every pair (COCO 5k: 125M pairs). Here a first stage embeds texts and
images separately with the model's own unimodal heads (`get_text_embeddings`, `get_region_embeddings`), searches
them with the shared `EmbeddingIndex` (faiss), and the cross-encoder scores only each query's k candidates, as BLIP's `k_test` re-ranking does.
With k equal to the gallery size every pair is re-scored, and the result equals full ranking exactly.
"""

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from ..models.imagebert.retrieval_index import (
    EmbeddingIndex,
    RegionBatches,
    encode_images,
    encode_texts,
    num_region_images,
    prepare_region_inputs,
    prepare_text_inputs,
    score_pairs,
)


@dataclass
class ShortlistResult:
    """Score matrices of a shortlist + re-rank run.

    Attributes:
        i2t_scores: `(num_images, num_texts)`; row i holds the cross-encoder scores of image i's shortlisted texts
            and `fill_value` elsewhere. Rank texts for image queries (TR) with it.
        t2i_scores: `(num_images, num_texts)`; column t holds the scores of text t's shortlisted images. Rank
            images for text queries (IR) with it.
        num_pairs_scored: distinct pairs the cross-encoder scored (a pair shortlisted both ways is scored once).
        timings: seconds spent in `encode`, `search` and `rerank`.
    """

    i2t_scores: torch.Tensor
    t2i_scores: torch.Tensor
    num_pairs_scored: int
    timings: dict[str, float] = field(default_factory=dict)


def dual_encoder_scores(
    model, text_inputs: Mapping, region_inputs: Mapping | RegionBatches, batch_size: int = 256
) -> torch.Tensor:
    """Ranking by the unimodal heads alone (a dual encoder, no cross-encoder): the `(num_images, num_texts)` cosine
    similarities of `get_region_embeddings` and `get_text_embeddings`, the input of `retrieval_metrics`."""
    text_embeddings = encode_texts(model, text_inputs, batch_size)
    image_embeddings = encode_images(model, region_inputs, batch_size)
    return image_embeddings @ text_embeddings.T


def shortlist_rerank(
    model,
    text_inputs: Mapping,
    region_inputs: Mapping | RegionBatches,
    k: int = 128,
    batch_size: int = 256,
    index_type: str = "flat",
    text_embeddings: torch.Tensor | None = None,
    image_embeddings: torch.Tensor | None = None,
    show_progress: bool = True,
    scorer: Callable = score_pairs,
    **index_kwargs,
) -> ShortlistResult:
    """Retrieval in both directions with a unimodal shortlist of `k` candidates per query and cross-encoder
    re-ranking.

    Args:
        model (`ImageBERTForImageTextRetrieval`): provides the unimodal embeddings and the cross-encoder.
        text_inputs (`Mapping`): tokenized texts (see `score_pairs`).
        region_inputs (`Mapping` or `RegionBatches`): cached regions, stacked or a `RegionGallery` over the
            memory-mapped cache read batch by batch (see `score_pairs`); the scores are the same.
        k (`int`, *optional*, defaults to 128): candidates per query; clamped to the gallery size. k equal to the
            gallery size scores every pair and reproduces full ranking exactly, whatever the index type: as in the
            retrieval pipeline, the slots an approximate index leaves empty are filled by exact search (not with
            `keep_vectors=False`, which keeps no embeddings to search exactly).
        batch_size (`int`, *optional*, defaults to 256): pairs (or unimodal inputs) per forward pass.
        index_type (`str`, *optional*, defaults to `"flat"`): see `EmbeddingIndex`.
        text_embeddings, image_embeddings (`torch.Tensor`, *optional*): precomputed unimodal embeddings, one row
            per text / image of the inputs (other row counts raise `ValueError`).
        show_progress (`bool`, *optional*, defaults to True): a progress bar over the re-scored pairs.
        scorer (`Callable`, *optional*, defaults to `score_pairs`): scores the shortlisted pairs (see
            `score_all_pairs`).
        **index_kwargs: passed to `EmbeddingIndex` (`nlist`, `nprobe`, `hnsw_m`, `ef_search`, `pq_m`, `use_faiss`,
            `use_gpu`).

    Returns:
        `ShortlistResult`; `retrieval_metrics(result.i2t_scores, text_to_image, ir_scores=result.t2i_scores)`
        gives the recall.
    """
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}.")
    # Precomputed embeddings must have a row per input: fewer would silently drop queries from the score matrices,
    # more would index past the inputs while re-ranking.
    checks = (
        ("text_embeddings", text_embeddings, "text_inputs", "text", lambda: prepare_text_inputs(text_inputs)),
        ("image_embeddings", image_embeddings, "region_inputs", "image", lambda: prepare_region_inputs(region_inputs)),
    )
    for name, embeddings, inputs_name, what, prepared in checks:
        if embeddings is None:
            continue
        inputs = prepared()
        expected = inputs["input_ids"].shape[0] if what == "text" else num_region_images(inputs)
        if embeddings.ndim != 2 or embeddings.shape[0] != expected:
            raise ValueError(
                f"{name} has shape {tuple(embeddings.shape)}, but {inputs_name} holds {expected} {what}s: give one "
                f"embedding per {what}, a ({expected}, dim) matrix (or leave {name} out to compute them)."
            )
    timings = {}
    start = time.perf_counter()
    if text_embeddings is None:
        text_embeddings = encode_texts(model, text_inputs, batch_size)
    if image_embeddings is None:
        image_embeddings = encode_images(model, region_inputs, batch_size)
    timings["encode"] = time.perf_counter() - start
    num_texts, num_images = text_embeddings.shape[0], image_embeddings.shape[0]

    start = time.perf_counter()
    texts_of_image = _shortlist(EmbeddingIndex(text_embeddings, index_type, **index_kwargs), image_embeddings, k)
    images_of_text = _shortlist(EmbeddingIndex(image_embeddings, index_type, **index_kwargs), text_embeddings, k)
    i2t_mask = torch.zeros(num_images, num_texts, dtype=torch.bool)
    rows = torch.arange(num_images)[:, None].expand_as(texts_of_image)
    valid = texts_of_image >= 0
    i2t_mask[rows[valid], texts_of_image[valid]] = True
    t2i_mask = torch.zeros(num_images, num_texts, dtype=torch.bool)
    cols = torch.arange(num_texts)[:, None].expand_as(images_of_text)
    valid = images_of_text >= 0
    t2i_mask[images_of_text[valid], cols[valid]] = True
    timings["search"] = time.perf_counter() - start

    start = time.perf_counter()
    # Each distinct pair once, in image-major order: the order (and so the batches) of `score_all_pairs`.
    image_index, text_index = torch.nonzero(i2t_mask | t2i_mask, as_tuple=True)
    bar = tqdm(total=int(image_index.numel()), desc="re-ranking the shortlist", unit="pair", disable=not show_progress)
    with bar:
        pair_scores = scorer(model, text_inputs, region_inputs, image_index, text_index, batch_size, bar.update)
    timings["rerank"] = time.perf_counter() - start

    # Below any score the cross-encoder gives, so a candidate left out of the shortlist ranks after every re-scored
    # one (and ties with the other left-out ones, which the metric counts against the query).
    fill_value = torch.finfo(torch.float32).min
    scored = torch.full((num_images, num_texts), fill_value, dtype=torch.float32)
    scored[image_index, text_index] = pair_scores
    i2t_scores = torch.where(i2t_mask, scored, fill_value)
    t2i_scores = torch.where(t2i_mask, scored, fill_value)
    return ShortlistResult(i2t_scores, t2i_scores, int(image_index.numel()), timings)


def _shortlist(index: EmbeddingIndex, queries: torch.Tensor, k: int) -> torch.Tensor:
    """Each query's k candidates as the retrieval pipeline finds them: the slots an approximate index leaves empty
    are filled by exact search, so that the evaluation measures what the pipeline serves (and k equal to the gallery
    size is every pair). An index without its float32 embeddings (`keep_vectors=False`) cannot fill them; those
    slots stay -1 there too."""
    return index.search(queries, k, fill_missing=index.vectors is not None)[1]


__all__ = ["ShortlistResult", "dual_encoder_scores", "shortlist_rerank"]
