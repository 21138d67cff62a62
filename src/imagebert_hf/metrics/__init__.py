"""`evaluate` metric modules shipped inside the package, loadable offline by path.

Example:
    >>> import evaluate
    >>> from imagebert_hf.metrics import retrieval_metric_path
    >>> metric = evaluate.load(retrieval_metric_path())
"""

from pathlib import Path


_METRICS_DIR = Path(__file__).resolve().parent


def retrieval_metric_path() -> str:
    """The folder of the `image_text_retrieval` metric, to pass to `evaluate.load` (no Hub access needed)."""
    return str(_METRICS_DIR / "image_text_retrieval")


__all__ = ["retrieval_metric_path"]
