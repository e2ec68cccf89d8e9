"""tensorize / matricize: exact round trip, C-order digits, zero padding, shape errors."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given

from strategies import seeds, specs
from tera_tn import TeRASpec, matricize, tensorize


def _matrix(spec: TeRASpec, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(spec.shape)


@given(specs(max_side=200), seeds)
def test_round_trip_numpy(spec, seed):
    w = _matrix(spec, seed)
    x = tensorize(spec, w)
    assert isinstance(x, np.ndarray) and x.shape == spec.modes and x.dtype == w.dtype
    back = matricize(spec, x)
    assert back.shape == spec.shape
    assert np.array_equal(back, w)


@given(specs(max_side=200), seeds)
def test_round_trip_torch(spec, seed):
    w = torch.from_numpy(_matrix(spec, seed))
    x = tensorize(spec, w)
    assert isinstance(x, torch.Tensor) and tuple(x.shape) == spec.modes and x.dtype == torch.float64
    back = matricize(spec, x)
    assert isinstance(back, torch.Tensor) and tuple(back.shape) == spec.shape
    assert torch.equal(back, w)
    # the same numbers as the numpy path
    assert np.array_equal(x.numpy(), tensorize(spec, w.numpy()))


@given(specs(max_side=200), seeds)
def test_c_order_digits(spec, seed):
    """ΔW[i, j] == X[unravel(i, row_modes), unravel(j, col_modes)], padding is zero."""
    w = _matrix(spec, seed)
    x = tensorize(spec, w)
    i, j = np.meshgrid(np.arange(spec.d_out), np.arange(spec.d_in), indexing="ij")
    idx = np.unravel_index(i.ravel(), spec.row_modes) + np.unravel_index(j.ravel(), spec.col_modes)
    assert np.array_equal(x[idx], w.ravel())
    mask = np.ones(spec.padded_shape, dtype=bool)
    mask[: spec.d_out, : spec.d_in] = False
    assert np.all(x.reshape(spec.padded_shape)[mask] == 0)


@given(specs(max_side=200), seeds)
def test_matricize_reads_c_order_and_slices_padding(spec, seed):
    """matricize of an arbitrary tensor (non-zero padding too) keeps only the C-order prefix."""
    x = np.random.default_rng(seed).standard_normal(spec.modes)
    m = matricize(spec, x)
    assert m.shape == spec.shape
    for i in range(0, spec.d_out, max(1, spec.d_out // 5)):
        for j in range(0, spec.d_in, max(1, spec.d_in // 5)):
            assert m[i, j] == x[np.unravel_index(i, spec.row_modes) + np.unravel_index(j, spec.col_modes)]
    tm = matricize(spec, torch.from_numpy(x))
    assert np.array_equal(tm.numpy(), m)


def test_explicit_digit_example():
    spec = TeRASpec((2, 3), (4, 5))
    w = np.arange(6 * 20).reshape(6, 20)
    x = tensorize(spec, w)
    # row 4 = (1, 1) in base (2, 3); column 13 = (2, 3) in base (4, 5)
    assert x[1, 1, 2, 3] == w[4, 13]
    assert x[0, 2, 3, 4] == w[2, 19]


def test_padding_example():
    spec = TeRASpec((2, 3), (4,), d_out=5, d_in=3)
    w = np.arange(1, 16, dtype=float).reshape(5, 3)
    x = tensorize(spec, w)
    assert x.shape == (2, 3, 4)
    assert x[1, 2, :].tolist() == [0, 0, 0, 0]  # padded row 5
    assert x[:, :, 3].tolist() == [[0, 0, 0], [0, 0, 0]]  # padded column 3
    assert x[1, 1, 2] == w[4, 2]
    assert np.array_equal(matricize(spec, x), w)


@pytest.mark.parametrize(
    "shape",
    [(16, 64), (64, 16), (64,), (64, 64, 1), (63, 64), (65, 64)],
)
def test_tensorize_wrong_shape(shape):
    spec = TeRASpec((4, 4, 4), (8, 8))
    with pytest.raises(ValueError) as info:
        tensorize(spec, np.zeros(shape))
    msg = str(info.value)
    assert str(tuple(shape)) in msg and str(spec.shape) in msg


def test_tensorize_rejects_padded_shape_when_padding():
    spec = TeRASpec((4, 4), (4, 4), d_out=10, d_in=16)
    with pytest.raises(ValueError, match=r"\(16, 16\)"):
        tensorize(spec, np.zeros((16, 16)))
    with pytest.raises(ValueError):
        tensorize(spec, torch.zeros(16, 16))


@pytest.mark.parametrize("shape", [(4, 4, 4, 64), (64, 64), (4, 4, 4, 8, 8, 1), (8, 8, 4, 4, 4)])
def test_matricize_wrong_shape(shape):
    spec = TeRASpec((4, 4, 4), (8, 8))
    with pytest.raises(ValueError) as info:
        matricize(spec, np.zeros(shape))
    msg = str(info.value)
    assert str(tuple(shape)) in msg and str(spec.modes) in msg
    with pytest.raises(ValueError):
        matricize(spec, torch.zeros(shape))


def test_round_trip_large_padded():
    spec = TeRASpec.from_shape(997, 1000, order=6)
    assert spec.padding != (0, 0)
    w = np.random.default_rng(0).standard_normal(spec.shape).astype(np.float32)
    x = tensorize(spec, w)
    assert x.shape == spec.modes and math.prod(x.shape) == math.prod(spec.padded_shape)
    assert np.array_equal(matricize(spec, x), w)
