"""Tensorize a weight matrix into the spec's modes and back (C-order, zero padding).

``tensorize(spec, W)`` pads ``W`` of shape ``(d_out, d_in)`` with zeros to the padded shape and
reshapes it to ``spec.modes``; ``matricize(spec, X)`` reverses it and slices the padding away.
``matricize(spec, tensorize(spec, W)) == W`` exactly, for numpy, torch and JAX arrays.
"""

from __future__ import annotations

from ..checks import as_array
from ..backends import Array, namespace
from .spec import TeRASpec, check_spec

__all__ = ["tensorize", "matricize"]


def tensorize(spec: TeRASpec, w: Array) -> Array:
    """``W`` of shape ``(d_out, d_in)`` → tensor of shape ``spec.modes`` (zero-padded, C-order)."""
    check_spec(spec, "tensorize")
    w = as_array("w", w, f"shape {spec.shape}")
    if tuple(w.shape) != spec.shape:
        raise ValueError(f"tensorize expects a matrix of shape {spec.shape} for {spec}, got {tuple(w.shape)}")
    pad_rows, pad_cols = spec.padding
    if pad_rows or pad_cols:
        w = namespace(w).pad_end(w, pad_rows, pad_cols)
    return w.reshape(spec.modes)


def matricize(spec: TeRASpec, x: Array) -> Array:
    """Tensor of shape ``spec.modes`` → matrix of shape ``(d_out, d_in)`` (padding sliced away)."""
    check_spec(spec, "matricize")
    x = as_array("x", x, f"shape {spec.modes}")
    if tuple(x.shape) != spec.modes:
        raise ValueError(f"matricize expects a tensor of shape {spec.modes} for {spec}, got {tuple(x.shape)}")
    return x.reshape(spec.padded_shape)[: spec.d_out, : spec.d_in]
