"""Model-level comparison of TeRA with LoRA, VeRA and HiRA: parameters, adapter file size, rank.

For a list of layer shapes (a built-in set from :mod:`tera_tn.analysis.shapes`, a list of
``(d_out, d_in)``, or the ``nn.Linear`` layers of a torch model) and a list of methods,
:func:`model_report` gives one row per method:

* trainable parameters and frozen shared parameters — from :func:`tera_tn.analysis.accounting.method_totals`;
* adapter file size — the exact byte size of a ``safetensors`` file holding the trainable
  tensors in float32 (:func:`safetensors_size`, an exact formula of the format, tested against
  real ``safetensors.numpy.save`` output). Frozen shared tensors (TeRA's core and factors,
  VeRA's A/B) are regenerated from a seed and not stored; a classification head is not counted;
* max rank — the smallest, over the layers, of each layer's maximum rank of ΔW;
* for TeRA, the rank achieved at random λ (``init_scales(spec, "random")``, |λ| in [0.5, 2]) with
  random orthogonal frozen factors, computed per shape group either as the numerical rank
  (float64 threshold) of the exact structured spectrum (:func:`tera_tn.analysis.spectrum.tera_singular_values`)
  when its core matrix is small, or as the theoretical rank (rank theorem) otherwise — a
  dense SVD of e.g. an 11008 × 4096 update is never computed. The row says which was used.

Output: :meth:`ModelReport.to_table` (rich-rendered when rich is installed) and
:meth:`ModelReport.to_dict` / :meth:`ModelReport.to_json`.

Adapter file sizes are those of the ``adapter_model.safetensors`` PEFT writes: its keys
(``base_model.model.<module>.lora_A.weight`` …; TeRA: one ``<module>.tera_lambda`` per layer plus
the adapter's ``uint8`` signature), checked against real saves in the tests.
"""

from __future__ import annotations

import io
import json
import math
import re
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable, Mapping, Optional, Sequence, Union

from .accounting import METHODS, method_totals
from ..core.factors import init_scales, random_factors
from ..core.network import theoretical_rank
from ..core.signature import adapter_signature, signature_bytes
from .rank import summarize_singular_values
from .shapes import LayerShape, as_layer_shapes, linear_shapes, model_shapes
from ..core.spec import DEFAULT_DIAG, DEFAULT_ORDER, TeRASpec
from .spectrum import tera_singular_values

__all__ = [
    "Method",
    "DEFAULT_METHODS",
    "MethodRow",
    "ModelReport",
    "model_report",
    "adapter_tensors",
    "adapter_file_bytes",
    "safetensors_size",
    "ACHIEVED_MODES",
]

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

_SAFETENSORS_DTYPES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}


# --------------------------------------------------------------------------------------------
# methods
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Method:
    """One adapter configuration.

    Attributes:
        kind: ``"tera"``, ``"lora"``, ``"vera"`` or ``"hira"``.
        r: rank for LoRA/VeRA/HiRA.
        order, ranks, diag: TeRA's :meth:`TeRASpec.from_shape` arguments (defaults ``DEFAULT_ORDER``,
            ``"full"``, ``DEFAULT_DIAG``); the label names ``diag`` only when it is not the default.
    """

    kind: str
    r: Optional[int] = None
    order: Union[int, tuple[int, int]] = DEFAULT_ORDER
    ranks: Any = "full"
    diag: str = DEFAULT_DIAG

    def __post_init__(self) -> None:
        if self.kind not in METHODS:
            raise ValueError(f"method kind must be one of {METHODS}, got {self.kind!r}")
        if self.kind != "tera" and (isinstance(self.r, bool) or not isinstance(self.r, int) or self.r < 1):
            raise ValueError(f"{self.kind} needs a positive integer rank r, got {self.r!r}")

    @classmethod
    def parse(cls, text: Union[str, "Method"]) -> "Method":
        """From ``"kind[:key=value,...]"``, e.g. ``"lora:r=32"``, ``"lora:32"``, ``"vera:256"``,
        ``"tera:order=6,ranks=0.5,diag=mode"``, ``"tera:4"`` (a bare number is ``r``, or ``order``
        for TeRA). ``ranks`` takes ``full``, a fraction, an int or ``a/b/c…`` per mode."""
        if isinstance(text, Method):
            return text
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"a method must be a string like 'lora:r=8' or a Method, got {text!r}")
        kind, _, rest = text.strip().partition(":")
        kind = kind.strip().lower()
        kw: dict[str, Any] = {}
        for item in filter(None, (x.strip() for x in rest.split(","))):
            key, eq, value = item.partition("=")
            if not eq:
                key, value = ("order" if kind == "tera" else "r"), key
            key, value = key.strip(), value.strip()
            try:
                if key == "r":
                    kw["r"] = int(value)
                elif key == "order":
                    kw["order"] = tuple(int(v) for v in value.split("x")) if "x" in value else int(value)
                elif key == "ranks":
                    if value == "full":
                        kw["ranks"] = "full"
                    elif "/" in value:
                        kw["ranks"] = tuple(int(v) for v in value.split("/"))
                    elif re.fullmatch(r"\d+", value):
                        kw["ranks"] = int(value)
                    else:
                        kw["ranks"] = float(value)
                elif key == "diag":
                    kw["diag"] = value
                else:
                    raise ValueError(f"unknown key {key!r}")
            except ValueError as err:
                raise ValueError(f"cannot parse method {text!r}: {err} (keys: r, order, ranks, diag)") from None
        if kind == "tera" and "r" in kw:
            raise ValueError(f"cannot parse method {text!r}: TeRA takes order/ranks/diag, not r")
        if kind != "tera" and set(kw) - {"r"}:
            raise ValueError(f"cannot parse method {text!r}: {kind} takes only r")
        return cls(kind, **kw)

    @property
    def label(self) -> str:
        if self.kind != "tera":
            return f"{dict(lora='LoRA', vera='VeRA', hira='HiRA')[self.kind]} r={self.r}"
        order = "×".join(map(str, self.order)) if isinstance(self.order, tuple) else str(self.order)
        ranks = "" if self.ranks == "full" else f", ranks={self.ranks}"
        diag = "" if self.diag == DEFAULT_DIAG else f", diag={self.diag}"
        return f"TeRA order {order}{ranks}{diag}"

    def spec(self, d_out: int, d_in: int) -> TeRASpec:
        return TeRASpec.from_shape(d_out, d_in, order=self.order, ranks=self.ranks, diag=self.diag)  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------
# adapter file size
# --------------------------------------------------------------------------------------------
def safetensors_size(
    tensors: Mapping[str, Any], dtype: str = "F32", metadata: Optional[Mapping[str, str]] = None
) -> int:
    """Exact size in bytes of a safetensors file holding zero-or-more tensors.

    The format is: 8 bytes (little-endian u64 header length ``N``), ``N`` bytes of compact JSON
    — ``{"__metadata__": {...}, name: {"dtype", "shape", "data_offsets"}, ...}`` with the header
    padded with spaces to a multiple of 8 — then the raw data. Verified byte-for-byte against
    ``safetensors.numpy.save`` and against adapter files PEFT writes, in the tests.

    Args:
        tensors: name → shape (of dtype ``dtype``), or name → ``(dtype tag, shape)``.
        dtype: safetensors dtype tag (``"F32"``, ``"F16"``, ``"BF16"``, ``"F64"``, ``"U8"`` …) of
            tensors given by shape alone.
        metadata: optional string → string metadata (PEFT writes ``{"format": "pt"}``).
    """
    entries = []
    for name, value in tensors.items():
        tag, shape = value if isinstance(value, tuple) and len(value) == 2 and isinstance(value[0], str) else (dtype, value)
        if tag not in _SAFETENSORS_DTYPES:
            raise ValueError(f"dtype of {name!r} must be one of {tuple(_SAFETENSORS_DTYPES)}, got {tag!r}")
        shape = [int(s) for s in shape]
        if any(s < 0 for s in shape):
            raise ValueError(f"tensor {name!r} has a negative dimension: {shape}")
        entries.append((name, tag, shape))
    header: dict[str, Any] = {}
    if metadata is not None:  # an empty dict is still written as "__metadata__":{}
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    offset = 0
    # safetensors lays tensors out by decreasing dtype alignment, then by name (Rust byte order =
    # Python's code-point order for str); offsets follow that order.
    for name, tag, shape in sorted(entries, key=lambda e: (-_SAFETENSORS_DTYPES[e[1]], e[0])):
        nbytes = math.prod(shape) * _SAFETENSORS_DTYPES[tag]
        header[name] = {"dtype": tag, "shape": shape, "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    return 8 + len(text) + (-len(text)) % 8 + offset


def adapter_tensors(method: Union[str, Method], layers: Sequence[Union[LayerShape, tuple[int, int]]]) -> dict[str, Any]:
    """Name → shape (float32) or ``(dtype tag, shape)`` of every tensor ``method``'s PEFT adapter
    file stores for ``layers``.

    LoRA / HiRA: ``lora_A``/``hira_A`` ``(r, d_in)`` and ``lora_B``/``hira_B`` ``(d_out, r)``;
    VeRA: ``vera_lambda_b`` ``(d_out,)`` and ``vera_lambda_d`` ``(r,)``; TeRA: one ``tera_lambda``
    of length ``Σ_n len(λ_n)`` per layer, plus the adapter's signature (``uint8`` JSON; sized here
    for the default seed, α and factor recipe — other values change it by a few bytes).
    """
    m = Method.parse(method)
    layer_list = as_layer_shapes(layers)
    if len({layer.name for layer in layer_list}) != len(layer_list):
        raise ValueError("layer names must be unique: they name the tensors of the adapter file")
    out: dict[str, Any] = {}
    specs = {}
    for layer in layer_list:
        base = f"base_model.model.{layer.name}."
        if m.kind in ("lora", "hira"):
            out[base + f"{m.kind}_A.weight"] = (m.r, layer.d_in)  # type: ignore[assignment]
            out[base + f"{m.kind}_B.weight"] = (layer.d_out, m.r)  # type: ignore[assignment]
        elif m.kind == "vera":
            out[base + "vera_lambda_b"] = (layer.d_out,)
            out[base + "vera_lambda_d"] = (m.r,)  # type: ignore[assignment]
        else:
            spec = m.spec(layer.d_out, layer.d_in)
            specs[layer.name] = (spec, False)
            out[base + "tera_lambda"] = (spec.num_trainable,)
    if specs:
        raw = signature_bytes(adapter_signature(specs, seed=0, factor_init="orthogonal", factor_dtype="float32",
                                                alpha=1.0))
        out["base_model.tera_signature"] = ("U8", (len(raw),))
    return out


def adapter_file_bytes(
    method: Union[str, Method],
    layers: Sequence[Union[LayerShape, tuple[int, int]]],
    *,
    dtype: str = "F32",
    metadata: Optional[Mapping[str, str]] = None,
) -> int:
    """Exact bytes of the safetensors adapter file (trainable tensors only, PEFT's
    ``{"format": "pt"}`` metadata by default)."""
    meta = {"format": "pt"} if metadata is None else metadata
    return safetensors_size(adapter_tensors(method, layers), dtype, meta)


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
    """(rank, source, float32-threshold rank or None) at random λ for one shape group."""
    scales = init_scales(spec, "random", seed=seed)
    p = spec.n_row
    side = min(math.prod(spec.ranks[:p]), math.prod(spec.ranks[p:]))
    if mode == "theoretical" or (mode == "auto" and side > max_side):
        return theoretical_rank(spec, scales), "theoretical", None
    sv = tera_singular_values(spec, random_factors(spec, seed), scales)
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
            rows.append(_method_row(m, layers, shapes, counts, dense, seed, achieved, structured_max_side))
        except ValueError as err:
            raise ValueError(f"{m.label}: {err}") from None
    return ModelReport(name or label, len(layers), dense, counts, tuple(rows), seed)


def _method_row(m: Method, layers, shapes, counts, dense, seed, achieved, max_side) -> MethodRow:
    specs = {s: m.spec(*s) for s in counts} if m.kind == "tera" else {}
    if m.kind == "tera":
        totals = method_totals("tera", shapes, order=m.order, ranks=m.ranks, diag=m.diag, specs=[specs[s] for s in shapes])
        config = {"order": list(m.order) if isinstance(m.order, tuple) else m.order,
                  "ranks": list(m.ranks) if isinstance(m.ranks, tuple) else m.ranks, "diag": m.diag}
    else:
        totals = method_totals(m.kind, shapes, r=m.r)
        config = {"r": m.r}
    per_shape = {(lc.d_out, lc.d_in): lc for lc in totals.layers}
    groups = []
    achieved_ranks, sources = [], set()
    for s, c in counts.items():
        lc = per_shape[s]
        ach = src = r32 = None
        if m.kind == "tera" and achieved != "none":
            ach, src, r32 = _achieved_rank(specs[s], seed, achieved, max_side)
            achieved_ranks.append(ach)
            sources.add(src)
        groups.append(ShapeGroupRow(s[0], s[1], c, lc.trainable, lc.max_rank, ach, src, r32,
                                    str(specs[s]) if m.kind == "tera" else None))
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

