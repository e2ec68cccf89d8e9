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
``clear_workspace()``
    Drop the cached scratch buffers of the fast path.

Convention: ``core`` has shape ``(R_1, ..., R_N)``, ``matrices[n]`` has shape
``(K_n, R_n)`` (or is ``None`` = identity), and
``(G x_n A)[..., i_n, ...] = sum_r G[..., r, ...] * A[i_n, r]``, so the result has
shape ``(K_1, ..., K_N)``; it is returned C-contiguous.

How the fast path works
-----------------------
A single mode product is a skinny GEMM (inner dimension R_n, typically 8-64) and
is memory bound when applied to a tensor that does not fit in cache: computing the
products one after the other streams the whole intermediate through DRAM N times.
The fast path instead groups consecutive products (in the optimal order) into
*passes*.  A pass reads the input once, block by block: a block is the full extent
of the group's modes times a slice of the remaining ("rest") modes.  The block is
gathered into a small contiguous scratch buffer that stays in cache, the group's
products are applied there, and the finished block is written out once (the last
GEMM writes straight into the pass output).

Inside a block every product uses the "rotate" form
``S.view(r, -1).T @ M.T -> (rest, k)``: it contracts the leading mode and emits it as
the trailing one, so a chain of products is a chain of plain 2-D GEMMs with no
transposes, and after the group the block has layout ``(rest_block, k_1, ..., k_m)``
-- exactly a contiguous row range of the pass output, whose layout is
``(rest modes..., group modes...)``.  With the natural mode order the modes cycle back
to the original order after the last pass, so no final permutation is needed.

The blocks of a pass are shared between worker threads (one per core), each running
its GEMMs single-threaded: one block per core keeps a block's chain of products on
one core's caches, which splitting each skinny GEMM over all cores does not, and
the gathers of one worker overlap with the GEMMs of the other.  torch's thread count
is per calling thread; for numpy the process-global BLAS thread count is pinned to 1
during a pass through ``threadpoolctl`` when it is installed (otherwise one worker).  Intermediate buffers are cached between calls (large fresh
allocations cost more in page faults than the whole computation), and fresh torch
outputs are allocated with transparent huge pages where the OS allows it.

When any torch operand requires grad (and grad mode is on), or the operands are not
on the CPU, or they are JAX arrays (immutable, so never written in place), a plain
differentiable chain of ``tensordot`` calls is used instead. What differs between the
libraries is in :mod:`tera_tn.backends`; this module never asks which one it runs on.
"""

from __future__ import annotations

import itertools
import os
import threading
from concurrent.futures import ThreadPoolExecutor
import math
from typing import List, Optional, Sequence, Tuple

from .._backend import as_array
from ..backends import Array, is_array, namespace

__all__ = [
    "multi_mode_product",
    "best_order",
    "mode_product_flops",
    "chain_steps",
    "clear_workspace",
]

# Tuning constants, measured on a 2-core Zen3 (1 MiB L2/core, 32 MiB L3) with
# bench/bench_materialize.py.  Bytes per scratch buffer (two ping-pong buffers per
# worker, ``SCRATCH_BYTES`` of each backend): L2-sized blocks (<= 512 KiB) lose to
# per-call overhead, skinnier GEMMs and shorter strided gather runs; 1-4 MiB blocks
# (living in L3) were fastest.
# Below this many elements in the largest intermediate the whole problem fits in
# cache and the Python overhead of blocking is not worth it.
_BLOCKING_MIN_ELEMS = 1 << 17
# Below this many elements per pass, worker threads cost more than they save.
_WORKERS_MIN_ELEMS = 1 << 20
# Smallest useful number of rest rows per block: fewer makes the GEMMs too skinny
# and the strided gathers too short.
_MIN_BLOCK_ROWS = 16
# Cached workspace buffers larger than this are not kept between calls.
_MAX_CACHED_BYTES = 1 << 30


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
# Workspace cache
# --------------------------------------------------------------------------- #
_WS: dict = {}
_WS_LOCK = threading.Lock()


def clear_workspace() -> None:
    """Release the scratch/intermediate buffers cached by the fast path."""
    with _WS_LOCK:
        _WS.clear()


def _workspace(ops, like, role: str, n: int, cache: bool):
    """Flat buffer of >= n elements; reused across calls when ``cache``."""
    n = max(int(n), 1)
    if not cache:
        buf = ops.empty(n, like)
    else:
        key = ops.workspace_key(like) + (role,)
        buf = _WS.get(key)
        if buf is None or buf.shape[0] < n:
            _WS.pop(key, None)  # free the old one before allocating the new one
            buf = ops.scratch(n, like)
            if n * ops.itemsize(buf) <= _MAX_CACHED_BYTES:
                _WS[key] = buf
    return buf[:n]


# --------------------------------------------------------------------------- #
# Worker threads
# --------------------------------------------------------------------------- #
_POOL: Optional[ThreadPoolExecutor] = None
_POOL_SIZE = 0
_POOL_LOCK = threading.Lock()


def _pool(n: int) -> ThreadPoolExecutor:
    global _POOL, _POOL_SIZE
    with _POOL_LOCK:
        if _POOL is None or _POOL_SIZE < n:
            if _POOL is not None:
                _POOL.shutdown(wait=False)
            _POOL = ThreadPoolExecutor(max_workers=n, thread_name_prefix="tera_tn-modeproduct")
            _POOL_SIZE = n
        return _POOL


def _n_workers(ops, total_elems: int) -> int:
    if total_elems < _WORKERS_MIN_ELEMS:
        return 1
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - non-Linux
        cores = os.cpu_count() or 1
    return ops.max_workers(cores)


def _in_scope(scope, fn, *args):
    with scope():
        return fn(*args)


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
# Fast path
# --------------------------------------------------------------------------- #
def _group_footprint(sizes, ks, group):
    """Largest per-rest-row size of the block while applying ``group`` in order."""
    cur = [sizes[n] for n in group]
    best = 1
    for s in cur:
        best *= s
    for i, n in enumerate(group):
        cur[i] = ks[n]
        p = 1
        for s in cur:
            p *= s
        best = max(best, p)
    return best


def _plan_groups(shape, ks, order, scratch_elems):
    """Split ``order`` into consecutive groups whose blocks fit the scratch budget.

    Greedy (longest feasible prefix first) minimises the number of passes because
    feasibility is monotone: a sub-run of a feasible group is feasible.
    """
    sizes = list(shape)
    groups: List[List[int]] = []
    total = 1
    for s in sizes:
        total *= s
    i = 0
    while i < len(order):
        grp = [order[i]]
        j = i + 1
        while j < len(order):
            cand = grp + [order[j]]
            gin = 1
            for n in cand:
                gin *= sizes[n]
            rest_rows = total // gin if gin else 0
            need = _group_footprint(sizes, ks, cand) * max(1, min(_MIN_BLOCK_ROWS, rest_rows))
            if need > scratch_elems:
                break
            grp = cand
            j += 1
        # apply the group to the bookkeeping sizes
        for n in grp:
            total = total // sizes[n] * ks[n]
            sizes[n] = ks[n]
        groups.append(grp)
        i = j
    return groups


def _block_list(rest_dims, rows_target):
    """Blocks over the rest modes: fixed outer index, chunk of one dim, full inner dims.

    Such a block is a contiguous range of rows of the pass output.  Returns
    ``(t, inner, blocks)`` with blocks as ``(prefix, c0, c1, row0, nrows)``.
    """
    m = len(rest_dims)
    inner = 1
    t = m  # index of the chunked dim; m means "everything is one block"
    for d in range(m - 1, -1, -1):
        if inner * rest_dims[d] >= rows_target:
            t = d
            break
        inner *= rest_dims[d]
    if t == m:
        return m, inner, [((), 0, 1, 0, inner)]
    chunk = max(1, rows_target // inner)
    blocks = []
    outer_dims = rest_dims[:t]
    row_stride_t = inner
    row_stride_prefix = rest_dims[t] * inner
    for p_lin, prefix in enumerate(itertools.product(*[range(s) for s in outer_dims])):
        base = p_lin * row_stride_prefix
        for c0 in range(0, rest_dims[t], chunk):
            c1 = min(c0 + chunk, rest_dims[t])
            blocks.append((prefix, c0, c1, base + c0 * row_stride_t, (c1 - c0) * inner))
    return t, inner, blocks


def _apply_group_block(ops, S, tmp, dst2d_for_last, mats_t, r_in, k_out, nrows):
    """Apply the group's products to the gathered block ``S`` (layout g..., rows).

    ``S``/``tmp`` are flat scratch buffers (ping-pong).  The last product writes into
    ``dst2d_for_last`` (rows-major (nrows*prod(k[:-1]), k[-1]) view) when given.
    Returns the flat buffer holding the result (None when written to dst).
    """
    size = nrows
    for s in r_in:
        size *= s
    a, b = S, tmp
    m = len(mats_t)
    for i in range(m):
        r, k = r_in[i], k_out[i]
        cols = size // r
        new_size = cols * k
        src2d = a[:size].reshape(r, cols).T
        if i == m - 1 and dst2d_for_last is not None:
            ops.mm(src2d, mats_t[i], dst2d_for_last)
            return None
        out2d = b[:new_size].reshape(cols, k)
        ops.mm(src2d, mats_t[i], out2d)
        a, b = b, a
        size = new_size
    return a[:size]


def _fast_path(ops, core, matrices, order, out):
    shape = list(core.shape)
    ks = [None if m is None else int(m.shape[0]) for m in matrices]
    N = len(shape)
    out_shape = tuple(shape[n] if ks[n] is None else ks[n] for n in range(N))

    core = ops.contiguous(core)
    scratch_elems = max(ops.SCRATCH_BYTES // ops.itemsize(core), 1)

    # Sizes of every intermediate (to decide blocking and workspace size).
    sizes = list(shape)
    total = 1
    for s in sizes:
        total *= s
    max_inter = total
    for n in order:
        total = total // sizes[n] * ks[n]
        sizes[n] = ks[n]
        max_inter = max(max_inter, total)

    blocked = max_inter >= _BLOCKING_MIN_ELEMS
    # Unblocked: one whole-tensor GEMM per product (the plain "rotate" chain).
    groups = _plan_groups(shape, ks, order, scratch_elems) if blocked else [[n] for n in order]

    if out is None:
        out = ops.new_output(out_shape, core)
    out_flat = out.reshape(-1)

    # Thread-safety: the cached workspace is used by one call at a time; a
    # concurrent caller gets private buffers.
    cache = _WS_LOCK.acquire(blocking=False)
    try:
        return _run_passes(ops, core, matrices, ks, shape, groups, out, out_flat,
                           scratch_elems, blocked, cache)
    finally:
        if cache:
            _WS_LOCK.release()


def _run_passes(ops, core, matrices, ks, shape, groups, out, out_flat, scratch_elems, blocked, cache):
    N = len(shape)
    mats_t = [None if m is None else m.T for m in matrices]
    layout = list(range(N))
    sizes = list(shape)
    src = core.reshape(-1)
    total = src.shape[0]
    n_pass = len(groups)
    ws_role = 0

    for p, grp in enumerate(groups):
        last = p == n_pass - 1
        rest = [n for n in layout if n not in grp]
        new_layout = rest + list(grp)
        new_total = total
        for n in grp:
            new_total = new_total // sizes[n] * ks[n]
        direct_out = last and new_layout == list(range(N))
        if direct_out:
            dst = out_flat
        elif last:
            dst = None  # scattered into a permuted view of ``out``
        else:
            dst = _workspace(ops, core, f"inter{ws_role}", new_total, cache)
            ws_role ^= 1

        cur_dims = [sizes[n] for n in layout]
        r_in = [sizes[n] for n in grp]
        k_out = [ks[n] for n in grp]
        gin = 1
        for s in r_in:
            gin *= s
        gout = 1
        for s in k_out:
            gout *= s
        rest_rows = total // gin if gin else 0

        # Single product on the leading or trailing mode of the layout: one big GEMM
        # over the whole tensor does the job without any gather.
        if len(grp) == 1 and dst is not None and layout[0] == grp[0]:
            n = grp[0]
            a2 = src.reshape(sizes[n], rest_rows).T
            o2 = dst.reshape(rest_rows, ks[n])
            ops.mm(a2, mats_t[n], o2)
        elif len(grp) == 1 and dst is not None and layout[-1] == grp[0]:
            n = grp[0]
            a2 = src.reshape(rest_rows, sizes[n])
            o2 = dst.reshape(rest_rows, ks[n])
            ops.mm(a2, mats_t[n], o2)
        else:
            _blocked_pass(ops, core, src, dst, out, layout, cur_dims, grp, rest, sizes, ks,
                          r_in, k_out, gin, gout, rest_rows, [mats_t[n] for n in grp],
                          scratch_elems, blocked, cache)

        for n in grp:
            sizes[n] = ks[n]
        layout = new_layout
        total = new_total
        if dst is not None:
            src = dst
    return out


def _blocked_pass(ops, core, src, dst, out, layout, cur_dims, grp, rest, sizes, ks,
                  r_in, k_out, gin, gout, rest_rows, mats_t, scratch_elems, blocked, cache):
    footprint = _group_footprint(sizes, ks, grp)
    if blocked:
        rows_target = max(1, min(rest_rows, scratch_elems // max(footprint, 1)))
    else:
        rows_target = max(rest_rows, 1)
    rest_dims = [sizes[n] for n in rest]
    t, inner, blocks = _block_list(rest_dims, rows_target)
    max_rows = max(b[4] for b in blocks)

    # Source viewed as (group modes..., rest modes...), a strided view.
    perm = [layout.index(n) for n in grp] + [layout.index(n) for n in rest]
    src_perm = ops.permute_view(src.reshape(cur_dims), perm)
    if dst is None:
        # Last pass whose layout (rest..., grp...) is not the natural order: write
        # blocks into ``out`` seen in that layout.
        dst_perm = ops.permute_view(out, rest + list(grp))
    else:
        dst_perm = None
    ng = len(grp)

    n_workers = _n_workers(ops, max(rest_rows * gin, rest_rows * gout)) if blocked else 1
    n_workers = min(n_workers, len(blocks))
    buf_elems = max_rows * footprint

    def work(wid, my_blocks):
        s1 = _workspace(ops, core, f"scratch{wid}a", buf_elems, cache)
        s2 = _workspace(ops, core, f"scratch{wid}b", buf_elems, cache)
        for prefix, c0, c1, row0, nrows in my_blocks:
            bidx = tuple(prefix) + (slice(c0, c1),) if t < len(rest) else ()
            blk_src = src_perm[(slice(None),) * ng + bidx]
            gshape = tuple(r_in) + tuple(blk_src.shape[ng:])
            S = s1[: gin * nrows]
            ops.copy(S.reshape(gshape), blk_src)
            if dst is not None:
                o = dst[row0 * gout : (row0 + nrows) * gout]
                o2 = o.reshape(-1, k_out[-1])
                _apply_group_block(ops, s1, s2, o2, mats_t, r_in, k_out, nrows)
            else:
                res = _apply_group_block(ops, s1, s2, None, mats_t, r_in, k_out, nrows)
                oshape = tuple(blk_src.shape[ng:]) + tuple(k_out)
                ops.copy(dst_perm[bidx], res.reshape(oshape))

    if n_workers <= 1:
        work(0, blocks)
        return
    # Workers pull blocks from one shared iterator (``next`` on a list iterator is
    # atomic under the GIL): on a shared machine a static split leaves the whole
    # pass waiting for whichever core is being stolen from.
    shared = iter(blocks)
    pool = _pool(n_workers - 1)
    pass_scope, worker_scope = ops.worker_scopes()
    with pass_scope:
        futs = [pool.submit(_in_scope, worker_scope, work, w, shared) for w in range(1, n_workers)]
        try:
            _in_scope(worker_scope, work, 0, shared)
        finally:
            for f in futs:
                f.result()


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
        return _fast_path(ops, core, matrices, order, out)
