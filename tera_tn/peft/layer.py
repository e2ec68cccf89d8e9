"""`TeraLayer` / `Linear`: PEFT tuner layers holding one TeRA update per named adapter.

The layer is :class:`~tera_tn.torch.adapter.TeRAAdapters`, the implementation
:class:`tera_tn.torch.TeRALinear` runs too (λ layout, ΔW, merge/unmerge, strategy choice,
forward); frozen operands come from a shared :class:`~tera_tn.torch.bank.FactorBank` (one per
seed/init/dtype, one factor set per spec). This module only adds PEFT's per-adapter bookkeeping
(active adapters, enable/disable, GPT-2 ``Conv1D``) and the mixed-adapter forward of ``model(..., adapter_names=[...])`` (one adapter per batch row, computed
by :func:`~tera_tn.torch.autograd.mixed_delta`).
"""

from __future__ import annotations

import math
import warnings
from typing import Optional

import torch
from torch import nn

from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge

from ..core.spec import TeRASpec
from ..torch.adapter import TeRAAdapters
from ..torch.autograd import check_input, compute_dtype, merged_weight, tera_linear
from ..torch.bank import FactorBank
from ..torch.planning import layer_plan
from ..torch.layer import check_base_weight

__all__ = ["TeraLayer", "Linear"]

# PEFT's name for "no adapter on this row" in ``adapter_names``.
BASE_ROW = "__base__"


def conv1d_type():
    try:
        from transformers.pytorch_utils import Conv1D

        return Conv1D
    except ImportError:  # pragma: no cover - transformers is part of the extra
        return ()


class TeraLayer(BaseTunerLayer, TeRAAdapters):
    """Per-adapter TeRA state of one layer: :class:`~tera_tn.torch.adapter.TeRAAdapters` (the
    same λ layout, ΔW, merge and forward as :class:`tera_tn.torch.TeRALinear`) with PEFT's
    adapter bookkeeping; ``tera_bank`` holds each adapter's shared :class:`FactorBank`."""

    adapter_layer_names = ("tera_lambda",)
    other_param_names = (
        "tera_bank", "tera_dropout", "tera_spec", "tera_alpha", "tera_strategy", "tera_check_finite", "tera_cache_delta",
    )

    def __init__(self, base_layer: nn.Module, **kwargs) -> None:
        self.base_layer = base_layer
        self._init_adapters()
        self.tera_bank = nn.ModuleDict({})
        self._disable_adapters = False
        self.merged_adapters: list[str] = []
        # (store, offset, spec, bank) when a tera_tn.peft.AdapterStore serves this layer.
        self._tera_store_slot = None
        self._tera_mixed_plan: Optional[tuple] = None
        base = self.get_base_layer()
        if self._dense_base:
            check_base_weight(base, "base_layer")
        if isinstance(base, nn.Linear):
            in_features, out_features = base.in_features, base.out_features
        elif isinstance(base, conv1d_type()):
            in_features, out_features = base.weight.shape
        else:
            raise TypeError(
                f"TeRA adapts torch.nn.Linear and transformers' Conv1D layers, got {type(base).__name__}"
            )
        self.in_features = in_features
        self.out_features = out_features
        self.kwargs = kwargs

    def update_layer(self, adapter_name: str, spec: TeRASpec, bank: FactorBank, config, inference_mode: bool = False) -> None:
        """Add adapter ``adapter_name`` with ``spec`` and factors from ``bank``."""
        weight = self.get_base_layer().weight
        self._add_adapter(
            adapter_name,
            spec,
            bank,
            config.layer_options(),
            scale_seed=config.seed,
            device=weight.device if weight.device.type != "meta" else None,
        )
        self.tera_bank[adapter_name] = bank
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters, inference_mode=inference_mode)

    def _move_adapter_to_device_of_base_layer(self, adapter_name: str, device=None) -> None:
        # λ are fp32 master weights whatever the base dtype (PEFT's default would cast them to it).
        # The bank is shared with layers that may sit on other devices, so it is never moved here:
        # forward asks it for the factors on the input's device.
        base = self.get_base_layer()
        target = device if device is not None else getattr(base.weight, "device", None)
        if target is None or target.type == "meta":
            return
        if adapter_name in self.tera_lambda and self.tera_lambda[adapter_name].device != target:
            lam = self.tera_lambda[adapter_name]
            self.tera_lambda[adapter_name] = nn.Parameter(lam.data.to(target), requires_grad=lam.requires_grad)
        if adapter_name in self.tera_dropout:
            self.tera_dropout[adapter_name].to(target)

    def network(self, adapter_name: str, dtype: torch.dtype, device: torch.device):
        return self._network(adapter_name, dtype, device)

    def delete_adapter(self, adapter_name: str) -> None:
        super().delete_adapter(adapter_name)
        self._tera_cache.pop(adapter_name, None)  # its cached W0 + ΔW is a d_out × d_in tensor
        self._drop_bases(adapter_name)

    # --- ΔW of any adapter this layer serves, and PEFT's LoRA conversion -----------------------
    def adapter_operands(self, adapter_name: str) -> tuple[TeRASpec, FactorBank, list[torch.Tensor], float]:
        """``(spec, bank, [λ_1..λ_N], α)`` of ``adapter_name``: one of the layer's own adapters or
        one served by the model's :class:`~tera_tn.peft.AdapterStore`.

        The λ are float32 views (lengths ``spec.scale_sizes``) of the adapter's trainable vector or
        of its row of the store's table. Raises ``KeyError`` naming the adapter and the ones the
        layer has when it serves no adapter of that name."""
        if adapter_name in self.tera_lambda:
            return (self.tera_spec[adapter_name], self.tera_bank[adapter_name], self.scales(adapter_name),
                    self.tera_alpha[adapter_name])
        slot = self._tera_store_slot
        if slot is not None and adapter_name in slot[0]:
            store, offset, spec, bank = slot
            row = store._rows_of[adapter_name]
            lam = store._table[row, offset : offset + spec.num_trainable]
            return spec, bank, list(torch.split(lam, list(spec.scale_sizes))), float(store._alphas[row])
        stored = "" if slot is None else f" and its AdapterStore holds {slot[0]._few()}"
        raise KeyError(
            f"this {self.out_features}×{self.in_features} TeRA layer has no adapter {adapter_name!r}: it carries "
            f"{sorted(self.tera_lambda) or 'none'}{stored} (PEFT's convert_to_lora asks every TeRA layer of the "
            "model; tera_tn.peft.export_lora exports an adapter that sits on some layers only)"
        )

    @torch.no_grad()
    def get_delta_weight(self, adapter_name: str = "default", dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """``ΔW`` of ``adapter_name`` (α folded in), laid out like the base weight (``(d_in, d_out)``
        for a GPT-2 ``Conv1D``, else ``(d_out, d_in)``), detached, in ``dtype`` (default: W0's dtype,
        float32 for a packed quantized W0). Adapters served by an AdapterStore are included; an
        adapter the layer does not serve raises ``KeyError`` (see :meth:`adapter_operands`)."""
        if adapter_name in self.tera_lambda:
            return super().get_delta_weight(adapter_name, dtype)
        spec, bank, lams, alpha = self.adapter_operands(adapter_name)
        w0 = self.get_base_layer().weight
        out_dtype = dtype or (w0.dtype if w0.is_floating_point() else torch.float32)
        work = torch.promote_types(out_dtype, torch.float32)
        net = bank.network(spec, work, w0.device)
        dw = merged_weight(net, [lam.to(device=w0.device, dtype=work) for lam in lams], alpha, None)
        return (dw.T if self.fan_in_fan_out else dw).to(out_dtype)

    def supports_lora_conversion(self, adapter_name: str = "default") -> bool:
        """True: TeRA is additive (``W0 + ΔW``), so PEFT's ``convert_to_lora`` / ``save_as_lora``
        convert it by a truncated SVD of :meth:`get_delta_weight`.

        PEFT asks every tuner layer of the model (with no argument when it asks the model). A layer
        that does not carry the adapter still answers True and raises ``KeyError`` naming it when
        PEFT then asks for its ΔW. An adapter served by an :class:`~tera_tn.peft.AdapterStore` is
        refused with a ``ValueError`` naming it: it has no PEFT config, and for an int rank PEFT then
        writes ``lora_alpha=8`` with ``r=rank`` (scaling ``8/r`` instead of 1, PEFT 0.21).
        :func:`tera_tn.peft.export_lora` exports stored adapters, adapters on some layers only, and
        mixed shapes at full rank."""
        slot = self._tera_store_slot
        if adapter_name not in self.tera_lambda and slot is not None and adapter_name in slot[0]:
            raise ValueError(
                f"adapter {adapter_name!r} is served from an AdapterStore and has no PEFT config, so PEFT's "
                "convert_to_lora would scale its LoRA wrongly (lora_alpha=8 for an int rank); export it with "
                f"tera_tn.peft.export_lora(model, folder, adapter_name={adapter_name!r})"
            )
        return True

    # --- mixed-adapter batches -----------------------------------------------------------------
    def _mixed_plan(self, adapter_names, device: torch.device) -> list:
        """``[(group, used, batch_rows, which)]``: the rows of each group of adapters that share one
        frozen network (same bank and spec, and the plain network or not), the adapters it uses and
        which of them each row takes.

        Rows named ``"__base__"``, or an adapter this layer does not carry, are in no group (PEFT's
        convention). Kept for the last ``adapter_names`` seen, so ``generate`` plans once per layer.
        """
        slot = self._tera_store_slot
        key = (tuple(adapter_names), device, None if slot is None else (id(slot[0]), slot[0].version))
        if self._tera_mixed_plan is not None and self._tera_mixed_plan[0] == key:
            return self._tera_mixed_plan[1]
        groups: dict = {}
        for i, name in enumerate(adapter_names):
            if name == BASE_ROW:
                continue
            if name in self.tera_lambda:
                group, ref = (id(self.tera_bank[name]), self.tera_spec[name], self._plain(name)), name
            elif slot is not None and name in slot[0]:
                group, ref = "store", slot[0]._rows_of[name]
            else:
                continue
            used, pos, rows, which = groups.setdefault(group, ([], {}, [], []))
            if ref not in pos:
                pos[ref] = len(used)
                used.append(ref)
            rows.append(i)
            which.append(pos[ref])
        plan = []
        for group, (used, _, rows, which) in groups.items():
            if group == "store":
                used = torch.tensor(used, device=slot[0].device)
            plan.append((group, used, torch.tensor(rows, device=device), torch.tensor(which, device=device)))
        self._tera_mixed_plan = (key, plan)
        return plan

    def _mixed_forward(self, x: torch.Tensor, adapter_names, *args, **kwargs) -> torch.Tensor:
        if len(adapter_names) != len(x):
            raise ValueError(
                f"adapter_names has {len(adapter_names)} names but the input has {len(x)} rows "
                f"(shape {tuple(x.shape)}); pass one adapter name (or '{BASE_ROW}') per row"
            )
        if self.merged:
            raise ValueError(
                f"cannot pass adapter_names while adapters {self.merged_adapters} are merged into the base "
                "weights; call unmerge_adapter() first"
            )
        plan = self._mixed_plan(adapter_names, x.device)
        if len(plan) == 1 and len(plan[0][1]) == 1 and len(plan[0][2]) == len(x):
            # Every row takes one adapter (one tenant, or the store's active adapter): the
            # single-adapter path, whose planner may fold ΔW into the base GEMM.
            single = self._one_adapter_forward(x, plan[0][0], plan[0][1], *args, **kwargs)
            if single is not None:
                return single
        result = self.get_base_layer()(x, *args, **kwargs)
        for group, used, rows, which in plan:
            every_row = len(rows) == len(x)
            xs = x if every_row else x.index_select(0, rows)
            if group != "store" and not group[2]:
                delta = self._per_adapter_rows(xs, used, which)
            else:
                if group == "store":
                    store, offset, spec, bank = self._tera_store_slot
                    table, alphas = store._rows(used, offset, spec.num_trainable)
                else:
                    spec, bank = self.tera_spec[used[0]], self.tera_bank[used[0]]
                    table = torch.stack([self.tera_lambda[a] for a in used])
                    alphas = torch.tensor([self.tera_alpha[a] for a in used])
                delta = self._rows_delta(xs, spec, bank, table, alphas, which)
            delta = delta.to(result.dtype)
            result = result + delta if every_row else result.index_add(0, rows, delta)
        return result

    def _one_adapter_forward(self, x: torch.Tensor, group, used, *args, **kwargs) -> Optional[torch.Tensor]:
        """The output with one adapter on every row (``used[0]``: a model adapter, or a row of the
        store), or None where only the mixed path serves a stored one (a quantized or transposed
        base, extra arguments)."""
        if group != "store":
            return self._adapters_forward(x, [used[0]], *args, **kwargs)
        if args or kwargs or not self._dense_base or self.fan_in_fan_out:
            return None
        store, offset, spec, bank = self._tera_store_slot
        table, alphas = store._rows(used, offset, spec.num_trainable)
        dt = compute_dtype(x)
        n = max(1, math.prod(x.shape[:-1]))
        strategy = layer_plan(spec, n, training=torch.is_grad_enabled() and x.requires_grad,
                              device=x.device.type, dtype=str(dt).removeprefix("torch.")).strategy
        base = self.get_base_layer()
        lams = torch.split(table[0].to(device=x.device, dtype=dt), list(spec.scale_sizes))
        return tera_linear(x, base.weight, base.bias, bank.network(spec, dt, x.device), lams, float(alphas[0]), strategy)


class Linear(nn.Module, TeraLayer):
    """TeRA on an ``nn.Linear`` (or a GPT-2 ``Conv1D`` with ``fan_in_fan_out=True``)."""

    def __init__(self, base_layer: nn.Module, adapter_name: str, spec: TeRASpec, bank: FactorBank, config, **kwargs) -> None:
        super().__init__()
        TeraLayer.__init__(self, base_layer, **kwargs)
        is_conv1d = isinstance(self.get_base_layer(), conv1d_type())
        if is_conv1d and not config.fan_in_fan_out:
            warnings.warn("fan_in_fan_out is False but the target module is `Conv1D`; setting fan_in_fan_out to True.")
            config.fan_in_fan_out = True
        elif not is_conv1d and config.fan_in_fan_out:
            warnings.warn("fan_in_fan_out is True but the target module is `nn.Linear`; setting fan_in_fan_out to False.")
            config.fan_in_fan_out = False
        self.fan_in_fan_out = is_conv1d
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, spec, bank, config)

    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        """Fold ``ΔW`` of the given (default: active) adapters into the base weight.

        A non-finite ΔW is always refused (``ValueError``, the base weight unchanged), so
        ``safe_merge`` adds nothing here; it is accepted for PEFT's signature."""
        adapter_names = check_adapters_to_merge(self, adapter_names)
        for name in adapter_names:
            if name in self.tera_lambda:
                self._fold(name, +1)
                self.merged_adapters.append(name)

    def unmerge(self) -> None:
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.")
            return
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            if name in self.tera_lambda:
                self._fold(name, -1)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        check_input(x, self.in_features, f"TeRA layer ({self.out_features}×{self.in_features})")
        adapter_names = kwargs.pop("adapter_names", None)
        base = self.get_base_layer()
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return base(x, *args, **kwargs)
        if adapter_names is None and self._tera_store_slot is not None and self._tera_store_slot[0].active is not None:
            adapter_names = [self._tera_store_slot[0].active] * len(x)
        if adapter_names is not None:
            return self._mixed_forward(x, adapter_names, *args, **kwargs)
        active = [a for a in self.active_adapters if a in self.tera_lambda]
        if self.merged or not active:
            return base(x, *args, **kwargs)
        return self._adapters_forward(x, active, *args, **kwargs)

    def __repr__(self) -> str:
        return "tera." + super().__repr__()

    def extra_repr(self) -> str:
        specs = ", ".join(f"{a}: {s}" for a, s in self.tera_spec.items())
        return f"{specs}, fan_in_fan_out={self.fan_in_fan_out}"
