"""Frozen random factors (core G, matrices U_n) and trainable scales λ_n of a TeRA network.

Factors are drawn on the CPU in float64 with one generator per tensor, seeded from
``(seed, tensor name, shape)`` by SHA-256 — never from draw order — so the same seed yields
bit-identical factors in any process, on any device and in any model, whatever else was drawn
before. Convert with :meth:`TeRAFactors.to` / :meth:`TeRAFactors.as_torch`.
"""

from __future__ import annotations

import hashlib
import math
import numbers
from dataclasses import dataclass
from typing import Literal, Optional

import numpy as np

from ..checks import as_array, check_size
from ..backends import Array, backend_module, is_array, namespace, to_like
from .spec import TeRASpec, check_spec

__all__ = [
    "TeRAFactors",
    "random_factors",
    "init_scales",
    "FACTOR_INITS",
    "SCALE_INITS",
    "GENERATOR_VERSION",
    "CORE_SCALE",
    "factor_recipe",
    "recipe_diff",
]

FACTOR_INITS = ("orthogonal", "gaussian", "uniform")
SCALE_INITS = ("zero_start", "ones", "random")
FactorInit = Literal["orthogonal", "gaussian", "uniform"]
ScaleInit = Literal["zero_start", "ones", "random"]

#: Version of the generator below (key derivation, draw order, distributions, sign fixing).
#: Any change that alters a single drawn number for some (seed, spec, init) must bump it: saved
#: adapters record it, and loading one written by another version fails instead of pairing its
#: λ with different factors.
GENERATOR_VERSION = 1
#: The core's scale rule, recorded in checkpoints for the same reason. The core's scale is
#: interchangeable with α (ΔW is linear in both), so it is fixed rather than configurable.
CORE_SCALE = "normal/sqrt(prod col ranks)"
#: What generated the factors of a checkpoint, besides the seed and the spec.
RECIPE_FIELDS = ("factor_init", "core_scale", "generator_version", "factor_dtype")
#: Recipe fields of checkpoints written before the recipe was recorded: the generator then was
#: version 1 with the same core scale (factor_init and factor_dtype were always recorded).
LEGACY_RECIPE = {"core_scale": CORE_SCALE, "generator_version": 1}


def factor_recipe(factor_init: str, factor_dtype: str) -> dict:
    """The recipe the running code generates factors with, for a checkpoint's metadata."""
    return {"factor_init": factor_init, "core_scale": CORE_SCALE, "generator_version": GENERATOR_VERSION,
            "factor_dtype": factor_dtype}


def with_legacy_recipe(saved: dict) -> dict:
    """``saved`` (a checkpoint's metadata entry) with the recipe fields it lacks set to their
    values before they were recorded; fields it has are kept as written."""
    return {**LEGACY_RECIPE, **saved}


def recipe_diff(saved: dict, current: dict) -> list[str]:
    """One line per recipe field in which a checkpoint (``saved``) differs from the model."""
    saved = with_legacy_recipe(saved)
    out = []
    for key in RECIPE_FIELDS:
        if saved.get(key) != current.get(key):
            line = f"{key}: checkpoint {saved.get(key)!r}, model {current.get(key)!r}"
            if key in ("core_scale", "generator_version"):
                line += (" (this tera_tn generates different frozen factors than the ones these λ were trained "
                         "with; load the adapter with the tera_tn version that wrote it)")
            out.append(line)
    return out


def check_seed(seed: object) -> int:
    """``seed`` as an int when it is an integer >= 0 (a factor or scale seed); else a ValueError naming it."""
    return check_size("seed", seed, low=0)


def check_factors(factors: object, spec: TeRASpec) -> "TeRAFactors":
    """``factors`` itself when it is a :class:`TeRAFactors` whose shapes match ``spec``.

    ``spec`` must be a checked :class:`TeRASpec` (it is not checked again here); raises
    TypeError for another type or a non-array entry, ValueError naming the tensor whose shape
    differs from the spec's.
    """
    if not isinstance(factors, TeRAFactors):
        raise TypeError(
            f"factors must be a TeRAFactors (from tera_tn.random_factors(spec, seed)), got {type(factors).__name__}"
        )
    arrays = [("core", factors.core)] + [(f"U_{n}", u) for n, u in enumerate(factors.factors) if u is not None]
    for name, a in arrays:
        if not is_array(a):
            raise TypeError(f"factor {name} must be a numpy array, torch tensor or jax array, got {type(a).__name__}")
    if tuple(factors.core.shape) != spec.ranks:
        raise ValueError(f"core has shape {tuple(factors.core.shape)}, expected {spec.ranks} for {spec}")
    if len(factors.factors) != spec.order:
        raise ValueError(f"got {len(factors.factors)} factor matrices, expected {spec.order} for {spec}")
    for n, (u, k, r) in enumerate(zip(factors.factors, spec.modes, spec.ranks)):
        if spec.diag == "identity":
            if u is not None:
                raise ValueError(f"diag='identity' takes no factor matrices, got one for mode {n}")
        elif u is None or tuple(u.shape) != (k, r):
            got = None if u is None else tuple(u.shape)
            raise ValueError(f"factor U_{n} has shape {got}, expected {(k, r)} for {spec}")
    return factors


def _generator(seed: int, name: str, shape: tuple[int, ...]) -> np.random.Generator:
    key = f"tera_tn|{seed}|{name}|{'x'.join(map(str, shape))}".encode()
    digest = hashlib.sha256(key).digest()
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence(int.from_bytes(digest, "little"))))


@dataclass(frozen=True)
class TeRAFactors:
    """The frozen part of a TeRA network, shared by every layer of one spec (a shape group).

    Attributes:
        core: ``G`` of shape ``spec.ranks``.
        factors: ``U_n`` of shape ``(K_n, R_n)``, one per mode; ``None`` for ``diag="identity"``.
    """

    core: Array
    factors: tuple[Optional[Array], ...]

    def to(self, like: Array) -> "TeRAFactors":
        """Converted to the backend, dtype and device of ``like`` (a numpy, torch or JAX array)."""
        if not is_array(like):
            raise TypeError(f"like must be a numpy array, torch tensor or jax array, got {type(like).__name__}: {like!r:.80}")
        return TeRAFactors(
            to_like(self.core, like),
            tuple(None if u is None else to_like(u, like) for u in self.factors),
        )

    def as_torch(self, dtype=None, device=None) -> "TeRAFactors":
        """As torch tensors (default dtype float32, CPU); ``dtype`` may be a torch dtype or its name."""
        return self.to(backend_module("torch").empty_of(dtype, device))

    def as_numpy(self, dtype=np.float64) -> "TeRAFactors":
        return self.to(np.empty(0, dtype=dtype))

    def check(self, spec: TeRASpec) -> None:
        """Raise ValueError when the shapes do not match ``spec`` (see :func:`check_factors`)."""
        check_factors(self, check_spec(spec, "TeRAFactors.check"))


def _factor(gen: np.random.Generator, k: int, r: int, init: str) -> np.ndarray:
    if init == "orthogonal":
        q, rr = np.linalg.qr(gen.standard_normal((k, r)))
        # Fixing the signs makes the draw a deterministic function of the Gaussian sample.
        return q * np.where(np.diag(rr) < 0, -1.0, 1.0)
    if init == "gaussian":
        return gen.standard_normal((k, r)) / math.sqrt(k)
    bound = math.sqrt(3.0 / k)
    return gen.uniform(-bound, bound, size=(k, r))


def random_factors(spec: TeRASpec, seed: int, *, init: FactorInit = "orthogonal") -> TeRAFactors:
    """Seeded frozen factors for ``spec`` (numpy, float64, generated on the CPU).

    * core ``G``: i.i.d. N(0, 1/∏R_col), so the frozen map ``x ↦ G_mat x`` has gain O(1)
      (:data:`CORE_SCALE`).
    * ``U_n`` of shape ``(K_n, R_n)``: orthonormal columns (QR of a Gaussian, default), or
      i.i.d. Gaussian / uniform entries of variance 1/K_n (unit expected column norm).
    * ``diag="identity"``: no factor matrices (``U_n = I``).

    The draws depend on ``(seed, spec.ranks, spec.modes, init)`` only, not on ``diag``: the
    ``"rank"``, ``"mode"`` and ``"both"`` placements of one shape share their factors. Any change
    here that alters a drawn number must bump :data:`GENERATOR_VERSION`.
    """
    check_spec(spec, "random_factors")
    seed = check_seed(seed)
    if init not in FACTOR_INITS:
        raise ValueError(f"init must be one of {FACTOR_INITS}, got {init!r}")
    col_rank = math.prod(spec.ranks[spec.n_row :])
    core = _generator(seed, "core", spec.ranks).standard_normal(spec.ranks) / math.sqrt(col_rank)
    if spec.diag == "identity":
        factors: tuple[Optional[np.ndarray], ...] = (None,) * spec.order
    else:
        factors = tuple(
            _factor(_generator(seed, f"factor{n}", (k, r)), k, r, init)
            for n, (k, r) in enumerate(zip(spec.modes, spec.ranks))
        )
    return TeRAFactors(core, factors)


def init_scales(
    spec: TeRASpec,
    init: ScaleInit = "zero_start",
    *,
    zero_mode: int = 0,
    seed: int | None = None,
    value: float = 1.0,
    like: Array | None = None,
) -> tuple[Array, ...]:
    """Trainable vectors λ_n, of lengths ``spec.scale_sizes``.

    * ``"zero_start"`` (default): ``λ_{zero_mode} = 0``, all others ``value``. ΔW is exactly 0
      but, being multilinear in the λ_n, its gradient with respect to ``λ_{zero_mode}`` is not.
      With ``diag="both"`` only the rank-side part of vector ``zero_mode`` is zero (its
      mode-side part starts at ``value``, like every other vector).
    * ``"ones"``: all ``value``.
    * ``"random"``: |λ| uniform in ``[0.5, 2]·value`` with random signs (needs ``seed``): a
      well-conditioned generic point, used for rank analysis.

    ``value`` (finite, > 0) is the starting magnitude: a small one with a large α (as RandLoRA
    does) gives the same ΔW scale as α with ``value=1`` but larger relative steps for Adam.
    Returned as float64 numpy arrays, or converted to the backend/dtype/device of ``like``.
    """
    check_spec(spec, "init_scales")
    if like is not None and not is_array(like):
        raise TypeError(f"like must be a numpy array, torch tensor, jax array or None, got {type(like).__name__}: {like!r:.80}")
    if init not in SCALE_INITS:
        raise ValueError(f"init must be one of {SCALE_INITS}, got {init!r}")
    value = check_scale_value("value", value)
    sizes = spec.scale_sizes
    if init == "random":
        if seed is None:
            raise ValueError("init='random' needs a seed")
        seed = check_seed(seed)
        scales = []
        for n, size in enumerate(sizes):
            gen = _generator(seed, f"scale{n}", (size,))
            scales.append(gen.uniform(0.5, 2.0, size) * gen.choice([-1.0, 1.0], size) * value)
    else:
        if init == "zero_start" and (
            isinstance(zero_mode, bool) or not isinstance(zero_mode, numbers.Integral) or not 0 <= zero_mode < spec.order
        ):
            raise ValueError(f"zero_mode must be a mode index in [0, {spec.order}), got {zero_mode!r}")
        scales = [np.full(size, value) for size in sizes]
        if init == "zero_start":
            # The rank side of a "both" vector is its tail (after the K_n mode-side entries).
            start = spec.modes[zero_mode] if spec.diag == "both" else 0
            scales[zero_mode][start:] = 0.0
    out = tuple(scales)
    if like is not None:
        out = tuple(to_like(s, like) for s in out)
    return out


def check_scale_value(name: str, value: object) -> float:
    """``value`` as a float when it is a finite number > 0 (a starting magnitude of λ)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite number > 0 (the starting magnitude of λ, e.g. 1.0 or 0.1), got {value!r}")
    return float(value)


def check_scales(spec: TeRASpec, scales: object) -> tuple[Array, ...]:
    """``scales`` as a tuple of arrays, after checking them against ``spec.scale_sizes``.

    Lists of numbers become numpy arrays. Values on the CPU are checked to be finite (a NaN λ
    makes every entry of ΔW NaN); device tensors are not, as reading them would synchronize.
    """
    expected = f"a sequence of {spec.order} vectors λ_n (one per mode) of lengths {spec.scale_sizes}"
    if scales is None or isinstance(scales, (str, bytes)) or is_array(scales):
        raise TypeError(f"scales must be {expected}, got {type(scales).__name__}")
    try:
        scales = tuple(scales)
    except TypeError:
        raise TypeError(f"scales must be {expected}, got {type(scales).__name__}") from None
    if len(scales) != spec.order:
        raise ValueError(f"scales must be {expected}, got {len(scales)} vectors")
    out = []
    for n, (s, size) in enumerate(zip(scales, spec.scale_sizes)):
        s = as_array(f"scales[{n}]", s, f"shape ({size},)")
        if tuple(s.shape) != (size,):
            raise ValueError(
                f"scales[{n}] has shape {tuple(s.shape)}, expected ({size},) for diag={spec.diag!r} "
                f"(len R_n for 'rank', K_n for 'mode'/'identity', K_n + R_n for 'both')"
            )
        if namespace(s).on_cpu(s) and not namespace(s).all_finite(s):
            raise ValueError(f"scales[{n}] holds NaN or Inf ({s!r:.120}); expected finite values")
        out.append(s)
    return tuple(out)
