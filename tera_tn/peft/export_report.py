"""What :func:`~tera_tn.peft.export_lora` wrote and how close it is: :class:`ExportReport` (a table as
``str()``, JSON as ``to_dict()``) with one :class:`LayerExport` per exported layer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from .lora_folder import MODULES_TO_SAVE_FILE, WEIGHTS_FILE

__all__ = ["ExportReport", "LayerExport"]


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
            where = MODULES_TO_SAVE_FILE if self.modules_to_save_mode == "separate" else f"{WEIGHTS_FILE} (PEFT only)"
            lines.append(f"modules_to_save {list(self.modules_to_save)} written to {where}")
        if self.output_error is not None:
            update = "" if self.update_error is None else f", {self.update_error:.2e} of what the adapter changes"
            lines.append(f"model output vs the TeRA model: relative error {self.output_error:.2e}{update}")
        return "\n".join(lines)
