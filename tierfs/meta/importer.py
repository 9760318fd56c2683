"""Optional background import (``--import-interval``): re-list every cached directory periodically.

Without it, a change made in the bucket by someone else becomes visible when a reader
next looks the name up after the metadata TTL, and the stale chunks are dropped only
then. With it, every directory the mount has already listed is re-listed once per
interval, so NEW/CHANGED/DELETED objects are applied (and the chunks of changed objects
dropped, through the namespace's change hooks) before anyone opens them.

It is off by default because it costs one LIST per cached directory per interval,
whether or not anyone is reading. Directories never listed are not touched: they hold
nothing stale, and listing them would turn the mount into a crawler of the whole bucket.

All the consistency rules live in :class:`~tierfs.meta.namespace.Namespace`: only a complete
listing may delete entries, a failed LIST raises and changes nothing, LOCAL entries
belong to write-back. This module only decides *which* directories to re-list and *when*.
"""

from __future__ import annotations

import logging
import time

import trio

from ..errors import NotFound, StoreError, Unavailable
from .namespace import Namespace
from .records import ROOT_INO

log = logging.getLogger(__name__)


def listed_subdirectories(namespace: Namespace, ino: int) -> list[int]:
    """Inodes of the children of ``ino`` that are directories with a listing (blocking: LMDB reads)."""
    found: list[int] = []
    for _, child_ino in namespace.children(ino):
        child = namespace.get(child_ino)
        if child is not None and child.is_dir and child.checked > 0:
            found.append(child_ino)
    return found


async def sweep_once(namespace: Namespace) -> int:
    """Re-list every cached directory once, parents before children; return how many were listed.

    Parents go first so that a subdirectory deleted in the bucket is dropped with its
    parent's listing instead of being listed itself. Directories are listed one at a time
    to keep the background load at one LIST in flight. The first :class:`Unavailable`
    ends the sweep (the store is down or stalled; every further LIST would wait for its
    own timeout) and is re-raised for the caller to log; other store errors (e.g. access
    denied to one prefix) skip that directory only.
    """
    relisted = 0
    root = namespace.get(ROOT_INO)
    stack = [ROOT_INO] if root is not None and root.checked > 0 else []
    while stack:
        ino = stack.pop()
        try:
            await namespace.ensure_listed(ino, force=True)
        except NotFound:
            continue  # removed from the namespace since we found it (by its parent's listing)
        except Unavailable:
            raise
        except StoreError as exc:
            log.warning("import: cannot list inode %d: %s", ino, exc)
            continue
        relisted += 1
        stack.extend(reversed(await trio.to_thread.run_sync(listed_subdirectories, namespace, ino)))
    return relisted


async def sweep_loop(namespace: Namespace, interval: float) -> None:
    """Run :func:`sweep_once` every ``interval`` seconds, forever (cancel the scope to stop).

    The interval is measured from the end of one sweep to the start of the next, so a
    sweep that takes longer than the interval (huge trees, slow store) never overlaps
    with the next one. A failed sweep is logged and retried at the next interval; a
    failure never deletes anything (see the namespace's invariants).
    """
    while True:
        await trio.sleep(interval)
        started = time.monotonic()
        try:
            count = await sweep_once(namespace)
        except Unavailable as exc:
            log.warning("import sweep stopped early, will retry in %.0f s: %s", interval, exc)
            continue
        except Exception:
            log.exception("import sweep failed")
            continue
        log.debug("import sweep re-listed %d directories in %.2f s", count, time.monotonic() - started)
