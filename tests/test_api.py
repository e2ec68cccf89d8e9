"""The public API stays small, is listed on one docs page, and carries no pre-release aliases."""

from __future__ import annotations

import importlib
import re
import warnings
from pathlib import Path

import pytest

PACKAGES = ("tera_tn", "tera_tn.torch", "tera_tn.peft")
API_PAGE = Path(__file__).resolve().parents[1] / "docs" / "api" / "index.md"

#: names the pre-release layout had; 0.1.0 was never released, so they are gone rather than aliased
REMOVED = {
    "tera_tn": ("tera_singular_values", "tera_conditioning", "scaled_factors", "StrategyCost", "LayerCost",
                "MethodTotals", "layer_cost", "method_totals", "spec", "rank", "plot"),
    "tera_tn.torch": ("FrozenNetwork", "TeRALinearFunction", "ddp_ignore_factor_bank", "LayerSummary", "LayerPlan",
                      "layer_plan"),
    "tera_tn.peft": ("SUPPORTED_PEFT", "TESTED_PEFT_VERSIONS"),
}
OLD_MODULE_PATHS = ("tera_tn.spec", "tera_tn.factors", "tera_tn.network", "tera_tn.costmodel", "tera_tn.rank",
                    "tera_tn.plot")


def _module(name: str):
    if name == "tera_tn.torch":
        pytest.importorskip("torch")
    if name == "tera_tn.peft":
        pytest.importorskip("peft")
    return importlib.import_module(name)


def _resolve(dotted: str):
    module, _, attr = dotted.rpartition(".")
    return getattr(importlib.import_module(module), attr)


def test_public_api_has_at_most_30_names_all_documented_on_one_page():
    names = [(pkg, n) for pkg in PACKAGES for n in _module(pkg).__all__]
    assert len(names) <= 30, f"{len(names)} public names: {names}"
    page = API_PAGE.read_text(encoding="utf-8")
    documented = set(re.findall(r"`([A-Za-z_][A-Za-z0-9_]*)`", page))
    assert [f"{pkg}.{n}" for pkg, n in names if n not in documented] == []
    for pkg, n in names:
        assert getattr(_module(pkg), n) is not None


def test_no_public_name_repeats_the_package_prefix():
    import tera_tn

    assert [n for n in tera_tn.__all__ if n.startswith("tera_")] == []


@pytest.mark.parametrize("pkg, old", [(p, o) for p, olds in REMOVED.items() for o in olds])
def test_pre_release_names_are_gone_without_an_alias(pkg, old):
    module = _module(pkg)
    assert old not in module.__all__
    if pkg == "tera_tn" and old in ("spec", "rank", "plot"):
        # a submodule imported elsewhere would be an attribute of its package; these never were
        assert old not in vars(module)
        return
    with pytest.raises(AttributeError):
        getattr(module, old)


@pytest.mark.parametrize("old", OLD_MODULE_PATHS)
def test_old_module_paths_do_not_import(old):
    import sys

    assert old not in sys.modules
    with pytest.raises(ModuleNotFoundError):
        importlib.import_module(old)


def test_unknown_names_still_raise_attribute_error_without_warning():
    import tera_tn

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(AttributeError, match="module 'tera_tn' has no attribute 'no_such_name'"):
            tera_tn.no_such_name  # noqa: B018
        from tera_tn.analysis import accounting  # submodules still import through the package

    assert accounting.method_totals is _resolve("tera_tn.analysis.accounting.method_totals")


PACKAGE_DIR = Path(__file__).resolve().parents[1] / "tera_tn"


def _imported_modules(path: Path, source: str | None = None) -> set[str]:
    """Absolute dotted names of the tera_tn modules (or packages) that the module at ``path`` (read
    from disk unless ``source`` is given) imports, top-level and function-level imports alike."""
    import ast

    rel = path.relative_to(PACKAGE_DIR.parent).with_suffix("")
    package = list(rel.parts[:-1])  # a module's package; an __init__.py is its own package
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8") if source is None else source)):
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


def _private_imports(path: Path, source: str | None = None) -> list[str]:
    """What the module at ``path`` imports from another tera_tn module under a private name (``_x``),
    or from a private module (``tera_tn._x``, ``tera_tn.y._x``)."""
    private = lambda name: name.startswith("_") and not name.startswith("__")  # noqa: E731
    return sorted(m for m in _imported_modules(path, source) if any(private(part) for part in m.split(".")))


def test_no_private_name_or_module_is_imported_across_modules():
    found = {str(f.relative_to(PACKAGE_DIR.parent)): _private_imports(f) for f in sorted(PACKAGE_DIR.rglob("*.py"))}
    assert {f: names for f, names in found.items() if names} == {}
    assert not [f for f in PACKAGE_DIR.rglob("_*.py") if f.name != "__init__.py" and f.name != "__main__.py"]


def test_private_import_check_sees_one():
    # a module that would sit in tera_tn/core (nothing is written into the package)
    probe = PACKAGE_DIR / "core" / "probe.py"
    source = "from .network import _secret\nfrom .._hidden import x\n"
    assert _private_imports(probe, source) == ["tera_tn._hidden", "tera_tn._hidden.x", "tera_tn.core.network._secret"]


def test_layer_check_sees_an_upward_import(tmp_path):
    assert "tera_tn.analysis.summary" in _imported_modules(PACKAGE_DIR / "cli" / "analysis.py")
    assert "tera_tn.core.spec" in _imported_modules(PACKAGE_DIR / "contract" / "contraction.py")


def test_every_entry_point_takes_its_order_and_diag_defaults_from_the_spec():
    """The defaults live in one place: changing DEFAULT_ORDER or DEFAULT_DIAG changes them all."""
    from tera_tn.core.spec import DEFAULT_DIAG, DEFAULT_ORDER
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
    TeRALayersConfig = _module("tera_tn.torch").TeRALayersConfig
    assert (TeRALayersConfig().order, TeRALayersConfig().diag) == pinned
    TeraConfig = _module("tera_tn.peft").TeraConfig
    assert (TeraConfig().order, TeraConfig().diag) == pinned


def test_the_version_has_one_home_and_matches_the_package_metadata():
    import tomllib

    import tera_tn
    from tera_tn.version import __version__

    declared = tomllib.loads((PACKAGE_DIR.parent / "pyproject.toml").read_text(encoding="utf-8"))["project"]["version"]
    assert tera_tn.__version__ is __version__ and __version__ == declared
