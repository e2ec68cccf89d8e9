"""Bad inputs to the PEFT API (TeraConfig, get_peft_model, TeraModel, the tuner layer): every
error names the offending value and what was expected."""

from __future__ import annotations

import os

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

torch = pytest.importorskip("torch")
pytest.importorskip("peft")
pytest.importorskip("transformers")
from peft import get_peft_model  # noqa: E402
from torch import nn  # noqa: E402

from tera_tn.peft import TeraConfig, TeraModel  # noqa: E402
from tera_tn.torch import TeRAConfig  # noqa: E402

from .teach import Case, assert_teaches, params  # noqa: E402


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear(16, 16)
        self.emb = nn.Embedding(10, 16)

    def forward(self, x):
        return self.lin(x)


def _peft(**cfg):
    return get_peft_model(_Net(), TeraConfig(target_modules=["lin"], order=4, scale_init="random", **cfg))


def _layer(**cfg):
    return _peft(**cfg).base_model.model.lin


def _quantized():
    net = _Net()
    net.lin.weight = nn.Parameter(net.lin.weight.detach().to(torch.uint8), requires_grad=False)
    return get_peft_model(net, TeraConfig(target_modules=["lin"], order=4))


def _safe_merge_nan():
    layer = _layer()
    layer.tera_lambda["default"].data[3] = float("nan")
    layer.merge(safe_merge=True)


def _checked_forward():
    layer = _layer(check_finite=True)
    layer.tera_lambda["default"].data[0] = float("inf")
    layer(torch.ones(2, 16))


def _add_torch_config():
    _peft().add_adapter("other", TeRAConfig(target_modules=["lin"]))


CASES = [
    # --- TeraConfig --------------------------------------------------------------------------------
    Case("peft-config-order", lambda: TeraConfig(order=0), ValueError, ("order", "0", "positive integer")),
    Case("peft-config-order-pair", lambda: TeraConfig(order=[2]), ValueError, ("order", "(2,)", "row_order, col_order")),
    Case("peft-config-ranks", lambda: TeraConfig(ranks="half"), ValueError, ("ranks", "'half'", "'full'")),
    Case("peft-config-diag", lambda: TeraConfig(diag="row"), ValueError, ("diag", "'row'", "'rank'")),
    Case("peft-config-bias", lambda: TeraConfig(bias="all"), ValueError, ("bias", "'all'", "'none'")),
    Case("peft-config-layers-pattern", lambda: TeraConfig(layers_pattern="layers"), ValueError, ("layers_pattern", "layers_to_transform")),
    Case("peft-config-specs-list", lambda: TeraConfig(specs=[1]), ValueError, ("specs", "list", "TeRASpec")),
    Case("peft-config-specs-value", lambda: TeraConfig(specs={"16x16": 3}), ValueError, ("specs['16x16']", "TeRASpec", "int")),
    Case("peft-config-dropout", lambda: TeraConfig(dropout=1.5), ValueError, ("dropout", "1.5", "[0, 1)")),
    Case("peft-config-strategy", lambda: TeraConfig(strategy="fused"), ValueError, ("strategy", "'fused'", "factored")),
    Case("peft-config-factor-dtype", lambda: TeraConfig(factor_dtype="float16"), ValueError, ("factor_dtype", "'float16'", "float32")),
    Case("peft-config-seed", lambda: TeraConfig(seed=-1), ValueError, ("seed", "-1", ">= 0")),
    Case("peft-config-alpha", lambda: TeraConfig(alpha=float("inf")), ValueError, ("alpha", "inf", "finite")),
    Case("peft-config-check-finite", lambda: TeraConfig(check_finite="no"), ValueError, ("check_finite", "'no'", "True or False")),
    Case("peft-config-scale-init", lambda: TeraConfig(scale_init="zeros"), ValueError, ("scale_init", "'zeros'", "zero_start")),
    # --- model creation ---------------------------------------------------------------------------
    Case("peft-embedding-target", lambda: get_peft_model(_Net(), TeraConfig(target_modules=["emb"], order=4)), TypeError, ("emb", "Embedding", "nn.Linear")),
    Case("peft-order-too-high", lambda: get_peft_model(_Net(), TeraConfig(target_modules=["lin"], order=40)), ValueError, ("lin", "16×16", "order=40", "lower order")),
    Case("peft-quantized-base", _quantized, TypeError, ("lin", "uint8", "quantized")),
    Case("peft-torch-config", lambda: get_peft_model(_Net(), TeRAConfig(target_modules=["lin"])), AttributeError, ("TeRAConfig", "plain-torch", "tera_tn.peft.TeraConfig")),
    Case("peft-tuner-torch-config", lambda: TeraModel(_Net(), TeRAConfig(target_modules=["lin"]), "default"), TypeError, ("TeRAConfig", "add_tera", "tera_tn.peft.TeraConfig")),
    Case("peft-add-adapter-torch-config", _add_torch_config, AttributeError, ("TeRAConfig", "tera_tn.peft.TeraConfig")),
    # --- forward and merge -------------------------------------------------------------------------
    Case("peft-forward-numpy", lambda: _peft()(np.ones((2, 16), np.float32)), TypeError, ("numpy.ndarray", "torch.Tensor")),
    Case("peft-forward-int", lambda: _layer()(torch.ones(2, 16, dtype=torch.int32)), TypeError, ("torch.int32", "floating-point")),
    Case("peft-forward-width", lambda: _layer()(torch.ones(4, 12)), ValueError, ("(..., 16)", "(4, 12)")),
    Case("peft-forward-non-finite", _checked_forward, FloatingPointError, ("'default'", "1 inf", "non-finite")),
    Case("peft-safe-merge-nan", _safe_merge_nan, ValueError, ("nan", "default")),
]


@params(CASES)
def test_peft_bad_input_teaches(case):
    assert_teaches(case)
