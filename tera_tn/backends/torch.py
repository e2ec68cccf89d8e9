"""torch backend: any device; results stay differentiable where autograd is on."""

from __future__ import annotations

import contextlib
import ctypes
import sys
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

name = "torch"
mutable = True
#: Scratch bytes per kernel buffer (bench/bench_materialize.py on a 2-core Zen3).
SCRATCH_BYTES = 2 * 1024 * 1024
_HALF = (torch.float16, torch.bfloat16)


def owns(x: object) -> bool:
    return isinstance(x, torch.Tensor)


def empty_of(dtype=None, device=None) -> torch.Tensor:
    """An empty tensor of ``dtype`` (a torch dtype or its name; default float32) on ``device``."""
    if isinstance(dtype, str):
        named = getattr(torch, dtype.removeprefix("torch."), None)
        if not isinstance(named, torch.dtype):
            raise ValueError(f"dtype {dtype!r} is no torch dtype; expected e.g. 'float32' or torch.float64")
        dtype = named
    return torch.empty(0, dtype=dtype or torch.float32, device=device)


def key(x: torch.Tensor) -> tuple[str, str, str]:
    return "torch", x.device.type, str(x.dtype).removeprefix("torch.")


def cast(x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return x.to(dtype=like.dtype, device=like.device)


def from_numpy(a: object, like: torch.Tensor) -> torch.Tensor:
    return torch.as_tensor(np.asarray(a), dtype=like.dtype, device=like.device)


def to_numpy(x: torch.Tensor) -> np.ndarray:
    x = x.detach().cpu()
    if x.dtype == torch.bfloat16:
        x = x.float()  # numpy has no bfloat16; float32 holds every bfloat16 value exactly
    return x.numpy()


def is_inexact(x: torch.Tensor) -> bool:
    return x.is_floating_point() or x.is_complex()


def float_empty(like: torch.Tensor, others: Sequence[torch.Tensor]) -> torch.Tensor:
    return torch.empty(0, dtype=torch.get_default_dtype(), device=like.device)


def all_finite(x: torch.Tensor) -> bool:
    return bool(torch.isfinite(x.detach()).all())


def on_cpu(x: torch.Tensor) -> bool:
    """Whether reading ``x``'s values costs no device synchronization."""
    return x.device.type == "cpu"


def device(x: torch.Tensor) -> torch.device:
    return x.device


def clone(x: torch.Tensor) -> torch.Tensor:
    return x.clone()


def zeros(shape: Sequence[int], like: torch.Tensor) -> torch.Tensor:
    return torch.zeros(tuple(shape), dtype=like.dtype, device=like.device)


def ones(shape: Sequence[int], like: torch.Tensor) -> torch.Tensor:
    return torch.ones(tuple(shape), dtype=like.dtype, device=like.device)


def pad_end(x: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    return F.pad(x, (0, cols, 0, rows))


def tensordot(a: torch.Tensor, b: torch.Tensor, axes) -> torch.Tensor:
    return torch.tensordot(a, b, dims=axes)


def permuted(x: torch.Tensor, perm: Sequence[int]) -> torch.Tensor:
    return x.permute(*perm).contiguous()


def concat(arrays: Sequence[torch.Tensor]) -> torch.Tensor:
    return torch.cat(list(arrays), dim=0)


def kron(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    # torch.kron views its inputs and fails on non-contiguous slices such as A_1[q:q+1].
    return torch.kron(a.contiguous(), b.contiguous())


def diag(v: torch.Tensor) -> torch.Tensor:
    return torch.diag(v)


def decomposable(a: torch.Tensor) -> torch.Tensor:
    """``a`` detached, in a dtype torch decomposes on every device: half → float32, integers → float64."""
    a = a.detach()
    if a.dtype in _HALF:
        return a.float()
    return a if is_inexact(a) else a.double()


def svdvals(a: torch.Tensor) -> torch.Tensor:
    if a.numel() == 0:
        return torch.zeros(0, dtype=a.real.dtype if a.is_complex() else a.dtype, device=a.device)
    return torch.linalg.svdvals(a)


def qr_r(a: torch.Tensor, grad: bool) -> torch.Tensor:
    # mode="r" has no backward (it needs Q), so pay for Q only when a gradient is wanted.
    return torch.linalg.qr(a, mode="reduced" if grad else "r")[1]


def needs_grad(arrays: Sequence[torch.Tensor]) -> bool:
    return torch.is_grad_enabled() and any(owns(a) and a.requires_grad for a in arrays)


def timing_kernels(device: str, dtype: str) -> dict:
    """What :func:`tera_tn.contract.costmodel.calibrate` times; every closure waits for the device to finish."""
    dt, dev = getattr(torch, dtype), torch.device(device)

    def synced(fn):
        def run():
            fn()
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
        return run

    return dict(
        random=lambda *s: torch.randn(*s, device=dev).to(dt),
        empty=lambda *s: torch.empty(*s, device=dev, dtype=dt),
        mm=lambda a, b, out: synced(lambda: torch.mm(a, b, out=out)),
        copy=lambda a, b: synced(lambda: b.copy_(a)),
        tiny=lambda a: synced(lambda: a.add_(0)),
        itemsize=torch.empty(0, dtype=dt).element_size(),
    )


# --- primitives of the cache-blocked mode-product kernel --------------------------------------
def kernel_ok(arrays: Sequence[torch.Tensor]) -> bool:
    """The in-place CPU kernel is for CPU tensors without autograd, outside torch.compile (its
    threads, locks and cached workspaces cannot be traced); others use the plain chain."""
    return not needs_grad(arrays) and arrays[0].device.type == "cpu" and not torch.compiler.is_compiling()


def kernel_scope():
    return torch.no_grad()


def empty(shape, like: torch.Tensor) -> torch.Tensor:
    return torch.empty(shape, dtype=like.dtype, device=like.device)


def new_output(shape, like: torch.Tensor) -> torch.Tensor:
    out = empty(shape, like)
    if out.device.type == "cpu":
        _advise_hugepages(out)
    return out


scratch = new_output


def mm(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor) -> None:
    torch.mm(a, b, out=out)


def copy(dst: torch.Tensor, src: torch.Tensor) -> None:
    dst.copy_(src)


def fill_zero(x: torch.Tensor) -> None:
    x.zero_()


def permute_view(x: torch.Tensor, perm: Sequence[int]) -> torch.Tensor:
    return x.permute(*perm)


def contiguous(x: torch.Tensor) -> torch.Tensor:
    return x.contiguous()


def is_contiguous(x: torch.Tensor) -> bool:
    return x.is_contiguous()


def itemsize(x: torch.Tensor) -> int:
    return x.element_size()


def workspace_key(x: torch.Tensor) -> tuple:
    # A buffer made under torch.inference_mode() is an inference tensor that may not be written
    # outside it (and vice versa), so the two modes keep separate workspaces.
    return ("torch", str(x.dtype), str(x.device), torch.is_inference_mode_enabled())


def max_workers(cores: int) -> int:
    return max(1, min(torch.get_num_threads(), cores, 8))


@contextlib.contextmanager
def _one_thread(restore: int):
    # Each worker runs its own GEMMs on one core; torch's thread count is per-thread for the
    # calling thread, but set_num_threads also stores a global default, so restore the caller's.
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(restore)


def worker_scopes():
    """(scope around a parallel pass, factory of the scope each worker runs in)."""
    restore = torch.get_num_threads()
    return contextlib.nullcontext(), lambda: _one_thread(restore)


_MADV_HUGEPAGE = 14
_libc = None


def _advise_hugepages(t: torch.Tensor) -> None:
    # A fresh 64 MiB torch allocation spends ~20 ms in 4 KiB page faults on first touch (more
    # than the whole product); with THP in "madvise" mode, asking for huge pages before touching
    # the memory cuts that to ~2 ms. numpy already does this for its own large allocations.
    # Purely advisory, so failures are ignored.
    global _libc
    if not sys.platform.startswith("linux"):
        return
    nbytes = t.numel() * t.element_size()
    huge = 2 << 20
    if nbytes < 4 * huge:
        return
    try:
        if _libc is None:
            _libc = ctypes.CDLL(None, use_errno=True)
            _libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
            _libc.madvise.restype = ctypes.c_int
        p = t.data_ptr()
        start = (p + huge - 1) // huge * huge
        stop = (p + nbytes) // huge * huge
        if stop > start:
            _libc.madvise(start, stop - start, _MADV_HUGEPAGE)
    except Exception:  # pragma: no cover - platform dependent
        pass
