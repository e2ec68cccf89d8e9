"""The on-disk description of a TeRA adapter, shared by ``tera_tn.torch`` and ``tera_tn.peft``.

One schema, one encoding, one version (:data:`FORMAT`), one writer (:func:`adapter_metadata`),
one reader (:func:`decode`) and one checker (:func:`metadata_diff`) for both APIs. Pure Python
(JSON and specs only): the file I/O is :mod:`tera_tn.torch.adapter_file`.

Decision: **encoding.** The description is compact, key-sorted UTF-8 JSON stored as a 1-D
``uint8`` tensor named ``tera_signature`` in the adapter's safetensors file. PEFT's
``save_pretrained`` writes the safetensors header itself (``{"format": "pt"}``) and hands loaders
only the tensors, so a tensor is the one carrier that both ``save_tera`` and PEFT's save/load can
use; ``save_tera`` writes it under the key ``tera_signature``, PEFT under
``base_model.tera_signature``. Nothing is written to the header any more.

**Schema, format 2.** ::

    {"format": 2, "library_version": "0.1.0", "factors_included": false,
     "lambda_layout": "per_mode" | "per_layer",
     <shared fields>,
     "layers": {"<module name in the base model>": {"spec": TeRASpec.to_dict(), "group": "g0",
                                                    <shared fields that differ>, ["w0_norm": ‖W0‖]}}}

The *shared fields* (:data:`SHARED_FIELDS`) describe each layer: ``seed``, the factor recipe
(``factor_init``, ``core_scale``, ``generator_version``, ``factor_dtype``), ``alpha`` (the α that
layer's ΔW is scaled by), ``alpha_scaling`` (``"constant"`` or ``"w0_relative"``), ``update``
(``"additive"`` or ``"multiplicative"``; files without it are additive), ``basis`` (``"random"`` or
``"w0"``; files without it use the random factors) and ``fan_in_fan_out``. A layer whose α or ΔW
depends on its base weight (``"w0_relative"``, ``"multiplicative"``, ``"w0"``) carries the
``w0_norm`` it was made for, which loaders compare with the model's ``‖W0‖``. A top-level value is the default of every
layer; a layer entry repeats a field only where its value differs (a PEFT adapter's are all
top-level, a ``save_tera`` file hoists what its layers share). ``group`` numbers the frozen-factor
groups (layers with the same seed, recipe and spec share factors); stored factors are tensors
``[…]tera_factors.<group>.<name>`` (``factors.<group>.<name>`` from ``save_tera``).

``lambda_layout`` names how λ are stored: ``"per_mode"`` (``save_tera``: ``<layer>.lambda.<n>``,
one float32 tensor per λ_n) or ``"per_layer"`` (PEFT: ``[prefix.]<layer>.tera_lambda``, the
concatenated ``λ_1..λ_N``). Both layouts are read by both APIs.

**Older files.** Two format-1 layouts are read (never written): ``save_tera``'s JSON in the
safetensors header under ``"tera_tn"`` (every setting per layer), and PEFT's ``tera_signature``
(seed, recipe, α top-level; layers flattened with ``shape``). A file carrying the header entry is
read from it. Files written before the recipe was recorded read as generator version 1.

The reader returns the *canonical* form: the top-level fields as written, and every layer entry
expanded to all of its fields (so ``meta["layers"][name]["seed"]`` always exists).
"""

from __future__ import annotations

import json
import math
from typing import Iterable, Mapping, Optional

from ..version import __version__
from .factors import RECIPE_FIELDS, factor_recipe, recipe_diff, with_legacy_recipe
from .spec import TeRASpec

__all__ = [
    "FORMAT", "SIGNATURE_KEY", "HEADER_KEY", "PER_MODE", "PER_LAYER", "SHARED_FIELDS", "AdapterFormatError",
    "layer_entry", "adapter_metadata", "adapter_signature", "spec_groups", "encode", "decode", "per_layer_view",
    "metadata_diff", "entry_diff", "adapter_diff", "few",
]

#: the version of the adapter description this tera_tn writes (format 1: tera_tn 0.1.0, read only)
FORMAT = 2
#: name of the ``uint8`` tensor that holds the JSON description
SIGNATURE_KEY = "tera_signature"
#: safetensors header key of format-1 ``save_tera`` files (read only)
HEADER_KEY = "tera_tn"
PER_MODE, PER_LAYER = "per_mode", "per_layer"
#: fields of every layer that a file may give once, at the top level
SHARED_FIELDS = ("seed", *RECIPE_FIELDS, "alpha", "alpha_scaling", "update", "basis", "fan_in_fan_out")
_LAYER_FIELDS = ("spec", "group", *SHARED_FIELDS)
#: fields compared as a block (recipe_diff explains them together)
_FIELD_BLOCKS = (("seed",), RECIPE_FIELDS, ("alpha",), ("alpha_scaling",), ("update",), ("basis",), ("fan_in_fan_out",))
#: the update form and bases of a file that does not name them (every file before the fields existed)
_DEFAULT_UPDATE, _DEFAULT_BASIS = "additive", "random"
#: fields a loader recomputes from the model in float64 (a "w0_relative" α, ‖W0‖): equal up to the
#: rounding of another BLAS or thread count, never bit for bit
_COMPUTED_FLOATS = ("alpha", "w0_norm")
_MAX_LISTED = 6
_FIELD_LABELS = {"shape": "weight shape (d_out, d_in)"}


class AdapterFormatError(ValueError):
    """An adapter description that cannot be read; the message names the file and the field."""


def few(names: list[str]) -> str:
    """The first few of ``names``, comma-separated, with ``(+k more)`` for the rest."""
    more = f" (+{len(names) - _MAX_LISTED} more)" if len(names) > _MAX_LISTED else ""
    return ", ".join(names[:_MAX_LISTED]) + more


# --- writing -------------------------------------------------------------------------------------


def layer_entry(spec: TeRASpec, *, seed: int, factor_init: str, factor_dtype: str, alpha: float,
                fan_in_fan_out: bool = False, alpha_scaling: str = "constant", update: str = _DEFAULT_UPDATE,
                basis: str = _DEFAULT_BASIS, w0_norm: Optional[float] = None) -> dict:
    """One layer's full entry (every field, no group yet). ``w0_norm`` (``‖W0‖_F``) is required
    exactly when α or ΔW depends on the base weight (``alpha_scaling="w0_relative"``,
    ``update="multiplicative"`` or ``basis="w0"``)."""
    if _pins_w0(alpha_scaling, update, basis) != (w0_norm is not None):
        raise ValueError(f"w0_norm must be given exactly when alpha_scaling is 'w0_relative', update is "
                         f"'multiplicative' or basis is 'w0'; got alpha_scaling={alpha_scaling!r}, update={update!r}, "
                         f"basis={basis!r}, w0_norm={w0_norm!r}")
    entry = {"spec": spec.to_dict(), "seed": int(seed), **factor_recipe(factor_init, factor_dtype),
             "alpha": float(alpha), "alpha_scaling": alpha_scaling, "update": update, "basis": basis,
             "fan_in_fan_out": bool(fan_in_fan_out)}
    if w0_norm is not None:
        entry["w0_norm"] = float(w0_norm)
    return entry


def _pins_w0(alpha_scaling: str, update: str, basis: str) -> bool:
    return alpha_scaling != "constant" or update != _DEFAULT_UPDATE or basis != _DEFAULT_BASIS


def spec_groups(specs: Iterable[TeRASpec]) -> dict[TeRASpec, str]:
    """``{spec: "g<i>"}`` in first-use order: layers sharing a spec (and a bank) share one group."""
    groups: dict[TeRASpec, str] = {}
    for spec in specs:
        groups.setdefault(spec, f"g{len(groups)}")
    return groups


def adapter_metadata(entries: Mapping[str, dict], *, lambda_layout: str, factors_included: bool = False,
                     defaults: Optional[Mapping] = None) -> dict:
    """The description a file stores, from every layer's full entry (:func:`layer_entry`), in the
    model's module order. Groups are numbered by first use of each (seed, recipe, spec). Each
    shared field goes to the top level with the value ``defaults`` gives (an adapter-wide config),
    else with the value every layer shares; a layer keeps the fields in which it differs."""
    if lambda_layout not in (PER_MODE, PER_LAYER):
        raise ValueError(f"lambda_layout must be {PER_MODE!r} or {PER_LAYER!r}, got {lambda_layout!r}")
    groups: dict[str, str] = {}
    layers = {}
    for name, entry in entries.items():
        key = json.dumps({k: entry[k] for k in ("spec", "seed", *RECIPE_FIELDS)}, sort_keys=True)
        layers[name] = {**entry, "group": groups.setdefault(key, f"g{len(groups)}")}
    top = dict(defaults or {})
    for field in SHARED_FIELDS:
        values = {json.dumps(e[field]) for e in layers.values()}
        if field not in top and len(values) == 1:
            top[field] = next(iter(layers.values()))[field]
    compact = {name: {k: v for k, v in e.items() if not (k in top and top[k] == v)} for name, e in layers.items()}
    return {"format": FORMAT, "library_version": __version__, "factors_included": bool(factors_included),
            "lambda_layout": lambda_layout, **top, "layers": compact}


def adapter_signature(
    layers: Mapping[str, tuple[TeRASpec, bool]],
    *,
    seed: int,
    factor_init: str,
    factor_dtype: str,
    alpha: float,
    alpha_scaling: str = "constant",
    update: str = _DEFAULT_UPDATE,
    basis: str = _DEFAULT_BASIS,
    w0_norms: Mapping[str, float] | None = None,
    alphas: Mapping[str, float] | None = None,
    factors_included: bool = False,
) -> dict:
    """The description of a PEFT adapter: ``layers`` maps each adapted module's qualified name to
    ``(spec, fan_in_fan_out)`` in module order; seed, recipe, ``alpha``, ``alpha_scaling``,
    ``update`` and ``basis`` are the config's (top level). Where any of the last three uses the
    base weight, ``w0_norms`` gives every layer's ``‖W0‖_F``; with
    ``"w0_relative"``, ``alphas`` gives its α (``alpha·‖W0‖/‖M‖``), kept per layer."""
    relative = alpha_scaling != "constant"
    pinned = _pins_w0(alpha_scaling, update, basis)
    entries = {
        name: layer_entry(spec, seed=seed, factor_init=factor_init, factor_dtype=factor_dtype,
                          alpha=(alphas or {}).get(name, alpha) if relative else alpha, fan_in_fan_out=fan_in_fan_out,
                          alpha_scaling=alpha_scaling, update=update, basis=basis,
                          w0_norm=float((w0_norms or {})[name]) if pinned else None)
        for name, (spec, fan_in_fan_out) in layers.items()
    }
    defaults = {"seed": int(seed), **factor_recipe(factor_init, factor_dtype), "alpha": float(alpha),
                "alpha_scaling": alpha_scaling, "update": update, "basis": basis}
    return adapter_metadata(entries, lambda_layout=PER_LAYER, factors_included=factors_included, defaults=defaults)


def encode(meta: Mapping) -> bytes:
    """The bytes a file stores: compact, key-sorted UTF-8 JSON."""
    return json.dumps(meta, sort_keys=True).encode()


# --- reading -------------------------------------------------------------------------------------


def decode(raw, *, source: str, where: str, expected: str) -> dict:
    """The canonical description from the stored bytes (``source="tensor"``) or header string
    (``source="header"``): parsed, upgraded from format 1, validated, layers expanded.

    ``where`` names the file in messages and ``expected`` says what a good file is; every
    problem raises :class:`AdapterFormatError` naming both and the offending field."""
    label = f"{where}: the {SIGNATURE_KEY}" if source == "tensor" else f"{where}: the {HEADER_KEY!r} metadata"
    try:
        parsed = json.loads(raw.decode() if isinstance(raw, (bytes, bytearray)) else raw)
    except (ValueError, UnicodeDecodeError) as err:
        what = SIGNATURE_KEY if source == "tensor" else f"{HEADER_KEY!r} metadata"
        raise AdapterFormatError(f"{where}: unreadable {what}, not valid JSON ({err}); expected {expected}") from None

    def bad(what: str) -> AdapterFormatError:
        return AdapterFormatError(f"{label} {what}; expected {expected}")

    if not isinstance(parsed, dict):
        raise bad(f"is a JSON {type(parsed).__name__}, not an object")
    version = parsed.get("format")
    if version == 1:
        parsed = _from_torch_v1(parsed, bad) if source == "header" else _from_peft_v1(parsed, bad)
    elif version != FORMAT:
        raise AdapterFormatError(f"{where} has adapter format {version!r}; this tera_tn reads format 1 "
                                 f"(written by tera_tn 0.1.0) and format {FORMAT}")
    return _expand(parsed, bad)


def _from_torch_v1(meta: dict, bad) -> dict:
    """Format 1 of ``save_tera`` (header JSON, every field per layer) in format-2 terms."""
    layers = meta.get("layers")
    if isinstance(layers, dict):
        needed = ("spec", "alpha", "seed", "factor_init", "factor_dtype", "group")
        for name, info in layers.items():
            missing = [k for k in needed if not isinstance(info, dict) or k not in info]
            if missing:
                raise bad(f"entry of layer {name!r} lacks {missing} (each layer needs {list(needed)})")
        layers = {name: {"fan_in_fan_out": False, "alpha_scaling": "w0_relative" if "w0_norm" in info else "constant",
                         **with_legacy_recipe(info)} for name, info in layers.items()}
    return {**meta, "format": FORMAT, "lambda_layout": PER_MODE, "layers": layers}


_PEFT_V1_KEYS = ("format", "seed", "factor_init", "factor_dtype", "alpha", "layers")


def _from_peft_v1(sig: dict, bad) -> dict:
    """Format 1 of PEFT's ``tera_signature`` (seed, recipe and the config's α top-level, flattened
    layer specs) in format-2 terms. A ``"w0_relative"`` layer's α is left ``None``: it is
    ``alpha·‖W0‖/‖M‖`` and needs the frozen factors (``tera_tn.torch.adapter_file`` fills it in)."""
    missing = [k for k in _PEFT_V1_KEYS if k not in sig]
    if missing:
        raise bad(f"lacks {missing}; expected an object with {list(_PEFT_V1_KEYS)}")
    relative = sig.get("alpha_scaling", "constant") != "constant"
    layers = sig["layers"]
    if isinstance(layers, dict):
        out = {}
        for name, info in layers.items():
            if not isinstance(info, dict) or not isinstance(info.get("shape"), list) or len(info["shape"]) != 2:
                raise bad(f"entry of layer {name!r} is {info!r}; expected an object with 'shape' [d_out, d_in] and the spec")
            spec = {k: info[k] for k in ("row_modes", "col_modes", "ranks", "diag") if k in info}
            out[name] = {"spec": {**spec, "d_out": info["shape"][0], "d_in": info["shape"][1]},
                         **{k: v for k, v in info.items() if k in ("group", "fan_in_fan_out", "w0_norm")}}
            if relative:
                out[name]["alpha"] = None
        layers = out
    top = with_legacy_recipe({k: v for k, v in sig.items() if k in SHARED_FIELDS})
    top.setdefault("alpha_scaling", "constant")
    top.setdefault("fan_in_fan_out", False)
    return {**top, "format": FORMAT, "library_version": None, "factors_included": None,
            "lambda_layout": PER_LAYER, "layers": layers}


def _expand(meta: dict, bad) -> dict:
    layers = meta.get("layers")
    if not isinstance(layers, dict) or not layers:
        raise bad(f"has 'layers' = {layers!r}; it must map each layer name to its settings")
    if meta.get("lambda_layout") not in (PER_MODE, PER_LAYER):
        raise bad(f"has 'lambda_layout' = {meta.get('lambda_layout')!r}; expected {PER_MODE!r} or {PER_LAYER!r}")
    top = {"update": _DEFAULT_UPDATE, "basis": _DEFAULT_BASIS, **{k: meta[k] for k in SHARED_FIELDS if k in meta}}
    expanded = {}
    for name, info in layers.items():
        if not isinstance(info, dict):
            raise bad(f"entry of layer {name!r} is {info!r}, not an object")
        entry = {**top, **info}
        missing = [k for k in _LAYER_FIELDS if k not in entry]
        if missing:
            raise bad(f"entry of layer {name!r} lacks {missing} (each layer needs {list(_LAYER_FIELDS)}, "
                      "in its entry or at the top level)")
        if not isinstance(entry["spec"], dict):
            raise bad(f"entry of layer {name!r} has spec {entry['spec']!r}, not an object")
        try:
            TeRASpec.from_dict(entry["spec"])
        except (TypeError, ValueError) as err:
            raise bad(f"entry of layer {name!r} has an invalid spec ({err})") from None
        if entry["update"] not in ("additive", "multiplicative"):
            raise bad(f"entry of layer {name!r} has update {entry['update']!r}; expected 'additive' or 'multiplicative'")
        if entry["basis"] not in ("random", "w0"):
            raise bad(f"entry of layer {name!r} has basis {entry['basis']!r}; expected 'random' or 'w0'")
        if _pins_w0(entry["alpha_scaling"], entry["update"], entry["basis"]) and "w0_norm" not in entry:
            raise bad(f"entry of layer {name!r} has alpha_scaling {entry['alpha_scaling']!r}, update "
                      f"{entry['update']!r} and basis {entry['basis']!r} but no 'w0_norm'")
        expanded[name] = entry
    return {**meta, "layers": expanded}


def per_layer_view(meta: Mapping) -> dict:
    """``meta`` without its top-level shared fields: every setting once, in its layer's entry."""
    return {k: v for k, v in meta.items() if k not in SHARED_FIELDS}


# --- comparing -----------------------------------------------------------------------------------


def _flat(entry: Mapping) -> dict:
    """A full layer entry in the checker's terms: the spec flattened (``shape`` for its size), no group."""
    spec = dict(entry["spec"])
    shape = [spec.pop("d_out", None), spec.pop("d_in", None)]
    return {"shape": shape, **spec, **{k: v for k, v in entry.items() if k not in ("spec", "group")}}


def _close(a, b) -> bool:
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

    Both are ``{field: value, ..., "layers": {layer name: {field: value}}}``. One line per differing
    top-level field (one that holds for every layer), one per side with layers the other lacks
    (only when ``strict``), and one per layer field that differs, listing the layers.
    """
    problems = list(_entry_diffs({k: v for k, v in saved.items() if k in current}, current).values())
    s_layers, c_layers = saved["layers"], current["layers"]
    missing = sorted(set(s_layers) - set(c_layers))
    extra = sorted(set(c_layers) - set(s_layers))
    if strict and missing:
        problems.append(f"{len(missing)} adapted layer(s) in the checkpoint are not adapted in the model: {few(missing)}")
    if strict and extra:
        problems.append(f"{len(extra)} adapted layer(s) of the model are not in the checkpoint: {few(extra)}")
    by_field: dict[str, list[str]] = {}
    for name in sorted(set(s_layers) & set(c_layers)):
        for key, line in _entry_diffs(s_layers[name], c_layers[name]).items():
            by_field.setdefault(key, []).append(f"{name}: {line}")
    for key, items in by_field.items():
        more = f" (+{len(items) - 3} more layers)" if len(items) > 3 else ""
        problems.append(f"{_FIELD_LABELS.get(key, key)} differs in {len(items)} layer(s): " + "; ".join(items[:3]) + more)
    return problems


def entry_diff(saved: Mapping, current: Mapping) -> list[str]:
    """One line per field in which two full layer entries differ (group ignored)."""
    return list(_entry_diffs(_flat(saved), _flat(current)).values())


def metadata_diff(saved: Mapping, current: Mapping, *, strict: bool = True, ignore: tuple[str, ...] = ()) -> list[str]:
    """The one mismatch checker: what differs between two canonical descriptions (a file's and the
    model's), whichever API wrote either. A field (or the recipe, as one block) that is uniform over
    the layers of both sides is reported once (``seed: checkpoint 3, model 4``), any other per layer
    with the layers it differs in; ``ignore`` names fields not compared (an AdapterStore's α)."""
    s_layers = {n: {k: v for k, v in _flat(e).items() if k not in ignore} for n, e in saved["layers"].items()}
    c_layers = {n: {k: v for k, v in _flat(e).items() if k not in ignore} for n, e in current["layers"].items()}
    s_top, c_top = {}, {}
    for block in _FIELD_BLOCKS:
        block = tuple(k for k in block if k not in ignore)
        s_vals = {json.dumps([e.get(k) for k in block]) for e in s_layers.values()}
        c_vals = {json.dumps([e.get(k) for k in block]) for e in c_layers.values()}
        if block and len(s_vals) == 1 and len(c_vals) == 1:
            for k in block:
                s_top[k] = next(iter(s_layers.values())).get(k)
                c_top[k] = next(iter(c_layers.values())).get(k)
            for e in (*s_layers.values(), *c_layers.values()):
                for k in block:
                    e.pop(k, None)
    return adapter_diff({**s_top, "layers": s_layers}, {**c_top, "layers": c_layers}, strict=strict)
