"""Model-level reports (tera_tn.analysis.report) and shape sets (tera_tn.analysis.shapes)."""

from __future__ import annotations

import json
import string

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from safetensors.numpy import save as st_save

from tera_tn import TeRASpec
from tera_tn.analysis.accounting import method_totals
from tera_tn.analysis.methods import Method, adapter_file_bytes, adapter_tensors, safetensors_size
from tera_tn.analysis.report import DEFAULT_METHODS, model_report
from tera_tn.analysis.shapes import MODEL_CONFIGS, LayerShape, available_models, linear_shapes, model_config, model_shapes

_NP = {"F32": np.float32, "F16": np.float16, "F64": np.float64, "U8": np.uint8}


def _real_size(tensors, dtype="F32", metadata=None) -> int:
    """Bytes of a real safetensors save of zero tensors (values: shape, or (dtype tag, shape))."""
    arrays = {}
    for k, v in tensors.items():
        tag, shape = v if isinstance(v, tuple) and len(v) == 2 and isinstance(v[0], str) else (dtype, v)
        arrays[k] = np.zeros(shape, dtype=_NP[tag])
    return len(st_save(arrays, metadata=metadata))


names = st.text(alphabet=string.ascii_letters + string.digits + "._-", min_size=1, max_size=40)


@given(
    st.dictionaries(names, st.lists(st.integers(0, 7), min_size=0, max_size=3), max_size=6),
    st.sampled_from(("F32", "F16", "F64")),
    st.one_of(st.none(), st.dictionaries(names, names, max_size=2)),
)
def test_safetensors_size_formula_matches_a_real_save(tensors, dtype, metadata):
    assert safetensors_size(tensors, dtype, metadata) == _real_size(tensors, dtype, metadata)


@pytest.mark.parametrize("method", ["tera:order=4", "tera:order=6,ranks=0.5,diag=mode", "lora:r=8", "vera:r=64", "hira:r=4"])
def test_adapter_file_bytes_match_a_real_save(method):
    layers = model_shapes("all-MiniLM-L6-v2")
    tensors = adapter_tensors(method, layers)
    assert adapter_file_bytes(method, layers) == _real_size(tensors, metadata={"format": "pt"})
    # The float data is exactly the trainable count in fp32 (TeRA adds its uint8 signature).
    m = Method.parse(method)
    kw = {"r": m.r} if m.kind != "tera" else {"order": m.order, "ranks": m.ranks, "diag": m.diag}
    trainable = method_totals(m.kind, [l.shape for l in layers], **kw).trainable
    assert sum(int(np.prod(s)) for s in tensors.values() if not isinstance(s[0], str)) == trainable


@pytest.mark.parametrize("method, config", [
    ("tera:order=4", {"order": 4}),
    ("tera:order=6,ranks=0.5,diag=mode", {"order": 6, "ranks": 0.5, "diag": "mode"}),
    ("tera:order=3,diag=both", {"order": 3, "diag": "both"}),
])
def test_report_adapter_bytes_equal_the_file_peft_writes(tmp_path, method, config):
    # The report's "adapter file" column must be the size of the file a user actually gets, not
    # of an idealized one: it once counted one tensor per mode and no signature.
    peft = pytest.importorskip("peft")
    import tera_tn.peft  # noqa: F401  (registers TeRA)
    from torch import nn

    shapes = {"attn.q": (64, 64), "attn.v": (48, 64), "mlp.up": (96, 64), "mlp.down": (64, 96)}

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = nn.ModuleDict({k.split(".")[1]: nn.Linear(i, o) for k, (o, i) in shapes.items() if k.startswith("attn")})
            self.mlp = nn.ModuleDict({k.split(".")[1]: nn.Linear(i, o) for k, (o, i) in shapes.items() if k.startswith("mlp")})

    model = peft.get_peft_model(Block(), tera_tn.peft.TeraConfig(target_modules=["q", "v", "up", "down"], **config))
    model.save_pretrained(tmp_path)
    written = (tmp_path / "adapter_model.safetensors").stat().st_size
    layers = [LayerShape(name, o, i) for name, (o, i) in shapes.items()]
    assert adapter_file_bytes(method, layers) == written


def test_builtin_shape_sets():
    expect = {
        "all-MiniLM-L6-v2": (36, {(384, 384): 24, (1536, 384): 6, (384, 1536): 6}),
        "bert-base": (72, {(768, 768): 48, (3072, 768): 12, (768, 3072): 12}),
        "roberta-base": (72, {(768, 768): 48, (3072, 768): 12, (768, 3072): 12}),
        "roberta-large": (144, {(1024, 1024): 96, (4096, 1024): 24, (1024, 4096): 24}),
        "llama-2-7b": (224, {(4096, 4096): 128, (11008, 4096): 64, (4096, 11008): 32}),
        "llama-3-8b": (224, {(4096, 4096): 64, (1024, 4096): 64, (14336, 4096): 64, (4096, 14336): 32}),
    }
    assert set(expect) <= set(available_models())
    for name, (n, counts) in expect.items():
        layers = model_shapes(name)
        assert len(layers) == n
        got: dict = {}
        for layer in layers:
            got[layer.shape] = got.get(layer.shape, 0) + 1
        assert got == counts, name
    k = model_shapes("llama-3-8b", ["k_proj"])
    assert {l.shape for l in k} == {(1024, 4096)} and len(k) == 32
    assert model_config("bert-base-uncased").name == "bert-base"
    assert model_config("LLAMA-2-7B").name == "llama-2-7b"


def test_target_module_selection():
    assert len(model_shapes("bert-base", ["query", "value"])) == 24
    assert len(model_shapes("bert-base", ["q", "v"])) == 24
    # PEFT suffix rule: "output.dense" also matches "attention.output.dense".
    assert len(model_shapes("bert-base", ["output.dense"])) == 24
    assert len(model_shapes("llama-2-7b", r".*\.(q|v)_proj")) == 64
    with pytest.raises(ValueError, match="matches no layer"):
        model_shapes("bert-base", ["nope"])
    with pytest.raises(ValueError, match="unknown model"):
        model_shapes("gpt-17")
    with pytest.raises(ValueError, match="target_modules"):
        model_shapes("bert-base", [])


@pytest.mark.slow
def test_linear_shapes_of_a_real_bert_match_the_builtin_minilm_set():
    transformers = pytest.importorskip("transformers")
    cfg = MODEL_CONFIGS["all-MiniLM-L6-v2"]
    bert_cfg = transformers.BertConfig(
        vocab_size=64,  # the vocabulary does not change the block shapes; keeps the model small
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads,
    )
    model = transformers.BertModel(bert_cfg)
    walked = linear_shapes(model, r"encoder\..*")
    builtin = model_shapes("all-MiniLM-L6-v2")
    assert [(l.name, l.shape) for l in walked] == [(l.name, l.shape) for l in builtin]
    assert any(l.name == "pooler.dense" for l in linear_shapes(model))


def test_linear_shapes_of_a_real_gqa_llama():
    transformers = pytest.importorskip("transformers")
    llama_cfg = transformers.LlamaConfig(
        vocab_size=32, hidden_size=64, intermediate_size=176, num_hidden_layers=2,
        num_attention_heads=8, num_key_value_heads=2,
    )
    model = transformers.LlamaForCausalLM(llama_cfg)
    layers = linear_shapes(model, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    from tera_tn.analysis.shapes import ModelConfig

    mine = ModelConfig("tiny", "llama", 64, 176, 2, 8, 2, "test")
    expected = [(mine.module_prefix(i) + s, (o, d)) for i in range(2) for s, _, o, d in mine.block_layers()]
    assert [(l.name, l.shape) for l in layers] == expected
    assert {l.shape for l in layers if l.kind == "k_proj"} == {(16, 64)}


def test_linear_shapes_of_a_plain_torch_model_and_errors():
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    assert [(l.name, l.shape) for l in linear_shapes(model)] == [("0", (16, 8)), ("2", (4, 16))]
    with pytest.raises(ValueError, match="nn.Module"):
        linear_shapes([(1, 2)])
    with pytest.raises(ValueError, match="no nn.Linear"):
        linear_shapes(torch.nn.ReLU())
    rep = model_report(model, ["lora:r=2", "tera:order=2"])
    assert rep.n_layers == 2 and rep.rows[0].trainable == 2 * (8 + 16) + 2 * (16 + 4)


def test_llama2_report_matches_the_worked_example():
    """q,k,v,up,down of LLaMA-2-7B, TeRA order 6 full ranks, LoRA 32, VeRA 256 (the documented counts)."""
    rep = model_report(
        "llama-2-7b", ["tera:order=6", "lora:r=32", "vera:r=256", "hira:r=32", "tera:order=6,ranks=0.5"],
        target_modules=["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"],
        achieved="theoretical",  # the structured route is exercised on MiniLM below (cheaper)
    )
    rows = {r.label: r for r in rep.rows}
    assert rows["TeRA order 6"].trainable == 17_088
    assert rows["LoRA r=32"].trainable == 56_098_816
    assert rows["VeRA r=256"].trainable == 917_504
    assert rows["TeRA order 6"].max_rank == 4096 and rows["TeRA order 6"].full_rank_layers == 160
    assert rows["TeRA order 6"].achieved_rank == 4096 and rows["TeRA order 6"].achieved_source == "theoretical"
    assert rows["LoRA r=32"].max_rank == 32 and rows["LoRA r=32"].achieved_rank is None
    assert rows["HiRA r=32"].max_rank == 4096
    reduced = rows["TeRA order 6, ranks=0.5"]
    assert reduced.achieved_rank == reduced.max_rank == 512
    # Adapter file sizes: data in fp32 plus a header that is small next to it for LoRA.
    assert 4 * 56_098_816 < rows["LoRA r=32"].adapter_bytes < 4 * 56_098_816 * 1.001
    assert rows["TeRA order 6"].adapter_bytes < 100 * 4 * 17_088


# ≥ 4 so order 3 (two modes of size ≥ 2 on one side) always exists.
shape_lists = st.lists(st.tuples(st.integers(4, 80), st.integers(4, 80)), min_size=1, max_size=5)


@given(shape_lists, st.sampled_from(("theoretical", "structured")))
def test_report_rows_agree_with_accounting(shapes, achieved):
    methods = ["tera:order=2", "tera:order=3,ranks=0.5", "lora:r=3", "vera:r=5", "hira:r=2"]
    rep = model_report(shapes, methods, achieved=achieved)
    assert rep.dense_params == sum(o * i for o, i in shapes)
    for row, m in zip(rep.rows, methods):
        mm = Method.parse(m)
        kw = {"r": mm.r} if mm.kind != "tera" else {"order": mm.order, "ranks": mm.ranks}
        tot = method_totals(mm.kind, shapes, **kw)
        assert (row.trainable, row.frozen_shared, row.max_rank) == (tot.trainable, tot.frozen_shared, tot.min_max_rank)
        assert row.adapter_bytes == _real_size(adapter_tensors(m, shapes), metadata={"format": "pt"})
        if mm.kind == "tera":
            # Random λ has no zeros: the achieved rank is the maximum rank of each group.
            assert row.achieved_rank == min(g.max_rank for g in row.groups)
            assert all(g.achieved_rank == g.max_rank for g in row.groups)
    d = json.loads(rep.to_json())
    assert [m["label"] for m in d["methods"]] == [r.label for r in rep.rows]


def test_structured_achieved_rank_on_minilm():
    rep = model_report(
        "all-MiniLM-L6-v2", ["tera:order=6", "tera:order=6,ranks=0.5"], target_modules=["query", "value"], achieved="auto"
    )
    for row in rep.rows:
        assert row.achieved_source == "structured"
        assert row.achieved_rank == row.max_rank
        for g in row.groups:
            assert g.achieved_rank_float32 is not None and g.achieved_rank_float32 <= g.achieved_rank


def test_table_and_json_output():
    rep = model_report("all-MiniLM-L6-v2", DEFAULT_METHODS, achieved="theoretical")
    for use_rich in (True, False):
        text = rep.to_table(use_rich=use_rich)
        for r in rep.rows:
            assert r.label in text
        assert "all-MiniLM-L6-v2" in text
    d = rep.to_dict()
    assert d["n_layers"] == 36 and len(d["methods"]) == len(DEFAULT_METHODS)
    assert json.loads(rep.to_json(indent=None)) == json.loads(json.dumps(d))
    assert str(rep) == rep.to_table()


def test_method_parsing():
    assert Method.parse("lora:32") == Method("lora", r=32)
    assert Method.parse("LoRA:r=8") == Method("lora", r=8)
    assert Method.parse("tera:4") == Method("tera", order=4)
    assert Method.parse("tera:order=3x3,ranks=2/2/2/2/2/2,diag=mode") == Method("tera", order=(3, 3), ranks=(2,) * 6, diag="mode")
    assert Method.parse("tera:ranks=0.5").ranks == 0.5 and Method.parse("tera:ranks=4").ranks == 4
    # Without an order the default one is used and named; a diag other than the default is named too.
    assert Method.parse("tera:ranks=0.5").label == "TeRA order 3, ranks=0.5"
    assert Method.parse("tera:order=6,diag=rank").label == "TeRA order 6, diag=rank"
    for bad in ("", "dora:8", "lora", "lora:r=x", "tera:r=4", "vera:order=3", "tera:foo=1"):
        with pytest.raises(ValueError):
            Method.parse(bad)


def test_report_errors():
    with pytest.raises(ValueError, match="achieved"):
        model_report([(4, 4)], ["lora:1"], achieved="dense")
    with pytest.raises(ValueError, match="at least one layer"):
        model_report([], ["lora:1"])
    with pytest.raises(ValueError, match="TeRA order 9"):
        model_report([(4, 4)], ["tera:order=9"])
    with pytest.raises(ValueError, match="unique"):
        model_report([LayerShape("a", 2, 2), LayerShape("a", 3, 3)], ["lora:1"])
    with pytest.raises(ValueError, match="d_out, d_in"):
        model_report([(4,)], ["lora:1"])
    assert TeRASpec.from_shape(384, 384, order=6).num_trainable == 44


# --------------------------------------------------------------------------------------------
# the report folder: ReportSettings, build_report, Report
# --------------------------------------------------------------------------------------------
def _small_report(formats=()):
    from tera_tn.analysis.report_folder import ReportSettings, build_report

    settings = ReportSettings(models=("minilm",), methods=("lora:r=8", "tera"), formats=formats,
                              planner_shape=(256, 256), spectra_shape=(64, 64))
    return build_report(settings)


def test_report_settings_are_checked_when_made_and_name_the_value():
    from tera_tn.analysis.report_folder import ReportSettings

    s = ReportSettings(models=("minilm",), targets=["q", "v"])
    assert s.models == ("all-MiniLM-L6-v2",) and s.targets == ("q", "v") and s.methods == DEFAULT_METHODS
    assert s.to_dict()["method_specs"] == list(DEFAULT_METHODS) and s.to_dict()["targets"] == ["q", "v"]
    with pytest.raises(ValueError, match="no-such-model|unknown"):
        ReportSettings(models=("no-such-model",))
    with pytest.raises(ValueError, match="matches no layer"):
        ReportSettings(models=("minilm",), targets=["nothing"])
    with pytest.raises(ValueError, match="cannot parse method"):
        ReportSettings(methods=("lora:r=zero",))
    with pytest.raises(ValueError, match="ReportSettings formats"):
        ReportSettings(models=("minilm",), formats=("gif",))
    with pytest.raises(ValueError, match="ReportSettings achieved"):
        ReportSettings(models=("minilm",), achieved="sometimes")
    # the figures' layers and seed fail when made, not after every model's table
    with pytest.raises(ValueError, match=r"ReportSettings seed must be an integer >= 0, got -1"):
        ReportSettings(models=("minilm",), seed=-1)
    with pytest.raises(ValueError, match=r"spectra_shape\[1\] \(d_in\) must be a positive integer, got 768.5"):
        ReportSettings(models=("minilm",), spectra_shape=(768, 768.5))
    with pytest.raises(ValueError, match=r"planner_shape must be a layer shape \(d_out, d_in\), got 4096"):
        ReportSettings(models=("minilm",), planner_shape=4096)
    with pytest.raises(ValueError, match="order 6 asks for 2 row modes, but d_out=2"):
        ReportSettings(models=("minilm",), planner_shape=(2, 3))
    assert ReportSettings(models=("minilm",), planner_shape=[64, 64]).planner_spec == TeRASpec.from_shape(64, 64, order=6)


def test_report_renders_text_json_and_readme_without_figures():
    rep = _small_report()
    text = str(rep)
    assert text == rep.to_text() and "all-MiniLM-L6-v2" in text and "LoRA r=8" in text and "TeRA order 3" in text
    data = json.loads(rep.to_json())
    assert data["tool"] == "tera-tn report" and data["settings"]["formats"] == [] and "spectra" not in data
    assert [m["model"] for m in data["models"]] == ["all-MiniLM-L6-v2"]
    assert data["files"] == ["README.md", "report.json", "report.txt"] and rep.plot_files == () and rep.figures() == {}
    assert rep.summary().startswith("1 model(s), 2 methods, 0 plot file(s) in ")
    assert "Written by `tera-tn report --x`" in rep.readme("tera-tn report --x")


def test_report_writes_its_folder_with_figures(tmp_path):
    rep = _small_report(formats=("png",))
    assert rep.plot_files == ("tradeoff-all-MiniLM-L6-v2.png", "spectra.png", "planner.png")
    assert set(rep.figures()) == {"tradeoff-all-MiniLM-L6-v2", "spectra", "planner"}
    seen = []
    files = rep.write(tmp_path, width=100, on_figure=seen.append)
    assert seen == ["tradeoff-all-MiniLM-L6-v2", "spectra", "planner"]
    assert sorted(files) == sorted(p.name for p in tmp_path.iterdir())
    data = json.loads((tmp_path / "report.json").read_text())
    assert all("sv" not in s and len(s["sv_head"]) <= 8 for s in data["spectra"]["series"])
    assert len(rep.plots["spectra"]["series"][0]["sv"]) > 8  # the value keeps its full spectra
    assert (tmp_path / "report.txt").read_text() == rep.to_text(100) + "\n"
    readme = (tmp_path / "README.md").read_text()
    assert "| `planner.png` | planner's predicted time" in readme and "all-MiniLM-L6-v2 (log–log)" in readme


def test_build_report_refuses_what_is_not_settings():
    from tera_tn.analysis.report_folder import build_report

    with pytest.raises(ValueError, match="build_report needs a ReportSettings"):
        build_report({"models": ["minilm"]})
