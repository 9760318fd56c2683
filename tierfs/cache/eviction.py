"""Eviction of the disk tier: which blocks go, and when (size limit, free-space floor, age-out).

One job: the policy. It picks victims from the index's candidates (least recently read first,
never pinned or protected ones) and hands them to ``remove``, which the disk tier implements
(stripes, index row, then file). Blocking, thread-safe; worker threads only.
"""

from __future__ import annotations

import math
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .index import ChunkIndex, Victims

LOW_WATER = 0.90  # eviction stops at this share of the (effective) limit, so it runs in bursts, not per put
# Background maintenance already starts at this share, so the eviction a reader's put does
# synchronously (only past the hard limit) stays rare: readers are not the ones who wait.
HIGH_WATER = 0.95

DiskSpace = Callable[[Path], tuple[int, int]]


def statvfs_space(path: Path) -> tuple[int, int]:
    """(total bytes, bytes available to unprivileged users) of the filesystem holding ``path``."""
    st = os.statvfs(path)
    return st.f_blocks * st.f_frsize, st.f_bavail * st.f_frsize


@dataclass(frozen=True)
class Limits:
    """``limit_bytes``: bytes on disk (None: no cap); ``min_free``: share of the filesystem kept free;
    ``max_age``: seconds a block may stay unread (inf: never aged out)."""

    limit_bytes: int | None
    min_free: float
    max_age: float


class Evictor:
    def __init__(
        self,
        index: ChunkIndex,
        root: Path,
        limits: Limits,
        *,
        remove: Callable[[Victims], int],
        clock: Callable[[], float],
        disk_space: DiskSpace,
    ) -> None:
        """``remove`` deletes victims and returns how many it removed."""
        self._index = index
        self._root = root
        self.limits = limits
        self._remove = remove
        self._clock = clock
        self._disk_space = disk_space
        self._lock = threading.Lock()  # one eviction at a time; outermost of the disk tier's locks

    def free_disk_bytes(self) -> int:
        return self._disk_space(self._root)[1]

    def _target(self, trigger: float) -> int | None:
        """Bytes on disk to evict down to, or None while under ``trigger`` times the hard limit. The hard
        limit is ``limit_bytes`` and, with a free-space floor, whatever keeps ``min_free`` of the filesystem
        free; the target is the low-water mark of the smaller one."""
        disk = self._index.totals().disk_bytes
        limit, min_free = self.limits.limit_bytes, self.limits.min_free
        effective: float = math.inf if limit is None else limit
        if min_free > 0:
            total, available = self._disk_space(self._root)
            effective = min(effective, disk + available - min_free * total)
        if disk <= effective * trigger:
            return None
        return max(0, int(effective * LOW_WATER))

    def enforce(self, protect: frozenset[bytes], trigger: float = 1.0) -> int:
        """Past ``trigger`` times the hard limit, evict down to the low-water mark. Returns the number
        evicted. ``trigger`` 1.0 is a put's synchronous check, HIGH_WATER the maintenance pass."""
        with self._lock:  # the target is recomputed once we hold the lock
            target = self._target(trigger)
            if target is None:
                return 0
            candidates = self._index.candidates(protect)
            candidates.sort()
            excess = self._index.totals().disk_bytes - target
            victims: list[tuple[bytes, float | None]] = []
            for atime, digest, stored in candidates:
                if excess <= 0:
                    break
                victims.append((digest, atime))
                excess -= stored
            return self._remove(victims)

    def sweep_aged(self, now: float | None = None) -> int:
        """Evict blocks not read for ``max_age`` seconds, except pinned ones. Returns the number evicted."""
        if not math.isfinite(self.limits.max_age):
            return 0
        cutoff = (self._clock() if now is None else now) - self.limits.max_age
        victims: list[tuple[bytes, float | None]] = [
            (digest, atime) for atime, digest, _ in self._index.candidates(frozenset()) if atime < cutoff
        ]
        return self._remove(victims)
