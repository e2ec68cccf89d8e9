"""Minimal numpy/torch dispatch, and the input checks shared by the math core.

torch is optional: it is only touched when an input is a tensor.
"""

from __future__ import annotations

import math
import numbers
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
        x = x.detach().cpu()
        if str(x.dtype) == "torch.bfloat16":
            x = x.float()  # numpy has no bfloat16; float32 holds every bfloat16 value exactly
        return x.numpy()
    return np.asarray(x)


def backend_key(x: Array) -> tuple[str, str, str]:
    """(backend, device, dtype) of an array, as strings: a cache key and a cost-model key."""
    if is_torch(x):
        return "torch", x.device.type, str(x.dtype).removeprefix("torch.")
    return "numpy", "cpu", str(np.asarray(x).dtype)


# --- input checks: every message names the offending value and what was expected -------------
def check_size(name: str, value: object, *, low: int = 1) -> int:
    """``value`` as an int ``>= low``; bools, floats and strings are refused (numpy ints are fine)."""
    expected = "a positive integer" if low == 1 else f"an integer >= {low}"
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name} must be {expected}, got {value!r} ({type(value).__name__})")
    if value < low:
        raise ValueError(f"{name} must be {expected}, got {value}")
    return int(value)


def check_real(name: str, value: object, low: float, expected: str) -> float:
    """``value`` as a finite float ``>= low``; ``expected`` says what was wanted in the message."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or value < low:
        raise ValueError(f"{name} must be {expected}, got {value!r}")
    return float(value)


def check_alpha(alpha: object) -> float:
    """The global scale α as a float: a finite real number (NaN or Inf would fill ΔW with NaN)."""
    if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real):
        raise TypeError(f"alpha must be a real number, got {alpha!r} ({type(alpha).__name__})")
    if not math.isfinite(alpha):
        raise ValueError(f"alpha must be finite, got {alpha!r}")
    return float(alpha)


def as_array(name: str, x: object, expected: str) -> Array:
    """``x`` as a numeric numpy array or torch tensor (lists and numbers go through numpy).

    ``expected`` describes the wanted shape, e.g. ``"shape (..., 16)"``.
    """
    if is_torch(x):
        return x  # every torch dtype is numeric (or bool)
    if x is None or isinstance(x, (str, bytes, dict, set)):
        raise TypeError(f"{name} must be a numpy array or torch tensor of {expected}, got {type(x).__name__}: {x!r:.80}")
    if not isinstance(x, np.ndarray):
        try:
            x = np.asarray(x)
        except (TypeError, ValueError) as err:  # ragged nesting, unconvertible objects
            raise TypeError(f"{name} must be a numpy array or torch tensor of {expected}, got {type(x).__name__} ({err})") from None
    if x.dtype.kind not in "biufc":
        raise TypeError(f"{name} must hold numbers ({expected}), got dtype {x.dtype} from {type(x).__name__}")
    return x


def all_finite(x: Array) -> bool:
    """Whether ``x`` holds no NaN or Inf (integer and bool arrays always do)."""
    if is_torch(x):
        import torch

        return bool(torch.isfinite(x.detach()).all())
    return bool(np.isfinite(x).all())


def is_on_cpu(x: Array) -> bool:
    """Whether reading ``x``'s values costs no device synchronization."""
    return not is_torch(x) or x.device.type == "cpu"
