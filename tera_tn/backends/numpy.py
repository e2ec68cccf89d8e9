"""numpy backend: the reference, and what lists and numbers become."""

from __future__ import annotations

import contextlib
from typing import Sequence

import numpy as np

name = "numpy"
#: The mode-product kernel writes into preallocated buffers.
mutable = True
#: Scratch bytes per kernel buffer (bench/bench_materialize.py on a 2-core Zen3: L3-sized wins).
SCRATCH_BYTES = 1024 * 1024


def owns(x: object) -> bool:
    return isinstance(x, np.ndarray)


def key(x: np.ndarray) -> tuple[str, str, str]:
    return "numpy", "cpu", x.dtype.name


def cast(x: np.ndarray, like: np.ndarray) -> np.ndarray:
    return np.asarray(x, dtype=like.dtype)


def from_numpy(a: object, like: np.ndarray) -> np.ndarray:
    return np.asarray(a, dtype=like.dtype)


def to_numpy(x: object) -> np.ndarray:
    return np.asarray(x)


def is_inexact(x: np.ndarray) -> bool:
    return bool(np.issubdtype(x.dtype, np.inexact))


def float_empty(like: np.ndarray, others: Sequence[np.ndarray]) -> np.ndarray:
    return np.empty(0, dtype=np.result_type(like.dtype, *(np.asarray(o).dtype for o in others), np.float32))


def all_finite(x: np.ndarray) -> bool:
    return bool(np.isfinite(x).all())


def on_cpu(x: np.ndarray) -> bool:
    return True


def device(x: np.ndarray) -> str:
    return "cpu"


def clone(x: np.ndarray) -> np.ndarray:
    return x.copy()


def zeros(shape: Sequence[int], like: np.ndarray) -> np.ndarray:
    return np.zeros(shape, dtype=like.dtype)


def ones(shape: Sequence[int], like: np.ndarray) -> np.ndarray:
    return np.ones(shape, dtype=like.dtype)


def pad_end(x: np.ndarray, rows: int, cols: int) -> np.ndarray:
    """Zeros appended: ``rows`` after the second-to-last axis, ``cols`` after the last."""
    return np.pad(x, [(0, 0)] * (x.ndim - 2) + [(0, rows), (0, cols)])


def permuted(x: np.ndarray, perm: Sequence[int]) -> np.ndarray:
    """``x`` with its axes permuted, copied to C order."""
    return np.ascontiguousarray(x.transpose(perm))


def decomposable(a: np.ndarray) -> np.ndarray:
    """``a`` in a dtype LAPACK decomposes: float16 → float32, integers → float64, and float64
    for extended precision (LAPACK has no long-double SVD)."""
    if a.dtype == np.float16:
        return a.astype(np.float32)
    if not np.issubdtype(a.dtype, np.inexact) or a.dtype == np.longdouble:
        return a.astype(np.float64)
    if a.dtype == np.clongdouble:
        return a.astype(np.complex128)
    return a


# Same signatures as the calls above make them: (a, b, axes), (list of arrays), (a, b), (vector).
tensordot, concat, kron, diag = np.tensordot, np.concatenate, np.kron, np.diag


def svdvals(a: np.ndarray) -> np.ndarray:
    if a.size == 0:
        return np.zeros(0, dtype=np.zeros(0, a.dtype).real.dtype)
    return np.linalg.svd(a, compute_uv=False)


def qr_r(a: np.ndarray, grad: bool) -> np.ndarray:
    """``R`` of the thin QR ``a = Q R``: shape ``(min(m, n), n)``."""
    return np.linalg.qr(a, mode="r")


def needs_grad(arrays: Sequence[np.ndarray]) -> bool:
    return False


def timing_kernels(device: str, dtype: str) -> dict:
    """What :func:`tera_tn.contract.costmodel.calibrate` times: makers of operands, and closures running one kernel."""
    rng = np.random.default_rng(0)
    return {
        "random": lambda *s: rng.standard_normal(s).astype(dtype),
        "empty": lambda *s: np.empty(s, dtype=dtype),
        "mm": lambda a, b, out: (lambda: np.matmul(a, b, out=out)),
        "copy": lambda a, b: (lambda: np.copyto(b, a)),
        "tiny": lambda a: (lambda: np.add(a, 0, out=a)),
        "itemsize": np.dtype(dtype).itemsize,
    }


# --- primitives of the cache-blocked mode-product kernel --------------------------------------
def kernel_ok(arrays: Sequence[np.ndarray]) -> bool:
    return True


def kernel_scope():
    return contextlib.nullcontext()


def empty(shape, like: np.ndarray) -> np.ndarray:
    return np.empty(shape, dtype=like.dtype)


new_output = empty
scratch = empty


def mm(a: np.ndarray, b: np.ndarray, out: np.ndarray) -> None:
    np.matmul(a, b, out=out)


def copy(dst: np.ndarray, src: np.ndarray) -> None:
    np.copyto(dst, src)


def fill_zero(x: np.ndarray) -> None:
    x.fill(0)


def permute_view(x: np.ndarray, perm: Sequence[int]) -> np.ndarray:
    return x.transpose(perm)


def contiguous(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x)


def is_contiguous(x: np.ndarray) -> bool:
    return bool(x.flags.c_contiguous)


def itemsize(x: np.ndarray) -> int:
    return x.dtype.itemsize


def workspace_key(x: np.ndarray) -> tuple:
    return ("numpy", x.dtype.str)


_BLAS_CONTROLLER = None


def _blas_controller():
    """threadpoolctl controller (optional dependency) or False when unavailable."""
    global _BLAS_CONTROLLER
    if _BLAS_CONTROLLER is None:
        try:
            from threadpoolctl import ThreadpoolController

            _BLAS_CONTROLLER = ThreadpoolController()
        except Exception:
            _BLAS_CONTROLLER = False
    return _BLAS_CONTROLLER


def max_workers(cores: int) -> int:
    # Skinny GEMMs under a multi-threaded OpenBLAS are slow (and collapse on a loaded machine,
    # its threads spin); one BLAS thread per Python worker needs threadpoolctl to pin the
    # process-global BLAS thread count.
    return max(1, min(cores, 8)) if _blas_controller() else 1


def worker_scopes():
    """(scope around a parallel pass, factory of the scope each worker runs in): the BLAS
    thread count is process-global, so it is limited to 1 once for the whole pass."""
    return _blas_controller().limit(limits=1, user_api="blas"), contextlib.nullcontext
