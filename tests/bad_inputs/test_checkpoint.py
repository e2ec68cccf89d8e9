"""Bad checkpoints, torch (save_tera / load_tera / read_tera_metadata) and PEFT (save_adapter /
read_adapter_signature / PeftModel.from_pretrained): every error names the file and what was expected."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("safetensors")
from safetensors import safe_open  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402
from torch import nn  # noqa: E402

from tera_tn.torch import CheckpointMismatch, TeRALayersConfig, add_tera, load_tera, read_tera_metadata, save_tera  # noqa: E402

from .teach import Case, assert_teaches, params  # noqa: E402

try:
    import peft  # noqa: F401
except ImportError:  # pragma: no cover - the PEFT rows need the PEFT extra
    peft = None

#: the files of the table, written once per module by the ``files`` fixture
F: dict[str, Path] = {}


def _model(**cfg) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 32))
    add_tera(model, TeRALayersConfig(order=4, seed=7, scale_init="random", **cfg))
    return model


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(32, 32)

    def forward(self, x):
        return self.lin(x)


def _peft_model(**cfg):
    from peft import get_peft_model

    from tera_tn.peft import TeraConfig

    torch.manual_seed(0)
    return get_peft_model(_Net(), TeraConfig(target_modules=["lin"], order=2, seed=1, scale_init="random", **cfg))


def _from_pretrained(path, **cfg):
    from peft import PeftModel

    from tera_tn.peft import TeraConfig

    config = TeraConfig(target_modules=["lin"], order=2, seed=1, **cfg) if cfg else None
    return PeftModel.from_pretrained(_Net(), path, config=config)


def _rewrite(src: Path, dst: Path, *, tensors=None, meta=None) -> Path:
    """``src`` with some tensors or the metadata replaced (``meta``: the raw ``tera_tn`` string)."""
    data = load_file(str(src))
    with safe_open(str(src), framework="pt") as f:
        metadata = f.metadata()
    data.update(tensors or {})
    if meta is not None:
        metadata = {"tera_tn": meta}
    save_file(data, str(dst), metadata=metadata)
    return dst


def _signature_file(dst: Path, raw: bytes) -> Path:
    save_file({"base_model.tera_signature": torch.tensor(list(raw), dtype=torch.uint8)}, str(dst))
    return dst


@pytest.fixture(scope="module", autouse=True)
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("ckpt")
    good = save_tera(_model(), d / "good.safetensors")
    raw = good.read_bytes()
    meta = read_tera_metadata(good)
    lam = load_file(str(good))["0.lambda.1"]
    F.update(good=good, folder=d / "a-folder", missing=d / "missing.safetensors", truncated=d / "truncated.safetensors",
             noise=d / "noise.safetensors", empty=d / "empty.safetensors", foreign=d / "foreign.safetensors")
    F["folder"].mkdir()
    F["truncated"].write_bytes(raw[: len(raw) // 2])
    F["noise"].write_bytes(random.Random(0).randbytes(300))
    F["empty"].write_bytes(b"")
    save_file({"w": torch.zeros(2)}, str(F["foreign"]))
    no_seed = json.loads(json.dumps(meta))
    del no_seed["layers"]["2"]["seed"]
    bad_spec = json.loads(json.dumps(meta))
    bad_spec["layers"]["0"]["spec"] = "big"
    for name, text in {"not_json": "{not json", "json_list": "[1, 2]", "no_layers": json.dumps({"format": 1}),
                       "no_seed": json.dumps(no_seed), "format99": json.dumps({**meta, "format": 99}),
                       "bad_spec": json.dumps(bad_spec)}.items():
        F[name] = _rewrite(good, d / f"{name}.safetensors", meta=text)
    F["nan"] = _rewrite(good, d / "nan.safetensors", tensors={"0.lambda.1": torch.where(torch.arange(lam.numel()) < 3, math.nan, lam)})
    F["inf"] = _rewrite(good, d / "inf.safetensors", tensors={"0.lambda.1": torch.full_like(lam, math.inf)})
    F["int"] = _rewrite(good, d / "int.safetensors", tensors={"0.lambda.1": lam.to(torch.int64)})
    tensors = load_file(str(good))
    F["absurd"] = _rewrite(good, d / "absurd.safetensors",
                           tensors={k: torch.full_like(t, 1e30) for k, t in tensors.items() if k.startswith("0.lambda.")})
    F["f64"] = save_tera(_model(factor_dtype="float64"), d / "f64.safetensors")
    if peft is not None:
        from tera_tn.peft import save_adapter

        F["adapter"] = save_adapter(_peft_model(), d / "adapter")
        weights = F["adapter"] / "adapter_model.safetensors"
        nan_dir = d / "nan-adapter"
        nan_dir.mkdir()
        (nan_dir / "adapter_config.json").write_bytes((F["adapter"] / "adapter_config.json").read_bytes())
        tensors = load_file(str(weights))
        key = next(k for k in tensors if k.endswith("tera_lambda"))
        tensors[key] = torch.full_like(tensors[key], math.nan)
        save_file(tensors, str(nan_dir / "adapter_model.safetensors"))
        F["nan_adapter"] = nan_dir
        F["cut_adapter"] = d / "cut.safetensors"
        F["cut_adapter"].write_bytes(weights.read_bytes()[:200])
        F["bad_sig"] = _signature_file(d / "bad-sig.safetensors", b"\xff\xfe{")
        F["short_sig"] = _signature_file(d / "short-sig.safetensors", json.dumps({"format": 1}).encode())
    yield


TORCH = [
    Case("load-folder", lambda: load_tera(_model(), F["folder"]), IsADirectoryError, ("a-folder", "is a folder", ".safetensors file")),
    Case("load-missing", lambda: load_tera(_model(), F["missing"]), FileNotFoundError, ("missing.safetensors", "does not exist")),
    Case("load-truncated", lambda: load_tera(_model(), F["truncated"]), ValueError, ("truncated.safetensors", "not a readable safetensors file", "save_tera")),
    Case("load-noise", lambda: load_tera(_model(), F["noise"]), ValueError, ("noise.safetensors", "not a readable safetensors file")),
    Case("load-empty", lambda: load_tera(_model(), F["empty"]), ValueError, ("empty.safetensors", "not a readable safetensors file")),
    Case("load-foreign", lambda: load_tera(_model(), F["foreign"]), ValueError, ("foreign.safetensors", "not a tera_tn checkpoint")),
    Case("meta-not-json", lambda: load_tera(_model(), F["not_json"]), ValueError, ("not_json.safetensors", "not valid json")),
    Case("meta-json-list", lambda: load_tera(_model(), F["json_list"]), ValueError, ("json_list.safetensors", "json list, not an object")),
    Case("meta-no-layers", lambda: load_tera(_model(), F["no_layers"]), ValueError, ("no_layers.safetensors", "'layers' = none")),
    Case("meta-layer-lacks-seed", lambda: read_tera_metadata(F["no_seed"]), ValueError, ("no_seed.safetensors", "layer '2'", "['seed']")),
    Case("meta-spec-not-object", lambda: read_tera_metadata(F["bad_spec"]), ValueError, ("bad_spec.safetensors", "spec 'big'")),
    Case("meta-format-99", lambda: read_tera_metadata(F["format99"]), ValueError, ("format99.safetensors", "format 99", "reads format 1")),
    Case("meta-of-folder", lambda: read_tera_metadata(F["folder"]), IsADirectoryError, ("a-folder",)),
    Case("lambda-nan", lambda: load_tera(_model(), F["nan"]), ValueError, ("nan.safetensors", "0.lambda.1", "3 of", "nan or infinite", "finite")),
    Case("lambda-inf", lambda: load_tera(_model(), F["inf"]), ValueError, ("inf.safetensors", "0.lambda.1", "nan or infinite")),
    Case("lambda-int", lambda: load_tera(_model(), F["int"]), CheckpointMismatch, ("0.lambda.1 is torch.int64", "floating point")),
    Case("lambda-absurd", lambda: load_tera(_model(), F["absurd"]), ValueError, ("absurd.safetensors", "0.lambda.*", "absurd λ", "largest float32")),
    Case("other-factor-dtype", lambda: load_tera(_model(), F["f64"]), CheckpointMismatch, ("factor_dtype: checkpoint 'float64', model 'float32'",)),
    Case("model-without-tera", lambda: load_tera(nn.Linear(2, 2), F["good"]), CheckpointMismatch, ("layer '0' of the checkpoint", "not a module of the model")),
    Case("save-to-folder", lambda: save_tera(_model(), F["folder"]), IsADirectoryError, ("a-folder", "expects a file path")),
    Case("save-over-existing", lambda: save_tera(_model(), F["good"]), FileExistsError, ("good.safetensors", "overwrite=True")),
    Case("save-without-tera", lambda: save_tera(nn.Linear(2, 2), F["missing"]), ValueError, ("no tera layers", "add_tera")),
]

PEFT = [] if peft is None else [
    Case("signature-folder-without-adapter", lambda: _read_signature(F["folder"]), FileNotFoundError,
         ("a-folder", "adapter_model.safetensors")),
    Case("signature-missing", lambda: _read_signature(F["missing"]), FileNotFoundError, ("missing.safetensors", "does not exist")),
    Case("signature-truncated", lambda: _read_signature(F["cut_adapter"]), ValueError, ("cut.safetensors", "not a readable safetensors file")),
    Case("signature-absent", lambda: _read_signature(F["foreign"]), ValueError, ("foreign.safetensors", "no tera_signature")),
    Case("signature-not-json", lambda: _read_signature(F["bad_sig"]), ValueError, ("bad-sig.safetensors", "unreadable tera_signature")),
    Case("signature-lacks-keys", lambda: _read_signature(F["short_sig"]), ValueError, ("short-sig.safetensors", "lacks", "'seed'")),
    Case("peft-lambda-nan", lambda: _from_pretrained(F["nan_adapter"]), ValueError, ("tera_lambda", "nan or infinite", "finite")),
    Case("peft-other-factor-dtype", lambda: _from_pretrained(F["adapter"], factor_dtype="float64"), CheckpointMismatch,
         ("factor_dtype: checkpoint 'float32', model 'float64'",)),
    Case("save-adapter-to-file", lambda: _save_adapter(F["good"]), NotADirectoryError, ("good.safetensors", "expects a folder path")),
    Case("save-adapter-over-existing", lambda: _save_adapter(F["adapter"]), FileExistsError, ("adapter_model.safetensors", "overwrite=True")),
]


def _read_signature(path):
    from tera_tn.peft.io import read_adapter_signature

    return read_adapter_signature(path)


def _save_adapter(path):
    from tera_tn.peft import save_adapter

    return save_adapter(_peft_model(), path)


@params(TORCH + PEFT)
def test_bad_checkpoint_teaches(case):
    assert_teaches(case)


def test_a_refused_checkpoint_loads_nothing():
    model = _model()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.25)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for key in ("nan", "int", "f64", "truncated", "absurd"):
        with pytest.raises((ValueError, OSError)):
            load_tera(model, F[key])
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
