"""Train TeRA adapters with plain PyTorch: recover a hidden full-rank update of a small MLP.

A frozen "base" MLP is given; the target is the same MLP with a random TeRA update on each
Linear (a full-rank ΔW). add_tera adapts a copy of the base, and only the λ vectors (a few dozen
numbers per layer) are trained with AdamW to match the target's outputs. The loss falls far
below its starting value although every ΔW is full rank; then the adapters are merged and saved.

    python examples/train_torch.py             # 256-wide MLP, 300 steps
    python examples/train_torch.py --smoke     # 64-wide, 40 steps
"""

import argparse
import copy
import tempfile
from pathlib import Path

import torch
from torch import nn

from tera_tn.torch import TeRALayersConfig, add_tera, load_tera, merge_and_unload, save_tera, tera_layers


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--width", type=int, default=256)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--lr", type=float, default=3e-2, help="AdamW learning rate of the λ vectors")
    ap.add_argument("--smoke", action="store_true", help="small settings")
    args = ap.parse_args(argv)
    width, steps = (64, 40) if args.smoke else (args.width, args.steps)
    torch.manual_seed(0)
    torch.set_num_threads(1 if args.smoke else torch.get_num_threads())

    base = nn.Sequential(nn.Linear(width, 2 * width), nn.GELU(), nn.Linear(2 * width, width))
    config = TeRALayersConfig(order=4, seed=0)

    # target: the base with a random (trained-looking) TeRA update on every Linear
    target = copy.deepcopy(base)
    add_tera(target, TeRALayersConfig(order=4, seed=0, scale_init="ones"))
    with torch.no_grad():
        for _, layer in tera_layers(target):
            for lam in layer.scales():
                lam.copy_(torch.empty_like(lam).uniform_(0.5, 1.5))
    target.eval()

    model = copy.deepcopy(base)
    summary = add_tera(model, config)
    print(summary)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr)
    losses = []
    for step in range(steps):
        x = torch.randn(64, width)
        with torch.no_grad():
            y = target(x)
        loss = nn.functional.mse_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if step % max(1, steps // 5) == 0 or step == steps - 1:
            print(f"step {step:>4}: loss {loss.item():.3e}")
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    assert last < 0.5 * first, "training did not reduce the loss"
    print(f"trained {sum(p.numel() for p in params)} numbers; loss {first:.3e} -> {last:.3e} (mean of 3 steps)")

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "adapter.safetensors"
        save_tera(model, path)
        print(f"adapter checkpoint: {path.stat().st_size:,} bytes")
        restored = copy.deepcopy(base)
        add_tera(restored, config)
        load_tera(restored, path)
        x = torch.randn(4, width)
        assert torch.allclose(restored(x), model(x), atol=1e-5)
    merged = merge_and_unload(model)
    assert all(isinstance(m, (nn.Linear, nn.GELU, nn.Sequential)) for m in merged.modules())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
