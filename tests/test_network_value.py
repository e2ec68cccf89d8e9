"""`TeRANetwork`: the (spec, factors, scales, α) value, validated once where it is built.

Construction refuses a bad spec, factor shape or scale length with an error naming the value
and what was expected; a built network gives bit-for-bit the results of the loose arguments;
and code that receives one never checks it again (counted, not assumed).
"""

from __future__ import annotations

import dataclasses
import sys

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from strategies import alphas, seeds, spec_and_scales, specs
from tera_tn import (
    TeRAFactors,
    TeRASpec,
    apply,
    conditioning,
    delta_weight,
    init_scales,
    plan,
    random_factors,
    singular_values,
    theoretical_rank,
)
from tera_tn.analysis.spectrum import tera_rank_summary, theoretical_multilinear_ranks
from tera_tn.core import factors as factors_module
from tera_tn.core import spec as spec_module
from tera_tn.core.factors import CORE_SCALE, GENERATOR_VERSION, RECIPE_FIELDS
from tera_tn.core.network import TeRANetwork, scaled_factors

factor_inits = st.sampled_from(("orthogonal", "gaussian", "uniform"))


def _net(spec, scales, seed=0, alpha=1.0, init="orthogonal"):
    return TeRANetwork(spec, random_factors(spec, seed, init=init), scales, alpha)


# --- construction validates, naming the value and what was expected -------------------------------


@settings(max_examples=25)
@given(specs(), seeds)
def test_a_bad_spec_is_refused_naming_the_class(spec, seed):
    factors = random_factors(spec, seed)
    scales = init_scales(spec, "ones")
    for bad in (spec.to_dict(), str(spec), None):
        with pytest.raises(TypeError) as info:
            TeRANetwork(bad, factors, scales)
        msg = str(info.value)
        assert "TeRANetwork expects a TeRASpec as spec" in msg and type(bad).__name__ in msg


@settings(max_examples=25)
@given(specs(diags=("rank", "mode", "both")), seeds, st.data())
def test_a_factor_of_the_wrong_shape_is_refused_naming_it(spec, seed, data):
    f = random_factors(spec, seed)
    scales = init_scales(spec, "ones")
    n = data.draw(st.integers(0, spec.order - 1))
    k, r = spec.modes[n], spec.ranks[n]
    wrong = np.zeros((k + 1, r))
    bad = TeRAFactors(f.core, f.factors[:n] + (wrong,) + f.factors[n + 1 :])
    with pytest.raises(ValueError) as info:
        TeRANetwork(spec, bad, scales)
    msg = str(info.value)
    assert f"U_{n}" in msg and str((k + 1, r)) in msg and str((k, r)) in msg
    with pytest.raises(ValueError) as info:
        TeRANetwork(spec, TeRAFactors(np.zeros(spec.ranks + (1,)), f.factors), scales)
    assert "core" in str(info.value) and str(spec.ranks) in str(info.value)


@settings(max_examples=25)
@given(specs(), st.data())
def test_a_scale_of_the_wrong_length_is_refused_naming_it(spec, data):
    f = random_factors(spec, 0)
    scales = list(init_scales(spec, "ones"))
    n = data.draw(st.integers(0, spec.order - 1))
    size = spec.scale_sizes[n]
    scales[n] = np.ones(size + data.draw(st.sampled_from((-1, 1))) if size > 1 else size + 1)
    with pytest.raises(ValueError) as info:
        TeRANetwork(spec, f, scales)
    msg = str(info.value)
    assert f"scales[{n}]" in msg and f"({scales[n].size},)" in msg and f"({size},)" in msg
    with pytest.raises(ValueError) as info:
        TeRANetwork(spec, f, scales[:-1] if spec.order > 1 else scales + [np.ones(1)])
    assert "vectors" in str(info.value) and str(spec.scale_sizes) in str(info.value)


def test_alpha_and_recipe_are_checked():
    spec = TeRASpec((2, 3), (4,))
    f, s = random_factors(spec, 0), init_scales(spec)
    for bad in (float("nan"), None, "2", True):
        with pytest.raises((TypeError, ValueError), match="alpha"):
            TeRANetwork(spec, f, s, bad)
    with pytest.raises(ValueError) as info:
        TeRANetwork(spec, f, s, recipe={"seed": 0})
    assert "recipe" in str(info.value) and "factor_init" in str(info.value)
    with pytest.raises(ValueError, match="seed"):
        TeRANetwork(spec, f, s, recipe={"seed": -1, **{k: "x" for k in RECIPE_FIELDS}})


def test_the_value_is_immutable_and_holds_checked_fields():
    spec = TeRASpec((2, 3), (4,), ranks=(2, 2, 3))
    net = TeRANetwork.random(spec, 5, init="gaussian", alpha=3)
    assert isinstance(net.scales, tuple) and isinstance(net.alpha, float) and net.alpha == 3.0
    with pytest.raises(dataclasses.FrozenInstanceError):
        net.alpha = 1.0  # type: ignore[misc]
    with pytest.raises(TypeError):
        net.recipe["seed"] = 6  # type: ignore[index]
    assert dict(net.recipe) == {"seed": 5, "factor_init": "gaussian", "core_scale": CORE_SCALE,
                                "generator_version": GENERATOR_VERSION, "factor_dtype": "float64"}
    reference = random_factors(spec, 5, init="gaussian")
    assert np.array_equal(net.factors.core, reference.core)
    assert all(np.array_equal(a, b) for a, b in zip(net.factors.factors, reference.factors))
    assert all(np.array_equal(a, b) for a, b in zip(net.scales, init_scales(spec, "random", seed=5)))
    # lists of numbers become arrays, as with the loose arguments
    listed = TeRANetwork(spec, reference, [list(map(float, s)) for s in net.scales])
    assert all(isinstance(s, np.ndarray) for s in listed.scales)


def test_a_network_with_loose_arguments_too_is_refused():
    spec = TeRASpec((2, 3), (4,))
    net = TeRANetwork.random(spec, 0)
    with pytest.raises(TypeError) as info:
        delta_weight(net, net.factors)
    assert "delta_weight got a TeRANetwork" in str(info.value) and "factors=" in str(info.value)
    with pytest.raises(TypeError, match="alpha=2.0"):
        singular_values(net, alpha=2.0)
    with pytest.raises(TypeError, match="scales="):
        theoretical_rank(net, net.scales)
    with pytest.raises(TypeError, match="apply got a TeRANetwork"):
        apply(net, net.factors, net.scales, np.ones(4))


# --- the value gives the loose arguments' results, bit for bit ------------------------------------


@settings(max_examples=40)
@given(spec_and_scales(zeros=True), seeds, alphas, factor_inits)
def test_delta_weight_of_a_network_equals_the_loose_path_float64(ss, seed, alpha, init):
    spec, scales = ss
    f = random_factors(spec, seed, init=init)
    net = TeRANetwork(spec, f, scales, alpha)
    loose = delta_weight(spec, f, scales, alpha)
    got = delta_weight(net)
    assert got.dtype == np.float64 and np.array_equal(got, loose)
    assert theoretical_rank(net) == theoretical_rank(spec, scales)
    assert theoretical_multilinear_ranks(net) == theoretical_multilinear_ranks(spec, scales)
    for a, b in zip(scaled_factors(net), scaled_factors(spec, f, scales, alpha)):
        assert (a is None and b is None) or np.array_equal(a, b)


@settings(max_examples=20)
@given(spec_and_scales(), seeds, alphas, st.sampled_from(("materialize", "factored")))
def test_apply_and_the_spectrum_of_a_network_equal_the_loose_path(ss, seed, alpha, strategy):
    spec, scales = ss
    f = random_factors(spec, seed)
    net = TeRANetwork(spec, f, scales, alpha)
    x = np.random.default_rng(seed).standard_normal((3, spec.d_in))
    assert np.array_equal(apply(net, x, strategy=strategy), apply(spec, f, scales, x, alpha=alpha, strategy=strategy))
    assert np.array_equal(singular_values(net), singular_values(spec, f, scales, alpha))
    assert tera_rank_summary(net) == tera_rank_summary(spec, f, scales, alpha)
    assert conditioning(net).to_dict() == conditioning(spec, f, scales, alpha).to_dict()
    assert plan(net, 3) is plan(spec, 3)


def test_a_network_keeps_its_operands_backends():
    spec = TeRASpec((2, 3), (4,), diag="mode")
    f = random_factors(spec, 1)
    lams = [torch.tensor(s, requires_grad=True) for s in init_scales(spec, "random", seed=2)]
    net = TeRANetwork(spec, f, lams, 0.5)
    assert net.scales[0] is lams[0] and net.factors is f  # held as given: no copy, no conversion
    dw = delta_weight(net)
    assert isinstance(dw, torch.Tensor) and dw.dtype == torch.float64
    assert torch.equal(dw, delta_weight(spec, f, lams, 0.5))
    dw.sum().backward()
    assert lams[0].grad is not None
    jnp = pytest.importorskip("jax.numpy")
    jnet = TeRANetwork(spec, f, [jnp.asarray(s, dtype=jnp.float32) for s in init_scales(spec, "random", seed=2)])
    assert np.array_equal(np.asarray(delta_weight(jnet)), np.asarray(delta_weight(spec, f, jnet.scales)))


# --- checked once: counted ------------------------------------------------------------------------


def _count_checks(monkeypatch) -> dict:
    """From now on, count the calls of check_spec, check_factors and check_scales, in whichever
    tera_tn module they were imported into."""
    originals = {"check_spec": spec_module.check_spec, "check_factors": factors_module.check_factors,
                 "check_scales": factors_module.check_scales}
    counts = dict.fromkeys(originals, 0)

    def counting(name, original):
        def wrapped(*args, **kwargs):
            counts[name] += 1
            return original(*args, **kwargs)
        return wrapped

    for module in [m for name, m in list(sys.modules.items()) if name == "tera_tn" or name.startswith("tera_tn.")]:
        for name, original in originals.items():
            if getattr(module, name, None) is original:
                monkeypatch.setattr(module, name, counting(name, original))
    return counts


# padded rows and reduced ranks: every branch of the spectrum's structured route
SPEC = TeRASpec((2, 3), (4, 2), ranks=(2, 2, 3, 2), d_out=5)
X = np.ones((2, SPEC.d_in))
CALLS = {
    "delta_weight": lambda *a: delta_weight(*a),
    "scaled_factors": lambda *a: scaled_factors(*a),
    "apply": lambda *a: apply(*a, X),
    "singular_values": lambda *a: singular_values(*a),
    "rank_summary": lambda *a: tera_rank_summary(*a),
    "conditioning": lambda *a: conditioning(*a),
}


@pytest.mark.parametrize("call", list(CALLS))
def test_loose_arguments_are_checked_exactly_once(call, monkeypatch):
    f, s = random_factors(SPEC, 0), init_scales(SPEC, "random", seed=1)
    counts = _count_checks(monkeypatch)
    CALLS[call](SPEC, f, s)
    assert counts == {"check_spec": 1, "check_factors": 1, "check_scales": 1}


@pytest.mark.parametrize("call", list(CALLS))
def test_a_network_is_never_checked_again(call, monkeypatch):
    net = TeRANetwork(SPEC, random_factors(SPEC, 0), init_scales(SPEC, "random", seed=1))
    counts = _count_checks(monkeypatch)
    CALLS[call](net)
    assert theoretical_rank(net) == SPEC.max_rank and plan(net, 4).spec is SPEC
    assert counts == {"check_spec": 0, "check_factors": 0, "check_scales": 0}
