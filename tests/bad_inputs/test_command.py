"""Bad input to the ``tera-tn`` command: each is one ``error:`` line on stderr, exit 2, no traceback.

A row runs ``tera_tn.cli.main(argv)`` in a fresh folder; the call counts as teaching when the
status is 2 and stderr is exactly one ``tera-tn ...: error: ...`` line, which then must name the
offending value and what was expected. Anything else (status 0 or 1, several lines, an exception
escaping ``main``) fails the row.
"""

from __future__ import annotations

import contextlib
import io

import pytest

pytest.importorskip("matplotlib")
pytest.importorskip("rich")

from tera_tn.cli import main  # noqa: E402

from .teach import Case, assert_teaches, params  # noqa: E402


class CommandError(Exception):
    """The single error line a failed command printed."""


def _run(*argv: str):
    def call():
        err = io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            status = main(list(argv))
        lines = err.getvalue().strip().splitlines()
        assert status == 2, f"exit status {status}, expected 2; stderr: {err.getvalue()!r}"
        assert len(lines) == 1 and ": error: " in lines[0], f"expected one 'error:' line, got {lines!r}"
        raise CommandError(lines[0])

    return call


def cmd(id: str, argv: list[str], *needles: str) -> Case:
    return Case(id, _run(*argv), CommandError, needles)


CASES = [
    cmd("unknown-command", ["bogus"], "bogus", "invalid choice"),
    # report: output folder
    cmd("report-out-unwritable", ["report", "--out", "/proc/x"], "/proc/x", "writable folder"),
    cmd("report-out-under-a-file", ["report", "--out", "afile/sub"], "afile/sub", "writable folder"),
    cmd("report-out-is-a-file", ["report", "--out", "afile"], "afile", "not a folder"),
    cmd("report-out-empty", ["report", "--out", ""], "''", "folder path"),
    cmd("report-out-not-empty", ["report", "--out", "full", "--no-plots"], "full", "--force"),
    cmd("report-out-foreign-folder-with-force", ["report", "--out", "full", "--force"], "full", "refusing to delete"),
    # report: other arguments
    cmd("report-unknown-model", ["report", "--models", "gpt-17"], "gpt-17"),
    cmd("report-bad-method", ["report", "--methods", "lora:r=zero"], "zero"),
    cmd("report-unknown-method", ["report", "--methods", "dora:r=8"], "dora"),
    cmd("report-bad-format", ["report", "--formats", "gif"], "gif", "png, svg"),
    cmd("report-empty-formats", ["report", "--formats", ","], "','", "png, svg"),
    cmd("report-unmatched-targets", ["report", "--models", "minilm", "--targets", "nothing_here"], "nothing_here"),
    cmd("report-negative-seed", ["report", "--seed", "-1"], "'-1'", "non-negative"),
    cmd("report-zero-width", ["report", "--width", "0"], "'0'", "positive"),
    cmd("report-text-max-side", ["report", "--structured-max-side", "x"], "'x'", "positive"),
    cmd("report-bad-spectra-shape", ["report", "--spectra-shape", "768"], "'768'", "D_OUTxD_IN"),
    cmd("report-zero-planner-shape", ["report", "--planner-shape", "0x64"], "'0x64'", "positive"),
    cmd("report-bad-achieved", ["report", "--achieved", "guess"], "guess", "invalid choice"),
    cmd("report-unknown-flag", ["report", "--bogus"], "--bogus"),
    # rank
    cmd("rank-no-shape", ["rank"], "shape", "--modes"),
    cmd("rank-half-shape", ["rank", "12x"], "'12x'", "D_OUTxD_IN"),
    cmd("rank-zero-shape", ["rank", "0x64"], "'0x64'", "positive"),
    cmd("rank-order-too-large", ["rank", "7x7", "--order", "9"], "9"),
    cmd("rank-order-text", ["rank", "64x64", "--order", "six"], "'six'", "6 or 3x3"),
    cmd("rank-fraction-above-one", ["rank", "64x64", "--ranks", "1.5"], "1.5"),
    cmd("rank-bad-ranks", ["rank", "64x64", "--ranks", "a/b"], "'a/b'", "R1/R2"),
    cmd("rank-modes-without-colon", ["rank", "--modes", "4.4"], "'4.4'", "ROW_MODES:COL_MODES"),
    cmd("rank-dense-too-large", ["rank", "8192x8192", "--dense", "--no-structured"], "8192", "4096"),
    cmd("rank-bad-scales", ["rank", "64x64", "--scales", "big"], "big", "invalid choice"),
    # plan
    cmd("plan-no-tokens", ["plan", "64x64"], "--tokens"),
    cmd("plan-zero-tokens", ["plan", "64x64", "-n", "0"], "'0'", "positive"),
    cmd("plan-bad-backend", ["plan", "64x64", "-n", "8", "--backend", "mxnet"], "mxnet", "invalid choice"),
    cmd("plan-bad-dtype", ["plan", "64x64", "-n", "8", "--dtype", "int8"], "int8", "invalid choice"),
    cmd("plan-plot-bad-suffix", ["plan", "64x64", "-n", "8", "--plot", "x.gif"], "x.gif", ".png, .svg or .pdf"),
    cmd("plan-plot-unwritable", ["plan", "64x64", "-n", "8", "--plot", "/proc/x/p.png"], "/proc/x/p.png", "writable folder"),
    cmd("plan-plot-exists", ["plan", "64x64", "-n", "8", "--plot", "old.png"], "old.png", "--force"),
    cmd("plan-plot-is-a-folder", ["plan", "64x64", "-n", "8", "--plot", "full.png"], "full.png", "folder"),
]


@pytest.fixture(autouse=True)
def _workdir(tmp_path, monkeypatch):
    """A fresh folder holding a file ``afile``, a non-empty user folder ``full``, a plot ``old.png``
    and a folder named ``full.png``."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "afile").write_text("x")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "config.json").write_text("{}")
    (tmp_path / "old.png").write_bytes(b"png")
    (tmp_path / "full.png").mkdir()
    yield
    assert (tmp_path / "full" / "config.json").read_text() == "{}"  # no row may touch user files
    assert (tmp_path / "old.png").read_bytes() == b"png"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile", "full", "full.png", "old.png"]


@params(CASES)
def test_command_error_is_one_line(case):
    assert_teaches(case)
