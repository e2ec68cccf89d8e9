"""Measurement core of ``bench/suite.py``: contenders, round-robin timing, memory, planner check.

Contenders are built with the builders of ``bench/bench_layer.py`` (same models as the
single-layer targets there): a bias-free ``nn.Linear(d, d)``, PEFT adapters made by the real
``peft`` package around a one-Linear module, and :class:`tera_tn.torch.TeRALinear` with
``TeRASpec.from_shape(d, d, order=6, diag="rank")`` (full ranks or ``ranks=0.5`` = ceil(K_n/2)), each with
the strategy forced to ``materialize`` / ``dense`` / ``factored`` and with ``auto``.

Every contender runs the same step: ``x.grad = None``, parameter grads ``None``, then
``module(x).backward(g)`` with ``x`` of shape ``(n, d)`` requiring grad, float32.

Timing: all contenders of one grid point run alternately in rounds (the order rotates each
round) after one warm-up call each; each is summarized by its median, so a slow phase of a
shared machine hits all of them alike and ratios of medians are the reported quantities.

Memory (two numbers per contender and grid point):

* ``saved_bytes``: the tensors autograd keeps for backward, captured with
  ``torch.autograd.graph.saved_tensors_hooks`` during one forward, summed over unique storages;
  ``saved_extra_bytes`` leaves out storages that exist anyway (the module's parameters and
  buffers and the input ``x``), i.e. the activation memory the method adds per layer.
* ``peak_bytes``: growth of the process's resident set during one forward+backward step
  (``VmHWM − VmRSS`` from ``/proc/self/status`` after resetting the high-water mark through
  ``/proc/self/clear_refs``, with the previous step's gradients freed first). Run in a fresh worker process started with
  ``MALLOC_MMAP_THRESHOLD_=65536`` so that every tensor larger than 64 KiB is its own ``mmap``
  and is returned to the OS when freed: the resident set then follows live tensor memory (output,
  gradients, saved tensors and every temporary) at page granularity. One warm-up step first
  (one-time allocations), then one measured step (the allocation pattern is deterministic). On CUDA the same number is
  ``torch.cuda.max_memory_allocated`` growth.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from typing import Callable, Iterable, Optional, Sequence

import torch
from torch import nn

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

from bench.bench_layer import FORCED, frozen_linear, peft_model, tera_layer, train_step  # noqa: E402
from tera_tn import TeRASpec  # noqa: E402
from tera_tn.torch.planning import layer_plan  # noqa: E402

ORDER = 6
PEERS = ("frozen", "full_ft", "lora_r8", "vera_r256", "hira_r32")
TERA_RANKS = {"full": "full", "half": 0.5}
TERA_STRATEGIES = FORCED + ("auto",)
CONTENDERS = PEERS + tuple(f"tera_{r}_{s}" for r in TERA_RANKS for s in TERA_STRATEGIES)
LABELS = {
    "frozen": "frozen Linear",
    "full_ft": "full fine-tuning",
    "lora_r8": "PEFT LoRA r=8",
    "vera_r256": "PEFT VeRA r=256",
    "hira_r32": "PEFT HiRA r=32",
    **{f"tera_{r}_{s}": f"TeRA {'full' if r == 'full' else 'K/2'} {s}" for r in TERA_RANKS for s in TERA_STRATEGIES},
}


def spec_for(d: int, ranks: str) -> TeRASpec:
    """The spec every TeRA contender of size ``d`` uses (order 6, rank-side diagonals, full or half
    ranks: the layer grid's published spec, pinned so that the library's defaults do not move it)."""
    return TeRASpec.from_shape(d, d, order=ORDER, ranks=TERA_RANKS[ranks], diag="rank")


def build(name: str, d: int, device: str = "cpu") -> nn.Module:
    """One contender as a module mapping ``(n, d) → (n, d)`` with its trainable parameters set."""
    if name == "frozen":
        m = frozen_linear(d)
    elif name == "full_ft":
        m = frozen_linear(d).requires_grad_(True)
    elif name in ("lora_r8", "vera_r256", "hira_r32"):
        m = peft_model(name.split("_")[0], d)
    elif name.startswith("tera_"):
        _, ranks, strategy = name.split("_")
        m = tera_layer(d, TERA_RANKS[ranks], strategy)
        if m.spec != spec_for(d, ranks):  # bench_layer and this suite must time the same thing
            raise RuntimeError(f"bench_layer.tera_layer built {m.spec}, expected {spec_for(d, ranks)}")
    else:
        raise ValueError(f"unknown contender {name!r}; known: {CONTENDERS}")
    return m.to(device)


def trainable_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


def _sync(device: str) -> Callable[[], None]:
    if device.startswith("cuda"):
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


def time_round_robin(
    steps: dict[str, Callable[[], None]],
    *,
    min_reps: int,
    max_reps: int,
    budget_s: float,
    device: str = "cpu",
) -> dict[str, list[float]]:
    """Seconds per call for each step, alternating them in rounds with a rotating order.

    One warm-up call each, then at least ``min_reps`` rounds and more (up to ``max_reps``) while
    the elapsed time stays under ``budget_s``.
    """
    sync = _sync(device)
    for fn in steps.values():
        fn()
    sync()
    names = list(steps)
    times: dict[str, list[float]] = {k: [] for k in names}
    start = time.perf_counter()
    for r in range(max_reps):
        if r >= min_reps and time.perf_counter() - start > budget_s:
            break
        k0 = r % len(names)
        for k in names[k0:] + names[:k0]:
            t0 = time.perf_counter()
            steps[k]()
            sync()
            times[k].append(time.perf_counter() - t0)
    return times


def saved_tensor_bytes(module: nn.Module, x: torch.Tensor) -> tuple[int, int]:
    """(all, extra) bytes of unique storages autograd saves during ``module(x)``.

    ``extra`` excludes the storages of the module's parameters and buffers and of ``x``.
    """
    existing = {t.untyped_storage().data_ptr() for t in list(module.parameters()) + list(module.buffers())}
    existing.add(x.untyped_storage().data_ptr())
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        st = t.untyped_storage()
        seen[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = module(x)
    del y
    total = sum(seen.values())
    extra = sum(v for k, v in seen.items() if k not in existing)
    return total, extra


def _proc_status(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


def _reset_peak_rss() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def rss_peak_supported() -> bool:
    try:
        _reset_peak_rss()
        _proc_status("VmHWM")
        return True
    except OSError:
        return False
    except KeyError:
        return False


def step_peak_bytes(
    step: Callable[[], None], clear: Callable[[], None] = lambda: None, device: str = "cpu", measures: int = 1
) -> Optional[int]:
    """Memory growth during one call of ``step`` (see the module docstring); None if unsupported.

    ``clear`` runs before each measurement and must free what the previous step left behind
    (the gradients), so that the step does not reuse memory it frees itself.
    """
    step()  # one-time allocations
    found = []
    for _ in range(measures):
        clear()
        if device.startswith("cuda"):
            torch.cuda.synchronize(device)
            base = torch.cuda.memory_allocated(device)
            torch.cuda.reset_peak_memory_stats(device)
            step()
            torch.cuda.synchronize(device)
            found.append(torch.cuda.max_memory_allocated(device) - base)
        else:
            if not rss_peak_supported():
                return None
            _reset_peak_rss()
            base = _proc_status("VmRSS")
            step()
            found.append(max(0, _proc_status("VmHWM") - base))
    return min(found)


def memory_profile(names: Sequence[str], d: int, ns: Sequence[int], device: str = "cpu") -> dict:
    """``{name: {n: {"peak_bytes", "saved_bytes", "saved_extra_bytes"}}}``, one contender at a time."""
    out: dict = {}
    for name in names:
        torch.manual_seed(0)
        module = build(name, d, device)
        out[name] = {}
        for n in ns:
            x = torch.randn(n, d, device=device, requires_grad=True)
            g = torch.randn(n, d, device=device)
            step = train_step(module, x, g)

            def clear(x: torch.Tensor = x, module: torch.nn.Module = module) -> None:
                x.grad = None
                for p in module.parameters():
                    p.grad = None

            peak = step_peak_bytes(step, clear, device)
            total, extra = saved_tensor_bytes(module, x)
            out[name][str(n)] = {"peak_bytes": peak, "saved_bytes": total, "saved_extra_bytes": extra}
            del x, g, step  # the next size's base memory must not hold this one's tensors
        del module
    return out


def memory_profile_subprocess(names: Sequence[str], ds: Sequence[int], ns: Sequence[int], threads: int, timeout: float = 3600) -> dict:
    """``{str(d): memory_profile(names, d, ns)}`` in one fresh process with ``MALLOC_MMAP_THRESHOLD_=65536``."""
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", PYTHONPATH=_ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    args = json.dumps({"names": list(names), "ds": list(ds), "ns": list(ns), "threads": threads})
    proc = subprocess.run(
        [sys.executable, "-m", "bench._harness", "--memory-worker", args],
        cwd=_ROOT, env=env, capture_output=True, text=True, timeout=timeout,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"memory worker failed (rc {proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def time_point(names: Sequence[str], d: int, n: int, *, min_reps: int, max_reps: int, budget_s: float, device: str = "cpu") -> dict:
    """Time all ``names`` at one grid point; returns per-contender medians, quartiles and raw times."""
    torch.manual_seed(0)
    modules = {k: build(k, d, device) for k in names}
    x = torch.randn(n, d, device=device, requires_grad=True)
    g = torch.randn(n, d, device=device)
    steps = {k: train_step(m, x, g) for k, m in modules.items()}
    times = time_round_robin(steps, min_reps=min_reps, max_reps=max_reps, budget_s=budget_s, device=device)
    out = {}
    for k, ts in times.items():
        q = statistics.quantiles(ts, n=4) if len(ts) >= 2 else [ts[0]] * 3
        out[k] = {
            "median_s": statistics.median(ts),
            "q1_s": q[0],
            "q3_s": q[2],
            "reps": len(ts),
            "times_s": ts,
            "trainable": trainable_params(modules[k]),
        }
    return out


def planner_record(d: int, n: int, timing: dict, device: str = "cpu") -> list[dict]:
    """Planner validation rows for one grid point (one per TeRA rank setting that was timed).

    ``choice_ratio`` = measured median of the strategy ``layer_plan`` picks / best measured of the
    forced strategies materialize, dense and factored (what the planner controls; the pass
    criterion is ≤ 1.10). ``auto_ratio`` = measured median of the ``strategy="auto"`` layer itself
    / best (includes run-to-run noise between two identical code paths).
    """
    rows = []
    for ranks in TERA_RANKS:
        keys = {s: f"tera_{ranks}_{s}" for s in TERA_STRATEGIES}
        if not all(k in timing for k in keys.values()):
            continue
        lp = layer_plan(spec_for(d, ranks), n, training=True, device=device.split(":")[0], dtype="float32")
        meas = {s: timing[k]["median_s"] for s, k in keys.items()}
        best_s = min(FORCED, key=lambda s: meas[s])
        best = meas[best_s]
        rows.append({
            "d": d,
            "n": n,
            "ranks": ranks,
            "chosen": lp.strategy,
            "best_measured": best_s,
            "measured_materialize_s": meas["materialize"],
            "measured_dense_s": meas["dense"],
            "measured_factored_s": meas["factored"],
            "measured_auto_s": meas["auto"],
            "predicted_materialize_s": lp.materialize,
            "predicted_dense_s": lp.dense,
            "predicted_factored_s": lp.factored,
            "choice_ratio": meas[lp.strategy] / best,
            "auto_ratio": meas["auto"] / best,
            "ok": meas[lp.strategy] / best <= 1.10,
        })
    return rows


def replan(rows: Iterable[dict], model, device: str = "cpu") -> list[str]:
    """Strategies ``layer_plan`` would choose for ``rows`` under cost model ``model``.

    The model is passed as a value, so the installed cost models stay as they are."""
    return [
        layer_plan(spec_for(r["d"], r["ranks"]), r["n"], training=True, device=device, model=model).strategy
        for r in rows
    ]


def _worker(argv: Sequence[str]) -> int:
    args = json.loads(argv[0])
    torch.set_num_threads(int(args["threads"]))
    res = {str(d): memory_profile(args["names"], int(d), [int(n) for n in args["ns"]]) for d in args["ds"]}
    print(json.dumps(res))
    return 0


if __name__ == "__main__":
    if len(sys.argv) >= 3 and sys.argv[1] == "--memory-worker":
        sys.exit(_worker(sys.argv[2:]))
    sys.exit("usage: python -m bench._harness --memory-worker JSON (internal; run bench/suite.py)")


def write_outputs(results: dict, out_dir: str, *, json_name: str, md_name: str, png_name: str,
                  markdown: Callable[[dict], str], plot: Callable[[dict, str], Optional[str]]) -> dict:
    """Write a bench's results as JSON, its Markdown table and (where matplotlib is there) its
    figure into ``out_dir``; the paths written, by kind."""
    os.makedirs(out_dir, exist_ok=True)
    paths = {"json": os.path.join(out_dir, json_name), "md": os.path.join(out_dir, md_name)}
    with open(paths["json"], "w") as f:
        json.dump(results, f, indent=1)
    with open(paths["md"], "w") as f:
        f.write(markdown(results) + "\n")
    png = plot(results, os.path.join(out_dir, png_name))
    if png:
        paths["png"] = png
    return paths
