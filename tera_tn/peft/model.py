"""`TeraModel`: the PEFT tuner that injects :class:`~tera_tn.peft.layer.Linear` layers.

Besides injection it owns two pieces of model-level state:

* the factor banks, one :class:`~tera_tn.torch.bank.FactorBank` per ``(seed, factor_init, factor_dtype)``
  shared by every layer and adapter that uses it (neither parameters nor buffers, never in
  ``state_dict``: regenerated from the seed, so DDP/FSDP/accelerate never send them);
* ``tera_signature``: the adapter's description (:mod:`tera_tn.core.adapter_format`, the one
  format of both APIs: seed, factor recipe, α and every adapted layer's spec) as a uint8 tensor.
  It is computed when the adapter is saved and written with the λ in ``adapter_model.safetensors``,
  and compared on load, so a checkpoint applied to another base model, seed or spec fails with a
  message that lists what differs instead of loading garbage. A ``tera_tn.torch.save_tera`` file
  loads too (its per-mode λ are joined into PEFT's ``tera_lambda``). It is not a buffer either:
  DDP would broadcast it at every forward.
"""

from __future__ import annotations

import re
import warnings
from contextlib import contextmanager
from functools import partial
from typing import Optional

import torch
from torch import nn

from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer
from peft.utils import TRANSFORMERS_MODELS_TO_VERA_TARGET_MODULES_MAPPING

from ..core.spec import TeRASpec
from ..core.adapter_format import PER_MODE, adapter_diff, adapter_signature, few, metadata_diff, spec_groups
from ..torch.adapter_file import (
    CheckpointMismatch, concatenated, decode_signature_tensor, describe_layer, factor_key, lambda_keys, signature_key,
    signature_tensor,
)
from ..torch.bank import FactorBank
from ..torch.layer import check_base_weight
from ..torch.load_checks import factor_diff, layer_lambda_problems, nonfinite_lambdas
from .config import TeraConfig
from .layer import BASE_ROW, Linear, TeraLayer, conv1d_type
from .quantized import QuantizedLinear, quantization_of

__all__ = ["TeraModel", "TeraAdapterMismatch", "find_tera_model", "describe_adapter"]

_SIG = "tera_signature"
_LAMBDA = "tera_lambda"
_FACTORS = "tera_factors"


def _inject_adapter_names(module, args, kwargs, original, expanded, repeat, why):
    # generate() repeats each input row num_beams / num_return_sequences times before decoding,
    # while an encoder (and a plain forward) still sees the original rows: the layer's own row
    # count says which list it needs. Without a repetition, any other count reaches the layer's
    # own length check.
    x = args[0] if args else kwargs.get("x")
    rows = len(x) if isinstance(x, torch.Tensor) and x.dim() > 0 else None
    if repeat > 1 and rows is not None and rows not in (len(original), len(expanded)):
        raise ValueError(
            f"adapter_names has {len(original)} names but the input has {rows} rows (shape {tuple(x.shape)}); "
            f"generate repeats each input row {repeat} times ({why}), so pass one name per input row before that "
            f"repetition ({rows / repeat:g} here)"
        )
    kwargs["adapter_names"] = expanded if rows == len(expanded) != len(original) else original
    return args, kwargs


def _generation_rows(kwargs: dict, model: nn.Module) -> tuple[int, str]:
    """``(repeat, why)``: how many rows ``generate`` makes of each input row,
    ``max(num_beams, num_return_sequences)`` (transformers' expansion), each read as transformers
    reads it: the keyword, else the ``generation_config`` passed, else the model's own
    ``generation_config``; ``why`` names the settings above 1 (empty when ``repeat`` is 1)."""
    given = kwargs.get("generation_config")
    default = getattr(model, "generation_config", None)
    sizes, why = [1], []
    for attr in ("num_beams", "num_return_sequences"):
        value = kwargs.get(attr)
        for source in (given, default):
            if value is None and source is not None:
                value = getattr(source, attr, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 1:
            sizes.append(value)
            why.append(f"{attr}={value}")
    return max(sizes), ", ".join(why)


# Module names that FSDP, activation checkpointing and torch.compile insert into module paths;
# state-dict keys may or may not carry them, so λ keys are compared without them.
_WRAPPERS = re.compile(r"(?<![^.])(?:_fsdp_wrapped_module|_checkpoint_wrapped_module|_orig_mod)\.")


def _unwrapped(key: str) -> str:
    return _WRAPPERS.sub("", key)


class _TunerPrefix(str):
    """TeRA's key prefix ``"tera_"``, as registered with PEFT.

    PEFT (``get_peft_model``, ``add_adapter``, ``from_pretrained``) warns "Adapter name 'a' should
    not be contained in the prefix 'tera_'" when ``adapter_name in prefix``: a substring test, true
    for 'a', 'e', 'r', 't', 'te', 'ra', '_' ... Its worry (keys parsed by substring) no longer
    applies: PEFT 0.21 maps state-dict keys structurally (``_get_tuner_state_dict_key_prefixes``,
    ``_remap_adapter_state_dict_for_load``), so such names save and load like any other. Those
    warnings are the only place PEFT asks ``name in prefix``, so this ``str`` answers there whether
    the name is the prefix itself ("tera_" or "tera"), whose keys (``….tera_lambda.tera_``) still
    read ambiguously; as a string it is ``"tera_"`` in every other respect.
    """

    def __contains__(self, item) -> bool:
        if isinstance(item, str):
            return item in (str.__str__(self), str.__str__(self).rstrip("_"))
        return super().__contains__(item)


class TeraAdapterMismatch(CheckpointMismatch):
    """A saved TeRA adapter does not fit the model it is loaded into; the message lists the differences."""


def find_tera_model(model: nn.Module) -> Optional["TeraModel"]:
    """The :class:`TeraModel` of ``model`` (itself, or the tuner inside a ``PeftModel``), or None."""
    if isinstance(model, TeraModel):
        return model
    for m in model.modules():
        if isinstance(m, TeraModel):
            return m
    return None




def _is_sharded(t) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch built without distributed support
        return False
    return isinstance(t, DTensor)


def signature_diff(saved: dict, current: dict) -> list[str]:
    """:func:`~tera_tn.core.adapter_format.adapter_diff` of two descriptions as given (top-level
    fields and layer entries compared as they stand). Loading compares canonical descriptions with
    :func:`~tera_tn.core.adapter_format.metadata_diff`, which calls it."""
    return adapter_diff({"layers": {}, **saved}, current)


def describe_adapter(model: nn.Module, adapter_name: str) -> dict:
    """The canonical description (every layer entry in full) of ``adapter_name`` as the model has it,
    what :func:`~tera_tn.core.adapter_format.metadata_diff` compares a file's with."""
    tera = find_tera_model(model)
    return {"layers": {name: describe_layer(layer, adapter_name) for name, layer in tera.adapter_layers(adapter_name).items()}}


def _check_config_type(config) -> None:
    if isinstance(config, TeraConfig):
        return
    kind = f"{type(config).__module__}.{type(config).__qualname__}"
    hint = (
        " — that is the plain-torch API's config (for tera_tn.torch.add_tera); with PEFT use tera_tn.peft.TeraConfig(...)"
        if type(config).__name__ == "TeRALayersConfig"
        else ""
    )
    raise TypeError(f"the PEFT TeRA method takes a tera_tn.peft.TeraConfig, got {kind}{hint}")


class TeraModel(BaseTuner):
    """Creates a TeRA model from a pretrained transformers model (use :func:`peft.get_peft_model`).

    Example::

        from tera_tn.peft import TeraConfig      # registers "TERA" with PEFT
        from peft import get_peft_model
        model = get_peft_model(base, TeraConfig(target_modules=["query", "value"], order=4))
    """

    prefix: str = _TunerPrefix("tera_")
    tuner_layer_cls = TeraLayer
    target_module_mapping = TRANSFORMERS_MODELS_TO_VERA_TARGET_MODULES_MAPPING
    uses_shared_state: bool = True

    # --- factor banks ------------------------------------------------------------------------
    def _bank(self, config: TeraConfig, device: Optional[torch.device] = None) -> FactorBank:
        banks = self.__dict__.setdefault("_tera_banks", {})
        key = (config.seed, config.factor_init, config.factor_dtype)
        bank = banks.get(key)
        if bank is None:
            bank = FactorBank(config.seed, config.factor_init, config.factor_dtype)
            # Its own copy lives with the first layer that uses it; layers on other devices get
            # copies from the bank's per-device cache.
            if device is not None:
                bank.to(device)
            banks[key] = bank
        return bank

    def __init__(self, model, config, adapter_name: str = "default", *args, **kwargs) -> None:
        # BaseTuner indexes a non-PeftConfig as a dict of configs before any check of ours runs.
        for c in config.values() if isinstance(config, dict) else (config,):
            _check_config_type(c)
        super().__init__(model, config, adapter_name, *args, **kwargs)

    def _check_new_adapter_config(self, config: TeraConfig) -> None:
        _check_config_type(config)
        super()._check_new_adapter_config(config)

    # --- adapters and the AdapterStore ---------------------------------------------------------
    def _store(self):
        """The model's :class:`~tera_tn.peft.AdapterStore`, or None."""
        for m in self.model.modules():
            if isinstance(m, TeraLayer) and m._tera_store_slot is not None:
                return m._tera_store_slot[0]
        return None

    def inject_adapter(self, model, adapter_name, *args, **kwargs) -> None:
        # add_adapter / load_adapter / from_pretrained all come here. A name means one adapter:
        # stored and loaded adapters share one namespace (AdapterStore.add refuses loaded names),
        # so adapter_names=[...] can never serve one or the other depending on cached plans.
        store = self._store()
        if store is not None and adapter_name in store:
            raise ValueError(
                f"cannot add adapter {adapter_name!r}: this model's AdapterStore already holds an adapter of that name, "
                "and stored and loaded adapters share one namespace; remove it from the store first "
                f"(store.remove({adapter_name!r})) or choose another name"
            )
        super().inject_adapter(model, adapter_name, *args, **kwargs)
        self._forget_mixed_plans()

    def delete_adapter(self, adapter_name: str) -> None:
        super().delete_adapter(adapter_name)
        self._forget_mixed_plans()

    def _forget_mixed_plans(self) -> None:
        # A layer keeps the plan of the last adapter_names it saw (rows grouped by frozen network);
        # once the layers' adapters change, a name may stand for another spec or bank.
        for m in self.model.modules():
            if isinstance(m, TeraLayer):
                m._tera_mixed_plan = None

    # --- mixed-adapter batches -----------------------------------------------------------------
    def _available_adapters(self) -> set[str]:
        """Names ``adapter_names`` may use: the model's adapters and those of its AdapterStore."""
        names: set[str] = set()
        for m in self.model.modules():
            if isinstance(m, TeraLayer):
                names |= set(m.tera_lambda.keys())
                if m._tera_store_slot is not None:
                    names |= set(m._tera_store_slot[0].names)
        return names

    @contextmanager
    def _enable_peft_forward_hooks(self, *args, **kwargs):
        # PeftModel.forward/generate call this with their kwargs: `adapter_names` (one adapter per
        # row, PEFT's mixed-batch convention) reaches every TeRA layer through a pre-forward hook.
        adapter_names = kwargs.pop("adapter_names", None)
        if adapter_names is None:
            yield
            return
        if isinstance(adapter_names, str) or not isinstance(adapter_names, (list, tuple)):
            raise TypeError(
                f"adapter_names must be a list of adapter names, one per batch row, got {type(adapter_names).__name__} "
                f"{adapter_names!r}"
            )
        for i, name in enumerate(adapter_names):
            if not isinstance(name, str):
                raise TypeError(
                    f"adapter_names[{i}] is {name!r}, of type {type(name).__name__}; expected one adapter name (a str, or "
                    f"{BASE_ROW!r} for the base model) per batch row"
                )
        if self.training:
            raise ValueError("Cannot pass `adapter_names` when the model is in training mode; call model.eval() first.")
        wanted = {n for n in adapter_names if n != BASE_ROW}
        known = self._available_adapters()
        unknown = sorted(wanted - known)
        if unknown:
            raise ValueError(
                f"Trying to infer with non-existing adapter(s): {', '.join(unknown)}; this model has "
                f"{sorted(known)} (and {BASE_ROW!r} for the base model)"
            )
        original = list(adapter_names)
        # generate() repeats each row max(num_beams, num_return_sequences) times (from keywords or a
        # GenerationConfig); each layer picks the list matching its row count (_inject_adapter_names).
        repeat, why = _generation_rows(kwargs, self.model)
        expanded = [n for n in original for _ in range(repeat)]
        hook = partial(_inject_adapter_names, original=original, expanded=expanded, repeat=repeat, why=why)
        handles = []
        try:
            for m in self.model.modules():
                if isinstance(m, TeraLayer):
                    handles.append(m.register_forward_pre_hook(hook, with_kwargs=True))
            yield
        finally:
            for h in handles:
                h.remove()

    # --- injection ---------------------------------------------------------------------------
    def _create_and_replace(self, tera_config, adapter_name, target, target_name, parent, current_key, **optional_kwargs):
        if current_key is None:
            raise ValueError("Current Key shouldn't be `None`")
        base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
        if not isinstance(base, (nn.Linear, conv1d_type())):
            raise TypeError(
                f"Target module {current_key} ({type(base).__name__}) is not supported: TeRA adapts torch.nn.Linear "
                "and transformers' Conv1D layers only; check `target_modules`."
            )
        quantized = quantization_of(base)
        if quantized is None:
            check_base_weight(base, current_key)
        if isinstance(base, nn.Linear):
            d_out, d_in = base.out_features, base.in_features
        else:
            d_in, d_out = base.weight.shape
        try:
            spec = tera_config.spec_for(d_out, d_in)
        except ValueError as e:
            raise ValueError(f"cannot adapt {current_key}: {e}") from None
        bank = self._bank(tera_config, base.weight.device if base.weight.device.type != "meta" else None)
        if isinstance(target, TeraLayer):
            target.update_layer(adapter_name, spec, bank, tera_config)
        else:
            new_module = (QuantizedLinear if quantized else Linear)(target, adapter_name, spec, bank, tera_config)
            if adapter_name not in self.active_adapters:
                new_module.requires_grad_(False)
            self._replace_module(parent, target_name, new_module, target)

    # --- description ---------------------------------------------------------------------------
    def adapter_layers(self, adapter_name: str) -> dict[str, TeraLayer]:
        """``{qualified name in the base model: layer}`` of every layer carrying ``adapter_name``."""
        return {
            name: m for name, m in self.model.named_modules() if isinstance(m, TeraLayer) and adapter_name in m.tera_lambda
        }

    def _factor_groups(self, adapter_name: str) -> dict:
        """``{spec: "g<i>"}`` in first-use order over the adapter's layers (the signature's groups)."""
        return spec_groups(layer.tera_spec[adapter_name] for layer in self.adapter_layers(adapter_name).values())

    def adapter_signature(self, adapter_name: str) -> dict:
        """The description saved with ``adapter_name`` (:mod:`tera_tn.core.adapter_format`): seed,
        factor recipe, α, and every layer's spec."""
        config = self.peft_config[adapter_name]
        layers = {name: (layer.tera_spec[adapter_name], layer.fan_in_fan_out)
                  for name, layer in self.adapter_layers(adapter_name).items()}
        norms = {name: layer.tera_w0_norm[adapter_name] for name, layer in self.adapter_layers(adapter_name).items()
                 if adapter_name in layer.tera_w0_norm}
        alphas = {name: layer.tera_alpha[adapter_name] for name, layer in self.adapter_layers(adapter_name).items()}
        return adapter_signature(layers, seed=config.seed, factor_init=config.factor_init,
                                 factor_dtype=config.factor_dtype, alpha=config.alpha,
                                 alpha_scaling=getattr(config, "alpha_scaling", "constant"),
                                 update=getattr(config, "update", "additive"),
                                 basis=getattr(config, "basis", "random"), w0_norms=norms,
                                 alphas=alphas, factors_included=bool(getattr(config, "save_factors", False)))

    # --- state dict hooks (save / load) ------------------------------------------------------
    @classmethod
    def _get_adapter_state_dict(cls, model, config, adapter_name, state_dict, unwanted_adapter_names):
        to_return = super()._get_adapter_state_dict(model, config, adapter_name, state_dict, unwanted_adapter_names)
        sharded = [k for k, v in to_return.items() if _is_sharded(v)]
        if sharded:
            # Gathering here would be a collective that hangs when only rank 0 saves; PEFT would
            # otherwise fail deep inside on the shards' storage.
            raise ValueError(
                f"cannot save TeRA adapter {adapter_name!r}: its λ are sharded (FSDP2 DTensors, e.g. {sharded[0]!r}). "
                "Gather them on every rank first, then save on rank 0: state = torch.distributed.checkpoint.state_dict."
                "get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True, "
                "ignore_frozen_params=True)); if rank == 0: model.save_pretrained(out, state_dict=state)"
            )
        tera = find_tera_model(model)
        # The TeraModel's key prefix in `model` ("base_model." inside a PeftModel).
        name = next((n for n, m in model.named_modules() if m is tera), "base_model")
        base = f"{name}." if name else ""
        if tera is not None:
            to_return[f"{base}{_SIG}.{adapter_name}"] = signature_tensor(tera.adapter_signature(adapter_name))
        if getattr(config, "save_factors", False):
            if tera is None:
                raise ValueError("save_factors=True needs the TeraModel (save through the PeftModel)")
            groups = tera._factor_groups(adapter_name)
            bank = tera._bank(config)
            for spec, gname in groups.items():
                for tname, t in bank.group_tensors(spec).items():
                    to_return[f"{base}{_FACTORS}.{gname}.{tname}"] = t.detach().cpu().contiguous()
        return to_return

    @classmethod
    def _remap_adapter_state_dict_for_load(cls, model, config, adapter_name, state_dict):
        tera = find_tera_model(model)
        state_dict = dict(state_dict)
        sig_key = signature_key(state_dict)
        sig_keys = [k for k in state_dict if k == _SIG or k.endswith(f".{_SIG}")]
        factor_keys = [k for k in state_dict if f"{_FACTORS}." in k or k.startswith("factors.")]
        problems = []
        if tera is not None:
            if sig_key is None:
                problems.append(
                    f"the checkpoint has no {_SIG!r} entry, so it was not written by tera_tn "
                    "(or was stripped); refusing to load λ without knowing their specs and seed"
                )
            else:
                try:
                    saved = decode_signature_tensor(state_dict[sig_key], "the checkpoint", state_dict)
                except ValueError as e:
                    saved = None
                    problems.append(f"the checkpoint's {_SIG} entry is unreadable: {e}")
                if saved is not None:
                    problems.extend(metadata_diff(saved, describe_adapter(tera, adapter_name)))
                    if not problems and factor_keys:
                        problems.extend(cls._check_factors(tera, config, adapter_name, state_dict, factor_keys))
                    if saved["lambda_layout"] == PER_MODE:
                        state_dict = _peft_lambdas(saved, state_dict)
        # Checked above; neither is a tensor of the model.
        for k in sig_keys + factor_keys:
            del state_dict[k]
        remapped = super()._remap_adapter_state_dict_for_load(model, config, adapter_name, state_dict)
        notes: list[str] = []
        if problems:
            # Another model's or spec's adapter: its λ are not meant for these layers, so only
            # their finiteness is worth reporting next to the differences.
            problems.extend(nonfinite_lambdas({k: t for k, t in state_dict.items()
                                               if _LAMBDA in k and isinstance(t, torch.Tensor) and t.is_floating_point()}))
        else:
            problems, notes = cls._check_lambdas(model, adapter_name, remapped)
        if problems:
            raise TeraAdapterMismatch(
                f"cannot load TeRA adapter {adapter_name!r} into this model:\n  - "
                + "\n  - ".join(problems)
            )
        if notes:
            warnings.warn(f"TeRA adapter {adapter_name!r} loaded, but:\n  - " + "\n  - ".join(notes), stacklevel=2)
        return remapped

    @classmethod
    def _check_lambdas(cls, model, adapter_name: str, remapped: dict) -> tuple[list[str], list[str]]:
        """``(errors, warnings)`` about the λ of a checkpoint whose keys PEFT mapped to ``model``'s.

        PEFT loads with ``strict=False`` and only warns about missing keys, so a λ tensor missing
        from the file would leave its layer at its initial λ (output off), and one for no adapted
        layer would be dropped: both are errors here, as are λ of the wrong length and absurd or
        non-finite λ (:func:`~tera_tn.torch.checkpoint.lambda_problems`, the one checker)."""
        prefix = "base_model.model."
        # set_peft_model_state_dict strips PEFT's prefix when the model's own keys lack it.
        bare = not any(_unwrapped(n).startswith(prefix) for n, _ in model.named_parameters())
        present = {_unwrapped(k.removeprefix(prefix) if bare else k): t for k, t in remapped.items() if _LAMBDA in k}
        expected = {}
        for name, m in model.named_modules():
            if isinstance(m, TeraLayer) and adapter_name in m.tera_lambda:
                name = _unwrapped(name)
                expected[f"{name}.{_LAMBDA}.{adapter_name}" if name else f"{_LAMBDA}.{adapter_name}"] = m

        def saved_key(key: str) -> str:  # the name the tensor has (or would have) in the file
            return cls._remove_adapter_name_from_key(key, adapter_name)

        problems, notes = [], []
        missing = [saved_key(k) for k in expected if k not in present]
        if missing:
            problems.append(
                f"{len(missing)} λ tensor(s) of adapted layers are missing from the checkpoint: {few(missing)} "
                "(each adapted layer needs its λ; without them the layer would keep its initial λ)"
            )
        extra = sorted(k for k in present if k not in expected)
        if extra:
            problems.append(
                f"{len(extra)} λ tensor(s) in the checkpoint belong to no layer adapted by {adapter_name!r}: "
                f"{few(extra)} (expected exactly one per adapted layer, {len(expected)} in all)"
            )
        for key, layer in expected.items():
            if key in present:
                found, warned = layer_lambda_problems(
                    saved_key(key), present[key], layer, layer.tera_spec[adapter_name], layer.tera_bank[adapter_name],
                    layer.tera_alpha[adapter_name], plain=layer._plain(adapter_name),
                )
                problems += found
                notes += warned
        return problems, notes

    @staticmethod
    def _check_factors(tera, config, adapter_name, state_dict, factor_keys) -> list[str]:
        bank = tera._bank(config)

        def stored(label: str):
            key = factor_key(factor_keys, *label.split(".")[-2:])
            return None if key is None else state_dict[key]

        return [
            line
            for spec, gname in tera._factor_groups(adapter_name).items()
            for line in factor_diff(bank, spec, f"{_FACTORS}.{gname}", stored)
        ]


def _peft_lambdas(saved: dict, state_dict: dict) -> dict:
    """``state_dict`` of a ``save_tera`` file (λ per mode, ``<layer>.lambda.<n>``) with each layer's
    complete λ joined into the key PEFT's own files use, ``base_model.model.<layer>.tera_lambda``;
    an incomplete layer is left as it is (and reported missing)."""
    found, _ = lambda_keys(saved, state_dict)
    out = dict(state_dict)
    for name, keys in found.items():
        if keys and len(keys) == TeRASpec.from_dict(saved["layers"][name]["spec"]).order:
            out[f"base_model.model.{name}.{_LAMBDA}"] = concatenated([out.pop(k) for k in keys])
    return out
