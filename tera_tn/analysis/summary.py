"""One layer at a glance: the rank measures of one TeRA update and the planner's choice for it.

* :func:`summarize_update` → :class:`UpdateSummary`: the spec, its parameter counts against LoRA
  and VeRA, the rank theorem's prediction, the exact structured spectrum's rank measures (at the
  float64 and float32 thresholds, no ΔW formed) and optionally a dense SVD cross-check
  (``tera-tn rank``).
* :func:`summarize_plan` → :class:`PlanSummary`: how the contraction planner computes ``ΔW x``
  for a token count, optionally tabulated for ``n = 1, 2, 4, … 65536`` (``tera-tn plan``).

Both values render themselves like opt_einsum's ``PathInfo``: ``str()`` / ``to_text()`` give the
text the command prints, ``to_dict()`` / ``to_json()`` its ``--json`` output, and rich's console
prints them with its styles (``Console().print(summary)``). :func:`strict_json` is the JSON
writer they share: ``inf`` and ``nan`` become strings, so the text stays strict JSON.
"""

from __future__ import annotations

import io
import json
import math
import time
from dataclasses import dataclass
from typing import Any, Optional

from .accounting import layer_cost
from ..core.spec import TeRASpec
from .rank import RankSummary

__all__ = ["UpdateSummary", "summarize_update", "PlanSummary", "summarize_plan", "strict_json", "DENSE_MAX_ELEMENTS",
           "SWEEP_TOKENS"]

#: largest ``d_out · d_in`` that :func:`summarize_update` materializes for its dense SVD
DENSE_MAX_ELEMENTS = 4096 * 4096
#: token counts of a plan's sweep (:func:`summarize_plan`)
SWEEP_TOKENS = tuple(2**k for k in range(17))
#: the peers an :class:`UpdateSummary` compares with: (label, kind, rank)
_PEERS = (("LoRA r=8", "lora", 8), ("LoRA r=32", "lora", 32), ("VeRA r=256", "vera", 256))


def _sanitize(data: Any) -> Any:
    if isinstance(data, float) and not math.isfinite(data):
        return str(data)
    if isinstance(data, dict):
        return {k: _sanitize(v) for k, v in data.items()}
    if isinstance(data, (list, tuple)):
        return [_sanitize(v) for v in data]
    return data


def _json_default(obj: Any) -> Any:
    if isinstance(obj, set):
        return list(obj)
    if hasattr(obj, "item"):  # numpy scalars
        return obj.item()
    return str(obj)


def strict_json(data: Any, indent: Optional[int] = 2) -> str:
    """``data`` as strict JSON text: non-finite floats become the strings ``"inf"``/``"nan"``,
    tuples lists, numpy scalars numbers and anything else its ``str``."""
    return json.dumps(_sanitize(data), indent=indent, default=_json_default, allow_nan=False)


def _render(value: Any, width: int) -> str:
    """What rich's console prints for ``value`` at ``width`` columns, without styles."""
    from rich.console import Console

    buf = io.StringIO()
    Console(file=buf, width=width, color_system=None, force_terminal=False, highlight=False,
            soft_wrap=False).print(value, crop=False)
    return buf.getvalue().rstrip("\n")


def _check_int(name: str, value: Any, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    return value


# --------------------------------------------------------------------------------------------
# rank measures of one update
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class UpdateSummary:
    """Parameters and rank measures of one TeRA update (:func:`summarize_update`).

    Attributes:
        spec: the layer's spec.
        scales: the λ at which ranks were measured: ``"random"``, ``"ones"`` or ``"zero_start"``.
        seed: seed of the frozen factors (and of λ when random).
        theoretical_rank: the rank theorem's prediction at those λ.
        peers: ``(label, trainable, max rank)`` of LoRA r = 8, LoRA r = 32 and VeRA r = 256 on
            the same layer.
        structured: rank measures of the exact structured spectrum at the float64 and float32
            thresholds, or None when skipped.
        dense: rank measures of a dense SVD of the materialized ΔW, or None.
        structured_max_side: the core-matrix side above which the structured spectrum is
            skipped unless asked for (named in the text when it was skipped).
        elapsed_s: seconds spent on the spectra.
    """

    spec: TeRASpec
    scales: str
    seed: int
    theoretical_rank: int
    peers: tuple[tuple[str, int, int], ...]
    structured: Optional[tuple[RankSummary, RankSummary]] = None
    dense: Optional[RankSummary] = None
    structured_max_side: int = 2048
    elapsed_s: float = 0.0

    def __post_init__(self) -> None:
        if not isinstance(self.spec, TeRASpec):
            raise ValueError(f"UpdateSummary needs a TeRASpec, got {type(self.spec).__name__}")

    @property
    def core_side(self) -> int:
        """The smaller side of the core matrix (its SVD is the structured spectrum's cost)."""
        p = self.spec.n_row
        return min(math.prod(self.spec.ranks[:p]), math.prod(self.spec.ranks[p:]))

    def to_dict(self) -> dict:
        """Every number (the ``tera-tn rank --json`` object); ``inf`` as the string ``"inf"``."""
        spec = self.spec
        out: dict[str, Any] = {
            "spec": str(spec), "shape": list(spec.shape), "row_modes": list(spec.row_modes),
            "col_modes": list(spec.col_modes), "ranks": list(spec.ranks), "diag": spec.diag,
            "padding_overhead": spec.padding_overhead, "trainable": spec.num_trainable,
            "frozen_shared": spec.num_frozen, "max_rank": spec.max_rank, "scales": self.scales, "seed": self.seed,
            "theoretical_rank": self.theoretical_rank,
            "comparison": {label: {"trainable": t, "max_rank": r} for label, t, r in self.peers},
        }
        if self.structured is not None:
            out["structured"] = {"float64": self.structured[0].to_dict(),
                                 "float32_threshold": self.structured[1].to_dict()}
        if self.dense is not None:
            out["dense"] = self.dense.to_dict()
        out["elapsed_s"] = round(self.elapsed_s, 3)
        return out

    def to_json(self, indent: Optional[int] = 2) -> str:
        return strict_json(self.to_dict(), indent)

    def __rich_console__(self, console, options):
        from rich.table import Table
        from rich.text import Text

        spec = self.spec
        yield Text(str(spec))
        t = Table(title="parameters (one layer)", title_justify="left")
        t.add_column("method")
        t.add_column("trainable", justify="right")
        t.add_column("max rank ΔW", justify="right")
        t.add_row("TeRA", f"{spec.num_trainable:,}", str(spec.max_rank))
        for label, trainable, max_rank in self.peers:
            t.add_row(label, f"{trainable:,}", str(max_rank))
        yield t
        yield Text(f"frozen shared per shape group: {spec.num_frozen:,}; padding overhead {spec.padding_overhead:.2%}")
        yield Text(f"theoretical rank at λ = {self.scales}: {self.theoretical_rank} (rank theorem)")
        rows = []
        if self.structured is not None:
            rows += [("structured, float64 threshold", self.structured[0]),
                     ("structured, float32 threshold", self.structured[1])]
        if self.dense is not None:
            rows.append(("dense SVD of ΔW", self.dense))
        if not rows:
            yield Text(f"(structured spectrum skipped: core matrix side {self.core_side} > {self.structured_max_side}; "
                       "pass --structured to compute it)")
            return
        t = Table(title=f"rank measures of ΔW (seed {self.seed})", title_justify="left")
        for h in ("source", "numerical", "stable", "effective", "energy 99%", "σ_max", "condition"):
            t.add_column(h, justify="left" if h == "source" else "right")
        for label, s in rows:
            cond = s.condition_number
            t.add_row(label, str(s.numerical_rank), f"{s.stable_rank:.1f}", f"{s.effective_rank:.1f}",
                      str(s.energy_rank), f"{s.sigma_max:.3g}", "inf" if math.isinf(cond) else f"{cond:.3g}")
        yield t

    def to_text(self, width: int = 120) -> str:
        """The ``tera-tn rank`` text: spec, parameter table, theoretical rank, rank-measure table."""
        return _render(self, width)

    def __str__(self) -> str:
        return self.to_text()


def summarize_update(spec: TeRASpec, *, scales: str = "random", seed: int = 0, structured: Optional[bool] = None,
                     structured_max_side: int = 2048, dense: bool = False) -> UpdateSummary:
    """Parameters and every rank measure of one TeRA update with random orthogonal frozen factors.

    Args:
        spec: the layer's spec.
        scales: λ at which ranks are measured: ``"random"`` (|λ| in [0.5, 2], from ``seed``),
            ``"ones"`` or ``"zero_start"``.
        seed: seed of the frozen factors (and of random λ).
        structured: compute the exact structured spectrum (True), never (False), or when the core
            matrix's smaller side is at most ``structured_max_side`` (None).
        structured_max_side: see ``structured``.
        dense: also materialize ΔW and SVD it (a cross-check; up to ``DENSE_MAX_ELEMENTS`` entries).
    """
    from ..core.factors import init_scales, random_factors
    from ..core.network import delta_weight, theoretical_rank

    if not isinstance(spec, TeRASpec):
        raise ValueError(f"summarize_update needs a TeRASpec, got {type(spec).__name__}")
    _check_int("seed", seed, 0)
    _check_int("structured_max_side", structured_max_side, 1)
    if dense and spec.d_out * spec.d_in > DENSE_MAX_ELEMENTS:
        raise ValueError(f"summarize_update: dense=True would SVD a {spec.d_out}×{spec.d_in} matrix; allowed up to "
                         "4096×4096 entries")
    lam = init_scales(spec, scales, seed=seed if scales == "random" else None)
    peers = tuple((label, c.trainable, c.max_rank)
                  for label, c in ((label, layer_cost(kind, *spec.shape, r=r)) for label, kind, r in _PEERS))
    summary = UpdateSummary(spec, scales, seed, theoretical_rank(spec, lam), peers,
                            structured_max_side=structured_max_side)
    if structured is None:
        structured = summary.core_side <= structured_max_side
    t0 = time.perf_counter()
    spectra = dense_summary = None
    if structured:
        from .spectrum import tera_rank_summary

        factors = random_factors(spec, seed)
        spectra = (tera_rank_summary(spec, factors, lam, dtype="float64"),
                   tera_rank_summary(spec, factors, lam, dtype="float32"))
    if dense:
        import numpy as np

        from .rank import rank_summary

        dense_summary = rank_summary(np.asarray(delta_weight(spec, random_factors(spec, seed), lam)))
    return UpdateSummary(spec, scales, seed, summary.theoretical_rank, peers, spectra, dense_summary,
                         structured_max_side, time.perf_counter() - t0)


# --------------------------------------------------------------------------------------------
# the planner's choice
# --------------------------------------------------------------------------------------------
_COSTS = ("flops", "largest_intermediate", "bytes_moved", "seconds", "steps")


@dataclass(frozen=True)
class PlanSummary:
    """The planner's choice for one layer and token count, optionally with a sweep of token counts
    (:func:`summarize_plan`).

    Attributes:
        plan: the :class:`tera_tn.contract.contraction.ContractionPlan` (``str(plan)`` explains it).
        sweep: :func:`tera_tn.analysis.plot.planner_data` over ``SWEEP_TOKENS``, or None.
    """

    plan: Any
    sweep: Optional[dict] = None

    def __post_init__(self) -> None:
        from ..contract.contraction import ContractionPlan

        if not isinstance(self.plan, ContractionPlan):
            raise ValueError(f"PlanSummary needs a ContractionPlan, got {type(self.plan).__name__}")

    def to_dict(self) -> dict:
        """The ``tera-tn plan --json`` object: spec, tokens, backend, choice, speed-up, both
        strategies' costs and steps, and the sweep when there is one."""
        p = self.plan
        out: dict[str, Any] = {
            "spec": str(p.spec), "n_tokens": p.n_tokens, "backend": list(p.backend), "strategy": p.strategy,
            "speedup": p.speedup,
            "materialize": {k: getattr(p.materialize, k) for k in _COSTS},
            "factored": {k: getattr(p.factored, k) for k in _COSTS},
        }
        if self.sweep:
            out["sweep"] = self.sweep
        return out

    def to_json(self, indent: Optional[int] = 2) -> str:
        return strict_json(self.to_dict(), indent)

    def __rich_console__(self, console, options):
        from rich.table import Table
        from rich.text import Text

        yield Text(str(self.plan), no_wrap=True, overflow="ignore")
        if not self.sweep:
            return
        sweep = self.sweep
        t = Table(title="predicted ms per call by token count", title_justify="left")
        for h in ("tokens", "materialize", "factored", "chosen"):
            t.add_column(h, justify="right")
        for n, m, f, c in zip(sweep["n_tokens"], sweep["materialize_s"], sweep["factored_s"], sweep["chosen"]):
            t.add_row(f"{n:,}", f"{m * 1e3:.3f}", f"{f * 1e3:.3f}", c)
        yield t
        if sweep["switches"]:
            lines = [f"switch from {sw['from']} to {sw['to']} at n = {sw['n_tokens']:,}" for sw in sweep["switches"]]
        else:
            lines = [f"no switch: {sweep['chosen'][0]} for every n from 1 to {sweep['n_tokens'][-1]:,}"]
        yield Text("\n".join(lines), no_wrap=True, overflow="ignore")

    def to_text(self, width: int = 120) -> str:
        """The ``tera-tn plan`` text: the plan's explanation, then the sweep's table and switches."""
        return _render(self, width)

    def __str__(self) -> str:
        return self.to_text()

    def figure(self):
        """The planner-cost-vs-tokens figure (:func:`tera_tn.analysis.plot.planner_figure`): of the
        sweep, or of ``SWEEP_TOKENS`` plus this plan's token count when there is no sweep."""
        from . import plot

        p = self.plan
        backend, device, dtype = p.backend
        data = self.sweep or plot.planner_data(p.spec, sorted({*SWEEP_TOKENS, p.n_tokens}), backend=backend,
                                               device=device, dtype=dtype)
        return plot.planner_figure(data=data)


def summarize_plan(spec: TeRASpec, n_tokens: int, *, backend: str = "torch", device: str = "cpu",
                   dtype: str = "float32", sweep: bool = False) -> PlanSummary:
    """:func:`tera_tn.plan` for ``n_tokens`` tokens, and with ``sweep=True`` the predictions of
    both strategies for every count in ``SWEEP_TOKENS`` (:func:`tera_tn.analysis.plot.planner_data`)."""
    from ..contract import contraction

    chosen = contraction.plan(spec, n_tokens, backend=backend, device=device, dtype=dtype)
    data = None
    if sweep:
        from .plot import planner_data

        data = planner_data(spec, list(SWEEP_TOKENS), backend=backend, device=device, dtype=dtype)
    return PlanSummary(chosen, data)
