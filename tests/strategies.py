"""Hypothesis strategies and independent float64 references shared by the tera_tn tests.

Strategies draw small :class:`TeRASpec` instances (orders 2–6, mode sizes 1–7 split into row and
column modes, ranks ≤ mode sizes, every diag placement, optional padding) and well-conditioned
scale vectors (|λ| in [0.5, 2], random signs, optionally exact zeros).

The references below are written from the Kronecker form of ΔW only (Kronecker products, numpy.einsum); they
never call tera_tn's contraction code, so a test comparing against them can fail.
"""

from __future__ import annotations

import math
import string
from functools import reduce

import numpy as np
from hypothesis import strategies as st

from tera_tn import TeRASpec
from tera_tn.core.factors import TeRAFactors

DIAGS = ("rank", "mode", "identity", "both")

seeds = st.integers(min_value=0, max_value=2**32 - 1)
alphas = st.one_of(
    st.just(1.0),
    st.floats(min_value=0.25, max_value=4.0, allow_nan=False) | st.floats(min_value=-4.0, max_value=-0.25, allow_nan=False),
)


def _side_modes(draw, n_modes: int, max_mode: int, max_side: int | None) -> tuple[int, ...]:
    """``n_modes`` sizes in [1, max_mode] whose product stays ≤ ``max_side``."""
    budget = max_side if max_side is not None else max_mode**n_modes
    out = []
    for _ in range(n_modes):
        hi = max(1, min(max_mode, budget))
        k = draw(st.integers(min_value=1, max_value=hi))
        out.append(k)
        budget //= k
    return tuple(out)


@st.composite
def specs(
    draw,
    *,
    min_order: int = 2,
    max_order: int = 6,
    max_mode: int = 7,
    max_side: int | None = 64,
    diags: tuple[str, ...] = DIAGS,
    padding: bool | str = True,
    reduced: bool | str = True,
) -> TeRASpec:
    """A random small, valid spec.

    ``max_side`` bounds the padded d_out and d_in (keeps materialized matrices small);
    ``padding`` allows d_out/d_in smaller than the mode products (``"always"``: at least one
    side is padded); ``reduced`` allows R_n < K_n
    (never for ``diag="identity"``, which needs full ranks; ``"always"``: ranks are drawn per
    mode for every non-identity spec).
    """
    order = draw(st.integers(min_value=min_order, max_value=max_order))
    p = draw(st.integers(min_value=1, max_value=order - 1))
    rows = _side_modes(draw, p, max_mode, max_side)
    cols = _side_modes(draw, order - p, max_mode, max_side)
    diag = draw(st.sampled_from(diags))
    modes = rows + cols
    if diag == "identity" or not reduced or (reduced != "always" and draw(st.booleans())):
        ranks = modes
    else:
        ranks = tuple(draw(st.integers(min_value=1, max_value=k)) for k in modes)
    d_out = d_in = None
    if padding == "always":
        po, pi = math.prod(rows), math.prod(cols)
        if po == 1 and pi == 1:  # nothing to pad: grow one mode
            rows = (2,) + rows[1:]
            ranks = (ranks[0] if diag != "identity" else 2,) + ranks[1:]
            po = 2
        side = draw(st.sampled_from(("row", "col", "both"))) if po > 1 and pi > 1 else ("row" if po > 1 else "col")
        d_out = draw(st.integers(min_value=1, max_value=po - 1)) if side in ("row", "both") else po
        d_in = draw(st.integers(min_value=1, max_value=pi - 1)) if side in ("col", "both") else pi
    elif padding and draw(st.booleans()):
        d_out = draw(st.integers(min_value=1, max_value=math.prod(rows)))
        d_in = draw(st.integers(min_value=1, max_value=math.prod(cols)))
    return TeRASpec(rows, cols, ranks, diag, d_out, d_in)


def scale_values(*, zeros: bool = False) -> st.SearchStrategy[float]:
    """|λ| in [0.5, 2] with a random sign, or (with ``zeros``, about one in four) an exact 0."""
    mag = st.floats(min_value=0.5, max_value=2.0, allow_nan=False, allow_infinity=False)
    signed = st.tuples(mag, st.sampled_from((-1.0, 1.0))).map(lambda t: t[0] * t[1])
    if not zeros:
        return signed
    return st.tuples(st.integers(0, 3), signed).map(lambda t: 0.0 if t[0] == 0 else t[1])


@st.composite
def scales_for(draw, spec: TeRASpec, *, zeros: bool = False) -> tuple[np.ndarray, ...]:
    """One float64 vector per mode, lengths ``spec.scale_sizes``."""
    value = scale_values(zeros=zeros)
    return tuple(
        np.array(draw(st.lists(value, min_size=n, max_size=n)), dtype=np.float64) for n in spec.scale_sizes
    )


@st.composite
def spec_and_scales(draw, *, zeros: bool = False, **spec_kwargs):
    spec = draw(specs(**spec_kwargs))
    return spec, draw(scales_for(spec, zeros=zeros))


# ---------------------------------------------------------------------------------------------
# Independent references (float64, numpy only).
# ---------------------------------------------------------------------------------------------


def effective_factors(spec: TeRASpec, factors: TeRAFactors, scales) -> list[np.ndarray]:
    """A_n = U_n Λ_n (rank), Λ_n U_n (mode), Λ_n (identity) or M_n U_n Λ_n (both: the vector is
    μ_n (K_n) then λ_n (R_n)), as float64 numpy matrices."""
    out = []
    for n, lam in enumerate(scales):
        lam = np.asarray(lam, dtype=np.float64)
        if spec.diag == "identity":
            out.append(np.diag(lam))
            continue
        u = np.asarray(factors.factors[n], dtype=np.float64)
        if spec.diag == "both":
            k = spec.modes[n]
            out.append(np.diag(lam[:k]) @ u @ np.diag(lam[k:]))
        else:
            out.append(u @ np.diag(lam) if spec.diag == "rank" else np.diag(lam) @ u)
    return out


def kron_all(mats) -> np.ndarray:
    return reduce(np.kron, mats, np.ones((1, 1)))


def reference_kron(spec: TeRASpec, factors: TeRAFactors, scales, alpha: float = 1.0) -> np.ndarray:
    """ΔW = α (A_1⊗…⊗A_P) G_mat (A_{P+1}⊗…⊗A_N)ᵀ, sliced to (d_out, d_in)."""
    a = effective_factors(spec, factors, scales)
    p = spec.n_row
    core = np.asarray(factors.core, dtype=np.float64)
    g_mat = core.reshape(math.prod(spec.ranks[:p]), math.prod(spec.ranks[p:]))
    full = alpha * kron_all(a[:p]) @ g_mat @ kron_all(a[p:]).T
    return full[: spec.d_out, : spec.d_in]


def reference_einsum(spec: TeRASpec, factors: TeRAFactors, scales, alpha: float = 1.0) -> np.ndarray:
    """X = G ×_1 A_1 … ×_N A_N by one numpy.einsum, then C-order reshape and slicing."""
    a = effective_factors(spec, factors, scales)
    n = spec.order
    r_idx = string.ascii_lowercase[:n]
    k_idx = string.ascii_uppercase[:n]
    eq = r_idx + "," + ",".join(k_idx[i] + r_idx[i] for i in range(n)) + "->" + k_idx
    x = np.einsum(eq, np.asarray(factors.core, dtype=np.float64), *a, optimize=False)
    return (alpha * x.reshape(spec.padded_shape))[: spec.d_out, : spec.d_in]


def kron_vec(vectors) -> np.ndarray:
    return reduce(np.kron, [np.asarray(v, dtype=np.float64) for v in vectors], np.ones(1))


def relerr(a, b) -> float:
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    scale = max(np.abs(a).max(initial=0.0), np.abs(b).max(initial=0.0), 1e-300)
    return float(np.abs(a - b).max(initial=0.0) / scale)
