"""The shared tier: blocks kept in an S3-compatible bucket that several nodes share.

A node that misses locally asks this tier before the origin, so N nodes cost the origin one
copy of the data, not N, and a job moved to a fresh node starts warm. It is a ``SHARED`` tier
(``tierfs.cache.tier``); docs/shared-cache.md has the deployment and the consistency argument.

* **Content-addressed names.** An entry's name is a hash of (origin endpoint, bucket, key, ETag,
  block index), so a changed object has other names and can never be served from the tier, and two
  origins never collide. An object of at most one block is one entry (stored whole); a larger one is
  one entry per block.
* **Self-validating entries.** Each entry starts with a header: magic, version, length, the
  entry's identity (the hash its name is made of) and an xxh3-128 digest of the block. A truncated,
  corrupted or foreign entry (another name's bytes) fails the check and is a miss.
* **Reads never fail or stall.** ``get`` has its own short timeout (``--shared-cache-timeout``),
  no retries, and every failure (down, slow, full, denied, invalid) is a miss. After a failure the
  tier is skipped for ``BACKOFF`` seconds, so a frozen tier costs a read one timeout, not one per
  block; a parallel lookup of a run (``get_many``) costs at most one timeout in all.
* **Fills are in the background.** ``put_many`` only queues (bounded in bytes, dropped under
  pressure) and never blocks; at most one upload per block is queued or running on this node.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import logging
import struct
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import xxhash

from ..errors import NotFound, StoreError
from ..store.objectstore import ObjectStore
from .chunkkey import ChunkKey, enc, lp
from .tier import Blocks, Level

log = logging.getLogger(__name__)

ENTRY_MAGIC = b"TFSB"
ENTRY_VERSION = 1
# magic, version, 3 reserved bytes, block length, identity (sha256), xxh3-128 of the block
_ENTRY = struct.Struct("<4sB3xQ32s16s")
_NAME_TAG = b"tierfs-shared-v1\0"
DEFAULT_TIMEOUT = 0.5  # seconds a read waits for the shared tier before going to the origin
BACKOFF = 5.0  # seconds the tier is skipped after a failed request
QUEUE_BYTES = 64 << 20  # fills waiting for upload; more are dropped
WRITERS = 2  # upload threads
LOOKUP_THREADS = 8  # parallel GETs of one run's blocks


def identity(origin: str, ck: ChunkKey) -> bytes:
    """The 32-byte identity of one block of one version of one object of one origin."""
    bucket, key, etag = ck.names()
    return hashlib.sha256(
        _NAME_TAG + lp(enc(origin)) + lp(bucket) + lp(key) + lp(etag) + ck.index.to_bytes(8, "little")
    ).digest()


def encode_entry(ident: bytes, data: bytes) -> bytes:
    return _ENTRY.pack(ENTRY_MAGIC, ENTRY_VERSION, len(data), ident, xxhash.xxh3_128_digest(data)) + data


def decode_entry(ident: bytes, raw: bytes) -> bytes | None:
    """The block in ``raw`` if it is a valid entry of ``ident``, else None."""
    if len(raw) < _ENTRY.size:
        return None
    magic, version, length, stored_ident, digest = _ENTRY.unpack_from(raw)
    data = raw[_ENTRY.size :]
    if (magic, version, stored_ident) != (ENTRY_MAGIC, ENTRY_VERSION, ident) or length != len(data):
        return None
    return data if xxhash.xxh3_128_digest(data) == digest else None


class SharedTier:
    name = "shared"
    level = Level.SHARED

    def __init__(
        self,
        store: ObjectStore,
        *,
        prefix: str,
        origin: str,
        block_size: int,
        queue_bytes: int = QUEUE_BYTES,
        writers: int = WRITERS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """``store`` is a client of the shared bucket whose every call is bounded by the tier's short
        timeout, with no retries; ``origin`` names the origin (its endpoint) in every entry's identity."""
        self._store = store
        self._prefix = prefix
        self._origin = origin
        self._block_size = block_size
        self._queue_bytes = queue_bytes
        self._clock = clock
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._queue: deque[tuple[bytes, bytes]] = deque()  # (identity, block)
        self._queued_bytes = 0
        self._pending: set[bytes] = set()  # identities queued or being uploaded: one writer per block
        self._down_until = 0.0
        self._closed = False
        self.counters = dict.fromkeys(
            ("shared_hits", "shared_misses", "shared_bytes", "shared_puts", "shared_put_dropped",
             "shared_errors", "shared_gets"), 0,
        )  # fmt: skip
        self._get_seconds = 0.0
        self._lookups = concurrent.futures.ThreadPoolExecutor(
            LOOKUP_THREADS, thread_name_prefix="tierfs-shared"
        )
        self._writers = [
            threading.Thread(target=self._write_loop, name=f"tierfs-shared-put-{n}", daemon=True)
            for n in range(writers)
        ]
        for thread in self._writers:
            thread.start()

    def _name(self, ident: bytes) -> str:
        hexed = ident.hex()
        return f"{self._prefix}{hexed[:2]}/{hexed}"

    def _count(self, **deltas: int) -> None:
        with self._lock:
            for key, delta in deltas.items():
                self.counters[key] += delta

    def _failed(self, what: str, exc: BaseException) -> None:
        """A request failed: count it, and skip the tier for a while (see the module docstring)."""
        with self._lock:
            self.counters["shared_errors"] += 1
            first = self._clock() >= self._down_until
            self._down_until = self._clock() + BACKOFF
        if first:
            log.warning("shared cache tier: %s failed (%s); using the origin for %g s", what, exc, BACKOFF)

    def _available(self) -> bool:
        with self._lock:
            return not self._closed and self._clock() >= self._down_until

    # -- reads ----------------------------------------------------------------------------------------

    def contains(self, ck: ChunkKey) -> bool:
        """Unknown without a request (see ``tierfs.cache.tier``)."""
        return False

    def get(self, ck: ChunkKey) -> bytes | None:
        if not self._available():
            return None
        ident = identity(self._origin, ck)
        started = time.monotonic()
        try:
            raw = self._store.get_range(self._name(ident), 0, _ENTRY.size + self._block_size).data
        except NotFound:
            self._count(shared_misses=1, shared_gets=1)
            return None
        except StoreError as exc:
            self._failed("GET", exc)
            self._count(shared_misses=1, shared_gets=1)
            return None
        finally:
            with self._lock:
                self._get_seconds += time.monotonic() - started
        data = decode_entry(ident, raw)
        if data is None:
            log.warning("shared cache tier: entry %s is invalid (corrupt or foreign); ignored", ident.hex())
            self._count(shared_errors=1, shared_misses=1, shared_gets=1)
            return None
        self._count(shared_hits=1, shared_bytes=len(data), shared_gets=1)
        return data

    def get_many(self, cks: Sequence[ChunkKey]) -> list[bytes | None]:
        """The blocks of a run, looked up in parallel: a frozen tier costs one timeout for all."""
        if len(cks) <= 1 or not self._available():
            return [self.get(ck) for ck in cks]
        try:
            return list(self._lookups.map(self.get, cks))
        except RuntimeError:  # the pool is shut down (closing)
            return [None] * len(cks)

    def get_range(self, ck: ChunkKey, start: int, length: int) -> bytes | None:
        data = self.get(ck)
        return None if data is None else data[start : start + length]

    # -- fills ----------------------------------------------------------------------------------------

    def put_many(self, items: Blocks, *, protect: Iterable[ChunkKey] = ()) -> None:
        """Queue blocks for upload; never blocks. A block already queued or uploading is skipped, and
        one that does not fit the queue is dropped (counted in ``shared_put_dropped``)."""
        with self._lock:
            if self._closed:
                return
            for ck, data in items:
                ident = identity(self._origin, ck)
                if ident in self._pending:
                    continue
                if self._queued_bytes + len(data) > self._queue_bytes:
                    self.counters["shared_put_dropped"] += 1
                    continue
                self._pending.add(ident)
                self._queue.append((ident, data))
                self._queued_bytes += len(data)
            self._wake.notify_all()

    def _write_loop(self) -> None:
        while True:
            with self._lock:
                while not self._queue and not self._closed:
                    self._wake.wait()
                if not self._queue:
                    return
                ident, data = self._queue.popleft()
                self._queued_bytes -= len(data)
                skip = self._clock() < self._down_until
            try:
                if skip:  # the tier failed just now: dropping is cheaper than waiting on it
                    self._count(shared_put_dropped=1)
                    continue
                self._store.put_bytes(self._name(ident), encode_entry(ident, data), {})
                self._count(shared_puts=1)
            except StoreError as exc:
                self._failed("PUT", exc)
            except Exception:  # never let a writer thread die: the queue would only fill
                log.exception("shared cache tier: upload failed")
            finally:
                with self._lock:
                    self._pending.discard(ident)
                    self._wake.notify_all()

    def drain(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for queued fills to finish; whether they all did."""
        deadline = time.monotonic() + timeout
        with self._lock:
            while self._pending:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._wake.wait(left)
            return True

    # -- the rest of the interface ------------------------------------------------------------------------

    def touch(self, cks: Iterable[ChunkKey]) -> None:
        """Age-out is the bucket's (a lifecycle rule or the cluster's TTL), not tracked per read."""

    def drop_object(self, bucket: str, key: str, keep_etag: str | None = None) -> int:
        """Content-addressed: another version has other names, so nothing stale can be served."""
        return 0

    def pin(self, bucket: str, key: str) -> None:
        """Pins hold local copies; the shared tier is aged out by its bucket's rule."""

    def unpin(self, bucket: str, key: str) -> None:
        """See :meth:`pin`."""

    def maintain(self) -> None:
        """Nothing periodic: fills are continuous and age-out is the bucket's."""

    def status(self) -> dict[str, Any]:
        with self._lock:
            out: dict[str, Any] = dict(self.counters)
            gets = out.pop("shared_gets")
            out["shared_get_ms"] = round(1000 * self._get_seconds / gets, 2) if gets else None
            out["shared_queue_bytes"] = self._queued_bytes
            return out

    def close(self, drain: float = 2.0) -> None:
        """Give queued fills ``drain`` seconds, then stop; whatever is left is dropped."""
        self.drain(drain)
        with self._lock:
            self._closed = True
            dropped = len(self._queue)
            self.counters["shared_put_dropped"] += dropped
            self._queue.clear()
            self._wake.notify_all()
        self._lookups.shutdown(wait=False, cancel_futures=True)
