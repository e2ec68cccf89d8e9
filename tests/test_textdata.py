"""Labelled text (tera_tn.textdata) and the fine-tuning record (tera_tn.finetune_runs): values
that render themselves and refuse bad input naming the value."""

from __future__ import annotations

import json
import math

import pytest

from tera_tn.finetune_runs import FinetuneRuns, strict_metrics
from tera_tn.textdata import DataSplit, TextData, read_examples, read_text_data, split_validation


def _csv(path, rows):
    path.write_text("text,label\n" + "".join(f"{t},{y}\n" for t, y in rows), encoding="utf-8")
    return path


def test_text_data_reads_renders_and_relabels(tmp_path):
    train = read_text_data(_csv(tmp_path / "t.csv", [("a", "pos"), ("b", "neg"), ("c", "pos")]))
    assert (list(train.examples), train.labels) == read_examples(tmp_path / "t.csv")
    assert train.labels == ("neg", "pos") and len(train) == 3 and train.counts == {"neg": 1, "pos": 2}
    assert str(train) == f"{tmp_path / 't.csv'}: 3 examples, 2 labels (neg 1 (33%), pos 2 (67%))"
    assert json.loads(train.to_json()) == {"path": str(tmp_path / "t.csv"), "examples": 3, "labels": ["neg", "pos"],
                                           "counts": {"neg": 1, "pos": 2}}
    val = read_text_data(_csv(tmp_path / "v.csv", [("d", "pos")]), min_classes=1)
    assert val.labels == ("pos",) and val.relabel(train.labels).examples == (("d", 1),)
    bad = read_text_data(_csv(tmp_path / "b.csv", [("x", "zzz")]), min_classes=1)
    with pytest.raises(ValueError, match=r"'.*b\.csv' has labels \['zzz'\] that the training data lacks"):
        bad.relabel(train.labels)


def test_text_data_refuses_bad_input():
    with pytest.raises(ValueError, match="TextData example 0"):
        TextData((("a", 2),), ("x", "y"))
    with pytest.raises(ValueError, match="TextData labels"):
        TextData((("a", 0),), ("x", "x"))
    with pytest.raises(ValueError, match="TextData example 1"):
        TextData((("a", 0), ("b", True)), ("x", "y"))


def test_split_is_the_commands_seeded_split():
    import random

    examples = [(f"t{i}", i % 2) for i in range(20)]
    split = split_validation(examples, 0.1, 3)
    shuffled = list(examples)
    random.Random(3).shuffle(shuffled)
    assert split.validation == tuple(shuffled[:2]) and split.train == tuple(shuffled[2:])
    assert split == TextData(tuple(examples), ("a", "b")).split(0.1, 3)
    assert str(split) == "18 training and 2 validation examples (0.1 of 20 held out, seed 3)"
    assert json.loads(split.to_json()) == {"train": 18, "validation": 2, "fraction": 0.1, "seed": 3}
    assert isinstance(split, DataSplit)


@pytest.mark.parametrize("examples, fraction, seed, needle", [
    ([("a", 0), ("b", 1)], 0.9, 0, "leaves none to train on"),
    ([("a", 0), ("b", 1)], 1.0, 0, "fraction must be"),
    ([("a", 0), ("b", 1)], math.nan, 0, "fraction must be"),
    ([("a", 0), ("b", 1)], 0.5, -1, "seed must be"),
    (["ab"], 0.5, 0, "example 0"),
])
def test_split_validation_refuses_bad_input(examples, fraction, seed, needle):
    with pytest.raises(ValueError, match=f"split_validation.*{needle}"):
        split_validation(examples, fraction, seed)


def _runs(**kw):
    return FinetuneRuns(labels=("neg", "pos"), method="tera", adapter={"order": 4}, model="/m",
                        data={"train": "d.csv", "validation": None, "test": None}, text_column="text",
                        label_column="label", seeds=(0, 1), **kw)


def test_finetune_runs_record_and_table():
    runs = _runs()
    assert not runs.complete and runs.to_dict()["runs"] == []
    metrics = {"val_accuracy": 0.75, "trainable_params": 16514, "lr": 0.03, "train_time_s": 1.25, "diverged": False}
    runs = runs.with_run(0, metrics).with_run(1, {**metrics, "last_loss": math.nan})
    d = json.loads(runs.to_json())
    assert list(d) == ["labels", "method", "adapter", "model", "data", "text_column", "label_column", "seeds",
                       "complete", "runs"]
    assert d["complete"] is True and [r["seed"] for r in d["runs"]] == [0, 1]
    assert d["runs"][1]["last_loss"] is None and d["runs"][1]["nonfinite"] == {"last_loss": "nan"}
    lines = str(runs).splitlines()
    assert lines[0] == "seed  val acc  test acc   trainable       lr  train s"
    assert lines[1] == "   0   0.7500         -      16,514     0.03      1.2"
    assert lines[2].endswith("  (diverged)")


def test_finetune_runs_refuse_bad_input():
    with pytest.raises(ValueError, match="FinetuneRuns has no seed 5"):
        _runs().with_run(5, {})
    with pytest.raises(ValueError, match="FinetuneRuns seeds"):
        FinetuneRuns(("a",), "tera", {}, "/m", {}, "text", "label", seeds=())
    with pytest.raises(ValueError, match="strict_metrics needs a mapping"):
        strict_metrics([("loss", 1.0)])
    assert strict_metrics({"loss": 1.0}) == {"loss": 1.0}
