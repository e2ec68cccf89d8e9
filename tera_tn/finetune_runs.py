"""The record of a fine-tuning run over several seeds: what was trained on what, and each seed's
metrics, as ``tera-tn finetune`` writes it to ``results.json`` and prints it as a table.

:class:`FinetuneRuns` is an immutable value: :meth:`FinetuneRuns.with_run` returns a new record
with one more seed's metrics, :meth:`FinetuneRuns.to_json` is the strict-JSON ``results.json``
(a non-finite metric is null, named under ``nonfinite`` and marks the run diverged:
:func:`strict_metrics`) and ``str()`` the table of seeds.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, replace
from typing import Any, Mapping, Optional

__all__ = ["FinetuneRuns", "strict_metrics"]


def strict_metrics(row: Mapping[str, Any]) -> dict:
    """``row`` as strict JSON: a non-finite number becomes null, is named under ``nonfinite`` and
    flags the run ``diverged`` (NaN/Infinity are not JSON; a loss that blew up is a divergence)."""
    if not isinstance(row, Mapping):
        raise ValueError(f"strict_metrics needs a mapping of metric names to values, got {type(row).__name__}")
    bad = {k: repr(v) for k, v in row.items() if isinstance(v, float) and not math.isfinite(v)}
    if not bad:
        return dict(row)
    return {**{k: (None if k in bad else v) for k, v in row.items()}, "nonfinite": bad, "diverged": True}


@dataclass(frozen=True)
class FinetuneRuns:
    """One fine-tuning command's record (``results.json``).

    Attributes:
        labels: the label names, in index order.
        method: the adapter method (``tera``, ``lora``, ``vera`` …).
        adapter: the options of the method's PEFT config.
        model: the base model folder.
        data: the data files: ``{"train", "validation", "test"}`` (None where not given).
        text_column, label_column: the columns read.
        seeds: the seeds asked for, one run each.
        runs: each finished seed's metrics (:func:`strict_metrics` of ``{"seed", **metrics}``).
    """

    labels: tuple[str, ...]
    method: str
    adapter: Mapping[str, Any]
    model: str
    data: Mapping[str, Optional[str]]
    text_column: str
    label_column: str
    seeds: tuple[int, ...]
    runs: tuple[Mapping[str, Any], ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        seeds = tuple(self.seeds) if isinstance(self.seeds, (list, tuple)) else ()
        if not seeds or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in seeds):
            raise ValueError(f"FinetuneRuns seeds must be a non-empty sequence of non-negative integers, got "
                             f"{self.seeds!r}")
        object.__setattr__(self, "seeds", seeds)
        object.__setattr__(self, "labels", tuple(self.labels))
        object.__setattr__(self, "runs", tuple(self.runs))
        if len(self.runs) > len(seeds):
            raise ValueError(f"FinetuneRuns holds {len(self.runs)} runs for {len(seeds)} seeds")

    @property
    def complete(self) -> bool:
        """Whether every seed has finished."""
        return len(self.runs) == len(self.seeds)

    def with_run(self, seed: int, metrics: Mapping[str, Any]) -> "FinetuneRuns":
        """A record with one more finished seed (its metrics made strict JSON)."""
        if seed not in self.seeds:
            raise ValueError(f"FinetuneRuns has no seed {seed!r}; its seeds are {list(self.seeds)}")
        return replace(self, runs=self.runs + (strict_metrics({"seed": seed, **metrics}),))

    def to_dict(self) -> dict:
        """The ``results.json`` object."""
        return {"labels": list(self.labels), "method": self.method, "adapter": dict(self.adapter), "model": self.model,
                "data": dict(self.data), "text_column": self.text_column, "label_column": self.label_column,
                "seeds": list(self.seeds), "complete": self.complete, "runs": [dict(r) for r in self.runs]}

    def to_json(self, indent: Optional[int] = 2) -> str:
        """``results.json``'s text (strict JSON: never NaN or Infinity)."""
        return json.dumps(self.to_dict(), indent=indent, allow_nan=False)

    def to_text(self) -> str:
        """One line per finished seed: validation and test accuracy, trainable numbers, learning
        rate, training seconds, and ``(diverged)`` where the run diverged."""
        lines = [f"{'seed':>4}  {'val acc':>7}  {'test acc':>8}  {'trainable':>10}  {'lr':>7}  {'train s':>7}"]
        for r in self.runs:
            test = f"{r['test_accuracy']:.4f}" if r.get("test_accuracy") is not None else "-"
            val = f"{r['val_accuracy']:>7.4f}" if r.get("val_accuracy") is not None else f"{'-':>7}"
            lines.append(f"{r['seed']:>4}  {val}  {test:>8}  {r['trainable_params']:>10,}  {r['lr']:>7g}  "
                         f"{r['train_time_s']:>7.1f}{'  (diverged)' if r.get('diverged') else ''}")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.to_text()
