"""tera_tn.plot: figures, their data, determinism."""

import hashlib

import numpy as np
import pytest

pytest.importorskip("matplotlib")

import tera_tn as tt
from tera_tn import plot


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
    dw = plot.vera_update(48, 64, 5, seed=1)
    assert np.linalg.matrix_rank(dw) == 5


def test_spectra_rejects_hira():
    with pytest.raises(ValueError, match="HiRA"):
        plot.spectra_data(16, 16, ["hira:r=2"])


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
        paths = plot.save_figure(fig, tmp_path / f"s{k}", ("png", "svg"))
        assert [p.suffix for p in paths] == [".png", ".svg"]
        digests.append([hashlib.sha256(p.read_bytes()).hexdigest() for p in paths])
    assert digests[0] == digests[1]
    with pytest.raises(ValueError):
        plot.save_figure(fig, tmp_path / "x", ("gif",))
