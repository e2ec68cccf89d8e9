"""`AdapterStore`: many TeRA adapters of one family served by one PEFT model.

Every adapter of a family (same seed, factor recipe and per-layer specs) shares the frozen core
and factors, so an adapter is only its λ: ``Σ_n R_n`` numbers per adapted layer (``Σ_n K_n + R_n``
for ``diag="both"``) and its α. The store keeps them as ONE float32 table of shape
``(capacity, Σ_layers num_trainable)`` (a layer reads its column slice) plus a ``(capacity,)`` α
vector, instead of one ``nn.Parameter`` per adapter per layer, and never touches the base weights.
Stored adapters are used by name with ``model(..., adapter_names=[...])`` and ``generate``, or for
every row after :meth:`AdapterStore.use`.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Optional, Union

import torch

from ..core.adapter_format import PER_MODE, few, metadata_diff
from ..core.spec import TeRASpec
from ..torch.adapter_file import (
    WEIGHTS_NAME, adapter_file_path, concatenated, lambda_keys, metadata_of, open_adapter_file,
)
from ..torch.load_checks import layer_lambda_problems
from .layer import BASE_ROW, TeraLayer
from .model import TeraAdapterMismatch, describe_adapter, find_tera_model

__all__ = ["AdapterStore"]

_LAMBDA = ".tera_lambda"  # the λ of a layer, named in messages as in PEFT's files


def _check_not_a_parent(path: Path) -> None:
    # PEFT's save_pretrained writes an adapter not named "default" into a subfolder of that name.
    if path.is_dir() and not (path / WEIGHTS_NAME).is_file():
        inner = sorted(p.parent.name for p in path.glob(f"*/{WEIGHTS_NAME}"))
        if inner:
            raise FileNotFoundError(
                f"{path} holds no {WEIGHTS_NAME} itself but its subfolder(s) {inner} do (PEFT saves adapters not named "
                f"'default' there): pass path={str(path / inner[0])!r}"
            )


class AdapterStore:
    """λ tables of many adapters of one family on a PEFT TeRA model.

    Args:
        model: a ``PeftModel`` (or its ``TeraModel``) with at least one TeRA adapter.
        like: the loaded adapter that defines the family (its seed, factor recipe and the spec of
            each adapted layer); default: the active adapter. Its own λ are not copied.

    A model has at most one store. Adapter names share one namespace with the model's adapters;
    ``"__base__"`` is reserved.
    """

    def __init__(self, model, like: Optional[str] = None) -> None:
        tera = find_tera_model(model)
        if tera is None:
            raise TypeError(
                f"AdapterStore needs a PEFT model with a TeRA adapter (get_peft_model(base, TeraConfig(...))), "
                f"got {type(model).__name__}"
            )
        like = like if like is not None else tera.active_adapters[0]
        if like not in tera.peft_config:
            raise ValueError(f"like={like!r} is not an adapter of this model; it has {sorted(tera.peft_config)}")
        layers = tera.adapter_layers(like)
        taken = [name for name, layer in layers.items() if layer._tera_store_slot is not None]
        if taken:
            raise ValueError(f"this model already has an AdapterStore (on {taken[0]}); use that one")
        config = tera.peft_config[like]
        self._tera = tera
        self._family = describe_adapter(tera, like)
        self._seed = tera.peft_config[like].seed
        self._bank = tera._bank(config)
        self._layers: dict[str, tuple[TeraLayer, int, int]] = {}
        self._specs: dict[str, TeRASpec] = {}
        offset = 0
        for name, layer in layers.items():
            spec = layer.tera_spec[like]
            self._layers[name] = (layer, offset, spec.num_trainable)
            self._specs[name] = spec
            offset += spec.num_trainable
        first = next(iter(layers.values()))
        self.device = first.tera_lambda[like].device
        self._table = torch.zeros(0, offset, dtype=torch.float32, device=self.device)
        self._alphas = torch.zeros(0, dtype=torch.float32, device=self.device)
        self._rows_of: dict[str, int] = {}
        self._names: list[str] = []
        # Bumped whenever a row changes meaning, so layers re-plan their mixed batches.
        self.version = 0
        self.active: Optional[str] = None
        for name, (layer, off, _) in self._layers.items():
            layer._tera_store_slot = (self, off, layer.tera_spec[like], self._bank)

    # --- contents ------------------------------------------------------------------------------
    @property
    def names(self) -> tuple[str, ...]:
        """The stored adapters, in their table order."""
        return tuple(self._names)

    def __len__(self) -> int:
        return len(self._names)

    def __contains__(self, name) -> bool:
        return name in self._rows_of

    @property
    def nbytes(self) -> int:
        """Bytes held by the store's tensors (λ table and α vector, spare capacity included)."""
        return self._table.numel() * self._table.element_size() + self._alphas.numel() * self._alphas.element_size()

    def _rows(self, used: torch.Tensor, offset: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(λ of the adapters at rows used, (a, width)), their α (a,))`` for one layer."""
        return self._table[used, offset : offset + width], self._alphas[used]

    # --- add / remove / switch -------------------------------------------------------------------
    def add(
        self,
        name: str,
        *,
        path: Union[str, os.PathLike, None] = None,
        adapter: Optional[str] = None,
        overwrite: bool = False,
    ) -> None:
        """Store adapter ``name`` read from ``path`` (a folder or ``adapter_model.safetensors`` saved by
        tera_tn.peft, or a ``tera_tn.torch.save_tera`` file) or copied from ``adapter``, an adapter loaded in the model (which may then be
        deleted with ``model.delete_adapter``). Exactly one of the two. The adapter must be of the
        store's family (α may differ); otherwise :class:`TeraAdapterMismatch` lists what differs.
        An existing stored ``name`` is replaced only with ``overwrite=True``."""
        if not isinstance(name, str) or not name or name == BASE_ROW:
            raise ValueError(f"adapter name must be a non-empty string other than {BASE_ROW!r}, got {name!r}")
        if (path is None) == (adapter is None):
            raise ValueError("AdapterStore.add takes exactly one of path= (a saved adapter) or adapter= (a loaded one)")
        if name in self._tera.peft_config:
            raise ValueError(f"{name!r} is already an adapter of the model; store it under another name")
        if name in self._rows_of and not overwrite:
            raise ValueError(f"the store already holds an adapter {name!r}; pass overwrite=True to replace it")
        if path is not None:
            what = f"{Path(path)}"
            _check_not_a_parent(Path(path))
            signature, lambdas, extra = self._read(path)
        else:
            if adapter not in self._tera.peft_config:
                raise ValueError(f"adapter={adapter!r} is not loaded in the model; it has {sorted(self._tera.peft_config)}")
            what = f"loaded adapter {adapter!r}"
            signature = describe_adapter(self._tera, adapter)
            lambdas = {n: layer.tera_lambda[adapter].detach() for n, layer in self._tera.adapter_layers(adapter).items()}
            extra = []
        # α may differ from the family's; the store keeps one α per adapter, so its layers must share it.
        problems = metadata_diff(signature, self._family, ignore=("alpha",))
        alphas = sorted({float(e["alpha"]) for e in signature["layers"].values()})
        if any(e["update"] != "additive" or e["basis"] != "random" for e in signature["layers"].values()):
            problems.append("it is multiplicative or uses W0's bases: the store serves the plain network only "
                            "(update='additive', basis='random'), whose mixed batches share one factored chain")
        if len(alphas) > 1:
            problems.append(f"its layers use {len(alphas)} different α ({few([f'{a:.6g}' for a in alphas])}; "
                            "alpha_scaling='w0_relative'?); the store keeps one α per adapter, so expected one α for all layers")
        header = (f"cannot store {name!r} ({what}): it is not of the store's family (seed {self._seed}, "
                  f"{len(self._layers)} adapted layers); 'checkpoint' below is the adapter, 'model' the store")
        notes: list[str] = []
        if not problems:
            header = f"cannot store {name!r} ({what}): its λ are no valid adapter for the store's {len(self._layers)} adapted layers"
            problems, notes = self._check_lambdas(lambdas, extra, alphas[0])
        if problems:
            raise TeraAdapterMismatch(header + ":\n  - " + "\n  - ".join(problems))
        if notes:
            warnings.warn(f"stored {name!r} ({what}), but:\n  - " + "\n  - ".join(notes), stacklevel=2)
        row = torch.empty(self._table.shape[1], dtype=torch.float32, device=self.device)
        for layer_name, (_, off, width) in self._layers.items():
            row[off : off + width] = lambdas[layer_name].reshape(-1).to(row)
        self._put(name, row, alphas[0])

    def _check_lambdas(self, lambdas: dict, extra: list[str], alpha: float) -> tuple[list[str], list[str]]:
        """``(errors, warnings)``: a λ for every layer of the store and for nothing else, each of the
        layer's length and neither non-finite nor absurd (the checker PEFT loading uses too)."""
        problems, notes = [], []
        missing = [n for n in self._layers if n not in lambdas]
        if missing:
            problems.append(f"no λ for {len(missing)} adapted layer(s) of the store: {few(missing)}")
        if extra:
            problems.append(
                f"{len(extra)} λ tensor(s) belong to no adapted layer of the store: {few(extra)} "
                f"(expected exactly one per layer, {len(self._layers)} in all)"
            )
        for layer_name, (layer, _, _) in self._layers.items():
            if layer_name in lambdas:
                spec, bank = self._specs[layer_name], self._bank
                found, warned = layer_lambda_problems(f"{layer_name}{_LAMBDA}", lambdas[layer_name], layer, spec, bank, alpha)
                problems += found
                notes += warned
        return problems, notes

    def _put(self, name: str, row: torch.Tensor, alpha: float) -> None:
        i = self._rows_of.get(name)
        if i is None:
            i = len(self._names)
            if i == self._table.shape[0]:
                # Grow by an eighth: amortized copies stay linear, spare memory at most 1/8.
                self._grow(i + max(1, i // 8))
            self._names.append(name)
            self._rows_of[name] = i
        self._table[i] = row
        self._alphas[i] = alpha
        self.version += 1

    def _grow(self, capacity: int) -> None:
        table = self._table.new_zeros(capacity, self._table.shape[1])
        table[: self._table.shape[0]] = self._table
        alphas = self._alphas.new_zeros(capacity)
        alphas[: self._alphas.shape[0]] = self._alphas
        self._table, self._alphas = table, alphas

    def remove(self, name: str) -> None:
        """Drop ``name`` (the last row moves into its slot; capacity is kept for later adds)."""
        if name not in self._rows_of:
            raise KeyError(f"the store holds no adapter {name!r}; it has {self._few()}")
        i = self._rows_of.pop(name)
        last = len(self._names) - 1
        if i != last:
            moved = self._names[last]
            self._table[i] = self._table[last]
            self._alphas[i] = self._alphas[last]
            self._names[i] = moved
            self._rows_of[moved] = i
        self._names.pop()
        if self.active == name:
            self.active = None
        self.version += 1

    def use(self, name: Optional[str]) -> None:
        """Serve every row of plain forwards (no ``adapter_names``) with stored adapter ``name``
        instead of the model's active adapter; ``None`` goes back to the model's own adapters."""
        if name is not None and name not in self._rows_of:
            raise KeyError(f"the store holds no adapter {name!r}; it has {self._few()}")
        self.active = name

    def _few(self, limit: int = 8) -> str:
        shown = ", ".join(repr(n) for n in self._names[:limit])
        more = f" (+{len(self._names) - limit} more)" if len(self._names) > limit else ""
        return f"[{shown}]{more}" if self._names else "nothing"

    # --- files -----------------------------------------------------------------------------------
    def _read(self, path) -> tuple[dict, dict[str, torch.Tensor], list[str]]:
        """``(description, {adapted layer name: λ}, [λ keys for no layer of the store])`` of an adapter
        file of either API (:func:`~tera_tn.torch.adapter_file.lambda_keys` finds the λ of each layout;
        a layer whose λ are incomplete counts as missing)."""
        file = adapter_file_path(path)
        with open_adapter_file(file) as f:
            meta = metadata_of(f, file)
            found, extra = lambda_keys(meta, f.keys(), self._layers)
            lambdas = {}
            for layer_name, keys in found.items():
                complete = meta["lambda_layout"] != PER_MODE or len(keys) == self._specs[layer_name].order
                if keys and complete:
                    lambdas[layer_name] = concatenated([f.get_tensor(k) for k in keys])
        return meta, lambdas, extra

    def __repr__(self) -> str:
        return (
            f"AdapterStore({len(self)} adapters, seed {self._seed}, {len(self._layers)} layers, "
            f"{self._table.shape[1]} numbers per adapter, {self.nbytes} bytes)"
        )
