"""Model-level operations: inject TeRA layers, summarize, merge into a plain model."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import torch
from torch import nn

from .adapter import DEFAULT_ADAPTER
from .bank import FactorBank
from .config import TeRALayersConfig
from .layer import TeRALinear, check_base_weight

__all__ = [
    "add_tera",
    "tera_layers",
    "tera_summary",
    "merge_and_unload",
    "TeRASummary",
    "LayerSummary",
]


class _Counts:
    """``total`` of a summary's ``trainable`` and ``frozen`` parameter counts."""

    @property
    def total(self) -> int:
        return self.trainable + self.frozen


@dataclass(frozen=True)
class LayerSummary(_Counts):
    """Parameter counts of one adapted layer (frozen = its base weight and bias)."""

    name: str
    shape: tuple[int, int]
    spec: str
    trainable: int
    frozen: int


@dataclass(frozen=True)
class TeRASummary(_Counts):
    """What :func:`add_tera` did; ``str()`` gives a table.

    Attributes:
        layers: one :class:`LayerSummary` per adapted layer.
        trainable, frozen, total: parameter counts of the whole model.
        shared_factors: frozen factor numbers, stored once per shape group (neither parameters
            nor buffers, and not in ``state_dict``: regenerated from the seed).
        groups: number of shape groups.
    """

    layers: tuple[LayerSummary, ...]
    trainable: int
    frozen: int
    shared_factors: int
    groups: int

    def __str__(self) -> str:
        width = max([len("layer")] + [len(layer.name) for layer in self.layers])
        lines = [f"{'layer':<{width}}  {'shape':>11}  {'trainable':>10}  {'frozen':>12}  {'total':>12}"]
        for layer in self.layers:
            shape = f"{layer.shape[0]}×{layer.shape[1]}"
            lines.append(f"{layer.name:<{width}}  {shape:>11}  {layer.trainable:>10,}  {layer.frozen:>12,}  {layer.total:>12,}")
        pct = 100.0 * self.trainable / max(self.total, 1)
        lines.append(
            f"model: trainable {self.trainable:,} / total {self.total:,} ({pct:.4f}%), frozen {self.frozen:,}; "
            f"shared frozen factors {self.shared_factors:,} in {self.groups} shape group(s)"
        )
        return "\n".join(lines)


def tera_layers(model: nn.Module) -> Iterator[tuple[str, TeRALinear]]:
    """``(qualified name, layer)`` for every :class:`TeRALinear` in ``model``."""
    for name, module in model.named_modules():
        if isinstance(module, TeRALinear):
            yield name, module


def place_bank(bank: FactorBank, linears: list[nn.Linear]) -> FactorBank:
    """``bank`` moved next to the first real (non-meta) weight of ``linears``; layers elsewhere get
    copies on their devices from the bank's cache."""
    first = next((m.weight.device for m in linears if m.weight.device.type != "meta"), None)
    return bank if first is None else bank.to(first)


def install_layer(model: nn.Module, name: str, layer: TeRALinear) -> None:
    """Put ``layer`` in place of the module called ``name``."""
    layer._name = name
    _set_child(model, name, layer)


def _set_child(model: nn.Module, name: str, child: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, attr, child)


def add_tera(model: nn.Module, config: TeRALayersConfig) -> TeRASummary:
    """Replace the targeted ``nn.Linear`` layers of ``model`` by :class:`TeRALinear`, in place.

    Every parameter other than the λ vectors is frozen (``requires_grad=False``). All layers
    share one :class:`FactorBank` (one factor set per spec). Returns a :class:`TeRASummary`.

    Raises:
        ValueError: when ``model`` already has TeRA layers or no Linear matches ``config``.
        TypeError: when ``config`` is not a :class:`TeRALayersConfig`, or a targeted layer is quantized
            (its weight is not a plain floating-point tensor). Nothing is changed then.
    """
    if not isinstance(config, TeRALayersConfig):
        kind = f"{type(config).__module__}.{type(config).__qualname__}"
        hint = (
            " — that is the PEFT API's config: use it with peft.get_peft_model(model, config), or build a "
            "tera_tn.torch.TeRALayersConfig(...) for add_tera"
            if type(config).__name__ == "TeraConfig"
            else ""
        )
        raise TypeError(f"add_tera takes a tera_tn.torch.TeRALayersConfig, got {kind}{hint}")
    existing = [name for name, _ in tera_layers(model)]
    if existing:
        raise ValueError(f"model already has TeRA layers ({', '.join(existing[:3])}...); add_tera runs once per model")
    linears = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    targets = [(name, m) for name, m in linears if config.matches(name)]
    if not targets:
        names = ", ".join(name for name, _ in linears[:8]) or "none"
        raise ValueError(f"target_modules={config.target_modules!r} matched no nn.Linear; the model's Linear layers: {names}")
    # Everything that can fail is checked before the model is touched.
    for name, linear in targets:
        check_base_weight(linear, name)
    specs = [config.spec_for(linear.out_features, linear.in_features) for _, linear in targets]
    for p in model.parameters():
        p.requires_grad_(False)
    bank = place_bank(FactorBank(config.seed, config.factor_init, config.factor_dtype), [m for _, m in targets])
    for (name, linear), spec in zip(targets, specs):
        install_layer(model, name, TeRALinear(linear, spec, bank=bank, **config.layer_options()))
    return tera_summary(model)


def tera_summary(model: nn.Module) -> TeRASummary:
    """Per-layer and overall parameter counts of a model with TeRA layers."""
    layers = []
    banks: dict[int, FactorBank] = {}
    for name, layer in tera_layers(model):
        base = layer.base_layer
        frozen = sum(p.numel() for p in base.parameters())
        trainable = sum(p.numel() for p in layer.tera_lambda.values() if p.requires_grad)
        layers.append(LayerSummary(name, layer.spec.shape, str(layer.spec), trainable, frozen))
        banks[id(layer.tera_bank)] = layer.tera_bank
    params = list(model.parameters())
    trainable = sum(p.numel() for p in params if p.requires_grad)
    frozen = sum(p.numel() for p in params if not p.requires_grad)
    shared = sum(t.numel() for bank in banks.values() for t in bank.iter_factors())
    groups = sum(len(bank.specs()) for bank in banks.values())
    return TeRASummary(tuple(layers), trainable, frozen, shared, groups)


@torch.no_grad()
def merge_and_unload(model: nn.Module) -> nn.Module:
    """Fold every ΔW into its base weight and put the plain ``nn.Linear`` back, in place.

    The result has no TeRA module, bank or λ left: inference costs exactly the base model.
    Returns ``model``.

    Raises:
        ValueError: when the model has no TeRA layer, or a layer's λ are not finite (checked for
            every layer before any weight is written, so the model is left as it was).
    """
    layers = list(tera_layers(model))
    if not layers:
        peft_hint = "; for a PEFT model call its own model.merge_and_unload()" if hasattr(model, "peft_config") else ""
        raise ValueError(f"model has no TeRA layers to merge (no TeRALinear found){peft_hint}")
    for name, layer in layers:
        bad = None if layer.merged else layer._bad_scales(DEFAULT_ADAPTER)
        if bad is not None:
            raise ValueError(f"refusing to merge TeRA layer {name!r}: {bad}; no layer was merged")
    for name, layer in layers:
        if not layer.merged:
            layer.merge()
        _set_child(model, name, layer.base_layer)
    return model
