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
        "scaled_factors": "tera_tn.core.network.scaled_factors",
        "StrategyCost": "tera_tn.contract.contraction.StrategyCost",
        "LayerCost": "tera_tn.analysis.accounting.LayerCost",
        "MethodTotals": "tera_tn.analysis.accounting.MethodTotals",
        "layer_cost": "tera_tn.analysis.accounting.layer_cost",
        "method_totals": "tera_tn.analysis.accounting.method_totals",
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
        from tera_tn.analysis import accounting  # submodules still import through the package

    assert accounting.method_totals is _resolve("tera_tn.analysis.accounting.method_totals")


PACKAGE_DIR = Path(__file__).resolve().parents[1] / "tera_tn"
MOVED_MODULES = {
    "tera_tn.spec": "tera_tn.core.spec",
    "tera_tn.factorize": "tera_tn.core.factorize",
    "tera_tn.tensorize": "tera_tn.core.tensorize",
    "tera_tn.factors": "tera_tn.core.factors",
    "tera_tn.network": "tera_tn.core.network",
    "tera_tn.modeproduct": "tera_tn.core.modeproduct",
    "tera_tn.costmodel": "tera_tn.contract.costmodel",
    "tera_tn.contraction": "tera_tn.contract.contraction",
    "tera_tn.rank": "tera_tn.analysis.rank",
    "tera_tn.spectrum": "tera_tn.analysis.spectrum",
    "tera_tn.accounting": "tera_tn.analysis.accounting",
    "tera_tn.shapes": "tera_tn.analysis.shapes",
    "tera_tn.report": "tera_tn.analysis.report",
    "tera_tn.plot": "tera_tn.analysis.plot",
}


@pytest.mark.parametrize("old, new", sorted(MOVED_MODULES.items()))
def test_old_module_path_imports_with_a_warning_as_the_same_module(old, new, monkeypatch):
    import sys

    import tera_tn

    function = tera_tn.tensorize
    monkeypatch.delitem(sys.modules, old, raising=False)  # a fresh import through the alias
    with pytest.warns(DeprecationWarning, match=rf"{re.escape(old)} is deprecated.*use {re.escape(new)}$"):
        got = importlib.import_module(old)
    assert got is importlib.import_module(new) is sys.modules[old] is sys.modules[new]
    assert got.__name__ == got.__spec__.name == new
    assert tera_tn.tensorize is function  # an old module path does not hide the function of that name

    # patching through the old path patches the new one (tera_tn.tensorize the name is the function)
    attr = next(n for n, v in vars(got).items() if getattr(v, "__module__", None) == new and callable(v))
    if old == "tera_tn.tensorize":
        monkeypatch.setattr(sys.modules[old], attr, "patched")
    else:
        with pytest.warns(DeprecationWarning, match=re.escape(new)):  # resolved through the package
            monkeypatch.setattr(f"{old}.{attr}", "patched")
    assert getattr(importlib.import_module(new), attr) == "patched"


def test_old_module_attribute_of_the_package_warns_and_is_the_new_module():
    import tera_tn

    with pytest.warns(DeprecationWarning, match=r"tera_tn\.rank is deprecated.*use tera_tn\.analysis\.rank"):
        got = tera_tn.rank
    assert got is importlib.import_module("tera_tn.analysis.rank")


def _imported_modules(path: Path) -> set[str]:
    """Absolute dotted names of the tera_tn modules (or packages) that ``path`` imports, top-level
    and function-level imports alike."""
    import ast

    rel = path.relative_to(PACKAGE_DIR.parent).with_suffix("")
    package = list(rel.parts[:-1])  # a module's package; an __init__.py is its own package
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            module = ".".join(base + ([node.module] if node.module else []))
            found.add(module)
            found.update(f"{module}.{a.name}" for a in node.names)
    return {m for m in found if m == "tera_tn" or m.startswith("tera_tn.")}


@pytest.mark.parametrize(
    "layer, forbidden",
    [
        ("core", ("contract", "analysis", "torch", "peft", "cli", "finetune")),
        ("contract", ("analysis", "torch", "peft", "cli", "finetune")),
        ("analysis", ("torch", "peft", "cli", "finetune")),
    ],
)
def test_imports_run_down_the_layers_only(layer, forbidden):
    files = sorted((PACKAGE_DIR / layer).glob("*.py"))
    assert files, layer
    upward = [
        f"{f.relative_to(PACKAGE_DIR.parent)} imports {m}"
        for f in files
        for m in sorted(_imported_modules(f))
        if any(m == f"tera_tn.{up}" or m.startswith(f"tera_tn.{up}.") for up in forbidden)
    ]
    assert upward == []


def test_layer_check_sees_an_upward_import(tmp_path):
    assert "tera_tn.analysis.rank" in _imported_modules(PACKAGE_DIR / "cli.py")
    assert "tera_tn.core.spec" in _imported_modules(PACKAGE_DIR / "contract" / "contraction.py")


def test_every_entry_point_takes_its_order_and_diag_defaults_from_the_spec():
    """The defaults live in one place: changing DEFAULT_ORDER or DEFAULT_DIAG changes them all."""
    from tera_tn import DEFAULT_DIAG, DEFAULT_ORDER
    from tera_tn.analysis.accounting import method_totals
    from tera_tn.analysis.report import Method
    from tera_tn.cli import build_parser

    pinned = (DEFAULT_ORDER, DEFAULT_DIAG)
    assert pinned == (3, "mode")
    m = Method("tera")
    assert (m.order, m.diag) == pinned and m.label == f"TeRA order {DEFAULT_ORDER}"
    assert method_totals("tera", [(384, 384)]) == method_totals("tera", [(384, 384)], order=3, diag="mode")
    for command in ("rank", "plan"):
        args = build_parser().parse_args([command, "64x64"] + (["-n", "1"] if command == "plan" else []))
        assert (args.order, args.diag) == pinned
    TeRAConfig = _module("tera_tn.torch").TeRAConfig
    assert (TeRAConfig().order, TeRAConfig().diag) == pinned
    TeraConfig = _module("tera_tn.peft").TeraConfig
    assert (TeraConfig().order, TeraConfig().diag) == pinned
