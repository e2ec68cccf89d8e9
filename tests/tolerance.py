"""Tolerances that follow the dtype and the reduction, never one CPU's rounding.

A value computed in floating point as a sum of ``K`` products carries a rounding error of about
``eps·√K`` relative to its magnitude when the summation order is free (BLAS kernels, thread
counts and SIMD widths each pick their own), and a result rounded to a narrower dtype can land
one unit in the last place either side of the value a golden file recorded on another CPU. A
comparison against a golden or reference value therefore allows ``k·eps(dtype)·√K`` relative to
the largest magnitude, with ``eps`` of the dtype the compared value was *returned* in.
"""

from __future__ import annotations

import math

import numpy as np

#: safety factor over the expected eps·√K: a few ulps of rounding at the end, plus the reduction
K_ULPS = 8.0


def eps(dtype) -> float:
    """Machine epsilon of a numpy or torch dtype (``torch.float32`` → ``2**-23``)."""
    name = str(dtype).removeprefix("torch.")
    if name == "bfloat16":
        return 2.0**-7
    return float(np.finfo(np.dtype(name)).eps)


def rel_tol(dtype, reduction: int = 1) -> float:
    """Relative tolerance of a result in ``dtype`` that sums ``reduction`` products per entry."""
    if reduction < 1:
        raise ValueError(f"reduction must be a positive integer, got {reduction}")
    return K_ULPS * eps(dtype) * math.sqrt(reduction)


def assert_matches_golden(got, want, dtype, reduction: int, what: str = "value") -> None:
    """``max|got − want| ≤ rel_tol(dtype, reduction)·max(1, max|want|)`` with a message naming the excess."""
    got, want = np.asarray(got, dtype=np.float64), np.asarray(want, dtype=np.float64)
    assert got.shape == want.shape, f"{what}: shape {got.shape}, golden {want.shape}"
    scale = max(1.0, float(np.abs(want).max()))
    err, tol = float(np.abs(got - want).max()), rel_tol(dtype, reduction) * scale
    assert err <= tol, f"{what}: moved by {err:.3g}, allowed {tol:.3g} ({dtype}, reduction {reduction})"
