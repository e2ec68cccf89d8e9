"""The TeRA network: ``ΔW = α · matricize(G ×_1 A_1 … ×_N A_N)`` and its rank theorem.

``A_n`` combines the frozen factor ``U_n`` with the trainable vector ``λ_n`` according to
``spec.diag`` (see :mod:`tera_tn.core.spec`). Everything here works on numpy, torch and JAX
arrays alike; the result takes the backend, dtype and device of the scales (a torch or JAX
array if any operand is one) and torch results are differentiable with respect to the scales.

The operands travel as one :class:`TeRANetwork`, checked once where it is built: the public
functions here (and in :mod:`tera_tn.contract.contraction` and :mod:`tera_tn.analysis.spectrum`)
build it from their loose arguments with :func:`network_of` or take one ready-made, and the
kernels they hand it to (:func:`materialize`, :func:`scale_factor_matrices`,
:func:`generic_rank`) never check again.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass
from types import MappingProxyType
from typing import Mapping, Optional, Sequence

import numpy as np

from ..checks import check_alpha
from ..backends import Array, floating_like, namespace, pick_like, to_like, to_numpy
from .factors import (
    RECIPE_FIELDS,
    FactorInit,
    TeRAFactors,
    check_factors,
    check_scales,
    check_seed,
    factor_recipe,
    init_scales,
    random_factors,
)
from .modeproduct import multi_mode_product
from .workspace import default_scope
from .spec import TeRASpec, check_spec, prefix_rank

__all__ = [
    "TeRANetwork",
    "network_of",
    "decomposable_network",
    "spec_and_scales",
    "scaled_factors",
    "scale_factor_matrices",
    "dense_factor_matrices",
    "delta_weight",
    "materialize",
    "theoretical_rank",
    "generic_rank",
    "kron_vectors",
    "scale_sides",
]

_FIELDS = ("spec", "factors", "scales", "alpha", "recipe")


@dataclass(frozen=True, eq=False)
class TeRANetwork:
    """One TeRA update ``ΔW = α · matricize(G ×_1 A_1 … ×_N A_N)``, validated once.

    The spec, the frozen factors, the trainable vectors λ_n and α travel together as this
    immutable value: its construction checks every operand against the spec (errors name the
    offending value and what was expected), and code that receives one never checks it again.
    Every function that takes ``(spec, factors, scales, alpha)`` — :func:`tera_tn.delta_weight`,
    :func:`tera_tn.theoretical_rank`, :func:`tera_tn.apply`, :func:`tera_tn.plan`,
    :func:`tera_tn.singular_values`, :func:`tera_tn.conditioning` and the rank tools of
    :mod:`tera_tn.analysis.spectrum` — also takes a network in their place, e.g.
    ``delta_weight(net)`` or ``apply(net, x)``.

    Attributes:
        spec: the tensorization and parameterization.
        factors: frozen core ``G`` and factor matrices ``U_n`` matching ``spec``.
        scales: the ``N`` trainable vectors λ_n (lengths ``spec.scale_sizes``), a tuple of arrays
            (lists of numbers become numpy arrays); values on the CPU are finite.
        alpha: the global scale α, a finite float.
        recipe: how the factors were generated, when known: ``seed`` and the fields of
            :func:`tera_tn.core.factors.factor_recipe` (what a checkpoint records per layer), a
            read-only mapping. :meth:`random` fills it; ``None`` for factors from elsewhere. It
            is recorded, not re-derived: the factors are not regenerated to compare.

    Arrays are held as given (no copy, no conversion): the operands may mix backends and
    dtypes, and each computation picks its own (:meth:`common_like`, :meth:`to`).
    """

    spec: TeRASpec
    factors: TeRAFactors
    scales: tuple[Array, ...]
    alpha: float = 1.0
    recipe: Optional[Mapping[str, object]] = None

    def __post_init__(self) -> None:
        checked = _checked(self.spec, self.factors, self.scales, self.alpha, self.recipe, "TeRANetwork")
        for name, value in zip(_FIELDS, checked):
            object.__setattr__(self, name, value)

    @classmethod
    def random(
        cls,
        spec: TeRASpec,
        seed: int,
        *,
        init: FactorInit = "orthogonal",
        scales: object = "random",
        alpha: float = 1.0,
    ) -> "TeRANetwork":
        """A network on seeded frozen factors (:func:`tera_tn.random_factors`), recipe recorded.

        Args:
            spec: the tensorization and parameterization.
            seed: the factor seed (an int >= 0).
            init: the factor init, one of :data:`tera_tn.core.factors.FACTOR_INITS`.
            scales: the vectors λ_n, or the name of an :func:`tera_tn.init_scales` init
                (``"random"``, the default, draws them from the same seed; ``"zero_start"``
                and ``"ones"`` need none).
            alpha: the global scale α.
        """
        check_spec(spec, "TeRANetwork.random")
        factors = random_factors(spec, seed, init=init)
        if isinstance(scales, str):
            scales = init_scales(spec, scales, seed=seed if scales == "random" else None)
        return cls(spec, factors, scales, alpha, {"seed": seed, **factor_recipe(init, "float64")})

    def common_like(self, *first: Array) -> Array:
        """The array whose backend, dtype and device a result takes: the first torch or JAX array
        among ``first``, the scales and the core (else the first of them), in a floating dtype
        (integer λ must not round the factors)."""
        arrays = (*self.scales, self.factors.core)
        return floating_like(pick_like(*first, *arrays), *arrays)

    def to(self, like: Array) -> "TeRANetwork":
        """The same network with factors and scales in the backend, dtype and device of ``like``
        (a numpy, torch or JAX array); not checked again."""
        factors = self.factors.to(like)
        return _unchecked(self.spec, factors, tuple(to_like(s, like) for s in self.scales), self.alpha, self.recipe)


def _checked(
    spec: object, factors: object, scales: object, alpha: object, recipe: object, caller: str
) -> tuple[TeRASpec, TeRAFactors, tuple[Array, ...], float, Optional[Mapping[str, object]]]:
    """The fields of a :class:`TeRANetwork`, checked against each other; errors name ``caller``."""
    check_spec(spec, caller)
    check_factors(factors, spec)
    scales = check_scales(spec, scales)
    alpha = check_alpha(alpha)
    if recipe is not None:
        missing = [k for k in ("seed", *RECIPE_FIELDS) if not isinstance(recipe, Mapping) or k not in recipe]
        if missing:
            raise ValueError(
                f"recipe must be None or a mapping with 'seed' and {RECIPE_FIELDS} (how the factors were "
                f"generated, as TeRANetwork.random records it), got {recipe!r:.120}; missing {missing}"
            )
        check_seed(recipe["seed"])
        recipe = MappingProxyType(dict(recipe))
    return spec, factors, scales, alpha, recipe


def _unchecked(spec, factors, scales, alpha, recipe) -> TeRANetwork:
    """A :class:`TeRANetwork` of fields that were checked already (no second validation)."""
    net = object.__new__(TeRANetwork)
    for name, value in zip(_FIELDS, (spec, factors, scales, alpha, recipe)):
        object.__setattr__(net, name, value)
    return net


def network_of(spec: object, factors: object, scales: object, alpha: object, caller: str) -> TeRANetwork:
    """The validated network of a public function's arguments, errors naming ``caller``.

    ``spec`` itself when it is a :class:`TeRANetwork` (``factors``, ``scales`` and ``alpha`` must
    then be left at their defaults: the network carries them); otherwise one built from the
    loose ``(spec, factors, scales, alpha)``, checked in that order.
    """
    if isinstance(spec, TeRANetwork):
        _refuse_loose(spec, caller, factors=factors, scales=scales, alpha=alpha)
        return spec
    return _unchecked(*_checked(spec, factors, scales, alpha, None, caller))


def decomposable_network(spec: object, factors: object, scales: object, alpha: object, caller: str) -> TeRANetwork:
    """:func:`network_of`, with every operand converted once, here, to what spectral analysis
    decomposes: the backend and device of the first torch or JAX operand (else numpy), in a dtype
    that backend decomposes (half precision and integers go to float32/float64: no half QR/SVD
    on CPU). What is computed from the result (:func:`dense_factor_matrices`) converts nothing."""
    net = network_of(spec, factors, scales, alpha, caller)
    like = pick_like(*net.scales, net.factors.core)
    like = namespace(like).decomposable(like)
    converted = tuple(to_like(s, like) for s in net.scales)
    factors = net.factors.to(like)
    return _unchecked(net.spec, factors, converted, net.alpha, net.recipe)


def spec_and_scales(spec: object, scales: object, caller: str) -> tuple[TeRASpec, tuple[Array, ...]]:
    """``(spec, scales)`` checked, or those of a :class:`TeRANetwork` given as ``spec``; for the
    functions that need no factors (:func:`theoretical_rank` and its kin)."""
    if isinstance(spec, TeRANetwork):
        _refuse_loose(spec, caller, scales=scales)
        return spec.spec, spec.scales
    check_spec(spec, caller)
    return spec, check_scales(spec, scales)


def _refuse_loose(net: TeRANetwork, caller: str, **given: object) -> None:
    extra = [
        f"{name}={value!r:.40}"
        for name, value in given.items()
        if not (value is None or (name == "alpha" and isinstance(value, numbers.Real) and not isinstance(value, bool)
                                  and value == 1.0))
    ]
    if extra:
        raise TypeError(
            f"{caller} got a TeRANetwork, which carries its own {', '.join(given)}; leave them out "
            f"(got {', '.join(extra)}), or build the network with the values wanted"
        )


def scale_sides(spec: TeRASpec, scales: Sequence[Array]) -> tuple[Optional[list[Array]], Optional[list[Array]]]:
    """``(mode-side vectors, rank-side vectors)`` of the trainable vectors, ``None`` for an absent side.

    ``diag="rank"`` and ``"identity"`` (``U_n = I``, so its λ_n act on the R_n = K_n side) have
    only rank-side vectors, ``"mode"`` only mode-side ones, and ``"both"`` splits each vector
    into ``μ_n = v[:K_n]`` and ``λ_n = v[K_n:]`` (views, so gradients flow to the whole vector).
    """
    scales = list(scales)
    if spec.diag == "mode":
        return scales, None
    if spec.diag == "both":
        return [s[:k] for s, k in zip(scales, spec.modes)], [s[k:] for s, k in zip(scales, spec.modes)]
    return None, scales


def scaled_factors(
    spec: TeRASpec | TeRANetwork,
    factors: Optional[TeRAFactors] = None,
    scales: Optional[Sequence[Array]] = None,
    alpha: float = 1.0,
) -> tuple[Optional[Array], ...]:
    """``A_n = U_n diag(λ_n)`` (rank side), ``diag(μ_n) U_n`` (mode side) or both, shape ``(K_n, R_n)``.

    ``alpha`` is folded into ``A_1`` (cheaper than scaling the result). Returns ``None``
    entries for ``diag="identity"``, whose ``A_n = diag(λ_n)`` is never formed. Takes a
    :class:`TeRANetwork` in place of ``(spec, factors, scales, alpha)``.
    """
    net = network_of(spec, factors, scales, alpha, "scaled_factors")
    net = net.to(net.common_like())
    return scale_factor_matrices(net.spec, net.factors.factors, net.scales, net.alpha)


def scale_factor_matrices(
    spec: TeRASpec, matrices: Sequence[Optional[Array]], scales: Sequence[Array], alpha: float
) -> tuple[Optional[Array], ...]:
    """The ``A_n`` of :func:`scaled_factors` from checked operands in one backend and dtype.

    ``matrices`` are the frozen ``U_n`` (``TeRAFactors.factors``); nothing is checked or
    converted here, so callers pass a validated network's operands (or their own, checked).
    """
    if spec.diag == "identity":
        return (None,) * spec.order
    mode_side, rank_side = scale_sides(spec, scales)
    out = []
    for n, u in enumerate(matrices):
        a = u if mode_side is None else mode_side[n][:, None] * u
        a = a if rank_side is None else a * rank_side[n][None, :]
        out.append(a * alpha if n == 0 and alpha != 1.0 else a)
    return tuple(out)


def dense_factor_matrices(net: TeRANetwork) -> list[Array]:
    """Every ``A_n`` of a network (operands in one backend and dtype) as a ``(K_n, R_n)`` matrix,
    α folded into ``A_1``: :func:`scale_factor_matrices`, and ``diag(λ_n)`` for identity factors,
    which ΔW itself never forms. The operands that spectral analysis decomposes."""
    if net.spec.diag != "identity":
        return list(scale_factor_matrices(net.spec, net.factors.factors, net.scales, net.alpha))
    mats = [namespace(s).diag(s) for s in net.scales]
    mats[0] = mats[0] * net.alpha
    return mats


def kron_vectors(vectors: Sequence[Array]) -> Array:
    """``v_1 ⊗ … ⊗ v_k`` for 1-D arrays, C-order (the first vector is the most significant)."""
    out = vectors[0]
    for v in vectors[1:]:
        out = (out[:, None] * v[None, :]).reshape(-1)
    return out


def delta_weight(
    spec: TeRASpec | TeRANetwork,
    factors: Optional[TeRAFactors] = None,
    scales: Optional[Sequence[Array]] = None,
    alpha: float = 1.0,
) -> Array:
    """Materialize ``ΔW`` of shape ``(d_out, d_in)``.

    Args:
        spec: the tensorization and parameterization, or a :class:`TeRANetwork` (then leave
            the other arguments out: it carries them).
        factors: frozen core and factor matrices matching ``spec``.
        scales: the N vectors λ_n, lengths ``spec.scale_sizes``.
        alpha: global scaling α.

    The result takes the backend, dtype and device of the scales (a torch or JAX array if any
    operand is one); see :func:`materialize` for the contraction.
    """
    net = network_of(spec, factors, scales, alpha, "delta_weight")
    net = net.to(net.common_like())
    return materialize(net)


def materialize(net: TeRANetwork) -> Array:
    """``ΔW`` of a validated network whose operands share one backend and dtype (``net.to(...)``).

    The network is contracted as a chain of mode products expressed as GEMMs in the cheapest
    order (:func:`tera_tn.core.modeproduct.multi_mode_product`); ``diag="identity"`` uses
    ``ΔW = α G_mat ⊙ (u vᵀ)`` with ``u = ⊗λ_row``, ``v = ⊗λ_col``. Padding is sliced away.
    """
    spec, core, scales, alpha = net.spec, net.factors.core, net.scales, net.alpha
    po, pi = spec.padded_shape
    if spec.diag == "identity":
        p = spec.n_row
        u = kron_vectors(scales[:p]) * alpha
        v = kron_vectors(scales[p:])
        x = core.reshape(po, pi) * u[:, None] * v[None, :]
    else:
        mats = scale_factor_matrices(spec, net.factors.factors, scales, alpha)
        with default_scope():
            x = multi_mode_product(core, list(mats)).reshape(po, pi)
    if (po, pi) != spec.shape:
        x = x[: spec.d_out, : spec.d_in]
    return x


def theoretical_rank(spec: TeRASpec | TeRANetwork, scales: Optional[Sequence[Array]] = None) -> int:
    """The almost-sure rank of ΔW for generic frozen factors, without materializing.

    With every ``U_n`` of full column rank, a generic core and ``α ≠ 0``, and no padding:
    ``rank(ΔW) = min(∏_row r_n, ∏_col r_n)`` where ``r_n = nnz(λ_n)`` for ``diag="rank"`` and
    ``"identity"``, ``r_n = min(nnz(λ_n), R_n)`` for ``diag="mode"``, and
    ``r_n = min(nnz(μ_n), nnz(λ_n))`` for ``diag="both"`` (the rank side's count, also capped by
    the mode side's). With padding the kept rows/columns are C-order prefixes of the padded
    Kronecker factors and the exact prefix rank is used instead. Exact zeros in λ count as zeros; any other finite value counts as non-zero
    (NaN or Inf is refused: ΔW would have no rank). Takes a :class:`TeRANetwork` in place of
    ``(spec, scales)``.
    """
    return generic_rank(*spec_and_scales(spec, scales, "theoretical_rank"))


def generic_rank(spec: TeRASpec, scales: Sequence[Array]) -> int:
    """:func:`theoretical_rank` of checked operands (a :class:`TeRANetwork`'s spec and scales)."""
    mode_side, rank_side = scale_sides(spec, scales)
    if spec.diag == "identity":
        # I diag(λ_n) = diag(λ_n) I: rows zeroed where λ_n = 0, the others unit vectors, which
        # are in general position like the rows of a generic U_n.
        mode_side, rank_side = rank_side, None
    # diag(μ_n) U_n zeroes the rows where μ_n = 0; U_n diag(λ_n) keeps every row generic in the
    # span of the nnz(λ_n) kept columns.
    masks = [np.ones(k, dtype=bool) for k in spec.modes] if mode_side is None else [to_numpy(m) != 0 for m in mode_side]
    cols = list(spec.ranks) if rank_side is None else [int(np.count_nonzero(to_numpy(lam))) for lam in rank_side]
    p = spec.n_row
    return min(prefix_rank(masks[:p], cols[:p], spec.d_out), prefix_rank(masks[p:], cols[p:], spec.d_in))
