"""Build TeRA updates from tensor specs, apply them to a batch and ask the planner why.

    python examples/build_layers.py            # 4096×4096 and 11008×4096 (LLaMA-2-7B shapes)
    python examples/build_layers.py --smoke    # 256×256 and 997×256 (a prime, padded)
"""

import argparse

import numpy as np

import tera_tn as tt


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--smoke", action="store_true", help="small shapes")
    args = ap.parse_args(argv)
    shapes = [(256, 256), (997, 256)] if args.smoke else [(4096, 4096), (11008, 4096)]

    # 1. automatic, balanced tensorization (padding awkward sizes) ...
    for d_out, d_in in shapes:
        spec = tt.TeRASpec.from_shape(d_out, d_in, order=6)
        print(spec)
    # 2. ... or explicit modes and reduced Tucker ranks
    spec = tt.TeRASpec((4, 8, 8), (4, 8, 8), ranks=(2, 4, 4, 2, 4, 4))
    print(spec)

    spec = tt.TeRASpec.from_shape(*shapes[0], order=6)
    factors = tt.random_factors(spec, seed=0)            # frozen, shared per shape group
    scales = tt.init_scales(spec, "zero_start")          # λ_0 = 0: ΔW is exactly 0 at step 0
    assert not np.any(tt.delta_weight(spec, factors, scales))
    scales = tt.init_scales(spec, "random", seed=1)      # a trained-looking generic point
    x = np.random.default_rng(0).standard_normal((8, spec.d_in))
    y = tt.apply(spec, factors, scales, x)               # ΔW x without forming ΔW (planner's choice)
    dw = tt.delta_weight(spec, factors, scales)
    assert np.allclose(y, x @ dw.T)
    print(f"apply == x ΔWᵀ: max |diff| {np.abs(y - x @ dw.T).max():.2e}; "
          f"rank(ΔW) = {tt.theoretical_rank(spec, scales)} with {spec.num_trainable} trained numbers")
    for n in (8, 4096):
        p = tt.plan(spec, n)
        print(f"n = {n:>5}: {p.strategy} ({p.speedup:.2f}× faster than the alternative by the model)")
    print(tt.plan(spec, 8))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
