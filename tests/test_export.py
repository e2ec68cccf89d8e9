"""A TeRA adapter exported as LoRA: PEFT's own converter on TeRA layers and tera_tn.peft.export_lora.

Real models (tiny BERT, Llama and GPT-2 built from configs), real PEFT LoRA loading
(``PeftModel.from_pretrained``), one reload in a fresh process that never imports tera_tn. The
exact exports are compared with the TeRA model at 1e-4 relative in float32; the kept energy the
report predicts is compared with a dense float64 SVD of ΔW.
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

torch = pytest.importorskip("torch")
pytest.importorskip("peft")
pytest.importorskip("transformers")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from torch import nn  # noqa: E402
from transformers import (  # noqa: E402
    BertConfig,
    BertForSequenceClassification,
    BertModel,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
)

from tera_tn.peft import AdapterStore, TeraConfig, export_lora  # noqa: E402
from tera_tn.peft.layer import TeraLayer
from tera_tn.peft.export_report import ExportReport  # noqa: E402
from tera_tn.peft.lora_folder import MODULES_TO_SAVE_FILE  # noqa: E402

from bad_inputs.teach import Case, assert_teaches, params  # noqa: E402
from strategies import specs  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
EXACT = 1e-4  # relative, float32 exports at full rank
TOKENS = torch.randint(0, 96, (3, 7), generator=torch.Generator().manual_seed(1))


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # The matrices are tiny: thread start-up dominates, and on a shared machine extra threads wait
    # on busy cores (a 64×64 SVD took 0.6 s at 2 threads beside another job, 1 ms at 1).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# --- models ---------------------------------------------------------------------------------------
def bert_config(**kw) -> BertConfig:
    return BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=96,
                      vocab_size=100, **kw)


def llama_config() -> LlamaConfig:
    # key/value projections are 32×64 (2 KV heads of 16): a model of mixed layer shapes
    return LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)


def fresh(cls, config, seed: int = 0):
    torch.manual_seed(seed)
    return cls(config).eval()


def randomize(model, adapter: str = "default", seed: int = 0) -> None:
    """Distinct random λ per layer (a trained-looking adapter; the "random" init repeats them)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, TeraLayer) and adapter in m.tera_lambda:
                lam = m.tera_lambda[adapter]
                lam.copy_((0.5 + 1.5 * torch.rand(lam.shape, generator=gen)) * torch.sign(torch.randn(lam.shape, generator=gen)))


def tera_bert(diag: str = "mode", targets=("query", "value", "intermediate.dense"), seed: int = 0):
    model = get_peft_model(fresh(BertModel, bert_config()), TeraConfig(target_modules=list(targets), order=4, diag=diag, seed=3))
    randomize(model, seed=seed)
    return model.eval()


def tera_llama(targets=("q_proj", "v_proj")):
    model = get_peft_model(fresh(LlamaForCausalLM, llama_config()), TeraConfig(target_modules=list(targets), order=4, seed=1))
    randomize(model)
    return model.eval()


def output(model, x=TOKENS) -> torch.Tensor:
    with torch.no_grad():
        out = model(x)
    return getattr(out, "logits", None) if getattr(out, "logits", None) is not None else out.last_hidden_state


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def loaded_lora(cls, config, folder):
    lora = PeftModel.from_pretrained(fresh(cls, config), str(folder)).eval()
    assert isinstance(lora.peft_config["default"], LoraConfig)
    return lora


def delta(layer: TeraLayer, adapter: str = "default") -> torch.Tensor:
    """ΔW in the (d_out, d_in) orientation, float64."""
    dw = layer.get_delta_weight(adapter, dtype=torch.float32).double()
    return dw.T if layer.fan_in_fan_out else dw


def tera_layers(model, adapter: str = "default") -> dict[str, TeraLayer]:
    base = model.base_model.model
    return {n: m for n, m in base.named_modules() if isinstance(m, TeraLayer) and adapter in m.tera_lambda}


def read_lora(folder) -> tuple[dict, dict]:
    """``({layer: B @ A (float64)}, adapter_config)``."""
    state = load_file(str(Path(folder) / "adapter_model.safetensors"))
    out = {}
    for key, a in state.items():
        if key.endswith(".lora_A.weight"):
            name = key.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
            b = state[key.replace("lora_A", "lora_B")]
            out[name] = b.double() @ a.double()
    return out, json.loads((Path(folder) / "adapter_config.json").read_text())


# --- PEFT's own converter on TeRA layers ------------------------------------------------------------
def converter():
    return pytest.importorskip("peft.tuners.lora.conversion", reason="PEFT before convert_to_lora")


@pytest.mark.parametrize("diag", ["mode", "rank", "both"])
def test_peft_save_as_lora_at_full_rank_is_exact(diag, tmp_path):
    model = tera_bert(diag)
    assert model.supports_lora_conversion()  # PEFT asks the model with no argument
    converter().save_as_lora(tmp_path / "lora", model, rank=64)  # every layer here has min(d_out, d_in) = 64
    lora = loaded_lora(BertModel, bert_config(), tmp_path / "lora")
    assert rel(output(lora), output(model)) <= EXACT
    with lora.disable_adapter():
        assert rel(output(lora), output(model)) > 0.05  # the adapter does change the output


def test_peft_converts_a_chosen_adapter_of_several(tmp_path):
    model = tera_bert()
    model.add_adapter("second", TeraConfig(target_modules=["query", "value", "intermediate.dense"], order=3, diag="both",
                                           seed=5))
    randomize(model, "second", seed=9)
    converter().save_as_lora(tmp_path / "second", model, rank=64, adapter_name="second")
    lora = loaded_lora(BertModel, bert_config(), tmp_path / "second")
    model.set_adapter("second")
    assert rel(output(lora), output(model)) <= EXACT
    model.set_adapter("default")
    assert rel(output(lora), output(model)) > 0.05


def test_peft_refuses_a_stored_adapter_export_lora_converts_it(tmp_path):
    """PEFT's converter gives an adapter without a PEFT config lora_alpha=8 for an int rank
    (scaling 8/r), so TeRA refuses it there, naming the adapter; export_lora is exact."""
    model = tera_bert()
    writer = tera_bert(seed=7)  # same family, other λ
    writer.save_pretrained(tmp_path / "tera")
    AdapterStore(model).add("stored", path=tmp_path / "tera")
    with pytest.raises(ValueError, match=r"'stored' is served from an AdapterStore.*export_lora"):
        converter().convert_to_lora(model, 64, adapter_name="stored")
    report = export_lora(model, tmp_path / "lora", adapter_name="stored", check_inputs=TOKENS)
    assert report.output_error <= 1e-5
    lora = loaded_lora(BertModel, bert_config(), tmp_path / "lora")
    with torch.no_grad():  # the store's own mixed-batch forward is the reference
        served = model(TOKENS, adapter_names=["stored"] * len(TOKENS)).last_hidden_state
    assert rel(output(lora), served) <= EXACT
    assert rel(output(lora), output(model)) > 0.05  # not the model's own adapter


def test_peft_int_rank_must_fit_every_layer_export_lora_fits_each(tmp_path):
    """Trap: an int rank above some layer's min(d_out, d_in) makes PEFT's converter refuse the
    whole model; export_lora caps the rank per layer, so mixed shapes export at full rank."""
    model = tera_llama()
    with pytest.raises(ValueError, match="larger than the weight shape"):
        converter().convert_to_lora(model, 64)
    report = export_lora(model, tmp_path / "lora", rank=64)
    assert {x.name.rsplit(".", 1)[-1]: x.rank for x in report.layers} == {"q_proj": 64, "v_proj": 32}
    lora = loaded_lora(LlamaForCausalLM, llama_config(), tmp_path / "lora")
    assert rel(output(lora), output(model)) <= EXACT


def test_peft_float_rank_one_truncates_export_lora_does_not(tmp_path):
    """Trap: PEFT reads a float rank as an energy threshold and sums σ² in float32, where the sum
    stops growing once the last σ² fall below its rounding, so 1.0 drops directions of a layer
    with a wide spectrum (PEFT 0.21.2). export_lora sums in float64 and reads 1.0 as "every
    non-zero singular value"."""

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(64, 64)

        def forward(self, x):
            return self.lin(x)

    torch.manual_seed(0)
    model = get_peft_model(Net(), TeraConfig(target_modules=["lin"], order=4, seed=0))
    layer = model.base_model.model.lin
    with torch.no_grad():  # every λ_n spans a factor 10: cond(ΔW) ≈ 1e6
        layer.tera_lambda["default"].copy_(torch.cat([torch.logspace(0, -1, k) for k in layer.tera_spec["default"].scale_sizes]))
    config, state = converter().convert_to_lora(model, 1.0)
    assert config.rank_pattern["lin"] < 64
    peft_error = rel(state["base_model.model.lin.lora_B.weight"].double() @ state["base_model.model.lin.lora_A.weight"].double(),
                     delta(layer))
    report = export_lora(model, tmp_path / "lora", rank_set=None)
    assert report.layers[0].rank == 64
    got, _ = read_lora(tmp_path / "lora")
    ours = rel(got["lin"], delta(layer))
    assert ours <= 1e-6 < peft_error


def test_peft_layer_without_the_adapter_raises_key_error_export_lora_skips_it(tmp_path):
    model = tera_llama()
    model.add_adapter("wide", TeraConfig(target_modules=["q_proj", "k_proj", "v_proj"], order=3, seed=2))
    with pytest.raises(KeyError, match=r"no adapter 'default'.*carries \['wide'\].*export_lora"):
        converter().convert_to_lora(model, 8)  # k_proj carries only "wide"
    report = export_lora(model, tmp_path / "lora")
    assert sorted({x.name.rsplit(".", 1)[-1] for x in report.layers}) == ["q_proj", "v_proj"]
    got, config = read_lora(tmp_path / "lora")
    assert not any("k_proj" in n for n in got)
    assert sorted(config["target_modules"]) == ["q_proj", "v_proj"]
    lora = loaded_lora(LlamaForCausalLM, llama_config(), tmp_path / "lora")
    assert rel(output(lora), output(model)) <= EXACT


# --- export_lora: exactness --------------------------------------------------------------------------
@pytest.mark.parametrize("diag", ["mode", "both"])
def test_export_lora_bert_full_rank_is_exact(diag, tmp_path):
    model = tera_bert(diag)
    report = export_lora(model, tmp_path / "lora", check_inputs={"input_ids": TOKENS})
    assert [x.rank for x in report.layers] == [64] * 6 and report.lora_r == 64
    assert report.max_error <= 1e-6 and report.output_error <= 1e-5 and report.update_error <= 1e-5
    _, config = read_lora(tmp_path / "lora")
    assert (config["r"], config["lora_alpha"], config["rank_pattern"], config["alpha_pattern"]) == (64, 64, {}, {})
    # "dense" would also pick attention.output.dense and output.dense: full names instead
    assert sorted(config["target_modules"]) == sorted(tera_layers(model))
    lora = loaded_lora(BertModel, bert_config(), tmp_path / "lora")
    assert rel(output(lora), output(model)) <= EXACT


def test_export_lora_mixed_shapes_exact_scaling_one_under_peft_and_vllm_rules(tmp_path):
    model = tera_llama(targets=("q_proj", "v_proj", "down_proj"))
    report = export_lora(model, tmp_path / "lora")
    got, config = read_lora(tmp_path / "lora")
    layers = tera_layers(model)
    for name, layer in layers.items():
        assert rel(got[name], delta(layer)) <= EXACT
    # vLLM ignores the patterns and scales every layer by lora_alpha / r; PEFT by the patterns
    assert config["lora_alpha"] / config["r"] == 1.0
    assert config["rank_pattern"] == config["alpha_pattern"] == {n: 32 for n in layers if n.endswith("v_proj")}
    assert {x.rank for x in report.layers} == {32, 64}
    lora = loaded_lora(LlamaForCausalLM, llama_config(), tmp_path / "lora")
    assert rel(output(lora), output(model)) <= EXACT


def test_export_lora_rank_set_pads_with_zeros(tmp_path):
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.up = nn.Linear(40, 48)  # min side 40: rounded up to 64 → 24 zero rows
            self.down = nn.Linear(48, 24)

        def forward(self, x):
            return self.down(torch.tanh(self.up(x)))

    torch.manual_seed(0)
    base = Net()
    weights = {k: v.clone() for k, v in base.state_dict().items()}
    model = get_peft_model(base, TeraConfig(target_modules=["up", "down"], order=3, seed=0))
    randomize(model)
    x = torch.randn(5, 40)
    report = export_lora(model, tmp_path / "lora", rank_set=(8, 64), check_inputs=x)
    assert [(x.rank, x.kept) for x in report.layers] == [(64, 40), (64, 24)]
    assert report.lora_numbers == 64 * (48 + 40) + 64 * (24 + 48)  # the zeros are written too
    state = load_file(str(tmp_path / "lora" / "adapter_model.safetensors"))
    assert state["base_model.model.up.lora_A.weight"].shape == (64, 40)
    assert not state["base_model.model.up.lora_A.weight"][40:].any()
    assert not state["base_model.model.up.lora_B.weight"][:, 40:].any()
    assert report.output_error <= 1e-5
    fresh_base = Net()
    fresh_base.load_state_dict(weights)
    lora = PeftModel.from_pretrained(fresh_base, str(tmp_path / "lora")).eval()
    with torch.no_grad():
        assert rel(lora(x), model(x)) <= EXACT


def test_export_lora_gpt2_conv1d_orientation(tmp_path):
    config = GPT2Config(vocab_size=96, n_embd=48, n_layer=2, n_head=4, n_positions=64)
    model = get_peft_model(fresh(GPT2LMHeadModel, config), TeraConfig(target_modules=["c_attn", "c_proj"], order=3, seed=0))
    randomize(model)
    model.eval()
    report = export_lora(model, tmp_path / "lora", check_inputs=TOKENS)
    assert {x.shape for x in report.layers} == {(144, 48), (48, 48), (48, 192)}
    assert report.output_error <= 1e-5
    _, saved = read_lora(tmp_path / "lora")
    assert saved["fan_in_fan_out"] is True
    lora = loaded_lora(GPT2LMHeadModel, config, tmp_path / "lora")
    assert rel(output(lora), output(model)) <= EXACT
    # PEFT's converter on the same layers: get_delta_weight is laid out like the Conv1D weight
    converter().save_as_lora(tmp_path / "peft", model, rank=48)  # min(d_out, d_in) of every layer
    lora = loaded_lora(GPT2LMHeadModel, config, tmp_path / "peft")
    assert rel(output(lora), output(model)) <= EXACT


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(spec=specs(min_order=2, max_order=4, max_mode=5, max_side=40, diags=("mode", "rank", "both", "identity")),
       seed=st.integers(0, 2**16))
def test_full_rank_export_is_exact_for_any_spec(spec, seed, tmp_path):
    class One(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(spec.d_in, spec.d_out)

        def forward(self, x):
            return self.lin(x)

    model = get_peft_model(One(), TeraConfig(target_modules=["lin"], specs={spec.shape: spec}, seed=seed % 7))
    randomize(model, seed=seed)
    layer = model.base_model.model.lin
    for rank_set in (None, (1, 8, 16, 32, 64)):
        report = export_lora(model, tmp_path / "lora", rank_set=rank_set, overwrite=True)
        got, _ = read_lora(tmp_path / "lora")
        want = delta(layer)
        assert float((got["lin"] - want).norm()) <= EXACT * max(float(want.norm()), 1e-30)
        assert report.layers[0].energy == pytest.approx(1.0, abs=1e-12)


# --- the report's predictions ---------------------------------------------------------------------
@pytest.mark.parametrize("criterion", [dict(energy=0.9), dict(rank=20), dict(budget=30_000)])
@pytest.mark.parametrize("diag", ["mode", "rank", "both"])
def test_predicted_energy_and_error_match_a_dense_svd(diag, criterion, tmp_path):
    model = tera_bert(diag)
    report = export_lora(model, tmp_path / "lora", rank_set=None, **criterion)
    got, _ = read_lora(tmp_path / "lora")
    layers = tera_layers(model)
    assert [x.name for x in report.layers] == list(layers)
    for x in report.layers:
        want = delta(layers[x.name])
        s2 = torch.linalg.svdvals(want) ** 2
        assert x.energy == pytest.approx(float(s2[: x.kept].sum() / s2.sum()), abs=1e-6)
        assert x.error == pytest.approx(rel(got[x.name], want), rel=1e-6)
        if x.kept < min(x.shape):
            assert x.error == pytest.approx((1 - x.energy) ** 0.5, rel=1e-3)  # Eckart–Young
    assert sum(x.kept < min(x.shape) for x in report.layers) >= 4  # truncated: real predictions
    if "energy" in criterion:  # the smallest rank that keeps 90 %
        for x in report.layers:
            s2 = torch.linalg.svdvals(delta(layers[x.name])) ** 2
            assert x.energy >= 0.9 > float(s2[: x.kept - 1].sum() / s2.sum())
    if "budget" in criterion:
        assert report.lora_numbers <= 30_000


def test_higher_energy_never_lowers_a_rank(tmp_path):
    model = tera_llama(targets=("q_proj", "v_proj", "down_proj"))
    previous = {None: None, (1, 8, 16, 32, 64): None}
    for energy in (0.3, 0.5, 0.8, 0.9, 0.99, 0.999, 0.99999, 1.0):
        for rank_set, before in previous.items():
            ranks = [x.rank for x in export_lora(model, tmp_path / "lora", energy=energy, rank_set=rank_set,
                                                 overwrite=True).layers]
            assert before is None or all(a >= b for a, b in zip(ranks, before)), (energy, rank_set, ranks, before)
            previous[rank_set] = ranks
    assert previous[None] == [64, 32, 64] * 2  # energy 1.0: full rank


def test_budget_spreads_ranks_by_marginal_energy(tmp_path):
    model = tera_llama(targets=("q_proj", "v_proj", "down_proj"))
    minimum = sum(1 * (a + b) for a, b in [(64, 64), (32, 64), (64, 128)] * 2)
    totals, energies = [], []
    for i, budget in enumerate((minimum, 20_000, 60_000, 10**7)):
        report = export_lora(model, tmp_path / f"b{i}", budget=budget, rank_set=None)
        assert report.lora_numbers <= budget
        totals.append(report.lora_numbers)
        energies.append(sum(x.energy for x in report.layers))
    assert totals[0] == minimum
    assert energies == sorted(energies) and energies[-1] == pytest.approx(len(report.layers))
    assert [x.rank for x in report.layers] == [64, 32, 64] * 2  # an ample budget stops at full rank


# --- loading elsewhere ----------------------------------------------------------------------------
_RELOAD = textwrap.dedent(
    """
    import sys, torch
    # PEFT 0.21.0 reads torch.distributed.tensor without importing it; the newest transformers
    # happens to import it first, 4.46.1 (the lowest declared) does not: a bare LoRA load fails there
    import torch.distributed.tensor
    from peft import LoraConfig, PeftModel
    from transformers import AutoModelForCausalLM
    base = AutoModelForCausalLM.from_pretrained(sys.argv[1]).eval()
    model = PeftModel.from_pretrained(base, sys.argv[2]).eval()
    assert isinstance(model.peft_config["default"], LoraConfig), type(model.peft_config["default"])
    assert not any(m.startswith("tera_tn") for m in sys.modules), "the LoRA load must not need tera_tn"
    with torch.no_grad():
        torch.save(model(torch.load(sys.argv[3])).logits, sys.argv[4])
    """
)


@pytest.mark.slow
def test_fresh_process_loads_the_export_as_lora_without_tera_tn(tmp_path):
    base = fresh(LlamaForCausalLM, llama_config())
    base.save_pretrained(tmp_path / "base")
    model = get_peft_model(base, TeraConfig(target_modules=["q_proj", "v_proj"], order=4, seed=1))
    randomize(model)
    model.eval()
    report = export_lora(model, tmp_path / "lora", dtype=torch.bfloat16, energy=0.99, check_inputs=TOKENS)
    torch.save(TOKENS, tmp_path / "x.pt")
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    proc = subprocess.run([sys.executable, "-c", _RELOAD, str(tmp_path / "base"), str(tmp_path / "lora"),
                           str(tmp_path / "x.pt"), str(tmp_path / "y.pt")],
                          env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lora_logits = torch.load(tmp_path / "y.pt")
    # the report predicted what PEFT's own LoRA forward in bfloat16 gives, truncation and rounding included
    assert 1e-4 < rel(lora_logits, output(model)) == pytest.approx(report.output_error, rel=0.05)


def test_cli_export(tmp_path, capsys):
    from tera_tn.cli import main

    base = fresh(LlamaForCausalLM, llama_config())
    base.save_pretrained(tmp_path / "base")
    model = get_peft_model(base, TeraConfig(target_modules=["q_proj", "v_proj"], order=4, seed=1))
    randomize(model)
    model.save_pretrained(tmp_path / "tera")
    args = ["export", str(tmp_path / "tera"), "--model", str(tmp_path / "base"), "-o", str(tmp_path / "lora")]
    assert main(args + ["--energy", "0.95", "--rank-set", "none", "--dtype", "bfloat16"]) == 0
    printed = capsys.readouterr().out
    assert "model.layers.1.self_attn.v_proj" in printed and "bfloat16, energy=0.95, any rank" in printed
    state = load_file(str(tmp_path / "lora" / "adapter_model.safetensors"))
    assert {t.dtype for t in state.values()} == {torch.bfloat16}
    # a second export into the same folder is refused before the model is loaded
    assert main(args) == 2
    assert "not empty" in capsys.readouterr().err
    assert main(args + ["--overwrite"]) == 0
    assert main(args + ["--overwrite", "--energy", "1.5"]) == 2
    assert "energy must be a fraction in (0, 1]" in capsys.readouterr().err
    assert main(args + ["--overwrite", "--rank-set", "8,x"]) == 2
    lora = loaded_lora(LlamaForCausalLM, llama_config(), tmp_path / "lora")
    model.eval()
    assert rel(output(lora), output(model)) <= EXACT


# --- modules_to_save, folders, the report -----------------------------------------------------------
def tera_classifier():
    config = bert_config(num_labels=3)
    model = get_peft_model(fresh(BertForSequenceClassification, config),
                           TeraConfig(task_type="SEQ_CLS", target_modules=["query", "value"], order=4, seed=0))
    randomize(model)
    with torch.no_grad():  # a trained head, unlike the fresh base's
        model.base_model.model.classifier.modules_to_save["default"].weight.mul_(-3.0)
    return config, model.eval()


def test_modules_to_save_refused_by_default_separate_or_included(tmp_path):
    config, model = tera_classifier()
    with pytest.raises(ValueError, match=r"modules_to_save \['classifier'\].*vLLM.*'separate'") :
        export_lora(model, tmp_path / "refused")
    assert not (tmp_path / "refused").exists()
    want = output(model)

    report = export_lora(model, tmp_path / "separate", modules_to_save="separate")
    assert report.modules_to_save == ("classifier",) and MODULES_TO_SAVE_FILE in str(report)
    _, saved = read_lora(tmp_path / "separate")
    assert saved["modules_to_save"] is None  # what vLLM requires
    head = load_file(str(tmp_path / "separate" / MODULES_TO_SAVE_FILE))
    assert sorted(head) == ["classifier.bias", "classifier.weight"]
    base = fresh(BertForSequenceClassification, config)
    base.load_state_dict(head, strict=False)  # into the base first: PEFT wraps the head it finds
    lora = PeftModel.from_pretrained(base, str(tmp_path / "separate")).eval()
    assert rel(output(lora), want) <= EXACT

    export_lora(model, tmp_path / "include", modules_to_save="include")
    _, saved = read_lora(tmp_path / "include")
    assert saved["modules_to_save"] == ["classifier"]
    lora = loaded_lora(BertForSequenceClassification, config, tmp_path / "include")
    assert rel(output(lora), want) <= EXACT


def test_never_overwrites_a_non_empty_folder_unless_asked(tmp_path):
    config, model = tera_classifier()
    folder = tmp_path / "lora"
    folder.mkdir()
    (folder / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not empty.*overwrite=True"):
        export_lora(model, folder, modules_to_save="separate")
    assert sorted(p.name for p in folder.iterdir()) == ["notes.txt"]
    export_lora(model, folder, modules_to_save="separate", overwrite=True)
    assert (folder / MODULES_TO_SAVE_FILE).exists() and (folder / "notes.txt").read_text() == "mine"
    export_lora(model, folder, modules_to_save="include", overwrite=True)
    # a stale head file of the earlier export would be loaded by mistake
    assert sorted(p.name for p in folder.iterdir()) == ["adapter_config.json", "adapter_model.safetensors", "notes.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["lora"]  # no temporaries left


def test_report_is_an_immutable_value_that_renders_itself(tmp_path):
    import dataclasses

    model = tera_bert()
    report = export_lora(model, tmp_path / "lora", rank=16, check_inputs={"input_ids": TOKENS})
    assert isinstance(report, ExportReport)
    with pytest.raises(dataclasses.FrozenInstanceError):
        report.lora_r = 3
    text = str(report)
    for x in report.layers:
        assert x.name in text
    assert "rank=16" in text and "relative error" in text and f"{report.lora_numbers:,}" in text
    data = json.loads(json.dumps(report.to_dict()))
    assert data["lora_numbers"] == 16 * sum(a + b for a, b in [(64, 64), (64, 64), (96, 64)] * 2)
    assert data["layers"][0] == {"name": report.layers[0].name, "shape": [64, 64], "rank": 16, "kept": 16,
                                 "energy": report.layers[0].energy, "error": report.layers[0].error, "numbers": 16 * 128}
    assert 0 < data["output_error"] < 1 and data["update_error"] > 0


# --- a quantized base ---------------------------------------------------------------------------------
def test_quantized_base_exports_the_same_update(tmp_path):
    try:
        import bitsandbytes as bnb
    except Exception as err:  # noqa: BLE001 - a broken install raises more than ImportError
        pytest.skip(f"bitsandbytes is not usable here: {err}")

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = nn.ModuleList(nn.Linear(64, 64) for _ in range(2))

        def forward(self, x):
            for block in self.blocks:
                x = torch.tanh(block(x))
            return x

    torch.manual_seed(0)
    fp = Net()
    q = Net()
    for i, block in enumerate(fp.blocks):
        layer = bnb.nn.Linear8bitLt(64, 64, has_fp16_weights=False)
        layer.load_state_dict(block.state_dict())
        q.blocks[i] = layer.to("cpu")  # bitsandbytes quantizes on the move to the device
    config = dict(target_modules=["blocks.0", "blocks.1"], order=3, seed=4)
    fp_model = get_peft_model(fp, TeraConfig(**config))
    q_model = get_peft_model(q, TeraConfig(**config))
    randomize(fp_model)
    randomize(q_model)
    x = torch.randn(4, 64)
    try:
        with torch.no_grad():
            q(x)
    except (RuntimeError, NotImplementedError) as err:
        pytest.skip(f"bitsandbytes 8-bit layers do not run on this CPU: {err}")
    report = export_lora(q_model, tmp_path / "q", check_inputs=x)
    assert report.update_error <= 1e-5
    export_lora(fp_model, tmp_path / "fp")
    got_q, _ = read_lora(tmp_path / "q")
    got_fp, _ = read_lora(tmp_path / "fp")
    for name in got_fp:  # ΔW does not depend on W0: the same LoRA from either base
        assert rel(got_q[name], got_fp[name]) <= 1e-6
    assert report.output_error <= 1e-5


# --- bad inputs: each error names the value and what was expected ---------------------------------------
@functools.cache
def _bert():
    return tera_bert()


def _export(tmp="unused-export-folder", **kw):
    # every case fails before anything is written; the folder is never created
    return export_lora(_bert(), Path(tmp), **kw)


BAD = [
    Case("rank-zero", lambda: _export(rank=0), ValueError, ("rank", "0", "positive integer")),
    Case("rank-negative", lambda: _export(rank=-4), ValueError, ("rank", "-4", "positive integer")),
    Case("rank-float", lambda: _export(rank=8.0), ValueError, ("rank", "8.0", "positive integer")),
    Case("rank-bool", lambda: _export(rank=True), ValueError, ("rank", "true", "positive integer")),
    Case("energy-zero", lambda: _export(energy=0.0), ValueError, ("energy", "0.0", "(0, 1]")),
    Case("energy-above-one", lambda: _export(energy=1.5), ValueError, ("energy", "1.5", "(0, 1]")),
    Case("energy-nan", lambda: _export(energy=float("nan")), ValueError, ("energy", "nan", "(0, 1]")),
    Case("rank-and-energy", lambda: _export(rank=8, energy=0.9), ValueError, ("at most one", "rank=8", "energy=0.9")),
    Case("budget-and-rank", lambda: _export(rank=8, budget=10_000), ValueError, ("at most one", "budget=10000")),
    Case("budget-zero", lambda: _export(budget=0), ValueError, ("budget", "0", "positive integer")),
    Case("budget-below-minimum", lambda: _export(budget=500), ValueError, ("budget 500", "832", "at least")),
    Case("budget-below-rank-set-minimum", lambda: _export(budget=5_000, rank_set=(8, 16)), ValueError,
         ("budget 5,000", "6,656", "minimum rank 8")),
    Case("unknown-adapter", lambda: _export(adapter_name="other"), ValueError, ("'other'", "['default']")),
    Case("empty-rank-set", lambda: _export(rank_set=()), ValueError, ("rank_set", "()", "non-empty")),
    Case("rank-set-zero", lambda: _export(rank_set=[0, 8]), ValueError, ("rank_set", "[0, 8]", "positive")),
    Case("rank-set-string", lambda: _export(rank_set="8,16"), ValueError, ("rank_set", "'8,16'", "collection")),
    Case("rank-above-rank-set", lambda: _export(rank=64, rank_set=(8, 16)), ValueError,
         ("needs rank 64", "largest rank in rank_set is 16")),
    Case("dtype", lambda: _export(dtype=torch.int8), ValueError, ("dtype", "torch.int8", "bfloat16")),
    Case("dtype-name", lambda: _export(dtype="fp8"), ValueError, ("dtype", "'fp8'", "float32")),
    Case("modules-to-save-mode", lambda: _export(modules_to_save="drop"), ValueError,
         ("modules_to_save", "'drop'", "separate")),
    Case("check-inputs-type", lambda: _export(check_inputs=[1, 2]), ValueError, ("check_inputs", "list", "dict of tensors")),
    Case("overwrite-type", lambda: _export(overwrite="yes"), ValueError, ("overwrite", "'yes'", "true or false")),
    Case("check-on-merged-model", lambda: _merged_check(), ValueError, ("merged", "unmerge_adapter()")),
    Case("not-a-tera-model", lambda: export_lora(nn.Linear(2, 2), "unused"), TypeError, ("TeRA", "Linear")),
    Case("store-adapter-with-head", lambda: _store_with_head(), ValueError, ("'stored'", "AdapterStore", "classifier")),
]


def _merged_check():
    model = tera_bert()
    model.merge_adapter()
    export_lora(model, "unused-export-folder", check_inputs=TOKENS)


def _store_with_head():
    _, model = tera_classifier()
    AdapterStore(model).add("stored", adapter="default")
    export_lora(model, "unused-export-folder", adapter_name="stored", modules_to_save="separate")


@params(BAD)
def test_bad_arguments_teach(case, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert_teaches(case)
    assert list(tmp_path.iterdir()) == []
