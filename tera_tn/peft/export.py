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

Here: the adapter's layers, heads and spectra, the SVD factors and :func:`export_lora` itself.
The rank choice is :mod:`tera_tn.peft.lora_ranks`, the folder written
:mod:`tera_tn.peft.lora_folder`, the report :mod:`tera_tn.peft.export_report` and the model-level
check :mod:`tera_tn.peft.lora_check`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import numpy as np
import torch

from ..core.factors import TeRAFactors
from .export_report import ExportReport, LayerExport
from .layer import TeraLayer
from .lora_check import check_inputs_batch, check_runnable, output_errors
from .lora_folder import MODULES_TO_SAVE_FILE, check_export_folder, lora_config, write_lora_folder
from .lora_ranks import VLLM_RANKS, check_rank_set, choose_ranks, exact_rank, rank_criterion
from .model import find_tera_model

__all__ = ["export_lora", "ExportReport", "LayerExport", "VLLM_RANKS", "MODULES_TO_SAVE_FILE"]

_PREFIX = "base_model.model."
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_HEAD_MODES = ("refuse", "separate", "include")


def _check_dtype(dtype) -> torch.dtype:
    found = _DTYPES.get(dtype) if isinstance(dtype, str) else dtype
    if found not in _DTYPES.values():
        raise ValueError(f"dtype must be one of {list(_DTYPES)} (or the torch dtype), got {dtype!r}")
    return found


# --------------------------------------------------------------------------------------------
# the adapter's layers, heads and spectra
# --------------------------------------------------------------------------------------------
@dataclass
class _Layer:
    name: str
    module: TeraLayer
    shape: tuple[int, int]
    nonzero: int = 0


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
    """All ``min(d_out, d_in)`` singular values of the layer's ΔW, descending, exact in float64
    (structured for the plain network; a multiplicative ``W0 ⊙ ΔW`` or W0's bases are not that
    structure, so their spectrum is a dense float64 SVD)."""
    from ..analysis.spectrum import tera_singular_values as singular_values

    if not layer._plain(adapter_name):
        return torch.linalg.svdvals(layer.get_delta_weight(adapter_name, dtype=torch.float64)).cpu().numpy()
    spec, bank, lams, alpha = layer.adapter_operands(adapter_name)
    stored = bank.group_tensors(spec)
    core = stored["core"].detach().double()
    factors = TeRAFactors(
        core, tuple(None if (u := stored.get(f"u{n}")) is None else u.detach().double() for n in range(spec.order))
    )
    scales = [lam.detach().to(device=core.device, dtype=torch.float64) for lam in lams]
    return singular_values(spec, factors, scales, alpha).cpu().numpy()


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
    kind, value = rank_criterion(rank, energy, budget)
    rank_set = check_rank_set(rank_set)
    dtype = _check_dtype(dtype)
    if modules_to_save not in _HEAD_MODES:
        raise ValueError(f"modules_to_save must be one of {_HEAD_MODES}, got {modules_to_save!r}")
    if not isinstance(overwrite, bool):
        raise ValueError(f"overwrite must be True or False, got {overwrite!r}")
    check_inputs_batch(check_inputs)
    tera = find_tera_model(model)
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
        check_runnable(tera)
    dest = Path(folder)
    check_export_folder(dest, overwrite)

    spectra = [_spectrum(layer.module, adapter_name) for layer in layers]
    for layer, sv in zip(layers, spectra):
        layer.nonzero = exact_rank(sv, layer.shape)
    ranks = choose_ranks(layers, spectra, kind, value, rank_set)

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
        output_error, update_error = output_errors(model, tera, adapter_name, lora, check_inputs)

    head_state = {}
    for name, module in heads.items():
        for key, t in module.state_dict().items():
            head_state[f"{_PREFIX}{name}.{key}" if modules_to_save == "include" else f"{name}.{key}"] = (
                t.detach().cpu().contiguous()
            )
    if modules_to_save == "include":
        state.update(head_state)

    config = lora_config(tera, adapter_name, layers, ranks, heads if modules_to_save == "include" else {},
                          separate=bool(heads) and modules_to_save == "separate")
    write_lora_folder(dest, state, config, head_state if modules_to_save == "separate" else None, overwrite)
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
