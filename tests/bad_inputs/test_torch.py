"""Bad inputs to the plain-torch API (TeRALayersConfig, add_tera, TeRALinear, FactorBank, tera_linear,
merge): every error names the offending value and what was expected."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

from tera_tn import TeRASpec  # noqa: E402
from tera_tn.torch import TeRALayersConfig, TeRALinear, add_tera, merge_and_unload  # noqa: E402
from tera_tn.torch.autograd import tera_linear  # noqa: E402
from tera_tn.torch.bank import FactorBank  # noqa: E402
from tera_tn.torch.planning import layer_plan  # noqa: E402

from .teach import Case, assert_teaches, params  # noqa: E402

SPEC = TeRASpec((4, 4), (4, 4))


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 16))


def _adapted(**cfg):
    model = _model()
    add_tera(model, TeRALayersConfig(order=4, scale_init="random", **cfg))
    return model


def _layer(**kw):
    return TeRALinear(nn.Linear(16, 16), SPEC, **kw)


def _add_twice():
    model = _adapted()
    add_tera(model, TeRALayersConfig(order=4))


def _quantized_model():
    model = _model()
    model[2].weight = nn.Parameter(torch.zeros(16, 16, dtype=torch.int8), requires_grad=False)
    return model


def _merged_twice():
    layer = _layer()
    layer.merge()
    layer.merge()


def _nan_lambda_merge():
    layer = _layer(scale_init="random")
    layer.scales()[2].data[1] = float("nan")
    layer.merge()


def _nan_model_merge():
    model = _adapted()
    model[2].scales()[0].data[:] = float("inf")
    merge_and_unload(model)


def _nan_forward():
    layer = _layer(scale_init="random", check_finite=True)
    layer.scales()[3].data[0] = float("nan")
    layer(torch.ones(2, 16))


def _peft_config():
    pytest.importorskip("peft")
    from tera_tn.peft import TeraConfig

    return TeraConfig(target_modules=["0"], order=4)


def _functional(strategy="materialize", x=None):
    bank = FactorBank()
    bank.add(SPEC)
    lams = [torch.ones(s) for s in SPEC.scale_sizes]
    return tera_linear(torch.ones(2, 16) if x is None else x, None, None, bank.network(SPEC), lams, 1.0, strategy)


CASES = [
    # --- TeRALayersConfig ---------------------------------------------------------------------------
    Case("config-order-zero", lambda: TeRALayersConfig(order=0), ValueError, ("order", "0", "positive integer")),
    Case("config-order-str", lambda: TeRALayersConfig(order="6"), ValueError, ("order", "'6'", "positive integer")),
    Case("config-order-triple", lambda: TeRALayersConfig(order=(2, 2, 2)), ValueError, ("order", "(2, 2, 2)", "row_order, col_order")),
    Case("config-ranks-word", lambda: TeRALayersConfig(ranks="half"), ValueError, ("ranks", "'half'", "'full'", "fraction")),
    Case("config-ranks-fraction", lambda: TeRALayersConfig(ranks=1.5), ValueError, ("ranks", "1.5", "(0, 1]")),
    Case("config-ranks-negative-mode", lambda: TeRALayersConfig(ranks=(2, -1)), ValueError, ("ranks", "-1", "positive integer")),
    Case("config-diag", lambda: TeRALayersConfig(diag="row"), ValueError, ("diag", "'row'", "'rank'", "'mode'")),
    Case("config-factor-init", lambda: TeRALayersConfig(factor_init="he"), ValueError, ("factor_init", "'he'", "orthogonal")),
    Case("config-scale-init", lambda: TeRALayersConfig(scale_init="zeros"), ValueError, ("scale_init", "'zeros'", "zero_start")),
    Case("config-strategy", lambda: TeRALayersConfig(strategy="einsum"), ValueError, ("strategy", "'einsum'", "factored")),
    Case("config-factor-dtype", lambda: TeRALayersConfig(factor_dtype="float16"), ValueError, ("factor_dtype", "'float16'", "float32")),
    Case("config-seed-negative", lambda: TeRALayersConfig(seed=-1), ValueError, ("seed", "-1", ">= 0")),
    Case("config-seed-str", lambda: TeRALayersConfig(seed="0"), ValueError, ("seed", "'0'", "integer")),
    Case("config-alpha-nan", lambda: TeRALayersConfig(alpha=float("nan")), ValueError, ("alpha", "nan", "finite")),
    Case("config-alpha-str", lambda: TeRALayersConfig(alpha="2"), ValueError, ("alpha", "'2'", "finite number")),
    Case("config-dropout-one", lambda: TeRALayersConfig(dropout=1.0), ValueError, ("dropout", "1.0", "[0, 1)")),
    Case("config-zero-mode", lambda: TeRALayersConfig(zero_mode=-2), ValueError, ("zero_mode", "-2", "non-negative")),
    Case("config-cache-flag", lambda: TeRALayersConfig(cache_delta="yes"), ValueError, ("cache_delta", "'yes'", "True or False")),
    Case("config-check-finite-flag", lambda: TeRALayersConfig(check_finite=1), ValueError, ("check_finite", "1", "True or False")),
    Case("config-targets-int", lambda: TeRALayersConfig(target_modules=5), ValueError, ("target_modules", "5", "regex", "list of names")),
    Case("config-targets-empty-name", lambda: TeRALayersConfig(target_modules=[""]), ValueError, ("target_modules", "['']", "non-empty")),
    Case("config-targets-bad-regex", lambda: TeRALayersConfig(target_modules="(q"), ValueError, ("target_modules", "'(q'", "regular expression")),
    Case("config-specs-value", lambda: TeRALayersConfig(specs={(16, 16): "4x4"}), ValueError, ("specs[(16, 16)]", "TeRASpec", "str")),
    Case("config-specs-shape", lambda: TeRALayersConfig(specs={(16, 8): SPEC}), ValueError, ("specs[(16, 8)]", "(16, 16)", "agree")),
    Case("config-used-with-peft", lambda: TeRALayersConfig().peft_type, AttributeError, ("peft_type", "add_tera", "tera_tn.peft.TeraConfig")),
    # --- add_tera --------------------------------------------------------------------------------
    Case("add-tera-dict-config", lambda: add_tera(_model(), {"order": 4}), TypeError, ("TeRALayersConfig", "dict")),
    Case("add-tera-peft-config", lambda: add_tera(_model(), _peft_config()), TypeError, ("TeraConfig", "get_peft_model", "tera_tn.torch.TeRALayersConfig")),
    Case("add-tera-no-match", lambda: add_tera(_model(), TeRALayersConfig(target_modules=["q_proj"])), ValueError, ("q_proj", "matched no nn.Linear", "0, 2")),
    Case("add-tera-twice", _add_twice, ValueError, ("already has TeRA layers", "once per model")),
    Case("add-tera-order-too-high", lambda: add_tera(_model(), TeRALayersConfig(order=12)), ValueError, ("16×16", "order=12", "lower order")),
    Case("add-tera-quantized", lambda: add_tera(_quantized_model(), TeRALayersConfig(order=4)), TypeError, ("'2'", "int8", "quantized")),
    # --- TeRALinear --------------------------------------------------------------------------------
    Case("layer-not-linear", lambda: TeRALinear(nn.Conv1d(2, 2, 1)), ValueError, ("nn.Linear", "Conv1d")),
    Case("layer-spec-str", lambda: TeRALinear(nn.Linear(16, 16), "4x4"), ValueError, ("spec", "TeRASpec", "str")),
    Case("layer-spec-shape", lambda: TeRALinear(nn.Linear(8, 16), SPEC), ValueError, ("16×16", "16×8")),
    Case("layer-alpha-inf", lambda: _layer(alpha=float("inf")), ValueError, ("alpha", "inf", "finite")),
    Case("layer-bank-type", lambda: _layer(bank="bank"), ValueError, ("bank", "FactorBank", "str")),
    Case("layer-bank-seed", lambda: _layer(bank=FactorBank(1), seed=2), ValueError, ("seed=2", "seed 1")),
    Case("layer-scale-init", lambda: _layer(scale_init="zeros"), ValueError, ("scale_init", "'zeros'", "zero_start")),
    Case("layer-zero-mode", lambda: _layer(zero_mode=7), ValueError, ("zero_mode", "7", "[0, 4)")),
    Case("layer-strategy", lambda: _layer(strategy="fused"), ValueError, ("strategy", "'fused'", "materialize")),
    Case("layer-check-finite-flag", lambda: _layer(check_finite="on"), ValueError, ("check_finite", "'on'", "True or False")),
    Case("forward-int64", lambda: _layer()(torch.ones(2, 16, dtype=torch.int64)), TypeError, ("torch.int64", "floating-point")),
    Case("forward-0d", lambda: _layer()(torch.tensor(1.0)), ValueError, ("(..., 16)", "shape ()")),
    Case("forward-numpy", lambda: _layer()(np.ones((2, 16), np.float32)), TypeError, ("numpy.ndarray", "torch.Tensor")),
    Case("forward-list", lambda: _layer()([[1.0] * 16]), TypeError, ("list", "torch.Tensor")),
    Case("forward-width", lambda: _layer()(torch.ones(2, 3, 15)), ValueError, ("(..., 16)", "(2, 3, 15)")),
    Case("forward-non-finite-lambda", _nan_forward, FloatingPointError, ("λ_3", "1 nan", "non-finite")),
    # --- merge ---------------------------------------------------------------------------------
    Case("merge-twice", _merged_twice, RuntimeError, ("already merged", "unmerge()")),
    Case("unmerge-unmerged", lambda: _layer().unmerge(), RuntimeError, ("not merged",)),
    Case("merge-nan-lambda", _nan_lambda_merge, ValueError, ("refusing to merge", "λ_2", "1 nan", "not changed")),
    Case("merge-and-unload-inf", _nan_model_merge, ValueError, ("'2'", "λ_0", "inf", "no layer was merged")),
    Case("merge-and-unload-plain", lambda: merge_and_unload(_model()), ValueError, ("no TeRA layers", "TeRALinear")),
    # --- FactorBank, functional API, planner ------------------------------------------------------
    Case("bank-dtype", lambda: FactorBank(dtype="float16"), ValueError, ("dtype", "'float16'", "float64")),
    Case("bank-factor-init", lambda: FactorBank(factor_init="he"), ValueError, ("factor_init", "'he'", "gaussian")),
    Case("bank-add-tuple", lambda: FactorBank().add((4, 4)), ValueError, ("TeRASpec", "tuple")),
    Case("bank-unknown-spec", lambda: FactorBank().network(SPEC), KeyError, ("no factors", "16×16", "add(spec)")),
    Case("functional-strategy", lambda: _functional("fused"), ValueError, ("strategy", "'fused'", "factored")),
    Case("functional-width", lambda: _functional(x=torch.ones(2, 8)), ValueError, ("tera_linear", "(..., 16)", "(2, 8)")),
    Case("layer-plan-tokens", lambda: layer_plan(SPEC, 0, training=False), ValueError, ("n_tokens", "positive integer", "0")),
]


@params(CASES)
def test_torch_bad_input_teaches(case):
    assert_teaches(case)
