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
    assert rec["config"]["adapter"] == {"order": 4} and rec["budget"]["steps"] == 4
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
