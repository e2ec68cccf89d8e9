"""Intervals used to compare adapters: t-intervals and the item/seed paired bootstrap."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tera_tn.analysis.stats import mean_interval, paired_bootstrap, pooled_paired_bootstrap, sampling_error


def test_t_interval_matches_tables_and_a_hand_computation():
    for df, t in ((1, 12.706), (2, 4.303), (4, 2.776), (30, 2.042)):
        xs = [0.0, 1.0] + [0.5] * (df - 1)
        sd = np.std(xs, ddof=1)
        assert mean_interval(xs)[1] == pytest.approx(t * sd / np.sqrt(len(xs)), rel=1e-3)
    assert mean_interval([0.5]) == (0.5, None)
    with pytest.raises(ValueError, match="finite values"):
        mean_interval([0.5, float("nan")])


def _exact_bootstrap(d: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Every equally likely resample of a tiny (seeds, items) difference: values and weights."""
    n_seeds, n_items = d.shape
    values = []
    for items in itertools.product(range(n_items), repeat=n_items):
        per_seed = d[:, list(items)].mean(axis=1)
        for seeds in itertools.product(range(n_seeds), repeat=n_seeds):
            values.append(per_seed[list(seeds)].mean())
    return np.asarray(values), np.full(len(values), 1 / len(values))


def test_bootstrap_matches_a_brute_force_enumeration_on_a_tiny_case():
    a = np.array([[1, 1, 0, 1], [1, 0, 1, 1]])
    b = np.array([[0, 1, 0, 0], [1, 0, 0, 1]])
    exact, _ = _exact_bootstrap((a - b).astype(float))
    r = paired_bootstrap(a, b, resamples=200_000, level=0.9, seed=3)
    assert r.mean == pytest.approx((a - b).mean())
    lo, hi = np.quantile(exact, [0.05, 0.95])
    # a discrete distribution: the Monte Carlo quantile lands on the exact one or its neighbour
    grid = np.unique(exact)
    step = np.diff(grid).max()
    assert abs(r.low - lo) <= step and abs(r.high - hi) <= step
    assert (r.seeds, r.items) == (2, 4)


@given(st.integers(1, 3), st.integers(2, 30), st.integers(0, 2**31 - 1))
def test_swapping_the_methods_mirrors_the_interval(seeds, items, seed):
    rng = np.random.default_rng(seed)
    a, b = rng.integers(0, 2, (seeds, items)), rng.integers(0, 2, (seeds, items))
    ab, ba = paired_bootstrap(a, b, resamples=500, seed=seed), paired_bootstrap(b, a, resamples=500, seed=seed)
    assert ab.mean == pytest.approx(-ba.mean, abs=1e-12)
    assert ab.low == pytest.approx(-ba.high, abs=1e-12) and ab.high == pytest.approx(-ba.low, abs=1e-12)
    assert ab.low <= ab.high


def test_identical_methods_differ_by_exactly_zero_and_item_noise_widens_the_interval():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 2, (3, 500))
    same = paired_bootstrap(a, a, resamples=500)
    assert (same.mean, same.low, same.high) == (0.0, 0.0, 0.0)
    # seeds that agree exactly: a seed-only interval has zero width, the item-level one does not
    a[:, :50] = 1
    flip = a.copy()
    flip[:, :50] = 0  # every seed loses the same 50 items
    r = paired_bootstrap(a, flip, resamples=2000)
    assert r.seed_half == pytest.approx(0.0, abs=1e-12) and r.high - r.low > 0.02
    assert r.sampling_error > 0
    assert sampling_error(0.8, 1000) == pytest.approx(0.01265, rel=1e-3)


@pytest.mark.parametrize("a, b, needle", [
    (np.ones((2, 3)), np.ones((3, 3)), "pair seeds and items, got shapes (2, 3) and (3, 3)"),
    (np.full((2, 3), 2), np.ones((2, 3)), "0/1"),
    (np.ones((2, 0)), np.ones((2, 0)), "(seeds, items)"),
])
def test_bootstrap_refuses_unpaired_or_non_binary_input(a, b, needle):
    with pytest.raises(ValueError) as err:
        paired_bootstrap(a, b, resamples=100)
    assert needle in str(err.value)


@settings(max_examples=20, deadline=None)
@given(st.integers(1, 3), st.integers(2, 40), st.integers(0, 2**16))
def test_pooled_bootstrap_of_one_dataset_is_the_paired_bootstrap(seeds, items, seed):
    rng = np.random.default_rng(seed)
    a, b = rng.integers(0, 2, (seeds, items)), rng.integers(0, 2, (seeds, items))
    one, pooled = paired_bootstrap(a, b, resamples=300, seed=seed), pooled_paired_bootstrap([(a, b)], resamples=300, seed=seed)
    assert (pooled.mean, pooled.low, pooled.high, pooled.datasets) == (one.mean, one.low, one.high, 1)


def test_pooled_bootstrap_weighs_datasets_alike_and_teaches():
    rng = np.random.default_rng(1)
    small = (np.ones((3, 10)), np.zeros((3, 10)))                               # +1 on 10 items
    large = (rng.integers(0, 2, (3, 2000)), rng.integers(0, 2, (3, 2000)))       # ≈ 0 on 2,000 items
    r = pooled_paired_bootstrap([small, large], resamples=500)
    assert r.mean == pytest.approx((1.0 + float((large[0] - large[1]).mean())) / 2)
    assert r.low <= r.mean <= r.high and str(r).startswith("+")
    swapped = pooled_paired_bootstrap([(small[1], small[0]), (large[1], large[0])], resamples=500)
    assert swapped.mean == pytest.approx(-r.mean)
    with pytest.raises(ValueError, match="at least one"):
        pooled_paired_bootstrap([])
    with pytest.raises(ValueError, match=r"pairs\[1\] must pair seeds and items"):
        pooled_paired_bootstrap([small, (np.ones((2, 5)), np.ones((3, 5)))])
