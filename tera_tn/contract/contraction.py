"""Computing ``ΔW x`` for a batch: the contraction planner and :func:`apply`.

Two exact strategies, both computing the same ``ΔW x``:

* ``"materialize"``: contract the network into ΔW (a chain of mode products), then one GEMM
  ``x ΔWᵀ``. The chain costs ≈ 2·d_out·d_in·ΣK_n FLOPs once, whatever the token count.
* ``"factored"``: reshape ``x`` to ``(n, J_1..J_Q)`` and contract it through the column
  factors, the core and the row factors (an opt_einsum path), never forming d_out × d_in.

:func:`plan` prices both with the calibrated roofline :mod:`tera_tn.contract.costmodel` and explains the
choice; plans are cached per (spec, token count, backend, device, dtype, cost model), so
installing another cost model re-plans without any cache being cleared, and opt_einsum
expressions per (spec, token count).
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from functools import lru_cache
from typing import Literal, Optional, Sequence

import opt_einsum as oe

from ..checks import as_array
from ..backends import Array, backend_key, namespace, to_like
from .costmodel import DTYPES, CostModel, cost_model, normalize_key
from ..core.factors import TeRAFactors
from ..core.modeproduct import chain_steps
from ..core.network import TeRANetwork, materialize, network_of, scale_factor_matrices
from ..core.spec import TeRASpec, check_spec

__all__ = ["StrategyCost", "ContractionPlan", "plan", "apply", "STRATEGIES"]

Strategy = Literal["auto", "materialize", "factored"]
STRATEGIES = ("auto", "materialize", "factored")


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


@dataclass(frozen=True)
class ContractionPlan:
    """The planner's decision for ``spec`` at ``n_tokens`` tokens, with the numbers behind it.

    ``str(plan)`` explains the choice (like opt_einsum's ``PathInfo``).
    """

    spec: TeRASpec
    n_tokens: int
    backend: tuple[str, str, str]
    strategy: str
    materialize: StrategyCost
    factored: StrategyCost
    model: CostModel

    @property
    def chosen(self) -> StrategyCost:
        return self.materialize if self.strategy == "materialize" else self.factored

    @property
    def speedup(self) -> float:
        """Predicted time of the rejected strategy over the chosen one (≥ 1)."""
        other = self.factored if self.strategy == "materialize" else self.materialize
        return other.seconds / max(self.chosen.seconds, 1e-30)

    def __str__(self) -> str:
        backend, device, dtype = self.backend
        lines = [
            f"ContractionPlan for ΔW·x, {self.spec}",
            f"  tokens n = {self.n_tokens}, {backend}/{device}/{dtype}; cost model: {self.model.source} "
            f"(peak {self.model.peak_flops / 1e9:.0f} GFLOP/s, {self.model.bandwidth / 1e9:.0f} GB/s, "
            f"s_half {self.model.s_half:g}, {self.model.overhead * 1e6:.0f} µs/call)",
            f"  chosen: {self.strategy} ({self.speedup:.2f}× faster than the alternative by the model)",
            "",
            f"  {'strategy':<12}{'GFLOP':>10}{'largest interm.':>17}{'MB moved':>11}{'expected ms':>13}",
        ]
        for c in (self.materialize, self.factored):
            lines.append(
                f"  {c.strategy:<12}{c.flops / 1e9:>10.3f}{c.largest_intermediate:>17,}"
                f"{c.bytes_moved / 1e6:>11.1f}{c.seconds * 1e3:>13.3f}"
            )
        for c in (self.materialize, self.factored):
            lines.append("")
            lines.append(f"  {c.strategy} steps:")
            lines.extend(f"    {s}" for s in c.steps)
        return "\n".join(lines)


def check_tokens(n_tokens: object) -> int:
    """``n_tokens`` as an int, refusing bools, floats and values below 1 (numpy ints are fine)."""
    if isinstance(n_tokens, bool) or not isinstance(n_tokens, numbers.Integral) or n_tokens < 1:
        raise ValueError(f"n_tokens must be a positive integer, got {n_tokens!r}")
    return int(n_tokens)


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


def _factored_equation(spec: TeRASpec) -> tuple[str, list[tuple[int, ...]]]:
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
def _factored_expression(spec: TeRASpec, n: int):
    eq, shapes = _factored_equation(spec)
    all_shapes = [(n,) + spec.col_modes] + shapes
    expr = oe.contract_expression(eq, *all_shapes, optimize="dp")
    _, info = oe.contract_path(eq, *all_shapes, shapes=True, optimize="dp")
    return expr, info


def _factored_cost(spec: TeRASpec, n: int, itemsize: int, model: CostModel) -> StrategyCost:
    _, info = _factored_expression(spec, n)
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


@lru_cache(maxsize=2048)
def _plan_cached(spec: TeRASpec, n_tokens: int, backend: tuple[str, str, str], model: CostModel) -> ContractionPlan:
    itemsize = DTYPES[backend[2]]
    mat = _materialize_cost(spec, n_tokens, itemsize, model)
    fac = _factored_cost(spec, n_tokens, itemsize, model)
    strategy = "materialize" if mat.seconds < fac.seconds else "factored"
    return ContractionPlan(spec, n_tokens, backend, strategy, mat, fac, model)


def plan(
    spec: TeRASpec | TeRANetwork,
    n_tokens: int,
    *,
    backend: str = "torch",
    device: str = "cpu",
    dtype: str = "float32",
    model: CostModel | None = None,
) -> ContractionPlan:
    """Choose how to compute ``ΔW x`` for ``n_tokens`` tokens and explain why.

    Args:
        spec: the layer's spec (or a :class:`tera_tn.core.network.TeRANetwork`, whose spec is used).
        n_tokens: rows of ``x`` (batch × sequence).
        backend, device, dtype: what the contraction runs on: ``"torch"``, ``"numpy"`` or
            ``"jax"``, a device such as ``"cpu"`` or ``"cuda:0"``, a floating dtype name.
        model: the cost model to price with; default: the one installed for (backend, device,
            dtype) (see :mod:`tera_tn.contract.costmodel`).

    Returns:
        A :class:`ContractionPlan`; ``print(plan(...))`` shows FLOPs, the largest
        intermediate, bytes moved and the expected time of both strategies, step by step.
    """
    spec = spec.spec if isinstance(spec, TeRANetwork) else check_spec(spec, "plan")
    n_tokens = check_tokens(n_tokens)
    key = normalize_key(backend, device, dtype)
    if model is None:
        model = cost_model(*key)
    elif not isinstance(model, CostModel):
        raise ValueError(f"model must be a CostModel or None, got {type(model).__name__}: {model!r}")
    return _plan_cached(spec, n_tokens, key, model)


def apply(
    spec: TeRASpec | TeRANetwork,
    factors: Optional[TeRAFactors] = None,
    scales: Optional[Sequence[Array]] = None,
    x: Optional[Array] = None,
    *,
    alpha: float = 1.0,
    strategy: Strategy = "auto",
) -> Array:
    """``ΔW x`` for a batch ``x`` of shape ``(..., d_in)``; returns shape ``(..., d_out)``.

    Called as ``apply(spec, factors, scales, x, alpha=...)`` or, with a validated
    :class:`tera_tn.core.network.TeRANetwork` that carries the operands, ``apply(net, x)``.
    Computed in the backend, dtype and device of ``x`` when it is a torch or JAX array (operands
    are converted), else of the first torch or JAX operand, else numpy. ``strategy="auto"`` follows
    :func:`plan`; ``"factored"`` never forms the ``d_out × d_in`` matrix. Torch results are
    differentiable with respect to ``x`` and the scales.
    """
    if isinstance(spec, TeRANetwork) and scales is None and x is None:
        factors, x = None, factors  # apply(net, x)
    net = network_of(spec, factors, scales, alpha, "apply")
    if not isinstance(strategy, str) or strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    spec = net.spec
    x = as_array("x", x, f"shape (..., {spec.d_in})")
    if x.ndim == 0 or x.shape[-1] != spec.d_in:
        raise ValueError(f"x must have shape (..., {spec.d_in}) for {spec}, got {tuple(x.shape)}")
    like = net.common_like(x)
    x = to_like(x, like)
    batch = tuple(x.shape[:-1])
    n = math.prod(batch)
    if n == 0:
        return namespace(x).zeros(batch + (spec.d_out,), x)
    x2 = x.reshape(n, spec.d_in)
    if strategy == "auto":
        key = normalize_key(*backend_key(x))  # what plan() does, without checking spec again
        strategy = _plan_cached(spec, n, key, cost_model(*key)).strategy
    net = net.to(like)
    if strategy == "materialize":
        y = x2 @ materialize(net).T
    else:
        y = _factored(net, x2)
    return y.reshape(batch + (spec.d_out,))


def _factored(net: TeRANetwork, x2: Array) -> Array:
    spec = net.spec
    n = x2.shape[0]
    pad = spec.padding[1]
    if pad:
        x2 = namespace(x2).pad_end(x2, 0, pad)
    xt = x2.reshape((n,) + spec.col_modes)
    p = spec.n_row
    if spec.diag == "identity":
        ops = list(net.scales)
        ops[0] = ops[0] * net.alpha
    else:
        ops = list(scale_factor_matrices(spec, net.factors.factors, net.scales, net.alpha))
    expr, _ = _factored_expression(spec, n)
    y = expr(xt, *ops[p:], net.factors.core, *ops[:p])
    y = y.reshape(n, spec.padded_shape[0])
    return y[:, : spec.d_out] if spec.padding[0] else y
