"""Retrieval plots (PNG, drawn on a `matplotlib.figure.Figure`, so they work without a display): recall@K curves
from score matrices, recall bars from metrics, score histograms."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from ..formats.plotting import save_figure, subplots
from .recall import retrieval_ranks


def plot_recall_curves(runs: Mapping[str, tuple], path: str | Path, max_k: int = 50, title: str | None = None) -> Path:
    """Recall@K against K for text retrieval (left) and image retrieval (right), one line per run.

    Args:
        runs: `{name: (scores, text_to_image)}` or `{name: (scores, text_to_image, ir_scores)}` (a shortlist run's
            two matrices).
        path: the PNG to write.
        max_k: the largest K drawn (clamped to each gallery).
        title: figure title.
    """
    fig, axes = subplots(1, 2, figsize=(9, 3.4), sharey=True)
    for name, run in runs.items():
        scores, text_to_image = run[0], run[1]
        tr_ranks, ir_ranks = retrieval_ranks(scores, text_to_image)
        if len(run) > 2 and run[2] is not None:
            _, ir_ranks = retrieval_ranks(run[2], text_to_image)
        for axis, ranks, gallery in ((axes[0], tr_ranks, len(text_to_image)), (axes[1], ir_ranks, len(tr_ranks))):
            ks = torch.arange(1, min(max_k, gallery) + 1)
            recall = 100.0 * (ranks[None, :] < ks[:, None]).double().mean(dim=1)
            axis.plot(ks.numpy(), recall.numpy(), label=name)
    axes[0].set_title("text retrieval (image query)")
    axes[1].set_title("image retrieval (text query)")
    for axis in axes:
        axis.set_xlabel("K")
        axis.set_xscale("log")
        axis.grid(alpha=0.3)
    axes[0].set_ylabel("recall@K (%)")
    axes[1].legend(fontsize=8)
    if title:
        fig.suptitle(title)
    return save_figure(fig, path)


RECALL_KEYS = ("tr_r1", "tr_r5", "tr_r10", "ir_r1", "ir_r5", "ir_r10")


def plot_recall_bars(
    results: Mapping[str, Mapping[str, float]],
    path: str | Path,
    keys: Sequence[str] = RECALL_KEYS,
    title: str | None = None,
) -> Path:
    """Recall@K of several runs side by side, one group of bars per metric: for runs known by their metrics only
    (`retrieval_metrics`, `chance_metrics`), where `plot_recall_curves` needs the score matrices.

    Args:
        results: `{run name: metrics}`, each holding every key of `keys` (in percent).
        path: the PNG to write.
        keys: the metrics drawn, in order; `tr_r5` is labelled `TR R@5`.
        title: figure title.
    """
    import numpy as np

    fig, axis = subplots(figsize=(8, 3.2))
    width = 0.8 / max(len(results), 1)
    positions = np.arange(len(keys))
    for i, (name, metrics) in enumerate(results.items()):
        missing = [key for key in keys if key not in metrics]
        if missing:
            raise KeyError(f"results[{name!r}] has no {missing}; plot_recall_bars draws {list(keys)}.")
        axis.bar(positions + i * width, [metrics[key] for key in keys], width, label=name)
    labels = [f"{key[:2].upper()} R@{key.split('_r')[-1]}" for key in keys]
    axis.set_xticks(positions + 0.4 - width / 2, labels)
    axis.set_ylabel("recall (%)")
    if title:
        axis.set_title(title)
    axis.legend(fontsize=8)
    return save_figure(fig, path)


def plot_score_histograms(scores, text_to_image, path: str | Path, bins: int = 50, title: str | None = None) -> Path:
    """Histograms of the scores of matching pairs and of all other pairs (normalised, overlaid): how well the
    cross-encoder separates them."""
    scores = torch.as_tensor(scores).float().cpu()
    text_to_image = torch.as_tensor(text_to_image).long()
    positive = torch.zeros_like(scores, dtype=torch.bool)
    positive[text_to_image, torch.arange(scores.shape[1])] = True
    fig, axis = subplots(figsize=(5, 3.4))
    for values, label in ((scores[~positive], "non-matching"), (scores[positive], "matching")):
        if values.numel():  # a one-image gallery has no non-matching pair: an empty density would divide by zero
            axis.hist(values.numpy(), bins=bins, density=True, alpha=0.6, label=f"{label} ({values.numel()})")
    axis.set_xlabel("score (log-odds of a match)")
    axis.set_ylabel("density")
    axis.legend(fontsize=8)
    if title:
        axis.set_title(title)
    return save_figure(fig, path)


__all__ = ["RECALL_KEYS", "plot_recall_bars", "plot_recall_curves", "plot_score_histograms"]
