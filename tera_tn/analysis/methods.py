"""The adapter methods a report compares, and the exact size of the adapter file each writes.

:class:`Method` is one adapter configuration (``"lora:r=8"``, ``"tera:order=6,ranks=0.5"`` …);
:func:`adapter_tensors` lists the tensors its PEFT adapter file stores for given layers and
:func:`adapter_file_bytes` / :func:`safetensors_size` give that file's exact byte size (an exact
formula of the safetensors format, tested against real ``safetensors.numpy.save`` output and
against adapter files PEFT writes). :mod:`tera_tn.analysis.report` builds its rows from these.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from typing import Any, Mapping, Optional, Sequence, Union

from .accounting import METHODS
from ..core.signature import adapter_signature, signature_bytes
from .shapes import LayerShape, as_layer_shapes
from ..core.spec import DEFAULT_DIAG, DEFAULT_ORDER, TeRASpec

__all__ = ["Method", "adapter_tensors", "adapter_file_bytes", "safetensors_size"]

_SAFETENSORS_DTYPES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}


# --------------------------------------------------------------------------------------------
# methods
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Method:
    """One adapter configuration.

    Attributes:
        kind: ``"tera"``, ``"lora"``, ``"vera"`` or ``"hira"``.
        r: rank for LoRA/VeRA/HiRA.
        order, ranks, diag: TeRA's :meth:`TeRASpec.from_shape` arguments (defaults ``DEFAULT_ORDER``,
            ``"full"``, ``DEFAULT_DIAG``); the label names ``diag`` only when it is not the default.
    """

    kind: str
    r: Optional[int] = None
    order: Union[int, tuple[int, int]] = DEFAULT_ORDER
    ranks: Any = "full"
    diag: str = DEFAULT_DIAG

    def __post_init__(self) -> None:
        if self.kind not in METHODS:
            raise ValueError(f"method kind must be one of {METHODS}, got {self.kind!r}")
        if self.kind != "tera" and (isinstance(self.r, bool) or not isinstance(self.r, int) or self.r < 1):
            raise ValueError(f"{self.kind} needs a positive integer rank r, got {self.r!r}")

    @classmethod
    def parse(cls, text: Union[str, "Method"]) -> "Method":
        """From ``"kind[:key=value,...]"``, e.g. ``"lora:r=32"``, ``"lora:32"``, ``"vera:256"``,
        ``"tera:order=6,ranks=0.5,diag=mode"``, ``"tera:4"`` (a bare number is ``r``, or ``order``
        for TeRA). ``ranks`` takes ``full``, a fraction, an int or ``a/b/c…`` per mode."""
        if isinstance(text, Method):
            return text
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"a method must be a string like 'lora:r=8' or a Method, got {text!r}")
        kind, _, rest = text.strip().partition(":")
        kind = kind.strip().lower()
        kw: dict[str, Any] = {}
        for item in filter(None, (x.strip() for x in rest.split(","))):
            key, eq, value = item.partition("=")
            if not eq:
                key, value = ("order" if kind == "tera" else "r"), key
            key, value = key.strip(), value.strip()
            try:
                if key == "r":
                    kw["r"] = int(value)
                elif key == "order":
                    kw["order"] = tuple(int(v) for v in value.split("x")) if "x" in value else int(value)
                elif key == "ranks":
                    if value == "full":
                        kw["ranks"] = "full"
                    elif "/" in value:
                        kw["ranks"] = tuple(int(v) for v in value.split("/"))
                    elif re.fullmatch(r"\d+", value):
                        kw["ranks"] = int(value)
                    else:
                        kw["ranks"] = float(value)
                elif key == "diag":
                    kw["diag"] = value
                else:
                    raise ValueError(f"unknown key {key!r}")
            except ValueError as err:
                raise ValueError(f"cannot parse method {text!r}: {err} (keys: r, order, ranks, diag)") from None
        if kind == "tera" and "r" in kw:
            raise ValueError(f"cannot parse method {text!r}: TeRA takes order/ranks/diag, not r")
        if kind != "tera" and set(kw) - {"r"}:
            raise ValueError(f"cannot parse method {text!r}: {kind} takes only r")
        return cls(kind, **kw)

    @property
    def label(self) -> str:
        if self.kind != "tera":
            return f"{dict(lora='LoRA', vera='VeRA', hira='HiRA')[self.kind]} r={self.r}"
        order = "×".join(map(str, self.order)) if isinstance(self.order, tuple) else str(self.order)
        ranks = "" if self.ranks == "full" else f", ranks={self.ranks}"
        diag = "" if self.diag == DEFAULT_DIAG else f", diag={self.diag}"
        return f"TeRA order {order}{ranks}{diag}"

    def spec(self, d_out: int, d_in: int) -> TeRASpec:
        return TeRASpec.from_shape(d_out, d_in, order=self.order, ranks=self.ranks, diag=self.diag)  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------
# adapter file size
# --------------------------------------------------------------------------------------------
def safetensors_size(
    tensors: Mapping[str, Any], dtype: str = "F32", metadata: Optional[Mapping[str, str]] = None
) -> int:
    """Exact size in bytes of a safetensors file holding zero-or-more tensors.

    The format is: 8 bytes (little-endian u64 header length ``N``), ``N`` bytes of compact JSON
    — ``{"__metadata__": {...}, name: {"dtype", "shape", "data_offsets"}, ...}`` with the header
    padded with spaces to a multiple of 8 — then the raw data. Verified byte-for-byte against
    ``safetensors.numpy.save`` and against adapter files PEFT writes, in the tests.

    Args:
        tensors: name → shape (of dtype ``dtype``), or name → ``(dtype tag, shape)``.
        dtype: safetensors dtype tag (``"F32"``, ``"F16"``, ``"BF16"``, ``"F64"``, ``"U8"`` …) of
            tensors given by shape alone.
        metadata: optional string → string metadata (PEFT writes ``{"format": "pt"}``).
    """
    entries = []
    for name, value in tensors.items():
        tag, shape = value if isinstance(value, tuple) and len(value) == 2 and isinstance(value[0], str) else (dtype, value)
        if tag not in _SAFETENSORS_DTYPES:
            raise ValueError(f"dtype of {name!r} must be one of {tuple(_SAFETENSORS_DTYPES)}, got {tag!r}")
        shape = [int(s) for s in shape]
        if any(s < 0 for s in shape):
            raise ValueError(f"tensor {name!r} has a negative dimension: {shape}")
        entries.append((name, tag, shape))
    header: dict[str, Any] = {}
    if metadata is not None:  # an empty dict is still written as "__metadata__":{}
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    offset = 0
    # safetensors lays tensors out by decreasing dtype alignment, then by name (Rust byte order =
    # Python's code-point order for str); offsets follow that order.
    for name, tag, shape in sorted(entries, key=lambda e: (-_SAFETENSORS_DTYPES[e[1]], e[0])):
        nbytes = math.prod(shape) * _SAFETENSORS_DTYPES[tag]
        header[name] = {"dtype": tag, "shape": shape, "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    return 8 + len(text) + (-len(text)) % 8 + offset


def adapter_tensors(method: Union[str, Method], layers: Sequence[Union[LayerShape, tuple[int, int]]]) -> dict[str, Any]:
    """Name → shape (float32) or ``(dtype tag, shape)`` of every tensor ``method``'s PEFT adapter
    file stores for ``layers``.

    LoRA / HiRA: ``lora_A``/``hira_A`` ``(r, d_in)`` and ``lora_B``/``hira_B`` ``(d_out, r)``;
    VeRA: ``vera_lambda_b`` ``(d_out,)`` and ``vera_lambda_d`` ``(r,)``; TeRA: one ``tera_lambda``
    of length ``Σ_n len(λ_n)`` per layer, plus the adapter's signature (``uint8`` JSON; sized here
    for the default seed, α and factor recipe — other values change it by a few bytes).
    """
    m = Method.parse(method)
    layer_list = as_layer_shapes(layers)
    if len({layer.name for layer in layer_list}) != len(layer_list):
        raise ValueError("layer names must be unique: they name the tensors of the adapter file")
    out: dict[str, Any] = {}
    specs = {}
    for layer in layer_list:
        base = f"base_model.model.{layer.name}."
        if m.kind in ("lora", "hira"):
            out[base + f"{m.kind}_A.weight"] = (m.r, layer.d_in)  # type: ignore[assignment]
            out[base + f"{m.kind}_B.weight"] = (layer.d_out, m.r)  # type: ignore[assignment]
        elif m.kind == "vera":
            out[base + "vera_lambda_b"] = (layer.d_out,)
            out[base + "vera_lambda_d"] = (m.r,)  # type: ignore[assignment]
        else:
            spec = m.spec(layer.d_out, layer.d_in)
            specs[layer.name] = (spec, False)
            out[base + "tera_lambda"] = (spec.num_trainable,)
    if specs:
        raw = signature_bytes(adapter_signature(specs, seed=0, factor_init="orthogonal", factor_dtype="float32",
                                                alpha=1.0))
        out["base_model.tera_signature"] = ("U8", (len(raw),))
    return out


def adapter_file_bytes(
    method: Union[str, Method],
    layers: Sequence[Union[LayerShape, tuple[int, int]]],
    *,
    dtype: str = "F32",
    metadata: Optional[Mapping[str, str]] = None,
) -> int:
    """Exact bytes of the safetensors adapter file (trainable tensors only, PEFT's
    ``{"format": "pt"}`` metadata by default)."""
    meta = {"format": "pt"} if metadata is None else metadata
    return safetensors_size(adapter_tensors(method, layers), dtype, meta)
