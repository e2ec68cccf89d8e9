"""One dispatch for the array libraries the math core runs on: numpy, torch and JAX.

The backend of an operation is inferred from its arrays' type (``type(x).__module__``), never
from a global switch, and cached per type. Each backend is one module here (``numpy``,
``torch``, ``jax``) exposing the same functions: conversion, the few linalg calls whose
signatures differ, constants, and (numpy and torch only) the in-place primitives of the
cache-blocked mode-product kernel. Code outside this package calls ``namespace(x).<name>`` and
never asks which library it holds. torch and JAX are imported only once an array of theirs
is seen. ``backends/protocol.py`` names what each backend module must provide
(:class:`~tera_tn.backends.protocol.Backend`, and for mutable ones
:class:`~tera_tn.backends.protocol.KernelBackend`); ``tests/test_backend_protocol.py`` checks all three.
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Any

import numpy as np

__all__ = ["namespace", "get_func", "backend_module", "is_array", "pick_like", "floating_like", "to_like", "to_numpy", "backend_key"]

Array = Any  # numpy.ndarray, torch.Tensor or jax.Array

# Top-level module of an array type → backend module name (jax arrays live in jaxlib).
_MODULES = {"numpy": "numpy", "torch": "torch", "jax": "jax", "jaxlib": "jax"}
_BY_TYPE: dict[type, ModuleType | None] = {}


def _native(x: object) -> ModuleType | None:
    """The backend owning ``type(x)``, or None for lists, numbers and other non-arrays."""
    t = type(x)
    try:
        return _BY_TYPE[t]
    except KeyError:
        pass
    name = _MODULES.get(t.__module__.split(".", 1)[0])
    backend = None
    if name is not None and hasattr(x, "shape") and hasattr(x, "dtype"):
        backend = backend_module(name)
        if not backend.owns(x):
            backend = None
    _BY_TYPE[t] = backend
    return backend


def is_array(x: object) -> bool:
    """Whether ``x`` is an array of a supported library (numpy, torch or JAX)."""
    return _native(x) is not None


def namespace(x: object) -> ModuleType:
    """The backend module of ``x``; numpy for lists, numbers and numpy scalars."""
    return _native(x) or _numpy()


def get_func(name: str, x: object):
    """``namespace(x).<name>``, the function ``name`` of ``x``'s backend."""
    return getattr(namespace(x), name)


def backend_module(name: str) -> ModuleType:
    """The backend module called ``name`` (``"numpy"``, ``"torch"`` or ``"jax"``), imported on first use."""
    if name not in ("numpy", "torch", "jax"):
        raise ValueError(f"backend must be 'numpy', 'torch' or 'jax', got {name!r}")
    return importlib.import_module(f"{__name__}.{name}")


def _numpy() -> ModuleType:
    return backend_module("numpy")


def pick_like(*arrays: Array) -> Array:
    """The operand whose backend, dtype and device a result should take: the first array of a
    non-numpy backend if any (torch and JAX take precedence over numpy, like array-API
    promotion), else the first operand."""
    for a in arrays:
        if namespace(a).name != "numpy":
            return a
    return arrays[0]


def floating_like(like: Array, *others: Array) -> Array:
    """``like`` itself when it is inexact, else an empty array of the floating dtype its values
    promote to (integer inputs must not drag float operands down to integers)."""
    backend = namespace(like)
    if backend.is_inexact(like):
        return like
    return backend.float_empty(like, [o for o in others if namespace(o) is backend])


def to_like(x: Array, like: Array) -> Array:
    """``x`` converted to the backend, dtype and device of ``like`` (no copy when it already matches)."""
    target, source = namespace(like), namespace(x)
    if source is target and is_array(x):
        return target.cast(x, like)
    return target.from_numpy(source.to_numpy(x), like)


def to_numpy(x: Array) -> np.ndarray:
    return namespace(x).to_numpy(x)


def backend_key(x: Array) -> tuple[str, str, str]:
    """(backend, device type, dtype) of an array, as strings: a cache key and a cost-model key."""
    return namespace(x).key(x)


def dtype_name(dtype: object) -> str:
    """The plain name of a numpy, torch or JAX dtype (``torch.float32`` → ``"float32"``)."""
    text = str(dtype)
    if isinstance(dtype, str) or text.startswith("torch."):
        return text.removeprefix("torch.")
    try:
        return np.dtype(dtype).name  # type: ignore[arg-type]
    except TypeError:
        return repr(dtype)
