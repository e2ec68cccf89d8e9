"""TeRA through PEFT on quantized bases: bitsandbytes 8-bit / 4-bit and torchao int8 weight-only (CPU).

Each quantized model is the float model with its Linear layers swapped for quantized ones
holding the same weights, so the two can be compared layer by layer.
"""

from __future__ import annotations

import json
import sys

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")
from peft import get_peft_model  # noqa: E402
from torch import nn  # noqa: E402

from tera_tn.peft import TeraConfig  # noqa: E402
from tera_tn.peft.quantized import QuantizedLinear  # noqa: E402

KINDS = ["bnb-8bit", "bnb-4bit", "torchao-int8"]


class Net(nn.Module):
    def __init__(self, d: int = 64, layers: int = 2) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(nn.Linear(d, d) for _ in range(layers))
        self.head = nn.Linear(d, 8)

    def forward(self, x):
        for block in self.blocks:
            x = torch.tanh(block(x))
        return self.head(x)


def quantize(linear: nn.Linear, kind: str) -> nn.Module:
    """A quantized copy of ``linear`` (same weights), as loaders like transformers' build them."""
    if kind == "torchao-int8":
        pytest.importorskip("torchao")
        from torchao.quantization import Int8WeightOnlyConfig, quantize_

        q = nn.Linear(linear.in_features, linear.out_features)
        q.load_state_dict(linear.state_dict())
        quantize_(q, Int8WeightOnlyConfig())
        return q
    bnb = pytest.importorskip("bitsandbytes")
    if kind == "bnb-8bit":
        q = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, has_fp16_weights=False)
    else:
        q = bnb.nn.Linear4bit(linear.in_features, linear.out_features, compute_dtype=torch.float32)
    q.load_state_dict(linear.state_dict())
    return q.to("cpu")  # bitsandbytes quantizes on the move to the device


def models(kind: str, **cfg):
    """(float PEFT model, quantized PEFT model, quantized base before PEFT) with the same weights and λ."""
    torch.manual_seed(0)
    fp = Net()
    q = Net()
    q.load_state_dict(fp.state_dict())
    for i, block in enumerate(fp.blocks):
        q.blocks[i] = quantize(block, kind)
    config = dict(target_modules=["blocks.0", "blocks.1"], order=3, seed=4)
    config.update(cfg)
    base_q = [m for m in q.blocks]
    return get_peft_model(fp, TeraConfig(**config)), get_peft_model(q, TeraConfig(**config)), base_q


def _adapted(model):
    return [m for m in model.modules() if hasattr(m, "tera_lambda") and "default" in m.tera_lambda]


@pytest.mark.parametrize("kind", KINDS)
def test_zero_start_output_is_the_quantized_base(kind):
    torch.manual_seed(1)
    x = torch.randn(5, 64)
    _, q, _ = models(kind)
    with q.disable_adapter():
        base = q(x)
    layers = _adapted(q)
    assert len(layers) == 2 and all(isinstance(m, QuantizedLinear) and m.quantization == kind for m in layers)
    assert torch.equal(q(x), base)


@pytest.mark.parametrize("kind", KINDS)
def test_layers_match_float_within_the_quantization_error(kind):
    """Same λ: the quantized layer differs from the float one exactly by base_q(x) − base_f(x)."""
    fp, q, _ = models(kind, scale_init="random")
    x = torch.randn(7, 64, generator=torch.Generator().manual_seed(2))
    for lf, lq in zip(_adapted(fp), _adapted(q)):
        assert torch.equal(lf.tera_lambda["default"], lq.tera_lambda["default"])
        with torch.no_grad():
            quant_error = lq.get_base_layer()(x) - lf.get_base_layer()(x)
            diff = lq(x) - lf(x)
        assert quant_error.abs().max() > 0  # really quantized
        torch.testing.assert_close(diff, quant_error, rtol=0, atol=2e-5)


def _train(model, steps=8):
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable and all(p.dtype == torch.float32 and p.ndim == 1 for p in trainable)
    gen = torch.Generator().manual_seed(3)
    x, y = torch.randn(32, 64, generator=gen), torch.randn(32, 8, generator=gen)
    opt = torch.optim.Adam(trainable, lr=0.1)
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = (model(x) - y).pow(2).mean()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("kind", KINDS)
def test_training_moves_only_lambda_and_lowers_the_loss(kind):
    fp, q, bases = models(kind)
    packed = [b.weight.detach().clone() if kind != "torchao-int8" else b.weight.dequantize().clone() for b in bases]
    losses, float_losses = _train(q), _train(fp)
    assert all(b < a for a, b in zip(losses, losses[1:])) and losses[-1] < 0.95 * losses[0], losses
    # The same run on the float model: the two curves differ by the quantization error only.
    drop, float_drop = losses[0] - losses[-1], float_losses[0] - float_losses[-1]
    assert abs(drop - float_drop) < 0.25 * float_drop, (losses, float_losses)
    after = [b.weight.detach() if kind != "torchao-int8" else b.weight.dequantize() for b in bases]
    assert all(torch.equal(a, b) for a, b in zip(packed, after))


@pytest.mark.parametrize("kind", KINDS)
def test_merge_requantizes_and_states_the_error(kind):
    _, q, _ = models(kind, scale_init="random", alpha=0.5)
    x = torch.randn(6, 64, generator=torch.Generator().manual_seed(4))
    layer = _adapted(q)[0]
    with torch.no_grad():
        before = layer(x)
        with pytest.warns(UserWarning, match=r"re-quantized W0 \+ ΔW: max abs rounding error"):
            layer.merge()
        assert layer.merged and type(layer.get_base_layer().weight).__name__ != "Tensor"
        error = layer.merge_errors["default"]
        merged = layer(x)
        # Each output differs by at most Σ_j |rounding_ij| |x_j| ≤ error · ‖x‖₁.
        bound = error * x.abs().sum(dim=1, keepdim=True) + 1e-4
        assert 0 < error and ((merged - before).abs() <= bound).all()
        with pytest.warns(UserWarning, match="unmerging"):
            layer.unmerge()
        assert not layer.merged
        assert ((layer(x) - before).abs() <= 2 * bound + 1e-4).all()


# --- peak memory of a 4-bit base with TeRA vs LoRA ----------------------------------------------
# A measurement, not a test (peak RSS depends on the machine and its load); docs/distributed.md
# gives the figures: `python tests/test_quantized.py tera` and `... lora`, one process each.


def _status_mib(field: str) -> float:
    with open("/proc/self/status") as f:
        line = next(line for line in f if line.startswith(field + ":"))
    return int(line.split()[1]) / 1024


def _peak_memory(method: str, d: int = 1024, n: int = 4) -> dict:
    """MiB: RSS of the built 4-bit model, and the peak RSS of three Adam steps with the adapter.

    The kernel's peak counter (VmHWM) is reset after the build (``clear_refs`` 5), so the peak is
    the training's own, not the float weights' transient during quantization.
    """
    import gc

    from peft import LoraConfig

    torch.set_num_threads(1)
    model = Net(d=64, layers=0)
    model.blocks = nn.ModuleList(quantize(nn.Linear(d, d), "bnb-4bit") for _ in range(n))
    model.head = nn.Linear(d, 8)
    targets = [f"blocks.{i}" for i in range(n)]
    config = TeraConfig(target_modules=targets, order=4) if method == "tera" else LoraConfig(r=8, target_modules=targets)
    model = get_peft_model(model, config)
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(trainable, lr=1e-3)
    x = torch.randn(16, d)
    gc.collect()
    built = _status_mib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    for _ in range(3):
        opt.zero_grad()
        model(x).pow(2).mean().backward()
        opt.step()
    return {"built": built, "peak": _status_mib("VmHWM"), "trainable": sum(p.numel() for p in trainable)}


if __name__ == "__main__":
    print(json.dumps(_peak_memory(sys.argv[1])))
