"""TeRA on quantized base layers (QLoRA-style): bitsandbytes 8-bit / 4-bit, torchao int8 weight-only.

The base layer keeps its packed weight and computes ``base(x)`` itself (its own kernels and
dequantization); TeRA adds ``ΔW x`` from the factored update next to it, as PEFT's LoRA, VeRA and
RandLoRA do on these layers. Only λ train, in fp32.

Merging cannot be exact: ``W0 + ΔW`` is re-quantized, so the merged layer computes with
``Q(deQ(W0) + ΔW)``. :meth:`QuantizedLinear.merge` does it and warns with the largest rounding
error it introduced, measured against ``deQ(W0) + ΔW`` (also kept in ``merge_errors``). A base
whose weights cannot be re-quantized the same way (another torchao format) is refused.
"""

from __future__ import annotations

import warnings
from typing import Optional

import torch
from torch import nn

from ..torch.autograd import non_finite
from .layer import Linear

__all__ = ["QuantizedLinear", "quantization_of"]

KINDS = ("bnb-8bit", "bnb-4bit", "torchao-int8")


def quantization_of(module: nn.Module) -> Optional[str]:
    """``"bnb-8bit"``, ``"bnb-4bit"`` or ``"torchao-int8"`` for a supported quantized Linear, else None.

    Recognized by the weight's type name, so neither bitsandbytes nor torchao is imported for a
    float model. A bitsandbytes layer not yet quantized (quantization happens when it is moved to
    its device) is not recognized, and so refused.
    """
    w = getattr(module, "weight", None)
    kind = type(w).__name__
    if kind == "Int8Params" and w.dtype == torch.int8:
        return "bnb-8bit"
    if kind == "Params4bit" and getattr(w, "bnb_quantized", False):
        return "bnb-4bit"
    if type(w).__module__.startswith("torchao") and kind == "Int8Tensor" and getattr(w, "act_quant_kwargs", None) is None:
        return "torchao-int8"
    return None


class QuantizedLinear(Linear):
    """TeRA next to a quantized ``Linear``: ``y = base(x) + ΔW x`` (see the module doc)."""

    _dense_base = False

    def __init__(self, base_layer: nn.Module, adapter_name: str, spec, bank, config, **kwargs) -> None:
        self.quantization = quantization_of(base_layer)
        if self.quantization is None:
            raise TypeError(
                f"QuantizedLinear takes a {', '.join(KINDS)} layer, got {type(base_layer).__name__} with a "
                f"{type(getattr(base_layer, 'weight', None)).__name__} weight"
            )
        self.merge_errors: dict[str, float] = {}
        super().__init__(base_layer, adapter_name, spec, bank, config, **kwargs)

    def dequantized_weight(self) -> torch.Tensor:
        """The base weight as the layer computes with it, in float32, ``(d_out, d_in)``."""
        base = self.get_base_layer()
        if self.quantization == "torchao-int8":
            return base.weight.dequantize().float()
        from peft.utils.integrations import dequantize_bnb_weight

        state = getattr(base, "state", None)
        return dequantize_bnb_weight(base.weight, state).float()

    def _requantize(self, weight: torch.Tensor) -> None:
        base = self.get_base_layer()
        old = base.weight
        if self.quantization == "torchao-int8":
            from torchao.quantization import Int8WeightOnlyConfig, quantize_

            base.weight = nn.Parameter(weight.to(old.dtype), requires_grad=False)
            quantize_(base, Int8WeightOnlyConfig())
            return
        import bitsandbytes as bnb

        if self.quantization == "bnb-8bit":
            base.weight = bnb.nn.Int8Params(
                weight.to("cpu"), requires_grad=False, has_fp16_weights=old.has_fp16_weights
            ).to(old.device)
            base.state.reset_grads()
            base.state.SCB = base.weight.SCB
            return
        kwargs = {k: v for k, v in old.__dict__.items() if not k.startswith("_") and k != "data"}
        kwargs.update(bnb_quantized=False, requires_grad=False)
        base.weight = bnb.nn.Params4bit(weight.to("cpu"), **kwargs).to(old.device)

    @torch.no_grad()
    def _fold(self, adapter_name: str, sign: int) -> None:
        """Dequantize, add ±ΔW, re-quantize (the inherited merge/unmerge call this); warns with the
        rounding error (see the module doc). A merge whose result is not finite changes nothing."""
        target = self.dequantized_weight() + sign * self.get_delta_weight(adapter_name).float()
        bad = non_finite(target) if sign > 0 else None
        if bad is not None:
            raise ValueError(
                f"refusing to merge {self._where(adapter_name)}: W0 + ΔW has {bad} "
                f"({self._bad_scales(adapter_name) or 'λ are finite'}); the base weight was not changed"
            )
        self._requantize(target)
        error = float((self.dequantized_weight() - target).abs().max())
        self.merge_errors[adapter_name] = error
        delta = float(self.get_delta_weight(adapter_name).abs().max())
        warnings.warn(
            f"{'merging' if sign > 0 else 'unmerging'} TeRA adapter {adapter_name!r} into a {self.quantization} layer "
            f"re-quantized W0 {'+' if sign > 0 else '−'} ΔW: max abs rounding error {error:.3g} "
            f"(max |ΔW| {delta:.3g}); outputs differ from the unmerged model by about that much"
        )

    def __repr__(self) -> str:
        return f"{super().__repr__()[:-1]}  quantization={self.quantization!r}\n)"
