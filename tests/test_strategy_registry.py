"""The strategy registry is the one list of strategies: planners, autograd and options read it."""

from __future__ import annotations

import dataclasses

import pytest

from tera_tn.contract import strategies
from tera_tn.contract.contraction import STRATEGIES
from tera_tn.contract.strategies import PREFERENCE, REGISTRY, get_strategy, strategy_names
from tera_tn.core.spec import TeRASpec


def test_registry_names_every_strategy():
    assert strategy_names() == ("materialize", "dense", "factored")
    assert strategy_names(layer=False) == ("materialize", "factored")
    assert STRATEGIES == ("auto", "materialize", "factored")
    assert sorted(PREFERENCE) == sorted(REGISTRY)
    for name, s in REGISTRY.items():
        assert s.name == name and s.description
        with pytest.raises(dataclasses.FrozenInstanceError):
            s.name = "other"  # type: ignore[misc]


def test_unknown_name_lists_the_registry():
    with pytest.raises(ValueError, match=r"strategy must be one of the registered \('materialize', 'dense', 'factored'\), got 'einsum'"):
        get_strategy("einsum")
    with pytest.raises(ValueError, match="registered"):
        get_strategy(["materialize"])


def test_torch_options_and_autograd_follow_the_registry():
    torch = pytest.importorskip("torch")
    from tera_tn.torch.autograd import TeRALinearFunction
    from tera_tn.torch.config import LAYER_STRATEGIES

    assert LAYER_STRATEGIES == ("auto",) + strategy_names()
    x = torch.randn(3, 8)
    with pytest.raises(ValueError, match="registered"):
        TeRALinearFunction.apply(x, None, None, None, 1.0, "einsum")


def test_layer_costs_come_from_the_registry():
    from tera_tn import plan
    from tera_tn.contract.costmodel import cost_model
    from tera_tn.torch.planning import layer_plan

    spec = TeRASpec.from_shape(256, 256, order=4)
    model = cost_model()
    for training in (False, True):
        for n in (1, 64, 8192):
            lp = layer_plan(spec, n, training=training)
            terms = strategies.layer_terms(spec, n, training, 4, model, plan(spec, n).costs)
            for name in REGISTRY:
                assert getattr(lp, name) == REGISTRY[name].layer_seconds(terms, training)
            allowed = [k for k in PREFERENCE if training or not REGISTRY[k].training_only]
            assert lp.strategy == min(allowed, key=lambda k: getattr(lp, k))
