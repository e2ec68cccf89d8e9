"""``python -m experiments.study run|status|publish|measure --plan NAME [--results FILE] [--docs]``.

``measure`` takes the encoder measures (intruders, ΔW's effective rank, embedding drift) of runs that
kept their adapter but ran before the measures existed, into ``measures.jsonl`` beside the results."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

DEFAULT_RESULTS = Path(__file__).resolve().parents[1] / "results" / "study.jsonl"


def main(argv: list[str] | None = None) -> int:
    from experiments.study.plans import PLANS

    parser = argparse.ArgumentParser(prog="python -m experiments.study", description=__doc__)
    parser.add_argument("action", choices=("run", "status", "publish", "measure"))
    parser.add_argument("--plan", required=True, choices=sorted(PLANS))
    parser.add_argument("--results", type=Path, default=DEFAULT_RESULTS,
                        help=f"JSON-lines file (default {DEFAULT_RESULTS})")
    parser.add_argument("--limit", type=int, default=None, metavar="N", help="stop after N new runs")
    parser.add_argument("--model", default=None, metavar="DIR", help="local model folder (default: bundled MiniLM)")
    parser.add_argument("--shard", default="0/1", metavar="I/N",
                        help="run only contenders I, I+N, I+2N, ... of each stage (N workers, one results file)")
    parser.add_argument("--only", default=None, metavar="NAMES",
                        help="run only these contenders (comma-separated names from the plan)")
    parser.add_argument("--datasets", default=None, metavar="NAMES",
                        help="run only these datasets (comma-separated; workers on different datasets never "
                             "share a contender's grid, so they can run side by side)")
    parser.add_argument("--docs", action="store_true",
                        help="publish: also write the figures to docs/results/ and the page docs/choosing.md")
    args = parser.parse_args(argv)
    if args.limit is not None and args.limit < 1:
        parser.error(f"--limit must be a positive integer, got {args.limit}")
    try:
        shard = tuple(int(v) for v in args.shard.split("/"))
        if len(shard) != 2 or not 0 <= shard[0] < shard[1]:
            raise ValueError
    except ValueError:
        parser.error(f"--shard must be I/N with 0 <= I < N (e.g. 1/2), got {args.shard!r}")
    only = None
    if args.only is not None:
        only = frozenset(n.strip() for n in args.only.split(",") if n.strip())
        known = {c.name for stage in PLANS[args.plan] for c in stage.contenders}
        unknown = sorted(only - known)
        if unknown or not only:
            parser.error(f"--only names {unknown or args.only!r}, not contenders of plan {args.plan!r}; "
                         f"expected some of: {', '.join(sorted(known))}")
    datasets = None
    if args.datasets is not None:
        datasets = frozenset(n.strip() for n in args.datasets.split(",") if n.strip())
        known = {d for stage in PLANS[args.plan] for d in stage.datasets}
        unknown = sorted(datasets - known)
        if unknown or not datasets:
            parser.error(f"--datasets names {unknown or args.datasets!r}, not datasets of plan {args.plan!r}; "
                         f"expected some of: {', '.join(sorted(known))}")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

    from experiments.study.results import ResultsFile, with_measures

    results = ResultsFile(args.results)
    if args.action == "measure":
        from experiments.study.measures import measure_kept_adapters

        n = measure_kept_adapters(results, log=lambda s: print(s, flush=True), model_dir=args.model)
        print(f"{n} kept adapters measured", flush=True)
        return 0
    if args.action == "publish":
        from experiments.study.publish import DOCS, GENERATIVE_PLAN, publish

        if not args.results.exists():
            parser.error(f"--results {args.results} does not exist: nothing to publish")
        print(publish(with_measures(results), args.plan, PLANS[args.plan], all_plans=PLANS,
                      docs=DOCS if args.docs else None, with_generative=args.plan == GENERATIVE_PLAN), end="")
        if args.docs:
            print(f"wrote {DOCS / 'choosing.md'} and its figures in {DOCS / 'results'}")
        return 0
    if args.action == "status":
        from experiments.study.publish import collect

        # the same reading as publish: a run counts by its key, whichever plan appended it
        outcomes, stale = collect(list(results.records()), args.plan, PLANS[args.plan])
        for o in outcomes:
            if not o.runs:
                continue
            line = f"{o.dataset:<16} {o.name:<22} runs {sum(len(at) for at in o.runs.values()):>3}"
            if o.lr is None:
                line += f"  {o.state}"
            else:
                test = sum(o.test.values()) / len(o.test)
                line += f"  lr {o.lr:<8g} val {o.val:.4f} test {test:.4f} params {o.params:,}  {o.state}"
            print(line)
        if stale:
            print(f"{stale} line(s) of plan {args.plan!r} match none of its runs any more (left out)")
        return 0

    import tera_tn
    from experiments.study.runner import code_version, run_plan

    version = code_version()
    print(f"tera_tn from {tera_tn.__file__}; commit {version['commit']}{' (dirty)' if version['dirty'] else ''}; "
          f"results -> {args.results}", flush=True)
    ran = run_plan(args.plan, PLANS[args.plan], results, limit=args.limit, model_dir=args.model,
                   log=lambda s: print(s, flush=True), shard=shard, only=only, datasets=datasets)
    finished = args.limit is None or ran < args.limit
    print(f"{ran} new runs; plan {args.plan!r} {'complete' if finished else 'not finished'}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
