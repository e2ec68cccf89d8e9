"""Regression tests for the layer bugs of the reliability issue, for both adapter APIs.

Each test is named after what it guards: stale inference outputs after ``.data`` writes, models
split across devices (CPU + meta stand in for two devices), quantized base layers, mixed
precision, non-finite λ, and forward inputs of the wrong kind.
"""

from __future__ import annotations

import os

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

from tera_tn import TeRASpec  # noqa: E402
from tera_tn.torch import TeRALayersConfig, TeRALinear, add_tera, merge_and_unload, tera_layers  # noqa: E402

SPEC = TeRASpec((4, 4), (4, 4), d_out=16, d_in=16)


class TwoBlocks(nn.Module):
    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.a = nn.Linear(16, 16)
        self.b = nn.Linear(16, 16)

    def forward(self, x):
        return self.b(self.a(x))


def _torch_model(**cfg):
    model = TwoBlocks()
    add_tera(model, TeRALayersConfig(target_modules=["a", "b"], order=4, scale_init="random", **cfg))
    return model


def _peft_model(**cfg):
    pytest.importorskip("peft")
    from peft import get_peft_model

    from tera_tn.peft import TeraConfig

    return get_peft_model(TwoBlocks(), TeraConfig(target_modules=["a", "b"], order=4, scale_init="random", **cfg))


def _adapted(model, name: str):
    """The adapted layer called ``name`` and a function giving its λ as a list of tensors."""
    inner = model.base_model.model if hasattr(model, "base_model") else model
    layer = getattr(inner, name)
    if isinstance(layer, TeRALinear):
        return layer, lambda: layer.scales()
    return layer, lambda: [layer.tera_lambda["default"]]


def _expected(layer, x):
    """``x (W0 + ΔW)ᵀ + b`` from the layer's current tensors, computed afresh."""
    base = layer.base_layer
    if isinstance(layer, TeRALinear):
        delta = layer.delta_weight()
    else:
        delta = layer.get_delta_weight("default")
    return nn.functional.linear(x, base.weight + delta, base.bias)


API = ["torch", "peft"]


def _model(api, **cfg):
    return _torch_model(**cfg) if api == "torch" else _peft_model(**cfg)


# --- C: stale inference outputs ----------------------------------------------------------------


@pytest.mark.parametrize("api", API)
@pytest.mark.parametrize("what", ["lambda", "base_weight"])
def test_inference_output_follows_in_place_data_writes(api, what):
    model = _model(api).eval()
    layer, lams = _adapted(model, "a")
    x = torch.randn(3, 16)
    with torch.no_grad():
        layer(x)  # would fill a cache
        if what == "lambda":
            for lam in lams():
                lam.data.mul_(3.0).add_(0.5)
        else:
            layer.base_layer.weight.data.add_(10.0)
        torch.testing.assert_close(layer(x), _expected(layer, x), rtol=1e-4, atol=1e-4)


def test_opt_in_delta_cache_is_refreshed_by_clear_cache():
    model = _torch_model(cache_delta=True).eval()
    layer = model.a
    x = torch.randn(3, 16)
    with torch.no_grad():
        layer(x)
        layer.scales()[0].data.add_(1.0)
        layer.clear_cache()
        torch.testing.assert_close(layer(x), _expected(layer, x), rtol=1e-5, atol=1e-5)


# --- D: models split across devices ---------------------------------------------------------------


@pytest.mark.parametrize("api", API)
@pytest.mark.parametrize("strategy", ["materialize", "dense", "factored"])
@pytest.mark.parametrize("when", ["before", "after"])
def test_split_model_layers_use_factors_on_their_own_device(api, strategy, when):
    """Block ``b`` on the second "device" (meta) must not drag block ``a``'s factors with it."""
    ref = _model(api, strategy=strategy)
    if when == "before":
        model = TwoBlocks()
        model.b.to("meta")
        if api == "torch":
            add_tera(model, TeRALayersConfig(target_modules=["a", "b"], order=4, scale_init="random", strategy=strategy))
        else:
            from peft import get_peft_model

            from tera_tn.peft import TeraConfig

            cfg = TeraConfig(target_modules=["a", "b"], order=4, scale_init="random", strategy=strategy)
            model = get_peft_model(model, cfg)
    else:
        model = _model(api, strategy=strategy)
        inner = model.base_model.model if api == "peft" else model
        inner.b.to("meta")
    a, _ = _adapted(model, "a")
    b, _ = _adapted(model, "b")
    a_ref, _ = _adapted(ref, "a")
    x = torch.randn(3, 16, requires_grad=True)
    torch.testing.assert_close(a(x), a_ref(x), rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(a(x), a_ref(x), rtol=1e-5, atol=1e-5)
    y = b(torch.randn(3, 16, device="meta"))
    assert y.device.type == "meta" and y.shape == (3, 16)


def test_moving_a_block_leaves_the_shared_factors_in_place():
    model = _torch_model()
    before = model.a.tera_bank.fingerprint()
    model.b.to("meta")
    assert model.a.tera_bank.fingerprint() == before


# --- G: quantized base layers --------------------------------------------------------------------


def _bnb_layers():
    bnb = pytest.importorskip("bitsandbytes")
    return {"Linear8bitLt": bnb.nn.Linear8bitLt(16, 16, has_fp16_weights=False), "Linear4bit": bnb.nn.Linear4bit(16, 16)}


class _PackedWeight(torch.Tensor):
    """A tensor subclass standing in for a quantizer's packed weight (torchao and the like)."""


def _subclass_linear():
    layer = nn.Linear(16, 16)
    layer.weight = nn.Parameter(layer.weight.detach().as_subclass(_PackedWeight), requires_grad=False)
    return layer


def _int_linear():
    layer = nn.Linear(16, 16)
    layer.weight = nn.Parameter(torch.zeros(16, 16, dtype=torch.int8), requires_grad=False)
    return layer


QUANT = ["Linear8bitLt", "Linear4bit", "tensor-subclass", "int8-weight"]


def _quantized(kind):
    if kind == "tensor-subclass":
        return _subclass_linear()
    if kind == "int8-weight":
        return _int_linear()
    return _bnb_layers()[kind]


@pytest.mark.parametrize("kind", QUANT)
def test_add_tera_refuses_quantized_base_layers(kind):
    model = TwoBlocks()
    model.b = _quantized(kind)
    grads = [p.requires_grad for p in model.parameters()]
    with pytest.raises(TypeError) as info:
        add_tera(model, TeRALayersConfig(target_modules=["a", "b"], order=4))
    msg = str(info.value)
    assert "'b'" in msg and type(model.b).__name__ in msg and "quantized" in msg
    # Refused before anything changed: no layer replaced, nothing frozen.
    assert isinstance(model.a, nn.Linear) and not list(tera_layers(model))
    assert [p.requires_grad for p in model.parameters()] == grads


@pytest.mark.parametrize("kind", QUANT)
def test_peft_refuses_quantized_base_layers(kind):
    pytest.importorskip("peft")
    from peft import get_peft_model

    from tera_tn.peft import TeraConfig

    model = TwoBlocks()
    model.b = _quantized(kind)
    with pytest.raises(TypeError) as info:
        get_peft_model(model, TeraConfig(target_modules=["a", "b"], order=4))
    msg = str(info.value)
    assert "b" in msg and type(model.b).__name__ in msg and "quantized" in msg


def test_tera_linear_refuses_a_quantized_base_layer():
    with pytest.raises(TypeError, match="_PackedWeight"):
        TeRALinear(_subclass_linear(), SPEC)


# --- H: mixed precision ---------------------------------------------------------------------------


def _grads(layer, x, autocast: bool):
    x = x.detach().clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        y = layer(x)
    y.float().pow(2).sum().backward()
    out = [x.grad] + list(layer.tera_lambda["default"].grad.clone().split(layer.spec.scale_sizes))
    layer.zero_grad()
    return y, out


def _close_in_bf16(got, want, tol=3e-2):
    # bf16 keeps 8 significant bits; a few roundings along the chain stay within a few percent.
    err = (got.float() - want.float()).norm() / want.float().norm().clamp_min(1e-12)
    assert err < tol, f"relative error {err:.3g}"


@pytest.mark.parametrize("strategy", ["materialize", "factored", "auto"])
@pytest.mark.parametrize("diag", ["rank", "mode", "identity"])
def test_autocast_bf16_gradients_match_fp32(strategy, diag):
    spec = TeRASpec((4, 4), (4, 2), d_out=14, d_in=8, diag=diag)
    torch.manual_seed(0)
    layer = TeRALinear(nn.Linear(8, 14), spec, scale_init="random", strategy=strategy)
    layer.base_layer.requires_grad_(False)
    x = torch.randn(5, 8)
    y32, g32 = _grads(layer, x, autocast=False)
    y16, g16 = _grads(layer, x, autocast=True)
    assert y16.dtype == torch.bfloat16  # autocast semantics: linear layers compute in bf16
    _close_in_bf16(y16, y32)
    for got, want in zip(g16, g32):
        assert got.dtype == torch.float32
        _close_in_bf16(got, want)


def test_peft_bert_trains_under_autocast_bf16():
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("peft")
    from peft import get_peft_model

    from tera_tn.peft import TeraConfig

    torch.manual_seed(0)
    cfg = transformers.BertConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=32, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )
    model = get_peft_model(
        transformers.BertModel(cfg, add_pooling_layer=False), TeraConfig(target_modules=["query", "value", "dense"], order=4, scale_init="random")
    )
    ids = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(1))
    lams = [p for n, p in model.named_parameters() if p.requires_grad]
    # A fixed random read-out: a plain sum of squares of LayerNorm outputs hardly depends on λ.
    readout = torch.randn(2, 7, 32, generator=torch.Generator().manual_seed(2))
    grads = {}
    for autocast in (False, True):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = model(input_ids=ids).last_hidden_state
        (out.float() * readout).sum().backward()
        grads[autocast] = [p.grad.clone() for p in lams]
        model.zero_grad()
    for got, want in zip(grads[True], grads[False]):
        # A whole transformer block (attention softmax, LayerNorm, GELU) in bf16: ~5 % at most.
        _close_in_bf16(got, want, tol=0.1)


# --- non-finite λ ------------------------------------------------------------------------------------


def test_merge_refuses_non_finite_lambda_and_keeps_the_base_weight():
    model = _torch_model()
    model.b.scales()[1].data[0] = float("nan")
    w_a, w_b = model.a.base_layer.weight.clone(), model.b.base_layer.weight.clone()
    with pytest.raises(ValueError) as info:
        model.b.merge()
    assert "nan" in str(info.value).lower()
    with pytest.raises(ValueError) as info:
        merge_and_unload(model)
    assert "'b'" in str(info.value)
    # Nothing was written: not the broken layer, nor the healthy one merged before it.
    assert not model.b.merged and not model.a.merged and isinstance(model.a, TeRALinear)
    assert torch.equal(model.a.base_layer.weight, w_a) and torch.equal(model.b.base_layer.weight, w_b)


@pytest.mark.parametrize("api", API)
def test_forward_finiteness_check_is_opt_in(api):
    x = torch.randn(3, 16)
    quiet = _model(api)
    _, lams = _adapted(quiet, "a")
    lams()[0].data[0] = float("inf")
    assert not torch.isfinite(quiet(x)).all()  # default: no check, forward keeps its speed
    checked = _model(api, check_finite=True)
    _, lams = _adapted(checked, "a")
    lams()[0].data[0] = float("nan")
    with pytest.raises(FloatingPointError, match="(?i)nan"):
        checked(x)


# --- forward inputs of the wrong kind --------------------------------------------------------------


@pytest.mark.parametrize("api", API)
@pytest.mark.parametrize(
    "bad, exc, needles",
    [
        (lambda: torch.ones(3, 16, dtype=torch.int64), TypeError, ("int64", "floating")),
        (lambda: torch.tensor(1.0), ValueError, ("()", "16")),
        (lambda: np.ones((3, 16), dtype=np.float32), TypeError, ("ndarray", "torch.Tensor")),
        (lambda: torch.ones(3, 15), ValueError, ("15", "16")),
    ],
    ids=["int64", "0-d", "numpy", "wrong-width"],
)
def test_forward_rejects_wrong_inputs_clearly(api, bad, exc, needles):
    layer, _ = _adapted(_model(api), "a")
    with pytest.raises(exc) as info:
        layer(bad())
    for needle in needles:
        assert needle in str(info.value)
