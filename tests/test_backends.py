"""One dispatch, three backends: the math core on numpy, torch and JAX gives the numpy float64
answer, in the backend it was given."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import tera_tn.backends as B
from tera_tn import TeRASpec, apply, delta_weight, init_scales, matricize, plan, random_factors, tensorize, theoretical_rank
from tera_tn.contract.costmodel import calibrate
from tera_tn.core.modeproduct import multi_mode_product
from tera_tn.analysis.rank import numerical_rank, rank_summary, singular_values, stable_rank
from tera_tn.analysis.spectrum import tera_rank_summary, tera_singular_values

jax = pytest.importorskip("jax")
jax.config.update("jax_enable_x64", True)
import jax.numpy as jnp  # noqa: E402

# Each backend: (name, numpy float64 array -> native float64 array, array type).
BACKENDS = {
    "numpy": (lambda a: np.asarray(a, dtype=np.float64), np.ndarray),
    "torch": (lambda a: torch.as_tensor(np.asarray(a, dtype=np.float64)), torch.Tensor),
    "jax": (lambda a: jnp.asarray(np.asarray(a, dtype=np.float64)), jax.Array),
}
# Padded rows and columns (5 × 5 in 6 × 6) and an unpadded, reduced-rank spec, in every placement.
SPECS = [
    TeRASpec((2, 3), (3, 2), d_out=5, d_in=5),
    TeRASpec((2, 3), (3, 2), d_out=5, d_in=5, diag="identity"),
    TeRASpec((2, 3), (3, 2), d_out=5, d_in=5, diag="both"),
    TeRASpec((3, 2), (4, 2), ranks=(2, 2, 3, 1), diag="mode"),
    TeRASpec((3, 2), (4, 2), ranks=(2, 2, 3, 1)),
]


@pytest.fixture(params=list(BACKENDS))
def backend(request):
    return request.param


def native(backend, a):
    return BACKENDS[backend][0](a)


def assert_native(backend, x, like_numpy, tol=1e-10):
    assert isinstance(x, BACKENDS[backend][1]), f"{backend} input gave a {type(x).__name__}"
    assert B.backend_key(x) == (backend, "cpu", "float64")
    got = B.to_numpy(x)
    assert got.shape == np.shape(like_numpy)
    scale = max(1.0, float(np.abs(like_numpy).max(initial=0.0)))
    assert np.abs(got - like_numpy).max(initial=0.0) <= tol * scale


def operands(spec, backend, seed=3):
    f = random_factors(spec, seed)
    scales = init_scales(spec, "random", seed=seed)
    like = native(backend, np.zeros(0))
    return f, list(scales), f.to(like), [native(backend, s) for s in scales]


def test_dispatch_is_inferred_from_the_array_type():
    assert B.namespace(jnp.zeros(2)).name == "jax"
    assert B.namespace(torch.zeros(2)).name == "torch"
    assert B.namespace(np.zeros(2)).name == "numpy"
    assert B.namespace([1.0, 2.0]).name == "numpy" and not B.is_array([1.0, 2.0])
    assert B.get_func("svdvals", jnp.eye(2)) is B.namespace(jnp.eye(2)).svdvals
    # torch or JAX beats numpy when operands are mixed, whatever the order
    assert B.pick_like(np.zeros(1), jnp.zeros(1)).__class__ is jnp.zeros(1).__class__
    assert B.to_like(torch.ones(2), jnp.zeros(0, dtype=jnp.float32)).dtype == jnp.float32


@pytest.mark.parametrize("spec", SPECS[:1] + SPECS[3:4], ids=str)
def test_tensorize_roundtrip(backend, spec):
    w = np.random.default_rng(0).standard_normal(spec.shape)
    t = tensorize(spec, native(backend, w))
    ref = np.pad(w, ((0, spec.padding[0]), (0, spec.padding[1]))).reshape(spec.modes)
    assert_native(backend, t, ref, tol=0)
    assert_native(backend, matricize(spec, t), w, tol=0)


@pytest.mark.parametrize("spec", SPECS, ids=str)
def test_delta_weight_and_apply(backend, spec):
    f, scales, fb, sb = operands(spec, backend)
    ref = delta_weight(spec, f, scales, alpha=0.7)
    assert_native(backend, delta_weight(spec, fb, sb, alpha=0.7), ref)
    x = np.random.default_rng(1).standard_normal((2, 3, spec.d_in))
    for strategy in ("materialize", "factored", "auto"):
        y = apply(spec, fb, sb, native(backend, x), alpha=0.7, strategy=strategy)
        assert_native(backend, y, x @ ref.T)
    # numpy operands with a native x compute in x's backend
    assert_native(backend, apply(spec, f, scales, native(backend, x), alpha=0.7), x @ ref.T)
    empty = apply(spec, fb, sb, native(backend, np.zeros((0, spec.d_in))))
    assert_native(backend, empty, np.zeros((0, spec.d_out)))


@pytest.mark.parametrize("spec", SPECS, ids=str)
def test_ranks_and_structured_spectrum(backend, spec):
    f, scales, fb, sb = operands(spec, backend)
    scales[0] = np.where(np.arange(scales[0].size) % 2 == 0, 0.0, scales[0])  # some exact zeros
    sb[0] = native(backend, scales[0])
    assert theoretical_rank(spec, sb) == theoretical_rank(spec, scales)
    dw = delta_weight(spec, f, scales)
    sv = np.linalg.svd(dw, compute_uv=False)
    assert_native(backend, singular_values(native(backend, dw)), sv)
    assert_native(backend, tera_singular_values(spec, fb, sb), sv)
    assert numerical_rank(native(backend, dw)) == numerical_rank(dw)
    assert stable_rank(native(backend, dw)) == pytest.approx(stable_rank(dw), rel=1e-10)
    ours, ref = rank_summary(native(backend, dw)), rank_summary(dw)
    assert (ours.numerical_rank, ours.energy_rank, ours.dtype) == (ref.numerical_rank, ref.energy_rank, ref.dtype)
    assert ours.effective_rank == pytest.approx(ref.effective_rank, rel=1e-9)
    assert tera_rank_summary(spec, fb, sb).numerical_rank == tera_rank_summary(spec, f, scales).numerical_rank


def test_plan_keys_by_backend():
    spec = SPECS[0]
    p_jax = plan(spec, 16, backend="jax", dtype="float64")
    p_np = plan(spec, 16, backend="numpy", dtype="float64")
    assert p_jax.backend == ("jax", "cpu", "float64") and p_np.backend == ("numpy", "cpu", "float64")
    assert p_jax is not p_np and "jax/cpu/float64" in str(p_jax)
    with pytest.raises(ValueError, match="backend must be one of .*'jax'.*got 'jnp'"):
        plan(spec, 16, backend="jnp")
    with pytest.raises(ValueError, match="device must be one of .*for backend 'jax', got 'cuda'"):
        plan(spec, 16, backend="jax", device="cuda")


def test_calibrate_times_jax_kernels():
    """calibrate measures the backend it is asked for (JAX: allocating matmuls, block_until_ready)."""
    model = calibrate(backend="jax", dtype="float32", install=False)
    assert model.source == "calibrated" and model.peak_flops > 0
    assert plan(SPECS[0], 16, backend="jax", dtype="float32", model=model).model is model


def test_jax_is_differentiable_through_delta_weight():
    """The plain chain the JAX backend takes is traceable: jax.grad agrees with torch autograd."""
    spec = SPECS[4]
    f, scales, fj, sj = operands(spec, "jax")
    c = np.random.default_rng(5).standard_normal(spec.shape)
    grads = jax.grad(lambda s: jnp.sum(delta_weight(spec, fj, s) * c))(sj)
    st = [torch.tensor(s, requires_grad=True) for s in scales]
    (delta_weight(spec, f.as_torch(dtype=torch.float64), st) * torch.from_numpy(c)).sum().backward()
    for g, t in zip(grads, st):
        assert_native("jax", g, t.grad.numpy())


def test_mode_product_refuses_what_jax_cannot_do():
    core = jnp.ones((2, 3))
    with pytest.raises(TypeError, match="out= needs a writable array; jax arrays are immutable"):
        multi_mode_product(core, [jnp.ones((4, 2)), None], out=jnp.zeros((4, 3)))
    with pytest.raises(TypeError, match=r"matrices\[0\] is a numpy array, core a jax array; expected one backend"):
        multi_mode_product(core, [np.ones((4, 2)), None])
    assert_native("jax", multi_mode_product(core, [None, None]), np.ones((2, 3)), tol=0)
