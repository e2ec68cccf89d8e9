"""Output folders that are claimed atomically and never emptied unless they are provably ours.

Two processes that both check "does the folder exist?" and then create it can both believe they
own it (the report race). ``os.mkdir`` is the atomic claim: exactly one caller succeeds. A folder
that a command wrote carries a marker file naming the command; ``overwrite=True`` only ever
replaces a folder that holds that marker, so a user folder (say, a Hugging Face model folder) is
never emptied by a mistyped ``--out``.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

__all__ = ["OutputFolderError", "MARKER", "claim_dir", "is_ours"]

MARKER = ".tera-tn-output.json"


class OutputFolderError(FileExistsError):
    """The requested output folder cannot be claimed; the message says why and what to do."""


def is_ours(path: Path, kind: str) -> bool:
    """True when ``path`` holds the marker written by :func:`claim_dir` for ``kind``."""
    try:
        data = json.loads((Path(path) / MARKER).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and data.get("kind") == kind


def _write_marker(path: Path, kind: str) -> None:
    (path / MARKER).write_text(json.dumps({"kind": kind, "pid": os.getpid()}) + "\n")


def claim_dir(path: str | os.PathLike, *, kind: str, overwrite: bool = False) -> Path:
    """Create ``path`` for one run of ``kind`` (e.g. ``"report"``) and return it.

    * ``path`` missing: created with ``os.mkdir`` (parents as needed); if another process creates
      it first, this call fails instead of sharing the folder.
    * ``path`` exists and is empty: claimed only if no other process claims it first (the marker is
      created with ``O_EXCL``).
    * ``path`` exists, is not empty: refused unless ``overwrite`` and the folder holds this kind's
      marker; then its contents are replaced. A folder without the marker is never deleted.

    Raises :class:`OutputFolderError` (a ``FileExistsError``) naming the folder and the way out,
    or ``NotADirectoryError`` / ``PermissionError`` when the path cannot hold a folder.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise NotADirectoryError(f"output path {str(path)!r} exists and is not a folder; expected a folder path")
    parent = path.parent
    if not parent.exists():
        parent.mkdir(parents=True, exist_ok=True)
    try:
        os.mkdir(path)
    except FileExistsError:
        if not path.is_dir():
            raise NotADirectoryError(
                f"output path {str(path)!r} exists and is not a folder; expected a folder path"
            ) from None
        contents = [p for p in path.iterdir()]
        if contents:
            if not overwrite:
                raise OutputFolderError(
                    f"output folder {str(path)!r} already exists and is not empty; choose another "
                    f"folder, or pass overwrite (--force/--overwrite) to replace an earlier {kind} run"
                ) from None
            if not is_ours(path, kind):
                raise OutputFolderError(
                    f"output folder {str(path)!r} is not empty and was not written by a tera-tn {kind} "
                    f"run (no {MARKER} marker); refusing to delete it even with overwrite"
                ) from None
            for p in contents:
                if p.is_dir() and not p.is_symlink():
                    shutil.rmtree(p)
                else:
                    p.unlink()
        # An empty folder is claimed by creating the marker exclusively: of two processes that
        # both found it empty, only one gets the marker.
        try:
            fd = os.open(path / MARKER, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            raise OutputFolderError(
                f"output folder {str(path)!r} was claimed by another run at the same time; choose another folder"
            ) from None
        os.close(fd)
    _write_marker(path, kind)
    return path


def unique_sibling(base: str | os.PathLike, stamp: str, *, kind: str) -> Path:
    """Claim ``base`` if free, else ``base-stamp``, ``base-stamp-2``, …: the first one this process
    creates atomically (two concurrent callers never get the same folder)."""
    base = Path(base)
    candidates = [base, Path(f"{base}-{stamp}")]
    k = 2
    while True:
        for cand in candidates:
            try:
                os.mkdir(cand)
            except FileExistsError:
                continue
            _write_marker(cand, kind)
            return cand
        candidates = [Path(f"{base}-{stamp}-{k}")]
        k += 1


def temp_path_in(folder: Path, name: str) -> str:
    """A fresh temporary file path beside ``folder/name`` (same file system, so ``os.replace``
    is atomic), named so a later :func:`sweep_stale_temps` can tell whose it was."""
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{name}.tera-tmp-{os.getpid()}-", suffix=".tmp")
    os.close(fd)
    return tmp
