"""What a trained run did to the encoder, beyond accuracy: intruder dimensions and the effective
rank of every adapted weight, and the drift of the pooled embeddings on out-of-task text.

* **Intruders** (:func:`tera_tn.analysis.intruders.intruder_dimensions`, k = 10, thresholds 0.5 to
  0.9): per adapted layer, how many of ``W0 + ΔW``'s 10 leading left singular vectors have no
  singular vector of ``W0`` within that cosine; reported as the mean count per layer.
* **Effective rank** (:func:`tera_tn.analysis.rank.effective_rank`) of each trained ΔW, taken from
  the PEFT layer's own ``get_delta_weight`` (never ``merged − W0``, whose float32 rounding would add
  a full-rank floor); mean, min and max over layers.
* **Drift** (:func:`tera_tn.analysis.forgetting.embedding_drift`): 1 − cos between the base and the
  adapted encoder's attention-masked mean-pooled embeddings of 256 texts from the *other* datasets
  (an equal share of each, drawn with a fixed seed, so the text is outside the task and the same
  for every run on a dataset). The head is not involved: this is what the adapter did to the
  representation every other task would reuse.

Head-only runs leave the encoder untouched: 0 layers, drift 0 (measured, not assumed).
"""

from __future__ import annotations

import copy
import math
import random
from typing import Any

from experiments.datasets import DATASETS, load
from tera_tn.analysis.forgetting import drift_of_checked
from tera_tn.analysis.intruders import DEFAULT_THRESHOLDS, intruders_of_checked
from tera_tn.analysis.rank import effective_rank_of_checked
from tera_tn.checks import float64_matrix

__all__ = ["DRIFT_TEXTS", "INTRUDER_K", "adapted_weights", "drift_texts", "measure_kept_adapters", "pooled_embeddings",
           "run_measures"]

#: how many out-of-task texts the drift is measured on
DRIFT_TEXTS = 256
#: the leading singular vectors checked for intruders (the paper's and PEFT's k)
INTRUDER_K = 10


def drift_texts(dataset: str, n: int = DRIFT_TEXTS, seed: int = 0) -> list[str]:
    """``n`` texts from the datasets other than ``dataset``, an equal share of each (seeded)."""
    others = [name for name in DATASETS if name != dataset]
    rng = random.Random(seed)
    out: list[str] = []
    for i, name in enumerate(others):
        share = n // len(others) + (i < n % len(others))
        examples, _ = load(name)
        out.extend(t for t, _ in rng.sample(examples, share))
    return out


def pooled_embeddings(encoder, tok, texts: list[str], max_length: int, batch_size: int = 64):
    """Attention-masked mean of the last hidden state, ``(len(texts), hidden)`` float32."""
    import torch

    was_training = encoder.training
    encoder.eval()
    rows = []
    with torch.inference_mode():
        for s in range(0, len(texts), batch_size):
            enc = tok(texts[s:s + batch_size], padding=True, truncation=True, max_length=max_length,
                      return_tensors="pt")
            h = encoder(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).last_hidden_state
            m = enc["attention_mask"].unsqueeze(-1).to(h.dtype)
            rows.append((h * m).sum(1) / m.sum(1).clamp_min(1.0))
    encoder.train(was_training)
    return torch.cat(rows)


def adapted_weights(encoder):
    """``[(name, W0, ΔW)]`` for every PEFT tuner layer of ``encoder`` (its active adapter); empty for
    a plain (head-only) encoder."""
    return [(name, module.base_layer.weight.detach(),
             module.get_delta_weight(module.active_adapters[0]).detach())
            for name, module in encoder.named_modules()
            if hasattr(module, "get_delta_weight") and hasattr(module, "base_layer")]


def run_measures(base_encoder, adapted_encoder, tok, dataset: str, max_length: int,
                 cache: dict[str, Any]) -> dict[str, Any]:
    """The record's ``measures`` entry; ``cache`` keeps the base's embeddings per dataset. Every
    weight and embedding matrix is converted to checked float64 once, here, and the measures take
    the arrays."""
    layers = [(float64_matrix(w0, f"{name} W0", "(d_out, d_in)"), float64_matrix(dw, f"{name} ΔW", "(d_out, d_in)"))
              for name, w0, dw in adapted_weights(adapted_encoder)]
    counts = {f"{t:g}": [] for t in DEFAULT_THRESHOLDS}
    ranks = []
    for w0, dw in layers:
        found = intruders_of_checked(w0, w0 + dw, k=min(INTRUDER_K, *w0.shape))
        for t, c in found.counts.items():
            counts[f"{t:g}"].append(c)
        ranks.append(effective_rank_of_checked(dw))
    key = (dataset, max_length)
    if key not in cache:
        texts = drift_texts(dataset)
        base = pooled_embeddings(base_encoder, tok, texts, max_length)
        cache[key] = (texts, float64_matrix(base, "base embeddings", "(n_texts, hidden)"))
    texts, before = cache[key]
    after = pooled_embeddings(adapted_encoder, tok, texts, max_length)
    drift = drift_of_checked(before, float64_matrix(after, "adapted embeddings", "(n_texts, hidden)"))
    n = len(layers)
    return {
        "layers": n, "intruder_k": INTRUDER_K,
        "intruders": {t: (math.fsum(v) / n if n else 0.0) for t, v in counts.items()},
        "delta_effective_rank": {"mean": math.fsum(ranks) / n, "min": min(ranks), "max": max(ranks)} if n else None,
        "drift": {**drift.to_dict(), "source": "other datasets, equal shares, seed 0"},
    }


def measure_kept_adapters(results, *, log=print, model_dir: str | None = None) -> int:
    """Measure every protocol-2 run that kept its adapter (``adapter_dir``) but recorded no
    ``measures`` (it ran before they existed): load its adapter onto the base encoder (the head is
    not needed, and the earliest kept heads do not describe themselves), measure, and
    append ``{"key", "measures"}`` to the side file (:data:`experiments.study.results.MEASURES`).
    Resumable like the runs; returns how many were measured."""
    from peft import PeftModel
    from threadpoolctl import threadpool_limits

    import tera_tn.peft  # noqa: F401  registers TeRA with PEFT
    from experiments.study.results import MEASURES, ResultsFile
    from tera_tn.finetune import load_model

    side = ResultsFile(results.path.parent / MEASURES)
    done = side.keys()
    todo = [r for r in results.records() if "adapter_dir" in r and "measures" not in r and r["key"] not in done]
    if not todo:
        return 0
    base, tok = load_model(model_dir)
    cache: dict[str, Any] = {}
    for i, r in enumerate(todo, 1):
        b = r["budget"]
        with threadpool_limits(b["threads"]):
            import torch

            torch.set_num_threads(b["threads"])
            adapted = PeftModel.from_pretrained(copy.deepcopy(base), str(results.path.parent / r["adapter_dir"]))
            m = run_measures(base, adapted, tok, r["dataset"], b["max_length"], cache)
        side.append({"key": r["key"], "measures": m})
        log(f"[{i}/{len(todo)}] {r['dataset']} {r['contender']} seed={r['seed']} lr={r['lr']:g}: "
            f"intruders<0.5 {m['intruders']['0.5']:.2f}, drift {m['drift']['mean_cosine_distance']:.2e}")
    return len(todo)

