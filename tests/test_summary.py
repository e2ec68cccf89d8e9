"""One layer at a glance: UpdateSummary (tera-tn rank) and PlanSummary (tera-tn plan) render
themselves as text, JSON and rich output, and refuse what they cannot summarize."""

from __future__ import annotations

import io
import json
import math

import pytest

pytest.importorskip("rich")

from tera_tn import TeRASpec
from tera_tn.analysis.summary import (
    SWEEP_TOKENS,
    PlanSummary,
    UpdateSummary,
    strict_json,
    summarize_plan,
    summarize_update,
)


def test_update_summary_text_and_json_agree():
    spec = TeRASpec.from_shape(96, 128, order=4)
    s = summarize_update(spec, dense=True)
    d = json.loads(s.to_json())
    assert d["theoretical_rank"] == d["structured"]["float64"]["numerical_rank"] == d["dense"]["numerical_rank"] == 96
    assert d["trainable"] == spec.num_trainable and list(d["comparison"]) == ["LoRA r=8", "LoRA r=32", "VeRA r=256"]
    assert list(d)[-1] == "elapsed_s" and s.to_dict()["spec"] == str(spec)
    text = str(s)
    assert text == s.to_text() and text.splitlines()[0] == str(spec)
    for needle in ("parameters (one layer)", "LoRA r=32", "theoretical rank at λ = random: 96 (rank theorem)",
                   "structured, float32 threshold", "dense SVD of ΔW"):
        assert needle in text


def test_update_summary_names_a_skipped_spectrum_and_renders_in_rich():
    from rich.console import Console

    s = summarize_update(TeRASpec.from_shape(4096, 4096, order=4), structured_max_side=8)
    assert s.structured is None and s.dense is None and "structured" not in s.to_dict()
    assert f"(structured spectrum skipped: core matrix side {s.core_side} > 8;" in str(s)
    buf = io.StringIO()
    Console(file=buf, width=120, color_system=None).print(s)
    assert buf.getvalue().rstrip("\n") == s.to_text()


def test_update_summary_refuses_bad_input():
    spec = TeRASpec.from_shape(64, 64, order=4)
    with pytest.raises(ValueError, match="summarize_update needs a TeRASpec"):
        summarize_update((64, 64))
    with pytest.raises(ValueError, match="summarize_update: dense=True would SVD a 8192×8192"):
        summarize_update(TeRASpec.from_shape(8192, 8192), dense=True)
    with pytest.raises(ValueError, match="seed"):
        summarize_update(spec, seed=-1)
    with pytest.raises(ValueError, match="UpdateSummary needs a TeRASpec"):
        UpdateSummary("64x64", "random", 0, 64, ())


def test_plan_summary_text_json_and_figure():
    spec = TeRASpec.from_shape(1024, 1024)
    p = summarize_plan(spec, 64, sweep=True)
    d = json.loads(p.to_json())
    assert d["n_tokens"] == 64 and d["strategy"] in ("materialize", "factored") and d["sweep"]["n_tokens"] == list(SWEEP_TOKENS)
    assert set(d["materialize"]) == {"flops", "largest_intermediate", "bytes_moved", "seconds", "steps"}
    text = str(p)
    assert text.startswith(str(p.plan)) and "predicted ms per call by token count" in text
    assert ("switch from" in text) or ("no switch:" in text)
    assert p.figure() is not None
    plain = summarize_plan(spec, 8)
    assert plain.sweep is None and "sweep" not in plain.to_dict() and plain.to_text() == str(plain.plan)


def test_plan_summary_never_wraps_a_long_explanation():
    spec = TeRASpec((16, 16, 16), (16, 16, 16), (8, 8, 8, 8, 8, 8), "mode")
    p = summarize_plan(spec, 8)
    assert max(len(line) for line in str(p.plan).splitlines()) > 40
    assert p.to_text(width=40) == str(p.plan)


def test_plan_summary_refuses_bad_input():
    with pytest.raises(ValueError, match="PlanSummary needs a ContractionPlan"):
        PlanSummary({"strategy": "factored"})
    with pytest.raises(ValueError):
        summarize_plan(TeRASpec.from_shape(64, 64), 0)


def test_strict_json_turns_non_finite_numbers_into_strings():
    text = strict_json({"a": math.inf, "b": [math.nan, (1, 2)], "c": {1, 2} - {1}})
    assert json.loads(text) == {"a": "inf", "b": ["nan", [1, 2]], "c": [2]}
