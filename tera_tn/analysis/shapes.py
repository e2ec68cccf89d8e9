"""Linear-layer shapes of common models: built-in sets from public configs, or walked from a model.

Shapes follow PyTorch: ``(d_out, d_in) = (out_features, in_features)`` of ``nn.Linear``.
Built-in sets list the linear layers inside the transformer blocks (attention projections
and the MLP), named as in the Hugging Face ``transformers`` implementation, so PEFT-style
``target_modules`` select them the same way; embeddings, poolers and heads are not included.

=====================  ======  ======  ======  =========  =========================================
model                  hidden  FFN     layers  kv width   modules per block
=====================  ======  ======  ======  =========  =========================================
all-MiniLM-L6-v2       384     1536    6       384        query, key, value, attention.output.dense,
                                                          intermediate.dense, output.dense
bert-base              768     3072    12      768        (as above)
roberta-base           768     3072    12      768        (as above)
roberta-large          1024    4096    24      1024       (as above)
llama-2-7b             4096    11008   32      4096       q_proj, k_proj, v_proj, o_proj,
                                                          gate_proj, up_proj, down_proj
llama-3-8b             4096    14336   32      1024 (GQA) (as llama-2-7b)
=====================  ======  ======  ======  =========  =========================================

Values are from the models' public ``config.json`` files (``hidden_size``,
``intermediate_size``, ``num_hidden_layers``, ``num_attention_heads``,
``num_key_value_heads``); ``kv width = num_key_value_heads · hidden_size / num_attention_heads``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterable, Sequence, Union

__all__ = [
    "LayerShape",
    "ModelConfig",
    "MODEL_CONFIGS",
    "available_models",
    "model_config",
    "model_shapes",
    "linear_shapes",
    "select",
    "shape_counts",
    "as_layer_shapes",
]

TargetModules = Union[None, str, Sequence[str]]


@dataclass(frozen=True)
class LayerShape:
    """One adaptable linear layer.

    Attributes:
        name: full module path, e.g. ``"model.layers.0.self_attn.q_proj"``.
        d_out: ``out_features`` (rows of the weight).
        d_in: ``in_features`` (columns of the weight).
        kind: short role label, e.g. ``"q"``, ``"k"``, ``"up"``, ``"intermediate"`` (the last
            name component when walked from a model).
    """

    name: str
    d_out: int
    d_in: int
    kind: str = ""

    @property
    def shape(self) -> tuple[int, int]:
        return self.d_out, self.d_in


# One block's linear layers, sizes by name: h = hidden, f = FFN, kv = key/value width. Every
# family has the same attention shapes (k and v narrower under GQA) under its own module names.
_ATTENTION = (("q", "h", "h"), ("k", "kv", "h"), ("v", "kv", "h"), ("o", "h", "h"))
_BLOCKS = {
    "bert": (
        ("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense"),
        (("intermediate.dense", "intermediate", "f", "h"), ("output.dense", "output", "h", "f")),
    ),
    "llama": (
        ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"),
        (("mlp.gate_proj", "gate", "f", "h"), ("mlp.up_proj", "up", "f", "h"), ("mlp.down_proj", "down", "h", "f")),
    ),
}


@dataclass(frozen=True)
class ModelConfig:
    """The config fields that fix a transformer's linear-layer shapes."""

    name: str
    family: str  # "bert" (BERT/RoBERTa/MiniLM encoders) or "llama"
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    source: str

    @property
    def kv_width(self) -> int:
        """Output width of the key/value projections (``< hidden_size`` with GQA)."""
        return self.num_key_value_heads * (self.hidden_size // self.num_attention_heads)

    def block_layers(self) -> list[tuple[str, str, int, int]]:
        """``(module suffix, kind, d_out, d_in)`` for the linear layers of one block."""
        size = {"h": self.hidden_size, "f": self.intermediate_size, "kv": self.kv_width}
        attention_names, mlp = _BLOCKS["bert" if self.family == "bert" else "llama"]
        attention = [(name, *shape) for name, shape in zip(attention_names, _ATTENTION)]
        return [(suffix, kind, size[d_out], size[d_in]) for suffix, kind, d_out, d_in in attention + list(mlp)]

    def module_prefix(self, layer: int) -> str:
        """Module path of block ``layer`` in the bare HF model (``BertModel``/``RobertaModel``,
        ``LlamaForCausalLM``); task heads add a prefix such as ``"bert."`` that suffix matching
        ignores."""
        if self.family == "bert":
            return f"encoder.layer.{layer}."
        return f"model.layers.{layer}."


MODEL_CONFIGS: dict[str, ModelConfig] = {
    c.name: c
    for c in (
        ModelConfig("all-MiniLM-L6-v2", "bert", 384, 1536, 6, 12, 12, "sentence-transformers/all-MiniLM-L6-v2"),
        ModelConfig("bert-base", "bert", 768, 3072, 12, 12, 12, "google-bert/bert-base-uncased"),
        ModelConfig("roberta-base", "bert", 768, 3072, 12, 12, 12, "FacebookAI/roberta-base"),
        ModelConfig("roberta-large", "bert", 1024, 4096, 24, 16, 16, "FacebookAI/roberta-large"),
        ModelConfig("llama-2-7b", "llama", 4096, 11008, 32, 32, 32, "meta-llama/Llama-2-7b-hf"),
        ModelConfig("llama-3-8b", "llama", 4096, 14336, 32, 32, 8, "meta-llama/Meta-Llama-3-8B"),
    )
}

_ALIASES = {
    "minilm": "all-MiniLM-L6-v2",
    "all-minilm-l6-v2": "all-MiniLM-L6-v2",
    "sentence-transformers/all-minilm-l6-v2": "all-MiniLM-L6-v2",
    "bert-base-uncased": "bert-base",
    "bert-base-cased": "bert-base",
    "google-bert/bert-base-uncased": "bert-base",
    "facebookai/roberta-base": "roberta-base",
    "facebookai/roberta-large": "roberta-large",
    "llama2-7b": "llama-2-7b",
    "meta-llama/llama-2-7b-hf": "llama-2-7b",
    "llama-2-7b-hf": "llama-2-7b",
    "llama3-8b": "llama-3-8b",
    "meta-llama/meta-llama-3-8b": "llama-3-8b",
    "meta-llama-3-8b": "llama-3-8b",
    "llama-3.1-8b": "llama-3-8b",
}


def available_models() -> tuple[str, ...]:
    """Names accepted by :func:`model_shapes` (aliases such as ``"bert-base-uncased"`` work too)."""
    return tuple(MODEL_CONFIGS)


def model_config(name: str) -> ModelConfig:
    """The :class:`ModelConfig` of a built-in model (case-insensitive, with aliases)."""
    if not isinstance(name, str):
        raise ValueError(f"model name must be a string, got {name!r}")
    key = name.strip()
    if key in MODEL_CONFIGS:
        return MODEL_CONFIGS[key]
    low = key.lower()
    for k in MODEL_CONFIGS:
        if k.lower() == low:
            return MODEL_CONFIGS[k]
    if low in _ALIASES:
        return MODEL_CONFIGS[_ALIASES[low]]
    raise ValueError(f"unknown model {name!r}; built-in shape sets: {', '.join(MODEL_CONFIGS)}")


def _matches(layer: LayerShape, targets: TargetModules) -> bool:
    """PEFT's ``target_modules`` rule, plus the short ``kind`` labels.

    A string is a full-match regex on the module name; a list matches a name equal to an entry
    or ending with ``"." + entry``, or a layer whose ``kind`` equals an entry.
    """
    if targets is None:
        return True
    if isinstance(targets, str):
        return re.fullmatch(targets, layer.name) is not None
    return any(layer.name == t or layer.name.endswith("." + t) or layer.kind == t for t in targets)


def select(layers: Iterable[LayerShape], target_modules: TargetModules = None) -> list[LayerShape]:
    """The layers matching ``target_modules`` (see :func:`model_shapes`)."""
    if target_modules is not None and not isinstance(target_modules, str):
        target_modules = list(target_modules)
        if not target_modules or not all(isinstance(t, str) for t in target_modules):
            raise ValueError(f"target_modules must be a regex string or a non-empty list of names, got {target_modules!r}")
    return [layer for layer in layers if _matches(layer, target_modules)]


def model_shapes(name: str, target_modules: TargetModules = None) -> list[LayerShape]:
    """Linear layers of a built-in model, block by block.

    Args:
        name: one of :func:`available_models` (case-insensitive; HF ids and aliases accepted).
        target_modules: ``None`` for every block linear; a list of module-name suffixes
            (``["q_proj", "v_proj"]``, ``["query", "value"]``) or short kinds
            (``["q", "k", "v", "o", "gate", "up", "down", "intermediate", "output"]``); or a
            regex string matched against the full name (PEFT's rules).

    Raises:
        ValueError: unknown model, or ``target_modules`` selects nothing.
    """
    cfg = model_config(name)
    layers = [
        LayerShape(cfg.module_prefix(i) + suffix, d_out, d_in, kind)
        for i in range(cfg.num_hidden_layers)
        for suffix, kind, d_out, d_in in cfg.block_layers()
    ]
    out = select(layers, target_modules)
    if not out:
        kinds = sorted({k for _, k, _, _ in cfg.block_layers()})
        raise ValueError(f"target_modules={target_modules!r} matches no layer of {cfg.name}; kinds: {kinds}")
    return out


def linear_shapes(model, target_modules: TargetModules = None) -> list[LayerShape]:
    """Linear layers of a torch model, in ``named_modules()`` order.

    Walks ``torch.nn.Linear`` modules, plus ``transformers``' ``Conv1D`` (GPT-2 style, whose
    weight is stored ``(d_in, d_out)``; recognised by class name so ``transformers`` is not
    imported). ``kind`` is the last component of the module name. ``target_modules`` as in
    :func:`model_shapes`. torch is imported only here.

    Raises:
        ValueError: ``model`` is not an ``nn.Module``, or nothing matches.
    """
    import torch

    if not isinstance(model, torch.nn.Module):
        raise ValueError(f"linear_shapes expects a torch.nn.Module, got {type(model).__name__}")
    layers = []
    for name, mod in model.named_modules():
        kind = name.rsplit(".", 1)[-1]
        if isinstance(mod, torch.nn.Linear):
            layers.append(LayerShape(name, int(mod.out_features), int(mod.in_features), kind))
        elif type(mod).__name__ == "Conv1D" and hasattr(mod, "nf") and getattr(mod, "weight", None) is not None:
            layers.append(LayerShape(name, int(mod.nf), int(mod.weight.shape[0]), kind))
    out = select(layers, target_modules)
    if not out:
        raise ValueError(
            f"no linear layer of {type(model).__name__} matches target_modules={target_modules!r}"
            + ("" if layers else " (the model has no nn.Linear layers)")
        )
    return out


def shape_counts(layers: Iterable[Union[LayerShape, tuple[int, int]]]) -> dict[tuple[int, int], int]:
    """How many layers share each ``(d_out, d_in)`` (in first-seen order)."""
    counts: dict[tuple[int, int], int] = {}
    for layer in layers:
        shape = layer.shape if isinstance(layer, LayerShape) else (int(layer[0]), int(layer[1]))
        counts[shape] = counts.get(shape, 0) + 1
    return counts


def as_layer_shapes(layers: Iterable[Union[LayerShape, tuple[int, int]]]) -> list[LayerShape]:
    """``LayerShape`` objects from LayerShapes or ``(d_out, d_in)`` pairs (named ``layers.<i>``).

    Raises ValueError naming the first entry that is not a positive pair, or on an empty list.
    """
    out = []
    for i, layer in enumerate(layers):
        if isinstance(layer, LayerShape):
            out.append(layer)
            continue
        try:
            d_out, d_in = (int(x) for x in layer)
        except (TypeError, ValueError):
            raise ValueError(f"layer {i} must be a LayerShape or a (d_out, d_in) pair, got {layer!r}") from None
        if d_out < 1 or d_in < 1:
            raise ValueError(f"layer {i} has a non-positive dimension: {(d_out, d_in)}")
        out.append(LayerShape(f"layers.{i}", d_out, d_in, "linear"))
    if not out:
        raise ValueError("need at least one layer shape")
    return out
