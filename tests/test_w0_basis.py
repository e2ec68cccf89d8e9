"""basis="w0": the rank-side network in W0's singular coordinates, ΔW = α U0 (G ⊙ u vᵀ) V0ᵀ.

Specified against numpy's float64 SVD and the core library's core tensor (no torch code in the
reference); bases checked orthonormal, sorted and sign-fixed, and equal in another process with
another thread count; gradients numerically in float64; both checkpoint formats, merge, mixed
batches, the export and every refusal.
"""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

from tera_tn import TeRASpec, random_factors  # noqa: E402
from tera_tn.torch import (  # noqa: E402
    CheckpointMismatch, TeRALayersConfig, TeRALinear, add_tera, load_tera, read_tera_metadata, save_tera, tera_layers,
)
from tera_tn.torch.bank import FactorBank  # noqa: E402
from tera_tn.torch.w0_basis import basis_sizes, cap_ranks, w0_bases  # noqa: E402

from mixed_batches import assert_each_row_served_by_its_adapter  # noqa: E402
from tiny_models import seeded_mlp  # noqa: E402
from tolerance import assert_matches_golden  # noqa: E402

DATA = Path(__file__).resolve().parent / "data"


def _numpy_bases(w0: np.ndarray, a: int, b: int):
    u, _, vh = np.linalg.svd(w0, full_matrices=False)
    sign = np.sign(u[np.abs(u).argmax(0), np.arange(u.shape[1])])
    return (u * sign)[:, :a], (vh.T * sign)[:, :b]


@settings(max_examples=25, deadline=None)
@given(st.integers(2, 40), st.integers(2, 40), st.integers(0, 5))
def test_bases_are_orthonormal_sorted_and_sign_fixed(d_out, d_in, seed):
    g = torch.Generator().manual_seed(seed)
    w0 = torch.randn(d_out, d_in, generator=g, dtype=torch.float64)
    r = min(d_out, d_in)
    u, v = w0_bases(w0, r, r)
    eye = torch.eye(r, dtype=torch.float64)
    assert torch.allclose(u.T @ u, eye, atol=1e-12) and torch.allclose(v.T @ v, eye, atol=1e-12)
    s = torch.diagonal(u.T @ w0 @ v)
    assert bool((s[:-1] >= s[1:]).all()) and bool((s >= 0).all())  # the pairs of W0's SVD, in order
    assert torch.allclose(u @ torch.diag(s) @ v.T, w0, atol=1e-12)
    assert bool((u.gather(0, u.abs().argmax(0, keepdim=True)) > 0).all())


@settings(max_examples=40, deadline=None)
@given(st.integers(16, 3000), st.integers(16, 3000), st.sampled_from([2, 3, 4]))
def test_capped_ranks_fit_the_bases_and_keep_full_ranks_that_fit(d_out, d_in, order):
    spec = TeRASpec.from_shape(d_out, d_in, order=order, diag="rank")
    capped = cap_ranks(spec)
    a, b = basis_sizes(capped)
    assert a <= min(d_out, d_in) and b <= min(d_out, d_in)
    assert all(1 <= c <= r for c, r in zip(capped.ranks, spec.ranks))
    p = spec.n_row
    for side in (slice(0, p), slice(p, None)):
        if math.prod(spec.ranks[side]) <= min(d_out, d_in):
            assert capped.ranks[side] == spec.ranks[side]


def test_minilm_shapes_cap_to_whole_halves():
    assert cap_ranks(TeRASpec.from_shape(1536, 384, order=3, diag="rank")).ranks == (24, 16, 384)
    assert cap_ranks(TeRASpec.from_shape(384, 1536, order=3, diag="rank")).ranks == (384, 24, 16)


@settings(max_examples=15, deadline=None)
@given(st.integers(0, 3), st.floats(0.1, 5.0), st.sampled_from([(20, 12), (12, 20), (16, 16)]))
def test_delta_is_the_core_in_w0s_singular_coordinates(seed, alpha, shape):
    torch.manual_seed(seed)
    base = nn.Linear(shape[1], shape[0]).double()
    spec = cap_ranks(TeRASpec.from_shape(*shape, order=3, diag="rank"))
    layer = TeRALinear(base, spec, bank=FactorBank(seed, "orthogonal", "float64"), basis="w0", alpha=alpha,
                       scale_init="random")
    lams = [s.detach().double().numpy() for s in layer.scales()]
    p = spec.n_row
    u = lams[0]
    for lam in lams[1:p]:
        u = np.kron(u, lam)
    v = lams[p]
    for lam in lams[p + 1 :]:
        v = np.kron(v, lam)
    a, b = basis_sizes(spec)
    core = random_factors(spec, seed).core.reshape(a, b)
    left, right = _numpy_bases(base.weight.detach().numpy(), a, b)
    want = alpha * left @ (core * np.outer(u, v)) @ right.T
    got = layer.delta_weight(torch.float64).numpy()
    assert np.abs(got - want).max() <= 1e-10 * np.abs(want).max()
    x = torch.randn(3, shape[1], dtype=torch.float64)
    ref = x.numpy() @ (base.weight.detach().numpy() + want).T + base.bias.detach().numpy()
    assert np.abs(layer(x).detach().numpy() - ref).max() <= 1e-10 * np.abs(ref).max()


def test_gradient_of_lambda_and_input():
    torch.manual_seed(3)
    layer = TeRALinear(nn.Linear(12, 20).double(), cap_ranks(TeRASpec.from_shape(20, 12, order=3, diag="rank")),
                       basis="w0", alpha=2.0, scale_init="random")
    x = torch.randn(4, 12, dtype=torch.float64, requires_grad=True)
    lam = layer.tera_lambda["default"].detach().double().requires_grad_(True)

    def f(x, lam):
        return torch.func.functional_call(layer, {"tera_lambda.default": lam}, (x,))

    assert torch.autograd.gradcheck(f, (x, lam))


_OTHER_PROCESS = r"""
import sys, torch
torch.set_num_threads(1)
from torch import nn
from tera_tn.torch import TeRALayersConfig, add_tera, tera_layers
torch.manual_seed(0)
m = nn.Sequential(nn.Linear(96, 160), nn.ReLU(), nn.Linear(160, 96))
add_tera(m, TeRALayersConfig(diag="rank", basis="w0", scale_init="random"))
torch.save({n: l.delta_weight(torch.float64) for n, l in tera_layers(m)}, sys.argv[1])
"""


@pytest.mark.slow
def test_another_process_with_one_thread_builds_the_same_delta(tmp_path):
    script = tmp_path / "other.py"
    script.write_text(_OTHER_PROCESS)
    out = subprocess.run([sys.executable, str(script), str(tmp_path / "d.pt")], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    theirs = torch.load(tmp_path / "d.pt")
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(96, 160), nn.ReLU(), nn.Linear(160, 96))
    add_tera(m, TeRALayersConfig(diag="rank", basis="w0", scale_init="random"))
    for name, layer in tera_layers(m):
        mine = layer.delta_weight(torch.float64)
        # the stated tolerance: well separated singular values give vectors equal to ~eps·σ_max/gap
        assert float((mine - theirs[name]).abs().max()) <= 1e-9 * float(mine.abs().max()), name


def test_torch_checkpoint_round_trips_and_pins_the_base(tmp_path):
    m = seeded_mlp()
    add_tera(m, TeRALayersConfig(diag="rank", basis="w0", scale_init="random"))
    path = save_tera(m, tmp_path / "a.safetensors")
    assert all(e["basis"] == "w0" and e["w0_norm"] > 0 for e in read_tera_metadata(path)["layers"].values())
    plain = seeded_mlp()
    load_tera(plain, path)
    x = torch.randn(3, 12)
    assert torch.equal(plain(x), m(x))
    with pytest.raises(CheckpointMismatch, match=r"layer '2': the adapter's bases came from a base weight of norm"):
        load_tera(seeded_mlp(scale=1.1), path)


def test_peft_round_trip_merge_mixed_batches_and_export(tmp_path):
    pytest.importorskip("peft")
    from peft import PeftModel, get_peft_model

    from tera_tn.peft import TeraAdapterMismatch, TeraConfig, export_lora, save_adapter

    kw = dict(target_modules=["0", "2"], diag="rank", scale_init="random")
    model = get_peft_model(seeded_mlp(), TeraConfig(basis="w0", **kw), adapter_name="w")
    model.add_adapter("r", TeraConfig(alpha=2.0, **kw))  # the same spec on the random factors
    model.eval()
    x = torch.randn(4, 12)
    names = ["w", "r", "__base__", "w"]
    assert_each_row_served_by_its_adapter(model, x, names)
    model.set_adapter("w")
    y = model(x)
    save_adapter(model, tmp_path / "a", selected_adapters=["w"])  # PEFT writes a non-default adapter to a/w
    loaded = PeftModel.from_pretrained(seeded_mlp(), str(tmp_path / "a" / "w"))
    torch.testing.assert_close(loaded(x), y, rtol=0, atol=0)
    with pytest.raises(TeraAdapterMismatch, match="w0_norm"):
        PeftModel.from_pretrained(seeded_mlp(scale=1.1), str(tmp_path / "a" / "w"))
    report = export_lora(model, tmp_path / "lora", adapter_name="w", rank_set=None, check_inputs=x)
    assert report.update_error <= 1e-5
    layer = model.base_model.model[2]
    w0 = layer.get_base_layer().weight.detach().clone()
    dw = layer.get_delta_weight("w")
    model.merge_adapter(["w"])
    torch.testing.assert_close(layer.get_base_layer().weight, w0 + dw, rtol=0, atol=1e-6)
    torch.testing.assert_close(layer.get_delta_weight("w"), dw, rtol=0, atol=0)  # bases fixed at creation
    model.unmerge_adapter()
    torch.testing.assert_close(layer.get_base_layer().weight, w0, rtol=0, atol=1e-6)


def test_golden_delta_of_the_recipe():
    # fixed W0 (seeded), fixed λ: ΔW must never move for adapters saved with W0's bases
    with np.load(DATA / "golden_w0_basis.npz") as z:
        m = seeded_mlp()
        add_tera(m, TeRALayersConfig(diag="rank", basis="w0", factor_dtype="float64"))
        for name, layer in tera_layers(m):
            with torch.no_grad():
                layer.tera_lambda["default"].copy_(torch.as_tensor(z[f"{name}|lambda"]))
            got = layer.delta_weight(torch.float64).numpy()
            # an SVD of another LAPACK build moves the bases by ~eps·σ_max/gap (module docstring)
            assert_matches_golden(got, z[f"{name}|delta"], "float32", reduction=layer.spec.d_out * layer.spec.d_in,
                                  what=name)


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="basis must be one of .*'w0'.*got 'svd'"):
        TeRALayersConfig(basis="svd")
    with pytest.raises(ValueError, match="basis='w0' needs diag='rank'"):
        TeRALayersConfig(basis="w0")  # the default diag is the mode side
    with pytest.raises(ValueError, match="basis='w0' takes update='additive'"):
        TeRALayersConfig(basis="w0", diag="rank", update="multiplicative")
    with pytest.raises(ValueError, match="uses ∏R_row = 20 left and ∏R_col = 12 right singular vectors of W0, which has 12"):
        TeRALinear(nn.Linear(12, 20), TeRASpec.from_shape(20, 12, order=3, diag="rank"), basis="w0")
    with pytest.raises(ValueError, match="needs diag='rank'"):
        TeRALinear(nn.Linear(12, 20), basis="w0")
    layer = TeRALinear(nn.Linear(12, 20), cap_ranks(TeRASpec.from_shape(20, 12, order=3, diag="rank")), basis="w0")
    with pytest.raises(ValueError, match="row_lambdas batches share one factored chain"):
        layer(torch.randn(2, 12), row_lambdas=torch.zeros(2, layer.spec.num_trainable))
