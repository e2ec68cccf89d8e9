"""Bad inputs to the math core: each must raise a clear error naming the value and what was expected.

Rows cover specs (from_shape, the constructor, from_dict), tensorize/matricize, factors and
scales, delta_weight, apply, plan and cost models, theoretical_rank, the rank measures, the
structured spectrum and parameter accounting.
"""

from __future__ import annotations

import numpy as np
import pytest

import tera_tn as tt
from tera_tn import TeRASpec, init_scales, random_factors
from tera_tn.contract.costmodel import CostModel, calibrate
from tera_tn.analysis import accounting, rank, spectrum
from tera_tn.contract import costmodel
from tera_tn.core import factorize, modeproduct
from tera_tn.core.network import scaled_factors
from tera_tn.torch.planning import layer_plan

from .teach import Case, assert_teaches, params

S = TeRASpec((4, 4), (4, 4))
F = random_factors(S, 0)
L = init_scales(S, "random", seed=1)
X = np.ones((3, 16))
NAN_L = [np.array([np.nan, 1.0, 1.0, 1.0])] + list(L[1:])
INF_L = list(L[:3]) + [np.array([1.0, np.inf, 1.0, 1.0])]


def from_shape(**kw):
    return lambda: TeRASpec.from_shape(64, 64, **{"order": 4, **kw})


CASES = [
    # --- TeRASpec.from_shape ------------------------------------------------------------------
    Case("order-huge", from_shape(order=10**6), ValueError, ("order 1000000", "at most 6 modes", "lower order")),
    Case("order-float", from_shape(order=4.0), ValueError, ("order", "4.0", "positive integer")),
    Case("order-string", from_shape(order="4"), ValueError, ("order", "'4'", "positive integer")),
    Case("order-bool", from_shape(order=True), ValueError, ("order", "true", "positive integer")),
    Case("order-one", from_shape(order=1), ValueError, ("order", ">= 2", "got 1")),
    Case("order-triple", from_shape(order=(1, 2, 3)), ValueError, ("(1, 2, 3)", "(row_order, col_order)")),
    Case("order-pair-zero", from_shape(order=(0, 2)), ValueError, ("order[0]", "positive integer", "got 0")),
    Case("ranks-fraction-above-one", from_shape(ranks=1.5), ValueError, ("1.5", "(0, 1]")),
    Case("ranks-nan", from_shape(ranks=float("nan")), ValueError, ("nan", "(0, 1]")),
    Case("ranks-numpy-float-nan", from_shape(ranks=np.float32("nan")), ValueError, ("nan", "(0, 1]")),
    Case("ranks-zero", from_shape(ranks=0), ValueError, ("ranks", "positive integer", "got 0")),
    Case("ranks-negative", from_shape(ranks=-2), ValueError, ("ranks", "-2")),
    Case("ranks-dict", from_shape(ranks={1: 2}), ValueError, ("{1: 2}", "one int per mode")),
    Case("ranks-bool", from_shape(ranks=True), ValueError, ("true", "'full', a fraction")),
    Case("ranks-word", from_shape(ranks="half"), ValueError, ("'half'", "'full', a fraction")),
    Case("ranks-too-few", from_shape(ranks=(2, 2)), ValueError, ("2 entries", "4 modes", "one rank per mode")),
    Case("ranks-float-entry", from_shape(ranks=(2.0, 2, 2, 2)), ValueError, ("ranks[0]", "2.0", "positive integer")),
    Case("max-padding-negative", from_shape(max_padding=-1), ValueError, ("max_padding", "-1", ">= 0")),
    Case("max-padding-nan", from_shape(max_padding=float("nan")), ValueError, ("max_padding", "nan", "finite")),
    Case("max-padding-inf", from_shape(max_padding=float("inf")), ValueError, ("max_padding", "inf", "finite")),
    Case("max-padding-string", from_shape(max_padding="0.1"), ValueError, ("max_padding", "'0.1'")),
    Case("max-imbalance-below-one", from_shape(max_imbalance=0.5), ValueError, ("max_imbalance", "0.5", ">= 1.0")),
    Case("max-imbalance-nan", from_shape(max_imbalance=float("nan")), ValueError, ("max_imbalance", "nan", "finite")),
    Case("d-out-zero", lambda: TeRASpec.from_shape(0, 64), ValueError, ("d_out", "positive integer", "got 0")),
    Case("d-out-float", lambda: TeRASpec.from_shape(64.0, 64), ValueError, ("d_out", "64.0", "positive integer")),
    Case("d-in-bool", lambda: TeRASpec.from_shape(64, True), ValueError, ("d_in", "true", "positive integer")),
    Case("d-out-huge", lambda: TeRASpec.from_shape(10**30, 64), ValueError, (str(10**30), "2**31", "give the modes explicitly")),
    Case("diag-unknown", from_shape(diag="diagonal"), ValueError, ("'diagonal'", "'rank', 'mode', 'identity'")),
    Case("diag-identity-reduced", from_shape(diag="identity", ranks=2), ValueError, ("identity", "full ranks")),
    # --- TeRASpec(...) and from_dict --------------------------------------------------------
    Case("modes-string", lambda: TeRASpec("44", (4, 4)), ValueError, ("row_modes", "'44'", "sequence of positive integers")),
    Case("modes-int", lambda: TeRASpec(4, (4, 4)), ValueError, ("row_modes", "got 4", "sequence of positive integers")),
    Case("modes-empty", lambda: TeRASpec((), (4,)), ValueError, ("row_modes", "at least one mode", "empty")),
    Case("mode-zero", lambda: TeRASpec((4, 0), (4, 4)), ValueError, ("row_modes[1]", "got 0")),
    Case("mode-float", lambda: TeRASpec((4, 4.0), (4, 4)), ValueError, ("row_modes[1]", "4.0")),
    Case("rank-above-mode", lambda: TeRASpec((4, 4), (4, 4), (5, 4, 4, 4)), ValueError, ("ranks[0]=5", "1 <= r_n <= k_n")),
    Case("d-out-above-modes", lambda: TeRASpec((4, 4), (4, 4), d_out=17), ValueError, ("d_out=17", "multiply to 16")),
    Case("diag-list", lambda: TeRASpec((4,), (4,), diag=["rank"]), ValueError, ("['rank']", "'rank', 'mode', 'identity'")),
    Case("dict-not-a-dict", lambda: TeRASpec.from_dict([1, 2]), ValueError, ("[1, 2]", "'row_modes' and 'col_modes'")),
    Case("dict-missing-cols", lambda: TeRASpec.from_dict({"row_modes": [4]}), ValueError, ("col_modes",)),
    Case("dict-int-modes", lambda: TeRASpec.from_dict({"row_modes": 4, "col_modes": [4]}), ValueError, ("row_modes", "got 4", "sequence")),
    Case("dict-none-modes", lambda: TeRASpec.from_dict({"row_modes": None, "col_modes": [4]}), ValueError, ("row_modes", "none", "sequence")),
    Case("dict-int-ranks", lambda: TeRASpec.from_dict({"row_modes": [4], "col_modes": [4], "ranks": 2}), ValueError, ("ranks", "got 2", "sequence")),
    Case("dict-typo-key", lambda: TeRASpec.from_dict({"row_modes": [4], "col_modes": [4], "rnaks": [2, 2]}), ValueError, ("'rnaks'", "expected only")),
    # --- factorize ----------------------------------------------------------------------------
    Case("factorize-float", lambda: factorize.balanced_factorization(4.0, 2), ValueError, ("n", "4.0", "positive integer")),
    Case("factorize-padding-negative", lambda: factorize.padded_factorization(61, 2, max_padding=-1), ValueError, ("max_padding", "-1")),
    # --- tensorize / matricize --------------------------------------------------------------
    Case("tensorize-none", lambda: tt.tensorize(S, None), TypeError, ("w", "nonetype", "shape (16, 16)")),
    Case("tensorize-shape", lambda: tt.tensorize(S, np.ones((16, 15))), ValueError, ("(16, 16)", "(16, 15)")),
    Case("tensorize-not-spec", lambda: tt.tensorize("spec", np.ones((16, 16))), TypeError, ("tensorize", "teraspec", "str")),
    Case("tensorize-strings", lambda: tt.tensorize(S, np.full((16, 16), "a")), TypeError, ("w", "numbers", "<u1")),
    Case("matricize-shape", lambda: tt.matricize(S, np.ones((16, 16))), ValueError, ("(4, 4, 4, 4)", "(16, 16)")),
    # --- random_factors / init_scales -------------------------------------------------------
    Case("seed-negative", lambda: random_factors(S, -1), ValueError, ("seed", "-1", ">= 0")),
    Case("seed-float", lambda: random_factors(S, 1.5), ValueError, ("seed", "1.5")),
    Case("seed-none", lambda: random_factors(S, None), ValueError, ("seed", "none")),
    Case("factors-not-spec", lambda: random_factors("S", 0), TypeError, ("random_factors", "teraspec", "'s'")),
    Case("factor-init-unknown", lambda: random_factors(S, 0, init="xavier"), ValueError, ("'xavier'", "orthogonal")),
    Case("scale-init-unknown", lambda: init_scales(S, "zeros"), ValueError, ("'zeros'", "zero_start")),
    Case("zero-mode-out-of-range", lambda: init_scales(S, zero_mode=7), ValueError, ("zero_mode", "7", "[0, 4)")),
    Case("zero-mode-bool", lambda: init_scales(S, zero_mode=True), ValueError, ("zero_mode", "true")),
    Case("random-scales-no-seed", lambda: init_scales(S, "random"), ValueError, ("random", "seed")),
    Case("scales-like-list", lambda: init_scales(S, like=[1.0]), TypeError, ("like", "list", "numpy array")),
    Case("scales-not-spec", lambda: init_scales(None), TypeError, ("init_scales", "teraspec", "nonetype")),
    # --- delta_weight / scaled_factors ------------------------------------------------------
    Case("alpha-string", lambda: tt.delta_weight(S, F, L, alpha="2"), TypeError, ("alpha", "'2'", "real number")),
    Case("alpha-nan", lambda: tt.delta_weight(S, F, L, alpha=float("nan")), ValueError, ("alpha", "nan", "finite")),
    Case("alpha-inf", lambda: tt.delta_weight(S, F, L, alpha=float("inf")), ValueError, ("alpha", "inf", "finite")),
    Case("alpha-none", lambda: tt.delta_weight(S, F, L, alpha=None), TypeError, ("alpha", "none", "real number")),
    Case("alpha-array", lambda: tt.delta_weight(S, F, L, alpha=np.ones(3)), TypeError, ("alpha", "ndarray", "real number")),
    Case("alpha-bool", lambda: scaled_factors(S, F, L, alpha=True), TypeError, ("alpha", "true", "real number")),
    Case("scales-none", lambda: tt.delta_weight(S, F, None), TypeError, ("scales", "nonetype", "4 vectors")),
    Case("scales-stacked-array", lambda: tt.delta_weight(S, F, np.ones((4, 4))), TypeError, ("scales", "ndarray", "4 vectors")),
    Case("scales-too-few", lambda: tt.delta_weight(S, F, L[:2]), ValueError, ("scales", "2 vectors", "4 vectors")),
    Case("scales-wrong-length", lambda: tt.delta_weight(S, F, [np.ones(3)] * 4), ValueError, ("scales[0]", "(3,)", "(4,)")),
    Case("scales-column", lambda: tt.delta_weight(S, F, [np.ones((4, 1))] * 4), ValueError, ("scales[0]", "(4, 1)", "(4,)")),
    Case("scales-string", lambda: tt.delta_weight(S, F, ["abcd"] * 4), TypeError, ("scales[0]", "str", "shape (4,)")),
    Case("scales-nan", lambda: tt.delta_weight(S, F, NAN_L), ValueError, ("scales[0]", "nan", "finite")),
    Case("scales-inf", lambda: tt.delta_weight(S, F, INF_L), ValueError, ("scales[3]", "inf", "finite")),
    Case("factors-none", lambda: tt.delta_weight(S, None, L), TypeError, ("factors", "nonetype", "terafactors")),
    Case("factors-tuple", lambda: tt.delta_weight(S, (F.core, F.factors), L), TypeError, ("factors", "tuple", "terafactors")),
    Case("factors-other-spec", lambda: tt.delta_weight(S, random_factors(TeRASpec((2, 2), (4, 4)), 0), L), ValueError, ("core", "(2, 2, 4, 4)", "(4, 4, 4, 4)")),
    Case("delta-weight-not-spec", lambda: tt.delta_weight(None, F, L), TypeError, ("delta_weight", "teraspec", "nonetype")),
    # --- apply ------------------------------------------------------------------------------
    Case("apply-x-none", lambda: tt.apply(S, F, L, None), TypeError, ("x", "nonetype", "(..., 16)")),
    Case("apply-x-string", lambda: tt.apply(S, F, L, "x"), TypeError, ("x", "str", "(..., 16)")),
    Case("apply-x-ragged", lambda: tt.apply(S, F, L, [[1.0] * 16, [1.0]]), TypeError, ("x", "list", "(..., 16)")),
    Case("apply-x-strings", lambda: tt.apply(S, F, L, np.full((2, 16), "a")), TypeError, ("x", "numbers", "<u1")),
    Case("apply-x-shape", lambda: tt.apply(S, F, L, np.ones((3, 15))), ValueError, ("(..., 16)", "(3, 15)")),
    Case("apply-x-scalar", lambda: tt.apply(S, F, L, np.float64(1.0)), ValueError, ("(..., 16)", "got ()")),
    Case("apply-alpha-string", lambda: tt.apply(S, F, L, X, alpha="2"), TypeError, ("alpha", "'2'", "real number")),
    Case("apply-alpha-nan", lambda: tt.apply(S, F, L, X, alpha=float("nan")), ValueError, ("alpha", "nan", "finite")),
    Case("apply-scales-nan", lambda: tt.apply(S, F, NAN_L, X), ValueError, ("scales[0]", "nan", "finite")),
    Case("apply-strategy", lambda: tt.apply(S, F, L, X, strategy="fast"), ValueError, ("'fast'", "'auto', 'materialize', 'factored'")),
    Case("apply-strategy-list", lambda: tt.apply(S, F, L, X, strategy=["auto"]), ValueError, ("['auto']", "'auto'")),
    Case("apply-not-spec", lambda: tt.apply("S", F, L, X), TypeError, ("apply", "teraspec", "str")),
    Case("apply-factors-none", lambda: tt.apply(S, None, L, X), TypeError, ("factors", "nonetype", "terafactors")),
    # --- plan, layer_plan, cost models ------------------------------------------------------
    Case("plan-dtype-int8", lambda: tt.plan(S, 8, dtype="int8"), ValueError, ("'int8'", "floating dtype", "float32")),
    Case("plan-backend-mxnet", lambda: tt.plan(S, 8, backend="mxnet"), ValueError, ("'mxnet'", "'torch', 'numpy'")),
    Case("plan-device-tpu", lambda: tt.plan(S, 8, device="tpu"), ValueError, ("'tpu'", "'cpu', 'cuda'")),
    Case("plan-device-index", lambda: tt.plan(S, 8, device="cuda:x"), ValueError, ("'cuda:x'", ":index")),
    Case("plan-numpy-on-cuda", lambda: tt.plan(S, 8, backend="numpy", device="cuda"), ValueError, ("'cuda'", "('cpu',)", "numpy")),
    Case("plan-numpy-bfloat16", lambda: tt.plan(S, 8, backend="numpy", dtype="bfloat16"), ValueError, ("'bfloat16'", "numpy", "float64")),
    Case("plan-tokens-zero", lambda: tt.plan(S, 0), ValueError, ("n_tokens", "positive integer", "got 0")),
    Case("plan-tokens-float", lambda: tt.plan(S, 8.0), ValueError, ("n_tokens", "8.0")),
    Case("plan-tokens-bool", lambda: tt.plan(S, True), ValueError, ("n_tokens", "true")),
    Case("plan-not-spec", lambda: tt.plan((4, 4), 8), TypeError, ("plan", "teraspec", "tuple")),
    Case("plan-model-string", lambda: tt.plan(S, 8, model="fast"), ValueError, ("model", "'fast'", "costmodel")),
    Case("layer-plan-training-none", lambda: layer_plan(S, 8, training=None), ValueError, ("training", "none", "true or false")),
    Case("layer-plan-device-tpu", lambda: layer_plan(S, 8, training=False, device="tpu"), ValueError, ("'tpu'", "'cuda'")),
    Case("cost-model-negative", lambda: CostModel(-1, 9, 1e9, 0), ValueError, ("peak_flops", "-1", "> 0")),
    Case("cost-model-string", lambda: CostModel(1e9, 9, "fast", 0), ValueError, ("bandwidth", "'fast'", "> 0")),
    Case("cost-model-nan", lambda: CostModel(1e9, float("nan"), 1e9, 0), ValueError, ("s_half", "nan", "finite")),
    Case("set-cost-model-string", lambda: costmodel.set_cost_model("fast"), ValueError, ("'fast'", "costmodel")),
    Case("calibrate-int8", lambda: calibrate(backend="numpy", dtype="int8", install=False), ValueError, ("'int8'", "floating dtype")),
    Case("calibrate-device-tpu", lambda: calibrate(device="tpu", install=False), ValueError, ("'tpu'", "'cuda'")),
    # --- theoretical rank, rank measures, spectrum ------------------------------------------
    Case("theoretical-rank-nan", lambda: tt.theoretical_rank(S, NAN_L), ValueError, ("scales[0]", "nan", "finite")),
    Case("theoretical-rank-none", lambda: tt.theoretical_rank(S, None), TypeError, ("scales", "nonetype", "4 vectors")),
    Case("theoretical-rank-not-spec", lambda: tt.theoretical_rank(None, L), TypeError, ("theoretical_rank", "teraspec")),
    Case("numerical-rank-3d", lambda: rank.numerical_rank(np.ones((2, 2, 2))), ValueError, ("2-d matrix", "(2, 2, 2)")),
    Case("numerical-rank-string", lambda: rank.numerical_rank("abc"), TypeError, ("'abc'", "shape (m, n)")),
    Case("numerical-rank-none", lambda: rank.numerical_rank(None), TypeError, ("nonetype", "shape (m, n)")),
    Case("numerical-rank-nan", lambda: rank.numerical_rank(np.full((2, 2), np.nan)), ValueError, ("nan or inf", "(2, 2)")),
    Case("numerical-rank-rtol", lambda: rank.numerical_rank(np.eye(2), rtol=-1), ValueError, ("rtol", "-1", "non-negative")),
    Case("effective-rank-ragged", lambda: rank.effective_rank([[1, 2], [3]]), TypeError, ("list", "shape (m, n)")),
    Case("energy-rank-fraction", lambda: rank.energy_rank(np.eye(2), 1.5), ValueError, ("1.5", "(0, 1]")),
    Case("summary-shape-string", lambda: rank.summarize_singular_values(np.ones(2), "ab"), ValueError, ("'ab'", "(m, n)")),
    Case("summary-shape-negative", lambda: rank.summarize_singular_values(np.ones(1), (-1, 2)), ValueError, ("(-1, 2)", ">= 0")),
    Case("summary-too-many", lambda: rank.summarize_singular_values(np.ones(3), (2, 2)), ValueError, ("3 singular values", "at most 2")),
    Case("summary-negative-sv", lambda: rank.summarize_singular_values(np.array([-1.0]), (2, 2)), ValueError, ("non-negative", "-1.0")),
    Case("summary-2d-sv", lambda: rank.summarize_singular_values(np.ones((2, 2)), (2, 2)), ValueError, ("1-d", "(2, 2)")),
    Case("threshold-shape-triple", lambda: rank.rank_threshold(np.ones(2), (1, 2, 3)), ValueError, ("(1, 2, 3)", "(m, n)")),
    Case("default-rtol-shape-string", lambda: rank.default_rtol("ab", "float32"), ValueError, ("'ab'", "(m, n)")),
    Case("condition-rtol-string", lambda: rank.condition_number(np.eye(2), rtol="x"), ValueError, ("rtol", "'x'", "non-negative")),
    Case("condition-nonzero-string", lambda: rank.condition_number(np.eye(2), nonzero="yes"), ValueError, ("nonzero", "'yes'", "true or false")),
    Case("threshold-sv-string", lambda: rank.rank_threshold("ab", (2, 2)), TypeError, ("singular values", "'ab'", "shape (k,)")),
    Case("dtype-eps-unknown", lambda: rank.dtype_eps("foo"), ValueError, ("'foo'", "float dtype")),
    Case("multilinear-modes-zero", lambda: rank.multilinear_ranks(np.ones(8), modes=(0, 8)), ValueError, ("(0, 8)", "positive integers")),
    Case("multilinear-modes-product", lambda: rank.multilinear_ranks(np.ones(8), modes=(3, 3)), ValueError, ("(3, 3)", "9", "8 entries")),
    Case("multilinear-spec-string", lambda: rank.multilinear_ranks(np.ones(256), spec="S"), TypeError, ("multilinear_ranks", "teraspec")),
    Case("multilinear-none", lambda: rank.multilinear_ranks(None), TypeError, ("nonetype", "at least one dimension")),
    Case("spectrum-nan", lambda: tt.singular_values(S, F, NAN_L), ValueError, ("scales[0]", "nan", "finite")),
    Case("spectrum-alpha-string", lambda: tt.singular_values(S, F, L, alpha="2"), TypeError, ("alpha", "'2'")),
    Case("conditioning-factors-none", lambda: tt.conditioning(S, None, L), TypeError, ("factors", "nonetype", "terafactors")),
    Case("conditioning-inf", lambda: tt.conditioning(S, F, INF_L), ValueError, ("scales[3]", "inf", "finite")),
    Case("multilinear-theory-nan", lambda: spectrum.theoretical_multilinear_ranks(S, NAN_L), ValueError, ("scales[0]", "nan")),
    Case("conditioning-include-core", lambda: tt.conditioning(S, F, L, include_core="yes"), ValueError, ("include_core", "'yes'")),
    Case("mode-product-matrices-none", lambda: modeproduct.multi_mode_product(np.ones((2, 2)), None), TypeError, ("matrices", "nonetype", "one matrix")),
    Case("mode-product-matrix-string", lambda: modeproduct.multi_mode_product(np.ones((2, 2)), ["ab", None]), TypeError, ("matrices[0]", "'ab'", "(k, r)")),
    Case("mode-product-core-scalar", lambda: modeproduct.multi_mode_product(np.float64(1), []), ValueError, ("core", "0-d", "at least one mode")),
    Case("factors-core-none", lambda: tt.delta_weight(S, tt.TeRAFactors(None, F.factors), L), TypeError, ("core", "nonetype", "numpy array")),
    Case("as-torch-dtype-name", lambda: F.as_torch(dtype="float33"), ValueError, ("'float33'", "torch dtype")),
    Case("calibrate-install-string", lambda: calibrate(backend="numpy", dtype="float64", install="no"), ValueError, ("install", "'no'", "true or false")),
    Case("prefix-kron-d-zero", lambda: spectrum.prefix_kron_r([np.eye(2)], 0), ValueError, ("d must be in [1, 2]", "got 0")),
    # --- accounting -------------------------------------------------------------------------
    Case("layer-cost-method", lambda: accounting.layer_cost("dora", 4, 4, r=2), ValueError, ("'dora'", "'lora'")),
    Case("layer-cost-rank-none", lambda: accounting.layer_cost("lora", 4, 4), ValueError, ("lora rank r", "none", "positive integer")),
    Case("layer-cost-rank-float", lambda: accounting.layer_cost("vera", 4, 4, r=2.0), ValueError, ("vera rank r", "2.0")),
    Case("layer-cost-d-string", lambda: accounting.layer_cost("lora", "4", 4, r=2), ValueError, ("d_out", "'4'")),
    Case("layer-cost-spec-string", lambda: accounting.layer_cost("tera", 16, 16, spec="S"), ValueError, ("teraspec", "(16, 16)", "'s'")),
    Case("layer-cost-spec-shape", lambda: accounting.layer_cost("tera", 4, 4, spec=S), ValueError, ("(4, 4)", "16×16")),
    Case("totals-empty", lambda: accounting.method_totals("lora", [], r=2), ValueError, ("at least one", "(d_out, d_in)")),
    Case("totals-short-shape", lambda: accounting.method_totals("lora", [(4,)], r=2), ValueError, ("shapes[0]", "(4,)", "pair")),
    Case("totals-string-shapes", lambda: accounting.method_totals("lora", "44", r=2), ValueError, ("'44'", "(d_out, d_in) pairs")),
    Case("totals-int-shapes", lambda: accounting.method_totals("lora", 4, r=2), ValueError, ("got 4", "(d_out, d_in) pairs")),
    Case("totals-negative-size", lambda: accounting.method_totals("tera", [(-1, 16)]), ValueError, ("shapes[0][0]", "-1")),
    Case("totals-spec-count", lambda: accounting.method_totals("tera", [(16, 16)], specs=[S, S]), ValueError, ("2 specs", "1 layer")),
    Case("total-params-short-shape", lambda: accounting.total_params([(4,)]), ValueError, ("shapes[0]", "(4,)", "pair")),
]


@params(CASES)
def test_core_bad_input_teaches(case):
    assert_teaches(case)


def test_table_is_large_enough():
    assert len(CASES) >= 40


@pytest.mark.parametrize(
    "call",
    [
        lambda: TeRASpec.from_shape(64, 64, order=4, ranks=np.float32(0.5)),
        lambda: TeRASpec.from_shape(64, 64, order=4, ranks=np.float64(0.5)),
        lambda: TeRASpec.from_shape(64, 64, order=4, ranks=np.int64(4)),
        lambda: TeRASpec(np.array([4, 4]), (4, 4)),
        lambda: tt.plan(S, np.int64(8)),
        lambda: tt.plan(S, 8, device="cuda:1", dtype=np.float32),
    ],
    ids=["ranks-np-float32", "ranks-np-float64", "ranks-np-int", "modes-ndarray", "tokens-np-int", "dtype-object"],
)
def test_numpy_scalars_and_arrays_are_accepted(call):
    """numpy scalars stand for Python numbers wherever a number is expected (they used to raise)."""
    call()


def test_lists_are_arrays():
    """Python lists for x and λ give the same result as numpy arrays (they used to raise AttributeError)."""
    want = tt.apply(S, F, L, X)
    np.testing.assert_allclose(tt.apply(S, F, [list(s) for s in L], X.tolist()), want)
    np.testing.assert_allclose(tt.delta_weight(S, F, [list(s) for s in L]), tt.delta_weight(S, F, L))
    assert tt.theoretical_rank(S, [list(s) for s in L]) == tt.theoretical_rank(S, L)


@pytest.mark.parametrize("dtype", [np.int64, np.bool_])
def test_integer_scales_do_not_round_the_factors(dtype):
    """Integer or bool λ used to pull the frozen factors down to their dtype: a silent wrong ΔW."""
    ones = [np.ones(4, dtype=dtype)] * 4
    exact = tt.delta_weight(S, F, [np.ones(4)] * 4)
    np.testing.assert_allclose(tt.delta_weight(S, F, ones), exact, rtol=1e-12)
    a = scaled_factors(S, F, ones)
    assert a[0].dtype == np.float64
