"""Figures for the package's PNG reports (loss curves, recall curves, score histograms, curation funnel).

Figures are built on `matplotlib.figure.Figure` rather than pyplot, so that saving a plot neither needs a display
nor changes the backend of a notebook that calls it.
"""

from __future__ import annotations

from pathlib import Path


def subplots(nrows: int = 1, ncols: int = 1, figsize: tuple[float, float] = (6, 4), **kwargs):
    """A new figure and its axes, as `pyplot.subplots` returns them."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=figsize)
    return figure, figure.subplots(nrows, ncols, **kwargs)


def save_figure(figure, path: str | Path, dpi: int = 100) -> Path:
    """Lays the figure out and writes it as a PNG, creating the folder; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.tight_layout()
    figure.savefig(path, dpi=dpi)
    return path


__all__ = ["save_figure", "subplots"]
