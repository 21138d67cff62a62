"""Shortlist + re-rank retrieval: unimodal embeddings pick each query's top k, the cross-encoder re-scores them.

Full ranking runs the cross-encoder on every pair (COCO 5k: 125M pairs). Here a first stage embeds texts and
images separately with the model's own unimodal heads (`get_text_embeddings`, `get_region_embeddings`), searches
them with faiss, and the cross-encoder scores only each query's k candidates, as BLIP's `k_test` re-ranking does.
With k equal to the gallery size every pair is re-scored, and the result equals full ranking exactly.
"""

import time
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import torch

from .scoring import REGION_KEYS, TEXT_KEYS, _model_device, prepare_region_inputs, prepare_text_inputs, score_pairs


INDEX_TYPES = ("flat", "ivf", "hnsw")


def _import_faiss():
    try:
        import faiss
    except ImportError:
        return None
    return faiss


class EmbeddingIndex:
    """Inner-product search over L2-normalised embeddings (cosine similarity).

    Args:
        embeddings (`torch.Tensor` or `np.ndarray` of shape `(num_items, dim)`): the gallery.
        index_type (`str`, *optional*, defaults to `"flat"`): `"flat"` is exact (faiss `IndexFlatIP`, or a torch
            matrix product when faiss is not installed); `"ivf"` (`IndexIVFFlat`, inverted lists) and `"hnsw"`
            (`IndexHNSWFlat`, a proximity graph) are approximate and faster on galleries of 100k items and more.
        nlist (`int`, *optional*): IVF cells; defaults to about `4 * sqrt(num_items)`.
        nprobe (`int`, *optional*, defaults to 16): IVF cells visited per query (recall vs speed).
        hnsw_m (`int`, *optional*, defaults to 32): HNSW neighbours per node.
        ef_search (`int`, *optional*, defaults to 128): HNSW search breadth (recall vs speed).
        use_faiss (`bool`, *optional*): force faiss on or off; by default it is used when installed.
    """

    def __init__(
        self,
        embeddings,
        index_type: str = "flat",
        nlist: int | None = None,
        nprobe: int = 16,
        hnsw_m: int = 32,
        ef_search: int = 128,
        use_faiss: bool | None = None,
    ):
        if index_type not in INDEX_TYPES:
            raise ValueError(f"index_type must be one of {INDEX_TYPES}, got {index_type!r}.")
        vectors = embeddings.detach().cpu().numpy() if isinstance(embeddings, torch.Tensor) else embeddings
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        if vectors.ndim != 2 or vectors.shape[0] == 0:
            raise ValueError(f"embeddings must be a non-empty (num_items, dim) matrix, got shape {vectors.shape}.")
        self.index_type = index_type
        self.vectors = vectors
        faiss = _import_faiss() if use_faiss is not False else None
        if use_faiss and faiss is None:
            raise ImportError("use_faiss=True needs faiss: pip install faiss-cpu (or imagebert_hf[retrieval]).")
        if index_type != "flat" and faiss is None:
            raise ImportError(f"index_type={index_type!r} needs faiss: pip install faiss-cpu.")
        self._index = None
        if faiss is not None:
            dim = vectors.shape[1]
            if index_type == "flat":
                self._index = faiss.IndexFlatIP(dim)
            elif index_type == "ivf":
                nlist = nlist or max(1, min(int(4 * np.sqrt(len(vectors))), len(vectors) // 39 or 1))
                self._index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, nlist, faiss.METRIC_INNER_PRODUCT)
                self._index.train(vectors)
                self._index.nprobe = min(nprobe, nlist)
            else:
                self._index = faiss.IndexHNSWFlat(dim, hnsw_m, faiss.METRIC_INNER_PRODUCT)
                self._index.hnsw.efSearch = ef_search
            self._index.add(vectors)

    def __len__(self) -> int:
        return self.vectors.shape[0]

    @property
    def backend(self) -> str:
        """`"faiss"` or `"torch"`."""
        return "torch" if self._index is None else "faiss"

    def search(self, queries, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The `k` most similar gallery items of every query (k is clamped to the gallery size).

        Returns:
            `(similarities, indices)`, both `(num_queries, k)` torch tensors, best first. Approximate indexes may
            return fewer than k hits for a query; those slots hold index -1.
        """
        queries = queries.detach().cpu().numpy() if isinstance(queries, torch.Tensor) else queries
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        if queries.ndim != 2 or queries.shape[1] != self.vectors.shape[1]:
            raise ValueError(f"queries must have shape (num_queries, {self.vectors.shape[1]}), got {queries.shape}.")
        k = min(int(k), len(self))
        if k < 1:
            raise ValueError(f"k must be at least 1, got {k}.")
        if self._index is None:
            similarities = torch.from_numpy(queries) @ torch.from_numpy(self.vectors).T
            values, indices = similarities.topk(k, dim=1)
            return values, indices
        values, indices = self._index.search(queries, k)
        return torch.from_numpy(values), torch.from_numpy(indices).long()


@torch.no_grad()
def encode_texts(model, text_inputs: Mapping, batch_size: int = 256) -> torch.Tensor:
    """Unimodal text embeddings `(num_texts, contrastive_embedding_size)`, float32 on the CPU."""
    texts = prepare_text_inputs(text_inputs)
    device, was_training = _model_device(model), model.training
    model.eval()
    chunks = []
    try:
        for start in range(0, texts["input_ids"].shape[0], batch_size):
            mask = texts["attention_mask"][start : start + batch_size]
            length = max(int(mask.sum(1).max()), 1)
            batch = {key: texts[key][start : start + batch_size, :length].to(device) for key in TEXT_KEYS}
            chunks.append(model.get_text_embeddings(**batch).float().cpu())
    finally:
        model.train(was_training)
    return torch.cat(chunks)


@torch.no_grad()
def encode_images(model, region_inputs: Mapping, batch_size: int = 256) -> torch.Tensor:
    """Unimodal image embeddings `(num_images, contrastive_embedding_size)` from regions, float32 on the CPU."""
    regions = prepare_region_inputs(region_inputs)
    device, was_training = _model_device(model), model.training
    model.eval()
    chunks = []
    try:
        for start in range(0, regions["region_features"].shape[0], batch_size):
            mask = regions["region_attention_mask"][start : start + batch_size]
            count = max(int(mask.sum(1).max()), 1)
            batch = {key: regions[key][start : start + batch_size, :count].to(device) for key in REGION_KEYS}
            chunks.append(model.get_region_embeddings(**batch).float().cpu())
    finally:
        model.train(was_training)
    return torch.cat(chunks)


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


def shortlist_rerank(
    model,
    text_inputs: Mapping,
    region_inputs: Mapping,
    k: int = 128,
    batch_size: int = 256,
    index_type: str = "flat",
    text_embeddings: torch.Tensor | None = None,
    image_embeddings: torch.Tensor | None = None,
    **index_kwargs,
) -> ShortlistResult:
    """Retrieval in both directions with a unimodal shortlist of `k` candidates per query and cross-encoder
    re-ranking.

    Args:
        model (`ImageBERTForImageTextRetrieval`): provides the unimodal embeddings and the cross-encoder.
        text_inputs (`Mapping`): tokenized texts (see `score_pairs`).
        region_inputs (`Mapping`): cached regions (see `score_pairs`).
        k (`int`, *optional*, defaults to 128): candidates per query; clamped to the gallery size. k equal to the
            gallery size scores every pair and reproduces full ranking exactly.
        batch_size (`int`, *optional*, defaults to 256): pairs (or unimodal inputs) per forward pass.
        index_type (`str`, *optional*, defaults to `"flat"`): see `EmbeddingIndex`.
        text_embeddings, image_embeddings (`torch.Tensor`, *optional*): precomputed unimodal embeddings.
        **index_kwargs: passed to `EmbeddingIndex` (`nlist`, `nprobe`, `hnsw_m`, `ef_search`, `use_faiss`).

    Returns:
        `ShortlistResult`; `retrieval_metrics(result.i2t_scores, text_to_image, ir_scores=result.t2i_scores)`
        gives the recall.
    """
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}.")
    timings = {}
    start = time.perf_counter()
    if text_embeddings is None:
        text_embeddings = encode_texts(model, text_inputs, batch_size)
    if image_embeddings is None:
        image_embeddings = encode_images(model, region_inputs, batch_size)
    timings["encode"] = time.perf_counter() - start
    num_texts, num_images = text_embeddings.shape[0], image_embeddings.shape[0]

    start = time.perf_counter()
    _, texts_of_image = EmbeddingIndex(text_embeddings, index_type, **index_kwargs).search(image_embeddings, k)
    _, images_of_text = EmbeddingIndex(image_embeddings, index_type, **index_kwargs).search(text_embeddings, k)
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
    pair_scores = score_pairs(model, text_inputs, region_inputs, image_index, text_index, batch_size)
    timings["rerank"] = time.perf_counter() - start

    # Below any score the cross-encoder gives, so a candidate left out of the shortlist ranks after every re-scored
    # one (and ties with the other left-out ones, which the metric counts against the query).
    fill_value = torch.finfo(torch.float32).min
    scored = torch.full((num_images, num_texts), fill_value, dtype=torch.float32)
    scored[image_index, text_index] = pair_scores
    i2t_scores = torch.where(i2t_mask, scored, fill_value)
    t2i_scores = torch.where(t2i_mask, scored, fill_value)
    return ShortlistResult(i2t_scores, t2i_scores, int(image_index.numel()), timings)


__all__ = ["INDEX_TYPES", "EmbeddingIndex", "ShortlistResult", "encode_images", "encode_texts", "shortlist_rerank"]
