"""Measures the float32 conditioning gap quoted in docs/rank-analysis.md (dense float32 numerical rank of a
full-rank order-6 4096×4096 ΔW, Gaussian vs orthogonal factors) and the structured conditioning report.
Slow: two dense 4096² SVDs plus two structured ones at full rank (≈ 2 min idle, 2 cores)."""
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tera_tn import TeRASpec, delta_weight, init_scales, random_factors  # noqa: E402
from tera_tn.analysis.rank import numerical_rank  # noqa: E402
from tera_tn.analysis.spectrum import tera_conditioning  # noqa: E402

spec = TeRASpec.from_shape(4096, 4096, order=6, diag="rank")
out = {}
for init in ("gaussian", "orthogonal"):
    f = random_factors(spec, 0, init=init); s = init_scales(spec, "random", seed=1)
    dw32 = delta_weight(spec, f.as_torch(torch.float32), [torch.as_tensor(x, dtype=torch.float32) for x in s])
    t=time.time(); r32 = numerical_rank(dw32); t32=time.time()-t
    rep = tera_conditioning(spec, f, s)
    out[init] = dict(dense_fp32_numerical_rank=r32, secs=t32, **rep.to_dict())
    print(init, r32, rep, flush=True)
print(json.dumps(out, indent=1, default=str))
