"""Rank measures of any matrix (numpy, torch or JAX array), and of a tensorized one.

Every measure is a function of the singular values ``σ_1 ≥ … ≥ σ_k ≥ 0`` (``k = min(m, n)``) of a
real ``(m, n)`` matrix ``A``:

==================  ==============================================  ==============================
measure             definition                                      range (A ≠ 0)
==================  ==============================================  ==============================
numerical rank      ``#{i : σ_i > tol}``, ``tol = max(atol,          ``0 … k``
                    rtol·σ_1)``; default ``rtol = max(m, n)·eps``
stable rank         ``‖A‖_F² / ‖A‖_2² = Σ σ_i² / σ_1²``              ``[1, nnz(σ)]``
effective rank      ``exp(H(p))``, ``p_i = σ_i / Σ σ``,               ``[1, nnz(σ)]``
                    ``H(p) = −Σ p_i log p_i`` (Roy & Vetterli 2007)
energy rank         smallest ``r`` with ``Σ_{i≤r} σ_i² ≥ f·Σ σ_i²``   ``1 … nnz(σ)``
condition number    ``σ_1 / σ_k`` (``inf`` when singular)           ``[1, inf]``
==================  ==============================================  ==============================

``nnz(σ)`` counts exactly non-zero singular values. Stable and effective rank are scale
invariant and invariant under orthogonal transforms on either side (they only see σ).

Edge cases have defined answers rather than crashes: an empty matrix (``m = 0`` or ``n = 0``)
and the zero matrix have no non-zero singular value, so every rank is 0 (stable and
effective rank are 0.0 by this convention, although their ratio/entropy formulas are 0/0);
the condition number of an empty matrix is 1.0 by convention and of a singular one ``inf``.
Matrices holding NaN or ±Inf raise ``ValueError`` — their singular values are undefined.

Precision: ``float16`` and ``bfloat16`` inputs are decomposed in ``float32`` (LAPACK has no
half-precision SVD), but the default threshold uses the *input* dtype's machine epsilon,
because that is the precision the entries were stored in. Integer and bool inputs are
decomposed in ``float64``.

:func:`theoretical_rank` (the almost-sure rank of a TeRA update for generic frozen factors)
lives in :mod:`tera_tn.core.network` and is re-exported here.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import asdict, dataclass
from typing import Optional, Sequence

import numpy as np

from ..checks import as_array
from ..backends import Array, dtype_name, namespace, to_numpy
from ..core.network import theoretical_rank
from ..core.spec import check_spec

__all__ = [
    "singular_values",
    "default_rtol",
    "rank_threshold",
    "numerical_rank",
    "stable_rank",
    "effective_rank",
    "effective_rank_of_checked",
    "energy_rank",
    "condition_number",
    "RankSummary",
    "rank_summary",
    "summarize_singular_values",
    "mode_singular_values",
    "multilinear_ranks",
    "theoretical_rank",
    "dtype_eps",
]


# --------------------------------------------------------------------------------------------
# dtype handling
# --------------------------------------------------------------------------------------------
_EPS = {
    "float16": float(np.finfo(np.float16).eps),
    "bfloat16": 2.0**-7,  # 8 significant bits (7 stored)
    "float32": float(np.finfo(np.float32).eps),
    "float64": float(np.finfo(np.float64).eps),
    "complex64": float(np.finfo(np.float32).eps),
    "complex128": float(np.finfo(np.float64).eps),
}


def dtype_eps(dtype: object) -> float:
    """Machine epsilon of a numpy/torch/JAX float dtype (or its name); ``float64``'s for integers.

    Accepts ``np.float32``, ``torch.bfloat16``, ``"float16"`` …; the threshold of
    :func:`numerical_rank` scales with it.
    """
    name = dtype_name(dtype)
    if name in _EPS:
        return _EPS[name]
    try:
        np_dtype = np.dtype(dtype)  # type: ignore[arg-type]
    except TypeError:
        raise ValueError(f"no machine epsilon for dtype {dtype!r}; expected a float dtype") from None
    if np.issubdtype(np_dtype, np.inexact):
        return float(np.finfo(np_dtype).eps)
    return _EPS["float64"]


def _as_matrix(a: Array, name: str = "a") -> tuple[Array, str]:
    """Validate a 2-D finite matrix; return it in a dtype its backend can decompose, and the
    name of the *input* dtype (which sets the default threshold)."""
    a = as_array(name, a, "shape (m, n)")
    if a.ndim != 2:
        raise ValueError(f"{name} must be a 2-D matrix, got shape {tuple(a.shape)}")
    dtype = dtype_name(a.dtype)
    backend = namespace(a)
    a = backend.decomposable(a)
    if math.prod(a.shape) and not backend.all_finite(a):
        raise ValueError(
            f"{name} of shape {tuple(a.shape)} contains NaN or Inf; its singular values (and every "
            f"rank measure) are undefined — check the update for overflow or a diverged training step"
        )
    return a, dtype


def singular_values(a: Array) -> Array:
    """Singular values of a matrix, descending.

    Args:
        a: ``(m, n)`` numpy, torch or JAX array (real or complex, any float dtype; ints are
            promoted to float64). Must be finite.

    Returns:
        ``min(m, n)`` non-negative singular values ``σ_1 ≥ … ≥ σ_k``, in the input's backend and
        device; dtype float32 for half-precision inputs, else the input's real dtype. Empty for
        an empty matrix. Torch results are differentiable (``torch.linalg.svdvals``).

    Raises:
        ValueError: ``a`` is not 2-D or holds NaN/Inf.
    """
    m, _ = _as_matrix(a)
    return namespace(m).svdvals(m)


# --------------------------------------------------------------------------------------------
# measures from singular values (the single place where each formula lives)
# --------------------------------------------------------------------------------------------
def _sv64(sv: Array) -> np.ndarray:
    s = to_numpy(as_array("singular values", sv, "shape (k,)"))
    if s.ndim != 1 or np.iscomplexobj(s):
        raise ValueError(f"singular values must be a real 1-D array, got shape {s.shape} of dtype {s.dtype}")
    s = s.astype(np.float64)
    if s.size and not np.isfinite(s).all():
        raise ValueError("singular values contain NaN or Inf")
    if s.size and s.min() < 0:
        raise ValueError(f"singular values must be non-negative, got min {s.min()}")
    # Callers may pass unsorted spectra (e.g. a concatenation); every formula assumes descending.
    return np.sort(s)[::-1]


def _check_shape(shape: object) -> tuple[int, int]:
    if (
        isinstance(shape, (str, bytes))
        or not isinstance(shape, Sequence)
        or len(shape) != 2
        or not all(isinstance(x, numbers.Integral) and not isinstance(x, bool) and x >= 0 for x in shape)
    ):
        raise ValueError(f"shape must be (m, n) with integers m, n >= 0, got {shape!r}")
    return int(shape[0]), int(shape[1])


def default_rtol(shape: Sequence[int], dtype: object) -> float:
    """The default relative threshold ``max(m, n)·eps(dtype)`` (numpy's and torch's rule)."""
    return max(_check_shape(shape)) * dtype_eps(dtype)


def _check_tol(name: str, value: object) -> Optional[float]:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite non-negative number, got {value!r}")
    return float(value)


def rank_threshold(
    sv: Array, shape: Sequence[int], dtype: object = "float64", *, rtol: float | None = None, atol: float | None = None
) -> float:
    """The cut-off ``tol`` of :func:`numerical_rank`: singular values ``> tol`` count.

    ``tol = max(atol, rtol·σ_1)`` with torch's defaults: when neither is given,
    ``rtol = max(m, n)·eps(dtype)`` and ``atol = 0``; when only ``atol`` is given, ``rtol = 0``;
    when only ``rtol`` is given, ``atol = 0``.
    """
    shape = _check_shape(shape)
    rtol = _check_tol("rtol", rtol)
    atol = _check_tol("atol", atol)
    if rtol is None:
        rtol = default_rtol(shape, dtype) if atol is None else 0.0
    if atol is None:
        atol = 0.0
    s = _sv64(sv)
    smax = float(s[0]) if s.size else 0.0
    return max(atol, rtol * smax)


def _numerical_rank_sv(s: np.ndarray, tol: float) -> int:
    return int(np.count_nonzero(s > tol))


def _stable_rank_sv(s: np.ndarray) -> float:
    if s.size == 0 or s[0] == 0:
        return 0.0
    # Dividing before squaring keeps huge/tiny spectra from overflowing or underflowing; the
    # first term is exactly 1 and no term exceeds 1, so 1 ≤ result ≤ nnz holds in floating point.
    return float(np.sum((s / s[0]) ** 2))


def _effective_rank_sv(s: np.ndarray) -> float:
    s = s[s > 0]
    if s.size == 0:
        return 0.0
    p = s / s.sum()
    p = p[p > 0]  # underflow of σ_i/Σσ to 0 contributes 0·log 0 = 0
    h = float(-np.sum(p * np.log(p)))
    # exp(H) lies in [1, nnz] mathematically; clip the last-ulp rounding that can cross the edges.
    return float(min(max(math.exp(h), 1.0), float(s.size)))


def _check_fraction(fraction: object) -> float:
    if isinstance(fraction, bool) or not isinstance(fraction, numbers.Real) or not 0.0 < fraction <= 1.0:
        raise ValueError(f"energy fraction must be in (0, 1], got {fraction!r}")
    return float(fraction)


def _energy_rank_sv(s: np.ndarray, fraction: float) -> int:
    e = (s / s[0]) ** 2 if s.size and s[0] > 0 else np.zeros(0)
    if e.size == 0:
        return 0
    cum = np.cumsum(e)
    # cum[-1] is the total computed the same way, so fraction = 1 reaches it exactly; the index
    # is capped at nnz so trailing exact zeros never count.
    k = int(np.searchsorted(cum, fraction * cum[-1], side="left")) + 1
    return min(k, int(np.count_nonzero(s)))


def _condition_sv(s: np.ndarray, *, nonzero: bool = False, tol: float = 0.0) -> float:
    if s.size == 0:
        return 1.0
    if s[0] == 0:
        return math.inf
    if nonzero:
        kept = s[s > tol]
        return float(kept[0] / kept[-1])
    return float(s[0] / s[-1]) if s[-1] > 0 else math.inf


# --------------------------------------------------------------------------------------------
# public measures on matrices
# --------------------------------------------------------------------------------------------
def numerical_rank(a: Array, *, rtol: float | None = None, atol: float | None = None) -> int:
    """Number of singular values of ``a`` above ``tol = max(atol, rtol·σ_max)``.

    Threshold rule (numpy's ``matrix_rank`` / torch's ``linalg.matrix_rank``): by default
    ``rtol = max(m, n)·eps(dtype)`` with ``eps`` of the *input* dtype (float16 and bfloat16
    are decomposed in float32 but keep their own, larger eps) and ``atol = 0``; giving only
    ``atol`` sets ``rtol = 0``. A value equal to ``tol`` does not count.

    Args:
        a: ``(m, n)`` matrix, numpy, torch or JAX, finite.
        rtol: relative tolerance (fraction of σ_max), ≥ 0.
        atol: absolute tolerance, ≥ 0.

    Returns:
        An int in ``[0, min(m, n)]``; 0 for empty and zero matrices.
    """
    m, dtype = _as_matrix(a)
    s = _sv64(namespace(m).svdvals(m))
    return _numerical_rank_sv(s, rank_threshold(s, m.shape, dtype, rtol=rtol, atol=atol))


def stable_rank(a: Array) -> float:
    """Stable rank ``‖A‖_F² / ‖A‖_2²`` (float, in ``[1, nnz(σ)]``; 0.0 for a zero/empty ``a``).

    Insensitive to tiny singular values, unlike the numerical rank: it measures how many
    directions carry energy comparable to the largest one.
    """
    m, _ = _as_matrix(a)
    return _stable_rank_sv(_sv64(namespace(m).svdvals(m)))


def effective_rank(a: Array) -> float:
    """Effective rank ``exp(H(p))``, ``p_i = σ_i / Σ_j σ_j`` (Roy & Vetterli 2007).

    Returns a float in ``[1, nnz(σ)]``, equal to ``k`` when the ``k`` non-zero singular values
    are equal; 0.0 for a zero or empty ``a``.
    """
    m, _ = _as_matrix(a)
    return _effective_rank_sv(_sv64(namespace(m).svdvals(m)))


def effective_rank_of_checked(a: np.ndarray) -> float:
    """:func:`effective_rank` of a matrix already checked by :func:`tera_tn.checks.float64_matrix`
    (finite, non-empty 2-D float64): no conversion again (LAPACK's σ come out descending)."""
    return _effective_rank_sv(np.linalg.svd(a, compute_uv=False))


def energy_rank(a: Array, fraction: float = 0.99) -> int:
    """Smallest ``r`` such that the top ``r`` singular values hold ``fraction`` of ``Σ σ_i²``.

    ``Σ σ_i² = ‖A‖_F²``, so this is the rank of the best approximation (Eckart–Young) whose
    squared Frobenius error is at most ``(1 − fraction)·‖A‖_F²``. ``fraction`` in ``(0, 1]``;
    ``fraction=1`` gives the number of non-zero singular values. 0 for a zero/empty ``a``.
    """
    fraction = _check_fraction(fraction)
    m, _ = _as_matrix(a)
    return _energy_rank_sv(_sv64(namespace(m).svdvals(m)), fraction)


def condition_number(a: Array, *, nonzero: bool = False, rtol: float | None = None, atol: float | None = None) -> float:
    """2-norm condition number ``σ_max / σ_min`` over all ``min(m, n)`` singular values.

    With ``nonzero=True``, ``σ_min`` is the smallest singular value above the
    :func:`numerical_rank` threshold (``rtol``/``atol`` as there) — the conditioning of the
    numerically non-singular part. ``inf`` for a singular (or zero) matrix when
    ``nonzero=False``; 1.0 for an empty one.
    """
    if not isinstance(nonzero, bool):
        raise ValueError(f"nonzero must be True or False, got {nonzero!r}")
    rtol, atol = _check_tol("rtol", rtol), _check_tol("atol", atol)
    m, dtype = _as_matrix(a)
    s = _sv64(namespace(m).svdvals(m))
    tol = rank_threshold(s, m.shape, dtype, rtol=rtol, atol=atol) if nonzero else 0.0
    if nonzero and s.size and s[0] > 0 and not (s > tol).any():
        return math.inf
    return _condition_sv(s, nonzero=nonzero, tol=tol)


@dataclass(frozen=True)
class RankSummary:
    """Every rank measure of one matrix, from one SVD.

    Attributes:
        shape: ``(m, n)``.
        dtype: the dtype whose eps set the threshold.
        sigma_max, sigma_min: largest and smallest of the ``min(m, n)`` singular values.
        threshold: the numerical-rank cut-off ``tol`` that was used.
        numerical_rank, stable_rank, effective_rank, energy_rank: as the functions of the same
            names (``energy_rank`` at ``energy_fraction``).
        energy_fraction: the fraction used for ``energy_rank``.
        nonzero: number of exactly non-zero singular values.
        condition_number: ``σ_max / σ_min`` (``inf`` when singular).
        condition_number_numerical: ``σ_max`` over the smallest singular value above the
            threshold (1.0 for a zero matrix).
    """

    shape: tuple[int, int]
    dtype: str
    sigma_max: float
    sigma_min: float
    threshold: float
    numerical_rank: int
    stable_rank: float
    effective_rank: float
    energy_rank: int
    energy_fraction: float
    nonzero: int
    condition_number: float
    condition_number_numerical: float

    def to_dict(self) -> dict:
        """Plain JSON-serializable dict (``inf`` becomes the string ``"inf"``)."""
        return {k: ("inf" if isinstance(v, float) and math.isinf(v) else v) for k, v in asdict(self).items()}


def summarize_singular_values(
    sv: Array,
    shape: Sequence[int],
    dtype: object = "float64",
    *,
    rtol: float | None = None,
    atol: float | None = None,
    energy: float = 0.99,
) -> RankSummary:
    """All measures from precomputed singular values (e.g. a structured TeRA spectrum).

    Args:
        sv: the singular values (any order; padded with zeros to ``min(shape)`` if shorter).
        shape: the ``(m, n)`` shape of the matrix they belong to (sets the default threshold).
        dtype: whose eps sets the default threshold (use ``"float32"`` to predict what a float32
            dense SVD would report).
        rtol, atol, energy: as in :func:`numerical_rank` and :func:`energy_rank`.
    """
    shape = _check_shape(shape)
    energy = _check_fraction(energy)
    s = _sv64(sv)
    k = min(shape)
    if s.size > k:
        raise ValueError(f"got {s.size} singular values for a {shape[0]}×{shape[1]} matrix (at most {k})")
    if s.size < k:
        s = np.concatenate([s, np.zeros(k - s.size)])
    tol = rank_threshold(s, shape, dtype, rtol=rtol, atol=atol)
    nr = _numerical_rank_sv(s, tol)
    return RankSummary(
        shape=shape,  # type: ignore[arg-type]
        dtype=dtype_name(dtype),
        sigma_max=float(s[0]) if k else 0.0,
        sigma_min=float(s[-1]) if k else 0.0,
        threshold=tol,
        numerical_rank=nr,
        stable_rank=_stable_rank_sv(s),
        effective_rank=_effective_rank_sv(s),
        energy_rank=_energy_rank_sv(s, energy),
        energy_fraction=energy,
        nonzero=int(np.count_nonzero(s)),
        condition_number=_condition_sv(s),
        condition_number_numerical=float(s[0] / s[nr - 1]) if nr else 1.0,
    )


def rank_summary(
    a: Array, *, rtol: float | None = None, atol: float | None = None, energy: float = 0.99
) -> RankSummary:
    """:class:`RankSummary` of a matrix (one SVD for all measures)."""
    m, dtype = _as_matrix(a)
    return summarize_singular_values(namespace(m).svdvals(m), m.shape, dtype, rtol=rtol, atol=atol, energy=energy)


# --------------------------------------------------------------------------------------------
# multilinear (Tucker) ranks
# --------------------------------------------------------------------------------------------
def _as_tensor(x: Array, modes: Sequence[int] | None, spec) -> tuple[np.ndarray, str]:
    """The tensor to unfold — ``x`` itself, ``x`` reshaped to ``modes`` (C-order), or
    ``tensorize(spec, x)`` (zero-padded) — as a decomposable numpy array, and the input dtype."""
    if spec is not None and modes is not None:
        raise ValueError(f"give either modes or spec, not both; got modes={modes!r} and spec={spec}")
    if spec is not None:
        from ..core.tensorize import tensorize

        x = tensorize(check_spec(spec, "multilinear_ranks"), x)
    x = as_array("x", x, "at least one dimension")
    dtype = dtype_name(x.dtype)
    x = to_numpy(namespace(x).decomposable(x))
    if modes is not None:
        if isinstance(modes, (str, bytes)) or not isinstance(modes, Sequence) or not all(
            isinstance(k, numbers.Integral) and not isinstance(k, bool) and k >= 1 for k in modes
        ):
            raise ValueError(f"modes must be a sequence of positive integers, got {modes!r}")
        modes = tuple(int(k) for k in modes)
        if math.prod(modes) != x.size:
            raise ValueError(f"modes {modes} multiply to {math.prod(modes)}, but the input has {x.size} entries")
        x = x.reshape(modes)
    if x.ndim < 1:
        raise ValueError(f"multilinear ranks need a tensor with at least one mode, got a 0-d {type(x).__name__}")
    if x.size and not np.isfinite(x).all():
        raise ValueError(f"tensor of shape {x.shape} contains NaN or Inf; its multilinear ranks are undefined")
    return x, dtype


def mode_singular_values(x: Array, modes: Sequence[int] | None = None, *, spec=None) -> list[np.ndarray]:
    """Singular values of every mode-n unfolding ``X_(n)`` (the HOSVD spectra), as float64.

    Args:
        x: an N-way tensor, or a matrix with ``modes`` (reshaped C-order) or with ``spec``
            (:func:`tera_tn.core.tensorize.tensorize`, zero padding included).

    ``X_(n)`` is tensorly's unfolding: mode ``n`` moved first, the rest flattened C-order,
    shape ``(K_n, ∏_{m≠n} K_m)``.
    """
    from tensorly.base import unfold

    t, _ = _as_tensor(x, modes, spec)
    out = []
    for n in range(t.ndim):
        u = unfold(t, n)
        out.append(np.asarray(namespace(u).svdvals(u), dtype=np.float64))
    return out


def multilinear_ranks(
    x: Array,
    modes: Sequence[int] | None = None,
    *,
    spec=None,
    rtol: float | None = None,
    atol: float | None = None,
) -> tuple[int, ...]:
    """Multilinear (Tucker) ranks: the numerical rank of each mode-n unfolding.

    Args:
        x: an N-way tensor, or a matrix with ``modes`` / ``spec`` (see
            :func:`mode_singular_values`).
        rtol, atol: threshold per unfolding as in :func:`numerical_rank` (default
            ``max(K_n, ∏_{m≠n} K_m)·eps(dtype)·σ_max``).

    Returns:
        ``(r_1, …, r_N)`` with ``r_n ≤ min(K_n, ∏_{m≠n} K_m)``; a Tucker decomposition with core
        of shape ``(r_1..r_N)`` represents ``x`` to within the thresholds (HOSVD).
    """
    t, dtype = _as_tensor(x, modes, spec)
    out = []
    for n, s in enumerate(mode_singular_values(t)):
        shape = (t.shape[n], t.size // t.shape[n] if t.shape[n] else 0)
        out.append(_numerical_rank_sv(_sv64(s), rank_threshold(s, shape, dtype, rtol=rtol, atol=atol)))
    return tuple(out)
