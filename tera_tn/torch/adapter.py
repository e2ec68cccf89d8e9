"""`TeRAAdapters`: the one implementation of a TeRA-adapted linear layer, shared by both APIs.

It holds any number of named adapters on one base layer and does everything that involves
their math: λ initialization, ΔW, merge/unmerge (refusing a non-finite ΔW), the per-token-count
strategy choice (keyed by the installed cost model, so ``calibrate()`` makes layers re-choose),
the finiteness checks, the optional cached merged weight and the forward.
:class:`tera_tn.torch.TeRALinear` is its PEFT-free face with one adapter called ``"default"``;
:class:`tera_tn.peft.layer.Linear` adds PEFT's bookkeeping (active adapters, enable/disable,
mixed-adapter batches) around the same methods.

λ layout: one float32 vector per adapter, ``λ_1..λ_N`` concatenated (sizes ``spec.scale_sizes``,
split per mode by :meth:`TeRAAdapters.scales`). That is the layout serving consumes (a batch of
adapters is a table of such rows: :func:`~tera_tn.torch.autograd.mixed_delta`, ``AdapterStore``,
``row_lambdas``), the one PEFT saves (one ``tera_lambda`` tensor per layer and adapter), and one
optimizer tensor per layer instead of N.
"""

from __future__ import annotations

import math
import numbers
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..contract.costmodel import cost_model
from ..core.factors import SCALE_INITS, check_scale_value, init_scales
from ..core.spec import TeRASpec
from .autograd import compute_dtype, merged_weight, mixed_delta, no_autocast, non_finite, tera_linear
from .bank import FactorBank
from .config import LAYER_STRATEGIES, check_form
from .frozen import FrozenNetwork
from .planning import layer_plan
from .w0_basis import basis_sizes, check_basis_spec, w0_bases, w0_basis_delta

__all__ = ["TeRAAdapters", "FP32ParameterDict", "DEFAULT_ADAPTER", "weight_norm"]

DEFAULT_ADAPTER = "default"

# Plans memoized per layer before layer_plan's own cache: the per-call lookup shows at n = 1.
_MAX_PLANS = 64


@torch.compiler.assume_constant_result
def _compiled_plan(spec: TeRASpec, n: int, dtype: str, device: str, training: bool) -> str:
    """The layer plan's strategy, run by the compiler at trace time and baked into the graph
    (the planner's caches and cost-model lookups are plain Python that dynamo cannot trace)."""
    return layer_plan(spec, n, training=training, device=device, dtype=dtype).strategy


class FP32ParameterDict(nn.ParameterDict):
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


def weight_norm(w: torch.Tensor) -> float:
    """``‖w‖_F`` in float64, correctly rounded (``math.fsum``), so every process and BLAS build
    computes the same number from the same weight (a ``"w0_relative"`` adapter's α and the
    checkpoints that pin its ``W0`` both read it)."""
    return math.sqrt(math.fsum(w.detach().to("cpu", torch.float64).square().reshape(-1).tolist()))


def _check_options(alpha, alpha_scaling, update, basis, scale_init, zero_mode, scale_init_value, dropout, strategy,
                   check_finite, cache_delta) -> None:
    """Validate the per-adapter options (the keys of :meth:`TeRALayersConfig.layer_options`)."""
    check_form(update, basis, alpha_scaling)
    if strategy not in LAYER_STRATEGIES:
        raise ValueError(f"strategy must be one of {LAYER_STRATEGIES}, got {strategy!r}")
    if isinstance(dropout, bool) or not isinstance(dropout, numbers.Real) or not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be a probability in [0, 1), got {dropout!r}")
    if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real) or not math.isfinite(alpha):
        raise ValueError(f"alpha must be a finite number, got {alpha!r}")
    if scale_init not in SCALE_INITS:
        raise ValueError(f"scale_init must be one of {SCALE_INITS}, got {scale_init!r}")
    if isinstance(zero_mode, bool) or not isinstance(zero_mode, numbers.Integral) or zero_mode < 0:
        raise ValueError(f"zero_mode must be a non-negative mode index, got {zero_mode!r}")
    check_scale_value("scale_init_value", scale_init_value)
    for flag, value in (("cache_delta", cache_delta), ("check_finite", check_finite)):
        if not isinstance(value, bool):
            raise ValueError(f"{flag} must be True or False, got {value!r}")


class TeRAAdapters:
    """Named TeRA adapters of one linear layer (a mixin for an ``nn.Module``).

    The host provides ``get_base_layer()`` (the adapted Linear or Conv1D), ``in_features``,
    ``out_features``, ``fan_in_fan_out`` and :meth:`adapter_bank`; it calls :meth:`_init_adapters`
    once, after ``nn.Module.__init__``.

    Attributes (dicts keyed by adapter name):
        tera_lambda: the trainable vectors ``λ_1..λ_N`` concatenated (fp32, ``spec.num_trainable``).
        tera_spec, tera_alpha, tera_strategy, tera_dropout: the adapter's spec, α, strategy, dropout.
        tera_update, tera_basis, tera_alpha_scaling: the update form (``"additive"``: ``W0 + ΔW``;
            ``"multiplicative"``: ``W0 + W0 ⊙ ΔW``), the bases of the rank side (``"random"``: the
            frozen factors; ``"w0"``: W0's singular vectors) and how α was set.
        tera_check_finite: whether forward checks that the adapter's λ are finite.
        tera_cache_delta: whether inference reuses ``W0 + ΔW`` between calls.
    """

    # False for quantized bases (tera_tn.peft.quantized): their weight is packed, so the base
    # computes its own output and ΔW x is added next to it instead of fusing W0 + ΔW.
    _dense_base = True

    def _init_adapters(self) -> None:
        self.tera_lambda = FP32ParameterDict({})
        self.tera_dropout = nn.ModuleDict({})
        self.tera_spec: dict[str, TeRASpec] = {}
        self.tera_alpha: dict[str, float] = {}
        self.tera_update: dict[str, str] = {}
        self.tera_basis: dict[str, str] = {}
        self.tera_alpha_scaling: dict[str, str] = {}
        # basis="w0": (U0[:, :a], V0[:, :b]) in float64 on the CPU, from the W0 the adapter was created on,
        # and their copies per (dtype, device)
        self._tera_bases: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._tera_bases_at: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
        # ‖W0‖_F that each "w0_relative" α was computed from, or each multiplicative ΔW multiplies
        # (checkpoints pin it)
        self.tera_w0_norm: dict[str, float] = {}
        # A multiplicative ΔW is W0 ⊙ N for the W0 with no adapter merged; while adapters are merged
        # into the weight, that W0 is kept here (merge order and unmerge then cannot change it).
        self._tera_folded: list[str] = []
        self._tera_unmerged_w0: Optional[torch.Tensor] = None
        self.tera_strategy: dict[str, str] = {}
        self.tera_check_finite: dict[str, bool] = {}
        self.tera_cache_delta: dict[str, bool] = {}
        self._tera_plans: dict[tuple, str] = {}
        self._tera_cache: dict[str, tuple[tuple, torch.Tensor]] = {}

    def adapter_bank(self, name: str) -> FactorBank:
        """The :class:`FactorBank` holding the frozen factors of adapter ``name``."""
        return self.tera_bank[name]

    def _add_adapter(
        self, name: str, spec: TeRASpec, bank: FactorBank, options: dict, *, scale_seed: int = 0,
        device: Optional[torch.device] = None,
    ) -> None:
        """Validate ``options`` (every key of :meth:`TeRALayersConfig.layer_options`), register ``spec``
        with ``bank`` (the host stores the bank) and create adapter ``name``'s λ on ``device``.
        ``scale_seed`` seeds ``scale_init="random"``."""
        if not isinstance(spec, TeRASpec):
            raise ValueError(f"spec must be a TeRASpec, got {type(spec).__name__}")
        if spec.shape != (self.out_features, self.in_features):
            raise ValueError(
                f"spec is for a {spec.d_out}×{spec.d_in} weight but the Linear is {self.out_features}×{self.in_features}: {spec}"
            )
        _check_options(**options)
        o = options
        uses_w0 = "update='multiplicative'" if o["update"] == "multiplicative" else "basis='w0'" if o["basis"] == "w0" else None
        if uses_w0 and self._tera_folded:
            raise ValueError(f"{self._where(name)}: cannot add an adapter with {uses_w0} while {self._tera_folded} are "
                             "merged into the base weight (its ΔW is built from the unmerged W0); unmerge first")
        if o["basis"] == "w0":
            check_basis_spec(spec, self._where(name))
        bank.add(spec)
        self.tera_spec[name] = spec
        self.tera_alpha[name] = float(o["alpha"])
        self.tera_update[name] = o["update"]
        self.tera_basis[name] = o["basis"]
        self.tera_alpha_scaling[name] = o["alpha_scaling"]
        self.tera_w0_norm.pop(name, None)
        self._drop_bases(name)
        if o["alpha_scaling"] == "w0_relative" or uses_w0:
            self.tera_w0_norm[name] = self._base_weight_norm(name, uses_w0 or "alpha_scaling='w0_relative'")
        if o["basis"] == "w0":
            self._tera_bases[name] = w0_bases(self._unmerged_w0(), *basis_sizes(spec))
        if o["alpha_scaling"] == "w0_relative":
            self.tera_alpha[name] *= self.tera_w0_norm[name] / bank.frozen_norm(spec)
        self.tera_strategy[name] = o["strategy"]
        self.tera_check_finite[name] = o["check_finite"]
        self.tera_cache_delta[name] = o["cache_delta"]
        self.tera_dropout[name] = nn.Dropout(o["dropout"]) if o["dropout"] > 0 else nn.Identity()
        scales = init_scales(
            spec, o["scale_init"], zero_mode=o["zero_mode"], seed=scale_seed if o["scale_init"] == "random" else None,
            value=o["scale_init_value"],
        )
        flat = np.concatenate([np.asarray(s, dtype=np.float64) for s in scales])
        self.tera_lambda[name] = nn.Parameter(torch.as_tensor(flat, dtype=torch.float32, device=device))
        self._tera_cache.pop(name, None)

    # --- helpers -----------------------------------------------------------------------------
    def _base_weight_norm(self, name: str, why: str) -> float:
        w0 = self.get_base_layer().weight
        if not self._dense_base or not w0.is_floating_point() or w0.is_meta:
            kind = "meta" if w0.is_meta else f"packed {w0.dtype}" if not w0.is_floating_point() else "quantized"
            raise ValueError(f"{self._where(name)}: {why} needs the base layer's weight values, got a {kind} "
                             "tensor; create the adapter on a floating-point, materialized base")
        norm = weight_norm(w0)
        if not (math.isfinite(norm) and norm > 0):
            raise ValueError(f"{self._where(name)}: {why} needs a finite, non-zero base weight, got ‖W0‖ = {norm}")
        return norm

    def _plain(self, name: str) -> bool:
        """Whether adapter ``name`` is the factored network itself (additive, frozen-factor bases):
        the form every strategy, the mixed-batch chain and the structured spectra apply to."""
        return self.tera_update.get(name, "additive") == "additive" and self.tera_basis.get(name, "random") == "random"

    def _drop_bases(self, name: str) -> None:
        self._tera_bases.pop(name, None)
        for key in [k for k in self._tera_bases_at if k[0] == name]:
            del self._tera_bases_at[key]

    def _bases(self, name: str, dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        key = (name, dtype, device)
        found = self._tera_bases_at.get(key)
        if found is None:
            found = tuple(b.to(device=device, dtype=dtype) for b in self._tera_bases[name])
            self._tera_bases_at[key] = found
        return found

    def _w0_basis_delta(self, name: str, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """``ΔW`` of a ``basis="w0"`` adapter in ``dtype`` on ``device``, differentiable in its λ."""
        lams = [s.to(device=device, dtype=dtype) for s in self.scales(name)]
        return w0_basis_delta(self._network(name, dtype, device), lams, self.tera_alpha[name],
                              self._bases(name, dtype, device))

    def _unmerged_w0(self) -> torch.Tensor:
        """``W0`` with no adapter merged, laid out ``(d_out, d_in)`` (a view: never written)."""
        w = self._tera_unmerged_w0 if self._tera_unmerged_w0 is not None else self.get_base_layer().weight
        return w.T if self.fan_in_fan_out else w

    def scales(self, name: str = DEFAULT_ADAPTER) -> list[torch.Tensor]:
        """``λ_1..λ_N`` of adapter ``name`` as views of its trainable vector (``μ_n`` then ``λ_n``
        concatenated per mode for ``diag="both"``)."""
        return list(torch.split(self.tera_lambda[name], list(self.tera_spec[name].scale_sizes)))

    def _network(self, name: str, dtype: torch.dtype, device: torch.device) -> FrozenNetwork:
        """Adapter ``name``'s frozen operands in ``dtype`` on ``device`` (see :meth:`FactorBank.network`)."""
        return self.adapter_bank(name).network(self.tera_spec[name], dtype, device)

    def _where(self, name: str) -> str:
        return f"TeRA adapter {name!r} of a {self.out_features}×{self.in_features} layer"

    def _bad_scales(self, name: str) -> Optional[str]:
        """Which λ_n of adapter ``name`` hold non-finite values (and how many), or None."""
        bad = [f"λ_{n}: {msg}" for n, lam in enumerate(self.scales(name)) if (msg := non_finite(lam.detach())) is not None]
        return "; ".join(bad) or None

    def _check_scales(self, name: str) -> None:
        bad = self._bad_scales(name)
        if bad is not None:
            raise FloatingPointError(f"{self._where(name)} has non-finite λ ({bad}); its output would be NaN/Inf")

    def _pick_strategy(self, name: str, n: int, x: torch.Tensor, training: bool) -> str:
        strategy = self.tera_strategy[name]
        if strategy != "auto":
            return strategy
        if torch.compiler.is_compiling():
            # Host-side planning, read once per compiled shape (a guard on n recompiles it).
            return _compiled_plan(self.tera_spec[name], n, str(x.dtype).removeprefix("torch."), x.device.type, training)
        spec = self.tera_spec[name]
        # The installed cost model is part of the key, so calibrate() makes layers re-choose.
        key = (spec, n, x.dtype, x.device.type, training, cost_model("torch", x.device.type, x.dtype))
        found = self._tera_plans.get(key)
        if found is None:
            dtype = str(x.dtype).removeprefix("torch.")
            found = layer_plan(spec, n, training=training, device=x.device.type, dtype=dtype).strategy
            if len(self._tera_plans) > _MAX_PLANS:
                self._tera_plans.clear()
            self._tera_plans[key] = found
        return found

    def clear_cache(self) -> None:
        """Drop the cached merged weights of inference mode (``cache_delta``) and the copies of W0's
        bases made for other dtypes and devices."""
        self._tera_cache.clear()
        self._tera_bases_at.clear()

    # --- ΔW, merge, unmerge ------------------------------------------------------------------
    @torch.no_grad()
    def get_delta_weight(self, name: str = DEFAULT_ADAPTER, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """``ΔW`` of adapter ``name`` laid out like the base weight (transposed for ``Conv1D``),
        detached, in ``dtype`` (default: W0's dtype, float32 for a packed quantized W0), computed in
        at least float32."""
        w0 = self.get_base_layer().weight
        out_dtype = dtype or (w0.dtype if w0.is_floating_point() else torch.float32)
        work = torch.promote_types(out_dtype, torch.float32)
        if self.tera_basis[name] == "w0":
            dw = self._w0_basis_delta(name, work, w0.device)
            return (dw.T if self.fan_in_fan_out else dw).to(out_dtype)
        lams = [lam.to(device=w0.device, dtype=work) for lam in self.scales(name)]
        dw = merged_weight(self._network(name, work, w0.device), lams, self.tera_alpha[name], None)
        if self.tera_update[name] == "multiplicative":
            dw.mul_(self._unmerged_w0().to(work))
        return (dw.T if self.fan_in_fan_out else dw).to(out_dtype)

    @torch.no_grad()
    def _fold(self, name: str, sign: int) -> None:
        """``W0 ← W0 ± ΔW`` of adapter ``name`` in place; a merge refuses a non-finite ΔW (e.g. NaN
        λ after a diverged run) and leaves W0 as it is. On a layer with a multiplicative adapter the
        unmerged ``W0`` is kept while anything is merged, and the last unmerge restores it exactly."""
        w0 = self.get_base_layer().weight
        delta = self.get_delta_weight(name)
        if sign > 0:
            bad = non_finite(delta)
            if bad is not None:
                why = self._bad_scales(name) or "λ are finite: ΔW overflows W0 dtype"
                raise ValueError(f"refusing to merge {self._where(name)}: ΔW has {bad} ({why}); the base weight was not changed")
            if self._tera_unmerged_w0 is None and "multiplicative" in self.tera_update.values():
                self._tera_unmerged_w0 = w0.detach().clone()
            w0.add_(delta)
            self._tera_folded.append(name)
        else:
            w0.sub_(delta)
            if name in self._tera_folded:
                self._tera_folded.remove(name)
            if not self._tera_folded and self._tera_unmerged_w0 is not None:
                w0.copy_(self._tera_unmerged_w0)
                self._tera_unmerged_w0 = None
        self._tera_cache.clear()

    # --- forward -----------------------------------------------------------------------------
    def _cached_weight(self, name: str, x: torch.Tensor, dt: torch.dtype) -> torch.Tensor:
        w0 = self.get_base_layer().weight
        lam = self.tera_lambda[name]
        # _version counts in-place updates (optimizer steps); data_ptr catches `.data =` swaps.
        # In-place writes through `.data` are invisible to both: hence opt-in, and clear_cache().
        key = (lam._version, lam.data_ptr(), w0._version, w0.data_ptr(), self.tera_alpha[name], dt, x.device,
               self.adapter_bank(name).generation)
        found = self._tera_cache.get(name)
        if found is not None and found[0] == key:
            return found[1]
        lams = [s.to(dt) for s in self.scales(name)]
        with no_autocast(x.device.type):
            if self.tera_basis[name] == "w0":
                weight = self._w0_basis_delta(name, dt, x.device).add_(w0.to(dt))
            elif self.tera_update[name] == "multiplicative":
                base = self._unmerged_w0().to(dt)
                weight = merged_weight(self._network(name, dt, x.device), lams, self.tera_alpha[name], None)
                weight = weight.mul_(base).add_(w0.to(dt))
            else:
                weight = merged_weight(self._network(name, dt, x.device), lams, self.tera_alpha[name], w0.to(dt))
        self._tera_cache[name] = (key, weight)
        return weight

    def _adapters_forward(self, x: torch.Tensor, active: list[str], *args, **kwargs) -> torch.Tensor:
        """The base layer's output plus ``ΔW x`` of every (unmerged) adapter in ``active``."""
        base = self.get_base_layer()
        for a in active:
            if self.tera_lambda[a].is_meta and not x.is_meta:
                # accelerate's offload hooks restore a module's tensors only when that module is
                # called; the λ ParameterDict never is unless the whole layer is preloaded.
                raise RuntimeError(
                    f"{self._where(a)} has its λ on the meta device while the input is on {x.device} (offloaded by "
                    f"accelerate?): pass preload_module_classes=[{type(self).__name__!r}] to accelerate's "
                    "dispatch_model / cpu_offload"
                )
            if self.tera_check_finite[a]:
                self._check_scales(a)
        needs_grad = torch.is_grad_enabled() and (
            x.requires_grad or base.weight.requires_grad or any(self.tera_lambda[a].requires_grad for a in active)
        )
        n = max(1, math.prod(x.shape[:-1]))
        dropout_active = self.training and any(isinstance(self.tera_dropout[a], nn.Dropout) for a in active)
        if len(active) == 1 and self._dense_base and not self.fan_in_fan_out and not dropout_active and not args and not kwargs:
            # One fused GEMM x (W0 + ΔW)ᵀ (materialize, or the cached merged weight) or base GEMM + factored ΔW x.
            a = active[0]
            dt = compute_dtype(x)
            if not needs_grad and self.tera_cache_delta[a]:
                return F.linear(x, self._cached_weight(a, x, dt), None if base.bias is None else base.bias.to(dt))
            self._tera_cache.pop(a, None)
            if self.tera_update[a] == "multiplicative":
                return tera_linear(x, base.weight, base.bias, self._network(a, dt, x.device), self.scales(a),
                                   self.tera_alpha[a], w0=self._unmerged_w0())
            if self.tera_basis[a] == "w0":
                weight = self._w0_basis_delta(a, dt, x.device) + base.weight.to(dt)
                return F.linear(x.to(dt), weight, None if base.bias is None else base.bias.to(dt))
            strategy = self._pick_strategy(a, n, x, needs_grad)
            return tera_linear(x, base.weight, base.bias, self._network(a, dt, x.device), self.scales(a),
                               self.tera_alpha[a], strategy)
        result = base(x, *args, **kwargs)
        for a in active:
            xa = self.tera_dropout[a](x).to(result.dtype)
            strategy = self._pick_strategy(a, n, xa, needs_grad) if self._plain(a) else None
            result = result + self._update_x(a, xa, strategy)
        return result

    def _update_x(self, name: str, x: torch.Tensor, strategy: Optional[str]) -> torch.Tensor:
        """The update of adapter ``name`` applied to ``x`` (``ΔW x``, or ``(W0 ⊙ ΔW) x``) in the compute
        dtype; ``strategy`` is the plain network's (unused by the other forms)."""
        dt = compute_dtype(x)
        if self.tera_basis[name] == "w0":
            return F.linear(x.to(dt), self._w0_basis_delta(name, dt, x.device))
        net = self._network(name, dt, x.device)
        if self.tera_update[name] == "multiplicative":
            return tera_linear(x, None, None, net, self.scales(name), self.tera_alpha[name], w0=self._unmerged_w0())
        return tera_linear(x, None, None, net, self.scales(name), self.tera_alpha[name], strategy)

    def _per_adapter_rows(self, x: torch.Tensor, names: list[str], which: torch.Tensor) -> torch.Tensor:
        """The update of adapter ``names[which[i]]`` applied to row ``i`` of ``x``, in the compute dtype,
        for adapters that are not the plain network (multiplicative, W0's bases): those have no
        factored chain that rows could share, so each builds its own weight once and runs on its rows
        (one GEMM per adapter in the batch)."""
        out = x.new_zeros(x.shape[:-1] + (self.out_features,), dtype=compute_dtype(x))
        for k, a in enumerate(names):
            rows = (which == k).nonzero().squeeze(1)
            out = out.index_copy(0, rows, self._update_x(a, x.index_select(0, rows), None))
        return out

    def _rows_delta(self, x: torch.Tensor, spec: TeRASpec, bank: FactorBank, table: torch.Tensor,
                    alphas: torch.Tensor, which: torch.Tensor) -> torch.Tensor:
        """``ΔW x`` of a batch whose row ``i`` uses the adapter in row ``which[i]`` of ``table``
        (concatenated λ of adapters of ``spec``, α ``alphas``), in one contraction; shape
        ``x.shape[:-1] + (d_out,)``, in the compute dtype."""
        dt = compute_dtype(x)
        per_row = math.prod(x.shape[1:-1])
        tokens = which.repeat_interleave(per_row) if per_row != 1 else which
        delta = mixed_delta(bank.network(spec, dt, x.device), table, alphas, tokens, x.reshape(-1, spec.d_in).to(dt))
        return delta.reshape(x.shape[:-1] + (spec.d_out,))
