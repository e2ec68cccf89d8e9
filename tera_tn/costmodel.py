"""A calibrated roofline cost model for the contractions tera_tn runs.

Raw FLOP counts mislead: a chain of mode products with 16-wide contractions runs several times
below the FLOP rate of a square GEMM on the same machine, because it is bound by memory traffic
and by the small inner dimension. Each kernel call is therefore costed as

    time = max(flops / (peak · s / (s + s_half)), bytes / bandwidth) + overhead

where ``s`` is the smallest of the GEMM's m, n, k (a GEMM with a 16-wide side runs at
``16 / (16 + s_half)`` of peak). The four constants are kept per (backend, device, dtype);
defaults were measured on a 2-core AMD EPYC (torch 2.13, 2 threads) and :func:`calibrate`
re-measures them on the current machine in about a second.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

__all__ = ["CostModel", "cost_model", "calibrate", "set_cost_model"]


@dataclass(frozen=True)
class CostModel:
    """Machine constants of the roofline model.

    Attributes:
        peak_flops: FLOP/s of a large square GEMM.
        s_half: smallest GEMM side at which half of ``peak_flops`` is reached.
        bandwidth: bytes/s of streaming main-memory traffic (read + write).
        overhead: seconds per kernel call (dispatch, allocation).
        source: ``"default"`` or ``"calibrated"``.
    """

    peak_flops: float
    s_half: float
    bandwidth: float
    overhead: float
    source: str = "default"

    def gemm_seconds(self, m: int, n: int, k: int, itemsize: int, calls: int = 1) -> float:
        """Time of ``calls`` GEMMs (m × k) @ (k × n) that stream their operands from memory."""
        flops = 2.0 * m * n * k
        s = max(1, min(m, n, k))
        rate = self.peak_flops * s / (s + self.s_half)
        traffic = (m * k + k * n + m * n) * itemsize
        return calls * (max(flops / rate, traffic / self.bandwidth) + self.overhead)

    def stream_seconds(self, nbytes: float, calls: int = 1) -> float:
        """Time of ``calls`` memory-bound elementwise passes moving ``nbytes`` in total."""
        return nbytes / self.bandwidth + calls * self.overhead


_DEFAULTS: dict[tuple[str, str], CostModel] = {
    # Measured on the reference 2-core machine: 1172³ fp32 GEMM at ~125 GFLOP/s, a
    # (65536×16)@(16×16) GEMM at ~80 GFLOP/s in cache, ~11 GB/s streaming through mode products.
    ("cpu", "float32"): CostModel(125e9, 9.0, 11e9, 8e-6),
    ("cpu", "float64"): CostModel(62e9, 9.0, 11e9, 8e-6),
    # Nominal H100-class figures (no TF32), used until calibrate() is run on the device.
    ("cuda", "float32"): CostModel(45e12, 64.0, 2.5e12, 1e-5),
    ("cuda", "float64"): CostModel(45e12, 64.0, 2.5e12, 1e-5),
    ("cuda", "bfloat16"): CostModel(600e12, 128.0, 2.5e12, 1e-5),
    ("cuda", "float16"): CostModel(600e12, 128.0, 2.5e12, 1e-5),
}
_MODELS: dict[tuple[str, str, str], CostModel] = {}


def _key(backend: str, device: str, dtype: str) -> tuple[str, str, str]:
    return backend, device, dtype


def cost_model(backend: str = "torch", device: str = "cpu", dtype: str = "float32") -> CostModel:
    """The model used for (backend, device, dtype): a calibrated one if set, else the default."""
    found = _MODELS.get(_key(backend, device, dtype))
    if found is not None:
        return found
    dev = "cuda" if device not in ("cpu",) else "cpu"
    default = _DEFAULTS.get((dev, dtype))
    if default is None:
        # Half precision on a CPU runs through float32 kernels at best.
        default = _DEFAULTS[(dev, "float32")] if dev == "cpu" else _DEFAULTS[("cuda", "float32")]
    return default


def set_cost_model(model: CostModel, backend: str = "torch", device: str = "cpu", dtype: str = "float32") -> None:
    """Install ``model`` for (backend, device, dtype); plans made afterwards use it."""
    from .contraction import clear_plan_cache

    _MODELS[_key(backend, device, dtype)] = model
    clear_plan_cache()


def _best_of(fn, reps: int) -> float:
    fn()
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def calibrate(backend: str = "torch", device: str = "cpu", dtype: str = "float32", *, install: bool = True) -> CostModel:
    """Measure the four constants on this machine (about a second) and, by default, install them.

    Times a 1024³ GEMM (peak), a (65536×16)@(16×16) GEMM (s_half), an 8M-element copy (bandwidth) and
    a tiny op (overhead) with the given backend, device and dtype.
    """
    if backend == "torch":
        import torch

        dt = getattr(torch, dtype)
        dev = torch.device(device)

        def sync() -> None:
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)

        def mk(*shape):
            return torch.randn(*shape, device=dev).to(dt)

        def mm(a, b, out):
            return lambda: (torch.mm(a, b, out=out), sync())

        def copy(a, b):
            return lambda: (b.copy_(a), sync())

        def tiny(a):
            return lambda: (a.add_(0), sync())

        empty = lambda *s: torch.empty(*s, device=dev, dtype=dt)  # noqa: E731
    elif backend == "numpy":
        import numpy as np

        if device != "cpu":
            raise ValueError(f"numpy runs on the CPU only, got device={device!r}")
        rng = np.random.default_rng(0)
        mk = lambda *s: rng.standard_normal(s).astype(dtype)  # noqa: E731
        mm = lambda a, b, out: (lambda: np.matmul(a, b, out=out))  # noqa: E731
        copy = lambda a, b: (lambda: np.copyto(b, a))  # noqa: E731
        tiny = lambda a: (lambda: np.add(a, 0, out=a))  # noqa: E731
        empty = lambda *s: np.empty(s, dtype=dtype)  # noqa: E731
    else:
        raise ValueError(f"backend must be 'torch' or 'numpy', got {backend!r}")

    n = 1024
    t_big = _best_of(mm(mk(n, n), mk(n, n), empty(n, n)), 3)
    peak = 2.0 * n**3 / t_big
    m = 65536
    t_small = _best_of(mm(mk(m, 16), mk(16, 16), empty(m, 16)), 5)
    rate_small = 2.0 * m * 16 * 16 / t_small
    s_half = max(0.5, 16.0 * (peak / max(rate_small, 1.0) - 1.0))
    big = 8 * 1024 * 1024
    src, dst = mk(big), empty(big)
    t_copy = _best_of(copy(src, dst), 5)
    itemsize = src.element_size() if backend == "torch" else src.itemsize
    bandwidth = 2.0 * big * itemsize / t_copy
    t_tiny = _best_of(tiny(mk(8)), 50)
    model = CostModel(peak, s_half, bandwidth, t_tiny, source="calibrated")
    if install:
        set_cost_model(model, backend, device, dtype)
    return model

