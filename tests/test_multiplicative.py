"""update="multiplicative": the layer computes (W0 + W0 ⊙ ΔW) x, HiRA's form with TeRA's ΔW.

Specified against the core library's float64 ΔW (no torch code in the reference), with gradients
checked numerically in float64, merge/unmerge against the unmerged W0, both checkpoint formats,
the export to LoRA, and every refusal (mixed batches, the store, w0_relative, packed or zero bases).
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

from tera_tn import TeRASpec, delta_weight, random_factors  # noqa: E402
from tera_tn.torch import (  # noqa: E402
    CheckpointMismatch, TeRALayersConfig, TeRALinear, add_tera, load_tera, read_tera_metadata, save_tera, tera_layers,
)
from tera_tn.torch.autograd import tera_linear  # noqa: E402
from tera_tn.torch.bank import FactorBank  # noqa: E402

from mixed_batches import assert_each_row_served_by_its_adapter  # noqa: E402
from tiny_models import seeded_mlp  # noqa: E402
from tolerance import assert_matches_golden  # noqa: E402

DATA = Path(__file__).resolve().parent / "data"
DIAGS = ("mode", "rank", "both", "identity")


def _core_delta(layer: TeRALinear) -> np.ndarray:
    """The additive ΔW of the layer's λ from the core library in float64 (the reference N)."""
    spec, bank = layer.spec, layer.tera_bank
    lams = [s.detach().double().numpy() for s in layer.scales()]
    return delta_weight(spec, random_factors(spec, bank.seed, init=bank.factor_init), lams, layer.alpha)


@settings(max_examples=20, deadline=None)
@given(st.sampled_from(DIAGS), st.floats(0.1, 50.0), st.integers(0, 3), st.floats(0.2, 5.0))
def test_delta_is_w0_times_the_additive_delta(diag, alpha, seed, scale):
    torch.manual_seed(seed)
    base = nn.Linear(12, 20).double()
    with torch.no_grad():
        base.weight.mul_(scale)
    spec = TeRASpec.from_shape(20, 12, order=3, diag=diag)
    bank = FactorBank(seed, "orthogonal", "float64")  # the reference's factors are float64 too
    layer = TeRALinear(base, spec, bank=bank, update="multiplicative", alpha=alpha, scale_init="random")
    w0 = base.weight.detach().numpy()
    want = w0 * _core_delta(layer)
    got = layer.delta_weight(torch.float64).numpy()
    assert np.abs(got - want).max() <= 1e-12 * max(1e-300, np.abs(want).max())
    x = torch.randn(4, 12, dtype=torch.float64)
    y = layer(x).detach().numpy()
    ref = x.numpy() @ (w0 + want).T + base.bias.detach().numpy()
    assert np.abs(y - ref).max() <= 1e-12 * np.abs(ref).max()


@pytest.mark.parametrize("diag", DIAGS)
@pytest.mark.parametrize("with_base", [True, False])
def test_gradients_of_input_lambda_and_base_weight(diag, with_base):
    torch.manual_seed(1)
    spec = TeRASpec.from_shape(10, 6, order=3, diag=diag)
    layer = TeRALinear(nn.Linear(6, 10), spec, update="multiplicative", alpha=2.0, scale_init="random")
    net = layer.network(torch.float64)
    lams = [s.detach().double().requires_grad_(True) for s in layer.scales()]
    x = torch.randn(5, 6, dtype=torch.float64, requires_grad=True)
    w0 = torch.randn(10, 6, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(10, dtype=torch.float64, requires_grad=True)

    def f(x, w0, bias, *lams):
        return tera_linear(x, w0 if with_base else None, bias, net, lams, 2.0, w0=w0)

    assert torch.autograd.gradcheck(f, (x, w0, bias, *lams))


def test_dropout_path_matches_the_fused_path():
    torch.manual_seed(2)
    base = nn.Linear(12, 20)
    fused = TeRALinear(base, update="multiplicative", alpha=4.0, scale_init="random")
    # dropout p > 0 in eval mode is the identity but takes the base-plus-delta path
    split = TeRALinear(copy.deepcopy(base), update="multiplicative", alpha=4.0, scale_init="random", dropout=0.5).eval()
    with torch.no_grad():
        split.tera_lambda["default"].copy_(fused.tera_lambda["default"])
    x = torch.randn(3, 12)
    torch.testing.assert_close(split(x), fused(x), rtol=1e-5, atol=1e-6)


def test_merge_and_unmerge_use_the_unmerged_weight():
    pytest.importorskip("peft")
    from peft import get_peft_model

    from tera_tn.peft import TeraConfig

    model = get_peft_model(seeded_mlp(), TeraConfig(target_modules=["0", "2"], update="multiplicative", alpha=8.0,
                                                scale_init="random"), adapter_name="a")
    model.add_adapter("b", TeraConfig(target_modules=["0", "2"], update="multiplicative", alpha=3.0, seed=5,
                                      scale_init="random"))
    layer = model.base_model.model[2]
    w0 = layer.get_base_layer().weight.detach().clone()
    da, db = layer.get_delta_weight("a"), layer.get_delta_weight("b")
    layer.merge(adapter_names=["a", "b"])
    # each ΔW multiplies the unmerged W0, whatever was merged before it
    torch.testing.assert_close(layer.get_base_layer().weight, w0 + da + db, rtol=0, atol=1e-6)
    torch.testing.assert_close(layer.get_delta_weight("b"), db, rtol=0, atol=0)
    layer.unmerge()
    assert torch.equal(layer.get_base_layer().weight, w0)  # restored exactly
    assert layer._tera_unmerged_w0 is None


def test_torch_checkpoint_round_trips_and_pins_the_base(tmp_path):
    m = seeded_mlp()
    add_tera(m, TeRALayersConfig(update="multiplicative", alpha=16.0, scale_init="random"))
    path = save_tera(m, tmp_path / "a.safetensors")
    layers = read_tera_metadata(path)["layers"]
    assert all(e["update"] == "multiplicative" and e["w0_norm"] > 0 for e in layers.values())
    plain = seeded_mlp()
    load_tera(plain, path)
    x = torch.randn(3, 12)
    assert torch.equal(plain(x), m(x))
    other = seeded_mlp(scale=1.1)
    with pytest.raises(CheckpointMismatch, match=r"layer '2': the adapter's ΔW multiplies a base weight of norm"):
        load_tera(other, path)
    assert isinstance(other[2], nn.Linear)
    additive = seeded_mlp()
    add_tera(additive, TeRALayersConfig(alpha=16.0))
    with pytest.raises(CheckpointMismatch, match="update"):
        load_tera(additive, path)


def test_peft_adapter_round_trips_and_refuses_another_base(tmp_path):
    pytest.importorskip("peft")
    from peft import PeftModel, get_peft_model

    from tera_tn.peft import TeraAdapterMismatch, TeraConfig, save_adapter

    model = get_peft_model(seeded_mlp(), TeraConfig(target_modules=["0", "2"], update="multiplicative", alpha=16.0,
                                                scale_init="random"))
    save_adapter(model, tmp_path / "a")
    x = torch.randn(3, 12)
    loaded = PeftModel.from_pretrained(seeded_mlp(), str(tmp_path / "a"))
    assert torch.equal(loaded(x), model(x))
    assert loaded.peft_config["default"].update == "multiplicative"
    with pytest.raises(TeraAdapterMismatch, match="w0_norm"):
        PeftModel.from_pretrained(seeded_mlp(scale=1.1), str(tmp_path / "a"))
    # the same file loads through the plain-torch API, and keeps its outputs
    plain = seeded_mlp()
    load_tera(plain, tmp_path / "a")
    assert torch.equal(plain(x), model(x))


def test_exact_export_to_lora(tmp_path):
    pytest.importorskip("peft")
    from peft import PeftModel, get_peft_model

    from tera_tn.peft import TeraConfig, export_lora

    model = get_peft_model(seeded_mlp(), TeraConfig(target_modules=["0", "2"], update="multiplicative", alpha=16.0,
                                                scale_init="random"))
    x = torch.randn(4, 12)
    report = export_lora(model, tmp_path / "lora", rank_set=None, check_inputs=x)
    assert report.update_error <= 1e-5
    lora = PeftModel.from_pretrained(seeded_mlp(), str(tmp_path / "lora"))
    torch.testing.assert_close(lora(x), model(x), rtol=1e-4, atol=1e-5)


def test_golden_delta_of_the_recipe():
    # fixed W0 (seeded), fixed λ: ΔW must never move for adapters saved with this update form
    with np.load(DATA / "golden_multiplicative.npz") as z:
        m = seeded_mlp()
        add_tera(m, TeRALayersConfig(update="multiplicative", alpha=16.0, factor_dtype="float64"))
        for name, layer in tera_layers(m):
            with torch.no_grad():
                layer.tera_lambda["default"].copy_(torch.as_tensor(z[f"{name}|lambda"]))
            got = layer.delta_weight(torch.float64).numpy()
            assert_matches_golden(got, z[f"{name}|delta"], "float64", reduction=layer.spec.d_out * layer.spec.d_in, what=name)


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="update must be one of .*'multiplicative'.*got 'hadamard'"):
        TeRALayersConfig(update="hadamard")
    with pytest.raises(ValueError, match="update='multiplicative' takes alpha_scaling='constant'"):
        TeRALayersConfig(update="multiplicative", alpha_scaling="w0_relative")
    zero = nn.Linear(4, 4)
    nn.init.zeros_(zero.weight)
    with pytest.raises(ValueError, match="update='multiplicative' needs a finite, non-zero base weight"):
        TeRALinear(zero, update="multiplicative")
    layer = TeRALinear(nn.Linear(12, 20), update="multiplicative")
    with pytest.raises(ValueError, match="multiplicative.*row_lambdas batches share one factored chain"):
        layer(torch.randn(2, 12), row_lambdas=torch.zeros(2, layer.spec.num_trainable))


def test_mixed_batches_serve_each_row_its_adapter():
    pytest.importorskip("peft")
    from peft import get_peft_model

    from tera_tn.peft import TeraConfig

    kw = dict(target_modules=["0", "2"], scale_init="random")
    model = get_peft_model(seeded_mlp(), TeraConfig(update="multiplicative", alpha=16.0, **kw), adapter_name="m")
    model.add_adapter("n", TeraConfig(update="multiplicative", alpha=4.0, seed=3, **kw))
    model.add_adapter("a", TeraConfig(alpha=2.0, **kw))  # additive, same bank and spec as "m"
    model.eval()
    x = torch.randn(5, 12)
    names = ["m", "a", "__base__", "n", "m"]
    assert_each_row_served_by_its_adapter(model, x, names)


def test_store_and_late_adapters_are_refused(tmp_path):
    pytest.importorskip("peft")
    from peft import get_peft_model

    from tera_tn.peft import AdapterStore, TeraConfig, save_adapter

    config = TeraConfig(target_modules=["0", "2"], update="multiplicative", alpha=16.0, scale_init="random")
    model = get_peft_model(seeded_mlp(), config)
    additive = get_peft_model(seeded_mlp(), TeraConfig(target_modules=["0", "2"], alpha=16.0))
    save_adapter(model, tmp_path / "m")
    store = AdapterStore(additive)
    with pytest.raises(ValueError, match="the store serves the plain network only"):
        store.add("m", path=tmp_path / "m")
    additive.merge_adapter()
    with pytest.raises(ValueError, match="cannot add an adapter with update=.multiplicative. while"):
        additive.add_adapter("late", config)
