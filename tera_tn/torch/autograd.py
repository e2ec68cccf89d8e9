"""Memory-lean autograd for a TeRA linear layer: ``y = x (W0 + ΔW)ᵀ + b``.

Shapes: ``x`` is ``(n, d_in)`` (callers flatten leading dims), ``W0`` is ``(d_out, d_in)``,
``y`` is ``(n, d_out)``. The update is written in its Kronecker form:

* ``diag="rank"`` / ``"identity"``: ``ΔW = α P (G_mat ⊙ u vᵀ) Qᵀ`` with ``P = ⊗U_row``,
  ``Q = ⊗U_col`` (``I`` for identity), ``u = ⊗λ_row``, ``v = ⊗λ_col`` (lengths ``∏R``).
* ``diag="mode"``: ``ΔW = α diag(u) P G_mat Qᵀ diag(v)`` with ``u``, ``v`` of lengths ``∏K``.
* ``diag="both"``: both at once, ``ΔW = α diag(u_K) P (G_mat ⊙ u_R v_Rᵀ) Qᵀ diag(v_K)`` with the
  mode-side Kronecker vectors ``u_K = ⊗μ_row``, ``v_K = ⊗μ_col`` and the rank-side ``u_R``, ``v_R``.

``P`` and ``Q`` are never formed: multiplying by them is a chain of small mode products
(:func:`~tera_tn.torch.factored.project` /
:func:`~tera_tn.torch.factored.expand`). Padding (``∏K > d``) is handled by zero-padding ``x`` and
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

The pieces live beside this module: the frozen operands in :mod:`tera_tn.torch.frozen`, the
Kronecker vectors of the scalings in :mod:`tera_tn.torch.scales`, the chains over activations
(the factored strategy) in :mod:`tera_tn.torch.factored`; here are the merged weight, the
``"dense"`` backward, the autograd Function and its functional and mixed-batch forms.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from ..contract.strategies import REGISTRY, get_strategy
from ..core.network import kron_vectors, scale_factor_matrices, scale_sides
from .factored import factored_delta, factored_scale_grads, pad_cols, project, scale_grads_from_h, single_threaded
from .frozen import FrozenNetwork, layer_product
from .scales import KronVectors, scale_grads, scale_kron

__all__ = [
    "FrozenNetwork",
    "check_input",
    "compute_dtype",
    "no_autocast",
    "non_finite",
    "TeRALinearFunction",
    "MultiplicativeLinearFunction",
    "tera_linear",
    "merged_weight",
    "mixed_delta",
]


def _as(t: Optional[torch.Tensor], dtype: torch.dtype) -> Optional[torch.Tensor]:
    # Tensor.to is not free even when nothing changes; this runs ~20 times per training step.
    return t if t is None or t.dtype == dtype else t.to(dtype)


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
        # A FrozenNetwork's ``factors`` are the U_n that scale_factor_matrices scales.
        x = layer_product(net.core, list(scale_factor_matrices(spec, net.factors, lams, alpha))).reshape(po, pi)
    if (po, pi) != spec.shape:
        x = x[: spec.d_out, : spec.d_in]
        return x.contiguous() if w0 is None else w0 + x
    return x if w0 is None else x.add_(w0)


def _inner_weight(net: FrozenNetwork, lams: Sequence[torch.Tensor], alpha: float) -> torch.Tensor:
    """``N = α P (G ⊙ ⊗λ_row ⊗λ_colᵀ) Qᵀ`` padded to ``(∏K_row, ∏K_col)``: ΔW without its mode-side
    diagonals, so ``ΔW = uk ⊙ N ⊙ vkᵀ`` (sliced) with :func:`scale_kron`'s vectors. Without a rank side
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
    return layer_product(net.core, mats).reshape(po, pi)


def _dense_backward(net: FrozenNetwork, lams: Sequence[torch.Tensor], alpha: float, x: torch.Tensor,
                    g: torch.Tensor, w: Optional[torch.Tensor], need_x: bool, hadamard: Optional[torch.Tensor] = None):
    """``(grad_x or None, D = gᵀx, KronVectors of the gradients)`` of the ``"dense"`` strategy.

    With ``hadamard`` (the multiplicative form's ``W0``) the layer's update is ``W0 ⊙ ΔW``: ``grad_x``
    uses ``w + W0 ⊙ ΔW`` and the chain is pulled back from ``D ⊙ W0``; ``D`` is returned as is.

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
    kr = scale_kron(net, lams, alpha)
    inner = _inner_weight(net, lams, alpha)[:d_out, :d_in] if need_x or kr.uk is not None else None
    uk = None if kr.uk is None else kr.uk[:d_out]
    vk = None if kr.vk is None else kr.vk[:d_in]
    gx = None
    if need_x:
        # Without a mode side ``inner`` is this call's own chain output, free to overwrite (and
        # not needed again); the merged weight is dropped before D exists.
        weff = inner if uk is None else inner * uk[:, None] * vk[None, :]
        if hadamard is not None:
            weff = weff.mul_(hadamard)  # a fresh product either way (see above)
        if w is not None:
            weff = weff.add_(w)
        gx = g @ weff
        del weff
        if uk is None:
            del inner
    dw = g.T @ x
    d_delta = dw if hadamard is None else dw * hadamard
    d_uk = d_vk = d_ur = d_vr = None
    d_rank = d_delta
    if uk is not None:
        e = d_delta * inner
        d_uk = pad_cols((e @ vk)[None], po)[0]
        d_vk = pad_cols((e.T @ uk)[None], pi)[0]
        del e, inner
        if kr.ur is not None:
            d_rank = d_delta * uk[:, None] * vk[None, :]
    if kr.ur is not None:
        if (po, pi) != (d_out, d_in):
            d_rank = F.pad(d_rank, (0, pi - d_in, 0, po - d_out))
        if spec.diag == "identity":
            h = d_rank.clone() if d_rank is dw else d_rank  # dw is returned: never scaled in place
        else:
            h = layer_product(d_rank.contiguous().reshape(spec.modes), [u.T for u in net.factors])
            h = h.reshape(net.g_mat.shape)
        h.mul_(net.g_mat)
        d_ur = h @ kr.vr
        d_vr = h.T @ kr.ur
    return gx, dw, KronVectors(d_uk, d_vk, d_ur, d_vr)


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
        try:
            run = _FORWARD[strategy]
        except (KeyError, TypeError):
            get_strategy(strategy)  # raises the ValueError listing the registry's names
            raise
        y, kr, inter = run(net, lams_c, alpha, x, w, b)
        ctx.net, ctx.alpha, ctx.strategy = net, alpha, strategy
        ctx.has_bias = bias is not None
        ctx.save_for_backward(x, weight, *inter, *kr, *lams)
        return y

    @staticmethod
    def backward(ctx, g):
        # The forward ran with autocast off in a single dtype; keep it off here too (backward
        # can run inside a still-open autocast region).
        with no_autocast(g.device.type):
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
        saved = (s, z, xq, KronVectors(uk, vk, ur, vr))
        gx, gw, dk = _BACKWARD[strategy](net, alpha, x, g, w, weight, lams_c, saved, need_x, need_w, need_lam)
        gb = None
        if need_w and weight is not None and gw is None:
            gw = (g.T @ x).to(weight.dtype)
        if need_b and ctx.has_bias:
            gb = g.sum(0)
        grads_lam: list[Optional[torch.Tensor]] = [None] * len(lams)
        if need_lam:
            with single_threaded(x.device.type == "cpu"):
                grads = scale_grads(net, lams_c, alpha, dk)
            grads_lam = [
                _as(gr, lam.dtype) if ctx.needs_input_grad[6 + i] else None for i, (gr, lam) in enumerate(zip(grads, lams))
            ]
        return (gx, gw, gb, None, None, None, *grads_lam)


class MultiplicativeLinearFunction(torch.autograd.Function):
    """``y = x (weight + W0 ⊙ ΔW(λ))ᵀ + b``: the multiplicative form (``update="multiplicative"``).

    ``W0 ⊙ ΔW`` has no factored form, so forward builds it (one chain and one elementwise pass)
    and runs one GEMM, and backward is the ``"dense"`` strategy's with ``D ⊙ W0`` pulled back
    through the network. Inputs: ``x (n, d_in)``, ``weight`` (added as is, or None), ``bias``,
    ``w0 (d_out, d_in)``, the frozen network, ``alpha`` and the λ vectors. Saved for backward:
    ``x``, ``weight``, ``w0`` (tensors the caller holds anyway) and the λ.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, w0, net: FrozenNetwork, alpha: float, *lams):
        dt = x.dtype
        lams_c = [_as(lam, dt) for lam in lams]
        weff = merged_weight(net, lams_c, alpha, None).mul_(_as(w0, dt))  # merged_weight returns a fresh tensor
        if weight is not None:
            weff.add_(_as(weight, dt))
        ctx.net, ctx.alpha = net, alpha
        ctx.has_bias = bias is not None
        ctx.save_for_backward(x, weight, w0, *lams)
        return F.linear(x, weff, _as(bias, dt))

    @staticmethod
    def backward(ctx, g):
        with no_autocast(g.device.type):
            x, weight, w0, *lams = ctx.saved_tensors
            net, alpha = ctx.net, ctx.alpha
            need_x, need_w, need_b, need_w0 = ctx.needs_input_grad[:4]
            dt = x.dtype
            g = _as(g, dt).contiguous()
            lams_c = [_as(lam, dt) for lam in lams]
            w0c = _as(w0, dt)
            gx, dw, dk = _dense_backward(net, lams_c, alpha, x, g, _as(weight, dt), need_x, hadamard=w0c)
            gw = dw.to(weight.dtype) if need_w and weight is not None else None
            gw0 = (dw * merged_weight(net, lams_c, alpha, None)).to(w0.dtype) if need_w0 else None
            gb = g.sum(0) if need_b and ctx.has_bias else None
            grads_lam: list[Optional[torch.Tensor]] = [None] * len(lams)
            if any(ctx.needs_input_grad[6:]):
                with single_threaded(x.device.type == "cpu"):
                    grads = scale_grads(net, lams_c, alpha, dk)
                grads_lam = [_as(gr, lam.dtype) if ctx.needs_input_grad[6 + i] else None
                             for i, (gr, lam) in enumerate(zip(grads, lams))]
        return (gx, gw, gb, gw0, None, None, *grads_lam)


# --- per-strategy forward and backward, dispatched by registry name ----------------------------
def _forward_merged(net, lams_c, alpha, x, w, b):
    """``materialize`` and ``dense``: one GEMM with ``W0 + ΔW``; nothing activation-sized saved."""
    return F.linear(x, merged_weight(net, lams_c, alpha, w), b), KronVectors(None, None, None, None), (None, None, None)


def _forward_factored(net, lams_c, alpha, x, w, b):
    """``factored``: base GEMM + ``x → Q → G → P``; saves the chain's intermediates and Kronecker vectors."""
    kr = scale_kron(net, lams_c, alpha)
    delta, *inter = factored_delta(net, kr, x)
    y = delta if w is None else F.linear(x, w, b).add_(delta)
    if w is None and b is not None:
        y = y + b
    return y, kr, inter


def _backward_materialize(net, alpha, x, g, w, weight, lams_c, saved, need_x, need_w, need_lam):
    """``(gx, gw or None, dk)``: ``grad_x = g (W0 + ΔW)``, λ gradients from ``H = (g P)ᵀ (x Q)``."""
    gx = dk = None
    if need_x:
        gx = g @ merged_weight(net, lams_c, alpha, w)
    if need_lam:
        kr = scale_kron(net, lams_c, alpha)
        if kr.uk is not None:
            # Mode-side gradients need the forward's P-side output z: rerun the factored chain.
            _, s, z, xq = factored_delta(net, kr, x)
            _, dk = factored_scale_grads(net, kr, x, g, s, z, xq, False)
        else:
            po, pi = net.spec.padded_shape
            gp = project(pad_cols(g, po), net.row_factors, net.spec.row_modes)
            xq = project(pad_cols(x, pi), net.col_factors, net.spec.col_modes)
            dk = KronVectors(None, None, *scale_grads_from_h(gp, xq, net.g_mat, kr.ur, kr.vr))
    return gx, None, dk


def _backward_dense(net, alpha, x, g, w, weight, lams_c, saved, need_x, need_w, need_lam):
    """Without λ gradients as materialize; with them, from the dense weight gradient ``gᵀ x``."""
    if not need_lam:
        return _backward_materialize(net, alpha, x, g, w, weight, lams_c, saved, need_x, need_w, need_lam)
    gx, dw, dk = _dense_backward(net, lams_c, alpha, x, g, w, need_x)
    return gx, (dw.to(weight.dtype) if need_w and weight is not None else None), dk


def _backward_factored(net, alpha, x, g, w, weight, lams_c, saved, need_x, need_w, need_lam):
    """The factored chain's backward over the saved intermediates."""
    gx = dk = None
    if need_x or need_lam:
        s, z, xq, kr = saved
        gx_delta, dk = factored_scale_grads(net, kr, x, g, s, z, xq, need_x)
        if need_x:
            gx = gx_delta if w is None else torch.addmm(gx_delta, g, w)
    return gx, None, dk


_FORWARD = {"materialize": _forward_merged, "dense": _forward_merged, "factored": _forward_factored}
_BACKWARD = {"materialize": _backward_materialize, "dense": _backward_dense, "factored": _backward_factored}
if set(_FORWARD) != set(REGISTRY) or set(_BACKWARD) != set(REGISTRY):
    raise ImportError(f"autograd implements {sorted(_FORWARD)}, the strategy registry lists {sorted(REGISTRY)}")


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


def no_autocast(device_type: str):
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
    w0: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Functional form of :class:`TeRALinearFunction` for ``x`` of shape ``(..., d_in)``.

    Returns ``x (weight + ΔW)ᵀ + bias`` of shape ``(..., d_out)`` (``ΔW x`` alone when
    ``weight`` is None). With ``w0`` (a ``(d_out, d_in)`` tensor) the update is the multiplicative
    form ``W0 ⊙ ΔW`` (:class:`MultiplicativeLinearFunction`; ``strategy`` does not apply). Under
    autocast the layer computes in the autocast dtype, like ``F.linear`` (pass ``net`` in that
    dtype, e.g. ``bank.network(spec, compute_dtype(x), x.device)``, to avoid a cast per call); λ
    gradients stay float32.
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
    with no_autocast(x.device.type):
        if w0 is None:
            y = TeRALinearFunction.apply(x2, weight, bias, net, float(alpha), strategy, *lams)
        else:
            y = MultiplicativeLinearFunction.apply(x2, weight, bias, w0, net, float(alpha), *lams)
    return y.reshape(lead + (spec.d_out,))


def mixed_delta(
    net: FrozenNetwork, table: torch.Tensor, alphas: torch.Tensor, rows: torch.Tensor, x: torch.Tensor
) -> torch.Tensor:
    """``ΔW_{rows[i]} x_i`` for every row ``i`` of ``x`` ``(n, d_in)``: one adapter per row, one contraction.

    ``table`` ``(A, spec.num_trainable)`` holds the concatenated λ of ``A`` adapters of ``net.spec``
    (rows of the same frozen network), ``alphas`` ``(A,)`` their α and ``rows`` ``(n,)`` which adapter
    each row of ``x`` uses. The Kronecker vectors of the factored chain are built once per adapter,
    ``(A, ∏R)``, gathered per row and applied as row-indexed diagonals, so the frozen core and factors
    run once for the whole batch whatever the number of adapters in it (with mode-side diagonals at
    full ranks the chain is one GEMM with the shape group's kept ``P G Qᵀ``:
    :func:`~tera_tn.contract.strategies.factored_through_product`). Meant for serving: gradients, if
    asked for, come from plain autograd rather than :class:`TeRALinearFunction`'s lean backward.
    Computed in ``x``'s dtype; returns ``(n, d_out)``.
    """
    spec = net.spec
    dt = x.dtype
    lams = torch.split(table.to(device=x.device, dtype=dt), list(spec.scale_sizes), dim=1)
    kr = scale_kron(net, lams, alphas.to(device=x.device, dtype=dt)[:, None])
    net = net.to(dt, x.device)
    per_row = KronVectors(*(None if v is None else v[rows] for v in kr))
    with no_autocast(x.device.type):
        y, *_ = factored_delta(net, per_row, x)
    return y
