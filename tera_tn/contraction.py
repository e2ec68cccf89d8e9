"""Computing ``ΔW x`` for a batch: the contraction planner and :func:`apply`.

Two exact strategies (tera-math §7):

* ``"materialize"``: contract the network into ΔW (a chain of mode products), then one GEMM
  ``x ΔWᵀ``. The chain costs ≈ 2·d_out·d_in·ΣK_n FLOPs once, whatever the token count.
* ``"factored"``: reshape ``x`` to ``(n, J_1..J_Q)`` and contract it through the column
  factors, the core and the row factors (an opt_einsum path), never forming d_out × d_in.

:func:`plan` prices both with the calibrated roofline :mod:`tera_tn.costmodel` and explains the
choice; plans and opt_einsum expressions are cached per (spec, token count, backend, device,
dtype).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Literal, Sequence

import opt_einsum as oe

from ._backend import Array, backend_key, floating_like, is_torch, pick_like, to_like
from .costmodel import CostModel, cost_model
from .factors import TeRAFactors, check_scales
from .modeproduct import chain_steps
from .network import delta_weight, scaled_factors
from .spec import TeRASpec

__all__ = ["StrategyCost", "ContractionPlan", "plan", "apply", "clear_plan_cache", "STRATEGIES"]

Strategy = Literal["auto", "materialize", "factored"]
STRATEGIES = ("auto", "materialize", "factored")
_ITEMSIZE = {"float16": 2, "bfloat16": 2, "float32": 4, "float64": 8}


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


def _check_tokens(n_tokens: object) -> int:
    if isinstance(n_tokens, bool) or not isinstance(n_tokens, int) or n_tokens < 1:
        raise ValueError(f"n_tokens must be a positive integer, got {n_tokens!r}")
    return n_tokens


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
        if len(terms) == 2:
            shared = set(terms[0]) & set(terms[1]) & set(out)
            batch = math.prod(sizes[c] for c in shared)
            m = math.prod(sizes[c] for c in terms[0] if c not in removed and c not in shared)
            nn = math.prod(sizes[c] for c in terms[1] if c not in removed and c not in shared)
            t = model.gemm_seconds(m * batch, nn, k, itemsize) if batch == 1 else model.gemm_seconds(m, nn, k, itemsize, calls=batch)
            f = 2 * batch * m * nn * k
            moved = (batch * (m * k + nn * k) + out_size) * itemsize
        else:
            f = out_size * max(k, 1) * len(terms)
            moved = sum(math.prod(sizes[c] for c in t) for t in terms) * itemsize + out_size * itemsize
            t = model.stream_seconds(moved)
        flops += f
        traffic += moved
        seconds += t
        steps.append(f"{eq}  {t * 1e3:.3f} ms")
    return StrategyCost("factored", flops, int(info.largest_intermediate), traffic, seconds, tuple(steps))


@lru_cache(maxsize=2048)
def _plan_cached(spec: TeRASpec, n_tokens: int, backend: tuple[str, str, str], model: CostModel) -> ContractionPlan:
    itemsize = _ITEMSIZE.get(backend[2], 4)
    mat = _materialize_cost(spec, n_tokens, itemsize, model)
    fac = _factored_cost(spec, n_tokens, itemsize, model)
    strategy = "materialize" if mat.seconds < fac.seconds else "factored"
    return ContractionPlan(spec, n_tokens, backend, strategy, mat, fac, model)


def plan(
    spec: TeRASpec, n_tokens: int, *, backend: str = "torch", device: str = "cpu", dtype: str = "float32"
) -> ContractionPlan:
    """Choose how to compute ``ΔW x`` for ``n_tokens`` tokens and explain why.

    Args:
        spec: the layer's spec.
        n_tokens: rows of ``x`` (batch × sequence).
        backend, device, dtype: select the cost model (see :mod:`tera_tn.costmodel`).

    Returns:
        A :class:`ContractionPlan`; ``print(plan(...))`` shows FLOPs, the largest
        intermediate, bytes moved and the expected time of both strategies, step by step.
    """
    if not isinstance(spec, TeRASpec):
        raise ValueError(f"plan expects a TeRASpec, got {type(spec).__name__}")
    n_tokens = _check_tokens(n_tokens)
    key = (backend, device, dtype)
    return _plan_cached(spec, n_tokens, key, cost_model(*key))


def clear_plan_cache() -> None:
    """Forget cached plans (done automatically when a cost model is installed)."""
    _plan_cached.cache_clear()


def apply(
    spec: TeRASpec,
    factors: TeRAFactors,
    scales: Sequence[Array],
    x: Array,
    *,
    alpha: float = 1.0,
    strategy: Strategy = "auto",
) -> Array:
    """``ΔW x`` for a batch ``x`` of shape ``(..., d_in)``; returns shape ``(..., d_out)``.

    Computed in the backend, dtype and device of ``x`` when it is a torch tensor (operands are
    converted), else of the first torch operand, else numpy. ``strategy="auto"`` follows
    :func:`plan`; ``"factored"`` never forms the ``d_out × d_in`` matrix. Torch results are
    differentiable with respect to ``x`` and the scales.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    check_scales(spec, tuple(scales))
    factors.check(spec)
    if x.ndim == 0 or x.shape[-1] != spec.d_in:
        raise ValueError(f"x must have shape (..., {spec.d_in}) for {spec}, got {tuple(x.shape)}")
    like = floating_like(pick_like(x, *scales, factors.core), *scales, factors.core)
    x = to_like(x, like)
    batch = tuple(x.shape[:-1])
    n = math.prod(batch)
    if n == 0:
        return _empty_like(x, batch + (spec.d_out,))
    x2 = x.reshape(n, spec.d_in)
    if strategy == "auto":
        strategy = plan(spec, n, **dict(zip(("backend", "device", "dtype"), backend_key(x)))).strategy
    if strategy == "materialize":
        dw = delta_weight(spec, factors.to(like), [to_like(s, like) for s in scales], alpha)
        y = x2 @ dw.T
    else:
        y = _factored(spec, factors.to(like), [to_like(s, like) for s in scales], x2, alpha)
    return y.reshape(batch + (spec.d_out,))


def _empty_like(x: Array, shape: tuple[int, ...]) -> Array:
    if is_torch(x):
        import torch

        return torch.zeros(shape, dtype=x.dtype, device=x.device)
    import numpy as np

    return np.zeros(shape, dtype=x.dtype)


def _factored(spec: TeRASpec, factors: TeRAFactors, scales: list[Array], x2: Array, alpha: float) -> Array:
    n = x2.shape[0]
    pad = spec.padding[1]
    if pad:
        if is_torch(x2):
            import torch.nn.functional as F

            x2 = F.pad(x2, (0, pad))
        else:
            import numpy as np

            x2 = np.pad(x2, ((0, 0), (0, pad)))
    xt = x2.reshape((n,) + spec.col_modes)
    p = spec.n_row
    if spec.diag == "identity":
        ops = list(scales)
        ops[0] = ops[0] * alpha
    else:
        ops = list(scaled_factors(spec, factors, scales, alpha))
    expr, _ = _factored_expression(spec, n)
    y = expr(xt, *ops[p:], factors.core, *ops[:p])
    y = y.reshape(n, spec.padded_shape[0])
    return y[:, : spec.d_out] if spec.padding[0] else y
