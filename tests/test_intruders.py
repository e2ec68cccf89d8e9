"""Intruder dimensions (arXiv 2410.21228): an update that adds a new direction on top is found, one
that rescales the base's own directions is not."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from tera_tn.analysis.intruders import intruder_dimensions


def _base(rng, d: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    u, _ = np.linalg.qr(rng.standard_normal((d, d)))
    v, _ = np.linalg.qr(rng.standard_normal((d, d)))
    s = np.linspace(2.0, 0.1, d)
    return u @ np.diag(s) @ v.T, u, s, v


@given(st.integers(0, 2**31 - 1), st.integers(12, 24))
def test_a_spread_out_rank_one_update_on_top_is_an_intruder_and_a_rescaling_is_not(seed, d):
    rng = np.random.default_rng(seed)
    w0, u, s, v = _base(rng, d)
    # spread over the 9 weakest base directions: its best cosine with any of them is 1/3
    x = u[:, -9:].sum(axis=1) / 3.0
    y = v[:, -9:].sum(axis=1) / 3.0
    found = intruder_dimensions(w0, w0 + 100.0 * np.outer(x, y), k=3)
    # the new top direction is x up to the base's small pull inside the same subspace
    assert found.similarity[0] == pytest.approx(1 / 3, abs=0.02)
    assert found.counts[0.5] == 1 and found.counts[0.9] >= 1
    rescaled = u @ np.diag(s * np.linspace(1.5, 0.5, d)) @ v.T  # the base's directions, reweighted
    assert intruder_dimensions(w0, rescaled).counts == {t: 0 for t in (0.5, 0.6, 0.7, 0.8, 0.9)}


@given(st.integers(0, 2**31 - 1))
def test_counts_grow_with_the_threshold(seed):
    rng = np.random.default_rng(seed)
    w0 = rng.standard_normal((16, 10))
    found = intruder_dimensions(w0, w0 + rng.standard_normal((16, 10)), k=10)
    counts = [found.counts[t] for t in found.thresholds]
    assert counts == sorted(counts) and all(0 <= c <= 10 for c in counts)
    assert all(0 <= s <= 1 + 1e-12 for s in found.similarity)


def test_torch_weights_and_the_report():
    torch = pytest.importorskip("torch")
    w0 = torch.randn(8, 8, generator=torch.Generator().manual_seed(0))
    found = intruder_dimensions(w0, w0.to(torch.bfloat16), k=2)
    assert found.k == 2 and "intruders among the top 2" in str(found)
    assert found.to_dict()["counts"]["0.5"] == 0


@pytest.mark.parametrize("kwargs, needle", [
    (dict(w0=np.ones((3, 4)), w=np.ones((4, 3))), "same (d_out, d_in) shape, got (3, 4) and (4, 3)"),
    (dict(w0=np.ones((3, 4)), w=np.ones((3, 4)), k=4), "k must be an integer in 1..3"),
    (dict(w0=np.ones((3, 4)), w=np.ones((3, 4)), k=2, thresholds=(0.5, 1.5)), "cosines in (0, 1], got (0.5, 1.5)"),
    (dict(w0=np.ones(3), w=np.ones(3)), "w0 must be a non-empty (d_out, d_in) matrix, got shape (3,)"),
    (dict(w0=np.ones((2, 2)), w=np.full((2, 2), np.nan)), "w holds non-finite entries"),
])
def test_bad_input_names_the_value(kwargs, needle):
    with pytest.raises(ValueError) as err:
        intruder_dimensions(**kwargs)
    assert needle in str(err.value)
