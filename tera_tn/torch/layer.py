"""`TeRALinear`: an ``nn.Linear`` plus a TeRA update ``ΔW(λ)``, ``y = x (W0 + ΔW)ᵀ + b``.

Construction needs only a base Linear and a spec (a bank is created when none is shared), so
the layer can be reused outside :func:`tera_tn.torch.add_tera` (e.g. by a PEFT tuner).
"""

from __future__ import annotations

import math
import numbers
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..factors import init_scales
from ..spec import TeRASpec
from .autograd import FrozenNetwork, merged_weight, tera_linear
from .bank import FactorBank
from .config import LAYER_STRATEGIES
from .planning import layer_plan

__all__ = ["TeRALinear"]


class _FP32ParameterList(nn.ParameterList):
    """λ are float32 master weights: they follow device moves (and in-place ops such as
    ``share_memory_``) but ignore dtype casts (``model.half()``), like the master weights of
    mixed-precision training."""

    def _apply(self, fn, recurse=True):
        probe = fn(torch.empty(0))
        is_cast = probe.dtype != torch.float32
        for p in self._parameters.values():
            if p is None:
                continue
            p.data = p.data.to(probe.device) if is_cast else fn(p.data)
            if p.grad is not None:
                p.grad = p.grad.to(probe.device) if is_cast else fn(p.grad)
        return self


class TeRALinear(nn.Module):
    """A frozen ``nn.Linear`` with a trainable TeRA update.

    Args:
        base_layer: the ``nn.Linear`` to adapt, weight ``W0`` of shape ``(d_out, d_in)``; kept as
            ``self.base_layer`` (frozen by :func:`add_tera`, not by the layer itself).
        spec: tensorization of ΔW; ``None`` uses ``TeRASpec.from_shape(d_out, d_in)``.
        bank: shared :class:`FactorBank`; ``None`` creates a private one from ``seed`` and
            ``factor_init``. Giving both a bank and a different seed is an error.
        alpha: scale α of ΔW.
        scale_init, zero_mode: λ initialization (see :func:`tera_tn.init_scales`).
        dropout: dropout probability on the adapter's input only.
        strategy: ``"auto"`` (per token count, :func:`tera_tn.torch.planning.layer_plan`),
            ``"materialize"`` or ``"factored"``.
        cache_delta: in inference, reuse ``W0 + ΔW`` while λ, W0, α and the input dtype/device
            are unchanged (one extra ``d_out × d_in`` tensor).

    Input ``(..., d_in)``, output ``(..., d_out)``; computation in the input dtype, λ in fp32.
    """

    def __init__(
        self,
        base_layer: nn.Linear,
        spec: Optional[TeRASpec] = None,
        *,
        bank: Optional[FactorBank] = None,
        seed: Optional[int] = None,
        factor_init: str = "orthogonal",
        alpha: float = 1.0,
        scale_init: str = "zero_start",
        zero_mode: int = 0,
        dropout: float = 0.0,
        strategy: str = "auto",
        cache_delta: bool = True,
    ) -> None:
        super().__init__()
        if not isinstance(base_layer, nn.Linear):
            raise ValueError(f"TeRALinear wraps an nn.Linear, got {type(base_layer).__name__}")
        d_out, d_in = base_layer.out_features, base_layer.in_features
        if spec is None:
            spec = TeRASpec.from_shape(d_out, d_in)
        if not isinstance(spec, TeRASpec):
            raise ValueError(f"spec must be a TeRASpec, got {type(spec).__name__}")
        if spec.shape != (d_out, d_in):
            raise ValueError(f"spec is for a {spec.d_out}×{spec.d_in} weight but the Linear is {d_out}×{d_in}: {spec}")
        if strategy not in LAYER_STRATEGIES:
            raise ValueError(f"strategy must be one of {LAYER_STRATEGIES}, got {strategy!r}")
        if isinstance(dropout, bool) or not isinstance(dropout, numbers.Real) or not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be a probability in [0, 1), got {dropout!r}")
        if bank is None:
            bank = FactorBank(0 if seed is None else seed, factor_init)
        elif seed is not None and seed != bank.seed:
            raise ValueError(f"seed={seed} differs from the shared bank's seed {bank.seed}; pass one or the other")
        device = base_layer.weight.device
        if bank.device != device:
            bank.to(device)
        self.base_layer = base_layer
        self.spec = spec
        # Registered in every layer that uses it: .to() reaches it from anywhere, and moving it
        # again is a no-op, so all layers keep referencing the same tensors.
        self.tera_bank = bank
        bank.add(spec)
        self.alpha = float(alpha)
        self.strategy = strategy
        self.cache_delta = bool(cache_delta)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        scales = init_scales(spec, scale_init, zero_mode=zero_mode, seed=0 if scale_init == "random" else None)
        self.tera_lambda = _FP32ParameterList(
            nn.Parameter(torch.as_tensor(np.asarray(s), dtype=torch.float32, device=device)) for s in scales
        )
        self.merged = False
        self.disable_adapter = False
        self._cache: Optional[tuple[tuple, torch.Tensor]] = None
        self._plans: dict[tuple, str] = {}

    # --- sizes -----------------------------------------------------------------------------
    @property
    def in_features(self) -> int:
        return self.spec.d_in

    @property
    def out_features(self) -> int:
        return self.spec.d_out

    @property
    def weight(self) -> torch.Tensor:
        """The base weight ``W0`` (merged weight while :attr:`merged`)."""
        return self.base_layer.weight

    @property
    def bias(self) -> Optional[torch.Tensor]:
        return self.base_layer.bias

    def network(self, dtype: Optional[torch.dtype] = None) -> FrozenNetwork:
        """The shared frozen operands in ``dtype`` (see :meth:`FactorBank.network`)."""
        return self.tera_bank.network(self.spec, dtype)

    # --- ΔW ----------------------------------------------------------------------------------
    @torch.no_grad()
    def delta_weight(self, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """``ΔW`` of shape ``(d_out, d_in)`` (detached), in ``dtype`` (default: W0's dtype, at
        least float32 for the contraction)."""
        w0 = self.base_layer.weight
        out_dtype = dtype or w0.dtype
        work = torch.promote_types(out_dtype, torch.float32)
        lams = [lam.to(work) for lam in self.tera_lambda]
        return merged_weight(self.network(work), lams, self.alpha, None).to(out_dtype)

    @torch.no_grad()
    def merge(self) -> None:
        """``W0 ← W0 + ΔW`` in place; forward then runs the base layer alone (zero overhead)."""
        if self.merged:
            raise RuntimeError("this TeRALinear is already merged; unmerge() first")
        w0 = self.base_layer.weight
        w0.add_(self.delta_weight(torch.promote_types(w0.dtype, torch.float32)).to(w0.dtype))
        self.merged = True
        self._cache = None

    @torch.no_grad()
    def unmerge(self) -> None:
        """``W0 ← W0 − ΔW``: undoes :meth:`merge` (exact up to rounding in W0's dtype)."""
        if not self.merged:
            raise RuntimeError("this TeRALinear is not merged")
        w0 = self.base_layer.weight
        w0.sub_(self.delta_weight(torch.promote_types(w0.dtype, torch.float32)).to(w0.dtype))
        self.merged = False
        self._cache = None

    def clear_cache(self) -> None:
        """Drop the cached merged weight of inference mode."""
        self._cache = None

    # --- forward -----------------------------------------------------------------------------
    def _strategy(self, n: int, x: torch.Tensor, training: bool) -> str:
        if self.strategy != "auto":
            return self.strategy
        key = (n, x.dtype, x.device.type, training)
        found = self._plans.get(key)
        if found is None:
            dtype = str(x.dtype).removeprefix("torch.")
            found = layer_plan(self.spec, n, training=training, device=x.device.type, dtype=dtype).strategy
            # Small memo in front of layer_plan's LRU cache: the per-call lookup shows at n = 1.
            if len(self._plans) > 64:
                self._plans.clear()
            self._plans[key] = found
        return found

    def _cached_weight(self, x: torch.Tensor) -> torch.Tensor:
        w0 = self.base_layer.weight
        # _version counts in-place updates (optimizer steps); data_ptr catches `.data =` swaps.
        key = (
            tuple((lam._version, lam.data_ptr()) for lam in self.tera_lambda),
            w0._version,
            w0.data_ptr(),
            self.alpha,
            x.dtype,
            x.device,
            self.tera_bank.generation,
        )
        if self._cache is not None and self._cache[0] == key:
            return self._cache[1]
        lams = [lam.to(x.dtype) for lam in self.tera_lambda]
        weight = merged_weight(self.network(x.dtype), lams, self.alpha, w0.to(x.dtype))
        self._cache = (key, weight)
        return weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        base = self.base_layer
        if self.merged or self.disable_adapter:
            return base(x)
        if x.shape[-1] != self.spec.d_in:
            raise ValueError(f"input has {x.shape[-1]} features, expected {self.spec.d_in} ({self.spec})")
        lams = list(self.tera_lambda)
        needs_grad = torch.is_grad_enabled() and (
            x.requires_grad or base.weight.requires_grad or any(lam.requires_grad for lam in lams)
        )
        dropout_active = self.training and isinstance(self.dropout, nn.Dropout)
        if not needs_grad and not dropout_active:
            if self.cache_delta:
                return F.linear(x, self._cached_weight(x), None if base.bias is None else base.bias.to(x.dtype))
            self._cache = None
        n = max(1, math.prod(x.shape[:-1]))
        strategy = self._strategy(n, x, needs_grad)
        net = self.network(x.dtype)
        if dropout_active:
            return base(x) + tera_linear(self.dropout(x), None, None, net, lams, self.alpha, strategy)
        return tera_linear(x, base.weight, base.bias, net, lams, self.alpha, strategy)

    def _apply(self, fn, recurse=True):
        self._cache = None
        return super()._apply(fn, recurse)

    def extra_repr(self) -> str:
        return f"{self.spec}, alpha={self.alpha}, strategy={self.strategy!r}, merged={self.merged}"
