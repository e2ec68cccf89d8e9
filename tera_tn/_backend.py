"""Minimal numpy/torch dispatch. torch is optional: it is only touched when an input is a tensor."""

from __future__ import annotations

import sys
from typing import Any

import numpy as np

Array = Any  # numpy.ndarray or torch.Tensor


def is_torch(x: object) -> bool:
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(x, torch.Tensor)


def pick_like(*arrays: Array) -> Array:
    """The operand whose backend, dtype and device a result should take: a torch tensor if any
    operand is one (like array-API promotion), else the first operand."""
    for a in arrays:
        if is_torch(a):
            return a
    return arrays[0]


def floating_like(like: Array, *others: Array) -> Array:
    """``like`` itself when it is floating point, else an empty array of the floating dtype its
    values promote to (integer inputs must not drag float operands down to integers)."""
    if is_torch(like):
        import torch

        if like.is_floating_point() or like.is_complex():
            return like
        return torch.empty(0, dtype=torch.get_default_dtype(), device=like.device)
    if np.issubdtype(like.dtype, np.inexact):
        return like
    dtype = np.result_type(like.dtype, *(np.asarray(o).dtype for o in others if not is_torch(o)), np.float32)
    return np.empty(0, dtype=dtype)


def to_like(x: Array, like: Array) -> Array:
    """``x`` converted to the backend, dtype and device of ``like`` (no copy when it already matches)."""
    if is_torch(like):
        import torch

        if is_torch(x):
            return x.to(dtype=like.dtype, device=like.device)
        return torch.as_tensor(np.asarray(x), dtype=like.dtype, device=like.device)
    if is_torch(x):
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=like.dtype)


def to_numpy(x: Array) -> np.ndarray:
    if is_torch(x):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def backend_key(x: Array) -> tuple[str, str, str]:
    """(backend, device, dtype) of an array, as strings: a cache key and a cost-model key."""
    if is_torch(x):
        return "torch", x.device.type, str(x.dtype).removeprefix("torch.")
    return "numpy", "cpu", str(np.asarray(x).dtype)
