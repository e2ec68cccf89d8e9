"""Structured spectra of TeRA updates (tera_tn.analysis.spectrum) against dense SVDs of independent references."""

from __future__ import annotations

import json
import math
from functools import reduce

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from strategies import alphas, effective_factors, reference_kron, seeds, spec_and_scales, specs
from tera_tn import TeRASpec, delta_weight, init_scales, random_factors, tensorize, theoretical_rank
from tera_tn.analysis.rank import multilinear_ranks, numerical_rank, singular_values
from tera_tn.analysis.spectrum import (
    prefix_kron_r,
    tera_conditioning,
    tera_rank_summary,
    tera_singular_values,
    theoretical_multilinear_ranks,
)

inits = st.sampled_from(("orthogonal", "gaussian", "uniform"))


def _dense_sv(spec, factors, scales, alpha=1.0) -> np.ndarray:
    return np.linalg.svd(reference_kron(spec, factors, scales, alpha), compute_uv=False)


def _close(structured, dense, tol=1e-10):
    structured = np.asarray(structured, dtype=np.float64)
    assert structured.shape == dense.shape
    scale = max(dense.max(initial=0.0), 1e-300)
    assert np.abs(structured - dense).max(initial=0.0) <= tol * scale
    assert np.all(np.diff(structured) <= 1e-12 * scale)  # descending


@given(spec_and_scales(zeros=True), seeds, inits, alphas)
def test_structured_spectrum_equals_dense_spectrum(case, seed, init, alpha):
    spec, scales = case
    factors = random_factors(spec, seed, init=init)
    _close(tera_singular_values(spec, factors, scales, alpha), _dense_sv(spec, factors, scales, alpha))


@given(spec_and_scales(padding="always"), seeds)
def test_structured_spectrum_of_padded_specs(case, seed):
    spec, scales = case
    factors = random_factors(spec, seed, init="gaussian")
    _close(tera_singular_values(spec, factors, scales), _dense_sv(spec, factors, scales))


@given(spec_and_scales(zeros=True, max_side=48), seeds)
def test_rank_theorem_against_dense_svd(case, seed):
    """rank(ΔW) = theoretical_rank for orthogonal factors and well-conditioned λ (the rank theorem)."""
    spec, scales = case
    factors = random_factors(spec, seed)
    dense = delta_weight(spec, factors, scales)
    expected = theoretical_rank(spec, scales)
    assert numerical_rank(dense) == expected
    assert tera_rank_summary(spec, factors, scales).numerical_rank == expected


@given(
    st.lists(st.tuples(st.integers(1, 5), st.integers(1, 5)), min_size=1, max_size=3),
    st.data(),
    seeds,
)
def test_prefix_kron_r_is_an_r_factor_of_the_sliced_kronecker(dims, data, seed):
    rng = np.random.default_rng(seed)
    mats = [rng.standard_normal((k, min(r, k))) for k, r in dims]
    full = reduce(np.kron, mats, np.ones((1, 1)))
    d = data.draw(st.integers(1, full.shape[0]))
    b = full[:d]
    s = prefix_kron_r(mats, d)
    assert s.shape[1] == b.shape[1] and s.shape[0] <= min(d, b.shape[1])
    np.testing.assert_allclose(s.T @ s, b.T @ b, atol=1e-10 * max(1.0, np.abs(b).max() ** 2))
    m = rng.standard_normal((b.shape[1], 3))
    sb = np.linalg.svd(b @ m, compute_uv=False)
    ss = np.linalg.svd(s @ m, compute_uv=False)
    ss = np.concatenate([ss, np.zeros(sb.size - ss.size)])  # S may have fewer rows: zero σ
    np.testing.assert_allclose(ss, sb, atol=1e-10 * max(1.0, np.linalg.norm(b) * np.linalg.norm(m)))


def test_kronecker_of_qrs_is_wrong_once_rows_are_sliced():
    """Why padded sides need the prefix recursion: the QR of a row-sliced Kronecker product is
    not the Kronecker product of the factor QRs."""
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((3, 2)), rng.standard_normal((4, 2))
    sliced = np.kron(a, b)[:7]
    naive = np.kron(np.linalg.qr(a, mode="r"), np.linalg.qr(b, mode="r"))
    right = prefix_kron_r([a, b], 7)
    sv = np.linalg.svd(sliced, compute_uv=False)
    assert not np.allclose(np.linalg.svd(naive, compute_uv=False), sv)
    np.testing.assert_allclose(np.linalg.svd(right, compute_uv=False), sv)


@pytest.mark.parametrize("diag", ["rank", "mode", "identity"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_torch_backend_dtype_and_values(diag, dtype):
    ranks = None if diag == "identity" else (2, 3, 3, 2)
    spec = TeRASpec((3, 4), (4, 3), ranks, diag, d_out=11, d_in=10)
    factors = random_factors(spec, 7)
    scales = init_scales(spec, "random", seed=3)
    out = tera_singular_values(spec, factors.as_torch(dtype), [torch.as_tensor(s, dtype=dtype) for s in scales], 0.5)
    assert isinstance(out, torch.Tensor) and out.dtype == dtype and out.shape == (10,)
    tol = 1e-5 if dtype == torch.float32 else 1e-10
    _close(out.double().numpy(), _dense_sv(spec, factors, scales, 0.5), tol)
    half = tera_singular_values(spec, factors.as_torch(torch.bfloat16), [torch.as_tensor(s, dtype=torch.bfloat16) for s in scales])
    assert half.dtype == torch.float32


def test_gradient_with_respect_to_scales():
    spec = TeRASpec((3, 2), (2, 2), (2, 2, 2, 1), d_out=5)
    factors = random_factors(spec, 1).as_torch(torch.float64)
    scales = [torch.tensor(s, requires_grad=True) for s in init_scales(spec, "random", seed=2)]

    def nuclear(*lams):
        return tera_singular_values(spec, factors, list(lams)).sum()

    assert torch.autograd.gradcheck(nuclear, tuple(scales))


@given(spec_and_scales(zeros=True, padding=False, max_side=36), seeds)
def test_theoretical_multilinear_ranks(case, seed):
    spec, scales = case
    factors = random_factors(spec, seed)
    x = tensorize(spec, delta_weight(spec, factors, scales))
    assert multilinear_ranks(x) == theoretical_multilinear_ranks(spec, scales)


@given(specs(diags=("rank", "mode"), padding=False, max_side=36), seeds)
def test_conditioning_report(spec, seed):
    factors = random_factors(spec, seed, init="gaussian")
    scales = init_scales(spec, "random", seed=seed % 1000)
    rep = tera_conditioning(spec, factors, scales, 2.0)
    a = effective_factors(spec, factors, scales)
    p = spec.n_row
    # Without padding, ∏ cond(A_n) is exactly cond(⊗A_n).
    for side, mats in ((rep.row_condition, a[:p]), (rep.col_condition, a[p:])):
        s = singular_values(reduce(np.kron, mats, np.ones((1, 1))))
        assert side == pytest.approx(s[0] / s[-1], rel=1e-6)
    assert rep.theoretical_rank == theoretical_rank(spec, scales)
    counts = rep.numerical_rank_by_dtype
    assert counts["float64"] >= counts["float32"] >= counts.get("bfloat16", 0)
    assert rep.spectrum.numerical_rank == counts["float64"]
    assert rep.condition_on_rank >= 1.0
    json.dumps(rep.to_dict())
    assert "theoretical rank" in str(rep)


def test_orthonormal_factors_are_perfectly_conditioned():
    spec = TeRASpec((4, 4), (4, 4))
    factors = random_factors(spec, 0)
    rep = tera_conditioning(spec, factors, init_scales(spec, "ones"))
    assert rep.factor_conditions == pytest.approx((1.0,) * 4)
    # Then ΔW = Q G_mat Q'ᵀ has exactly the core's singular values.
    assert rep.condition_on_rank == pytest.approx(rep.core_condition)


def test_zero_start_gives_a_zero_spectrum():
    spec = TeRASpec((4, 4), (4, 4), (2, 2, 2, 2))
    factors = random_factors(spec, 0)
    sv = tera_singular_values(spec, factors, init_scales(spec))
    assert sv.shape == (16,) and not np.any(sv)
    rep = tera_conditioning(spec, factors, init_scales(spec))
    assert rep.theoretical_rank == 0 and rep.numerical_rank_by_dtype["float64"] == 0
    assert math.isinf(rep.condition_on_rank)
    assert rep.to_dict()["condition_on_rank"] == "inf"


def test_errors():
    spec = TeRASpec((2, 2), (2, 2))
    factors = random_factors(spec, 0)
    with pytest.raises(TypeError, match="TeRASpec"):
        tera_singular_values("spec", factors, init_scales(spec))
    with pytest.raises(ValueError, match="scales"):
        tera_singular_values(spec, factors, init_scales(spec)[:3])
    with pytest.raises(ValueError, match="d must be"):
        prefix_kron_r([np.ones((2, 2))], 3)


def test_errors_name_the_function_called():
    # the spectrum's checks used to run inside tera_singular_values whoever called it
    spec = TeRASpec((2, 2), (2, 2))
    factors, scales = random_factors(spec, 0), init_scales(spec)
    for fn in (tera_singular_values, tera_rank_summary, tera_conditioning):
        with pytest.raises(TypeError, match=f"^{fn.__name__} expects a TeRASpec as spec, got str"):
            fn("spec", factors, scales)
    with pytest.raises(TypeError, match="^theoretical_multilinear_ranks expects a TeRASpec"):
        theoretical_multilinear_ranks(None, scales)
