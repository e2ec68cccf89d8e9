"""Saving TeRA adapters without clobbering files, and reading a saved adapter's description (the
format both APIs share: :mod:`tera_tn.core.adapter_format`)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Union

from ..atomic_files import publish, staging_dir, sweep_stale_temps
from ..torch.adapter_file import WEIGHTS_NAME, read_adapter_metadata, unreadable

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


def read_adapter_signature(path: Union[str, os.PathLike]) -> dict:
    """The description stored in a saved adapter (folder or ``adapter_model.safetensors``, or a
    ``tera_tn.torch.save_tera`` file): the reader of both APIs,
    :func:`tera_tn.torch.adapter_file.read_adapter_metadata`.

    ``{"format", "library_version", "factors_included", "lambda_layout", <adapter-wide "seed",
    "factor_init", "core_scale", "generator_version", "factor_dtype", "alpha", "alpha_scaling", "update", "basis">,
    "layers": {name: {"spec", "group", "seed", …, "alpha", "fan_in_fan_out"[, "w0_norm"]}}}``
    (see :mod:`tera_tn.core.adapter_format`); an adapter saved before the factor recipe was recorded
    reads as generator version 1 with its core scale. Raises ``FileNotFoundError`` for a missing file
    and ``ValueError`` naming the file for anything unreadable.
    """
    return read_adapter_metadata(path)


def check_weights_readable(folder: Union[str, os.PathLike], subfolder: Optional[str] = None) -> None:
    """Raise ``ValueError`` naming the file when ``folder`` (a local adapter folder, ``subfolder``
    inside it if given) holds an ``adapter_model.safetensors`` whose header safetensors refuses.

    PEFT's ``load_peft_weights`` would raise safetensors' own error, which names no file, after the
    adapter was already injected; reading the header (a few KB, and safetensors checks that it
    covers the whole file, so a truncated file fails here) first turns that into a message that
    does. Hub ids and folders without that file are left to PEFT."""
    from safetensors import SafetensorError, safe_open

    p = Path(folder) / subfolder if subfolder else Path(folder)
    weights = p / WEIGHTS_NAME
    if not weights.is_file():
        return
    try:
        with safe_open(str(weights), framework="pt") as f:
            f.keys()
    except (SafetensorError, OSError) as err:
        raise unreadable(weights, err) from None
