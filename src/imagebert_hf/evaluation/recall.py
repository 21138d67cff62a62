"""Recall@K for image-text retrieval from a score matrix.

Conventions (those of the ImageBERT, UNITER and BLIP papers):

- TR (text retrieval): each image is a query over all texts; it is a hit at K when any of its captions is among
  the K best-scored texts.
- IR (image retrieval): each text is a query over all images; it is a hit at K when its image is among the K
  best-scored images.
- Ties are broken against the query: a candidate that scores as high as the best correct one, or within
  `TIE_RTOL` / `TIE_ATOL` below it, counts as ranked above it. A constant scorer therefore gets chance level or
  less, never a perfect score, and the result depends neither on the order of the gallery nor on the batch size
  the scores were computed with (the same input scores a few float32 units apart in batches padded differently).
- Several folds (COCO 1k): the images are cut into consecutive, equal folds; each fold is ranked against its own
  images and their captions only, and every recall is averaged over the folds.
"""

from collections.abc import Hashable, Sequence

import numpy as np
import torch


DEFAULT_KS = (1, 5, 10)
# Scores this close are a tie: the same input in two rows of a batch, or in batches padded differently, can score a
# few float32 units apart (1e-7 of the score); a real difference of a tiny random model is already 1e-4 of it.
TIE_RTOL, TIE_ATOL = 1e-6, 1e-9


def _as_score_tensor(scores) -> torch.Tensor:
    scores = torch.as_tensor(np.asarray(scores) if not isinstance(scores, torch.Tensor) else scores)
    scores = scores.detach().to("cpu")
    if scores.ndim != 2:
        raise ValueError(f"scores must be a (num_images, num_texts) matrix, got shape {tuple(scores.shape)}.")
    if scores.shape[0] == 0 or scores.shape[1] == 0:
        raise ValueError(f"scores is empty (shape {tuple(scores.shape)}): there is nothing to rank.")
    if not scores.is_floating_point():
        scores = scores.double()
    if not torch.isfinite(scores).all():
        bad = torch.nonzero(~torch.isfinite(scores))[0].tolist()
        raise ValueError(f"scores must be finite; scores[{bad[0]}, {bad[1]}] is {scores[bad[0], bad[1]].item()}.")
    return scores


def check_ks(ks) -> tuple[int, ...]:
    """The cut-offs K as a tuple; raises a ValueError for anything but a non-empty list of positive integers."""
    # A numpy array is no `Sequence`, and the truth of one with several values is an error: its length tells.
    if (
        isinstance(ks, (str, bytes))
        or not isinstance(ks, (Sequence, np.ndarray))
        or (isinstance(ks, np.ndarray) and ks.ndim != 1)
        or len(ks) == 0
        or any(isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1 for k in ks)
    ):
        raise ValueError(f"ks must be a non-empty list of positive integers (the cut-offs K), got {ks!r}.")
    return tuple(int(k) for k in ks)


def _as_text_to_image(text_to_image, num_images: int, num_texts: int) -> torch.Tensor:
    array = np.asarray(text_to_image).reshape(-1)
    # Cast as it is, 1.9 would be image 1: an index is a whole number.
    whole = array.dtype.kind in "iu" or (
        array.dtype.kind == "f" and bool(np.isfinite(array).all()) and bool((array == np.round(array)).all())
    )
    if array.size and not whole:
        wrong = array[:1] if array.dtype.kind != "f" else array[~(np.isfinite(array) & (array == np.round(array)))][:1]
        raise ValueError(
            f"text_to_image must hold whole image indices; got {array.dtype} values such as {wrong.tolist()}."
        )
    text_to_image = torch.as_tensor(array.astype(np.int64, copy=False), dtype=torch.long)
    if text_to_image.numel() != num_texts:
        raise ValueError(
            f"text_to_image has {text_to_image.numel()} entries but scores has {num_texts} texts (columns); "
            "give the image index of every text."
        )
    if text_to_image.numel() and (text_to_image.min() < 0 or text_to_image.max() >= num_images):
        raise ValueError(
            f"text_to_image must hold image indices in [0, {num_images}); got values from "
            f"{text_to_image.min().item()} to {text_to_image.max().item()}."
        )
    return text_to_image


def retrieval_ranks(scores, text_to_image, chunk_size: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero-based rank of the first correct candidate of every query.

    Args:
        scores (`array-like` of shape `(num_images, num_texts)`):
            Relevance of every image-text pair; higher is better.
        text_to_image (`array-like` of shape `(num_texts,)`):
            The index of the image each text describes.
        chunk_size (`int`, *optional*, defaults to 256):
            Queries compared at once; bounds memory on large galleries (COCO 5k is 5,000 x 25,000).

    Returns:
        `tuple[torch.Tensor, torch.Tensor]`: `tr_ranks` of shape `(num_images,)`, the rank of each image's best
        caption among all texts, and `ir_ranks` of shape `(num_texts,)`, the rank of each text's image among all
        images. A query is a hit at K when its rank is below K.
    """
    scores = _as_score_tensor(scores)
    num_images, num_texts = scores.shape
    text_to_image = _as_text_to_image(text_to_image, num_images, num_texts)
    captions_per_image = torch.bincount(text_to_image, minlength=num_images)
    if (captions_per_image == 0).any():
        missing = torch.nonzero(captions_per_image == 0).flatten()[:5].tolist()
        raise ValueError(
            f"{int((captions_per_image == 0).sum())} image(s) have no caption (e.g. image indices {missing}); "
            "text retrieval for them is undefined. Drop them from the score matrix."
        )

    # IR: for text t with image i, count the other images scoring at least scores[i, t] (less the tie tolerance).
    positive_scores = scores[text_to_image, torch.arange(num_texts)]
    ir_ranks = torch.empty(num_texts, dtype=torch.long)
    for start in range(0, num_texts, chunk_size):
        block = scores[:, start : start + chunk_size].double()
        floor = _tie_floor(positive_scores[start : start + chunk_size])
        ir_ranks[start : start + chunk_size] = (block >= floor).sum(0) - 1

    # TR: for image i, count the texts of other images scoring at least its best caption (less the tolerance).
    tr_ranks = torch.empty(num_images, dtype=torch.long)
    for start in range(0, num_images, chunk_size):
        block = scores[start : start + chunk_size].double()
        is_positive = text_to_image[None, :] == torch.arange(start, start + block.shape[0])[:, None]
        best_positive = block.masked_fill(~is_positive, float("-inf")).max(dim=1).values
        floor = _tie_floor(best_positive)[:, None]
        tr_ranks[start : start + block.shape[0]] = ((block >= floor) & ~is_positive).sum(1)
    return tr_ranks, ir_ranks


def _tie_floor(positive: torch.Tensor) -> torch.Tensor:
    """The lowest score that ties with `positive` (`torch.isclose` with `TIE_RTOL`, `TIE_ATOL`), in float64 so that
    the tolerance is neither rounded away nor pushes the lowest float32 (a shortlist's fill value) to -inf."""
    positive = positive.double()
    return positive - (TIE_ATOL + TIE_RTOL * positive.abs())


def recall_at_k(ranks, k: int) -> float:
    """Share of queries (in percent) whose rank is below `k`."""
    ranks = torch.as_tensor(ranks)
    return 100.0 * (ranks < k).double().mean().item()


def _single_fold_metrics(scores, text_to_image, ks: Sequence[int], ir_scores=None) -> dict[str, float]:
    tr_ranks, ir_ranks = retrieval_ranks(scores, text_to_image)
    if ir_scores is not None:
        _, ir_ranks = retrieval_ranks(ir_scores, text_to_image)
    metrics = {}
    for k in ks:
        metrics[f"tr_r{k}"] = recall_at_k(tr_ranks, k)
    for k in ks:
        metrics[f"ir_r{k}"] = recall_at_k(ir_ranks, k)
    metrics["rsum"] = sum(metrics.values())
    return metrics


def retrieval_metrics(
    scores, text_to_image, num_folds: int = 1, ks: Sequence[int] = DEFAULT_KS, ir_scores=None
) -> dict[str, float]:
    """Text and image retrieval recall@K and their sum (RSUM), in percent.

    Args:
        scores (`array-like` of shape `(num_images, num_texts)`):
            Relevance of every image-text pair (numpy, torch or nested lists); higher is better.
        text_to_image (`array-like` of shape `(num_texts,)`):
            The index of the image each text describes; an image may have several texts.
        num_folds (`int`, *optional*, defaults to 1):
            Cut the images into this many consecutive equal folds, rank each fold on its own and average
            (COCO 1k: the 5k test images in 5 folds of 1,000). The number of images must be a multiple of it.
        ks (`Sequence[int]`, *optional*, defaults to `(1, 5, 10)`):
            Cut-offs K.
        ir_scores (`array-like` of shape `(num_images, num_texts)`, *optional*):
            A separate matrix for the text queries. Shortlist re-ranking gives each direction its own matrix
            (image queries re-rank their shortlisted texts, text queries their shortlisted images); `scores` then
            serves the image queries only.

    Returns:
        `dict[str, float]`: `tr_r1, tr_r5, tr_r10` (image query, text gallery), `ir_r1, ir_r5, ir_r10` (text
        query, image gallery) and `rsum`, the sum of the six, for the default `ks`.

    Example:
        >>> retrieval_metrics([[0.9, 0.1], [0.2, 0.8]], text_to_image=[0, 1])["tr_r1"]
        100.0
    """
    scores = _as_score_tensor(scores)
    num_images, num_texts = scores.shape
    text_to_image = _as_text_to_image(text_to_image, num_images, num_texts)
    ks = check_ks(ks)
    if isinstance(num_folds, bool) or not isinstance(num_folds, (int, np.integer)):
        raise TypeError(f"num_folds must be an integer, got {num_folds!r}.")
    if num_folds < 1 or num_images % num_folds:
        raise ValueError(
            f"num_folds must be a positive divisor of the number of images ({num_images}), got {num_folds}."
        )
    if ir_scores is not None:
        ir_scores = _as_score_tensor(ir_scores)
        if ir_scores.shape != scores.shape:
            raise ValueError(
                f"ir_scores has shape {tuple(ir_scores.shape)}; expected {tuple(scores.shape)} as scores."
            )
    if num_folds == 1:
        return _single_fold_metrics(scores, text_to_image, ks, ir_scores)

    fold_size = num_images // num_folds
    per_fold = []
    for fold in range(num_folds):
        first, last = fold * fold_size, (fold + 1) * fold_size
        texts = torch.nonzero((text_to_image >= first) & (text_to_image < last)).flatten()
        fold_ir = None if ir_scores is None else ir_scores[first:last][:, texts]
        per_fold.append(_single_fold_metrics(scores[first:last][:, texts], text_to_image[texts] - first, ks, fold_ir))
    return {key: sum(fold[key] for fold in per_fold) / num_folds for key in per_fold[0]}


def shared_caption_count(texts: Sequence[Hashable], text_to_image, num_folds: int = 1) -> int:
    """How many texts are, as the same query, a caption of more than one image (of the same fold, with `num_folds`
    as in `retrieval_metrics`). A cross-encoder scores such a query the same whichever image it came with, and ties
    count against the query, so even a perfect scorer misses some of the queries these texts and their images make:
    recall below 100 that no model can recover, which the metric itself does not show.

    `texts` holds each text as the model reads it, e.g. its token ids as a tuple (`RetrievalCorpus.text_keys`): an
    uncased tokenizer gives `A dog` and `a  dog` the same ids, so they are one query. Strings are compared as
    written."""
    text_to_image = torch.as_tensor(np.asarray(text_to_image), dtype=torch.long).reshape(-1).tolist()
    if len(texts) != len(text_to_image):
        raise ValueError(f"texts has {len(texts)} entries and text_to_image {len(text_to_image)}; expected one each.")
    if num_folds < 1:
        raise ValueError(f"num_folds must be a positive integer, got {num_folds}.")
    # The folds of `retrieval_metrics`: consecutive images, every image holding at least one caption.
    fold_size = max(1, (max(text_to_image, default=0) + 1) // num_folds)
    images_of: dict[tuple[int, Hashable], set[int]] = {}
    for text, image in zip(texts, text_to_image):
        images_of.setdefault((image // fold_size, text), set()).add(image)
    return sum(len(images_of[(image // fold_size, text)]) > 1 for text, image in zip(texts, text_to_image))


def format_metrics_table(results: dict[str, dict[str, float]], ks: Sequence[int] = DEFAULT_KS) -> str:
    """A markdown table of several evaluations, one row each (e.g. `{"COCO 1k": metrics, "COCO 5k": metrics}`);
    a metric an evaluation lacks shows as `-`."""
    header = ["split"] + [f"TR R@{k}" for k in ks] + [f"IR R@{k}" for k in ks] + ["RSUM"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, metrics in results.items():
        keys = [f"tr_r{k}" for k in ks] + [f"ir_r{k}" for k in ks] + ["rsum"]
        cells = [f"{metrics[key]:.1f}" if key in metrics else "-" for key in keys]
        lines.append("| " + " | ".join([name] + cells) + " |")
    return "\n".join(lines)


__all__ = [
    "DEFAULT_KS",
    "TIE_ATOL",
    "TIE_RTOL",
    "check_ks",
    "format_metrics_table",
    "recall_at_k",
    "retrieval_metrics",
    "retrieval_ranks",
    "shared_caption_count",
]
