"""Saving TeRA adapters without clobbering files, and reading a saved adapter's signature."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Mapping, Optional, Union

import torch

from .._files import publish, staging_dir, sweep_stale_temps
from ..core.factors import with_legacy_recipe
from ..torch.checkpoint import nonfinite_lambdas as checked_lambdas

__all__ = ["save_adapter", "read_adapter_signature"]

_MODEL_CARD = "README.md"
_WEIGHTS = "adapter_model.safetensors"
_EXPECTED = "an adapter saved by tera_tn.peft (save_adapter or save_pretrained)"
_SIGNATURE_KEYS = ("format", "seed", "factor_init", "factor_dtype", "alpha", "layers")


def save_adapter(model, path: Union[str, os.PathLike], *, overwrite: bool = False, **save_kwargs) -> Path:
    """``model.save_pretrained(path, **save_kwargs)`` that never overwrites files unless asked.

    PEFT's ``save_pretrained`` silently replaces ``adapter_config.json``,
    ``adapter_model.safetensors`` (and rewrites ``README.md``) in ``path``. This helper saves into a
    temporary sibling folder first, then moves the files into ``path``:

    * if any adapter file it would write already exists and ``overwrite`` is False, it raises
      ``FileExistsError`` listing them and leaves ``path`` untouched;
    * an existing ``README.md`` (PEFT's model card) is kept as it is unless ``overwrite=True``;
    * other files in ``path`` are never touched;
    * an error or a full disk leaves no temporary behind, and temporaries of an earlier save that
      was killed are removed.

    Returns ``Path(path)``.
    """
    dest = Path(path)
    if dest.exists() and not dest.is_dir():
        raise NotADirectoryError(f"{dest} exists and is not a folder; save_adapter expects a folder path")
    dest.parent.mkdir(parents=True, exist_ok=True)
    sweep_stale_temps(dest.parent)
    sweep_stale_temps(dest)
    with staging_dir(dest.parent, dest.name) as tmp:
        model.save_pretrained(str(tmp), **save_kwargs)
        produced = sorted(p.relative_to(tmp) for p in tmp.rglob("*") if p.is_file())
        conflicts = [str(rel) for rel in produced if (dest / rel).exists() and str(rel) != _MODEL_CARD]
        if conflicts and not overwrite:
            raise FileExistsError(
                f"{dest} already holds {', '.join(conflicts)}; pass overwrite=True to replace them "
                "(nothing was written)"
            )
        for rel in produced:
            target = dest / rel
            if str(rel) == _MODEL_CARD and target.exists() and not overwrite:
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            publish(tmp / rel, target, overwrite=overwrite)
    return dest


def _adapter_file(path: Union[str, os.PathLike]) -> Path:
    p = Path(path)
    if p.is_dir():
        if not (p / _WEIGHTS).is_file():
            raise FileNotFoundError(f"{p} holds no {_WEIGHTS}; expected a folder with {_EXPECTED}")
        return p / _WEIGHTS
    if not p.exists():
        raise FileNotFoundError(f"{p} does not exist; expected {_EXPECTED}")
    return p


def read_adapter_signature(path: Union[str, os.PathLike]) -> dict:
    """The TeRA signature stored in a saved adapter (folder or ``adapter_model.safetensors``).

    ``{"format", "seed", "factor_init", "core_scale", "generator_version", "factor_dtype", "alpha",
    "layers": {name: {"shape", "row_modes", "col_modes", "ranks", "diag", "fan_in_fan_out", "group"}}}``;
    an adapter saved before the factor recipe was recorded reads as generator version 1 with its core
    scale. Raises ``FileNotFoundError`` for a missing file and ``ValueError`` naming the file for
    anything unreadable.
    """
    from safetensors import SafetensorError, safe_open

    p = _adapter_file(path)
    try:
        with safe_open(str(p), framework="pt") as f:
            keys = [k for k in f.keys() if k.endswith("tera_signature")]
            if not keys:
                raise ValueError(f"{p} holds no tera_signature: it was not written by tera_tn.peft")
            raw = f.get_tensor(keys[0])
    except (SafetensorError, OSError) as err:
        raise _unreadable(p, err) from None
    try:
        sig = json.loads(bytes(raw.tolist()).decode())
    except (ValueError, TypeError, UnicodeDecodeError) as err:
        raise ValueError(f"{p}: unreadable tera_signature ({err}); expected the JSON that tera_tn.peft writes") from None
    missing = [k for k in _SIGNATURE_KEYS if not isinstance(sig, dict) or k not in sig]
    if missing:
        raise ValueError(f"{p}: the tera_signature lacks {missing}; expected an object with {list(_SIGNATURE_KEYS)}")
    return with_legacy_recipe(sig)


def _unreadable(path: Path, err: BaseException) -> ValueError:
    return ValueError(
        f"{path} is not a readable safetensors file ({err}): damaged, cut short by an interrupted copy or download, "
        f"or of another format; expected {_EXPECTED}"
    )


def check_weights_readable(folder: Union[str, os.PathLike], subfolder: Optional[str] = None) -> None:
    """Raise ``ValueError`` naming the file when ``folder`` (a local adapter folder, ``subfolder``
    inside it if given) holds an ``adapter_model.safetensors`` whose header safetensors refuses.

    PEFT's ``load_peft_weights`` would raise safetensors' own error, which names no file, after the
    adapter was already injected; reading the header (a few KB, and safetensors checks that it
    covers the whole file, so a truncated file fails here) first turns that into a message that
    does. Hub ids and folders without that file are left to PEFT."""
    from safetensors import SafetensorError, safe_open

    p = Path(folder) / subfolder if subfolder else Path(folder)
    weights = p / _WEIGHTS
    if not weights.is_file():
        return
    try:
        with safe_open(str(weights), framework="pt") as f:
            f.keys()
    except (SafetensorError, OSError) as err:
        raise _unreadable(weights, err) from None


def nonfinite_lambdas(state_dict: Mapping[str, object]) -> list[str]:
    """One line per λ tensor of a loaded adapter state dict that holds NaN or ±inf values (the
    plain-torch checkpoints' check, on the state dict's ``tera_lambda`` entries)."""
    return checked_lambdas(
        {k: t for k, t in state_dict.items() if "tera_lambda" in k and isinstance(t, torch.Tensor) and t.is_floating_point()}
    )
