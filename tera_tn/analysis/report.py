"""Model-level comparison of TeRA with LoRA, VeRA and HiRA: parameters, adapter file size, rank.

For a list of layer shapes (a built-in set from :mod:`tera_tn.analysis.shapes`, a list of
``(d_out, d_in)``, or the ``nn.Linear`` layers of a torch model) and a list of methods,
:func:`model_report` gives one row per method:

* trainable parameters and frozen shared parameters — from :func:`tera_tn.analysis.accounting.method_totals`;
* adapter file size — the exact byte size of a ``safetensors`` file holding the trainable
  tensors in float32 (:func:`tera_tn.analysis.methods.adapter_file_bytes`, an exact formula of
  the format, tested against real ``safetensors.numpy.save`` output). Frozen shared tensors (TeRA's core and factors,
  VeRA's A/B) are regenerated from a seed and not stored; a classification head is not counted;
* max rank — the smallest, over the layers, of each layer's maximum rank of ΔW;
* for TeRA, the rank achieved at random λ (``init_scales(spec, "random")``, |λ| in [0.5, 2]) with
  random orthogonal frozen factors, computed per shape group either as the numerical rank
  (float64 threshold) of the exact structured spectrum (:func:`tera_tn.analysis.spectrum.tera_singular_values`)
  when its core matrix is small, or as the theoretical rank (rank theorem) otherwise — a
  dense SVD of e.g. an 11008 × 4096 update is never computed. The row says which was used.

Output: :meth:`ModelReport.to_table` (rich-rendered when rich is installed) and
:meth:`ModelReport.to_dict` / :meth:`ModelReport.to_json`. Several models with the data of their
figures, written into a folder, are :mod:`tera_tn.analysis.report_folder` (``tera-tn report``).

Adapter file sizes are those of the ``adapter_model.safetensors`` PEFT writes: its keys
(``base_model.model.<module>.lora_A.weight`` …; TeRA: one ``<module>.tera_lambda`` per layer plus
the adapter's ``uint8`` signature), checked against real saves in the tests.
"""

from __future__ import annotations

import io
import json
import math
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable, Optional, Sequence, Union

from .accounting import method_totals, spec_totals
from ..core.factors import init_scales, random_factors
from ..core.network import TeRANetwork, generic_rank
from .methods import Method, adapter_file_bytes
from .rank import summarize_singular_values
from .shapes import LayerShape, as_layer_shapes, linear_shapes, model_shapes
from ..core.spec import TeRASpec
from .spectrum import network_singular_values

__all__ = ["DEFAULT_METHODS", "ACHIEVED_MODES", "MethodRow", "ModelReport", "model_report"]

DEFAULT_METHODS = (
    "tera",  # the library's defaults
    "tera:order=6",
    # half ranks cut the trainable count only where the diagonals sit on the ranks
    "tera:order=6,ranks=0.5,diag=rank",
    "lora:r=8",
    "lora:r=32",
    "vera:r=256",
    "hira:r=32",
)
ACHIEVED_MODES = ("auto", "structured", "theoretical", "none")
# A structured spectrum SVDs a ∏R_row × ∏R_col matrix; above this smaller side the report uses
# the theoretical rank instead (a 1024² SVD takes ~0.3 s on 2 cores, a 4096² one ~30 s).
STRUCTURED_MAX_SIDE = 1024


# --------------------------------------------------------------------------------------------
# the report
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ShapeGroupRow:
    """One distinct ``(d_out, d_in)`` under one method."""

    d_out: int
    d_in: int
    count: int
    trainable_per_layer: int
    max_rank: int
    achieved_rank: Optional[int] = None
    achieved_source: Optional[str] = None
    achieved_rank_float32: Optional[int] = None
    spec: Optional[str] = None


@dataclass(frozen=True)
class MethodRow:
    """One method over all layers.

    Attributes:
        method, label: kind and human-readable label.
        config: the method's parameters (``r`` or ``order``/``ranks``/``diag``).
        trainable: trainable numbers over all layers.
        trainable_fraction: ``trainable`` over the dense parameters of the layers.
        frozen_shared: frozen numbers stored once (TeRA per shape group; VeRA's A, B).
        adapter_bytes: exact safetensors file size of the trainable tensors in float32.
        max_rank: the smallest per-layer maximum rank of ΔW.
        full_rank_layers: layers whose maximum rank is ``min(d_out, d_in)``.
        n_layers: adapted layers.
        achieved_rank: TeRA only: the smallest rank at random λ over the layers.
        achieved_source: ``"structured"`` (numerical rank, float64 threshold, of the exact
            structured spectrum), ``"theoretical"`` (rank theorem), or
            ``"structured+theoretical"`` when groups differ.
        groups: per distinct layer shape; for structured TeRA groups also the rank at the
            float32 threshold (what a dense float32 SVD would report; shown in the table when it
            differs).
    """

    method: str
    label: str
    config: dict
    trainable: int
    trainable_fraction: float
    frozen_shared: int
    adapter_bytes: int
    max_rank: int
    full_rank_layers: int
    n_layers: int
    achieved_rank: Optional[int] = None
    achieved_source: Optional[str] = None
    groups: tuple[ShapeGroupRow, ...] = field(default_factory=tuple)


def _human_bytes(n: int) -> str:
    for unit, div in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= div:
            return f"{n / div:.2f} {unit}"
    return f"{n} B"


def _human_count(n: int) -> str:
    for unit, div in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= div:
            return f"{n / div:.2f}{unit}"
    return str(n)


@dataclass(frozen=True)
class ModelReport:
    """Rows of :func:`model_report` plus what they were computed for."""

    model: str
    n_layers: int
    dense_params: int
    shapes: dict
    rows: tuple[MethodRow, ...]
    seed: int

    def to_dict(self) -> dict:
        """JSON-ready dict: model, layer counts, and one dict per method row."""
        return {
            "model": self.model,
            "n_layers": self.n_layers,
            "dense_params": self.dense_params,
            "shapes": [{"d_out": o, "d_in": i, "count": c} for (o, i), c in self.shapes.items()],
            "seed": self.seed,
            "methods": [asdict(r) for r in self.rows],
        }

    def to_json(self, indent: Optional[int] = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    _HEADERS = ("method", "trainable", "% dense", "frozen shared", "adapter file", "max rank", "full-rank layers", "rank @ random λ")

    def _cells(self) -> list[tuple[str, ...]]:
        out = []
        for r in self.rows:
            ach = "—" if r.achieved_rank is None else f"{r.achieved_rank} ({r.achieved_source})"
            r32 = [g.achieved_rank_float32 for g in r.groups if g.achieved_rank_float32 is not None]
            if r32 and any(g.achieved_rank_float32 != g.achieved_rank for g in r.groups if g.achieved_rank_float32 is not None):
                ach += f", fp32 {min(r32)}"
            out.append(
                (
                    r.label,
                    f"{r.trainable:,}",
                    f"{100 * r.trainable_fraction:.4f}%",
                    f"{r.frozen_shared:,}",
                    _human_bytes(r.adapter_bytes),
                    str(r.max_rank),
                    f"{r.full_rank_layers}/{r.n_layers}",
                    ach,
                )
            )
        return out

    def _title(self) -> str:
        shapes = ", ".join(f"{c}×({o}×{i})" for (o, i), c in self.shapes.items())
        return f"{self.model}: {self.n_layers} adapted layers [{shapes}], {_human_count(self.dense_params)} dense params"

    def to_table(self, *, use_rich: Optional[bool] = None, width: int = 140) -> str:
        """The rows as a text table; rich-rendered (box drawing) when rich is available and
        ``use_rich`` is not False, else plain fixed-width columns."""
        if use_rich is not False:
            try:
                from rich.console import Console
                from rich.table import Table
            except ImportError:
                if use_rich:
                    raise
            else:
                table = Table(title=self._title())
                for i, h in enumerate(self._HEADERS):
                    table.add_column(h, justify="left" if i == 0 else "right", no_wrap=i == 0)
                for cells in self._cells():
                    table.add_row(*cells)
                buf = io.StringIO()
                Console(file=buf, width=width, color_system=None, force_terminal=False).print(table)
                return buf.getvalue().rstrip("\n")
        rows = [self._HEADERS] + self._cells()
        widths = [max(len(row[c]) for row in rows) for c in range(len(self._HEADERS))]
        lines = [self._title()]
        for k, row in enumerate(rows):
            lines.append("  ".join(cell.ljust(w) if c == 0 else cell.rjust(w) for c, (cell, w) in enumerate(zip(row, widths))))
            if k == 0:
                lines.append("  ".join("-" * w for w in widths))
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.to_table()


def _achieved_rank(spec: TeRASpec, seed: int, mode: str, max_side: int) -> tuple[int, str, Optional[int]]:
    """(rank, source, float32-threshold rank or None) at random λ for one shape group; ``spec``
    was built (and so checked) once by the caller, and the network here is checked once where it
    is made: the rank tools take it as it is."""
    scales = init_scales(spec, "random", seed=seed)
    p = spec.n_row
    side = min(math.prod(spec.ranks[:p]), math.prod(spec.ranks[p:]))
    if mode == "theoretical" or (mode == "auto" and side > max_side):
        return generic_rank(spec, scales), "theoretical", None
    # seeded numpy float64 operands: already what the spectrum decomposes
    sv = network_singular_values(TeRANetwork(spec, random_factors(spec, seed), scales))
    # The float32 count predicts what a dense float32 SVD would see (see docs/rank-analysis.md).
    r64 = summarize_singular_values(sv, spec.shape, "float64").numerical_rank
    r32 = summarize_singular_values(sv, spec.shape, "float32").numerical_rank
    return r64, "structured", r32


def _resolve_layers(model: Any, target_modules) -> tuple[str, list[LayerShape]]:
    if isinstance(model, str):
        return model, model_shapes(model, target_modules)
    if hasattr(model, "named_modules"):
        return type(model).__name__, linear_shapes(model, target_modules)
    if target_modules is not None:
        from .shapes import select

        layers = select(as_layer_shapes(model), target_modules)
        if not layers:
            raise ValueError(f"target_modules={target_modules!r} matches none of the given layers")
        return "custom", layers
    return "custom", as_layer_shapes(model)


def model_report(
    model: Union[str, Sequence[Union[LayerShape, tuple[int, int]]], Any],
    methods: Iterable[Union[str, Method]] = DEFAULT_METHODS,
    *,
    target_modules=None,
    seed: int = 0,
    achieved: str = "auto",
    structured_max_side: int = STRUCTURED_MAX_SIDE,
    name: Optional[str] = None,
) -> ModelReport:
    """Compare adapter methods on a model's linear layers.

    Args:
        model: a built-in model name (:func:`tera_tn.analysis.shapes.available_models`), a list of
            ``(d_out, d_in)`` pairs or :class:`LayerShape`, or a torch ``nn.Module`` (its
            ``nn.Linear`` layers are walked).
        methods: :class:`Method` objects or strings (see :meth:`Method.parse`).
        target_modules: restricts the layers (PEFT rules, see :func:`tera_tn.analysis.shapes.model_shapes`).
        seed: seed of the frozen factors and the random λ for the achieved rank.
        achieved: ``"auto"`` (structured spectrum when the core matrix's smaller side is at most
            ``structured_max_side``, else theoretical), ``"structured"`` (always; slow at full
            rank of big layers), ``"theoretical"`` or ``"none"``.
        structured_max_side: see ``achieved``.
        name: label of the model in the output (default: the model name or class).
    """
    if achieved not in ACHIEVED_MODES:
        raise ValueError(f"achieved must be one of {ACHIEVED_MODES}, got {achieved!r}")
    label, layers = _resolve_layers(model, target_modules)
    names = [layer.name for layer in layers]
    if len(set(names)) != len(names):
        raise ValueError("layer names must be unique (they name the tensors of the adapter file)")
    method_list = [Method.parse(m) for m in methods]
    if not method_list:
        raise ValueError("model_report needs at least one method")
    shapes = [layer.shape for layer in layers]
    dense = sum(o * i for o, i in shapes)
    counts: dict[tuple[int, int], int] = {}
    for s in shapes:
        counts[s] = counts.get(s, 0) + 1
    rows = []
    for m in method_list:
        try:
            # each shape group's spec is built (and checked) once, here; the row takes them as they are
            specs = {s: m.spec(*s) for s in counts} if m.kind == "tera" else {}
            rows.append(_method_row(m, specs, layers, shapes, counts, dense, seed, achieved, structured_max_side))
        except ValueError as err:
            raise ValueError(f"{m.label}: {err}") from None
    return ModelReport(name or label, len(layers), dense, counts, tuple(rows), seed)


def _method_row(m: Method, specs: dict, layers, shapes, counts, dense, seed, achieved, max_side) -> MethodRow:
    found = {s: _achieved_rank(specs[s], seed, achieved, max_side) for s in counts} \
        if m.kind == "tera" and achieved != "none" else {}
    if m.kind == "tera":
        totals = spec_totals(shapes, [specs[s] for s in shapes], m.label)
        config = {"order": list(m.order) if isinstance(m.order, tuple) else m.order,
                  "ranks": list(m.ranks) if isinstance(m.ranks, tuple) else m.ranks, "diag": m.diag}
    else:
        totals = method_totals(m.kind, shapes, r=m.r)
        config = {"r": m.r}
    per_shape = {(lc.d_out, lc.d_in): lc for lc in totals.layers}
    groups = []
    for s, c in counts.items():
        lc = per_shape[s]
        ach, src, r32 = found.get(s, (None, None, None))
        groups.append(ShapeGroupRow(s[0], s[1], c, lc.trainable, lc.max_rank, ach, src, r32,
                                    str(specs[s]) if m.kind == "tera" else None))
    achieved_ranks = [a for a, _, _ in found.values()]
    sources = {src for _, src, _ in found.values()}
    return MethodRow(
        method=m.kind,
        label=m.label,
        config=config,
        trainable=totals.trainable,
        trainable_fraction=totals.trainable / dense,
        frozen_shared=totals.frozen_shared,
        adapter_bytes=adapter_file_bytes(m, layers),
        max_rank=totals.min_max_rank,
        full_rank_layers=totals.full_rank_layers,
        n_layers=len(layers),
        achieved_rank=min(achieved_ranks) if achieved_ranks else None,
        achieved_source="+".join(sorted(sources)) if sources else None,
        groups=tuple(groups),
    )
