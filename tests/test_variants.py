"""Variants beyond the paper: diagonals on both sides (``diag="both"``), the λ starting magnitude
(``scale_init_value``) and the parameter-budget picker (``TeRASpec.for_budget``).

References are written from the matrix/Kronecker form only (tests/strategies.py), never from
tera_tn's contraction code.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from bad_inputs.teach import Case, assert_teaches, params
from strategies import alphas, reference_kron, relerr, seeds, spec_and_scales, specs
from tera_tn import TeRASpec, apply, delta_weight, init_scales, random_factors, theoretical_rank
from tera_tn.core.spec import BUDGET_FAMILIES
from tera_tn.analysis.spectrum import tera_singular_values, theoretical_multilinear_ranks
from tera_tn.torch import TeRALayersConfig, TeRALinear, add_tera, load_tera, save_tera
from tera_tn.torch.autograd import FrozenNetwork, tera_linear

from tiny_models import TinyMLP

both_specs = specs(diags=("both",))


# --- diag="both": sizes, the matrix form, numpy = torch -------------------------------------------


@given(specs(diags=("both",), max_side=None))
def test_both_trains_k_plus_r_per_mode_and_shares_the_rank_factors(spec):
    assert spec.scale_sizes == tuple(k + r for k, r in zip(spec.modes, spec.ranks))
    assert spec.num_trainable == sum(spec.modes) + sum(spec.ranks)
    rank = TeRASpec(spec.row_modes, spec.col_modes, spec.ranks, "rank", spec.d_out, spec.d_in)
    assert spec.num_frozen == rank.num_frozen and spec.max_rank == rank.max_rank
    assert TeRASpec.from_dict(spec.to_dict()) == spec


def test_both_from_shape():
    s = TeRASpec.from_shape(768, 768, order=4, diag="both")
    assert s.diag == "both" and s.num_trainable == 2 * sum(s.modes)
    assert s.num_trainable == 2 * TeRASpec.from_shape(768, 768, order=4).num_trainable


@given(spec_and_scales(diags=("both",), max_side=32), seeds, alphas)
def test_both_matrix_form(ss, seed, alpha):
    """ΔW = α (⊗A_row) G_mat (⊗A_col)ᵀ with A_n = diag(μ_n) U_n diag(λ_n), sliced to (d_out, d_in)."""
    spec, scales = ss
    f = random_factors(spec, seed)
    ref = reference_kron(spec, f, scales, alpha)
    assert relerr(delta_weight(spec, f, scales, alpha), ref) < 1e-12
    x = np.random.default_rng(seed).standard_normal((3, spec.d_in))
    for strategy in ("materialize", "factored"):
        assert relerr(apply(spec, f, scales, x, alpha=alpha, strategy=strategy), x @ ref.T) < 1e-11
    # numpy = torch, for the delta and for the layer's autograd Function
    ts = [torch.from_numpy(s) for s in scales]
    assert relerr(delta_weight(spec, f.as_torch(torch.float64), ts, alpha).numpy(), ref) < 1e-12
    t = f.as_torch(torch.float64)
    net = FrozenNetwork(spec, t.core, t.factors)
    for strategy in ("materialize", "dense", "factored"):
        y = tera_linear(torch.from_numpy(x), None, None, net, ts, alpha, strategy)
        assert relerr(y.numpy(), x @ ref.T) < 1e-11


@given(spec_and_scales(diags=("both",), max_side=32), seeds)
def test_both_structured_spectrum(ss, seed):
    spec, scales = ss
    f = random_factors(spec, seed)
    dw = delta_weight(spec, f, scales, 1.5)
    sv = np.linalg.svd(dw, compute_uv=False)
    got = tera_singular_values(spec, f, scales, 1.5)
    assert np.allclose(got, sv, rtol=0, atol=1e-10 * max(1.0, sv[0]))


# --- the rank theorem ------------------------------------------------------------------------------


@settings(max_examples=60)
@given(spec_and_scales(diags=("both",), zeros=True, reduced="always"), seeds)
def test_both_rank_theorem(ss, seed):
    """For generic U, G the rank is the rank side's, capped by the mode side's and by ∏R."""
    spec, scales = ss
    dw = delta_weight(spec, random_factors(spec, seed), scales)
    numerical = int(np.linalg.matrix_rank(dw)) if dw.size else 0
    assert theoretical_rank(spec, scales) == numerical
    if spec.padding == (0, 0):
        p = spec.n_row
        r = [min(np.count_nonzero(s[:k]), np.count_nonzero(s[k:]), rk)
             for s, k, rk in zip(scales, spec.modes, spec.ranks)]
        assert numerical == min(math.prod(r[:p]), math.prod(r[p:]))


def test_both_rank_follows_either_side():
    spec = TeRASpec((4,), (5,), (3, 4), "both")
    f = random_factors(spec, 0)
    full = [np.ones(7), np.ones(9)]
    assert theoretical_rank(spec, full) == 3 == np.linalg.matrix_rank(delta_weight(spec, f, full))
    mu_cut = [np.r_[1.0, 0.0, 0.0, 1.0, np.ones(3)], np.ones(9)]  # two rows of A_1 zeroed
    assert theoretical_rank(spec, mu_cut) == 2 == np.linalg.matrix_rank(delta_weight(spec, f, mu_cut))
    lam_cut = [np.r_[np.ones(4), 1.0, 0.0, 0.0], np.ones(9)]  # one column of A_1 kept
    assert theoretical_rank(spec, lam_cut) == 1 == np.linalg.matrix_rank(delta_weight(spec, f, lam_cut))
    assert theoretical_multilinear_ranks(spec, lam_cut) == (1, 1)


# --- zero start, gradients --------------------------------------------------------------------------


@settings(max_examples=25)
@given(specs(diags=("both",), max_side=32), seeds, st.data())
def test_both_zero_start_is_zero_with_nonzero_gradient(spec, seed, data):
    zero_mode = data.draw(st.integers(0, spec.order - 1))
    scales = init_scales(spec, zero_mode=zero_mode)
    k = spec.modes[zero_mode]
    assert np.all(scales[zero_mode][k:] == 0) and np.all(scales[zero_mode][:k] == 1)
    f = random_factors(spec, seed).as_torch(torch.float64)
    net = FrozenNetwork(spec, f.core, f.factors)
    lams = [torch.tensor(s, requires_grad=True) for s in scales]
    x = torch.from_numpy(np.random.default_rng(seed).standard_normal((4, spec.d_in)))
    c = torch.from_numpy(np.random.default_rng(seed + 1).standard_normal((4, spec.d_out)))
    for strategy in ("materialize", "dense", "factored"):
        y = tera_linear(x, None, None, net, lams, 1.0, strategy)
        assert torch.all(y == 0)
        (grad,) = torch.autograd.grad((y * c).sum(), lams[zero_mode])
        assert torch.any(grad[k:] != 0)  # the rank side λ moves at the first step
        assert torch.all(grad[:k] == 0)  # its μ multiplies λ = 0


@pytest.mark.parametrize("strategy", ["materialize", "dense", "factored"])
@pytest.mark.parametrize("spec", [
    TeRASpec((2, 3), (3, 2), diag="both", d_out=5, d_in=5),
    TeRASpec((3, 2), (4,), (2, 2, 3), "both"),
    TeRASpec((2,), (2, 2, 2), (1, 2, 2, 1), "both", d_in=7),
], ids=str)
def test_both_gradcheck(spec, strategy):
    """float64 gradcheck of x, W0, bias and every μ and λ through the hand-written backward."""
    f = random_factors(spec, 1).as_torch(torch.float64)
    net = FrozenNetwork(spec, f.core, f.factors)
    lams = [torch.tensor(s, requires_grad=True) for s in init_scales(spec, "random", seed=3)]
    x = torch.randn(3, spec.d_in, dtype=torch.float64, requires_grad=True)
    w = torch.randn(spec.d_out, spec.d_in, dtype=torch.float64, requires_grad=True)
    b = torch.randn(spec.d_out, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, w, b, *l: tera_linear(x, w, b, net, l, -1.3, strategy), (x, w, b, *lams))


@pytest.mark.parametrize("strategy", ["materialize", "dense", "factored"])
def test_both_backward_keeps_no_dense_tensor(strategy):
    """What the Function saves for backward is activation- or vector-sized, never d_out × d_in."""
    spec = TeRASpec((8, 8), (8, 8), diag="both")
    layer = TeRALinear(nn.Linear(64, 64).requires_grad_(False), spec, strategy=strategy)
    saved: list[tuple[int, ...]] = []

    def pack(t):
        saved.append(tuple(t.shape))
        return t

    _randomize(layer.scales(), 0)
    x = torch.randn(2, 64)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = layer(x)
    y.sum().backward()
    dense = [s for s in saved if math.prod(s) >= 64 * 64 and s != (64, 64)]
    # W0 itself (64×64) is saved by reference, as for any Linear; nothing else that large is kept
    assert not dense, saved
    assert sum(s == (64, 64) for s in saved) <= 1
    # μ (first 8 entries) and λ (last 8) of every mode get gradients
    grads = layer.tera_lambda["default"].grad.split(spec.scale_sizes)
    assert all(torch.all(g[:8] != 0) and torch.all(g[8:] != 0) for g in grads)


# --- layers, merge, checkpoints -------------------------------------------------------------------




def _randomize(lams, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for lam in lams:
            lam.copy_(torch.rand(lam.shape, generator=g) + 0.5)


def test_both_torch_layer_merge_and_checkpoint(tmp_path):
    torch.manual_seed(0)
    model = TinyMLP()
    summary = add_tera(model, TeRALayersConfig(order=3, diag="both", alpha=2.0))
    layers = [m for m in model.modules() if isinstance(m, TeRALinear)]
    assert all(layer.spec.diag == "both" for layer in layers) and len(layers) == 2
    assert summary.trainable == sum(sum(k + r for k, r in zip(l.spec.modes, l.spec.ranks)) for l in layers)
    for i, layer in enumerate(layers):
        assert [lam.numel() for lam in layer.scales()] == list(layer.spec.scale_sizes)
        _randomize(layer.scales(), i)
    x = torch.randn(5, 12)
    y = model(x)
    # merge gives the same function; unmerge restores W0
    w0 = layers[0].base_layer.weight.detach().clone()
    for layer in layers:
        layer.merge()
    assert torch.allclose(model(x), y, atol=1e-5)
    for layer in layers:
        layer.unmerge()
    assert torch.allclose(layers[0].base_layer.weight, w0, atol=1e-6)
    save_tera(model, tmp_path / "a.safetensors")
    torch.manual_seed(0)
    fresh = TinyMLP()
    add_tera(fresh, TeRALayersConfig(order=3, diag="both", alpha=2.0))
    load_tera(fresh, tmp_path / "a.safetensors")
    assert torch.equal(fresh(x), y)


def test_both_peft_roundtrip(tmp_path):
    pytest.importorskip("peft")
    from peft import PeftModel, get_peft_model

    from tera_tn.peft import TeraConfig, save_adapter
    from tera_tn.peft.layer import TeraLayer

    torch.manual_seed(0)
    cfg = TeraConfig(target_modules=["up", "down"], order=3, diag="both", alpha=2.0)
    model = get_peft_model(TinyMLP(), cfg)
    layers = [m for m in model.modules() if isinstance(m, TeraLayer)]
    for i, layer in enumerate(layers):
        lam = layer.tera_lambda["default"]
        assert lam.numel() == layer.tera_spec["default"].num_trainable
        _randomize([lam], i)
    x = torch.randn(4, 12)
    y = model(x)
    delta = layers[0].get_delta_weight("default")
    spec = layers[0].tera_spec["default"]
    f = random_factors(spec, 0)
    lams = [s.detach().double().numpy() for s in layers[0].scales("default")]
    assert relerr(delta.double().numpy(), delta_weight(spec, f, lams, 2.0)) < 1e-6
    save_adapter(model, tmp_path / "ad")
    torch.manual_seed(0)
    loaded = PeftModel.from_pretrained(TinyMLP(), tmp_path / "ad")
    assert torch.allclose(loaded(x), y, atol=1e-6)
    merged = loaded.merge_and_unload()
    assert torch.allclose(merged(x), y, atol=1e-5)


# --- scale_init_value ----------------------------------------------------------------------------


@given(specs(), st.sampled_from([0.1, 0.5, 3.0]))
def test_scale_init_value_sets_the_nonzero_vectors(spec, value):
    z = init_scales(spec, value=value)
    first = spec.modes[0] if spec.diag == "both" else 0
    assert np.all(z[0][first:] == 0) and np.all(z[0][:first] == value)
    assert all(np.all(s == value) for s in z[1:])
    assert all(np.all(s == value) for s in init_scales(spec, "ones", value=value))
    r1, rv = init_scales(spec, "random", seed=4), init_scales(spec, "random", seed=4, value=value)
    assert all(np.allclose(b, a * value, rtol=1e-15) for a, b in zip(r1, rv))


def test_scale_init_value_reaches_the_layers():
    torch.manual_seed(0)
    model = TinyMLP()
    add_tera(model, TeRALayersConfig(order=3, scale_init_value=0.1))
    layer = model.up
    assert torch.all(layer.scales()[0] == 0)
    assert all(torch.allclose(lam, torch.full_like(lam, 0.1)) for lam in layer.scales()[1:])
    pytest.importorskip("peft")
    from tera_tn.peft import TeraConfig

    assert TeraConfig(scale_init_value=0.1).tera_config().scale_init_value == 0.1


def _peft_config(**kw):
    from tera_tn.peft import TeraConfig

    return TeraConfig(**kw)


_BAD_VALUES = [0.0, -1.0, float("nan"), float("inf"), True, "0.1"]
BAD = [
    *(Case(f"init_scales-{v!r}", lambda v=v: init_scales(TeRASpec((2,), (2,)), value=v), ValueError,
           ("value", repr(v), "> 0")) for v in _BAD_VALUES),
    *(Case(f"TeRALayersConfig-{v!r}", lambda v=v: TeRALayersConfig(scale_init_value=v), ValueError,
           ("scale_init_value", repr(v), "> 0")) for v in _BAD_VALUES),
    Case("TeRALinear-0", lambda: TeRALinear(nn.Linear(64, 64), scale_init_value=0.0), ValueError,
         ("scale_init_value", "0.0", "> 0")),
    Case("TeraConfig-nan", lambda: _peft_config(scale_init_value=float("nan")), ValueError,
         ("scale_init_value", "nan", "> 0")),
    Case("diag-typo", lambda: TeRASpec((2,), (2,), diag="bothh"), ValueError, ("'bothh'", "'both'")),
    Case("both-scales-too-short", lambda: delta_weight(TeRASpec((2,), (3,), diag="both"), random_factors(
        TeRASpec((2,), (3,), diag="both"), 0), [np.ones(2), np.ones(6)]), ValueError, ("scales[0]", "(4,)", "K_n + R_n")),
]


@params(BAD)
def test_bad_inputs_teach(case):
    assert_teaches(case)


# --- for_budget ----------------------------------------------------------------------------------

shapes = st.tuples(st.integers(4, 5000), st.integers(4, 5000))


@settings(max_examples=40, deadline=None)
@given(shapes, st.lists(st.integers(1, 20000), min_size=2, max_size=6))
def test_for_budget_never_exceeds_is_monotone_and_deterministic(shape, budgets):
    d_out, d_in = shape
    picked = []
    for budget in sorted(budgets):
        try:
            spec = TeRASpec.for_budget(d_out, d_in, budget)
        except ValueError as e:
            assert f"params={budget} is below" in str(e)
            assert not picked  # once a budget fits, every larger one does
            continue
        assert spec.shape == (d_out, d_in) and spec.num_trainable <= budget
        assert (spec.diag, spec.order) in {(d, o) for d, o, _ in BUDGET_FAMILIES}
        assert TeRASpec.for_budget(d_out, d_in, budget) == spec
        picked.append(spec.num_trainable)
    assert picked == sorted(picked)


def test_for_budget_takes_the_largest_member_and_prefers_earlier_rows():
    members = []
    for i, (diag, order, ranks) in enumerate(BUDGET_FAMILIES):
        try:
            members.append((i, TeRASpec.from_shape(768, 768, order=order, ranks=ranks, diag=diag)))
        except ValueError:
            pass
    # 56, 84, 112 and 168 are each reached by two rows: the earlier must win
    for budget in (22, 56, 84, 96, 100, 112, 168, 500, 1024, 3072, 10**6):
        fits = [(i, s) for i, s in members if s.num_trainable <= budget]
        most = max(s.num_trainable for _, s in fits)
        first = min(i for i, s in fits if s.num_trainable == most)
        assert TeRASpec.for_budget(768, 768, budget) == dict(members)[first]
    # VeRA r=256's per-layer count on a 768x768 weight is 768 + 256
    assert 800 <= TeRASpec.for_budget(768, 768, 1024).num_trainable <= 1024


def test_for_budget_below_the_smallest_member_teaches():
    smallest = min(TeRASpec.from_shape(768, 768, order=o, ranks=r, diag=d).num_trainable for d, o, r in BUDGET_FAMILIES)
    assert TeRASpec.for_budget(768, 768, smallest).num_trainable == smallest
    with pytest.raises(ValueError, match=f"params={smallest - 1} is below .* give params >= {smallest}"):
        TeRASpec.for_budget(768, 768, smallest - 1)
    with pytest.raises(ValueError, match="no TeRA family member fits a 1×1 weight"):
        TeRASpec.for_budget(1, 1, 100)
    for bad in (0, -3, 1.5, "100", True):
        with pytest.raises(ValueError, match="params"):
            TeRASpec.for_budget(768, 768, bad)
