"""The diagonal scalings of a TeRA layer as Kronecker vectors, and their gradients.

With the notation of :mod:`tera_tn.torch.autograd`: the mode-side vectors ``uk = ⊗μ_row``,
``vk = ⊗μ_col`` (lengths ``∏K``) and the rank-side ``ur = ⊗λ_row``, ``vr = ⊗λ_col`` (lengths
``∏R``), built from the per-mode vectors of one adapter or of a table of adapters at once
(:func:`scale_kron`), and the per-mode gradients from those of the Kronecker vectors
(:func:`scale_grads`).
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Sequence

import torch

from ..core.network import scale_sides
from .frozen import FrozenNetwork

__all__ = ["KronVectors", "scale_kron", "scale_grads"]


class KronVectors(NamedTuple):
    """The Kronecker vectors of one forward: mode side ``uk = ⊗μ_row``, ``vk = ⊗μ_col`` (lengths
    ``∏K``) and rank side ``ur = ⊗λ_row``, ``vr = ⊗λ_col`` (lengths ``∏R``); ``None`` where the
    placement has no such side. α is folded into ``ur``, or into ``uk`` when there is no rank side."""

    uk: Optional[torch.Tensor]
    vk: Optional[torch.Tensor]
    ur: Optional[torch.Tensor]
    vr: Optional[torch.Tensor]


def _rows_first(t: torch.Tensor) -> torch.Tensor:
    return t if t.dim() == 1 else t.T


def _kron_rows(vectors: Sequence[torch.Tensor]) -> torch.Tensor:
    """:func:`~tera_tn.core.network.kron_vectors` over the last dim, for one vector ``(n_k,)`` or a row per adapter ``(a, n_k)``."""
    out = vectors[0]
    for v in vectors[1:]:
        out = (out[..., :, None] * v[..., None, :]).reshape(*out.shape[:-1], -1)
    return out


def scale_kron(net: FrozenNetwork, lams: Sequence[torch.Tensor], alpha) -> KronVectors:
    """The Kronecker vectors of one adapter (1-D ``lams``, float ``alpha``) or of ``a`` adapters at
    once (``lams`` of shape ``(a, size_n)``, ``alpha`` a ``(a, 1)`` tensor), then ``(a, ∏…)`` each."""
    p = net.spec.n_row
    # scale_sides splits each vector along its first dim: put the vector dim first for rows.
    sides = scale_sides(net.spec, [_rows_first(lam) for lam in lams])
    mode_side, rank_side = (None if side is None else [_rows_first(s) for s in side] for side in sides)
    uk = vk = ur = vr = None
    if rank_side is not None:
        ur, vr = _kron_rows(rank_side[:p]) * alpha, _kron_rows(rank_side[p:])
    if mode_side is not None:
        uk, vk = _kron_rows(mode_side[:p]), _kron_rows(mode_side[p:])
        if ur is None:
            uk = uk * alpha
    return KronVectors(uk, vk, ur, vr)


def _kron_grads(dk: torch.Tensor, lams: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Gradients of each λ_p from the gradient ``dk`` of ``kron(λ_1..λ_m)`` (C-order):
    ``∂λ_p`` is ``dk`` contracted with every ``λ_q, q ≠ p`` — leading modes from the left,
    trailing ones from the right, one matvec each (``torch.einsum`` would spend longer finding a
    path than computing)."""
    sizes = [lam.shape[0] for lam in lams]
    out = []
    for p in range(len(lams)):
        t = dk
        for q in range(p):
            t = lams[q] @ t.reshape(sizes[q], -1)
        for q in range(len(lams) - 1, p, -1):
            t = t.reshape(-1, sizes[q]) @ lams[q]
        out.append(t.reshape(sizes[p]) if p or len(lams) > 1 else t.clone())
    return out


def scale_grads(net: FrozenNetwork, lams: Sequence[torch.Tensor], alpha: float, dk: KronVectors) -> list[torch.Tensor]:
    """Gradients of the per-mode vectors from those of the Kronecker vectors (``μ_n`` then
    ``λ_n`` concatenated for ``diag="both"``)."""
    p = net.spec.n_row
    mode_side, rank_side = scale_sides(net.spec, lams)
    sides = []
    # ur = α·kron(λ_row), so ∂L/∂kron(λ_row) = α ∂L/∂ur (likewise uk when it carries α).
    if mode_side is not None:
        a = alpha if rank_side is None else 1.0
        sides.append(_kron_grads(dk.uk * a, mode_side[:p]) + _kron_grads(dk.vk, mode_side[p:]))
    if rank_side is not None:
        sides.append(_kron_grads(dk.ur * alpha, rank_side[:p]) + _kron_grads(dk.vr, rank_side[p:]))
    return sides[0] if len(sides) == 1 else [torch.cat(pair) for pair in zip(*sides)]
