"""`FactorBank`: one set of frozen TeRA factors per shape group, held once per model.

Every :class:`~tera_tn.torch.TeRALinear` of one spec uses the same core ``G`` and factors
``U_n``, drawn by :func:`tera_tn.random_factors` from ``(seed, spec)`` — a pure function of
them, so every process (DDP ranks included) rebuilds bit-identical factors without any
communication. The bank therefore keeps them as plain tensor attributes, not as parameters or
buffers: they are not in ``state_dict``, and nothing that walks a module's parameters and
buffers sees them — DDP's buffer broadcast, FSDP's sharding, accelerate's hooks — so on every
path only λ (and their gradients) travel between processes. Layers register the same bank
object as a submodule, so ``.to(device)`` still reaches it: it moves each tensor once (later
visits find it already there) and all layers keep sharing the same storage.

A model may be split across devices (pipeline stages, ``device_map``), so no layer moves the
bank: each asks :meth:`FactorBank.network` for the operands on its input's device and dtype,
served from a small per-``(spec, dtype, device)`` cache (the stored tensors themselves where
device and dtype already match).
"""

from __future__ import annotations

import hashlib
from typing import Iterator, Optional

import torch
from torch import nn

from ..core.factors import FACTOR_INITS, check_seed, random_factors
from ..core.spec import TeRASpec
from .autograd import FrozenNetwork
from .frozen import layer_product

__all__ = ["FactorBank"]

_STORAGE_DTYPES = {"float32": torch.float32, "float64": torch.float64}


class FactorBank(nn.Module):
    """Registry of frozen factors, one group per :class:`TeRASpec`, for one ``(seed, init)``.

    Args:
        seed: non-negative integer; the factors of each spec are a function of ``(seed, spec)``.
        factor_init: ``"orthogonal"`` (default), ``"gaussian"`` or ``"uniform"`` (see
            :func:`tera_tn.random_factors`).
        dtype: storage dtype, ``"float32"`` (default) or ``"float64"``. The bank keeps it under
            ``model.half()`` / ``.to(dtype)`` — only device moves apply, and never to ``meta``,
            which would discard the values — and serves other dtypes and devices from a small
            cache (see :meth:`network`).
    """

    def __init__(self, seed: int = 0, factor_init: str = "orthogonal", dtype: str = "float32") -> None:
        super().__init__()
        if factor_init not in FACTOR_INITS:
            raise ValueError(f"factor_init must be one of {FACTOR_INITS}, got {factor_init!r}")
        if dtype not in _STORAGE_DTYPES:
            raise ValueError(f"dtype must be one of {tuple(_STORAGE_DTYPES)}, got {dtype!r}")
        self.seed = check_seed(seed)
        self.factor_init = factor_init
        self.dtype_name = dtype
        self._groups: dict[TeRASpec, str] = {}
        # {"group0_core": G, "group0_u0": U_0, ...}: deliberately not buffers (see the module doc).
        self._factors: dict[str, torch.Tensor] = {}
        self._device = torch.device("cpu")
        self._casts: dict[tuple, FrozenNetwork] = {}
        self._frozen_norms: dict[TeRASpec, float] = {}
        # Bumped on every move, so layers can tell that cached results depend on stale tensors.
        self.generation = 0

    @property
    def storage_dtype(self) -> torch.dtype:
        return _STORAGE_DTYPES[self.dtype_name]

    @property
    def device(self) -> torch.device:
        return self._device

    def add(self, spec: TeRASpec) -> str:
        """Create (once) the group for ``spec`` and return its buffer prefix, e.g. ``"group0"``."""
        if not isinstance(spec, TeRASpec):
            raise ValueError(f"expected a TeRASpec, got {type(spec).__name__}")
        name = self._groups.get(spec)
        if name is not None:
            return name
        name = f"group{len(self._groups)}"
        factors = random_factors(spec, self.seed, init=self.factor_init)
        like = dict(dtype=self.storage_dtype, device=self.device)
        self._factors[f"{name}_core"] = torch.as_tensor(factors.core).to(**like)
        for n, u in enumerate(factors.factors):
            if u is not None:
                self._factors[f"{name}_u{n}"] = torch.as_tensor(u).to(**like)
        self._groups[spec] = name
        return name

    def specs(self) -> tuple[TeRASpec, ...]:
        """The specs held, in creation order."""
        return tuple(self._groups)

    def group_name(self, spec: TeRASpec) -> str:
        try:
            return self._groups[spec]
        except KeyError:
            raise KeyError(f"the bank holds no factors for {spec}; call add(spec) first") from None

    def group_tensors(self, spec: TeRASpec) -> dict[str, torch.Tensor]:
        """``{"core": G, "u0": U_0, ...}`` in storage dtype (the shared tensors themselves)."""
        name = self.group_name(spec)
        out = {"core": self._factors[f"{name}_core"]}
        for n in range(spec.order):
            u = self._factors.get(f"{name}_u{n}")
            if u is not None:
                out[f"u{n}"] = u
        return out

    def network(
        self, spec: TeRASpec, dtype: Optional[torch.dtype] = None, device: Optional[torch.device] = None
    ) -> FrozenNetwork:
        """The frozen operands of ``spec`` in ``dtype`` on ``device`` (default: where and how stored).

        Where both match the storage these are the shared tensors themselves (same ``data_ptr``
        for every layer); other combinations are copied once per bank placement and cached, so
        the layers of a model split across devices each get the factors on their own device.
        """
        dtype = dtype or self.storage_dtype
        device = self.device if device is None else torch.device(device)
        key = (spec, dtype, device)
        net = self._casts.get(key)
        if net is None:
            t = self.group_tensors(spec)
            stored = FrozenNetwork(spec, t["core"], tuple(t.get(f"u{n}") for n in range(spec.order)))
            net = stored.to(dtype, device)
            self._casts[key] = net
        return net

    def frozen_norm(self, spec: TeRASpec) -> float:
        """``‖M‖_F`` of the frozen map of ``spec`` (``P G Qᵀ``: ΔW at unit λ and α = 1, the
        padding cut off), in float64; computed once per spec, without keeping the product."""
        found = self._frozen_norms.get(spec)
        if found is None:
            net = self.network(spec, torch.float64, torch.device("cpu"))
            with torch.no_grad():
                m = layer_product(net.core, list(net.factors)).reshape(spec.padded_shape)
            found = float(torch.linalg.matrix_norm(m[: spec.d_out, : spec.d_in]))
            self._frozen_norms[spec] = found
        return found

    def fingerprint(self, spec: Optional[TeRASpec] = None) -> str:
        """SHA-256 (hex) of the factor bytes of one group, or of all groups in creation order."""
        h = hashlib.sha256()
        for s in (spec,) if spec is not None else self.specs():
            for key, t in self.group_tensors(s).items():
                h.update(key.encode())
                h.update(t.detach().cpu().contiguous().numpy().tobytes())
        return h.hexdigest()

    def iter_factors(self) -> Iterator[torch.Tensor]:
        """Every factor tensor held, in creation order."""
        yield from self._factors.values()

    def _apply(self, fn, recurse=True):
        # Only the device of `fn`'s result is followed, never its values or dtype: a cast
        # (model.half()) would throw away precision of the seeded draws that every process must
        # share bit for bit, and `to_empty()` would overwrite them. Moves to meta (a block
        # offloaded, a stand-in device) are ignored too: the other blocks still use the factors.
        device = fn(torch.empty(0, device=self._device, dtype=self.storage_dtype)).device
        if device == self._device or device.type == "meta":
            return self
        self._factors = {name: t.to(device) for name, t in self._factors.items()}
        self._device = device
        self._casts.clear()
        self.generation += 1
        return self

    def extra_repr(self) -> str:
        return f"seed={self.seed}, factor_init={self.factor_init!r}, dtype={self.dtype_name}, groups={len(self._groups)}"
