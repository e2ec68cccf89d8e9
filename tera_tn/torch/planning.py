"""Strategy choice for a whole TeRA layer, forward alone or forward + backward.

:func:`tera_tn.plan` prices ``ΔW x`` on its own. A layer also runs the base GEMM, and the
materialize strategy folds the base into its single GEMM (``x (W0 + ΔW)ᵀ``), so the layer-level
totals differ from the ``ΔW x`` ones by the base GEMM. With the calibrated cost model of
:mod:`tera_tn.contract.costmodel` (same constants as :func:`tera_tn.plan`):

Layer plans are cached per (spec, token count, training, device, dtype, cost model): installing a
new model (:func:`tera_tn.calibrate`) makes layers re-choose on their next call.

inference (no grad)
    materialize = chain + W0 add + GEMM;  factored = base GEMM + factored ΔW x.
training (λ and x need gradients; the memory-lean backward of :mod:`.autograd`)
    materialize = 2 × (chain + W0 add + GEMM) + projections of g and x + the
    ``∏R_row × n × ∏R_col`` GEMM for H + one pass over G;
    factored = 2 × (base GEMM + factored ΔW x) (the backward mirrors the forward).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

from ..contract.contraction import check_tokens, plan
from ..contract.costmodel import DTYPES, CostModel, cost_model, normalize_key
from ..core.spec import TeRASpec, check_spec

__all__ = ["LayerPlan", "layer_plan"]


@dataclass(frozen=True)
class LayerPlan:
    """Predicted seconds of both strategies for one layer call and the cheaper one.

    Attributes:
        spec, n_tokens, training, device, dtype: what was priced.
        materialize, factored: predicted seconds of the whole layer (base included).
        strategy: the cheaper of the two.
    """

    spec: TeRASpec
    n_tokens: int
    training: bool
    device: str
    dtype: str
    materialize: float
    factored: float
    strategy: str

    def __str__(self) -> str:
        mode = "forward+backward" if self.training else "forward"
        return (
            f"LayerPlan({self.spec}, n={self.n_tokens}, {mode}, {self.device}/{self.dtype}): "
            f"materialize {self.materialize * 1e3:.3f} ms, factored {self.factored * 1e3:.3f} ms "
            f"-> {self.strategy}"
        )


def _projection_seconds(model, n: int, modes, ranks, itemsize: int) -> float:
    """Time of contracting ``(n, ∏K)`` through one side's factors, mode by mode (see ``project``)."""
    sizes = list(modes)
    total = 0.0
    for i, (k, r) in enumerate(zip(modes, ranks)):
        rest = n * math.prod(sizes) // k
        total += model.gemm_seconds(rest, r, k, itemsize)
        sizes[i] = r
    return total


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
    itemsize = DTYPES[dtype]
    d_out, d_in = spec.shape
    base = model.gemm_seconds(n_tokens, d_out, d_in, itemsize)
    w0_add = model.stream_seconds(3 * d_out * d_in * itemsize)
    # core.materialize already holds chain + one GEMM; the fused layer adds only the W0 pass.
    mat = core.materialize.seconds + w0_add
    fac = base + core.factored.seconds
    if training:
        p = spec.n_row
        r_row, r_col = math.prod(spec.ranks[:p]), math.prod(spec.ranks[p:])
        proj = _projection_seconds(model, n_tokens, spec.row_modes, spec.ranks[:p], itemsize)
        proj += _projection_seconds(model, n_tokens, spec.col_modes, spec.ranks[p:], itemsize)
        if spec.diag == "mode":
            # Mode-side scales have no H shortcut: two core GEMMs (see autograd._scale_grads_factored).
            h = 2 * model.gemm_seconds(n_tokens, r_row, r_col, itemsize)
        else:
            h = model.gemm_seconds(r_row, r_col, n_tokens, itemsize) + model.stream_seconds(r_row * r_col * itemsize)
        mat = 2 * mat + proj + h
        fac = 2 * fac
    strategy = "materialize" if mat < fac else "factored"
    return LayerPlan(spec, n_tokens, training, device, dtype, mat, fac, strategy)
