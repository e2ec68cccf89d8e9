"""The signature that identifies a saved PEFT TeRA adapter, as a pure value.

A PEFT adapter file stores it beside the λ vectors (a ``uint8`` tensor of its compact JSON):
the seed, the factor recipe, α and every adapted layer's shape and spec, with layers that share a
spec numbered as one frozen-factor group. Loading compares it with the model's own signature.
Built here from specs alone, so the report can size an adapter file exactly without torch.
"""

from __future__ import annotations

import json
from typing import Iterable, Mapping

from .factors import factor_recipe
from .spec import TeRASpec

__all__ = ["SIGNATURE_FORMAT", "adapter_signature", "signature_bytes", "spec_groups"]

SIGNATURE_FORMAT = 1


def spec_groups(specs: Iterable[TeRASpec]) -> dict[TeRASpec, str]:
    """``{spec: "g<i>"}`` in first-use order: layers sharing a spec share one frozen-factor group."""
    groups: dict[TeRASpec, str] = {}
    for spec in specs:
        groups.setdefault(spec, f"g{len(groups)}")
    return groups


def adapter_signature(
    layers: Mapping[str, tuple[TeRASpec, bool]],
    *,
    seed: int,
    factor_init: str,
    factor_dtype: str,
    alpha: float,
    alpha_scaling: str = "constant",
    w0_norms: Mapping[str, float] | None = None,
) -> dict:
    """``layers`` maps each adapted module's qualified name to ``(spec, fan_in_fan_out)``, in the
    model's module order (the first use of a spec names its group ``g0``, ``g1``, …). With
    ``alpha_scaling="w0_relative"`` each layer's α came from its base weight: ``w0_norms`` gives
    every layer's ``‖W0‖_F``, recorded so that loading refuses another ``W0``; signatures of
    constant-α adapters carry neither field (they read as before)."""
    groups = spec_groups(spec for spec, _ in layers.values())
    entries = {}
    for name, (spec, fan_in_fan_out) in layers.items():
        group = groups[spec]
        entry = spec.to_dict()
        entry.pop("d_out")
        entry.pop("d_in")
        entries[name] = {"shape": [spec.d_out, spec.d_in], **entry, "fan_in_fan_out": bool(fan_in_fan_out),
                         "group": group}
        if alpha_scaling != "constant":
            entries[name]["w0_norm"] = float((w0_norms or {})[name])
    out = {
        "format": SIGNATURE_FORMAT,
        "seed": seed,
        **factor_recipe(factor_init, factor_dtype),
        "alpha": float(alpha),
        "layers": entries,
    }
    if alpha_scaling != "constant":
        out["alpha_scaling"] = alpha_scaling
    return out


def signature_bytes(signature: Mapping) -> bytes:
    """The bytes an adapter file stores: compact, key-sorted JSON."""
    return json.dumps(signature, sort_keys=True).encode()
