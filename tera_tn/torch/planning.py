"""Strategy choice for a whole TeRA layer, forward alone or forward + backward.

:func:`tera_tn.plan` prices ``ΔW x`` on its own. A layer also runs the base GEMM, and the
materialize strategy folds the base into its single GEMM (``x (W0 + ΔW)ᵀ``), so the layer-level
totals differ from the ``ΔW x`` ones by the base GEMM. With the calibrated cost model of
:mod:`tera_tn.contract.costmodel` (same constants as :func:`tera_tn.plan`):

Layer plans are cached per (spec, token count, training, device, dtype, cost model): installing a
new model (:func:`tera_tn.contract.costmodel.calibrate`) makes layers re-choose on their next call.

inference (no grad)
    materialize = ΔW + W0 add + GEMM;  factored = base GEMM + factored ΔW x.
    ΔW is a chain of mode products, or two elementwise passes where the layer keeps the frozen
    product (``diag="mode"``: ``P G Qᵀ`` once per shape group; ``"identity"``: ``G_mat``).
training (λ and x need gradients; the memory-lean backward of :mod:`.autograd`)
    materialize = 2 × (ΔW + W0 add + GEMM) + projections of g and x + the
    ``∏R_row × n × ∏R_col`` GEMM for H + one pass over G;
    dense = (ΔW + W0 add + GEMM) + the ΔW again for ``grad_x`` + the ``grad_x`` GEMM + the
    weight-gradient GEMM ``gᵀ x`` + its pull-back (one more chain for a rank side, elementwise
    passes for a mode side);
    factored = 2 × (base GEMM + factored ΔW x) (the backward mirrors the forward).

The formulas live with each strategy in the registry :mod:`tera_tn.contract.strategies`
(``Strategy.layer_seconds`` over the shared :class:`~tera_tn.contract.strategies.LayerTerms`);
this module only walks the registry and keeps the cheapest.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

from ..contract.contraction import check_tokens, plan
from ..contract.costmodel import DTYPES, CostModel, cost_model, normalize_key
from ..contract.strategies import PREFERENCE, REGISTRY, layer_terms
from ..core.spec import TeRASpec, check_spec

__all__ = ["LayerPlan", "layer_plan"]


@dataclass(frozen=True)
class LayerPlan:
    """Predicted seconds of each strategy for one layer call and the cheapest one.

    Attributes:
        spec, n_tokens, training, device, dtype: what was priced.
        materialize, dense, factored: predicted seconds of the whole layer (base included);
            ``dense`` differs from ``materialize`` only in training (its backward), and equals it
            in inference.
        strategy: the cheapest (``"factored"`` on a tie: it never forms a ``d_out × d_in`` tensor).
    """

    spec: TeRASpec
    n_tokens: int
    training: bool
    device: str
    dtype: str
    materialize: float
    dense: float
    factored: float
    strategy: str

    def __str__(self) -> str:
        mode = "forward+backward" if self.training else "forward"
        dense = f"dense {self.dense * 1e3:.3f} ms, " if self.training else ""
        return (
            f"LayerPlan({self.spec}, n={self.n_tokens}, {mode}, {self.device}/{self.dtype}): "
            f"materialize {self.materialize * 1e3:.3f} ms, {dense}factored {self.factored * 1e3:.3f} ms "
            f"-> {self.strategy}"
        )


def layer_plan(
    spec: TeRASpec,
    n_tokens: int,
    *,
    training: bool,
    device: str = "cpu",
    dtype: str = "float32",
    model: CostModel | None = None,
) -> LayerPlan:
    """Price both strategies for a layer call on ``n_tokens`` tokens (see the module docstring).

    ``model`` defaults to the cost model installed for (torch, device, dtype).
    """
    check_spec(spec, "layer_plan")
    n_tokens = check_tokens(n_tokens)
    if not isinstance(training, bool):
        raise ValueError(f"training must be True or False, got {training!r}")
    _, device, dtype = normalize_key("torch", device, dtype)
    if model is None:
        model = cost_model("torch", device, dtype)
    elif not isinstance(model, CostModel):
        raise ValueError(f"model must be a CostModel or None, got {type(model).__name__}: {model!r}")
    return _layer_plan(spec, n_tokens, training, device, dtype, model)


@lru_cache(maxsize=4096)
def _layer_plan(spec: TeRASpec, n_tokens: int, training: bool, device: str, dtype: str, model: CostModel) -> LayerPlan:
    core = plan(spec, n_tokens, backend="torch", device=device, dtype=dtype, model=model)
    terms = layer_terms(spec, n_tokens, training, DTYPES[dtype], model, core.costs)
    seconds = {name: s.layer_seconds(terms, training) for name, s in REGISTRY.items()}
    # On a tie the first of PREFERENCE wins: factored never forms a d_out × d_in tensor.
    candidates = [name for name in PREFERENCE if training or not REGISTRY[name].training_only]
    strategy = min(candidates, key=seconds.__getitem__)
    return LayerPlan(spec, n_tokens, training, device, dtype, seconds["materialize"], seconds["dense"], seconds["factored"], strategy)
