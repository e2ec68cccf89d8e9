"""Intruder dimensions: top singular directions of an adapted weight that the base weight lacks.

Shuttleworth et al., *LoRA vs Full Fine-tuning: An Illusion of Equivalence* (arXiv 2410.21228),
found that low-rank updates put new high-ranking singular vectors into ``W0 + ΔW`` — nearly
orthogonal to every singular vector of ``W0`` — and that these "intruder dimensions" go with
forgetting, while full fine-tuning's top directions stay close to the base's. For each of the
``k`` leading left singular vectors ``u_i`` of ``W = W0 + ΔW``, the similarity is
``max_j |⟨u_i, u0_j⟩|`` over all left singular vectors of ``W0``; ``u_i`` is an intruder at
threshold ``ε`` when that similarity is below ``ε`` (PEFT's ``reduce_intruder_dimension`` uses
``k`` = 10 and ``ε`` = 0.5). Weights are ``(d_out, d_in)``; numpy or torch arrays, computed in
float64.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from ..checks import float64_matrix

__all__ = ["IntruderDimensions", "intruder_dimensions", "intruders_of_checked"]

#: thresholds reported by default: PEFT's 0.5 up to 0.9, as in the paper's sweep
DEFAULT_THRESHOLDS = (0.5, 0.6, 0.7, 0.8, 0.9)


@dataclass(frozen=True)
class IntruderDimensions:
    """``similarity[i]``: best |cosine| of the adapted weight's ``i``-th singular vector with any of
    the base's; ``counts[ε]``: how many of the ``k`` fall below ``ε``."""

    similarity: tuple[float, ...]
    thresholds: tuple[float, ...]

    @property
    def k(self) -> int:
        return len(self.similarity)

    @property
    def counts(self) -> dict[float, int]:
        return {t: sum(s < t for s in self.similarity) for t in self.thresholds}

    def to_dict(self) -> dict:
        return {"k": self.k, "similarity": list(self.similarity),
                "counts": {f"{t:g}": c for t, c in self.counts.items()}}

    def __str__(self) -> str:
        return f"intruders among the top {self.k}: " + ", ".join(f"{c} below {t:g}" for t, c in self.counts.items())


def intruder_dimensions(w0, w, *, k: int = 10, thresholds: Sequence[float] = DEFAULT_THRESHOLDS
                        ) -> IntruderDimensions:
    """Intruder dimensions of the adapted weight ``w`` (``W0 + ΔW``) against the base ``w0``."""
    a0, a = float64_matrix(w0, "w0", "(d_out, d_in)"), float64_matrix(w, "w", "(d_out, d_in)")
    return intruders_of_checked(a0, a, k=k, thresholds=thresholds)


def intruders_of_checked(a0: np.ndarray, a: np.ndarray, *, k: int = 10,
                         thresholds: Sequence[float] = DEFAULT_THRESHOLDS) -> IntruderDimensions:
    """:func:`intruder_dimensions` of weights already checked by
    :func:`tera_tn.checks.float64_matrix` (finite, non-empty 2-D float64): no conversion again."""
    if a0.shape != a.shape:
        raise ValueError(f"w0 and w must have the same (d_out, d_in) shape, got {a0.shape} and {a.shape}")
    if not isinstance(k, (int, np.integer)) or not 1 <= k <= min(a.shape):
        raise ValueError(f"k must be an integer in 1..{min(a.shape)} (the weight's smaller side), got {k!r}")
    ts = tuple(float(t) for t in thresholds)
    if not ts or not all(0 < t <= 1 for t in ts):
        raise ValueError(f"thresholds must be cosines in (0, 1], got {tuple(thresholds)!r}")
    u0 = np.linalg.svd(a0, full_matrices=False)[0]
    u = np.linalg.svd(a, full_matrices=False)[0][:, :k]
    similarity = np.abs(u.T @ u0).max(axis=1)
    return IntruderDimensions(similarity=tuple(float(s) for s in similarity), thresholds=ts)
