"""Tests of tera_tn.core.modeproduct: correctness against tensorly / einsum, order optimality,
torch parity, autograd, and the cache-blocked fast path (no timing assertions)."""

from __future__ import annotations

import itertools
import string

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import tera_tn.core.blocked_kernel as bk
import tera_tn.core.modeproduct as mp
import tera_tn.core.workspace as workspace
from tera_tn.core.modeproduct import best_order, chain_steps, mode_product_flops, multi_mode_product

torch = pytest.importorskip("torch")
tl_tenalg = pytest.importorskip("tensorly.tenalg")
from tera_tn.backends import numpy as numpy_backend, torch as torch_backend  # noqa: E402


# ----------------------------------------------------------------------------- helpers
def einsum_ref(core, mats):
    n = core.ndim
    letters = string.ascii_letters
    r, k = letters[:n], letters[n : 2 * n]
    ops, terms, out = [core], [r], ""
    for i, m in enumerate(mats):
        if m is None:
            out += r[i]
        else:
            ops.append(m)
            terms.append(k[i] + r[i])
            out += k[i]
    return np.einsum(",".join(terms) + "->" + out, *ops, optimize=True)


def tensorly_ref(core, mats):
    modes = [i for i, m in enumerate(mats) if m is not None]
    if not modes:
        return core.copy()
    return tl_tenalg.multi_mode_dot(core, [mats[i] for i in modes], modes=modes)


def rel_err(a, b):
    a, b = np.asarray(a), np.asarray(b)
    return np.abs(a - b).max() / max(np.abs(b).max(), 1e-300)


@st.composite
def problems(draw, max_order=6, max_size=7):
    n = draw(st.integers(1, max_order))
    ranks = draw(st.lists(st.integers(1, max_size), min_size=n, max_size=n))
    ks = []
    for r in ranks:
        kind = draw(st.sampled_from(["ge", "ge", "lt", "none"]))
        if kind == "none":
            ks.append(None)
        elif kind == "lt":
            ks.append(draw(st.integers(1, max(1, r))))  # K <= R (shrinking modes)
        else:
            ks.append(draw(st.integers(r, max_size)))
    seed = draw(st.integers(0, 2**31 - 1))
    rng = np.random.default_rng(seed)
    core = rng.standard_normal(ranks)
    mats = [None if k is None else rng.standard_normal((k, r)) for k, r in zip(ks, ranks)]
    return core, mats


@pytest.fixture
def force_blocking(monkeypatch):
    """Make tiny problems take the blocked multi-pass path (small scratch, no size floor)."""
    monkeypatch.setattr(bk, "_BLOCKING_MIN_ELEMS", 1)
    monkeypatch.setattr(bk, "_WORKERS_MIN_ELEMS", 1)
    monkeypatch.setattr(bk, "_MIN_BLOCK_ROWS", 2)
    monkeypatch.setattr(torch_backend, "SCRATCH_BYTES", 4096)
    monkeypatch.setattr(numpy_backend, "SCRATCH_BYTES", 4096)
    workspace.clear_workspace()
    yield
    workspace.clear_workspace()


# ----------------------------------------------------------------------------- numpy
@settings(deadline=None, max_examples=50)
@given(problems())
def test_numpy_matches_tensorly_and_einsum(prob):
    core, mats = prob
    x = multi_mode_product(core, mats)
    expect_shape = tuple(s if m is None else m.shape[0] for s, m in zip(core.shape, mats))
    assert x.shape == expect_shape
    assert x.flags.c_contiguous and x.dtype == np.float64
    assert rel_err(x, tensorly_ref(core, mats)) < 1e-12
    assert rel_err(x, einsum_ref(core, mats)) < 1e-12


@settings(deadline=None, max_examples=40)
@given(problems())
def test_blocked_path_matches_reference(prob):
    core, mats = prob
    with pytest.MonkeyPatch.context() as m:
        m.setattr(bk, "_BLOCKING_MIN_ELEMS", 1)
        m.setattr(bk, "_WORKERS_MIN_ELEMS", 1)  # exercise the worker threads too
        m.setattr(bk, "_MIN_BLOCK_ROWS", 2)
        m.setattr(torch_backend, "SCRATCH_BYTES", 2048)
        m.setattr(numpy_backend, "SCRATCH_BYTES", 2048)
        ref = einsum_ref(core, mats)
        x = multi_mode_product(core, mats)
        assert rel_err(x, ref) < 1e-12
        xt = multi_mode_product(torch.from_numpy(core), [None if a is None else torch.from_numpy(a) for a in mats])
        assert rel_err(xt.numpy(), ref) < 1e-12
        assert xt.is_contiguous()


# ----------------------------------------------------------------------------- torch
@settings(deadline=None, max_examples=40)
@given(problems())
def test_torch_matches_numpy(prob):
    core, mats = prob
    xt = multi_mode_product(torch.from_numpy(core), [None if m is None else torch.from_numpy(m) for m in mats])
    assert isinstance(xt, torch.Tensor) and xt.dtype == torch.float64 and xt.is_contiguous()
    assert rel_err(xt.numpy(), multi_mode_product(core, mats)) < 1e-12


@settings(deadline=None, max_examples=30)
@given(problems(max_order=5, max_size=5))
def test_fast_path_equals_autograd_path(prob):
    core, mats = prob
    ct = torch.from_numpy(core)
    mt = [None if m is None else torch.from_numpy(m) for m in mats]
    fast = multi_mode_product(ct, mt)
    ct_g = ct.clone().requires_grad_(True)
    slow = multi_mode_product(ct_g, mt)
    assert slow.requires_grad and slow.grad_fn is not None
    assert fast.grad_fn is None
    assert rel_err(fast.numpy(), slow.detach().numpy()) < 1e-12
    with torch.no_grad():  # grad mode off -> fast path even with requires_grad operands
        nograd = multi_mode_product(ct_g, mt)
    assert nograd.grad_fn is None and rel_err(nograd.numpy(), fast.numpy()) < 1e-12


def test_gradcheck_float64():
    g = torch.Generator().manual_seed(0)
    core = torch.randn(2, 3, 2, dtype=torch.float64, generator=g, requires_grad=True)
    mats = [
        torch.randn(3, 2, dtype=torch.float64, generator=g, requires_grad=True),
        None,
        torch.randn(1, 2, dtype=torch.float64, generator=g, requires_grad=True),
    ]
    a, c = mats[0], mats[2]
    assert torch.autograd.gradcheck(lambda core, a, c: multi_mode_product(core, [a, None, c]), (core, a, c))
    # only a factor requires grad
    core2 = core.detach()
    assert torch.autograd.gradcheck(lambda a: multi_mode_product(core2, [a, None, c.detach()]), (a,))


def test_float32_torch_and_numpy_agree():
    rng = np.random.default_rng(1)
    core = rng.standard_normal((5, 6, 7)).astype(np.float32)
    mats = [rng.standard_normal((k, r)).astype(np.float32) for k, r in [(8, 5), (6, 6), (9, 7)]]
    ref = einsum_ref(core.astype(np.float64), [m.astype(np.float64) for m in mats])
    x = multi_mode_product(core, mats)
    xt = multi_mode_product(torch.from_numpy(core), [torch.from_numpy(m) for m in mats])
    assert x.dtype == np.float32 and xt.dtype == torch.float32
    assert rel_err(x, ref) < 1e-5 and rel_err(xt.numpy(), ref) < 1e-5


# ----------------------------------------------------------------------------- blocked path on a real size
@pytest.mark.parametrize("backend", ["numpy", "torch"])
def test_blocked_path_large(backend):
    """Shapes big enough that the default settings take the blocked, multi-worker path."""
    rng = np.random.default_rng(2)
    ranks, sizes = (8, 6, 8, 6, 8, 6), (10, 9, 8, 7, 10, 9)  # 2.2e5 -> 4.5e5 elements
    core = rng.standard_normal(ranks)
    mats = [rng.standard_normal((k, r)) for k, r in zip(sizes, ranks)]
    shape, ks = mp._shapes(ranks, [m.shape for m in mats])
    order = best_order(ranks, [m.shape for m in mats])
    assert len(bk._plan_groups(list(shape), ks, list(order), torch_backend.SCRATCH_BYTES // 8)) >= 2
    ref = einsum_ref(core, mats)
    if backend == "numpy":
        x = multi_mode_product(core, mats)
        out = np.empty_like(x)
        assert multi_mode_product(core, mats, out=out) is out
        assert rel_err(out, ref) < 1e-12
    else:
        x = multi_mode_product(torch.from_numpy(core), [torch.from_numpy(m) for m in mats]).numpy()
    assert rel_err(x, ref) < 1e-12
    # second call reuses the cached workspace and must not be affected by it
    x2 = multi_mode_product(core, mats) if backend == "numpy" else multi_mode_product(
        torch.from_numpy(core), [torch.from_numpy(m) for m in mats]).numpy()
    assert rel_err(x2, ref) < 1e-12


def test_blocked_path_non_natural_order_and_none(force_blocking):
    """Optimal order not the natural one (final pass scatters into a permuted view)."""
    rng = np.random.default_rng(3)
    ranks = (6, 5, 7, 4)
    mats = [rng.standard_normal((9, 6)), None, rng.standard_normal((3, 7)), rng.standard_normal((4, 4))]
    core = rng.standard_normal(ranks)
    assert best_order(ranks, [None if m is None else m.shape for m in mats]) != (0, 2, 3)
    ref = einsum_ref(core, mats)
    assert rel_err(multi_mode_product(core, mats), ref) < 1e-12
    xt = multi_mode_product(torch.from_numpy(core), [None if m is None else torch.from_numpy(m) for m in mats])
    assert rel_err(xt.numpy(), ref) < 1e-12


def test_noncontiguous_inputs_and_out():
    rng = np.random.default_rng(4)
    core = rng.standard_normal((7, 6, 5)).transpose(2, 0, 1)  # (5, 7, 6), not contiguous
    mats = [rng.standard_normal((5, 4)).T, rng.standard_normal((8, 7)), None]  # (4, 5) transposed view
    ref = einsum_ref(core, mats)
    assert rel_err(multi_mode_product(core, mats), ref) < 1e-12
    out = torch.empty(4, 8, 6, dtype=torch.float64)
    res = multi_mode_product(torch.from_numpy(core), [torch.from_numpy(mats[0]), torch.from_numpy(mats[1]), None],
                             out=out)
    assert res is out and rel_err(out.numpy(), ref) < 1e-12


def test_edge_cases():
    core = np.arange(6.0).reshape(2, 3)
    x = multi_mode_product(core, [None, None])
    assert np.array_equal(x, core) and x is not core
    z = multi_mode_product(np.zeros((0, 3)), [np.ones((2, 0)), np.ones((4, 3))])
    assert z.shape == (2, 4) and not z.any()
    with pytest.raises(ValueError):
        multi_mode_product(core, [np.ones((2, 3)), None])
    with pytest.raises(ValueError):
        multi_mode_product(core, [None])
    with pytest.raises(TypeError):
        multi_mode_product(core, [np.ones((2, 2), np.float32), None])
    with pytest.raises(TypeError):
        multi_mode_product(torch.ones(2, 3), [np.ones((2, 2)), None])


# ----------------------------------------------------------------------------- order / flops
@settings(deadline=None, max_examples=50)
@given(st.lists(st.tuples(st.integers(1, 9), st.integers(1, 9)), min_size=1, max_size=6),
       st.integers(0, 2**16))
def test_best_order_is_optimal(pairs, nmask):
    ranks = [r for r, _ in pairs]
    mshapes = [None if (nmask >> i) & 1 and i % 3 == 0 else (k, r) for i, (r, k) in enumerate(pairs)]
    present = [i for i, m in enumerate(mshapes) if m is not None]
    best = best_order(ranks, mshapes)
    assert sorted(best) == present
    brute = min(mode_product_flops(ranks, mshapes, p) for p in itertools.permutations(present))
    assert mode_product_flops(ranks, mshapes, best) == brute
    assert mode_product_flops(ranks, mshapes) == brute


def test_flops_and_chain_steps():
    shapes = [(16, 16)] * 6
    assert mode_product_flops((16,) * 6, shapes) == 2 * 16**7 * 6
    assert best_order((16,) * 6, shapes) == tuple(range(6))
    # shrinking mode first, then by 1/R - 1/K: mode 0 (3/16) before mode 2 (1/4); FLOPs 1280 vs 1408
    assert best_order((4, 8, 2), [(16, 4), (2, 8), (4, 2)]) == (1, 0, 2)
    assert mode_product_flops((4, 8, 2), [(16, 4), (2, 8), (4, 2)]) == 1280
    assert mode_product_flops((4, 8, 2), [(16, 4), (2, 8), (4, 2)], order=(1, 2, 0)) == 1408
    steps = chain_steps((4, 8, 2), (16, 2, 4))
    assert steps == [(1, 64, 2, 8), (0, 16, 16, 4), (2, 64, 4, 2)]
    assert sum(2 * s * k for _, s, k, _ in steps) == mode_product_flops((4, 8, 2), [(16, 4), (2, 8), (4, 2)])
    with pytest.raises(ValueError):
        mode_product_flops((2, 2), [(3, 2), (3, 2)], order=[0])


def test_workspace_made_under_inference_mode_is_not_reused_outside_it():
    # Evaluating under torch.inference_mode() and then training again (what a fine-tuning loop does)
    # once crashed with "Inplace update to inference tensor outside InferenceMode".
    import torch

    from tera_tn.core import modeproduct as mp

    core = torch.randn(4, 4, 4, dtype=torch.float64)
    mats = [torch.randn(4, 4, dtype=torch.float64) for _ in range(3)]
    workspace.clear_workspace()
    with torch.inference_mode():
        inside = mp.multi_mode_product(core, mats)
    outside = mp.multi_mode_product(core, mats)
    torch.testing.assert_close(outside, inside.clone())
    workspace.clear_workspace()
