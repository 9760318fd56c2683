"""The memory tier: a bounded LRU of recently used blocks.

It serves the many kernel reads that fall into one 1 MiB block (128 KiB requests without
raised readahead) without a thread hop or disk read per request. A ``MEMORY`` tier
(``tierfs.cache.tier``): every call is cheap, thread-safe (one lock held for microseconds)
and may run on the trio loop. Nothing here survives the mount.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from typing import Any

from .chunkkey import ChunkKey, enc, object_id
from .tier import Blocks, Level


class MemoryTier:
    name = "memory"
    level = Level.MEMORY

    def __init__(self, limit_bytes: int) -> None:
        self.limit = limit_bytes
        self.size = 0
        self._lock = threading.Lock()
        # digest -> (object id, etag, data), least recently used first
        self._blocks: OrderedDict[bytes, tuple[bytes, bytes, bytes]] = OrderedDict()
        self._objects: dict[bytes, set[bytes]] = {}  # object id -> digests held

    def contains(self, ck: ChunkKey) -> bool:
        return ck.digest() in self._blocks

    def get(self, ck: ChunkKey) -> bytes | None:
        digest = ck.digest()
        with self._lock:
            entry = self._blocks.get(digest)
            if entry is None:
                return None
            self._blocks.move_to_end(digest)
            return entry[2]

    def get_many(self, cks: Sequence[ChunkKey]) -> list[bytes | None]:
        return [self.get(ck) for ck in cks]

    def get_range(self, ck: ChunkKey, start: int, length: int) -> bytes | None:
        data = self.get(ck)
        return None if data is None else data[start : start + length]

    def put_many(self, items: Blocks, *, protect: Iterable[ChunkKey] = ()) -> None:
        """Keep the blocks, evicting least recently used ones past the limit (``protect`` is moot:
        a block just put is the most recent)."""
        with self._lock:
            for ck, data in items:
                digest = ck.digest()
                self._pop(digest)
                oid = ck.object_id()
                self._blocks[digest] = (oid, enc(ck.etag), data)
                self._objects.setdefault(oid, set()).add(digest)
                self.size += len(data)
            while self.size > self.limit and self._blocks:
                self._pop(next(iter(self._blocks)))

    def _pop(self, digest: bytes) -> int:
        """Under the lock: forget one block; returns its size (0 if absent)."""
        entry = self._blocks.pop(digest, None)
        if entry is None:
            return 0
        oid, _, data = entry
        held = self._objects.get(oid)
        if held is not None:
            held.discard(digest)
            if not held:
                del self._objects[oid]
        self.size -= len(data)
        return len(data)

    def touch(self, cks: Iterable[ChunkKey]) -> None:
        """Reads are recorded by ``get`` itself; nothing is above this tier."""

    def drop_object(self, bucket: str, key: str, keep_etag: str | None = None) -> int:
        keep = None if keep_etag is None else enc(keep_etag)
        with self._lock:
            held = self._objects.get(object_id(enc(bucket), enc(key)), set())
            return sum(self._pop(d) for d in list(held) if self._blocks[d][1] != keep)

    def pin(self, bucket: str, key: str) -> None:
        """Pins protect persistent copies; memory is a working set."""

    def unpin(self, bucket: str, key: str) -> None:
        """See :meth:`pin`."""

    def maintain(self) -> None:
        """Bounded on every put; nothing to do periodically."""

    def clear(self) -> None:
        with self._lock:
            self._blocks.clear()
            self._objects.clear()
            self.size = 0

    def status(self) -> dict[str, Any]:
        return {"memory_cache_bytes": self.size}

    def close(self) -> None:
        self.clear()
