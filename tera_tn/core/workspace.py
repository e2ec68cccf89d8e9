"""The state of the cache-blocked mode-product kernel (:mod:`tera_tn.core.blocked_kernel`), held
in an explicit :class:`Workspace` instead of module globals.

A workspace keeps:

* flat scratch/intermediate buffers between calls (large fresh allocations cost more in page
  faults than the whole computation), keyed by backend, dtype, device and role. One call at a
  time uses them (it holds :attr:`Workspace.lock`); a concurrent caller gets private buffers;
* a pool of worker threads, grown on demand (:meth:`Workspace.pool`).

The kernel uses the workspace entered with :func:`use_workspace` in the calling thread (or task:
it is a :class:`contextvars.ContextVar`), opt-in like opt_einsum's ``shared_intermediates()``.
Outside any, a direct ``multi_mode_product`` call runs on one thread with private buffers. The
package's own entry points (the torch layers, ``materialize``/``delta_weight``, the spectrum)
enter :data:`DEFAULT_WORKSPACE` around their products (:func:`default_scope`) unless the caller
entered one, so their speed is what it always was; :func:`clear_workspace` empties it. To keep the buffers and threads
for numpy or torch calls of your own::

    with use_workspace():            # the process default, shared with the torch layers
        multi_mode_product(core, mats)
    with use_workspace(Workspace()) as ws:  # a private one; ws.close() frees it
        ...

:func:`usable_cores` counts the CPU cores this process may run on (its affinity mask on Linux).
"""

from __future__ import annotations

import contextlib
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from contextvars import ContextVar
from typing import Iterator, Optional

__all__ = [
    "Workspace", "DEFAULT_WORKSPACE", "use_workspace", "current_workspace", "default_scope", "clear_workspace",
    "workspace", "usable_cores", "in_scope",
]


class Workspace:
    """Cached kernel buffers and worker threads; enter it with :func:`use_workspace`.

    Args:
        max_cached_bytes: buffers larger than this are not kept between calls.
    """

    def __init__(self, max_cached_bytes: int = 1 << 30) -> None:
        if isinstance(max_cached_bytes, bool) or not isinstance(max_cached_bytes, int) or max_cached_bytes < 0:
            raise ValueError(f"max_cached_bytes must be an integer >= 0, got {max_cached_bytes!r}")
        self.max_cached_bytes = max_cached_bytes
        #: held by the one call that uses the cached buffers (``acquire(blocking=False)``)
        self.lock = threading.Lock()
        self._buffers: dict = {}
        self._pool: Optional[ThreadPoolExecutor] = None
        self._pool_size = 0
        self._pool_lock = threading.Lock()

    def buffer(self, ops, like, role: str, n: int):
        """Cached flat buffer of >= ``n`` elements for ``role`` (the caller holds :attr:`lock`)."""
        key = ops.workspace_key(like) + (role,)
        buf = self._buffers.get(key)
        if buf is None or buf.shape[0] < n:
            self._buffers.pop(key, None)  # free the old one before allocating the new one
            buf = ops.scratch(n, like)
            if n * ops.itemsize(buf) <= self.max_cached_bytes:
                self._buffers[key] = buf
        return buf

    def pool(self, n: int) -> ThreadPoolExecutor:
        """This workspace's pool of at least ``n`` worker threads."""
        with self._pool_lock:
            if self._pool is None or self._pool_size < n:
                if self._pool is not None:
                    self._pool.shutdown(wait=False)
                self._pool = ThreadPoolExecutor(max_workers=n, thread_name_prefix="tera_tn-modeproduct")
                self._pool_size = n
            return self._pool

    def clear(self) -> None:
        """Release the cached buffers."""
        with self.lock:
            self._buffers.clear()

    def close(self) -> None:
        """Release the buffers and stop the worker threads (it stays usable: both come back on demand)."""
        self.clear()
        with self._pool_lock:
            if self._pool is not None:
                self._pool.shutdown(wait=False)
            self._pool, self._pool_size = None, 0


#: The workspace the torch layers enter (and ``use_workspace()`` without an argument).
DEFAULT_WORKSPACE = Workspace()
_ACTIVE: ContextVar[Optional[Workspace]] = ContextVar("tera_tn_workspace", default=None)


def current_workspace() -> Optional[Workspace]:
    """The workspace entered in this thread or task, or None."""
    return _ACTIVE.get()


@contextlib.contextmanager
def use_workspace(ws: Optional[Workspace] = None) -> Iterator[Workspace]:
    """Run the mode-product kernel in ``ws`` (default: :data:`DEFAULT_WORKSPACE`) inside the block."""
    if ws is None:
        ws = DEFAULT_WORKSPACE
    elif not isinstance(ws, Workspace):
        raise TypeError(f"use_workspace takes a Workspace or None, got {type(ws).__name__}")
    token = _ACTIVE.set(ws)
    try:
        yield ws
    finally:
        _ACTIVE.reset(token)


_NO_SCOPE = contextlib.nullcontext()


def default_scope():
    """``use_workspace()`` unless the caller entered a workspace: what the package's own entry
    points (``materialize``, the spectrum, the torch layers) run their products in, so their
    speed does not depend on the caller opting in."""
    return _NO_SCOPE if _ACTIVE.get() is not None else use_workspace(DEFAULT_WORKSPACE)


def clear_workspace() -> None:
    """Release the buffers cached by the default workspace (and by the one entered here, if another)."""
    DEFAULT_WORKSPACE.clear()
    ws = _ACTIVE.get()
    if ws is not None and ws is not DEFAULT_WORKSPACE:
        ws.clear()


def workspace(ops, like, role: str, n: int, cache: Optional[Workspace]):
    """Flat buffer of exactly ``max(n, 1)`` elements: from ``cache`` (a workspace whose lock the
    caller holds) when given, else freshly allocated."""
    n = max(int(n), 1)
    buf = ops.empty(n, like) if cache is None else cache.buffer(ops, like, role, n)
    return buf[:n]


def usable_cores() -> int:
    """CPU cores this process may run on: its affinity mask where the OS has one."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - non-Linux
        return os.cpu_count() or 1


def in_scope(scope, fn, *args):
    """``fn(*args)`` inside ``scope()`` (a worker thread's backend settings)."""
    with scope():
        return fn(*args)
