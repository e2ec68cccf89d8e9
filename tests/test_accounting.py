"""Parameter accounting: per-layer counts, model totals, the LLaMA-2-7B example."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from strategies import specs
from tera_tn import TeRASpec
from tera_tn.analysis.accounting import layer_cost, method_totals
from tera_tn.analysis.accounting import total_params

dims = st.integers(min_value=1, max_value=20000)
ranks_r = st.integers(min_value=1, max_value=512)

# LLaMA-2-7B: q, k, v (4096×4096), up (11008×4096), down (4096×11008) in each of 32 layers.
LLAMA_LAYER = [(4096, 4096)] * 3 + [(11008, 4096), (4096, 11008)]
LLAMA = LLAMA_LAYER * 32


@given(dims, dims, ranks_r)
def test_baseline_layer_formulas(d_out, d_in, r):
    cap = min(d_out, d_in)
    lora = layer_cost("lora", d_out, d_in, r=r)
    assert (lora.method, lora.d_out, lora.d_in) == ("lora", d_out, d_in)
    assert lora.trainable == r * (d_in + d_out) and lora.max_rank == min(r, cap)
    vera = layer_cost("vera", d_out, d_in, r=r)
    assert vera.trainable == d_out + r and vera.max_rank == min(r, cap)
    hira = layer_cost("hira", d_out, d_in, r=r)
    # HiRA: ΔW = W0 ⊙ BA; rank ≤ rank(W0)·r, with W0 full rank assumed
    assert hira.trainable == r * (d_in + d_out) and hira.max_rank == min(cap * r, cap) == cap


@given(specs(max_side=None))
def test_tera_layer_formula(spec):
    c = layer_cost("tera", spec.d_out, spec.d_in, spec=spec)
    assert c.method == "tera" and (c.d_out, c.d_in) == spec.shape
    sizes = {"rank": spec.ranks, "mode": spec.modes, "identity": spec.modes,
             "both": [k + r for k, r in zip(spec.modes, spec.ranks)]}[spec.diag]
    assert c.trainable == sum(sizes)
    p = spec.n_row
    bound = min(math.prod(spec.ranks[:p]), math.prod(spec.ranks[p:]), spec.d_out, spec.d_in)
    # Padding keeps a C-order prefix of the Kronecker rows, which can have a lower rank.
    assert c.max_rank == bound if spec.padding == (0, 0) else c.max_rank <= bound


@given(st.lists(st.sampled_from([(64, 64), (64, 96), (96, 64), (100, 81), (27, 8)]), min_size=1, max_size=12), ranks_r)
def test_totals_are_sums_and_frozen_counted_once(shapes, r):
    for method in ("lora", "vera", "hira"):
        t = method_totals(method, shapes, r=r)
        assert t.method == method and len(t.layers) == len(shapes)
        assert t.trainable == sum(layer_cost(method, o, i, r=r).trainable for o, i in shapes)
        assert t.min_max_rank == min(layer_cost(method, o, i, r=r).max_rank for o, i in shapes)
        expected_frozen = r * (max(i for _, i in shapes) + max(o for o, _ in shapes)) if method == "vera" else 0
        assert t.frozen_shared == expected_frozen
        assert str(r) in t.label
    t = method_totals("tera", shapes, order=4)
    group_specs = {s: TeRASpec.from_shape(*s, order=4) for s in set(shapes)}
    assert t.trainable == sum(group_specs[s].num_trainable for s in shapes)
    frozen = 0
    for spec in group_specs.values():  # one frozen set per shape group, however many layers use it
        frozen += math.prod(spec.ranks) + sum(k * rr for k, rr in zip(spec.modes, spec.ranks))
    assert t.frozen_shared == frozen
    assert t.full_rank_layers == sum(lc.max_rank == min(lc.d_out, lc.d_in) for lc in t.layers)


def test_explicit_specs_and_shape_groups():
    a = TeRASpec((4, 4), (4, 4))
    b = TeRASpec((4, 4), (4, 4), ranks=(2, 2, 2, 2))
    t = method_totals("tera", [(16, 16)] * 3, specs=[a, a, b])
    assert t.trainable == 16 + 16 + 8
    assert t.frozen_shared == (256 + 64) + (16 + 32)
    assert t.min_max_rank == 4
    assert t.full_rank_layers == 2


def test_llama2_7b_example():
    """LLaMA-2-7B q,k,v,up,down: TeRA order 6 full ranks 17,088; LoRA r=32 56,098,816; VeRA r=256 917,504."""
    tera = method_totals("tera", LLAMA, order=6)
    assert tera.trainable == 17_088
    assert tera.min_max_rank == 4096 and tera.full_rank_layers == len(LLAMA)
    # three shape groups: 4096×4096, 11008×4096, 4096×11008
    square = 16**6 + 3 * 256 * 2
    rect = 43 * 16**5 + (43 * 43 + 5 * 256)
    assert tera.frozen_shared == square + 2 * rect
    lora = method_totals("lora", LLAMA, r=32)
    assert lora.trainable == 56_098_816 and lora.frozen_shared == 0 and lora.min_max_rank == 32
    vera = method_totals("vera", LLAMA, r=256)
    assert vera.trainable == 917_504
    assert vera.frozen_shared == 256 * (11008 + 11008)
    hira = method_totals("hira", LLAMA, r=32)
    assert hira.trainable == lora.trainable and hira.min_max_rank == 4096
    assert total_params(LLAMA) == 32 * (3 * 4096**2 + 2 * 11008 * 4096)


def test_llama2_7b_per_layer_tera():
    assert layer_cost("tera", 4096, 4096, spec=TeRASpec.from_shape(4096, 4096, order=6)).trainable == 96
    up = TeRASpec.from_shape(11008, 4096, order=6)
    assert sorted(up.row_modes) == [16, 16, 43] and layer_cost("tera", 11008, 4096, spec=up).trainable == 123


@pytest.mark.parametrize("method", ["lora", "vera", "hira"])
@pytest.mark.parametrize("bad", [0, -4, 2.5, True, None, "8"])
def test_bad_r(method, bad):
    with pytest.raises(ValueError) as info:
        layer_cost(method, 64, 64, r=bad)
    assert repr(bad) in str(info.value)
    with pytest.raises(ValueError):
        method_totals(method, [(64, 64)], r=bad)


def test_tera_needs_matching_spec():
    with pytest.raises(ValueError, match="TeRASpec"):
        layer_cost("tera", 64, 64)
    with pytest.raises(ValueError, match=r"\(64, 32\)"):
        layer_cost("tera", 64, 32, spec=TeRASpec((8, 8), (8, 8)))
    with pytest.raises(ValueError, match="2 specs for 3"):
        method_totals("tera", [(16, 16)] * 3, specs=[TeRASpec((4, 4), (4, 4))] * 2)


def test_bad_method_and_empty_shapes():
    with pytest.raises(ValueError, match="'dora'"):
        layer_cost("dora", 64, 64, r=4)
    with pytest.raises(ValueError, match="'LoRA'"):
        method_totals("LoRA", [(64, 64)], r=4)
    for method in ("lora", "tera"):
        with pytest.raises(ValueError, match="at least one"):
            method_totals(method, [], r=4)
