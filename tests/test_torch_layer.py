"""TeRALinear: exactness against the core, zero start, the inference cache, merge, dtypes, sharing."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

from tera_tn import TeRASpec, apply, random_factors  # noqa: E402
from tera_tn.torch import TeRALinear  # noqa: E402
from tera_tn.torch.bank import FactorBank

SPEC = TeRASpec((4, 4), (2, 4), d_out=14, d_in=8)  # padded rows
SPECS = [SPEC, TeRASpec((4, 4), (2, 4), ranks=(2, 3, 2, 2)), TeRASpec((4, 4), (2, 4), diag="mode"), TeRASpec((4, 4), (2, 4), diag="identity")]


def _layer(spec=SPEC, **kw):
    torch.manual_seed(0)
    return TeRALinear(nn.Linear(spec.d_in, spec.d_out), spec, seed=5, **kw)


@pytest.mark.parametrize("strategy", ["auto", "materialize", "factored"])
@pytest.mark.parametrize("spec", SPECS, ids=str)
def test_output_is_base_plus_core_apply(spec, strategy):
    layer = _layer(spec, alpha=0.5, scale_init="random", strategy=strategy)
    x = torch.randn(3, 2, spec.d_in)
    lams = [lam.detach().double() for lam in layer.scales()]
    ref = layer.base_layer(x).double() + apply(spec, random_factors(spec, 5), lams, x.double(), alpha=0.5)
    torch.testing.assert_close(layer(x).double(), ref, rtol=1e-4, atol=1e-4)
    with torch.no_grad():
        torch.testing.assert_close(layer(x).double(), ref, rtol=1e-4, atol=1e-4)


def test_zero_start_equals_base_and_has_gradients():
    layer = _layer()
    layer.base_layer.requires_grad_(False)
    x = torch.randn(5, SPEC.d_in)
    y = layer(x)
    torch.testing.assert_close(y, layer.base_layer(x), rtol=0, atol=0)
    y.pow(2).sum().backward()
    grads = layer.tera_lambda["default"].grad.split(layer.spec.scale_sizes)
    assert grads[0].abs().sum() > 0


def test_opt_in_inference_cache_invalidated_by_inplace_optimizer_step():
    layer = _layer(scale_init="random", cache_delta=True)
    x = torch.randn(4, SPEC.d_in)
    layer.eval()
    with torch.no_grad():
        y1 = layer(x)
        cached = layer._tera_cache["default"][1]
        assert layer(x).equal(y1) and layer._tera_cache["default"][1] is cached  # reused, not recontracted
    opt = torch.optim.SGD(layer.tera_lambda.parameters(), lr=0.1)
    layer.train()
    layer(x).sum().backward()
    opt.step()  # in place: bumps λ's version counter
    layer.eval()
    with torch.no_grad():
        y2 = layer(x)
    assert layer._tera_cache["default"][1] is not cached
    expected = layer.base_layer(x) + x @ layer.delta_weight().T
    torch.testing.assert_close(y2, expected, rtol=1e-5, atol=1e-5)
    assert not y2.allclose(y1)
    with torch.no_grad():
        layer.scales()[1].mul_(2.0)  # any in-place edit
        torch.testing.assert_close(layer(x), layer.base_layer(x) + x @ layer.delta_weight().T, rtol=1e-5, atol=1e-5)
    layer.cache_delta = False
    with torch.no_grad():
        layer(x)
    assert not layer._tera_cache


def test_merge_unmerge_round_trip():
    layer = _layer(scale_init="random")
    w0 = layer.base_layer.weight.detach().clone()
    x = torch.randn(6, SPEC.d_in)
    with torch.no_grad():
        y = layer(x)
        layer.merge()
        assert layer.merged
        torch.testing.assert_close(layer(x), y, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(layer.base_layer(x), y, rtol=1e-5, atol=1e-5)
        with pytest.raises(RuntimeError, match="already merged"):
            layer.merge()
        layer.unmerge()
    torch.testing.assert_close(layer.base_layer.weight, w0, rtol=0, atol=1e-6)
    with pytest.raises(RuntimeError, match="not merged"):
        layer.unmerge()


def test_bf16_input_computes_in_bf16_with_fp32_lambda():
    layer = _layer(scale_init="random").to(torch.bfloat16)
    assert layer.tera_lambda["default"].dtype == torch.float32  # model.to(dtype) keeps λ fp32
    assert layer.network().core.dtype == torch.float32  # and the factors' storage
    x = torch.randn(4, SPEC.d_in, dtype=torch.bfloat16)
    y = layer(x)
    assert y.dtype == torch.bfloat16
    ref = layer.base_layer.float()(x.float()) + x.float() @ layer.delta_weight(torch.float32).T
    torch.testing.assert_close(y.float(), ref, rtol=5e-2, atol=5e-2)
    y.float().sum().backward()
    assert layer.tera_lambda["default"].grad.dtype == torch.float32


def test_shared_bank_storage_and_move():
    bank = FactorBank(seed=3)
    torch.manual_seed(0)
    a = TeRALinear(nn.Linear(8, 16), SPEC.__class__((4, 4), (2, 4)), bank=bank)
    b = TeRALinear(nn.Linear(8, 16), SPEC.__class__((4, 4), (2, 4)), bank=bank)
    model = nn.Sequential(a, nn.ReLU(), b)
    assert a.network().core.data_ptr() == b.network().core.data_ptr()
    assert len(bank.specs()) == 1
    gen = bank.generation
    model.to(torch.device("cpu"))  # same device: nothing moves
    assert bank.generation == gen
    model.to(torch.float64)
    assert a.network().core.dtype == torch.float32 and a.network().core.data_ptr() == b.network().core.data_ptr()
    assert a.network(torch.float64) is b.network(torch.float64)  # one cast per bank, shared
    # Non-persistent: the factors are not in the state dict.
    assert not any("tera_bank" in k for k in model.state_dict())
    with pytest.raises(ValueError, match="seed=4 differs"):
        TeRALinear(nn.Linear(8, 16), bank=bank, seed=4)


def test_dropout_applies_to_adapter_only():
    layer = _layer(scale_init="random", dropout=0.5)
    x = torch.randn(64, SPEC.d_in)
    layer.eval()
    with torch.no_grad():
        y_eval = layer(x)
    torch.testing.assert_close(y_eval, layer.base_layer(x) + x @ layer.delta_weight().T, rtol=1e-5, atol=1e-5)
    layer.train()
    torch.manual_seed(1)
    y = layer(x)
    y.sum().backward()
    assert layer.tera_lambda["default"].grad is not None


def test_construction_errors_name_the_value():
    with pytest.raises(ValueError, match="Linear is 16×8"):
        TeRALinear(nn.Linear(8, 16), TeRASpec((4, 4), (4, 4)))
    with pytest.raises(ValueError, match="nn.Linear, got Conv1d"):
        TeRALinear(nn.Conv1d(2, 2, 1))
    with pytest.raises(ValueError, match="strategy"):
        TeRALinear(nn.Linear(8, 16), strategy="einsum")
    with pytest.raises(ValueError, match="dropout"):
        TeRALinear(nn.Linear(8, 16), dropout=1.5)
    layer = TeRALinear(nn.Linear(8, 16))
    with pytest.raises(ValueError, match=r"expects input of shape \(\.\.\., 8\), got shape \(2, 7\)"):
        layer(torch.randn(2, 7))


def test_state_dict_with_one_lambda_per_mode_still_loads():
    """Full-model state dicts saved when TeRALinear kept λ per mode load into the one-vector layout."""
    layer = _layer(scale_init="random")
    old = {k: v for k, v in layer.state_dict().items() if not k.startswith("tera_lambda")}
    for n, lam in enumerate(layer.scales()):
        old[f"tera_lambda.{n}"] = lam.detach().clone() + 1.0
    fresh = _layer()
    fresh.load_state_dict(old)
    torch.testing.assert_close(fresh.tera_lambda["default"], layer.tera_lambda["default"].detach() + 1.0)


def test_standalone_teralinear_freezes_its_base():
    # A TeRALinear built by hand (not through add_tera) used to leave W0 and b trainable: at 768×768
    # an optimizer over layer.parameters() trained 590,592 base numbers next to λ.
    torch.manual_seed(0)
    layer = TeRALinear(nn.Linear(768, 768), scale_init="random")
    trainable = {name: p.numel() for name, p in layer.named_parameters() if p.requires_grad}
    assert trainable == {"tera_lambda.default": layer.spec.num_trainable}
    assert not layer.base_layer.weight.requires_grad and not layer.base_layer.bias.requires_grad
    layer(torch.randn(2, 768)).square().sum().backward()
    assert layer.base_layer.weight.grad is None and layer.base_layer.bias.grad is None
    assert layer.tera_lambda["default"].grad.abs().sum() > 0
    # Training W0 as well stays possible, by asking for it after construction.
    layer.base_layer.requires_grad_(True)
    layer(torch.randn(2, 768)).sum().backward()
    assert layer.base_layer.weight.grad is not None


@pytest.mark.parametrize("diag", ["mode", "rank", "both", "identity"])
def test_delta_bound_covers_every_entry_of_delta_weight(diag):
    # The bound that refuses absurd λ on load must never refuse a ΔW it underestimates.
    from tera_tn.torch.checkpoint import delta_bound

    spec = TeRASpec((4, 4), (2, 4), diag=diag)
    for seed in range(3):
        layer = _layer(spec, scale_init="random", alpha=-1.5)
        with torch.no_grad():
            layer.tera_lambda["default"].normal_(generator=torch.Generator().manual_seed(seed))
        bound = delta_bound(spec, layer.tera_bank, layer.tera_lambda["default"], layer.alpha)
        peak = float(layer.delta_weight(torch.float64).abs().max())
        assert peak <= bound * (1 + 1e-6)
        if diag in ("mode", "identity"):  # exact in shape there: within the λ's spread
            assert bound < 1e3 * peak
