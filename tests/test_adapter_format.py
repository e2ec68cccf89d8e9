"""One adapter format for both APIs (format 2, tera_tn.core.adapter_format): each API's round trip,
files of either API loading into the other, both 0.1.0 layouts, mismatches and damaged descriptions."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

torch = pytest.importorskip("torch")
pytest.importorskip("safetensors")
from safetensors import safe_open  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402
from torch import nn  # noqa: E402

from tera_tn import TeRASpec  # noqa: E402
from tera_tn.core.adapter_format import (  # noqa: E402
    FORMAT, PER_LAYER, PER_MODE, SHARED_FIELDS, SIGNATURE_KEY, AdapterFormatError, adapter_metadata, decode, encode,
    layer_entry, metadata_diff,
)
from tera_tn.torch import CheckpointMismatch, TeRALayersConfig, add_tera, load_tera, save_tera, tera_layers  # noqa: E402
from tera_tn.torch.adapter_file import read_adapter_metadata  # noqa: E402

from tiny_models import TinyMLP  # noqa: E402
from tolerance import assert_matches_golden  # noqa: E402

DATA = Path(__file__).resolve().parent / "data"




def _base() -> nn.Module:
    torch.manual_seed(0)
    return TinyMLP()


def _trained(model, layers):
    with torch.no_grad():
        for i, lam in enumerate(layers):
            lam.copy_(torch.linspace(-1.0, 1.5, lam.numel()) * (i + 1))
    return model


def _torch_model(**cfg) -> nn.Module:
    m = _base()
    add_tera(m, TeRALayersConfig(order=3, seed=7, **cfg))
    return _trained(m, [layer.tera_lambda["default"] for _, layer in tera_layers(m)])


def _peft_model(**cfg):
    pytest.importorskip("peft")
    from peft import get_peft_model

    from tera_tn.peft import TeraConfig

    model = get_peft_model(_base(), TeraConfig(target_modules=["up", "down"], order=3, seed=7, **cfg))
    layers = model.base_model.adapter_layers("default").values()
    return _trained(model, [layer.tera_lambda["default"] for layer in layers])


def _x():
    torch.manual_seed(1)
    return torch.randn(4, 12)


# --- the description, as a pure value ------------------------------------------------------------

_specs = st.sampled_from([TeRASpec.from_shape(24, 12, order=3), TeRASpec.from_shape(12, 24, order=2, diag="rank"),
                          TeRASpec.from_shape(24, 12, order=4, ranks=0.5, diag="both")])
_entries = st.dictionaries(
    st.from_regex(r"[a-z]{1,6}(\.[0-9]{1,2})?", fullmatch=True),
    st.builds(lambda spec, seed, alpha, how, w0, fifo: layer_entry(
                  spec, seed=seed, factor_init="orthogonal", factor_dtype="float32", alpha=alpha,
                  alpha_scaling=how[0], update=how[1], w0_norm=w0 if how[2] else None, fan_in_fan_out=fifo),
              _specs, st.integers(0, 3), st.sampled_from([1.0, 0.5, 2.0]),
              # (alpha_scaling, update, pins W0): the base weight's norm is stored exactly when either uses W0
              st.sampled_from([("constant", "additive", False), ("w0_relative", "additive", True),
                               ("constant", "multiplicative", True)]),
              st.floats(0.5, 9.0), st.booleans()),
    min_size=1, max_size=5,
)


@given(_entries, st.sampled_from([PER_MODE, PER_LAYER]))
def test_written_description_reads_back_as_every_layer_in_full(entries, layout):
    # Property: whatever the writer hoists to the top level, the reader gives each layer its full entry.
    meta = adapter_metadata(entries, lambda_layout=layout)
    back = decode(encode(meta), source="tensor", where="f", expected="x")
    assert back["format"] == FORMAT and back["lambda_layout"] == layout
    for name, entry in entries.items():
        got = dict(back["layers"][name])
        assert got.pop("group").startswith("g") and got == entry
    # Layers with the same seed and spec share a frozen-factor group, others do not.
    groups = {(json.dumps(e["spec"], sort_keys=True), e["seed"]): back["layers"][n]["group"] for n, e in entries.items()}
    assert len(set(groups.values())) == len(groups)
    assert metadata_diff(back, {"layers": entries}) == []
    # Adapter-wide defaults (a PEFT config's) that some layers do not share: those layers keep their own.
    meta = adapter_metadata(entries, lambda_layout=layout, defaults={"seed": 2, "alpha": 0.5})
    back = decode(encode(meta), source="tensor", where="f", expected="x")
    assert back["seed"] == 2 and {n: {k: v for k, v in e.items() if k != "group"} for n, e in back["layers"].items()} == entries


@given(_entries)
def test_a_field_uniform_on_both_sides_is_reported_once(entries):
    other = {n: {**e, "seed": e["seed"] + 10} for n, e in entries.items()}
    seeds = {e["seed"] for e in entries.values()}
    lines = metadata_diff({"layers": entries}, {"layers": other})
    if len(seeds) == 1:
        (seed,) = seeds
        assert lines == [f"seed: checkpoint {seed}, model {seed + 10}"]
    else:
        assert len(lines) == 1 and lines[0].startswith(f"seed differs in {len(entries)} layer(s)")


@pytest.mark.parametrize("raw, needle", [
    (b"\xff\xfe{", "unreadable tera_signature, not valid json"),
    (b"[1, 2]", "is a json list, not an object"),
    (json.dumps({"format": 7}).encode(), "adapter format 7; this tera_tn reads format 1"),
    (json.dumps({"format": 2, "lambda_layout": "per_mode", "layers": {}}).encode(), "'layers' = {}"),
    (json.dumps({"format": 2, "lambda_layout": "diagonal", "layers": {"a": {}}}).encode(), "'lambda_layout' = 'diagonal'"),
    (json.dumps({"format": 2, "lambda_layout": "per_mode", "seed": 1, "layers": {"up": {"spec": {"row_modes": [4]}}}}).encode(),
     "entry of layer 'up' lacks ['group', 'factor_init'"),
])
def test_a_damaged_description_is_refused_naming_the_field(raw, needle):
    with pytest.raises(AdapterFormatError) as err:
        decode(raw, source="tensor", where="bad.safetensors", expected="an adapter")
    assert "bad.safetensors" in str(err.value) and needle in str(err.value).lower()


def test_a_corrupted_description_in_a_file_names_the_file(tmp_path):
    path = save_tera(_torch_model(), tmp_path / "a.safetensors")
    tensors = load_file(str(path))
    meta = json.loads(bytes(tensors[SIGNATURE_KEY].tolist()))
    del meta["seed"]  # hoisted: no layer has it now
    tensors[SIGNATURE_KEY] = torch.tensor(list(json.dumps(meta).encode()), dtype=torch.uint8)
    save_file(tensors, str(tmp_path / "b.safetensors"))
    with pytest.raises(ValueError, match=r"b\.safetensors: the tera_signature entry of layer '(up|down)' lacks \['seed'\]"):
        load_tera(_base(), tmp_path / "b.safetensors")


# --- each API's round trip -----------------------------------------------------------------------


def test_save_tera_writes_format_2_in_the_tensor_and_nothing_in_the_header(tmp_path):
    src = _torch_model()
    path = save_tera(src, tmp_path / "a.safetensors")
    with safe_open(str(path), framework="pt") as f:
        assert "tera_tn" not in (f.metadata() or {})
        assert sorted(f.keys()) == sorted([SIGNATURE_KEY] + [f"{n}.lambda.{i}" for n in ("up", "down") for i in range(3)])
    meta = read_adapter_metadata(path)
    assert meta["format"] == 2 and meta["lambda_layout"] == PER_MODE and meta["seed"] == 7
    assert all(k not in info for info in json.loads(bytes(load_file(str(path))[SIGNATURE_KEY].tolist()))["layers"].values()
               for k in SHARED_FIELDS)  # every shared field written once
    dst = _base()
    load_tera(dst, path)
    assert torch.equal(dst(_x()), src(_x()))


def test_peft_round_trip_writes_format_2(tmp_path):
    from peft import PeftModel

    from tera_tn.peft import save_adapter
    from tera_tn.peft.io import read_adapter_signature

    src = _peft_model()
    save_adapter(src, tmp_path / "a")
    sig = read_adapter_signature(tmp_path / "a")
    assert sig["format"] == 2 and sig["lambda_layout"] == PER_LAYER and sig["seed"] == 7
    assert sig["layers"]["up"]["spec"] == TeRASpec.from_shape(24, 12, order=3).to_dict()
    again = PeftModel.from_pretrained(_base(), tmp_path / "a")
    torch.testing.assert_close(again(_x()), src(_x()), rtol=1e-5, atol=1e-5)


# --- across the APIs -----------------------------------------------------------------------------


@pytest.mark.parametrize("as_file", [False, True], ids=["folder", "file"])
def test_a_peft_adapter_loads_with_load_tera(tmp_path, as_file):
    from tera_tn.peft import save_adapter

    src = _peft_model(factor_dtype="float64", save_factors=True)
    save_adapter(src, tmp_path / "a")
    plain = _base()
    load_tera(plain, tmp_path / "a" / "adapter_model.safetensors" if as_file else tmp_path / "a")
    torch.testing.assert_close(plain(_x()), src(_x()), rtol=0, atol=1e-6)
    # Into a model adapted differently: the one checker names the field.
    other = _base()
    add_tera(other, TeRALayersConfig(order=3, seed=8, factor_dtype="float64"))
    with pytest.raises(CheckpointMismatch, match="seed: checkpoint 7, model 8"):
        load_tera(other, tmp_path / "a")


def test_a_w0_relative_peft_adapter_loads_with_load_tera_and_pins_w0(tmp_path):
    from tera_tn.peft import save_adapter

    src = _peft_model(alpha=0.5, alpha_scaling="w0_relative")
    save_adapter(src, tmp_path / "a")
    plain = _base()
    load_tera(plain, tmp_path / "a")
    torch.testing.assert_close(plain(_x()), src(_x()), rtol=1e-6, atol=1e-6)
    other = _base()
    with torch.no_grad():
        other.down.weight.mul_(3.0)
    with pytest.raises(CheckpointMismatch, match="layer 'down': the adapter's α was set from a base weight of norm"):
        load_tera(other, tmp_path / "a")


def _peft_folder_of(path: Path, folder: Path, **cfg) -> Path:
    """A PEFT adapter folder holding the ``save_tera`` file ``path`` and a TeraConfig."""
    from tera_tn.peft import TeraConfig

    folder.mkdir()
    TeraConfig(target_modules=["up", "down"], order=3, **{"seed": 7, **cfg}).save_pretrained(str(folder))
    (folder / "adapter_model.safetensors").write_bytes(path.read_bytes())
    return folder


def test_a_save_tera_file_loads_through_peft(tmp_path):
    from peft import PeftModel

    from tera_tn.peft import AdapterStore, TeraAdapterMismatch

    src = _torch_model(alpha=2.0)
    path = save_tera(src, tmp_path / "a.safetensors", include_factors=True)
    loaded = PeftModel.from_pretrained(_base(), _peft_folder_of(path, tmp_path / "peft", alpha=2.0))
    torch.testing.assert_close(loaded(_x()), src(_x()), rtol=1e-5, atol=1e-5)
    # The adapter's description still decides: a config that disagrees is refused, naming the field.
    with pytest.raises(TeraAdapterMismatch, match="alpha: checkpoint 2.0, model 1.0"):
        PeftModel.from_pretrained(_base(), _peft_folder_of(path, tmp_path / "peft1"))
    # An AdapterStore reads the file directly.
    store = AdapterStore(PeftModel.from_pretrained(_base(), tmp_path / "peft"))
    store.add("t", path=path)
    store.use("t")
    torch.testing.assert_close(store._tera.model(_x()), src(_x()), rtol=1e-5, atol=1e-5)


def test_a_torch_adapter_of_another_seed_is_refused_by_peft_naming_the_field(tmp_path):
    from peft import PeftModel

    from tera_tn.peft import TeraAdapterMismatch

    path = save_tera(_torch_model(), tmp_path / "a.safetensors")
    with pytest.raises(TeraAdapterMismatch, match="seed: checkpoint 7, model 9"):
        PeftModel.from_pretrained(_base(), _peft_folder_of(path, tmp_path / "peft", seed=9))


# --- files of tera_tn 0.1.0 ----------------------------------------------------------------------


def test_both_legacy_layouts_read_as_one_description():
    torch_meta = read_adapter_metadata(DATA / "legacy_torch.safetensors")
    peft_meta = read_adapter_metadata(DATA / "legacy_peft")
    for meta, layout in ((torch_meta, PER_MODE), (peft_meta, PER_LAYER)):
        assert meta["format"] == 2 and meta["lambda_layout"] == layout
        assert {n.rsplit(".", 1)[-1] for n in meta["layers"]} == {"up", "down"}
        for info in meta["layers"].values():
            assert info["generator_version"] == 1 and info["seed"] == 7 and info["alpha"] == 2.0
            assert info["spec"]["diag"] == "rank" and info["factor_dtype"] == "float64"


def test_the_legacy_peft_adapter_loads_with_load_tera():
    plain = _base()
    load_tera(plain, DATA / "legacy_peft")
    with np.load(DATA / "legacy_peft_delta.npz") as want:
        for name in ("up", "down"):
            layer = getattr(plain, name)
            # recorded from PEFT's ΔW, in the base weight's dtype (float32)
            got = layer.delta_weight(torch.float32)
            assert_matches_golden(got.double().numpy(), want[name], got.dtype, int(np.prod(layer.spec.ranks)), f"{name}: ΔW")


def test_the_legacy_torch_file_goes_into_an_adapter_store(tmp_path):
    pytest.importorskip("peft")
    from peft import get_peft_model

    from tera_tn.peft import AdapterStore, TeraConfig

    model = get_peft_model(_base(), TeraConfig(target_modules=["up", "down"], order=3, diag="rank", alpha=2.0, seed=7,
                                               factor_dtype="float64"))
    store = AdapterStore(model)
    store.add("old", path=DATA / "legacy_torch.safetensors")
    store.use("old")
    reference = _base()
    load_tera(reference, DATA / "legacy_torch.safetensors")
    torch.testing.assert_close(model(_x()), reference(_x()), rtol=1e-6, atol=1e-6)


@pytest.mark.slow
def test_a_legacy_per_layer_scale_adapter_loads_through_peft_and_load_tera():
    # A study adapter of the per-layer scale (alpha_scaling="w0_relative", α = 0.7) written by the
    # format-1 PEFT writer on MiniLM: its file records ‖W0‖ per layer but not the layer's α, which
    # the reader derives from the seed's frozen map. Loading it once raised KeyError (the fresh
    # factor bank held no group for the spec).
    pytest.importorskip("peft")
    from peft import PeftModel

    import tera_tn.peft  # noqa: F401
    from tera_tn.finetune import load_model
    from tera_tn.torch.bank import FactorBank

    folder = DATA / "legacy_peft_w0_relative"
    meta = read_adapter_metadata(folder)
    assert meta["lambda_layout"] == PER_LAYER and len(meta["layers"]) == 36
    encoder, _ = load_model()
    bank = FactorBank(2, "orthogonal", "float32")
    for name, info in meta["layers"].items():
        spec = TeRASpec.from_dict(info["spec"])
        bank.add(spec)
        w0 = encoder.get_submodule(name).weight.detach().double()
        assert info["w0_norm"] == pytest.approx(float(torch.linalg.matrix_norm(w0)), rel=1e-6), name
        assert info["alpha"] * bank.frozen_norm(spec) / info["w0_norm"] == pytest.approx(0.7, rel=1e-12), name
    peft_model = PeftModel.from_pretrained(load_model()[0], str(folder))
    plain = load_model()[0]
    load_tera(plain, folder)
    ids = torch.tensor([[101, 2023, 2003, 1037, 3231, 102]])
    torch.testing.assert_close(plain(input_ids=ids).last_hidden_state, peft_model(input_ids=ids).last_hidden_state,
                               rtol=1e-5, atol=1e-5)
