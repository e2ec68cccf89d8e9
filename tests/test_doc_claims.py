"""Statements of the documentation checked against the code they describe: defaults printed by
``--help``, numbers quoted in README.md and docs/concepts.md, and the PEFT Limitations list.

Each test reads the sentence from the page itself, so editing either side alone fails here.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tera_tn import TeRASpec
from tera_tn.analysis.report import DEFAULT_METHODS
from tera_tn.core.spec import BUDGET_FAMILIES, DEFAULT_DIAG, DEFAULT_ORDER

ROOT = Path(__file__).resolve().parents[1]


def _number(text: str) -> int:
    return int(text.replace(",", ""))


def _section(page: str, heading: str) -> str:
    text = (ROOT / page).read_text()
    match = re.search(rf"^## {re.escape(heading)}\n(.*?)(?=^## |\Z)", text, re.M | re.S)
    assert match, f"{page} has no '## {heading}' section"
    return match.group(1)


def test_report_help_prints_the_default_methods_the_report_runs():
    from tera_tn.cli import build_parser

    parser = build_parser()
    report = next(a for a in parser._actions if a.dest == "command").choices["report"]
    methods = next(a for a in report._actions if a.dest == "methods")
    help_text = " ".join(methods.help.split())
    default = help_text.split("(default:", 1)[1]
    assert default.split(";")[0].split() == list(DEFAULT_METHODS)
    assert f"order {DEFAULT_ORDER}" in default and f"diag={DEFAULT_DIAG!r}" in default
    report.format_help()  # argparse %-formats help strings: the text must survive it


def test_readme_counts_are_the_specs_counts():
    readme = " ".join((ROOT / "README.md").read_text().split())
    claim = re.search(r"a 4096×4096 layer trains ([\d,]+) numbers with the defaults \(order (\d+), diagonals on the "
                      r"(\w+) side\) and ([\d,]+) at order (\d+)", readme)
    assert claim, "README.md no longer states what a 4096×4096 layer trains"
    default = TeRASpec.from_shape(4096, 4096)
    assert (_number(claim.group(1)), int(claim.group(2)), claim.group(3)) == (default.num_trainable, DEFAULT_ORDER, DEFAULT_DIAG)
    assert _number(claim.group(4)) == TeRASpec.from_shape(4096, 4096, order=int(claim.group(5))).num_trainable
    quick = re.search(r"from_shape\(4096, 4096, order=(\d+)\)\s+# \S+, trains (\d+) numbers", readme)
    assert quick and _number(quick.group(2)) == TeRASpec.from_shape(4096, 4096, order=int(quick.group(1))).num_trainable


def test_concepts_describe_what_for_budget_returns():
    text = " ".join(_section("docs/concepts.md", "Choosing by parameter budget").split())
    orders = sorted({order for _, order, _ in BUDGET_FAMILIES})
    assert f"orders {orders[0]}–{orders[-1]}" in text and orders == list(range(orders[0], orders[-1] + 1))
    rows = {(diag, ranks) for diag, _, ranks in BUDGET_FAMILIES}
    assert rows == {("mode", "full"), ("rank", 0.5), ("both", "full"), ("both", 0.5)}
    assert "mode-side diagonals at full ranks, rank-side diagonals at half ranks, and diagonals on both sides at full and at half ranks" in text
    examples = re.search(r"\(at 768×768 (.*?)\)\.", text)
    assert examples, "the section no longer gives for_budget examples"
    found = 0
    for part in examples.group(1).split(";"):
        m = re.search(r"([\d,]+) gives .*?(both|mode|rank)\S* .*?order (\d+), ([\d,]+)", part)
        assert m, f"cannot read the example {part!r}"
        spec = TeRASpec.for_budget(768, 768, _number(m.group(1)))
        assert (spec.diag, spec.order, spec.num_trainable) == (m.group(2), int(m.group(3)), _number(m.group(4))), part
        found += 1
    assert found >= 3


def test_peft_limitations_claim_nothing_unsupported_that_is_supported():
    limitations = " ".join(_section("docs/peft.md", "Limitations").split())
    pytest.importorskip("peft")
    from tera_tn.peft.config import TeraConfig
    from tera_tn.peft.quantized import KINDS

    # cache_delta keeps W0 + ΔW between calls: the list must not say nothing caches it.
    assert "cache_delta" in TeraConfig.__dataclass_fields__
    assert not re.search(r"does not cache `?W0 \+ ΔW", limitations)
    assert "cache_delta=True" in limitations
    # bitsandbytes 8-/4-bit and torchao int8 bases are adapted (tera_tn.peft.quantized).
    assert {k.split("-")[0] for k in KINDS} == {"bnb", "torchao"}
    unsupported = re.findall(r"\(no ([^)]*)\)", limitations)
    assert unsupported and not any("bitsandbytes" in u or "quantized" in u or "torchao" in u for u in unsupported)
    assert re.search(r"bitsandbytes 8-/4-bit and torchao int8 weight-only `Linear` bases are adapted", limitations)
