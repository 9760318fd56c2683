"""Keep the daemon's resident memory bounded under write load (glibc malloc knobs).

Measured with ``tools/stress.py`` (16 threads, 60 s): the daemon's peak RSS was ~400 MiB
and stayed near it after the flush, although no Python object stayed alive. The growth
was glibc's per-thread arenas: every I/O and S3 worker thread got its own arena, and
freed upload buffers (files of up to 64 MiB are sent from memory) stayed in them. With at
most two arenas the same run peaked at ~245-280 MiB. ``trim`` hands freed pages back to
the OS, so an idle mount shrinks again after a burst of writes.

Both are best effort: on a libc without these calls (musl) they do nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

log = logging.getLogger(__name__)

M_ARENA_MAX = -8  # from glibc's malloc.h
DAEMON_ARENAS = 2


def _libc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        return ctypes.CDLL(name)
    except OSError:
        return None


_LIBC = _libc()


def limit_arenas(count: int = DAEMON_ARENAS) -> bool:
    """Cap glibc's malloc arenas; call before worker threads start. Returns whether it took."""
    mallopt = getattr(_LIBC, "mallopt", None)
    if mallopt is None:
        return False
    return bool(mallopt(M_ARENA_MAX, count))


def trim() -> None:
    """Return free heap pages to the OS (``malloc_trim``); cheap enough for a periodic task."""
    malloc_trim = getattr(_LIBC, "malloc_trim", None)
    if malloc_trim is not None:
        malloc_trim(0)
