"""Random updates of peer methods, for comparing their spectra with TeRA's at equal budget.

LoRA ``ΔW = B A`` and VeRA ``ΔW = diag(b) B diag(d) A`` drawn from seeded Gaussians, with VeRA's
trainable vectors at a generic point (|·| uniform in [0.5, 2], random signs), the point TeRA's
own analysis uses.
"""

from __future__ import annotations

import math

import numpy as np

__all__ = ["lora_update", "vera_update"]


def _rng(seed: int, name: str) -> np.random.Generator:
    return np.random.default_rng([int(seed), *name.encode()])


def _signed_uniform(gen: np.random.Generator, size: int) -> np.ndarray:
    """|v| uniform in [0.5, 2] with random signs: the generic point TeRA's analysis uses."""
    return gen.uniform(0.5, 2.0, size) * gen.choice([-1.0, 1.0], size)


def lora_update(d_out: int, d_in: int, r: int, seed: int = 0) -> np.ndarray:
    """A random LoRA update ``ΔW = B A`` with Gaussian ``B (d_out×r)``, ``A (r×d_in)``."""
    g = _rng(seed, "lora")
    b = g.standard_normal((d_out, r)) / math.sqrt(r)
    a = g.standard_normal((r, d_in)) / math.sqrt(d_in)
    return b @ a


def vera_update(d_out: int, d_in: int, r: int, seed: int = 0) -> np.ndarray:
    """A random VeRA update ``ΔW = diag(b) B diag(d) A``: frozen Gaussian ``B (d_out×r)`` and
    ``A (r×d_in)``, trainable ``b`` and ``d`` at a generic point (|·| in [0.5, 2])."""
    g = _rng(seed, "vera")
    bmat = g.standard_normal((d_out, r)) / math.sqrt(r)
    amat = g.standard_normal((r, d_in)) / math.sqrt(d_in)
    b, d = _signed_uniform(g, d_out), _signed_uniform(g, r)
    return (b[:, None] * bmat) @ (d[:, None] * amat)
