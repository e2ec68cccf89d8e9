"""Benchmark one TeRA layer against nn.Linear and PEFT adapters (CPU, 2 threads, float32).

    python bench/bench_layer.py [--quick] [--json OUT.json]

Contenders of one comparison run alternately within one process (round robin, rotating the
order each round) and each is summarized by its median, so a slow phase of a shared machine
hits all of them alike; targets are ratios of medians from that one run. Inputs require grad
as in a real network (so the backward computes grad_x as well). Targets (docs/torch.md):

A. full ranks, d=4096 (order 6), n=512, forward+backward:
   TeRA ≤ 1.2 × full fine-tuning of the same nn.Linear (weight trainable), and ≤ PEFT HiRA r=32.
B. ranks K_n/2, forward+backward: TeRA ≤ PEFT VeRA r=256 for d ∈ {768, 1024, 2048, 4096},
   n ∈ {1, 64, 512, 2048}.
C. n=1 forward: full rank ≤ 2.5 × frozen nn.Linear forward; ranks K_n/2 ≤ PEFT LoRA r=8 + 0.3 ms.

PEFT peers are built with the real ``peft`` package on a tiny module wrapping one Linear.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import warnings
from typing import Callable

import torch
from torch import nn

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from tera_tn import TeRASpec  # noqa: E402
from tera_tn.torch import TeRALinear  # noqa: E402
from tera_tn.torch.config import LAYER_STRATEGIES  # noqa: E402
from tera_tn.torch.planning import layer_plan  # noqa: E402

DIMS = (768, 1024, 2048, 4096)
TOKENS = (1, 64, 512, 2048)
# what the planner chooses among; the layer's own list, so a new strategy is timed without edits here
FORCED = tuple(s for s in LAYER_STRATEGIES if s != "auto")


class One(nn.Module):
    """A model that is one bias-free Linear, so PEFT can target it by name."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.lin = nn.Linear(d, d, bias=False)

    def forward(self, x):
        return self.lin(x)


def peft_model(kind: str, d: int) -> nn.Module:
    import peft

    warnings.filterwarnings("ignore")
    torch.manual_seed(0)
    cfg = {
        "lora": lambda: peft.LoraConfig(r=8, target_modules=["lin"]),
        "vera": lambda: peft.VeraConfig(r=256, target_modules=["lin"]),
        "hira": lambda: peft.HiraConfig(r=32, target_modules=["lin"]),
    }[kind]()
    model = peft.get_peft_model(One(d), cfg)
    # Give the adapters non-trivial values (zero-initialized B would make nothing cheaper, but
    # keeps the comparison honest).
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.normal_(0, 0.02)
    return model


def tera_layer(d: int, ranks, strategy: str = "auto", diag: str = "rank") -> TeRALinear:
    torch.manual_seed(0)
    spec = TeRASpec.from_shape(d, d, order=6, ranks=ranks, diag=diag)
    layer = TeRALinear(nn.Linear(d, d, bias=False), spec, scale_init="random", strategy=strategy)
    layer.base_layer.requires_grad_(False)
    return layer


def frozen_linear(d: int) -> nn.Linear:
    torch.manual_seed(0)
    return nn.Linear(d, d, bias=False).requires_grad_(False)


def train_step(module: nn.Module, x: torch.Tensor, g: torch.Tensor) -> Callable[[], None]:
    params = [p for p in module.parameters() if p.requires_grad]

    def run() -> None:
        x.grad = None
        for p in params:
            p.grad = None  # no gradient accumulation pass for anyone
        module(x).backward(g)

    return run


def forward(module: nn.Module, x: torch.Tensor) -> Callable[[], None]:
    return lambda: module(x)


def measure(contenders: dict[str, Callable[[], None]], reps: int, budget_s: float) -> dict[str, float]:
    """Median seconds per contender, alternating them round robin (1 warm-up each)."""
    for fn in contenders.values():
        fn()
    names = list(contenders)
    times: dict[str, list[float]] = {k: [] for k in names}
    start = time.perf_counter()
    for r in range(reps):
        order = names[r % len(names) :] + names[: r % len(names)]
        for k in order:
            t0 = time.perf_counter()
            contenders[k]()
            times[k].append(time.perf_counter() - t0)
        if r >= 2 and time.perf_counter() - start > budget_s:
            break
    return {k: statistics.median(v) for k, v in times.items()}


class Report:
    def __init__(self) -> None:
        self.rows: list[dict] = []

    def check(self, target: str, value: float, limit: float, detail: str, unit: str = "×") -> None:
        ok = value <= limit
        self.rows.append(dict(target=target, value=value, limit=limit, ok=ok, detail=detail, unit=unit))
        flag = "PASS" if ok else "FAIL"
        print(f"  [{flag}] {target}: {value:.3f}{unit} (limit {limit:g}{unit})  {detail}", flush=True)


def fmt(times: dict[str, float]) -> str:
    return ", ".join(f"{k} {v * 1e3:.2f} ms" for k, v in times.items())


def target_a(rep: Report, reps: int, budget: float) -> None:
    d, n = 4096, 512
    print(f"\nA. full rank, d={d}, order 6, n={n}, forward+backward (planner: "
          f"{layer_plan(TeRASpec.from_shape(d, d, order=6, diag='rank'), n, training=True).strategy})", flush=True)
    torch.manual_seed(1)
    x = torch.randn(n, d, requires_grad=True)
    g = torch.randn(n, d)
    full = nn.Linear(d, d, bias=False)
    tera = tera_layer(d, "full")

    def with_adamw(module: nn.Module) -> Callable[[], None]:
        step = train_step(module, x, g)
        opt = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=1e-6)

        def run() -> None:
            step()
            opt.step()

        return run

    cont = {
        "tera auto": train_step(tera, x, g),
        **{f"tera {s}": train_step(tera_layer(d, "full", s), x, g) for s in FORCED},
        "tera mode-side auto": train_step(tera_layer(d, "full", diag="mode"), x, g),
        "full FT fwd+bwd": train_step(full, x, g),
        "hira r=32": train_step(peft_model("hira", d), x, g),
        "tera +AdamW": with_adamw(tera),
        "full FT +AdamW": with_adamw(full),
    }
    t = measure(cont, reps, budget)
    print("  " + fmt(t))
    rep.check("A1 TeRA full-rank fwd+bwd / full-FT fwd+bwd", t["tera auto"] / t["full FT fwd+bwd"], 1.2,
              f"(whole steps with AdamW updates: {t['tera +AdamW'] / t['full FT +AdamW']:.3f}×)")
    rep.check("A1m TeRA mode-side full-rank fwd+bwd / full-FT fwd+bwd", t["tera mode-side auto"] / t["full FT fwd+bwd"],
              1.2, "")
    rep.check("A2 TeRA full-rank fwd+bwd / HiRA r=32", t["tera auto"] / t["hira r=32"], 1.0, "")
    best = min((f"tera {s}" for s in FORCED), key=t.get)
    print(f"  planner check: fastest forced strategy = {best.split()[1]}; auto within "
          f"{t['tera auto'] / t[best]:.2f}× of it")


def target_b(rep: Report, reps: int, budget: float, quick: bool) -> None:
    print("\nB. ranks K_n/2 (order 6) vs PEFT VeRA r=256, forward+backward", flush=True)
    for d in DIMS:
        tera = tera_layer(d, 0.5)
        vera = peft_model("vera", d)
        forced = {} if quick else {s: tera_layer(d, 0.5, s) for s in FORCED}
        for n in TOKENS:
            torch.manual_seed(2)
            x = torch.randn(n, d, requires_grad=True)
            g = torch.randn(n, d)
            cont = {"tera": train_step(tera, x, g), "vera r=256": train_step(vera, x, g)}
            cont.update({f"tera {s}": train_step(m, x, g) for s, m in forced.items()})
            t = measure(cont, reps, budget)
            plan = layer_plan(tera.spec, n, training=True).strategy
            rep.check(f"B d={d} n={n} TeRA/VeRA", t["tera"] / t["vera r=256"], 1.0, f"[{plan}] " + fmt(t))


def target_c(rep: Report, reps: int, budget: float) -> None:
    print("\nC. n=1 forward (input requires grad, so no inference cache)", flush=True)
    for d in DIMS:
        torch.manual_seed(3)
        x = torch.randn(1, d, requires_grad=True)
        full = tera_layer(d, "full")
        half = tera_layer(d, 0.5)
        lin = frozen_linear(d)
        lora = peft_model("lora", d)
        full_cached = tera_layer(d, "full").eval()

        def cached() -> None:
            with torch.no_grad():
                full_cached(x)

        cont = {
            "linear": forward(lin, x),
            "tera full": forward(full, x),
            "tera K/2": forward(half, x),
            "lora r=8": forward(lora, x),
            "tera full no_grad cached": cached,
        }
        t = measure(cont, reps * 4, budget)
        rep.check(f"C d={d} full rank / Linear", t["tera full"] / t["linear"], 2.5,
                  f"(no_grad with ΔW cache: {t['tera full no_grad cached'] / t['linear']:.2f}×) " + fmt(t))
        rep.check(f"C d={d} K/2 − LoRA r=8", (t["tera K/2"] - t["lora r=8"]) * 1e3, 0.3, "", unit=" ms")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer repetitions, no forced-strategy columns (< 5 min)")
    ap.add_argument("--json", help="also write the results to this JSON file")
    ap.add_argument("--only", choices=("A", "B", "C"), action="append", help="run only these targets")
    args = ap.parse_args()
    torch.set_num_threads(2)
    reps, budget = (5, 20.0) if args.quick else (9, 60.0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, float32, quick={args.quick}")
    rep = Report()
    only = set(args.only or "ABC")
    if "A" in only:
        target_a(rep, reps, budget * 3)
    if "B" in only:
        target_b(rep, reps, budget, args.quick)
    if "C" in only:
        target_c(rep, reps, budget)
    failed = [r for r in rep.rows if not r["ok"]]
    print(f"\n{len(rep.rows) - len(failed)}/{len(rep.rows)} targets met")
    for r in failed:
        print(f"  FAIL {r['target']}: {r['value']:.3f}{r['unit']} > {r['limit']:g}{r['unit']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rep.rows, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
