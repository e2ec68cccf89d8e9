"""DistributedDataParallel with TeRA: 2 gloo processes on the CPU.

Each rank builds its model and factors on its own (no broadcast of the factors: they are not
module state, so DDP never sees them), trains a few SGD steps on different data, and the ranks check
that their frozen factors are bit-identical (SHA-256) and their λ identical after training.
Run by pytest; the worker is this file run as a script.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

ROOT = Path(__file__).resolve().parents[1]


def _worker(rank: int, world: int, port: int) -> dict:
    import hashlib

    import torch.distributed as dist
    from torch import nn
    from torch.nn.parallel import DistributedDataParallel as DDP

    sys.path.insert(0, str(ROOT))
    from tera_tn.torch import TeRAConfig, add_tera, tera_layers

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    torch.manual_seed(0)  # same base weights on every rank (DDP would broadcast them anyway)
    model = nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 4))
    add_tera(model, TeRAConfig(target_modules=["0", "2"], order=4, seed=1234, alpha=4.0))
    bank = next(iter(tera_layers(model)))[1].tera_bank
    lam_init = [p.detach().clone() for _, layer in tera_layers(model) for p in layer.tera_lambda]
    digest_before = bank.fingerprint()
    # The factors are no module state, so DDP has nothing of them to broadcast or reduce.
    factor_state = [n for n, _ in [*model.named_buffers(), *model.named_parameters()] if "tera_bank" in n]
    ddp = DDP(model)
    opt = torch.optim.SGD([p for p in ddp.parameters() if p.requires_grad], lr=0.1)
    gen = torch.Generator().manual_seed(100 + rank)  # different data per rank
    losses = []
    for _ in range(4):
        x = torch.randn(8, 16, generator=gen)
        target = torch.randn(8, 4, generator=gen)
        opt.zero_grad()
        loss = (ddp(x) - target).pow(2).mean()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    digest_after = bank.fingerprint()
    mine = torch.tensor(list(bytes.fromhex(digest_before)), dtype=torch.uint8)
    digests = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(digests, mine)
    lam_final = [p.detach().clone() for _, layer in tera_layers(model) for p in layer.tera_lambda]
    lam = torch.cat([p.flatten() for p in lam_final])
    lams = [torch.empty_like(lam) for _ in range(world)]
    dist.all_gather(lams, lam)
    result = {
        "rank": rank,
        "factor_state": factor_state,
        "digest": digest_before,
        "digest_unchanged": digest_after == digest_before,
        "factors_identical": all(d.equal(digests[0]) for d in digests),
        "lambda_identical": all(t.equal(lams[0]) for t in lams),
        # Zero-start sets every λ but one per layer to 1, so "non-zero" holds before any step:
        # each vector λ_n of each layer must have left its initial value.
        "lambda_moved": [not torch.equal(a, b) for a, b in zip(lam_init, lam_final)],
        "lambda_sha": hashlib.sha256(lam.numpy().tobytes()).hexdigest(),
        "losses": losses,
    }
    dist.destroy_process_group()
    return result


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_ddp_two_ranks_share_factors_without_broadcast():
    port = _free_port()
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    procs = [
        subprocess.Popen(
            [sys.executable, __file__, str(rank), "2", str(port)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for rank in range(2)
    ]
    outs = []
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err[-3000:]
        outs.append(json.loads(out.strip().splitlines()[-1]))
    r0, r1 = outs
    assert r0["factor_state"] == [] and r1["factor_state"] == []
    assert r0["digest"] == r1["digest"] and r0["factors_identical"] and r1["factors_identical"]
    assert r0["digest_unchanged"] and r1["digest_unchanged"]
    assert r0["lambda_identical"] and r1["lambda_identical"] and r0["lambda_sha"] == r1["lambda_sha"]
    assert r0["lambda_moved"] and all(r0["lambda_moved"]) and all(r1["lambda_moved"]), (r0["lambda_moved"], r1["lambda_moved"])
    assert r0["losses"] != r1["losses"]  # the ranks really saw different data


if __name__ == "__main__":
    rank, world, port = (int(a) for a in sys.argv[1:4])
    print(json.dumps(_worker(rank, world, port)))
