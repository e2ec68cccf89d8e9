"""The public API stays small, is listed on one docs page, and renamed names still resolve (with a warning)."""

from __future__ import annotations

import importlib
import re
import warnings
from pathlib import Path

import pytest

PACKAGES = ("tera_tn", "tera_tn.torch", "tera_tn.peft")
API_PAGE = Path(__file__).resolve().parents[1] / "docs" / "api" / "index.md"

DEPRECATED = {
    "tera_tn": {
        "tera_singular_values": "tera_tn.singular_values",
        "tera_conditioning": "tera_tn.conditioning",
        "scaled_factors": "tera_tn.network.scaled_factors",
        "StrategyCost": "tera_tn.contraction.StrategyCost",
        "LayerCost": "tera_tn.accounting.LayerCost",
        "MethodTotals": "tera_tn.accounting.MethodTotals",
        "layer_cost": "tera_tn.accounting.layer_cost",
        "method_totals": "tera_tn.accounting.method_totals",
    },
    "tera_tn.torch": {
        "FrozenNetwork": "tera_tn.torch.autograd.FrozenNetwork",
        "TeRALinearFunction": "tera_tn.torch.autograd.TeRALinearFunction",
        "ddp_ignore_factor_bank": "tera_tn.torch.model.ddp_ignore_factor_bank",
        "LayerSummary": "tera_tn.torch.model.LayerSummary",
        "LayerPlan": "tera_tn.torch.planning.LayerPlan",
        "layer_plan": "tera_tn.torch.planning.layer_plan",
    },
    "tera_tn.peft": {
        "SUPPORTED_PEFT": "tera_tn.peft._compat.SUPPORTED_PEFT",
        "TESTED_PEFT_VERSIONS": "tera_tn.peft._compat.TESTED_PEFT_VERSIONS",
    },
}


def _module(name: str):
    if name == "tera_tn.torch":
        pytest.importorskip("torch")
    if name == "tera_tn.peft":
        pytest.importorskip("peft")
    return importlib.import_module(name)


def _resolve(dotted: str):
    module, _, attr = dotted.rpartition(".")
    return getattr(importlib.import_module(module), attr)


def test_public_api_has_at_most_40_names_all_documented_on_one_page():
    names = [(pkg, n) for pkg in PACKAGES for n in _module(pkg).__all__]
    assert len(names) <= 40, f"{len(names)} public names: {names}"
    page = API_PAGE.read_text(encoding="utf-8")
    documented = set(re.findall(r"`([A-Za-z_][A-Za-z0-9_]*)`", page))
    assert [f"{pkg}.{n}" for pkg, n in names if n not in documented] == []
    for pkg, n in names:
        assert getattr(_module(pkg), n) is not None


def test_no_public_name_repeats_the_package_prefix():
    import tera_tn

    assert [n for n in tera_tn.__all__ if n.startswith("tera_")] == []


@pytest.mark.parametrize("pkg, old", [(p, o) for p, olds in DEPRECATED.items() for o in olds])
def test_deprecated_alias_warns_and_resolves_to_the_new_object(pkg, old):
    module = _module(pkg)
    assert old not in module.__all__
    with pytest.warns(DeprecationWarning, match=rf"{re.escape(pkg)}\.{old} is deprecated.*use {re.escape(DEPRECATED[pkg][old])}"):
        got = getattr(module, old)
    assert got is _resolve(DEPRECATED[pkg][old])
    assert old in API_PAGE.read_text(encoding="utf-8")


def test_unknown_names_still_raise_attribute_error_without_warning():
    import tera_tn

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(AttributeError, match="module 'tera_tn' has no attribute 'no_such_name'"):
            tera_tn.no_such_name  # noqa: B018
        from tera_tn import accounting  # submodules still import through the package

    assert accounting.method_totals is _resolve("tera_tn.accounting.method_totals")
