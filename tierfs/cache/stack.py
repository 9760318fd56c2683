"""The composition of the cache tiers, in level order: memory -> local disk -> shared -> origin.

Every caller acts on cached data through :class:`Tiers`, never through one tier: the read path
(``read.hydrator``) uses the lookups below, in their levels' order; ``tierfs evict``, pins,
object changes, maintenance, status and write-back's hand-over of uploaded bytes use the
fan-out calls, which reach every tier. Trio-loop rules are those of each tier's level
(``tierfs.cache.tier``): the ``memory_*`` and ``held_locally``/``touch_local`` calls may run on
the loop; ``get_local`` on the loop only within the LOCAL rule (a small object); everything else
in worker threads. ``get_shared`` and ``store_fetched`` run in the S3 worker thread of a fetch.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable, Sequence
from typing import Any

from .chunkkey import ChunkKey
from .tier import Blocks, CacheTier, Level

log = logging.getLogger(__name__)


class TierReads:
    """Blocks (and bytes) each level served to readers: the per-tier rates of ``tierfs stats``.

    Counted here, where every read-path lookup passes, rather than in each tier, so a new tier of
    an existing level is counted with no code of its own. Thread-safe: lookups run on the loop and
    in worker threads. The shared tier counts its own hits (``shared_hits``), origin reads are the
    object store's GETs.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts = {"memory_hits": 0, "memory_hit_bytes": 0, "disk_hits": 0, "disk_hit_bytes": 0}

    def count(self, level: str, nbytes: int) -> None:
        with self._lock:
            self._counts[f"{level}_hits"] += 1
            self._counts[f"{level}_hit_bytes"] += nbytes

    def status(self) -> dict[str, Any]:
        with self._lock:
            return dict(self._counts)


class Tiers:
    def __init__(self, tiers: Sequence[CacheTier]) -> None:
        self.all = tuple(sorted(tiers, key=lambda t: t.level))  # stable: same-level tiers keep their order
        self.memory = tuple(t for t in self.all if t.level is Level.MEMORY)
        self.local = tuple(t for t in self.all if t.level is Level.LOCAL)
        self.shared = tuple(t for t in self.all if t.level is Level.SHARED)
        self.reads = TierReads()

    # -- the read path, level by level ------------------------------------------------------------------

    def from_memory(self, ck: ChunkKey) -> bytes | None:
        for tier in self.memory:
            data = tier.get(ck)
            if data is not None:
                self.reads.count("memory", len(data))
                return data
        return None

    def in_memory(self, ck: ChunkKey) -> bool:
        return any(t.contains(ck) for t in self.memory)

    def remember(self, items: Blocks) -> None:
        """Keep blocks just read or fetched in memory."""
        for tier in self.memory:
            tier.put_many(items)

    def held_locally(self, ck: ChunkKey) -> bool:
        """Whether a persistent tier on this node holds the block (index lookups only)."""
        return any(t.contains(ck) for t in self.local)

    def touch_local(self, cks: Sequence[ChunkKey]) -> None:
        """Reads served from memory, for the LRU and age-out of the tiers below."""
        for tier in self.local:
            tier.touch(cks)

    def get_local(self, ck: ChunkKey) -> bytes | None:
        for tier in self.local:
            data = tier.get(ck)
            if data is not None:
                self.reads.count("disk", len(data))
                return data
        return None

    def get_local_range(self, ck: ChunkKey, start: int, length: int) -> bytes | None:
        for tier in self.local:
            data = tier.get_range(ck, start, length)
            if data is not None:
                self.reads.count("disk", len(data))
                return data
        return None

    def get_shared(self, cks: Sequence[ChunkKey]) -> list[bytes | None]:
        """The blocks from the shared tiers (None where none has it); each tier is bounded by its own
        short timeout and looks a run's blocks up in parallel."""
        found: list[bytes | None] = [None] * len(cks)
        for tier in self.shared:
            todo = [n for n, data in enumerate(found) if data is None]
            if not todo:
                break
            for n, data in zip(todo, tier.get_many([cks[n] for n in todo]), strict=True):
                found[n] = data
        return found

    def store_fetched(self, items: Blocks, *, fill_shared: Blocks = ()) -> str | None:
        """Keep blocks fetched for a read in the local tiers, and queue ``fill_shared`` (the blocks that
        came from the origin) for the shared tiers. Returns why a local tier could not keep them, or
        None: a cache that cannot store never fails the read."""
        failure: str | None = None
        for tier in self.local:
            try:
                tier.put_many(items)
            except OSError as exc:
                failure = str(exc)
        if fill_shared:
            for tier in self.shared:
                tier.put_many(fill_shared)
        return failure

    # -- fan-out: everything that acts on cached data ------------------------------------------------------

    def put_many(self, items: Blocks, *, protect: Iterable[ChunkKey] = ()) -> None:
        """Blocks of a known version from elsewhere (write-back's uploaded bytes): every tier below
        memory keeps them. Raises the first local tier's OSError after trying all."""
        failure = self.store_fetched(items, fill_shared=items)
        if failure is not None:
            raise OSError(failure)

    def drop_object(self, bucket: str, key: str, keep_etag: str | None = None) -> int:
        """Forget the object in every tier (except ``keep_etag``'s blocks); bytes freed on disk."""
        freed = 0
        for tier in self.all:
            dropped = tier.drop_object(bucket, key, keep_etag)
            freed += dropped if tier.level is Level.LOCAL else 0
        return freed

    def pin(self, bucket: str, key: str) -> None:
        for tier in self.all:
            tier.pin(bucket, key)

    def unpin(self, bucket: str, key: str) -> None:
        for tier in self.all:
            tier.unpin(bucket, key)

    def maintain(self) -> None:
        for tier in self.all:
            tier.maintain()

    def status(self) -> dict[str, Any]:
        merged: dict[str, Any] = self.reads.status()
        for tier in self.all:
            merged.update(tier.status())
        return merged

    def close(self) -> None:
        """Close every tier, each even if another failed (lowest first: a shared tier's queue drains
        while the local one still answers)."""
        errors: list[BaseException] = []
        for tier in reversed(self.all):
            try:
                tier.close()
            except Exception as exc:
                log.warning("closing the %s tier: %s", tier.name, exc)
                errors.append(exc)
        if errors:
            raise errors[0]
