"""`pipeline("image-text-retrieval")`: rank texts for images, images for texts, or score given pairs.

This file is copied next to the weights by `pipe.save_pretrained(dir)` and then loaded by
`pipeline(model=dir, trust_remote_code=True)` in environments without `imagebert_hf`, so it imports only third-party
packages and the files of its own folder (`retrieval_index.py`: scoring, embeddings and the search index;
`roi_image_loading.py`: the image loader), which transformers copies along.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import sys
import types
import weakref
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import transformers
from tqdm.auto import tqdm
from transformers import Pipeline
from transformers.utils import logging

from .processing_imagebert import (
    as_float32_array,
    check_tokenizer_files,
    check_tokenizer_vocabulary,
    read_saved_processor_config,
    tokenize_texts,
)
from .region_batching import check_region_values, pad_region_records
from .retrieval_index import (
    TEXT_KEYS,
    EmbeddingIndex,
    RegionBatches,
    encode_images,
    encode_texts,
    index_factory_string,
    is_region_batches,
    num_region_images,
    prepare_region_inputs,
    score_pairs,
)


logger = logging.get_logger(__name__)

MODES = ("rank_texts", "rank_images", "pairs")
QUERY_KEYS = ("images", "texts", "image", "text")


def projection_fingerprint(model) -> str | None:
    """A sha256 of what a model's unimodal embeddings come from: the embedding size and the weights of its
    projection heads (`cls.text_projection`, `cls.region_projection`), rounded to bfloat16 so that the same checkpoint
    loaded in float32 or bfloat16 gives the same fingerprint. Reads a few hundred thousand numbers (about a
    millisecond). None for a model without these heads."""
    import hashlib

    digest = hashlib.sha256()
    digest.update(f"contrastive_embedding_size={getattr(model.config, 'contrastive_embedding_size', None)}".encode())
    for head in PROJECTION_HEADS:
        try:
            module = model.get_submodule(head)
        except AttributeError:
            return None
        for name, tensor in sorted(module.state_dict().items()):
            digest.update(f"{head}.{name}{tuple(tensor.shape)}".encode())
            digest.update(_bfloat16_bits(tensor).tobytes())
    return digest.hexdigest()


# Marks the fingerprint of every weight the embeddings come from (`embedding_fingerprint`); an index whose recorded
# fingerprint lacks it was built by an earlier version, which recorded `projection_fingerprint`.
EMBEDDING_FINGERPRINT_PREFIX = "encoder+heads:"
# Weight values an embedding fingerprint keeps, spread over every tensor it covers (at least 4 a tensor): training
# moves every value of a tensor it trains, so a few values of each tell a retrained model from its start, and the
# values themselves (not a hash of them) are kept so that they can be compared within a tolerance.
EMBEDDING_FINGERPRINT_VALUES = 1024
# Kept values of one checkpoint loaded in float32, bfloat16 or float16 differ by at most one bfloat16 step (2**-7 of
# the value: a float16 value can round to the neighbouring bfloat16 one) or by float16's spacing near zero (under
# 1e-7); twice the one and a hundred times the other still tell a value any fine-tuning moves by a few percent.
EMBEDDING_FINGERPRINT_RTOL = 2.0**-6
EMBEDDING_FINGERPRINT_ATOL = 1e-5
# Values read per weight tensor by the fingerprint of an earlier version, which hashed them rounded to bfloat16
# (`_earlier_embedding_fingerprint`): an index it saved is compared by that hash.
FINGERPRINT_VALUES_PER_TENSOR = 4096


def embedding_fingerprint(model) -> str | None:
    """What a model's unimodal embeddings come from: every weight of its encoder (`bert.*`, text and region
    embeddings included) and of its projection heads, as `"encoder+heads:SHA256:bf16:VALUES"`: a sha256 of the
    embedding size and of each weight's name and shape, and `EMBEDDING_FINGERPRINT_VALUES` weight values (at least 4
    evenly spaced over each weight) rounded to bfloat16, base64-encoded. An index records it when built; fine-tuning
    that leaves the heads as they were (`contrastive_weight=0` freezes them) still changes the encoder, and with it
    every embedding. None for a model without projection heads.

    The same checkpoint loaded in float32 or bfloat16 gives the same string; loaded in float16, values can round to
    a neighbouring bfloat16 value, so an index's record is compared with `same_model_fingerprint`, which allows for
    that, rather than by equality.

    Remembered per model until one of its weights changes (each tensor's storage, dtype and version counter, which
    every in-place write bumps: an optimizer step, `load_state_dict`), so a pipeline checks an index at every query
    for a fraction of a millisecond rather than the milliseconds of reading a base-size encoder."""
    return _remembered(
        _EMBEDDING_FINGERPRINTS,
        model,
        lambda: None if projection_fingerprint(model) is None else _encoder_and_heads_fingerprint(model),
    )


def _remembered(remembered: weakref.WeakKeyDictionary, model, read: Callable[[], str | None]) -> str | None:
    """`read()`, remembered in `remembered` per model until one of its weights changes (`_weights_state`)."""
    state = _weights_state(model)
    known = remembered.get(model)
    if state is not None and known is not None and known[0] == state:
        return known[1]
    fingerprint = read()
    if state is not None:
        remembered[model] = (state, fingerprint)
    return fingerprint


def _weights_state(model) -> tuple | None:
    """What changes when a weight of `model` does; None where it cannot be told (weights made under
    `torch.inference_mode` keep no version counter), and the fingerprint is then read every time."""
    try:
        weights = tuple((t.data_ptr(), t.dtype, t._version) for t in model.state_dict().values())
    except RuntimeError:
        return None
    return getattr(model.config, "contrastive_embedding_size", None), weights


# The last fingerprint of each model and the state of its weights it was read from (`embedding_fingerprint`), and the
# same for the fingerprint an earlier version recorded (`_earlier_embedding_fingerprint`).
_EMBEDDING_FINGERPRINTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_EARLIER_EMBEDDING_FINGERPRINTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _embedding_weights(model) -> list[tuple[str, torch.Tensor]]:
    """The floating-point weights the unimodal embeddings come from (the encoder's and the projection heads'), by
    name."""
    prefixes = ("bert.", *(head + "." for head in PROJECTION_HEADS))
    return [
        (name, tensor)
        for name, tensor in sorted(model.state_dict().items())
        if name.startswith(prefixes) and torch.is_floating_point(tensor)
    ]


def _evenly_spaced(tensor: torch.Tensor, count: int) -> torch.Tensor:
    """Up to `count` values spread evenly over `tensor` (all of them for a smaller tensor)."""
    flat = tensor.detach().reshape(-1)
    return flat[:: max(1, flat.numel() // count)][:count]


def _encoder_and_heads_fingerprint(model) -> str:
    import hashlib

    digest = hashlib.sha256()
    digest.update(f"contrastive_embedding_size={getattr(model.config, 'contrastive_embedding_size', None)}".encode())
    weights = _embedding_weights(model)
    per_tensor = max(4, EMBEDDING_FINGERPRINT_VALUES // max(len(weights), 1))
    values = []
    for name, tensor in weights:
        digest.update(f"{name}{tuple(tensor.shape)}".encode())
        values.append(_bfloat16_bits(_evenly_spaced(tensor, per_tensor)))
    bits = np.concatenate(values) if values else np.zeros(0, np.uint16)
    return f"{EMBEDDING_FINGERPRINT_PREFIX}{digest.hexdigest()}:bf16:{_encode_values(bits.astype('<u2'))}"


def _earlier_embedding_fingerprint(model) -> str:
    """The fingerprint an earlier version recorded for `model`: a sha256 of the names, shapes and up to 4,096 values
    of each weight rounded to bfloat16. Exact, so the same checkpoint in float16 does not give it."""
    import hashlib

    def read() -> str:
        digest = hashlib.sha256()
        size = getattr(model.config, "contrastive_embedding_size", None)
        digest.update(f"contrastive_embedding_size={size}".encode())
        for name, tensor in _embedding_weights(model):
            digest.update(f"{name}{tuple(tensor.shape)}".encode())
            digest.update(_bfloat16_bits(_evenly_spaced(tensor, FINGERPRINT_VALUES_PER_TENSOR)).tobytes())
        return EMBEDDING_FINGERPRINT_PREFIX + digest.hexdigest()

    return _remembered(_EARLIER_EMBEDDING_FINGERPRINTS, model, read)


def same_model_fingerprint(recorded: str, model) -> bool:
    """Whether the `embedding_fingerprint` an index recorded is `model`'s: the same embedding size and weights (names
    and shapes), and every kept value within `EMBEDDING_FINGERPRINT_RTOL` of `model`'s (plus
    `EMBEDDING_FINGERPRINT_ATOL`), so that the checkpoint that built the index matches in float32, bfloat16 or
    float16, and another checkpoint or a fine-tuned one does not. A record of an earlier version (a hash of rounded
    values, `_earlier_embedding_fingerprint`) must match exactly.

    Raises:
        ValueError: `recorded` is damaged (its values cannot be read).
    """
    mine = embedding_fingerprint(model)
    if mine is None:
        return False
    if recorded == mine:
        return True
    exact, values = _split_values(recorded, "model_fingerprint")
    if values is None:
        return recorded == _earlier_embedding_fingerprint(model)
    mine_exact, mine_values = _split_values(mine, "model_fingerprint")
    if exact != mine_exact or values.shape != mine_values.shape:
        return False
    tolerance = (
        EMBEDDING_FINGERPRINT_RTOL * np.maximum(np.abs(values), np.abs(mine_values)) + EMBEDDING_FINGERPRINT_ATOL
    )
    return bool((np.abs(values - mine_values) <= tolerance).all())


# Gallery items read for a gallery's fingerprint: enough that a reordered or exchanged gallery of the same size shows
# in almost every case, few enough that a memory-mapped gallery of millions is fingerprinted in a fraction of a second.
GALLERY_FINGERPRINT_ROWS = 256
# Feature values an image gallery's fingerprint keeps per read item, kept themselves, not hashed: extracting the same
# photos again (another batch size, thread count or device) moves them by float noise, which a hash cannot tell from
# other photos. Measured on 300 real photos with the default extractor, whose features are about 71% exact zeros: with
# 32 values (56% of them zeros) no item had all its kept values zero (with 2 an item, about 18% had).
GALLERY_FINGERPRINT_ITEM_VALUES = 32
# The kept values come from an item's leading regions (spread over their features, each region its own feature
# positions): a detector orders its regions by score, so a region at its score threshold kept or dropped by float
# noise changes only the tail; a grid gives every photo the same boxes, so features, not boxes, tell photos apart.
GALLERY_FINGERPRINT_REGIONS = 8
# Two items are the same when their kept values are within this relative L2 distance, ||a - b|| / max(||a||, ||b||).
# Measured with the default extractor: the same 32 COCO photos through TF32 convolutions (a GPU's default, 10 bits kept
# of each operand) moved them by at most 0.02 (median 0.004), a float16 region cache by about 5e-4; of 300 COCO and
# Flickr photos, two different ones were at least 0.27 apart, and 99% of pairs more than 0.68.
GALLERY_FINGERPRINT_MAX_DISTANCE = 0.2
# The smallest norm an item's distance is divided by, as a fraction of the median norm of the gallery's read items: an
# item whose kept values are all zero is another item than one whose values are not, unless those are tiny for this
# gallery (noise), whatever the features' overall scale.
GALLERY_FINGERPRINT_NORM_FLOOR = 0.05
# An item's region count may differ by this much: a detector's region at its score threshold can be kept or dropped
# by float noise (a grid's counts never change).
GALLERY_FINGERPRINT_COUNT_SLACK = 1
# The value type of an image gallery's record: per read item, its region count and its kept values, as float32.
_GALLERY_VALUES = "f32items"


def gallery_fingerprint(kind: str, inputs: Mapping | RegionBatches) -> str:
    """What an index's gallery is, from its kind (`"images"` or `"texts"`), its size, and the model inputs of up to
    `GALLERY_FINGERPRINT_ROWS` items evenly spaced over it.

    A gallery of texts is `"texts:SHA256"`, a hash of their unpadded token ids. A gallery of images is
    `"images:SHA256:f32items:VALUES"`: a hash of its kind and size, and per read item its region count and
    `GALLERY_FINGERPRINT_ITEM_VALUES` feature values spread over its first `GALLERY_FINGERPRINT_REGIONS` unpadded
    regions, base64-encoded float32 (about 45 KB for 256 items). An index's record is compared with
    `same_gallery_fingerprint`, which takes the same photos extracted again (values moved by float noise, TF32
    included) and refuses other items of the same size or kind, or the same in another order, unless every changed
    item falls between the read ones (a gallery of at most 256 items is read whole). The same gallery gives the same
    string as stacked tensors or as a memory-mapped `RegionBatches` gallery, in float16 or float32."""
    import hashlib

    count = len(inputs) if is_region_batches(inputs) else int(next(iter(inputs.values())).shape[0])
    rows = _gallery_rows(count)
    digest = hashlib.sha256(f"{kind}:{count}".encode())
    if kind == "texts":
        ids, mask = inputs["input_ids"][rows].cpu(), inputs["attention_mask"][rows].cpu().bool()
        for row_ids, row_mask in zip(ids, mask):
            digest.update(row_ids[row_mask].to(torch.int64).numpy().tobytes() + b"|")
        return f"{kind}:{digest.hexdigest()}"
    kept = _gallery_item_values(inputs, rows).astype("<f4")
    return f"{kind}:{digest.hexdigest()}:{_GALLERY_VALUES}:{_encode_values(kept)}"


def _gallery_rows(count: int) -> list[int]:
    rows = sorted({position * count // GALLERY_FINGERPRINT_ROWS for position in range(GALLERY_FINGERPRINT_ROWS)})
    return [row for row in rows if row < count]


def _gallery_item_values(inputs: Mapping | RegionBatches, rows: list[int]) -> np.ndarray:
    """`(len(rows), 1 + GALLERY_FINGERPRINT_ITEM_VALUES)` float32: per item of `rows`, its unpadded region count, then
    value `s` of its kept ones from leading region `s % n` (`n` = its regions, at most `GALLERY_FINGERPRINT_REGIONS`)
    at feature `s * F // GALLERY_FINGERPRINT_ITEM_VALUES`; zeros for an item without regions."""
    if is_region_batches(inputs):
        batch = inputs.batch(rows)
        features = batch["region_features"]
        mask = batch["region_attention_mask"]
    else:
        features = inputs["region_features"]
        mask = inputs["region_attention_mask"][rows]
    slots = np.arange(GALLERY_FINGERPRINT_ITEM_VALUES)
    positions = torch.as_tensor(slots * features.shape[-1] // GALLERY_FINGERPRINT_ITEM_VALUES)
    values = np.zeros((len(rows), 1 + GALLERY_FINGERPRINT_ITEM_VALUES), np.float32)
    mask = mask.cpu().bool()
    for item, (row, row_mask) in enumerate(zip(rows, mask)):
        regions = torch.nonzero(row_mask).reshape(-1)[:GALLERY_FINGERPRINT_REGIONS]
        values[item, 0] = int(row_mask.sum())
        if regions.numel():
            row_features = features[item if is_region_batches(inputs) else row]
            picked = row_features[regions.to(row_features.device)][:, positions.to(row_features.device)]
            values[item, 1:] = picked.float().cpu().numpy()[slots % regions.numel(), slots]
    return values


def _earlier_gallery_fingerprint(kind: str, inputs: Mapping | RegionBatches) -> str:
    """The fingerprint an earlier version recorded for a gallery of images: a hash of the read values rounded to
    bfloat16, which the same photos extracted again can miss when float noise rounds one the other way."""
    import hashlib

    count = len(inputs) if is_region_batches(inputs) else int(next(iter(inputs.values())).shape[0])
    digest = hashlib.sha256(f"{kind}:{count}".encode())
    for features, locations in _earlier_gallery_regions(inputs, _gallery_rows(count)):
        digest.update(_bfloat16_bits(features).tobytes() + b"|")
        digest.update(_bfloat16_bits(locations).tobytes() + b"|")
    return f"{kind}:{digest.hexdigest()}"


def _earlier_gallery_regions(
    inputs: Mapping | RegionBatches, rows: list[int]
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per item of `rows`, on the CPU, what an earlier version's fingerprint read: its unpadded regions' 32 evenly
    spaced feature values `(regions, ~32)` and boxes `(regions, L)`."""
    if is_region_batches(inputs):
        batch = inputs.batch(rows)
        features = batch["region_features"]
    else:
        batch = {key: inputs[key][rows] for key in ("region_locations", "region_attention_mask")}
        features = inputs["region_features"]
    features = features[:, :, :: max(1, features.shape[-1] // 32)]
    if not is_region_batches(inputs):
        features = features[rows]
    mask = batch["region_attention_mask"].cpu().bool()
    return [
        (row_features.cpu()[row_mask], locations.cpu()[row_mask])
        for row_features, locations, row_mask in zip(features, batch["region_locations"], mask)
    ]


def _is_earlier_gallery_record(recorded: str) -> bool:
    """An image gallery's record saved by an earlier version: a hash of rounded values, or kept values in a layout
    this version no longer compares."""
    parts = recorded.split(":")
    return parts[0] == "images" and (len(parts) < 4 or parts[-2] != _GALLERY_VALUES)


def same_gallery_fingerprint(recorded: str, kind: str, inputs: Mapping | RegionBatches) -> bool:
    """Whether the `gallery_fingerprint` an index recorded is that of the gallery `inputs` of `kind`: the same kind,
    size and (texts) token ids; for images, each read item's region count within `GALLERY_FINGERPRINT_COUNT_SLACK`
    and its kept values within relative L2 distance `GALLERY_FINGERPRINT_MAX_DISTANCE`, item by item (an item's norm
    counted as at least `GALLERY_FINGERPRINT_NORM_FLOOR` of the gallery's median, so an item of zeros is not taken
    for one of values). An image gallery's record of the earliest version (a hash of rounded values) must match
    exactly; one in a layout no longer compared never matches (build the index again).

    Raises:
        ValueError: `recorded` is damaged (its values cannot be read).
    """
    if recorded.split(":", 1)[0] != kind:
        return False
    current = gallery_fingerprint(kind, inputs)
    if recorded == current:
        return True
    exact, values = _split_values(recorded, "gallery_fingerprint")
    if values is None:
        return kind == "images" and recorded == _earlier_gallery_fingerprint(kind, inputs)
    if _is_earlier_gallery_record(recorded):
        return False
    current_exact, current_values = _split_values(current, "gallery_fingerprint")
    width = 1 + GALLERY_FINGERPRINT_ITEM_VALUES
    if exact != current_exact or values.shape != current_values.shape or values.size % width:
        return False
    values, current_values = values.reshape(-1, width), current_values.reshape(-1, width)
    counts, current_counts = values[:, 0], current_values[:, 0]
    if (np.abs(counts - current_counts) > GALLERY_FINGERPRINT_COUNT_SLACK).any():
        return False
    norms = np.linalg.norm(values[:, 1:].astype(np.float64), axis=1)
    current_norms = np.linalg.norm(current_values[:, 1:].astype(np.float64), axis=1)
    floor = GALLERY_FINGERPRINT_NORM_FLOOR * float(np.median(np.maximum(norms, current_norms))) if norms.size else 0.0
    distances = np.linalg.norm((values[:, 1:] - current_values[:, 1:]).astype(np.float64), axis=1)
    scales = np.maximum(np.maximum(norms, current_norms), max(floor, np.finfo(np.float32).tiny))
    return bool((distances <= GALLERY_FINGERPRINT_MAX_DISTANCE * scales).all())


# The kinds of values a fingerprint keeps (`"...:KIND:BASE64"`), as little-endian numpy types.
_FINGERPRINT_VALUE_TYPES = {_GALLERY_VALUES: "<f4", "f32": "<f4", "bf16": "<u2"}


def _encode_values(values: np.ndarray) -> str:
    import base64

    return base64.b64encode(values.tobytes()).decode("ascii")


def _split_values(fingerprint: str, name: str) -> tuple[str, np.ndarray | None]:
    """A fingerprint's exact part and its kept values as float32 (None for a fingerprint that keeps none: a gallery of
    texts, or one an earlier version recorded).

    Raises:
        ValueError: naming `name`, when the values cannot be read (an edited or damaged `index_config.json`).
    """
    import base64
    import binascii

    parts = fingerprint.split(":")
    if len(parts) < 4 or parts[-2] not in _FINGERPRINT_VALUE_TYPES:
        return fingerprint, None
    try:
        values = np.frombuffer(base64.b64decode(parts[-1], validate=True), _FINGERPRINT_VALUE_TYPES[parts[-2]])
    except (binascii.Error, ValueError) as error:
        raise ValueError(
            f"this index's {name} is damaged: its values cannot be read ({error}). Build the index again "
            "(build_index) and save it."
        ) from None
    if parts[-2] == "bf16":
        values = (values.astype(np.uint32) << np.uint32(16)).view(np.float32)
    return ":".join(parts[:-2]), values.astype(np.float32)


def _fingerprint_id(fingerprint: str | None) -> str:
    """16 hex digits that name a fingerprint in a message (a fingerprint that keeps values ends in base64)."""
    import hashlib

    if fingerprint is None or _split_values(fingerprint, "fingerprint")[1] is None:
        return str(fingerprint)[-16:]
    return hashlib.sha256(fingerprint.encode()).hexdigest()[:16]


def _bfloat16_bits(tensor: torch.Tensor) -> np.ndarray:
    """The bits of `tensor` rounded to bfloat16 (to nearest, ties to even, as `tensor.to(torch.bfloat16)`), computed
    in numpy: torch's own conversion takes tens of milliseconds for a projection head on some CPUs."""
    tensor = tensor.detach().cpu().contiguous()
    if tensor.dtype == torch.bfloat16:
        return tensor.view(torch.int16).numpy().view(np.uint16)
    bits = tensor.to(torch.float32).numpy().view(np.uint32)
    one = np.uint32(1)
    return ((bits + np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & one)) >> np.uint32(16)).astype(np.uint16)


def _positive_int(name: str, value: Any) -> int:
    """`value` as a count of at least 1; anything else (0, 2.5, "3", True) raises naming `name`."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be a positive integer, got {value!r} ({type(value).__name__}).")
    if value < 1:
        raise ValueError(f"{name} must be at least 1, got {value}.")
    return int(value)


def _check_scores(scores: torch.Tensor, image_index: torch.Tensor, text_index: torch.Tensor) -> None:
    """Raises ValueError naming the (image, text) pairs whose score is NaN or infinite: a ranking of such scores
    would be arbitrary, and its probabilities meaningless."""
    bad = ~torch.isfinite(scores.reshape(-1).cpu())
    if not bad.any():
        return
    images, texts = image_index.reshape(-1).cpu()[bad][:5], text_index.reshape(-1).cpu()[bad][:5]
    pairs = [f"images[{int(i)}] with texts[{int(t)}]" for i, t in zip(images, texts)]
    more = f" and {int(bad.sum()) - len(pairs)} more" if int(bad.sum()) > len(pairs) else ""
    raise ValueError(
        f"the model gave non-finite scores (NaN or infinite) for {', '.join(pairs)}{more}: its outputs are not "
        "finite, so nothing was ranked (check the checkpoint's weights for NaN, and region features for values so "
        "large that the model overflows)."
    )


def _describe(item: Any) -> str:
    if isinstance(item, (str, os.PathLike)):
        return repr(os.fspath(item))
    if isinstance(item, Mapping):
        return f"cached regions {item.get('image_id', '')!r}".replace(" ''", "")
    return type(item).__name__


class _Items:
    """Holds the caller's inputs through `Pipeline.forward`, which would otherwise copy dicts (region records) and
    lists on their way to the device; results then point at the very objects that were passed in."""

    def __init__(self, items: list):
        self.items = items


def _is_image_list(images: Any) -> bool:
    return isinstance(images, (list, tuple))


@dataclass
class RetrievalIndex:
    """A prebuilt gallery for repeated queries: its model inputs (on the pipeline's device, moved there once) and an
    `EmbeddingIndex` over its unimodal embeddings.

    Build it with `ImageTextRetrievalPipeline.build_index(images=...)` (a gallery of images, queried with texts) or
    `build_index(texts=...)` (a gallery of texts, queried with images).

    Attributes:
        kind: `"images"` or `"texts"`, what the gallery holds.
        items: the gallery as given (texts, or the images' paths / PIL images / region records); for a
            `RegionBatches` gallery, its positions (`range(len(gallery))`).
        inputs: the gallery's model inputs (region inputs or token ids), so the cross-encoder re-ranks without
            re-extracting or re-tokenizing; a `RegionBatches` gallery (the region cache's `RegionGallery`) stays as
            it is, read from the memory-mapped cache as candidates are re-ranked.
        index: the `EmbeddingIndex` (faiss `Flat`, IVF, HNSW, IVF-PQ or a torch matrix product) of the gallery's
            L2-normalised unimodal embeddings. Its `model_fingerprint` (`embedding_fingerprint` of the model that
            built it) ties it to that model: a pipeline of another model refuses it, while the same checkpoint in
            any dtype takes it (`same_model_fingerprint`). Its `gallery_fingerprint` (the function of that name, of
            the gallery it was built from) ties it to this gallery: an index paired with another gallery, or with
            the same items in another order, is refused, while the same photos extracted again, whatever the batch
            size, thread count or device, are taken (`same_gallery_fingerprint`); an index that records none, saved
            by an earlier version, is checked by its size alone.
    """

    kind: str
    items: Sequence
    inputs: dict[str, torch.Tensor] | RegionBatches
    index: EmbeddingIndex
    # The notices already given about this index (each is logged once per index, not once per query).
    _notices: set = field(default_factory=set, init=False, repr=False, compare=False)

    def __post_init__(self):
        # A saved EmbeddingIndex paired by hand with a gallery that has grown or shrunk since would return positions
        # that are no item, or never the new ones.
        if self.kind not in ("images", "texts"):
            raise ValueError(f"kind must be 'images' or 'texts', got {self.kind!r}.")
        sizes = {"items": len(self.items), "embeddings in the index": int(self.index.num_items)}
        if isinstance(self.inputs, dict):
            first = next(iter(self.inputs.values()), None)
            if first is not None:
                sizes["inputs"] = int(first.shape[0])
        else:
            sizes["inputs"] = len(self.inputs)
        if len(set(sizes.values())) > 1:
            found = ", ".join(f"{count} {what}" for what, count in sizes.items())
            raise ValueError(
                f"this gallery and its index do not match ({found}): they were built from different galleries; build "
                "the index from this gallery (build_index)."
            )
        recorded = self.index.gallery_fingerprint
        if recorded is not None and not same_gallery_fingerprint(recorded, self.kind, self.inputs):
            recorded_kind = recorded.split(":", 1)[0]
            what = (
                f"it is an index of {recorded_kind}, and this gallery holds {self.kind}"
                if recorded_kind != self.kind
                else f"its {self.kind} are other {self.kind}, or the same in another order"
            )
            # An earlier version hashed rounded feature values, which the same photos extracted again can miss.
            earlier = recorded_kind == "images" == self.kind and _is_earlier_gallery_record(recorded)
            raise ValueError(
                f"this index was built from another gallery: {what} (its gallery_fingerprint differs). Build the index "
                "from this gallery (build_index), or pair the saved index with the gallery it was built from, in the "
                "same order."
                + (
                    " The index was saved by an earlier version, whose gallery_fingerprint the same photos extracted "
                    "again (another batch size, thread count or device) can miss: if these are its photos, in its "
                    "order, build the index again (build_index) and save it."
                    if earlier
                    else ""
                )
            )

    def __len__(self) -> int:
        return len(self.items)

    @property
    def embeddings(self) -> torch.Tensor:
        """`(len(items), dim)` L2-normalised unimodal embeddings, float32 on the CPU."""
        return self.index.embeddings

    @property
    def index_type(self) -> str:
        return self.index.index_type

    def search(self, queries: torch.Tensor, k: int) -> torch.Tensor:
        """Indices `(num_queries, min(k, len(self)))` of the most similar gallery items, best first, each row's items
        distinct. Slots an approximate index leaves empty are filled by exact search; an index built with
        `keep_vectors=False` holds no float32 embeddings to search exactly, so those slots hold -1 (such a query gets
        fewer candidates; a notice says so once per index)."""
        can_fill = self.index.vectors is not None
        indices = self.index.search(queries, k, fill_missing=can_fill)[1]
        if not can_fill and "unfilled" not in self._notices and bool((indices < 0).any()):
            self._notices.add("unfilled")
            logger.warning(
                "The approximate search of this index of %s (%s) found fewer than %d candidates for some queries, "
                "and it was built with keep_vectors=False (no float32 embeddings to search exactly): those queries "
                "get fewer results. Raise nprobe (or ef_search) for more candidates per query.",
                self.kind,
                self.index.factory,
                min(k, len(self)),
            )
        return indices


def _is_hf_dataset(inputs: Any) -> bool:
    return type(inputs).__module__.startswith("datasets.") and type(inputs).__name__ in ("Dataset", "IterableDataset")


def _is_region_record(item: Any) -> bool:
    """A region record (a mapping holding non-empty `region_features`), whatever other keys it has (`path`,
    `bytes`). A photo dict whose `region_features` is None or empty (a dataset's null cell, a row not extracted yet)
    is a photo."""
    if not isinstance(item, Mapping) or item.get("region_features") is None:
        return False
    features = item["region_features"]
    shape = getattr(features, "shape", None)
    if shape is not None:
        return all(int(size) > 0 for size in shape)
    try:
        return len(features) > 0
    except TypeError:
        return True  # a scalar or another value: refused as a record, with its own message


def _is_query(item: Any) -> bool:
    """A query dict (`{"images": ..., "texts": ...}` or `{"image", "text"}`, a dataset row), not a region record."""
    return isinstance(item, Mapping) and not _is_region_record(item) and any(key in item for key in QUERY_KEYS)


class ImageTextRetrievalPipeline(Pipeline):
    """Image-text retrieval with an ImageBERT cross-encoder.

    Three modes (`mode=`), inferred when the inputs make them clear:

    - `"rank_texts"`: each image ranks the texts (one image and a list of texts infers it);
    - `"rank_images"`: each text ranks the images (a list of images and one text infers it);
    - `"pairs"`: `images[i]` and `texts[i]` are scored together (one image and one text infers it).

    Images are PIL images, file paths or cached region records (dicts with `region_features` and
    `region_locations`, as the region cache stores them); the pipeline's processor turns them into model inputs.
    `images` may also be a whole `RegionBatches` gallery (`RegionCache.gallery(keys)`): its regions are read from the
    memory-mapped cache batch by batch, and each result's `"image"` is the gallery position.

    Example:

    ```python
    >>> from transformers import pipeline
    >>> retriever = pipeline("image-text-retrieval", model="path/to/imagebert-retrieval")
    >>> retriever(images="dog.jpg", texts=["a dog on the grass", "a plate of food"], top_k=1)
    [{'score': 3.2, 'probability': 0.96, 'index': 0, 'text': 'a dog on the grass'}]
    >>> gallery = retriever.build_index(images=["dog.jpg", "food.jpg", "car.jpg"])
    >>> retriever(texts="a red car", index=gallery, top_k=2)
    ```

    Call parameters:
        images: one image or a list (optional when `index` holds the images).
        texts: one text or a list (optional when `index` holds the texts).
        mode (`str`, *optional*): one of `MODES`; needed when both images and texts are lists.
        top_k (`int`, *optional*): results per query; all by default. A `top_k` larger than the gallery is
            clamped to the gallery size (every candidate is returned, ranked).
        batch_size (`int`, *optional*, defaults to 64): pairs per cross-encoder forward pass and images per
            processor call.
        shortlist_k (`int`, *optional*): re-rank only each query's `shortlist_k` nearest candidates by the
            unimodal embeddings (always at least `top_k`). Full ranking by default, or 128 with an `index`.
        index (`RetrievalIndex`, *optional*): a prebuilt gallery from `build_index`.

    Bad input raises a `ValueError` (or `TypeError`) that names the argument: empty lists, a missing side, pair
    lists of different lengths, and unreadable images. All unreadable images of a call are listed together; no
    image is ever dropped silently.
    """

    # The processor is loaded in __init__ rather than by the pipeline factory, so that a folder saved without its
    # processor still serves texts and cached regions (see `_load_processor_for`).
    _load_processor = False
    _load_tokenizer = False
    _load_image_processor = False
    _load_feature_extractor = False
    _load_video_processor = False

    default_batch_size = 64
    default_index_shortlist = 128

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.processor is None:
            self.processor = _load_processor_for(self.model)
        extractor = getattr(self.processor, "image_processor", None)
        if extractor is not None and hasattr(extractor, "set_default_device"):
            # Regions are extracted where the model runs (`device="cpu"`, or each serving process's own GPU), not on
            # the first GPU, unless the extractor names its device itself.
            extractor.set_default_device(self.device)
        missing = [name for name in ("get_text_embeddings", "get_region_embeddings") if not hasattr(self.model, name)]
        if missing:
            raise TypeError(
                f"{type(self.model).__name__} is not an image-text retrieval model (it has no {', '.join(missing)}); "
                "load ImageBERTForImageTextRetrieval."
            )
        if untrained_heads(self.model, (SCORE_HEAD,)):
            # Every score, ranking and probability would come from a randomly initialised head, other at each load.
            raise ValueError(
                f"{getattr(self.model, 'name_or_path', '') or type(self.model).__name__} holds no image-text matching "
                f"head ({SCORE_HEAD}), so its scores would be random: it is a base ImageBERTModel checkpoint (what "
                "AutoModel loads and saves). Serve a pretraining or retrieval checkpoint."
            )
        self._untrained_heads = untrained_heads(self.model)
        # What needs no extractor backend is checked now; the region sizes before regions are first extracted.
        self._extractor_checked = False
        check_model_config = getattr(self.processor, "check_model_config", None)
        if check_model_config is not None:
            check_model_config(self.model.config, build_backend=False)
        if self._untrained_heads:
            logger.warning(
                "%s has untrained heads: %s (it comes from a pretraining checkpoint, which has no unimodal projection "
                "heads). The pipeline ranks every candidate with the cross-encoder, with or without an index (no "
                "shortlist), until the model is fine-tuned for retrieval.",
                getattr(self.model, "name_or_path", "") or type(self.model).__name__,
                ", ".join(self._untrained_heads),
            )

    def _heads_trained(self) -> bool:
        return not self._untrained_heads

    def _check_index_model(self, index: RetrievalIndex) -> None:
        """Raises ValueError when `index` was built by another model: its embeddings would shortlist candidates
        another model's way (or fail on their size). An index that records no model (saved before indexes recorded
        one, or made by hand) is used with a notice, once per index, unless its embedding size gives it away."""
        if not self._heads_trained():
            return  # untrained projection heads: the index's embeddings are not used, the whole gallery is ranked
        size = getattr(self.model.config, "contrastive_embedding_size", index.index.dim)
        built_by = getattr(index.index, "model_fingerprint", None)
        earlier = False  # a record of an earlier version, compared exactly
        if built_by is not None and not built_by.startswith(EMBEDDING_FINGERPRINT_PREFIX):
            # An earlier version recorded the projection heads alone: compared as it was, with a notice.
            mine = projection_fingerprint(self.model)
            same = mine is None or built_by == mine
            if built_by == mine and "heads only" not in index._notices:
                index._notices.add("heads only")
                logger.warning(
                    "This index of %s records only the projection heads of the model that built it (it was saved "
                    "by an earlier version): a change of the encoder since would not be seen. Build it again with "
                    "this pipeline's build_index() to have the whole model checked.",
                    index.kind,
                )
        else:
            # Compared within a tolerance, not by equality: the checkpoint that built the index, loaded in another
            # dtype, keeps values a rounding step away. Checked at every query: the model's fingerprint is read once
            # (by the comparison) where the index matches.
            same = built_by is None or same_model_fingerprint(built_by, self.model)
            mine = None if same else embedding_fingerprint(self.model)
            same = same or mine is None  # a model without projection heads gives no fingerprint to compare
            earlier = not same and _split_values(built_by, "model_fingerprint")[1] is None
        if built_by is None and index.index.dim == size:
            if "no model" not in index._notices:
                index._notices.add("no model")
                logger.warning(
                    "This index of %s records no model (it was saved before indexes recorded the model that built "
                    "them, or made by hand): it is used as it is, but nothing shows that this pipeline's model made "
                    "its embeddings. Build it again with this pipeline's build_index() to have that checked.",
                    index.kind,
                )
        elif index.index.dim != size or not same:
            mine = mine if mine is not None else embedding_fingerprint(self.model)
            recorded = "records no model" if built_by is None else f"records the model {_fingerprint_id(built_by)}"
            raise ValueError(
                f"this index was built by another model: it holds {index.index.dim}-d embeddings and {recorded}, "
                f"while this pipeline's model gives {size}-d embeddings and is {_fingerprint_id(mine)}. "
                "Build the index with this pipeline (build_index), or query it with the pipeline that built it."
                + (
                    " The index was saved by an earlier version, whose record the same checkpoint loaded in float16 "
                    "does not match: if this pipeline's model built it, build the index again and save it."
                    if earlier and index.index.dim == size
                    else ""
                )
            )

    # ------------------------------------------------------------------------------------------------------------
    # Parameters and entry point
    # ------------------------------------------------------------------------------------------------------------

    def _sanitize_parameters(
        self, mode=None, top_k=None, pair_batch_size=None, shortlist_k=None, index=None, batch_size=None, **kwargs
    ):
        if kwargs:
            raise TypeError(f"unknown argument(s) {sorted(kwargs)} for the image-text-retrieval pipeline.")
        preprocess, forward, postprocess = {}, {}, {}
        if mode is not None:
            if mode not in MODES:
                raise ValueError(f"mode must be one of {MODES}, got {mode!r}.")
            preprocess["mode"] = mode
        if index is not None:
            if not isinstance(index, RetrievalIndex):
                raise TypeError(f"index must be a RetrievalIndex from build_index(), got {type(index).__name__}.")
            preprocess["index"] = index
        batch_size = pair_batch_size if pair_batch_size is not None else batch_size
        if batch_size is not None:
            preprocess["batch_size"] = forward["batch_size"] = _positive_int("batch_size", batch_size)
        if shortlist_k is not None:
            forward["shortlist_k"] = _positive_int("shortlist_k", shortlist_k)
        if top_k is not None:
            postprocess["top_k"] = forward["top_k"] = _positive_int("top_k", top_k)
        return preprocess, forward, postprocess

    def __call__(self, inputs=None, images=None, texts=None, **kwargs):
        """See the class docstring. Returns, per image query (`rank_texts`) or text query (`rank_images`), a list of
        `{"score", "probability", "index", "text" | "image"}` best first (a list of such lists for several queries);
        for `pairs`, one `{"score", "probability"}` per pair (a single dict for a single pair).

        `inputs` may also be one query dict (`{"images": ..., "texts": ...}`, or a row with `image` / `text`), or a
        list, generator or `datasets.Dataset` of them: they go through `Pipeline.__call__`, so a list returns a list
        of results and a generator or dataset streams them, one query at a time.
        """
        if _is_hf_dataset(inputs):
            inputs = (row for row in inputs)  # rows stream like a generator's items
        if inputs is not None and (_is_query(inputs) or self._is_query_stream(inputs)):
            if images is not None or texts is not None:
                raise ValueError("give the queries as inputs (dicts) or as images=/texts=, not both.")
        elif inputs is not None and images is not None:
            raise ValueError("images were given twice: positionally and as images=.")
        else:  # `retriever(images=..., texts=...)`, or `retriever("dog.jpg", texts=[...])`
            inputs = {"images": images if inputs is None else inputs, "texts": texts}
        # `batch_size` here means pairs per cross-encoder pass; the data loader of `Pipeline.__call__` takes one
        # query at a time (a query is already a batch of pairs).
        pair_batch_size = kwargs.pop("batch_size", None)
        pair_batch_size = (
            self._batch_size if pair_batch_size is None else pair_batch_size
        )  # 0 is refused, not replaced
        if pair_batch_size is not None:
            kwargs["pair_batch_size"] = pair_batch_size
        return super().__call__(inputs, batch_size=1, **kwargs)

    @staticmethod
    def _is_query_stream(inputs: Any) -> bool:
        if isinstance(inputs, list):
            return bool(inputs) and all(_is_query(item) for item in inputs)
        return isinstance(inputs, (types.GeneratorType, torch.utils.data.Dataset))

    # ------------------------------------------------------------------------------------------------------------
    # Inputs
    # ------------------------------------------------------------------------------------------------------------

    def _text_inputs(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        for position, text in enumerate(texts):
            if not isinstance(text, str):
                raise TypeError(f"texts[{position}] is a {type(text).__name__}; expected a string.")
            if not text.strip():
                raise ValueError(f"texts[{position}] is empty ({text!r}); every text needs some words to score.")
            try:
                text.encode("utf-8")
            except UnicodeEncodeError as error:
                raise ValueError(
                    f"texts[{position}] ({text!r:.60}) is not valid Unicode text: character {error.start} "
                    f"({text[error.start]!r}) is a lone surrogate, which cannot be encoded as UTF-8 (text decoded with "
                    "errors='surrogateescape', or half of an emoji). Give the text as valid UTF-8."
                ) from None
        encoded = self.processor(text=list(texts), return_tensors="pt")
        out = {key: encoded[key] for key in TEXT_KEYS if key in encoded}
        out.setdefault("attention_mask", torch.ones_like(out["input_ids"]))
        out.setdefault("token_type_ids", torch.zeros_like(out["input_ids"]))
        return out

    def _region_inputs(self, images: Sequence, batch_size: int) -> dict[str, torch.Tensor]:
        """Region records of every image (given records as they are, others through the processor's extractor and
        its one image loader), padded into one batch. Raises once, naming every image that cannot be used."""
        extractor = getattr(self.processor, "image_processor", None)
        records, errors, to_extract = [None] * len(images), [], []
        for position, item in enumerate(images):
            # A mapping with region features is a record, whatever else it holds (a cache row may name its photo's
            # path): extracting that photo instead would drop the given regions. `_is_query` draws the same line.
            if _is_region_record(item) or (isinstance(item, Mapping) and "bytes" not in item and "path" not in item):
                if "region_features" not in item or "region_locations" not in item:
                    errors.append(
                        f"images[{position}] ({_describe(item)}): a region record needs region_features and "
                        "region_locations"
                    )
                elif item.get("error"):
                    errors.append(f"images[{position}] ({_describe(item)}): its extraction failed: {item['error']}")
                else:
                    readable = True
                    for name in ("region_features", "region_locations"):
                        try:
                            values = as_float32_array(item[name])
                        except (TypeError, ValueError, RuntimeError) as error:
                            errors.append(
                                f"images[{position}] ({_describe(item)}): {name} must hold numbers ({error})"
                            )
                            readable = False
                            continue
                        if not np.isfinite(values).all():
                            errors.append(
                                f"images[{position}] ({_describe(item)}): {name} contain NaN or infinite values"
                            )
                    if readable and (np.ndim(item["region_features"]) == 0 or len(item["region_features"]) == 0):
                        errors.append(
                            f"images[{position}] ({_describe(item)}): the record has no regions (region_features of "
                            f"shape {tuple(np.shape(item['region_features']))}); every image needs at least one region"
                        )
                records[position] = item
            elif extractor is None:
                errors.append(
                    f"images[{position}] ({_describe(item)}): this pipeline was loaded without its region extractor "
                    "(the folder has no processor), so it cannot read images; save the model with its "
                    "ImageBERTProcessor, or pass cached region records (dicts with region_features and "
                    "region_locations)"
                )
            else:
                to_extract.append(position)
        bar = tqdm(
            total=len(to_extract), desc="extracting regions", disable=bool(errors) or len(to_extract) <= batch_size
        )
        if to_extract and not errors and not self._extractor_checked:
            self.processor.check_model_config(self.model.config)
            self._extractor_checked = True
        with bar:
            for start in range(0, len(to_extract) if not errors else 0, batch_size):
                chunk = to_extract[start : start + batch_size]
                extracted = extractor.extract(
                    [images[i] for i in chunk], on_error="record", max_regions=self.processor.regions_to_extract()
                )
                for position, record in zip(chunk, extracted):
                    if record.get("error"):
                        errors.append(f"images[{position}] ({_describe(images[position])}): {record['error']}")
                    records[position] = record
                bar.update(len(chunk))
        if errors:
            raise ValueError(
                f"{len(errors)} of {len(images)} image(s) could not be used, so nothing was scored:\n  "
                + "\n  ".join(errors)
            )
        location_size = getattr(
            extractor, "region_location_size", getattr(self.model.config, "region_location_size", 5)
        )
        batch = pad_region_records(records, "longest", self.processor.max_regions, location_size=location_size)
        check_region_values(batch, [f"images[{i}] ({_describe(item)})" for i, item in enumerate(images)])
        return batch

    def preprocess(self, inputs: dict, mode: str | None = None, index: RetrievalIndex | None = None, batch_size=None):
        if not _is_query(inputs) and not (isinstance(inputs, Mapping) and not inputs):
            raise TypeError(
                f"a query is a dict with images and/or texts (or image / text), got {type(inputs).__name__}."
            )
        images = inputs.get("images", inputs.get("image"))
        texts = inputs.get("texts", inputs.get("text"))
        batch_size = batch_size or self.default_batch_size
        mapped_images = is_region_batches(images)
        single_image = images is not None and not mapped_images and not _is_image_list(images)
        single_text = isinstance(texts, str)
        if mapped_images:
            image_list = range(len(images))  # positions stand for the gallery's images in the results
        else:
            image_list = None if images is None else ([images] if single_image else list(images))
        if texts is not None and not single_text and not isinstance(texts, (list, tuple)):
            raise TypeError(f"texts must be a string or a list of strings, got {type(texts).__name__}.")
        text_list = None if texts is None else ([texts] if single_text else list(texts))
        if image_list is not None and not image_list:
            raise ValueError("images is an empty list: give at least one image.")
        if text_list is not None and not text_list:
            raise ValueError("texts is an empty list: give at least one text.")

        if index is not None:
            self._check_index_model(index)
            inferred = "rank_images" if index.kind == "images" else "rank_texts"
            if mode not in (None, inferred):
                raise ValueError(f"an index of {index.kind} serves mode {inferred!r}, not {mode!r}.")
            mode = inferred
            if index.kind == "images":
                if images is not None:
                    raise ValueError("the index already holds the images: give only texts (the queries).")
                if text_list is None:
                    raise ValueError("the index holds images: give texts= to query it with.")
            else:
                if texts is not None:
                    raise ValueError("the index already holds the texts: give only images (the queries).")
                if image_list is None:
                    raise ValueError("the index holds texts: give images= to query it with.")
        else:
            if image_list is None and text_list is None:
                raise ValueError("give images and texts (or a prebuilt index and the queries); got neither.")
            if image_list is None:
                raise ValueError("texts were given without images: image-text retrieval needs both (or index=).")
            if text_list is None:
                raise ValueError("images were given without texts: image-text retrieval needs both (or index=).")
            if mode is None:
                if single_image and single_text:
                    mode = "pairs"
                elif single_image:
                    mode = "rank_texts"
                elif single_text:
                    mode = "rank_images"
                else:
                    raise ValueError(
                        f"{len(image_list)} images and {len(text_list)} texts: say what to do with mode='rank_texts' "
                        "(each image ranks the texts), 'rank_images' (each text ranks the images) or 'pairs' "
                        "(images[i] with texts[i])."
                    )
            if mode == "pairs" and len(image_list) != len(text_list):
                raise ValueError(
                    f"mode='pairs' scores images[i] with texts[i], but there are {len(image_list)} images and "
                    f"{len(text_list)} texts."
                )

        text_inputs = self._text_inputs(text_list) if text_list is not None else None
        if mapped_images:  # read batch by batch where it lies
            region_inputs = images
        else:
            region_inputs = self._region_inputs(image_list, batch_size) if image_list is not None else None
        # The gallery of an index stays where build_index put it (on the device) and is not part of the inputs that
        # `Pipeline.forward` moves to the device and back; only the query side is.
        return {
            "mode": mode,
            "index": index,
            "images": _Items(image_list if image_list is not None else index.items),
            "texts": _Items(text_list if text_list is not None else index.items),
            "single_query": single_image if mode == "rank_texts" else single_text,
            "single_pair": single_image and single_text,
            "text_inputs": text_inputs,
            "region_inputs": region_inputs,
        }

    # ------------------------------------------------------------------------------------------------------------
    # Scoring
    # ------------------------------------------------------------------------------------------------------------

    def _forward(self, model_inputs, batch_size=None, shortlist_k=None, top_k=None):
        self.model.eval()
        batch_size = batch_size or self.default_batch_size
        mode, index = model_inputs["mode"], model_inputs["index"]
        text_inputs = model_inputs["text_inputs"] if model_inputs["text_inputs"] is not None else index.inputs
        region_inputs = model_inputs["region_inputs"] if model_inputs["region_inputs"] is not None else index.inputs
        num_images = num_region_images(region_inputs)
        num_texts = text_inputs["input_ids"].shape[0]
        outputs = {key: model_inputs[key] for key in ("mode", "images", "texts", "single_query", "single_pair")}
        if mode == "pairs":
            pairs = torch.arange(num_images)
            scores = score_pairs(self.model, text_inputs, region_inputs, pairs, pairs, batch_size)
            _check_scores(scores, pairs, pairs)
            return {**outputs, "candidates": pairs[:, None], "scores": scores[:, None]}

        num_queries, gallery_size = (num_images, num_texts) if mode == "rank_texts" else (num_texts, num_images)
        if not self._heads_trained():
            shortlist_k = None  # untrained projection heads cannot shortlist: rank the whole gallery
        elif shortlist_k is None and index is not None:
            shortlist_k = self.default_index_shortlist
        if shortlist_k is not None and top_k is not None:
            shortlist_k = max(shortlist_k, top_k)
        if shortlist_k is None or shortlist_k >= gallery_size:
            candidates = torch.arange(gallery_size).expand(num_queries, gallery_size)
        else:
            if mode == "rank_texts":
                queries = encode_images(self.model, region_inputs, batch_size)
                kind, gallery_inputs = "texts", text_inputs
            else:
                queries = encode_texts(self.model, text_inputs, batch_size)
                kind, gallery_inputs = "images", region_inputs
            if index is None:  # a gallery for this query alone
                index = self._make_index(kind, range(gallery_size), gallery_inputs, batch_size)
            candidates = index.search(queries, shortlist_k)
        # An index without float32 embeddings may leave slots empty (-1): those are not scored, and postprocess
        # leaves them out.
        found = (candidates >= 0).reshape(-1)
        queries = torch.arange(num_queries)[:, None].expand_as(candidates).reshape(-1)[found]
        flat = candidates.reshape(-1)[found]
        image_index, text_index = (queries, flat) if mode == "rank_texts" else (flat, queries)
        scores = score_pairs(self.model, text_inputs, region_inputs, image_index, text_index, batch_size)
        _check_scores(scores, image_index, text_index)
        all_scores = torch.full((candidates.numel(),), float("-inf"), dtype=scores.dtype)
        all_scores[found] = scores
        return {**outputs, "candidates": candidates, "scores": all_scores.view_as(candidates)}

    def postprocess(self, model_outputs, top_k=None):
        mode, scores, candidates = model_outputs["mode"], model_outputs["scores"], model_outputs["candidates"]
        probabilities = torch.sigmoid(scores)
        if mode == "pairs":
            results = [{"score": s.item(), "probability": p.item()} for s, p in zip(scores[:, 0], probabilities[:, 0])]
            return results[0] if model_outputs["single_pair"] else results
        gallery = (model_outputs["texts"] if mode == "rank_texts" else model_outputs["images"]).items
        field = "text" if mode == "rank_texts" else "image"
        keep = candidates.shape[1] if top_k is None else min(top_k, candidates.shape[1])
        results = []
        for row_scores, row_probabilities, row_candidates in zip(scores, probabilities, candidates):
            order = torch.sort(row_scores, descending=True, stable=True).indices
            order = order[row_candidates[order] >= 0][:keep]  # slots an index left empty hold -1
            results.append(
                [
                    {
                        "score": row_scores[i].item(),
                        "probability": row_probabilities[i].item(),
                        "index": int(row_candidates[i]),
                        field: gallery[int(row_candidates[i])],
                    }
                    for i in order.tolist()
                ]
            )
        return results[0] if model_outputs["single_query"] else results

    # ------------------------------------------------------------------------------------------------------------
    # Prebuilt galleries and saving
    # ------------------------------------------------------------------------------------------------------------

    def _make_index(
        self, kind, items, inputs, batch_size, index_type="flat", progress=None, **index_kwargs
    ) -> RetrievalIndex:
        if kind == "images":
            embeddings = encode_images(self.model, inputs, batch_size, progress)
        else:
            embeddings = encode_texts(self.model, inputs, batch_size, progress)
        items = items if isinstance(items, range) else list(items)
        index = EmbeddingIndex(
            embeddings,
            index_type,
            model_fingerprint=embedding_fingerprint(self.model),
            gallery_fingerprint=gallery_fingerprint(kind, inputs),
            **index_kwargs,
        )
        return RetrievalIndex(kind, items, inputs, index)

    def build_index(
        self,
        images=None,
        texts=None,
        index_type: str = "flat",
        batch_size: int | None = None,
        **index_kwargs,
    ) -> RetrievalIndex:
        """Prepares a gallery once (regions or tokens on the pipeline's device, embeddings, search index) for many
        queries.

        Args:
            images: the gallery images (PIL, paths or region records), queried later with `texts=`; or a
                `RegionBatches` gallery (`RegionCache.gallery(keys, max_regions)`), which stays memory-mapped: only
                its embeddings are computed now, and the candidates' regions are read when they are re-ranked.
            texts: the gallery texts, queried later with `images=`. Give exactly one of the two.
            index_type: `"flat"` (exact), `"ivf"`, `"hnsw"`, `"ivfpq"` (approximate; faiss needed) or a faiss
                `index_factory` string (see `EmbeddingIndex`).
            batch_size: images per processor call and inputs per embedding pass.
            **index_kwargs: `EmbeddingIndex` settings: `nlist`, `nprobe` (IVF), `hnsw_m`, `ef_search` (HNSW), `pq_m`
                (IVF-PQ), `use_faiss`, `use_gpu` (faiss on the GPU, by default when faiss sees one), `keep_vectors`
                (`False` for an IVF-PQ gallery too large to hold twice: then a query for which the approximate
                search finds fewer than `shortlist_k` candidates gets fewer results, with a notice once per index).

        The index records the model that built it (`embedding_fingerprint`); a pipeline of another model refuses it.
        """
        index_factory_string(index_type, 1, 4)  # names a bad index_type before any work
        if (images is None) == (texts is None):
            raise ValueError("build_index takes either images= or texts= (the gallery), not both or neither.")
        if texts is not None and not isinstance(texts, (str, list, tuple)):
            raise TypeError(f"texts must be a string or a list of strings, got {type(texts).__name__}.")
        # Checked as __call__ checks it: 0 is refused, not replaced by the default.
        if batch_size is None:
            batch_size = self._batch_size or self.default_batch_size
        batch_size = _positive_int("batch_size", batch_size)
        self.model.eval()
        if is_region_batches(images):
            items, inputs, kind = range(len(images)), prepare_region_inputs(images), "images"
        elif images is not None:
            items = list(images) if _is_image_list(images) else [images]
            if not items:
                raise ValueError("images is an empty list: an index needs at least one image.")
            inputs = self._region_inputs(items, batch_size)
            kind = "images"
        else:
            items = [texts] if isinstance(texts, str) else list(texts)
            if not items:
                raise ValueError("texts is an empty list: an index needs at least one text.")
            inputs = self._text_inputs(items)
            kind = "texts"
        if not is_region_batches(inputs):  # once, for every later query (a mapped gallery is read where it lies)
            inputs = {key: value.to(self.device) for key, value in inputs.items()}
        # A bar where the gallery takes more than one pass: a mapped gallery of millions takes hours on a CPU.
        with tqdm(total=len(items), desc=f"embedding the gallery's {kind}", disable=len(items) <= batch_size) as bar:
            return self._make_index(kind, items, inputs, batch_size, index_type, bar.update, **index_kwargs)

    def save_pretrained(self, save_directory: str | os.PathLike, **kwargs):
        """Saves model, processor (tokenizer, region extractor and its weights) and the code of all of them
        (pipeline, modeling, processing, region extraction), so that `pipeline(model=save_directory,
        trust_remote_code=True)` works, raw images included, where `imagebert_hf` is not installed.

        Projection heads the model's load recorded as missing (`untrained_heads`: a pretraining checkpoint's, or
        those a fine-tuning run with `--contrastive_weight 0` left untrained) are left out, as that checkpoint left
        them out, so every load of the saved folder reports them untrained rather than shortlisting with random
        ones."""
        registered = getattr(self, "_registered_impl", None)
        recorded_missing = getattr(self.model, "_missing_keys_at_load", None) is not None
        left_out = tuple(head + "." for head in (untrained_heads(self.model) if recorded_missing else []))
        # transformers writes the folder's `custom_pipelines` entry, and the pipeline's code, from the registration
        # the pipeline carries; one built from a folder's own code (the package not installed) carries none.
        tasks = registered or {"image-text-retrieval": {"impl": type(self), "type": "multimodal"}}
        try:
            with saving_code(self.model, self.processor), _keys_left_out_on_save(self.model, left_out):
                # The entry names the model's Auto class; transformers reads it as the name of one of its own classes.
                pt = (getattr(transformers, RETRIEVAL_AUTO_CLASS),)
                self._registered_impl = {task: {**info, "pt": pt} for task, info in tasks.items()}
                super().save_pretrained(save_directory, **kwargs)
                self.processor.save_pretrained(save_directory)
        finally:
            if registered is not None:
                self._registered_impl = registered
            else:
                del self._registered_impl


@contextlib.contextmanager
def _keys_left_out_on_save(model, prefixes: tuple[str, ...]):
    """While it lasts, `model.save_pretrained` leaves out the weights under `prefixes`, through transformers' own
    `_keys_to_ignore_on_save`, set on this model alone."""
    if not prefixes:
        yield
        return
    had_own = "_keys_to_ignore_on_save" in vars(model)
    previous = model._keys_to_ignore_on_save
    model._keys_to_ignore_on_save = [
        *(previous or []),
        *(key for key in model.state_dict() if key.startswith(prefixes)),
    ]
    try:
        yield
    finally:
        if had_own:
            model._keys_to_ignore_on_save = previous
        else:
            del model._keys_to_ignore_on_save


# transformers has no Auto class for image-text retrieval; it files its own retrieval cross-encoder (BLIP-2's
# `Blip2ForImageTextRetrieval`) under `AutoModelForZeroShotImageClassification`, and so does a saved folder. It must
# be one of transformers' classes: a folder's `custom_pipelines` entry names the model's Auto class, which
# transformers looks up among its own. `AutoModel` stays the base model: where the package is imported, the classes
# it registers win over a folder's code, so a folder whose `AutoModel` named the retrieval class would get the base
# model there, and a folder saved with code names each Auto class as the package registers it.
RETRIEVAL_AUTO_CLASS = "AutoModelForZeroShotImageClassification"
# The transformers Auto class of each model class: `imagebert_hf.register()` registers them, and a folder saved with
# its code names them all in its `auto_map`.
MODEL_AUTO_CLASSES = {
    "ImageBERTModel": "AutoModel",
    "ImageBERTForPreTraining": "AutoModelForPreTraining",
    "ImageBERTForImageTextRetrieval": RETRIEVAL_AUTO_CLASS,
}
_SAVED_CONFIG_FIELDS = ("auto_map", "custom_pipelines")


@contextlib.contextmanager
def saving_code(model, processor=None):
    """While it lasts, `model.save_pretrained` and `processor.save_pretrained` also write their classes' code and
    `auto_map` entries, so the folder loads with `trust_remote_code=True` where `imagebert_hf` is not installed, and
    each Auto class gives the class it gives where the package is imported (with no `trust_remote_code` needed
    there): `AutoConfig`, the model classes of `MODEL_AUTO_CLASSES` (`AutoModel` is the base model), `AutoProcessor`
    and `AutoImageProcessor` (the region extractor) when `processor` is an `ImageBERTProcessor`.

    The saved config holds only these `auto_map` entries and no `custom_pipelines` (a save of the pipeline adds its
    own): a model loaded from another saved folder does not carry that folder's entries into this one.
    `register_for_auto_class` is class-wide and a save writes into the model's config; both are restored on exit, so
    other saves of these classes, and of this model, are as they were.
    """
    model_auto_class = MODEL_AUTO_CLASSES.get(type(model).__name__)
    config = getattr(model, "config", None) if model_auto_class is not None else None  # another model: as it is
    auto_classes, auto_map = [], {}
    if config is not None:
        auto_classes += [(type(config), "AutoConfig"), (type(model), model_auto_class)]
        module = sys.modules[type(model).__module__]  # saved with the model; it holds every model class
        auto_map = {
            auto_class: f"{module.__name__.rsplit('.', 1)[-1]}.{name}"
            for name, auto_class in MODEL_AUTO_CLASSES.items()
            if hasattr(module, name)
        }
    if processor is not None:
        auto_classes.append((type(processor), "AutoProcessor"))
        image_processor = getattr(processor, "image_processor", None)
        if image_processor is not None:
            auto_classes.append((type(image_processor), "AutoImageProcessor"))
    auto_classes = [
        (cls, name)
        for cls, name in auto_classes
        if not cls.__module__.startswith("transformers.") and hasattr(cls, "register_for_auto_class")
    ]
    previous_classes = [(cls, cls.__dict__.get("_auto_class")) for cls, _ in auto_classes]
    fields = vars(config) if config is not None else {}
    previous_fields = {name: fields[name] for name in _SAVED_CONFIG_FIELDS if name in fields}
    try:
        if config is not None:
            for name in previous_fields:
                delattr(config, name)
            config.auto_map = auto_map
        for cls, name in auto_classes:
            cls.register_for_auto_class(name)
        yield
    finally:
        for cls, value in previous_classes:
            cls._auto_class = value
        for name in _SAVED_CONFIG_FIELDS:
            if name in fields:
                delattr(config, name)
        for name, value in previous_fields.items():
            setattr(config, name, value)


class RegionsOnlyProcessor:
    """Stands in for the model's processor in a folder saved without it (a model and tokenizer only): tokenizes
    texts; the pipeline then takes images only as cached region records."""

    def __init__(self, tokenizer, max_text_length: int, max_regions: int):
        check_tokenizer_vocabulary(tokenizer)
        self.tokenizer = tokenizer
        self.max_text_length = max_text_length
        self.max_regions = max_regions
        self.image_processor = None

    def check_model_config(self, config, build_backend: bool = False) -> None:
        """Raises ValueError when the tokenizer has more tokens than `config`'s vocabulary; the lengths are the
        config's own and there are no regions to check."""
        check_tokenizer_vocabulary(self.tokenizer, config)

    def __call__(self, text=None, return_tensors="pt"):
        texts = [text] if isinstance(text, str) else list(text)
        encoded = tokenize_texts(
            self.tokenizer, texts, padding="max_length", truncation=True, max_length=self.max_text_length
        )
        convert = torch.as_tensor if return_tensors == "pt" else np.asarray
        return {key: convert(encoded[key]) for key in TEXT_KEYS if key in encoded}

    def save_pretrained(self, save_directory, **kwargs):
        return self.tokenizer.save_pretrained(save_directory, **kwargs)


def _saved_processor_class(path: str) -> str | None:
    """The `processor_class` of the local folder's `processor_config.json`; None without that file or field. A file
    that is there but damaged raises, naming it: serving the folder without the processor it holds would hide
    what is wrong with it."""
    saved = read_saved_processor_config(path)
    return None if saved is None else saved.get("processor_class")


def _load_processor_for(model):
    """The processor saved with the model, or a `RegionsOnlyProcessor` where the folder has none that loads."""
    from transformers import AutoProcessor, AutoTokenizer

    path = getattr(model, "name_or_path", None) or getattr(model.config, "_name_or_path", None)
    if not path:
        raise ValueError(
            "ImageTextRetrievalPipeline needs the model's processor (tokenizer + region extractor): pass "
            "processor=... or load the model from a folder that holds processor_config.json."
        )
    # Run the folder's code only when the model already comes from it (the user passed trust_remote_code=True).
    trust = type(model).__module__.startswith("transformers_modules")
    saved_class = _saved_processor_class(path)
    if saved_class not in (None, "ImageBERTProcessor"):
        raise ValueError(
            f"{os.path.join(path, 'processor_config.json')} names processor_class {saved_class!r}; an ImageBERT "
            "model takes an 'ImageBERTProcessor' (save it with the model, or pass processor=...)."
        )
    if saved_class is None:
        # `ImageBERTProcessor.from_pretrained` checks the tokenizer files itself; a folder without one is read here.
        check_tokenizer_files(path)
    try:
        processor = AutoProcessor.from_pretrained(path, trust_remote_code=trust)
        reason = "AutoProcessor gave a tokenizer only"
        if getattr(processor, "image_processor", None) is not None:
            return processor
    except Exception as error:  # unregistered processor class, missing code or files: fall back to text + regions
        if saved_class is not None:
            raise  # serving the folder without the processor it holds would hide what is wrong with it
        reason = f"{type(error).__name__}: {error}"
    logger.warning(
        "Could not load the region processor of %s (%s); images must be given as cached region records.", path, reason
    )
    return RegionsOnlyProcessor(
        AutoTokenizer.from_pretrained(path, trust_remote_code=trust),
        model.config.max_text_length,
        model.config.max_regions,
    )


PROJECTION_HEADS = ("cls.text_projection", "cls.region_projection")
SCORE_HEAD = "cls.seq_relationship"
PRETRAINING_ONLY = ("cls.predictions.", "cls.object_predictions.", "cls.feature_regression")


_HUB_FILE_KWARGS = ("cache_dir", "local_files_only", "revision", "subfolder", "token")


def _checkpoint_keys(path: str | os.PathLike, **hub_kwargs) -> set[str] | None:
    """The parameter names stored in a checkpoint (safetensors, one file or sharded): a local folder, or a Hub id
    whose weights are fetched into the cache as `from_pretrained` fetches them (`hub_kwargs`: its `cache_dir`,
    `revision`, `token`, ...). None where the checkpoint has no safetensors weights; a file that cannot be fetched
    or read raises."""
    names = ("model.safetensors.index.json", "model.safetensors")
    if os.path.isdir(path):
        folder = os.path.join(path, hub_kwargs.get("subfolder") or "")
        files = [os.path.join(folder, name) for name in names]
        files = [file if os.path.isfile(file) else None for file in files]
    else:
        from transformers.utils import cached_file

        kwargs = {key: hub_kwargs[key] for key in _HUB_FILE_KWARGS if hub_kwargs.get(key) is not None}
        files = [cached_file(path, names[0], _raise_exceptions_for_missing_entries=False, **kwargs), None]
        if files[0] is None:
            files[1] = cached_file(path, names[1], _raise_exceptions_for_missing_entries=False, **kwargs)
    sharded, single = files
    if sharded is not None:
        with open(sharded) as handle:
            return set(json.load(handle)["weight_map"])
    if single is not None:
        from safetensors import safe_open

        with safe_open(single, framework="pt") as handle:
            return set(handle.keys())
    return None


def untrained_heads(model, heads: Sequence[str] = PROJECTION_HEADS) -> list[str]:
    """The `heads` (the unimodal projection heads by default) that `model`'s checkpoint did not hold (so they are
    freshly initialised); empty for a fine-tuned checkpoint or a model not loaded from a local folder."""
    missing = getattr(model, "_missing_keys_at_load", None)
    if missing is None:
        path = getattr(model, "name_or_path", None) or getattr(model.config, "_name_or_path", None)
        keys = _checkpoint_keys(path) if path and os.path.isdir(path) else None
        if keys is None:
            return []
        return [head for head in heads if not any(key.startswith(head + ".") for key in keys)]
    return [head for head in heads if any(key.startswith(head + ".") for key in missing)]


def _prefix_pattern(prefixes: Sequence[str]) -> str:
    return "^(" + "|".join(re.escape(prefix) for prefix in prefixes) + ")"


@contextlib.contextmanager
def _expected_differences_ignored(model_class):
    """While it lasts, loading `model_class` leaves out of transformers' load report, and of its loading info, the
    differences a pretraining checkpoint is expected to have: its pretraining heads (unused) and the projection heads
    (new). `_keys_to_ignore_on_load_*` is transformers' way to declare such keys; it is class-wide (read when a
    model is built), so it is set for this load only and restored."""
    names = ("_keys_to_ignore_on_load_missing", "_keys_to_ignore_on_load_unexpected")
    previous = {name: model_class.__dict__[name] for name in names if name in model_class.__dict__}
    added = {
        names[0]: _prefix_pattern([head + "." for head in PROJECTION_HEADS]),
        names[1]: _prefix_pattern(PRETRAINING_ONLY),
    }
    try:
        for name, pattern in added.items():
            setattr(model_class, name, [*(getattr(model_class, name, None) or ()), pattern])
        yield
    finally:
        for name in names:
            if name in previous:
                setattr(model_class, name, previous[name])
            elif name in model_class.__dict__:
                delattr(model_class, name)


class _RetrievalModelLoader:
    """What `pipeline("image-text-retrieval", model=path)` loads the model with: the registered retrieval class
    through `AutoModelForImageTextRetrieval`. Where the checkpoint's parameter names can be read (safetensors), the
    expected differences of a pretraining checkpoint (pretraining heads unused, projection heads new) are left out of
    transformers' load report: the pipeline's own notice names the untrained heads. Any other difference is reported
    as transformers reports it."""

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        from .modeling_auto import AutoModelForImageTextRetrieval
        from .modeling_imagebert import ImageBERTForImageTextRetrieval

        try:
            keys = _checkpoint_keys(pretrained_model_name_or_path, **kwargs)
        except Exception:  # noqa: BLE001 - a damaged or unreachable checkpoint: the load below says what is wrong
            keys = None
        ignoring = _expected_differences_ignored if keys is not None else lambda _: contextlib.nullcontext()
        with ignoring(ImageBERTForImageTextRetrieval):
            model, info = AutoModelForImageTextRetrieval.from_pretrained(
                pretrained_model_name_or_path, output_loading_info=True, **kwargs
            )
        missing = list(info.get("missing_keys", []))
        if keys is not None:  # the projection heads' keys were left out of the loading info: these are the new ones
            missing += [key for key in model.state_dict() if key.startswith(PROJECTION_HEADS) and key not in keys]
        model._missing_keys_at_load = missing
        return model


def load_retrieval_model(pretrained_model_name_or_path: str | os.PathLike, **kwargs):
    """The model `pipeline("image-text-retrieval", model=path)` loads, with the installed package's classes:
    `pipeline("image-text-retrieval", model=load_retrieval_model(path))` serves any ImageBERT folder, a published one
    included, as `pipeline("image-text-retrieval", model=path)` does where the package is imported. `kwargs` go to
    `from_pretrained` (`revision`, `dtype`, ...)."""
    return _RetrievalModelLoader.from_pretrained(os.fspath(pretrained_model_name_or_path), **kwargs)


def register_pipeline() -> None:
    """Registers `"image-text-retrieval"` with transformers' pipeline registry. Safe to call twice."""
    from transformers.pipelines import PIPELINE_REGISTRY

    try:
        from imagebert_hf.models.imagebert.modeling_auto import AutoModelForImageTextRetrieval  # noqa: F401

        model_class = _RetrievalModelLoader
    except ImportError:  # loaded as remote code: transformers' own Auto class reads the folder's auto_map
        model_class = getattr(transformers, RETRIEVAL_AUTO_CLASS)
    PIPELINE_REGISTRY.register_pipeline(
        "image-text-retrieval",
        pipeline_class=ImageTextRetrievalPipeline,
        pt_model=model_class,
        type="multimodal",
    )


__all__ = [
    "MODEL_AUTO_CLASSES",
    "MODES",
    "RETRIEVAL_AUTO_CLASS",
    "ImageTextRetrievalPipeline",
    "RetrievalIndex",
    "load_retrieval_model",
    "embedding_fingerprint",
    "gallery_fingerprint",
    "projection_fingerprint",
    "register_pipeline",
    "same_gallery_fingerprint",
    "same_model_fingerprint",
    "saving_code",
]
