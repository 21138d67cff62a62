"""Zero-shot retrieval of a pretrained checkpoint: score every (image, caption) pair of a manifest split with the
ITM head, and compare recall@K with chance. Used at the end of the demo and of the real-data pretraining example."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers.utils import logging

from ..data.retrieval_corpus import (
    RetrievalCorpus,
    check_max_images,
    load_manifest_records,
    region_cache_lookup,
)
from ..data.synthetic import (
    chance_recall,
    make_synthetic_examples,
    make_synthetic_tokenizer,
    synthetic_region_record,
)
from ..formats.files import check_folder_or_hub_id
from ..models.imagebert.modeling_imagebert import ImageBERTForImageTextRetrieval
from ..models.imagebert.processing_imagebert import tokenize_as_text
from ..models.imagebert.region_batching import pad_region_records
from ..models.imagebert.retrieval_index import score_all_pairs
from ..regions.cache_reader import load_region_cache
from .recall import retrieval_metrics, shared_caption_count


logger = logging.get_logger(__name__)


def manifest_retrieval_inputs(
    manifest: str | Path,
    region_cache,
    tokenizer,
    split: str | None = None,
    max_text_length: int = 44,
    max_regions: int | None = None,
    max_images: int | None = None,
    memory_mapped: bool = False,
    captions_per_image: int | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor] | Any, list[int]]:
    """Tokenized captions, padded regions and the caption -> image map of one split of a jsonl manifest.

    Args:
        manifest: The `captions.jsonl` file.
        region_cache: A region cache folder, or any mapping from the manifest's image path to a region record.
        tokenizer: The model's tokenizer.
        split: Keep only images whose `"split"` is this.
        max_text_length: Tokens per caption, special tokens included.
        max_regions: Regions kept per image.
        max_images: Keep the first this many images.
        captions_per_image: Keep the first this many captions of each image (None: all).
        memory_mapped: Leave the regions in the cache: `region_inputs` is then a `RegionGallery` (padded batches
            read from the memory-mapped shards) instead of one stacked tensor; the scores are the same. Needs a
            region cache (folder or `RegionCache`).

    Returns:
        `(text_inputs, region_inputs, text_to_image)`, the inputs of `models.imagebert.retrieval_index.score_all_pairs` and of
        `evaluation.retrieval_metrics`.
    """
    check_max_images(max_images)
    if isinstance(region_cache, (str, Path)):
        region_cache = load_region_cache(region_cache)
    records = load_manifest_records(manifest, split, max_images)
    # The corpus `evaluate_retrieval` ranks, built the same way: each record found in the cache by its manifest
    # path, image path or id under any spelling (`region_cache_key`); an image listed on two lines, or one picture
    # under two names (one cache row), is one gallery item with the captions of both (a warning names it).
    if memory_mapped:
        if not hasattr(region_cache, "gallery"):
            raise TypeError(
                f"memory_mapped=True reads regions from a region cache (folder or RegionCache), got "
                f"{type(region_cache).__name__}."
            )
        corpus = RetrievalCorpus.from_region_cache(
            records, region_cache, tokenizer, max_text_length, max_regions, captions_per_image
        )
    else:
        corpus = RetrievalCorpus.from_records(
            records, tokenizer, region_cache_lookup(region_cache), max_text_length, max_regions, captions_per_image
        )
    text_to_image = corpus.text_to_image.tolist()
    # Counted by the tokens the model reads: an uncased tokenizer gives `A Dog` and `a  dog` the same query.
    shared = shared_caption_count(corpus.text_keys(), text_to_image)
    if shared:
        logger.warning(
            "%d of the %d captions are also, as the tokens the model reads, a caption of another image: ties count "
            "against the query, so even a perfect scorer cannot reach 100 on this split.",
            shared,
            corpus.num_texts,
        )
    return corpus.text_inputs, corpus.region_inputs, text_to_image


def synthetic_retrieval_inputs(
    first_image: int, num_images: int, seed: int, region_feature_size: int
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], list[int]]:
    """Tokenized captions, padded annotation regions and the caption -> image map of the generated shapes images
    `first_image` to `first_image + num_images` of the generator seeded `seed`: images a synthetic source of
    `first_image` images with that seed never showed in training (the learning-quality guard's held-out set)."""
    if first_image < 0 or num_images < 1:
        raise ValueError(f"first_image must be >= 0 and num_images >= 1, got {first_image} and {num_images}.")
    examples = make_synthetic_examples(first_image + num_images, seed=seed)[first_image:]
    texts = [caption for example in examples for caption in example["captions"]]
    text_to_image = [i for i, example in enumerate(examples) for _ in example["captions"]]
    tokenizer = make_synthetic_tokenizer()
    text_inputs = dict(tokenize_as_text(tokenizer, texts, padding=True, padding_side="right", return_tensors="pt"))
    region_inputs = pad_region_records([synthetic_region_record(example, region_feature_size) for example in examples])
    return text_inputs, region_inputs, text_to_image


def chance_metrics(text_to_image: list[int], ks: tuple[int, ...] = (1, 5, 10)) -> dict[str, float]:
    """Expected recall@K (in %) of a random ranking, with the same keys as `retrieval_metrics`."""
    num_images, num_texts = max(text_to_image) + 1, len(text_to_image)
    captions = np.bincount(text_to_image, minlength=num_images)
    metrics = {}
    for k in ks:
        metrics[f"tr_r{k}"] = 100 * float(np.mean([chance_recall(num_texts, k, int(c)) for c in captions]))
        metrics[f"ir_r{k}"] = 100 * chance_recall(num_images, k)
    metrics["rsum"] = sum(metrics.values())
    return metrics


def zero_shot_scores(
    model: Any, text_inputs, region_inputs, text_to_image, batch_size: int = 512, progress: bool = True
) -> torch.Tensor:
    """The (images, texts) ITM score matrix of a model (a folder or an `ImageBERTForImageTextRetrieval`) over every
    pair, with a progress bar over the pairs (`progress=False`: none); minutes here, hours at COCO 5k.
    `region_inputs` is stacked or a `RegionGallery` (see `manifest_retrieval_inputs`)."""
    from tqdm.auto import tqdm

    if isinstance(model, (str, Path)):
        check_folder_or_hub_id(model, "model", "a checkpoint folder")
        model = ImageBERTForImageTextRetrieval.from_pretrained(str(model))
    num_images, num_texts = max(text_to_image) + 1, len(text_to_image)
    bar = tqdm(total=num_images * num_texts, desc="scoring pairs", unit="pair", disable=not progress)
    with bar, torch.inference_mode():
        return score_all_pairs(model, text_inputs, region_inputs, batch_size=batch_size, progress=bar.update)


def zero_shot_retrieval(
    model: Any, text_inputs, region_inputs, text_to_image, batch_size: int = 512, progress: bool = True
) -> dict[str, float]:
    """Recall@K of a model's ITM head over every pair (`zero_shot_scores`, whose arguments it takes)."""
    scores = zero_shot_scores(model, text_inputs, region_inputs, text_to_image, batch_size, progress)
    return retrieval_metrics(scores, text_to_image)


__all__ = [
    "chance_metrics",
    "manifest_retrieval_inputs",
    "synthetic_retrieval_inputs",
    "zero_shot_retrieval",
    "zero_shot_scores",
]
