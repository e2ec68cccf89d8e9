"""The TeRA network: ``ΔW = α · matricize(G ×_1 A_1 … ×_N A_N)`` and its rank theorem.

``A_n`` combines the frozen factor ``U_n`` with the trainable vector ``λ_n`` according to
``spec.diag`` (see :mod:`tera_tn.core.spec`). Everything here works on numpy, torch and JAX
arrays alike; the result takes the backend, dtype and device of the scales (a torch or JAX
array if any operand is one) and torch results are differentiable with respect to the scales.
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

from .._backend import check_alpha
from ..backends import Array, floating_like, pick_like, to_like, to_numpy
from .factors import TeRAFactors, check_factors, check_scales
from .modeproduct import multi_mode_product
from .spec import TeRASpec, check_spec, prefix_rank

__all__ = ["scaled_factors", "delta_weight", "theoretical_rank", "kron_vectors", "scale_sides"]


def _prepare(
    caller: str, spec: TeRASpec, factors: TeRAFactors, scales: Sequence[Array], alpha: float
) -> tuple[TeRAFactors, tuple[Array, ...], float]:
    """Checked operands in one floating backend/dtype/device (integer λ must not round the factors)."""
    check_spec(spec, caller)
    scales = check_scales(spec, scales)
    check_factors(factors, spec)
    alpha = check_alpha(alpha)
    like = floating_like(pick_like(*scales, factors.core), *scales, factors.core)
    return factors.to(like), tuple(to_like(s, like) for s in scales), alpha


def scale_sides(spec: TeRASpec, scales: Sequence[Array]) -> tuple[Optional[list[Array]], Optional[list[Array]]]:
    """``(mode-side vectors, rank-side vectors)`` of the trainable vectors, ``None`` for an absent side.

    ``diag="rank"`` and ``"identity"`` (``U_n = I``, so its λ_n act on the R_n = K_n side) have
    only rank-side vectors, ``"mode"`` only mode-side ones, and ``"both"`` splits each vector
    into ``μ_n = v[:K_n]`` and ``λ_n = v[K_n:]`` (views, so gradients flow to the whole vector).
    """
    scales = list(scales)
    if spec.diag == "mode":
        return scales, None
    if spec.diag == "both":
        return [s[:k] for s, k in zip(scales, spec.modes)], [s[k:] for s, k in zip(scales, spec.modes)]
    return None, scales


def scaled_factors(
    spec: TeRASpec, factors: TeRAFactors, scales: Sequence[Array], alpha: float = 1.0
) -> tuple[Optional[Array], ...]:
    """``A_n = U_n diag(λ_n)`` (rank side), ``diag(μ_n) U_n`` (mode side) or both, shape ``(K_n, R_n)``.

    ``alpha`` is folded into ``A_1`` (cheaper than scaling the result). Returns ``None``
    entries for ``diag="identity"``, whose ``A_n = diag(λ_n)`` is never formed.
    """
    return _scaled_factors(spec, *_prepare("scaled_factors", spec, factors, scales, alpha))


def _scaled_factors(spec: TeRASpec, factors: TeRAFactors, scales: Sequence[Array], alpha: float) -> tuple[Optional[Array], ...]:
    if spec.diag == "identity":
        return (None,) * spec.order
    mode_side, rank_side = scale_sides(spec, scales)
    out = []
    for n, u in enumerate(factors.factors):
        a = u if mode_side is None else mode_side[n][:, None] * u
        a = a if rank_side is None else a * rank_side[n][None, :]
        out.append(a * alpha if n == 0 and alpha != 1.0 else a)
    return tuple(out)


def kron_vectors(vectors: Sequence[Array]) -> Array:
    """``v_1 ⊗ … ⊗ v_k`` for 1-D arrays, C-order (the first vector is the most significant)."""
    out = vectors[0]
    for v in vectors[1:]:
        out = (out[:, None] * v[None, :]).reshape(-1)
    return out


def delta_weight(spec: TeRASpec, factors: TeRAFactors, scales: Sequence[Array], alpha: float = 1.0) -> Array:
    """Materialize ``ΔW`` of shape ``(d_out, d_in)``.

    Args:
        spec: the tensorization and parameterization.
        factors: frozen core and factor matrices matching ``spec``.
        scales: the N vectors λ_n, lengths ``spec.scale_sizes``.
        alpha: global scaling α.

    The network is contracted as a chain of mode products expressed as GEMMs in the cheapest
    order (:func:`tera_tn.core.modeproduct.multi_mode_product`); ``diag="identity"`` uses
    ``ΔW = α G_mat ⊙ (u vᵀ)`` with ``u = ⊗λ_row``, ``v = ⊗λ_col``. Padding is sliced away.
    """
    return _delta_weight(spec, *_prepare("delta_weight", spec, factors, scales, alpha))


def _delta_weight(spec: TeRASpec, factors: TeRAFactors, scales: Sequence[Array], alpha: float) -> Array:
    po, pi = spec.padded_shape
    if spec.diag == "identity":
        p = spec.n_row
        u = kron_vectors(scales[:p]) * alpha
        v = kron_vectors(scales[p:])
        x = factors.core.reshape(po, pi) * u[:, None] * v[None, :]
    else:
        mats = _scaled_factors(spec, factors, scales, alpha)
        x = multi_mode_product(factors.core, list(mats)).reshape(po, pi)
    if (po, pi) != spec.shape:
        x = x[: spec.d_out, : spec.d_in]
    return x


def theoretical_rank(spec: TeRASpec, scales: Sequence[Array]) -> int:
    """The almost-sure rank of ΔW for generic frozen factors, without materializing.

    With every ``U_n`` of full column rank, a generic core and ``α ≠ 0``, and no padding:
    ``rank(ΔW) = min(∏_row r_n, ∏_col r_n)`` where ``r_n = nnz(λ_n)`` for ``diag="rank"`` and
    ``"identity"``, ``r_n = min(nnz(λ_n), R_n)`` for ``diag="mode"``, and
    ``r_n = min(nnz(μ_n), nnz(λ_n))`` for ``diag="both"`` (the rank side's count, also capped by
    the mode side's). With padding the kept rows/columns are C-order prefixes of the padded
    Kronecker factors and the exact prefix rank is used instead. Exact zeros in λ count as zeros; any other finite value counts as non-zero
    (NaN or Inf is refused: ΔW would have no rank).
    """
    check_spec(spec, "theoretical_rank")
    scales = check_scales(spec, scales)
    mode_side, rank_side = scale_sides(spec, scales)
    if spec.diag == "identity":
        # I diag(λ_n) = diag(λ_n) I: rows zeroed where λ_n = 0, the others unit vectors, which
        # are in general position like the rows of a generic U_n.
        mode_side, rank_side = rank_side, None
    # diag(μ_n) U_n zeroes the rows where μ_n = 0; U_n diag(λ_n) keeps every row generic in the
    # span of the nnz(λ_n) kept columns.
    masks = [np.ones(k, dtype=bool) for k in spec.modes] if mode_side is None else [to_numpy(m) != 0 for m in mode_side]
    cols = list(spec.ranks) if rank_side is None else [int(np.count_nonzero(to_numpy(lam))) for lam in rank_side]
    p = spec.n_row
    return min(prefix_rank(masks[:p], cols[:p], spec.d_out), prefix_rank(masks[p:], cols[p:], spec.d_in))
