"""Benchmark: materialising a 4096x4096 ΔW from an order-6 Tucker network.

    python bench/bench_materialize.py [--quick] [--threads 2]

Contenders (run alternately, round-robin, median of the rounds so that slow drifts
of a shared machine hit all of them alike):

* ``kernel torch``  -- ``multi_mode_product`` on torch float32, into a preallocated
  ``out`` (steady state of a training loop) and with a fresh result;
* ``kernel numpy``  -- the same on numpy float32;
* ``matmul``        -- a plain square float32 GEMM with the same FLOP count
  (torch and numpy), the yardstick;
* ``opt_einsum``    -- ``opt_einsum.contract`` of the same network (torch backend);
* ``naive chain``   -- one out-of-place product after the other.

FLOPs are counted as ``2 * sum_n (size before product n) * K_n``
(:func:`tera_tn.core.modeproduct.mode_product_flops`).  The full-rank case is checked
against the target "kernel FLOP/s >= 50 % of matmul FLOP/s" (PASS/FAIL); the
reduced-rank case (ranks 8) is informational.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from tera_tn.core.modeproduct import mode_product_flops, multi_mode_product  # noqa: E402

try:  # optional: pins numpy's BLAS thread count to the same value as torch's
    from threadpoolctl import threadpool_limits
except ImportError:  # pragma: no cover
    threadpool_limits = None

TARGET = 0.5


def naive_chain(core, mats):
    x = core
    for n, m in enumerate(mats):
        lead = int(np.prod(x.shape[:n]))
        trail = int(np.prod(x.shape[n + 1 :]))
        y = m @ x.reshape(lead, x.shape[n], trail)
        x = y.reshape(x.shape[:n] + (m.shape[0],) + x.shape[n + 1 :])
    return x


def einsum_expr(n):
    letters = "abcdefghijklmnopqrstuvwxyz"
    r, k = letters[:n], letters[n : 2 * n]
    return r + "," + ",".join(k[i] + r[i] for i in range(n)) + "->" + k


def run_round_robin(contenders, reps):
    times = {name: [] for name in contenders}
    for fn in contenders.values():  # warm-up: workspace, thread pools, page faults
        fn()
    for _ in range(reps):
        for name, fn in contenders.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(ts) for name, ts in times.items()}


def case(ranks, sizes, reps, slow_reps, with_slow):
    import opt_einsum

    rng = np.random.default_rng(0)
    n = len(ranks)
    core_np = rng.standard_normal(ranks, dtype=np.float32)
    mats_np = [(rng.standard_normal((k, r)) / np.sqrt(r)).astype(np.float32) for k, r in zip(sizes, ranks)]
    core_t = torch.from_numpy(core_np.copy())
    mats_t = [torch.from_numpy(m.copy()) for m in mats_np]
    flops = mode_product_flops(ranks, [m.shape for m in mats_np])

    # same-FLOP square GEMM
    m = round((flops / 2) ** (1 / 3))
    a_t, b_t, c_t = torch.randn(m, m), torch.randn(m, m), torch.empty(m, m)
    a_n, b_n, c_n = a_t.numpy().copy(), b_t.numpy().copy(), np.empty((m, m), np.float32)
    mm_flops = 2 * m**3

    out_t = torch.empty(tuple(sizes))
    out_n = np.empty(tuple(sizes), np.float32)

    # correctness of what is being timed
    ref = multi_mode_product(core_np.astype(np.float64), [x.astype(np.float64) for x in mats_np])
    for got in (multi_mode_product(core_t, mats_t).numpy(), multi_mode_product(core_np, mats_np)):
        err = np.abs(got - ref).max() / np.abs(ref).max()
        assert err < 1e-4, err

    # torch and numpy are timed in separate round-robins: their thread pools
    # (OpenMP, OpenBLAS) spin-wait after each call and would steal each other's cores.
    res = run_round_robin({
        "matmul torch": lambda: torch.mm(a_t, b_t, out=c_t),
        "kernel torch (out=)": lambda: multi_mode_product(core_t, mats_t, out=out_t),
        "kernel torch (fresh)": lambda: multi_mode_product(core_t, mats_t),
    }, reps)
    res.update(run_round_robin({
        "matmul numpy": lambda: np.matmul(a_n, b_n, out=c_n),
        "kernel numpy (out=)": lambda: multi_mode_product(core_np, mats_np, out=out_n),
        "kernel numpy (fresh)": lambda: multi_mode_product(core_np, mats_np),
    }, reps))
    fl = {k: (mm_flops if k.startswith("matmul") else flops) for k in res}
    if with_slow:
        expr = einsum_expr(n)
        slow = {
            "opt_einsum torch": lambda: opt_einsum.contract(expr, core_t, *mats_t),
            "naive chain torch": lambda: naive_chain(core_t, mats_t),
        }
        res.update(run_round_robin(slow, slow_reps))
        fl.update({k: flops for k in slow})
    return flops, mm_flops, m, res, fl


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer repetitions, skip the slow contenders")
    ap.add_argument("--threads", type=int, default=2, help="torch / BLAS threads (default 2)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    reps, slow_reps = (5, 2) if args.quick else (15, 5)
    limits = threadpool_limits(args.threads, user_api="blas") if threadpool_limits else None

    print(f"torch {torch.__version__} ({torch.get_num_threads()} threads), numpy {np.__version__}, "
          f"cpu count {os.cpu_count()}, reps {reps}")
    verdict = True
    for title, ranks, sizes, checked in [
        ("full rank: core 16^6 -> 16^6 (ΔW 4096x4096), float32", (16,) * 6, (16,) * 6, True),
        ("reduced rank: core 8^6 -> 16^6 (ΔW 4096x4096), float32", (8,) * 6, (16,) * 6, False),
    ]:
        flops, mm_flops, m, res, fl = case(ranks, sizes, reps, slow_reps, with_slow=not args.quick)
        print(f"\n== {title}")
        print(f"   kernel FLOPs {flops / 1e9:.3f} G; matmul {m}^3 = {mm_flops / 1e9:.3f} G")
        print(f"   {'contender':<24}{'ms':>9}{'GFLOP/s':>10}{'vs matmul':>10}  (same backend)")
        for name in res:
            backend = "numpy" if "numpy" in name else "torch"
            base = fl[f"matmul {backend}"] / res[f"matmul {backend}"]
            gf = fl[name] / res[name]
            print(f"   {name:<24}{res[name] * 1e3:9.2f}{gf / 1e9:10.1f}{gf / base:10.0%}")
        if checked:
            for backend in ("torch", "numpy"):
                ratio = (flops / res[f"kernel {backend} (out=)"]) / (mm_flops / res[f"matmul {backend}"])
                ok = ratio >= TARGET
                if backend == "torch":
                    verdict = verdict and ok
                print(f"   {'PASS' if ok else 'FAIL'} {backend}: kernel (out=) reaches {ratio:.0%} of "
                      f"{backend} matmul FLOP/s (target {TARGET:.0%})")
    if limits is not None:
        limits.restore_original_limits()
    print(f"\noverall (torch target): {'PASS' if verdict else 'FAIL'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
