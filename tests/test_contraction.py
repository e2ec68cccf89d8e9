"""apply(): every strategy equals x @ ΔWᵀ; gradients; the planner, its cache and cost models."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import opt_einsum as oe

from strategies import alphas, reference_einsum, relerr, seeds, spec_and_scales, specs
from tera_tn import TeRASpec, apply, delta_weight, init_scales, plan, random_factors
from tera_tn.contract.costmodel import CostModel, calibrate
from tera_tn.contract import costmodel
from tera_tn.contract.contraction import ContractionPlan
from tera_tn.contract.strategies import StrategyCost, factored_equation
from tera_tn.core.modeproduct import chain_steps

STRATS = ("factored", "materialize", "auto")
batch_shapes = st.one_of(
    st.just(()),
    st.lists(st.integers(min_value=1, max_value=4), min_size=1, max_size=3).map(tuple),
)


@pytest.fixture
def restore_cost_models():
    saved = dict(costmodel._MODELS)
    yield
    for key in set(costmodel._MODELS) | set(saved):
        costmodel.set_cost_model(saved.get(key), *key)


# Two cost models under which a 64×64 order-4 layer at 64 tokens (inference) prefers opposite
# strategies: cheap bandwidth favours materialize, cheap FLOPs with slow memory favours factored.
FLOP_BOUND = CostModel(1e9, 0.0, 1e15, 0.0, source="test: flop-bound")
MEMORY_BOUND = CostModel(1e15, 0.0, 1e9, 0.0, source="test: memory-bound")


# --- correctness ----------------------------------------------------------------------------------


@given(spec_and_scales(zeros=True), seeds, alphas, batch_shapes, st.sampled_from(STRATS))
def test_apply_numpy_matches_reference(ss, seed, alpha, batch, strategy):
    spec, scales = ss
    f = random_factors(spec, seed)
    x = np.random.default_rng(seed).standard_normal(batch + (spec.d_in,))
    ref = x @ reference_einsum(spec, f, scales, alpha).T
    y = apply(spec, f, scales, x, alpha=alpha, strategy=strategy)
    assert isinstance(y, np.ndarray) and y.dtype == np.float64
    assert y.shape == batch + (spec.d_out,)
    assert relerr(y, ref) < 1e-11


@given(spec_and_scales(zeros=True), seeds, alphas, batch_shapes, st.sampled_from(STRATS))
def test_apply_torch_matches_reference(ss, seed, alpha, batch, strategy):
    spec, scales = ss
    f = random_factors(spec, seed)
    xn = np.random.default_rng(seed).standard_normal(batch + (spec.d_in,))
    ref = xn @ reference_einsum(spec, f, scales, alpha).T
    x = torch.from_numpy(xn)
    for ff, ss_ in ((f, scales), (f.as_torch(dtype=torch.float64), [torch.from_numpy(s) for s in scales])):
        y = apply(spec, ff, ss_, x, alpha=alpha, strategy=strategy)
        assert isinstance(y, torch.Tensor) and y.dtype == torch.float64
        assert tuple(y.shape) == batch + (spec.d_out,)
        assert relerr(y.numpy(), ref) < 1e-11
    # numpy x with torch scales: computed in torch
    y = apply(spec, f, [torch.from_numpy(s) for s in scales], xn, alpha=alpha, strategy=strategy)
    assert isinstance(y, torch.Tensor) and relerr(y.numpy(), ref) < 1e-11


@given(spec_and_scales(), seeds)
def test_strategies_agree_on_1d_x(ss, seed):
    spec, scales = ss
    f = random_factors(spec, seed)
    x = np.random.default_rng(seed).standard_normal(spec.d_in)
    ref = reference_einsum(spec, f, scales) @ x
    for strategy in STRATS:
        y = apply(spec, f, scales, x, strategy=strategy)
        assert y.shape == (spec.d_out,) and relerr(y, ref) < 1e-11


@given(spec_and_scales(padding="always"), seeds, st.sampled_from(STRATS))
def test_apply_padded(ss, seed, strategy):
    spec, scales = ss
    f = random_factors(spec, seed)
    x = np.random.default_rng(seed).standard_normal((3, spec.d_in))
    y = apply(spec, f, scales, x, strategy=strategy)
    assert y.shape == (3, spec.d_out)
    assert relerr(y, x @ reference_einsum(spec, f, scales).T) < 1e-11


@pytest.mark.parametrize("strategy", STRATS)
def test_apply_empty_batch(strategy):
    spec = TeRASpec((2, 3), (4,), d_out=5)
    f = random_factors(spec, 0)
    y = apply(spec, f, init_scales(spec, "ones"), np.zeros((0, 4)), strategy=strategy)
    assert y.shape == (0, 5)
    yt = apply(spec, f, init_scales(spec, "ones"), torch.zeros(2, 0, 4, dtype=torch.float64), strategy=strategy)
    assert tuple(yt.shape) == (2, 0, 5)


def test_apply_order_six_full_rank():
    spec = TeRASpec.from_shape(512, 729, order=6)
    assert spec.modes == (8, 8, 8, 9, 9, 9)
    f = random_factors(spec, 0)
    scales = init_scales(spec, "random", seed=1)
    x = np.random.default_rng(2).standard_normal((2, 729))
    dw = delta_weight(spec, f, scales)
    ref = x @ dw.T
    for strategy in ("factored", "materialize"):
        assert relerr(apply(spec, f, scales, x, strategy=strategy), ref) < 1e-11


@pytest.mark.parametrize("strategy", STRATS)
def test_apply_integer_input_is_not_truncated(strategy):
    """x @ ΔWᵀ for an integer x (one-hot rows) is a float result: the columns of ΔW."""
    spec = TeRASpec((3, 2), (4, 2))
    f = random_factors(spec, 0)
    scales = init_scales(spec, "random", seed=0)
    dw = delta_weight(spec, f, scales)
    eye = np.eye(spec.d_in, dtype=np.int64)
    y = apply(spec, f, scales, eye, strategy=strategy)
    assert np.allclose(np.asarray(y, dtype=np.float64), eye @ dw.T, rtol=1e-12, atol=1e-12)


# --- gradients ----------------------------------------------------------------------------------


@settings(max_examples=12)
@given(spec_and_scales(zeros=True, max_side=32), seeds, alphas, st.sampled_from(STRATS))
def test_torch_gradients_match_delta_weight(ss, seed, alpha, strategy):
    spec, scales = ss
    f = random_factors(spec, seed)
    rng = np.random.default_rng(seed)
    x0 = rng.standard_normal((2, 3, spec.d_in))
    c = torch.from_numpy(rng.standard_normal((2, 3, spec.d_out)))

    def grads(use_apply: bool):
        x = torch.tensor(x0, requires_grad=True)
        lam = [torch.tensor(s, requires_grad=True) for s in scales]
        if use_apply:
            y = apply(spec, f, lam, x, alpha=alpha, strategy=strategy)
        else:
            y = x @ delta_weight(spec, f, lam, alpha).T
        (y * c).sum().backward()
        return [x.grad] + [s.grad for s in lam]

    got, ref = grads(True), grads(False)
    for g, r in zip(got, ref):
        assert g is not None and r is not None
        assert relerr(g.numpy(), r.numpy()) < 1e-10


# --- planner --------------------------------------------------------------------------------------


def _formats(value: float, scale: float) -> list[str]:
    return [f"{value / scale:.{d}f}" for d in (1, 2, 3, 4)] + [f"{value / scale:.3g}", f"{value / scale:g}"]


def test_plan_full_rank_order6_single_token_is_factored():
    spec = TeRASpec.from_shape(4096, 4096, order=6)
    for dtype in ("float32", "float64"):
        p = plan(spec, 1, backend="torch", device="cpu", dtype=dtype)
        assert p.strategy == "factored"
        assert p.factored.seconds <= p.materialize.seconds


@given(
    spec_and_scales(max_side=None),
    st.integers(min_value=1, max_value=100_000),
    st.sampled_from([("torch", "cpu", "float32"), ("numpy", "cpu", "float64"), ("torch", "cuda", "bfloat16")]),
)
def test_plan_picks_the_cheaper_strategy(ss, n, key):
    spec, _ = ss
    p = plan(spec, n, backend=key[0], device=key[1], dtype=key[2])
    assert isinstance(p, ContractionPlan) and p.n_tokens == n and p.spec == spec
    assert p.strategy in ("materialize", "factored")
    assert p.chosen.strategy == p.strategy
    assert p.chosen.seconds == min(p.materialize.seconds, p.factored.seconds)
    assert p.speedup >= 1.0
    for c in (p.materialize, p.factored):
        assert isinstance(c, StrategyCost)
        assert c.flops > 0 and c.seconds > 0 and c.bytes_moved > 0 and c.largest_intermediate > 0
    # materialize forms the padded d_out × d_in matrix
    assert p.materialize.largest_intermediate >= math.prod(spec.padded_shape)


def test_plan_explanation_mentions_both_strategies():
    spec = TeRASpec.from_shape(4096, 4096, order=6)
    p = plan(spec, 1)
    text = str(p)
    assert "materialize" in text and "factored" in text
    assert "FLOP" in text and "ms" in text
    assert "chosen" in text and p.strategy in text
    for c in (p.materialize, p.factored):
        assert str(c.flops) in text or f"{c.flops:,}" in text or any(s in text for s in _formats(c.flops, 1e9))
        assert any(s in text for s in _formats(c.seconds, 1e-3)), (c.seconds, text)


@given(spec_and_scales(max_side=None), st.integers(min_value=1, max_value=4096))
def test_plan_is_cached(ss, n):
    spec, _ = ss
    assert plan(spec, n) is plan(spec, n)
    assert plan(spec, n, backend="numpy", dtype="float64") is plan(spec, n, backend="numpy", dtype="float64")


def test_plans_are_keyed_by_the_cost_model(restore_cost_models):
    spec = TeRASpec((4, 4), (4, 4))
    p1 = plan(spec, 8, backend="numpy", dtype="float64")
    # the same model value, installed again: the cached plan is still right and is reused
    costmodel.set_cost_model(costmodel.cost_model("numpy", "cpu", "float64"), "numpy", "cpu", "float64")
    assert plan(spec, 8, backend="numpy", dtype="float64") is p1
    slow_gemm = CostModel(1e3, 9.0, 1e15, 0.0, source="test")
    costmodel.set_cost_model(slow_gemm, "numpy", "cpu", "float64")
    p3 = plan(spec, 8, backend="numpy", dtype="float64")
    assert p3.model == slow_gemm and p3 is not p1
    # a model passed as a value prices without touching what is installed
    assert plan(spec, 8, backend="numpy", dtype="float64", model=p1.model).model == p1.model
    assert costmodel.cost_model("numpy", "cpu", "float64") == slow_gemm
    costmodel.set_cost_model(None, "numpy", "cpu", "float64")
    assert plan(spec, 8, backend="numpy", dtype="float64") is p1


def test_installing_a_cost_model_changes_plan_choice(restore_cost_models):
    # ΔW x alone (no base GEMM): for diag="identity" at one token, materializing is two
    # elementwise passes and one GEMM, the factored path four small contractions over d².
    spec = TeRASpec.from_shape(64, 64, order=4, diag="identity")
    costmodel.set_cost_model(FLOP_BOUND, "torch", "cpu", "float32")
    assert plan(spec, 1).strategy == "materialize"
    costmodel.set_cost_model(MEMORY_BOUND, "torch", "cpu", "float32")
    assert plan(spec, 1).strategy == "factored"


def test_installing_a_cost_model_changes_layer_choice(restore_cost_models):
    """A TeRALinear re-chooses after calibrate()/set_cost_model: neither layer_plan's cache nor
    the layer's own memo may keep a choice priced with the previous model."""
    from tera_tn.torch import TeRALinear
    from tera_tn.torch.planning import layer_plan

    # Rank side: it builds ΔW by a chain of mode products, so the two cost models choose differently
    # (the mode side streams its cached P G Qᵀ and materializes under both).
    spec = TeRASpec.from_shape(64, 64, order=4, diag="rank")
    layer = TeRALinear(torch.nn.Linear(64, 64), spec).eval()
    x = torch.randn(64, 64)
    costmodel.set_cost_model(FLOP_BOUND, "torch", "cpu", "float32")
    assert layer_plan(spec, 64, training=False).strategy == "materialize"
    with torch.no_grad():
        y_mat = layer(x)
    assert layer._pick_strategy("default", 64, x, False) == "materialize"
    costmodel.set_cost_model(MEMORY_BOUND, "torch", "cpu", "float32")
    assert layer_plan(spec, 64, training=False).strategy == "factored"
    assert layer._pick_strategy("default", 64, x, False) == "factored"
    with torch.no_grad():
        torch.testing.assert_close(layer(x), y_mat)


# --- planner FLOPs against opt_einsum ---------------------------------------------------------------


def _chain_path(spec: TeRASpec) -> list[tuple[int, int]]:
    """The materialize chain (core × A_n in the planner's order) as an explicit opt_einsum path."""
    ops = ["G"] + [f"A{n}" for n in range(spec.order)]
    path = []
    for mode, *_ in chain_steps(spec.ranks, spec.modes):
        i, j = ops.index("G"), ops.index(f"A{mode}")
        path.append((min(i, j), max(i, j)))
        ops = [o for o in ops if o not in ("G", f"A{mode}")] + ["G"]
    return path


@settings(max_examples=40, deadline=None)
@given(specs(max_side=64), st.integers(min_value=1, max_value=512))
def test_planner_flops_match_opt_einsum(spec, n):
    p = plan(spec, n, backend="numpy", dtype="float64")
    # factored: the same einsum, priced by opt_einsum itself
    eq, shapes = factored_equation(spec)
    _, info = oe.contract_path(eq, (n,) + spec.col_modes, *shapes, shapes=True, optimize="dp")
    assert p.factored.flops == info.opt_cost
    if spec.diag == "identity":
        return
    # materialize: the chain G ×_n A_n along the planner's own order, then one GEMM
    sym = [oe.get_symbol(i) for i in range(2 * spec.order)]
    k_idx, r_idx = sym[: spec.order], sym[spec.order :]
    chain_eq = ",".join(["".join(r_idx)] + [k + r for k, r in zip(k_idx, r_idx)]) + "->" + "".join(k_idx)
    chain_shapes = [spec.ranks] + list(zip(spec.modes, spec.ranks))
    _, chain = oe.contract_path(chain_eq, *chain_shapes, shapes=True, optimize=_chain_path(spec))
    assert p.materialize.flops == chain.opt_cost + 2 * n * spec.d_out * spec.d_in


def test_calibrate_numpy(restore_cost_models):
    before = costmodel.cost_model("numpy", "cpu", "float64")
    assert before.source == "default"
    installed = calibrate(backend="numpy", dtype="float64")
    assert isinstance(installed, CostModel) and installed.source == "calibrated"
    for value in (installed.peak_flops, installed.s_half, installed.bandwidth, installed.overhead):
        assert math.isfinite(value) and value > 0
    assert costmodel.cost_model("numpy", "cpu", "float64") is installed
    assert costmodel.cost_model("numpy", "cpu", "float32") is not installed
    assert plan(TeRASpec((4, 4), (4, 4)), 3, backend="numpy", dtype="float64").model is installed


@pytest.mark.parametrize("kwargs, bad", [(dict(backend="mxnet"), "mxnet"), (dict(backend="numpy", device="cuda"), "cuda")])
def test_calibrate_errors(kwargs, bad, restore_cost_models):
    with pytest.raises(ValueError) as info:
        calibrate(install=False, **kwargs)
    assert repr(bad) in str(info.value)


# --- errors -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [0, -1, 2.5, True, "8", None])
def test_plan_bad_tokens(bad):
    with pytest.raises(ValueError) as info:
        plan(TeRASpec((4,), (4,)), bad)
    assert repr(bad) in str(info.value)


def test_plan_bad_spec():
    with pytest.raises(TypeError, match="plan expects a TeRASpec"):
        plan((4, 4), 1)


@pytest.mark.parametrize("bad", ["fast", "Factored", "", None])
def test_apply_bad_strategy(bad):
    spec = TeRASpec((2,), (3,))
    with pytest.raises(ValueError) as info:
        apply(spec, random_factors(spec, 0), init_scales(spec), np.ones(3), strategy=bad)
    assert repr(bad) in str(info.value)


@pytest.mark.parametrize("shape", [(4,), (2, 4), (3, 2), (), (6, 1)])
def test_apply_wrong_x_shape(shape):
    spec = TeRASpec((2,), (3,))
    f, s = random_factors(spec, 0), init_scales(spec)
    for x in (np.ones(shape), torch.ones(shape, dtype=torch.float64)):
        with pytest.raises(ValueError) as info:
            apply(spec, f, s, x)
        assert str(tuple(shape)) in str(info.value)


def test_apply_mismatched_scales_and_factors():
    spec = TeRASpec((2,), (3,))
    f = random_factors(spec, 0)
    with pytest.raises(ValueError, match="scales"):
        apply(spec, f, (np.ones(2),), np.ones(3))
    with pytest.raises(ValueError, match="core"):
        apply(spec, random_factors(TeRASpec((2,), (2,)), 0), init_scales(spec), np.ones(3))


def test_apply_and_plan_take_a_network():
    from tera_tn.core.network import TeRANetwork

    spec = TeRASpec((2, 3), (4,), ranks=(2, 2, 3), d_in=3)
    net = TeRANetwork.random(spec, 4, alpha=0.5)
    x = np.arange(6.0).reshape(2, 3)
    loose = apply(spec, net.factors, net.scales, x, alpha=0.5, strategy="factored")
    assert np.array_equal(apply(net, x, strategy="factored"), loose)
    assert np.array_equal(apply(net, x=x, strategy="factored"), loose)
    assert plan(net, 7) is plan(spec, 7)
    with pytest.raises(ValueError) as info:
        apply(net, np.ones((2, 4)))
    assert "(..., 3)" in str(info.value) and "(2, 4)" in str(info.value)
