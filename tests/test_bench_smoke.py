"""Smoke run of the benchmark harness (bench/suite.py) on tiny sizes so it cannot rot.

No timing assertions: only that every part runs and the results have the documented structure.
"""

from __future__ import annotations

import json
import os
import sys

import pytest

pytest.importorskip("torch")
pytest.importorskip("peft")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from bench import _harness as H  # noqa: E402
from bench import suite  # noqa: E402


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    cfg = suite.SuiteConfig(
        ds=(64,),
        ns=(1, 8),
        min_reps=1,
        max_reps=1,
        budget_s=0.0,
        memory="inprocess",
        materialize_cases=(((2,) * 4, (4,) * 4),),
        materialize_reps=1,
        spectrum_size=64,
        spectrum_order=4,
        spectrum_repeats=1,
        spectrum_speed_target=0.0,  # 64² is far below the size the 20× target is set for
        threads=1,  # tiny sizes: no gain from a second thread, only barrier waits on a busy machine
        mode="smoke",
    )
    results = suite.run_suite(cfg, str(out), log=lambda s: None)
    return results, out


def test_timing_structure(smoke):
    results, _ = smoke
    assert set(results["timing"]) == {"64/1", "64/8"}
    for pt in results["timing"].values():
        assert tuple(pt) == H.CONTENDERS
        for rec in pt.values():
            assert rec["reps"] == 1 and len(rec["times_s"]) == 1
            assert rec["median_s"] > 0
    tr = results["timing"]["64/1"]
    assert tr["frozen"]["trainable"] == 0
    assert tr["full_ft"]["trainable"] == 64 * 64
    assert tr["lora_r8"]["trainable"] == 8 * 128
    assert tr["tera_full_auto"]["trainable"] == H.spec_for(64, "full").num_trainable


def test_planner_and_memory_structure(smoke):
    results, _ = smoke
    rows = results["planner"]
    assert len(rows) == 4  # 2 token counts × {full, half}
    for r in rows:
        assert r["chosen"] in ("materialize", "dense", "factored")
        assert r["best_measured"] in ("materialize", "dense", "factored")
        assert r["choice_ratio"] >= 1.0 and isinstance(r["ok"], bool)
        assert r["measured_dense_s"] > 0 and r["predicted_dense_s"] > 0
    mem = results["memory"]["64"]
    for name in H.CONTENDERS:
        for n in ("1", "8"):
            rec = mem[name][n]
            assert rec["saved_bytes"] >= rec["saved_extra_bytes"] >= 0
    # the input is saved by every method whose weight-side gradient needs it
    assert mem["full_ft"]["8"]["saved_bytes"] >= 8 * 64 * 4


def test_extras_and_outputs(smoke):
    results, out = smoke
    (mat,) = results["materialize"]
    assert "matmul torch" in mat["contenders"] and "kernel torch (out=)" in mat["contenders"]
    spec = results["spectrum"]
    assert spec["returncode"] == 0 and spec["verdict"] == "PASS" and "speedup" in spec, spec
    for name in ("results.json", "results.md", "ratio_vs_frozen.png"):
        assert (out / name).stat().st_size > 0
    loaded = json.loads((out / "results.json").read_text())
    assert loaded["environment"]["torch_threads"] == 1
    md = (out / "results.md").read_text()
    assert "ratio to the frozen Linear" in md and "Planner validation" in md


def test_replan_follows_the_given_model():
    from tera_tn.contract.costmodel import CostModel, cost_model

    before = cost_model()
    few, many = {"d": 64, "n": 64, "ranks": "full"}, {"d": 64, "n": 1024, "ranks": "full"}
    few_half, many_half = dict(few, ranks="half"), dict(many, ranks="half")
    # slow FLOPs, free memory traffic: one chain then a single GEMM beats contracting per token;
    # at full ranks and many tokens the weight gradient gᵀx pulled back through the chain beats
    # projecting g and x per token, at low ranks the per-token projections are the cheaper side
    flop_bound = CostModel(1e9, 0.0, 1e15, 0.0)
    # free FLOPs, slow memory: never write the d×d matrix
    memory_bound = CostModel(1e15, 0.0, 1e9, 0.0)
    assert H.replan([many_half, many], flop_bound) == ["materialize", "dense"]
    assert H.replan([few, few_half], memory_bound) == ["factored", "factored"]
    assert cost_model() == before


def test_docs_update(smoke, tmp_path):
    results, out = smoke
    docs = tmp_path / "benchmarks.md"
    docs.write_text("# Benchmarks\n\nintro\n")
    suite.update_docs(results, str(out), str(docs))
    suite.update_docs(results, str(out), str(docs))  # idempotent: one block per device
    text = docs.read_text()
    assert text.count("BEGIN suite results: cpu") == 1 and text.startswith("# Benchmarks")
    assert (tmp_path / "results" / "bench_cpu_ratio_vs_frozen.png").exists()
