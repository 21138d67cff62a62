"""The one retrieval engine: cross-encoder pair scoring, unimodal embeddings and an embedding search index.

The retrieval pipeline, full-ranking and shortlist evaluation (`imagebert_hf.evaluation`) and hard-negative mining
(`imagebert_hf.data.retrieval_corpus`) all go through these functions. The pipeline travels as remote code, so this file
imports only torch, numpy, faiss (optional) and its folder's `folder_publishing`.

A cross-encoder must see every pair it ranks, so scoring never re-tokenizes or re-extracts: texts are tokenized once
(`text_inputs`), regions come from the cache or the extractor once (`region_inputs`), and each batch of pairs only
gathers rows from them. `region_inputs` is either stacked tensors in memory or a `RegionBatches` gallery (the region
cache's `RegionGallery`: padded batches read by index from the memory-mapped cache), for galleries too large to stack. Each batch is trimmed to its longest text and its most regions, which leaves the scores
unchanged (padding never changes an output) and saves most of the cost when the gallery is padded to the maximum.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from typing import Protocol, runtime_checkable

import numpy as np
import torch

from .folder_publishing import publish_folder, set_aside_folders


try:  # exact and approximate search when faiss is installed; a torch matrix product otherwise
    import faiss
except ImportError:
    faiss = None


TEXT_KEYS = ("input_ids", "attention_mask", "token_type_ids")
REGION_KEYS = ("region_features", "region_locations", "region_attention_mask")
INDEX_TYPES = ("flat", "ivf", "hnsw", "ivfpq")
INDEX_FILE = "index.faiss"
VECTORS_FILE = "embeddings.npy"
INDEX_CONFIG_FILE = "index_config.json"
INDEX_FORMAT_VERSION = 2


# ----------------------------------------------------------------------------------------------------------------
# Model inputs
# ----------------------------------------------------------------------------------------------------------------


def _tensor(value) -> torch.Tensor:
    return value if isinstance(value, torch.Tensor) else torch.as_tensor(value)


def model_device(model: torch.nn.Module) -> torch.device:
    """The device of the model's first parameter (the CPU for a model without parameters)."""
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


def prepare_text_inputs(text_inputs: Mapping) -> dict[str, torch.Tensor]:
    """Checks and completes tokenized texts: `input_ids` (N, T), plus `attention_mask` and `token_type_ids`."""
    if "input_ids" not in text_inputs:
        raise ValueError(f"text_inputs needs input_ids (tokenized texts); got keys {sorted(text_inputs)}.")
    input_ids = _tensor(text_inputs["input_ids"]).long()
    if input_ids.ndim != 2 or input_ids.shape[0] == 0:
        raise ValueError(f"text_inputs['input_ids'] has shape {tuple(input_ids.shape)}; expected (num_texts>0, T).")
    attention_mask = text_inputs.get("attention_mask")
    attention_mask = torch.ones_like(input_ids) if attention_mask is None else _tensor(attention_mask).long()
    if attention_mask.shape == input_ids.shape and input_ids.shape[1] > 1:
        # The model reads the pair's summary at position 0, and batches keep each text's first mask-sum tokens.
        padded_first = torch.nonzero((attention_mask[:, 1:] > attention_mask[:, :-1]).any(1)).flatten()
        if len(padded_first):
            raise ValueError(
                f"text_inputs['attention_mask'] row {int(padded_first[0])} has padding before real tokens; texts must "
                "be padded on the right ([CLS] first): tokenize with padding_side='right'."
            )
    token_type_ids = text_inputs.get("token_type_ids")
    token_type_ids = torch.zeros_like(input_ids) if token_type_ids is None else _tensor(token_type_ids).long()
    return {"input_ids": input_ids, "attention_mask": attention_mask, "token_type_ids": token_type_ids}


@runtime_checkable
class RegionBatches(Protocol):
    """A gallery whose regions are padded on demand: `len(gallery)` images, and `gallery.batch(indices)` (a
    slice, or a sequence / array of positions) returning `region_features` (B, R, F), `region_locations` (B, R, L)
    and `region_attention_mask` (B, R), R the most regions among those images.

    The region cache's `RegionGallery` (`RegionCache.gallery(keys, max_regions)`) is one: it holds a row number per
    image and reads the features from the memory-mapped shards, so a gallery of millions of images costs megabytes
    of RAM. Every function here that takes `region_inputs` takes such a gallery as well, with the same scores as
    the stacked tensors of the same regions.
    """

    def __len__(self) -> int: ...

    def batch(self, indices) -> Mapping: ...


def is_region_batches(region_inputs) -> bool:
    """Whether `region_inputs` is a `RegionBatches` gallery rather than a mapping of stacked tensors."""
    return not isinstance(region_inputs, Mapping) and isinstance(region_inputs, RegionBatches)


def prepare_region_inputs(region_inputs: Mapping | RegionBatches) -> dict[str, torch.Tensor] | RegionBatches:
    """Checks and completes padded regions: `region_features` (N, R, F), `region_locations` (N, R, 5) and
    `region_attention_mask` (N, R). A `RegionBatches` gallery is returned as it is (its batches are complete)."""
    if is_region_batches(region_inputs):
        if len(region_inputs) == 0:
            raise ValueError("region_inputs is an empty gallery; expected at least one image.")
        return region_inputs
    if not isinstance(region_inputs, Mapping):
        raise TypeError(
            "region_inputs must be a mapping of padded region tensors or a gallery with __len__ and batch(indices), "
            f"got {type(region_inputs).__name__}."
        )
    for key in REGION_KEYS[:2]:
        if key not in region_inputs:
            raise ValueError(f"region_inputs needs {key}; got keys {sorted(region_inputs)}.")
    features = _tensor(region_inputs["region_features"]).float()
    if features.ndim != 3 or features.shape[0] == 0:
        raise ValueError(
            f"region_inputs['region_features'] has shape {tuple(features.shape)}; expected (num_images>0, R, F)."
        )
    locations = _tensor(region_inputs["region_locations"]).float()
    mask = region_inputs.get("region_attention_mask")
    mask = torch.ones(features.shape[:2], dtype=torch.long, device=features.device) if mask is None else mask
    return {"region_features": features, "region_locations": locations, "region_attention_mask": _tensor(mask).long()}


def num_region_images(region_inputs: Mapping | RegionBatches) -> int:
    """The number of images of stacked region inputs or of a `RegionBatches` gallery."""
    if is_region_batches(region_inputs):
        return len(region_inputs)
    return int(_tensor(region_inputs["region_features"]).shape[0])


def region_rows(
    regions: dict[str, torch.Tensor] | RegionBatches, image_index: torch.Tensor
) -> dict[str, torch.Tensor]:
    """The regions of the images `image_index` (one row each, repeats allowed), trimmed to their most regions:
    gathered from stacked tensors, or read once per distinct image from a gallery."""
    if is_region_batches(regions):
        unique, inverse = torch.unique(image_index.cpu(), return_inverse=True)
        batch = prepare_region_inputs(dict(regions.batch(unique.numpy())))
        rows = {key: batch[key][inverse] for key in REGION_KEYS}
    else:
        image_index = image_index.to(regions["region_features"].device)
        rows = {key: regions[key][image_index] for key in REGION_KEYS}
    # Up to the last column a row uses (a row's padding may sit anywhere: the model reads regions as a set), and at
    # least one, so that a batch of regions-free images still has a valid shape.
    used = torch.nonzero(rows["region_attention_mask"].any(0)).flatten()
    num_regions = int(used[-1]) + 1 if len(used) else 1
    return {key: value[:, :num_regions] for key, value in rows.items()}


def gather_pair_inputs(
    texts: dict[str, torch.Tensor],
    regions: dict[str, torch.Tensor] | RegionBatches,
    text_index: torch.Tensor,
    image_index: torch.Tensor,
    device: torch.device,
) -> dict[str, torch.Tensor]:
    """Model inputs of the pairs `(image_index[j], text_index[j])`, trimmed to the batch's longest text and most
    regions. Inputs already on `device` (a prebuilt gallery) are gathered there, without a copy; a `RegionBatches`
    gallery is read once per distinct image of the batch."""
    text_index = text_index.to(texts["input_ids"].device)
    text_mask = texts["attention_mask"][text_index]
    text_length = max(int(text_mask.sum(1).max()), 1)
    batch = {key: texts[key][text_index, :text_length] for key in TEXT_KEYS}
    batch.update(region_rows(regions, image_index))
    return {key: value.to(device, non_blocking=True) for key, value in batch.items()}


# ----------------------------------------------------------------------------------------------------------------
# Cross-encoder scores and unimodal embeddings
# ----------------------------------------------------------------------------------------------------------------


@torch.no_grad()
def score_pairs(
    model,
    text_inputs: Mapping,
    region_inputs: Mapping | RegionBatches,
    image_indices,
    text_indices,
    batch_size: int = 256,
    progress: Callable | None = None,
) -> torch.Tensor:
    """Cross-encoder scores of the pairs `(image_indices[j], text_indices[j])`.

    Args:
        model (`ImageBERTForImageTextRetrieval`): the cross-encoder; run in eval mode, its mode restored after.
        text_inputs (`Mapping`): tokenized texts, `input_ids` (num_texts, T) and optionally `attention_mask`,
            `token_type_ids` (a processor's or tokenizer's output).
        region_inputs (`Mapping` or `RegionBatches`): padded regions, `region_features` (num_images, R, F),
            `region_locations` (num_images, R, 5) and optionally `region_attention_mask` (num_images, R); or a
            gallery that pads them by index (`RegionCache.gallery(...)`), read batch by batch.
        image_indices, text_indices (`array-like` of shape `(num_pairs,)`): the pairs to score.
        batch_size (`int`, *optional*, defaults to 256): pairs per forward pass.
        progress (`Callable`, *optional*): called with the number of pairs done after each batch (e.g. a
            `tqdm.update`).

    Returns:
        `torch.Tensor` of shape `(num_pairs,)`, float32 on the CPU: the model's `logits` for each pair.

    Raises:
        ValueError: an index outside `0..num_images-1` or `0..num_texts-1`, negative ones included (the -1 of an
            empty `EmbeddingIndex.search` slot is not an item: drop those pairs before scoring), or indices that are
            not integers (floats, NaN, bools).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}.")
    texts = prepare_text_inputs(text_inputs)
    regions = prepare_region_inputs(region_inputs)
    image_indices = _integer_indices("image_indices", image_indices)
    text_indices = _integer_indices("text_indices", text_indices)
    if image_indices.shape != text_indices.shape:
        raise ValueError(
            f"image_indices has {image_indices.numel()} entries and text_indices {text_indices.numel()}; each pair "
            "needs one of each."
        )
    _check_pair_indices("image_indices", image_indices, num_region_images(regions), "images of region_inputs")
    _check_pair_indices("text_indices", text_indices, texts["input_ids"].shape[0], "texts of text_inputs")
    # Pairs of similar text length share a batch (a stable sort: one set of pairs is always batched the same way),
    # so each batch is trimmed to about its own captions' length rather than to the longest of the gallery.
    text_lengths = texts["attention_mask"].sum(1).cpu()
    order = torch.argsort(text_lengths[text_indices], stable=True)
    batches = (
        (chunk, image_indices[chunk], text_indices[chunk])
        for chunk in (order[start : start + batch_size] for start in range(0, image_indices.numel(), batch_size))
    )
    return _score_batches(model, texts, regions, batches, image_indices.numel(), progress)


def _integer_indices(name: str, indices) -> torch.Tensor:
    """`indices` as a flat int64 CPU tensor. Raises ValueError naming `name` for bools, complex values and floats that
    are not whole numbers: cast to int64, a float is truncated (1.7 scores item 1), NaN becomes the most negative
    int64, and bools become 0s and 1s. Whole floats (`torch.zeros(2)`) are positions. An empty sequence (`[]`, a
    float32 tensor) is no pairs."""
    tensor = _tensor(indices)
    whole = tensor.dtype.is_floating_point and bool((torch.isfinite(tensor) & (tensor == tensor.round())).all())
    not_integer = tensor.dtype.is_floating_point or tensor.dtype.is_complex or tensor.dtype == torch.bool
    if tensor.numel() and not_integer and not whole:
        raise ValueError(
            f"{name} must hold integer item positions, got {str(tensor.dtype).removeprefix('torch.')} values: "
            "convert them to integers (e.g. .long()) after checking they are whole numbers."
        )
    return tensor.long().reshape(-1).cpu()


def _check_pair_indices(name: str, indices: torch.Tensor, count: int, what: str) -> None:
    """Raises ValueError naming `name` when an index is outside `0..count-1`. Checked once per call, before any
    batch: a negative index would pick an item from the end (torch's indexing), so the -1 that
    `EmbeddingIndex.search` puts in an empty slot would score the last item in its place."""
    if indices.numel() == 0:
        return
    low, high = int(indices.min()), int(indices.max())
    if low >= 0 and high < count:
        return
    bad = low if low < 0 else high
    hint = (
        " (-1 marks an empty slot of EmbeddingIndex.search, which an approximate index leaves where it finds fewer "
        "than k items: drop those pairs, or search with fill_missing=True)"
        if bad == -1
        else ""
    )
    raise ValueError(f"{name} holds {bad}, outside the valid range 0..{count - 1} (the {count} {what}){hint}.")


def _score_batches(model, texts, regions, batches, num_pairs: int, progress: Callable | None) -> torch.Tensor:
    """Scores `num_pairs` pairs given as `(positions, image_index, text_index)` batches, each batch's scores written
    at its positions of the returned `(num_pairs,)` float32 tensor."""
    device = model_device(model)
    was_training = model.training
    model.eval()
    scores = torch.empty(num_pairs, dtype=torch.float32)
    try:
        for positions, image_index, text_index in batches:
            batch = gather_pair_inputs(texts, regions, text_index, image_index, device)
            scores[positions] = model(**batch, return_dict=True).logits.float().cpu()
            if progress is not None:
                progress(int(positions.numel()))
    finally:
        model.train(was_training)
    return scores


def _pair_range_batches(text_lengths: torch.Tensor, start: int, end: int, batch_size: int):
    """The batches `score_pairs` makes of the pairs `start..end-1` of the image-major list of every pair (pair `p`
    is image `p // num_texts` and text `p % num_texts`), computed one batch at a time without listing the pairs.

    `score_pairs` sorts its pairs stably by text length: the pairs of the shortest texts first, in list order, then
    the next length, and so on. Within one length, the range's pairs are that length's texts (in index order) with
    a partial first image, with every image in between, and with a partial last image, so each place in that order
    maps back to its pair by arithmetic. Memory: a few tensors of `num_texts` and of `batch_size` entries.
    Yields `(list position - start, image_index, text_index)` per batch.
    """
    num_texts = text_lengths.numel()
    if end <= start:
        return
    text_order = torch.argsort(text_lengths, stable=True)
    _, sizes = torch.unique_consecutive(text_lengths[text_order], return_counts=True)
    group_starts = torch.cumsum(sizes, 0) - sizes
    group_of_text = torch.empty(num_texts, dtype=torch.long)
    group_of_text[text_order] = torch.arange(sizes.numel()).repeat_interleave(sizes)

    def below(text: int) -> torch.Tensor:  # per length: how many of its texts have an index below `text`
        return torch.bincount(group_of_text[:text], minlength=sizes.numel())

    first_image, first_text = divmod(start, num_texts)
    last_image, last_text = divmod(end - 1, num_texts)
    last_text += 1  # the last image pairs with the texts below it
    skipped = below(first_text)  # per length: its texts the first image does not pair with
    if first_image == last_image:
        first, middle, last = below(last_text) - skipped, 0, torch.zeros_like(sizes)
    else:
        first, middle, last = sizes - skipped, last_image - first_image - 1, below(last_text)
    counts = first + middle * sizes + last
    group_ends = torch.cumsum(counts, 0)
    group_offsets = group_ends - counts
    for batch_start in range(0, end - start, batch_size):
        place = torch.arange(batch_start, min(batch_start + batch_size, end - start))
        group = torch.searchsorted(group_ends, place, right=True)
        local = place - group_offsets[group]
        size, in_first = sizes[group], local < first[group]
        rest = (local - first[group]).clamp(min=0)
        in_middle = ~in_first & (rest < middle * size)
        image_index = torch.where(
            in_first, first_image, torch.where(in_middle, first_image + 1 + rest // size, last_image)
        )
        within = torch.where(
            in_first, skipped[group] + local, torch.where(in_middle, rest % size, rest - middle * size)
        )
        text_index = text_order[group_starts[group] + within]
        yield image_index * num_texts + text_index - start, image_index, text_index


@torch.no_grad()
def score_pair_range(
    model,
    text_inputs: Mapping,
    region_inputs: Mapping | RegionBatches,
    start: int,
    end: int,
    batch_size: int = 256,
    progress: Callable | None = None,
) -> torch.Tensor:
    """Cross-encoder scores of the pairs `start..end-1` of the image-major list of every (image, text) pair (pair
    `p` is image `p // num_texts` and text `p % num_texts`), without building that list.

    The batches, and so the scores, are those `score_pairs` makes of that part of the list, bit for bit; but where
    the list and its sort cost about 54 bytes a pair (6.7 GB for COCO 5k's 125M pairs, next to a 500 MB score
    matrix), this holds the scores and one batch. Other arguments as in `score_pairs`.

    Returns:
        `torch.Tensor` of shape `(end - start,)`, float32 on the CPU, in list order.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}.")
    texts = prepare_text_inputs(text_inputs)
    regions = prepare_region_inputs(region_inputs)
    num_pairs = texts["input_ids"].shape[0] * num_region_images(regions)
    for name, value in (("start", start), ("end", end)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise TypeError(f"{name} must be an integer, got {type(value).__name__}: {value!r}.")
    if not 0 <= start <= end <= num_pairs:
        raise ValueError(f"start={start} and end={end} must satisfy 0 <= start <= end <= {num_pairs} (the pairs).")
    text_lengths = texts["attention_mask"].sum(1).cpu()
    batches = _pair_range_batches(text_lengths, int(start), int(end), batch_size)
    return _score_batches(model, texts, regions, batches, int(end) - int(start), progress)


# Full ranking asks a scorer for ranges of the pair list where it can score them (see `score_all_pairs`).
score_pairs.score_pair_range = score_pair_range


def score_all_pairs(
    model,
    text_inputs: Mapping,
    region_inputs: Mapping | RegionBatches,
    batch_size: int = 256,
    progress: Callable | None = None,
    scorer: Callable = score_pairs,
) -> torch.Tensor:
    """Full ranking: the cross-encoder score of every (image, text) pair, a `(num_images, num_texts)` float32
    matrix (the input of `retrieval_metrics`). Arguments as in `score_pairs`, which `scorer` is unless it is given
    another function of the same arguments (the evaluation's, sharing the pairs out over several processes).

    The pairs are never listed: a scorer with a `score_pair_range` attribute (`score_pairs`, and the evaluation's
    `score_pairs_across_processes`) scores the whole image-major list as one range, with the batches and scores it
    would give the list, at a peak memory of about the score matrix. Any other scorer is given the list itself.
    """
    num_texts = prepare_text_inputs(text_inputs)["input_ids"].shape[0]
    num_images = num_region_images(prepare_region_inputs(region_inputs))
    ranged = getattr(scorer, "score_pair_range", None)
    if ranged is not None:
        scores = ranged(model, text_inputs, region_inputs, 0, num_images * num_texts, batch_size, progress)
    else:
        # Image-major order, the order `shortlist_rerank` also uses, so that both batch the same pairs identically.
        image_indices = torch.arange(num_images).repeat_interleave(num_texts)
        text_indices = torch.arange(num_texts).repeat(num_images)
        scores = scorer(model, text_inputs, region_inputs, image_indices, text_indices, batch_size, progress)
    return scores.view(num_images, num_texts)


@torch.no_grad()
def _encode(
    model, num_items: int, rows: Callable[[torch.Tensor], dict], embed: Callable, batch_size: int, progress=None
):
    """Embeddings of `num_items` inputs, `batch_size` at a time; `rows(positions)` gives a batch's trimmed inputs;
    `progress` is called with the number of inputs done after each batch."""
    device, was_training = model_device(model), model.training
    model.eval()
    chunks = []
    try:
        for start in range(0, num_items, batch_size):
            positions = torch.arange(start, min(start + batch_size, num_items))
            batch = {key: value.to(device) for key, value in rows(positions).items()}
            chunks.append(embed(**batch).float().cpu())
            if progress is not None:
                progress(int(positions.numel()))
    finally:
        model.train(was_training)
    return torch.cat(chunks)


def encode_texts(model, text_inputs: Mapping, batch_size: int = 256, progress: Callable | None = None) -> torch.Tensor:
    """Unimodal text embeddings `(num_texts, contrastive_embedding_size)`, float32 on the CPU. `progress`: as in
    `score_pairs`, counting texts."""
    texts = prepare_text_inputs(text_inputs)

    def rows(positions: torch.Tensor) -> dict[str, torch.Tensor]:
        width = max(int(texts["attention_mask"][positions].sum(1).max()), 1)
        return {key: texts[key][positions, :width] for key in TEXT_KEYS}

    return _encode(model, texts["input_ids"].shape[0], rows, model.get_text_embeddings, batch_size, progress)


def encode_images(
    model, region_inputs: Mapping | RegionBatches, batch_size: int = 256, progress: Callable | None = None
) -> torch.Tensor:
    """Unimodal image embeddings `(num_images, contrastive_embedding_size)` from regions (stacked, or a
    `RegionBatches` gallery read batch by batch), float32 on the CPU. `progress`: as in `score_pairs`, counting
    images."""
    regions = prepare_region_inputs(region_inputs)
    return _encode(
        model,
        num_region_images(regions),
        lambda positions: region_rows(regions, positions),
        model.get_region_embeddings,
        batch_size,
        progress,
    )


# ----------------------------------------------------------------------------------------------------------------
# Search index
# ----------------------------------------------------------------------------------------------------------------


def index_factory_string(
    index_type: str, num_items: int, dim: int, nlist: int | None = None, hnsw_m: int = 32, pq_m: int | None = None
) -> str:
    """The faiss `index_factory` string of a named index type; a factory string itself (`"IVF1024,PQ16"`,
    `"HNSW32,Flat"`, `"OPQ16,IVF256,PQ16"`) is returned unchanged.

    `"flat"` is exact (`Flat`); `"ivf"` (`IVF{nlist},Flat`, inverted lists), `"hnsw"` (`HNSW{m},Flat`, a proximity
    graph) and `"ivfpq"` (`IVF{nlist},PQ{m}x{bits}`, inverted lists over product-quantized codes, the compact one for
    large galleries) are approximate. `nlist` defaults to about `4 * sqrt(num_items)` (at least 39 training points
    per cell); `pq_m` to a divisor of `dim` near `dim / 4`, with 8-bit codes where there are 39 * 256 points to train them on.
    """
    if not isinstance(index_type, str):
        raise TypeError(f"index_type must be a string, got {type(index_type).__name__}: {index_type!r}.")
    for name, value, minimum in (("nlist", nlist, 1), ("hnsw_m", hnsw_m, 2), ("pq_m", pq_m, 1)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < minimum):
            raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}.")
    if index_type not in INDEX_TYPES:
        if index_type and index_type[0].isupper():
            check_factory_string(index_type, dim)
            return index_type
        raise ValueError(
            f"index_type must be one of {INDEX_TYPES} or a faiss index_factory string such as 'IVF256,PQ16', got "
            f"{index_type!r}."
        )
    if index_type == "flat":
        return "Flat"
    if index_type == "hnsw":
        return f"HNSW{hnsw_m},Flat"
    nlist = nlist or max(1, min(int(4 * num_items**0.5), num_items // 39 or 1))
    if index_type == "ivf":
        return f"IVF{nlist},Flat"
    if pq_m is None:
        pq_m = max(m for m in range(1, max(dim // 4, 1) + 1) if dim % m == 0)
    if dim % pq_m:
        raise ValueError(f"pq_m={pq_m} must divide the embedding size {dim}.")
    bits = max(1, min(8, int(np.log2(max(num_items // 39, 2)))))
    return f"IVF{nlist},PQ{pq_m}x{bits}"


_CHECKED_FACTORIES: dict[tuple[str, int], str | None] = {}


def check_factory_string(factory: str, dim: int) -> None:
    """Refuses a faiss `index_factory` string that faiss cannot build, before this process calls `index_factory`.

    Some strings (`"HNSW0,Flat"`, malformed quantizer specs) make faiss abort the whole process (SIGABRT) instead of
    raising, and no grammar kept here can follow every faiss version. So the string is built once in a child
    process (a fraction of a second; the answer is remembered for this process): a crash or an error there becomes
    a `ValueError` here, naming the string and what faiss said. Strings that only contain the characters faiss
    uses are probed; anything else (spaces, quotes, newlines) is refused outright.
    """
    import re
    import subprocess
    import sys

    if not re.fullmatch(r"[A-Za-z0-9_,.:=x\-]{1,200}", factory):
        raise ValueError(
            f"index_type {factory!r} is not a faiss index_factory string (letters, digits and , . : = _ x - only, "
            "e.g. 'IVF256,PQ16' or 'HNSW32,Flat')."
        )
    if faiss is None:
        return  # refused later with an ImportError: only "Flat" runs without faiss
    key = (factory, int(dim))
    if key not in _CHECKED_FACTORIES:
        # Built, and when it needs no training, filled and searched: some strings abort only at `add`.
        probe = (
            "import sys, numpy, faiss\n"
            f"index = faiss.index_factory({int(dim)}, {factory!r}, faiss.METRIC_INNER_PRODUCT)\n"
            "if index.is_trained:\n"
            f"    x = numpy.random.default_rng(0).standard_normal((64, {int(dim)})).astype('float32')\n"
            "    index.add(x)\n"
            "    index.search(x[:2], 4)\n"
            "sys.stdout.write(type(index).__name__)\n"
        )
        try:
            done = subprocess.run(
                [sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, check=False
            )
            problem = None
            if done.returncode != 0:
                lines = [line for line in done.stderr.strip().splitlines() if line.strip()]
                said = lines[-1] if lines else f"the process died with signal {-done.returncode}"
                if done.returncode < 0:
                    said = f"faiss aborted the process (signal {-done.returncode}); {said}"
                problem = said[-400:]
        except (OSError, subprocess.TimeoutExpired) as error:  # no child process here: let faiss itself answer
            problem = None
            try:
                faiss.index_factory(int(dim), factory, faiss.METRIC_INNER_PRODUCT)
            except RuntimeError as faiss_error:
                problem = str(faiss_error).strip().splitlines()[-1] if str(faiss_error).strip() else repr(error)
        _CHECKED_FACTORIES[key] = problem
    if _CHECKED_FACTORIES[key]:
        raise ValueError(
            f"faiss cannot build index_type {factory!r} for {dim}-d embeddings: {_CHECKED_FACTORIES[key]}. Use one of "
            f"{INDEX_TYPES} or a valid index_factory string such as 'IVF256,Flat' or 'HNSW32,Flat'."
        )


class EmbeddingIndex:
    """Inner-product search over L2-normalised embeddings (cosine similarity), with faiss when installed.

    Args:
        embeddings (`torch.Tensor` or `np.ndarray` of shape `(num_items, dim)`): the gallery.
        index_type (`str`, *optional*, defaults to `"flat"`): `"flat"`, `"ivf"`, `"hnsw"`, `"ivfpq"` or any faiss
            `index_factory` string (see `index_factory_string`). `"flat"` without faiss is a torch matrix product.
        nlist (`int`, *optional*): IVF cells; defaults to about `4 * sqrt(num_items)`.
        nprobe (`int`, *optional*, defaults to 16): IVF cells visited per query (recall vs speed).
        hnsw_m (`int`, *optional*, defaults to 32): HNSW neighbours per node.
        ef_search (`int`, *optional*, defaults to 128): HNSW search breadth (recall vs speed).
        pq_m (`int`, *optional*): product-quantizer sub-vectors of `"ivfpq"`.
        use_faiss (`bool`, *optional*): force faiss on or off; by default it is used when installed.
        use_gpu (`bool`, *optional*): put the faiss index on every visible GPU; by default when faiss sees one
            (`faiss.get_num_gpus()`) and the index type runs there (HNSW does not; it stays on the CPU).
        keep_vectors (`bool`, *optional*, defaults to `True`): keep the float32 embeddings next to the index, for
            `fill_missing` and `save`; turn off for a compressed (IVF-PQ) gallery too large to hold twice.
        model_fingerprint (`str`, *optional*): what made the embeddings (the retrieval pipeline records its model's
            `embedding_fingerprint`: a hash of its weights' names and shapes and a sample of their values), saved
            with the index; the pipeline refuses an index whose fingerprint is another model's.
        gallery_fingerprint (`str`, *optional*): what the embeddings are of (the retrieval pipeline records
            `gallery_fingerprint`: the gallery's kind, size and a sample of its items), saved with the index; a
            `RetrievalIndex` refuses to pair the index with another gallery. Both keep sampled values, compared
            within a tolerance (float noise of the same model or photos is no other model or gallery), so compare
            them with the pipeline's `same_model_fingerprint` and `same_gallery_fingerprint`, not by equality.
    """

    def __init__(
        self,
        embeddings,
        index_type: str = "flat",
        nlist: int | None = None,
        nprobe: int = 16,
        hnsw_m: int = 32,
        ef_search: int = 128,
        pq_m: int | None = None,
        use_faiss: bool | None = None,
        use_gpu: bool | None = None,
        keep_vectors: bool = True,
        model_fingerprint: str | None = None,
        gallery_fingerprint: str | None = None,
    ):
        for name, value in (("model_fingerprint", model_fingerprint), ("gallery_fingerprint", gallery_fingerprint)):
            if value is not None and not isinstance(value, str):
                raise TypeError(f"{name} must be a string, got {type(value).__name__}.")
        self.model_fingerprint, self.gallery_fingerprint = model_fingerprint, gallery_fingerprint
        vectors = _as_matrix(embeddings, "embeddings")
        _check_finite(vectors, "embeddings")
        if vectors.shape[0] == 0:
            raise ValueError(f"embeddings must be a non-empty (num_items, dim) matrix, got shape {vectors.shape}.")
        if use_faiss and faiss is None:
            raise ImportError("use_faiss=True needs faiss: pip install faiss-cpu (or imagebert_hf[retrieval]).")
        self.factory = index_factory_string(index_type, vectors.shape[0], vectors.shape[1], nlist, hnsw_m, pq_m)
        self.index_type = index_type
        self.nprobe, self.ef_search = nprobe, ef_search
        self.dim, self.num_items = vectors.shape[1], vectors.shape[0]
        self._index, self.nlist = None, None
        if use_faiss is False or faiss is None:
            if self.factory != "Flat":
                raise ImportError(f"index_type={index_type!r} needs faiss: pip install faiss-cpu.")
        else:
            index = self._place(faiss.index_factory(self.dim, self.factory, faiss.METRIC_INNER_PRODUCT), use_gpu)
            try:
                if not index.is_trained:
                    index.train(vectors)
                index.add(vectors)
            except RuntimeError as error:
                said = str(error).strip().splitlines()[-1] if str(error).strip() else type(error).__name__
                raise ValueError(
                    f"faiss could not build index_type {index_type!r} ({self.factory}) over {self.num_items} "
                    f"embeddings of size {self.dim}: {said}. Too few embeddings to train it? Use 'flat' or fewer "
                    "cells (nlist)."
                ) from error
        self.vectors = vectors if (keep_vectors or self._index is None) else None

    # -- faiss placement and parameters ----------------------------------------------------------------------------

    @property
    def backend(self) -> str:
        """`"faiss-gpu"`, `"faiss"` or `"torch"`."""
        if self._index is None:
            return "torch"
        return "faiss-gpu" if self.on_gpu else "faiss"

    @property
    def on_gpu(self) -> bool:
        name = "" if self._index is None else type(self._index).__name__
        return name.startswith("Gpu") or name in ("IndexShards", "IndexReplicas")

    def _place(self, index, use_gpu: bool | None):
        """Moves a trained or untrained CPU faiss index to the GPUs where wanted, and sets nprobe / efSearch."""
        self.nlist = faiss.extract_index_ivf(index).nlist if "IVF" in self.factory else None
        num_gpus = faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0
        if use_gpu is None:
            use_gpu = num_gpus > 0 and "HNSW" not in self.factory
        if use_gpu and num_gpus == 0:
            raise RuntimeError("use_gpu=True, but faiss sees no GPU (faiss.get_num_gpus() is 0; install faiss-gpu).")
        if use_gpu:
            index = faiss.index_cpu_to_all_gpus(index)
        self._index = index
        space = faiss.GpuParameterSpace() if self.on_gpu else faiss.ParameterSpace()
        if self.nlist is not None:
            space.set_index_parameter(index, "nprobe", min(self.nprobe, self.nlist))
        if "HNSW" in self.factory:
            space.set_index_parameter(index, "efSearch", self.ef_search)
        return index

    # -- search ------------------------------------------------------------------------------------------------------

    def __len__(self) -> int:
        return self.num_items

    @property
    def embeddings(self) -> torch.Tensor:
        """The gallery's embeddings `(num_items, dim)` as a float32 CPU tensor (needs `keep_vectors`)."""
        if self.vectors is None:
            raise ValueError("this index was built with keep_vectors=False; it holds no float32 embeddings.")
        return torch.from_numpy(self.vectors)

    def search(self, queries, k: int, fill_missing: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """The `k` most similar gallery items of every query (k is clamped to the gallery size).

        Returns:
            `(similarities, indices)`, both `(num_queries, k)` torch tensors, best first. Approximate indexes may
            find fewer than k hits for a query; those slots (at the end of the row) hold index -1, or, with
            `fill_missing=True`, the best items of an exact search that the approximate one did not find: every row
            then holds k distinct items, sorted by similarity. `fill_missing` needs the float32 embeddings
            (`keep_vectors=True`); without them it raises, whatever the queries.
        """
        queries = _as_matrix(queries, "queries")
        if queries.shape[1] != self.dim:
            raise ValueError(f"queries must have shape (num_queries, {self.dim}), got {queries.shape}.")
        _check_finite(queries, "queries")
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
            raise TypeError(f"k must be an integer, got {type(k).__name__}: {k!r}.")
        k = min(int(k), len(self))
        if k < 1:
            raise ValueError(f"k must be at least 1, got {k}.")
        if fill_missing and self.vectors is None:
            raise ValueError(
                "fill_missing=True needs the gallery's float32 embeddings, but this index was built with "
                "keep_vectors=False; search without fill_missing (slots the approximate search leaves empty hold -1)."
            )
        if self._index is None:
            return self._exact(queries, k)
        values, indices = self._index.search(queries, k)
        values, indices = torch.from_numpy(values), torch.from_numpy(indices).long()
        if fill_missing:
            rows = torch.nonzero((indices < 0).any(1)).flatten()
            if rows.numel():
                # Only the rows with empty slots are searched again. The exact top-k holds at least as many items the
                # approximate search missed as it left slots empty, so each row fills up with distinct items.
                exact_values, exact_indices = self._exact(queries[rows.numpy()], k)
                for row, row_values, row_indices in zip(rows.tolist(), exact_values, exact_indices):
                    found = indices[row] >= 0
                    new = ~torch.isin(row_indices, indices[row][found])
                    merged_values = torch.cat([values[row][found], row_values[new]])[:k]
                    merged_indices = torch.cat([indices[row][found], row_indices[new]])[:k]
                    order = torch.argsort(merged_values, descending=True, stable=True)
                    values[row], indices[row] = merged_values[order], merged_indices[order]
        return values, indices

    def _exact(self, queries: np.ndarray, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        similarities = torch.from_numpy(queries) @ self.embeddings.T
        return similarities.topk(k, dim=1)

    # -- saving ------------------------------------------------------------------------------------------------------

    def save(self, directory: str | os.PathLike, metadata: Mapping | None = None) -> None:
        """Writes `index_config.json`, the faiss index (`index.faiss`, from the CPU) and, when kept, the embeddings
        (`embeddings.npy`) to `directory`.

        The config records what the index was built from (`built_from`: the settings, the sha256 of the embeddings
        when kept, and `metadata`, e.g. the model and gallery it embeds) and the size and sha256 of each file. The
        folder is written under a temporary name and renamed into place, so a failed or killed save leaves an
        earlier index there intact: it is renamed aside (`.NAME.old-*`) before the new one goes in and deleted only
        after; a kill between the two renames leaves it whole there, where `load(directory)` reads it and the next
        save puts it back.

        `directory` is new, empty, or an earlier index (its `index_config.json` and nothing but the files `save`
        writes), which is replaced. Any other folder raises `ValueError` before anything is written: the index
        replaces the whole folder, and the files in it would be lost.
        """
        if metadata is not None and not isinstance(metadata, Mapping):
            raise TypeError(f"metadata must be a dict (saved as JSON), got {type(metadata).__name__}.")
        if not os.fspath(directory).strip():
            raise ValueError(
                f"save() needs a folder to write the index to, got {os.fspath(directory)!r} (the empty path is the "
                "current folder, which the index would replace)."
            )
        directory = os.path.abspath(os.fspath(directory))
        _check_index_folder(directory)
        built_from = {"factory": self.factory, "dim": self.dim, "num_items": self.num_items, **dict(metadata or {})}
        if self.vectors is not None:
            built_from["embeddings_sha256"] = _sha256_array(self.vectors)
        config = {
            "format_version": INDEX_FORMAT_VERSION,
            "index_type": self.index_type,
            "factory": self.factory,
            "nprobe": self.nprobe,
            "ef_search": self.ef_search,
            "dim": self.dim,
            "num_items": self.num_items,
            "faiss": self._index is not None,
            "model_fingerprint": self.model_fingerprint,
            "gallery_fingerprint": self.gallery_fingerprint,
            "built_from": built_from,
        }
        json.dumps(config)  # metadata that is not JSON fails here, before anything is written
        parent = os.path.dirname(directory)
        os.makedirs(parent, exist_ok=True)
        tmp = os.path.join(parent, f".{os.path.basename(directory)}.tmp-{os.getpid()}-{os.urandom(4).hex()}")
        os.makedirs(tmp)
        try:
            files = {}
            if self._index is not None:
                cpu_index = faiss.index_gpu_to_cpu(self._index) if self.on_gpu else self._index
                faiss.write_index(cpu_index, os.path.join(tmp, INDEX_FILE))
                files[INDEX_FILE] = _file_checksum(os.path.join(tmp, INDEX_FILE))
            if self.vectors is not None:
                np.save(os.path.join(tmp, VECTORS_FILE), self.vectors, allow_pickle=False)
                files[VECTORS_FILE] = _file_checksum(os.path.join(tmp, VECTORS_FILE))
            config["files"] = files
            with open(os.path.join(tmp, INDEX_CONFIG_FILE), "w", encoding="utf-8") as handle:
                json.dump(config, handle, indent=2)
            publish_folder(tmp, directory)
        except BaseException:
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)
            raise

    @classmethod
    def load(cls, directory: str | os.PathLike, use_gpu: bool | None = None, verify: bool = False) -> EmbeddingIndex:
        """Reads an index written by `save` (moved to the GPU as in `__init__`).

        Every load checks the config's fields, each file's size against the size recorded at save time, and that
        the arrays agree with the config (embeddings `(num_items, dim)`, the faiss index's size and dimension), and
        that every embedding is finite, as `__init__` does (a NaN row would rank first for every exact query): one
        pass over the loaded array, about 0.15 s for a million 768-d rows (3 GB), a fraction of reading them.
        With `verify=True` it also reads every file to compare its sha256 (slow for a large gallery). Where a save
        was killed between renaming the earlier index aside and renaming the new one in, that earlier index is read.

        Raises:
            FileNotFoundError: `directory` holds no index.
            ValueError: a damaged or inconsistent index; the message names the file and what disagrees.
        """
        directory = os.fspath(directory)
        set_aside = set_aside_folders(directory)
        if set_aside and not os.path.lexists(directory):
            # A save was killed (or is running, in another process) between renaming the earlier index aside and
            # renaming the new one in: the earlier one is whole there, and the next save puts it back.
            directory = os.fspath(set_aside[-1])
        config_path = os.path.join(directory, INDEX_CONFIG_FILE)
        if not os.path.isfile(config_path):
            raise FileNotFoundError(f"{directory} holds no {INDEX_CONFIG_FILE}: not a folder written by save().")
        config = _read_index_config(config_path)
        for name, recorded in config.get("files", {}).items():
            path = os.path.join(directory, name)
            if not os.path.isfile(path):
                raise ValueError(f"{path} is missing; {INDEX_CONFIG_FILE} lists it. Save the index again.")
            size = os.path.getsize(path)
            if size != recorded.get("size") or (verify and _file_checksum(path) != recorded):
                what = f"{size} bytes, {recorded.get('size')} recorded" if size != recorded.get("size") else "sha256"
                raise ValueError(f"{path} does not match {INDEX_CONFIG_FILE} ({what}): damaged or replaced.")
        vectors_path = os.path.join(directory, VECTORS_FILE)
        index = cls.__new__(cls)
        index.index_type, index.factory = config["index_type"], config["factory"]
        index.nprobe, index.ef_search = config["nprobe"], config["ef_search"]
        index.dim, index.num_items = config["dim"], config["num_items"]
        # None in an index saved before they were recorded.
        index.model_fingerprint = config.get("model_fingerprint")
        index.gallery_fingerprint = config.get("gallery_fingerprint")
        index.vectors = None
        if os.path.isfile(vectors_path):
            try:
                vectors = np.load(vectors_path, allow_pickle=False)
            except (ValueError, OSError, EOFError) as error:
                raise ValueError(f"{vectors_path} is damaged or not a float32 matrix ({error}).") from error
            if not isinstance(vectors, np.ndarray):
                # An .npz archive (np.load opens it lazily): not what save() writes.
                vectors.close()
                raise ValueError(
                    f"{vectors_path} is damaged or not a float32 matrix (it is an .npz archive, not an .npy array)."
                )
            if vectors.dtype != np.float32 or vectors.shape != (index.num_items, index.dim):
                raise ValueError(
                    f"{vectors_path} holds a {vectors.dtype} array of shape {vectors.shape}, but "
                    f"{INDEX_CONFIG_FILE} says ({index.num_items}, {index.dim}) float32: they belong to different "
                    "indexes."
                )
            _check_finite(vectors, vectors_path)
            index.vectors = vectors
        index._index, index.nlist = None, None
        if config["faiss"]:
            if faiss is None:
                if index.factory != "Flat" or index.vectors is None:
                    raise ImportError(f"{directory} holds a faiss {index.factory!r} index: pip install faiss-cpu.")
            else:
                faiss_path = os.path.join(directory, INDEX_FILE)
                if not os.path.isfile(faiss_path):
                    raise ValueError(f"{faiss_path} is missing; {INDEX_CONFIG_FILE} says the index is a faiss index.")
                cpu_index = _read_faiss_index(faiss_path)
                if cpu_index.ntotal != index.num_items or cpu_index.d != index.dim:
                    raise ValueError(
                        f"{faiss_path} holds {cpu_index.ntotal} vectors of dimension {cpu_index.d}, but "
                        f"{INDEX_CONFIG_FILE} says {index.num_items} of dimension {index.dim}: they belong to "
                        "different indexes."
                    )
                index._place(cpu_index, use_gpu)
        elif index.vectors is None:
            raise ValueError(f"{directory} holds neither {INDEX_FILE} nor {VECTORS_FILE}: nothing to search.")
        return index


# What reading a faiss file in a child process found, per file (path, device, inode, size, modification time).
_CHECKED_FAISS_FILES: dict[tuple, str | None] = {}

# Read in a child whose address space is capped: mapped where this faiss can map the file (no copy of the codes),
# read as `load` reads it otherwise. Exit 3: out of memory; 2: faiss refused the file; 4: no faiss there.
_FAISS_READ_PROBE = """
import os, sys
try:
    import faiss
except ImportError:
    sys.exit(4)
path, budget = sys.argv[1], int(sys.argv[2])
try:
    import resource
    with open("/proc/self/statm") as handle:
        used = int(handle.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
    hard = resource.getrlimit(resource.RLIMIT_AS)[1]
    limit = used + budget if hard == resource.RLIM_INFINITY else min(used + budget, hard)
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
except (ImportError, OSError, ValueError):
    pass  # no cap where the platform has none: the read below still runs away from the caller
try:
    try:
        faiss.read_index(path, getattr(faiss, "IO_FLAG_MMAP_IFC", 0))
    except RuntimeError:
        faiss.read_index(path)
except MemoryError:
    sys.exit(3)
except RuntimeError as error:
    lines = str(error).strip().splitlines()
    sys.stdout.write(lines[-1] if lines else type(error).__name__)
    sys.exit(2)
"""


def _faiss_read_budget(size: int) -> int:
    """The memory a faiss file of `size` bytes may take to read: its arrays are in its bytes, and faiss builds little
    beside them (plus a fixed allowance for small indexes)."""
    return 2 * size + (512 << 20)


def _read_faiss_index(path: str):
    """`faiss.read_index(path)`, after reading the file once in a child process whose memory is capped.

    faiss trusts the sizes in a file's header: it allocates the array a header claims before reading it, so a
    109-byte file can make it allocate (and zero) gigabytes, or end this process in `std::bad_alloc`. A file whose
    arrays its bytes hold reads within `_faiss_read_budget` of its size; one that does not is refused here, as is one
    whose read aborts the child, before this process reads it. The answer is remembered per file (a fraction of a
    second, the codes mapped rather than read where faiss can map them).

    Raises:
        ValueError: naming `path` and what is wrong with it.
    """
    import subprocess
    import sys

    stat = os.stat(path)
    key = (os.path.realpath(path), stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns)
    budget = _faiss_read_budget(stat.st_size)
    if key not in _CHECKED_FAISS_FILES:
        problem = None
        try:
            done = subprocess.run(
                [sys.executable, "-c", _FAISS_READ_PROBE, path, str(budget)],
                capture_output=True,
                text=True,
                errors="replace",
            )
        except OSError:  # no child process here: faiss reads it in this process, below
            done = None
        if done is not None and done.returncode == 3:
            problem = (
                f"reading it needs more than {budget >> 20} MB of memory, more than any faiss file of {stat.st_size} "
                "bytes needs: its header claims arrays its bytes do not hold"
            )
        elif done is not None and done.returncode == 2:
            problem = done.stdout.strip()[-400:] or "faiss refused it"
        elif done is not None and done.returncode < 0:
            problem = f"reading it aborted a process (signal {-done.returncode})"
        elif done is not None and done.returncode not in (0, 4):
            lines = [line for line in done.stderr.strip().splitlines() if line.strip()]
            problem = (lines[-1] if lines else f"reading it failed (exit status {done.returncode})")[-400:]
        _CHECKED_FAISS_FILES[key] = problem
    if _CHECKED_FAISS_FILES[key]:
        raise ValueError(f"{path} is damaged or not a faiss index ({_CHECKED_FAISS_FILES[key]}).")
    try:
        return faiss.read_index(path)
    except RuntimeError as error:
        message = str(error).strip().splitlines()[-1] if str(error).strip() else type(error).__name__
        raise ValueError(f"{path} is damaged or not a faiss index ({message}).") from error
    except MemoryError as error:
        raise ValueError(
            f"{path} could not be read: faiss ran out of memory reading this {stat.st_size}-byte index, which needs "
            f"up to {budget >> 20} MB free (a compressed index, index_type='ivfpq', needs less)."
        ) from error


_INDEX_CONFIG_FIELDS = {
    "index_type": str,
    "factory": str,
    "nprobe": int,
    "ef_search": int,
    "dim": int,
    "num_items": int,
    "faiss": bool,
}


def _read_index_config(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as handle:
            config = json.load(handle)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{path} is damaged (not JSON: {error}); save the index again.") from error
    if not isinstance(config, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(config).__name__}.")
    for name, kind in _INDEX_CONFIG_FIELDS.items():
        value = config.get(name)
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise ValueError(f"{path}: field {name!r} must be {kind.__name__}, got {value!r}.")
    for name in ("dim", "num_items", "nprobe", "ef_search"):
        if config[name] < 1:
            raise ValueError(f"{path}: field {name!r} must be at least 1, got {config[name]}.")
    files = config.get("files", {})
    if not isinstance(files, dict) or not all(
        isinstance(v, dict) and isinstance(v.get("size"), int) for v in files.values()
    ):
        raise ValueError(f"{path}: field 'files' must map file names to {{'size', 'sha256'}}, got {files!r:.200}.")
    if any(os.path.basename(name) != name for name in files):
        raise ValueError(f"{path}: field 'files' names a file outside the index folder: {sorted(files)}.")
    for name in ("model_fingerprint", "gallery_fingerprint"):
        fingerprint = config.get(name)
        if fingerprint is not None and not isinstance(fingerprint, str):
            raise ValueError(f"{path}: field {name!r} must be a string or null, got {fingerprint!r:.200}.")
    return config


def _sha256_array(values: np.ndarray) -> str:
    """The sha256 of `values.tobytes()` without that copy of the whole matrix (3 GB for a million 768-d rows): the
    rows are hashed in place, 8 MB at a time (a block of a matrix that is not C-contiguous is copied alone)."""
    import hashlib

    digest = hashlib.sha256()
    rows = max(1, (8 << 20) // max(values[:1].nbytes, 1))
    for start in range(0, values.shape[0], rows):
        digest.update(np.ascontiguousarray(values[start : start + rows]).reshape(-1).view(np.uint8))
    return digest.hexdigest()


def _file_checksum(path: str) -> dict:
    """`formats.files.file_checksum`, kept here because this file travels as remote code and imports no package
    module."""
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(8 << 20), b""):
            digest.update(block)
    return {"size": os.path.getsize(path), "sha256": digest.hexdigest()}


INDEX_FOLDER_FILES = (INDEX_CONFIG_FILE, INDEX_FILE, VECTORS_FILE)


def _check_index_folder(directory: str) -> None:
    """Raises unless `directory` may be replaced by an index: missing, empty, or an earlier index holding nothing
    but the files `save` writes. The folder holding the working folder is refused too: renamed aside and deleted, it
    would leave this process in a folder that no longer exists."""
    if not os.path.lexists(directory):
        return
    if not os.path.isdir(directory):
        raise NotADirectoryError(f"{directory} exists and is not a folder; save() writes a folder.")
    cwd, real = os.path.realpath(os.getcwd()), os.path.realpath(directory)
    if cwd == real or cwd.startswith(real.rstrip(os.sep) + os.sep):
        raise ValueError(
            f"{directory} holds the current working folder; save() replaces the folder it writes. Name a new or "
            "empty folder (or an earlier index) elsewhere."
        )
    entries = sorted(os.listdir(directory))
    others = [name for name in entries if name not in INDEX_FOLDER_FILES]
    if others and INDEX_CONFIG_FILE not in entries:
        held = f"{len(entries)} entries: {', '.join(entries[:5])}{', ...' if len(entries) > 5 else ''}"
        raise ValueError(
            f"{directory} is not an index folder (it holds {held}, and no {INDEX_CONFIG_FILE}); save() replaces the "
            "folder it writes, so it takes only a new or empty folder, or an earlier index. Name a folder of its own, "
            "e.g. a subfolder."
        )
    if others:
        raise ValueError(
            f"{directory} holds an index and other files ({', '.join(others[:5])}{', ...' if len(others) > 5 else ''}"
            "); save() replaces the folder it writes, so these would be lost. Move them out, or name another folder."
        )


def _check_finite(values: np.ndarray, name: str) -> None:
    """NaN or inf rows would make faiss return -1 for every slot (or rank them anywhere): refused, naming a row.

    One read of `values` and no copy of its size: a row whose sum is finite is (NaN and inf propagate), and only
    rows whose sum is not (a bad value, or a sum that overflowed) are looked at element by element.
    """
    with np.errstate(over="ignore", invalid="ignore"):
        suspect = np.flatnonzero(~np.isfinite(values.sum(axis=1)))
    bad = suspect[~np.isfinite(values[suspect]).all(axis=1)]
    if bad.size:
        raise ValueError(
            f"{name} has {bad.size} row(s) with NaN or inf (first: row {int(bad[0])}); every embedding must be finite "
            "(check the model's outputs and the regions it was given)."
        )


def _as_matrix(values, name: str) -> np.ndarray:
    values = values.detach().float().cpu().numpy() if isinstance(values, torch.Tensor) else values
    try:
        values = np.ascontiguousarray(values, dtype=np.float32)
    except (TypeError, ValueError) as error:
        raise TypeError(f"{name} must be a numeric (num_items, dim) matrix, got {type(values).__name__}.") from error
    if values.ndim != 2:
        raise ValueError(f"{name} must be a (num_items, dim) matrix, got shape {values.shape}.")
    return values


__all__ = [
    "INDEX_TYPES",
    "REGION_KEYS",
    "TEXT_KEYS",
    "EmbeddingIndex",
    "RegionBatches",
    "encode_images",
    "encode_texts",
    "check_factory_string",
    "gather_pair_inputs",
    "index_factory_string",
    "is_region_batches",
    "model_device",
    "num_region_images",
    "prepare_region_inputs",
    "prepare_text_inputs",
    "region_rows",
    "score_all_pairs",
    "score_pair_range",
    "score_pairs",
]
