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
    po, pi = spec.padded_shape
    p = spec.n_row
    r_row, r_col = math.prod(spec.ranks[:p]), math.prod(spec.ranks[p:])
    base = model.gemm_seconds(n_tokens, d_out, d_in, itemsize)
    grid = d_out * d_in * itemsize
    w0_add = model.stream_seconds(3 * grid)
    if spec.diag in ("mode", "identity"):
        # frozen F (P G Qᵀ kept per shape group, or G_mat) scaled by two Kronecker diagonals
        delta = model.stream_seconds(4 * po * pi * itemsize, calls=2)
    else:
        delta = core.materialize.seconds - base  # core.materialize is the chain plus this GEMM
    mat = delta + w0_add + base
    fac = base + core.factored.seconds
    dense = mat
    if training:
        proj = _projection_seconds(model, n_tokens, spec.row_modes, spec.ranks[:p], itemsize)
        proj += _projection_seconds(model, n_tokens, spec.col_modes, spec.ranks[p:], itemsize)
        if spec.diag == "mode":
            # Mode-side scales have no H shortcut: two core GEMMs (see factored.factored_scale_grads).
            h = 2 * model.gemm_seconds(n_tokens, r_row, r_col, itemsize)
        else:
            h = model.gemm_seconds(r_row, r_col, n_tokens, itemsize) + model.stream_seconds(r_row * r_col * itemsize)
        mode_side = spec.diag in ("mode", "both")
        rank_side = spec.diag != "mode"
        pull_back = 0.0
        if rank_side:
            # Pᵀ D Q runs the chain's products on the d_out × d_in grid (as many multiply-adds as
            # building ΔW at full ranks), then ⊙ G and two matvecs
            pull_back = delta + model.stream_seconds(3 * r_row * r_col * itemsize, calls=3)
        if mode_side:
            pull_back += model.stream_seconds(5 * grid, calls=3)  # D ⊙ N and its two matvecs
        dense = (mat + delta + w0_add + model.gemm_seconds(n_tokens, d_in, d_out, itemsize)
                 + model.gemm_seconds(d_out, d_in, n_tokens, itemsize) + pull_back)
        mat = 2 * mat + proj + h
        fac = 2 * fac
    # On a tie the first listed wins: factored never forms a d_out × d_in tensor.
    costs = {"factored": fac, "materialize": mat, "dense": dense} if training else {"factored": fac, "materialize": mat}
    strategy = min(costs, key=costs.__getitem__)
    return LayerPlan(spec, n_tokens, training, device, dtype, mat, dense, fac, strategy)
