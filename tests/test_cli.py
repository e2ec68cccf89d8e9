"""The tera-tn command: help, one-line errors (exit 2), report folder, rank, plan."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("matplotlib")
pytest.importorskip("rich")
pytest.importorskip("tqdm")

from tera_tn.cli import main

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("argv", [["--help"], ["report", "--help"], ["rank", "--help"], ["plan", "--help"]])
def test_help(argv, capsys):
    assert main(argv) == 0
    assert "usage: tera-tn" in capsys.readouterr().out


@pytest.mark.parametrize("argv", [
    ["bogus"],
    ["report", "--bogus"],
    ["report", "--models", "no-such-model"],
    ["report", "--methods", "lora:r=zero"],
    ["report", "--formats", "gif"],
    ["rank"],
    ["rank", "12x"],
    ["rank", "7x7", "--order", "9"],
    ["rank", "64x64", "--ranks", "1.5"],
    ["plan", "64x64"],
    ["plan", "64x64", "--tokens", "0"],
    ["plan", "64x64", "-n", "8", "--plot", "x.gif"],
])
def test_bad_arguments_exit_2_with_one_line(argv, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "error:" in err, err


def test_report_small_folder_contents(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["report", "--no-progress", "--models", "minilm", "--out", "rep", "--formats", "png"]) == 0
    out = capsys.readouterr().out
    assert "all-MiniLM-L6-v2" in out and "TeRA order 6" in out
    assert out.strip().splitlines()[-1] == f"report written to {(tmp_path / 'rep').resolve()}/"
    files = sorted(p.name for p in (tmp_path / "rep").iterdir())
    assert files == sorted([".tera-tn-output.json", "README.md", "report.json", "report.txt",
                            "tradeoff-all-MiniLM-L6-v2.png", "spectra.png", "planner.png"])
    data = json.loads((tmp_path / "rep" / "report.json").read_text())
    (model,) = data["models"]
    assert model["model"] == "all-MiniLM-L6-v2" and model["n_layers"] == 36
    tera6 = [m for m in model["methods"] if m["label"] == "TeRA order 6"][0]
    assert tera6["max_rank"] == 384 and tera6["achieved_rank"] == 384
    assert set(data) >= {"settings", "tradeoff", "spectra", "planner", "files"}
    # never overwrite without --force
    assert main(["report", "--no-progress", "--models", "minilm", "--out", "rep", "--no-plots"]) == 2
    assert "--force" in capsys.readouterr().err
    assert main(["report", "--no-progress", "--models", "minilm", "--out", "rep", "--no-plots", "--force", "-q"]) == 0


def test_report_default_folder_is_new_each_time(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    for _ in range(2):
        assert main(["report", "-q", "--models", "minilm", "--no-plots"]) == 0
    lines = [l for l in capsys.readouterr().out.splitlines() if l.startswith("report written to")]
    assert len(lines) == 2 and lines[0] != lines[1]
    assert (tmp_path / "tera-tn-report" / "report.json").exists()
    assert len(list(tmp_path.glob("tera-tn-report-*"))) == 1


def test_report_no_arguments_console_script(tmp_path):
    """The README's main job: `tera-tn report` with no arguments, well under a minute."""
    env = dict(os.environ, MPLBACKEND="Agg", PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "-c", "import sys; from tera_tn.cli import main; sys.exit(main())", "report"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=170)
    assert proc.returncode == 0, proc.stderr[-2000:]
    folder = tmp_path / "tera-tn-report"
    assert f"report written to {folder.resolve()}/" in proc.stdout
    names = {p.name for p in folder.iterdir()}
    for model in ("all-MiniLM-L6-v2", "bert-base", "roberta-base", "roberta-large", "llama-2-7b", "llama-3-8b"):
        assert f"tradeoff-{model}.png" in names and f"tradeoff-{model}.svg" in names
        assert model in proc.stdout
    assert {"spectra.png", "spectra.svg", "planner.png", "planner.svg", "report.json", "report.txt"} <= names


def test_rank_json_and_dense_agree(capsys):
    assert main(["rank", "96x128", "--order", "4", "--dense", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["theoretical_rank"] == d["structured"]["float64"]["numerical_rank"] == d["dense"]["numerical_rank"] == 96
    assert d["trainable"] == sum(d["ranks"])
    assert main(["rank", "--modes", "4.4:4.4", "--ranks", "2/4/4/4"]) == 0
    out = capsys.readouterr().out
    assert "TeRASpec(16×16" in out and "theoretical rank" in out


def test_plan_explains_and_plots(tmp_path, capsys):
    assert main(["plan", "4096x4096", "--tokens", "8"]) == 0
    out = capsys.readouterr().out
    assert "chosen:" in out and "materialize" in out and "factored" in out
    png = tmp_path / "p.png"
    assert main(["plan", "1024x1024", "-n", "64", "--sweep", "--plot", str(png)]) == 0
    assert png.stat().st_size > 1000
    assert main(["plan", "1024x1024", "-n", "64", "--plot", str(png)]) == 2
    capsys.readouterr()
    assert main(["plan", "1024x1024", "-n", "64", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["strategy"] in ("materialize", "factored")


def test_finetune_subcommand_help(capsys):
    assert main(["finetune", "--help"]) == 0
    assert "usage: tera-tn finetune" in capsys.readouterr().out


def _must_not_run(*args, **kwargs):
    raise AssertionError("heavy work started before the arguments were checked")


def test_report_checks_out_before_computing(tmp_path, monkeypatch, capsys):
    from tera_tn.analysis import report

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(report, "model_report", _must_not_run)
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "keep.txt").write_text("mine")
    for out in ("/proc/x", "notes"):
        assert main(["report", "--no-progress", "--models", "minilm", "--out", out]) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and out in err and "Traceback" not in err
    assert main(["report", "--no-progress", "--models", "minilm", "--out", "notes", "--force"]) == 2
    assert "refusing to delete" in capsys.readouterr().err
    assert (tmp_path / "notes" / "keep.txt").read_text() == "mine"


def test_failed_report_leaves_no_folder(tmp_path, monkeypatch, capsys):
    from tera_tn.analysis import figures

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(figures, "save_figure", disk_full)
    assert main(["report", "--no-progress", "-q", "--models", "minilm", "--formats", "png"]) == 1
    err = capsys.readouterr().err.strip()
    assert err == "tera-tn report: error: [Errno 28] No space left on device"
    assert list(tmp_path.iterdir()) == []


def test_plan_checks_plot_before_planning(tmp_path, monkeypatch, capsys):
    from tera_tn.contract import contraction

    monkeypatch.setattr(contraction, "plan", _must_not_run)
    assert main(["plan", "64x64", "-n", "8", "--plot", "/proc/x/p.png"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "'/proc/x/p.png' cannot be written" in err


def test_plan_never_overwrites_a_plot_that_appears_meanwhile(tmp_path, monkeypatch, capsys):
    from tera_tn.analysis import plot

    target = tmp_path / "p.png"
    real = plot.planner_figure

    def figure_while_someone_writes_the_target(*args, **kwargs):
        target.write_bytes(b"theirs")
        return real(*args, **kwargs)

    monkeypatch.setattr(plot, "planner_figure", figure_while_someone_writes_the_target)
    assert main(["plan", "64x64", "-n", "8", "--plot", str(target)]) == 2
    assert "appeared while planning" in capsys.readouterr().err
    assert target.read_bytes() == b"theirs" and sorted(p.name for p in tmp_path.iterdir()) == ["p.png"]


def test_rank_output_cites_no_private_notes(capsys):
    assert main(["rank", "64x64", "--order", "4"]) == 0
    out = capsys.readouterr().out
    assert "rank theorem" in out and "tera-math" not in out and "§" not in out


def test_commands_print_what_the_library_returns(capsys):
    """The command only parses and prints: its text is the library value's own rendering."""
    from tera_tn import TeRASpec
    from tera_tn.analysis.summary import summarize_plan, summarize_update

    spec = TeRASpec.from_shape(96, 128, order=4)
    assert main(["rank", "96x128", "--order", "4"]) == 0
    assert capsys.readouterr().out.rstrip("\n") == summarize_update(spec).to_text()
    assert main(["plan", "96x128", "--order", "4", "-n", "8", "--sweep"]) == 0
    assert capsys.readouterr().out.rstrip("\n") == summarize_plan(spec, 8, sweep=True).to_text()
    assert main(["rank", "96x128", "--order", "4", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    data.pop("elapsed_s")
    expected = summarize_update(spec).to_dict()
    expected.pop("elapsed_s")
    assert data == json.loads(json.dumps(expected))


def test_python_dash_m_runs_the_command(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "-m", "tera_tn.cli", "rank", "--modes", "4.4:4.4"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.startswith("TeRASpec(16×16"), proc.stderr[-2000:]
