"""Reading and writing TeRA adapter files (safetensors) for both APIs.

The format (schema, version, encoding, checker) is :mod:`tera_tn.core.adapter_format`; this module
is its file side: where the description sits in a file (the ``tera_signature`` tensor, or the
format-1 header), which tensors hold each layer's λ in either layout, and stored factors.
``tera_tn.torch.load_tera`` reads PEFT adapter folders with it and ``tera_tn.peft`` reads
``save_tera`` files with it.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Iterable, Optional, Type, Union

import torch
from torch import nn

from ..core.adapter_format import (
    HEADER_KEY, PER_MODE, SIGNATURE_KEY, AdapterFormatError, decode, encode, layer_entry,
)
from ..core.spec import TeRASpec
from .adapter import DEFAULT_ADAPTER

__all__ = [
    "WEIGHTS_NAME", "EXPECTED", "LAMBDA_SUFFIX", "CheckpointMismatch", "adapter_file_path", "unreadable",
    "open_adapter_file", "read_adapter_metadata", "metadata_of", "signature_key", "signature_tensor",
    "decode_signature_tensor", "lambda_keys", "factor_key", "concatenated", "describe_layer",
]

#: the file PEFT saves an adapter's tensors to, inside the adapter folder
WEIGHTS_NAME = "adapter_model.safetensors"
#: what every "this is not an adapter file" message asks for
EXPECTED = ("an adapter written by tera_tn (tera_tn.torch.save_tera, or tera_tn.peft's save_adapter / "
            "save_pretrained)")
#: the λ parameter of a PEFT TeRA layer, last component of its key in an adapter file
LAMBDA_SUFFIX = "tera_lambda"


class CheckpointMismatch(ValueError):
    """The checkpoint does not fit the model; the message lists every difference."""


def describe_layer(layer: nn.Module, adapter: str = DEFAULT_ADAPTER) -> dict:
    """The full description entry (:func:`~tera_tn.core.adapter_format.layer_entry`) of ``adapter``
    on a TeRA layer of either API: spec, seed, factor recipe, α, ``alpha_scaling``, ``update``, ``basis``,
    ``fan_in_fan_out`` and, where α or ΔW depends on the base weight, the ``‖W0‖`` it was made for."""
    bank = layer.adapter_bank(adapter)
    return layer_entry(layer.tera_spec[adapter], seed=bank.seed, factor_init=bank.factor_init,
                       factor_dtype=bank.dtype_name, alpha=layer.tera_alpha[adapter],
                       fan_in_fan_out=bool(getattr(layer, "fan_in_fan_out", False)),
                       alpha_scaling=layer.tera_alpha_scaling[adapter], update=layer.tera_update[adapter],
                       basis=layer.tera_basis[adapter],
                       w0_norm=layer.tera_w0_norm.get(adapter))


def adapter_file_path(path: Union[str, os.PathLike], *, folder_error: Type[OSError] = FileNotFoundError) -> Path:
    """The adapter file ``path`` names: the file itself, or a PEFT adapter folder's
    ``adapter_model.safetensors``; a folder without one raises ``folder_error``, a missing path
    ``FileNotFoundError``, both naming the path."""
    p = Path(path)
    if p.is_dir():
        if not (p / WEIGHTS_NAME).is_file():
            raise folder_error(f"{p} is a folder; expected a checkpoint: a .safetensors file, or a PEFT adapter "
                               f"folder holding {WEIGHTS_NAME} (this one holds none), {EXPECTED.removeprefix('an adapter ')}")
        return p / WEIGHTS_NAME
    if not p.exists():
        raise FileNotFoundError(f"{p} does not exist; expected {EXPECTED}")
    return p


def unreadable(path: Path, err: BaseException) -> ValueError:
    """The error for a file safetensors refuses (its own messages name no file)."""
    return ValueError(f"{path} is not a readable safetensors file ({err}): damaged, cut short by an interrupted copy "
                      f"or download, or of another format; expected {EXPECTED}")


@contextlib.contextmanager
def open_adapter_file(path: Path):
    """``safe_open`` whose failures name the file."""
    from safetensors import SafetensorError, safe_open

    try:
        f = safe_open(str(path), framework="pt")
    except (SafetensorError, OSError) as err:
        raise unreadable(path, err) from None
    with f:
        yield f


def signature_key(keys: Iterable[str]) -> Optional[str]:
    """The key of the description tensor among a file's tensor keys (``tera_signature`` from
    ``save_tera``, ``base_model.tera_signature`` from PEFT), or None."""
    return next((k for k in sorted(keys) if k == SIGNATURE_KEY or k.endswith(f".{SIGNATURE_KEY}")), None)


def signature_tensor(meta: dict) -> torch.Tensor:
    """The ``uint8`` tensor a file stores ``meta`` in."""
    return torch.tensor(list(encode(meta)), dtype=torch.uint8)


def decode_signature_tensor(t: torch.Tensor, where: str, keys: Iterable[str] = ()) -> dict:
    """The canonical description held by a ``tera_signature`` tensor (``keys``: the file's tensor
    keys, to tell whether a format-1 PEFT file stored factors)."""
    raw = bytes(t.to(torch.uint8).reshape(-1).cpu().tolist())
    return _completed(decode(raw, source="tensor", where=where, expected=EXPECTED), keys)


def metadata_of(f, path: Path) -> dict:
    """The canonical description of an open adapter file: the format-1 header entry if it has
    one (0.1.0's ``save_tera``), else the ``tera_signature`` tensor."""
    header = f.metadata() or {}
    keys = list(f.keys())
    if HEADER_KEY in header:
        return _completed(decode(header[HEADER_KEY], source="header", where=str(path), expected=EXPECTED), keys)
    key = signature_key(keys)
    if key is None:
        raise AdapterFormatError(f"{path} is not a tera_tn checkpoint: it holds no {SIGNATURE_KEY} (nor the "
                                 f"{HEADER_KEY!r} metadata of older files); expected {EXPECTED}")
    return decode_signature_tensor(f.get_tensor(key), str(path), keys)


def read_adapter_metadata(path: Union[str, os.PathLike], *, folder_error: Type[OSError] = FileNotFoundError) -> dict:
    """The canonical description (see :mod:`tera_tn.core.adapter_format`) of an adapter file or
    PEFT adapter folder, whichever API wrote it, in any format this tera_tn reads.

    Raises ``FileNotFoundError`` for a missing path (``folder_error`` for a folder without an
    adapter file) and ``ValueError`` naming the file for anything unreadable.
    """
    p = adapter_file_path(path, folder_error=folder_error)
    with open_adapter_file(p) as f:
        return metadata_of(f, p)


def _completed(meta: dict, keys: Iterable[str]) -> dict:
    """Fill in what a format-1 PEFT description left open: whether factors are stored, and a
    ``"w0_relative"`` layer's α (``alpha·‖W0‖/‖M‖``, from the factors its seed generates)."""
    if meta.get("factors_included") is None:
        meta["factors_included"] = any(".tera_factors." in f".{k}" for k in keys)
    unknown = [name for name, e in meta["layers"].items() if e["alpha"] is None]
    if unknown:
        from .bank import FactorBank

        banks: dict[tuple, FactorBank] = {}
        for name in unknown:
            e = meta["layers"][name]
            bank = banks.setdefault((e["seed"], e["factor_init"], e["factor_dtype"]),
                                    FactorBank(e["seed"], e["factor_init"], e["factor_dtype"]))
            spec = TeRASpec.from_dict(e["spec"])
            bank.add(spec)  # a fresh bank holds no group yet: its frozen map comes from the seed
            e["alpha"] = float(meta["alpha"]) * float(e["w0_norm"]) / bank.frozen_norm(spec)
    return meta


def lambda_keys(meta: dict, keys: Iterable[str], names: Optional[Iterable[str]] = None) -> tuple[dict[str, list[str]], list[str]]:
    """``({layer: [keys of its λ tensors]}, [λ keys of no such layer])`` in a file with tensor keys
    ``keys`` described by ``meta``, for the layers ``names`` (default: the file's own).

    ``"per_mode"`` layout: ``<layer>.lambda.<n>``, one per mode (those present are listed, in
    order); ``"per_layer"``: one ``[prefix.]<layer>.tera_lambda``, whatever wrapped the model
    (``base_model.model.``) stripped one component at a time."""
    wanted = list(meta["layers"] if names is None else names)
    found: dict[str, list[str]] = {}
    extra: list[str] = []
    if meta["lambda_layout"] == PER_MODE:
        keyset = set(keys)
        for name in wanted:
            order = TeRASpec.from_dict(meta["layers"][name]["spec"]).order if name in meta["layers"] else 0
            found[name] = [k for n in range(order) if (k := f"{name}.lambda.{n}") in keyset]
        known = {k for ks in found.values() for k in ks}
        extra = sorted(k for k in keyset if ".lambda." in k and k not in known and not k.startswith("factors."))
        return found, extra
    targets = set(wanted)
    for key in keys:
        if not (key == LAMBDA_SUFFIX or key.endswith(f".{LAMBDA_SUFFIX}")):
            continue
        parts = key[: -len(LAMBDA_SUFFIX)].rstrip(".").split(".")
        for start in range(len(parts)):
            candidate = ".".join(parts[start:])
            if candidate in targets:
                found[candidate] = [key]
                break
        else:
            extra.append(key)
    return found, sorted(extra)


def factor_key(keys: Iterable[str], group: str, name: str) -> Optional[str]:
    """The key of stored factor ``name`` of ``group``: ``factors.<group>.<name>`` (``save_tera``)
    or ``[prefix.]tera_factors.<group>.<name>`` (PEFT); None when the file lacks it."""
    tail = f"{group}.{name}"
    return next((k for k in keys if k == f"factors.{tail}" or k == f"tera_factors.{tail}"
                 or k.endswith(f".tera_factors.{tail}")), None)


def concatenated(parts: list[torch.Tensor]) -> torch.Tensor:
    """A layer's λ vector from its stored parts (one tensor per mode, or the one vector)."""
    return parts[0].reshape(-1) if len(parts) == 1 else torch.cat([p.reshape(-1) for p in parts])

