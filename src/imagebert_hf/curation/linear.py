"""A standardised logistic-regression model stored as JSON, so inference needs only numpy.

scikit-learn is needed to train (`fit_linear_model`), not to curate.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..formats.files import atomic_write_text, read_json_file


@dataclass
class LinearModel:
    """`sigmoid(((x - mean) / scale) @ coef + intercept)` with named features."""

    feature_names: list[str]
    mean: np.ndarray
    scale: np.ndarray
    coef: np.ndarray
    intercept: float
    metadata: dict = field(default_factory=dict)

    def predict_proba(self, features: np.ndarray) -> np.ndarray:
        features = np.atleast_2d(np.asarray(features, dtype=np.float64))
        if features.shape[1] != len(self.coef):
            raise ValueError(f"expected {len(self.coef)} features, got {features.shape[1]}")
        standardized = (features - self.mean) / self.scale * self.coef
        # fsum is exact, so a score never depends on batch size or memory layout (local and Spark runs agree).
        z = np.array([math.fsum(row) + self.intercept for row in standardized.tolist()], dtype=np.float64)
        return 1.0 / (1.0 + np.exp(-np.clip(z, -50, 50)))

    def to_dict(self) -> dict:
        return {
            "feature_names": list(self.feature_names),
            "mean": self.mean.tolist(),
            "scale": self.scale.tolist(),
            "coef": self.coef.tolist(),
            "intercept": float(self.intercept),
            "metadata": self.metadata,
        }

    def save(self, path: str | Path) -> None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps(self.to_dict(), indent=1) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> LinearModel:
        """Reads a file written by `save`; a file that cannot be read, is not JSON, or lacks a field of the right
        shape raises naming `path` and the field."""
        expected = "a JSON linear model written by `LinearModel.save` (see examples/train_curation_models.py)"
        data = read_json_file(path, expected)
        if not isinstance(data, dict):
            raise ValueError(f"{path} holds a {type(data).__name__}; expected {expected}.")
        missing = [name for name in ("feature_names", "mean", "scale", "coef", "intercept") if name not in data]
        if missing:
            raise ValueError(f"{path} lacks the field(s) {missing}; expected {expected}.")
        names = data["feature_names"]
        if not isinstance(names, list) or not names or not all(isinstance(name, str) for name in names):
            raise ValueError(f"{path}: feature_names must be a non-empty list of strings, got {names!r:.80}.")
        vectors = {name: _finite_vector(path, name, data[name], len(names)) for name in ("mean", "scale", "coef")}
        if not (vectors["scale"] > 0).all():
            raise ValueError(f"{path}: scale must be positive, got {data['scale']!r:.80}.")
        intercept = data["intercept"]
        if isinstance(intercept, bool) or not isinstance(intercept, (int, float)) or not math.isfinite(intercept):
            raise ValueError(f"{path}: intercept must be a finite number, got {intercept!r}.")
        metadata = data.get("metadata", {})
        if not isinstance(metadata, dict):
            raise ValueError(f"{path}: metadata must be a mapping, got {metadata!r:.80}.")
        return cls(feature_names=names, intercept=float(intercept), metadata=metadata, **vectors)


def _finite_vector(path, name: str, value, length: int) -> np.ndarray:
    """`value` as a float64 vector of `length` finite numbers; anything else raises naming `path` and `name`."""
    if (
        not isinstance(value, list)
        or len(value) != length
        or not all(isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) for x in value)
    ):
        raise ValueError(
            f"{path}: {name} must be a list of {length} finite numbers (one per feature name), got {value!r:.80}."
        )
    return np.asarray(value, dtype=np.float64)


def fit_linear_model(
    features: np.ndarray,
    labels: np.ndarray,
    feature_names: list[str],
    c: float = 1.0,
    metadata: dict | None = None,
    seed: int = 0,
) -> LinearModel:
    """Fits a class-balanced, L2-regularised logistic regression on standardised features."""
    from sklearn.linear_model import LogisticRegression

    features = np.asarray(features, dtype=np.float64)
    mean = features.mean(axis=0)
    scale = features.std(axis=0)
    scale[scale < 1e-8] = 1.0
    clf = LogisticRegression(C=c, max_iter=2000, class_weight="balanced", random_state=seed)
    clf.fit((features - mean) / scale, np.asarray(labels))
    return LinearModel(
        feature_names=list(feature_names),
        mean=mean,
        scale=scale,
        coef=clf.coef_[0].astype(np.float64),
        intercept=float(clf.intercept_[0]),
        metadata=dict(metadata or {}),
    )


__all__ = ["LinearModel", "fit_linear_model"]
