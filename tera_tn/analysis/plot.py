"""Figures of TeRA's rank/parameter trade-off, of update spectra and of the contraction planner.

Every ``*_figure`` function returns a :class:`matplotlib.figure.Figure` built without
``pyplot``: nothing is shown, no global figure state is touched and no GUI backend is needed
(PNG/SVG are written by the Agg/SVG canvases). Every ``*_data`` function returns the numbers
behind the figure as plain Python objects (what ``tera-tn report`` stores in its JSON file).
Output is deterministic: the same arguments give the same figure.

* :func:`tradeoff_figure` — maximum rank of ΔW against trainable parameters (log–log) for TeRA
  at several orders and Tucker ranks, LoRA, VeRA and HiRA, over the layers of one model shape
  set (:mod:`tera_tn.analysis.shapes`) or any list of ``(d_out, d_in)``.
* :func:`spectra_figure` — normalized singular values ``σ_i/σ_1`` of constructed updates of one
  layer at equal trainable budget: TeRA from its exact structured spectrum
  (:func:`tera_tn.analysis.spectrum.tera_singular_values`), LoRA ``ΔW = B A`` and VeRA
  ``ΔW = diag(b) B diag(d) A`` from an SVD of the product of Gaussian draws.
* :func:`planner_figure` — the planner's predicted time of both contraction strategies
  against the token count (:func:`tera_tn.plan`), with the token counts where its choice
  switches marked.
Measured accuracy figures are in :mod:`tera_tn.analysis.measured`; the palette, style and
:func:`~tera_tn.analysis.figures.save_figure` in :mod:`tera_tn.analysis.figures`.

matplotlib is imported lazily (``pip install tera_tn[plot]``).
"""

from __future__ import annotations

import math
from typing import Any, Iterable, Optional, Sequence, Union

import numpy as np

from .accounting import layer_cost
from ..checks import check_size
from ..contract.contraction import plan
from ..core.factors import init_scales, random_factors
from .rank import summarize_singular_values
from ..core.spec import TeRASpec
from .spectrum import tera_singular_values
from .figures import COLORS, new_figure, style
from .peers import lora_update, vera_update

__all__ = [
    "TRADEOFF_ORDERS",
    "TRADEOFF_RANK_FRACTIONS",
    "tradeoff_data",
    "tradeoff_figure",
    "spectra_data",
    "spectra_data_of_checked",
    "spectra_figure",
    "planner_data",
    "planner_figure",
]

#: TeRA orders drawn by :func:`tradeoff_figure` (orders a layer cannot take are skipped)
TRADEOFF_ORDERS = (3, 4, 6, 8)
#: Tucker-rank fractions per TeRA order (``ranks=f`` in :meth:`TeRASpec.from_shape`)
TRADEOFF_RANK_FRACTIONS = (0.125, 0.25, 0.5, 0.75, 1.0)

Layers = Union[str, Sequence[Any]]


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------
def _layer_counts(layers: Layers, target_modules=None) -> tuple[str, dict[tuple[int, int], int]]:
    """(label, {(d_out, d_in): count}) of a built-in model name or a list of layers/shapes."""
    from .shapes import as_layer_shapes, model_config, model_shapes, shape_counts

    if isinstance(layers, str):
        label = model_config(layers).name
        return label, shape_counts(model_shapes(layers, target_modules))
    return "custom layers", shape_counts(as_layer_shapes(layers))


def _powers_of_two(upto: int) -> list[int]:
    return [2**k for k in range(int(math.log2(max(upto, 1))) + 1)]


def _fmt_count(n: float) -> str:
    for unit, div in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= div:
            return f"{n / div:.3g}{unit}"
    return f"{n:.0f}"


# --------------------------------------------------------------------------------------------
# rank vs trainable parameters
# --------------------------------------------------------------------------------------------
def tradeoff_data(
    layers: Layers,
    *,
    target_modules=None,
    tera_orders: Iterable[int] = TRADEOFF_ORDERS,
    rank_fractions: Iterable[float] = TRADEOFF_RANK_FRACTIONS,
    lora_ranks: Optional[Iterable[int]] = None,
    vera_ranks: Optional[Iterable[int]] = None,
    hira_ranks: Iterable[int] = (1, 4, 16, 64),
) -> dict:
    """Trainable parameters and maximum rank of ΔW for each configuration of each method.

    Counts follow :mod:`tera_tn.analysis.accounting`: trainable numbers summed over all adapted layers,
    and the maximum rank of ΔW as the smallest per-layer maximum over the layers (what every
    layer can reach; for TeRA it is the rank at generic λ by the rank theorem: the smaller of
    the products of the row-side and the column-side ranks).

    Args:
        layers: a built-in model name (:func:`tera_tn.analysis.shapes.available_models`) or a list of
            ``(d_out, d_in)`` pairs / :class:`~tera_tn.analysis.shapes.LayerShape`.
        target_modules: restricts a built-in model's layers (PEFT rules).
        tera_orders: TeRA orders ``N``; an order a layer cannot take is skipped.
        rank_fractions: Tucker ranks ``R_n = ceil(f·K_n)`` drawn for each order.
        lora_ranks, vera_ranks: ranks ``r`` (default: powers of two up to the smallest layer
            side, VeRA up to 4096 as well).
        hira_ranks: HiRA ranks (its bound ``rank(W0)·r`` assumes a full-rank ``W0``).

    Returns:
        ``{"model", "n_layers", "shapes", "dense", "full_rank", "series": [...]}`` where each
        series is ``{"method", "label", "points": [{"config", "trainable", "max_rank"}]}``.
    """
    label, counts = _layer_counts(layers, target_modules)
    n_layers = sum(counts.values())
    full = min(min(s) for s in counts)
    lora_ranks = list(lora_ranks) if lora_ranks is not None else _powers_of_two(full)
    vera_ranks = list(vera_ranks) if vera_ranks is not None else _powers_of_two(max(full, 4096))
    series = []

    def totals(method: str, **kw) -> tuple[int, int]:
        trainable, rank = 0, None
        for (o, i), c in counts.items():
            if method == "tera":
                lc = layer_cost("tera", o, i, spec=TeRASpec.from_shape(o, i, **kw))
            else:
                lc = layer_cost(method, o, i, **kw)
            trainable += c * lc.trainable
            rank = lc.max_rank if rank is None else min(rank, lc.max_rank)
        return trainable, int(rank)  # type: ignore[arg-type]

    for order in tera_orders:
        points = []
        for f in rank_fractions:
            try:
                t, r = totals("tera", order=order, ranks="full" if f == 1.0 else float(f))
            except ValueError:  # this order does not fit some layer
                points = []
                break
            if not any(p["trainable"] == t and p["max_rank"] == r for p in points):
                points.append({"config": {"order": order, "ranks": "full" if f == 1.0 else f}, "trainable": t, "max_rank": r})
        if points:
            series.append({"method": "tera", "label": f"TeRA order {order}", "points": points})
    for method, ranks, name in (("lora", lora_ranks, "LoRA"), ("vera", vera_ranks, "VeRA"), ("hira", hira_ranks, "HiRA")):
        points = []
        for r in ranks:
            t, mr = totals(method, r=int(r))
            points.append({"config": {"r": int(r)}, "trainable": t, "max_rank": mr})
        if points:
            series.append({"method": method, "label": name, "points": points})
    return {
        "model": label,
        "n_layers": n_layers,
        "shapes": [{"d_out": o, "d_in": i, "count": c} for (o, i), c in counts.items()],
        "dense": sum(o * i * c for (o, i), c in counts.items()),
        "full_rank": full,
        "series": series,
    }


def tradeoff_figure(layers: Layers, *, data: Optional[dict] = None, title: Optional[str] = None, **kwargs):
    """Log–log plot of maximum rank of ΔW against trainable parameters (see :func:`tradeoff_data`).

    One line per TeRA order through its Tucker-rank fractions (filled marker: full ranks), one
    line per LoRA/VeRA/HiRA through its ranks ``r``; the dashed line is full rank
    ``min(d_out, d_in)`` of the smallest layer, the dotted one the parameters of full
    fine-tuning. ``kwargs`` go to :func:`tradeoff_data`; pass ``data`` to reuse its result.
    """
    d = data if data is not None else tradeoff_data(layers, **kwargs)
    fig, (ax,) = new_figure(7.2, 4.6)
    with style():
        tera_i = 0
        for s in d["series"]:
            xs = [p["trainable"] for p in s["points"]]
            ys = [p["max_rank"] for p in s["points"]]
            if s["method"] == "tera":
                color = COLORS["tera"][tera_i % len(COLORS["tera"])]
                tera_i += 1
                ax.plot(xs, ys, "-o", color=color, ms=4.5, lw=1.6, mfc="white", label=s["label"] + " (R_n = f·K_n)")
                full_pts = [(p["trainable"], p["max_rank"]) for p in s["points"] if p["config"]["ranks"] == "full"]
                if full_pts:
                    ax.plot(*zip(*full_pts), "o", color=color, ms=6.5)
            else:
                line_style = {"lora": "-s", "vera": "-^", "hira": "-D"}[s["method"]]
                ax.plot(xs, ys, line_style, color=COLORS[s["method"]], ms=4, lw=1.3, label=s["label"] + " (r = 1, 2, 4, …)"
                        if s["method"] != "hira" else "HiRA (r = " + ", ".join(str(p["config"]["r"]) for p in s["points"]) + ")")
        ax.axhline(d["full_rank"], color=COLORS["ref"], ls="--", lw=1)
        ax.annotate(f"full rank {d['full_rank']}", (0.01, d["full_rank"]), xycoords=("axes fraction", "data"),
                    xytext=(0, 3), textcoords="offset points", fontsize=8, color=COLORS["ref"])
        ax.axvline(d["dense"], color=COLORS["ref"], ls=":", lw=1)
        ax.annotate(f"full fine-tuning\n{_fmt_count(d['dense'])}", (d["dense"], 0.86), xycoords=("data", "axes fraction"),
                    xytext=(-3, 0), textcoords="offset points", ha="right", va="top", fontsize=8, color=COLORS["ref"])
        ax.set_xscale("log")
        ax.set_yscale("log", base=2)
        ax.set_xlabel("trainable parameters (count, all adapted layers)")
        ax.set_ylabel("max rank of ΔW (smallest over layers)")
        shapes = ", ".join(f"{s['count']}×{s['d_out']}×{s['d_in']}" for s in d["shapes"])
        ax.set_title(title or f"{d['model']}: rank vs trainable parameters\n{d['n_layers']} layers [{shapes}]")
        ax.legend(loc="lower right", frameon=True, framealpha=0.9)
    return fig


# --------------------------------------------------------------------------------------------
# spectra of constructed updates
# --------------------------------------------------------------------------------------------
def _default_spectra_methods(d_out: int, d_in: int) -> list[str]:
    budget = d_out + d_in  # LoRA r=1
    methods = ["lora:r=1", f"vera:r={max(1, min(budget - d_out, d_out, d_in))}", "tera:order=2"]
    for order in (4, 6):
        try:
            TeRASpec.from_shape(d_out, d_in, order=order)
            methods.append(f"tera:order={order}")
        except ValueError:
            pass
    return methods


def spectra_data(d_out: int = 768, d_in: int = 768, methods: Optional[Sequence[str]] = None, *, seed: int = 0) -> dict:
    """Singular values of constructed updates of one ``(d_out, d_in)`` layer.

    Args:
        d_out, d_in: the layer shape.
        methods: strings as in :meth:`tera_tn.analysis.report.Method.parse` (``"lora:r=1"``,
            ``"vera:r=768"``, ``"tera:order=6,ranks=0.5"``; HiRA needs ``W0`` and is not
            drawn). Default: equal budget ``d_in + d_out`` — LoRA ``r=1``, VeRA with
            ``r = d_in`` (capped at the smaller side) and TeRA order 2 — plus TeRA orders 4
            and 6, which train far fewer numbers.
        seed: seed of every random draw (TeRA frozen factors and λ, LoRA/VeRA matrices).

    TeRA: random orthogonal factors, λ at ``init_scales(spec, "random")``, spectrum from the
    structure (exact, no ΔW formed). LoRA/VeRA: SVD of the dense product.

    Returns:
        ``{"shape", "seed", "series": [{"method", "label", "trainable", "max_rank", "sv",
        "summary"}]}`` — ``sv`` the singular values (descending, length ``min(d_out, d_in)``),
        ``summary`` a :class:`tera_tn.analysis.rank.RankSummary` dict (float64 threshold).
    """
    return spectra_data_of_checked(check_size("d_out", d_out), check_size("d_in", d_in), methods, seed=seed)


def spectra_data_of_checked(d_out: int, d_in: int, methods: Optional[Sequence[str]] = None, *, seed: int = 0) -> dict:
    """:func:`spectra_data` of a layer shape that is already checked (a report's settings check
    theirs when they are made)."""
    from .report import Method

    methods = list(methods) if methods is not None else _default_spectra_methods(d_out, d_in)
    series = []
    for text in methods:
        m = Method.parse(text)
        if m.kind == "tera":
            spec = m.spec(d_out, d_in)
            scales = init_scales(spec, "random", seed=seed)
            sv = np.asarray(tera_singular_values(spec, random_factors(spec, seed), scales), dtype=np.float64)
            trainable, max_rank = spec.num_trainable, spec.max_rank
        elif m.kind in ("lora", "vera"):
            dw = (lora_update if m.kind == "lora" else vera_update)(d_out, d_in, m.r, seed)  # type: ignore[arg-type]
            sv = np.linalg.svd(dw, compute_uv=False)
            lc = layer_cost(m.kind, d_out, d_in, r=m.r)
            trainable, max_rank = lc.trainable, lc.max_rank
        else:
            raise ValueError(f"{m.label}: spectra are drawn for TeRA, LoRA and VeRA (HiRA needs W0)")
        summary = summarize_singular_values(sv, (d_out, d_in), "float64")
        series.append({
            "method": m.kind,
            "label": m.label,
            "trainable": int(trainable),
            "max_rank": int(max_rank),
            "sv": [float(x) for x in sv],
            "summary": summary.to_dict(),
        })
    return {"shape": [d_out, d_in], "seed": int(seed), "series": series}


def spectra_figure(d_out: int = 768, d_in: int = 768, methods: Optional[Sequence[str]] = None, *, seed: int = 0,
                   data: Optional[dict] = None, floor: float = 1e-17):
    """Normalized singular values ``σ_i/σ_1`` (log scale) against their index, one line per
    method, labelled with trainable numbers, numerical rank and effective rank (see
    :func:`spectra_data`). Values below ``floor`` (exact zeros) are drawn at ``floor``."""
    d = data if data is not None else spectra_data(d_out, d_in, methods, seed=seed)
    d_out, d_in = d["shape"]
    fig, (ax,) = new_figure(7.2, 4.6)
    with style():
        tera_i = 0
        budgets = set()
        for s in d["series"]:
            sv = np.asarray(s["sv"])
            y = np.maximum(sv / sv[0] if sv[0] > 0 else sv, floor)
            x = np.arange(1, sv.size + 1)
            if s["method"] == "tera":
                color = COLORS["tera"][tera_i % len(COLORS["tera"])]
                tera_i += 1
            else:
                color = COLORS[s["method"]]
            sm = s["summary"]
            label = (f"{s['label']}: {s['trainable']:,} trained, rank {sm['numerical_rank']}, "
                     f"eff. rank {sm['effective_rank']:.0f}")
            ls = "-" if s["trainable"] == max(t["trainable"] for t in d["series"]) else "--"
            ax.plot(x, y, ls, color=color, lw=1.6, label=label, drawstyle="steps-post")
            budgets.add(s["trainable"])
        ax.set_yscale("log")
        ax.set_ylim(floor / 3, 3)
        ax.set_xlim(0, min(d_out, d_in) + 1)
        ax.set_xlabel("singular value index i")
        ax.set_ylabel("σ_i / σ_1 (relative, log scale)")
        top = max(budgets)
        ax.set_title(f"Spectra of constructed ΔW, {d_out}×{d_in} layer\n"
                     f"solid: equal budget of {top:,} trained numbers; dashed: TeRA at fewer")
        ax.legend(loc="lower left", frameon=True, framealpha=0.9)
    return fig


# --------------------------------------------------------------------------------------------
# planner cost vs token count
# --------------------------------------------------------------------------------------------
def planner_data(spec: Optional[TeRASpec] = None, n_tokens: Optional[Sequence[int]] = None, *,
                 backend: str = "torch", device: str = "cpu", dtype: str = "float32") -> dict:
    """The planner's predicted seconds of both strategies for each token count.

    Args:
        spec: the layer (default: 4096×4096 at order 6).
        n_tokens: token counts (default: powers of two from 1 to 65536).
        backend, device, dtype: which cost model :func:`tera_tn.plan` uses.

    Returns:
        ``{"spec", "cost_model", "n_tokens", "materialize_s", "factored_s", "chosen",
        "switches", "tie_from"}``; ``tie_from`` is the first token count where both predictions
        agree within 0.1 % (the factored path then contracts the network first, as materialize
        does), or None; ``switches`` lists the token counts where the chosen strategy changes
        (``{"n_tokens", "from", "to"}``, the first count using the new strategy).
    """
    spec = spec if spec is not None else TeRASpec.from_shape(4096, 4096, order=6)
    ns = sorted({int(n) for n in (n_tokens if n_tokens is not None else [2**k for k in range(17)])})
    if not ns or ns[0] < 1:
        raise ValueError(f"token counts must be positive integers, got {n_tokens!r}")
    plans = [plan(spec, n, backend=backend, device=device, dtype=dtype) for n in ns]
    chosen = [p.strategy for p in plans]
    switches = [{"n_tokens": ns[i], "from": chosen[i - 1], "to": chosen[i]}
                for i in range(1, len(ns)) if chosen[i] != chosen[i - 1]]
    m = plans[0].model
    tie = next((n for n, p in zip(ns, plans)
                if abs(p.materialize.seconds - p.factored.seconds) <= 1e-3 * max(p.materialize.seconds, p.factored.seconds)), None)
    return {
        "spec": str(spec),
        "cost_model": {"source": m.source, "peak_flops": m.peak_flops, "bandwidth": m.bandwidth,
                       "s_half": m.s_half, "overhead": m.overhead, "backend": [backend, device, dtype]},
        "n_tokens": ns,
        "materialize_s": [p.materialize.seconds for p in plans],
        "factored_s": [p.factored.seconds for p in plans],
        "chosen": chosen,
        "switches": switches,
        "tie_from": tie,
    }


def planner_figure(spec: Optional[TeRASpec] = None, n_tokens: Optional[Sequence[int]] = None, *,
                   data: Optional[dict] = None, **kwargs):
    """Predicted time per ``ΔW x`` call of ``materialize`` and ``factored`` against the token
    count (log–log), the planner's choice shaded along the bottom and every switch of the
    choice marked (see :func:`planner_data`; ``kwargs`` select the cost model)."""
    d = data if data is not None else planner_data(spec, n_tokens, **kwargs)
    ns = np.asarray(d["n_tokens"], dtype=float)
    mat = np.asarray(d["materialize_s"]) * 1e3
    fac = np.asarray(d["factored_s"]) * 1e3
    fig, (ax,) = new_figure(7.2, 4.6)
    with style():
        ax.plot(ns, mat, "-o", color=COLORS["lora"], ms=4, lw=1.6, label="materialize (form ΔW, then one GEMM)")
        ax.plot(ns, fac, "--s", color=COLORS["tera"][0], ms=3.5, lw=1.6, label="factored (contract x through the network)")
        chosen_y = np.minimum(mat, fac)
        for strategy, color in (("materialize", COLORS["lora"]), ("factored", COLORS["tera"][0])):
            mask = np.array([c == strategy for c in d["chosen"]])
            if mask.any():
                ax.plot(ns[mask], chosen_y[mask], "o", ms=9, mfc="none", mec=color, mew=1.2)
        ax.plot([], [], "o", ms=9, mfc="none", mec=COLORS["ref"], label="planner's choice")
        for sw in d["switches"]:
            ax.axvline(sw["n_tokens"], color=COLORS["ref"], ls=":", lw=1.2)
            ax.annotate(f"switch to {sw['to']}\nat n = {sw['n_tokens']:,}", (sw["n_tokens"], 0.97),
                        xycoords=("data", "axes fraction"), xytext=(4, 0), textcoords="offset points",
                        va="top", fontsize=8, color=COLORS["ref"])
        if d.get("tie_from"):
            ax.annotate(f"predictions agree from n = {d['tie_from']:,}", (d["tie_from"], 0.03),
                        xycoords=("data", "axes fraction"), xytext=(-4, 0), textcoords="offset points",
                        ha="right", fontsize=8, color=COLORS["ref"])
        if not d["switches"]:
            ax.annotate(f"{d['chosen'][0]} chosen for every n shown", (0.02, 0.97), xycoords="axes fraction",
                        va="top", fontsize=8, color=COLORS["ref"])
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("tokens per call n = batch × sequence")
        ax.set_ylabel("predicted time per call (ms)")
        cm = d["cost_model"]
        ax.set_title(f"Contraction planner: {d['spec'].split(';')[0].removeprefix('TeRASpec(')}\n"
                     f"cost model {cm['source']} ({'/'.join(cm['backend'])}, {cm['peak_flops'] / 1e9:.0f} GFLOP/s, "
                     f"{cm['bandwidth'] / 1e9:.0f} GB/s)")
        ax.legend(loc="lower right", frameon=True, framealpha=0.9)
    return fig
