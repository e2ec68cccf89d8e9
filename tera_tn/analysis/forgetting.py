"""Representation drift: how far an adapted encoder moved its embeddings of text it was not trained on.

A forgetting measure for encoders: embed the same held-out texts with the base and the adapted
encoder (one row per text, any pooling) and compare row by row. ``1 − cos`` is 0 when a text's
embedding kept its direction and 1 when it turned orthogonal; the norm ratio shows a change of
scale that the cosine ignores. Rows are ``(n_texts, hidden)``; numpy or torch arrays, computed in
float64.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..checks import float64_matrix

__all__ = ["EmbeddingDrift", "drift_of_checked", "embedding_drift"]


@dataclass(frozen=True)
class EmbeddingDrift:
    """``cosine_distance[i]`` = 1 − cos(before_i, after_i); ``norm_ratio[i]`` = ‖after_i‖ / ‖before_i‖."""

    cosine_distance: tuple[float, ...]
    norm_ratio: tuple[float, ...]

    @property
    def mean_cosine_distance(self) -> float:
        return math.fsum(self.cosine_distance) / len(self.cosine_distance)

    @property
    def mean_norm_ratio(self) -> float:
        return math.fsum(self.norm_ratio) / len(self.norm_ratio)

    def to_dict(self) -> dict:
        return {"texts": len(self.cosine_distance), "mean_cosine_distance": self.mean_cosine_distance,
                "max_cosine_distance": max(self.cosine_distance), "mean_norm_ratio": self.mean_norm_ratio}

    def __str__(self) -> str:
        return (f"embedding drift over {len(self.cosine_distance)} texts: mean 1-cos {self.mean_cosine_distance:.4g} "
                f"(max {max(self.cosine_distance):.4g}), mean norm ratio {self.mean_norm_ratio:.4g}")


def _nonzero_rows(a: np.ndarray, name: str) -> None:
    norms = np.linalg.norm(a, axis=1)
    if (norms == 0).any():
        raise ValueError(f"{name} has an all-zero embedding in row {int(np.argmax(norms == 0))}; "
                         "its direction (and the cosine) is undefined")


def embedding_drift(before, after) -> EmbeddingDrift:
    """Row-wise drift from the base encoder's embeddings ``before`` to the adapted one's ``after``
    (the same texts in the same order)."""
    a = float64_matrix(before, "before", "(n_texts, hidden)")
    _nonzero_rows(a, "before")
    return drift_of_checked(a, float64_matrix(after, "after", "(n_texts, hidden)"))


def drift_of_checked(before: np.ndarray, after: np.ndarray) -> EmbeddingDrift:
    """:func:`embedding_drift` of rows already checked by :func:`tera_tn.checks.float64_matrix`
    (finite, non-empty 2-D float64): no conversion again."""
    a, b = before, after
    _nonzero_rows(a, "before")
    _nonzero_rows(b, "after")
    if a.shape != b.shape:
        raise ValueError(f"before and after must embed the same texts with the same width, got shapes {a.shape} "
                         f"and {b.shape}")
    na, nb = np.linalg.norm(a, axis=1), np.linalg.norm(b, axis=1)
    cos = np.clip(np.einsum("ij,ij->i", a, b) / (na * nb), -1.0, 1.0)
    return EmbeddingDrift(cosine_distance=tuple(float(1.0 - c) for c in cos),
                          norm_ratio=tuple(float(r) for r in nb / na))
