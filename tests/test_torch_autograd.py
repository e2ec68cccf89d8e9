"""The custom autograd path: exact forward, float64 gradcheck for every strategy and variant."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from tera_tn import TeRASpec, apply, init_scales, random_factors  # noqa: E402
from tera_tn.torch.autograd import tera_linear  # noqa: E402
from tera_tn.torch.frozen import FrozenNetwork  # noqa: E402
from tera_tn.torch.planning import layer_plan  # noqa: E402
from tera_tn.torch.factored import expand, project  # noqa: E402

SPECS = {
    "rank-full": TeRASpec((2, 3), (3, 2)),
    "rank-reduced": TeRASpec((2, 3), (3, 2), ranks=(1, 2, 2, 1)),
    "rank-padded": TeRASpec((2, 3), (3, 2), d_out=5, d_in=4),
    "mode-reduced": TeRASpec((2, 3), (3, 2), ranks=(2, 2, 1, 2), diag="mode"),
    "mode-padded": TeRASpec((2, 3), (3, 2), d_out=5, d_in=4, diag="mode"),
    "identity": TeRASpec((2, 3), (3, 2), diag="identity"),
    "identity-padded": TeRASpec((3,), (2, 2), d_out=2, d_in=3, diag="identity"),
    "order3": TeRASpec((2, 2), (3,), ranks=(2, 1, 2)),
}


def _setup(spec, seed=1):
    f = random_factors(spec, seed).as_torch(torch.float64)
    net = FrozenNetwork(spec, f.core, f.factors)
    lams = [torch.tensor(s, dtype=torch.float64, requires_grad=True) for s in init_scales(spec, "random", seed=seed + 2)]
    return f, net, lams


@pytest.mark.parametrize("strategy", ["materialize", "dense", "factored"])
@pytest.mark.parametrize("name", sorted(SPECS))
def test_forward_matches_core_apply(name, strategy):
    spec = SPECS[name]
    f, net, lams = _setup(spec)
    x = torch.randn(2, 3, spec.d_in, dtype=torch.float64)
    w = torch.randn(spec.d_out, spec.d_in, dtype=torch.float64)
    b = torch.randn(spec.d_out, dtype=torch.float64)
    y = tera_linear(x, w, b, net, lams, 0.7, strategy)
    ref = apply(spec, f, lams, x, alpha=0.7) + x @ w.T + b
    assert y.shape == (2, 3, spec.d_out)
    torch.testing.assert_close(y, ref)
    torch.testing.assert_close(tera_linear(x, None, None, net, lams, 0.7, strategy), apply(spec, f, lams, x, alpha=0.7))


@pytest.mark.parametrize("strategy", ["materialize", "dense", "factored"])
@pytest.mark.parametrize("name", sorted(SPECS))
def test_gradcheck_float64(name, strategy):
    spec = SPECS[name]
    _, net, lams = _setup(spec)
    x = torch.randn(4, spec.d_in, dtype=torch.float64, requires_grad=True)
    w = torch.randn(spec.d_out, spec.d_in, dtype=torch.float64, requires_grad=True)
    b = torch.randn(spec.d_out, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, w, b, *l: tera_linear(x, w, b, net, l, 0.7, strategy), (x, w, b, *lams))
    # The adapter branch alone (the dropout path) and a frozen base (the usual training case).
    assert torch.autograd.gradcheck(lambda x, *l: tera_linear(x, None, None, net, l, 0.7, strategy), (x, *lams))
    w_frozen = w.detach()
    assert torch.autograd.gradcheck(lambda x, *l: tera_linear(x, w_frozen, None, net, l, 1.3, strategy), (x, *lams))


@pytest.mark.parametrize("strategy", ["materialize", "dense", "factored"])
def test_gradients_only_where_needed(strategy):
    spec = SPECS["rank-full"]
    _, net, lams = _setup(spec)
    x = torch.randn(3, spec.d_in, dtype=torch.float64)
    w = torch.randn(spec.d_out, spec.d_in, dtype=torch.float64)
    tera_linear(x, w, None, net, lams, 1.0, strategy).sum().backward()
    assert all(lam.grad is not None and lam.grad.abs().sum() > 0 for lam in lams)
    # the λ gradients do not depend on whether x wants one (the backward skips grad_x's work)
    frozen_x = [lam.grad.clone() for lam in lams]
    for lam in lams:
        lam.grad = None
    tera_linear(x.requires_grad_(), w, None, net, lams, 1.0, strategy).sum().backward()
    for a, b in zip(frozen_x, lams):
        torch.testing.assert_close(a, b.grad)


def test_half_precision_inputs_keep_fp32_grads():
    spec = TeRASpec((4, 4), (4, 4))
    f = random_factors(spec, 0).as_torch(torch.float32)
    net32 = FrozenNetwork(spec, f.core, f.factors)
    lams = [torch.tensor(s, dtype=torch.float32, requires_grad=True) for s in init_scales(spec, "random", seed=1)]
    x = torch.randn(8, 16)
    net16 = FrozenNetwork(spec, net32.core.bfloat16(), tuple(u.bfloat16() for u in net32.factors))
    for strategy in ("materialize", "dense", "factored"):
        y = tera_linear(x.bfloat16(), None, None, net16, lams, 1.0, strategy)
        assert y.dtype == torch.bfloat16
        ref = tera_linear(x, None, None, net32, lams, 1.0, strategy)
        torch.testing.assert_close(y.float(), ref, rtol=3e-2, atol=3e-2 * ref.abs().max().item())
        y.float().sum().backward()
        assert all(lam.grad.dtype == torch.float32 for lam in lams)
        for lam in lams:
            lam.grad = None


def test_project_of_one_row_matches_the_batched_form():
    # n = 1 takes its own (rotated) path; a row must project as it does inside a batch
    modes, ranks = (3, 4, 2), (2, 3, 2)
    us = [torch.randn(k, r, dtype=torch.float64) for k, r in zip(modes, ranks)]
    a = torch.randn(3, 24, dtype=torch.float64)
    torch.testing.assert_close(project(a[1:2], us, modes), project(a, us, modes)[1:2])
    b = torch.randn(3, 12, dtype=torch.float64)
    torch.testing.assert_close(expand(b[2:], us, ranks), expand(b, us, ranks)[2:])


def test_project_expand_are_adjoint():
    modes, ranks = (3, 4, 2), (2, 3, 2)
    us = [torch.randn(k, r, dtype=torch.float64) for k, r in zip(modes, ranks)]
    a = torch.randn(5, 24, dtype=torch.float64)
    b = torch.randn(5, 12, dtype=torch.float64)
    lhs = (project(a, us, modes) * b).sum()
    rhs = (a * expand(b, us, ranks)).sum()
    torch.testing.assert_close(lhs, rhs)


def test_layer_plan_prefers_factored_for_few_tokens_and_explains():
    spec = TeRASpec.from_shape(1024, 1024, order=6)
    small = layer_plan(spec, 1, training=False)
    assert small.strategy == "factored"
    assert "factored" in str(small) and "materialize" in str(small)
    with pytest.raises(ValueError, match="n_tokens"):
        layer_plan(spec, 0, training=True)


def test_bad_strategy_and_shape_errors():
    spec = SPECS["rank-full"]
    _, net, lams = _setup(spec)
    with pytest.raises(ValueError, match="strategy"):
        tera_linear(torch.randn(2, spec.d_in, dtype=torch.float64), None, None, net, lams, 1.0, "einsum")
    with pytest.raises(ValueError, match=r"\(\.\.\., 6\)"):
        tera_linear(torch.randn(2, 5, dtype=torch.float64), None, None, net, lams, 1.0, "factored")


from hypothesis import given  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from strategies import alphas, reference_kron, seeds, spec_and_scales  # noqa: E402
from tera_tn import delta_weight  # noqa: E402


@given(spec_and_scales(max_order=5, max_side=48), seeds, alphas, st.integers(1, 5), st.sampled_from(["materialize", "dense", "factored"]))
def test_property_matches_independent_reference_and_autograd(case, seed, alpha, n, strategy):
    """Random specs (every diag, reduced ranks, padding): the output equals the independent
    Kronecker reference and every gradient equals plain autograd through ``delta_weight``."""
    spec, scales = case
    f = random_factors(spec, seed % 1000)
    ft = f.as_torch(torch.float64)
    net = FrozenNetwork(spec, ft.core, ft.factors)
    gen = torch.Generator().manual_seed(seed % 1000)
    x = torch.randn(n, spec.d_in, dtype=torch.float64, generator=gen, requires_grad=True)
    lams = [torch.tensor(s, dtype=torch.float64, requires_grad=True) for s in scales]
    y = tera_linear(x, None, None, net, lams, alpha, strategy)
    ref_dw = torch.as_tensor(reference_kron(spec, f, scales, alpha))
    torch.testing.assert_close(y.detach(), x.detach() @ ref_dw.T, rtol=1e-9, atol=1e-9)
    g = torch.randn(n, spec.d_out, dtype=torch.float64, generator=gen)
    grads = torch.autograd.grad(y, (x, *lams), g)
    x2 = x.detach().requires_grad_()
    lams2 = [lam.detach().requires_grad_() for lam in lams]
    y2 = x2 @ delta_weight(spec, ft, lams2, alpha).T
    ref = torch.autograd.grad(y2, (x2, *lams2), g)
    for a, b in zip(grads, ref):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


def test_thread_count_restored_after_small_kernels():
    """Small factored passes run single-threaded; the caller's setting must come back."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        spec = SPECS["rank-reduced"]
        _, net, lams = _setup(spec)
        x = torch.randn(2, spec.d_in, dtype=torch.float64, requires_grad=True)
        for strategy in ("materialize", "dense", "factored"):
            tera_linear(x, None, None, net, lams, 1.0, strategy).sum().backward()
            assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
