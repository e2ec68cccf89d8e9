"""tera_tn.analysis.plot, .measured, .figures, .peers: figures, their data, determinism."""

import hashlib

import numpy as np
import pytest

pytest.importorskip("matplotlib")

import tera_tn as tt
from tera_tn.analysis import figures, measured, peers, plot
from tests.bad_inputs.teach import Case, assert_teaches, params


def test_tradeoff_data_counts_match_accounting():
    d = plot.tradeoff_data([(768, 768), (3072, 768)], tera_orders=(4,), rank_fractions=(0.5, 1.0),
                           lora_ranks=(8,), vera_ranks=(256,), hira_ranks=(32,))
    by = {s["label"]: s["points"] for s in d["series"]}
    lora = by["LoRA"][0]
    assert lora["trainable"] == 8 * (768 + 768) + 8 * (3072 + 768) and lora["max_rank"] == 8
    assert by["VeRA"][0]["trainable"] == (768 + 256) + (3072 + 256)
    assert by["HiRA"][0]["max_rank"] == 768
    full = [p for p in by["TeRA order 4"] if p["config"]["ranks"] == "full"][0]
    specs = [tt.TeRASpec.from_shape(o, i, order=4) for o, i in [(768, 768), (3072, 768)]]
    assert full["trainable"] == sum(s.num_trainable for s in specs)
    assert full["max_rank"] == 768 == d["full_rank"]


def test_tradeoff_skips_orders_a_layer_cannot_take():
    d = plot.tradeoff_data([(8, 8)], tera_orders=(2, 12))
    assert [s["label"] for s in d["series"] if s["method"] == "tera"] == ["TeRA order 2"]


def test_spectra_data_ranks():
    d = plot.spectra_data(48, 64, ["lora:r=3", "vera:r=5", "tera:order=4", "tera:order=4,ranks=0.5"], seed=1)
    ranks = [s["summary"]["numerical_rank"] for s in d["series"]]
    spec = tt.TeRASpec.from_shape(48, 64, order=4, ranks=0.5)
    assert ranks == [3, 5, 48, spec.max_rank]
    for s in d["series"]:
        assert len(s["sv"]) == 48 and s["sv"] == sorted(s["sv"], reverse=True)
    dw = peers.vera_update(48, 64, 5, seed=1)
    assert np.linalg.matrix_rank(dw) == 5


def test_spectra_rejects_hira():
    with pytest.raises(ValueError, match="HiRA"):
        plot.spectra_data(16, 16, ["hira:r=2"])
    with pytest.raises(ValueError, match=r"d_in must be a positive integer, got 64.5"):
        plot.spectra_data(48, 64.5)  # not truncated to 64


def test_planner_data_matches_plan():
    spec = tt.TeRASpec.from_shape(256, 256, order=4)
    d = plot.planner_data(spec, [1, 64, 4096])
    for n, m, f, c in zip(d["n_tokens"], d["materialize_s"], d["factored_s"], d["chosen"]):
        p = tt.plan(spec, n)
        assert (m, f, c) == (p.materialize.seconds, p.factored.seconds, p.strategy)
    for sw in d["switches"]:
        i = d["n_tokens"].index(sw["n_tokens"])
        assert d["chosen"][i] == sw["to"] != d["chosen"][i - 1]


def _axes_text(fig):
    ax = fig.axes[0]
    return ax.get_xlabel(), ax.get_ylabel(), ax.get_xscale(), ax.get_yscale()


def test_figures_are_labelled_and_log_scaled():
    from matplotlib.figure import Figure

    fig = plot.tradeoff_figure("all-MiniLM-L6-v2")
    assert isinstance(fig, Figure)
    x, y, xs, ys = _axes_text(fig)
    assert "trainable parameters" in x and "rank" in y and xs == "log" and ys == "log"
    x, y, _, ys = _axes_text(plot.spectra_figure(32, 32))
    assert "index" in x and "σ" in y and ys == "log"
    x, y, xs, ys = _axes_text(plot.planner_figure(tt.TeRASpec.from_shape(256, 256, order=4), [1, 16, 256]))
    assert "tokens" in x and "(ms)" in y and xs == ys == "log"


def test_save_figure_is_deterministic(tmp_path):
    digests = []
    for k in range(2):
        fig = plot.spectra_figure(32, 32, seed=0)
        paths = figures.save_figure(fig, tmp_path / f"s{k}", ("png", "svg"))
        assert [p.suffix for p in paths] == [".png", ".svg"]
        digests.append([hashlib.sha256(p.read_bytes()).hexdigest() for p in paths])
    assert digests[0] == digests[1]
    with pytest.raises(ValueError):
        figures.save_figure(fig, tmp_path / "x", ("gif",))


# --------------------------------------------------------------------------------------------
# measured figures: frontier and learning-rate curves
# --------------------------------------------------------------------------------------------
def _runs():
    """Two datasets; LoRA and VeRA with three seeds, two TeRA variants (one with a single seed)."""
    rows = []
    for dataset, shift in (("sst", 0.0), ("news", -0.1)):
        for contender, method, count, base in (("lora_r8", "lora", 330_000, 0.80), ("vera_r256", "vera", 30_000, 0.78),
                                               ("tera_default", "tera", 2_500, 0.77)):
            for seed in (0, 1, 2):
                rows.append({"dataset": dataset, "contender": contender, "method": method, "params": count,
                             "seed": seed, "lr": 0.1, "value": base + shift + 0.01 * seed})
        rows.append({"dataset": dataset, "contender": "tera_order4", "method": "tera", "params": 4_100, "seed": 0,
                     "lr": 0.03, "value": 0.75 + shift})
    return rows


def test_frontier_has_one_panel_per_dataset_and_one_series_per_contender():
    d = measured.frontier_data(_runs())
    assert [p["dataset"] for p in d["datasets"]] == ["sst", "news"]
    lora = d["datasets"][0]["series"][0]
    assert lora["mean"] == pytest.approx(0.81) and lora["half"] == pytest.approx(4.303 * 0.01 / np.sqrt(3), rel=1e-4)
    assert d["datasets"][0]["series"][3]["half"] is None  # one seed: a plain point
    wide = [{**r, "value": v} for r, v in zip(_runs()[:3], (99.0, 100.0, 90.0))]
    (series,) = measured.frontier_data(wide, value_range=(0.0, 100.0))["datasets"][0]["series"]
    assert series["mean"] + series["half"] > 100.0 and series["high"] == 100.0 and series["low"] == series["mean"] - series["half"]
    assert len(set(d["styles"].values())) == 4  # every contender its own colour/marker

    fig = measured.frontier_figure(_runs())
    panels = [ax for ax in fig.axes if ax.get_title()]
    assert len(panels) == 2
    for ax in panels:
        assert ax.get_xscale() == "log" and "trainable parameters" in ax.get_xlabel()
        labels = ax.get_legend_handles_labels()[1]
        assert sorted(labels) == ["lora_r8", "tera_default", "tera_order4", "vera_r256"]
        assert len(ax.containers) == 3  # error bars for the three contenders with three seeds
    assert [t.get_text() for t in fig.legends[0].get_texts()] == ["lora_r8", "vera_r256", "tera_default", "tera_order4"]


def test_lr_curves_mark_diverged_rates():
    rows = [dict(r, lr=lr, value=r["value"] - abs(lr - 0.1)) for r in _runs() if r["dataset"] == "sst"
            for lr in (0.03, 0.1)]
    rows += [dict(r, lr=0.3, value=float("nan"), diverged=True) for r in _runs()
             if r["dataset"] == "sst" and r["contender"] == "tera_default"]
    d = measured.lr_curves_data(rows)
    (panel,) = d["datasets"]
    tera = [s for s in panel["series"] if s["contender"] == "tera_default"][0]
    assert [(p["lr"], p["diverged"], p["n"]) for p in tera["points"]] == [(0.03, False, 3), (0.1, False, 3), (0.3, True, 3)]
    assert np.isnan(tera["points"][2]["mean"])
    fig = measured.lr_curves_figure(rows)
    (ax,) = [a for a in fig.axes if a.get_title()]
    assert ax.get_legend_handles_labels()[1] == ["lora_r8", "vera_r256", "tera_default", "tera_order4"]
    crosses = [ln for ln in ax.lines if ln.get_marker() == "x"]
    assert len(crosses) == 1 and crosses[0].get_xdata()[0] == 0.3
    assert "diverged" in [t.get_text() for t in fig.legends[0].get_texts()]


def test_measured_figures_save_identical_bytes(tmp_path):
    digests = []
    for k in range(2):
        paths = figures.save_figure(measured.frontier_figure(_runs(), title="frontier"), tmp_path / f"f{k}", ("png", "svg"))
        paths += figures.save_figure(measured.lr_curves_figure(_runs()), tmp_path / f"l{k}", ("png",))
        digests.append([hashlib.sha256(p.read_bytes()).hexdigest() for p in paths])
        assert all(p.stat().st_size > 1000 for p in paths)
    assert digests[0] == digests[1]


def _bad(**change):
    row = dict(_runs()[0], **change)
    return [row]


def _frontier(records):
    return lambda: measured.frontier_data(records)


_BAD_RECORDS = [
    Case("no records", _frontier([]), ValueError, ("no records",)),
    Case("a dict, not a list", _frontier({"dataset": "sst"}), TypeError, ("list of dicts", "dict")),
    Case("a tuple row", _frontier([("sst", "lora")]), TypeError, ("record 0 must be a dict", "('sst', 'lora')")),
    Case("missing keys", _frontier([{"dataset": "sst", "contender": "x"}]), ValueError,
         ("record 0 lacks 'method', 'params'", "expected keys")),
    Case("zero params", _frontier(_bad(params=0)), ValueError, ("'params' must be a positive integer", "got 0")),
    Case("fractional params", _frontier(_bad(params=2.5)), ValueError, ("'params'", "got 2.5")),
    Case("negative lr", _frontier(_bad(lr=-1e-3)), ValueError, ("'lr' must be a positive finite number", "-0.001")),
    Case("nan value", _frontier(_bad(value=float("nan"))), ValueError, ("'value' must be a finite number", "nan")),
    Case("empty dataset", _frontier(_bad(dataset="")), ValueError, ("'dataset' must be a non-empty string",)),
    Case("two methods", _frontier(_runs()[:1] + [dict(_runs()[0], method="vera")]), ValueError,
         ("'lora_r8' has methods 'lora' and 'vera'",)),
    Case("two param counts", _frontier(_runs()[:1] + [dict(_runs()[0], params=7)]), ValueError,
         ("parameter counts [7, 330000]", "one count per dataset")),
    Case("two rates of one seed", _frontier(_runs()[:1] + [dict(_runs()[0], lr=0.3)]), ValueError,
         ("seeds [0, 0]", "one learning rate")),
    Case("inf that did not diverge", lambda: measured.lr_curves_data(_bad(value=float("inf"))), ValueError,
         ("non-finite only when diverged", "inf")),
    Case("same run twice", lambda: measured.lr_curves_data(_runs()[:1] * 2), ValueError,
         ("at lr 0.1 has seeds [0, 0]",)),
]


@params(_BAD_RECORDS)
def test_measured_figures_reject_bad_records(case):
    assert_teaches(case)
