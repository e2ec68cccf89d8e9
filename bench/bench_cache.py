"""Cached vs uncached no-grad forward of a TeRALinear (order 6, full ranks, rank-side diagonals: the
spec the published figures were measured on).

    python -m bench.bench_cache

Prints, for d in {768, 1024} and n in {1, 64} tokens, the median call time of a layer with
``cache_delta=True``, one without, and a plain ``nn.Linear``, as ratios from one run (contenders
alternate in rounds so machine noise hits all of them). The figures in docs/torch.md come from it.
"""
import statistics, time
import torch
from torch import nn
from tera_tn import TeRASpec
from tera_tn.torch import TeRALinear

torch.manual_seed(0)
def med(fn, reps):
    ts = []
    for _ in range(reps):
        t = time.perf_counter(); fn(); ts.append(time.perf_counter() - t)
    return statistics.median(ts)

print("threads", torch.get_num_threads())
for d in (768, 1024):
    spec = TeRASpec.from_shape(d, d, order=6, diag="rank")
    base = nn.Linear(d, d)
    lin = nn.Linear(d, d); lin.load_state_dict(base.state_dict())
    cached = TeRALinear(base, spec, scale_init="random", cache_delta=True).eval()
    plain = TeRALinear(nn.Linear(d, d), spec, scale_init="random", cache_delta=False).eval()
    plain.load_state_dict(cached.state_dict())
    for n in (1, 64):
        x = torch.randn(n, d)
        with torch.no_grad():
            for f in (cached, plain, lin):
                for _ in range(5): f(x)
            reps = 200 if n == 1 else 100
            tc, tu, tl = [], [], []
            for _ in range(5):  # alternate contenders so load swings hit all of them
                tc.append(med(lambda: cached(x), reps)); tu.append(med(lambda: plain(x), reps)); tl.append(med(lambda: lin(x), reps))
            c, u, l = min(tc), min(tu), min(tl)
        print(f"d={d} n={n}: cached {c*1e6:.0f} us, uncached {u*1e6:.0f} us, nn.Linear {l*1e6:.0f} us; "
              f"uncached/cached {u/c:.2f}x, cached/Linear {c/l:.2f}x, uncached/Linear {u/l:.2f}x; "
              f"cache {d*d*4/2**20:.2f} MiB/layer (fp32)")
