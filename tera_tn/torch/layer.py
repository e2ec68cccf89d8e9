"""`TeRALinear`: an ``nn.Linear`` plus a TeRA update ``ΔW(λ)``, ``y = x (W0 + ΔW)ᵀ + b``.

Construction needs only a base Linear and a spec (a bank is created when none is shared). The
math (λ layout, ΔW, merge, strategy, forward) is :class:`~tera_tn.torch.adapter.TeRAAdapters`',
the same code PEFT's :class:`tera_tn.peft.layer.Linear` runs: this class is its PEFT-free face with one
adapter called ``"default"``.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ..core.spec import TeRASpec
from .adapter import DEFAULT_ADAPTER, TeRAAdapters
from .autograd import check_input
from .bank import FactorBank
from .frozen import FrozenNetwork

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



class _OneAdapter:
    """A setting of the one adapter, read and written as a plain attribute (``layer.alpha = 2.0``)."""

    def __init__(self, table: str, kind: type) -> None:
        self.table, self.kind = table, kind

    def __get__(self, layer, owner=None):
        return self if layer is None else getattr(layer, self.table)[DEFAULT_ADAPTER]

    def __set__(self, layer, value) -> None:
        getattr(layer, self.table)[DEFAULT_ADAPTER] = self.kind(value)


class TeRALinear(nn.Module, TeRAAdapters):
    """A frozen ``nn.Linear`` with a trainable TeRA update.

    Args:
        base_layer: the ``nn.Linear`` to adapt, weight ``W0`` of shape ``(d_out, d_in)``; kept as
            ``self.base_layer`` and frozen by the layer itself (its weight and bias get
            ``requires_grad=False``), so a standalone layer trains only λ, as under
            :func:`add_tera`. Call ``layer.base_layer.requires_grad_(True)`` after construction to
            train W0 as well.
        spec: tensorization of ΔW; ``None`` uses ``TeRASpec.from_shape(d_out, d_in)``.
        bank: shared :class:`FactorBank`; ``None`` creates a private one from ``seed`` and
            ``factor_init``. Giving both a bank and a different seed is an error.
        alpha: scale α of ΔW.
        alpha_scaling: ``"constant"`` or ``"w0_relative"``: α becomes ``alpha·‖W0‖_F / ‖M‖_F`` (M the
            frozen map at unit λ), see :class:`~tera_tn.torch.TeRALayersConfig`.
        update: ``"additive"`` (``W0 + ΔW``) or ``"multiplicative"`` (``W0 + W0 ⊙ ΔW``), see
            :class:`~tera_tn.torch.TeRALayersConfig`.
        basis: ``"random"`` (the frozen factors) or ``"w0"`` (W0's singular vectors; needs a
            rank-side spec whose ``∏R`` per side is at most ``min(d_out, d_in)``), see
            :class:`~tera_tn.torch.TeRALayersConfig`.
        scale_init, zero_mode, scale_init_value: λ initialization (see :func:`tera_tn.init_scales`:
            ``scale_init_value`` is its ``value``, the starting magnitude of the non-zero vectors).
        dropout: dropout probability on the adapter's input only.
        strategy: ``"auto"`` (per token count, :func:`tera_tn.torch.planning.layer_plan`),
            ``"materialize"``, ``"dense"`` or ``"factored"`` (see :mod:`tera_tn.torch.autograd`).
        cache_delta: opt-in (default off): in inference, reuse ``W0 + ΔW`` while λ, W0, α and
            the input dtype/device are unchanged (one extra ``d_out × d_in`` tensor). Writes
            through ``.data`` bypass the version counters it is keyed on: call
            :meth:`clear_cache` after them.
        check_finite: opt-in (default off): every forward checks that λ are finite and raises
            ``FloatingPointError`` naming the layer otherwise (one small reduction and a host
            sync per call).

    λ live in ``tera_lambda["default"]``, one fp32 vector (``λ_1..λ_N`` concatenated; per-mode
    views from :meth:`scales`), as in PEFT. Input ``(..., d_in)``, output ``(..., d_out)``;
    computation in the input dtype (the autocast dtype under ``torch.autocast``), λ in fp32.
    ``forward(x, row_lambdas=t)`` serves a batch whose rows use different adapters of this
    layer's spec: ``t`` of shape ``(len(x), spec.num_trainable)`` holds each row's concatenated λ
    (the layer's own λ are then unused), all rows going through one factored contraction.
    """

    fan_in_fan_out = False

    def __init__(
        self,
        base_layer: nn.Linear,
        spec: Optional[TeRASpec] = None,
        *,
        bank: Optional[FactorBank] = None,
        seed: Optional[int] = None,
        factor_init: str = "orthogonal",
        alpha: float = 1.0,
        alpha_scaling: str = "constant",
        update: str = "additive",
        basis: str = "random",
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
        if bank is not None and not isinstance(bank, FactorBank):
            raise ValueError(f"bank must be a FactorBank (or None for a private one), got {type(bank).__name__}")
        if bank is None:
            bank = FactorBank(0 if seed is None else seed, factor_init)
            if base_layer.weight.device.type != "meta":
                bank.to(base_layer.weight.device)  # private: nobody else to keep it for
        elif seed is not None and seed != bank.seed:
            raise ValueError(f"seed={seed} differs from the shared bank's seed {bank.seed}; pass one or the other")
        # An adapter trains λ only: leaving W0 trainable would make a standalone layer train
        # d_out·d_in + d_out more numbers (590,592 at 768×768) besides its λ.
        base_layer.requires_grad_(False)
        self.base_layer = base_layer
        self._init_adapters()
        # Qualified name in the model, set by add_tera; only used to name the layer in errors.
        self._name = ""
        self.merged = False
        self.disable_adapter = False
        options = dict(alpha=alpha, alpha_scaling=alpha_scaling, update=update, basis=basis, scale_init=scale_init, zero_mode=zero_mode, scale_init_value=scale_init_value,
                       dropout=dropout, strategy=strategy, check_finite=check_finite, cache_delta=cache_delta)
        spec = TeRASpec.from_shape(base_layer.out_features, base_layer.in_features) if spec is None else spec
        self._add_adapter(DEFAULT_ADAPTER, spec, bank, options, device=base_layer.weight.device)
        # Registered in every layer that uses it: .to() reaches it from anywhere, and moving it
        # again is a no-op, so all layers keep referencing the same tensors. The layer itself
        # never moves it: other layers of a split model may live on other devices.
        self.tera_bank = bank

    def adapter_bank(self, name: str = DEFAULT_ADAPTER) -> FactorBank:
        return self.tera_bank

    def get_base_layer(self) -> nn.Linear:
        return self.base_layer

    # --- the one adapter's settings ----------------------------------------------------------
    @property
    def spec(self) -> TeRASpec:
        return self.tera_spec[DEFAULT_ADAPTER]

    alpha = _OneAdapter("tera_alpha", float)
    strategy = _OneAdapter("tera_strategy", str)
    cache_delta = _OneAdapter("tera_cache_delta", bool)
    check_finite = _OneAdapter("tera_check_finite", bool)

    @property
    def dropout(self) -> nn.Module:
        return self.tera_dropout[DEFAULT_ADAPTER]

    # --- sizes -----------------------------------------------------------------------------
    @property
    def in_features(self) -> int:
        return self.base_layer.in_features

    @property
    def out_features(self) -> int:
        return self.base_layer.out_features

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
        return self._network(DEFAULT_ADAPTER, dtype, self.base_layer.weight.device if device is None else device)

    def _where(self, name: str = DEFAULT_ADAPTER) -> str:
        return f"TeRA layer {self._name!r}" if self._name else f"TeRALinear({self.out_features}×{self.in_features})"

    # --- ΔW ----------------------------------------------------------------------------------
    def delta_weight(self, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """``ΔW`` of shape ``(d_out, d_in)`` (detached), in ``dtype`` (default: W0's dtype, at
        least float32 for the contraction)."""
        return self.get_delta_weight(DEFAULT_ADAPTER, dtype)

    def merge(self) -> None:
        """``W0 ← W0 + ΔW`` in place; forward then runs the base layer alone (zero overhead).

        Raises:
            ValueError: when ΔW is not finite (e.g. NaN λ after a diverged run); W0 is left as is.
        """
        if self.merged:
            raise RuntimeError(f"{self._where()} is already merged; unmerge() first")
        self._fold(DEFAULT_ADAPTER, +1)
        self.merged = True

    def unmerge(self) -> None:
        """``W0 ← W0 − ΔW``: undoes :meth:`merge` (exact up to rounding in W0's dtype)."""
        if not self.merged:
            raise RuntimeError(f"{self._where()} is not merged")
        self._fold(DEFAULT_ADAPTER, -1)
        self.merged = False

    # --- forward -----------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, row_lambdas: Optional[torch.Tensor] = None) -> torch.Tensor:
        check_input(x, self.in_features, self._where())
        if row_lambdas is not None:
            return self._rows_forward(x, row_lambdas)
        if self.merged or self.disable_adapter:
            return self.base_layer(x)
        return self._adapters_forward(x, [DEFAULT_ADAPTER])

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
        if not self._plain(DEFAULT_ADAPTER):
            raise ValueError(f"{self._where()} has update={self.tera_update[DEFAULT_ADAPTER]!r}, basis="
                             f"{self.tera_basis[DEFAULT_ADAPTER]!r}: row_lambdas batches share one factored chain across "
                             "rows, which only the plain network (additive, basis='random') has; run one λ at a time")
        y = self.base_layer(x)
        if self.disable_adapter:
            return y
        rows = torch.arange(want[0], device=x.device)
        alphas = torch.full((want[0],), self.alpha)
        return y + self._rows_delta(x, self.spec, self.tera_bank, row_lambdas, alphas, rows).reshape(y.shape).to(y.dtype)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # State dicts of the releases that kept one λ tensor per mode ("tera_lambda.0", ".1", …)
        # still load: their vectors, concatenated in mode order, are this layer's one vector.
        old = [f"{prefix}tera_lambda.{n}" for n in range(self.spec.order)]
        if f"{prefix}tera_lambda.{DEFAULT_ADAPTER}" not in state_dict and all(k in state_dict for k in old):
            state_dict[f"{prefix}tera_lambda.{DEFAULT_ADAPTER}"] = torch.cat([state_dict.pop(k).reshape(-1) for k in old])
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _apply(self, fn, recurse=True):
        self.clear_cache()
        return super()._apply(fn, recurse)

    def extra_repr(self) -> str:
        return f"{self.spec}, alpha={self.alpha}, strategy={self.strategy!r}, merged={self.merged}"
