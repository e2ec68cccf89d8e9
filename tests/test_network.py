"""The TeRA network: ΔW against independent references, the rank theorem, init, gauge, seeds."""

from __future__ import annotations

import hashlib
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorly as tl
import torch
from hypothesis import assume, example, given, settings
from hypothesis import strategies as st

from strategies import (
    alphas,
    effective_factors,
    kron_all,
    kron_vec,
    reference_einsum,
    reference_kron,
    relerr,
    scales_for,
    seeds,
    spec_and_scales,
    specs,
)
from tera_tn import (
    TeRAFactors,
    TeRASpec,
    delta_weight,
    init_scales,
    random_factors,
    theoretical_rank,
)
from tera_tn.core.network import scaled_factors

FACTOR_INITS = ("orthogonal", "gaussian", "uniform")
factor_inits = st.sampled_from(FACTOR_INITS)


# --- ΔW against independent references ------------------------------------------------------------


@given(spec_and_scales(zeros=True), seeds, alphas, factor_inits)
def test_delta_weight_matches_kronecker_form(ss, seed, alpha, init):
    spec, scales = ss
    f = random_factors(spec, seed, init=init)
    dw = delta_weight(spec, f, scales, alpha)
    assert isinstance(dw, np.ndarray) and dw.dtype == np.float64 and dw.shape == spec.shape
    assert relerr(dw, reference_kron(spec, f, scales, alpha)) < 1e-12


@given(spec_and_scales(zeros=True), seeds, alphas)
def test_delta_weight_matches_einsum(ss, seed, alpha):
    spec, scales = ss
    f = random_factors(spec, seed)
    assert relerr(delta_weight(spec, f, scales, alpha), reference_einsum(spec, f, scales, alpha)) < 1e-12


@given(spec_and_scales(), seeds, alphas, factor_inits)
def test_delta_weight_matches_tensorly(ss, seed, alpha, init):
    spec, scales = ss
    f = random_factors(spec, seed, init=init)
    a = effective_factors(spec, f, scales)
    core = np.asarray(f.core)
    x1 = tl.tenalg.multi_mode_dot(core, a)
    x2 = tl.tucker_to_tensor((core, a))
    for x in (x1, x2):
        ref = (alpha * np.asarray(x).reshape(spec.padded_shape))[: spec.d_out, : spec.d_in]
        assert relerr(delta_weight(spec, f, scales, alpha), ref) < 1e-12


@given(spec_and_scales(zeros=True, diags=("identity",)), seeds, alphas)
def test_identity_form(ss, seed, alpha):
    """ΔW = α reshape(G) ⊙ (u vᵀ), u = ⊗λ_row, v = ⊗λ_col."""
    spec, scales = ss
    f = random_factors(spec, seed)
    assert all(u is None for u in f.factors)
    p = spec.n_row
    u, v = kron_vec(scales[:p]), kron_vec(scales[p:])
    ref = (alpha * f.core.reshape(spec.padded_shape) * np.outer(u, v))[: spec.d_out, : spec.d_in]
    assert relerr(delta_weight(spec, f, scales, alpha), ref) < 1e-12


@given(spec_and_scales(zeros=True, diags=("mode",)), seeds, alphas)
def test_mode_side_form(ss, seed, alpha):
    """ΔW = diag(u) M diag(v) with one fixed M = α (⊗U_row) G_mat (⊗U_col)ᵀ."""
    spec, scales = ss
    f = random_factors(spec, seed)
    p = spec.n_row
    g = f.core.reshape(math.prod(spec.ranks[:p]), math.prod(spec.ranks[p:]))
    m = alpha * kron_all(f.factors[:p]) @ g @ kron_all(f.factors[p:]).T
    u, v = kron_vec(scales[:p]), kron_vec(scales[p:])
    ref = (u[:, None] * m * v[None, :])[: spec.d_out, : spec.d_in]
    assert relerr(delta_weight(spec, f, scales, alpha), ref) < 1e-12


@given(spec_and_scales(zeros=True, diags=("rank",)), seeds)
def test_rank_side_hadamard_form(ss, seed):
    """ΔW = P (G_mat ⊙ u vᵀ) Qᵀ with P = ⊗U_row, Q = ⊗U_col (the Kronecker form of the network)."""
    spec, scales = ss
    f = random_factors(spec, seed)
    p = spec.n_row
    g = f.core.reshape(math.prod(spec.ranks[:p]), math.prod(spec.ranks[p:]))
    u, v = kron_vec(scales[:p]), kron_vec(scales[p:])
    ref = (kron_all(f.factors[:p]) @ (g * np.outer(u, v)) @ kron_all(f.factors[p:]).T)[: spec.d_out, : spec.d_in]
    assert relerr(delta_weight(spec, f, scales), ref) < 1e-12


@given(spec_and_scales(), seeds, alphas)
def test_scaled_factors(ss, seed, alpha):
    spec, scales = ss
    f = random_factors(spec, seed)
    got = scaled_factors(spec, f, scales, alpha)
    assert len(got) == spec.order
    if spec.diag == "identity":
        assert all(a is None for a in got)
        return
    ref = effective_factors(spec, f, scales)
    ref[0] = ref[0] * alpha
    # α may sit in any one factor: compare the product via the Kronecker form and each A_n up to it
    for n, (a, r) in enumerate(zip(got, ref)):
        assert a.shape == (spec.modes[n], spec.ranks[n])
        if n > 0:
            assert relerr(a, r) < 1e-13


def test_tiny_explicit_example():
    """A 2×2 hand computation: ΔW = α A_1 G A_2ᵀ."""
    spec = TeRASpec((2,), (2,))
    g = np.array([[1.0, 2.0], [3.0, 4.0]])
    u1 = np.array([[1.0, 1.0], [0.0, 1.0]])
    u2 = np.array([[2.0, 0.0], [1.0, 1.0]])
    f = TeRAFactors(g, (u1, u2))
    lam = (np.array([1.0, -1.0]), np.array([0.5, 2.0]))
    expected = 3.0 * (u1 @ np.diag(lam[0])) @ g @ (u2 @ np.diag(lam[1])).T
    assert np.allclose(delta_weight(spec, f, lam, 3.0), expected, rtol=0, atol=1e-14)
    mode = TeRASpec((2,), (2,), diag="mode")
    expected = (np.diag(lam[0]) @ u1) @ g @ (np.diag(lam[1]) @ u2).T
    assert np.allclose(delta_weight(mode, f, lam), expected, rtol=0, atol=1e-14)


# --- rank theorem -------------------------------------------------------------------------------


def _numerical_rank(spec, scales, seed):
    dw = delta_weight(spec, random_factors(spec, seed), scales)
    return int(np.linalg.matrix_rank(dw)) if dw.size else 0


@given(spec_and_scales(zeros=True, padding=False), seeds)
def test_rank_theorem_unpadded(ss, seed):
    spec, scales = ss
    p = spec.n_row
    nnz = [int(np.count_nonzero(s)) for s in scales]
    if spec.diag == "mode":
        r = [min(z, rk) for z, rk in zip(nnz, spec.ranks)]
    elif spec.diag == "both":  # the rank side's count, capped by the mode side's
        r = [min(np.count_nonzero(s[:k]), np.count_nonzero(s[k:])) for s, k in zip(scales, spec.modes)]
    else:
        r = nnz
    predicted = min(math.prod(r[:p]), math.prod(r[p:]))
    assert theoretical_rank(spec, scales) == predicted
    assert _numerical_rank(spec, scales, seed) == predicted


@given(spec_and_scales(zeros=True), seeds)
def test_rank_theorem_all_specs(ss, seed):
    """Including padded specs (C-order prefixes of the Kronecker factors)."""
    spec, scales = ss
    assert theoretical_rank(spec, scales) == _numerical_rank(spec, scales, seed)


@given(spec_and_scales(zeros=True, padding="always"), seeds)
def test_rank_theorem_padded(ss, seed):
    """Padded specs: the rank of the kept C-order prefix rows/columns, not min(nnz products, d)."""
    spec, scales = ss
    assert spec.padding != (0, 0)
    assert theoretical_rank(spec, scales) == _numerical_rank(spec, scales, seed)


@given(spec_and_scales(padding=False, reduced=False, diags=("rank",)), seeds)
def test_rank_without_zeros_is_full(ss, seed):
    spec, scales = ss
    assert theoretical_rank(spec, scales) == min(spec.shape) == spec.max_rank
    assert _numerical_rank(spec, scales, seed) == min(spec.shape)


@pytest.mark.parametrize(
    "spec",
    [
        TeRASpec((3, 4), (5, 2), d_out=7, d_in=9),
        TeRASpec((3, 4), (5, 2), d_out=7, d_in=9, diag="mode", ranks=(2, 3, 4, 1)),
        TeRASpec((3, 4), (5, 2), d_out=7, d_in=9, diag="identity"),
        TeRASpec((4, 4, 2), (6, 5), d_out=21, d_in=27, ranks=(3, 2, 2, 5, 4)),
    ],
)
@pytest.mark.parametrize("zero_pattern", [(), ((0, 0),), ((0, 0), (1, 2)), ((2, 0), (2, 1))])
def test_rank_theorem_padded_examples(spec, zero_pattern):
    scales = list(init_scales(spec, "random", seed=7))
    for mode, idx in zero_pattern:
        if idx < scales[mode].size:
            scales[mode] = scales[mode].copy()
            scales[mode][idx] = 0.0
    for seed in (0, 1):
        assert theoretical_rank(spec, scales) == _numerical_rank(spec, scales, seed)


# --- initialization -----------------------------------------------------------------------------


@given(specs(), seeds, st.data())
def test_zero_start_is_zero_with_nonzero_gradient(spec, seed, data):
    zero_mode = data.draw(st.integers(0, spec.order - 1))
    f = random_factors(spec, seed)
    scales = init_scales(spec, zero_mode=zero_mode)
    # diag="both": only the rank side λ (after the K_n mode-side entries μ) of the vector is zero
    first = spec.modes[zero_mode] if spec.diag == "both" else 0
    assert np.all(scales[zero_mode][first:] == 0) and np.all(scales[zero_mode][:first] == 1)
    assert all(np.all(s == 1) for n, s in enumerate(scales) if n != zero_mode)
    assert np.all(delta_weight(spec, f, scales) == 0)

    ts = [torch.tensor(s, dtype=torch.float64, requires_grad=True) for s in scales]
    dw = delta_weight(spec, f, ts)
    assert isinstance(dw, torch.Tensor) and dw.dtype == torch.float64
    assert torch.all(dw == 0)
    weight = torch.from_numpy(np.random.default_rng(seed).standard_normal(spec.shape))
    (dw * weight).sum().backward()
    g = ts[zero_mode].grad
    assert g is not None and torch.any(g != 0)
    # the gradient is the exact directional derivative: ΔW is linear in λ_{zero_mode}
    assert torch.all(g[:first] == 0)  # μ of the zero mode multiplies λ = 0
    for k in range(first, spec.scale_sizes[zero_mode]):
        e = [s.copy() for s in scales]
        e[zero_mode][k] = 1.0
        expected = float((delta_weight(spec, f, e) * weight.numpy()).sum())
        assert abs(float(g[k]) - expected) <= 1e-10 * max(1.0, abs(expected))


@given(specs())
def test_init_scales_variants(spec):
    for init in ("zero_start", "ones"):
        s = init_scales(spec, init)
        assert [v.shape for v in s] == [(n,) for n in spec.scale_sizes]
        assert all(isinstance(v, np.ndarray) and v.dtype == np.float64 for v in s)
    assert all(np.all(v == 1) for v in init_scales(spec, "ones"))
    r1 = init_scales(spec, "random", seed=3)
    r2 = init_scales(spec, "random", seed=3)
    assert all(np.array_equal(a, b) for a, b in zip(r1, r2))
    for v, n in zip(r1, spec.scale_sizes):
        assert v.shape == (n,)
        assert np.all(np.abs(v) >= 0.5) and np.all(np.abs(v) <= 2.0)
    like = torch.empty(0, dtype=torch.float64)
    t = init_scales(spec, "random", seed=3, like=like)
    assert all(isinstance(v, torch.Tensor) and v.dtype == torch.float64 for v in t)
    assert all(np.array_equal(a.numpy(), b) for a, b in zip(t, r1))
    t32 = init_scales(spec, like=torch.empty(0, dtype=torch.float32))
    assert all(v.dtype == torch.float32 for v in t32)


def test_init_scales_random_signs_and_seeds():
    spec = TeRASpec((7, 7), (7, 7))
    a = np.concatenate(init_scales(spec, "random", seed=1))
    b = np.concatenate(init_scales(spec, "random", seed=2))
    assert np.any(a > 0) and np.any(a < 0)
    assert not np.array_equal(a, b)


@pytest.mark.parametrize(
    "kwargs, bad",
    [
        (dict(init="bogus"), "bogus"),
        (dict(init="zero_start", zero_mode=-1), -1),
        (dict(init="zero_start", zero_mode=4), 4),
        (dict(init="zero_start", zero_mode=1.5), 1.5),
        (dict(init="random", seed=-3), -3),
        (dict(init="random", seed=2.5), 2.5),
    ],
)
def test_init_scales_errors(kwargs, bad):
    spec = TeRASpec((2, 3), (4, 5))
    with pytest.raises(ValueError) as info:
        init_scales(spec, **kwargs)
    assert repr(bad) in str(info.value)


def test_init_scales_random_needs_seed():
    with pytest.raises(ValueError, match="seed"):
        init_scales(TeRASpec((2,), (2,)), "random")


# --- gauge and alpha -----------------------------------------------------------------------------


@given(spec_and_scales(zeros=True), seeds, st.data())
def test_gauge_invariance(ss, seed, data):
    spec, scales = ss
    n = data.draw(st.integers(0, spec.order - 1))
    m = data.draw(st.integers(0, spec.order - 1).filter(lambda k: k != n))
    c = data.draw(st.sampled_from((-1.0, 1.0))) * data.draw(st.floats(0.25, 4.0))
    f = random_factors(spec, seed)
    moved = list(scales)
    moved[n] = scales[n] * c
    moved[m] = scales[m] / c
    assert relerr(delta_weight(spec, f, moved), delta_weight(spec, f, scales)) < 1e-12


@given(spec_and_scales(), seeds, st.floats(-4.0, 4.0))
def test_alpha_scaling(ss, seed, alpha):
    spec, scales = ss
    f = random_factors(spec, seed)
    base = delta_weight(spec, f, scales)
    scaled = delta_weight(spec, f, scales, alpha)
    assert np.allclose(scaled, alpha * base, rtol=1e-12, atol=1e-12 * np.abs(base).max())
    assert np.all(delta_weight(spec, f, scales, 0.0) == 0)


# --- numpy / torch ------------------------------------------------------------------------------


@given(spec_and_scales(zeros=True), seeds, alphas)
def test_numpy_torch_agree(ss, seed, alpha):
    spec, scales = ss
    f = random_factors(spec, seed)
    ref = delta_weight(spec, f, scales, alpha)
    ts = [torch.from_numpy(s) for s in scales]
    for ff in (f, f.as_torch(dtype=torch.float64)):
        got = delta_weight(spec, ff, ts, alpha)
        assert isinstance(got, torch.Tensor) and got.dtype == torch.float64 and tuple(got.shape) == spec.shape
        assert relerr(got.numpy(), ref) < 1e-10
    # torch factors with numpy scales also give a torch result
    got = delta_weight(spec, f.as_torch(dtype=torch.float64), scales, alpha)
    assert isinstance(got, torch.Tensor) and relerr(got.numpy(), ref) < 1e-10


@settings(max_examples=15)
@given(spec_and_scales(max_side=32), seeds)
def test_torch_gradients_match_reference(ss, seed):
    """Autograd of ⟨ΔW, C⟩ w.r.t. λ_n equals the gradient of the einsum reference."""
    spec, scales = ss
    f = random_factors(spec, seed)
    c = torch.from_numpy(np.random.default_rng(seed + 1).standard_normal(spec.shape))
    ts = [torch.tensor(s, requires_grad=True) for s in scales]
    (delta_weight(spec, f, ts) * c).sum().backward()
    for n in range(spec.order):
        for k in range(min(2, spec.scale_sizes[n])) if spec.diag != "both" else (0, spec.modes[n]):
            # ΔW is linear in each side (μ_n or λ_n) of the vector: unit vector on k's side
            e = [s.copy() for s in scales]
            side = slice(None) if spec.diag != "both" else slice(0, spec.modes[n]) if k < spec.modes[n] else slice(spec.modes[n], None)
            e[n][side] = 0.0
            e[n][k] = 1.0
            expected = float((reference_einsum(spec, f, e) * c.numpy()).sum())
            assert abs(float(ts[n].grad[k]) - expected) <= 1e-10 * max(1.0, abs(expected))


# --- seeded factors -------------------------------------------------------------------------------


def _digest(f: TeRAFactors) -> str:
    h = hashlib.sha256()
    h.update(np.ascontiguousarray(f.core).tobytes())
    for u in f.factors:
        h.update(b"none" if u is None else np.ascontiguousarray(u).tobytes())
    return h.hexdigest()


@given(specs(), seeds, factor_inits)
def test_same_seed_bit_identical(spec, seed, init):
    a = random_factors(spec, seed, init=init)
    np.random.seed(seed % 1000)  # global numpy / torch state must not matter
    torch.manual_seed(seed % 1000 + 1)
    np.random.standard_normal(5)
    b = random_factors(spec, seed, init=init)
    assert _digest(a) == _digest(b)
    assert a.core.dtype == np.float64 and a.core.shape == spec.ranks
    for u, k, r in zip(a.factors, spec.modes, spec.ranks):
        if spec.diag == "identity":
            assert u is None
        else:
            assert u.shape == (k, r) and u.dtype == np.float64


@given(specs(), seeds)
def test_different_seed_differs(spec, seed):
    assume(math.prod(spec.ranks) >= 2)
    a = random_factors(spec, seed)
    b = random_factors(spec, seed + 1)
    assert not np.array_equal(a.core, b.core)
    for u, v, r in zip(a.factors, b.factors, spec.ranks):
        if u is not None and u.size > 1:
            assert not np.array_equal(u, v)


@given(specs(), specs(), seeds)
def test_independent_of_draw_order(spec, other, seed):
    fresh = _digest(random_factors(spec, seed))
    random_factors(other, seed)
    random_factors(other, seed + 1)
    init_scales(other, "random", seed=seed)
    assert _digest(random_factors(spec, seed)) == fresh


_SUBPROCESS_SPECS = [
    ((4, 3), (5, 2), None, "rank", None, None),
    ((4, 3, 2), (5, 2), (2, 3, 1, 4, 2), "mode", 20, 9),
    ((3, 3), (2, 2), None, "identity", None, None),
]


@pytest.mark.slow
def test_identical_across_processes():
    code = (
        "import hashlib, numpy as np\n"
        "from tera_tn import TeRASpec, random_factors\n"
        "for args in {specs!r}:\n"
        "    for seed in (0, 12345):\n"
        "        f = random_factors(TeRASpec(*args), seed)\n"
        "        h = hashlib.sha256(); h.update(np.ascontiguousarray(f.core).tobytes())\n"
        "        for u in f.factors: h.update(b'none' if u is None else np.ascontiguousarray(u).tobytes())\n"
        "        print(h.hexdigest())\n"
    ).format(specs=_SUBPROCESS_SPECS)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONHASHSEED="4242", PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=root, check=True)
    theirs = out.stdout.split()
    ours = [_digest(random_factors(TeRASpec(*args), seed)) for args in _SUBPROCESS_SPECS for seed in (0, 12345)]
    assert theirs == ours


@given(specs(diags=("rank", "mode")), seeds)
def test_orthogonal_factors_are_orthonormal(spec, seed):
    f = random_factors(spec, seed)
    for u, r in zip(f.factors, spec.ranks):
        assert np.allclose(u.T @ u, np.eye(r), rtol=0, atol=1e-12)


@pytest.mark.parametrize("init", FACTOR_INITS)
def test_factor_and_core_scales(init):
    spec = TeRASpec((16, 16), (16, 16, 12), ranks=(16, 16, 10, 12, 6))
    cores = [random_factors(spec, s, init=init) for s in range(4)]
    target = 1.0 / math.sqrt(10 * 12 * 6)
    for f in cores:
        assert abs(f.core.std() / target - 1.0) < 0.05
        assert abs(f.core.mean()) < 0.05 * target
    for n, k in enumerate(spec.modes):
        # unit (expected) column norm: variance 1/K_n per entry, pooled over seeds
        second_moment = np.mean([np.mean(f.factors[n] ** 2) for f in cores])
        assert abs(second_moment * k - 1.0) < 0.2
    if init == "uniform":
        for f in cores:
            for u, k in zip(f.factors, spec.modes):
                assert np.all(np.abs(u) <= math.sqrt(3.0 / k))


@pytest.mark.parametrize("bad", [-1, 1.5, True, "3", None])
def test_random_factors_bad_seed(bad):
    with pytest.raises(ValueError) as info:
        random_factors(TeRASpec((2,), (2,)), bad)
    assert repr(bad) in str(info.value)


def test_random_factors_bad_init():
    with pytest.raises(ValueError, match="'qr'"):
        random_factors(TeRASpec((2,), (2,)), 0, init="qr")


def test_factor_conversion():
    spec = TeRASpec((3,), (4,), ranks=(2, 3))
    f = random_factors(spec, 0)
    t = f.as_torch()
    assert t.core.dtype == torch.float32 and all(u.dtype == torch.float32 for u in t.factors)
    back = t.as_numpy()
    assert back.core.dtype == np.float64
    assert np.array_equal(f.as_torch(dtype=torch.float64).as_numpy().core, f.core)


# --- shape errors ----------------------------------------------------------------------------------


def test_mismatched_scales_raise():
    spec = TeRASpec((2, 3), (4,), ranks=(2, 2, 3))
    f = random_factors(spec, 0)
    good = init_scales(spec, "random", seed=0)
    with pytest.raises(ValueError, match=r"3 vectors.*2 vectors|2 vectors"):
        delta_weight(spec, f, good[:2])
    with pytest.raises(ValueError, match=r"4 vectors"):
        delta_weight(spec, f, good + (np.ones(1),))
    bad = (good[0], np.ones(3), good[2])  # R_1 = 2, got 3
    with pytest.raises(ValueError) as info:
        delta_weight(spec, f, bad)
    msg = str(info.value)
    assert "scales[1]" in msg and "(3,)" in msg and "(2,)" in msg
    with pytest.raises(ValueError):
        theoretical_rank(spec, bad)
    with pytest.raises(ValueError):
        scaled_factors(spec, f, bad)
    with pytest.raises(ValueError):
        delta_weight(spec, f, (good[0], good[1], np.ones((3, 1))))
    # mode side wants K_n, not R_n
    mode = TeRASpec((2, 3), (4,), ranks=(2, 2, 3), diag="mode")
    with pytest.raises(ValueError, match=r"scales\[1\]"):
        delta_weight(mode, random_factors(mode, 0), good)


def test_mismatched_factors_raise():
    spec = TeRASpec((2, 3), (4,), ranks=(2, 2, 3))
    other = TeRASpec((2, 3), (4,))
    scales = init_scales(spec, "random", seed=0)
    with pytest.raises(ValueError) as info:
        delta_weight(spec, random_factors(other, 0), scales)
    msg = str(info.value)
    assert "(2, 3, 4)" in msg and "(2, 2, 3)" in msg
    f = random_factors(spec, 0)
    wrong_u = TeRAFactors(f.core, (f.factors[0], f.factors[1].T, f.factors[2]))
    with pytest.raises(ValueError, match=r"U_1.*\(2, 3\).*\(3, 2\)"):
        delta_weight(spec, wrong_u, scales)
    with pytest.raises(ValueError, match="3"):
        delta_weight(spec, TeRAFactors(f.core, f.factors[:2]), scales)
    ident = TeRASpec((2, 3), (4,), diag="identity")
    with pytest.raises(ValueError, match="identity"):
        delta_weight(ident, random_factors(other, 0), init_scales(ident, "ones"))
    with pytest.raises(TypeError, match="TeRASpec"):
        delta_weight("not a spec", f, scales)


@settings(max_examples=10)
@given(spec_and_scales(zeros=True), seeds)
def test_theoretical_rank_with_torch_scales(ss, seed):
    spec, scales = ss
    assert theoretical_rank(spec, [torch.from_numpy(s) for s in scales]) == theoretical_rank(spec, scales)


@st.composite
def _row_padded_reduced(draw):
    """Reduced row ranks and padded rows; full-rank, unpadded wide columns (the row side binds)."""
    rows = tuple(draw(st.lists(st.integers(2, 5), min_size=2, max_size=3)))
    ranks = tuple(draw(st.integers(1, k)) for k in rows)
    d_out = draw(st.integers(1, math.prod(rows) - 1))
    cols = (math.prod(rows),)
    spec = TeRASpec(rows, cols, ranks + cols, draw(st.sampled_from(("rank", "mode"))), d_out, None)
    return spec, draw(scales_for(spec))


_MAX_RANK_EXAMPLE = TeRASpec((2, 2), (4,), ranks=(2, 1, 4), d_out=2)


@example(ss=(_MAX_RANK_EXAMPLE, (np.ones(2), np.ones(1), np.ones(4))), seed=0)
@given(st.one_of(spec_and_scales(), _row_padded_reduced()), seeds)
def test_max_rank_is_reached_for_generic_scales(ss, seed):
    """spec.max_rank is documented as the largest rank ΔW reaches for generic λ (no zeros)."""
    spec, scales = ss
    rank = _numerical_rank(spec, scales, seed)
    assert theoretical_rank(spec, scales) == rank
    assert spec.max_rank == rank


@pytest.mark.parametrize("diag", ["rank", "mode"])
def test_max_rank_padded_reduced_example(diag):
    """rows (2, 3) with ranks (2, 1) and d_out = 3: the kept rows are a_1[0] ⊗ A_2, of rank 1."""
    spec = TeRASpec((2, 3), (4,), ranks=(2, 1, 4), diag=diag, d_out=3)
    scales = init_scales(spec, "random", seed=0)
    assert theoretical_rank(spec, scales) == _numerical_rank(spec, scales, 0) == 1
    assert spec.max_rank == 1
