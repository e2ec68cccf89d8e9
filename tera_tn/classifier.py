"""A trained classifier on disk: the adapter (PEFT's folder; for ``full`` the whole encoder) and a
self-describing ``head.safetensors`` whose ``tera_tn`` metadata says how to rebuild the rest —
label names, pooling, maximum length, method, configuration, base model folder, data columns.
:func:`save_classifier` writes what :func:`tera_tn.finetune.finetune` trained (what ``tera-tn
finetune`` writes per seed); :func:`load_classifier` rebuilds it as a :class:`Classifier`.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from .finetune import FinetuneResult, load_model, mean_pool_classifier

__all__ = ["Classifier", "load_classifier", "read_head_metadata", "save_classifier"]

_META_KEY = "tera_tn"  #: the safetensors metadata key, as in tera_tn.torch checkpoints
_HEAD_KIND = "finetune_head"
_HEAD_FORMAT = 1
_HEAD_EXPECTED = "a head.safetensors written by tera_tn.classifier.save_classifier"


def _json_safe(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


def save_classifier(result: FinetuneResult, folder: str | os.PathLike, *, labels: Sequence[str] | None = None,
                 model_dir: str | os.PathLike | None = None, text_column: str | None = None,
                 label_column: str | None = None) -> Path:
    """Write a trained classifier into ``folder``: the adapter (PEFT's ``save_pretrained``; for
    ``full`` the whole encoder) and the head, ``head.safetensors``, whose ``tera_tn`` metadata
    describes the rest (as in ``tera_tn.torch`` checkpoints): label names in index order, pooling,
    maximum length, method and configuration, the model folder it was trained from and the data
    columns. :func:`load_classifier` rebuilds the classifier from it.

    ``labels`` names the classes (default ``"0"``, ``"1"``, …); ``model_dir`` is the base model
    folder (default: the folder the encoder was loaded from).
    """
    from safetensors.torch import save

    from .version import __version__
    from .atomic_files import write_atomic

    folder = Path(folder)
    net = result.model
    state = {k: v.detach().cpu().contiguous() for k, v in net.head.state_dict().items()}
    k, hidden = state["weight"].shape
    if labels is None:
        labels = [str(i) for i in range(k)]
    labels = [str(n) for n in labels]
    if len(labels) != k:
        raise ValueError(f"{len(labels)} label names for a head of {k} classes; expected one name per class")
    encoder = net.encoder
    is_peft = hasattr(encoder, "save_pretrained") and hasattr(encoder, "peft_config")
    config = result.config
    method = config.method if config is not None else ("peft" if is_peft else "head")
    if model_dir is None:
        model_dir = getattr(getattr(encoder, "config", None), "name_or_path", None) or None
    folder.mkdir(parents=True, exist_ok=True)
    if is_peft:
        encoder.save_pretrained(str(folder))
    elif method == "full":
        encoder.save_pretrained(str(folder / "encoder"))
    meta = {
        "format": _HEAD_FORMAT, "kind": _HEAD_KIND, "library_version": __version__, "method": method,
        "labels": labels, "num_labels": k, "hidden_size": int(hidden), "pooling": "mean",
        "max_length": config.max_length if config is not None else None,
        "model": str(Path(model_dir).resolve()) if model_dir else None,
        "encoder": "peft" if is_peft else ("encoder" if method == "full" else "base"),
        "text_column": text_column, "label_column": label_column,
        "config": _json_safe(dataclasses.asdict(config)) if config is not None else None,
    }
    write_atomic(folder / "head.safetensors", save(state, metadata={_META_KEY: json.dumps(meta)}), overwrite=True)
    return folder


def read_head_metadata(path: str | os.PathLike) -> dict:
    """The ``tera_tn`` metadata of a saved head (``head.safetensors``, or the folder holding it)."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if path.is_dir():
        path = path / "head.safetensors"
    if not path.is_file():
        raise FileNotFoundError(f"{str(path)!r} does not exist; expected {_HEAD_EXPECTED}")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except (SafetensorError, OSError) as err:
        raise ValueError(f"{str(path)!r} is not a readable safetensors file ({err}); expected {_HEAD_EXPECTED}") from None
    try:
        parsed = json.loads(meta[_META_KEY])
    except (KeyError, ValueError):
        parsed = None
    if not isinstance(parsed, dict) or parsed.get("kind") != _HEAD_KIND:
        raise ValueError(f"{str(path)!r} holds no classifier description (no {_META_KEY!r} metadata of kind "
                         f"{_HEAD_KIND!r}: written before heads described themselves, or another file); expected "
                         f"{_HEAD_EXPECTED}")
    if parsed.get("format") != _HEAD_FORMAT:
        raise ValueError(f"{str(path)!r} has head format {parsed.get('format')!r}; this tera_tn reads format "
                         f"{_HEAD_FORMAT}")
    return parsed


@dataclass
class Classifier:
    """A trained classifier rebuilt by :func:`load_classifier`: ``model(input_ids, attention_mask)``
    gives logits (``model.encoder`` with its adapter, ``model.head``; in eval mode), ``labels`` the
    class names in logit order, ``metadata`` what the head file recorded."""

    model: Any = field(repr=False)
    tokenizer: Any = field(repr=False)
    labels: tuple[str, ...]
    max_length: int
    metadata: dict = field(repr=False)

    def logits(self, texts: Sequence[str], batch_size: int = 128):
        """Logits of ``texts`` (a ``(len(texts), len(labels))`` tensor), without gradients."""
        import torch

        if isinstance(texts, str):
            texts = [texts]
        out = []
        with torch.inference_mode():
            for s in range(0, len(texts), batch_size):
                enc = self.tokenizer(list(texts[s : s + batch_size]), truncation=True, max_length=self.max_length,
                                     padding=True, return_tensors="pt")
                out.append(self.model(enc["input_ids"], enc["attention_mask"]))
        return torch.cat(out) if out else torch.empty(0, len(self.labels))

    def predict(self, texts: Sequence[str], batch_size: int = 128) -> list[str]:
        """The predicted label name of each text."""
        return [self.labels[i] for i in self.logits(texts, batch_size).argmax(-1).tolist()]


def load_classifier(folder: str | os.PathLike, model_dir: str | os.PathLike | None = None) -> Classifier:
    """Rebuild the classifier that :func:`save_classifier` (or ``tera-tn finetune``, one ``seedN/``
    folder) wrote: the base model (``model_dir``, default the folder recorded in the head file),
    the adapter from ``folder`` (TeRA is registered with PEFT here), the mean-pooling head."""
    from safetensors.torch import load_file

    folder = Path(folder)
    meta = read_head_metadata(folder)
    base = model_dir if model_dir is not None else meta.get("model")
    if base is None or not (Path(base) / "config.json").is_file():
        raise FileNotFoundError(f"the base model folder {base!r} recorded in {str(folder / 'head.safetensors')!r} "
                                "holds no config.json; pass model_dir= the folder the classifier was trained from")
    encoder, tok = load_model(base)
    if meta.get("encoder") == "peft":
        if meta.get("method") == "tera":
            import tera_tn.peft  # noqa: F401  registers TeRA with PEFT
        from peft import PeftModel

        encoder = PeftModel.from_pretrained(encoder, str(folder))
    elif meta.get("encoder") == "encoder":
        from transformers import AutoModel

        encoder = AutoModel.from_pretrained(str(folder / "encoder"), local_files_only=True)
    net = mean_pool_classifier(encoder, int(meta["num_labels"]), 0.0)
    state = load_file(str(folder / "head.safetensors"))
    net.head.load_state_dict(state)
    net.eval()
    for p in net.parameters():
        p.requires_grad_(False)
    max_length = meta.get("max_length") or 128
    return Classifier(model=net, tokenizer=tok, labels=tuple(meta["labels"]), max_length=int(max_length),
                      metadata=meta)
