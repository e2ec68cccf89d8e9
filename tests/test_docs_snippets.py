"""Every ```python block of README.md and docs/*.md runs, so the documented code cannot drift from the library.

The blocks of one page run in order in one namespace (a later block may use what an earlier one
built), inside a temporary working directory. Tracebacks point at the page and its line. A block
opts out only with a first line ``# doctest: skip - <reason>``; the opt-outs are listed in
``OPT_OUTS`` below, so adding one is a visible change to this file. Blocks that only include an
example script (``--8<-- "examples/..."``) are not run here: tests/test_examples.py runs those
scripts.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```python[^\n]*\n(.*?)^```[ \t]*$", re.M | re.S)
SKIP = re.compile(r"#\s*doctest:\s*skip\b\s*[-:]?\s*(.*)")
INCLUDE = re.compile(r'^--8<--\s+"[^"]+"\s*$')

# (page, first code line of the block) -> why it cannot run in the suite (a GPU, or minutes of
# work). Empty today: every documented block runs.
OPT_OUTS: dict[tuple[str, str], str] = {}
# Pages that train through PEFT without naming it in their code.
USES_PEFT_INSIDE = {"docs/finetune.md"}


def _blocks(page: Path) -> list[tuple[int, str]]:
    """(line number of the block's first code line, code) for each ```python block of ``page``."""
    text = page.read_text(encoding="utf-8")
    return [(text.count("\n", 0, m.start(1)) + 1, m.group(1)) for m in FENCE.finditer(text)]


def _is_include(code: str) -> bool:
    lines = [line for line in code.splitlines() if line.strip()]
    return bool(lines) and all(INCLUDE.match(line.strip()) for line in lines)


def _skip_reason(code: str) -> str | None:
    first = code.lstrip("\n").splitlines()[0] if code.strip() else ""
    m = SKIP.match(first.strip())
    return m.group(1).strip() if m else None


def _runnable(page: Path) -> list[tuple[int, str]]:
    return [(line, code) for line, code in _blocks(page) if not _is_include(code) and _skip_reason(code) is None]


def _rel(page: Path) -> str:
    return page.relative_to(ROOT).as_posix()


RUN_PAGES = [page for page in PAGES if _runnable(page)]


def _param(page: Path):
    # PEFT pages also run in the lowest-supported-versions job (scripts/test-compat).
    uses_peft = _rel(page) in USES_PEFT_INSIDE or any("peft" in code for _, code in _runnable(page))
    return pytest.param(page, id=_rel(page), marks=[pytest.mark.peft] if uses_peft else [])


@pytest.mark.parametrize("page", [_param(p) for p in RUN_PAGES])
def test_page_snippets_run(page, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": f"docs_snippet_{page.stem.replace('-', '_')}"}
    for line, code in _runnable(page):
        # Leading newlines make the compiled line numbers those of the page itself.
        exec(compile("\n" * (line - 1) + code, str(page), "exec"), namespace)


def test_opt_outs_are_listed_and_explained():
    found = {}
    for page in PAGES:
        for _, code in _blocks(page):
            reason = _skip_reason(code)
            if reason is not None:
                first_code_line = next(ln for ln in code.splitlines()[1:] if ln.strip() and not ln.startswith("#"))
                found[(_rel(page), first_code_line.strip())] = reason
    assert all(found.values()), f"an opt-out must give its reason after '# doctest: skip -': {found}"
    assert set(found) == set(OPT_OUTS), (
        "opt-outs in the docs differ from OPT_OUTS in this file; keep them rare and listed:\n"
        f"  in the docs only: {sorted(set(found) - set(OPT_OUTS))}\n  listed only: {sorted(set(OPT_OUTS) - set(found))}"
    )


def test_extraction_finds_the_documented_code():
    # Guards the fence regex: a change that silently matched nothing would make the test above vacuous.
    rels = {_rel(p) for p in RUN_PAGES}
    assert {"README.md", "docs/index.md", "docs/torch.md", "docs/peft.md", "docs/howto-peft.md"} <= rels, rels
    readme = _runnable(ROOT / "README.md")
    assert any("TeRASpec.from_shape" in code for _, code in readme)
