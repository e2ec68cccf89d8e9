"""The one registry of contraction strategies: name → description, costs, where it runs.

Each :class:`Strategy` is a frozen value holding everything the rest of the package asks about a
strategy: a one-line description (the docs table), the cost of ``ΔW x`` on its own (what
:func:`tera_tn.plan` compares; None for a layer-only strategy), and the predicted seconds of a
whole layer call, forward or forward + backward (what :func:`tera_tn.torch.planning.layer_plan`
compares). The planners iterate :data:`REGISTRY` instead of naming strategies, and the torch
autograd Function dispatches through dicts keyed by the same names; :func:`get_strategy` refuses
an unknown name with the list of known ones. Every training-cost formula lives here, priced with
the roofline :class:`~tera_tn.contract.costmodel.CostModel`.

Like opt_einsum's ``paths._PATH_OPTIONS`` (a single name → path function table), one table, read
everywhere; unlike it, not extensible at run time: each strategy also needs a forward and a
backward in :mod:`tera_tn.torch.autograd`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Callable, Mapping, NamedTuple, Optional

import opt_einsum as oe

from ..core.modeproduct import chain_steps
from ..core.spec import TeRASpec
from .costmodel import CostModel

__all__ = [
    "Strategy", "StrategyCost", "LayerTerms", "REGISTRY", "PREFERENCE", "get_strategy", "strategy_names",
    "layer_terms", "factored_through_product", "factored_equation", "factored_expression",
]


@dataclass(frozen=True)
class StrategyCost:
    """Predicted cost of one strategy for one call of ``ΔW x``.

    Attributes:
        strategy: ``"materialize"`` or ``"factored"``.
        flops: floating-point operations (multiply and add counted separately).
        largest_intermediate: elements of the largest tensor created on the way.
        bytes_moved: main-memory traffic assumed by the roofline model.
        seconds: predicted time under the cost model.
        steps: one line per kernel call, for the explanation.
    """

    strategy: str
    flops: int
    largest_intermediate: int
    bytes_moved: int
    seconds: float
    steps: tuple[str, ...]


class LayerTerms(NamedTuple):
    """Seconds of the pieces a layer call is made of, shared by every strategy's layer cost.

    ``base``: the base GEMM ``x W0ᵀ``; ``delta``: building ΔW; ``w0_add``: adding it to ``W0``;
    ``factored``: the factored ``ΔW x`` (from :func:`tera_tn.plan`). Training only (0 in
    inference): ``proj``: projecting ``g`` and ``x`` through the factors; ``h``: the
    ``∏R_row × ∏R_col`` product H (or the mode-side core GEMMs); ``pull_back``: pulling the dense
    weight gradient back through the network; ``grad_x``: the ``g (W0 + ΔW)`` GEMM;
    ``weight_grad``: the ``gᵀ x`` GEMM.
    """

    base: float
    delta: float
    w0_add: float
    factored: float
    proj: float = 0.0
    h: float = 0.0
    pull_back: float = 0.0
    grad_x: float = 0.0
    weight_grad: float = 0.0


@dataclass(frozen=True)
class Strategy:
    """One contraction strategy.

    Attributes:
        name: the registry key (what ``strategy=`` takes).
        description: one line, for the docs and error messages.
        cost: ``(spec, n_tokens, itemsize, model) -> StrategyCost`` of ``ΔW x`` alone, or None
            for a strategy only a torch layer runs (not offered by :func:`tera_tn.apply`).
        layer_seconds: ``(terms, training) -> seconds`` of a whole layer call.
        training_only: only a candidate of ``"auto"`` when gradients are computed (its forward
            is another strategy's).
    """

    name: str
    description: str
    cost: Optional[Callable[[TeRASpec, int, int, CostModel], StrategyCost]]
    layer_seconds: Callable[[LayerTerms, bool], float]
    training_only: bool = False


def _materialize_cost(spec: TeRASpec, n: int, itemsize: int, model: CostModel) -> StrategyCost:
    po, pi = spec.padded_shape
    steps, flops, traffic, seconds = [], 0, 0, 0.0
    largest = math.prod(spec.ranks)
    if spec.diag == "identity":
        nbytes = 2 * po * pi * itemsize
        seconds += model.stream_seconds(2 * nbytes, calls=2)
        flops += 2 * po * pi
        traffic += 2 * nbytes
        steps.append(f"G_mat ⊙ u vᵀ: 2 elementwise passes over {po}×{pi}")
    else:
        for mode, size_before, k, r in chain_steps(spec.ranks, spec.modes):
            m = size_before // r
            t = model.gemm_seconds(m, k, r, itemsize)
            flops += 2 * m * k * r
            traffic += (size_before + m * k) * itemsize
            seconds += t
            largest = max(largest, m * k)
            steps.append(f"mode {mode}: ({m}×{r}) @ ({r}×{k})  {t * 1e3:.3f} ms")
    t = model.gemm_seconds(n, spec.d_out, spec.d_in, itemsize)
    flops += 2 * n * spec.d_out * spec.d_in
    traffic += (n * spec.d_in + spec.d_in * spec.d_out + n * spec.d_out) * itemsize
    seconds += t
    steps.append(f"x ΔWᵀ: ({n}×{spec.d_in}) @ ({spec.d_in}×{spec.d_out})  {t * 1e3:.3f} ms")
    return StrategyCost("materialize", flops, max(largest, po * pi), traffic, seconds, tuple(steps))


def factored_equation(spec: TeRASpec) -> tuple[str, list[tuple[int, ...]]]:
    """Einsum equation and operand shapes (without x) for the factored contraction.

    Operand order: column operands, core, row operands. For rank/mode diag each operand is
    ``A_n`` of shape (K_n, R_n); for identity it is λ_n of shape (K_n,) and the core carries
    the K indices directly.
    """
    sym = oe.get_symbol
    n_idx = sym(0)
    k_idx = [sym(1 + i) for i in range(spec.order)]
    r_idx = k_idx if spec.diag == "identity" else [sym(1 + spec.order + i) for i in range(spec.order)]
    p = spec.n_row

    def operand(i: int) -> tuple[str, tuple[int, ...]]:
        if spec.diag == "identity":
            return k_idx[i], (spec.modes[i],)
        return k_idx[i] + r_idx[i], (spec.modes[i], spec.ranks[i])

    cols = [operand(i) for i in range(p, spec.order)]
    rows = [operand(i) for i in range(p)]
    terms = [n_idx + "".join(k_idx[p:])] + [t for t, _ in cols] + ["".join(r_idx)] + [t for t, _ in rows]
    shapes = [s for _, s in cols] + [spec.ranks] + [s for _, s in rows]
    eq = ",".join(terms) + "->" + n_idx + "".join(k_idx[:p])
    return eq, shapes


@lru_cache(maxsize=512)
def factored_expression(spec: TeRASpec, n: int):
    """``(opt_einsum expression, PathInfo)`` of the factored contraction for ``n`` tokens (cached)."""
    eq, shapes = factored_equation(spec)
    all_shapes = [(n,) + spec.col_modes] + shapes
    expr = oe.contract_expression(eq, *all_shapes, optimize="dp")
    _, info = oe.contract_path(eq, *all_shapes, shapes=True, optimize="dp")
    return expr, info


def _factored_cost(spec: TeRASpec, n: int, itemsize: int, model: CostModel) -> StrategyCost:
    _, info = factored_expression(spec, n)
    sizes = info.size_dict
    steps, flops, traffic, seconds = [], 0, 0, 0.0
    for contraction in info.contraction_list:
        _, removed, eq, _, _ = contraction[:5]
        inputs, out = eq.split("->")
        terms = inputs.split(",")
        k = math.prod(sizes[c] for c in removed)
        out_size = math.prod(sizes[c] for c in out)
        # Counted as opt_einsum counts (PathInfo.opt_cost): every index combination once per
        # operand beyond the first, plus one add when an index is summed away.
        f = math.prod(sizes[c] for c in set("".join(terms))) * max(len(terms) - 1 + bool(removed), 1)
        if len(terms) == 2:
            shared = set(terms[0]) & set(terms[1]) & set(out)
            batch = math.prod(sizes[c] for c in shared)
            m = math.prod(sizes[c] for c in terms[0] if c not in removed and c not in shared)
            nn = math.prod(sizes[c] for c in terms[1] if c not in removed and c not in shared)
            t = model.gemm_seconds(m * batch, nn, k, itemsize) if batch == 1 else model.gemm_seconds(m, nn, k, itemsize, calls=batch)
            moved = (batch * (m * k + nn * k) + out_size) * itemsize
        else:
            moved = sum(math.prod(sizes[c] for c in t) for t in terms) * itemsize + out_size * itemsize
            t = model.stream_seconds(moved)
        flops += f
        traffic += moved
        seconds += t
        steps.append(f"{eq}  {t * 1e3:.3f} ms")
    return StrategyCost("factored", flops, int(info.largest_intermediate), traffic, seconds, tuple(steps))


# --- layer-level costs (base GEMM included; see tera_tn.torch.planning) -------------------------
def _projection_seconds(model: CostModel, n: int, modes, ranks, itemsize: int) -> float:
    """Time of contracting ``(n, ∏K)`` through one side's factors, mode by mode (see ``project``)."""
    sizes = list(modes)
    total = 0.0
    for i, (k, r) in enumerate(zip(modes, ranks)):
        rest = n * math.prod(sizes) // k
        total += model.gemm_seconds(rest, r, k, itemsize)
        sizes[i] = r
    return total


def factored_through_product(spec: TeRASpec) -> bool:
    """Whether torch's factored chain ``x → Q → G → P`` runs as one GEMM with the kept ``P G Qᵀ``:
    mode-side diagonals only and full ranks, where the chain's core GEMM alone is that GEMM's size
    (``n · ∏K_row · ∏K_col``) and the projections come on top."""
    return spec.diag == "mode" and spec.is_full_rank


def layer_terms(spec: TeRASpec, n: int, training: bool, itemsize: int, model: CostModel,
                costs: Mapping[str, StrategyCost]) -> LayerTerms:
    """The pieces of a layer call on ``n`` tokens; ``costs`` are :func:`tera_tn.plan`'s ``ΔW x`` costs."""
    d_out, d_in = spec.shape
    po, pi = spec.padded_shape
    base = model.gemm_seconds(n, d_out, d_in, itemsize)
    grid = d_out * d_in * itemsize
    w0_add = model.stream_seconds(3 * grid)
    if spec.diag in ("mode", "identity"):
        # frozen F (P G Qᵀ kept per shape group, or G_mat) scaled by two Kronecker diagonals
        delta = model.stream_seconds(4 * po * pi * itemsize, calls=2)
    else:
        delta = costs["materialize"].seconds - base  # the materialize cost is the chain plus this GEMM
    factored = costs["factored"].seconds
    if factored_through_product(spec):
        # one GEMM with the kept product between two elementwise passes over (n, ·) rows
        factored = model.gemm_seconds(n, po, d_in, itemsize) + model.stream_seconds(3 * n * (d_in + po) * itemsize)
    if not training:
        return LayerTerms(base, delta, w0_add, factored)
    p = spec.n_row
    r_row, r_col = math.prod(spec.ranks[:p]), math.prod(spec.ranks[p:])
    proj = _projection_seconds(model, n, spec.row_modes, spec.ranks[:p], itemsize)
    proj += _projection_seconds(model, n, spec.col_modes, spec.ranks[p:], itemsize)
    if spec.diag == "mode":
        # Mode-side scales have no H shortcut: two core GEMMs (see factored.factored_scale_grads).
        h = 2 * model.gemm_seconds(n, r_row, r_col, itemsize)
    else:
        h = model.gemm_seconds(r_row, r_col, n, itemsize) + model.stream_seconds(r_row * r_col * itemsize)
    pull_back = 0.0
    if spec.diag != "mode":  # a rank side
        # Pᵀ D Q runs the chain's products on the d_out × d_in grid (as many multiply-adds as
        # building ΔW at full ranks), then ⊙ G and two matvecs
        pull_back = delta + model.stream_seconds(3 * r_row * r_col * itemsize, calls=3)
    if spec.diag in ("mode", "both"):  # a mode side
        pull_back += model.stream_seconds(5 * grid, calls=3)  # D ⊙ N and its two matvecs
    return LayerTerms(base, delta, w0_add, factored, proj, h, pull_back,
                      model.gemm_seconds(n, d_in, d_out, itemsize), model.gemm_seconds(d_out, d_in, n, itemsize))


def _materialize_layer(t: LayerTerms, training: bool) -> float:
    # forward: ΔW + W0 add + one GEMM; backward: the same again + projections of g and x + H
    mat = t.delta + t.w0_add + t.base
    return 2 * mat + t.proj + t.h if training else mat


def _dense_layer(t: LayerTerms, training: bool) -> float:
    # forward as materialize; backward: ΔW again for grad_x, its GEMM, gᵀ x and its pull-back
    mat = t.delta + t.w0_add + t.base
    return mat + t.delta + t.w0_add + t.grad_x + t.weight_grad + t.pull_back if training else mat


def _factored_layer(t: LayerTerms, training: bool) -> float:
    # base GEMM + factored ΔW x; the backward mirrors the forward
    fac = t.base + t.factored
    return 2 * fac if training else fac


#: Every strategy, in the order error messages and option tuples list them.
REGISTRY: dict[str, Strategy] = {
    s.name: s
    for s in (
        Strategy("materialize", "contract the network into ΔW (a chain of mode products), then one GEMM x (W0 + ΔW)ᵀ; "
                 "backward recomputes the chain and takes λ gradients from H = (g P)ᵀ (x Q)",
                 _materialize_cost, _materialize_layer),
        Strategy("dense", "forward as materialize; backward pulls the dense weight gradient gᵀ x back through the "
                 "network (wins once the token count exceeds the width); torch layers only",
                 None, _dense_layer, training_only=True),
        Strategy("factored", "contract x through the column factors, the core and the row factors (an opt_einsum "
                 "path), never forming d_out × d_in (torch layers with mode-side diagonals at full ranks: one GEMM "
                 "with the shape group's kept P G Qᵀ instead); backward mirrors the forward",
                 _factored_cost, _factored_layer),
    )
}
#: Tie-break of ``"auto"``: on equal predicted seconds the first listed wins (factored never
#: forms a ``d_out × d_in`` tensor).
PREFERENCE: tuple[str, ...] = ("factored", "materialize", "dense")
assert sorted(PREFERENCE) == sorted(REGISTRY)


def strategy_names(*, layer: bool = True) -> tuple[str, ...]:
    """Names in registry order: all (``layer=True``, what torch layers take) or those
    :func:`tera_tn.apply` runs (``layer=False``: the ones with a ``ΔW x`` cost)."""
    return tuple(n for n, s in REGISTRY.items() if layer or s.cost is not None)


def get_strategy(name: object) -> Strategy:
    """The registered strategy ``name``; a ValueError listing the registry's names otherwise."""
    try:
        return REGISTRY[name]  # type: ignore[index]
    except (KeyError, TypeError):
        raise ValueError(f"strategy must be one of the registered {tuple(REGISTRY)}, got {name!r}") from None
