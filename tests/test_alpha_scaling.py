"""alpha_scaling="w0_relative": every layer's α is alpha·‖W0‖/‖M‖, so the frozen map has the same
size relative to the weight it adapts in every layer; checkpoints pin the W0 it was computed from."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

from tera_tn.torch import CheckpointMismatch, TeRALayersConfig, TeRALinear, add_tera, load_tera, read_tera_metadata, save_tera, tera_layers  # noqa: E402

DATA = Path(__file__).resolve().parent / "data"


def _model(scale: float = 5.0, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    m = nn.Sequential(nn.Linear(12, 24), nn.ReLU(), nn.Linear(24, 12), nn.ReLU(), nn.Linear(12, 12))
    with torch.no_grad():
        m[2].weight.mul_(scale)  # layers whose weights differ in size
    return m


def _frozen_map(layer) -> np.ndarray:
    """M of a layer, the reference way: ΔW at unit λ and α = 1 from the core library in float64."""
    from tera_tn import delta_weight, random_factors

    spec, bank = layer.spec, layer.tera_bank
    ones = [np.ones(k) for k in spec.scale_sizes]
    return delta_weight(spec, random_factors(spec, bank.seed, init=bank.factor_init), ones, 1.0)


@given(st.floats(0.05, 3.0), st.floats(0.2, 20.0), st.sampled_from(["mode", "rank", "both"]))
def test_every_layer_gets_the_same_frozen_map_size_relative_to_its_weight(alpha, scale, diag):
    m = _model(scale)
    add_tera(m, TeRALayersConfig(alpha=alpha, alpha_scaling="w0_relative", diag=diag, order=2, factor_dtype="float64"))
    for _, layer in tera_layers(m):
        w0 = layer.get_base_layer().weight.double()
        ratio = layer.alpha * np.linalg.norm(_frozen_map(layer)) / float(w0.norm())
        assert ratio == pytest.approx(alpha, rel=1e-9)


def test_delta_is_the_constant_scaling_delta_at_the_layer_alpha():
    m = _model()
    add_tera(m, TeRALayersConfig(alpha=0.5, alpha_scaling="w0_relative", scale_init="random"))
    for _, layer in tera_layers(m):
        plain = TeRALinear(nn.Linear(layer.in_features, layer.out_features), layer.spec, bank=layer.tera_bank,
                           alpha=layer.alpha, scale_init="random")
        with torch.no_grad():
            plain.tera_lambda["default"].copy_(layer.tera_lambda["default"])
        assert torch.equal(plain.delta_weight(torch.float64), layer.delta_weight(torch.float64))
    alphas = [layer.alpha for _, layer in tera_layers(m)]
    assert len(set(alphas)) == 3  # the layers' weights differ, so do their α


def test_golden_delta_of_the_recipe():
    # fixed W0 (seeded), fixed λ: ΔW must never move for adapters saved with this recipe
    with np.load(DATA / "golden_w0_relative.npz") as z:
        m = _model()
        add_tera(m, TeRALayersConfig(alpha=0.5, alpha_scaling="w0_relative", scale_init="random", factor_dtype="float64"))
        for name, layer in tera_layers(m):
            with torch.no_grad():
                layer.tera_lambda["default"].copy_(torch.as_tensor(z[f"{name}|lambda"]))
            got = layer.delta_weight(torch.float64).numpy()
            want = z[f"{name}|delta"]
            # float64 ΔW; α_l is a quotient of two float64 norms, so a few ulps of reduction order
            assert np.abs(got - want).max() <= 1e-12 * np.abs(want).max(), name


def test_torch_checkpoint_round_trips_and_refuses_another_base(tmp_path):
    m = _model()
    add_tera(m, TeRALayersConfig(alpha=0.5, alpha_scaling="w0_relative", scale_init="random"))
    path = save_tera(m, tmp_path / "a.safetensors")
    plain = _model()
    load_tera(plain, path)
    x = torch.randn(3, 12)
    assert torch.equal(plain(x), m(x))
    save_tera(plain, tmp_path / "b.safetensors")  # a reloaded layer pins the same W0 again
    layers = read_tera_metadata(tmp_path / "b.safetensors")["layers"]
    assert all(info["alpha_scaling"] == "w0_relative" and info["w0_norm"] > 0 for info in layers.values())
    other = _model(scale=5.5)
    with pytest.raises(CheckpointMismatch, match=r"layer '2': the adapter's α was set from a base weight of norm"):
        load_tera(other, path)
    assert isinstance(other[2], nn.Linear)  # nothing was changed


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="alpha_scaling must be one of .*'w0_relative'.*got 'relative'"):
        TeRALayersConfig(alpha_scaling="relative")
    zero = nn.Linear(4, 4)
    nn.init.zeros_(zero.weight)
    with pytest.raises(ValueError, match="needs a finite, non-zero base weight"):
        TeRALinear(zero, alpha_scaling="w0_relative")


_PEFT_SCRIPT = r"""
import sys, torch
from torch import nn
import tera_tn.peft
from peft import PeftModel

class Tiny(nn.Module):
    def __init__(self, scale):
        super().__init__()
        torch.manual_seed(0)
        self.up, self.down = nn.Linear(12, 24), nn.Linear(24, 12)
        with torch.no_grad():
            self.down.weight.mul_(scale)
    def forward(self, x):
        return self.down(torch.relu(self.up(x)))

model = PeftModel.from_pretrained(Tiny(float(sys.argv[2])), sys.argv[1])
torch.manual_seed(1)
print(repr(model(torch.randn(2, 12)).sum().item()))
"""


@pytest.mark.slow
def test_peft_adapter_reloads_in_a_fresh_process_and_refuses_another_base(tmp_path):
    pytest.importorskip("peft")
    from peft import get_peft_model

    from tera_tn.peft import TeraAdapterMismatch, TeraConfig, save_adapter

    exec(_PEFT_SCRIPT.split("model = PeftModel")[0], ns := {})
    model = get_peft_model(ns["Tiny"](5.0), TeraConfig(target_modules=["up", "down"], alpha=0.5,
                                                      alpha_scaling="w0_relative", scale_init="random"))
    save_adapter(model, tmp_path / "a")
    assert json.loads((tmp_path / "a" / "adapter_config.json").read_text())["alpha_scaling"] == "w0_relative"
    torch.manual_seed(1)
    want = model(torch.randn(2, 12)).sum().item()
    script = tmp_path / "load.py"
    script.write_text(_PEFT_SCRIPT)
    out = subprocess.run([sys.executable, str(script), str(tmp_path / "a"), "5.0"], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert math.isclose(float(out.stdout.strip().splitlines()[-1]), want, rel_tol=1e-6)
    from peft import PeftModel

    with pytest.raises(TeraAdapterMismatch, match="w0_norm"):
        PeftModel.from_pretrained(ns["Tiny"](5.5), str(tmp_path / "a"))


def test_merge_folds_the_delta_of_the_original_w0_and_unmerge_restores_it():
    # α_l is fixed when the adapter is made: folding ΔW into W0 must not rescale it from the merged
    # weight (that would change ΔW on merge and leave W0 + ΔW - ΔW' on unmerge)
    m = _model()
    add_tera(m, TeRALayersConfig(alpha=0.5, alpha_scaling="w0_relative", scale_init="random"))
    x = torch.randn(5, 12)
    before = m(x)
    originals = {name: layer.get_base_layer().weight.detach().clone() for name, layer in tera_layers(m)}
    alphas = {name: layer.alpha for name, layer in tera_layers(m)}
    for _, layer in tera_layers(m):
        layer.merge()
    torch.testing.assert_close(m(x), before, rtol=1e-5, atol=1e-5)
    for name, layer in tera_layers(m):
        assert layer.alpha == alphas[name]
        layer.unmerge()
        torch.testing.assert_close(layer.get_base_layer().weight, originals[name], rtol=0, atol=1e-6)
