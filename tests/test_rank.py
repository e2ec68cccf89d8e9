"""Generic rank measures (tera_tn.analysis.rank): invariances, bounds, agreement with numpy/torch, edge cases."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import tera_tn
from tera_tn.analysis import rank as R


def _orthogonal(rng: np.random.Generator, n: int) -> np.ndarray:
    q, r = np.linalg.qr(rng.standard_normal((n, n)))
    return q * np.sign(np.diag(r))


@st.composite
def spectra_matrices(draw, max_dim: int = 10, zeros: bool = True):
    """``A = U diag(σ) Vᵀ`` with known σ: well separated (in [0.1, 10]) or exact zeros, so the
    numerical rank is unambiguous; returns (A, σ descending, rng)."""
    m = draw(st.integers(1, max_dim))
    n = draw(st.integers(1, max_dim))
    k = min(m, n)
    value = st.floats(0.1, 10.0, allow_nan=False)
    if zeros:
        value = st.one_of(value, st.just(0.0))
    sig = np.sort(np.array(draw(st.lists(value, min_size=k, max_size=k))))[::-1]
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    a = _orthogonal(rng, m)[:, :k] @ np.diag(sig) @ _orthogonal(rng, n)[:, :k].T
    return a, sig, rng


@given(spectra_matrices())
def test_singular_values_match_the_construction(case):
    a, sig, _ = case
    np.testing.assert_allclose(R.singular_values(a), sig, atol=1e-12 * max(sig.max(), 1.0))
    assert R.numerical_rank(a) == int(np.count_nonzero(sig))


@given(spectra_matrices(), st.data())
def test_invariant_under_orthogonal_transforms_on_either_side(case, data):
    a, sig, rng = case
    m, n = a.shape
    side = data.draw(st.sampled_from(("left", "right", "both")))
    b = a
    if side in ("left", "both"):
        b = _orthogonal(rng, m) @ b
    if side in ("right", "both"):
        b = b @ _orthogonal(rng, n)
    assert R.numerical_rank(b) == R.numerical_rank(a)
    assert R.stable_rank(b) == pytest.approx(R.stable_rank(a), rel=1e-9, abs=1e-12)
    assert R.effective_rank(b) == pytest.approx(R.effective_rank(a), rel=1e-9, abs=1e-12)
    # Exact zeros in σ become ~1e-16 after the transforms; they only count towards the energy
    # rank if the fraction were 1, so a fraction < 1 stays invariant.
    assert R.energy_rank(b, 0.9) == R.energy_rank(a, 0.9)


@given(spectra_matrices(), st.floats(1e-3, 1e3), st.sampled_from((-1.0, 1.0)))
def test_stable_and_effective_rank_are_scale_invariant(case, c, sign):
    a, _, _ = case
    b = sign * c * a
    assert R.stable_rank(b) == pytest.approx(R.stable_rank(a), rel=1e-9, abs=1e-12)
    assert R.effective_rank(b) == pytest.approx(R.effective_rank(a), rel=1e-9, abs=1e-12)
    assert R.numerical_rank(b) == R.numerical_rank(a)
    assert R.energy_rank(b, 0.95) == R.energy_rank(a, 0.95)


@given(spectra_matrices(), st.floats(0.01, 1.0))
def test_bounds(case, fraction):
    a, _, _ = case
    s = np.asarray(R.singular_values(a))
    nnz = int(np.count_nonzero(s))
    k = min(a.shape)
    sr, er, nr, en = R.stable_rank(a), R.effective_rank(a), R.numerical_rank(a), R.energy_rank(a, fraction)
    assert 0 <= nr <= nnz <= k
    if nnz == 0:
        assert sr == er == 0.0 and en == 0
    else:
        assert 1.0 <= sr <= nnz
        assert 1.0 <= er <= nnz
        assert 1 <= en <= nnz
        # Energy rank is monotone in the fraction, and the top-en values hold the fraction.
        assert en <= R.energy_rank(a, 1.0)
        assert np.sum(s[:en] ** 2) >= fraction * np.sum(s**2) * (1 - 1e-12)


@given(spectra_matrices(zeros=False))
def test_summary_agrees_with_the_single_measures(case):
    a, _, _ = case
    summ = R.rank_summary(a, energy=0.8)
    assert summ.numerical_rank == R.numerical_rank(a)
    assert summ.stable_rank == pytest.approx(R.stable_rank(a))
    assert summ.effective_rank == pytest.approx(R.effective_rank(a))
    assert summ.energy_rank == R.energy_rank(a, 0.8)
    assert summ.condition_number == pytest.approx(R.condition_number(a))
    assert summ.condition_number >= 1.0


@given(
    st.integers(1, 9),
    st.integers(1, 9),
    st.integers(0, 2**32 - 1),
    st.sampled_from((None, 1e-3, 0.3)),
    st.sampled_from((None, 1e-2, 2.0)),
)
def test_threshold_rule_matches_numpy_and_torch(m, n, seed, rtol, atol):
    rng = np.random.default_rng(seed)
    # Spread singular values over many decades so the thresholds actually cut.
    a = _orthogonal(rng, m)[:, : min(m, n)] @ np.diag(10.0 ** rng.uniform(-12, 1, min(m, n))) @ _orthogonal(rng, n)[:, : min(m, n)].T
    ours = R.numerical_rank(a, rtol=rtol, atol=atol)
    t = torch.from_numpy(a)
    assert ours == int(torch.linalg.matrix_rank(t, atol=atol, rtol=rtol))
    if atol is None:
        assert ours == int(np.linalg.matrix_rank(a, rtol=rtol))
    assert R.numerical_rank(t, rtol=rtol, atol=atol) == ours


def test_default_threshold_uses_the_input_dtype():
    a = np.diag([1.0, 1e-3, 1e-9])
    assert R.numerical_rank(a) == 3
    assert R.numerical_rank(a.astype(np.float32)) == 2  # 3·eps32 ≈ 3.6e-7 cuts 1e-9
    assert R.numerical_rank(a.astype(np.float16)) == 1  # 3·eps16 ≈ 2.9e-3 cuts 1e-3 too
    assert R.numerical_rank(torch.tensor(a, dtype=torch.bfloat16)) == 1
    assert R.rank_threshold([1.0], (3, 3), "float32") == pytest.approx(3 * np.finfo(np.float32).eps)
    assert R.dtype_eps(torch.bfloat16) == 2.0**-7
    assert R.singular_values(torch.ones(2, 2, dtype=torch.float16)).dtype == torch.float32
    assert R.singular_values(np.ones((2, 2), dtype=np.int64)).dtype == np.float64


def test_known_values():
    assert R.effective_rank(np.eye(5)) == pytest.approx(5.0)
    assert R.stable_rank(np.eye(5)) == pytest.approx(5.0)
    assert R.stable_rank(np.outer([1.0, 2.0, 3.0], [4.0, 5.0])) == pytest.approx(1.0)
    d = np.diag([3.0, 4.0])  # energies 9 and 16
    assert R.energy_rank(d, 16 / 25) == 1
    assert R.energy_rank(d, 0.65) == 2
    assert R.condition_number(d) == pytest.approx(4 / 3)
    assert math.isinf(R.condition_number(np.diag([1.0, 0.0])))
    assert R.condition_number(np.diag([1.0, 0.0]), nonzero=True) == 1.0
    p = np.array([3.0, 1.0]) / 4
    assert R.effective_rank(np.diag([3.0, 1.0])) == pytest.approx(math.exp(-(p * np.log(p)).sum()))


@pytest.mark.parametrize("shape", [(0, 0), (0, 4), (3, 0)])
def test_empty_matrices_have_defined_answers(shape):
    a = np.zeros(shape)
    assert R.singular_values(a).shape == (0,)
    assert R.numerical_rank(a) == 0
    assert R.stable_rank(a) == 0.0
    assert R.effective_rank(a) == 0.0
    assert R.energy_rank(a) == 0
    assert R.condition_number(a) == 1.0
    assert R.numerical_rank(torch.zeros(shape)) == 0


def test_zero_and_one_by_one():
    z = np.zeros((4, 3))
    s = R.rank_summary(z)
    assert (s.numerical_rank, s.stable_rank, s.effective_rank, s.energy_rank, s.nonzero) == (0, 0.0, 0.0, 0, 0)
    assert math.isinf(s.condition_number)
    for x in (np.array([[2.5]]), np.array([[-1e-30]])):
        assert (R.numerical_rank(x), R.stable_rank(x), R.effective_rank(x), R.energy_rank(x)) == (1, 1.0, 1.0, 1)
    assert R.numerical_rank(np.array([[0.0]])) == 0
    assert s.to_dict()["condition_number"] == "inf"


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nan_and_inf_raise_clear_errors(bad):
    a = np.ones((3, 3))
    a[1, 2] = bad
    for fn in (R.singular_values, R.numerical_rank, R.stable_rank, R.effective_rank, R.energy_rank, R.rank_summary):
        with pytest.raises(ValueError, match="NaN or Inf"):
            fn(a)
    with pytest.raises(ValueError, match="NaN or Inf"):
        R.numerical_rank(torch.from_numpy(a).float())
    with pytest.raises(ValueError, match="NaN or Inf"):
        R.multilinear_ranks(a.reshape(3, 3, 1))


def test_argument_errors():
    with pytest.raises(ValueError, match="2-D"):
        R.numerical_rank(np.ones(3))
    with pytest.raises(ValueError, match="2-D"):
        R.stable_rank(np.ones((2, 2, 2)))
    with pytest.raises(ValueError, match="rtol"):
        R.numerical_rank(np.eye(2), rtol=-1.0)
    with pytest.raises(ValueError, match="atol"):
        R.numerical_rank(np.eye(2), atol=float("nan"))
    for f in (0.0, 1.5, -0.1):
        with pytest.raises(ValueError, match="fraction"):
            R.energy_rank(np.eye(2), f)
    with pytest.raises(ValueError, match="at most"):
        R.summarize_singular_values([1.0, 1.0, 1.0], (2, 5))
    with pytest.raises(ValueError, match="non-negative"):
        R.summarize_singular_values([1.0, -1.0], (2, 2))


def test_torch_inputs_keep_backend_and_gradients():
    a = torch.randn(6, 4, dtype=torch.float64, requires_grad=True)
    s = R.singular_values(a)
    assert isinstance(s, torch.Tensor) and s.dtype == torch.float64
    assert R.numerical_rank(a) == 4
    assert R.stable_rank(a) == pytest.approx(R.stable_rank(a.detach().numpy()))


@st.composite
def tucker_tensors(draw):
    """A random Tucker tensor with known multilinear ranks (orthonormal factors, generic core)."""
    n = draw(st.integers(2, 4))
    dims = [draw(st.integers(1, 5)) for _ in range(n)]
    ranks = [draw(st.integers(1, d)) for d in dims]
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    core = rng.standard_normal(ranks)
    x = core
    for mode, (d, r) in enumerate(zip(dims, ranks)):
        u = np.linalg.qr(rng.standard_normal((d, r)))[0]
        x = np.moveaxis(np.tensordot(u, x, axes=(1, mode)), 0, mode)
    # A generic core of shape (r_1..r_N) has mode-n rank min(r_n, ∏_{m≠n} r_m).
    total = math.prod(ranks)
    return x, tuple(min(r, total // r) for r in ranks)


@given(tucker_tensors())
def test_multilinear_ranks_of_tucker_tensors(case):
    x, expected = case
    assert R.multilinear_ranks(x) == expected
    assert R.multilinear_ranks(torch.from_numpy(x)) == expected
    assert R.multilinear_ranks(x.reshape(x.shape[0], -1), modes=x.shape) == expected
    # tensorly's HOSVD-based Tucker at these ranks reconstructs the tensor exactly.
    import tensorly as tl
    from tensorly.decomposition import tucker

    if x.size > 1:
        rec = tl.tucker_to_tensor(tucker(x, rank=list(expected), init="svd", n_iter_max=5))
        assert np.abs(rec - x).max() <= 1e-8 * max(np.abs(x).max(), 1e-300)


def test_multilinear_ranks_with_a_spec_and_errors():
    spec = tera_tn.TeRASpec((2, 3), (4,), d_out=5)
    w = np.arange(20.0).reshape(5, 4)
    assert len(R.multilinear_ranks(w, spec=spec)) == 3
    with pytest.raises(ValueError, match="multiply"):
        R.multilinear_ranks(w, modes=(3, 3))
    with pytest.raises(ValueError, match="either"):
        R.multilinear_ranks(w, modes=(5, 4), spec=spec)
    assert [s.shape for s in R.mode_singular_values(np.ones((2, 3, 4)))] == [(2,), (3,), (4,)]


def test_theoretical_rank_is_reexported():
    assert R.theoretical_rank is tera_tn.theoretical_rank
