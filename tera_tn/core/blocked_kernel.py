"""The cache-blocked, multi-threaded CPU kernel behind :func:`~tera_tn.core.modeproduct.multi_mode_product`.

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

The buffers and thread pool live in the :class:`~tera_tn.core.workspace.Workspace` the caller
entered (:func:`~tera_tn.core.workspace.use_workspace`); without one a call runs on one thread
with private buffers.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import List

from .workspace import current_workspace, in_scope, usable_cores, workspace

__all__ = ["blocked_product"]

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


def _n_workers(ops, total_elems: int) -> int:
    if total_elems < _WORKERS_MIN_ELEMS:
        return 1
    return ops.max_workers(usable_cores())


# --------------------------------------------------------------------------- #
# Planning the passes
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


# --------------------------------------------------------------------------- #
# Passes
# --------------------------------------------------------------------------- #
def blocked_product(ops, core, matrices, order, out):
    """``core`` times ``matrices`` in ``order`` on the CPU fast path, into ``out`` (or a new array).

    Called by :func:`~tera_tn.core.modeproduct.multi_mode_product` with checked, non-empty operands,
    inside the backend's ``kernel_scope``."""
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

    # The workspace entered by the caller (use_workspace) lends its threads; its cached buffers
    # are used by one call at a time, a concurrent caller gets private buffers. Without one:
    # private buffers, one thread.
    ws = current_workspace()
    cache = ws if ws is not None and ws.lock.acquire(blocking=False) else None
    try:
        return _run_passes(ops, core, matrices, ks, shape, groups, out, out_flat,
                           scratch_elems, blocked, cache, ws)
    finally:
        if cache is not None:
            cache.lock.release()


@dataclass
class _Pass:
    """One pass of the plan: the group it applies and where its input and output live."""

    grp: list
    rest: list
    layout: list
    cur_dims: list
    r_in: list
    k_out: list
    gin: int
    gout: int
    rest_rows: int
    new_total: int
    #: "out" (the pass writes ``out`` in order), "scatter" (into a permuted view of ``out``) or the
    #: workspace role of its intermediate ("inter0"/"inter1", alternating so input and output never alias)
    dst: str
    #: "lead"/"trail": one GEMM over the whole tensor (a single product on the layout's first or last
    #: mode); "blocked": gathered blocks through the scratch buffers
    form: str
    t: int = 0
    blocks: list = field(default_factory=list)
    buf_elems: int = 0
    n_workers: int = 1


def _plan_passes(ops, shape, ks, groups, scratch_elems, blocked, threaded) -> list[_Pass]:
    """Every pass's layout, output and blocks, before any buffer exists (so the workspace is asked
    for all of them at once)."""
    N = len(shape)
    layout = list(range(N))
    sizes = list(shape)
    total = 1
    for s in sizes:
        total *= s
    role = 0
    passes = []
    for p, grp in enumerate(groups):
        last = p == len(groups) - 1
        rest = [n for n in layout if n not in grp]
        new_layout = rest + list(grp)
        new_total = total
        for n in grp:
            new_total = new_total // sizes[n] * ks[n]
        if last:
            dst = "out" if new_layout == list(range(N)) else "scatter"
        else:
            dst, role = f"inter{role}", role ^ 1
        r_in = [sizes[n] for n in grp]
        k_out = [ks[n] for n in grp]
        gin = 1
        for s in r_in:
            gin *= s
        gout = 1
        for s in k_out:
            gout *= s
        rest_rows = total // gin if gin else 0
        step = _Pass(grp, rest, layout, [sizes[n] for n in layout], r_in, k_out, gin, gout, rest_rows, new_total, dst,
                     "blocked")
        # A single product on the leading or trailing mode of the layout: one big GEMM over the
        # whole tensor does the job without any gather.
        if len(grp) == 1 and dst != "scatter" and layout[0] == grp[0]:
            step.form = "lead"
        elif len(grp) == 1 and dst != "scatter" and layout[-1] == grp[0]:
            step.form = "trail"
        else:
            footprint = _group_footprint(sizes, ks, grp)
            rows_target = max(1, min(rest_rows, scratch_elems // max(footprint, 1))) if blocked else max(rest_rows, 1)
            step.t, _, step.blocks = _block_list([sizes[n] for n in rest], rows_target)
            step.buf_elems = max(b[4] for b in step.blocks) * footprint
            workers = _n_workers(ops, max(rest_rows * gin, rest_rows * gout)) if blocked and threaded else 1
            step.n_workers = min(workers, len(step.blocks))
        passes.append(step)
        for n in grp:
            sizes[n] = ks[n]
        layout = new_layout
        total = new_total
    return passes


def _run_passes(ops, core, matrices, ks, shape, groups, out, out_flat, scratch_elems, blocked, cache, ws):
    passes = _plan_passes(ops, shape, ks, groups, scratch_elems, blocked, ws is not None)
    # Everything the passes use, lent at once: both intermediates at their largest, each worker's
    # two scratch buffers at the largest block, and the pool's threads.
    inter: dict[str, int] = {}
    for p in passes:
        if p.dst.startswith("inter"):
            inter[p.dst] = max(inter.get(p.dst, 0), p.new_total)
    workers = max(p.n_workers for p in passes)
    buf_elems = max(p.buf_elems for p in passes)
    lent = {role: workspace(ops, core, role, n, cache) for role, n in inter.items()}
    scratch = [(workspace(ops, core, f"scratch{w}a", buf_elems, cache), workspace(ops, core, f"scratch{w}b", buf_elems, cache))
               for w in range(workers if buf_elems else 0)]
    pool = ws.pool(workers - 1) if workers > 1 else None

    mats_t = [None if m is None else m.T for m in matrices]
    src = core.reshape(-1)
    for p in passes:
        dst = out_flat if p.dst == "out" else None if p.dst == "scatter" else lent[p.dst][: p.new_total]
        if p.form == "lead":
            n = p.grp[0]
            ops.mm(src.reshape(p.cur_dims[0], p.rest_rows).T, mats_t[n], dst.reshape(p.rest_rows, ks[n]))
        elif p.form == "trail":
            n = p.grp[0]
            ops.mm(src.reshape(p.rest_rows, p.cur_dims[-1]), mats_t[n], dst.reshape(p.rest_rows, ks[n]))
        else:
            _blocked_pass(ops, src, dst, out, p, [mats_t[n] for n in p.grp], scratch, pool)
        if dst is not None:
            src = dst
    return out


def _blocked_pass(ops, src, dst, out, p: _Pass, mats_t, scratch, pool):
    # Source viewed as (group modes..., rest modes...), a strided view.
    grp, rest, layout, t = p.grp, p.rest, p.layout, p.t
    perm = [layout.index(n) for n in grp] + [layout.index(n) for n in rest]
    src_perm = ops.permute_view(src.reshape(p.cur_dims), perm)
    # The last pass whose layout (rest..., grp...) is not the natural order writes its blocks into
    # ``out`` seen in that layout.
    dst_perm = ops.permute_view(out, rest + list(grp)) if dst is None else None
    ng = len(grp)

    def work(wid, my_blocks):
        s1, s2 = scratch[wid]
        for prefix, c0, c1, row0, nrows in my_blocks:
            bidx = tuple(prefix) + (slice(c0, c1),) if t < len(rest) else ()
            blk_src = src_perm[(slice(None),) * ng + bidx]
            gshape = tuple(p.r_in) + tuple(blk_src.shape[ng:])
            S = s1[: p.gin * nrows]
            ops.copy(S.reshape(gshape), blk_src)
            if dst is not None:
                o = dst[row0 * p.gout : (row0 + nrows) * p.gout]
                o2 = o.reshape(-1, p.k_out[-1])
                _apply_group_block(ops, s1, s2, o2, mats_t, p.r_in, p.k_out, nrows)
            else:
                res = _apply_group_block(ops, s1, s2, None, mats_t, p.r_in, p.k_out, nrows)
                oshape = tuple(blk_src.shape[ng:]) + tuple(p.k_out)
                ops.copy(dst_perm[bidx], res.reshape(oshape))

    if p.n_workers <= 1:
        work(0, p.blocks)
        return
    # Workers pull blocks from one shared iterator (``next`` on a list iterator is
    # atomic under the GIL): on a shared machine a static split leaves the whole
    # pass waiting for whichever core is being stolen from.
    shared = iter(p.blocks)
    pass_scope, worker_scope = ops.worker_scopes()
    with pass_scope:
        futs = [pool.submit(in_scope, worker_scope, work, w, shared) for w in range(1, p.n_workers)]
        try:
            in_scope(worker_scope, work, 0, shared)
        finally:
            for f in futs:
                f.result()
