"""Loss curves of a run: one panel per task, stages marked, written as a PNG."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..formats.plotting import save_figure, subplots


def _task_curve(history: Sequence[dict[str, Any]], task: str):
    """(steps, values) of the logged steps that hold `task`, as numpy arrays."""
    points = [(entry["step"], entry[task]) for entry in history if entry.get(task) is not None]
    return np.array([p[0] for p in points]), np.array([p[1] for p in points], dtype=float)


def _moving_average(steps, values, width: int):
    """The steps where a full window ends, and the mean of the `width` values up to each."""
    return steps[width - 1 :], np.convolve(values, np.ones(width) / width, mode="valid")


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
    tasks = [task for task in tasks if any(entry.get(task) is not None for entry in history)]
    fig, axes = subplots(1, len(tasks), figsize=(3.2 * len(tasks), 2.8), squeeze=False)
    boundaries, seen = [], set()
    for entry in history:
        if entry["stage"] not in seen:
            seen.add(entry["stage"])
            boundaries.append((entry["step"], entry["stage"]))
    for axis, task in zip(axes[0], tasks):
        steps, values = _task_curve(history, task)
        axis.plot(steps, values, alpha=0.35 if smoothing > 1 else 1.0, color="tab:blue")
        if smoothing > 1 and len(values) >= smoothing:
            axis.plot(*_moving_average(steps, values, smoothing), color="tab:blue")
        for step, stage in boundaries[1:]:
            axis.axvline(step, color="gray", linestyle="--", linewidth=0.8)
        axis.set_title("total" if task == "loss" else task.upper())
        axis.set_xlabel("step")
    for step, stage in boundaries:
        axes[0][0].annotate(stage, (step, 1.0), xycoords=("data", "axes fraction"), fontsize=7, va="top")
    if title:
        fig.suptitle(title)
    return save_figure(fig, path)


def plot_run_groups(
    groups: Mapping[str, Sequence[Sequence[dict[str, Any]]]],
    path: str | Path,
    task: str = "itm",
    smoothing: int = 25,
    reference_lines: Mapping[str, float] | None = None,
    title: str | None = None,
) -> Path:
    """Draws one task's loss for several runs, one colour per group of runs (e.g. seeds of a recipe before and after
    a change), each run its moving average, so that where each run leaves a plateau can be compared at a glance.

    Args:
        groups: `{label: [history, ...]}`, each history as for `plot_losses`.
        path: The PNG to write.
        task: The history key to plot.
        smoothing: Width of the moving average (1 draws the raw values).
        reference_lines: `{label: value}` drawn as dotted horizontal lines (e.g. ln 2 for ITM).
        title: Figure title.

    Returns:
        The written path.
    """
    if not groups or not any(groups.values()):
        raise ValueError("plot_run_groups needs at least one group with at least one run.")
    fig, axis = subplots(1, 1, figsize=(6.4, 3.6))
    colours = ["tab:gray", "tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple"]
    for index, (label, runs) in enumerate(groups.items()):
        colour = colours[index % len(colours)]
        for number, history in enumerate(runs):
            steps, values = _task_curve(history, task)
            if not len(values):
                raise ValueError(f"run {number} of group {label!r} logs no {task!r} loss.")
            width = max(1, min(smoothing, len(values)))
            axis.plot(
                *_moving_average(steps, values, width),
                color=colour,
                linewidth=1.2,
                label=label if number == 0 else None,
            )
    for name, value in (reference_lines or {}).items():
        axis.axhline(value, color="black", linestyle=":", linewidth=0.8)
        axis.annotate(name, (1.0, value), xycoords=("axes fraction", "data"), fontsize=7, ha="right", va="bottom")
    axis.set_xlabel("step")
    axis.set_ylabel(f"{task.upper()} loss (moving average of {smoothing} logged steps)" if smoothing > 1 else task)
    axis.legend(fontsize=8)
    if title:
        axis.set_title(title, fontsize=9)
    return save_figure(fig, path)


__all__ = ["plot_losses", "plot_run_groups"]
