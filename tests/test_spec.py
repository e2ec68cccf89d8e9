"""TeRASpec: construction, derived quantities, from_shape factorizations, rank policies, errors."""

from __future__ import annotations

import dataclasses
import math
import re

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from strategies import specs
from tera_tn import TeRASpec
from tera_tn.core.spec import DEFAULT_DIAG, DEFAULT_ORDER
from tera_tn.core.factorize import balanced_factorization, imbalance, padded_factorization


def names_value(message: str, value: object) -> bool:
    """True when ``message`` mentions ``repr(value)`` as a whole token."""
    return re.search(r"(?<![\w.])" + re.escape(repr(value)) + r"(?![\w.])", message) is not None


def raises_naming(value: object, fn, *args, **kwargs) -> str:
    with pytest.raises(ValueError) as info:
        fn(*args, **kwargs)
    msg = str(info.value)
    assert names_value(msg, value), f"error message does not name {value!r}: {msg}"
    return msg


# --- derived quantities -----------------------------------------------------------------------


@given(specs(max_side=None))
def test_derived_quantities(spec):
    p = spec.n_row
    rows, cols, ranks = spec.row_modes, spec.col_modes, spec.ranks
    assert spec.modes == rows + cols
    assert spec.order == len(rows) + len(cols) == len(ranks)
    assert all(1 <= r <= k for r, k in zip(ranks, spec.modes))
    expected_sizes = {"rank": ranks, "mode": spec.modes, "identity": spec.modes,
                      "both": tuple(k + r for k, r in zip(spec.modes, ranks))}[spec.diag]
    assert spec.scale_sizes == expected_sizes
    assert spec.num_trainable == sum(expected_sizes)
    frozen = math.prod(ranks) + (0 if spec.diag == "identity" else sum(k * r for k, r in zip(spec.modes, ranks)))
    assert spec.num_frozen == frozen
    bound = min(math.prod(ranks[:p]), math.prod(ranks[p:]), spec.d_out, spec.d_in)
    # Padding keeps a C-order prefix of the Kronecker rows, which can span less than the bound
    # (rows (2, 2) at ranks (2, 1) keep two rows A_1[0] ⊗ A_2: rank 1).
    assert spec.max_rank == bound if spec.padding == (0, 0) else 1 <= spec.max_rank <= bound
    assert spec.padded_shape == (math.prod(rows), math.prod(cols))
    assert spec.shape == (spec.d_out, spec.d_in)
    assert spec.padding == (math.prod(rows) - spec.d_out, math.prod(cols) - spec.d_in)
    assert spec.padding[0] >= 0 and spec.padding[1] >= 0
    overhead = math.prod(rows) * math.prod(cols) / (spec.d_out * spec.d_in) - 1.0
    assert spec.padding_overhead == pytest.approx(overhead, rel=1e-12, abs=1e-15)
    assert spec.is_full_rank == (ranks == spec.modes)


@given(specs(max_side=None))
def test_str_describes_spec(spec):
    text = str(spec)
    assert f"{spec.d_out}×{spec.d_in}" in text
    assert "·".join(map(str, spec.row_modes)) in text
    assert "·".join(map(str, spec.col_modes)) in text
    assert spec.diag in text
    assert str(spec.num_trainable) in text
    assert str(spec.max_rank) in text
    assert ("padded" in text) == (spec.padding != (0, 0))
    assert ("full" in text) == spec.is_full_rank


@given(specs(max_side=None))
def test_spec_is_frozen_hashable_and_canonical(spec):
    again = TeRASpec(list(spec.row_modes), list(spec.col_modes), list(spec.ranks), spec.diag, spec.d_out, spec.d_in)
    assert again == spec and hash(again) == hash(spec)
    assert isinstance(again.row_modes, tuple) and isinstance(again.ranks, tuple)
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.diag = "mode"  # type: ignore[misc]


@given(specs(max_side=None))
def test_dict_round_trip_is_exact_and_json_ready(spec):
    import json

    d = spec.to_dict()
    assert json.loads(json.dumps(d)) == d
    assert TeRASpec.from_dict(d) == spec


def test_from_dict_rejects_incomplete_dicts():
    with pytest.raises(ValueError, match="row_modes"):
        TeRASpec.from_dict({"col_modes": [2]})
    with pytest.raises(ValueError, match="ranks\\[0\\]=3"):
        TeRASpec.from_dict({"row_modes": [2], "col_modes": [2], "ranks": [3, 2]})


def test_defaults():
    s = TeRASpec((16, 16, 16), (16, 16, 16))
    assert s.ranks == (16,) * 6 and s.diag == "rank" and s.shape == (4096, 4096)
    assert s.num_trainable == 96 and s.num_frozen == 16**6 + 6 * 256 and s.max_rank == 4096
    assert s.padding == (0, 0) and s.padding_overhead == 0.0
    # from_shape takes the adapter study's choice, which explicit modes do not: those keep the paper's side.
    assert (DEFAULT_ORDER, DEFAULT_DIAG) == (3, "mode")
    auto = TeRASpec.from_shape(4096, 4096)
    assert auto.order == DEFAULT_ORDER and auto.diag == DEFAULT_DIAG
    assert auto == TeRASpec.from_shape(4096, 4096, order=3, diag="mode")
    m = TeRASpec((4, 3), (5,), diag="mode", ranks=(2, 1, 3))
    assert m.scale_sizes == (4, 3, 5) and m.num_trainable == 12 and m.max_rank == 2
    i = TeRASpec((4, 3), (5,), diag="identity")
    assert i.num_frozen == 60 and i.num_trainable == 12
    # numpy integers are integers
    assert TeRASpec((np.int64(4),), (np.int32(3),)).modes == (4, 3)


def test_padded_str_reports_overhead():
    s = TeRASpec((10, 10, 10), (10, 10, 10), d_out=997, d_in=997)
    assert s.padding == (3, 3) and s.padded_shape == (1000, 1000)
    assert "padded 1000×1000" in str(s)
    assert f"{s.padding_overhead:.2%}" in str(s)


# --- from_shape ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "d_out, d_in, order, rows, cols",
    [
        (4096, 4096, 6, (16, 16, 16), (16, 16, 16)),
        (768, 768, 6, (12, 8, 8), (12, 8, 8)),
        (1536, 1536, 6, (16, 12, 8), (16, 12, 8)),
        (3072, 3072, 6, (16, 16, 12), (16, 16, 12)),
        (11008, 4096, 6, (43, 16, 16), (16, 16, 16)),
        (4096, 11008, 6, (16, 16, 16), (43, 16, 16)),
    ],
)
def test_from_shape_balanced(d_out, d_in, order, rows, cols):
    s = TeRASpec.from_shape(d_out, d_in, order=order)
    assert s.shape == (d_out, d_in)
    assert sorted(s.row_modes) == sorted(rows) and sorted(s.col_modes) == sorted(cols)
    assert s.padding == (0, 0) and s.padding_overhead == 0.0
    assert s.is_full_rank and s.diag == DEFAULT_DIAG


@pytest.mark.parametrize("d_out, d_in, order", [(997, 997, 6), (50257, 768, 6), (11008, 4096, 12), (11008, 11008, 12), (997, 997, 4)])
def test_from_shape_pads_awkward_sizes(d_out, d_in, order):
    s = TeRASpec.from_shape(d_out, d_in, order=order)
    assert s.shape == (d_out, d_in) and s.order == order
    assert s.padding != (0, 0)
    po, pi = s.padded_shape
    assert po >= d_out and pi >= d_in
    assert 0.0 < s.padding_overhead < 0.01  # small
    assert s.padding_overhead == pytest.approx(po * pi / (d_out * d_in) - 1.0)
    for modes in (s.row_modes, s.col_modes):
        assert min(modes) >= 2 and imbalance(modes) <= 2.0
    assert "padded" in str(s)


def test_from_shape_997_pads_to_1000():
    s = TeRASpec.from_shape(997, 997, order=6)
    assert s.padded_shape == (1000, 1000) and s.row_modes == (10, 10, 10)


def test_from_shape_explicit_split():
    s = TeRASpec.from_shape(4096, 64, order=(4, 2))
    assert s.n_row == 4 and len(s.col_modes) == 2
    assert math.prod(s.row_modes) == 4096 and s.col_modes == (8, 8)


def _qualifies(m: int, k: int, max_imbalance: float = 2.0) -> bool:
    f = balanced_factorization(m, k)
    return min(f) >= 2 and imbalance(f) <= max_imbalance


@given(
    d_out=st.integers(min_value=2, max_value=5000),
    d_in=st.integers(min_value=2, max_value=5000),
    p=st.integers(min_value=1, max_value=4),
    q=st.integers(min_value=1, max_value=4),
)
def test_from_shape_property(d_out, d_in, p, q):
    try:
        s = TeRASpec.from_shape(d_out, d_in, order=(p, q))
    except ValueError:
        # Only legitimate when one side has no qualifying size within 25 % padding.
        assert any(
            not any(_qualifies(m, k) for m in range(d, math.floor(d * 1.25) + 1)) for d, k in ((d_out, p), (d_in, q))
        )
        return
    assert s.shape == (d_out, d_in) and s.n_row == p and s.order == p + q
    for d, modes in ((d_out, s.row_modes), (d_in, s.col_modes)):
        m = math.prod(modes)
        assert d <= m <= d * 1.25
        assert min(modes) >= 2 and imbalance(modes) <= 2.0
        # the smallest qualifying size is used; no padding when d itself qualifies
        assert not any(_qualifies(mm, len(modes)) for mm in range(d, m))
        assert sorted(modes) == sorted(balanced_factorization(m, len(modes)))


def test_rank_policies():
    base = TeRASpec.from_shape(4096, 4096, order=6)
    assert TeRASpec.from_shape(4096, 4096, order=6, ranks="full").ranks == base.modes
    assert TeRASpec.from_shape(4096, 4096, order=6, ranks=None).ranks == base.modes
    assert TeRASpec.from_shape(4096, 4096, order=6, ranks=0.5).ranks == (8,) * 6
    assert TeRASpec.from_shape(4096, 4096, order=6, ranks=0.3).ranks == (5,) * 6  # ceil(4.8)
    assert TeRASpec.from_shape(4096, 4096, order=6, ranks=0.01).ranks == (1,) * 6
    assert TeRASpec.from_shape(4096, 4096, order=6, ranks=1.0).ranks == (16,) * 6
    assert TeRASpec.from_shape(4096, 4096, order=6, ranks=4).ranks == (4,) * 6
    assert TeRASpec.from_shape(4096, 4096, order=6, ranks=100).ranks == (16,) * 6
    assert TeRASpec.from_shape(768, 768, order=6, ranks=10).ranks == (10, 8, 8, 10, 8, 8)
    explicit = (1, 2, 3, 4, 5, 6)
    assert TeRASpec.from_shape(4096, 4096, order=6, ranks=explicit).ranks == explicit
    assert TeRASpec.from_shape(4096, 4096, order=6, ranks=list(explicit)).ranks == explicit
    s = TeRASpec.from_shape(4096, 4096, order=6, ranks=4, diag="mode")
    assert s.diag == "mode" and s.scale_sizes == (16,) * 6


@given(frac=st.floats(min_value=1e-3, max_value=1.0), order=st.integers(2, 6))
def test_fraction_rank_policy_property(frac, order):
    s = TeRASpec.from_shape(4096, 4096, order=order, ranks=frac)
    for r, k in zip(s.ranks, s.modes):
        assert 1 <= r <= k
        assert r == max(1, math.ceil(frac * k - 1e-9))


def test_rank_policy_accepts_numpy_integer():
    """An int-valued numpy scalar is an int rank (sizes accept numbers.Integral everywhere else)."""
    expected = TeRASpec.from_shape(4096, 4096, order=6, ranks=4).ranks
    assert TeRASpec.from_shape(4096, 4096, order=6, ranks=np.int64(4)).ranks == expected


# --- errors ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [0, -3, 2.5, 4.0, True, False, "4", None])
def test_bad_mode_sizes(bad):
    raises_naming(bad, TeRASpec, (4, bad), (4,))
    raises_naming(bad, TeRASpec, (4,), (bad, 2))


@pytest.mark.parametrize("bad", [0, -3, 2.5, 4.0, True, "4"])
def test_bad_d_out_d_in(bad):
    raises_naming(bad, TeRASpec, (4, 4), (4,), None, "rank", bad, None)
    raises_naming(bad, TeRASpec, (4, 4), (4,), None, "rank", None, bad)
    raises_naming(bad, TeRASpec.from_shape, bad, 64)
    raises_naming(bad, TeRASpec.from_shape, 64, bad)


@pytest.mark.parametrize("bad", [16, "16", ()])
def test_bad_mode_sequences(bad):
    with pytest.raises(ValueError):
        TeRASpec(bad, (4,))
    with pytest.raises(ValueError):
        TeRASpec((4,), bad)


def test_ranks_exceed_mode_sizes():
    msg = raises_naming(5, TeRASpec, (4, 4), (4, 4), (4, 5, 4, 4))
    assert "4" in msg
    raises_naming(0, TeRASpec, (4, 4), (4, 4), (4, 0, 4, 4))
    raises_naming(1.5, TeRASpec, (4, 4), (4, 4), (4, 1.5, 4, 4))


def test_wrong_number_of_ranks():
    msg = raises_naming(3, TeRASpec, (4, 4), (4, 4), (4, 4, 4))
    assert names_value(msg, 4)
    raises_naming(5, TeRASpec, (4, 4), (4, 4), (4, 4, 4, 4, 4))
    raises_naming(3, TeRASpec.from_shape, 4096, 4096, order=4, ranks=(4, 4, 4))


@pytest.mark.parametrize("bad", [1, 0, -2])
def test_order_below_two(bad):
    raises_naming(bad, TeRASpec.from_shape, 64, 64, order=bad)


@pytest.mark.parametrize("bad", [2.0, True, "6"])
def test_order_not_an_int(bad):
    raises_naming(bad, TeRASpec.from_shape, 64, 64, order=bad)


def test_order_tuple_errors():
    raises_naming((2, 2, 2), TeRASpec.from_shape, 64, 64, order=(2, 2, 2))
    raises_naming(0, TeRASpec.from_shape, 64, 64, order=(0, 3))


@pytest.mark.parametrize("d, order", [(64, 14), (16, 12), (4096, 30), (5, 5)])
def test_order_too_high(d, order):
    raises_naming(order, TeRASpec.from_shape, d, d, order=order)


def test_unknown_diag():
    raises_naming("left", TeRASpec, (4,), (4,), None, "left")
    raises_naming("Rank", TeRASpec.from_shape, 64, 64, diag="Rank")


def test_identity_needs_full_ranks():
    raises_naming((4, 2), TeRASpec, (4,), (4,), (4, 2), "identity")
    raises_naming((8, 8, 8, 8, 8, 8), TeRASpec.from_shape, 4096, 4096, order=6, ranks=0.5, diag="identity")
    assert TeRASpec((4,), (4,), (4, 4), "identity").diag == "identity"


def test_mode_products_smaller_than_d():
    msg = raises_naming(17, TeRASpec, (4, 4), (4,), None, "rank", 17, None)
    assert names_value(msg, 16)
    msg = raises_naming(5, TeRASpec, (4, 4), (4,), None, "rank", None, 5)
    assert names_value(msg, 4)


@pytest.mark.parametrize("bad", ["half", "Full", 0.0, 1.5, -0.5, float("nan"), 0, -2, True])
def test_bad_rank_policy(bad):
    raises_naming(bad, TeRASpec.from_shape, 4096, 4096, order=6, ranks=bad)


def test_bad_padding_options():
    raises_naming(0.5, TeRASpec.from_shape, 4096, 4096, max_imbalance=0.5)
    # a prime cannot be split without padding
    raises_naming(997, TeRASpec.from_shape, 997, 997, order=6, max_padding=0.0)


# --- balanced_factorization ------------------------------------------------------------------------


def _all_splits(n: int, k: int, cap: int):
    """Every non-increasing k-tuple of positive integers ≤ cap with product n."""
    if k == 1:
        if n <= cap:
            yield (n,)
        return
    for f in range(min(n, cap), 0, -1):
        if n % f == 0:
            for rest in _all_splits(n // f, k - 1, f):
                yield (f,) + rest


@given(n=st.integers(min_value=1, max_value=720), k=st.integers(min_value=1, max_value=5))
def test_balanced_factorization_optimal(n, k):
    got = balanced_factorization(n, k)
    assert len(got) == k and math.prod(got) == n and min(got) >= 1
    assert list(got) == sorted(got, reverse=True)
    best = min((max(s), sum(s)) for s in _all_splits(n, k, n))
    assert (max(got), sum(got)) == best


@pytest.mark.parametrize("n, k, expected", [(4096, 3, (16, 16, 16)), (11008, 3, (43, 16, 16)), (768, 3, (12, 8, 8)), (97, 2, (97, 1))])
def test_balanced_factorization_examples(n, k, expected):
    assert balanced_factorization(n, k) == expected


@pytest.mark.parametrize("n, k", [(0, 2), (-4, 2), (8, 0)])
def test_balanced_factorization_errors(n, k):
    with pytest.raises(ValueError):
        balanced_factorization(n, k)


@given(n=st.integers(min_value=2, max_value=3000), k=st.integers(min_value=1, max_value=4))
def test_padded_factorization_property(n, k):
    try:
        f = padded_factorization(n, k)
    except ValueError as e:
        assert names_value(str(e), n)
        assert not any(_qualifies(m, k) for m in range(n, math.floor(n * 1.25) + 1))
        return
    m = math.prod(f)
    assert n <= m <= n * 1.25 and len(f) == k
    assert min(f) >= 2 and imbalance(f) <= 2.0
    assert not any(_qualifies(mm, k) for mm in range(n, m))


def test_check_modes_is_the_check_every_mode_tuple_goes_through():
    from tera_tn.core.spec import check_modes

    assert check_modes("ranks", np.array([2, 3])) == (2, 3)
    with pytest.raises(ValueError, match=r"ranks\[1\] must be a positive integer, got 0"):
        check_modes("ranks", (2, 0))
    with pytest.raises(ValueError, match="row_modes must hold at least one mode size"):
        check_modes("row_modes", [])
