"""The process-wide state of the cache-blocked mode-product kernel (:mod:`tera_tn.core.blocked_kernel`).

* The workspace cache: flat scratch/intermediate buffers kept between calls (large fresh
  allocations cost more in page faults than the whole computation), keyed by backend, dtype,
  device and role; :func:`clear_workspace` drops them. One call at a time uses the cache (it
  holds :data:`WORKSPACE_LOCK`); a concurrent caller gets private buffers.
* The worker threads: one shared pool, grown on demand (:func:`worker_pool`).
* The CPU cores this process may run on (:func:`usable_cores`, its affinity mask on Linux).
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Optional

__all__ = ["WORKSPACE_LOCK", "clear_workspace", "workspace", "worker_pool", "usable_cores", "in_scope"]

# Cached workspace buffers larger than this are not kept between calls.
_MAX_CACHED_BYTES = 1 << 30


# --------------------------------------------------------------------------- #
# Workspace cache
# --------------------------------------------------------------------------- #
_WS: dict = {}
#: held by the one call that uses the cached buffers (``acquire(blocking=False)``)
WORKSPACE_LOCK = threading.Lock()


def clear_workspace() -> None:
    """Release the scratch/intermediate buffers cached by the fast path."""
    with WORKSPACE_LOCK:
        _WS.clear()


def workspace(ops, like, role: str, n: int, cache: bool):
    """Flat buffer of >= n elements; reused across calls when ``cache``."""
    n = max(int(n), 1)
    if not cache:
        buf = ops.empty(n, like)
    else:
        key = ops.workspace_key(like) + (role,)
        buf = _WS.get(key)
        if buf is None or buf.shape[0] < n:
            _WS.pop(key, None)  # free the old one before allocating the new one
            buf = ops.scratch(n, like)
            if n * ops.itemsize(buf) <= _MAX_CACHED_BYTES:
                _WS[key] = buf
    return buf[:n]


# --------------------------------------------------------------------------- #
# Worker threads
# --------------------------------------------------------------------------- #
_POOL: Optional[ThreadPoolExecutor] = None
_POOL_SIZE = 0
_POOL_LOCK = threading.Lock()


def worker_pool(n: int) -> ThreadPoolExecutor:
    """The shared pool of at least ``n`` worker threads."""
    global _POOL, _POOL_SIZE
    with _POOL_LOCK:
        if _POOL is None or _POOL_SIZE < n:
            if _POOL is not None:
                _POOL.shutdown(wait=False)
            _POOL = ThreadPoolExecutor(max_workers=n, thread_name_prefix="tera_tn-modeproduct")
            _POOL_SIZE = n
        return _POOL


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
