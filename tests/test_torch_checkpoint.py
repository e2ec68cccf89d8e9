"""safetensors adapter checkpoints: round trip, size, every mismatch named, no silent overwrite."""

from __future__ import annotations

import json
import os

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("safetensors")
from torch import nn  # noqa: E402
from tolerance import assert_matches_golden  # noqa: E402

from tera_tn import TeRASpec, __version__  # noqa: E402
from tera_tn.torch import CheckpointMismatch, TeRALayersConfig, add_tera, load_tera, read_tera_metadata, save_tera, tera_layers  # noqa: E402


def _model(seed=0, cfg=None, width=32):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(width, 64), nn.ReLU(), nn.Linear(64, width))
    add_tera(model, cfg or TeRALayersConfig(order=4, seed=7, scale_init="random"))
    return model


def test_round_trip_is_small_and_exact(tmp_path):
    src = _model()
    with torch.no_grad():
        for _, layer in tera_layers(src):
            for lam in layer.scales():
                lam.add_(torch.randn_like(lam))
    path = save_tera(src, tmp_path / "adapter.safetensors")
    assert path.stat().st_size < 4096
    meta = read_tera_metadata(path)
    assert meta["library_version"] == __version__ and meta["layers"]["0"]["seed"] == 7
    assert meta["layers"]["0"]["spec"]["row_modes"] == list(TeRASpec.from_shape(64, 32, order=4).row_modes)
    dst = _model()
    x = torch.randn(5, 32)
    load_tera(dst, path)
    with torch.no_grad():
        torch.testing.assert_close(dst(x), src(x), rtol=0, atol=0)
    raw = path.read_bytes()
    assert b"pickle" not in raw and not raw.startswith(b"PK")  # safetensors header, no zip/pickle container


def test_factors_optional_and_verified(tmp_path):
    src = _model()
    with_f = save_tera(src, tmp_path / "f.safetensors", include_factors=True)
    assert with_f.stat().st_size > save_tera(src, tmp_path / "nf.safetensors").stat().st_size
    load_tera(_model(), with_f)
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(with_f))
    from safetensors import safe_open

    with safe_open(str(with_f), framework="pt") as f:
        meta = f.metadata()
    tensors["factors.g0.core"] = tensors["factors.g0.core"] + 1.0
    save_file(tensors, str(tmp_path / "tampered.safetensors"), metadata=meta)
    with pytest.raises(CheckpointMismatch, match="factors.g0.core differs from the one generated from seed 7"):
        load_tera(_model(), tmp_path / "tampered.safetensors")


def test_refuses_to_overwrite(tmp_path):
    path = tmp_path / "a.safetensors"
    save_tera(_model(), path)
    before = path.read_bytes()
    with pytest.raises(FileExistsError, match="overwrite=True"):
        save_tera(_model(1), path)
    assert path.read_bytes() == before
    save_tera(_model(1), path, overwrite=True)


@pytest.mark.parametrize(
    "cfg, match",
    [
        (TeRALayersConfig(order=4, seed=8), "seed: checkpoint 7, model 8"),
        (TeRALayersConfig(order=4, seed=7, ranks=0.5), r"ranks: checkpoint \[.*\], model \[.*\]"),
        # The saved adapter has the default diagonal side, mode.
        (TeRALayersConfig(order=4, seed=7, diag="rank"), "diag: checkpoint 'mode', model 'rank'"),
        (TeRALayersConfig(order=6, seed=7), "row_modes: checkpoint"),
        (TeRALayersConfig(order=4, seed=7, factor_init="gaussian"), "factor_init: checkpoint 'orthogonal', model 'gaussian'"),
        (TeRALayersConfig(order=4, seed=7, alpha=2.0), "alpha: checkpoint 1.0, model 2.0"),
    ],
)
def test_mismatch_errors_say_what_differs(tmp_path, cfg, match):
    path = save_tera(_model(), tmp_path / "a.safetensors")
    dst = _model(cfg=cfg)
    before = [lam.detach().clone() for _, layer in tera_layers(dst) for lam in layer.scales()]
    with pytest.raises(CheckpointMismatch, match=match):
        load_tera(dst, path)
    after = [lam for _, layer in tera_layers(dst) for lam in layer.scales()]
    assert all(a.equal(b) for a, b in zip(before, after))  # nothing loaded on error


def test_shape_and_missing_layer_errors(tmp_path):
    path = save_tera(_model(), tmp_path / "a.safetensors")
    # one checker for both APIs: the size is the weight shape (d_out, d_in), as PEFT's loader says it
    with pytest.raises(CheckpointMismatch, match=r"weight shape \(d_out, d_in\) differs.*0: shape: checkpoint \[64, 32\], model \[64, 48\]"):
        load_tera(_model(width=48), path)
    torch.manual_seed(0)
    partial = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 32))
    add_tera(partial, TeRALayersConfig(target_modules=["0"], order=4, seed=7))
    with pytest.raises(CheckpointMismatch, match=r"1 adapted layer\(s\) in the checkpoint are not adapted in the model: 2"):
        load_tera(partial, path)
    load_tera(partial, path, strict=False)
    # A missing tensor inside a layer.
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(path))
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    del tensors["2.lambda.1"]
    save_file(tensors, str(tmp_path / "cut.safetensors"), metadata=meta)
    with pytest.raises(CheckpointMismatch, match="'2.lambda.1' is missing"):
        load_tera(_model(), tmp_path / "cut.safetensors")


def test_foreign_file_rejected(tmp_path):
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(2)}, str(tmp_path / "x.safetensors"))
    with pytest.raises(ValueError, match="not a tera_tn checkpoint"):
        load_tera(_model(), tmp_path / "x.safetensors")
    meta = {"tera_tn": json.dumps({"format": 99})}
    save_file({"w": torch.zeros(2)}, str(tmp_path / "y.safetensors"), metadata=meta)
    with pytest.raises(ValueError, match="format 99"):
        load_tera(_model(), tmp_path / "y.safetensors")


def test_save_and_load_sweep_temporaries_of_a_killed_save(tmp_path):
    import subprocess
    import sys

    from tera_tn import atomic_files as files_mod

    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    stale = tmp_path / f".adapter.safetensors.tera-tmp-{files_mod._host_id()}-{proc.pid}-abcdef.tmp"
    stale.write_bytes(b"half a checkpoint")
    live = files_mod.temp_path_in(tmp_path, "other.safetensors")  # a save still running (this process)
    path = save_tera(_model(), tmp_path / "adapter.safetensors")
    assert not stale.exists() and os.path.exists(live)
    stale.write_bytes(b"again")
    load_tera(_model(), path)
    assert not stale.exists()


def test_failed_save_keeps_the_earlier_file_and_leaves_no_temporary(tmp_path, monkeypatch):
    path = save_tera(_model(), tmp_path / "adapter.safetensors")
    before = path.read_bytes()
    from tera_tn import atomic_files as files_mod

    def disk_error(fd):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(files_mod.os, "fsync", disk_error)
    with pytest.raises(OSError, match="Input/output error"):
        save_tera(_model(1), path, overwrite=True)
    assert path.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["adapter.safetensors"]


def test_load_refuses_non_finite_lambda_and_loads_nothing(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    path = save_tera(_model(), tmp_path / "a.safetensors")
    tensors = load_file(str(path))
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    tensors["2.lambda.0"][1] = float("nan")
    save_file(tensors, str(tmp_path / "nan.safetensors"), metadata=meta)
    dst = _model(3)
    before = [lam.detach().clone() for _, layer in tera_layers(dst) for lam in layer.scales()]
    with pytest.raises(ValueError, match=r"(?s)nan.safetensors holds non-finite λ.*2.lambda.0 has 1 of"):
        load_tera(dst, tmp_path / "nan.safetensors")
    after = [lam for _, layer in tera_layers(dst) for lam in layer.scales()]
    assert all(a.equal(b) for a, b in zip(before, after))


def test_load_refuses_another_factor_dtype(tmp_path):
    path = save_tera(_model(cfg=TeRALayersConfig(order=4, seed=7, factor_dtype="float64")), tmp_path / "a.safetensors")
    with pytest.raises(CheckpointMismatch, match="factor_dtype: checkpoint 'float64', model 'float32'"):
        load_tera(_model(), path)


def test_load_of_a_folder_names_it(tmp_path):
    with pytest.raises(IsADirectoryError, match=f"{tmp_path.name} is a folder; expected a checkpoint"):
        load_tera(_model(), tmp_path)


# --- self-describing: loading into the plain base model ----------------------------------------

_PLAIN_LOAD = """
import sys, torch
from torch import nn
from tera_tn.torch import load_tera, tera_layers
torch.manual_seed(0)
model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 32))
load_tera(model, sys.argv[1])
x = torch.load(sys.argv[2])
with torch.no_grad():
    torch.save(model(x), sys.argv[3])
print(sorted(name for name, _ in tera_layers(model)), sorted(n for n, p in model.named_parameters() if p.requires_grad))
"""


def test_load_into_a_plain_model_in_a_fresh_process_rebuilds_the_adapter(tmp_path):
    import subprocess
    import sys

    cfg = TeRALayersConfig(order=4, seed=7, alpha=3.0, diag="both", factor_init="gaussian", factor_dtype="float64")
    src = _model(cfg=cfg)
    opt = torch.optim.Adam([p for p in src.parameters() if p.requires_grad], lr=0.05)
    x = torch.randn(6, 32)
    for _ in range(3):
        opt.zero_grad()
        src(x).pow(2).mean().backward()
        opt.step()
    path = save_tera(src, tmp_path / "adapter.safetensors")
    torch.save(x, tmp_path / "x.pt")
    out = subprocess.run(
        [sys.executable, "-c", _PLAIN_LOAD, str(path), str(tmp_path / "x.pt"), str(tmp_path / "y.pt")],
        capture_output=True, text=True, timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.split("] [")[0] == "['0', '2'"
    assert "0.base_layer.weight" not in out.stdout and "0.tera_lambda.default" in out.stdout
    with torch.no_grad():
        want = src(x)
    assert want.abs().max() > 0
    torch.testing.assert_close(torch.load(tmp_path / "y.pt"), want, rtol=0, atol=0)


def test_load_into_a_plain_model_with_other_shapes_names_the_layer_and_changes_nothing(tmp_path):
    path = save_tera(_model(), tmp_path / "a.safetensors")
    plain = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 48))
    with pytest.raises(CheckpointMismatch, match=r"layer '2': the checkpoint adapts a 32×64 weight \(out × in\), "
                                                 r"the model's Linear is 48×64"):
        load_tera(plain, path)
    assert [type(m) for m in plain] == [nn.Linear, nn.ReLU, nn.Linear]
    assert all(p.requires_grad for p in plain.parameters())
    with pytest.raises(CheckpointMismatch, match="layer '2' is a ReLU in the model"):
        load_tera(nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.ReLU()), path)
    with pytest.raises(CheckpointMismatch, match="layer '2' of the checkpoint is not a module of the model"):
        load_tera(nn.Sequential(nn.Linear(32, 64)), path)
    only_first = nn.Sequential(nn.Linear(32, 64))
    load_tera(only_first, path, strict=False)
    assert [name for name, _ in tera_layers(only_first)] == ["0"]


def test_failed_load_into_a_plain_model_puts_it_back(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    path = save_tera(_model(), tmp_path / "a.safetensors")
    tensors = load_file(str(path))
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    tensors["2.lambda.0"][0] = float("inf")
    save_file(tensors, str(tmp_path / "inf.safetensors"), metadata=meta)
    plain = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 32))
    with pytest.raises(ValueError, match="non-finite λ"):
        load_tera(plain, tmp_path / "inf.safetensors")
    assert [type(m) for m in plain] == [nn.Linear, nn.ReLU, nn.Linear] and not list(tera_layers(plain))
    assert all(p.requires_grad for p in plain.parameters())


def test_legacy_checkpoint_loads_into_a_plain_model():
    import numpy as np
    from pathlib import Path

    data = Path(__file__).resolve().parent / "data"
    plain = nn.Sequential()
    plain.up, plain.down = nn.Linear(12, 24), nn.Linear(24, 12)
    load_tera(plain, data / "legacy_torch.safetensors")
    with np.load(data / "legacy_torch_delta.npz") as want:
        for name in ("up", "down"):
            layer = getattr(plain, name)
            assert_matches_golden(layer.delta_weight(torch.float64).numpy(), want[name], torch.float64,
                                  int(np.prod(layer.spec.ranks)), f"{name}: ΔW")
