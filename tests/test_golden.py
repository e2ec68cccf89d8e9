"""Saved adapters keep their meaning: the factor recipe is pinned and recorded in every checkpoint.

* ``tests/data/golden_delta.npz`` holds, for a few small specs × every factor init × every diag
  placement, fixed λ and the float64 ΔW (seed 11, α = 1.5) that tera_tn computed from them when
  the file was made. It was generated once and is never regenerated: if this test fails, a
  default or the generator changed the ΔW of adapters users have saved. Such a change must bump
  ``tera_tn.core.factors.GENERATOR_VERSION`` (so old checkpoints are refused by name instead of
  loading into different factors), and only then may this file be remade.
* ``tests/data/legacy_*`` are adapters written by tera_tn before checkpoints recorded the recipe
  (plain torch ``save_tera`` and PEFT), with the float64 ΔW of each layer at saving time. They
  must still load, as generator version 1 with its core scale, and give the same ΔW.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from tera_tn import TeRASpec, delta_weight, random_factors
from tera_tn.core import factors as factors_module
from tera_tn.core.factors import CORE_SCALE, FACTOR_INITS, GENERATOR_VERSION
from tera_tn.core.spec import DIAG_PLACEMENTS
from tera_tn.torch import TeRALayersConfig, add_tera, load_tera, save_tera
from tera_tn.torch.checkpoint import CheckpointMismatch, read_tera_metadata

from tiny_models import TinyMLP
from tolerance import assert_matches_golden

DATA = Path(__file__).resolve().parent / "data"

_GOLDEN_SPECS = {
    # unpadded, order 3
    "small": dict(row_modes=(2, 3), col_modes=(4,)),
    # padded on both sides, reduced ranks, order 4 (full ranks for identity)
    "padded": dict(row_modes=(3, 3), col_modes=(2, 2), ranks=(2, 3, 2, 1), d_out=7, d_in=3),
    # order 5, padded columns
    "order5": dict(row_modes=(2, 2, 2), col_modes=(3, 2), d_in=5),
}
GOLDEN_CASES = [(name, init, diag) for name in _GOLDEN_SPECS for init in FACTOR_INITS for diag in DIAG_PLACEMENTS]


def golden_spec(name: str, diag: str) -> TeRASpec:
    kw = dict(_GOLDEN_SPECS[name])
    if diag == "identity":
        kw.pop("ranks", None)
    return TeRASpec(diag=diag, **kw)


def golden_key(name: str, init: str, diag: str) -> str:
    return f"{name}|{init}|{diag}"


@pytest.fixture(scope="module")
def golden():
    with np.load(DATA / "golden_delta.npz") as z:
        return {k: z[k] for k in z.files}


def test_golden_file_covers_every_recipe(golden):
    stored = {k.rsplit("|", 1)[0] for k in golden}
    assert stored == {golden_key(*c) for c in GOLDEN_CASES}


@pytest.mark.parametrize("name, init, diag", GOLDEN_CASES, ids=lambda v: str(v))
def test_golden_delta(golden, name, init, diag):
    spec = golden_spec(name, diag)
    key = golden_key(name, init, diag)
    lams = [golden[f"{key}|lambda{n}"] for n in range(spec.order)]
    want = golden[f"{key}|delta"]
    got = delta_weight(spec, random_factors(spec, 11, init=init), lams, 1.5)
    assert got.shape == want.shape == spec.shape
    assert_matches_golden(got, want, got.dtype, int(np.prod(spec.ranks)), f"{key}: ΔW")


# --- the recipe in checkpoints ------------------------------------------------------------------




def _torch_model() -> nn.Module:
    torch.manual_seed(0)
    m = TinyMLP()
    # The legacy adapters were written with rank-side diagonals, the default of their day.
    add_tera(m, TeRALayersConfig(order=3, diag="rank", alpha=2.0, seed=7, factor_dtype="float64"))
    return m


def test_legacy_torch_checkpoint_loads_as_generator_version_1():
    path = DATA / "legacy_torch.safetensors"
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        raw = json.loads(f.metadata()["tera_tn"])
    assert all("generator_version" not in info and "core_scale" not in info for info in raw["layers"].values())
    meta = read_tera_metadata(path)
    assert all(info["generator_version"] == 1 and info["core_scale"] == CORE_SCALE for info in meta["layers"].values())
    model = _torch_model()
    load_tera(model, path)
    with np.load(DATA / "legacy_torch_delta.npz") as want:
        for name in ("up", "down"):
            layer = getattr(model, name)
            assert_matches_golden(layer.delta_weight(torch.float64).numpy(), want[name], torch.float64,
                                  int(np.prod(layer.spec.ranks)), f"{name}: ΔW")


def test_torch_checkpoint_records_the_recipe_and_refuses_another(tmp_path, monkeypatch):
    model = _torch_model()
    path = save_tera(model, tmp_path / "a.safetensors")
    meta = read_tera_metadata(path)
    for info in meta["layers"].values():
        assert (info["factor_init"], info["core_scale"], info["generator_version"], info["factor_dtype"]) == (
            "orthogonal", CORE_SCALE, GENERATOR_VERSION, "float64")
    load_tera(_torch_model(), path)
    # A future generator: both this checkpoint and the legacy one name the field that differs.
    monkeypatch.setattr(factors_module, "GENERATOR_VERSION", GENERATOR_VERSION + 1)
    for p in (path, DATA / "legacy_torch.safetensors"):
        with pytest.raises(CheckpointMismatch, match="generator_version: checkpoint 1, model 2"):
            load_tera(_torch_model(), p)
    monkeypatch.undo()
    monkeypatch.setattr(factors_module, "CORE_SCALE", "normal/sqrt(prod ranks)")
    with pytest.raises(CheckpointMismatch, match="core_scale: checkpoint"):
        load_tera(_torch_model(), path)


def _rewrite_torch_meta(src: Path, dst: Path, **changes) -> Path:
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(src), framework="pt") as f:
        meta = json.loads(f.metadata()["tera_tn"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    for info in meta["layers"].values():
        info.update(changes)
    save_file(tensors, str(dst), metadata={"tera_tn": json.dumps(meta)})
    return dst


@pytest.mark.parametrize("field, value", [("generator_version", 7), ("core_scale", "unit"), ("factor_init", "gaussian")])
def test_torch_checkpoint_with_another_recipe_fails_naming_the_field(tmp_path, field, value):
    bad = _rewrite_torch_meta(DATA / "legacy_torch.safetensors", tmp_path / "b.safetensors", **{field: value})
    model = _torch_model()
    before = [lam.detach().clone() for lam in model.up.scales()]
    with pytest.raises(CheckpointMismatch, match=f"{field}: checkpoint {value!r}"):
        load_tera(model, bad)
    assert all(torch.equal(a, b) for a, b in zip(before, model.up.scales()))


# --- PEFT ----------------------------------------------------------------------------------------


def _peft_model():
    pytest.importorskip("peft")
    from peft import get_peft_model

    from tera_tn.peft import TeraConfig

    torch.manual_seed(0)
    cfg = TeraConfig(target_modules=["up", "down"], order=3, diag="rank", alpha=2.0, seed=7, factor_dtype="float64")
    return get_peft_model(TinyMLP(), cfg)


def _peft_load(path):
    from peft import PeftModel

    torch.manual_seed(0)
    return PeftModel.from_pretrained(TinyMLP(), str(path))


def test_legacy_peft_adapter_loads_as_generator_version_1():
    pytest.importorskip("peft")
    from tera_tn.peft.io import read_adapter_signature

    sig = read_adapter_signature(DATA / "legacy_peft")
    assert sig["generator_version"] == 1 and sig["core_scale"] == CORE_SCALE
    model = _peft_load(DATA / "legacy_peft")
    layers = dict(model.base_model.adapter_layers("default"))
    with np.load(DATA / "legacy_peft_delta.npz") as want:
        for name in ("up", "down"):
            layer = next(m for n, m in layers.items() if n.endswith(name))
            # PEFT returns ΔW in the base weight's dtype (float32 here): one float32 rounding of
            # the float64 network may land an ulp either side of the value recorded on another CPU
            got = layer.get_delta_weight("default")
            assert_matches_golden(got.double().numpy(), want[name], got.dtype,
                                  int(np.prod(layer.tera_spec["default"].ranks)), f"{name}: ΔW")


def _rewrite_signature(folder: Path, **changes) -> None:
    from safetensors.torch import load_file, save_file

    f = folder / "adapter_model.safetensors"
    tensors = load_file(str(f))
    key = next(k for k in tensors if k.endswith("tera_signature.default") or k.endswith("tera_signature"))
    sig = json.loads(bytes(tensors[key].tolist()).decode())
    sig.update(changes)
    tensors[key] = torch.tensor(list(json.dumps(sig, sort_keys=True).encode()), dtype=torch.uint8)
    save_file(tensors, str(f), metadata={"format": "pt"})


def test_peft_adapter_records_the_recipe_and_refuses_another(tmp_path, monkeypatch):
    from tera_tn.peft import TeraAdapterMismatch, save_adapter
    from tera_tn.peft.io import read_adapter_signature

    save_adapter(_peft_model(), tmp_path / "a")
    sig = read_adapter_signature(tmp_path / "a")
    assert (sig["factor_init"], sig["core_scale"], sig["generator_version"], sig["factor_dtype"]) == (
        "orthogonal", CORE_SCALE, GENERATOR_VERSION, "float64")
    _peft_load(tmp_path / "a")
    for field, value in (("generator_version", 9), ("core_scale", "unit")):
        bad = tmp_path / f"bad_{field}"
        shutil.copytree(tmp_path / "a", bad)
        _rewrite_signature(bad, **{field: value})
        with pytest.raises(TeraAdapterMismatch, match=f"{field}: checkpoint {value!r}"):
            _peft_load(bad)
    monkeypatch.setattr(factors_module, "GENERATOR_VERSION", GENERATOR_VERSION + 1)
    with pytest.raises(TeraAdapterMismatch, match="generator_version: checkpoint 1, model 2"):
        _peft_load(DATA / "legacy_peft")



def test_changing_a_default_never_changes_an_adapter_saved_earlier(tmp_path):
    """PEFT writes every config field, so the legacy adapter names its order and diag and loads to
    its committed ΔW (above) whatever the defaults are now. A hand-edited config without them would
    fall back to today's defaults; the saved signature holds every layer's spec, so that is refused
    by name instead of loading λ into other factors."""
    from tera_tn.core.spec import DEFAULT_DIAG
    from tera_tn.peft import TeraAdapterMismatch

    config = json.loads((DATA / "legacy_peft" / "adapter_config.json").read_text())
    saved_diag = config["diag"]
    assert saved_diag != DEFAULT_DIAG, "the fixture must differ from the default for this test to mean anything"
    edited = tmp_path / "edited"
    shutil.copytree(DATA / "legacy_peft", edited)
    del config["order"], config["diag"]
    (edited / "adapter_config.json").write_text(json.dumps(config))
    _peft_model()  # registers TeRA with PEFT
    with pytest.raises(TeraAdapterMismatch) as err:
        _peft_load(edited)
    for layer in ("up", "down"):
        assert f"{layer}: diag: checkpoint {saved_diag!r}, model {DEFAULT_DIAG!r}" in str(err.value)
