"""Computing ``ΔW x`` for a batch: the contraction planner and :func:`apply`.

Two exact strategies, both computing the same ``ΔW x`` (their costs and descriptions are kept in
the one registry :mod:`tera_tn.contract.strategies`, which :func:`plan` iterates):

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

from ..checks import as_array
from ..backends import Array, backend_key, namespace, to_like
from .costmodel import DTYPES, CostModel, cost_model, normalize_key
from .strategies import PREFERENCE, StrategyCost, factored_expression, get_strategy, strategy_names
from ..core.factors import TeRAFactors
from ..core.network import TeRANetwork, materialize, network_of, scale_factor_matrices
from ..core.spec import TeRASpec, check_spec

__all__ = ["ContractionPlan", "plan", "apply", "STRATEGIES"]

Strategy = Literal["auto", "materialize", "factored"]
#: What ``apply(strategy=...)`` takes: ``"auto"`` and the registry's strategies that price ``ΔW x``.
STRATEGIES = ("auto",) + strategy_names(layer=False)
_APPLY = STRATEGIES[1:]


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
    def costs(self) -> dict[str, StrategyCost]:
        """Each priced strategy's cost, by registry name."""
        return {c.strategy: c for c in (self.materialize, self.factored)}

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


@lru_cache(maxsize=2048)
def _plan_cached(spec: TeRASpec, n_tokens: int, backend: tuple[str, str, str], model: CostModel) -> ContractionPlan:
    itemsize = DTYPES[backend[2]]
    costs = {name: get_strategy(name).cost(spec, n_tokens, itemsize, model) for name in _APPLY}  # type: ignore[misc]
    strategy = min((n for n in PREFERENCE if n in costs), key=lambda n: costs[n].seconds)
    return ContractionPlan(spec, n_tokens, backend, strategy, costs["materialize"], costs["factored"], model)


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
    y = _RUN[strategy](net.to(like), x2)
    return y.reshape(batch + (spec.d_out,))


def _materialized(net: TeRANetwork, x2: Array) -> Array:
    return x2 @ materialize(net).T


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
    expr, _ = factored_expression(spec, n)
    y = expr(xt, *ops[p:], net.factors.core, *ops[:p])
    y = y.reshape(n, spec.padded_shape[0])
    return y[:, : spec.d_out] if spec.padding[0] else y


# How apply() runs each registry strategy it offers (keyed by the registry's names).
_RUN = {"materialize": _materialized, "factored": _factored}
if set(_RUN) != set(_APPLY):
    raise ImportError(f"contraction.apply runs {sorted(_RUN)}, the registry offers {sorted(_APPLY)}")
