"""Parameter accounting for TeRA and the adapters it is compared with, per layer and per model.

Every method is counted the same way for a ``(d_out, d_in)`` layer:

=============  ======================  ==================================  =====================================
method         trainable per layer     frozen, stored once                 max rank(ΔW)
=============  ======================  ==================================  =====================================
LoRA r         r (d_in + d_out)        0                                   min(r, d_out, d_in)
VeRA r         d_out + r               A (r × d_in), B (d_out × r),         min(r, d_out, d_in)
                                       shared by all layers
HiRA r         r (d_in + d_out)        0 (reuses W0: ΔW = W0 ⊙ BA)          min(rank(W0)·r, d_out, d_in)
TeRA spec      Σ_n len(λ_n)            ∏ R_n + Σ K_n R_n per shape group    min(∏ R_row, ∏ R_col, d_out, d_in)
=============  ======================  ==================================  =====================================

VeRA follows PEFT: one shared (A, B) pair sized by the largest d_in and d_out of the targets.
HiRA's bound assumes a full-rank W0.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Sequence

from ..checks import check_size
from ..core.spec import DEFAULT_DIAG, DEFAULT_ORDER, TeRASpec

__all__ = ["LayerCost", "MethodTotals", "layer_cost", "method_totals", "spec_totals", "METHODS"]

METHODS = ("tera", "lora", "vera", "hira")


@dataclass(frozen=True)
class LayerCost:
    """Counts for one adapted ``(d_out, d_in)`` layer under one method."""

    method: str
    d_out: int
    d_in: int
    trainable: int
    max_rank: int


@dataclass(frozen=True)
class MethodTotals:
    """Totals over a list of layers: trainable numbers, frozen shared numbers, and ranks."""

    method: str
    label: str
    trainable: int
    frozen_shared: int
    min_max_rank: int
    layers: tuple[LayerCost, ...]

    @property
    def full_rank_layers(self) -> int:
        """Layers whose maximum rank is min(d_out, d_in)."""
        return sum(lc.max_rank == min(lc.d_out, lc.d_in) for lc in self.layers)


def _check_shapes(shapes: object) -> list[tuple[int, int]]:
    """``shapes`` as a list of ``(d_out, d_in)`` pairs of positive ints."""
    if isinstance(shapes, (str, bytes)) or not isinstance(shapes, Iterable):
        raise ValueError(f"shapes must be a list of (d_out, d_in) pairs, got {shapes!r}")
    out = []
    for k, shape in enumerate(shapes):
        if isinstance(shape, (str, bytes)) or not isinstance(shape, Sequence) or len(shape) != 2:
            raise ValueError(f"shapes[{k}] must be a (d_out, d_in) pair, got {shape!r}")
        out.append((check_size(f"shapes[{k}][0] (d_out)", shape[0]), check_size(f"shapes[{k}][1] (d_in)", shape[1])))
    return out


def layer_cost(method: str, d_out: int, d_in: int, *, r: int | None = None, spec: TeRASpec | None = None) -> LayerCost:
    """Counts for one layer. ``method`` is one of ``METHODS``; LoRA/VeRA/HiRA need ``r``, TeRA a ``spec``."""
    d_out, d_in = check_size("d_out", d_out), check_size("d_in", d_in)
    if method == "tera":
        if not isinstance(spec, TeRASpec) or spec.shape != (d_out, d_in):
            got = spec if isinstance(spec, TeRASpec) else repr(spec)
            raise ValueError(f"method 'tera' needs a TeRASpec of shape {(d_out, d_in)}, got {got}")
        return LayerCost("tera", d_out, d_in, spec.num_trainable, spec.max_rank)
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    r = check_size(f"{method} rank r", r)
    cap = min(d_out, d_in)
    if method == "lora":
        return LayerCost(method, d_out, d_in, r * (d_out + d_in), min(r, cap))
    if method == "vera":
        return LayerCost(method, d_out, d_in, d_out + r, min(r, cap))
    return LayerCost(method, d_out, d_in, r * (d_out + d_in), min(cap * r, cap))


def method_totals(
    method: str,
    shapes: Sequence[tuple[int, int]],
    *,
    r: int | None = None,
    order: int | tuple[int, int] = DEFAULT_ORDER,
    ranks="full",
    diag: str = DEFAULT_DIAG,
    specs: Iterable[TeRASpec] | None = None,
) -> MethodTotals:
    """Totals over the layers ``shapes`` (a list of ``(d_out, d_in)``, repeats allowed).

    For TeRA, specs come from :meth:`TeRASpec.from_shape` with ``order``, ``ranks`` and
    ``diag`` (or are given as ``specs``, one per shape); frozen factors are counted once per
    distinct spec (shape group).
    """
    shapes = _check_shapes(shapes)
    if not shapes:
        raise ValueError("method_totals needs at least one (d_out, d_in) layer shape, got none")
    if method == "tera":
        spec_list = list(specs) if specs is not None else [
            TeRASpec.from_shape(o, i, order=order, ranks=ranks, diag=diag) for o, i in shapes
        ]
        ranks_label = "full" if ranks == "full" else f"ranks={ranks}"
        label = f"TeRA order {order}, {ranks_label}" + ("" if diag == DEFAULT_DIAG else f", diag={diag}")
        return spec_totals(shapes, spec_list, label)
    else:
        layers = tuple(layer_cost(method, o, i, r=r) for o, i in shapes)
        frozen = 0
        if method == "vera":
            frozen = int(r) * (max(i for _, i in shapes) + max(o for o, _ in shapes))
        label = f"{dict(lora='LoRA', vera='VeRA', hira='HiRA')[method]} r={r}"
    return MethodTotals(
        method=method,
        label=label,
        trainable=sum(lc.trainable for lc in layers),
        frozen_shared=frozen,
        min_max_rank=min(lc.max_rank for lc in layers),
        layers=layers,
    )


def spec_totals(shapes: Sequence[tuple[int, int]], specs: Sequence[TeRASpec], label: str) -> MethodTotals:
    """TeRA's :func:`method_totals` from checked layer shapes and their specs (one per shape,
    built once by the caller: a spec is validated where it is made, so nothing is rebuilt here);
    frozen factors are counted once per distinct spec (shape group)."""
    if len(specs) != len(shapes):
        raise ValueError(f"got {len(specs)} specs for {len(shapes)} layer shapes")
    for shape, spec in zip(shapes, specs):
        if not isinstance(spec, TeRASpec) or spec.shape != tuple(shape):
            got = spec if isinstance(spec, TeRASpec) else repr(spec)
            raise ValueError(f"method 'tera' needs a TeRASpec of shape {tuple(shape)}, got {got}")
    layers = tuple(LayerCost("tera", s.d_out, s.d_in, s.num_trainable, s.max_rank) for s in specs)
    return MethodTotals(
        method="tera",
        label=label,
        trainable=sum(lc.trainable for lc in layers),
        frozen_shared=sum(s.num_frozen for s in set(specs)),
        min_max_rank=min(lc.max_rank for lc in layers),
        layers=layers,
    )


def total_params(shapes: Sequence[tuple[int, int]]) -> int:
    """Numbers in the dense weights of ``shapes`` (what full fine-tuning trains)."""
    return sum(o * i for o, i in _check_shapes(shapes))
