"""`TeRALayersConfig`: which layers get a TeRA adapter and how (validated on construction)."""

from __future__ import annotations

import math
import numbers
import re
from dataclasses import dataclass, field
from typing import Mapping, Sequence, Union

from ..core.factors import FACTOR_INITS, SCALE_INITS, check_scale_value, check_seed
from ..core.spec import DEFAULT_DIAG, DEFAULT_ORDER, DIAG_PLACEMENTS, TeRASpec, check_modes
from ..contract.strategies import strategy_names
from .w0_basis import cap_ranks

__all__ = ["TeRALayersConfig", "LAYER_STRATEGIES", "ALPHA_SCALINGS", "UPDATES", "BASES", "check_form"]

#: ``"auto"`` and every strategy of the registry (:mod:`tera_tn.contract.strategies`).
LAYER_STRATEGIES = ("auto",) + strategy_names()
_FACTOR_DTYPES = ("float32", "float64")
#: how a layer's α is set: ``"constant"`` (``alpha`` itself) or ``"w0_relative"``
#: (``alpha·‖W0‖_F / ‖M‖_F``, M the frozen map at unit λ: equal relative updates in every layer)
ALPHA_SCALINGS = ("constant", "w0_relative")
#: how ΔW enters the layer: ``"additive"`` (``W0 + ΔW``) or ``"multiplicative"`` (``W0 + W0 ⊙ ΔW``)
UPDATES = ("additive", "multiplicative")
#: where the rank-side diagonals act: ``"random"`` (the frozen factors' Kronecker bases) or ``"w0"``
#: (the adapted weight's leading singular vectors, :mod:`tera_tn.torch.w0_basis`)
BASES = ("random", "w0")
_LAYER_OPTIONS = (
    "alpha", "alpha_scaling", "update", "basis", "scale_init", "zero_mode", "scale_init_value", "dropout", "strategy", "cache_delta", "check_finite",
)


def check_form(update, basis, alpha_scaling) -> None:
    """Validate the update form (``update``, ``basis``) and the α scaling it combines with."""
    if alpha_scaling not in ALPHA_SCALINGS:
        raise ValueError(f"alpha_scaling must be one of {ALPHA_SCALINGS}, got {alpha_scaling!r}")
    if update not in UPDATES:
        raise ValueError(f"update must be one of {UPDATES}, got {update!r}")
    if update == "multiplicative" and alpha_scaling != "constant":
        raise ValueError(f"update='multiplicative' takes alpha_scaling='constant', got {alpha_scaling!r}: W0 ⊙ ΔW is "
                         "already relative to each weight, so tune alpha with the learning rate instead")
    if basis not in BASES:
        raise ValueError(f"basis must be one of {BASES}, got {basis!r}")
    if basis == "w0" and (update != "additive" or alpha_scaling != "constant"):
        raise ValueError(f"basis='w0' takes update='additive' and alpha_scaling='constant', got update={update!r}, "
                         f"alpha_scaling={alpha_scaling!r}")


@dataclass(frozen=True)
class TeRALayersConfig:
    """How :func:`tera_tn.torch.add_tera` adapts a model.

    Attributes:
        target_modules: which ``nn.Linear`` layers to adapt, by qualified name (as in
            ``model.named_modules()``). A sequence of names matches a layer whose name equals an
            entry or ends with ``"." + entry`` (``["q_proj", "v_proj"]``); a single string is a
            regular expression that must match the whole name; ``None`` adapts every Linear.
        order: modes per layer ``N`` (split between rows and columns by ``TeRASpec.from_shape``)
            or an explicit ``(P, Q)``; default ``DEFAULT_ORDER`` (3).
        ranks: Tucker-rank policy for automatic specs: ``"full"``, a fraction in (0, 1], an int
            cap, or an explicit per-mode tuple (see ``TeRASpec.from_shape``).
        diag: ``"mode"`` (default, ``DEFAULT_DIAG``), ``"rank"``, ``"identity"`` or ``"both"``
            (diagonals on both sides of every factor: ``K_n + R_n`` trainable numbers per mode).
        specs: explicit specs per weight shape, ``{(d_out, d_in): TeRASpec}``; shapes not listed
            use the ``order``/``ranks``/``diag`` policy. Stored as a tuple of pairs.
        alpha: global scale α of ΔW.
        alpha_scaling: ``"constant"`` (default): every layer's ΔW is scaled by ``alpha``.
            ``"w0_relative"``: layer ``l`` uses ``α_l = alpha·‖W0_l‖_F / ‖M_l‖_F``, where ``M_l`` is
            the frozen map (ΔW at unit λ and α = 1), so ``alpha`` is the frozen map's size relative
            to the weight it adapts and one learning rate moves every layer by the same relative
            amount (with ``"constant"`` the frozen map's size relative to ``W0`` spans about 4× over
            MiniLM's layers). ``α_l`` is computed from the layer's weight when the adapter is
            created; checkpoints record ``‖W0_l‖`` and refuse another ``W0``. Needs a
            floating-point base weight.
        update: ``"additive"`` (default): the layer computes ``(W0 + ΔW) x``. ``"multiplicative"``:
            ``(W0 + W0 ⊙ ΔW) x``, HiRA's form with TeRA's full-rank ΔW, so the update scales each
            entry of the weight it adapts (``W0 ⊙ ΔW`` is the layer's update; its rank can reach
            ``min(d_out, d_in)``). Its entries are ~|W0| times smaller than an additive ΔW's, so
            ``alpha`` is tuned with the learning rate (the adapter study used 16 on MiniLM: the
            geometric mean of ``‖M‖/‖W0 ⊙ M‖`` over its layers). Trains on the ``"dense"`` path
            whatever ``strategy`` says (``W0 ⊙ ΔW`` has no factored form); mixed-adapter batches
            run one GEMM per such adapter, ``row_lambdas`` and ``AdapterStore`` refuse it. Needs a
            floating-point base weight and ``alpha_scaling="constant"``; checkpoints pin ``‖W0‖``
            and merge/unmerge use the unmerged ``W0``.
        basis: ``"random"`` (default): ``ΔW = α P (G ⊙ u vᵀ) Qᵀ`` with the frozen Kronecker factors
            ``P``, ``Q``. ``"w0"``: ``P`` and ``Q`` become W0's leading singular vectors (``W0 = U0 S
            V0ᵀ``): ``ΔW = α U0 (G ⊙ u vᵀ) V0ᵀ``, so the trained pattern scales W0's principal
            directions, coarse to fine (see :mod:`tera_tn.torch.w0_basis`). Needs ``diag="rank"``;
            the rank policy is capped so that ``∏R`` per side is at most ``min(d_out, d_in)``
            (explicit specs must fit). The bases are recomputed from W0 at creation and load (a
            float64 SVD, never stored); checkpoints pin ``‖W0‖``. Trains a materialized ΔW (two
            ``d × r`` GEMMs per layer per step) and needs a floating-point base weight, an additive
            update and ``alpha_scaling="constant"``.
        seed: seed of the frozen factors (the same seed gives bit-identical factors everywhere).
        factor_init: ``"orthogonal"``, ``"gaussian"`` or ``"uniform"``.
        scale_init: λ initialization (``"zero_start"``: ΔW = 0 at step 0 with non-zero grads).
        zero_mode: which λ_n starts at zero for ``"zero_start"``.
        scale_init_value: starting value of the λ that do not start at zero (finite, > 0). With
            ``"zero_start"`` the first gradient scales as ``alpha·value^(N-1)``; a small value with
            a large ``alpha`` (RandLoRA's choice) makes Adam's fixed-size steps larger relative to λ.
        dropout: dropout probability on the adapter input (the base sees the clean input).
        strategy: ``"auto"`` (cost model per token count), ``"materialize"``, ``"dense"`` (materialize
            forward, λ gradients from the weight gradient ``gᵀx``) or ``"factored"``.
        factor_dtype: storage dtype of the frozen factors (``"float32"`` or ``"float64"``);
            computation follows the input dtype and λ stay float32.
        cache_delta: opt-in (default off): in inference (no grad), keep the merged weight
            ``W0 + ΔW`` between calls (one extra ``d_out × d_in`` tensor per layer). It is keyed
            on the tensors' version counters, which writes through ``.data`` do not bump: call
            ``layer.clear_cache()`` after such writes (see docs/torch.md).
        check_finite: opt-in (default off): every forward checks that the layer's λ are finite
            and raises ``FloatingPointError`` naming the layer otherwise.
    """

    target_modules: Union[None, str, Sequence[str]] = None
    order: Union[int, tuple[int, int]] = DEFAULT_ORDER
    ranks: Union[str, int, float, Sequence[int]] = "full"
    diag: str = DEFAULT_DIAG
    specs: Union[Mapping[tuple[int, int], TeRASpec], tuple] = field(default=())
    alpha: float = 1.0
    alpha_scaling: str = "constant"
    update: str = "additive"
    basis: str = "random"
    seed: int = 0
    factor_init: str = "orthogonal"
    scale_init: str = "zero_start"
    zero_mode: int = 0
    scale_init_value: float = 1.0
    dropout: float = 0.0
    strategy: str = "auto"
    factor_dtype: str = "float32"
    cache_delta: bool = False
    check_finite: bool = False

    def __post_init__(self) -> None:
        tm = self.target_modules
        if tm is not None:
            if not isinstance(tm, (str, list, tuple, set, frozenset)):
                raise ValueError(
                    f"target_modules must be a regex, a list of names or None, got {tm!r} ({type(tm).__name__})"
                )
            if isinstance(tm, str):
                try:
                    re.compile(tm)
                except re.error as e:
                    raise ValueError(f"target_modules {tm!r} is not a valid regular expression: {e}") from None
            else:
                tm = tuple(tm)
                if not tm or not all(isinstance(t, str) and t for t in tm):
                    raise ValueError(f"target_modules must be a regex, a non-empty list of names or None, got {self.target_modules!r}")
                object.__setattr__(self, "target_modules", tm)
        if isinstance(self.ranks, list):
            object.__setattr__(self, "ranks", tuple(self.ranks))
        if isinstance(self.order, list):
            object.__setattr__(self, "order", tuple(self.order))
        # The spec policy is applied per layer shape later; its value rules are checked now, with
        # the same rules (and messages) as TeRASpec.from_shape, so a typo fails at construction.
        TeRASpec._split_order(2, 2, self.order)
        if isinstance(self.ranks, (tuple, list)):
            check_modes("ranks", self.ranks)
        else:
            TeRASpec._resolve_ranks((2,), self.ranks)
        if self.diag not in DIAG_PLACEMENTS:
            raise ValueError(f"diag must be one of {DIAG_PLACEMENTS}, got {self.diag!r}")
        check_form(self.update, self.basis, self.alpha_scaling)
        if self.basis == "w0" and self.diag != "rank":
            raise ValueError(f"basis='w0' needs diag='rank' (the diagonals act in W0's singular coordinates; on the "
                             f"mode side W0's bases change nothing), got diag={self.diag!r}")
        if self.factor_init not in FACTOR_INITS:
            raise ValueError(f"factor_init must be one of {FACTOR_INITS}, got {self.factor_init!r}")
        if self.scale_init not in SCALE_INITS:
            raise ValueError(f"scale_init must be one of {SCALE_INITS}, got {self.scale_init!r}")
        if self.strategy not in LAYER_STRATEGIES:
            raise ValueError(f"strategy must be one of {LAYER_STRATEGIES}, got {self.strategy!r}")
        if self.factor_dtype not in _FACTOR_DTYPES:
            raise ValueError(f"factor_dtype must be one of {_FACTOR_DTYPES}, got {self.factor_dtype!r}")
        check_seed(self.seed)
        check_scale_value("scale_init_value", self.scale_init_value)
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, numbers.Real) or not math.isfinite(self.alpha):
            raise ValueError(f"alpha must be a finite number, got {self.alpha!r}")
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, numbers.Real) or not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be a probability in [0, 1), got {self.dropout!r}")
        if isinstance(self.zero_mode, bool) or not isinstance(self.zero_mode, numbers.Integral) or self.zero_mode < 0:
            raise ValueError(f"zero_mode must be a non-negative mode index, got {self.zero_mode!r}")
        for flag in ("cache_delta", "check_finite"):
            if not isinstance(getattr(self, flag), bool):
                raise ValueError(f"{flag} must be True or False, got {getattr(self, flag)!r}")
        pairs = tuple(self.specs.items()) if isinstance(self.specs, Mapping) else tuple(self.specs)
        for item in pairs:
            if not (isinstance(item, tuple) and len(item) == 2):
                raise ValueError(f"specs must map (d_out, d_in) to a TeRASpec, got entry {item!r}")
            shape, spec = item
            if not isinstance(spec, TeRASpec):
                raise ValueError(f"specs[{shape!r}] must be a TeRASpec, got {type(spec).__name__}")
            if tuple(shape) != spec.shape:
                raise ValueError(f"specs[{shape!r}] is for shape {spec.shape}; key and spec shape must agree")
            if spec.order <= self.zero_mode and self.scale_init == "zero_start":
                raise ValueError(f"zero_mode={self.zero_mode} is not a mode of specs[{shape!r}] (order {spec.order})")
        object.__setattr__(self, "specs", tuple((tuple(s), sp) for s, sp in pairs))

    def __getattr__(self, name: str):
        # Only reached for missing attributes: PEFT reads its own fields (peft_type, task_type,
        # base_model_name_or_path, ...) from whatever config it is given, so a TeRALayersConfig passed
        # to peft.get_peft_model or add_adapter would fail with a bare AttributeError.
        if name.startswith("__"):
            raise AttributeError(name)
        raise AttributeError(
            f"TeRALayersConfig has no attribute {name!r}. TeRALayersConfig is the plain-torch API's config "
            "(tera_tn.torch.add_tera); for peft.get_peft_model / add_adapter use tera_tn.peft.TeraConfig"
        )

    def matches(self, name: str) -> bool:
        """Whether the module called ``name`` is a target."""
        tm = self.target_modules
        if tm is None:
            return True
        if isinstance(tm, str):
            return re.fullmatch(tm, name) is not None
        return any(name == t or name.endswith("." + t) for t in tm)

    def layer_options(self) -> dict:
        """The per-layer keyword arguments of :class:`~tera_tn.torch.TeRALinear` this config sets."""
        return {k: getattr(self, k) for k in _LAYER_OPTIONS}

    def spec_for(self, d_out: int, d_in: int) -> TeRASpec:
        """The spec of a ``(d_out, d_in)`` layer: the explicit one if given, else from the policy."""
        for shape, spec in self.specs:
            if shape == (d_out, d_in):
                return spec
        try:
            spec = TeRASpec.from_shape(d_out, d_in, order=self.order, ranks=self.ranks, diag=self.diag)
        except ValueError as e:
            raise ValueError(
                f"no TeRA spec for a {d_out}×{d_in} layer with order={self.order!r}, ranks={self.ranks!r}: {e}; "
                f"pass an explicit spec for the ({d_out}, {d_in}) shape in the config's specs"
            ) from None
        if self.basis == "w0":
            spec = cap_ranks(spec)
        if self.scale_init == "zero_start" and self.zero_mode >= spec.order:
            raise ValueError(f"zero_mode={self.zero_mode} is not a mode of {spec} (order {spec.order})")
        return spec
