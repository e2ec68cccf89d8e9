"""Intervals for comparing adapters: seed-level t-intervals and item-level paired bootstraps.

An accuracy measured on ``n`` test items carries a sampling error of about ``√(p(1−p)/n)`` (1.1
points at ``p`` = 0.8, ``n`` = 1,000) whatever the seeds do, so a difference between two methods
is judged with both sources of variation: :func:`paired_bootstrap` resamples the test items and
the seeds together, keeping each item paired across the two methods and each seed paired (same
data order, same initial head). :func:`mean_interval` is the seed-only t-interval beside it.

Conventions: correctness arrays are ``(seeds, items)`` of 0/1 (or booleans), row ``s`` of both
methods being the same seed and column ``i`` the same test item; results are fractions (0.012 =
1.2 points).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np

__all__ = ["PairedDifference", "PooledDifference", "mean_interval", "paired_bootstrap", "pooled_paired_bootstrap",
           "sampling_error"]


def mean_interval(values: Sequence[float], level: float = 0.95) -> tuple[float, Optional[float]]:
    """Mean of ``values`` and the half-width of its two-sided Student-t interval (None for one value)."""
    from scipy import stats

    xs = [float(v) for v in values]
    if not xs:
        raise ValueError("mean_interval needs at least one value, got none")
    if not all(math.isfinite(v) for v in xs):
        raise ValueError(f"mean_interval needs finite values, got {xs}")
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    mean = math.fsum(xs) / len(xs)
    if len(xs) == 1:
        return mean, None
    sd = math.sqrt(math.fsum((v - mean) ** 2 for v in xs) / (len(xs) - 1))
    return mean, float(stats.t.ppf(0.5 + level / 2, len(xs) - 1)) * sd / math.sqrt(len(xs))


def sampling_error(accuracy: float, items: int) -> float:
    """Standard error of an accuracy measured on ``items`` independent test items."""
    if not 0 <= accuracy <= 1 or items < 1:
        raise ValueError(f"need an accuracy in [0, 1] and at least one item, got {accuracy} and {items}")
    return math.sqrt(accuracy * (1 - accuracy) / items)


@dataclass(frozen=True)
class PairedDifference:
    """``mean`` accuracy of A minus B with its bootstrap interval ``[low, high]`` at ``level``,
    over ``seeds`` paired seeds and ``items`` paired test items; ``seed_half`` is the half-width
    of the seed-only t-interval (None with one seed), ``sampling_error`` the test-sampling standard
    error of the difference of one seed's accuracies."""

    mean: float
    low: float
    high: float
    level: float
    seeds: int
    items: int
    seed_half: Optional[float]
    sampling_error: float

    def __str__(self) -> str:
        return f"{100 * self.mean:+.1f} [{100 * self.low:+.1f}, {100 * self.high:+.1f}]"


def _correctness(x, name: str) -> np.ndarray:
    a = np.asarray(x)
    if a.ndim == 1:
        a = a[None, :]
    if a.ndim != 2 or a.size == 0:
        raise ValueError(f"{name} must be a (seeds, items) array of 0/1, got shape {np.shape(x)}")
    if not np.isin(a, (0, 1)).all():
        raise ValueError(f"{name} must hold 0/1 or booleans (is each prediction correct), got values "
                         f"{np.unique(a)[:5].tolist()}")
    return a.astype(np.float64)


def paired_bootstrap(a, b, *, resamples: int = 10_000, level: float = 0.95, seed: int = 0,
                     resample_seeds: bool = True) -> PairedDifference:
    """Item- and seed-level paired bootstrap of ``mean(a) − mean(b)``.

    ``a`` and ``b`` are ``(seeds, items)`` correctness arrays (a 1-D array is one seed). Each
    resample draws the items with replacement (one draw shared by every seed and both methods,
    so an item stays paired) and, with ``resample_seeds`` and more than one seed, the seeds with
    replacement; the interval is the percentile interval of the resampled differences.
    """
    a, b = _correctness(a, "a"), _correctness(b, "b")
    if a.shape != b.shape:
        raise ValueError(f"a and b must pair seeds and items, got shapes {a.shape} and {b.shape}")
    if resamples < 100:
        raise ValueError(f"resamples must be at least 100, got {resamples}")
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    d = a - b                                   # (seeds, items) of -1, 0, 1
    n_seeds, n_items = d.shape
    out = _resampled_differences(d, np.random.default_rng(seed), resamples, resample_seeds)
    tail = (1 - level) / 2
    low, high = np.quantile(out, [tail, 1 - tail])
    seed_means = d.mean(axis=1)
    _, half = mean_interval(seed_means.tolist(), level) if n_seeds > 1 else (None, None)
    # one seed's difference of accuracies on the same items: the variance of the per-item difference
    se = float(np.sqrt(d.var(axis=1, ddof=1).mean() / n_items)) if n_items > 1 else float("nan")
    return PairedDifference(mean=float(d.mean()), low=float(low), high=float(high), level=level, seeds=n_seeds,
                            items=n_items, seed_half=half, sampling_error=se)


def _resampled_differences(d: np.ndarray, rng: np.random.Generator, resamples: int, resample_seeds: bool) -> np.ndarray:
    """``resamples`` bootstrap means of the ``(seeds, items)`` differences ``d`` (see :func:`paired_bootstrap`)."""
    n_seeds, n_items = d.shape
    out = np.empty(resamples)
    chunk = max(1, 2_000_000 // (n_seeds * n_items))
    for start in range(0, resamples, chunk):
        k = min(chunk, resamples - start)
        items = rng.integers(0, n_items, size=(k, n_items))
        per_seed = np.stack([d[s][items].mean(axis=1) for s in range(n_seeds)], axis=1)  # (k, seeds)
        if resample_seeds and n_seeds > 1:
            pick = rng.integers(0, n_seeds, size=(k, n_seeds))
            per_seed = np.take_along_axis(per_seed, pick, axis=1)
        out[start:start + k] = per_seed.mean(axis=1)
    return out


@dataclass(frozen=True)
class PooledDifference:
    """The mean over datasets of paired differences of accuracy, with its bootstrap interval
    (:func:`pooled_paired_bootstrap`); fractions, not points."""

    mean: float
    low: float
    high: float
    level: float
    datasets: int

    def __str__(self) -> str:
        return f"{100 * self.mean:+.1f} [{100 * self.low:+.1f}, {100 * self.high:+.1f}]"


def pooled_paired_bootstrap(pairs, *, resamples: int = 10_000, level: float = 0.95, seed: int = 0) -> PooledDifference:
    """Mean over datasets of ``mean(a) − mean(b)``, each dataset weighing the same, with an item- and
    seed-level bootstrap interval.

    ``pairs`` holds one ``(a, b)`` per dataset, ``(seeds, items)`` correctness arrays as in
    :func:`paired_bootstrap` (items and seeds may differ between datasets). Each resample draws
    every dataset's items and seeds as :func:`paired_bootstrap` does, from one generator, and
    averages the datasets' differences; with one dataset it is :func:`paired_bootstrap`'s interval.
    """
    pairs = list(pairs)
    if not pairs:
        raise ValueError("pooled_paired_bootstrap needs at least one (a, b) pair, got none")
    if resamples < 100:
        raise ValueError(f"resamples must be at least 100, got {resamples}")
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    rng = np.random.default_rng(seed)
    total = np.zeros(resamples)
    means = []
    for i, (a, b) in enumerate(pairs):
        a, b = _correctness(a, f"pairs[{i}][0]"), _correctness(b, f"pairs[{i}][1]")
        if a.shape != b.shape:
            raise ValueError(f"pairs[{i}] must pair seeds and items, got shapes {a.shape} and {b.shape}")
        d = a - b
        means.append(float(d.mean()))
        total += _resampled_differences(d, rng, resamples, True)
    tail = (1 - level) / 2
    low, high = np.quantile(total / len(pairs), [tail, 1 - tail])
    return PooledDifference(float(np.mean(means)), float(low), float(high), level, len(pairs))
