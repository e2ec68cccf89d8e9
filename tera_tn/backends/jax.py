"""JAX backend: immutable arrays, so the mode product always runs as a chain of tensordots.

Float64 needs ``jax.config.update("jax_enable_x64", True)`` (JAX's own switch); without it JAX
computes in float32.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

name = "jax"
#: Arrays cannot be written in place: no cache-blocked kernel, no ``out=``.
mutable = False


def owns(x: object) -> bool:
    return isinstance(x, jax.Array)


def _platform(x: jax.Array) -> str:
    try:
        return next(iter(x.devices())).platform
    except Exception:  # a tracer under jit/grad has no concrete device
        return jax.default_backend()


def key(x: jax.Array) -> tuple[str, str, str]:
    return "jax", _platform(x), np.dtype(x.dtype).name


def cast(x: jax.Array, like: jax.Array) -> jax.Array:
    return x if x.dtype == like.dtype else x.astype(like.dtype)


def from_numpy(a: object, like: jax.Array) -> jax.Array:
    return jnp.asarray(np.asarray(a), dtype=like.dtype)


def to_numpy(x: jax.Array) -> np.ndarray:
    return np.asarray(x)


def is_inexact(x: jax.Array) -> bool:
    return bool(jnp.issubdtype(x.dtype, jnp.inexact))


def _default_float():
    # float64 when the user enabled x64, else float32 (JAX's canonical dtypes).
    return jax.dtypes.canonicalize_dtype(jnp.float64)


def float_empty(like: jax.Array, others: Sequence[jax.Array]) -> jax.Array:
    floats = [o.dtype for o in others if is_inexact(o)]
    return jnp.empty(0, dtype=jnp.result_type(*floats) if floats else _default_float())


def all_finite(x: jax.Array) -> bool:
    return bool(jnp.isfinite(x).all())


def on_cpu(x: jax.Array) -> bool:
    return _platform(x) == "cpu"


def device(x: jax.Array) -> str:
    return _platform(x)


def clone(x: jax.Array) -> jax.Array:
    return x  # immutable: sharing is never observable


# Same signatures as the calls above make them: (a, b, axes), (list of arrays), (a, b), (vector).
tensordot, concat, kron, diag = jnp.tensordot, jnp.concatenate, jnp.kron, jnp.diag


def zeros(shape: Sequence[int], like: jax.Array) -> jax.Array:
    return jnp.zeros(tuple(shape), dtype=like.dtype)


def ones(shape: Sequence[int], like: jax.Array) -> jax.Array:
    return jnp.ones(tuple(shape), dtype=like.dtype)


def pad_end(x: jax.Array, rows: int, cols: int) -> jax.Array:
    return jnp.pad(x, [(0, 0)] * (x.ndim - 2) + [(0, rows), (0, cols)])


def permuted(x: jax.Array, perm: Sequence[int]) -> jax.Array:
    return jnp.transpose(x, perm)


def decomposable(a: jax.Array) -> jax.Array:
    """``a`` in a dtype JAX decomposes on CPU: half → float32, integers → the default float."""
    if a.dtype in (jnp.float16, jnp.bfloat16):
        return a.astype(jnp.float32)
    return a if is_inexact(a) else a.astype(_default_float())


def qr_r(a: jax.Array, grad: bool) -> jax.Array:
    return jnp.linalg.qr(a, mode="r")


def needs_grad(arrays: Sequence[jax.Array]) -> bool:
    return False  # JAX differentiates by tracing; every routine here is traceable as written


def kernel_ok(arrays: Sequence[jax.Array]) -> bool:
    return False


def svdvals(a: jax.Array) -> jax.Array:
    if a.size == 0:
        return jnp.zeros(0, dtype=jnp.zeros(0, a.dtype).real.dtype)
    return jnp.linalg.svd(a, compute_uv=False)


def timing_kernels(device: str, dtype: str) -> dict:
    """What :func:`tera_tn.contract.costmodel.calibrate` times. JAX allocates every result (no ``out=``), which the
    measured rates then include, as they would in use."""
    dt = np.dtype(dtype) if dtype != "bfloat16" else jnp.bfloat16
    if np.dtype(dt).itemsize > jnp.zeros(0, dt).dtype.itemsize:
        raise ValueError(f"dtype {dtype!r} needs jax.config.update('jax_enable_x64', True) before calibrating")
    key = jax.random.key(0)
    return dict(
        random=lambda *s: jax.random.normal(key, s, dtype=dt),
        empty=lambda *s: jnp.zeros(s, dtype=dt),
        mm=lambda a, b, out: (lambda: jnp.matmul(a, b).block_until_ready()),
        copy=lambda a, b: (lambda: jnp.copy(a).block_until_ready()),
        tiny=lambda a: (lambda: (a + 0).block_until_ready()),
        itemsize=np.dtype(dt).itemsize,
    )
