"""Batched cross-encoder scoring of (image, text) pairs from cached regions and cached tokenization.

A cross-encoder must see every pair it ranks, so these functions never re-tokenize or re-extract: texts are
tokenized once (`text_inputs`), regions come from the cache once (`region_inputs`), and each batch of pairs only
gathers rows from them. Each batch is trimmed to its longest text and its most regions, which leaves the scores
unchanged (padding never changes an output) and saves most of the cost when the gallery is padded to the maximum.
"""

from collections.abc import Callable, Mapping

import torch


TEXT_KEYS = ("input_ids", "attention_mask", "token_type_ids")
REGION_KEYS = ("region_features", "region_locations", "region_attention_mask")


def _tensor(value) -> torch.Tensor:
    return value if isinstance(value, torch.Tensor) else torch.as_tensor(value)


def prepare_text_inputs(text_inputs: Mapping) -> dict[str, torch.Tensor]:
    """Checks and completes tokenized texts: `input_ids` (N, T), plus `attention_mask` and `token_type_ids`."""
    if "input_ids" not in text_inputs:
        raise ValueError(f"text_inputs needs input_ids (tokenized texts); got keys {sorted(text_inputs)}.")
    input_ids = _tensor(text_inputs["input_ids"]).long()
    if input_ids.ndim != 2 or input_ids.shape[0] == 0:
        raise ValueError(f"text_inputs['input_ids'] has shape {tuple(input_ids.shape)}; expected (num_texts>0, T).")
    attention_mask = text_inputs.get("attention_mask")
    attention_mask = torch.ones_like(input_ids) if attention_mask is None else _tensor(attention_mask).long()
    token_type_ids = text_inputs.get("token_type_ids")
    token_type_ids = torch.zeros_like(input_ids) if token_type_ids is None else _tensor(token_type_ids).long()
    return {"input_ids": input_ids, "attention_mask": attention_mask, "token_type_ids": token_type_ids}


def prepare_region_inputs(region_inputs: Mapping) -> dict[str, torch.Tensor]:
    """Checks and completes cached regions: `region_features` (N, R, F), `region_locations` (N, R, 5) and
    `region_attention_mask` (N, R)."""
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
    mask = torch.ones(features.shape[:2], dtype=torch.long) if mask is None else _tensor(mask).long()
    return {"region_features": features, "region_locations": locations, "region_attention_mask": mask}


def gather_pair_inputs(
    texts: dict[str, torch.Tensor],
    regions: dict[str, torch.Tensor],
    text_index: torch.Tensor,
    image_index: torch.Tensor,
    device: torch.device,
) -> dict[str, torch.Tensor]:
    """Model inputs of the pairs `(image_index[j], text_index[j])`, trimmed to the batch's longest text and most
    regions."""
    text_mask = texts["attention_mask"][text_index]
    region_mask = regions["region_attention_mask"][image_index]
    # Keep at least one column so that a batch of regions-free images still has a valid shape.
    text_length = max(int(text_mask.sum(1).max()), 1)
    num_regions = max(int(region_mask.sum(1).max()), 1)
    batch = {key: texts[key][text_index, :text_length] for key in TEXT_KEYS}
    batch.update({key: regions[key][image_index, :num_regions] for key in REGION_KEYS})
    return {key: value.to(device, non_blocking=True) for key, value in batch.items()}


def _model_device(model: torch.nn.Module) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


@torch.no_grad()
def score_pairs(
    model,
    text_inputs: Mapping,
    region_inputs: Mapping,
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
        region_inputs (`Mapping`): cached regions, `region_features` (num_images, R, F), `region_locations`
            (num_images, R, 5) and optionally `region_attention_mask` (num_images, R).
        image_indices, text_indices (`array-like` of shape `(num_pairs,)`): the pairs to score.
        batch_size (`int`, *optional*, defaults to 256): pairs per forward pass.
        progress (`Callable`, *optional*): called with the number of pairs done after each batch (e.g. a
            `tqdm.update`).

    Returns:
        `torch.Tensor` of shape `(num_pairs,)`, float32 on the CPU: the model's `logits` for each pair.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}.")
    texts = prepare_text_inputs(text_inputs)
    regions = prepare_region_inputs(region_inputs)
    image_indices = _tensor(image_indices).long().reshape(-1)
    text_indices = _tensor(text_indices).long().reshape(-1)
    if image_indices.shape != text_indices.shape:
        raise ValueError(
            f"image_indices has {image_indices.numel()} entries and text_indices {text_indices.numel()}; each pair "
            "needs one of each."
        )
    device = _model_device(model)
    was_training = model.training
    model.eval()
    scores = torch.empty(image_indices.numel(), dtype=torch.float32)
    try:
        for start in range(0, image_indices.numel(), batch_size):
            end = start + batch_size
            batch = gather_pair_inputs(texts, regions, text_indices[start:end], image_indices[start:end], device)
            scores[start:end] = model(**batch).logits.float().cpu()
            if progress is not None:
                progress(int(min(end, image_indices.numel()) - start))
    finally:
        model.train(was_training)
    return scores


def score_all_pairs(
    model, text_inputs: Mapping, region_inputs: Mapping, batch_size: int = 256, progress: Callable | None = None
) -> torch.Tensor:
    """Full ranking: the cross-encoder score of every (image, text) pair.

    Args:
        model (`ImageBERTForImageTextRetrieval`): the cross-encoder.
        text_inputs (`Mapping`): tokenized texts (see `score_pairs`).
        region_inputs (`Mapping`): cached regions (see `score_pairs`).
        batch_size (`int`, *optional*, defaults to 256): pairs per forward pass.
        progress (`Callable`, *optional*): called with the number of pairs done after each batch.

    Returns:
        `torch.Tensor` of shape `(num_images, num_texts)`, float32: the input of `retrieval_metrics`.
    """
    num_texts = prepare_text_inputs(text_inputs)["input_ids"].shape[0]
    num_images = prepare_region_inputs(region_inputs)["region_features"].shape[0]
    # Image-major order, the order `shortlist_rerank` also uses, so that both batch the same pairs identically.
    image_indices = torch.arange(num_images).repeat_interleave(num_texts)
    text_indices = torch.arange(num_texts).repeat(num_images)
    scores = score_pairs(model, text_inputs, region_inputs, image_indices, text_indices, batch_size, progress)
    return scores.view(num_images, num_texts)


__all__ = ["gather_pair_inputs", "prepare_region_inputs", "prepare_text_inputs", "score_all_pairs", "score_pairs"]
