"""The plain-torch layer and the PEFT layer are one implementation.

For the same base weights, spec, seed, α and λ, :class:`tera_tn.torch.TeRALinear` and
:class:`tera_tn.peft.layer.Linear` give the same outputs, input and λ gradients, ΔW and merged weights,
for every diag placement and strategy; both keep λ in the same layout (one fp32 vector per
adapter), and both checkpoint formats are checked by the same mismatch checker.
"""

from __future__ import annotations

import copy
import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

torch = pytest.importorskip("torch")
pytest.importorskip("peft")
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from torch import nn  # noqa: E402

from tera_tn.peft import TeraConfig  # noqa: E402
from tera_tn.peft.layer import Linear as PeftLinear  # noqa: E402
from tera_tn.peft.model import signature_diff  # noqa: E402
from tera_tn.torch import TeRALinear  # noqa: E402
from tera_tn.torch.bank import FactorBank
from tera_tn.torch.adapter import TeRAAdapters  # noqa: E402
from tera_tn.torch.checkpoint import adapter_diff  # noqa: E402

from strategies import alphas, specs  # noqa: E402


def _pair(spec, seed: int, alpha: float, strategy: str, lam: torch.Tensor):
    torch.manual_seed(seed)
    base = nn.Linear(spec.d_in, spec.d_out).double()
    plain = TeRALinear(copy.deepcopy(base), spec, bank=FactorBank(seed), alpha=alpha, strategy=strategy)
    config = TeraConfig(alpha=alpha, seed=seed, strategy=strategy)
    peft = PeftLinear(copy.deepcopy(base), "default", spec, FactorBank(seed), config)
    with torch.no_grad():
        plain.tera_lambda["default"].copy_(lam)
        peft.tera_lambda["default"].copy_(lam)
    return plain, peft


@settings(max_examples=30, deadline=None)
@given(
    spec=specs(max_order=4, max_mode=4, max_side=16),
    seed=st.integers(0, 2**16),
    alpha=alphas,
    strategy=st.sampled_from(["materialize", "factored", "auto"]),
    data=st.data(),
)
def test_both_apis_give_identical_outputs_gradients_and_merged_weights(spec, seed, alpha, strategy, data):
    lam = torch.tensor(
        data.draw(st.lists(st.floats(-2.0, 2.0, allow_nan=False), min_size=spec.num_trainable, max_size=spec.num_trainable)),
        dtype=torch.float32,
    )
    plain, peft = _pair(spec, seed, alpha, strategy, lam)
    assert type(plain.tera_lambda) is type(peft.tera_lambda) and isinstance(peft, TeRAAdapters)
    x = torch.randn(3, spec.d_in, dtype=torch.float64)
    outs, grads = [], []
    for layer in (plain, peft):
        xi = x.clone().requires_grad_()
        y = layer(xi)
        y.pow(2).sum().backward()
        outs.append(y.detach())
        grads.append((xi.grad, layer.tera_lambda["default"].grad))
    # Same code path, same operands: the two layers agree to the last bit.
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=0)
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    torch.testing.assert_close(plain.delta_weight(), peft.get_delta_weight("default"), rtol=0, atol=0)
    with torch.no_grad():
        plain.merge()
        peft.merge()
    torch.testing.assert_close(plain.base_layer.weight, peft.get_base_layer().weight, rtol=0, atol=0)
    with torch.no_grad():
        plain.unmerge()
        peft.unmerge()
    torch.testing.assert_close(plain.base_layer.weight, peft.get_base_layer().weight, rtol=0, atol=0)


def test_peft_merge_refuses_a_non_finite_delta_like_the_plain_layer():
    """One merge: PEFT's no longer writes NaN into W0 when safe_merge is off."""
    from tera_tn import TeRASpec

    spec = TeRASpec((4, 4), (4, 4))
    lam = torch.ones(spec.num_trainable)
    lam[1] = float("nan")
    plain, peft = _pair(spec, 0, 1.0, "auto", lam)
    w0 = peft.get_base_layer().weight.detach().clone()
    for merge in (plain.merge, lambda: peft.merge(safe_merge=False)):
        with pytest.raises(ValueError, match=r"refusing to merge .*λ_0: 1 NaN.*not changed"):
            merge()
    assert torch.equal(peft.get_base_layer().weight, w0) and not peft.merged_adapters


def test_one_checker_for_both_checkpoint_descriptions():
    saved = {"format": 1, "seed": 3, "alpha": 1.0, "layers": {"a": {"shape": [8, 8], "row_modes": [8]}}}
    current = {"format": 1, "seed": 4, "alpha": 1.0, "layers": {"a": {"shape": [8, 8], "row_modes": [2, 4]}}}
    lines = signature_diff(saved, current)
    assert lines == adapter_diff(saved, current)
    assert lines == ["seed: checkpoint 3, model 4", "row_modes differs in 1 layer(s): a: row_modes: checkpoint [8], model [2, 4]"]
    # The per-layer form of a save_tera file: the same lines, the seed now per layer.
    per_layer = adapter_diff({"layers": {"a": {"seed": 3}, "b": {"seed": 3}}}, {"layers": {"a": {"seed": 4}}})
    assert per_layer == [
        "1 adapted layer(s) in the checkpoint are not adapted in the model: b",
        "seed differs in 1 layer(s): a: seed: checkpoint 3, model 4",
    ]
    assert adapter_diff({"layers": {"a": {"seed": 3}, "b": {}}}, {"layers": {"a": {"seed": 3}}}, strict=False) == []


def test_tera_dropout_is_a_deprecated_alias_of_dropout():
    with pytest.warns(DeprecationWarning, match="renamed dropout"):
        config = TeraConfig(tera_dropout=0.25)
    assert config.dropout == 0.25 and config.tera_dropout is None
    assert config.tera_config().dropout == 0.25 and config.layer_options()["dropout"] == 0.25


def test_peft_layers_rechoose_their_strategy_after_a_new_cost_model():
    """The one strategy memo is keyed by the installed cost model, for the PEFT layer as well."""
    import tera_tn.contract.costmodel as costmodel
    from tera_tn import TeRASpec
    from tera_tn.contract.costmodel import CostModel

    # Rank side: it builds ΔW by a chain of mode products, so the two cost models choose differently
    # (the mode side streams its cached P G Qᵀ and materializes under both).
    spec = TeRASpec.from_shape(64, 64, order=4, diag="rank")
    layer = PeftLinear(nn.Linear(64, 64), "default", spec, FactorBank(0), TeraConfig()).eval()
    x = torch.randn(64, 64)
    saved = dict(costmodel._MODELS)
    try:
        costmodel.set_cost_model(CostModel(1e9, 0.0, 1e15, 0.0, source="test: flop-bound"), "torch", "cpu", "float32")
        assert layer._pick_strategy("default", 64, x, False) == "materialize"
        costmodel.set_cost_model(CostModel(1e15, 0.0, 1e9, 0.0, source="test: memory-bound"), "torch", "cpu", "float32")
        assert layer._pick_strategy("default", 64, x, False) == "factored"
    finally:
        for key in set(costmodel._MODELS) | set(saved):
            costmodel.set_cost_model(saved.get(key), *key)


def test_peft_cache_delta_follows_optimizer_steps_and_is_dropped_with_the_adapter():
    from tera_tn import TeRASpec

    spec = TeRASpec((4, 4), (4, 4))
    layer = PeftLinear(nn.Linear(16, 16), "default", spec, FactorBank(0), TeraConfig(cache_delta=True, scale_init="random"))
    x = torch.randn(3, 16)

    def expected():
        return nn.functional.linear(x, layer.get_base_layer().weight + layer.get_delta_weight("default"), layer.get_base_layer().bias)

    with torch.no_grad():
        torch.testing.assert_close(layer(x), expected(), rtol=1e-5, atol=1e-5)
    assert "default" in layer._tera_cache
    opt = torch.optim.SGD(layer.tera_lambda.parameters(), lr=0.5)
    layer(x).pow(2).sum().backward()
    opt.step()
    with torch.no_grad():
        torch.testing.assert_close(layer(x), expected(), rtol=1e-5, atol=1e-5)
    layer.update_layer("other", spec, FactorBank(0), TeraConfig())
    layer.delete_adapter("default")
    assert "default" not in layer._tera_cache
