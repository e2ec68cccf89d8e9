"""`TeraModel`: the PEFT tuner that injects :class:`~tera_tn.peft.layer.Linear` layers.

Besides injection it owns two pieces of model-level state:

* the factor banks, one :class:`~tera_tn.torch.FactorBank` per ``(seed, factor_init, factor_dtype)``
  shared by every layer and adapter that uses it (neither parameters nor buffers, never in
  ``state_dict``: regenerated from the seed, so DDP/FSDP/accelerate never send them);
* ``tera_signature``: a JSON description of each adapter (seed, factor init/dtype, α and every
  adapted layer's shape and spec) as a uint8 tensor. It is computed when the adapter is saved and
  written with the λ in ``adapter_model.safetensors``, and compared on load, so a checkpoint applied
  to another base model, seed or spec fails with a message that lists what differs instead of
  loading garbage. It is not a buffer either: DDP would broadcast it at every forward.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from functools import partial
from typing import Optional

import torch
from torch import nn

from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer
from peft.utils import TRANSFORMERS_MODELS_TO_VERA_TARGET_MODULES_MAPPING

from ..core.signature import SIGNATURE_FORMAT, adapter_signature, signature_bytes, spec_groups
from ..torch.bank import FactorBank
from ..torch.checkpoint import CheckpointMismatch, adapter_diff, factor_diff
from ..torch.layer import check_base_weight
from .config import TeraConfig
from .io import nonfinite_lambdas
from .layer import BASE_ROW, Linear, TeraLayer, _conv1d_type
from .quantized import QuantizedLinear, quantization_of

__all__ = ["TeraModel", "TeraAdapterMismatch", "SIGNATURE_FORMAT"]

_SIG = "tera_signature"
_FACTORS = "tera_factors"


def _inject_adapter_names(module, args, kwargs, adapter_names):
    kwargs["adapter_names"] = adapter_names
    return args, kwargs


def _encoder_of(model: nn.Module) -> Optional[nn.Module]:
    get = getattr(model, "get_encoder", None)
    encoder = get() if callable(get) else None
    # transformers 5 returns the model itself when it has no encoder.
    return None if encoder is model else encoder


class TeraAdapterMismatch(CheckpointMismatch):
    """A saved TeRA adapter does not fit the model it is loaded into; the message lists the differences."""


def _find_tera_model(model: nn.Module) -> Optional["TeraModel"]:
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
    """Human-readable differences between a checkpoint's signature and the model's (the plain-torch
    checkpoints' checker, :func:`~tera_tn.torch.checkpoint.adapter_diff`, after the format check)."""
    if saved.get("format") != SIGNATURE_FORMAT:
        return [f"signature format {saved.get('format')!r}, this tera_tn reads format {SIGNATURE_FORMAT}"]
    return adapter_diff({"layers": {}, **saved}, current)


def _check_config_type(config) -> None:
    if isinstance(config, TeraConfig):
        return
    kind = f"{type(config).__module__}.{type(config).__qualname__}"
    hint = (
        " — that is the plain-torch API's config (for tera_tn.torch.add_tera); with PEFT use tera_tn.peft.TeraConfig(...)"
        if type(config).__name__ == "TeRAConfig"
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

    prefix: str = "tera_"
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
        if self.training:
            raise ValueError("Cannot pass `adapter_names` when the model is in training mode; call model.eval() first.")
        wanted = {n for n in adapter_names if n != BASE_ROW}
        known = self._available_adapters()
        unknown = sorted(str(n) for n in wanted - known)
        if unknown:
            raise ValueError(
                f"Trying to infer with non-existing adapter(s): {', '.join(unknown)}; this model has "
                f"{sorted(known)} (and {BASE_ROW!r} for the base model)"
            )
        original = list(adapter_names)
        num_beams = kwargs.get("num_beams")
        if isinstance(num_beams, int) and num_beams > 1:
            # generate repeats each input num_beams times; the encoder still sees the originals.
            adapter_names = [n for n in original for _ in range(num_beams)]
        handles = []
        try:
            encoder = _encoder_of(self.model)
            encoder_layers = set() if encoder is None else {id(m) for m in encoder.modules()}
            for m in self.model.modules():
                if isinstance(m, TeraLayer):
                    names = original if id(m) in encoder_layers else list(adapter_names)
                    hook = partial(_inject_adapter_names, adapter_names=names)
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
        if not isinstance(base, (nn.Linear, _conv1d_type())):
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
        """What identifies ``adapter_name``: seed, factor recipe, α, and every layer's shape and spec."""
        config = self.peft_config[adapter_name]
        layers = {name: (layer.tera_spec[adapter_name], layer.fan_in_fan_out)
                  for name, layer in self.adapter_layers(adapter_name).items()}
        return adapter_signature(layers, seed=config.seed, factor_init=config.factor_init,
                                 factor_dtype=config.factor_dtype, alpha=config.alpha)

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
        tera = _find_tera_model(model)
        # The TeraModel's key prefix in `model` ("base_model." inside a PeftModel).
        name = next((n for n, m in model.named_modules() if m is tera), "base_model")
        base = f"{name}." if name else ""
        if tera is not None:
            raw = signature_bytes(tera.adapter_signature(adapter_name))
            to_return[f"{base}{_SIG}.{adapter_name}"] = torch.tensor(list(raw), dtype=torch.uint8)
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
        tera = _find_tera_model(model)
        state_dict = dict(state_dict)
        sig_keys = [k for k in state_dict if k == _SIG or k.endswith(f".{_SIG}")]
        factor_keys = [k for k in state_dict if f"{_FACTORS}." in k]
        if tera is not None:
            problems = []
            current = tera.adapter_signature(adapter_name)
            if not sig_keys:
                problems.append(
                    f"the checkpoint has no {_SIG!r} entry, so it was not written by tera_tn.peft "
                    "(or was stripped); refusing to load λ without knowing their specs and seed"
                )
            else:
                try:
                    saved = json.loads(bytes(state_dict[sig_keys[0]].to(torch.uint8).cpu().tolist()).decode())
                except (ValueError, UnicodeDecodeError) as e:
                    saved = None
                    problems.append(f"the checkpoint's {_SIG} entry is unreadable: {e}")
                if saved is not None:
                    problems.extend(signature_diff(saved, current))
                    if not problems and factor_keys:
                        problems.extend(cls._check_factors(tera, config, adapter_name, saved, state_dict, factor_keys))
            problems.extend(nonfinite_lambdas(state_dict))
            if problems:
                raise TeraAdapterMismatch(
                    f"cannot load TeRA adapter {adapter_name!r} into this model:\n  - " + "\n  - ".join(problems)
                )
        # Checked above; neither is a tensor of the model.
        for k in sig_keys + factor_keys:
            del state_dict[k]
        return super()._remap_adapter_state_dict_for_load(model, config, adapter_name, state_dict)

    @staticmethod
    def _check_factors(tera, config, adapter_name, saved, state_dict, factor_keys) -> list[str]:
        bank = tera._bank(config)

        def stored(key: str):
            return next((state_dict[k] for k in factor_keys if k.endswith(key)), None)

        return [
            line
            for spec, gname in tera._factor_groups(adapter_name).items()
            for line in factor_diff(bank, spec, f"{_FACTORS}.{gname}", stored)
        ]
