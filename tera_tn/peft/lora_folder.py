"""The PEFT LoRA folder :func:`~tera_tn.peft.export_lora` writes: its file names, the check of the
destination, the ``LoraConfig`` (``r = lora_alpha`` = the largest layer rank, the others in
``rank_pattern``/``alpha_pattern``, so scaling is 1 in every layer under PEFT's and vLLM's rules)
and the atomic write of the files.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

from ..atomic_files import publish, staging_dir, sweep_stale_temps

__all__ = ["WEIGHTS_FILE", "CONFIG_FILE", "MODULES_TO_SAVE_FILE", "check_export_folder", "lora_config",
           "write_lora_folder"]

#: the LoRA tensors (PEFT's file name)
WEIGHTS_FILE = "adapter_model.safetensors"
#: the ``LoraConfig`` (PEFT's file name)
CONFIG_FILE = "adapter_config.json"
#: where ``modules_to_save="separate"`` writes the trained copies of whole modules (base-model key names)
MODULES_TO_SAVE_FILE = "modules_to_save.safetensors"


def check_export_folder(dest: Path, overwrite: bool) -> None:
    """Refuse a ``dest`` that is a file, or a non-empty folder unless ``overwrite``."""
    if dest.exists() and not dest.is_dir():
        raise NotADirectoryError(f"{dest} exists and is not a folder; export_lora expects a folder path")
    if dest.is_dir() and any(dest.iterdir()) and not overwrite:
        raise FileExistsError(
            f"{dest} is not empty; export_lora writes into a new or empty folder, or replaces its {CONFIG_FILE}, "
            f"{WEIGHTS_FILE} and {MODULES_TO_SAVE_FILE} with overwrite=True"
        )


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


def lora_config(tera, adapter_name: str, layers: Sequence, ranks: list[int], heads: dict, separate: bool):
    """The ``LoraConfig`` of the exported ``layers`` (each with ``name`` and ``module``) at ``ranks``,
    base model and task from the TeRA model's config; ``heads`` are the modules_to_save kept in
    the checkpoint, ``separate`` whether heads are written beside it (the task is then left out)."""
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


def write_lora_folder(dest: Path, state: dict, config, heads: Optional[dict], overwrite: bool) -> None:
    """Stage every file beside ``dest``, then move each in atomically (never over a file unless
    ``overwrite``); with ``overwrite`` a modules_to_save file of an earlier export is removed."""
    from safetensors.torch import save_file

    dest.mkdir(parents=True, exist_ok=True)
    sweep_stale_temps(dest.parent)
    with staging_dir(dest.parent, dest.name) as tmp:
        save_file(state, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        config.save_pretrained(str(tmp))
        names = [WEIGHTS_FILE, CONFIG_FILE]
        if heads is not None:
            save_file(heads, str(tmp / MODULES_TO_SAVE_FILE), metadata={"format": "pt"})
            names.append(MODULES_TO_SAVE_FILE)
        for name in names:
            publish(tmp / name, dest / name, overwrite=overwrite)
    if heads is None and overwrite and (dest / MODULES_TO_SAVE_FILE).exists():
        (dest / MODULES_TO_SAVE_FILE).unlink()
