"""tera_tn.atomic_files: atomic folder claims, atomic writes, and sweeping what killed processes left."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import threading

import pytest

from tera_tn import atomic_files as files_mod
from tera_tn.atomic_files import (
    MARKER,
    OutputFolderError,
    claim_dir,
    is_ours,
    publish,
    staging_dir,
    sweep_stale_temps,
    temp_path_in,
    unique_sibling,
    write_atomic,
)


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()  # reaped: the pid no longer names a process (a zombie would still answer kill(pid, 0))
    return proc.pid


def _temps(folder):
    return sorted(p for p in os.listdir(folder) if ".tera-tmp-" in p)


# --- claim_dir / unique_sibling -----------------------------------------------------------------


def test_claim_dir_creates_marks_and_refuses_a_second_claim(tmp_path):
    out = claim_dir(tmp_path / "a" / "b", kind="report")
    assert out.is_dir() and is_ours(out, "report") and not is_ours(out, "finetune")
    with pytest.raises(OutputFolderError, match="already exists and is not empty.*--force"):
        claim_dir(out, kind="report")


def test_claim_dir_overwrite_replaces_only_its_own_kind(tmp_path):
    out = claim_dir(tmp_path / "run", kind="report")
    (out / "old.txt").write_text("old")
    assert claim_dir(out, kind="report", overwrite=True) == out
    assert sorted(p.name for p in out.iterdir()) == [MARKER]
    with pytest.raises(OutputFolderError, match="not written by a tera-tn finetune run"):
        claim_dir(out, kind="finetune", overwrite=True)


def test_claim_dir_never_empties_a_user_folder(tmp_path):
    user = tmp_path / "hf-model"
    user.mkdir()
    (user / "config.json").write_text("{}")
    with pytest.raises(OutputFolderError, match="refusing to delete it even with overwrite"):
        claim_dir(user, kind="finetune", overwrite=True)
    assert (user / "config.json").read_text() == "{}"


def test_claim_dir_takes_an_empty_folder_and_refuses_a_file(tmp_path):
    (tmp_path / "empty").mkdir()
    assert is_ours(claim_dir(tmp_path / "empty", kind="report"), "report")
    (tmp_path / "f").write_text("x")
    with pytest.raises(NotADirectoryError, match="is not a folder"):
        claim_dir(tmp_path / "f", kind="report")


def _race(n, fn):
    barrier = threading.Barrier(n)
    results = []

    def run():
        barrier.wait()
        try:
            results.append(fn())
        except OutputFolderError as err:
            results.append(err)

    threads = [threading.Thread(target=run) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def test_concurrent_claims_of_one_folder_have_one_winner(tmp_path):
    results = _race(8, lambda: claim_dir(tmp_path / "out", kind="report"))
    assert sum(not isinstance(r, Exception) for r in results) == 1


def test_concurrent_unique_siblings_are_distinct(tmp_path):
    results = _race(6, lambda: unique_sibling(tmp_path / "rep", "20250101-000000", kind="report"))
    assert len(set(results)) == 6
    assert {p.name for p in results} == {"rep", "rep-20250101-000000", *(f"rep-20250101-000000-{k}" for k in range(2, 6))}
    assert all(is_ours(p, "report") for p in results)


# --- publish / write_atomic ---------------------------------------------------------------------


def test_publish_without_overwrite_never_clobbers(tmp_path):
    dest = tmp_path / "a.bin"
    dest.write_bytes(b"mine")
    src = temp_path_in(tmp_path, "a.bin")
    open(src, "wb").write(b"new")
    with pytest.raises(FileExistsError, match="a.bin already exists; pass overwrite=True"):
        publish(src, dest, overwrite=False)
    assert dest.read_bytes() == b"mine"
    publish(src, dest, overwrite=True)
    assert dest.read_bytes() == b"new" and _temps(tmp_path) == []


def test_write_atomic_failure_keeps_earlier_file_and_no_temp(tmp_path, monkeypatch):
    path = write_atomic(tmp_path / "c.safetensors", b"first", overwrite=False)

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(files_mod.os, "fsync", full)
    with pytest.raises(OSError, match="No space left"):
        write_atomic(path, b"second" * 1000, overwrite=True)
    assert path.read_bytes() == b"first" and _temps(tmp_path) == []


def test_staging_dir_is_removed_on_error(tmp_path):
    with pytest.raises(RuntimeError):
        with staging_dir(tmp_path, "adapter") as tmp:
            (tmp / ".tmpXYZ").write_bytes(b"partial")  # a library's own temporary inside ours
            raise RuntimeError("save failed")
    assert list(tmp_path.iterdir()) == []


# --- sweep_stale_temps --------------------------------------------------------------------------


def test_sweep_removes_only_temporaries_of_dead_processes(tmp_path):
    dead, host = _dead_pid(), files_mod._host_id()
    stale_file = tmp_path / f".a.safetensors.tera-tmp-{host}-{dead}-abc123.tmp"
    stale_dir = tmp_path / f".adapter.tera-tmp-{host}-{dead}-q1w2e3"
    stale_file.write_bytes(b"x")
    stale_dir.mkdir()
    (stale_dir / ".tmpAbCdEf").write_bytes(b"y" * 100)
    live = temp_path_in(tmp_path, "a.safetensors")  # this process: a save in progress
    other_host = "0" * 8 if host != "0" * 8 else "1" * 8  # a machine sharing the folder (NFS)
    foreign_host = tmp_path / f".a.tera-tmp-{other_host}-{dead}-zzz.tmp"
    foreign_host.write_bytes(b"z")
    user_files = [tmp_path / "a.safetensors", tmp_path / ".tmpUser1", tmp_path / "notes.tera-tmp-1-2-3.tmp"]
    for p in user_files:
        p.write_bytes(b"u")
    removed = sweep_stale_temps(tmp_path)
    assert sorted(removed) == sorted([stale_file, stale_dir])
    assert not stale_file.exists() and not stale_dir.exists()
    assert os.path.exists(live) and foreign_host.exists() and all(p.exists() for p in user_files)


def test_sweep_of_a_missing_folder_is_a_no_op(tmp_path):
    assert sweep_stale_temps(tmp_path / "nope") == []
