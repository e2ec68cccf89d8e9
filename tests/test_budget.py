"""specs_for_budget: one TeRA spec per weight shape, the most trainable numbers a budget allows."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tera_tn import TeRASpec
from tera_tn.core.budget import family_members, specs_for_budget

MINILM = {(384, 384): 24, (1536, 384): 6, (384, 1536): 6}  # q/k/v/dense of all-MiniLM-L6-v2
_SHAPES = [(384, 384), (1536, 384), (384, 1536), (64, 96), (100, 30)]


def _total(specs, counts) -> int:
    return sum(specs[s].num_trainable * n for s, n in counts.items())


@settings(max_examples=30, deadline=None)
@given(st.dictionaries(st.sampled_from(_SHAPES), st.integers(1, 12), min_size=1, max_size=2),
       st.floats(0.0, 1.0))
def test_the_most_numbers_that_fit_as_a_brute_force_search_finds(counts, where):
    members = {s: family_members(*s) for s in counts}
    totals = sorted({sum(m.num_trainable * counts[s] for s, m in zip(counts, combo))
                     for combo in itertools.product(*members.values())})
    params = totals[0] + int(where * (totals[-1] - totals[0]))
    specs = specs_for_budget(counts, params)
    assert _total(specs, counts) == max(t for t in totals if t <= params)
    assert all(specs[s] in members[s] for s in counts)


def test_the_library_default_fills_its_own_count_and_vera_r256s_is_filled_exactly():
    default = {s: TeRASpec.from_shape(*s) for s in MINILM}
    assert specs_for_budget(MINILM, _total(default, MINILM)) == default
    vera = specs_for_budget(MINILM, 29_952)  # VeRA r=256's adapter numbers on these layers
    assert _total(vera, MINILM) == 29_952


def test_a_list_of_layer_shapes_counts_each_layer():
    layers = [s for s, n in MINILM.items() for _ in range(n)]
    assert specs_for_budget(layers, 20_000) == specs_for_budget(MINILM, 20_000)


def test_bad_input_is_refused_by_name():
    with pytest.raises(ValueError, match=r"params=100 is below the smallest TeRA adapters .*give params >= "):
        specs_for_budget(MINILM, 100)
    with pytest.raises(ValueError, match=r"layer shapes must be \(d_out, d_in\) pairs, got entry 0: 384"):
        specs_for_budget([384], 1000)
    with pytest.raises(ValueError, match="at least one adapted layer"):
        specs_for_budget([], 1000)
    with pytest.raises(ValueError, match="params"):
        specs_for_budget(MINILM, -5)
