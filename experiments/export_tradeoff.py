"""Exported TeRA adapters served as LoRA: test accuracy against the LoRA rank.

Evaluation only. Every protocol-2 TeRA run of the adapter study kept its trained adapter and head
(``experiments/results/adapters/<key>/``); each is exported with :func:`tera_tn.peft.export_lora`
(a uniform rank, an energy threshold per layer, or a total LoRA size spread over the layers by
marginal energy), reloaded by PEFT as a plain ``LoraConfig`` adapter in a fresh base model — what
a LoRA server would serve — and evaluated on the run's own test split. The unexported TeRA adapter
is evaluated the same way beside it, so each export's loss is paired item by item.

    python -m experiments.export_tradeoff run [--limit N] [--plan v2]   # resumable: one line per (run, setting)
    python -m experiments.export_tradeoff publish [--plan v2]   # the table (Markdown); with --plan, per dataset over seeds

Results: ``experiments/results/export.jsonl`` (per-example predictions kept); ``--results-dir``
reads and writes another study's folder (a worker in a pinned worktree uses the main checkout's).
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from experiments.datasets import load, split_examples
from experiments.study.results import ResultsFile
from experiments.study.runner import code_version, decode_labels, encode_labels

ROOT = Path(__file__).resolve().parents[1]
#: the study's results folder: its study.jsonl, the adapters/ its runs kept, and export.jsonl written here
RESULTS_DIR = ROOT / "experiments" / "results"
#: (kind, value): a uniform rank, a per-layer energy threshold, or the total size of a uniform rank
#: spread over the layers by marginal energy (compared with that uniform rank at equal size)
SETTINGS: tuple[tuple[str, float], ...] = (("tera", 0), ("rank", 8), ("rank", 32), ("rank", 128), ("energy", 0.9),
                                           ("energy", 0.99), ("budget_of_rank", 8), ("budget_of_rank", 32))


def setting_name(kind: str, value: float) -> str:
    return "tera (not exported)" if kind == "tera" else f"{kind}={value:g}"


def trained_runs(records: Iterable[Mapping[str, Any]], plan: str | None = None) -> list[Mapping[str, Any]]:
    """The study's runs that kept a trained TeRA adapter, in file order; with ``plan``, only those at
    the rate each TeRA contender's validation chose in that plan, seed 0 of every dataset first."""
    records = list(records)
    kept = [r for r in records if r.get("method") == "tera" and r.get("adapter_dir")]
    if plan is None:
        return kept
    from experiments.study.plans import PLANS
    from experiments.study.publish import collect

    outcomes, _ = collect(records, plan, PLANS[plan])
    chosen = {r["key"] for o in outcomes if o.contender.method == "tera" and o.lr is not None
              for r in o.runs[o.lr].values()}
    return sorted((r for r in kept if r["key"] in chosen), key=lambda r: r["seed"])


def _classifier(encoder, head_state, num_labels: int, tok, max_length: int):
    from tera_tn.classifier import Classifier
    from tera_tn.finetune import mean_pool_classifier

    net = mean_pool_classifier(encoder, num_labels)
    net.head.load_state_dict(head_state)
    net.eval()
    return Classifier(model=net, tokenizer=tok, labels=tuple(str(i) for i in range(num_labels)),
                      max_length=max_length, metadata={})


def evaluate_run(run: Mapping[str, Any], base, tok, settings: Sequence[tuple[str, float]], done: set[str],
                 log=print, results_dir: Path = RESULTS_DIR) -> Iterable[dict[str, Any]]:
    """One record per setting of ``run`` not in ``done``; ``run`` is a line of the study's results
    file in ``results_dir`` (its ``adapter_dir`` is relative to that folder)."""
    import torch
    from peft import PeftModel
    from safetensors.torch import load_file

    import tera_tn.peft  # noqa: F401  registers TeRA with PEFT
    from tera_tn.peft import export_lora

    folder = results_dir / run["adapter_dir"]
    b = run["budget"]
    examples, _ = load(run["dataset"])
    split = split_examples(examples, train_size=b["train_size"], val_size=b["val_size"], test_size=b["test_size"],
                           seed=run["split_seed"])
    texts, labels = [t for t, _ in split.test], [y for _, y in split.test]
    assert encode_labels(labels) == run["test_labels"], "the test split no longer matches the run's"
    head = load_file(str(folder / "head.safetensors"))
    k = head["weight"].shape[0]
    tera = PeftModel.from_pretrained(copy.deepcopy(base), str(folder))
    layers = [m for m in tera.modules() if hasattr(m, "tera_lambda")]
    for kind, value in settings:
        key = f"{run['key']}|{setting_name(kind, value)}"
        if key in done:
            continue
        t0 = time.perf_counter()
        report = None
        if kind == "tera":
            encoder = tera
        else:
            with tempfile.TemporaryDirectory(prefix="tera-export-") as tmp:
                args: dict[str, Any] = {"rank_set": None}
                if kind == "rank":
                    args["rank"] = int(value)
                elif kind == "energy":
                    args["energy"] = float(value)
                else:
                    args["budget"] = sum(int(value) * (m.out_features + m.in_features) for m in layers)
                report = export_lora(tera, tmp, overwrite=True, **args)
                encoder = PeftModel.from_pretrained(copy.deepcopy(base), tmp)
        clf = _classifier(encoder, head, k, tok, b["max_length"])
        with torch.inference_mode():
            preds = clf.logits(texts).argmax(-1).tolist()
        acc = sum(p == y for p, y in zip(preds, labels)) / len(labels)
        rec = {"key": key, "run": run["key"], "dataset": run["dataset"], "contender": run["contender"],
               "seed": run["seed"], "lr": run["lr"], "setting": setting_name(kind, value), "kind": kind,
               "value": value, "test_accuracy": acc, "study_test_accuracy": run["metrics"]["test_accuracy"],
               "test_predictions": encode_labels(preds), "test_labels": run["test_labels"],
               "tera_numbers": run["metrics"]["adapter_params"], "wall_s": time.perf_counter() - t0}
        if report is not None:
            d = report.to_dict()
            rec.update(lora_numbers=report.lora_numbers,
                       kept_energy_mean=sum(x.energy for x in report.layers) / len(report.layers),
                       kept_energy_min=min(x.energy for x in report.layers),
                       error_max=report.max_error, ranks=[x.rank for x in report.layers], report=d)
        log(f"{run['dataset']} {run['contender']} seed={run['seed']} lr={run['lr']:g} {rec['setting']}: "
            f"test {acc:.4f} ({rec['wall_s']:.0f} s)")
        yield rec


def run(limit: int | None = None, log=print, results_dir: Path = RESULTS_DIR, plan: str | None = None) -> int:
    from tera_tn.finetune import load_model

    runs = trained_runs(ResultsFile(results_dir / "study.jsonl").records(), plan)
    version = code_version()
    out = ResultsFile(results_dir / "export.jsonl")
    done = out.keys()
    base, tok = None, None
    n = 0
    for r in runs:
        if all(f"{r['key']}|{setting_name(*s)}" in done for s in SETTINGS):
            continue
        if base is None:
            base, tok = load_model()
        for rec in evaluate_run(r, base, tok, SETTINGS, done, log, results_dir):
            out.append({**rec, **version})
            n += 1
            if limit is not None and n >= limit:
                return n
    return n


def _setting_order(records: Sequence[Mapping[str, Any]]) -> list[str]:
    """The settings of :data:`SETTINGS` in their order (the unexported adapter first), then any other
    setting the records hold, in first-seen order."""
    order = [setting_name(*s) for s in SETTINGS]
    for r in records:
        if r["setting"] not in order:
            order.append(r["setting"])
    return order


def table(records: Sequence[Mapping[str, Any]]) -> str:
    """Markdown: per trained run, each setting's test accuracy, LoRA size and kept energy, and the
    item-level paired difference to the unexported adapter (a bootstrap over test items)."""
    import numpy as np

    from tera_tn.analysis.stats import paired_bootstrap

    by_run: dict[str, dict[str, Mapping[str, Any]]] = {}
    for r in records:
        by_run.setdefault(r["run"], {})[r["setting"]] = r
    order = _setting_order(records)
    lines = ["| dataset | run (seed, lr) | setting | LoRA numbers | kept energy (mean / min) | test acc % | "
             "Δ vs TeRA, items [95 %] (pts) |", "|---|---|---|---|---|---|---|"]
    for key, at in by_run.items():
        ref = at.get(order[0])
        for name in order:
            r = at.get(name)
            if r is None:
                continue
            labels = np.array(decode_labels(r["test_labels"]))
            delta = "–"
            if ref is not None and r is not ref:
                a = np.equal(decode_labels(r["test_predictions"]), labels)
                b = np.equal(decode_labels(ref["test_predictions"]), labels)
                delta = str(paired_bootstrap(a.astype(int), b.astype(int)))
            size = f"{r['lora_numbers']:,}" if "lora_numbers" in r else f"{r['tera_numbers']:,} (λ)"
            energy = f"{r['kept_energy_mean']:.3f} / {r['kept_energy_min']:.3f}" if "kept_energy_mean" in r else "1"
            lines.append(f"| {r['dataset']} | {r['contender']} ({r['seed']}, {r['lr']:g}) | {name} | {size} | {energy} "
                         f"| {100 * r['test_accuracy']:.1f} | {delta} |")
    return "\n".join(lines) + "\n"


def summary(records: Sequence[Mapping[str, Any]], study: Sequence[Mapping[str, Any]], plan: str) -> str:
    """Markdown: per dataset, every setting over the seeds of the chosen-rate runs of ``plan``: mean
    LoRA size, kept energy, test accuracy, and the item- and seed-level paired bootstrap of its
    difference to the unexported adapter; beside them the study's LoRA r=8 at its chosen rate (same
    test items), paired on the seeds both have."""
    import numpy as np

    from experiments.study.plans import PLANS
    from experiments.study.publish import collect, correctness
    from tera_tn.analysis.stats import paired_bootstrap

    chosen = {r["key"] for r in trained_runs(study, plan)}
    outcomes, _ = collect(study, plan, PLANS[plan])
    lora = {o.dataset: o for o in outcomes if o.name == "lora_r8" and o.lr is not None}
    at: dict[tuple[str, str], dict[str, dict[int, Mapping[str, Any]]]] = {}
    for r in records:
        if r["run"] in chosen:
            at.setdefault((r["dataset"], r["contender"]), {}).setdefault(r["setting"], {})[int(r["seed"])] = r
    lines = ["| dataset | setting | seeds | LoRA numbers | kept energy (mean / min) | test % | "
             "Δ vs TeRA, items and seeds [95 %] (pts) |", "|---|---|---|---|---|---|---|"]
    order = _setting_order(records)

    def correct(by_seed, seeds):
        return np.stack([np.equal(decode_labels(by_seed[s]["test_predictions"]), decode_labels(by_seed[s]["test_labels"]))
                         for s in seeds]).astype(int)

    for (dataset, _), settings in sorted(at.items()):
        ref = settings.get(order[0], {})
        for name in order:
            by_seed = settings.get(name)
            if not by_seed:
                continue
            seeds = sorted(by_seed)
            paired = sorted(set(seeds) & set(ref))
            delta = str(paired_bootstrap(correct(by_seed, paired), correct(ref, paired))) if name != order[0] and paired else "–"
            sizes = [r["lora_numbers"] for r in by_seed.values() if "lora_numbers" in r]
            size = f"{round(sum(sizes) / len(sizes)):,}" if sizes else f"{by_seed[seeds[0]]['tera_numbers']:,} (λ)"
            e_mean = [r["kept_energy_mean"] for r in by_seed.values() if "kept_energy_mean" in r]
            e_min = [r["kept_energy_min"] for r in by_seed.values() if "kept_energy_min" in r]
            energy = f"{sum(e_mean) / len(e_mean):.3f} / {min(e_min):.3f}" if e_mean else "1"
            acc = 100 * sum(r["test_accuracy"] for r in by_seed.values()) / len(seeds)
            lines.append(f"| {dataset} | {name} | {len(seeds)} | {size} | {energy} | {acc:.1f} | {delta} |")
        o = lora.get(dataset)
        if o is not None and ref:
            seeds = sorted(set(o.test) & set(ref))
            theirs = correctness(o, seeds)
            delta = str(paired_bootstrap(theirs, correct(ref, seeds))) if theirs is not None and seeds else "–"
            acc = 100 * sum(o.test[s] for s in seeds) / len(seeds) if seeds else float("nan")
            lines.append(f"| {dataset} | LoRA r=8 trained (study, lr {o.lr:g}) | {len(seeds)} | {o.params:,} with head "
                         f"| – | {acc:.1f} | {delta} |")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m experiments.export_tradeoff", description=__doc__.split("\n")[0])
    parser.add_argument("action", choices=("run", "publish"))
    parser.add_argument("--limit", type=int, default=None, metavar="N", help="stop after N new lines")
    parser.add_argument("--plan", default=None, metavar="PLAN",
                        help="only the runs at each TeRA contender's chosen rate in this study plan (e.g. v2)")
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR, metavar="DIR",
                        help=f"the study's results folder (default {RESULTS_DIR})")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    if args.action == "run":
        import torch

        torch.set_num_threads(1)
        n = run(args.limit, log=lambda s: print(s, flush=True), results_dir=args.results_dir, plan=args.plan)
        print(f"{n} new lines in {args.results_dir / 'export.jsonl'}")
        return 0
    records = list(ResultsFile(args.results_dir / "export.jsonl").records())
    if args.plan is not None:
        sys.stdout.write(summary(records, list(ResultsFile(args.results_dir / "study.jsonl").records()), args.plan))
    else:
        sys.stdout.write(table(records))
    return 0


if __name__ == "__main__":
    sys.exit(main())
