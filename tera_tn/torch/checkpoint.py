"""Adapter checkpoints in safetensors: λ vectors + spec + seed + library version, factors optional.

File layout (no pickle anywhere, only ``safetensors``):

* tensors ``"<layer name>.lambda.<n>"``: the λ_n of each layer, float32;
* optionally ``"factors.<group>.core"`` / ``"factors.<group>.u<n>"``: the frozen factors (they
  are regenerated from the seed on load, so stored factors are only verified against them);
* metadata ``"tera_tn"``: JSON ``{"format": 1, "library_version", "layers": {name: {"spec",
  "alpha", "seed", "factor_init", "factor_dtype", "group"}}, "factors_included"}``.

A whole model's adapter is a few KB: a full-rank order-6 4096×4096 layer trains 96 numbers.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Union

import torch
from torch import nn

from .. import __version__
from ..spec import TeRASpec
from .model import tera_layers

__all__ = ["save_tera", "load_tera", "read_tera_metadata", "CheckpointMismatch"]

_FORMAT = 1
_META_KEY = "tera_tn"


class CheckpointMismatch(ValueError):
    """The checkpoint does not fit the model; the message lists every difference."""


def save_tera(model: nn.Module, path: Union[str, os.PathLike], *, include_factors: bool = False, overwrite: bool = False) -> Path:
    """Write the TeRA adapter of ``model`` to ``path`` (safetensors).

    Args:
        include_factors: also store the frozen factors (verified on load; normally redundant).
        overwrite: replace an existing file; without it an existing ``path`` raises
            ``FileExistsError``. The file is written to a temporary name and renamed, so a
            crash never leaves a truncated checkpoint behind.
    """
    from safetensors.torch import save_file

    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; pass overwrite=True to replace it")
    tensors: dict[str, torch.Tensor] = {}
    layers = {}
    groups: dict[tuple, str] = {}
    for name, layer in tera_layers(model):
        bank = layer.tera_bank
        gkey = (id(bank), layer.spec)
        if gkey not in groups:
            groups[gkey] = f"g{len(groups)}"
            if include_factors:
                for key, t in bank.group_tensors(layer.spec).items():
                    tensors[f"factors.{groups[gkey]}.{key}"] = t.detach().cpu().contiguous()
        for n, lam in enumerate(layer.tera_lambda):
            tensors[f"{name}.lambda.{n}"] = lam.detach().to(device="cpu", dtype=torch.float32).contiguous()
        layers[name] = {
            "spec": layer.spec.to_dict(),
            "alpha": layer.alpha,
            "seed": bank.seed,
            "factor_init": bank.factor_init,
            "factor_dtype": bank.dtype_name,
            "group": groups[gkey],
        }
    if not layers:
        raise ValueError("model has no TeRA layers to save; call add_tera first")
    meta = {"format": _FORMAT, "library_version": __version__, "layers": layers, "factors_included": include_factors}
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata={_META_KEY: json.dumps(meta)})
        if not overwrite and path.exists():
            raise FileExistsError(f"{path} appeared while saving; pass overwrite=True to replace it")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def read_tera_metadata(path: Union[str, os.PathLike]) -> dict:
    """The parsed ``tera_tn`` metadata of a checkpoint (raises ValueError for foreign files)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    if _META_KEY not in meta:
        raise ValueError(f"{path} is not a tera_tn checkpoint (no {_META_KEY!r} metadata)")
    parsed = json.loads(meta[_META_KEY])
    if parsed.get("format") != _FORMAT:
        raise ValueError(f"{path} has checkpoint format {parsed.get('format')!r}; this tera_tn reads format {_FORMAT}")
    return parsed


def _spec_diff(saved: dict, spec: TeRASpec) -> list[str]:
    current = spec.to_dict()
    return [f"{k}: checkpoint {saved.get(k)!r}, model {current[k]!r}" for k in current if saved.get(k) != current[k]]


@torch.no_grad()
def load_tera(model: nn.Module, path: Union[str, os.PathLike], *, strict: bool = True) -> dict:
    """Load λ vectors from ``path`` into the TeRA layers of ``model`` (in place).

    Every layer's spec, seed and factor init must equal the checkpoint's, and stored factors
    (if any) must equal the ones the model generated. With ``strict`` the layer names must match
    exactly; without it, layers present on one side only are skipped. Raises
    :class:`CheckpointMismatch` listing every difference before anything is modified.
    Returns the checkpoint metadata.
    """
    from safetensors import safe_open

    meta = read_tera_metadata(path)
    saved_layers: dict = meta["layers"]
    model_layers = dict(tera_layers(model))
    problems: list[str] = []
    missing = sorted(set(saved_layers) - set(model_layers))
    unexpected = sorted(set(model_layers) - set(saved_layers))
    if strict and missing:
        problems.append(f"layers in the checkpoint but not in the model: {missing}")
    if strict and unexpected:
        problems.append(f"TeRA layers in the model but not in the checkpoint: {unexpected}")
    with safe_open(str(path), framework="pt") as f:
        keys = set(f.keys())
        loads: list[tuple[torch.nn.Parameter, torch.Tensor]] = []
        for name in sorted(set(saved_layers) & set(model_layers)):
            info, layer = saved_layers[name], model_layers[name]
            bank = layer.tera_bank
            diffs = _spec_diff(info["spec"], layer.spec)
            for field, current in (("seed", bank.seed), ("factor_init", bank.factor_init), ("alpha", layer.alpha)):
                if info.get(field) != current:
                    diffs.append(f"{field}: checkpoint {info.get(field)!r}, model {current!r}")
            if diffs:
                problems.append(f"layer {name!r} differs: " + "; ".join(diffs))
                continue
            for n, lam in enumerate(layer.tera_lambda):
                key = f"{name}.lambda.{n}"
                if key not in keys:
                    problems.append(f"layer {name!r}: tensor {key!r} is missing from the checkpoint")
                    continue
                t = f.get_tensor(key)
                if tuple(t.shape) != tuple(lam.shape):
                    problems.append(f"layer {name!r}: {key} has shape {tuple(t.shape)}, the model's λ_{n} has {tuple(lam.shape)}")
                    continue
                loads.append((lam, t))
            if meta.get("factors_included"):
                for key, current in bank.group_tensors(layer.spec).items():
                    fkey = f"factors.{info['group']}.{key}"
                    if fkey not in keys:
                        problems.append(f"layer {name!r}: stored factor {fkey!r} is missing")
                    elif not torch.equal(f.get_tensor(fkey).to(current.dtype), current.cpu()):
                        problems.append(
                            f"layer {name!r}: stored factor {fkey} differs from the one generated from seed {bank.seed}"
                        )
    if problems:
        raise CheckpointMismatch(f"cannot load {path} into this model:\n  - " + "\n  - ".join(problems))
    for lam, t in loads:
        lam.copy_(t.to(device=lam.device, dtype=lam.dtype))
    for layer in model_layers.values():
        layer.clear_cache()
    return meta
