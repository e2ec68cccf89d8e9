"""The model-level check of :func:`~tera_tn.peft.export_lora`: the model's output with the exported
LoRA against the TeRA model's, on a batch of the caller's inputs.

The LoRA side is computed the way a LoRA server computes it: forward hooks make every TeRA layer
return ``base(x) + B A x`` from the written (rounded) ``A`` and ``B`` and discard the TeRA result.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Optional

import torch
import torch.nn.functional as F

from .layer import TeraLayer

__all__ = ["check_inputs_batch", "check_runnable", "output_errors"]


def check_inputs_batch(inputs) -> None:
    """Refuse ``check_inputs`` other than None, a tensor of input ids or a dict of tensors."""
    if inputs is None:
        return
    if isinstance(inputs, torch.Tensor):
        ok = inputs.dim() >= 1
    else:
        ok = isinstance(inputs, Mapping) and any(isinstance(v, torch.Tensor) and v.dim() >= 1 for v in inputs.values())
    if not ok:
        raise ValueError(
            "check_inputs must be a batch of model inputs: a dict of tensors (e.g. a tokenizer's output) or a "
            f"tensor of input ids, with the batch as the first dimension; got {type(inputs).__name__}"
        )


def _output(out) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    for key in ("logits", "last_hidden_state"):
        value = getattr(out, key, None)
        if isinstance(value, torch.Tensor):
            return value
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise TypeError(
        f"cannot compare model outputs of type {type(out).__name__}: expected a tensor, an output with "
        "logits or last_hidden_state, or a tuple starting with a tensor"
    )


def _run(model, inputs) -> torch.Tensor:
    out = model(**inputs) if isinstance(inputs, Mapping) else model(inputs)
    return _output(out).detach().to(torch.float64)


def _replacing(layers: list[tuple[str, TeraLayer]], lora: dict[str, tuple[torch.Tensor, torch.Tensor]]):
    """Forward hooks that make every TeRA layer return ``base(x)`` (+ ``B A x`` for those in ``lora``),
    as a LoRA server computes it: the TeRA forward's own result is discarded."""

    def hook(name):
        def replace(module, args, kwargs, output):
            x, rest = args[0], args[1:]
            kw = {k: v for k, v in kwargs.items() if k != "adapter_names"}
            y = module.get_base_layer()(x, *rest, **kw)
            if name in lora:
                # The written (rounded) A and B, computed in the model's dtype: PEFT upcasts bf16
                # adapter weights of a float32 model on load, vLLM casts them to the model's dtype.
                a, b = (t.to(device=x.device, dtype=x.dtype) for t in lora[name])
                y = y + F.linear(F.linear(x, a), b).to(y.dtype)
            return y

        return replace

    return [m.register_forward_hook(hook(n), with_kwargs=True) for n, m in layers]


def check_runnable(tera) -> None:
    """``check_inputs`` runs the TeRA model and the base model: no adapter merged, none disabled."""
    layers = [(n, m) for n, m in tera.model.named_modules() if isinstance(m, TeraLayer)]
    merged = [(n, m.merged_adapters) for n, m in layers if m.merged]
    if merged:
        raise ValueError(
            f"check_inputs compares outputs on the unmerged base, but {merged[0][0]} has adapters "
            f"{merged[0][1]} merged into its weight; call model.unmerge_adapter() first"
        )
    disabled = [n for n, m in layers if m.disable_adapters]
    if disabled:
        raise ValueError(f"check_inputs needs the adapters enabled, but they are disabled (e.g. in {disabled[0]})")


@torch.no_grad()
def output_errors(model, tera, adapter_name: str, lora: dict, inputs) -> tuple[float, Optional[float]]:
    """``(‖y_LoRA − y_TeRA‖ / ‖y_TeRA‖, ‖y_LoRA − y_TeRA‖ / ‖y_TeRA − y_base‖ or None)`` on ``inputs``,
    ``lora`` the written ``{layer name: (A, B)}``; the model runs three times in eval mode."""
    layers = [(n, m) for n, m in tera.model.named_modules() if isinstance(m, TeraLayer)]
    tensors = inputs.values() if isinstance(inputs, Mapping) else [inputs]
    batch = next(int(t.shape[0]) for t in tensors if isinstance(t, torch.Tensor) and t.dim() >= 1)
    modes = {m: m.training for m in model.modules()}
    model.eval()  # dropout off; TeRA refuses adapter_names in training mode
    try:
        # The TeRA model: every row through adapter_name (own or stored), the way it is served.
        with tera._enable_peft_forward_hooks(adapter_names=[adapter_name] * batch):
            ref = _run(model, inputs)
        results = []
        for exported in (lora, {}):
            handles = _replacing(layers, exported)
            try:
                results.append(_run(model, inputs))
            finally:
                for h in handles:
                    h.remove()
    finally:
        for m, training in modes.items():
            m.train(training)
    with_lora, base = results
    diff = float(torch.linalg.vector_norm(with_lora - ref))
    ref_norm = float(torch.linalg.vector_norm(ref))
    change = float(torch.linalg.vector_norm(ref - base))
    output_error = diff / ref_norm if ref_norm > 0 else diff
    return output_error, (diff / change if change > 0 else None)
