"""The input checks shared by the math core; every message names the offending value and what
was expected. Which array library an input belongs to is decided in :mod:`tera_tn.backends`.
"""

from __future__ import annotations

import math
import numbers

import numpy as np

from .backends import Array, is_array, namespace


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


_KINDS = "a numpy array, torch tensor or jax array"


def as_array(name: str, x: object, expected: str) -> Array:
    """``x`` as a numeric array of a supported library (lists and numbers go through numpy).

    ``expected`` describes the wanted shape, e.g. ``"shape (..., 16)"``.
    """
    if is_array(x) and namespace(x).name != "numpy":
        return x  # torch and JAX dtypes are all numeric (or bool)
    if x is None or isinstance(x, (str, bytes, dict, set)):
        raise TypeError(f"{name} must be {_KINDS} of {expected}, got {type(x).__name__}: {x!r:.80}")
    if not isinstance(x, np.ndarray):
        try:
            x = np.asarray(x)
        except (TypeError, ValueError) as err:  # ragged nesting, unconvertible objects
            raise TypeError(f"{name} must be {_KINDS} of {expected}, got {type(x).__name__} ({err})") from None
    if x.dtype.kind not in "biufc":
        raise TypeError(f"{name} must hold numbers ({expected}), got dtype {x.dtype} from {type(x).__name__}")
    return x


def float64_matrix(x: object, name: str, layout: str) -> np.ndarray:
    """``x`` (a numpy array, or a torch tensor wherever it lives and whatever its dtype) as a finite,
    non-empty 2-D float64 array; ``layout`` names its axes in the message, e.g. ``"(d_out, d_in)"``."""
    if hasattr(x, "detach"):
        x = x.detach().to("cpu").double().numpy()
    a = np.asarray(x, dtype=np.float64)
    if a.ndim != 2 or 0 in a.shape:
        raise ValueError(f"{name} must be a non-empty {layout} matrix, got shape {a.shape}")
    if not np.isfinite(a).all():
        raise ValueError(f"{name} holds non-finite entries")
    return a
