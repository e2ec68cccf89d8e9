"""Adapter checkpoints in safetensors: λ vectors + spec + seed + library version, factors optional.

File layout (no pickle anywhere, only ``safetensors``):

* tensors ``"<layer name>.lambda.<n>"``: the λ_n of each layer, float32;
* optionally ``"factors.<group>.core"`` / ``"factors.<group>.u<n>"``: the frozen factors (they
  are regenerated from the seed on load, so stored factors are only verified against them);
* metadata ``"tera_tn"``: JSON ``{"format": 1, "library_version", "layers": {name: {"spec",
  "alpha", "seed", "factor_init", "core_scale", "generator_version", "factor_dtype", "group"}},
  "factors_included"}``. ``factor_init``, ``core_scale``, ``generator_version`` and
  ``factor_dtype`` are the recipe the frozen factors were generated with (see
  :func:`tera_tn.core.factors.factor_recipe`); files written before the recipe was recorded lack
  ``core_scale`` and ``generator_version`` and read as generator version 1 with its core scale.

The file describes itself: :func:`load_tera` into a model without TeRA layers rebuilds them from
these entries (spec, seed, α and recipe of every layer) before loading λ.

A whole model's adapter is a few KB: a full-rank order-6 4096×4096 layer trains 96 numbers.
"""

from __future__ import annotations

import json
import contextlib
import math
import os
import warnings
from pathlib import Path
from typing import Callable, Mapping, Optional, Union

import torch
from torch import nn

from .. import __version__
from .._files import sweep_stale_temps, write_atomic
from ..core.factors import RECIPE_FIELDS, factor_recipe, recipe_diff, with_legacy_recipe
from ..core.spec import TeRASpec
from ..core.modeproduct import multi_mode_product
from .autograd import FrozenNetwork, merged_weight
from .adapter import DEFAULT_ADAPTER, weight_norm
from .bank import FactorBank
from .layer import TeRALinear, check_base_weight
from .model import _set_child, install_layer, place_bank, tera_layers

__all__ = ["save_tera", "load_tera", "read_tera_metadata", "CheckpointMismatch", "adapter_diff", "factor_diff"]

_FORMAT = 1
_META_KEY = "tera_tn"


class CheckpointMismatch(ValueError):
    """The checkpoint does not fit the model; the message lists every difference."""


def save_tera(model: nn.Module, path: Union[str, os.PathLike], *, include_factors: bool = False, overwrite: bool = False) -> Path:
    """Write the TeRA adapter of ``model`` to ``path`` (safetensors).

    Args:
        include_factors: also store the frozen factors (verified on load; normally redundant).
        overwrite: replace an existing file; without it an existing ``path`` raises
            ``FileExistsError``. The file is written to a temporary name and renamed, so a
            crash never leaves a truncated checkpoint behind; temporaries of a killed save are
            removed by the next save or load in the same folder.
    """
    from safetensors.torch import save

    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a folder; save_tera expects a file path such as {path / 'adapter.safetensors'}")
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; pass overwrite=True to replace it")
    tensors: dict[str, torch.Tensor] = {}
    layers = {}
    groups: dict[tuple, str] = {}
    for name, layer in tera_layers(model):
        bank = layer.tera_bank
        gkey = (id(bank), layer.spec)
        if gkey not in groups:
            groups[gkey] = f"g{len(groups)}"
            if include_factors:
                for key, t in bank.group_tensors(layer.spec).items():
                    tensors[f"factors.{groups[gkey]}.{key}"] = t.detach().cpu().contiguous()
        for n, lam in enumerate(layer.scales()):
            tensors[f"{name}.lambda.{n}"] = lam.detach().to(device="cpu", dtype=torch.float32).contiguous()
        layers[name] = {
            "spec": layer.spec.to_dict(),
            "alpha": layer.alpha,
            "seed": bank.seed,
            **factor_recipe(bank.factor_init, bank.dtype_name),
            "group": groups[gkey],
            **_w0_fields(layer),
        }
    if not layers:
        raise ValueError("model has no TeRA layers to save; call add_tera first")
    meta = {"format": _FORMAT, "library_version": __version__, "layers": layers, "factors_included": include_factors}
    path.parent.mkdir(parents=True, exist_ok=True)
    sweep_stale_temps(path.parent)
    # Serialized in memory (a checkpoint is KBs, MBs with factors) and written by write_atomic:
    # safetensors' own save_file would leave an unsweepable ``.tmpXXXXXX`` beside ``path`` if killed.
    write_atomic(path, save(tensors, metadata={_META_KEY: json.dumps(meta)}), overwrite=overwrite)
    return path


_LAYER_KEYS = ("spec", "alpha", "seed", "factor_init", "factor_dtype", "group")
_EXPECTED = "a checkpoint written by tera_tn.torch.save_tera"


def _checkpoint_file(path: Union[str, os.PathLike]) -> Path:
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a folder; expected {_EXPECTED} (a .safetensors file)")
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist; expected {_EXPECTED}")
    return path


@contextlib.contextmanager
def _open(path: Path):
    """``safe_open`` whose failures name the file (safetensors' own messages do not)."""
    from safetensors import SafetensorError, safe_open

    try:
        f = safe_open(str(path), framework="pt")
    except (SafetensorError, OSError) as err:
        raise ValueError(f"{path} is not a readable safetensors file ({err}): damaged, cut short by an "
                         f"interrupted copy, or of another format; expected {_EXPECTED}") from None
    with f:
        yield f


def _bad_meta(path: Path, what: str) -> ValueError:
    return ValueError(f"{path}: the {_META_KEY!r} metadata {what}; expected {_EXPECTED}")


def read_tera_metadata(path: Union[str, os.PathLike]) -> dict:
    """The parsed, validated ``tera_tn`` metadata of a checkpoint (recipe fields that a file written
    before they were recorded lacks are filled in with the values it was generated with).

    Raises ``FileNotFoundError`` / ``IsADirectoryError`` for a missing path or a folder, and
    ``ValueError`` naming the file for anything that is not a readable checkpoint of this format.
    """
    path = _checkpoint_file(path)
    with _open(path) as f:
        meta = f.metadata() or {}
    if _META_KEY not in meta:
        raise ValueError(f"{path} is not a tera_tn checkpoint (no {_META_KEY!r} metadata); expected {_EXPECTED}")
    try:
        parsed = json.loads(meta[_META_KEY])
    except ValueError as err:
        raise _bad_meta(path, f"is not valid JSON ({err})") from None
    if not isinstance(parsed, dict):
        raise _bad_meta(path, f"is a JSON {type(parsed).__name__}, not an object")
    if parsed.get("format") != _FORMAT:
        raise ValueError(f"{path} has checkpoint format {parsed.get('format')!r}; this tera_tn reads format {_FORMAT}")
    layers = parsed.get("layers")
    if not isinstance(layers, dict) or not layers:
        raise _bad_meta(path, f"has 'layers' = {layers!r}; it must map each layer name to its settings")
    for name, info in layers.items():
        missing = [k for k in _LAYER_KEYS if not isinstance(info, dict) or k not in info]
        if missing:
            raise _bad_meta(path, f"entry of layer {name!r} lacks {missing} (each layer needs {list(_LAYER_KEYS)})")
        if not isinstance(info["spec"], dict):
            raise _bad_meta(path, f"entry of layer {name!r} has spec {info['spec']!r}, not an object")
        layers[name] = with_legacy_recipe(info)
    return parsed


_MAX_LISTED = 6
_FIELD_LABELS = {"shape": "weight shape (d_out, d_in)"}


def _few(names: list[str]) -> str:
    more = f" (+{len(names) - _MAX_LISTED} more)" if len(names) > _MAX_LISTED else ""
    return ", ".join(names[:_MAX_LISTED]) + more


#: fields a loader recomputes from the model in float64 (a "w0_relative" α, ‖W0‖): equal up to the
#: rounding of another BLAS or thread count, never bit for bit
_COMPUTED_FLOATS = ("alpha", "w0_norm")


def _close(a: float, b: float) -> bool:
    return math.isclose(float(a), float(b), rel_tol=1e-9, abs_tol=0.0)


def _entry_diffs(saved: dict, current: dict) -> dict[str, str]:
    """``{field: "field: checkpoint …, model …"}`` for every field in which two descriptions differ
    (recipe fields through :func:`recipe_diff`, which knows the legacy recipe and explains it)."""
    recipe = [k for k in RECIPE_FIELDS if k in current]
    out = {line.split(":", 1)[0]: line for line in recipe_diff(saved, current)} if recipe else {}
    for key in sorted((set(saved) | set(current)) - set(RECIPE_FIELDS) - {"layers", "format"}):
        a, b = saved.get(key), current.get(key)
        if key in _COMPUTED_FLOATS and isinstance(a, (int, float)) and isinstance(b, (int, float)) and _close(a, b):
            continue
        if a != b:
            out[key] = f"{key}: checkpoint {saved.get(key)!r}, model {current.get(key)!r}"
    return out


def adapter_diff(saved: dict, current: dict, *, strict: bool = True) -> list[str]:
    """What differs between a saved adapter's description (``saved``) and the model's (``current``).

    Both are ``{field: value, ..., "layers": {layer name: {field: value}}}``. Top-level fields
    (seed, α and factor recipe of a PEFT adapter) hold for every layer; a :func:`save_tera` file keeps
    them per layer. One line per differing top-level field, one per side with layers the other
    lacks (only when ``strict``), and one per layer field that differs, listing the layers. Used by
    :func:`load_tera`, PEFT's adapter loading and ``AdapterStore`` alike.
    """
    problems = list(_entry_diffs({k: v for k, v in saved.items() if k in current}, current).values())
    s_layers, c_layers = saved["layers"], current["layers"]
    missing = sorted(set(s_layers) - set(c_layers))
    extra = sorted(set(c_layers) - set(s_layers))
    if strict and missing:
        problems.append(f"{len(missing)} adapted layer(s) in the checkpoint are not adapted in the model: {_few(missing)}")
    if strict and extra:
        problems.append(f"{len(extra)} adapted layer(s) of the model are not in the checkpoint: {_few(extra)}")
    by_field: dict[str, list[str]] = {}
    for name in sorted(set(s_layers) & set(c_layers)):
        for key, line in _entry_diffs(s_layers[name], c_layers[name]).items():
            by_field.setdefault(key, []).append(f"{name}: {line}")
    for key, items in by_field.items():
        more = f" (+{len(items) - 3} more layers)" if len(items) > 3 else ""
        problems.append(f"{_FIELD_LABELS.get(key, key)} differs in {len(items)} layer(s): " + "; ".join(items[:3]) + more)
    return problems


#: ``‖ΔW‖_F / ‖W0‖_F`` above which loading an adapter warns: a trained update is a correction to
#: W0, so one a thousand times larger is almost surely a damaged or mis-scaled file (finite, so
#: not refused: the model still runs, but its outputs are the adapter's, not the base model's).
DELTA_RATIO_WARN = 1e3


def _frozen_abs_max(net: FrozenNetwork) -> float:
    """``max|M|`` of the frozen network such that ``|ΔW| ≤ α·∏ max|λ_n|·max|M|`` entrywise.

    With the diagonals on the mode side (``"mode"``, ``"identity"``) ``ΔW = α diag(⊗λ_row) M
    diag(⊗λ_col)`` with ``M = G ×_n U_n``, so the bound is exact in its shape. With rank-side
    diagonals (``"rank"``, ``"both"``) the λ sit inside the sums, so ``M = |G| ×_n |U_n|`` (the
    triangle inequality). One ``d_out × d_in`` product per network, kept as a float on it.
    """
    found = net.__dict__.get("_tera_abs_max")
    if found is None:
        signed = net.spec.diag in ("mode", "identity")
        core = net.core if signed else net.core.abs()
        mats = [u if u is None or signed else u.abs() for u in net.factors]
        with torch.no_grad():
            # A "mode" network that served a forward already holds M (frozen_product); reuse it.
            product = net.__dict__.get("_frozen_product") if signed else None
            found = float((multi_mode_product(core, mats) if product is None else product).abs().max())
        net.__dict__["_tera_abs_max"] = found  # a cache, not a field (FrozenNetwork is frozen)
    return found


def delta_bound(spec: TeRASpec, bank: FactorBank, lam: torch.Tensor, alpha: float) -> float:
    """A cheap upper bound on ``max|ΔW|`` of the concatenated λ ``lam`` (layout ``spec.scale_sizes``;
    ``diag="both"`` vectors are ``μ_n`` then ``λ_n``): ``|α|·∏ max|λ_n|·max|M|``
    (see :func:`_frozen_abs_max`), in float64 so that it does not overflow before it is compared."""
    parts = list(torch.split(lam.detach().reshape(-1), list(spec.scale_sizes)))
    if spec.diag == "both":
        parts = [q for p, k in zip(parts, spec.modes, strict=True) for q in (p[:k], p[k:])]
    bound = abs(float(alpha)) * _frozen_abs_max(bank.network(spec))
    for p in parts:
        bound *= float(p.abs().max()) if p.numel() else 0.0
    return bound


def lambda_problems(
    key: str,
    t: object,
    spec: Optional[TeRASpec] = None,
    *,
    bank: Optional[FactorBank] = None,
    alpha: float = 1.0,
    dtype: torch.dtype = torch.float32,
    base_norm: Union[float, Callable[[], Optional[float]], None] = None,
) -> tuple[list[str], list[str]]:
    """``(errors, warnings)`` for a λ tensor about to be loaded (``key`` names it in the lines).

    The one λ checker of every load path (``load_tera``, PEFT's ``from_pretrained`` /
    ``load_adapter`` and ``AdapterStore.add``). Errors: not a floating-point tensor; a shape other
    than ``(spec.num_trainable,)``; NaN or ±inf values; and "absurd" values, whose bound
    :func:`delta_bound` on ``|ΔW|`` exceeds the largest number of ``dtype`` (the layer's compute
    dtype), so that ΔW or the layer output would overflow to inf/NaN while the rest of the model
    computes on. Warnings: ``‖ΔW‖_F/‖W0‖_F > DELTA_RATIO_WARN`` (needs ``base_norm = ‖W0‖_F``, or
    a function returning it, called only past the checks above; ΔW is formed only when the bound
    says the ratio could be that large). Without ``spec`` only
    the dtype and finiteness are checked; without ``bank`` nothing that needs the factors.
    """
    if not isinstance(t, torch.Tensor) or not t.is_floating_point():
        kind = f"a {t.dtype} tensor" if isinstance(t, torch.Tensor) else f"a {type(t).__name__}"
        return [f"{key} is {kind}; expected a floating-point tensor of λ"], []
    if spec is not None and tuple(t.shape) != (spec.num_trainable,):
        return [f"{key} has shape {tuple(t.shape)}, expected ({spec.num_trainable},): the layer's λ_1..λ_N "
                f"of sizes {spec.scale_sizes} ({spec})"], []
    bad = int((~torch.isfinite(t)).sum())
    if bad:
        return [f"{key} has {bad} of {t.numel()} values NaN or infinite; expected finite numbers"], []
    if spec is None or bank is None:
        return [], []
    bound = delta_bound(spec, bank, t, alpha)
    limit = float(torch.finfo(dtype).max)
    if bound > limit:
        peak = float(t.detach().abs().max())
        return [f"{key} holds absurd λ (max |λ| {peak:.3g}): |ΔW| may reach α·∏ max|λ_n|·max|M| = {bound:.3g}, "
                f"beyond the largest {str(dtype).removeprefix('torch.')} ({limit:.3g}), so the layer would output "
                "inf/NaN; expected the λ of a trained adapter"], []
    if callable(base_norm):
        base_norm = base_norm()
    if base_norm is None or not base_norm > 0:
        return [], []
    if bound * math.sqrt(spec.d_out * spec.d_in) <= DELTA_RATIO_WARN * base_norm:
        return [], []  # ‖ΔW‖_F ≤ bound·√(d_out·d_in): the ratio cannot reach the threshold
    with torch.no_grad():
        net = bank.network(spec)
        lams = [p.to(device=net.core.device, dtype=net.core.dtype) for p in torch.split(t.reshape(-1), list(spec.scale_sizes))]
        norm = float(torch.linalg.vector_norm(merged_weight(net, lams, float(alpha), None), dtype=torch.float64))
    ratio = norm / base_norm
    if ratio > DELTA_RATIO_WARN:
        return [], [f"{key}: ‖ΔW‖/‖W0‖ = {ratio:.3g} (above {DELTA_RATIO_WARN:g}); this update swamps the base "
                    "weight, so the layer computes mostly ΔW x: expected a trained adapter's correction (is the "
                    "file damaged or its λ mis-scaled?)"]
    return [], []


def _base_norm(layer: nn.Module) -> Optional[float]:
    """``‖W0‖_F`` of a TeRA layer's base weight (dequantized for a quantized base), kept on the layer
    while the weight is unchanged: an AdapterStore checks every adapter it adds against it."""
    w = layer.get_base_layer().weight
    if w.is_meta:
        return None
    key = (w.data_ptr(), w._version)
    found = layer.__dict__.get("_tera_base_norm")
    if found is None or found[0] != key:
        dense = layer.dequantized_weight() if hasattr(layer, "dequantized_weight") else w
        found = (key, float(torch.linalg.vector_norm(dense.detach(), dtype=torch.float64)))
        layer.__dict__["_tera_base_norm"] = found
    return found[1]


def layer_lambda_problems(
    key: str, t: object, layer: nn.Module, spec: TeRASpec, bank: FactorBank, alpha: float
) -> tuple[list[str], list[str]]:
    """:func:`lambda_problems` for λ of ``spec`` meant for TeRA ``layer``: its compute dtype is its
    base weight's (float16 for a quantized base, the narrowest it computes in) and ``‖W0‖_F`` its
    base weight's."""
    w = layer.get_base_layer().weight
    dtype = w.dtype if w.is_floating_point() else torch.float16
    return lambda_problems(key, t, spec, bank=bank, alpha=alpha, dtype=dtype, base_norm=lambda: _base_norm(layer))


def nonfinite_lambdas(tensors: Mapping[str, torch.Tensor]) -> list[str]:
    """One line per λ tensor holding NaN or ±inf (or not floating point): :func:`lambda_problems`
    without a spec, for tensors whose shapes were checked already."""
    return [line for key, t in tensors.items() for line in lambda_problems(key, t)[0]]


def factor_diff(
    bank: FactorBank, spec: TeRASpec, group: str, stored: Callable[[str], Optional[torch.Tensor]]
) -> list[str]:
    """One line per frozen factor of ``spec`` that a checkpoint stores as ``<group>.<name>``
    (``stored`` returns it, or None) and that is missing or differs from the one ``bank``
    generates: both checkpoint formats verify stored factors with it."""
    out = []
    for name, current in bank.group_tensors(spec).items():
        key = f"{group}.{name}"
        t = stored(key)
        if t is None:
            out.append(f"stored factor {key} is missing from the checkpoint")
        elif not torch.equal(t.to(current.dtype).cpu(), current.detach().cpu()):
            out.append(f"stored factor {key} differs from the one generated from seed {bank.seed} "
                       f"({bank.factor_init}, {bank.dtype_name})")
    return out


def _w0_fields(layer, adapter: str = DEFAULT_ADAPTER) -> dict:
    """``{"alpha_scaling": "w0_relative", "w0_norm": ‖W0‖}`` for an adapter whose α was set from
    its base weight (what a checkpoint pins), else ``{}``."""
    norm = layer.tera_w0_norm.get(adapter)
    return {} if norm is None else {"alpha_scaling": "w0_relative", "w0_norm": norm}


def _describe(layer: TeRALinear) -> dict:
    """A layer's entry in :func:`adapter_diff`'s terms: spec fields, seed, α and factor recipe."""
    bank = layer.tera_bank
    return {**layer.spec.to_dict(), "seed": bank.seed, "alpha": layer.alpha, **factor_recipe(bank.factor_init, bank.dtype_name),
            **_w0_fields(layer)}


def _saved_entry(info: dict) -> dict:
    """A checkpoint's layer entry in :func:`adapter_diff`'s terms (its factor group left out)."""
    return {**info["spec"], **{k: v for k, v in info.items() if k not in ("spec", "group")}}


@torch.no_grad()
def load_tera(model: nn.Module, path: Union[str, os.PathLike], *, strict: bool = True) -> dict:
    """Load λ vectors from ``path`` into the TeRA layers of ``model`` (in place).

    A model without TeRA layers (the plain base model) is adapted first, from the checkpoint
    alone: every layer it names becomes a :class:`~tera_tn.torch.TeRALinear` with the stored spec,
    seed, α and factor recipe, and every parameter other than λ is frozen, as
    :func:`~tera_tn.torch.add_tera` does; options the file does not record (dropout, strategy,
    ``cache_delta``, ``check_finite``) take their defaults. Its Linear layers must have the
    stored shapes. If anything fails, the model is put back as it was.

    In a model that already has TeRA layers, every layer's spec, seed, α and factor recipe (init, core scale, generator version, dtype) must
    equal the checkpoint's, and stored
    factors (if any) must equal the ones the model generated. With ``strict`` the layer names must
    match exactly; without it, layers present on one side only are skipped. Raises
    :class:`CheckpointMismatch` listing every difference, or ``ValueError`` for a damaged file or
    λ holding NaN/Inf, before anything is modified. Returns the checkpoint metadata.
    """
    path = _checkpoint_file(path)
    meta = read_tera_metadata(path)
    sweep_stale_temps(path.parent)  # one directory listing; leftovers of a killed save_tera
    if next(tera_layers(model), None) is not None:
        return _load_into_adapted(model, path, meta, strict)
    undo = _adapt_from_checkpoint(model, path, meta["layers"], strict)
    try:
        return _load_into_adapted(model, path, meta, strict=False)
    except BaseException:
        undo()
        raise


def _adapt_from_checkpoint(model: nn.Module, path: Path, saved_layers: dict, strict: bool):
    """Replace the Linear layers the checkpoint names by TeRA layers built from its entries;
    returns a function that puts the model back as it was."""
    modules = dict(model.named_modules())
    problems: list[str] = []
    plan = []
    for name, info in saved_layers.items():
        module = modules.get(name)
        if module is None:
            if strict:
                problems.append(f"layer {name!r} of the checkpoint is not a module of the model")
            continue
        if not isinstance(module, nn.Linear):
            problems.append(f"layer {name!r} is a {type(module).__name__} in the model; the checkpoint adapts an nn.Linear")
            continue
        try:
            spec = TeRASpec.from_dict(info["spec"])
        except (TypeError, ValueError) as err:
            raise _bad_meta(path, f"entry of layer {name!r} has an invalid spec ({err})") from None
        if spec.shape != (module.out_features, module.in_features):
            problems.append(
                f"layer {name!r}: the checkpoint adapts a {spec.d_out}×{spec.d_in} weight (out × in), the model's "
                f"Linear is {module.out_features}×{module.in_features}: was it saved from another base model?"
            )
            continue
        # The factors are generated by this tera_tn: only the recipe it knows can rebuild them.
        diffs = recipe_diff(info, factor_recipe(info["factor_init"], info["factor_dtype"]))
        if diffs:
            problems.append(f"layer {name!r} differs: " + "; ".join(diffs))
            continue
        check_base_weight(module, name)
        if "w0_norm" in info:
            have = weight_norm(module.weight)
            if not _close(info["w0_norm"], have):
                problems.append(f"layer {name!r}: the adapter's α was set from a base weight of norm {info['w0_norm']!r} "
                                f"(alpha_scaling='w0_relative'), this model's weight has norm {have!r}: another base model")
                continue
        plan.append((name, module, spec, info))
    if problems:
        raise CheckpointMismatch(f"cannot load {path} into this model:\n  - " + "\n  - ".join(problems))
    requires_grad = [(p, p.requires_grad) for p in model.parameters()]
    banks: dict[tuple, FactorBank] = {}
    for key in {(info["seed"], info["factor_init"], info["factor_dtype"]) for *_, info in plan}:
        linears = [m for _, m, _, info in plan if (info["seed"], info["factor_init"], info["factor_dtype"]) == key]
        banks[key] = place_bank(FactorBank(*key), linears)
    for p, _ in requires_grad:
        p.requires_grad_(False)
    for name, linear, spec, info in plan:
        bank = banks[info["seed"], info["factor_init"], info["factor_dtype"]]
        layer = TeRALinear(linear, spec, bank=bank, alpha=info["alpha"])
        if "w0_norm" in info:  # α is the saved α_l; the layer keeps pinning the W0 it came from
            layer.tera_w0_norm[DEFAULT_ADAPTER] = float(info["w0_norm"])
        install_layer(model, name, layer)

    def undo() -> None:
        for name, linear, _, _ in plan:
            _set_child(model, name, linear)
        for p, flag in requires_grad:
            p.requires_grad_(flag)

    return undo


def _load_into_adapted(model: nn.Module, path: Path, meta: dict, strict: bool) -> dict:
    saved_layers: dict = meta["layers"]
    model_layers = dict(tera_layers(model))
    problems = adapter_diff(
        {"layers": {name: _saved_entry(info) for name, info in saved_layers.items()}},
        {"layers": {name: _describe(layer) for name, layer in model_layers.items()}},
        strict=strict,
    )
    with _open(path) as f:
        keys = set(f.keys())
        loads: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        checked: set[tuple] = set()
        for name in sorted(set(saved_layers) & set(model_layers)):
            info, layer = saved_layers[name], model_layers[name]
            bank = layer.tera_bank
            if _entry_diffs(_saved_entry(info), _describe(layer)):
                continue  # listed by adapter_diff; its λ are not this model's
            for n, lam in enumerate(layer.scales()):
                key = f"{name}.lambda.{n}"
                if key not in keys:
                    problems.append(f"layer {name!r}: tensor {key!r} is missing from the checkpoint")
                    continue
                t = f.get_tensor(key)
                if tuple(t.shape) != tuple(lam.shape) or not t.is_floating_point():
                    problems.append(f"layer {name!r}: {key} is {t.dtype} of shape {tuple(t.shape)}, "
                                    f"the model's λ_{n} is floating point of shape {tuple(lam.shape)}")
                    continue
                loads[key] = (lam, t)
            group = (id(bank), layer.spec, info["group"])
            if meta.get("factors_included") and group not in checked:
                checked.add(group)
                problems += factor_diff(bank, layer.spec, f"factors.{info['group']}",
                                        lambda key: f.get_tensor(key) if key in keys else None)
    if problems:
        raise CheckpointMismatch(f"cannot load {path} into this model:\n  - " + "\n  - ".join(problems))
    nonfinite = nonfinite_lambdas({key: t for key, (_, t) in loads.items()})
    if nonfinite:
        raise ValueError(f"{path} holds non-finite λ (expected finite numbers; nothing was loaded):\n  - "
                         + "\n  - ".join(nonfinite))
    absurd, notes = [], []
    for name, layer in model_layers.items():
        keys = [f"{name}.lambda.{n}" for n in range(layer.spec.order)]
        if all(k in loads for k in keys):
            lam = torch.cat([loads[k][1].reshape(-1).float() for k in keys])
            found, warned = layer_lambda_problems(f"{name}.lambda.*", lam, layer, layer.spec, layer.tera_bank, layer.alpha)
            absurd += found
            notes += warned
    if absurd:
        raise ValueError(f"{path} holds absurd λ (nothing was loaded):\n  - " + "\n  - ".join(absurd))
    if notes:
        warnings.warn(f"loaded {path}, but:\n  - " + "\n  - ".join(notes), stacklevel=3)
    for lam, t in loads.values():
        lam.copy_(t.to(device=lam.device, dtype=lam.dtype))
    for layer in model_layers.values():
        layer.clear_cache()
    return meta
