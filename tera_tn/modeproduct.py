"""Mode-product chains X = core ×_1 M_1 … ×_N M_N (simple reference version; being optimized)."""

from __future__ import annotations

import math

__all__ = ["multi_mode_product", "chain_steps"]


def chain_steps(ranks, modes):
    """(mode, size before, K_n, R_n) for each product, in execution order."""
    size = math.prod(ranks)
    steps = []
    for n, (k, r) in enumerate(zip(modes, ranks)):
        steps.append((n, size, k, r))
        size = size // r * k
    return steps


def multi_mode_product(core, matrices):
    """X = core ×_1 M_1 … ×_N M_N; matrices[n] of shape (K_n, R_n) or None (identity)."""
    x = core
    for n, m in enumerate(matrices):
        if m is None:
            continue
        lead = math.prod(x.shape[:n])
        trail = math.prod(x.shape[n + 1 :])
        y = m @ x.reshape(lead, x.shape[n], trail)
        x = y.reshape(x.shape[:n] + (m.shape[0],) + x.shape[n + 1 :])
    return x
