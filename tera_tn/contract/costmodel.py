"""A calibrated roofline cost model for the contractions tera_tn runs.

Raw FLOP counts mislead: a chain of mode products with 16-wide contractions runs several times
below the FLOP rate of a square GEMM on the same machine, because it is bound by memory traffic
and by the small inner dimension. Each kernel call is therefore costed as

    time = max(flops / (peak · s / (s + s_half)), bytes / bandwidth) + overhead

where ``s`` is the smallest of the GEMM's m, n, k (a GEMM with a 16-wide side runs at
``16 / (16 + s_half)`` of peak). The four constants are kept per (backend, device, dtype);
defaults were measured on a 2-core AMD EPYC (torch 2.13, 2 threads) and :func:`calibrate`
re-measures them on the current machine in about a second.

This module is a leaf: it imports nothing from the planner. A :class:`CostModel` is a frozen,
hashable value and every plan cache is keyed by the model it priced with, so installing a new
model (:func:`set_cost_model`, :func:`calibrate`) changes later plans without any cache being
told.
"""

from __future__ import annotations

import math
import numbers
import time
from dataclasses import dataclass

from ..backends import backend_module, dtype_name

__all__ = ["CostModel", "cost_model", "calibrate", "set_cost_model", "BACKENDS", "DTYPES", "normalize_key"]

BACKENDS = ("torch", "numpy", "jax")
#: Bytes per element of every dtype the planner prices (what ``apply`` can compute in).
DTYPES: dict[str, int] = {
    "float16": 2,
    "bfloat16": 2,
    "float32": 4,
    "float64": 8,
    "float128": 16,
    "complex64": 8,
    "complex128": 16,
    "complex256": 32,
}
_BACKEND_DTYPES = {
    "torch": ("float16", "bfloat16", "float32", "float64", "complex64", "complex128"),
    "numpy": ("float16", "float32", "float64", "float128", "complex64", "complex128", "complex256"),
    "jax": ("float16", "bfloat16", "float32", "float64", "complex64", "complex128"),
}
# Device types torch knows that can run a GEMM; "meta" is accepted so shape-only runs can plan.
# JAX names its platforms "cpu", "gpu" and "tpu".
_DEVICES = {
    "torch": ("cpu", "cuda", "mps", "xpu", "hpu", "mtia", "meta", "privateuseone"),
    "numpy": ("cpu",),
    "jax": ("cpu", "gpu", "tpu"),
}


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

    def __post_init__(self) -> None:
        for name, low, strict in (("peak_flops", 0.0, True), ("s_half", 0.0, False), ("bandwidth", 0.0, True), ("overhead", 0.0, False)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or value < low or (strict and value == low):
                expected = "a finite number > 0" if strict else "a finite number >= 0"
                raise ValueError(f"CostModel.{name} must be {expected}, got {value!r}")
            object.__setattr__(self, name, float(value))
        if not isinstance(self.source, str):
            raise ValueError(f"CostModel.source must be a string, got {self.source!r}")

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
_RESOLVED: dict[tuple, CostModel] = {}


def normalize_key(backend: object, device: object, dtype: object) -> tuple[str, str, str]:
    """``(backend, device type, dtype name)`` after checking each: the key of cost models and plans.

    ``device="cuda:1"`` becomes ``"cuda"`` (one model per device type); ``dtype`` may be a name,
    a numpy dtype or a torch dtype.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if not isinstance(device, str):
        raise ValueError(f"device must be a device name such as 'cpu' or 'cuda:0', got {device!r}")
    dev = device.split(":", 1)[0]
    index = device[len(dev) + 1 :] if ":" in device else "0"
    allowed = _DEVICES[backend]
    if dev not in allowed or not index.isdigit():
        raise ValueError(f"device must be one of {allowed} (optionally with ':index') for backend {backend!r}, got {device!r}")
    name = dtype_name(dtype)
    if name not in _BACKEND_DTYPES[backend]:
        raise ValueError(f"dtype must be a floating dtype of {backend}, one of {_BACKEND_DTYPES[backend]}, got {dtype!r}")
    return backend, dev, name  # type: ignore[return-value]


def cost_model(backend: str = "torch", device: str = "cpu", dtype: str = "float32") -> CostModel:
    """The model used for (backend, device, dtype): an installed one if set, else the default.

    Accelerators without calibration get nominal H100-class figures; half precision and
    complex dtypes on a CPU get the float32 figures (they run through float32-class kernels at
    best).
    """
    try:
        return _RESOLVED[(backend, device, dtype)]
    except (KeyError, TypeError):  # TypeError: an unhashable argument, refused just below
        pass
    key = normalize_key(backend, device, dtype)
    found = _MODELS.get(key)
    if found is None:
        dev = "cpu" if key[1] == "cpu" else "cuda"
        found = _DEFAULTS.get((dev, key[2])) or _DEFAULTS[(dev, "float32")]
    # Layers look their model up on every call; this memo of checked arguments keeps that to one
    # dict lookup. set_cost_model empties it.
    _RESOLVED[(backend, device, dtype)] = found
    return found


def set_cost_model(model: CostModel | None, backend: str = "torch", device: str = "cpu", dtype: str = "float32") -> None:
    """Install ``model`` for (backend, device, dtype); plans made afterwards use it.

    ``None`` removes an installed model, so the default applies again.
    """
    if model is not None and not isinstance(model, CostModel):
        raise ValueError(f"set_cost_model expects a CostModel or None, got {type(model).__name__}: {model!r}")
    key = normalize_key(backend, device, dtype)
    if model is None:
        _MODELS.pop(key, None)
    else:
        _MODELS[key] = model
    _RESOLVED.clear()


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
    backend, _, dtype = normalize_key(backend, device, dtype)
    if not isinstance(install, bool):
        raise ValueError(f"install must be True or False, got {install!r}")
    k = backend_module(backend).timing_kernels(device, dtype)
    mk, empty, mm, copy, tiny = k["random"], k["empty"], k["mm"], k["copy"], k["tiny"]

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
    bandwidth = 2.0 * big * k["itemsize"] / t_copy
    t_tiny = _best_of(tiny(mk(8)), 50)
    model = CostModel(peak, s_half, bandwidth, t_tiny, source="calibrated")
    if install:
        set_cost_model(model, backend, device, dtype)
    return model

