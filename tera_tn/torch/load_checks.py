"""Checks of the tensors an adapter file brings, before anything is loaded: λ (finite, of the
layer's length, not so large that ΔW overflows the compute dtype, not swamping W0) and stored
frozen factors (equal to the ones the seed generates).

The one λ checker of every load path: ``tera_tn.torch.load_tera``, PEFT's ``from_pretrained`` /
``load_adapter`` and ``AdapterStore.add``.
"""

from __future__ import annotations

import math
from typing import Callable, Mapping, Optional, Union

import torch
from torch import nn

from ..core.spec import TeRASpec
from .autograd import FrozenNetwork, merged_weight
from .bank import FactorBank
from .frozen import layer_product

__all__ = ["DELTA_RATIO_WARN", "delta_bound", "lambda_problems", "layer_lambda_problems", "nonfinite_lambdas", "factor_diff"]


#: ``‖ΔW‖_F / ‖W0‖_F`` above which loading an adapter warns: a trained update is a correction to
#: W0, so one a thousand times larger is almost surely a damaged or mis-scaled file (finite, so
#: not refused: the model still runs, but its outputs are the adapter's, not the base model's).
DELTA_RATIO_WARN = 1e3


def _frozen_abs_max(net: FrozenNetwork) -> float:
    """``max|M|`` of the frozen network such that ``|ΔW| ≤ α·∏ max|λ_n|·max|M|`` entrywise.

    With the diagonals on the mode side (``"mode"``, ``"identity"``) ``ΔW = α diag(⊗λ_row) M
    diag(⊗λ_col)`` with ``M = G ×_n U_n``, so the bound is exact in its shape. With rank-side
    diagonals (``"rank"``, ``"both"``) the λ sit inside the sums, so ``M = |G| ×_n |U_n|`` (the
    triangle inequality). One ``d_out × d_in`` product per network, kept as a float on it.
    """
    found = net.__dict__.get("_tera_abs_max")
    if found is None:
        signed = net.spec.diag in ("mode", "identity")
        core = net.core if signed else net.core.abs()
        mats = [u if u is None or signed else u.abs() for u in net.factors]
        with torch.no_grad():
            # A "mode" network that served a forward already holds M (frozen_product); reuse it.
            product = net.__dict__.get("_frozen_product") if signed else None
            found = float((layer_product(core, mats) if product is None else product).abs().max())
        net.__dict__["_tera_abs_max"] = found  # a cache, not a field (FrozenNetwork is frozen)
    return found


def delta_bound(spec: TeRASpec, bank: FactorBank, lam: torch.Tensor, alpha: float) -> float:
    """A cheap upper bound on ``max|ΔW|`` of the concatenated λ ``lam`` (layout ``spec.scale_sizes``;
    ``diag="both"`` vectors are ``μ_n`` then ``λ_n``): ``|α|·∏ max|λ_n|·max|M|``
    (see :func:`_frozen_abs_max`), in float64 so that it does not overflow before it is compared."""
    parts = list(torch.split(lam.detach().reshape(-1), list(spec.scale_sizes)))
    if spec.diag == "both":
        parts = [q for p, k in zip(parts, spec.modes, strict=True) for q in (p[:k], p[k:])]
    bound = abs(float(alpha)) * _frozen_abs_max(bank.network(spec))
    for p in parts:
        bound *= float(p.abs().max()) if p.numel() else 0.0
    return bound


def lambda_problems(
    key: str,
    t: object,
    spec: Optional[TeRASpec] = None,
    *,
    bank: Optional[FactorBank] = None,
    alpha: float = 1.0,
    dtype: torch.dtype = torch.float32,
    base_norm: Union[float, Callable[[], Optional[float]], None] = None,
) -> tuple[list[str], list[str]]:
    """``(errors, warnings)`` for a λ tensor about to be loaded (``key`` names it in the lines).

    The one λ checker of every load path (``load_tera``, PEFT's ``from_pretrained`` /
    ``load_adapter`` and ``AdapterStore.add``). Errors: not a floating-point tensor; a shape other
    than ``(spec.num_trainable,)``; NaN or ±inf values; and "absurd" values, whose bound
    :func:`delta_bound` on ``|ΔW|`` exceeds the largest number of ``dtype`` (the layer's compute
    dtype), so that ΔW or the layer output would overflow to inf/NaN while the rest of the model
    computes on. Warnings: ``‖ΔW‖_F/‖W0‖_F > DELTA_RATIO_WARN`` (needs ``base_norm = ‖W0‖_F``, or
    a function returning it, called only past the checks above; ΔW is formed only when the bound
    says the ratio could be that large). Without ``spec`` only
    the dtype and finiteness are checked; without ``bank`` nothing that needs the factors.
    """
    if not isinstance(t, torch.Tensor) or not t.is_floating_point():
        kind = f"a {t.dtype} tensor" if isinstance(t, torch.Tensor) else f"a {type(t).__name__}"
        return [f"{key} is {kind}; expected a floating-point tensor of λ"], []
    if spec is not None and tuple(t.shape) != (spec.num_trainable,):
        return [f"{key} has shape {tuple(t.shape)}, expected ({spec.num_trainable},): the layer's λ_1..λ_N "
                f"of sizes {spec.scale_sizes} ({spec})"], []
    bad = int((~torch.isfinite(t)).sum())
    if bad:
        return [f"{key} has {bad} of {t.numel()} values NaN or infinite; expected finite numbers"], []
    if spec is None or bank is None:
        return [], []
    bound = delta_bound(spec, bank, t, alpha)
    limit = float(torch.finfo(dtype).max)
    if bound > limit:
        peak = float(t.detach().abs().max())
        return [f"{key} holds absurd λ (max |λ| {peak:.3g}): |ΔW| may reach α·∏ max|λ_n|·max|M| = {bound:.3g}, "
                f"beyond the largest {str(dtype).removeprefix('torch.')} ({limit:.3g}), so the layer would output "
                "inf/NaN; expected the λ of a trained adapter"], []
    if callable(base_norm):
        base_norm = base_norm()
    if base_norm is None or not base_norm > 0:
        return [], []
    if bound * math.sqrt(spec.d_out * spec.d_in) <= DELTA_RATIO_WARN * base_norm:
        return [], []  # ‖ΔW‖_F ≤ bound·√(d_out·d_in): the ratio cannot reach the threshold
    with torch.no_grad():
        net = bank.network(spec)
        lams = [p.to(device=net.core.device, dtype=net.core.dtype) for p in torch.split(t.reshape(-1), list(spec.scale_sizes))]
        norm = float(torch.linalg.vector_norm(merged_weight(net, lams, float(alpha), None), dtype=torch.float64))
    ratio = norm / base_norm
    if ratio > DELTA_RATIO_WARN:
        return [], [f"{key}: ‖ΔW‖/‖W0‖ = {ratio:.3g} (above {DELTA_RATIO_WARN:g}); this update swamps the base "
                    "weight, so the layer computes mostly ΔW x: expected a trained adapter's correction (is the "
                    "file damaged or its λ mis-scaled?)"]
    return [], []


def _base_norm(layer: nn.Module) -> Optional[float]:
    """``‖W0‖_F`` of a TeRA layer's base weight (dequantized for a quantized base), kept on the layer
    while the weight is unchanged: an AdapterStore checks every adapter it adds against it."""
    w = layer.get_base_layer().weight
    if w.is_meta:
        return None
    key = (w.data_ptr(), w._version)
    found = layer.__dict__.get("_tera_base_norm")
    if found is None or found[0] != key:
        dense = layer.dequantized_weight() if hasattr(layer, "dequantized_weight") else w
        found = (key, float(torch.linalg.vector_norm(dense.detach(), dtype=torch.float64)))
        layer.__dict__["_tera_base_norm"] = found
    return found[1]


def layer_lambda_problems(
    key: str, t: object, layer: nn.Module, spec: TeRASpec, bank: FactorBank, alpha: float, *, plain: bool = True
) -> tuple[list[str], list[str]]:
    """:func:`lambda_problems` for λ of ``spec`` meant for TeRA ``layer``: its compute dtype is its
    base weight's (float16 for a quantized base, the narrowest it computes in) and ``‖W0‖_F`` its
    base weight's. An adapter that is not the plain network (``plain=False``: multiplicative, W0's
    bases) does not have the ``ΔW`` the ratio warning measures, so it gets the finiteness and
    overflow checks only (the bound holds for W0's orthonormal bases and, divided by ``max|W0|``,
    for ``W0 ⊙ ΔW``)."""
    w = layer.get_base_layer().weight
    dtype = w.dtype if w.is_floating_point() else torch.float16
    base_norm = (lambda: _base_norm(layer)) if plain else None
    return lambda_problems(key, t, spec, bank=bank, alpha=alpha, dtype=dtype, base_norm=base_norm)


def nonfinite_lambdas(tensors: Mapping[str, torch.Tensor]) -> list[str]:
    """One line per λ tensor holding NaN or ±inf (or not floating point): :func:`lambda_problems`
    without a spec, for tensors whose shapes were checked already."""
    return [line for key, t in tensors.items() for line in lambda_problems(key, t)[0]]


def factor_diff(
    bank: FactorBank, spec: TeRASpec, group: str, stored: Callable[[str], Optional[torch.Tensor]]
) -> list[str]:
    """One line per frozen factor of ``spec`` that a checkpoint stores as ``<group>.<name>``
    (``stored`` returns it, or None) and that is missing or differs from the one ``bank``
    generates: both checkpoint formats verify stored factors with it."""
    out = []
    for name, current in bank.group_tensors(spec).items():
        key = f"{group}.{name}"
        t = stored(key)
        if t is None:
            out.append(f"stored factor {key} is missing from the checkpoint")
        elif not torch.equal(t.to(current.dtype).cpu(), current.detach().cpu()):
            out.append(f"stored factor {key} differs from the one generated from seed {bank.seed} "
                       f"({bank.factor_init}, {bank.dtype_name})")
    return out
