"""Files and folders that are claimed atomically, written atomically, and cleaned up after a crash.

Two processes that both check "does the folder exist?" and then create it can both believe they
own it (the report race). ``os.mkdir`` is the atomic claim: exactly one caller succeeds. A folder
that a command wrote carries a marker file naming the command; ``overwrite=True`` only ever
replaces a folder that holds that marker, so a user folder (say, a Hugging Face model folder) is
never emptied by a mistyped ``--out``. The marker also names its owner (host, process id and the
process's start time): ``overwrite=True`` refuses a folder whose owner still runs on this host, so
a second run cannot empty the folder of a run in progress (a recycled process id is told apart by
its start time).

Every temporary file or folder is created beside its destination (so the final ``os.replace`` is
atomic) under a name that embeds this host and process id: ``.NAME.tera-tmp-HOST-PID-XXXXXXXX``.
A process killed mid-save cannot clean up after itself, so :func:`sweep_stale_temps` removes the
temporaries whose process is gone; saves call it on their destination folder. Libraries that pick
their own temporary names (safetensors writes ``.tmpXXXXXX`` beside its target) are only ever
pointed at a path inside one of our temporary folders, so their leftovers are swept with it.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import shutil
import socket
import tempfile
from pathlib import Path
from typing import Iterator, Optional, Union

__all__ = [
    "OutputFolderError",
    "MARKER",
    "claim_dir",
    "release_dir",
    "is_ours",
    "unique_sibling",
    "temp_path_in",
    "staging_dir",
    "publish",
    "write_atomic",
    "sweep_stale_temps",
]

MARKER = ".tera-tn-output.json"

PathLike = Union[str, "os.PathLike[str]"]


class OutputFolderError(FileExistsError):
    """The requested output folder cannot be claimed; the message says why and what to do."""


def _read_marker_file(file: PathLike) -> dict:
    try:
        data = json.loads(Path(file).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _read_marker(path: PathLike) -> dict:
    return _read_marker_file(Path(path) / MARKER)


def is_ours(path: PathLike, kind: str) -> bool:
    """True when ``path`` holds the marker written by :func:`claim_dir` for ``kind``."""
    return _read_marker(path).get("kind") == kind


def _proc_stat(pid: int) -> Optional[list[str]]:
    """Fields 3… of ``/proc/PID/stat`` (state first), or None where it cannot be read (not Linux)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read().decode("ascii", "replace")
        # the command name (field 2) may hold spaces and parentheses: count fields after its last ')'
        return stat[stat.rindex(")") + 2 :].split()
    except (OSError, ValueError):
        return None


def _process_start(pid: int) -> Optional[int]:
    """Start time of process ``pid`` in clock ticks since boot (Linux ``/proc``), or None where it
    cannot be read: with the host and the pid it names one process, also after the pid is reused."""
    fields = _proc_stat(pid)
    try:
        return int(fields[19]) if fields else None  # field 22, starttime
    except (ValueError, IndexError):
        return None


def _boot_id() -> Optional[str]:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip() or None
    except OSError:
        return None


def _write_marker(path: Path, kind: str) -> None:
    pid = os.getpid()
    owner = {"kind": kind, "pid": pid, "host": _host_id(), "boot": _boot_id(), "start": _process_start(pid)}
    (path / MARKER).write_text(json.dumps(owner) + "\n")


def _live_owner(marker: dict) -> Optional[int]:
    """The process id of the marker's owner when that process still runs on this host, else None.

    Unknown means not running: a marker of another host (a network file system: its process table
    cannot be seen from here), an older marker without a host, or Windows (where probing a pid
    could end it). The calling process itself is no other owner (it claims again after a run)."""
    pid = marker.get("pid")
    if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0 or pid == os.getpid():
        return None
    if os.name == "nt" or marker.get("host") != _host_id():
        return None
    boot = _boot_id()
    if marker.get("boot") is not None and boot is not None and marker["boot"] != boot:
        return None  # written before this machine restarted
    if not _pid_alive(pid):
        return None
    fields = _proc_stat(pid)
    if fields and fields[0] in ("Z", "X"):  # exited, not yet reaped by its parent
        return None
    start = _process_start(pid)
    if marker.get("start") is not None and start is not None and marker["start"] != start:
        return None  # the pid now belongs to another process
    return pid


def _not_a_folder(path: Path) -> NotADirectoryError:
    return NotADirectoryError(f"output path {str(path)!r} exists and is not a folder; expected a folder path")


def claim_dir(path: PathLike, *, kind: str, overwrite: bool = False) -> Path:
    """Create ``path`` for one run of ``kind`` (e.g. ``"report"``) and return it.

    * ``path`` missing: created with ``os.mkdir`` (parents as needed); if another process creates
      it first, this call fails instead of sharing the folder.
    * ``path`` exists and is empty: claimed only if no other process claims it first (the marker is
      created with ``O_EXCL``).
    * ``path`` exists, is not empty: refused unless ``overwrite`` and the folder holds this kind's
      marker and the run that wrote it no longer runs on this host; then its contents are replaced.
      A folder without the marker is never deleted.

    Raises :class:`OutputFolderError` (a ``FileExistsError``) naming the folder and the way out,
    ``NotADirectoryError`` when the path is a file, or the ``OSError`` of a folder that cannot be
    created (permissions, read-only or special file systems).
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise _not_a_folder(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.mkdir(path)
    except FileExistsError:
        if not path.is_dir():
            raise _not_a_folder(path) from None
        contents = list(path.iterdir())
        if contents:
            if not overwrite:
                raise OutputFolderError(
                    f"output folder {str(path)!r} already exists and is not empty; choose another "
                    f"folder, or pass --force/--overwrite (overwrite=True) to replace an earlier {kind} run"
                ) from None
            marker = _read_marker(path)
            if marker.get("kind") != kind:
                raise OutputFolderError(
                    f"output folder {str(path)!r} is not empty and was not written by a tera-tn {kind} "
                    f"run (no {MARKER} marker); refusing to delete it even with overwrite"
                ) from None
            owner = _live_owner(marker)
            if owner is not None:
                raise OutputFolderError(
                    f"output folder {str(path)!r} belongs to a tera-tn {kind} run that is still running "
                    f"(process {owner}); refusing to overwrite it: wait for that run to end, stop it, or "
                    "choose another folder"
                ) from None
            # Take the folder over atomically: of several overwriting runs only one renames the marker.
            taken = path / f"{MARKER}.taken-{_host_id()}-{os.getpid()}"
            try:
                os.rename(path / MARKER, taken)
            except FileNotFoundError:
                taken = None
            if taken is not None and _read_marker_file(taken) != marker:  # a newer run's marker
                with contextlib.suppress(OSError):
                    os.rename(taken, path / MARKER)
                taken = None
            if taken is None:
                raise OutputFolderError(
                    f"output folder {str(path)!r} was claimed by another run at the same time; choose another folder"
                ) from None
            for p in list(path.iterdir()):
                if p.is_dir() and not p.is_symlink():
                    shutil.rmtree(p)
                else:
                    p.unlink()
    # The folder is claimed by creating the marker exclusively, also by the call that created it:
    # another caller can find the new folder still empty before its creator wrote anything, and of
    # all callers that found it empty only one gets the marker.
    try:
        fd = os.open(path / MARKER, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        raise OutputFolderError(
            f"output folder {str(path)!r} was claimed by another run at the same time; choose another folder"
        ) from None
    os.close(fd)
    _write_marker(path, kind)
    return path


def release_dir(path: PathLike, *, created: bool) -> None:
    """Undo :func:`claim_dir` for a run that failed before writing anything: remove the folder
    when the claim ``created`` it (it then holds only the marker), else only the marker. Errors are
    ignored (the run is failing already)."""
    path = Path(path)
    if created:
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            (path / MARKER).unlink()


def unique_sibling(base: PathLike, stamp: str, *, kind: str) -> Path:
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


# --------------------------------------------------------------------------------------------
# temporaries
# --------------------------------------------------------------------------------------------
def _host_id() -> str:
    # A short hash, not the host name itself: names stay short and free of odd characters, and a
    # folder shared between machines (NFS) never has its temporaries judged by a foreign pid table.
    return hashlib.sha1(socket.gethostname().encode()).hexdigest()[:8]


# ``.{name}.tera-tmp-{host}-{pid}-{random}[.tmp]``; the random part is tempfile's.
_TEMP_RE = re.compile(r"^\..*\.tera-tmp-(?P<host>[0-9a-f]{8})-(?P<pid>\d+)-[A-Za-z0-9_]+(\.tmp)?$")


def _temp_prefix(name: str) -> str:
    # Computed per call: a forked child must not inherit its parent's pid in new names.
    return f".{name}.tera-tmp-{_host_id()}-{os.getpid()}-"


def _umask() -> int:
    """The process umask, read without changing it where Linux allows (``os.umask`` sets it)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def temp_path_in(folder: PathLike, name: str) -> str:
    """A fresh, empty temporary file beside ``folder/name`` (same file system, so ``os.replace``
    is atomic), named so that :func:`sweep_stale_temps` can tell whose it is."""
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=_temp_prefix(name), suffix=".tmp")
    os.close(fd)
    return tmp


@contextlib.contextmanager
def staging_dir(folder: PathLike, name: str) -> Iterator[Path]:
    """A temporary folder beside ``folder/name``, removed with everything in it on exit (also on
    error). Point libraries with their own temporary names here; move finished files out with
    :func:`publish`."""
    tmp = Path(tempfile.mkdtemp(dir=folder, prefix=_temp_prefix(name)))
    with contextlib.suppress(OSError):  # mkdtemp makes it private (0700); published, it is a normal folder
        os.chmod(tmp, 0o777 & ~_umask())
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def publish(src: PathLike, dest: PathLike, *, overwrite: bool) -> None:
    """Move the finished file ``src`` to ``dest`` atomically: readers see the old file or the new
    one, never a part. Without ``overwrite`` an existing ``dest`` raises ``FileExistsError`` and is
    left alone, also when it appears while this runs (``os.link`` fails if the name exists, where
    a check followed by ``os.replace`` would silently clobber it)."""
    if overwrite:
        os.replace(src, dest)
        return
    try:
        os.link(src, dest)
    except FileExistsError:
        raise FileExistsError(f"{dest} already exists; pass overwrite=True to replace it") from None
    except OSError as err:
        if err.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EXDEV, errno.EMLINK):
            raise
        # File systems without hard links (FAT, some network mounts): a small race, no better option.
        if os.path.lexists(dest):
            raise FileExistsError(f"{dest} already exists; pass overwrite=True to replace it") from None
        os.replace(src, dest)
        return
    os.unlink(src)


def write_atomic(path: PathLike, data: bytes, *, overwrite: bool) -> Path:
    """Write ``data`` to ``path`` through a swept temporary: a crash, a full disk or an existing
    ``path`` (without ``overwrite``) leaves any earlier file intact and no temporary behind."""
    path = Path(path)
    tmp = temp_path_in(path.parent, path.name)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())  # the rename must not reach the disk before the bytes do
        with contextlib.suppress(OSError):  # mkstemp makes it private (0600); the file gets the usual mode
            os.chmod(tmp, 0o666 & ~_umask())
        publish(tmp, path, overwrite=overwrite)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
    return path


def _pid_alive(pid: int) -> bool:
    if os.name == "nt":  # os.kill(pid, 0) would terminate the process there; never sweep
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def sweep_stale_temps(folder: PathLike) -> list[Path]:
    """Remove the temporaries in ``folder`` left by killed processes of this host; return them.

    Only names made by :func:`temp_path_in` / :func:`staging_dir` are considered, and only those
    whose process id no longer runs: a save in progress, here or in another process, is never
    touched. A recycled pid keeps its stale temporary until that process ends (harmless). Errors
    (a folder that vanished, no permission) are ignored: sweeping is a courtesy, never the reason
    a save or load fails.
    """
    removed = []
    host = _host_id()
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    for entry in entries:
        m = _TEMP_RE.match(entry.name)
        if m is None or m["host"] != host or _pid_alive(int(m["pid"])):
            continue
        try:
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path)
            else:
                os.unlink(entry.path)
        except OSError:
            continue
        removed.append(Path(entry.path))
    return removed
