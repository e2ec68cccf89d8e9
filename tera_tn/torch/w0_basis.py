"""TeRA in the adapted weight's own singular coordinates (``basis="w0"``).

With ``W0 = U0 S V0ᵀ`` (thin SVD, singular values descending) the update is

    ``ΔW = α U0[:, :a] (G_mat ⊙ u vᵀ) V0[:, :b]ᵀ``,  ``u = ⊗λ_row`` (length ``a = ∏R_row``),
    ``v = ⊗λ_col`` (length ``b = ∏R_col``),

the rank-side network with ``P = ⊗U_row`` and ``Q = ⊗U_col`` replaced by W0's leading singular
vectors: the trained Kronecker pattern scales W0's principal directions, coarse blocks of them
(the first mode's entries) to fine (the last mode's). ``a`` and ``b`` are at most
``min(d_out, d_in)``; :func:`cap_ranks` makes a full-rank spec fit. On the mode side the same
change would do nothing (``U0 M V0ᵀ`` is again an i.i.d. Gaussian matrix), so the spec must place
its diagonals on the rank side.

**Reproducibility.** The bases are recomputed from ``W0`` whenever an adapter is created or
loaded and never stored: a float64 LAPACK SVD on the CPU (whatever device the layer is on), with
each singular pair's sign fixed so that the largest-magnitude entry of ``U0[:, i]`` is positive.
Another process with another thread count agrees to 1e-9 (tested); another LAPACK build agrees to
about ``eps_64 · σ_max / gap_i`` per vector, which is far below float32 resolution unless two of
W0's singular values nearly coincide. Checkpoints pin ``‖W0‖_F`` so a file never pairs its λ with
another base weight.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

from ..core.network import kron_vectors
from ..core.spec import TeRASpec
from .frozen import FrozenNetwork

__all__ = ["w0_bases", "cap_ranks", "basis_sizes", "check_basis_spec", "w0_basis_delta"]


def basis_sizes(spec: TeRASpec) -> tuple[int, int]:
    """``(∏R_row, ∏R_col)``: how many of W0's left and right singular vectors the update uses."""
    return math.prod(spec.ranks[: spec.n_row]), math.prod(spec.ranks[spec.n_row :])


def _cap(ranks: Sequence[int], modes: Sequence[int], limit: int) -> tuple[int, ...]:
    """Ranks with product ≤ ``limit``: each scaled by the same factor and floored, then raised one
    at a time (largest remaining headroom first) while the product still fits."""
    if math.prod(ranks) <= limit:
        return tuple(ranks)
    f = (limit / math.prod(ranks)) ** (1.0 / len(ranks))
    out = [max(1, math.floor(r * f)) for r in ranks]
    grown = True
    while grown:
        grown = False
        for i in sorted(range(len(out)), key=lambda i: out[i] / ranks[i]):
            trial = out[:i] + [out[i] + 1] + out[i + 1 :]
            if trial[i] <= min(ranks[i], modes[i]) and math.prod(trial) <= limit:
                out, grown = trial, True
                break
    return tuple(out)


def cap_ranks(spec: TeRASpec) -> TeRASpec:
    """``spec`` with each side's ranks lowered (evenly, see :func:`_cap`) until its product is at
    most ``min(d_out, d_in)``, the number of singular vectors W0 has; unchanged when it fits."""
    r = min(spec.shape)
    p = spec.n_row
    ranks = _cap(spec.ranks[:p], spec.row_modes, r) + _cap(spec.ranks[p:], spec.col_modes, r)
    if ranks == spec.ranks:
        return spec
    return TeRASpec(row_modes=spec.row_modes, col_modes=spec.col_modes, ranks=ranks, diag=spec.diag,
                    d_out=spec.d_out, d_in=spec.d_in)


def check_basis_spec(spec: TeRASpec, where: str) -> None:
    """Raise unless ``spec`` can use W0's bases: rank-side diagonals, ``∏R`` per side ≤ ``min(d_out, d_in)``."""
    if spec.diag != "rank":
        raise ValueError(f"{where}: basis='w0' puts the trainable diagonals in W0's singular coordinates, so the spec "
                         f"needs diag='rank', got diag={spec.diag!r} ({spec}); on the mode side W0's bases change nothing")
    a, b = basis_sizes(spec)
    r = min(spec.shape)
    if a > r or b > r:
        raise ValueError(f"{where}: basis='w0' uses ∏R_row = {a} left and ∏R_col = {b} right singular vectors of W0, "
                         f"which has {r}; lower the spec's ranks (tera_tn.torch.w0_basis.cap_ranks(spec) does it "
                         "evenly, as the configs' rank policy does)")


def w0_bases(w0: torch.Tensor, a: int, b: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(U0[:, :a], V0[:, :b])`` of ``w0`` ``(d_out, d_in)``: float64 on the CPU, columns sorted by
    singular value (descending), each pair's sign fixed by the largest-magnitude entry of ``U0``'s column."""
    u, _, vh = torch.linalg.svd(w0.detach().to("cpu", torch.float64), full_matrices=False)
    sign = torch.sign(u.gather(0, u.abs().argmax(0, keepdim=True)))[0]
    sign[sign == 0] = 1.0
    return (u * sign)[:, :a].contiguous(), (vh.T * sign)[:, :b].contiguous()


def w0_basis_delta(net: FrozenNetwork, lams: Sequence[torch.Tensor], alpha: float,
                   bases: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """``ΔW = α U0 (G_mat ⊙ u vᵀ) V0ᵀ`` ``(d_out, d_in)`` in the operands' dtype, differentiable in ``lams``
    (``net`` and ``bases`` in one dtype on one device)."""
    p = net.spec.n_row
    u = kron_vectors(list(lams[:p])) * alpha
    v = kron_vectors(list(lams[p:]))
    left, right = bases
    return left @ (net.g_mat * u[:, None] * v[None, :]) @ right.T
