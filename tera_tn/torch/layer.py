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

from ..factors import SCALE_INITS, check_scale_value, init_scales
from ..spec import TeRASpec
from .autograd import (
    FrozenNetwork,
    _no_autocast,
    check_input,
    compute_dtype,
    merged_weight,
    mixed_delta,
    non_finite,
    tera_linear,
)
from .bank import FactorBank
from .config import LAYER_STRATEGIES
from ..costmodel import cost_model
from .planning import layer_plan

__all__ = ["TeRALinear"]


def check_base_weight(module: nn.Module, name: str) -> None:
    """Refuse a base layer whose weight is not a plain floating-point tensor.

    bitsandbytes' ``Linear8bitLt`` / ``Linear4bit`` subclass ``nn.Linear`` but keep packed
    integer weights (``Int8Params``, ``Params4bit``), and torchao swaps in tensor subclasses:
    adding ΔW to those, or multiplying by them as if they were dense, gives wrong numbers without
    an error. The plain-torch API refuses them here; PEFT routes the supported ones to
    :mod:`tera_tn.peft.quantized` and refuses the rest here.
    """
    w = getattr(module, "weight", None)
    if type(w) in (torch.Tensor, nn.Parameter) and w.is_floating_point():
        return
    kind = f"{type(module).__module__}.{type(module).__qualname__}"
    held = "no weight" if w is None else f"a {type(w).__qualname__} of dtype {str(w.dtype).removeprefix('torch.')}"
    raise TypeError(
        f"cannot adapt {name!r} ({kind}): its weight is {held}, not a plain floating-point tensor. "
        "TeRA adapts quantized base layers only through PEFT (tera_tn.peft), and only bitsandbytes 8-bit/4-bit "
        "and torchao int8 weight-only ones; otherwise load the base model in float32/bfloat16/float16, or leave "
        "this layer out of target_modules"
    )



class _FP32ParameterList(nn.ParameterList):
    """λ are float32 master weights: they follow device moves (and in-place ops such as
    ``share_memory_``) but ignore dtype casts (``model.half()``), like the master weights of
    mixed-precision training."""

    def _apply(self, fn, recurse=True):
        probe = fn(torch.empty(0))
        is_cast = probe.dtype != torch.float32
        for key, p in self._parameters.items():
            if p is None:
                continue
            new = p.data.to(probe.device) if is_cast else fn(p.data)
            if torch._has_compatible_shallow_copy_type(p, new):
                p.data = new
            else:  # e.g. to or from meta: the tensor type changes, so the Parameter must be new
                self._parameters[key] = p = nn.Parameter(new, requires_grad=p.requires_grad)
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
        scale_init, zero_mode, scale_init_value: λ initialization (see :func:`tera_tn.init_scales`:
            ``scale_init_value`` is its ``value``, the starting magnitude of the non-zero vectors).
        dropout: dropout probability on the adapter's input only.
        strategy: ``"auto"`` (per token count, :func:`tera_tn.torch.planning.layer_plan`),
            ``"materialize"`` or ``"factored"``.
        cache_delta: opt-in (default off): in inference, reuse ``W0 + ΔW`` while λ, W0, α and
            the input dtype/device are unchanged (one extra ``d_out × d_in`` tensor). Writes
            through ``.data`` bypass the version counters it is keyed on: call
            :meth:`clear_cache` after them.
        check_finite: opt-in (default off): every forward checks that λ are finite and raises
            ``FloatingPointError`` naming the layer otherwise (one small reduction and a host
            sync per call).

    Input ``(..., d_in)``, output ``(..., d_out)``; computation in the input dtype (the autocast
    dtype under ``torch.autocast``), λ in fp32. ``forward(x, row_lambdas=t)`` serves a batch whose
    rows use different adapters of this layer's spec: ``t`` of shape ``(len(x), spec.num_trainable)``
    holds each row's concatenated λ (the layer's own λ are then unused), all rows going through
    one factored contraction.
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
        scale_init_value: float = 1.0,
        dropout: float = 0.0,
        strategy: str = "auto",
        cache_delta: bool = False,
        check_finite: bool = False,
    ) -> None:
        super().__init__()
        if not isinstance(base_layer, nn.Linear):
            raise ValueError(f"TeRALinear wraps an nn.Linear, got {type(base_layer).__name__}")
        check_base_weight(base_layer, "base_layer")
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
        if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real) or not math.isfinite(alpha):
            raise ValueError(f"alpha must be a finite number, got {alpha!r}")
        if scale_init not in SCALE_INITS:
            raise ValueError(f"scale_init must be one of {SCALE_INITS}, got {scale_init!r}")
        check_scale_value("scale_init_value", scale_init_value)
        for flag, value in (("cache_delta", cache_delta), ("check_finite", check_finite)):
            if not isinstance(value, bool):
                raise ValueError(f"{flag} must be True or False, got {value!r}")
        if bank is not None and not isinstance(bank, FactorBank):
            raise ValueError(f"bank must be a FactorBank (or None for a private one), got {type(bank).__name__}")
        if bank is None:
            bank = FactorBank(0 if seed is None else seed, factor_init)
            if base_layer.weight.device.type != "meta":
                bank.to(base_layer.weight.device)  # private: nobody else to keep it for
        elif seed is not None and seed != bank.seed:
            raise ValueError(f"seed={seed} differs from the shared bank's seed {bank.seed}; pass one or the other")
        device = base_layer.weight.device
        self.base_layer = base_layer
        self.spec = spec
        # Registered in every layer that uses it: .to() reaches it from anywhere, and moving it
        # again is a no-op, so all layers keep referencing the same tensors. The layer itself
        # never moves it: other layers of a split model may live on other devices.
        self.tera_bank = bank
        bank.add(spec)
        self.alpha = float(alpha)
        self.strategy = strategy
        self.cache_delta = bool(cache_delta)
        self.check_finite = bool(check_finite)
        # Qualified name in the model, set by add_tera; only used to name the layer in errors.
        self._name = ""
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        scales = init_scales(
            spec, scale_init, zero_mode=zero_mode, seed=0 if scale_init == "random" else None, value=scale_init_value
        )
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

    def network(self, dtype: Optional[torch.dtype] = None, device: Optional[torch.device] = None) -> FrozenNetwork:
        """The shared frozen operands in ``dtype`` on ``device`` (default: the base weight's device;
        see :meth:`FactorBank.network`)."""
        return self.tera_bank.network(self.spec, dtype, self.base_layer.weight.device if device is None else device)

    def _where(self) -> str:
        return f"TeRA layer {self._name!r}" if self._name else f"TeRALinear({self.spec.d_out}×{self.spec.d_in})"

    def _bad_scales(self) -> Optional[str]:
        """Which λ_n hold non-finite values (and how many), or None when all are finite."""
        bad = [f"λ_{n}: {msg}" for n, lam in enumerate(self.tera_lambda) if (msg := non_finite(lam.detach())) is not None]
        return "; ".join(bad) or None

    # --- ΔW ----------------------------------------------------------------------------------
    @torch.no_grad()
    def delta_weight(self, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """``ΔW`` of shape ``(d_out, d_in)`` (detached), in ``dtype`` (default: W0's dtype, at
        least float32 for the contraction)."""
        w0 = self.base_layer.weight
        out_dtype = dtype or w0.dtype
        work = torch.promote_types(out_dtype, torch.float32)
        lams = [lam.to(device=w0.device, dtype=work) for lam in self.tera_lambda]
        return merged_weight(self.network(work, w0.device), lams, self.alpha, None).to(out_dtype)

    @torch.no_grad()
    def merge(self) -> None:
        """``W0 ← W0 + ΔW`` in place; forward then runs the base layer alone (zero overhead).

        Raises:
            ValueError: when ΔW is not finite (e.g. NaN λ after a diverged run); W0 is left as is.
        """
        if self.merged:
            raise RuntimeError(f"{self._where()} is already merged; unmerge() first")
        w0 = self.base_layer.weight
        delta = self.delta_weight(torch.promote_types(w0.dtype, torch.float32)).to(w0.dtype)
        bad = non_finite(delta)
        if bad is not None:
            raise ValueError(
                f"refusing to merge {self._where()}: ΔW has {bad} ({self._bad_scales() or 'λ are finite: ΔW overflows W0 dtype'}); "
                "the base weight was not changed"
            )
        w0.add_(delta)
        self.merged = True
        self._cache = None

    @torch.no_grad()
    def unmerge(self) -> None:
        """``W0 ← W0 − ΔW``: undoes :meth:`merge` (exact up to rounding in W0's dtype)."""
        if not self.merged:
            raise RuntimeError(f"{self._where()} is not merged")
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
        # The installed cost model is part of the key, so calibrate() makes layers re-choose.
        key = (n, x.dtype, x.device.type, training, cost_model("torch", x.device.type, x.dtype))
        found = self._plans.get(key)
        if found is None:
            dtype = str(x.dtype).removeprefix("torch.")
            found = layer_plan(self.spec, n, training=training, device=x.device.type, dtype=dtype).strategy
            # Small memo in front of layer_plan's LRU cache: the per-call lookup shows at n = 1.
            if len(self._plans) > 64:
                self._plans.clear()
            self._plans[key] = found
        return found

    def _cached_weight(self, x: torch.Tensor, dt: torch.dtype) -> torch.Tensor:
        w0 = self.base_layer.weight
        # _version counts in-place updates (optimizer steps); data_ptr catches `.data =` swaps.
        # In-place writes through `.data` are invisible to both: hence opt-in, and clear_cache().
        key = (
            tuple((lam._version, lam.data_ptr()) for lam in self.tera_lambda),
            w0._version,
            w0.data_ptr(),
            self.alpha,
            dt,
            x.device,
            self.tera_bank.generation,
        )
        if self._cache is not None and self._cache[0] == key:
            return self._cache[1]
        lams = [lam.to(dt) for lam in self.tera_lambda]
        with _no_autocast(x.device.type):
            weight = merged_weight(self.network(dt, x.device), lams, self.alpha, w0.to(dt))
        self._cache = (key, weight)
        return weight

    def forward(self, x: torch.Tensor, row_lambdas: Optional[torch.Tensor] = None) -> torch.Tensor:
        check_input(x, self.spec.d_in, self._where())
        base = self.base_layer
        if row_lambdas is not None:
            return self._rows_forward(x, row_lambdas)
        if self.merged or self.disable_adapter:
            return base(x)
        if self.check_finite:
            bad = self._bad_scales()
            if bad is not None:
                raise FloatingPointError(f"{self._where()} has non-finite scales ({bad}); its output would be NaN/Inf")
        lams = list(self.tera_lambda)
        needs_grad = torch.is_grad_enabled() and (
            x.requires_grad or base.weight.requires_grad or any(lam.requires_grad for lam in lams)
        )
        dropout_active = self.training and isinstance(self.dropout, nn.Dropout)
        dt = compute_dtype(x)
        if not needs_grad and not dropout_active:
            if self.cache_delta:
                return F.linear(x, self._cached_weight(x, dt), None if base.bias is None else base.bias.to(dt))
            self._cache = None
        n = max(1, math.prod(x.shape[:-1]))
        strategy = self._strategy(n, x, needs_grad)
        net = self.network(dt, x.device)
        if dropout_active:
            return base(x) + tera_linear(self.dropout(x), None, None, net, lams, self.alpha, strategy)
        return tera_linear(x, base.weight, base.bias, net, lams, self.alpha, strategy)

    def _rows_forward(self, x: torch.Tensor, row_lambdas: torch.Tensor) -> torch.Tensor:
        want = (x.shape[0] if x.dim() > 1 else 1, self.spec.num_trainable)
        if not isinstance(row_lambdas, torch.Tensor) or tuple(row_lambdas.shape) != want:
            got = tuple(row_lambdas.shape) if isinstance(row_lambdas, torch.Tensor) else type(row_lambdas).__name__
            raise ValueError(
                f"{self._where()}: row_lambdas must be a tensor of shape {want} (one row of concatenated λ, sizes "
                f"{self.spec.scale_sizes}, per batch row of x {tuple(x.shape)}), got {got}"
            )
        if self.merged:
            raise RuntimeError(f"{self._where()} is merged (its own ΔW is in W0); unmerge() before passing row_lambdas")
        y = self.base_layer(x)
        if self.disable_adapter:
            return y
        dt = compute_dtype(x)
        rows = torch.arange(want[0], device=x.device).repeat_interleave(math.prod(x.shape[1:-1]))
        alphas = torch.full((want[0],), self.alpha)
        delta = mixed_delta(self.network(dt, x.device), row_lambdas, alphas, rows, x.reshape(-1, self.spec.d_in).to(dt))
        return y + delta.reshape(y.shape).to(y.dtype)

    def _apply(self, fn, recurse=True):
        self._cache = None
        return super()._apply(fn, recurse)

    def extra_repr(self) -> str:
        return f"{self.spec}, alpha={self.alpha}, strategy={self.strategy!r}, merged={self.merged}"
