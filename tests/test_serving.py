"""Mixed-adapter batches (``adapter_names=``) and the AdapterStore, on real PEFT and a tiny Llama.

The reference for every row is the same model run with that row's adapter alone (``set_adapter``)
or with adapters disabled for ``"__base__"`` rows.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
import torch

pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from peft import get_peft_model  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from bad_inputs.teach import Case, assert_teaches, params  # noqa: E402
from tera_tn.peft import AdapterStore, TeraAdapterMismatch, TeraConfig, save_adapter  # noqa: E402
from tera_tn.core.spec import TeRASpec  # noqa: E402
from tera_tn.torch import TeRALinear  # noqa: E402
from tera_tn.torch.bank import FactorBank

TARGETS = ["q_proj", "v_proj", "down_proj"]
ROWS = 6
# Adapters of one family, one of another diag placement, one of another seed (other frozen
# factors), with different α: each layer must group them by frozen network.
ADAPTERS = {
    "a0": dict(order=4, seed=0, alpha=1.0),
    "a1": dict(order=4, seed=0, alpha=2.0),
    "a2": dict(order=4, seed=0, alpha=0.5),
    "both": dict(order=3, seed=0, alpha=1.0, diag="both"),
    "seed7": dict(order=4, seed=7, alpha=1.5),
}


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
    )
    return LlamaForCausalLM(cfg).eval()


def config(**kw) -> TeraConfig:
    return TeraConfig(target_modules=TARGETS, scale_init="random", **kw)


def randomize(model, adapter: str, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if name.endswith(f"tera_lambda.{adapter}"):
            p.data = torch.randn(p.shape, generator=g)


@pytest.fixture(scope="module")
def served():
    """``(model, tokens, {adapter: logits of every row with that adapter alone})``."""
    model = None
    for i, (name, kw) in enumerate(ADAPTERS.items()):
        if model is None:
            model = get_peft_model(tiny_llama(), config(**kw), adapter_name=name)
        else:
            model.add_adapter(name, config(**kw))
        randomize(model, name, seed=10 + i)
    model.eval()
    tokens = torch.randint(0, 96, (ROWS, 7), generator=torch.Generator().manual_seed(1))
    ref = {}
    with torch.no_grad():
        for name in ADAPTERS:
            model.set_adapter(name)
            ref[name] = model(tokens).logits
        with model.disable_adapter():
            ref["__base__"] = model(tokens).logits
    model.set_adapter("a0")
    return model, tokens, ref


def mixed_logits(model, tokens, names):
    with torch.no_grad():
        return model(tokens, adapter_names=list(names)).logits


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_mixed_batch_equals_per_row_single_adapter_forwards(served, data):
    model, tokens, ref = served
    n = data.draw(st.integers(1, ROWS), label="rows")
    names = data.draw(st.lists(st.sampled_from([*ADAPTERS, "__base__"]), min_size=n, max_size=n), label="names")
    out = mixed_logits(model, tokens[:n], names)
    expected = torch.stack([ref[name][i] for i, name in enumerate(names)])
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_distinct_adapters_give_distinct_rows(served):
    # Guards the reference itself: were adapter_names ignored, rows would all use "a0".
    model, tokens, ref = served
    assert (ref["a1"] - ref["a0"]).abs().max() > 1e-2
    assert (ref["both"] - ref["__base__"]).abs().max() > 1e-2


def test_generate_with_mixed_adapters_matches_single_adapter_generate(served):
    model, tokens, _ = served
    names = ["a1", "__base__", "seed7", "a1", "both", "a2"]
    kw = dict(max_new_tokens=5, do_sample=False, pad_token_id=0, attention_mask=torch.ones_like(tokens))
    with torch.no_grad():
        mixed = model.generate(tokens, adapter_names=names, **kw)
        expected = _per_row_generate(model, tokens, names, **kw)
    torch.testing.assert_close(mixed, expected, rtol=0, atol=0)


def _per_row_generate(model, tokens, names, **kw):
    """``generate`` of each row alone, with that row's adapter active (the reference)."""
    rows = []
    for i, name in enumerate(names):
        row = dict(kw, attention_mask=torch.ones_like(tokens[i : i + 1]))
        if name == "__base__":
            with model.disable_adapter():
                rows.append(model.generate(tokens[i : i + 1], **row))
        else:
            model.set_adapter(name)
            rows.append(model.generate(tokens[i : i + 1], **row))
    model.set_adapter("a0")
    return torch.cat(rows)


@pytest.mark.parametrize(
    "how",
    [
        dict(num_beams=2),
        dict(num_beams=2, num_return_sequences=2),
        dict(do_sample=True, top_k=1, num_return_sequences=2),  # top_k=1: sampling without chance
        "generation_config",
    ],
    ids=["num_beams", "beams-and-sequences", "sampled-sequences", "GenerationConfig"],
)
def test_generate_repeats_adapter_names_with_beams_and_returned_sequences(served, how):
    # generate repeats each input row max(num_beams, num_return_sequences) times; adapter_names
    # used to be left at one name per input row ("3 names but 6 rows").
    from transformers import GenerationConfig

    model, tokens, _ = served
    names = ["a1", "__base__", "seed7"]
    base = dict(max_new_tokens=4, pad_token_id=0)
    kw = dict(generation_config=GenerationConfig(num_beams=2, do_sample=False, **base)) if how == "generation_config" else {**base, **how}
    x = tokens[:3]
    with torch.no_grad():
        mixed = model.generate(x, attention_mask=torch.ones_like(x), adapter_names=names, **kw)
        expected = _per_row_generate(model, x, names, **kw)
    assert mixed.shape[0] == 3 * (how.get("num_return_sequences", 1) if isinstance(how, dict) else 1)
    torch.testing.assert_close(mixed, expected, rtol=0, atol=0)


# --- the store ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def store_model(tmp_path_factory):
    """A fresh model whose store holds three adapters read from disk, plus their references."""
    root = tmp_path_factory.mktemp("adapters")
    writer = get_peft_model(tiny_llama(), config(order=4, seed=0), adapter_name="default")
    paths = {}
    for i, alpha in enumerate((1.0, 3.0, 0.25)):
        name = f"user{i}"
        writer.add_adapter(name, config(order=4, seed=0, alpha=alpha))
        randomize(writer, name, seed=40 + i)
        writer.set_adapter(name)
        paths[name] = save_adapter(writer, root / name, selected_adapters=[name]) / name
    writer.eval()
    tokens = torch.randint(0, 96, (4, 5), generator=torch.Generator().manual_seed(2))
    ref = {}
    with torch.no_grad():
        for name in paths:
            writer.set_adapter(name)
            ref[name] = writer(tokens).logits
        with writer.disable_adapter():
            ref["__base__"] = writer(tokens).logits
    model = get_peft_model(tiny_llama(), config(order=4, seed=0), adapter_name="default").eval()
    store = AdapterStore(model)
    for name, path in paths.items():
        store.add(name, path=path)
    return model, store, tokens, ref, root


def test_stored_adapters_serve_mixed_batches_and_switching(store_model):
    model, store, tokens, ref, _ = store_model
    names = ["user2", "__base__", "user0", "user2"]
    out = mixed_logits(model, tokens, names)
    torch.testing.assert_close(out, torch.stack([ref[n][i] for i, n in enumerate(names)]), rtol=1e-5, atol=1e-5)
    store.use("user1")
    try:
        with torch.no_grad():
            torch.testing.assert_close(model(tokens).logits, ref["user1"], rtol=1e-5, atol=1e-5)
    finally:
        store.use(None)


def test_store_remove_and_add_from_loaded_adapter(store_model):
    model, store, tokens, ref, _ = store_model
    weights = {n: p.detach().clone() for n, p in model.named_parameters() if "tera_" not in n}
    store.add("tmp", adapter="default")
    store.remove("user0")
    assert "user0" not in store and set(store.names) == {"user1", "user2", "tmp"}
    # user2 was the last row and moved into user0's slot: it must still be itself.
    out = mixed_logits(model, tokens, ["user2", "user1", "tmp", "__base__"])
    torch.testing.assert_close(out[:2], torch.stack([ref["user2"][0], ref["user1"][1]]), rtol=1e-5, atol=1e-5)
    # "default" starts at zero λ (zero_start would; random here), so compare with the model's own.
    with torch.no_grad():
        torch.testing.assert_close(out[2], model(tokens[2:3]).logits[0], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="user0"):
        mixed_logits(model, tokens, ["user0"] * 4)
    store.remove("tmp")
    store.add("user0", path=store_model[4] / "user0" / "user0")
    assert all(torch.equal(p, weights[n]) for n, p in model.named_parameters() if "tera_" not in n)


def test_store_memory_per_adapter_is_the_lambda_count():
    model = get_peft_model(tiny_llama(), config(order=4, seed=0), adapter_name="default").eval()
    store = AdapterStore(model)
    layers = [m for m in model.modules() if hasattr(m, "tera_spec")]
    sum_r = sum(sum(m.tera_spec["default"].ranks) for m in layers)
    assert all(m.tera_spec["default"].num_trainable == sum(m.tera_spec["default"].ranks) for m in layers)
    before = {n: p.numel() for n, p in model.named_parameters()}
    count = 100
    for i in range(count):
        store.add(f"u{i}", adapter="default")
    assert {n: p.numel() for n, p in model.named_parameters()} == before
    assert store.nbytes / count <= sum_r * 4 + 256 * len(layers)


def test_a_name_lives_in_the_store_or_the_model_never_both():
    # AdapterStore.add("dup") then model.add_adapter("dup") used to succeed: the same adapter_names
    # then served the stored λ (a cached plan) or the model's, depending on what ran before.
    model = get_peft_model(tiny_llama(), config(order=4, seed=0), adapter_name="default").eval()
    randomize(model, "default", seed=3)
    store = AdapterStore(model)
    store.add("dup", adapter="default")
    tokens = torch.randint(0, 96, (2, 5), generator=torch.Generator().manual_seed(4))
    stored = mixed_logits(model, tokens, ["dup", "dup"])
    with pytest.raises(ValueError, match=r"'dup'.*AdapterStore.*store\.remove\('dup'\)"):
        model.add_adapter("dup", config(order=4, seed=3))
    assert "dup" not in model.peft_config
    assert not any("dup" in m.tera_lambda for m in model.modules() if hasattr(m, "tera_lambda"))
    # float32 rounding only: a batch of other rows may run another priced strategy (another GEMM shape)
    torch.testing.assert_close(mixed_logits(model, tokens, ["dup", "__base__"])[0], stored[0], rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="'default'.*already an adapter of the model"):
        store.add("default", adapter="default")
    # Once the store lets it go, the name may go to the model, and then means the model's adapter.
    store.remove("dup")
    model.add_adapter("dup", config(order=4, seed=3))
    randomize(model, "dup", seed=9)
    model.set_adapter("dup")
    with torch.no_grad():
        ref = model(tokens).logits
    torch.testing.assert_close(mixed_logits(model, tokens, ["dup", "dup"]), ref, rtol=1e-5, atol=1e-5)


def test_mixed_plans_follow_adapters_deleted_and_added_again():
    # A layer keeps the plan of the last adapter_names; "x" deleted and added again with another
    # seed must not be grouped with "default" (same frozen network before, another one now).
    model = get_peft_model(tiny_llama(), config(order=4, seed=0), adapter_name="default").eval()
    model.add_adapter("x", config(order=4, seed=0))
    randomize(model, "default", seed=1)
    randomize(model, "x", seed=2)
    tokens = torch.randint(0, 96, (2, 5), generator=torch.Generator().manual_seed(5))
    mixed_logits(model, tokens, ["x", "default"])  # plans: x and default in one group
    model.delete_adapter("x")
    model.add_adapter("x", config(order=4, seed=7))
    randomize(model, "x", seed=2)
    out = mixed_logits(model, tokens, ["x", "default"])
    with torch.no_grad():
        model.set_adapter("x")
        ref_x = model(tokens[:1]).logits
        model.set_adapter("default")
        ref_default = model(tokens[1:]).logits
    torch.testing.assert_close(out, torch.cat([ref_x, ref_default]), rtol=1e-5, atol=1e-5)


# --- plain torch -------------------------------------------------------------------------------------


def test_teralinear_row_lambdas_equal_per_row_layers():
    torch.manual_seed(0)
    spec = TeRASpec.from_shape(24, 20, order=4)
    bank = FactorBank(3)
    layer = TeRALinear(torch.nn.Linear(20, 24), spec, bank=bank, alpha=1.5).eval()
    lams = torch.randn(5, spec.num_trainable)
    x = torch.randn(5, 3, 20)
    with torch.no_grad():
        out = layer(x, row_lambdas=lams)
        expected = []
        for i in range(5):
            layer.tera_lambda["default"].copy_(lams[i])  # a row of the table is the layer's λ layout
            expected.append(layer(x[i : i + 1]))
    torch.testing.assert_close(out, torch.cat(expected), rtol=1e-5, atol=1e-5)


# --- errors -------------------------------------------------------------------------------------------


def _other_family(tmp_path, **kw):
    writer = get_peft_model(tiny_llama(), config(**kw), adapter_name="x")
    return save_adapter(writer, tmp_path / "other", selected_adapters=["x"]) / "x"


def _bad_cases():
    def fresh():
        return get_peft_model(tiny_llama(), config(order=4, seed=0), adapter_name="default").eval()

    tokens = torch.randint(0, 96, (2, 4))

    def call(adapter_names, model=None, train=False):
        def run():
            m = model or fresh()
            m.train(train)
            with torch.no_grad():
                m(tokens, adapter_names=adapter_names)
        return run

    def merged():
        m = fresh()
        m.merge_adapter()
        call(["default", "default"], m)()

    def store_other(parent=False, **kw):
        def run():
            with tempfile.TemporaryDirectory(prefix="tera-serving-") as tmp:  # nothing left behind
                path = _other_family(Path(tmp), **kw)
                AdapterStore(fresh()).add("u", path=path.parent if parent else path)
        return run

    def twice():
        m = fresh()
        AdapterStore(m)
        AdapterStore(m)

    def overwrite():
        s = AdapterStore(fresh())
        s.add("u", adapter="default")
        s.add("u", adapter="default")

    return [
        Case("unknown-name", call(["default", "typo"]), ValueError, ("typo", "default")),
        Case("wrong-length", call(["default"]), ValueError, ("1 names", "2 rows")),
        Case("a-string", call("default"), TypeError, ("list", "'default'")),
        Case("a-list-in-the-list", call(["default", ["default"]]), TypeError, ("adapter_names[1]", "['default']", "list", "str")),
        Case("a-number-in-the-list", call([0, "default"]), TypeError, ("adapter_names[0]", "0", "int", "adapter name")),
        Case("training-mode", call(["default", "default"], train=True), ValueError, ("training",)),
        Case("merged", merged, ValueError, ("merged", "unmerge")),
        Case("store-other-seed", store_other(order=4, seed=5), TeraAdapterMismatch, ("seed: checkpoint 5, model 0",)),
        Case("store-other-spec", store_other(order=3, seed=0), TeraAdapterMismatch, ("differs", "modes")),
        Case("store-twice", twice, ValueError, ("already has an adapterstore",)),
        Case("store-overwrite", overwrite, ValueError, ("'u'", "overwrite=true")),
        Case("store-base-name", lambda: AdapterStore(fresh()).add("__base__", adapter="default"), ValueError, ("__base__",)),
        Case(
            "row-lambdas-shape",
            lambda: TeRALinear(torch.nn.Linear(20, 24))(torch.randn(3, 20), row_lambdas=torch.zeros(2, 5)),
            ValueError,
            ("row_lambdas", "(3,", "(2, 5)"),
        ),
        Case("store-parent-folder", store_other(parent=True, order=4, seed=0), FileNotFoundError, ("subfolder", "['x']")),
        Case("store-remove-unknown", lambda: AdapterStore(fresh()).remove("nobody"), KeyError, ("nobody",)),
    ]


@params(_bad_cases())
def test_serving_errors_teach(case):
    assert_teaches(case)


@settings(max_examples=30, deadline=None)
@given(d_out=st.integers(6, 40), d_in=st.integers(6, 40), order=st.integers(2, 4), adapters=st.integers(1, 4),
       n=st.integers(1, 9), diag=st.sampled_from(["mode", "rank", "both"]), ranks=st.sampled_from(["full", 0.5]),
       seed=st.integers(0, 2**16))
def test_mixed_delta_equals_each_rows_delta_weight(d_out, d_in, order, adapters, n, diag, ranks, seed):
    # float64 reference: each row's own ΔW (delta_weight, padding included) times its row; mode-side
    # diagonals at full ranks run through the kept frozen product, the others through the chain
    from tera_tn import delta_weight, random_factors
    from tera_tn.torch.autograd import mixed_delta
    from tera_tn.torch.frozen import FrozenNetwork

    try:
        spec = TeRASpec.from_shape(d_out, d_in, order=order, diag=diag, ranks=ranks)
    except ValueError:
        return  # a size this order cannot split
    f = random_factors(spec, seed)
    net = FrozenNetwork(spec, torch.as_tensor(f.core), tuple(None if u is None else torch.as_tensor(u) for u in f.factors))
    g = torch.Generator().manual_seed(seed)
    table = torch.randn(adapters, spec.num_trainable, generator=g, dtype=torch.float64)
    alphas = torch.rand(adapters, generator=g, dtype=torch.float64) + 0.5
    rows = torch.randint(0, adapters, (n,), generator=g)
    x = torch.randn(n, d_in, generator=g, dtype=torch.float64)
    sizes = list(spec.scale_sizes)
    want = torch.stack([
        torch.as_tensor(delta_weight(spec, f, [t.numpy() for t in torch.split(table[a], sizes)], float(alphas[a]))) @ x[i]
        for i, a in enumerate(rows.tolist())])
    torch.testing.assert_close(mixed_delta(net, table, alphas, rows, x), want, rtol=1e-10, atol=1e-10)
