"""Multi-mode products ``X = G x_1 M_1 x_2 M_2 ... x_N M_N`` (Tucker-style materialisation).

Public API
----------
``multi_mode_product(core, matrices, *, out=None)``
    The product itself, for numpy, torch and JAX arrays.
``best_order(core_shape, matrix_shapes)``
    Cost-optimal order of the mode products.
``mode_product_flops(core_shape, matrix_shapes, order=None)``
    FLOP count of a given (default: the optimal) order.
``chain_steps(ranks, modes)``
    Per-product ``(mode, size before, K_n, R_n)`` in execution order (for cost models).

Convention: ``core`` has shape ``(R_1, ..., R_N)``, ``matrices[n]`` has shape
``(K_n, R_n)`` (or is ``None`` = identity), and
``(G x_n A)[..., i_n, ...] = sum_r G[..., r, ...] * A[i_n, r]``, so the result has
shape ``(K_1, ..., K_N)``; it is returned C-contiguous.

How it runs
-----------
On the CPU the products run in the cache-blocked, multi-threaded kernel of
:mod:`tera_tn.core.blocked_kernel`. Its cached buffers and worker threads belong to the
:class:`~tera_tn.core.workspace.Workspace` entered with ``use_workspace()`` (the torch layers
enter the default one); outside any, a call runs on one thread with private buffers.

When any torch operand requires grad (and grad mode is on), or the operands are not
on the CPU, or they are JAX arrays (immutable, so never written in place), a plain
differentiable chain of ``tensordot`` calls is used instead. What differs between the
libraries is in :mod:`tera_tn.backends`; this module never asks which one it runs on.
"""

from __future__ import annotations

import math
from typing import List, Optional, Sequence, Tuple

from ..checks import as_array
from ..backends import Array, is_array, namespace
from .blocked_kernel import blocked_product

__all__ = [
    "multi_mode_product",
    "best_order",
    "mode_product_flops",
    "chain_steps",
]


# --------------------------------------------------------------------------- #
# Order / cost
# --------------------------------------------------------------------------- #
def _shapes(core_shape: Sequence[int], matrix_shapes: Sequence[Optional[Sequence[int]]]):
    core_shape = tuple(int(s) for s in core_shape)
    if len(matrix_shapes) != len(core_shape):
        raise ValueError(
            f"need one matrix (or None) per core mode: core has {len(core_shape)} modes, "
            f"got {len(matrix_shapes)} matrices"
        )
    ks = []
    for n, (r, ms) in enumerate(zip(core_shape, matrix_shapes)):
        if ms is None:
            ks.append(None)
            continue
        ms = tuple(int(s) for s in ms)
        if len(ms) != 2 or ms[1] != r:
            raise ValueError(f"matrices[{n}] must have shape (K, {r}), got {ms}")
        ks.append(ms[0])
    return core_shape, ks


def best_order(core_shape: Sequence[int], matrix_shapes: Sequence[Optional[Sequence[int]]]) -> Tuple[int, ...]:
    """Cost-optimal order of the mode products.

    ``core_shape = (R_1, ..., R_N)``; ``matrix_shapes[n] = (K_n, R_n)`` or ``None``
    (identity, not applied).  Returns the indices of the non-``None`` modes in the
    order in which applying them costs the fewest FLOPs (see
    :func:`mode_product_flops`).

    Exact argument: the products commute and only the running size changes between
    them, so swapping adjacent products ``n, m`` changes only their two terms;
    ``n`` first is no worse iff ``K_n + K_n K_m / R_n <= K_m + K_m K_n / R_m``, i.e.
    iff ``1/R_n - 1/K_n <= 1/R_m - 1/K_m``.  Sorting by that key is therefore optimal
    (shrinking products first, then the least-growing ones).  Ties keep the natural
    mode order, which the fast path needs to avoid a final permutation.
    """
    core_shape, ks = _shapes(core_shape, matrix_shapes)
    modes = [n for n, k in enumerate(ks) if k is not None]
    if any(core_shape[n] == 0 or ks[n] == 0 for n in modes):
        return tuple(modes)
    # The key 1/R - 1/K = (K - R)/(R K), scaled by a common multiple of the denominators into an
    # exact integer: integer keys also let torch.compile trace this sort (it refuses Fractions).
    common = math.lcm(*(core_shape[n] * ks[n] for n in modes))
    return tuple(sorted(modes, key=lambda n: (ks[n] - core_shape[n]) * (common // (core_shape[n] * ks[n]))))


def mode_product_flops(
    core_shape: Sequence[int],
    matrix_shapes: Sequence[Optional[Sequence[int]]],
    order: Optional[Sequence[int]] = None,
) -> int:
    """FLOPs of applying the mode products in ``order`` (default: :func:`best_order`).

    Each product ``n`` costs ``2 * (current size) * K_n`` FLOPs (one multiply-add per
    output element and summed index) and multiplies the running size by
    ``K_n / R_n``.  ``None`` matrices cost nothing and must not appear in ``order``.
    """
    core_shape, ks = _shapes(core_shape, matrix_shapes)
    if order is None:
        order = best_order(core_shape, matrix_shapes)
    order = [int(n) for n in order]
    if sorted(order) != [n for n, k in enumerate(ks) if k is not None]:
        raise ValueError(f"order {order} must list each non-None mode exactly once")
    size = 1
    for s in core_shape:
        size *= s
    flops = 0
    for n in order:
        flops += 2 * size * ks[n]
        size = size // core_shape[n] * ks[n] if core_shape[n] else 0
    return flops


def chain_steps(ranks: Sequence[int], modes: Sequence[int]) -> List[Tuple[int, int, int, int]]:
    """``(mode, size before, K_n, R_n)`` for each product, in execution order.

    ``ranks = (R_1, ..., R_N)`` is the core shape and ``modes = (K_1, ..., K_N)`` the
    output shape (every matrix present).  The order is :func:`best_order`, the order
    :func:`multi_mode_product` uses; product ``n`` costs ``2 * size_before * K_n``
    FLOPs, i.e. a ``(size_before / R_n, R_n) @ (R_n, K_n)`` GEMM.
    """
    ranks = [int(r) for r in ranks]
    modes = [int(k) for k in modes]
    order = best_order(ranks, [(k, r) for k, r in zip(modes, ranks)])
    size = 1
    for r in ranks:
        size *= r
    steps = []
    for n in order:
        steps.append((n, size, modes[n], ranks[n]))
        size = size // ranks[n] * modes[n] if ranks[n] else 0
    return steps


# --------------------------------------------------------------------------- #
# Plain (differentiable / generic) path
# --------------------------------------------------------------------------- #
def _chain_plain(ops, core, matrices, order):
    """Out-of-place chain of tensordots (differentiable in torch and JAX)."""
    x = core
    layout = list(range(core.ndim))
    for n in order:
        pos = layout.index(n)
        # tensordot puts the new mode last: layout becomes (rest..., n)
        x = ops.tensordot(x, matrices[n], ([pos], [1]))
        layout = layout[:pos] + layout[pos + 1 :] + [n]
    return ops.permuted(x, [layout.index(n) for n in range(core.ndim)])



# --------------------------------------------------------------------------- #
# Public entry point
# --------------------------------------------------------------------------- #
def multi_mode_product(core: Array, matrices: Sequence[Optional[Array]], *, out: Optional[Array] = None) -> Array:
    """``X = core x_1 M_1 x_2 M_2 ... x_N M_N``.

    Parameters
    ----------
    core:
        Array of shape ``(R_1, ..., R_N)``, ``N >= 1`` (numpy, torch or JAX array).
    matrices:
        Sequence of ``N`` entries; ``matrices[n]`` has shape ``(K_n, R_n)`` or is
        ``None`` (identity, ``K_n = R_n``).  All operands share backend and dtype
        (and device for torch).
    out:
        Optional preallocated C-contiguous result of shape ``(K_1, ..., K_N)`` (fast
        path only; ignored -- a new result is returned -- on the autograd path).
        Refused for JAX arrays, which cannot be written in place.

    Returns
    -------
    Array of shape ``(K_1, ..., K_N)``, C-contiguous, same backend/dtype/device as
    ``core``, with ``X[k_1..k_N] = sum_r core[r_1..r_N] * prod_n M_n[k_n, r_n]``.

    The products are applied in the FLOP-optimal order (:func:`best_order`).  With
    torch grad mode on and any operand requiring grad, on a GPU or for JAX arrays, a
    differentiable chain of out-of-place ops is used; otherwise (CPU) a cache-blocked,
    buffer-reusing path.
    """
    core = as_array("core", core, "at least one mode")
    if matrices is None or isinstance(matrices, (str, bytes)) or is_array(matrices):
        raise TypeError(f"matrices must be a list with one matrix (or None) per core mode, got {type(matrices).__name__}")
    matrices = [None if m is None else as_array(f"matrices[{n}]", m, "shape (K, R)") for n, m in enumerate(matrices)]
    N = core.ndim
    if N < 1:
        raise ValueError(f"core must have at least one mode, got a 0-d {type(core).__name__}")
    ops = namespace(core)
    for n, m in enumerate(matrices):
        if m is None:
            continue
        if namespace(m) is not ops:
            raise TypeError(f"matrices[{n}] is a {namespace(m).name} array, core a {ops.name} array; expected one backend")
        if m.dtype != core.dtype:
            raise TypeError(f"matrices[{n}] has dtype {m.dtype}, core has {core.dtype}")
        if ops.device(m) != ops.device(core):
            raise ValueError(f"matrices[{n}] is on {ops.device(m)}, core on {ops.device(core)}")
    shape, ks = _shapes(tuple(core.shape), [None if m is None else tuple(m.shape) for m in matrices])
    out_shape = tuple(shape[n] if ks[n] is None else ks[n] for n in range(N))
    order = best_order(shape, [None if m is None else tuple(m.shape) for m in matrices])
    if out is not None and not ops.mutable:
        raise TypeError(f"out= needs a writable array; {ops.name} arrays are immutable, use the returned result")

    present = [core] + [m for m in matrices if m is not None]
    if not ops.kernel_ok(present):
        res = _chain_plain(ops, core, matrices, order) if order else ops.clone(core)
        if out is not None and not ops.needs_grad(present):
            ops.copy(out, res)
            return out
        return res

    if out is not None:
        if tuple(out.shape) != out_shape or out.dtype != core.dtype:
            raise ValueError(f"out must have shape {out_shape} and dtype {core.dtype}")
        if not ops.is_contiguous(out):
            raise ValueError("out must be C-contiguous")

    if any(s == 0 for s in shape) or any(s == 0 for s in out_shape):
        res = ops.new_output(out_shape, core) if out is None else out
        ops.fill_zero(res)
        return res
    if not order:
        res = ops.new_output(out_shape, core) if out is None else out
        ops.copy(res, core)
        return res
    with ops.kernel_scope():
        return blocked_product(ops, core, matrices, order, out)
