"""Loss curves of a run: one panel per task, stages marked, written as a PNG."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..formats.plotting import save_figure, subplots


def plot_losses(
    history: Sequence[dict[str, Any]],
    path: str | Path,
    tasks: Sequence[str] = ("loss", "mlm", "moc", "mrfr", "itm"),
    title: str | None = None,
    smoothing: int = 5,
) -> Path | None:
    """Draws each task's loss against the run-wide step, with a dashed line where a new stage starts.

    Args:
        history: Logged steps, each a dict with `step`, `stage` and the task losses (missing or None is skipped).
        path: The PNG to write.
        tasks: The keys to plot, one panel each.
        title: Figure title.
        smoothing: Width of the moving average drawn over the raw curve (1 disables it).

    Returns:
        The written path, or None when the history is empty.
    """
    if not history:
        return None
    import numpy as np

    tasks = [task for task in tasks if any(entry.get(task) is not None for entry in history)]
    fig, axes = subplots(1, len(tasks), figsize=(3.2 * len(tasks), 2.8), squeeze=False)
    boundaries, seen = [], set()
    for entry in history:
        if entry["stage"] not in seen:
            seen.add(entry["stage"])
            boundaries.append((entry["step"], entry["stage"]))
    for axis, task in zip(axes[0], tasks):
        points = [(entry["step"], entry[task]) for entry in history if entry.get(task) is not None]
        steps, values = np.array([p[0] for p in points]), np.array([p[1] for p in points], dtype=float)
        axis.plot(steps, values, alpha=0.35 if smoothing > 1 else 1.0, color="tab:blue")
        if smoothing > 1 and len(values) >= smoothing:
            kernel = np.ones(smoothing) / smoothing
            axis.plot(steps[smoothing - 1 :], np.convolve(values, kernel, mode="valid"), color="tab:blue")
        for step, stage in boundaries[1:]:
            axis.axvline(step, color="gray", linestyle="--", linewidth=0.8)
        axis.set_title("total" if task == "loss" else task.upper())
        axis.set_xlabel("step")
    for step, stage in boundaries:
        axes[0][0].annotate(stage, (step, 1.0), xycoords=("data", "axes fraction"), fontsize=7, va="top")
    if title:
        fig.suptitle(title)
    return save_figure(fig, path)


__all__ = ["plot_losses"]
