"""Exact singular values of a TeRA update ΔW from its structure, and a conditioning report.

Matrix form, with ``A_n`` the scaled factors (``U_n diag(λ_n)``, ``diag(μ_n) U_n``,
``diag(μ_n) U_n diag(λ_n)`` or ``diag(λ_n)``) and C-order Kronecker products::

    ΔW = α · B_row · G_mat · B_colᵀ,   B_row = (A_1 ⊗ … ⊗ A_P)[:d_out],  B_col = (A_{P+1} ⊗ … ⊗ A_N)[:d_in]

``G_mat`` is the core reshaped to ``(∏R_row, ∏R_col)``. If ``B_row = Q_row S_row`` with
orthonormal columns in ``Q_row`` (a thin QR), and likewise for columns, then
``ΔW = Q_row (α S_row G_mat S_colᵀ) Q_colᵀ`` and orthonormal factors do not change singular
values::

    σ(ΔW) = σ(α · S_row · G_mat · S_colᵀ)        (a ≤ ∏R_row × ∏R_col matrix)

*Unpadded side.* ``⊗A_n = ⊗(Q_n R_n) = (⊗Q_n)(⊗R_n)`` and ``⊗Q_n`` has orthonormal columns, so
``S = ⊗R_n`` is never formed: the small ``R_n`` are applied to the core by mode products.

*Padded side.* Keeping the first ``d`` rows of a Kronecker product breaks that identity
(the QR of a row-sliced Kronecker product is not the Kronecker product of QRs). The kept rows
are a C-order prefix: with ``rest = A_2 ⊗ … ⊗ A_k`` of ``s`` rows and ``d = q·s + t``,

    (A_1 ⊗ rest)[:d] = [ A_1[:q] ⊗ rest ;  A_1[q] ⊗ rest[:t] ]

The two blocks occupy disjoint rows, so a block-diagonal orthonormal factor pulls out of both:
``A_1[:q] ⊗ rest = (Q ⊗ Q_rest)(R ⊗ R_rest)`` and ``A_1[q] ⊗ rest[:t] = (1 ⊗ Q')(A_1[q] ⊗ S')``
with ``rest[:t] = Q' S'`` recursively. Stacking ``[R ⊗ R_rest ; A_1[q] ⊗ S']`` (then one small QR
to compress it to ``∏R`` rows) gives ``S`` exactly, using only orthogonal transformations —
no Gram matrix, so small singular values keep their accuracy.

Cost: QRs of ``K_n × R_n`` factors, mode products on the core, and one SVD of the
``∏R_row × ∏R_col`` core-sized matrix, instead of ``d_out·d_in·ΣK_n`` to materialize plus the
SVD of ``d_out × d_in``. At full ranks the core is as large as ΔW, so the saving is only the
materialization; at ranks ``K_n/2`` of an order-6 4096² layer the SVD is 512 × 512 instead
of 4096 × 4096 (see ``bench/bench_spectrum.py``). ``diag="identity"`` has a full-size core,
so the structured route is exact but not cheaper there.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from types import ModuleType
from typing import Optional, Sequence

import numpy as np

from ..backends import Array, dtype_name, namespace, to_numpy
from ..core.factors import TeRAFactors
from ..core.modeproduct import multi_mode_product
from ..core.network import (TeRANetwork, decomposable_network, dense_factor_matrices, generic_rank, network_of,
                            scale_sides, spec_and_scales)
from ..core.workspace import default_scope
from .rank import RankSummary, dtype_eps, summarize_singular_values
from ..core.spec import TeRASpec

__all__ = [
    "tera_singular_values",
    "network_singular_values",
    "tera_rank_summary",
    "TeRAConditioning",
    "tera_conditioning",
    "theoretical_multilinear_ranks",
    "prefix_kron_r",
]


def _kron(backend: ModuleType, mats: Sequence[Array]) -> Array:
    """``mats[0] ⊗ … ⊗ mats[-1]`` (at least one matrix) with ``backend``'s kron."""
    out = mats[0]
    for m in mats[1:]:
        out = backend.kron(out, m)
    return out


# --------------------------------------------------------------------------------------------
# structured R factors
# --------------------------------------------------------------------------------------------
def prefix_kron_r(mats: Sequence[Array], d: int) -> Array:
    """An ``S`` with ``(A_1 ⊗ … ⊗ A_k)[:d] = Q S`` for some ``Q`` with orthonormal columns.

    Args:
        mats: ``A_n`` of shape ``(K_n, R_n)`` (one backend), C-order Kronecker.
        d: number of leading rows kept, ``1 ≤ d ≤ ∏K_n``.

    Returns:
        ``S`` of shape ``(s, ∏R_n)`` with ``s ≤ min(d, ∏R_n)``, upper-triangular up to the
        Kronecker structure, such that ``Sᵀ S = Bᵀ B`` and ``σ(S M) = σ(B M)`` for any ``M``
        (``B`` the sliced product). When ``d = ∏K_n`` it is ``⊗ R_n`` (Kronecker of the factor
        QRs); otherwise the prefix recursion of the module docstring.
    """
    mats = list(mats)
    if not mats:
        raise ValueError("prefix_kron_r needs at least one matrix")
    total = math.prod(int(a.shape[0]) for a in mats)
    if not 1 <= d <= total:
        raise ValueError(f"d must be in [1, {total}] (rows of the Kronecker product), got {d}")
    return _prefix_r(namespace(mats[0]), mats, d, False)


def _prefix_r(backend: ModuleType, mats: list, d: int, grad: bool) -> Array:
    """:func:`prefix_kron_r` of checked arguments (``1 ≤ d ≤ ∏K_n``), in ``backend``; ``grad``
    keeps the QRs differentiable."""
    sizes = [int(a.shape[0]) for a in mats]
    total = math.prod(sizes)
    if d == total:
        return _kron(backend, [backend.qr_r(a, grad) for a in mats])
    rest_size = total // sizes[0]
    q, t = divmod(d, rest_size)
    blocks = []
    if q:
        # Rows with leading digit < q: a full Kronecker product of A_1[:q] with the rest.
        blocks.append(_kron(backend, [backend.qr_r(mats[0][:q], grad)] + [backend.qr_r(a, grad) for a in mats[1:]]))
    if t:
        # Rows with leading digit q: one row of A_1 times a prefix of the rest (recursion).
        blocks.append(_kron(backend, [mats[0][q : q + 1], _prefix_r(backend, mats[1:], t, grad)]))
    s = blocks[0] if len(blocks) == 1 else backend.concat(blocks)
    # Compress to at most ∏R rows; the extra QR is small and keeps the final SVD square-ish.
    return backend.qr_r(s, grad) if s.shape[0] > s.shape[1] else s


def _core_matrix(backend: ModuleType, spec: TeRASpec, mats: list, core: Array, grad: bool) -> Array:
    """``S_row · G_mat · S_colᵀ`` (α already inside ``mats[0]``), in ``backend``."""
    p = spec.n_row
    rows_padded, cols_padded = (x > 0 for x in spec.padding)
    # Padded sides: the prefix recursion's S (module docstring), applied after the core.
    s_row = _prefix_r(backend, mats[:p], spec.d_out, grad) if rows_padded else None
    s_col = _prefix_r(backend, mats[p:], spec.d_in, grad) if cols_padded else None
    modal: list[Optional[Array]] = [None] * spec.order
    # Unpadded sides: apply the small R_n by mode products (never forming ⊗R_n).
    if not rows_padded:
        modal[:p] = [backend.qr_r(a, grad) for a in mats[:p]]
    if not cols_padded:
        modal[p:] = [backend.qr_r(a, grad) for a in mats[p:]]
    with default_scope():
        x = multi_mode_product(core, modal)
    x = x.reshape(math.prod(x.shape[:p]), math.prod(x.shape[p:]))
    if s_row is not None:
        x = s_row @ x
    if s_col is not None:
        x = x @ s_col.T
    return x


def tera_singular_values(
    spec: TeRASpec | TeRANetwork,
    factors: Optional[TeRAFactors] = None,
    scales: Optional[Sequence[Array]] = None,
    alpha: float = 1.0,
) -> Array:
    """All ``min(d_out, d_in)`` singular values of ``ΔW``, descending, without forming ΔW.

    Args:
        spec: the tensorization (any diag placement, reduced ranks, padding), or a
            :class:`tera_tn.core.network.TeRANetwork` carrying all four arguments.
        factors: frozen core ``G`` (shape ``spec.ranks``) and ``U_n`` (``(K_n, R_n)``).
        scales: the ``N`` vectors ``λ_n`` (lengths ``spec.scale_sizes``).
        alpha: the global scale α (singular values scale by ``|α|``).

    Returns:
        A 1-D array of length ``min(d_out, d_in)`` in the backend/device of the scales (a torch
        or JAX array if any operand is one), dtype float32 for half-precision inputs, else theirs.
        Entries past ``min(rows, cols)`` of the small core matrix are exact zeros — ΔW has at
        most that rank. Equal to ``svdvals(delta_weight(...))`` up to rounding (tested), and
        differentiable with respect to torch scales.

    Cost: QR of each ``K_n × R_n`` factor, mode products on the core and an SVD of a
    ``≤ ∏R_row × ∏R_col`` matrix (see the module docstring for padded specs).
    """
    net = decomposable_network(spec, factors, scales, alpha, "tera_singular_values")
    mats = dense_factor_matrices(net)
    backend = namespace(net.factors.core)
    return _singular_values(backend, net.spec, mats, net.factors.core)


def network_singular_values(net: TeRANetwork) -> Array:
    """:func:`tera_singular_values` of a validated network whose operands already share one
    backend and a dtype it decomposes (what :func:`tera_tn.core.network.decomposable_network`
    returns, or seeded numpy float64 factors and scales): nothing is checked or converted again."""
    mats = dense_factor_matrices(net)
    backend = namespace(net.factors.core)
    return _singular_values(backend, net.spec, mats, net.factors.core)


def _singular_values(backend: ModuleType, spec: TeRASpec, mats: list, core: Array) -> Array:
    """:func:`tera_singular_values` from the scaled factors and the core (one decomposable dtype),
    in their ``backend``."""
    grad = backend.needs_grad([*mats, core])
    sv = backend.svdvals(_core_matrix(backend, spec, mats, core, grad))
    k = min(spec.d_out, spec.d_in)
    if sv.shape[0] < k:
        sv = backend.concat([sv, backend.zeros((k - sv.shape[0],), sv)])
    return sv


def tera_rank_summary(
    spec: TeRASpec | TeRANetwork,
    factors: Optional[TeRAFactors] = None,
    scales: Optional[Sequence[Array]] = None,
    alpha: float = 1.0,
    *,
    dtype: object = None,
    rtol: float | None = None,
    atol: float | None = None,
    energy: float = 0.99,
) -> RankSummary:
    """:class:`tera_tn.analysis.rank.RankSummary` of ΔW from its structured spectrum.

    ``dtype`` picks whose eps sets the default threshold ``max(d_out, d_in)·eps·σ_max``
    (default: the computation dtype). ``dtype="float32"`` predicts what a dense float32 SVD of
    the materialized ΔW would report, even when the spectrum was computed in float64. Takes a
    :class:`tera_tn.core.network.TeRANetwork` in place of ``(spec, factors, scales, alpha)``.
    """
    net = decomposable_network(spec, factors, scales, alpha, "tera_rank_summary")
    mats = dense_factor_matrices(net)
    backend = namespace(net.factors.core)
    sv = _singular_values(backend, net.spec, mats, net.factors.core)
    if dtype is None:
        dtype = dtype_name(sv.dtype)
    return summarize_singular_values(sv, net.spec.shape, dtype, rtol=rtol, atol=atol, energy=energy)


# --------------------------------------------------------------------------------------------
# conditioning
# --------------------------------------------------------------------------------------------
def _cond(s: np.ndarray) -> float:
    s = np.sort(np.abs(s))[::-1]
    if s.size == 0:
        return 1.0
    return float(s[0] / s[-1]) if s[-1] > 0 else math.inf


def _jsonable(v):
    if isinstance(v, float) and not math.isfinite(v):
        return "inf" if v > 0 else ("-inf" if v < 0 else "nan")
    if isinstance(v, dict):
        return {k: _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    return v


@dataclass(frozen=True)
class TeRAConditioning:
    """Why the numerical rank of ΔW can fall short of its theoretical rank.

    Singular values of a Kronecker product are products of the factors' singular values, so
    ``cond(⊗A_n) = ∏ cond(A_n)``: modest per-factor conditioning multiplies across modes.
    ``σ_r(ΔW) ≥ σ_min(B_row)·σ_r(G_mat)·σ_min(B_col)`` then bounds how small the last
    theoretically non-zero singular value can get; when ``σ_r/σ_1`` drops below
    ``max(d_out, d_in)·eps(dtype)`` a dense SVD in that dtype cannot tell it from rounding noise.

    Attributes:
        spec: ``str(spec)``.
        shape: ``(d_out, d_in)``.
        theoretical_rank: the almost-sure rank for generic factors (:func:`tera_tn.theoretical_rank`).
        factor_conditions: ``cond(A_n)`` of each scaled ``K_n × R_n`` factor (``inf`` if it
            lost column rank, e.g. a zero in λ_n).
        row_condition, col_condition: ``∏ cond(A_n)`` over row/column modes — exactly
            ``cond(⊗A_n)`` without padding, an estimate with it.
        core_condition: ``cond(G_mat)`` over its ``min(∏R_row, ∏R_col)`` singular values
            (``None`` when ``include_core=False``).
        condition_on_rank: ``σ_1 / σ_r`` of ΔW with ``r`` the theoretical rank — the number that
            decides whether a dense SVD sees rank ``r``.
        numerical_rank_by_dtype: ``#{σ_i > max(d_out, d_in)·eps(dtype)·σ_1}`` for float64,
            float32, bfloat16 and float16: what a dense SVD of ΔW stored in that dtype reports
            (to within the dtype's own rounding noise near the threshold). A dtype is left out
            when ``max(d_out, d_in)·eps ≥ 1`` (the rule then reports 0 for any matrix).
        spectrum: :class:`RankSummary` at the float64 threshold.
    """

    spec: str
    shape: tuple[int, int]
    theoretical_rank: int
    factor_conditions: tuple[float, ...]
    row_condition: float
    col_condition: float
    core_condition: Optional[float]
    condition_on_rank: float
    numerical_rank_by_dtype: dict = field(default_factory=dict)
    spectrum: Optional[RankSummary] = None

    @property
    def rank_gap(self) -> dict:
        """``theoretical_rank − numerical rank`` per dtype."""
        return {k: self.theoretical_rank - v for k, v in self.numerical_rank_by_dtype.items()}

    def to_dict(self) -> dict:
        d = asdict(self)
        d["spectrum"] = None if self.spectrum is None else self.spectrum.to_dict()
        d["rank_gap"] = self.rank_gap
        return _jsonable(d)

    def __str__(self) -> str:
        f = lambda x: "inf" if x is None or math.isinf(x) else f"{x:.3g}"  # noqa: E731
        lines = [
            f"Conditioning of ΔW for {self.spec}",
            f"  theoretical rank {self.theoretical_rank}; σ_1/σ_r = {f(self.condition_on_rank)}",
            "  cond(A_n): " + ", ".join(f(c) for c in self.factor_conditions),
            f"  cond(⊗A_row) ≈ {f(self.row_condition)}, cond(⊗A_col) ≈ {f(self.col_condition)}"
            + ("" if self.core_condition is None else f", cond(G_mat) = {f(self.core_condition)}"),
            "  numerical rank at max(m,n)·eps·σ_1: "
            + ", ".join(
                f"{k} {v} (gap {self.theoretical_rank - v})" for k, v in self.numerical_rank_by_dtype.items()
            ),
        ]
        return "\n".join(lines)


def tera_conditioning(
    spec: TeRASpec | TeRANetwork,
    factors: Optional[TeRAFactors] = None,
    scales: Optional[Sequence[Array]] = None,
    alpha: float = 1.0,
    *,
    include_core: bool = True,
) -> TeRAConditioning:
    """Conditioning report of ΔW (see :class:`TeRAConditioning`), computed in float64.

    Uses the structured spectrum (:func:`tera_singular_values`) and the singular values of
    each small factor. ``include_core`` adds ``cond(G_mat)``, one more SVD of the
    ``∏R_row × ∏R_col`` core (as large as ΔW at full ranks). Takes a
    :class:`tera_tn.core.network.TeRANetwork` in place of ``(spec, factors, scales, alpha)``.
    """
    net = network_of(spec, factors, scales, alpha, "tera_conditioning")
    if not isinstance(include_core, bool):
        raise ValueError(f"include_core must be True or False, got {include_core!r}")
    net = net.to(np.empty(0, dtype=np.float64))
    spec, core = net.spec, net.factors.core
    mats = dense_factor_matrices(net)
    r = generic_rank(spec, net.scales)
    p = spec.n_row
    conds = tuple(_cond(np.linalg.svd(a, compute_uv=False)) for a in mats)
    core_cond = None
    if include_core:
        rows = math.prod(spec.ranks[:p])
        core_cond = _cond(np.linalg.svd(np.asarray(core).reshape(rows, -1), compute_uv=False))
    sv = np.asarray(_singular_values(namespace(core), spec, mats, core), dtype=np.float64)
    by_dtype = {}
    for name in ("float64", "float32", "bfloat16", "float16"):
        rtol = max(spec.shape) * dtype_eps(name)
        if rtol >= 1.0:
            # max(m, n)·eps ≥ 1 (bfloat16 from 128 rows on): the default rule would call every
            # matrix rank 0, which says nothing about ΔW, so that dtype is left out.
            continue
        by_dtype[name] = int(np.count_nonzero(sv > rtol * (float(sv[0]) if sv.size else 0.0)))
    cond_r = math.inf if r == 0 or sv[r - 1] == 0 else float(sv[0] / sv[r - 1])
    return TeRAConditioning(
        spec=str(spec),
        shape=spec.shape,
        theoretical_rank=r,
        factor_conditions=conds,
        row_condition=math.prod(conds[:p]),
        col_condition=math.prod(conds[p:]),
        core_condition=core_cond,
        condition_on_rank=cond_r,
        numerical_rank_by_dtype=by_dtype,
        spectrum=summarize_singular_values(sv, spec.shape, "float64"),
    )


# --------------------------------------------------------------------------------------------
# multilinear ranks
# --------------------------------------------------------------------------------------------
def theoretical_multilinear_ranks(spec: TeRASpec | TeRANetwork, scales: Optional[Sequence[Array]] = None) -> tuple[int, ...]:
    """Almost-sure multilinear ranks of the network tensor ``X`` (shape ``spec.modes``).

    ``X = G' ×_1 B_1 … ×_N B_N`` with ``B_n`` of full column rank ``r_n`` (``r_n = nnz(λ_n)``
    for ``"rank"``/``"identity"``, ``min(nnz(λ_n), R_n)`` for ``"mode"``,
    ``min(nnz(μ_n), nnz(λ_n))`` for ``"both"``) and a generic core
    ``G'`` of shape ``(r_1..r_N)``, so the mode-n unfolding has rank ``min(r_n, ∏_{m≠n} r_m)``.

    This is the tensor before padding is sliced away; for unpadded specs it equals
    ``multilinear_ranks(tensorize(spec, ΔW))``. Takes a :class:`tera_tn.core.network.TeRANetwork`
    in place of ``(spec, scales)``.
    """
    spec, scales = spec_and_scales(spec, scales, "theoretical_multilinear_ranks")
    mode_side, rank_side = scale_sides(spec, scales)
    r = list(spec.ranks)
    for side in (mode_side, rank_side):
        if side is not None:
            r = [min(rn, int(np.count_nonzero(to_numpy(v)))) for rn, v in zip(r, side)]
    total = math.prod(r)
    return tuple(min(rn, total // rn) if rn else 0 for rn in r)
