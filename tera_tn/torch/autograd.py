"""Memory-lean autograd for a TeRA linear layer: ``y = x (W0 + ΔW)ᵀ + b``.

Shapes: ``x`` is ``(n, d_in)`` (callers flatten leading dims), ``W0`` is ``(d_out, d_in)``,
``y`` is ``(n, d_out)``. The update is written in its Kronecker form:

* ``diag="rank"`` / ``"identity"``: ``ΔW = α P (G_mat ⊙ u vᵀ) Qᵀ`` with ``P = ⊗U_row``,
  ``Q = ⊗U_col`` (``I`` for identity), ``u = ⊗λ_row``, ``v = ⊗λ_col`` (lengths ``∏R``).
* ``diag="mode"``: ``ΔW = α diag(u) P G_mat Qᵀ diag(v)`` with ``u``, ``v`` of lengths ``∏K``.
* ``diag="both"``: both at once, ``ΔW = α diag(u_K) P (G_mat ⊙ u_R v_Rᵀ) Qᵀ diag(v_K)`` with the
  mode-side Kronecker vectors ``u_K = ⊗μ_row``, ``v_K = ⊗μ_col`` and the rank-side ``u_R``, ``v_R``.

``P`` and ``Q`` are never formed: multiplying by them is a chain of small mode products
(:func:`project` / :func:`expand`). Padding (``∏K > d``) is handled by zero-padding ``x`` and
``g`` and slicing the outputs.

Two strategies, both exact:

* ``"materialize"``: forward builds ``W0 + ΔW`` (one chain of mode products, base added in the
  same pass) and runs ONE GEMM. Backward recomputes the chain instead of keeping a
  ``d_out × d_in`` tensor alive per layer, takes ``grad_x = g (W0 + ΔW)`` and gets the λ
  gradients from ``H = (g P)ᵀ (x Q)`` (``∏R_row × ∏R_col``, built in cache-sized row blocks
  and reduced against ``G`` at once) — never from the dense ``gᵀ x``.
* ``"factored"``: forward is the base GEMM plus ``x → Q → G → P`` (no ``d_out × d_in``
  intermediate); backward shares the ``(g P ⊙ u) G_mat`` product between ``grad_x`` and the
  column-scale gradients and reuses the forward's core output for the row scales.
* ``"dense"``: forward as ``"materialize"``. Backward takes the dense weight gradient
  ``D = gᵀ x`` (one GEMM, as full fine-tuning does) and pulls it back through the network on
  the ``d_out × d_in`` grid: ``H = Pᵀ D Q`` is one chain of mode products over a weight-sized
  tensor instead of two over the activations, so it wins once the token count exceeds the width
  (the shapes of training: ``n = batch × sequence`` in the thousands, widths 384–4096). Every
  placement of the diagonals goes this way (mode-side gradients read ``D ⊙ N`` with
  ``N = P (G ⊙ u_R v_Rᵀ) Qᵀ``, the matrix the forward built anyway).

Computation runs in the dtype of ``x`` (fp32, bf16, fp16): the GEMMs are the cost and must run
in the input dtype to be fast, and BLAS accumulates half-precision GEMMs in fp32 internally.
λ stay fp32 parameters; their (small) gradients are returned in fp32.
"""

from __future__ import annotations

import math
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import NamedTuple, Optional, Sequence

import torch
import torch.nn.functional as F

from ..core.modeproduct import multi_mode_product
from ..core.network import _scaled_factors, kron_vectors, scale_sides
from ..core.spec import TeRASpec

__all__ = [
    "FrozenNetwork",
    "check_input",
    "compute_dtype",
    "non_finite",
    "TeRALinearFunction",
    "tera_linear",
    "merged_weight",
    "mixed_delta",
    "project",
    "expand",
]

# Elements of H = (gP)ᵀ(xQ) per row block: bounds the backward's transient to 16 MB of fp32
# instead of a full ∏R_row × ∏R_col matrix. Much smaller blocks are slower: every block
# GEMM re-packs the whole (n × ∏R_col) right operand (measured: 256-row blocks at 4096² took
# 2× the time of one GEMM, 1024-row blocks about the same as one GEMM).
_H_BLOCK_ELEMS = 1 << 22


# Multiply-adds below which the network's small kernels run on one thread (see _serial).
_SERIAL_WORK = 1 << 22


@contextmanager
def _serial(active: bool):
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
    with _serial(_small(a, a.shape[0] * b.shape[0] * b.shape[1])):
        return a @ b


@dataclass(frozen=True)
class FrozenNetwork:
    """Frozen operands of one shape group, in one dtype and on one device.

    Attributes:
        spec: the spec they belong to.
        core: ``G`` of shape ``spec.ranks``.
        factors: ``U_n`` of shape ``(K_n, R_n)``; all ``None`` for ``diag="identity"``.
    """

    spec: TeRASpec
    core: torch.Tensor
    factors: tuple[Optional[torch.Tensor], ...]

    @property
    def g_mat(self) -> torch.Tensor:
        """``G`` as a ``(∏R_row, ∏R_col)`` matrix (a view)."""
        p = self.spec.n_row
        return self.core.reshape(math.prod(self.spec.ranks[:p]), math.prod(self.spec.ranks[p:]))

    def to(self, dtype: torch.dtype, device: torch.device) -> "FrozenNetwork":
        """The same operands in ``dtype`` on ``device`` (``self`` when nothing changes)."""
        core = self.core.to(device=device, dtype=dtype)
        factors = tuple(None if u is None else u.to(device=device, dtype=dtype) for u in self.factors)
        if core is self.core and all(a is b for a, b in zip(factors, self.factors)):
            return self
        return FrozenNetwork(self.spec, core, factors)

    def frozen_product(self) -> torch.Tensor:
        """``P G Qᵀ`` padded to ``(∏K_row, ∏K_col)``, computed once per network and kept.

        With the diagonals on the mode side only (``diag="mode"``) this is all of ``ΔW`` but the
        diagonals, ``ΔW = α diag(⊗μ_row) P G Qᵀ diag(⊗μ_col)``, so such a layer's forward and
        backward are elementwise passes and GEMMs with no mode products at all. The bank holds one
        network per (shape group, dtype, device), so this costs one ``d_out × d_in`` tensor per
        shape group, shared by every layer of the group.
        """
        found = self.__dict__.get("_frozen_product")
        if found is None:
            # A tensor made under inference_mode could never join an autograd graph later.
            with torch.inference_mode(False), torch.no_grad():
                found = multi_mode_product(self.core, list(self.factors)).reshape(self.spec.padded_shape)
            self.__dict__["_frozen_product"] = found  # a cache, not a field: bypass the frozen setattr
        return found

    @property
    def row_factors(self) -> tuple[Optional[torch.Tensor], ...]:
        return self.factors[: self.spec.n_row]

    @property
    def col_factors(self) -> tuple[Optional[torch.Tensor], ...]:
        return self.factors[self.spec.n_row :]


# --- the building blocks ---------------------------------------------------------------------


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
    with _serial(_small(t, work)):
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


def _as(t: Optional[torch.Tensor], dtype: torch.dtype) -> Optional[torch.Tensor]:
    # Tensor.to is not free even when nothing changes; this runs ~20 times per training step.
    return t if t is None or t.dtype == dtype else t.to(dtype)


def _pad_cols(t: torch.Tensor, width: int) -> torch.Tensor:
    return t if t.shape[1] == width else F.pad(t, (0, width - t.shape[1]))


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


def merged_weight(
    net: FrozenNetwork, lams: Sequence[torch.Tensor], alpha: float, w0: Optional[torch.Tensor]
) -> torch.Tensor:
    """``W0 + ΔW`` (or ``ΔW`` when ``w0`` is None) as a fresh ``(d_out, d_in)`` tensor.

    The base is added in place into the chain's output, so the merged weight costs the chain
    plus one read of ``W0`` and never a second d_out×d_in temporary.
    """
    spec = net.spec
    po, pi = spec.padded_shape
    if spec.diag in ("identity", "mode"):
        # ΔW = α diag(u) F diag(v): F = G_mat for identity factors, the cached P G Qᵀ for "mode"
        p = spec.n_row
        u = kron_vectors(list(lams[:p])) * alpha
        v = kron_vectors(list(lams[p:]))
        x = (net.g_mat if spec.diag == "identity" else net.frozen_product()) * u[:, None]
        x.mul_(v[None, :])
    else:
        # A FrozenNetwork has the ``factors`` attribute that _scaled_factors reads.
        x = multi_mode_product(net.core, list(_scaled_factors(spec, net, lams, alpha))).reshape(po, pi)
    if (po, pi) != spec.shape:
        x = x[: spec.d_out, : spec.d_in]
        return x.contiguous() if w0 is None else w0 + x
    return x if w0 is None else x.add_(w0)


class _Kron(NamedTuple):
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
    """:func:`kron_vectors` over the last dim, for one vector ``(n_k,)`` or a row per adapter ``(a, n_k)``."""
    out = vectors[0]
    for v in vectors[1:]:
        out = (out[..., :, None] * v[..., None, :]).reshape(*out.shape[:-1], -1)
    return out


def _kron(net: FrozenNetwork, lams: Sequence[torch.Tensor], alpha) -> _Kron:
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
    return _Kron(uk, vk, ur, vr)


def _mul(t: torch.Tensor, v: Optional[torch.Tensor]) -> torch.Tensor:
    return t if v is None else t * v


def _factored_delta(net: FrozenNetwork, kr: _Kron, x2: torch.Tensor):
    """``(ΔW x, s, z, xq)`` for the factored strategy: ``x → ⊙vk → Q → ⊙vr → G_matᵀ (= s) →
    ⊙ur → P (= z) → ⊙uk``. Of the intermediates only what backward reads is returned (the others
    are None): ``s`` for the ``ur`` gradient, ``z`` for ``uk``'s and ``xq`` (before ``⊙vr``) for
    ``vr``'s, so backward never projects again."""
    spec = net.spec
    po, pi = spec.padded_shape
    p = spec.n_row
    xq = project(_mul(_pad_cols(x2, pi), kr.vk), net.col_factors, spec.col_modes)
    s = _core_mm(_mul(xq, kr.vr), net.g_mat.T)
    z = expand(_mul(s, kr.ur), net.row_factors, spec.ranks[:p])
    y = _mul(z, kr.uk)
    return (y[:, : spec.d_out], None if kr.ur is None else s, None if kr.uk is None else z,
            None if kr.vr is None else xq)


def _scale_grads_h(gp: torch.Tensor, xq: torch.Tensor, g_mat: torch.Tensor, ua: torch.Tensor, v: torch.Tensor):
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


def _scale_grads_factored(net: FrozenNetwork, kr: _Kron, x2, g2, s, z, xq, need_x: bool):
    """``(grad_x of the ΔW part or None, _Kron of the gradients)``: the forward chain run
    backwards, sharing ``m2 = (⊙uk → P → ⊙ur)(g) G_mat`` between ``grad_x`` and the column-side
    gradients; ``s``, ``z``, ``xq`` are :func:`_factored_delta`'s."""
    spec = net.spec
    po, pi = spec.padded_shape
    p = spec.n_row
    gpad = _pad_cols(g2, po)
    xp = _pad_cols(x2, pi)
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
    return gx, _Kron(d_uk, d_vk, d_ur, d_vr)


def _scale_grads(net: FrozenNetwork, lams: Sequence[torch.Tensor], alpha: float, dk: _Kron) -> list[torch.Tensor]:
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


def _inner_weight(net: FrozenNetwork, lams: Sequence[torch.Tensor], alpha: float) -> torch.Tensor:
    """``N = α P (G ⊙ ⊗λ_row ⊗λ_colᵀ) Qᵀ`` padded to ``(∏K_row, ∏K_col)``: ΔW without its mode-side
    diagonals, so ``ΔW = uk ⊙ N ⊙ vkᵀ`` (sliced) with :func:`_kron`'s vectors. Without a rank side
    it is the frozen ``P G Qᵀ`` (α then sits in ``uk``), kept by the network and read only."""
    spec = net.spec
    po, pi = spec.padded_shape
    _, rank_side = scale_sides(spec, lams)
    if spec.diag == "identity":
        p = spec.n_row
        return net.g_mat * (kron_vectors(list(rank_side[:p])) * alpha)[:, None] * kron_vectors(list(rank_side[p:]))[None, :]
    if rank_side is None:
        return net.frozen_product()
    mats = [u * lam[None, :] for u, lam in zip(net.factors, rank_side)]
    mats[0] = mats[0] * alpha
    return multi_mode_product(net.core, mats).reshape(po, pi)


def _dense_backward(net: FrozenNetwork, lams: Sequence[torch.Tensor], alpha: float, x: torch.Tensor,
                    g: torch.Tensor, w: Optional[torch.Tensor], need_x: bool):
    """``(grad_x or None, D = gᵀx, _Kron of the gradients)`` of the ``"dense"`` strategy.

    With ``ΔW = uk ⊙ N ⊙ vkᵀ`` (:func:`_inner_weight`) and ``D = ∂L/∂ΔW = gᵀ x``:
    ``∂uk = (D ⊙ N) vk``, ``∂vk = (D ⊙ N)ᵀ uk``; the rank side sees ``D' = uk ⊙ D ⊙ vkᵀ`` through
    ``H = Pᵀ D' Q`` (adjoint mode products) and gets ``∂ur = (H ⊙ G) vr``, ``∂vr = (H ⊙ G)ᵀ ur``.
    ``grad_x = g (W0 + ΔW)`` reuses ``N``. Transients: ``N`` (unless it is the kept frozen
    product), ``W0 + ΔW``, ``D`` and the pull-back's operands, each ``d_out × d_in``; at most three
    are alive at once and none outlives the layer's backward.
    """
    spec = net.spec
    d_out, d_in = spec.shape
    po, pi = spec.padded_shape
    kr = _kron(net, lams, alpha)
    inner = _inner_weight(net, lams, alpha)[:d_out, :d_in] if need_x or kr.uk is not None else None
    uk = None if kr.uk is None else kr.uk[:d_out]
    vk = None if kr.vk is None else kr.vk[:d_in]
    gx = None
    if need_x:
        # Without a mode side ``inner`` is this call's own chain output, free to overwrite (and
        # not needed again); the merged weight is dropped before D exists.
        weff = inner if uk is None else inner * uk[:, None] * vk[None, :]
        if w is not None:
            weff = weff.add_(w)
        gx = g @ weff
        del weff
        if uk is None:
            del inner
    dw = g.T @ x
    d_uk = d_vk = d_ur = d_vr = None
    d_rank = dw
    if uk is not None:
        e = dw * inner
        d_uk = _pad_cols((e @ vk)[None], po)[0]
        d_vk = _pad_cols((e.T @ uk)[None], pi)[0]
        del e, inner
        if kr.ur is not None:
            d_rank = dw * uk[:, None] * vk[None, :]
    if kr.ur is not None:
        if (po, pi) != (d_out, d_in):
            d_rank = F.pad(d_rank, (0, pi - d_in, 0, po - d_out))
        if spec.diag == "identity":
            h = d_rank.clone() if d_rank is dw else d_rank
        else:
            h = multi_mode_product(d_rank.contiguous().reshape(spec.modes), [u.T for u in net.factors])
            h = h.reshape(net.g_mat.shape)
        h.mul_(net.g_mat)
        d_ur = h @ kr.vr
        d_vr = h.T @ kr.ur
    return gx, dw, _Kron(d_uk, d_vk, d_ur, d_vr)


class TeRALinearFunction(torch.autograd.Function):
    """``y = x (W0 + ΔW(λ))ᵀ + b`` with a hand-written, memory-lean backward.

    Inputs: ``x (n, d_in)``, ``weight (d_out, d_in)`` or None (then only ``ΔW x`` is computed),
    ``bias (d_out,)`` or None, the frozen network, ``alpha``, ``strategy``
    (``"materialize"``/``"dense"``/``"factored"``) and the λ vectors (any float dtype; computed in x's dtype).
    Saved for backward: ``x``, the λ and, for ``"factored"``, activation-sized tensors (the core
    output ``(n, ∏R_row)`` for a rank side, its expansion ``(n, ∏K_row)`` for a mode side,
    ``xQ`` ``(n, ∏R_col)`` and the Kronecker vectors) — never a ``d_out × d_in`` tensor.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, net: FrozenNetwork, alpha: float, strategy: str, *lams):
        dt = x.dtype
        lams_c = [_as(lam, dt) for lam in lams]
        w = _as(weight, dt)
        b = _as(bias, dt)
        kr, inter = _Kron(None, None, None, None), (None, None, None)
        if strategy in ("materialize", "dense"):
            y = F.linear(x, merged_weight(net, lams_c, alpha, w), b)
        elif strategy == "factored":
            kr = _kron(net, lams_c, alpha)
            delta, *inter = _factored_delta(net, kr, x)
            y = delta if w is None else F.linear(x, w, b).add_(delta)
            if w is None and b is not None:
                y = y + b
        else:
            raise ValueError(f"strategy must be 'materialize', 'dense' or 'factored', got {strategy!r}")
        ctx.net, ctx.alpha, ctx.strategy = net, alpha, strategy
        ctx.has_bias = bias is not None
        ctx.save_for_backward(x, weight, *inter, *kr, *lams)
        return y

    @staticmethod
    def backward(ctx, g):
        # The forward ran with autocast off in a single dtype; keep it off here too (backward
        # can run inside a still-open autocast region).
        with _no_autocast(g.device.type):
            return TeRALinearFunction._backward(ctx, g)

    @staticmethod
    def _backward(ctx, g):
        x, weight, s, z, xq, uk, vk, ur, vr, *lams = ctx.saved_tensors
        net, alpha, strategy = ctx.net, ctx.alpha, ctx.strategy
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        need_lam = any(ctx.needs_input_grad[6:])
        dt = x.dtype
        g = _as(g, dt).contiguous()
        lams_c = [_as(lam, dt) for lam in lams]
        w = _as(weight, dt)
        gx = gw = gb = None
        dk = None
        if strategy == "materialize" or (strategy == "dense" and not need_lam):
            if need_x:
                gx = g @ merged_weight(net, lams_c, alpha, w)
            if need_lam:
                kr = _kron(net, lams_c, alpha)
                if kr.uk is not None:
                    # Mode-side gradients need the forward's P-side output z: rerun the factored chain.
                    _, s, z, xq = _factored_delta(net, kr, x)
                    _, dk = _scale_grads_factored(net, kr, x, g, s, z, xq, False)
                else:
                    po, pi = net.spec.padded_shape
                    gp = project(_pad_cols(g, po), net.row_factors, net.spec.row_modes)
                    xq = project(_pad_cols(x, pi), net.col_factors, net.spec.col_modes)
                    dk = _Kron(None, None, *_scale_grads_h(gp, xq, net.g_mat, kr.ur, kr.vr))
        elif strategy == "dense":
            if need_x or need_lam:
                gx, dw, dk = _dense_backward(net, lams_c, alpha, x, g, w, need_x)
                if need_w and weight is not None:
                    gw = dw.to(weight.dtype)
        else:
            if need_x or need_lam:
                gx_delta, dk = _scale_grads_factored(net, _Kron(uk, vk, ur, vr), x, g, s, z, xq, need_x)
                if need_x:
                    gx = gx_delta if w is None else torch.addmm(gx_delta, g, w)
        if need_w and weight is not None and gw is None:
            gw = (g.T @ x).to(weight.dtype)
        if need_b and ctx.has_bias:
            gb = g.sum(0)
        grads_lam: list[Optional[torch.Tensor]] = [None] * len(lams)
        if need_lam:
            with _serial(x.device.type == "cpu"):
                grads = _scale_grads(net, lams_c, alpha, dk)
            grads_lam = [
                _as(gr, lam.dtype) if ctx.needs_input_grad[6 + i] else None for i, (gr, lam) in enumerate(zip(grads, lams))
            ]
        return (gx, gw, gb, None, None, None, *grads_lam)


def check_input(x, d_in: int, where: str) -> None:
    """Raise a clear error unless ``x`` is a floating-point ``torch.Tensor`` of shape ``(..., d_in)``."""
    if not isinstance(x, torch.Tensor):
        kind = f"{type(x).__module__}.{type(x).__qualname__}".removeprefix("builtins.")
        raise TypeError(f"{where} takes a torch.Tensor of shape (..., {d_in}), got a {kind}")
    if not x.is_floating_point():
        raise TypeError(
            f"{where} needs a floating-point input (float32, float16, bfloat16 or float64), got dtype {x.dtype}; "
            "convert token ids to embeddings first, or call x.float()"
        )
    if x.dim() == 0 or x.shape[-1] != d_in:
        raise ValueError(f"{where} expects input of shape (..., {d_in}), got shape {tuple(x.shape)}")


_AUTOCAST_ELIGIBLE = (torch.float32, torch.float16, torch.bfloat16)


def _autocast_dtype(device_type: str) -> Optional[torch.dtype]:
    if hasattr(torch, "get_autocast_dtype"):
        try:
            on = torch.is_autocast_enabled(device_type)
        except RuntimeError:  # a device type autocast does not know (meta): never on
            return None
        return torch.get_autocast_dtype(device_type) if on else None
    # torch < 2.4 has one pair of functions per device type.
    if device_type == "cpu":
        return torch.get_autocast_cpu_dtype() if torch.is_autocast_cpu_enabled() else None
    if device_type == "cuda":
        return torch.get_autocast_gpu_dtype() if torch.is_autocast_enabled() else None
    return None


def _no_autocast(device_type: str):
    """Switch autocast off for ``device_type`` when it is on (``torch.autocast`` rejects device
    types it does not know, meta included, even with ``enabled=False``)."""
    return torch.autocast(device_type, enabled=False) if _autocast_dtype(device_type) else nullcontext()


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype TeRA computes ``x``'s layer in: the autocast dtype when autocast is on for ``x``'s
    device (as for ``F.linear``; float64 is left alone, like autocast does), else ``x.dtype``."""
    if x.dtype in _AUTOCAST_ELIGIBLE:
        return _autocast_dtype(x.device.type) or x.dtype
    return x.dtype


def non_finite(t: torch.Tensor) -> Optional[str]:
    """``"2 NaN and 1 Inf among 8 values"`` when ``t`` has non-finite entries, else None."""
    if bool(torch.isfinite(t).all()):
        return None
    nan = int(torch.isnan(t).sum())
    inf = int(torch.isinf(t).sum())
    parts = [f"{nan} NaN"] * bool(nan) + [f"{inf} Inf"] * bool(inf)
    return f"{' and '.join(parts)} among {t.numel()} values"


def tera_linear(
    x: torch.Tensor,
    weight: Optional[torch.Tensor],
    bias: Optional[torch.Tensor],
    net: FrozenNetwork,
    lams: Sequence[torch.Tensor],
    alpha: float = 1.0,
    strategy: str = "materialize",
) -> torch.Tensor:
    """Functional form of :class:`TeRALinearFunction` for ``x`` of shape ``(..., d_in)``.

    Returns ``x (weight + ΔW)ᵀ + bias`` of shape ``(..., d_out)`` (``ΔW x`` alone when
    ``weight`` is None). Under autocast the layer computes in the autocast dtype, like
    ``F.linear`` (pass ``net`` in that dtype, e.g. ``bank.network(spec, compute_dtype(x),
    x.device)``, to avoid a cast per call); λ gradients stay float32.
    """
    spec = net.spec
    check_input(x, spec.d_in, "tera_linear")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, spec.d_in)
    dt = compute_dtype(x)
    if x2.shape[0] == 0:
        return x.new_zeros(lead + (spec.d_out,), dtype=dt)
    # Autocast would recast the Function's GEMMs one by one (and leave the backward, which runs
    # outside the autocast region, mixing bf16 gradients with fp32 operands). Casting once here
    # and computing everything in that dtype with autocast off is exact autocast semantics for a
    # linear layer and serves CPU and CUDA alike.
    x2 = _as(x2, dt)
    net = net.to(dt, x.device)
    with _no_autocast(x.device.type):
        y = TeRALinearFunction.apply(x2, weight, bias, net, float(alpha), strategy, *lams)
    return y.reshape(lead + (spec.d_out,))



def mixed_delta(
    net: FrozenNetwork, table: torch.Tensor, alphas: torch.Tensor, rows: torch.Tensor, x: torch.Tensor
) -> torch.Tensor:
    """``ΔW_{rows[i]} x_i`` for every row ``i`` of ``x`` ``(n, d_in)``: one adapter per row, one contraction.

    ``table`` ``(A, spec.num_trainable)`` holds the concatenated λ of ``A`` adapters of ``net.spec``
    (rows of the same frozen network), ``alphas`` ``(A,)`` their α and ``rows`` ``(n,)`` which adapter
    each row of ``x`` uses. The Kronecker vectors of the factored chain are built once per adapter,
    ``(A, ∏R)``, gathered per row and applied as row-indexed diagonals, so the frozen core and factors
    run once for the whole batch whatever the number of adapters in it. Meant for serving: gradients,
    if asked for, come from plain autograd rather than :class:`TeRALinearFunction`'s lean backward.
    Computed in ``x``'s dtype; returns ``(n, d_out)``.
    """
    spec = net.spec
    dt = x.dtype
    lams = torch.split(table.to(device=x.device, dtype=dt), list(spec.scale_sizes), dim=1)
    kr = _kron(net, lams, alphas.to(device=x.device, dtype=dt)[:, None])
    per_row = _Kron(*(None if v is None else v[rows] for v in kr))
    with _no_autocast(x.device.type):
        y, *_ = _factored_delta(net.to(dt, x.device), per_row, x)
    return y
