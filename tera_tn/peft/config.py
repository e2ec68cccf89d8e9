"""`TeraConfig`: the PEFT configuration of a TeRA adapter (serialized to ``adapter_config.json``)."""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any, Optional, Union

from peft.config import PeftConfig
from peft.utils import PeftType

from ..core.spec import DEFAULT_DIAG, DEFAULT_ORDER, TeRASpec
from ..torch.config import TeRALayersConfig

__all__ = ["TeraConfig"]


def _normalize_specs(specs: Any) -> Optional[dict[str, dict]]:
    """``{(d_out, d_in) or "d_outxd_in": TeRASpec or dict}`` → ``{"d_outxd_in": spec dict}``."""
    if specs is None:
        return None
    if not isinstance(specs, dict):
        raise ValueError(f"specs must map (d_out, d_in) or 'd_outxd_in' to a TeRASpec, got {type(specs).__name__}")
    out = {}
    for key, spec in specs.items():
        if isinstance(spec, dict):
            spec = TeRASpec.from_dict(spec)
        if not isinstance(spec, TeRASpec):
            raise ValueError(f"specs[{key!r}] must be a TeRASpec or its dict form, got {type(spec).__name__}")
        shape = tuple(key) if isinstance(key, (tuple, list)) else tuple(int(s) for s in str(key).lower().split("x"))
        if shape != spec.shape:
            raise ValueError(f"specs[{key!r}] is for shape {spec.shape}; key and spec shape must agree")
        out[f"{spec.d_out}x{spec.d_in}"] = spec.to_dict()
    return out


@dataclass
class TeraConfig(PeftConfig):
    """Configuration of a TeRA adapter for :func:`peft.get_peft_model`.

    TeRA (arXiv 2509.03234) adapts a ``(d_out, d_in)`` weight by ``ΔW = α·reshape(G ×_1 U_1Λ_1 … ×_N U_NΛ_N)``:
    a frozen random core ``G`` and factors ``U_n`` shared by every layer of the same spec (regenerated
    from ``seed``) and trainable vectors ``λ_n`` per layer (``Σ_n R_n`` numbers per layer; with the
    default ``diag="mode"`` the diagonals sit on the mode side, ``Λ_n U_n``, and train ``Σ_n K_n``).

    Args:
        target_modules: module names (suffix match) or a regex (full match), as in LoRA; ``"all-linear"``
            adapts every Linear except the output head. ``None`` uses PEFT's VeRA defaults per
            architecture (attention projections).
        exclude_modules: names or regex of modules never adapted.
        order: modes per layer ``N`` (split between rows and columns) or ``[P, Q]``; default
            ``DEFAULT_ORDER`` (3).
        ranks: Tucker ranks: ``"full"``, a fraction in (0, 1], an int cap, or a per-mode list.
        diag: ``"mode"`` (default, ``DEFAULT_DIAG``), ``"rank"``, ``"identity"`` or ``"both"`` (see
            :class:`tera_tn.TeRASpec`; ``"both"`` trains ``K_n + R_n`` numbers per mode).
        specs: explicit specs per weight shape, ``{"768x384": TeRASpec or its dict}`` (tuples
            ``(d_out, d_in)`` are accepted as keys); other shapes follow ``order``/``ranks``/``diag``.
        alpha: global scale α of ΔW.
        alpha_scaling: ``"constant"`` or ``"w0_relative"`` (α per layer relative to ``‖W0‖``).
        update: ``"additive"`` (``W0 + ΔW``, default) or ``"multiplicative"`` (``W0 + W0 ⊙ ΔW``,
            HiRA's form; tune ``alpha`` with the rate, see :class:`tera_tn.torch.TeRALayersConfig`).
        basis: ``"random"`` (default) or ``"w0"``: the rank-side diagonals act in W0's singular
            coordinates (needs ``diag="rank"``; see :class:`tera_tn.torch.TeRALayersConfig`).
        seed: seed of the frozen factors (bit-identical factors in every process).
        factor_init: ``"orthogonal"``, ``"gaussian"`` or ``"uniform"``.
        factor_dtype: storage dtype of the frozen factors, ``"float32"`` or ``"float64"``.
        scale_init: λ init, ``"zero_start"`` (ΔW = 0, non-zero gradient), ``"ones"`` or ``"random"``.
        zero_mode: the mode whose λ starts at zero for ``"zero_start"``.
        scale_init_value: starting value of the λ that do not start at zero (finite, > 0); a small
            value with a large ``alpha`` is RandLoRA's choice.
        dropout: dropout on the adapter input (``tera_dropout``, its old name, still works for one
            release and warns).
        strategy: ``"auto"`` (cost model per token count), ``"materialize"``, ``"dense"`` (materialize
            forward, λ gradients from the weight gradient ``gᵀx``: the training choice at large token
            counts) or ``"factored"``.
        cache_delta: opt-in (default off): in inference (no grad), keep the merged weight
            ``W0 + ΔW`` of a single active adapter between calls (one extra ``d_out × d_in`` tensor
            per layer); call ``layer.clear_cache()`` after writes through ``.data``.
        check_finite: opt-in (default off): every forward checks that the adapter's λ are finite
            and raises ``FloatingPointError`` otherwise (a small reduction and a host sync per layer).
        fan_in_fan_out: the target stores its weight as ``(fan_in, fan_out)`` (GPT-2 ``Conv1D``).
            Set automatically (with a warning) when a ``Conv1D`` is targeted.
        save_factors: also store the frozen factors in ``adapter_model.safetensors`` (verified
            against the seed on load; normally redundant).
        modules_to_save: extra modules trained and saved in full (e.g. a classifier head).
        layers_to_transform, layers_pattern: restrict to some layer indices (as in LoRA).
        bias: only ``"none"`` is supported.
    """

    target_modules: Optional[Union[list[str], str]] = field(default=None, metadata={"help": "Modules to adapt"})
    exclude_modules: Optional[Union[list[str], str]] = field(default=None, metadata={"help": "Modules to skip"})
    order: Union[int, list[int]] = field(
        default=DEFAULT_ORDER, metadata={"help": f"Modes per layer N, or [P, Q] (default {DEFAULT_ORDER})"}
    )
    ranks: Union[str, int, float, list[int]] = field(default="full", metadata={"help": "Tucker-rank policy"})
    diag: str = field(
        default=DEFAULT_DIAG, metadata={"help": f"'rank', 'mode', 'identity' or 'both' (default {DEFAULT_DIAG!r})"}
    )
    specs: Optional[dict] = field(default=None, metadata={"help": "Explicit specs per 'd_outxd_in' shape"})
    alpha: float = field(default=1.0, metadata={"help": "Global scale of ΔW"})
    alpha_scaling: str = field(
        default="constant", metadata={"help": "'constant' or 'w0_relative' (alpha·‖W0‖/‖M‖ per layer)"})
    update: str = field(
        default="additive", metadata={"help": "'additive' (W0 + ΔW) or 'multiplicative' (W0 + W0 ⊙ ΔW)"})
    basis: str = field(default="random", metadata={"help": "'random' (frozen factors) or 'w0' (W0's singular vectors)"})
    seed: int = field(default=0, metadata={"help": "Seed of the frozen factors"})
    factor_init: str = field(default="orthogonal", metadata={"help": "Frozen factor init"})
    factor_dtype: str = field(default="float32", metadata={"help": "Storage dtype of frozen factors"})
    scale_init: str = field(default="zero_start", metadata={"help": "λ init"})
    zero_mode: int = field(default=0, metadata={"help": "Mode whose λ starts at zero"})
    scale_init_value: float = field(default=1.0, metadata={"help": "Starting value of the non-zero λ"})
    dropout: float = field(default=0.0, metadata={"help": "Dropout on the adapter input"})
    strategy: str = field(default="auto", metadata={"help": "'auto', 'materialize', 'dense' or 'factored'"})
    cache_delta: bool = field(default=False, metadata={"help": "Inference reuses W0 + ΔW between calls"})
    check_finite: bool = field(default=False, metadata={"help": "Forward raises on non-finite λ"})
    fan_in_fan_out: bool = field(default=False, metadata={"help": "Weights stored as (fan_in, fan_out)"})
    save_factors: bool = field(default=False, metadata={"help": "Store frozen factors in the checkpoint"})
    modules_to_save: Optional[list[str]] = field(default=None, metadata={"help": "Extra modules to train and save"})
    layers_to_transform: Optional[Union[list[int], int]] = field(default=None, metadata={"help": "Layer indices"})
    layers_pattern: Optional[Union[list[str], str]] = field(default=None, metadata={"help": "Layer list name"})
    bias: str = field(default="none", metadata={"help": "Only 'none'"})
    tera_dropout: Optional[float] = field(default=None, metadata={"help": "Deprecated name of dropout"})

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = PeftType.TERA
        if self.tera_dropout is not None:
            # adapter_config.json files written before the rename carry the old key.
            warnings.warn(
                "TeraConfig(tera_dropout=...) is renamed dropout (the name TeRALayersConfig uses); tera_dropout will be "
                "removed in the next release",
                DeprecationWarning,
                stacklevel=3,
            )
            self.dropout, self.tera_dropout = self.tera_dropout, None
        if isinstance(self.target_modules, (list, tuple)):
            self.target_modules = set(self.target_modules)
        if isinstance(self.exclude_modules, (list, tuple)):
            self.exclude_modules = set(self.exclude_modules)
        if isinstance(self.order, tuple):
            self.order = list(self.order)
        if isinstance(self.ranks, tuple):
            self.ranks = list(self.ranks)
        self.specs = _normalize_specs(self.specs)
        if self.bias != "none":
            raise ValueError(f"TeraConfig supports bias='none' only, got {self.bias!r}")
        if self.layers_pattern and self.layers_to_transform is None:
            raise ValueError("When `layers_pattern` is specified, `layers_to_transform` must also be specified.")
        self.tera_config()  # validates every field once, with TeRALayersConfig's messages

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str, subfolder: Optional[str] = None, **kwargs):
        """PEFT's config loading (``PeftModel.from_pretrained`` and ``load_adapter`` call it before
        reading the weights), which also checks that a local folder's ``adapter_model.safetensors``
        is readable, so a damaged file is refused naming it (see
        :func:`tera_tn.peft.io.check_weights_readable`)."""
        from .io import check_weights_readable

        config = super().from_pretrained(pretrained_model_name_or_path, subfolder=subfolder, **kwargs)
        check_weights_readable(pretrained_model_name_or_path, subfolder)
        return config

    def tera_config(self) -> TeRALayersConfig:
        """The equivalent :class:`tera_tn.torch.TeRALayersConfig` (spec policy, seed, init, strategy)."""
        specs = {tuple(int(s) for s in k.split("x")): TeRASpec.from_dict(v) for k, v in (self.specs or {}).items()}
        return TeRALayersConfig(
            target_modules=None,
            order=tuple(self.order) if isinstance(self.order, list) else self.order,
            ranks=tuple(self.ranks) if isinstance(self.ranks, list) else self.ranks,
            diag=self.diag,
            specs=specs,
            alpha=self.alpha,
            alpha_scaling=self.alpha_scaling,
            update=self.update,
            basis=self.basis,
            seed=self.seed,
            factor_init=self.factor_init,
            scale_init=self.scale_init,
            zero_mode=self.zero_mode,
            scale_init_value=self.scale_init_value,
            dropout=self.dropout,
            strategy=self.strategy,
            factor_dtype=self.factor_dtype,
            cache_delta=self.cache_delta,
            check_finite=self.check_finite,
        )

    def spec_for(self, d_out: int, d_in: int) -> TeRASpec:
        """The spec of a ``(d_out, d_in)`` layer under this config (the spec policy is
        :meth:`TeRALayersConfig.spec_for`'s, shared by both APIs)."""
        return self.tera_config().spec_for(d_out, d_in)

    def layer_options(self) -> dict:
        """The per-adapter options of a TeRA layer this config sets (see :meth:`TeRALayersConfig.layer_options`)."""
        return self.tera_config().layer_options()
