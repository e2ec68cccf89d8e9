"""`TeraLayer` / `Linear`: PEFT tuner layers holding one TeRA update per named adapter.

The math is :mod:`tera_tn.torch`'s: frozen operands come from a shared
:class:`~tera_tn.torch.FactorBank` (one per seed/init/dtype, one factor set per spec), the forward
runs the memory-lean :func:`~tera_tn.torch.tera_linear` autograd Function (one fused GEMM
``x (W0 + ΔW)ᵀ`` for a single active adapter on an ``nn.Linear``) and merging uses
:func:`~tera_tn.torch.autograd.merged_weight`. This module only adds PEFT's per-adapter
bookkeeping (several adapters, enable/disable, merge/unmerge, GPT-2 ``Conv1D``) and the
mixed-adapter forward of ``model(..., adapter_names=[...])`` (one adapter per batch row, computed
by :func:`~tera_tn.torch.autograd.mixed_delta`).
"""

from __future__ import annotations

import math
import warnings
from typing import Optional

import numpy as np
import torch
from torch import nn

from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge

from ..factors import init_scales
from ..spec import TeRASpec
from ..torch.autograd import check_input, compute_dtype, merged_weight, mixed_delta, non_finite, tera_linear
from ..torch.bank import FactorBank
from ..torch.layer import check_base_weight
from ..torch.planning import layer_plan

__all__ = ["TeraLayer", "Linear"]

# PEFT's name for "no adapter on this row" in ``adapter_names``.
BASE_ROW = "__base__"


def _conv1d_type():
    try:
        from transformers.pytorch_utils import Conv1D

        return Conv1D
    except ImportError:  # pragma: no cover - transformers is part of the extra
        return ()


class TeraLayer(BaseTunerLayer):
    """Per-adapter TeRA state of one layer.

    Attributes (dicts keyed by adapter name):
        tera_lambda: the trainable vectors ``λ_1..λ_N`` concatenated (fp32, ``spec.num_trainable``).
        tera_bank: the shared :class:`FactorBank` holding the frozen factors of ``tera_spec``.
        tera_spec, tera_alpha, tera_strategy, tera_dropout: the adapter's spec, α, strategy, dropout.
        tera_check_finite: whether forward checks that the adapter's λ are finite.
    """

    adapter_layer_names = ("tera_lambda",)
    # False for quantized bases (tera_tn.peft.quantized): their weight is packed, so the base
    # computes its own output and ΔW x is added next to it instead of fusing W0 + ΔW.
    _dense_base = True
    other_param_names = ("tera_bank", "tera_dropout", "tera_spec", "tera_alpha", "tera_strategy", "tera_check_finite")

    def __init__(self, base_layer: nn.Module, **kwargs) -> None:
        self.base_layer = base_layer
        self.tera_lambda = nn.ParameterDict({})
        self.tera_bank = nn.ModuleDict({})
        self.tera_dropout = nn.ModuleDict({})
        self.tera_spec: dict[str, TeRASpec] = {}
        self.tera_alpha: dict[str, float] = {}
        self.tera_strategy: dict[str, str] = {}
        self.tera_check_finite: dict[str, bool] = {}
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
        elif isinstance(base, _conv1d_type()):
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
        if spec.shape != (self.out_features, self.in_features):
            raise ValueError(
                f"spec is for a {spec.d_out}×{spec.d_in} weight but the layer is {self.out_features}×{self.in_features}"
            )
        bank.add(spec)
        self.tera_spec[adapter_name] = spec
        self.tera_alpha[adapter_name] = float(config.alpha)
        self.tera_strategy[adapter_name] = config.strategy
        self.tera_check_finite[adapter_name] = bool(config.check_finite)
        self.tera_bank[adapter_name] = bank
        p = config.tera_dropout
        self.tera_dropout[adapter_name] = nn.Dropout(p) if p > 0 else nn.Identity()
        scales = init_scales(
            spec,
            config.scale_init,
            zero_mode=config.zero_mode,
            seed=config.seed if config.scale_init == "random" else None,
            value=config.scale_init_value,
        )
        flat = np.concatenate([np.asarray(s, dtype=np.float64) for s in scales])
        weight = self.get_base_layer().weight
        device = weight.device if weight.device.type != "meta" else None
        self.tera_lambda[adapter_name] = nn.Parameter(torch.as_tensor(flat, dtype=torch.float32, device=device))
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

    # --- helpers -----------------------------------------------------------------------------
    def scales(self, adapter_name: str) -> list[torch.Tensor]:
        """``λ_1..λ_N`` of ``adapter_name`` as views of the trainable parameter."""
        spec = self.tera_spec[adapter_name]
        return list(torch.split(self.tera_lambda[adapter_name], list(spec.scale_sizes)))

    def network(self, adapter_name: str, dtype: torch.dtype, device: torch.device):
        return self.tera_bank[adapter_name].network(self.tera_spec[adapter_name], dtype, device)

    def _check_scales(self, adapter_name: str) -> None:
        bad = non_finite(self.tera_lambda[adapter_name].detach())
        if bad is not None:
            raise FloatingPointError(
                f"TeRA adapter {adapter_name!r} of a {self.out_features}×{self.in_features} layer has non-finite λ "
                f"({bad}); its output would be NaN/Inf"
            )

    def _pick_strategy(self, adapter_name: str, n: int, x: torch.Tensor, training: bool) -> str:
        strategy = self.tera_strategy[adapter_name]
        if strategy != "auto":
            return strategy
        dtype = str(x.dtype).removeprefix("torch.")
        return layer_plan(self.tera_spec[adapter_name], n, training=training, device=x.device.type, dtype=dtype).strategy

    @torch.no_grad()
    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """``ΔW`` of ``adapter_name`` laid out like the base weight (transposed for ``Conv1D``)."""
        w0 = self.get_base_layer().weight
        work = torch.promote_types(w0.dtype, torch.float32)
        lams = [lam.to(device=w0.device, dtype=work) for lam in self.scales(adapter_name)]
        dw = merged_weight(self.network(adapter_name, work, w0.device), lams, self.tera_alpha[adapter_name], None)
        return (dw.T if self.fan_in_fan_out else dw).to(w0.dtype if w0.is_floating_point() else work)

    # --- mixed-adapter batches -----------------------------------------------------------------
    def _mixed_plan(self, adapter_names, device: torch.device) -> list:
        """``[(group, used, batch_rows, which)]``: the rows of each group of adapters that share one
        frozen network (same bank and spec), the adapters it uses and which of them each row takes.

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
                group, ref = (id(self.tera_bank[name]), self.tera_spec[name]), name
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
        result = self.get_base_layer()(x, *args, **kwargs)
        dt = compute_dtype(x)
        for group, used, rows, which in self._mixed_plan(adapter_names, x.device):
            if group == "store":
                store, offset, spec, bank = self._tera_store_slot
                table, alphas = store._rows(used, offset, spec.num_trainable)
            else:
                spec, bank = self.tera_spec[used[0]], self.tera_bank[used[0]]
                table = torch.stack([self.tera_lambda[a] for a in used])
                alphas = torch.tensor([self.tera_alpha[a] for a in used])
            every_row = len(rows) == len(x)
            xs = x if every_row else x.index_select(0, rows)
            per_row = math.prod(xs.shape[1:-1])
            tokens = which.repeat_interleave(per_row) if per_row != 1 else which
            delta = mixed_delta(
                bank.network(spec, dt, x.device), table, alphas, tokens, xs.reshape(-1, self.in_features).to(dt)
            ).reshape(xs.shape[:-1] + (self.out_features,)).to(result.dtype)
            result = result + delta if every_row else result.index_add(0, rows, delta)
        return result


class Linear(nn.Module, TeraLayer):
    """TeRA on an ``nn.Linear`` (or a GPT-2 ``Conv1D`` with ``fan_in_fan_out=True``)."""

    def __init__(self, base_layer: nn.Module, adapter_name: str, spec: TeRASpec, bank: FactorBank, config, **kwargs) -> None:
        super().__init__()
        TeraLayer.__init__(self, base_layer, **kwargs)
        is_conv1d = isinstance(self.get_base_layer(), _conv1d_type())
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
        """Fold ``ΔW`` of the given (default: active) adapters into the base weight."""
        adapter_names = check_adapters_to_merge(self, adapter_names)
        if not adapter_names:
            return
        base = self.get_base_layer()
        for name in adapter_names:
            if name not in self.tera_lambda:
                continue
            delta = self.get_delta_weight(name)
            if safe_merge:
                merged = base.weight.data + delta
                if not torch.isfinite(merged).all():
                    raise ValueError(f"NaNs detected in the merged weights. The adapter {name} seems to be broken")
                base.weight.data = merged
            else:
                base.weight.data += delta
            self.merged_adapters.append(name)

    def unmerge(self) -> None:
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.")
            return
        base = self.get_base_layer()
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            if name in self.tera_lambda:
                base.weight.data -= self.get_delta_weight(name)

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
        if self.merged:
            return base(x, *args, **kwargs)
        active = [a for a in self.active_adapters if a in self.tera_lambda]
        if not active:
            return base(x, *args, **kwargs)
        for a in active:
            if self.tera_lambda[a].is_meta and not x.is_meta:
                # accelerate's offload hooks restore a module's tensors only when that module is
                # called; the λ ParameterDict never is unless the whole layer is preloaded.
                raise RuntimeError(
                    f"TeRA adapter {a!r} of a {self.out_features}×{self.in_features} layer has its λ on the meta device "
                    f"while the input is on {x.device} (offloaded by accelerate?): pass "
                    f"preload_module_classes=[{type(self).__name__!r}] to accelerate's dispatch_model / cpu_offload"
                )
            if self.tera_check_finite.get(a):
                self._check_scales(a)
        lam_params = [self.tera_lambda[a] for a in active]
        needs_grad = torch.is_grad_enabled() and (
            x.requires_grad or base.weight.requires_grad or any(p.requires_grad for p in lam_params)
        )
        n = max(1, math.prod(x.shape[:-1]))
        dropout_active = any(self.training and isinstance(self.tera_dropout[a], nn.Dropout) for a in active)
        if len(active) == 1 and self._dense_base and not self.fan_in_fan_out and not dropout_active and not args and not kwargs:
            # One fused GEMM x (W0 + ΔW)ᵀ (materialize) or base GEMM + factored ΔW x.
            a = active[0]
            strategy = self._pick_strategy(a, n, x, needs_grad)
            net = self.network(a, compute_dtype(x), x.device)
            return tera_linear(x, base.weight, base.bias, net, self.scales(a), self.tera_alpha[a], strategy)
        result = base(x, *args, **kwargs)
        for a in active:
            xa = self.tera_dropout[a](x).to(result.dtype)
            strategy = self._pick_strategy(a, n, xa, needs_grad)
            net = self.network(a, compute_dtype(xa), xa.device)
            delta = tera_linear(xa, None, None, net, self.scales(a), self.tera_alpha[a], strategy)
            result = result + delta
        return result

    def __repr__(self) -> str:
        return "tera." + super().__repr__()

    def extra_repr(self) -> str:
        specs = ", ".join(f"{a}: {s}" for a, s in self.tera_spec.items())
        return f"{specs}, fan_in_fan_out={self.fan_in_fan_out}"
