"""Adapter checkpoints of the plain-torch API: :func:`save_tera` / :func:`load_tera`.

A checkpoint is one safetensors file (no pickle): the λ of every layer, ``"<layer>.lambda.<n>"``
(float32, one per λ_n), the adapter's description as the ``tera_signature`` tensor, and optionally
the frozen factors ``"factors.<group>.<name>"`` (regenerated from the seed on load, so stored ones
are only verified). The description (spec, seed, α, factor recipe of every layer; format 2) is
:mod:`tera_tn.core.adapter_format`, the one format of both APIs: :func:`load_tera` also reads a
PEFT adapter (its folder or ``adapter_model.safetensors``), and ``tera_tn.peft`` reads these
files; files written by tera_tn 0.1.0 (description in the safetensors header) still load.

The file describes itself: :func:`load_tera` into a model without TeRA layers rebuilds them from
these entries (spec, seed, α and recipe of every layer) before loading λ.

A whole model's adapter is a few KB: a full-rank order-6 4096×4096 layer trains 96 numbers.
"""

from __future__ import annotations

import math
import os
import warnings
from pathlib import Path
from typing import Union

import torch
from torch import nn

from ..atomic_files import sweep_stale_temps, write_atomic
from ..core.adapter_format import (
    PER_MODE, SIGNATURE_KEY, adapter_diff, adapter_metadata, entry_diff, metadata_diff, per_layer_view,
)
from ..core.factors import factor_recipe, recipe_diff
from ..core.spec import TeRASpec
from .adapter import DEFAULT_ADAPTER, weight_norm
from .adapter_file import (
    CheckpointMismatch, adapter_file_path, concatenated, describe_layer, factor_key, lambda_keys, metadata_of,
    open_adapter_file, read_adapter_metadata, signature_tensor,
)
from .bank import FactorBank
from .layer import TeRALinear, check_base_weight
from .load_checks import delta_bound, factor_diff, layer_lambda_problems, nonfinite_lambdas
from .model import install_layer, place_bank, tera_layers

# adapter_diff, factor_diff and delta_bound stay importable from here (their homes are
# tera_tn.core.adapter_format and tera_tn.torch.load_checks).
__all__ = ["save_tera", "load_tera", "read_tera_metadata", "CheckpointMismatch", "adapter_diff", "factor_diff",
           "delta_bound"]


def save_tera(model: nn.Module, path: Union[str, os.PathLike], *, include_factors: bool = False, overwrite: bool = False) -> Path:
    """Write the TeRA adapter of ``model`` to ``path`` (safetensors).

    Args:
        include_factors: also store the frozen factors (verified on load; normally redundant).
        overwrite: replace an existing file; without it an existing ``path`` raises
            ``FileExistsError``. The file is written to a temporary name and renamed, so a
            crash never leaves a truncated checkpoint behind; temporaries of a killed save are
            removed by the next save or load in the same folder.
    """
    from safetensors.torch import save

    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a folder; save_tera expects a file path such as {path / 'adapter.safetensors'}")
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; pass overwrite=True to replace it")
    layers = dict(tera_layers(model))
    if not layers:
        raise ValueError("model has no TeRA layers to save; call add_tera first")
    meta = adapter_metadata({name: describe_layer(layer) for name, layer in layers.items()},
                            lambda_layout=PER_MODE, factors_included=include_factors)
    tensors: dict[str, torch.Tensor] = {SIGNATURE_KEY: signature_tensor(meta)}
    for name, layer in layers.items():
        group = meta["layers"][name]["group"]
        if include_factors and f"factors.{group}.core" not in tensors:
            for key, t in layer.tera_bank.group_tensors(layer.spec).items():
                tensors[f"factors.{group}.{key}"] = t.detach().cpu().contiguous()
        for n, lam in enumerate(layer.scales()):
            tensors[f"{name}.lambda.{n}"] = lam.detach().to(device="cpu", dtype=torch.float32).contiguous()
    path.parent.mkdir(parents=True, exist_ok=True)
    sweep_stale_temps(path.parent)
    # Serialized in memory (a checkpoint is KBs, MBs with factors) and written by write_atomic:
    # safetensors' own save_file would leave an unsweepable ``.tmpXXXXXX`` beside ``path`` if killed.
    write_atomic(path, save(tensors), overwrite=overwrite)
    return path


def read_tera_metadata(path: Union[str, os.PathLike]) -> dict:
    """The validated description of an adapter file (or PEFT adapter folder), every setting in its
    layer's entry: ``{"format", "library_version", "factors_included", "lambda_layout", "layers":
    {name: {"spec", "group", "seed", "factor_init", "core_scale", "generator_version",
    "factor_dtype", "alpha", "alpha_scaling", "update", "basis", "fan_in_fan_out"[, "w0_norm"]}}}``. Files written
    before the recipe was recorded read as generator version 1 with its core scale.

    Raises ``FileNotFoundError`` / ``IsADirectoryError`` for a missing path or a folder without an
    adapter file, and ``ValueError`` naming the file for anything that is not a readable adapter.
    """
    return per_layer_view(read_adapter_metadata(path, folder_error=IsADirectoryError))


@torch.no_grad()
def load_tera(model: nn.Module, path: Union[str, os.PathLike], *, strict: bool = True) -> dict:
    """Load λ vectors from ``path`` into the TeRA layers of ``model`` (in place).

    ``path`` is a :func:`save_tera` file, a PEFT TeRA adapter folder or its
    ``adapter_model.safetensors`` (layer names are the base model's), or a file of tera_tn 0.1.0.

    A model without TeRA layers (the plain base model) is adapted first, from the checkpoint
    alone: every layer it names becomes a :class:`~tera_tn.torch.TeRALinear` with the stored spec,
    seed, α and factor recipe, and every parameter other than λ is frozen, as
    :func:`~tera_tn.torch.add_tera` does; options the file does not record (dropout, strategy,
    ``cache_delta``, ``check_finite``) take their defaults. Its Linear layers must have the
    stored shapes. If anything fails, the model is put back as it was.

    In a model that already has TeRA layers, every layer's spec, seed, α and factor recipe (init,
    core scale, generator version, dtype) must equal the checkpoint's, and stored factors (if any)
    must equal the ones the model generated. With ``strict`` the layer names must match exactly;
    without it, layers present on one side only are skipped. Raises :class:`CheckpointMismatch`
    listing every difference, or ``ValueError`` for a damaged file or λ holding NaN/Inf, before
    anything is modified. Returns the checkpoint's description (as :func:`read_tera_metadata`).
    """
    path = adapter_file_path(path, folder_error=IsADirectoryError)
    with open_adapter_file(path) as f:
        meta = metadata_of(f, path)
    sweep_stale_temps(path.parent)  # one directory listing; leftovers of a killed save_tera
    if next(tera_layers(model), None) is not None:
        return _load_into_adapted(model, path, meta, strict)
    undo = _adapt_from_checkpoint(model, path, meta["layers"], strict)
    try:
        return _load_into_adapted(model, path, meta, strict=False)
    except BaseException:
        undo()
        raise


def _adapt_from_checkpoint(model: nn.Module, path: Path, saved_layers: dict, strict: bool):
    """Replace the Linear layers the checkpoint names by TeRA layers built from its entries;
    returns a function that puts the model back as it was."""
    modules = dict(model.named_modules())
    problems: list[str] = []
    plan = []
    for name, info in saved_layers.items():
        module = modules.get(name)
        if module is None:
            if strict:
                problems.append(f"layer {name!r} of the checkpoint is not a module of the model")
            continue
        if not isinstance(module, nn.Linear):
            problems.append(f"layer {name!r} is a {type(module).__name__} in the model; the checkpoint adapts an nn.Linear")
            continue
        spec = TeRASpec.from_dict(info["spec"])  # validated by the reader
        if spec.shape != (module.out_features, module.in_features):
            problems.append(
                f"layer {name!r}: the checkpoint adapts a {spec.d_out}×{spec.d_in} weight (out × in), the model's "
                f"Linear is {module.out_features}×{module.in_features}: was it saved from another base model?"
            )
            continue
        # The factors are generated by this tera_tn: only the recipe it knows can rebuild them.
        diffs = recipe_diff(info, factor_recipe(info["factor_init"], info["factor_dtype"]))
        if diffs:
            problems.append(f"layer {name!r} differs: " + "; ".join(diffs))
            continue
        check_base_weight(module, name)
        if "w0_norm" in info:
            have = weight_norm(module.weight)
            if not math.isclose(float(info["w0_norm"]), have, rel_tol=1e-9, abs_tol=0.0):
                how = ("ΔW multiplies" if info["update"] == "multiplicative" else "bases came from"
                       if info["basis"] == "w0" else "α was set from")
                problems.append(f"layer {name!r}: the adapter's {how} a base weight of norm {info['w0_norm']!r} "
                                f"(update={info['update']!r}, basis={info['basis']!r}, alpha_scaling="
                                f"{info['alpha_scaling']!r}), this model's weight has norm {have!r}: another base model")
                continue
        plan.append((name, module, spec, info))
    if problems:
        raise CheckpointMismatch(f"cannot load {path} into this model:\n  - " + "\n  - ".join(problems))
    requires_grad = [(p, p.requires_grad) for p in model.parameters()]
    banks: dict[tuple, FactorBank] = {}
    for key in {(info["seed"], info["factor_init"], info["factor_dtype"]) for *_, info in plan}:
        linears = [m for _, m, _, info in plan if (info["seed"], info["factor_init"], info["factor_dtype"]) == key]
        banks[key] = place_bank(FactorBank(*key), linears)
    for p, _ in requires_grad:
        p.requires_grad_(False)
    for name, linear, spec, info in plan:
        bank = banks[info["seed"], info["factor_init"], info["factor_dtype"]]
        layer = TeRALinear(linear, spec, bank=bank, alpha=info["alpha"], update=info["update"], basis=info["basis"])
        if info["alpha_scaling"] == "w0_relative":  # α is the saved α_l; the layer keeps pinning the W0 it came from
            layer.tera_alpha_scaling[DEFAULT_ADAPTER] = "w0_relative"
            layer.tera_w0_norm[DEFAULT_ADAPTER] = float(info["w0_norm"])
        install_layer(model, name, layer)

    def undo() -> None:
        for name, linear, _, _ in plan:
            parent, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, attr, linear)
        for p, flag in requires_grad:
            p.requires_grad_(flag)

    return undo


def _load_into_adapted(model: nn.Module, path: Path, meta: dict, strict: bool) -> dict:
    saved_layers: dict = meta["layers"]
    model_layers = dict(tera_layers(model))
    problems = metadata_diff(meta, {"layers": {name: describe_layer(layer) for name, layer in model_layers.items()}},
                             strict=strict)
    per_mode = meta["lambda_layout"] == PER_MODE
    # per layer: [(key in the file, the model's λ_n it fills, the tensor)]
    loads: dict[str, list[tuple[str, list[torch.Tensor], torch.Tensor]]] = {}
    with open_adapter_file(path) as f:
        keys = list(f.keys())
        common = sorted(set(saved_layers) & set(model_layers))
        found, _ = lambda_keys(meta, keys, common)
        checked: set[tuple] = set()
        for name in common:
            info, layer = saved_layers[name], model_layers[name]
            if entry_diff(info, describe_layer(layer)):
                continue  # listed by metadata_diff; its λ are not this model's
            lams, spec = layer.scales(), layer.spec
            wanted = ([(f"{name}.lambda.{n}", [lam], tuple(lam.shape), f"λ_{n}") for n, lam in enumerate(lams)] if per_mode
                      else [(k, lams, (spec.num_trainable,), "λ") for k in found.get(name, [])[:1]])
            if not per_mode and not wanted:
                problems.append(f"layer {name!r}: its λ tensor ('{name}.tera_lambda') is missing from the checkpoint")
            for key, targets, shape, what in wanted:
                if key not in found.get(name, []):
                    problems.append(f"layer {name!r}: tensor {key!r} is missing from the checkpoint")
                    continue
                t = f.get_tensor(key)
                if tuple(t.shape) != shape or not t.is_floating_point():
                    problems.append(f"layer {name!r}: {key} is {t.dtype} of shape {tuple(t.shape)}, "
                                    f"the model's {what} is floating point of shape {shape}")
                    continue
                loads.setdefault(name, []).append((key, targets, t))
            group = (id(layer.tera_bank), spec, info["group"])
            if meta.get("factors_included") and group not in checked:
                checked.add(group)
                problems += factor_diff(layer.tera_bank, spec, f"factors.{info['group']}",
                                        lambda key: _stored_factor(f, keys, key))
    if problems:
        raise CheckpointMismatch(f"cannot load {path} into this model:\n  - " + "\n  - ".join(problems))
    nonfinite = nonfinite_lambdas({key: t for parts in loads.values() for key, _, t in parts})
    if nonfinite:
        raise ValueError(f"{path} holds non-finite λ (expected finite numbers; nothing was loaded):\n  - "
                         + "\n  - ".join(nonfinite))
    absurd, notes = [], []
    for name, layer in model_layers.items():
        parts = loads.get(name, [])
        if sum(len(targets) for _, targets, _ in parts) == layer.spec.order:
            lam = concatenated([t.float() for _, _, t in parts])
            label = f"{name}.lambda.*" if per_mode else parts[0][0]
            found_, warned = layer_lambda_problems(label, lam, layer, layer.spec, layer.tera_bank, layer.alpha,
                                                   plain=layer._plain(DEFAULT_ADAPTER))
            absurd += found_
            notes += warned
    if absurd:
        raise ValueError(f"{path} holds absurd λ (nothing was loaded):\n  - " + "\n  - ".join(absurd))
    if notes:
        warnings.warn(f"loaded {path}, but:\n  - " + "\n  - ".join(notes), stacklevel=3)
    for parts in loads.values():
        for _, targets, t in parts:
            pieces = torch.split(t.reshape(-1), [lam.numel() for lam in targets])
            for lam, piece in zip(targets, pieces, strict=True):
                lam.copy_(piece.reshape(lam.shape).to(device=lam.device, dtype=lam.dtype))
    for layer in model_layers.values():
        layer.clear_cache()
    return per_layer_view(meta)


def _stored_factor(f, keys: list[str], label: str):
    """The stored factor ``label`` names (``<prefix>.<group>.<name>``) in either layout, or None."""
    group, name = label.split(".")[-2:]
    key = factor_key(keys, group, name)
    return None if key is None else f.get_tensor(key)
