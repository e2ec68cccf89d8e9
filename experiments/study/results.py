"""The study's results file: JSON lines, appended atomically, readable while a run is killed.

One finished run is one line. A line is written with a single ``os.write`` on an ``O_APPEND``
descriptor and then ``fsync``-ed, under an exclusive ``flock`` so that two studies sharing the
file never interleave. A process killed inside that write (Linux lets SIGKILL cut a large write
short) can still leave a partial last line: readers skip it, and the next append first cuts it
off, so it is never glued to a complete record.
"""

from __future__ import annotations

import fcntl
import json
import os
from pathlib import Path
from typing import Any, Iterator

__all__ = ["ResultsFile"]


class ResultsFile:
    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)

    def records(self) -> Iterator[dict[str, Any]]:
        """Every complete record, in file order; a trailing partial line is skipped."""
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return
        for line in data.split(b"\n")[:-1]:  # the part after the last newline is unfinished
            if line.strip():
                yield json.loads(line)

    def keys(self) -> set[str]:
        return {r["key"] for r in self.records()}

    def append(self, record: dict[str, Any]) -> None:
        if "key" not in record:
            raise ValueError(f"a result record needs a 'key', got fields {sorted(record)}")
        line = (json.dumps(record, sort_keys=True, allow_nan=True) + "\n").encode()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            self._cut_partial_tail(fd)
            written = os.write(fd, line)
            if written != len(line):
                # a short write left a partial line: remove it rather than leave it for readers
                os.ftruncate(fd, os.fstat(fd).st_size - written)
                raise OSError(f"short write to {self.path} ({written} of {len(line)} bytes); record not saved")
            os.fsync(fd)
        finally:
            os.close(fd)  # closing releases the lock

    @staticmethod
    def _cut_partial_tail(fd: int) -> None:
        size = os.fstat(fd).st_size
        if size == 0 or os.pread(fd, 1, size - 1) == b"\n":
            return
        # scan back in blocks for the last newline; everything after it is an unfinished line
        pos, block = size, 1 << 16
        while pos > 0:
            start = max(0, pos - block)
            chunk = os.pread(fd, pos - start, start)
            i = chunk.rfind(b"\n")
            if i >= 0:
                os.ftruncate(fd, start + i + 1)
                return
            pos = start
        os.ftruncate(fd, 0)


#: the side file beside the results where measures taken after a run (from its kept adapter) live,
#: one ``{"key", "measures"}`` line per run: the results file stays append-only and its lines unchanged
MEASURES = "measures.jsonl"


def with_measures(results: ResultsFile) -> list[dict[str, Any]]:
    """The records of ``results``; a record without ``measures`` takes them from the side file
    (:data:`MEASURES`) when a later measurement of its kept adapter recorded them."""
    side = {r["key"]: r["measures"] for r in ResultsFile(results.path.parent / MEASURES).records()}
    return [r if "measures" in r or r["key"] not in side else {**r, "measures": side[r["key"]]}
            for r in results.records()]

