"""Saving TeRA adapters without clobbering files, and reading a saved adapter's signature."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Union

__all__ = ["save_adapter", "read_adapter_signature"]

_MODEL_CARD = "README.md"


def save_adapter(model, path: Union[str, os.PathLike], *, overwrite: bool = False, **save_kwargs) -> Path:
    """``model.save_pretrained(path, **save_kwargs)`` that never overwrites files unless asked.

    PEFT's ``save_pretrained`` silently replaces ``adapter_config.json``,
    ``adapter_model.safetensors`` (and rewrites ``README.md``) in ``path``. This helper saves into a
    temporary sibling folder first, then moves the files into ``path``:

    * if any adapter file it would write already exists and ``overwrite`` is False, it raises
      ``FileExistsError`` listing them and leaves ``path`` untouched;
    * an existing ``README.md`` (PEFT's model card) is kept as it is unless ``overwrite=True``;
    * other files in ``path`` are never touched.

    Returns ``Path(path)``.
    """
    dest = Path(path)
    if dest.exists() and not dest.is_dir():
        raise FileExistsError(f"{dest} exists and is not a folder")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tera-save-", dir=dest.parent))
    try:
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
            os.replace(tmp / rel, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def read_adapter_signature(path: Union[str, os.PathLike]) -> dict:
    """The TeRA signature stored in a saved adapter (folder or ``adapter_model.safetensors``).

    ``{"format", "seed", "factor_init", "factor_dtype", "alpha", "layers": {name: {"shape", "row_modes",
    "col_modes", "ranks", "diag", "fan_in_fan_out", "group"}}}``.
    """
    from safetensors import safe_open

    p = Path(path)
    if p.is_dir():
        p = p / "adapter_model.safetensors"
    with safe_open(str(p), framework="pt") as f:
        keys = [k for k in f.keys() if k.endswith("tera_signature")]
        if not keys:
            raise ValueError(f"{p} holds no tera_signature: it was not written by tera_tn.peft")
        raw = f.get_tensor(keys[0])
    try:
        return json.loads(bytes(raw.tolist()).decode())
    except (ValueError, UnicodeDecodeError) as e:
        warnings.warn(f"unreadable tera_signature in {p}: {e}")
        raise ValueError(f"{p}: unreadable tera_signature ({e})") from None
