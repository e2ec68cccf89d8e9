"""Balanced integer factorizations and padding search for tensorizing matrix dimensions.

A dimension d is split into ``order`` mode sizes whose product is d. The best split keeps the
mode sizes close to the geometric mean d**(1/order): the sum of mode sizes is TeRA's trainable
count at full rank and drives the materialization cost. When d has no split within
``max_imbalance`` of the geometric mean (primes, 11008 = 2^8·43 at high order), the smallest
larger size that has one is used instead and the extra rows/columns are padding.
"""

from __future__ import annotations

import math
from functools import lru_cache

from ..checks import check_real, check_size

__all__ = ["balanced_factorization", "padded_factorization", "padded_factorization_of_checked", "imbalance"]


def _divisors(n: int) -> list[int]:
    small, large = [], []
    for k in range(1, math.isqrt(n) + 1):
        if n % k == 0:
            small.append(k)
            if k != n // k:
                large.append(n // k)
    return small + large[::-1]


def balanced_factorization(n: int, order: int) -> tuple[int, ...]:
    """The split of ``n`` into ``order`` factors ≥ 1 with the smallest maximum factor.

    Ties are broken by the smallest sum. Factors are returned in non-increasing order, so the
    most significant (first) mode is the largest. ``order`` factors of 1 are allowed only where
    ``n`` has fewer prime factors than ``order``.
    """
    return _balanced(check_size("n", n), check_size("order", order))


@lru_cache(maxsize=4096)
def _balanced(n: int, order: int) -> tuple[int, ...]:
    best: tuple[int, ...] | None = None
    best_key: tuple[int, int] | None = None

    def search(rest: int, slots: int, cap: int, chosen: list[int]) -> None:
        nonlocal best, best_key
        if slots == 1:
            if rest <= cap:
                cand = tuple(chosen + [rest])
                key = (max(cand), sum(cand))
                if best_key is None or key < best_key:
                    best, best_key = cand, key
            return
        # Factors are chosen in non-increasing order; the current one must be at least the
        # geometric mean of what is left, or the remaining slots could not absorb the rest.
        lower = math.ceil(rest ** (1.0 / slots) - 1e-9)
        for f in reversed(_divisors(rest)):
            if f > cap:
                continue
            if f < lower:
                break
            if best_key is not None and f > best_key[0]:
                continue
            search(rest // f, slots - 1, f, chosen + [f])

    search(n, order, n, [])
    assert best is not None  # n itself with order-1 ones is always a split
    return best


def imbalance(factors: tuple[int, ...]) -> float:
    """max(factors) divided by their geometric mean (1.0 is perfectly balanced)."""
    geo = math.prod(factors) ** (1.0 / len(factors))
    return max(factors) / geo


def padded_factorization(
    n: int, order: int, *, max_imbalance: float = 2.0, max_padding: float = 0.25
) -> tuple[int, ...]:
    """Factors of the smallest size ``m >= n`` whose balanced split has imbalance ≤ ``max_imbalance``.

    ``m - n`` rows or columns are padding. Raises ValueError when no size within
    ``n * (1 + max_padding)`` qualifies.
    """
    return padded_factorization_of_checked(
        check_size("n", n), check_size("order", order),
        check_real("max_imbalance", max_imbalance, 1.0, "a finite number >= 1.0 (1.0 = perfectly balanced)"),
        check_real("max_padding", max_padding, 0.0, "a finite fraction >= 0 (0.25 = up to 25% padding)"))


def padded_factorization_of_checked(n: int, order: int, max_imbalance: float, max_padding: float) -> tuple[int, ...]:
    """:func:`padded_factorization` of arguments its checks have already passed (the spec's
    ``from_shape`` checks them once at its boundary)."""
    limit = max(n, math.floor(n * (1.0 + max_padding)))
    for m in range(n, limit + 1):
        factors = _balanced(m, order)
        if min(factors) >= 2 and imbalance(factors) <= max_imbalance:
            return factors
    raise ValueError(
        f"no size between {n} and {limit} splits into {order} factors >= 2 with imbalance <= "
        f"{max_imbalance}; lower the order, raise max_imbalance or raise max_padding"
    )
