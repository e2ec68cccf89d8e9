"""Bad inputs to the PEFT API (TeraConfig, get_peft_model, TeraModel, the tuner layer, saved
adapter files loaded by ``PeftModel.from_pretrained`` and ``AdapterStore.add``, ``adapter_names``
and generation arguments): every error names the offending value and what was expected."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

torch = pytest.importorskip("torch")
pytest.importorskip("peft")
pytest.importorskip("transformers")
from peft import PeftModel, get_peft_model  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402
from torch import nn  # noqa: E402

from tera_tn.peft import AdapterStore, TeraAdapterMismatch, TeraConfig, TeraModel, save_adapter  # noqa: E402
from tera_tn.torch import TeRALayersConfig  # noqa: E402

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
    _peft().add_adapter("other", TeRALayersConfig(target_modules=["lin"]))


# --- saved adapters, tampered -------------------------------------------------------------------------

#: adapter folders written once per module by the ``files`` fixture
F: dict[str, Path] = {}
LAM = "base_model.model.lin.tera_lambda"  # the one λ tensor of a saved _peft() adapter


@pytest.fixture(scope="module", autouse=True)
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("peft-files")
    good = save_adapter(_peft(), root / "good")
    tensors = load_file(str(good / "adapter_model.safetensors"))
    lam = tensors[LAM]

    def variant(name, **change):
        folder = root / name
        folder.mkdir()
        (folder / "adapter_config.json").write_bytes((good / "adapter_config.json").read_bytes())
        edited = {k: v for k, v in tensors.items() if change.get(k, 0) is not None}
        edited.update({k: v for k, v in change.items() if v is not None})
        save_file(edited, str(folder / "adapter_model.safetensors"))
        F[name] = folder

    variant("missing", **{LAM: None})
    variant("extra", **{"base_model.model.emb.tera_lambda": lam.clone()})
    variant("long", **{LAM: torch.cat([lam, torch.ones(3)])})
    variant("matrix", **{LAM: lam.reshape(1, -1)})
    variant("int", **{LAM: lam.round().to(torch.int64)})
    variant("absurd", **{LAM: torch.full_like(lam, 1e30)})
    variant("huge", **{LAM: lam * 1e4})
    variant("truncated")
    weights = F["truncated"] / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-16])
    F["good"] = good
    yield


def _load(name):
    return PeftModel.from_pretrained(_Net(), F[name])


def _store_add(name):
    AdapterStore(_peft().eval()).add("u", path=F[name])


def _add_stored_name():
    model = _peft().eval()
    AdapterStore(model).add("u", adapter="default")
    model.add_adapter("u", TeraConfig(target_modules=["lin"], order=4))


def _mixed(adapter_names):
    return lambda: _peft().eval()(torch.ones(2, 16), adapter_names=adapter_names)


# --- generation ---------------------------------------------------------------------------------------


def _generate(adapter_names, rows=3, **kw):
    def run():
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(0)
        base = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                            num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32))
        model = get_peft_model(base, TeraConfig(target_modules=["q_proj"], order=2)).eval()
        tokens = torch.ones(rows, 4, dtype=torch.long)
        with torch.no_grad():
            model.generate(tokens, attention_mask=torch.ones_like(tokens), adapter_names=adapter_names,
                           max_new_tokens=2, pad_token_id=0, **kw)
    return run


def _generation_config(**kw):
    from transformers import GenerationConfig

    return GenerationConfig(max_new_tokens=2, pad_token_id=0, **kw)


FILES = [
    Case("peft-file-missing-lambda", lambda: _load("missing"), TeraAdapterMismatch, (LAM, "missing from the checkpoint", "initial λ")),
    Case("peft-file-extra-lambda", lambda: _load("extra"), TeraAdapterMismatch, ("base_model.model.emb.tera_lambda", "no layer adapted", "one per adapted layer")),
    Case("peft-file-long-lambda", lambda: _load("long"), TeraAdapterMismatch, (LAM, "shape (19,)", "expected (16,)", "(4, 4, 4, 4)")),
    Case("peft-file-matrix-lambda", lambda: _load("matrix"), TeraAdapterMismatch, (LAM, "shape (1, 16)", "expected (16,)")),
    Case("peft-file-int-lambda", lambda: _load("int"), TeraAdapterMismatch, (LAM, "torch.int64", "floating-point")),
    Case("peft-file-absurd-lambda", lambda: _load("absurd"), TeraAdapterMismatch, (LAM, "absurd", "1e+30", "largest float32")),
    Case("peft-file-swamping-lambda", lambda: _load("huge"), UserWarning, (LAM, "‖ΔW‖/‖W0‖", "above 1000")),
    Case("peft-file-truncated", lambda: _load("truncated"), ValueError, ("truncated/adapter_model.safetensors", "not a readable safetensors file", "cut short")),
    Case("store-file-missing-lambda", lambda: _store_add("missing"), TeraAdapterMismatch, ("'u'", "no λ for 1 adapted layer", "lin")),
    Case("store-file-extra-lambda", lambda: _store_add("extra"), TeraAdapterMismatch, ("base_model.model.emb.tera_lambda", "no adapted layer of the store")),
    Case("store-file-long-lambda", lambda: _store_add("long"), TeraAdapterMismatch, ("lin.tera_lambda", "shape (19,)", "expected (16,)")),
    Case("store-file-absurd-lambda", lambda: _store_add("absurd"), TeraAdapterMismatch, ("lin.tera_lambda", "absurd", "largest float32")),
    Case("store-file-swamping-lambda", lambda: _store_add("huge"), UserWarning, ("'u'", "lin.tera_lambda", "above 1000")),
    Case("store-file-truncated", lambda: _store_add("truncated"), ValueError, ("truncated/adapter_model.safetensors", "not a readable safetensors file")),
    Case("store-name-then-model-adapter", _add_stored_name, ValueError, ("'u'", "AdapterStore", "store.remove('u')")),
    # --- adapter_names ----------------------------------------------------------------------------------
    Case("adapter-names-list-element", _mixed(["default", ["default"]]), TypeError, ("adapter_names[1]", "['default']", "list", "adapter name")),
    Case("adapter-names-none-element", _mixed([None, "default"]), TypeError, ("adapter_names[0]", "None", "NoneType", "'__base__'")),
    Case("adapter-names-tuple-element", _mixed(["default", ("default",)]), TypeError, ("adapter_names[1]", "('default',)", "tuple")),
    Case("adapter-names-dict", _mixed({"default": 2}), TypeError, ("adapter_names", "dict", "one per batch row")),
    Case("adapter-names-unknown", _mixed(["default", "typo"]), ValueError, ("typo", "'default'", "'__base__'")),
    # --- generation arguments ---------------------------------------------------------------------------
    Case("generate-beams-names-count", _generate(["default", "default"], num_beams=2), ValueError,
         ("2 names", "6 rows", "num_beams=2", "3 here")),
    Case("generate-config-beams-names-count", _generate(["default"] * 2, generation_config=_generation_config(num_beams=2)),
         ValueError, ("2 names", "6 rows", "num_beams=2")),
    Case("generate-sequences-names-count", _generate(["default"] * 4, num_return_sequences=2, do_sample=True), ValueError,
         ("4 names", "6 rows", "num_return_sequences=2")),
    Case("generate-list-element", _generate(["default", ["default"], "default"], num_beams=2), TypeError,
         ("adapter_names[1]", "['default']", "list")),
]

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
    Case("peft-torch-config", lambda: get_peft_model(_Net(), TeRALayersConfig(target_modules=["lin"])), AttributeError, ("TeRALayersConfig", "plain-torch", "tera_tn.peft.TeraConfig")),
    Case("peft-tuner-torch-config", lambda: TeraModel(_Net(), TeRALayersConfig(target_modules=["lin"]), "default"), TypeError, ("TeRALayersConfig", "add_tera", "tera_tn.peft.TeraConfig")),
    Case("peft-add-adapter-torch-config", _add_torch_config, AttributeError, ("TeRALayersConfig", "tera_tn.peft.TeraConfig")),
    # --- forward and merge -------------------------------------------------------------------------
    Case("peft-forward-numpy", lambda: _peft()(np.ones((2, 16), np.float32)), TypeError, ("numpy.ndarray", "torch.Tensor")),
    Case("peft-forward-int", lambda: _layer()(torch.ones(2, 16, dtype=torch.int32)), TypeError, ("torch.int32", "floating-point")),
    Case("peft-forward-width", lambda: _layer()(torch.ones(4, 12)), ValueError, ("(..., 16)", "(4, 12)")),
    Case("peft-forward-non-finite", _checked_forward, FloatingPointError, ("'default'", "1 inf", "non-finite")),
    Case("peft-safe-merge-nan", _safe_merge_nan, ValueError, ("nan", "default")),
]


@params(CASES + FILES)
def test_peft_bad_input_teaches(case):
    assert_teaches(case)
