"""Faults with real processes and real files: SIGKILL during a save, a full disk, concurrent reports.

Each test asserts that nothing saved earlier is lost and that no temporary file remains.
"""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("safetensors")
from tera_tn.torch import load_tera, save_tera  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
           MPLBACKEND="Agg")

# Factors included and 1024-wide: a ~12 MB file, so a save takes long enough to be caught mid-way.
_TORCH_MODEL = """
import torch
from torch import nn
from tera_tn.torch import TeRALayersConfig, add_tera
def make(width=1024):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(width, width))
    add_tera(net, TeRALayersConfig(order=2, seed=1, factor_init="gaussian", scale_init="random"))
    return net
"""
_PEFT_MODEL = """
import torch
from torch import nn
from peft import get_peft_model
from tera_tn.peft import TeraConfig
class Net(nn.Module):
    def __init__(self, width):
        super().__init__()
        self.lin = nn.Linear(width, width)
    def forward(self, x):
        return self.lin(x)
def make(width=1024, save_factors=True):
    torch.manual_seed(0)
    return get_peft_model(Net(width), TeraConfig(target_modules=["lin"], order=2, seed=1, factor_init="gaussian",
                                                 scale_init="random", save_factors=save_factors))
"""
_LOOPS = {
    "torch": _TORCH_MODEL + textwrap.dedent("""
        import sys
        from tera_tn.torch import save_tera
        net, path = make(), sys.argv[1]
        save_tera(net, path, include_factors=True)
        print("saved", flush=True)
        while True:
            save_tera(net, path, include_factors=True, overwrite=True)
        """),
    "peft": _PEFT_MODEL + textwrap.dedent("""
        import sys
        from tera_tn.peft import save_adapter
        model, path = make(), sys.argv[1]
        save_adapter(model, path)
        print("saved", flush=True)
        while True:
            save_adapter(model, path, overwrite=True)
        """),
}


def _namespace(code: str) -> dict:
    ns: dict = {}
    exec(code, ns)  # the same model definitions the child processes run
    return ns


def _temps(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if ".tera-tmp-" in p.name or p.name.startswith(".tmp"))


def _snapshot(folder: Path) -> dict[str, bytes]:
    """The finished files under ``folder``; temporaries are skipped unread (a running save may
    remove them at any moment)."""
    files = (p for p in sorted(folder.rglob("*")) if ".tera-tmp-" not in str(p.relative_to(folder)))
    return {str(p.relative_to(folder)): p.read_bytes() for p in files if p.is_file()}


def _kill_mid_save(kind: str, folder: Path, target: Path, attempts: int = 3) -> dict[str, bytes]:
    """Start a child that saves ``target`` in a loop, SIGKILL it while one of its temporaries
    exists, and return the folder's contents right after its first, complete save. Retries when
    the kill landed between two saves; fails if it never lands mid-save (the test would prove nothing)."""
    for _ in range(attempts):
        proc = subprocess.Popen([sys.executable, "-c", _LOOPS[kind], str(target)], env=ENV, cwd=folder,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            assert proc.stdout.readline().strip() == "saved", proc.stderr.read()
            earlier = _snapshot(folder)
            deadline = time.monotonic() + 30
            while not any(".tera-tmp-" in name for name in os.listdir(folder)):
                assert time.monotonic() < deadline, "the child never started a second save"
            proc.send_signal(signal.SIGKILL)
        finally:
            proc.kill()
            proc.wait()  # reap it: a zombie's pid still looks alive to the sweep
            proc.stdout.close()
            proc.stderr.close()
        if _temps(folder):
            return earlier
    pytest.fail(f"SIGKILL never landed during a {kind} save in {attempts} attempts")


def test_sigkill_during_save_tera_keeps_earlier_file_and_next_save_sweeps(tmp_path):
    target = tmp_path / "adapter.safetensors"
    earlier = _kill_mid_save("torch", tmp_path, target)
    stale = _temps(tmp_path)
    assert stale and all(".tera-tmp-" in s for s in stale)  # named so they can be swept
    assert _snapshot(tmp_path)[target.name] == earlier[target.name]
    net = _namespace(_TORCH_MODEL)["make"]()
    load_tera(net, target)  # the earlier checkpoint is complete and loads
    save_tera(net, tmp_path / "next.safetensors")  # the next save into the folder sweeps
    assert _temps(tmp_path) == []


def test_sigkill_during_save_adapter_keeps_earlier_files_and_next_save_sweeps(tmp_path):
    pytest.importorskip("peft")
    from tera_tn.peft import save_adapter
    from tera_tn.peft.io import read_adapter_signature

    target = tmp_path / "adapter"
    earlier = _kill_mid_save("peft", tmp_path, target)
    assert _temps(tmp_path)
    now = _snapshot(tmp_path)
    for name in ("adapter/adapter_config.json", "adapter/adapter_model.safetensors"):
        assert now[name] == earlier[name]
    assert read_adapter_signature(target)["seed"] == 1
    save_adapter(_namespace(_PEFT_MODEL)["make"](width=64), tmp_path / "next")
    assert _temps(tmp_path) == []


# --- a full disk ------------------------------------------------------------------------------


@pytest.fixture(params=["tmpfs", "simulated"])
def full_disk(request, tmp_path, monkeypatch):
    """A folder on a 4 MB file system (a real tmpfs where this process may mount one), or, as a
    fallback and always in addition, one where the final flush of a file fails with ENOSPC."""
    folder = tmp_path / "disk"
    folder.mkdir()
    if request.param == "tmpfs":
        mount = ["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(folder)]
        if os.geteuid() != 0 or subprocess.run(mount, capture_output=True).returncode != 0:
            pytest.skip("cannot mount a tmpfs here (not root); the simulated full disk covers this")
        request.addfinalizer(lambda: subprocess.run(["umount", str(folder)], check=True))
        return folder, None

    def no_space(*args, **kwargs):
        target = next((a for a in args if isinstance(a, str)), None)
        if target:  # a writer that got part of the way, as on a real full disk
            Path(target).write_bytes(b"\0" * 4096)
        raise OSError(errno.ENOSPC, "No space left on device")

    return folder, no_space


def test_full_disk_save_tera_keeps_earlier_file_and_leaves_no_temp(full_disk, monkeypatch):
    folder, fault = full_disk
    net = _namespace(_TORCH_MODEL)["make"]()
    path = save_tera(net, folder / "adapter.safetensors")  # λ only: a few KB, fits
    before = path.read_bytes()
    if fault:
        from tera_tn import atomic_files as files_mod

        monkeypatch.setattr(files_mod.os, "fsync", fault)
    with pytest.raises(OSError) as info:
        save_tera(net, path, include_factors=True, overwrite=True)  # ~12 MB: does not fit
    assert info.value.errno == errno.ENOSPC
    assert path.read_bytes() == before
    assert sorted(os.listdir(folder)) == ["adapter.safetensors"]


def test_full_disk_save_adapter_keeps_earlier_files_and_leaves_no_temp(full_disk, monkeypatch):
    pytest.importorskip("peft")
    from tera_tn.peft import save_adapter

    folder, fault = full_disk
    make = _namespace(_PEFT_MODEL)["make"]
    save_adapter(make(save_factors=False), folder / "adapter")
    before = _snapshot(folder)
    if fault:
        import peft.peft_model

        monkeypatch.setattr(peft.peft_model, "safe_save_file", fault)
    with pytest.raises(Exception, match="No space left on device|os error 28"):
        save_adapter(make(save_factors=True), folder / "adapter", overwrite=True)
    assert _snapshot(folder) == before
    assert _temps(folder) == []


# --- concurrent reports -----------------------------------------------------------------------


def test_concurrent_reports_get_distinct_folders(tmp_path):
    argv = [sys.executable, "-m", "tera_tn.cli", "report", "-q", "--no-plots", "--no-progress", "--models", "minilm"]
    procs = [subprocess.Popen(argv, cwd=tmp_path, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    outputs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err[-2000:] for _, err in outputs]
    folders = [Path(out.strip().splitlines()[-1].removeprefix("report written to ").rstrip("/")) for out, _ in outputs]
    assert folders[0] != folders[1]
    for folder in folders:
        assert folder.parent == tmp_path.resolve()
        assert {p.name for p in folder.iterdir()} == {".tera-tn-output.json", "README.md", "report.json", "report.txt"}
        assert '"all-MiniLM-L6-v2"' in (folder / "report.json").read_text()
    assert _temps(tmp_path) == []
