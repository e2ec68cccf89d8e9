"""Structured vs dense singular values of a TeRA ΔW.

Target (issue "rank analysis"): order-6 4096×4096, ranks K_n/2, the structured spectrum
(tera_tn.analysis.spectrum.tera_singular_values) at least 20× faster than svdvals of the materialized
ΔW in the same run, and equal within 1e-5 relative.

Error measure: max_i |σ_i(structured) − σ_i(dense)| / σ_1(dense) over all min(d_out, d_in)
values (normwise relative; the dense trailing values are rounding noise where the structured
ones are exact zeros). Also printed: the worst per-value relative error over the first r
(theoretical rank) values, which are all well above the noise for orthogonal factors.

Timings: best of --repeats for the structured route (it is short), one dense SVD (it is long);
the dense time excludes materializing ΔW, which only favours the dense side.

    python bench/bench_spectrum.py [--backend torch|numpy] [--dtype float32|float64] [--size 4096] [--order 6]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tera_tn import TeRASpec, delta_weight, init_scales, random_factors, theoretical_rank  # noqa: E402
from tera_tn.analysis.spectrum import tera_singular_values  # noqa: E402

SPEEDUP_TARGET = 20.0
ERROR_TARGET = 1e-5


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--backend", choices=("torch", "numpy"), default="torch")
    ap.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    ap.add_argument("--size", type=int, default=4096)
    ap.add_argument("--order", type=int, default=6)
    ap.add_argument("--ranks", type=float, default=0.5, help="R_n = ceil(f·K_n)")
    ap.add_argument("--init", default="orthogonal", choices=("orthogonal", "gaussian", "uniform"))
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--speed-target", type=float, default=SPEEDUP_TARGET,
        help="speedup the run must reach to pass; set for --size 4096 (0 checks accuracy only, for small sizes)",
    )
    args = ap.parse_args()

    spec = TeRASpec.from_shape(args.size, args.size, order=args.order, ranks=args.ranks, diag="rank")
    factors = random_factors(spec, args.seed, init=args.init)
    scales = init_scales(spec, "random", seed=args.seed + 1)
    r = theoretical_rank(spec, scales)
    if args.backend == "torch":
        import torch

        dt = getattr(torch, args.dtype)
        factors = factors.as_torch(dt)
        scales = [torch.as_tensor(s, dtype=dt) for s in scales]
        svdvals = torch.linalg.svdvals
        to_np = lambda x: x.double().numpy()  # noqa: E731
        threads = torch.get_num_threads()
    else:
        factors = factors.as_numpy(np.dtype(args.dtype))
        scales = [s.astype(args.dtype) for s in scales]
        svdvals = lambda a: np.linalg.svd(a, compute_uv=False)  # noqa: E731
        to_np = lambda x: np.asarray(x, dtype=np.float64)  # noqa: E731
        threads = None

    print(f"spec: {spec}")
    print(f"backend {args.backend}, dtype {args.dtype}, factors {args.init}, theoretical rank {r}"
          + (f", torch threads {threads}" if threads else ""))

    tera_singular_values(spec, factors, scales)  # warm-up (allocations, BLAS threads)
    times = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        structured = tera_singular_values(spec, factors, scales)
        times.append(time.perf_counter() - t0)
    t_struct = min(times)

    t0 = time.perf_counter()
    dw = delta_weight(spec, factors, scales)
    t_mat = time.perf_counter() - t0
    t0 = time.perf_counter()
    dense = svdvals(dw)
    t_dense = time.perf_counter() - t0

    s, d = to_np(structured), to_np(dense)
    err = float(np.abs(s - d).max() / d[0])
    err_top = float(np.max(np.abs(s[:r] - d[:r]) / d[:r]))
    speedup = t_dense / t_struct
    ok_speed, ok_err = speedup >= args.speed_target, err <= ERROR_TARGET

    print(f"structured tera_singular_values: {t_struct * 1e3:10.1f} ms  (best of {args.repeats}; all: "
          + ", ".join(f"{t * 1e3:.1f}" for t in times) + ")")
    print(f"dense svdvals of ΔW:             {t_dense * 1e3:10.1f} ms  (+ {t_mat * 1e3:.1f} ms to materialize ΔW)")
    print(f"speedup:                         {speedup:10.1f}×   target ≥ {args.speed_target:g}×   {'PASS' if ok_speed else 'FAIL'}")
    print(f"max |Δσ| / σ_1:                  {err:10.2e}    target ≤ {ERROR_TARGET:g}   {'PASS' if ok_err else 'FAIL'}")
    print(f"max relative error, top {r} σ:  {err_top:10.2e}    (informative)")
    print("PASS" if ok_speed and ok_err else "FAIL")
    return 0 if ok_speed and ok_err else 1


if __name__ == "__main__":
    raise SystemExit(main())
