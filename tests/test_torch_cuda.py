"""CUDA checks: run on a machine with a GPU, skipped otherwise (no GPU in the CPU-only CI)."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

from tera_tn import TeRASpec  # noqa: E402
from tera_tn.torch.autograd import FrozenNetwork  # noqa: E402
from tera_tn.torch import TeRALayersConfig, TeRALinear, add_tera, merge_and_unload, tera_layers  # noqa: E402
from tera_tn.torch.autograd import tera_linear

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def test_bank_moves_once_and_layers_share_storage_on_cuda():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64))
    add_tera(model, TeRALayersConfig(order=4, scale_init="random"))
    cpu_out = model(torch.randn(3, 64, generator=torch.Generator().manual_seed(1)))
    model.cuda()
    (_, a), (_, b) = list(tera_layers(model))
    assert a.tera_bank is b.tera_bank and a.network().core.is_cuda
    assert a.network().core.data_ptr() == b.network().core.data_ptr()
    assert all(lam.is_cuda and lam.dtype == torch.float32 for lam in a.tera_lambda.values())
    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(1)).cuda()
    torch.testing.assert_close(model(x).cpu(), cpu_out, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("strategy", ["materialize", "dense", "factored"])
def test_gradcheck_on_cuda(strategy):
    spec = TeRASpec((2, 3), (3, 2), d_out=5, d_in=4)
    from tera_tn import random_factors

    f = random_factors(spec, 0).as_torch(torch.float64, device="cuda")
    net = FrozenNetwork(spec, f.core, f.factors)
    lams = [torch.rand(s, dtype=torch.float64, device="cuda", requires_grad=True) + 0.5 for s in spec.scale_sizes]
    lams = [lam.detach().requires_grad_() for lam in lams]
    x = torch.randn(3, 4, dtype=torch.float64, device="cuda", requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, *l: tera_linear(x, None, None, net, l, 0.7, strategy), (x, *lams))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_training_step_and_merge_on_cuda(dtype):
    torch.manual_seed(0)
    layer = TeRALinear(nn.Linear(256, 256), TeRASpec.from_shape(256, 256, order=4), scale_init="random").cuda().to(dtype)
    layer.base_layer.requires_grad_(False)
    x = torch.randn(32, 256, device="cuda", dtype=dtype, requires_grad=True)
    y = layer(x)
    assert y.dtype == dtype
    y.float().pow(2).mean().backward()
    assert x.grad is not None and all(lam.grad.dtype == torch.float32 for lam in layer.tera_lambda.values())
    with torch.no_grad():
        ref = layer(x)
        plain = merge_and_unload(nn.Sequential(layer))
        tol = 1e-4 if dtype == torch.float32 else 5e-2
        torch.testing.assert_close(plain(x), ref, rtol=tol, atol=tol)


@pytest.mark.parametrize("strategy", ["materialize", "factored", "auto"])
@pytest.mark.parametrize("diag", ["rank", "mode", "identity"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_gradients_match_fp32_on_cuda(strategy, diag, dtype):
    spec = TeRASpec((4, 4), (4, 2), d_out=14, d_in=8, diag=diag)
    torch.manual_seed(0)
    layer = TeRALinear(nn.Linear(8, 14), spec, scale_init="random", strategy=strategy).cuda()
    layer.base_layer.requires_grad_(False)
    x0 = torch.randn(5, 8, device="cuda")
    grads = {}
    for autocast in (False, True):
        x = x0.clone().requires_grad_()
        with torch.autocast("cuda", dtype=dtype, enabled=autocast):
            y = layer(x)
            # backward inside the autocast region too: the Function must not mix dtypes there
            y.float().pow(2).sum().backward()
        assert y.dtype == (dtype if autocast else torch.float32)
        grads[autocast] = [x.grad] + list(layer.tera_lambda["default"].grad.clone().split(layer.spec.scale_sizes))
        layer.zero_grad()
    for got, want in zip(grads[True], grads[False]):
        assert got.dtype == torch.float32
        err = (got - want).norm() / want.norm().clamp_min(1e-12)
        assert err < 3e-2, f"relative error {err:.3g}"


def test_split_model_across_cpu_and_cuda_uses_factors_on_each_device():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 32), nn.Linear(32, 32))
    ref = nn.Sequential(nn.Linear(32, 32), nn.Linear(32, 32))
    ref.load_state_dict(model.state_dict())
    cfg = TeRALayersConfig(order=4, scale_init="random")
    add_tera(ref, cfg)
    model[1].cuda()
    add_tera(model, cfg)
    for layer, lam in zip(model, ref):
        layer.load_state_dict(lam.state_dict())
    x = torch.randn(3, 32)
    h = model[0](x)
    torch.testing.assert_close(h, ref[0](x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(model[1](h.cuda()).cpu(), ref[1](h), rtol=1e-4, atol=1e-4)
