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


def ft(*argv: str) -> list[str]:
    """``tera-tn finetune`` on the good data file unless a row names another."""
    return ["finetune", *(() if "--data-path" in argv else ("--data-path", "data/good.csv")), *argv]


#: data files of the finetune rows, written into ``data/`` (name -> bytes)
DATA = {
    "good.csv": b"text,label\na fine film,pos\na dull film,neg\ngreat,pos\nawful,neg\n",
    "latin1.csv": "text,label\ncaf\u00e9 cr\u00e8me,pos\nbad,neg\n".encode("latin-1"),
    "utf16.csv": "text,label\ngood,pos\nbad,neg\n".encode("utf-16"),
    "no-label-cell.csv": b"text,label\ngood,pos\nbad\n",
    "empty-label.csv": b"text,label\ngood,pos\nbad,\n",
    "empty-text.csv": b"text,label\ngood,pos\n ,neg\n",
    "extra-cells.csv": b"text,label\ngood,pos\nbad, really,neg\n",
    "null-label.jsonl": b'{"text": "good", "label": "pos"}\n{"text": "bad", "label": null}\n',
    "null-text.jsonl": b'{"text": "good", "label": "pos"}\n{"text": null, "label": "neg"}\n',
    "bool-label.jsonl": b'{"text": "good", "label": true}\n{"text": "bad", "label": false}\n',
    "nested-label.jsonl": b'{"text": "good", "label": ["pos"]}\n{"text": "bad", "label": "neg"}\n',
    "nan-label.jsonl": b'{"text": "good", "label": 1}\n{"text": "bad", "label": NaN}\n',
    "mixed-labels.csv": b"text,label\ngood,1\nbad,0\nso-so,meh\n",
    "bad-line.jsonl": b'{"text": "good", "label": "pos"}\n{"text": "bad", "label": neg}\n',
    "array-bad-record.json": b'[{"text": "good", "label": "pos"}, ["bad", "neg"]]',
    "one-class.csv": b"text,label\ngood,pos\ngreat,pos\n",
    "other-label.csv": b"text,label\ngood,pos\nunsure,maybe\n",
    "null-label-val.jsonl": b'{"text": "good", "label": "pos"}\n{"text": "bad"}\n',
}

CASES += [
    # finetune: data files
    cmd("finetune-latin1-data", ft("--data-path", "data/latin1.csv"), "data/latin1.csv", "0xe9", "line 2", "latin-1"),
    cmd("finetune-utf16-data", ft("--data-path", "data/utf16.csv"), "data/utf16.csv", "utf-16"),
    cmd("finetune-unknown-encoding", ft("--encoding", "klingon"), "klingon", "codec"),
    cmd("finetune-row-without-label", ft("--data-path", "data/no-label-cell.csv"), "no-label-cell.csv", "line 3",
        "'label'"),
    cmd("finetune-empty-label", ft("--data-path", "data/empty-label.csv"), "empty-label.csv", "line 3", "empty 'label'"),
    cmd("finetune-empty-text", ft("--data-path", "data/empty-text.csv"), "empty-text.csv", "line 3", "empty 'text'"),
    cmd("finetune-unquoted-comma", ft("--data-path", "data/extra-cells.csv"), "extra-cells.csv", "line 3", "quotes"),
    cmd("finetune-null-label", ft("--data-path", "data/null-label.jsonl"), "null-label.jsonl", "line 2", "null"),
    cmd("finetune-null-text", ft("--data-path", "data/null-text.jsonl"), "null-text.jsonl", "line 2", "'text'"),
    cmd("finetune-boolean-label", ft("--data-path", "data/bool-label.jsonl"), "bool-label.jsonl", "line 1", "boolean"),
    cmd("finetune-nested-label", ft("--data-path", "data/nested-label.jsonl"), "nested-label.jsonl", "line 1", "array"),
    cmd("finetune-nan-label", ft("--data-path", "data/nan-label.jsonl"), "nan-label.jsonl", "line 2", "non-finite"),
    cmd("finetune-mixed-labels", ft("--data-path", "data/mixed-labels.csv"), "mixed-labels.csv", "numbers and text",
        "'meh'"),
    cmd("finetune-bad-jsonl-line", ft("--data-path", "data/bad-line.jsonl"), "bad-line.jsonl", "line 2",
        "not valid json"),
    cmd("finetune-json-array-bad-record", ft("--data-path", "data/array-bad-record.json"), "array-bad-record.json",
        "record 2", "object"),
    cmd("finetune-one-class-training", ft("--data-path", "data/one-class.csv"), "one-class.csv", "'pos'", "at least 2"),
    cmd("finetune-validation-unknown-label", ft("--validation-path", "data/other-label.csv"), "other-label.csv",
        "'maybe'", "training data lacks"),
    cmd("finetune-validation-missing-label", ft("--validation-path", "data/null-label-val.jsonl"),
        "null-label-val.jsonl", "line 2", "'label'"),
    cmd("finetune-missing-data-file", ft("--data-path", "data/nothing.csv"), "data/nothing.csv", "not a file"),
    cmd("finetune-unknown-column", ft("--text-column", "body"), "'body'", "found"),
    # finetune: numeric options
    cmd("finetune-max-length-beyond-model", ft("--max-length", "100000"), "100000", "512"),
    cmd("finetune-zero-max-length", ft("--max-length", "0"), "'0'", "positive"),
    cmd("finetune-threads-beyond-cpus", ft("--threads", "100000"), "100000", "cpus"),
    cmd("finetune-negative-threads", ft("--threads", "-1"), "'-1'", "non-negative"),
    cmd("finetune-zero-lr", ft("--lr", "0"), "'0'", "positive"),
    cmd("finetune-infinite-lr", ft("--lr", "inf"), "'inf'", "positive"),
    cmd("finetune-negative-head-lr", ft("--head-lr", "-1"), "'-1'", "positive"),
    cmd("finetune-zero-steps", ft("--steps", "0"), "'0'", "positive"),
    cmd("finetune-zero-batch", ft("--batch-size", "0"), "'0'", "positive"),
    cmd("finetune-zero-epochs", ft("--epochs", "0"), "'0'", "positive"),
    cmd("finetune-val-fraction-one", ft("--val-fraction", "1"), "'1'", "(0, 1)"),
    cmd("finetune-negative-seed", ft("--seeds", "-1"), "'-1'", "non-negative"),
    cmd("finetune-repeated-seed", ft("--seeds", "1,1"), "'1,1'", "distinct"),
    # finetune: adapter arguments, checked before the model loads
    cmd("finetune-unknown-adapter-option", ft("--adapter", "bogus=1"), "'bogus'", "TeraConfig", "order"),
    cmd("finetune-adapter-wrong-type", ft("--method", "lora", "--adapter", "r=x"), "r='x'", "LoraConfig"),
    cmd("finetune-adapter-not-key-value", ft("--adapter", "order"), "'order'", "KEY=VALUE"),
    cmd("finetune-unknown-method", ft("--method", "loha"), "loha", "invalid choice"),
    # finetune: output folder
    cmd("finetune-out-is-a-file", ft("-o", "afile"), "afile", "not a folder"),
    cmd("finetune-out-not-empty", ft("-o", "full"), "full", "--overwrite"),
    cmd("finetune-out-foreign-folder-with-overwrite", ft("-o", "full", "--overwrite"), "full", "refusing to delete"),
    cmd("finetune-out-unwritable", ft("-o", "/proc/x"), "/proc/x", "writable folder"),
]


def _no_model(*args, **kwargs):
    raise AssertionError("a bad argument must be reported before the model loads")


@pytest.fixture(autouse=True)
def _workdir(tmp_path, monkeypatch):
    """A fresh folder holding a file ``afile``, a non-empty user folder ``full``, a plot ``old.png``,
    a folder named ``full.png`` and the finetune rows' data files in ``data/``; no row may load a
    model or leave an output folder behind."""
    from tera_tn import finetune

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(finetune, "load_model", _no_model)
    (tmp_path / "data").mkdir()
    for name, data in DATA.items():
        (tmp_path / "data" / name).write_bytes(data)
    (tmp_path / "afile").write_text("x")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "config.json").write_text("{}")
    (tmp_path / "old.png").write_bytes(b"png")
    (tmp_path / "full.png").mkdir()
    yield
    assert (tmp_path / "full" / "config.json").read_text() == "{}"  # no row may touch user files
    assert (tmp_path / "old.png").read_bytes() == b"png"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile", "data", "full", "full.png", "old.png"]
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == sorted(DATA)


@params(CASES)
def test_command_error_is_one_line(case):
    assert_teaches(case)
