"""Mode-product chains over activations: ``P = ⊗U_row`` and ``Q = ⊗U_col`` applied to ``(n, ·)``
rows without ever forming them (:func:`project`, :func:`expand`), the ``"factored"`` strategy's
forward chain (:func:`factored_delta`) and its backward (:func:`factored_scale_grads`), and the
λ gradients from ``H = (g P)ᵀ (x Q)`` (:func:`scale_grads_from_h`). Notation and strategies:
:mod:`tera_tn.torch.autograd`.

These are a dozen GEMMs of a few thousand multiply-adds each at reduced ranks and few tokens, so
on the CPU the small ones run on one thread (:func:`single_threaded`).
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from ..contract.strategies import factored_through_product
from .frozen import FrozenNetwork
from .scales import KronVectors

__all__ = [
    "single_threaded",
    "project",
    "expand",
    "pad_cols",
    "factored_delta",
    "scale_grads_from_h",
    "factored_scale_grads",
]

# Elements of H = (gP)ᵀ(xQ) per row block: bounds the backward's transient to 16 MB of fp32
# instead of a full ∏R_row × ∏R_col matrix. Much smaller blocks are slower: every block
# GEMM re-packs the whole (n × ∏R_col) right operand (measured: 256-row blocks at 4096² took
# 2× the time of one GEMM, 1024-row blocks about the same as one GEMM).
_H_BLOCK_ELEMS = 1 << 22


# Multiply-adds below which the network's small kernels run on one thread (see single_threaded).
_SERIAL_WORK = 1 << 22


@contextmanager
def single_threaded(active: bool):
    """Run the enclosed (small) kernels single-threaded when ``active``.

    The factored path is a dozen GEMMs of a few thousand multiply-adds. Multi-threaded, each
    pays a fork/join, and on a loaded machine a 2-thread (96×8)@(8×8) GEMM was measured at
    24 ms (waiting for the second thread to be scheduled) against 4 µs on one thread.
    ``torch.set_num_threads`` costs ~0.2 µs, so toggling it around the small kernels is free.
    """
    # Compiled graphs cannot toggle thread counts (and inductor fuses these small kernels anyway).
    threads = torch.get_num_threads() if active and not torch.compiler.is_compiling() else 1
    if threads == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _small(t: torch.Tensor, work: int) -> bool:
    """Whether a kernel of ``work`` multiply-adds on ``t``'s device should run on one thread."""
    return t.device.type == "cpu" and work < _SERIAL_WORK


def _core_mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` for the core GEMMs: one thread when small (reduced ranks, few tokens)."""
    with single_threaded(_small(a, a.shape[0] * b.shape[0] * b.shape[1])):
        return a @ b


def project(t: torch.Tensor, factors: Sequence[Optional[torch.Tensor]], modes: Sequence[int]) -> torch.Tensor:
    """``t ⊗U`` : ``(n, ∏K)`` → ``(n, ∏R)``, contracting mode ``i`` of ``t`` (size ``K_i``) with ``U_i``.

    ``t`` is read in C-order as ``(n, K_1..K_m)``; ``None`` factors are identities.
    """
    n = t.shape[0]
    if n == 1 and all(u is not None for u in factors):
        # One row (decoding): contract the leading mode and emit it last, so every mode is one
        # plain 2-D GEMM and the modes cycle back to C-order; half the time of the batched form,
        # whose broadcast matmul pays for expands and permutes on such tiny operands.
        v = t
        for u, k in zip(factors, modes):
            v = v.reshape(k, -1).T @ u
        return v.reshape(1, -1)
    sizes = list(modes)
    out_size = math.prod([r if u is None else u.shape[1] for u, r in zip(factors, modes)])
    work = n * max(math.prod(modes), out_size) * len(modes)
    with single_threaded(_small(t, work)):
        for i, u in enumerate(factors):
            if u is None:
                continue
            lead = n * math.prod(sizes[:i])
            trail = math.prod(sizes[i + 1 :])
            k, r = u.shape
            if trail == 1:
                # Last mode: one plain GEMM beats a batch of (r×k)@(k×1) products.
                t = t.reshape(lead, k) @ u
            else:
                t = torch.matmul(u.T, t.reshape(lead, k, trail))
            sizes[i] = r
    return t.reshape(n, math.prod(sizes))


def expand(t: torch.Tensor, factors: Sequence[Optional[torch.Tensor]], ranks: Sequence[int]) -> torch.Tensor:
    """``t ⊗Uᵀ`` : ``(n, ∏R)`` → ``(n, ∏K)``, the adjoint of :func:`project`."""
    return project(t, [None if u is None else u.T for u in factors], ranks)


def pad_cols(t: torch.Tensor, width: int) -> torch.Tensor:
    return t if t.shape[1] == width else F.pad(t, (0, width - t.shape[1]))


def _mul(t: torch.Tensor, v: Optional[torch.Tensor]) -> torch.Tensor:
    return t if v is None else t * v


def factored_delta(net: FrozenNetwork, kr: KronVectors, x2: torch.Tensor):
    """``(ΔW x, s, z, xq)`` for the factored strategy: ``x → ⊙vk → Q → ⊙vr → G_matᵀ (= s) →
    ⊙ur → P (= z) → ⊙uk``. Of the intermediates only what backward reads is returned (the others
    are None): ``s`` for the ``ur`` gradient, ``z`` for ``uk``'s and ``xq`` (before ``⊙vr``) for
    ``vr``'s, so backward never projects again. Where the spec allows it
    (:func:`~tera_tn.contract.strategies.factored_through_product`), ``z`` is one GEMM with the kept
    ``P G Qᵀ`` (:meth:`FrozenNetwork.frozen_product`, one ``d_out × d_in`` tensor per shape group,
    the one the dense strategies keep too)."""
    spec = net.spec
    po, pi = spec.padded_shape
    p = spec.n_row
    if factored_through_product(net.spec):
        # padded columns of x are zeros: only the product's first d_in columns meet data (the
        # Kronecker vectors are one per call, or one per row in mixed batches: slice their last dim)
        z = (x2 * kr.vk[..., : spec.d_in]) @ net.frozen_product()[:, : spec.d_in].T
        return (z * kr.uk)[:, : spec.d_out], None, z, None
    xq = project(_mul(pad_cols(x2, pi), kr.vk), net.col_factors, spec.col_modes)
    s = _core_mm(_mul(xq, kr.vr), net.g_mat.T)
    z = expand(_mul(s, kr.ur), net.row_factors, spec.ranks[:p])
    y = _mul(z, kr.uk)
    return (y[:, : spec.d_out], None if kr.ur is None else s, None if kr.uk is None else z,
            None if kr.vr is None else xq)


def scale_grads_from_h(gp: torch.Tensor, xq: torch.Tensor, g_mat: torch.Tensor, ua: torch.Tensor, v: torch.Tensor):
    """``(∂L/∂ua, ∂L/∂v)`` from ``H = gpᵀ xq``: ``∂ua = (H ⊙ G) v``, ``∂v = (H ⊙ G)ᵀ ua``.

    One GEMM of ``∏R_row × n × ∏R_col``, done in row blocks so the transient stays small.
    """
    r_row, r_col = g_mat.shape
    d_ua = torch.empty(r_row, dtype=gp.dtype, device=gp.device)
    d_v = torch.zeros(r_col, dtype=gp.dtype, device=gp.device)
    block = max(1, min(r_row, _H_BLOCK_ELEMS // max(r_col, 1)))
    gp_t = gp.T.contiguous() if block < r_row else gp.T
    for i in range(0, r_row, block):
        j = min(i + block, r_row)
        h = gp_t[i:j] @ xq
        h.mul_(g_mat[i:j])
        torch.mv(h, v, out=d_ua[i:j])
        d_v.addmv_(h.T, ua[i:j])
    return d_ua, d_v


def factored_scale_grads(net: FrozenNetwork, kr: KronVectors, x2, g2, s, z, xq, need_x: bool):
    """``(grad_x of the ΔW part or None, KronVectors of the gradients)``: the forward chain run
    backwards, sharing ``m2 = (⊙uk → P → ⊙ur)(g) G_mat`` between ``grad_x`` and the column-side
    gradients; ``s``, ``z``, ``xq`` are :func:`factored_delta`'s."""
    spec = net.spec
    po, pi = spec.padded_shape
    p = spec.n_row
    gpad = pad_cols(g2, po)
    if factored_through_product(net.spec):
        w = (gpad * kr.uk) @ net.frozen_product()[:, : spec.d_in]
        d_vk = pad_cols((x2 * w).sum(0)[None], pi)[0]
        gx = w.mul_(kr.vk[..., : spec.d_in]) if need_x else None
        return gx, KronVectors((gpad * z).sum(0), d_vk, None, None)
    xp = pad_cols(x2, pi)
    d_uk = None if kr.uk is None else (gpad * z).sum(0)
    gp = project(_mul(gpad, kr.uk), net.row_factors, spec.row_modes)
    d_ur = None if kr.ur is None else (gp * s).sum(0)
    m2 = _core_mm(_mul(gp, kr.ur), net.g_mat)
    d_vr = None
    if kr.vr is not None:
        if xq is None:
            xq = project(_mul(xp, kr.vk), net.col_factors, spec.col_modes)
        d_vr = (xq * m2).sum(0)
    w = expand(_mul(m2, kr.vr), net.col_factors, spec.ranks[p:]) if need_x or kr.vk is not None else None
    d_vk = None if kr.vk is None else (xp * w).sum(0)
    gx = _mul(w, kr.vk)[:, : spec.d_in] if need_x else None
    return gx, KronVectors(d_uk, d_vk, d_ur, d_vr)
