"""The one cache-tier interface, and the levels tiers are composed in.

The read path consults tiers in level order, memory -> local disk -> shared -> origin, and
everything that acts on cached data (prefetch, read-ahead, pins, eviction, ``tierfs evict``,
write-back handing over uploaded bytes, status) goes through :class:`tierfs.cache.stack.Tiers`,
never to one tier directly. A new tier is one new module with a class that implements
:class:`CacheTier`, as ``DataCache`` implementations are in mountpoint-s3.

Trio-loop rules, by level (every tier is thread-safe):

* ``MEMORY``: every call is cheap and non-blocking, and may run on the trio loop.
* ``LOCAL`` (persistent, on this node): blocking. ``contains`` and ``touch`` are index lookups
  of microseconds and may run on the loop; so may ``get`` for an object of at most
  ``read.hydrator.LOOP_READ_MAX`` bytes (measured cheaper than the thread hop, docs/design.md).
  Every other call runs in a worker thread.
* ``SHARED`` (remote, shared by nodes): ``get`` is a network request, made in the S3 worker thread
  that fetches a run, before the origin, and bounded by the tier's own short timeout: a tier that
  is down, slow or full answers None (a miss), never an error and never a stall. ``put_many``
  never blocks: it queues for a background writer and drops under pressure, so it may be called
  from any thread. ``contains`` cannot know without a request and answers False. ``drop_object``,
  ``pin`` and ``unpin`` do nothing: entries are content-addressed (a changed object is a new
  name), and the tier's bucket ages them out (docs/shared-cache.md).

No tier ever fails a read for its own failure: a block it cannot serve is a miss, a block it cannot
store is not stored (a LOCAL tier raises OSError from ``put_many`` so the caller can count it).
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Sequence
from typing import Any, Protocol

from .chunkkey import ChunkKey

Blocks = Sequence[tuple[ChunkKey, bytes]]


class Level(enum.IntEnum):
    MEMORY = 0
    LOCAL = 1
    SHARED = 2


class CacheTier(Protocol):
    @property
    def name(self) -> str:
        """Short name, used in logs and status."""
        ...

    @property
    def level(self) -> Level: ...

    def contains(self, ck: ChunkKey) -> bool:
        """Whether ``get`` will very likely find the block, known without I/O."""
        ...

    def get(self, ck: ChunkKey) -> bytes | None:
        """The block's validated bytes, or None (absent, invalid, or the tier failed)."""
        ...

    def get_many(self, cks: Sequence[ChunkKey]) -> list[bytes | None]:
        """``get`` of each block, in order; a remote tier looks them up in parallel."""
        ...

    def get_range(self, ck: ChunkKey, start: int, length: int) -> bytes | None:
        """Up to ``length`` validated bytes of the block from ``start``, or None."""
        ...

    def put_many(self, items: Blocks, *, protect: Iterable[ChunkKey] = ()) -> None:
        """Keep blocks; the blocks in ``items`` and ``protect`` are not evicted to make room."""
        ...

    def touch(self, cks: Iterable[ChunkKey]) -> None:
        """Record reads that a tier above served, so this tier's LRU and age-out see them."""
        ...

    def drop_object(self, bucket: str, key: str, keep_etag: str | None = None) -> int:
        """Forget every block of the object except those of ``keep_etag``; bytes freed."""
        ...

    def pin(self, bucket: str, key: str) -> None:
        """Exempt the object's blocks, present and future, from eviction."""
        ...

    def unpin(self, bucket: str, key: str) -> None: ...

    def maintain(self) -> None:
        """Periodic work (eviction, age-out, persisting access times); a worker thread, every few s."""
        ...

    def status(self) -> dict[str, Any]:
        """This tier's fields of ``tierfs status`` and the metrics; cheap, callable on the loop."""
        ...

    def close(self) -> None: ...
