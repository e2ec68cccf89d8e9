"""Run a plan: every (dataset, contender, seed, learning rate) once, resumably.

A run is identified by a key hashed from everything that determines its outcome (dataset, split
seed, budget, method, adapter arguments, seed, learning rate). Keys already in the results file
are skipped, so a study can be stopped at any time and continued in a later sitting. After a
contender's grid has run, the grid is extended past its edge while the best learning rate (by
mean validation accuracy over the stage's seeds) sits on it; a diverged point is a valid edge.
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
import os
import platform
import subprocess
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

from threadpoolctl import threadpool_limits

import tera_tn
from experiments.datasets import DATASETS, HELD_OUT, TextSplits, load, split_examples
from experiments.study.measures import run_measures
from experiments.study.plans import Budget, Contender, Stage, resolved_adapter
from experiments.study.results import ResultsFile
from tera_tn.finetune import FinetuneConfig, finetune, load_model

__all__ = ["ADAPTERS", "MAX_EXTENSIONS", "choose_rate", "code_version", "decode_labels", "encode_labels", "extend_grid",
           "fixed_lr", "run_key", "run_plan",
           "stage_budget"]

#: how far a grid may grow past its starting points (each step is a factor of about 3)
MAX_EXTENSIONS = 4
_ROOT = Path(__file__).resolve().parents[2]
#: the folder beside the results file where protocol-2 TeRA runs keep their trained adapter and head
#: (``<key>/``), so that exports can be evaluated later without training again
ADAPTERS = "adapters"
#: the base encoder's drift-text embeddings, per (dataset, max_length), for the whole process
_BASE_EMBEDDINGS: dict = {}


def _half_decade(lr: float, up: bool) -> float:
    """The neighbour of ``lr`` on the 1-3-10 ladder (1e-2 -> 3e-2 -> 1e-1 ...)."""
    one_rung = lr / 10 ** math.floor(math.log10(lr)) < 2
    if up:
        factor = 3.0 if one_rung else 10 / 3
    else:
        factor = 0.3 if one_rung else 1 / 3
    return float(f"{lr * factor:.3g}")


def extend_grid(scores: Mapping[float, tuple[float, bool]]) -> float | None:
    """The learning rate to add, or None when the grid is done.

    ``scores`` maps each tried rate to ``(validation accuracy, diverged)``. The best non-diverged
    rate must have a tried neighbour on both sides (a diverged rate above it counts as one).
    """
    if not scores:
        raise ValueError("extend_grid needs at least one tried learning rate")
    grid = sorted(scores)
    ok = [lr for lr in grid if not scores[lr][1]]
    if not ok:  # everything diverged: go lower
        return _half_decade(grid[0], up=False)
    best = max(ok, key=lambda lr: (scores[lr][0], -lr))
    if best == grid[-1]:
        return _half_decade(best, up=True)
    if best == grid[0]:
        return _half_decade(best, up=False)
    return None


def choose_rate(runs: Mapping[float, Mapping[int, Mapping[str, Any]]], grid_seeds: Iterable[int],
                seeds: Iterable[int], top: int = 1) -> tuple[list[float], float | None]:
    """``(rates the remaining seeds run at, the chosen rate or None while unfinished)``.

    ``runs`` maps each tried rate to ``{seed: record}``. Among the rates every grid seed finished
    without diverging, the ``top`` best by mean grid-seed validation accuracy (ties: the smaller
    rate) run on every seed. With ``top`` 1 that rate is the choice; otherwise the choice is the
    best of them by validation mean over all seeds, preferring rates where no seed diverged.
    """
    grid_seeds, seeds = tuple(grid_seeds), tuple(seeds)

    def val(lr: float, over: tuple[int, ...]) -> float:
        return math.fsum(runs[lr][s]["metrics"]["val_accuracy"] for s in over) / len(over)

    def diverged(lr: float, over: tuple[int, ...]) -> bool:
        return any(runs[lr][s]["metrics"]["diverged"] for s in over)

    ok = [lr for lr, at in runs.items() if set(grid_seeds) <= set(at) and not diverged(lr, grid_seeds)]
    best = sorted(ok, key=lambda lr: (-val(lr, grid_seeds), lr))[:top]
    if not best:
        return [], None
    if top == 1:
        return best, best[0]
    if not all(set(seeds) <= set(runs[lr]) for lr in best):
        return best, None
    return best, max(best, key=lambda lr: (not diverged(lr, seeds), val(lr, seeds), -lr))


def stage_budget(stage: Stage, head_lr: float | None) -> Budget:
    """The budget a stage's run trains with once its head rate is known (protocol 2 takes it per
    dataset from the head-only contender; otherwise the budget's own)."""
    if stage.head_lr_from is None:
        return stage.budget
    return replace(stage.budget, head_lr=head_lr)


def fixed_lr(records: Iterable[Mapping[str, Any]], stage: Stage, contender: Contender) -> float | None:
    """The rate ``contender`` runs at on a ``stage`` with ``lr_from``: among the rates finished for
    every (dataset in ``lr_from``, grid seed of the stage) at the stage's ``lr_budget`` (default: its
    budget) and split seed, none
    diverged, the one with the best mean validation accuracy (ties: the smaller rate). None while
    no rate is finished everywhere."""
    need = {(d, s) for d in stage.lr_from for s in stage.grid_seeds}
    budget = (stage.lr_budget or stage.budget).to_dict()

    def same_budget(other: Mapping[str, Any] | None) -> bool:
        # with a per-dataset head rate, the choice datasets' runs differ from each other in it
        if stage.head_lr_from is None or other is None:
            return other == budget
        return {k: v for k, v in other.items() if k != "head_lr"} == {k: v for k, v in budget.items() if k != "head_lr"}

    by_lr: dict[float, dict[tuple, Mapping[str, Any]]] = {}
    for r in records:
        if (r.get("contender") == contender.name and (r.get("dataset"), r.get("seed")) in need
                and same_budget(r.get("budget")) and r.get("split_seed") == stage.split_seed):
            by_lr.setdefault(r["lr"], {})[(r["dataset"], r["seed"])] = r
    scores = {lr: sum(r["metrics"]["val_accuracy"] for r in runs.values()) / len(runs)
              for lr, runs in by_lr.items()
              if set(runs) == need and not any(r["metrics"]["diverged"] for r in runs.values())}
    if not scores:
        return None
    return max(scores, key=lambda lr: (scores[lr], -lr))


def run_key(dataset: str, split_seed: int, budget: Budget, contender: Contender, seed: int, lr: float) -> str:
    what = {"dataset": dataset, "split_seed": split_seed, "budget": budget.to_dict(), "method": contender.method,
            "adapter": dict(contender.adapter), "seed": seed, "lr": lr}
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:20]


def code_version() -> dict[str, Any]:
    """Commit of the code that runs, and whether the library or study files differ from it."""
    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", "-C", str(_ROOT), *args], capture_output=True, text=True,
                                  timeout=30).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    return {"commit": git("rev-parse", "HEAD") or None,
            "dirty": bool(git("status", "--porcelain", "--untracked-files=no", "--", "tera_tn", "experiments"))}


def _versions() -> dict[str, Any]:
    import peft
    import torch
    import transformers

    return {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
            "peft": peft.__version__, "tera_tn": tera_tn.__version__, "threads": torch.get_num_threads(),
            "cpu_count": os.cpu_count(), "machine": platform.machine()}


def run_plan(plan: str, stages: tuple[Stage, ...], results: ResultsFile, *, log: Callable[[str], None] = print,
             limit: int | None = None, model_dir: str | None = None, shard: tuple[int, int] = (0, 1),
             only: frozenset[str] | None = None, datasets: frozenset[str] | None = None) -> int:
    """Run every missing run of ``stages``; returns how many ran. ``limit`` stops after that many.

    ``shard=(i, n)`` runs only the contenders whose position in their stage is ``i`` modulo ``n``,
    so ``n`` workers share one results file without running the same contender twice (a
    contender's learning-rate grid extension depends on its own earlier runs, so it stays whole).
    The finished runs are re-read before every run: a worker also skips what another worker has
    appended since it started. ``only`` restricts the run to the contenders of those names (a
    sitting can start with the contenders whose code is not about to change); ``datasets`` to those
    datasets (workers on different datasets share nothing but the results file).
    """
    import torch

    index, count = shard
    if not (count >= 1 and 0 <= index < count):
        raise ValueError(f"shard must be (i, n) with 0 <= i < n, got {shard}")
    done = {r["key"]: r for r in results.records()}
    context = {**code_version(), "versions": _versions()}
    model = None
    splits: dict[tuple, tuple[TextSplits, int]] = {}
    ran = 0
    if count > 1 and any(stage.head_lr_from for stage in stages):
        # the other contenders of a dataset wait for the head-rate source's choice, which would
        # sit in one shard only; workers of such a plan split by dataset instead
        raise ValueError(f"plan {plan!r} takes its head rate from a contender, so it cannot be sharded by contender; "
                         "run one worker per dataset (datasets=...) instead")
    for stage in stages:
        torch.set_num_threads(stage.budget.threads)
        context["versions"]["threads"] = stage.budget.threads
        for dataset in stage.datasets:
            if datasets is not None and dataset not in datasets:
                continue
            head_lr = None  # the head rate of this dataset, once its source contender has chosen it
            for position, c in enumerate(stage.contenders):
                if stage.head_lr_from is not None and c.name != stage.head_lr_from and head_lr is None:
                    log(f"    {c.name} on {dataset}: skipped until {stage.head_lr_from} has chosen the head's rate")
                    continue
                budget = stage_budget(stage, head_lr)
                # the head-rate source runs even when --only leaves it out: the others wait for its choice
                if position % count != index or (only is not None and c.name not in only
                                                 and c.name != stage.head_lr_from):
                    continue
                lrs = list(c.lrs)
                if stage.lr_from:
                    done.update((r["key"], r) for r in results.records())
                    chosen = fixed_lr(done.values(), stage, c)
                    if chosen is None:
                        log(f"    {c.name} on {dataset}: skipped until its rate is chosen on {', '.join(stage.lr_from)}")
                        continue
                    lrs = [chosen]
                seeds = stage.seeds if stage.fixed else stage.grid_seeds

                def key_of(lr: float, seed: int) -> str:
                    return run_key(dataset, stage.split_seed, budget, c, seed, lr)

                def run(lr: float, seed: int) -> bool:
                    """Run (lr, seed) unless finished; False when ``limit`` stops the plan."""
                    nonlocal model, ran
                    key = key_of(lr, seed)
                    if key not in done:
                        done.update((r["key"], r) for r in results.records())
                    if key in done:
                        return True
                    if limit is not None and ran >= limit:
                        return False
                    if model is None:
                        model = load_model(model_dir)
                    sk = (dataset, stage.split_seed, budget.train_size, budget.val_size, budget.test_size)
                    if sk not in splits:
                        examples, names = load(dataset)
                        splits[sk] = (split_examples(examples, train_size=budget.train_size, val_size=budget.val_size,
                                                     test_size=budget.test_size, seed=stage.split_seed), len(names))
                    rec = _run_one(plan, key, dataset, stage, budget, c, seed, lr, splits[sk], model, context,
                                   results.path.parent / ADAPTERS)
                    results.append(rec)
                    done[key] = rec
                    ran += 1
                    m = rec["metrics"]
                    log(f"[{ran}] {dataset} {c.name} seed={seed} lr={lr:g}: val {m['val_accuracy']:.4f} "
                        f"test {m['test_accuracy']:.4f} params {m['trainable_params']:,} "
                        f"{'DIVERGED ' if m['diverged'] else ''}({rec['wall_s']:.0f} s)")
                    return True

                def runs_at(rates: Iterable[float], over: Iterable[int]) -> dict[float, dict[int, Mapping]]:
                    return {lr: {s: done[key_of(lr, s)] for s in over if key_of(lr, s) in done} for lr in rates}

                for _ in range(MAX_EXTENSIONS + 1):
                    for lr in lrs:
                        for seed in seeds:
                            if not run(lr, seed):
                                return ran
                    if stage.fixed:
                        break  # the rate was fixed elsewhere or given: no grid here
                    at = runs_at(lrs, seeds)
                    scores = {lr: (math.fsum(r["metrics"]["val_accuracy"] for r in at[lr].values()) / len(seeds),
                                   any(r["metrics"]["diverged"] for r in at[lr].values())) for lr in lrs}
                    nxt = extend_grid(scores)
                    if nxt is None:
                        break
                    log(f"    {c.name}: best learning rate at the grid's edge; extending to {nxt:g}")
                    lrs.append(nxt)
                if stage.fixed:
                    chosen_lr = lrs[0] if len(lrs) == 1 else None
                else:
                    confirm, _ = choose_rate(runs_at(lrs, seeds), seeds, stage.seeds, stage.confirm_top)
                    for lr in confirm:
                        for seed in stage.seeds:
                            if not run(lr, seed):
                                return ran
                    _, chosen_lr = choose_rate(runs_at(lrs, stage.seeds), seeds, stage.seeds, stage.confirm_top)
                if c.name == stage.head_lr_from:
                    head_lr = chosen_lr
    return ran


def encode_labels(values: Iterable[int]) -> str:
    """Labels as base64 of one byte each (every study dataset has at most 20 classes)."""
    return base64.b64encode(bytes(values)).decode()


def decode_labels(text: str) -> list[int]:
    """The inverse of the record's compact label encoding."""
    return list(base64.b64decode(text))


def _run_one(plan: str, key: str, dataset: str, stage: Stage, b: Budget, c: Contender, seed: int, lr: float,
             split: tuple[TextSplits, int], model, context: dict[str, Any], adapters: Path) -> dict[str, Any]:
    data, num_labels = split
    config = FinetuneConfig(method=c.method, adapter=resolved_adapter(c.method, c.adapter), lr=lr,
                            head_lr=lr if b.head_lr is None else b.head_lr, steps=b.steps,
                            batch_size=b.batch_size, eval_batch_size=b.eval_batch_size, max_length=b.max_length,
                            warmup_ratio=b.warmup_ratio, seed=seed, max_grad_norm=b.max_grad_norm)
    t0, c0 = time.perf_counter(), time.process_time()
    result = finetune(config, data.train, data.validation, data.test, model=model, num_labels=num_labels)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    m = result.metrics
    extra: dict[str, Any] = {}
    if b.protocol >= 2:
        # per-example test predictions (and labels, in split order) for item-level paired intervals
        extra["test_predictions"] = encode_labels(result.predictions["test"])
        extra["test_labels"] = encode_labels(y for _, y in data.test)
        # intruder dimensions, ΔW's effective rank and the embedding drift on out-of-task text
        # (numpy's BLAS held to the run's thread count: its default of every core thrashes beside other workers)
        with threadpool_limits(b.threads):
            extra["measures"] = run_measures(model[0], result.model.encoder, model[1], dataset, b.max_length,
                                             _BASE_EMBEDDINGS)
        if c.method == "tera":
            from tera_tn.classifier import save_classifier

            save_classifier(result, adapters / key)
            extra["adapter_dir"] = f"{ADAPTERS}/{key}"  # relative to the results file's folder
    return {**extra,
        "key": key, "plan": plan, "contender": c.name, "method": c.method, "adapter": dict(c.adapter),
        "dataset": dataset, "held_out": dataset == HELD_OUT, "dataset_source": DATASETS[dataset].source,
        "split_seed": stage.split_seed, "split_sizes": data.sizes(), "seed": seed, "lr": lr, "steps": m["steps"],
        "budget": b.to_dict(), "config": {**asdict(config), "adapter": dict(config.adapter)},
        "metrics": m, "trainable_params": m["trainable_params"], "wall_s": wall, "cpu_s": cpu,
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **context,
    }
