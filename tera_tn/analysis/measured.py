"""Figures of measured adapter comparisons: the accuracy–parameter frontier and learning-rate curves.

* :func:`frontier_figure` — measured accuracy against trainable parameters, one panel per
  dataset, mean over seeds with a 95 % t-interval (clipped to ``value_range`` when given), one
  marker/colour per contender.
* :func:`lr_curves_figure` — validation accuracy against the learning rate per contender, with
  diverged rates marked.

Both take plain records (dicts with ``dataset``, ``contender``, ``method``, ``params``, ``seed``,
``lr``, ``value`` and optionally ``diverged``), so any study can draw them; ``contender`` is the
label a reader sees in the legend. Every ``*_data`` function returns the numbers behind its figure.
"""

from __future__ import annotations

import math
from typing import Any, Iterable, Mapping, Optional

import numpy as np

from .figures import COLORS, new_figure, style
from .stats import mean_interval

__all__ = ["frontier_data", "frontier_figure", "lr_curves_data", "lr_curves_figure"]

_RECORD_KEYS = ("dataset", "contender", "method", "params", "seed", "lr", "value")
_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "<", ">", "h", "p", "*")
_METHODCOLORS = {"lora": COLORS["lora"], "vera": COLORS["vera"], "hira": COLORS["hira"],
                  "head": "#999999", "full": "#000000"}


def _check_records(records: Iterable[Mapping[str, Any]], fn: str, *, allow_diverged: bool) -> list[dict]:
    if isinstance(records, (str, bytes, Mapping)) or not isinstance(records, Iterable):
        raise TypeError(f"{fn}: records must be a list of dicts with keys {', '.join(_RECORD_KEYS)}, "
                        f"got {type(records).__name__}")
    out = []
    for i, r in enumerate(records):
        if not isinstance(r, Mapping):
            raise TypeError(f"{fn}: record {i} must be a dict, got {type(r).__name__}: {r!r}")
        missing = [k for k in _RECORD_KEYS if k not in r]
        if missing:
            raise ValueError(f"{fn}: record {i} lacks {', '.join(map(repr, missing))}; "
                             f"expected keys {', '.join(_RECORD_KEYS)} (and optionally 'diverged')")
        for k in ("dataset", "contender", "method"):
            if not isinstance(r[k], str) or not r[k]:
                raise ValueError(f"{fn}: record {i} field {k!r} must be a non-empty string, got {r[k]!r}")
        params, seed, lr, value = r["params"], r["seed"], r["lr"], r["value"]
        if isinstance(params, bool) or not isinstance(params, (int, np.integer)) or params < 1:
            raise ValueError(f"{fn}: record {i} field 'params' must be a positive integer "
                             f"(trainable parameters), got {params!r}")
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
            raise ValueError(f"{fn}: record {i} field 'seed' must be an integer, got {seed!r}")
        if isinstance(lr, bool) or not isinstance(lr, (int, float, np.number)) or not (math.isfinite(lr) and lr > 0):
            raise ValueError(f"{fn}: record {i} field 'lr' must be a positive finite number, got {lr!r}")
        diverged = bool(r.get("diverged", False))
        if isinstance(value, bool) or not isinstance(value, (int, float, np.number)) or (
                not math.isfinite(value) and not (allow_diverged and diverged)):
            raise ValueError(f"{fn}: record {i} field 'value' must be a finite number"
                             f"{' (non-finite only when diverged)' if allow_diverged else ''}, got {value!r}")
        out.append({"dataset": r["dataset"], "contender": r["contender"], "method": r["method"],
                    "params": int(params), "seed": int(seed), "lr": float(lr), "value": float(value),
                    "diverged": diverged})
    if not out:
        raise ValueError(f"{fn}: no records to plot")
    methods: dict[str, str] = {}
    for r in out:
        if methods.setdefault(r["contender"], r["method"]) != r["method"]:
            raise ValueError(f"{fn}: contender {r['contender']!r} has methods {methods[r['contender']]!r} and "
                             f"{r['method']!r}; a contender is one method")
    return out


def _grouped(rows: list[dict], *keys: str) -> dict[tuple, list[dict]]:
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault(tuple(r[k] for k in keys), []).append(r)
    return groups


def _styles(rows: list[dict]) -> dict[str, tuple[str, str]]:
    """(colour, marker) per contender in order of first appearance: colour by method (TeRA
    variants cycle through their own palette), marker by position within that colour."""
    styles: dict[str, tuple[str, str]] = {}
    used: dict[str, int] = {}
    tera = 0
    for r in rows:
        c = r["contender"]
        if c in styles:
            continue
        if r["method"] == "tera":
            palette = COLORS["tera"]
            styles[c] = (palette[tera % len(palette)], _MARKERS[(tera // len(palette)) % len(_MARKERS)])
            tera += 1
        else:
            color = _METHODCOLORS.get(r["method"], COLORS["ref"])
            k = used.get(color, 0)
            used[color] = k + 1
            styles[c] = (color, _MARKERS[k % len(_MARKERS)])
    return styles


def frontier_data(records: Iterable[Mapping[str, Any]], *, value_range: Optional[tuple[float, float]] = None) -> dict:
    """Mean and 95 % interval over seeds of each contender's ``value`` on each dataset.

    ``records`` hold one run each (``dataset``, ``contender``, ``method``, ``params`` trainable
    parameters, ``seed``, ``lr``, ``value``); pass the runs at each contender's chosen learning
    rate. A contender has one parameter count per dataset and one run per seed.

    Returns:
        ``{"datasets": [{"dataset", "series": [{"contender", "method", "params", "seeds",
        "values", "mean", "half", "low", "high"}]}]}`` in order of first appearance; ``half`` is the half-width of
        the 95 % t-interval, None with one seed.
    """
    rows = _check_records(records, "frontier", allow_diverged=False)
    datasets: dict[str, list] = {}
    for (dataset, contender), runs in _grouped(rows, "dataset", "contender").items():
        params = sorted({r["params"] for r in runs})
        if len(params) > 1:
            raise ValueError(f"frontier: contender {contender!r} on {dataset!r} has parameter counts {params}; "
                             "expected one count per dataset")
        seeds = [r["seed"] for r in runs]
        if len(set(seeds)) < len(seeds):
            raise ValueError(f"frontier: contender {contender!r} on {dataset!r} has seeds {seeds}; expected one run "
                             "per seed (pick one learning rate per contender first)")
        mean, half = mean_interval([r["value"] for r in runs])
        low, high = (None, None) if half is None else (mean - half, mean + half)
        if value_range is not None and half is not None:
            # a t-interval over 3 seeds can leave the range an accuracy lives in (117 % was drawn once)
            low, high = max(low, value_range[0]), min(high, value_range[1])
        datasets.setdefault(dataset, []).append({
            "contender": contender, "method": runs[0]["method"], "params": params[0], "seeds": seeds,
            "values": [r["value"] for r in runs], "mean": mean, "half": half, "low": low, "high": high})
    return {"datasets": [{"dataset": d, "series": s} for d, s in datasets.items()], "styles": _styles(rows)}


def lr_curves_data(records: Iterable[Mapping[str, Any]]) -> dict:
    """Mean ``value`` over seeds at each learning rate of each contender on each dataset.

    ``records`` as in :func:`frontier_data`, every tried learning rate included, with an optional
    ``diverged`` flag (a diverged run may have a non-finite value). A rate counts as diverged when
    any of its seeds did; its mean is taken over the finite values (NaN when there are none).

    Returns:
        ``{"datasets": [{"dataset", "series": [{"contender", "method", "points": [{"lr", "mean",
        "n", "diverged"}]}]}]}``, points sorted by learning rate.
    """
    rows = _check_records(records, "lr_curves", allow_diverged=True)
    datasets: dict[str, list] = {}
    for (dataset, contender), runs in _grouped(rows, "dataset", "contender").items():
        points = []
        for (lr,), at in sorted(_grouped(runs, "lr").items()):
            seeds = [r["seed"] for r in at]
            if len(set(seeds)) < len(seeds):
                raise ValueError(f"lr_curves: contender {contender!r} on {dataset!r} at lr {lr:g} has seeds {seeds}; "
                                 "expected one run per seed and learning rate")
            finite = [r["value"] for r in at if math.isfinite(r["value"])]
            points.append({"lr": lr, "mean": math.fsum(finite) / len(finite) if finite else math.nan,
                           "n": len(at), "diverged": any(r["diverged"] for r in at)})
        datasets.setdefault(dataset, []).append({"contender": contender, "method": runs[0]["method"],
                                                 "points": points})
    return {"datasets": [{"dataset": d, "series": s} for d, s in datasets.items()], "styles": _styles(rows)}


def _panels(d: dict, height: float):
    n = len(d["datasets"])
    fig, axes = new_figure(max(6.0, 4.0 * n), height, ncols=n)
    return fig, axes


def _figure_legend(fig, axes, order: Iterable[str], extra=()) -> None:
    """One legend for all panels, contenders in ``order`` (matplotlib lists error bars last)."""
    found: dict[str, Any] = {}
    for ax in axes:
        for h, label in zip(*ax.get_legend_handles_labels()):
            found.setdefault(label, h)
    handles = {label: found[label] for label in order if label in found}
    for h in extra:
        handles.setdefault(h.get_label(), h)
    fig.legend(list(handles.values()), list(handles), loc="outside lower center",
               ncols=min(4, max(1, len(handles))), frameon=False)


def frontier_figure(records: Optional[Iterable[Mapping[str, Any]]] = None, *, data: Optional[dict] = None,
                    title: Optional[str] = None, ylabel: str = "test accuracy",
                    value_range: Optional[tuple[float, float]] = None):
    """Accuracy against trainable parameters (log x), one panel per dataset, one series per
    contender: the mean over seeds with its 95 % t-interval as error bar (a plain point with one
    seed). Colours follow the method, every TeRA variant gets its own colour/marker, and a
    contender keeps its style across panels. See :func:`frontier_data` for ``records``."""
    d = data if data is not None else frontier_data(records if records is not None else [], value_range=value_range)
    fig, axes = _panels(d, 5.6)
    with style():
        for ax, panel in zip(axes, d["datasets"]):
            for s in panel["series"]:
                color, marker = d["styles"][s["contender"]]
                if s["half"] is None:
                    ax.plot([s["params"]], [s["mean"]], marker, color=color, ms=6, ls="none", label=s["contender"])
                else:
                    ax.errorbar([s["params"]], [s["mean"]], yerr=[[s["mean"] - s["low"]], [s["high"] - s["mean"]]], fmt=marker, color=color, ms=6,
                                capsize=3, lw=1.2, label=s["contender"])
            seeds = sorted({len(s["seeds"]) for s in panel["series"]})
            ax.set_xscale("log")
            ax.set_title(f"{panel['dataset']} ({'/'.join(map(str, seeds))} seed{'s' if seeds != [1] else ''})")
            ax.set_xlabel("trainable parameters (log scale)")
        axes[0].set_ylabel(ylabel + (" (mean, 95 % interval)" if any(
            s["half"] is not None for p in d["datasets"] for s in p["series"]) else ""))
        if title:
            fig.suptitle(title)
        _figure_legend(fig, axes, d["styles"])
    return fig


def lr_curves_figure(records: Optional[Iterable[Mapping[str, Any]]] = None, *, data: Optional[dict] = None,
                     title: Optional[str] = None, ylabel: str = "validation accuracy"):
    """Mean ``value`` over seeds against the learning rate (log x), one panel per dataset, one
    line per contender through its non-diverged rates; a diverged rate is a cross in the
    contender's colour (at the bottom of the panel when it has no finite value). See
    :func:`lr_curves_data` for ``records``."""
    from matplotlib.lines import Line2D

    d = data if data is not None else lr_curves_data(records if records is not None else [])
    fig, axes = _panels(d, 5.6)
    extra = []
    with style():
        for ax, panel in zip(axes, d["datasets"]):
            for s in panel["series"]:
                color, marker = d["styles"][s["contender"]]
                ok = [p for p in s["points"] if not p["diverged"]]
                ax.plot([p["lr"] for p in ok], [p["mean"] for p in ok], "-" + marker, color=color, ms=4.5, lw=1.2,
                        label=s["contender"])
                for p in s["points"]:
                    if not p["diverged"]:
                        continue
                    if math.isfinite(p["mean"]):
                        ax.plot([p["lr"]], [p["mean"]], "x", color=color, ms=8, mew=2, label="_diverged")
                    else:
                        ax.plot([p["lr"]], [0.02], "x", color=color, ms=8, mew=2, label="_diverged",
                                transform=ax.get_xaxis_transform())
                    if not extra:
                        extra.append(Line2D([], [], ls="none", marker="x", color=COLORS["ref"], ms=8, mew=2,
                                            label="diverged"))
            ax.set_xscale("log")
            ax.set_title(panel["dataset"])
            ax.set_xlabel("learning rate (log scale)")
        axes[0].set_ylabel(ylabel + " (mean over seeds)")
        if title:
            fig.suptitle(title)
        _figure_legend(fig, axes, d["styles"], extra)
    return fig
