"""`export_lora`: a TeRA adapter written as a standard PEFT LoRA adapter, for servers that load LoRA only.

Serving stacks (vLLM, LoRAX, TGI, SGLang) load LoRA: per adapted layer ``ΔW = scaling · B A`` with
``A`` of shape ``(r, d_in)``, ``B`` of shape ``(d_out, r)``. TeRA's ``ΔW`` is a Tucker network that is
full rank in general, so it is exported through a truncated SVD ``ΔW ≈ U_k Σ_k V_kᵀ`` per layer:
``B = U_k Σ_k^½``, ``A = Σ_k^½ V_kᵀ`` (the singular values split evenly, so neither factor holds the
whole dynamic range in bfloat16). At ``k = rank(ΔW)`` the export is exact up to rounding.

Conventions:

* ``A`` and ``B`` are in the ``(d_out, d_in)`` orientation also for GPT-2 ``Conv1D`` layers (PEFT's
  LoRA transposes at forward time, with ``fan_in_fan_out=True`` in the config).
* ``scaling = 1`` in every layer under both rules that read ``adapter_config.json``: PEFT's
  per-layer ``alpha_pattern[m] / rank_pattern[m]`` and vLLM's single ``lora_alpha / r`` (vLLM ignores
  the patterns and takes each layer's rank from its tensor shapes). So ``r = lora_alpha`` is the
  largest layer rank, and each other layer has ``rank_pattern = alpha_pattern = its rank``.
* Ranks are chosen from the layer's exact singular values, computed in float64 from the network's
  structure (:func:`tera_tn.singular_values`): exact zeros beyond the structural rank, no rounding
  noise from a dense float32 SVD. The factors come from a dense float64 SVD of the materialized
  ``ΔW`` (singular vectors need it), so a layer costs about one ``d_out × d_in`` SVD.
* A rank ``k`` is rounded UP to the next entry of ``rank_set`` (vLLM's ``max_lora_rank`` values by
  default), which keeps more singular values; where that entry exceeds ``min(d_out, d_in)`` the
  extra rows of ``A`` and columns of ``B`` are zeros, so ``B A`` is unchanged.
"""

from __future__ import annotations

import heapq
import numbers
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F

from .._files import publish, staging_dir, sweep_stale_temps
from ..core.factors import TeRAFactors
from .layer import TeraLayer
from .model import _find_tera_model

__all__ = ["export_lora", "ExportReport", "LayerExport", "VLLM_RANKS", "MODULES_TO_SAVE_FILE"]

#: the LoRA ranks vLLM accepts as ``max_lora_rank``: the default ``rank_set``
VLLM_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
#: where ``modules_to_save="separate"`` writes the trained copies of whole modules (base-model key names)
MODULES_TO_SAVE_FILE = "modules_to_save.safetensors"
_WEIGHTS = "adapter_model.safetensors"
_CONFIG = "adapter_config.json"
_PREFIX = "base_model.model."
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_HEAD_MODES = ("refuse", "separate", "include")


@dataclass(frozen=True)
class LayerExport:
    """One exported layer.

    Attributes:
        name: the layer's name in the base model (e.g. ``"model.layers.0.self_attn.q_proj"``).
        shape: ``(d_out, d_in)``.
        rank: the LoRA rank written (``A`` is ``(rank, d_in)``), after rounding up to ``rank_set``.
        kept: singular triplets carried, ``min(rank, d_out, d_in)``; the rest of ``rank`` is zeros.
        energy: ``Σ_{i<kept} σ_i² / Σ σ_i²`` from the exact spectrum (1.0 for ``ΔW = 0``).
        error: ``‖ΔW − B A‖_F / ‖ΔW‖_F`` measured on the written tensors (their dtype's rounding
            included; 0.0 for ``ΔW = 0``).
        numbers: ``rank · (d_out + d_in)``, the LoRA numbers written for this layer.
    """

    name: str
    shape: tuple[int, int]
    rank: int
    kept: int
    energy: float
    error: float
    numbers: int


@dataclass(frozen=True)
class ExportReport:
    """What :func:`export_lora` wrote and how close it is; ``str()`` is a table, ``to_dict()`` JSON.

    Attributes:
        adapter: the exported TeRA adapter's name.
        folder: the LoRA folder written.
        dtype: dtype of the LoRA tensors (``"float32"``, ``"bfloat16"`` or ``"float16"``).
        criterion: how ranks were chosen: ``"rank=16"``, ``"energy=0.99"`` or ``"budget=100000"``.
        rank_set: the ranks allowed (rounded up to), or None.
        lora_r: ``r`` (= ``lora_alpha``) of ``adapter_config.json``, the largest layer rank.
        layers: one :class:`LayerExport` per adapted layer, in model order.
        tera_numbers: trainable λ numbers of the TeRA adapter over these layers (for comparison).
        modules_to_save: the modules (base-model names) written beside or into the LoRA files.
        modules_to_save_mode: ``"refuse"`` (there were none), ``"separate"`` or ``"include"``.
        output_error: with ``check_inputs``: ``‖y_LoRA − y_TeRA‖ / ‖y_TeRA‖`` of the model output
            (logits or last hidden state), else None.
        update_error: with ``check_inputs``: the same difference relative to what the adapter
            changes, ``‖y_LoRA − y_TeRA‖ / ‖y_TeRA − y_base‖`` (None when the adapter changes nothing).
    """

    adapter: str
    folder: str
    dtype: str
    criterion: str
    rank_set: Optional[tuple[int, ...]]
    lora_r: int
    layers: tuple[LayerExport, ...]
    tera_numbers: int
    modules_to_save: tuple[str, ...] = ()
    modules_to_save_mode: str = "refuse"
    output_error: Optional[float] = None
    update_error: Optional[float] = None

    @property
    def lora_numbers(self) -> int:
        """LoRA numbers written over all layers (zero padding included)."""
        return sum(layer.numbers for layer in self.layers)

    @property
    def max_error(self) -> float:
        """The largest per-layer ``‖ΔW − B A‖_F / ‖ΔW‖_F``."""
        return max((layer.error for layer in self.layers), default=0.0)

    def to_dict(self) -> dict:
        """A JSON-serializable dict (layers as a list of dicts)."""
        return {
            "adapter": self.adapter,
            "folder": self.folder,
            "dtype": self.dtype,
            "criterion": self.criterion,
            "rank_set": None if self.rank_set is None else list(self.rank_set),
            "lora_r": self.lora_r,
            "lora_numbers": self.lora_numbers,
            "tera_numbers": self.tera_numbers,
            "max_error": self.max_error,
            "output_error": self.output_error,
            "update_error": self.update_error,
            "modules_to_save": list(self.modules_to_save),
            "modules_to_save_mode": self.modules_to_save_mode,
            "layers": [
                {"name": x.name, "shape": list(x.shape), "rank": x.rank, "kept": x.kept, "energy": x.energy,
                 "error": x.error, "numbers": x.numbers}
                for x in self.layers
            ],
        }

    def __str__(self) -> str:
        rank_set = "any rank" if self.rank_set is None else f"ranks rounded up to {list(self.rank_set)}"
        width = max([len("layer")] + [len(x.name) for x in self.layers])
        lines = [
            f"TeRA adapter {self.adapter!r} exported as LoRA to {self.folder} ({self.dtype}, {self.criterion}, {rank_set})",
            f"{'layer':<{width}}  {'shape':>11}  {'rank':>4}  {'kept':>4}  {'energy kept':>11}  {'‖ΔW−BA‖/‖ΔW‖':>12}",
        ]
        for x in self.layers:
            shape = f"{x.shape[0]}×{x.shape[1]}"
            lines.append(f"{x.name:<{width}}  {shape:>11}  {x.rank:>4}  {x.kept:>4}  {x.energy:>11.6f}  {x.error:>12.2e}")
        lines.append(
            f"{len(self.layers)} layers, {self.lora_numbers:,} LoRA numbers (the TeRA adapter trains {self.tera_numbers:,}); "
            f"r = lora_alpha = {self.lora_r}, scaling 1 in every layer; largest layer error {self.max_error:.2e}"
        )
        if self.modules_to_save:
            where = MODULES_TO_SAVE_FILE if self.modules_to_save_mode == "separate" else f"{_WEIGHTS} (PEFT only)"
            lines.append(f"modules_to_save {list(self.modules_to_save)} written to {where}")
        if self.output_error is not None:
            update = "" if self.update_error is None else f", {self.update_error:.2e} of what the adapter changes"
            lines.append(f"model output vs the TeRA model: relative error {self.output_error:.2e}{update}")
        return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# argument checks: all of them run before any SVD or file
# --------------------------------------------------------------------------------------------
def _is_int(x) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def _criterion(rank, energy, budget) -> tuple[str, Union[int, float]]:
    given = [(k, v) for k, v in (("rank", rank), ("energy", energy), ("budget", budget)) if v is not None]
    if len(given) > 1:
        raise ValueError(
            f"give at most one of rank, energy and budget, got {', '.join(f'{k}={v!r}' for k, v in given)}"
        )
    if not given:
        return "energy", 1.0  # every non-zero singular value: the exact export
    kind, value = given[0]
    if kind == "energy":
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0.0 < value <= 1.0:
            raise ValueError(f"energy must be a fraction in (0, 1] of Σσ² to keep per layer, got {value!r}")
        return kind, float(value)
    if not _is_int(value) or value <= 0:
        what = "LoRA rank per layer" if kind == "rank" else "total of LoRA numbers, Σ rank·(d_out + d_in)"
        raise ValueError(f"{kind} must be a positive integer ({what}), got {value!r}")
    return kind, int(value)


def _check_rank_set(rank_set) -> Optional[tuple[int, ...]]:
    if rank_set is None:
        return None
    expected = f"a non-empty collection of positive LoRA ranks such as {VLLM_RANKS}, or None"
    if isinstance(rank_set, (str, bytes)) or not hasattr(rank_set, "__iter__"):
        raise ValueError(f"rank_set must be {expected}, got {rank_set!r}")
    values = list(rank_set)
    if not values or not all(_is_int(r) and r > 0 for r in values):
        raise ValueError(f"rank_set must be {expected}, got {rank_set!r}")
    return tuple(sorted({int(r) for r in values}))


def _check_dtype(dtype) -> torch.dtype:
    found = _DTYPES.get(dtype) if isinstance(dtype, str) else dtype
    if found not in _DTYPES.values():
        raise ValueError(f"dtype must be one of {list(_DTYPES)} (or the torch dtype), got {dtype!r}")
    return found


def _check_inputs_type(inputs) -> None:
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


def _check_folder(dest: Path, overwrite: bool) -> None:
    if dest.exists() and not dest.is_dir():
        raise NotADirectoryError(f"{dest} exists and is not a folder; export_lora expects a folder path")
    if dest.is_dir() and any(dest.iterdir()) and not overwrite:
        raise FileExistsError(
            f"{dest} is not empty; export_lora writes into a new or empty folder, or replaces its {_CONFIG}, "
            f"{_WEIGHTS} and {MODULES_TO_SAVE_FILE} with overwrite=True"
        )


# --------------------------------------------------------------------------------------------
# the adapter's layers, heads and spectra
# --------------------------------------------------------------------------------------------
def _serves(layer: TeraLayer, adapter_name: str) -> bool:
    slot = layer._tera_store_slot
    return adapter_name in layer.tera_lambda or (slot is not None and adapter_name in slot[0])


def _heads(tera, adapter_name: str, stored: bool, mode: str) -> dict[str, torch.nn.Module]:
    """``{base-model name: trained module}`` of the adapter's ``modules_to_save``, after the refusals."""
    from peft.utils.other import ModulesToSaveWrapper

    wrappers = {n: m for n, m in tera.model.named_modules() if isinstance(m, ModulesToSaveWrapper)}
    if stored and wrappers:
        raise ValueError(
            f"adapter {adapter_name!r} is served from an AdapterStore, which keeps only λ: the model's "
            f"modules_to_save {sorted(wrappers)} belong to its own adapters, so the export would serve "
            f"{adapter_name!r} with no head of its own; export a model adapter instead (load it with "
            "PeftModel.load_adapter)"
        )
    heads = {n: w.modules_to_save[adapter_name] for n, w in wrappers.items() if adapter_name in w.modules_to_save}
    if heads and mode == "refuse":
        raise ValueError(
            f"adapter {adapter_name!r} has modules_to_save {sorted(heads)} (whole modules trained in full, e.g. a "
            "classifier head), which LoRA servers cannot load (vLLM requires modules_to_save=None). Pass "
            f"modules_to_save='separate' to write them to {MODULES_TO_SAVE_FILE} beside the LoRA files (load it "
            "into the base model yourself), or 'include' to keep them in the LoRA checkpoint for PEFT"
        )
    return heads


def _spectrum(layer: TeraLayer, adapter_name: str) -> np.ndarray:
    """All ``min(d_out, d_in)`` singular values of the layer's ΔW, descending, exact in float64."""
    from .. import singular_values

    spec, bank, lams, alpha = layer.adapter_operands(adapter_name)
    stored = bank.group_tensors(spec)
    core = stored["core"].detach().double()
    factors = TeRAFactors(
        core, tuple(None if (u := stored.get(f"u{n}")) is None else u.detach().double() for n in range(spec.order))
    )
    scales = [lam.detach().to(device=core.device, dtype=torch.float64) for lam in lams]
    return singular_values(spec, factors, scales, alpha).cpu().numpy()


def _nonzero(sv: np.ndarray, shape: tuple[int, int]) -> int:
    """Singular values above float64 rounding, ``max(d_out, d_in)·eps·σ_1``: ΔW's exact rank."""
    if sv.size == 0 or sv[0] <= 0:
        return 0
    return int(np.count_nonzero(sv > max(shape) * np.finfo(np.float64).eps * sv[0]))


# --------------------------------------------------------------------------------------------
# rank choice
# --------------------------------------------------------------------------------------------
def _round_up(k: int, rank_set: Optional[tuple[int, ...]], name: str, why: str) -> int:
    if rank_set is None:
        return max(k, 1)
    for r in rank_set:
        if r >= k:
            return r
    raise ValueError(
        f"layer {name} needs rank {k} ({why}) but the largest rank in rank_set is {rank_set[-1]}; pass a "
        "rank_set with a larger rank, rank_set=None, or a lower rank/energy"
    )


def _energy_rank(sv: np.ndarray, nonzero: int, energy: float) -> int:
    """Smallest ``k`` with ``Σ_{i<k} σ_i² ≥ energy · Σσ²`` (float64), ``rank(ΔW)`` for energy 1.

    PEFT's converter does this in float32, where the cumulative sum stops growing once the
    remaining σ² fall below its rounding, so its threshold 1.0 can drop the last directions.
    """
    if energy >= 1.0 or nonzero == 0:
        return nonzero
    cum = np.cumsum(sv[:nonzero].astype(np.float64) ** 2)
    return min(int(np.searchsorted(cum, energy * cum[-1], side="left")) + 1, nonzero)


def _budget_ranks(layers: list, spectra: list, budget: int, rank_set: Optional[tuple[int, ...]]) -> list[int]:
    """Written ranks under a total of ``budget`` LoRA numbers, given greedily by marginal energy.

    Every layer starts at the smallest allowed rank. Then the step (to the next allowed rank) with
    the largest gain per number is taken while it fits: gain is the fraction of the layer's own
    ``Σσ²`` the step adds, so layers count alike whatever the scale of their ΔW (outputs go through
    normalization; a layer with a large ΔW is not more important for being large).
    """
    start = rank_set[0] if rank_set else 1
    costs = [sum(layer.shape) for layer in layers]
    minimum = start * sum(costs)
    if budget < minimum:
        raise ValueError(
            f"budget {budget:,} is smaller than the {minimum:,} LoRA numbers the {len(layers)} layers need at "
            f"their minimum rank {start} (Σ rank·(d_out + d_in)); expected a budget of at least {minimum:,}"
        )
    ranks = [start] * len(layers)
    shares = []
    for sv, layer in zip(spectra, layers):
        e = sv[: layer.nonzero].astype(np.float64) ** 2
        total = e.sum()
        shares.append(np.concatenate([[0.0], np.cumsum(e / total)]) if total > 0 else np.zeros(1))

    def step(i: int):
        r = ranks[i]
        nxt = next((x for x in rank_set if x > r), None) if rank_set else r + 1
        cap = len(shares[i]) - 1  # the layer's rank: later steps add nothing
        if nxt is None or r >= cap:
            return None
        gain = shares[i][min(nxt, cap)] - shares[i][min(r, cap)]
        return (-(gain / ((nxt - r) * costs[i])), i, nxt) if gain > 0 else None

    left = budget - minimum
    heap = [s for s in map(step, range(len(layers))) if s is not None]
    heapq.heapify(heap)
    while heap:
        _, i, nxt = heapq.heappop(heap)
        cost = (nxt - ranks[i]) * costs[i]
        if cost > left:
            continue  # steps are taken in order, so this layer cannot grow further
        left -= cost
        ranks[i] = nxt
        s = step(i)
        if s is not None:
            heapq.heappush(heap, s)
    return ranks


@dataclass
class _Layer:
    name: str
    module: TeraLayer
    shape: tuple[int, int]
    nonzero: int = 0


def _choose(layers: list[_Layer], spectra: list, kind: str, value, rank_set) -> list[int]:
    if kind == "budget":
        return _budget_ranks(layers, spectra, value, rank_set)
    out = []
    for layer, sv in zip(layers, spectra):
        if kind == "rank":
            k, why = min(value, min(layer.shape)), f"rank={value}"
        else:
            k, why = _energy_rank(sv, layer.nonzero, value), f"energy={value:g}"
        out.append(_round_up(k, rank_set, layer.name, why))
    return out


# --------------------------------------------------------------------------------------------
# factors
# --------------------------------------------------------------------------------------------
@torch.no_grad()
def _factors(layer: _Layer, adapter_name: str, rank: int, sv: np.ndarray, dtype: torch.dtype):
    """``(A (rank, d_in), B (d_out, rank), LayerExport)`` of one layer, A and B in ``dtype`` on CPU."""
    module = layer.module
    _, bank, _, _ = module.adapter_operands(adapter_name)
    # ΔW in the factors' storage precision (float32, or float64 for factor_dtype="float64").
    dw = module.get_delta_weight(adapter_name, dtype=torch.promote_types(bank.storage_dtype, torch.float32))
    w = (dw.T if module.fan_in_fan_out else dw).to(torch.float64)
    d_out, d_in = w.shape
    kept = min(rank, d_out, d_in)
    a = w.new_zeros(rank, d_in)
    b = w.new_zeros(d_out, rank)
    norm = float(torch.linalg.matrix_norm(w))
    if norm > 0:
        u, s, vh = torch.linalg.svd(w, full_matrices=False)
        root = s[:kept].sqrt()
        b[:, :kept] = u[:, :kept] * root
        a[:kept] = root[:, None] * vh[:kept]
    a, b = a.to(dtype), b.to(dtype)
    error = float(torch.linalg.matrix_norm(w - b.to(w) @ a.to(w))) / norm if norm > 0 else 0.0
    energy2 = sv.astype(np.float64) ** 2
    total = energy2.sum()
    energy = float(energy2[:kept].sum() / total) if total > 0 else 1.0
    info = LayerExport(layer.name, (d_out, d_in), rank, kept, energy, error, rank * (d_out + d_in))
    return a.cpu().contiguous(), b.cpu().contiguous(), info


def _target_modules(tera, names: Sequence[str]) -> list[str]:
    """The layers' last name components when those pick out exactly these layers (what servers and
    people read best), else their full names."""
    chosen = set(names)
    suffixes = {n.rsplit(".", 1)[-1] for n in names}
    inside = tuple(f"{n}." for n in names)
    others = (n for n, _ in tera.model.named_modules() if n and n not in chosen and not n.startswith(inside))
    if any(n.rsplit(".", 1)[-1] in suffixes for n in others):
        return sorted(chosen)
    return sorted(suffixes)


# --------------------------------------------------------------------------------------------
# the model-level check
# --------------------------------------------------------------------------------------------
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


def _check_runnable(tera) -> None:
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
def _output_errors(model, tera, adapter_name: str, lora: dict, inputs) -> tuple[float, Optional[float]]:
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


# --------------------------------------------------------------------------------------------
# the function
# --------------------------------------------------------------------------------------------
def export_lora(
    model,
    folder: Union[str, os.PathLike],
    *,
    adapter_name: str = "default",
    rank: Optional[int] = None,
    energy: Optional[float] = None,
    budget: Optional[int] = None,
    rank_set: Optional[Sequence[int]] = VLLM_RANKS,
    dtype: Union[torch.dtype, str] = torch.float32,
    check_inputs: Any = None,
    modules_to_save: str = "refuse",
    overwrite: bool = False,
) -> ExportReport:
    """Write TeRA adapter ``adapter_name`` of ``model`` as a PEFT LoRA adapter in ``folder``.

    ``PeftModel.from_pretrained(base, folder)`` loads the result as a ``LoraConfig`` adapter (no
    tera_tn needed), and so do LoRA servers such as vLLM: ``r = lora_alpha`` with
    ``rank_pattern``/``alpha_pattern`` per layer, so scaling is 1 under PEFT's rule and vLLM's.

    Args:
        model: a ``PeftModel`` (or its ``TeraModel``) with TeRA adapters.
        folder: a new or empty folder (created), or any folder with ``overwrite=True``.
        adapter_name: the adapter to export: one of the model's, or one served by its
            :class:`~tera_tn.peft.AdapterStore`. Layers that do not carry it are left out.
        rank: the same LoRA rank ``k`` in every layer (``min(k, d_out, d_in)`` where smaller, so
            mixed shapes export at full rank with ``rank=max(d)``).
        energy: per layer the smallest rank keeping this fraction of ``Σσ²``, in (0, 1]; 1.0 keeps
            every non-zero singular value (exact).
        budget: a total of LoRA numbers, ``Σ rank·(d_out + d_in)``, spread greedily over the layers
            by the share of their own energy each extra rank adds per number.
            At most one of ``rank``, ``energy`` and ``budget``; none means ``energy=1.0``.
        rank_set: ranks a layer may have; chosen ranks are rounded UP to the next one (vLLM's
            ``max_lora_rank`` values by default), zero-padded beyond ``min(d_out, d_in)``.
            ``None`` writes ranks as chosen.
        dtype: of the LoRA tensors: ``torch.float32`` (default), ``torch.bfloat16``, ``torch.float16``
            (or their names).
        check_inputs: optional batch of model inputs (a dict such as a tokenizer's output, or a
            tensor of input ids); the report then gives the relative error of the model's output
            with the exported LoRA against the TeRA model. The model is run three times in eval mode
            (training flags are restored); adapters must not be merged.
        modules_to_save: what to do with the adapter's ``modules_to_save`` (e.g. a classifier head),
            which LoRA servers cannot load: ``"refuse"`` (default: raise, naming them),
            ``"separate"`` (write them to ``modules_to_save.safetensors`` in the folder, keyed by
            base-model names: ``base.load_state_dict(load_file(...), strict=False)``), or
            ``"include"`` (PEFT's own format inside the LoRA checkpoint: PEFT loads them, vLLM
            refuses the adapter).
        overwrite: replace ``adapter_config.json``, ``adapter_model.safetensors`` and
            ``modules_to_save.safetensors`` in a non-empty folder (other files are kept).

    Returns:
        an :class:`ExportReport`: per layer the rank, kept energy and ``‖ΔW − B A‖_F / ‖ΔW‖_F``,
        the total LoRA numbers and, with ``check_inputs``, the model-level output error.

    Raises:
        ValueError: a bad argument (naming it and what was expected), an adapter no layer serves,
            ``modules_to_save`` under ``"refuse"``, a rank above the largest of ``rank_set``.
        FileExistsError: ``folder`` is not empty and ``overwrite`` is False (nothing written).
        TypeError: ``model`` has no TeRA adapter.
    """
    kind, value = _criterion(rank, energy, budget)
    rank_set = _check_rank_set(rank_set)
    dtype = _check_dtype(dtype)
    if modules_to_save not in _HEAD_MODES:
        raise ValueError(f"modules_to_save must be one of {_HEAD_MODES}, got {modules_to_save!r}")
    if not isinstance(overwrite, bool):
        raise ValueError(f"overwrite must be True or False, got {overwrite!r}")
    _check_inputs_type(check_inputs)
    tera = _find_tera_model(model)
    if tera is None:
        raise TypeError(f"export_lora needs a PEFT model with TeRA adapters, got {type(model).__name__}")
    if not isinstance(adapter_name, str):
        raise ValueError(f"adapter_name must be a string, got {adapter_name!r}")
    layers = [
        _Layer(n, m, (m.out_features, m.in_features))
        for n, m in tera.model.named_modules()
        if isinstance(m, TeraLayer) and _serves(m, adapter_name)
    ]
    if not layers:
        raise ValueError(
            f"adapter_name {adapter_name!r} is not a TeRA adapter of this model; it has "
            f"{sorted(tera._available_adapters())}"
        )
    stored = adapter_name not in layers[0].module.tera_lambda
    heads = _heads(tera, adapter_name, stored, modules_to_save)
    if check_inputs is not None:
        _check_runnable(tera)
    dest = Path(folder)
    _check_folder(dest, overwrite)

    spectra = [_spectrum(layer.module, adapter_name) for layer in layers]
    for layer, sv in zip(layers, spectra):
        layer.nonzero = _nonzero(sv, layer.shape)
    ranks = _choose(layers, spectra, kind, value, rank_set)

    state: dict[str, torch.Tensor] = {}
    lora: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    infos = []
    for layer, sv, r in zip(layers, spectra, ranks):
        a, b, info = _factors(layer, adapter_name, r, sv, dtype)
        state[f"{_PREFIX}{layer.name}.lora_A.weight"] = a
        state[f"{_PREFIX}{layer.name}.lora_B.weight"] = b
        lora[layer.name] = (a, b)
        infos.append(info)

    output_error = update_error = None
    if check_inputs is not None:
        output_error, update_error = _output_errors(model, tera, adapter_name, lora, check_inputs)

    head_state = {}
    for name, module in heads.items():
        for key, t in module.state_dict().items():
            head_state[f"{_PREFIX}{name}.{key}" if modules_to_save == "include" else f"{name}.{key}"] = (
                t.detach().cpu().contiguous()
            )
    if modules_to_save == "include":
        state.update(head_state)

    config = _lora_config(tera, adapter_name, layers, ranks, heads if modules_to_save == "include" else {},
                          separate=bool(heads) and modules_to_save == "separate")
    _write(dest, state, config, head_state if modules_to_save == "separate" else None, overwrite)
    return ExportReport(
        adapter=adapter_name,
        folder=str(dest),
        dtype=str(dtype).removeprefix("torch."),
        criterion=f"{kind}={value:g}" if kind == "energy" else f"{kind}={value}",
        rank_set=rank_set,
        lora_r=max(ranks),
        layers=tuple(infos),
        tera_numbers=sum(layer.module.adapter_operands(adapter_name)[0].num_trainable for layer in layers),
        modules_to_save=tuple(sorted(heads)),
        modules_to_save_mode=modules_to_save if heads else "refuse",
        output_error=output_error,
        update_error=update_error,
    )


def _lora_config(tera, adapter_name: str, layers: list[_Layer], ranks: list[int], heads: dict, separate: bool):
    from peft import LoraConfig

    # A stored adapter has no config of its own; the base model and task are the model's.
    source = tera.peft_config.get(adapter_name) or next(iter(tera.peft_config.values()))
    top = max(ranks)
    pattern = {layer.name: r for layer, r in zip(layers, ranks) if r != top}
    return LoraConfig(
        r=top,
        lora_alpha=top,
        target_modules=_target_modules(tera, [layer.name for layer in layers]),
        rank_pattern=dict(pattern),
        alpha_pattern=dict(pattern),
        lora_dropout=0.0,
        bias="none",
        fan_in_fan_out=all(layer.module.fan_in_fan_out for layer in layers),
        modules_to_save=sorted(heads) or None,
        # With a task such as SEQ_CLS, PEFT wraps the task's head on load and then requires its
        # weights in the checkpoint: heads written separately load into a plain PeftModel.
        task_type=None if separate else source.task_type,
        base_model_name_or_path=source.base_model_name_or_path,
    )


def _write(dest: Path, state: dict, config, heads: Optional[dict], overwrite: bool) -> None:
    """Stage every file beside ``dest``, then move each in atomically (never over a file unless
    ``overwrite``); with ``overwrite`` a modules_to_save file of an earlier export is removed."""
    from safetensors.torch import save_file

    dest.mkdir(parents=True, exist_ok=True)
    sweep_stale_temps(dest.parent)
    with staging_dir(dest.parent, dest.name) as tmp:
        save_file(state, str(tmp / _WEIGHTS), metadata={"format": "pt"})
        config.save_pretrained(str(tmp))
        names = [_WEIGHTS, _CONFIG]
        if heads is not None:
            save_file(heads, str(tmp / MODULES_TO_SAVE_FILE), metadata={"format": "pt"})
            names.append(MODULES_TO_SAVE_FILE)
        for name in names:
            publish(tmp / name, dest / name, overwrite=overwrite)
    if heads is None and overwrite and (dest / MODULES_TO_SAVE_FILE).exists():
        (dest / MODULES_TO_SAVE_FILE).unlink()
