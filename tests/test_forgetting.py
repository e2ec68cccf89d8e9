"""Embedding drift: 1 − cos and the norm ratio, row by row, against a float64 reference."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from tera_tn.analysis.forgetting import embedding_drift

rows = st.tuples(st.integers(1, 6), st.integers(1, 8)).flatmap(
    lambda s: arrays(np.float64, s, elements=st.floats(-10, 10, allow_nan=False).filter(lambda v: abs(v) > 1e-3)))


@settings(max_examples=60, deadline=None)
@given(rows, st.floats(0.1, 10.0))
def test_drift_is_zero_for_a_rescaled_copy_and_reports_the_scale(a, c):
    d = embedding_drift(a, c * a)
    assert max(d.cosine_distance) < 1e-12
    np.testing.assert_allclose(d.norm_ratio, c, rtol=1e-12)


@settings(max_examples=60, deadline=None)
@given(rows, st.data())
def test_drift_matches_the_rowwise_cosine(a, data):
    b = data.draw(arrays(np.float64, a.shape, elements=st.floats(-10, 10).filter(lambda v: abs(v) > 1e-3)))
    d = embedding_drift(a, b)
    for i in range(a.shape[0]):
        cos = float(a[i] @ b[i]) / (np.linalg.norm(a[i]) * np.linalg.norm(b[i]))
        assert d.cosine_distance[i] == pytest.approx(1 - cos, abs=1e-12)
    assert 0 <= d.mean_cosine_distance <= 2 and d.to_dict()["texts"] == a.shape[0]


def test_orthogonal_and_opposite_rows():
    d = embedding_drift(np.eye(2), np.array([[0.0, 1.0], [0.0, -3.0]]))
    assert d.cosine_distance == (1.0, 2.0) and d.norm_ratio == (1.0, 3.0)
    assert "mean 1-cos 1.5" in str(d)


def test_torch_rows_are_accepted():
    torch = pytest.importorskip("torch")
    a = torch.randn(5, 4, dtype=torch.float32)
    assert embedding_drift(a, a).mean_cosine_distance < 1e-6


@pytest.mark.parametrize("before, after, match", [
    (np.ones((2, 3)), np.ones((2, 4)), r"same texts with the same width, got shapes \(2, 3\) and \(2, 4\)"),
    (np.ones(3), np.ones(3), r"before must be a non-empty \(n_texts, hidden\) matrix"),
    (np.ones((2, 3)), np.array([[1.0, 1, 1], [0, 0, 0]]), "after has an all-zero embedding in row 1"),
    (np.array([[1.0, np.nan]]), np.ones((1, 2)), "before holds non-finite entries"),
])
def test_bad_input_names_the_value(before, after, match):
    with pytest.raises(ValueError, match=match):
        embedding_drift(before, after)
