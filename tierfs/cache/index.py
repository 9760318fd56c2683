"""The chunk index: which blocks the disk tier holds, in one LMDB environment, plus running totals.

One job: the bookkeeping. It knows digests, records, objects, pins and access times, never a
file. The disk tier (``chunkcache``) adds a row after its file is in place and removes the row
before the file, so a row never points at nothing for long and a file without a row is never
served. The totals live in memory, are rebuilt by one scan at open and follow the index in
commit order; nothing derivable is persisted.

Locking: ``write_lock`` (one LMDB write txn at a time, totals updated in commit order) ->
``_mem`` (totals, pending access times, pins; held for microseconds). Callers that also take
per-digest stripes (the disk tier) take them before ``write_lock``. Reads take neither.
Thread-safe; LMDB read transactions are short enough for the trio loop (``contains``).
"""

from __future__ import annotations

import errno
import logging
import math
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, fields
from typing import Any

import lmdb

from ..cacheformat import (
    CACHE_META_BLOCK_SIZE,
    CACHE_META_CLEAN,
    CACHE_META_FORMAT,
    CHUNK_RECORD,
    DB_CACHE_META,
    DB_CHUNKS,
    DB_OBJECTS,
    DB_PINS,
    OBJECT_VALUE,
    encode_format_version,
)
from .chunkkey import object_id

log = logging.getLogger(__name__)

# The record layouts (CHUNK_RECORD in cache.chunks, OBJECT_VALUE in cache.objects) and the
# cache.meta keys are tierfs.cacheformat's: the direct reader reads the same records.
_PENDING_FLUSH_AT = 65536  # bound memory of batched access times even if nobody calls maintenance

Victims = Sequence[tuple[bytes, float | None]]  # (digest, access time it was chosen at; None: always)


@dataclass
class Totals:
    chunks: int = 0
    logical_bytes: int = 0
    disk_bytes: int = 0
    pinned_bytes: int = 0
    evictions: int = 0
    corrupt: int = 0

    def add(self, other: Totals) -> None:
        for f in fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))


@dataclass(frozen=True)
class Record:
    atime: float
    index: int
    logical: int
    stored: int
    flags: int
    bucket: bytes
    key: bytes
    etag: bytes

    def encode(self) -> bytes:
        return (
            CHUNK_RECORD.pack(
                self.atime,
                self.index,
                self.logical,
                self.stored,
                self.flags,
                len(self.bucket),
                len(self.key),
                len(self.etag),
            )
            + self.bucket
            + self.key
            + self.etag
        )

    @classmethod
    def decode(cls, raw: bytes) -> Record:
        atime, index, logical, stored, flags, blen, klen, elen = CHUNK_RECORD.unpack_from(raw)
        pos = CHUNK_RECORD.size
        bucket = raw[pos : pos + blen]
        key = raw[pos + blen : pos + blen + klen]
        etag = raw[pos + blen + klen : pos + blen + klen + elen]
        return cls(atime, index, logical, stored, flags, bucket, key, etag)

    @property
    def object_id(self) -> bytes:
        return object_id(self.bucket, self.key)


def _raw_object_id(raw: bytes, blen: int, klen: int) -> bytes:
    """Object id straight from an encoded index record, for scans that skip full decoding."""
    pos = CHUNK_RECORD.size
    return object_id(raw[pos : pos + blen], raw[pos + blen : pos + blen + klen])


def index_error(exc: lmdb.Error) -> OSError:
    """An index (LMDB) failure as the OSError callers of ``put`` handle: a full map is ENOSPC; a
    failed commit carries LMDB's errno (a full disk surfaces as EIO from mdb_txn_commit)."""
    if isinstance(exc, lmdb.MapFullError):
        return OSError(errno.ENOSPC, f"chunk index full: {exc}")
    code = getattr(exc, "code", None)
    return OSError(
        code if isinstance(code, int) and code in errno.errorcode else errno.EIO, f"chunk index: {exc}"
    )


class ChunkIndex:
    def __init__(self, env: lmdb.Environment, block_size: int, clock: Callable[[], float]) -> None:
        self._env = env
        self._block_size = block_size
        self._clock = clock
        self._chunks = env.open_db(DB_CHUNKS)  # digest -> Record
        self._objects = env.open_db(DB_OBJECTS)  # object_id + digest -> index + etag
        self._pins = env.open_db(DB_PINS)  # object_id -> bucket length + bucket + key
        self._meta = env.open_db(DB_CACHE_META)  # block size; 'clean' flag while closed cleanly
        self.write_lock = threading.Lock()
        self._mem = threading.Lock()
        self._totals = Totals()
        self._pending: dict[bytes, float] = {}  # digest -> access time not yet written to the index
        self._pinned: set[bytes] = set()

    # ------------------------------------------------------------------ open / close

    def open(self) -> tuple[bool, bool]:
        """Read the state left by the last mount: (void, clean). ``void``: another block size or
        format wrote this index, so every row is meaningless (block i names another byte range, or
        every file would fail validation). ``clean``: the last close was clean."""
        with self._env.begin() as txn:
            stored_bs = txn.get(CACHE_META_BLOCK_SIZE, db=self._meta)
            stored_format = txn.get(CACHE_META_FORMAT, db=self._meta)
            clean = txn.get(CACHE_META_CLEAN, db=self._meta) is not None
            self._pinned = {oid for oid, _ in txn.cursor(db=self._pins)}
        void = stored_bs is not None and (
            int.from_bytes(stored_bs, "little") != self._block_size
            or stored_format != encode_format_version()
        )
        return void, clean

    def clear(self) -> None:
        """Drop every chunk row (pins stay: they name objects, not blocks)."""
        with self.write_lock, self._env.begin(write=True) as txn:
            txn.drop(self._chunks, delete=False)
            txn.drop(self._objects, delete=False)

    def mark_open(self) -> None:
        """Record block size and format, and clear the clean flag (a crash leaves it clear).

        A full disk must not keep the mount from starting: reads are then served uncached. The
        clean flag may stay set, so a crash now skips the reconcile walk; a read still treats a
        missing or stray file as a miss, which is all the walk protects."""
        try:
            with self.write_lock, self._env.begin(write=True) as txn:
                txn.put(CACHE_META_BLOCK_SIZE, self._block_size.to_bytes(8, "little"), db=self._meta)
                txn.put(CACHE_META_FORMAT, encode_format_version(), db=self._meta)
                txn.delete(CACHE_META_CLEAN, db=self._meta)
        except lmdb.Error as exc:
            log.warning("chunk cache opened read-mostly: cannot update its index (%s)", exc)

    def mark_clean(self) -> None:
        try:
            with self.write_lock, self._env.begin(write=True) as txn:
                txn.put(CACHE_META_CLEAN, b"1", db=self._meta)
        except lmdb.Error as exc:  # a full disk: the next open treats this close as unclean, which is safe
            log.warning("chunk cache not marked clean: %s", exc)

    def recount(self) -> None:
        totals = Totals()
        with self._env.begin() as txn:
            for _, raw in txn.cursor(db=self._chunks):
                _, _, logical, stored, _, blen, klen, _ = CHUNK_RECORD.unpack_from(raw)
                totals.chunks += 1
                totals.logical_bytes += logical
                totals.disk_bytes += stored
                if self._pinned and _raw_object_id(raw, blen, klen) in self._pinned:
                    totals.pinned_bytes += stored
        with self._mem:
            self._totals = totals

    # ------------------------------------------------------------------ queries

    def contains(self, digest: bytes) -> bool:
        with self._env.begin(db=self._chunks) as txn:
            return txn.get(digest) is not None

    def absent(self, digests: Iterable[bytes]) -> list[bytes]:
        with self._env.begin(db=self._chunks) as txn:
            return [d for d in digests if txn.get(d) is None]

    def digests(self) -> set[bytes]:
        with self._env.begin() as txn:
            return set(txn.cursor(db=self._chunks).iternext(values=False))

    def totals(self) -> Totals:
        with self._mem:
            return Totals(**vars(self._totals))

    def object_digests(self, oid: bytes, keep_etag: bytes | None = None) -> list[bytes]:
        """Digests of every indexed block of one object, except those of ``keep_etag``."""
        with self._env.begin() as txn:
            return [d for d, etag in self._object_rows(txn, oid) if etag != keep_etag]

    def _object_rows(self, txn: Any, oid: bytes) -> Iterator[tuple[bytes, bytes]]:
        """(digest, etag) of every indexed block of one object: a prefix scan."""
        cursor = txn.cursor(db=self._objects)
        if not cursor.set_range(oid):
            return
        for k, v in cursor.iternext():
            if not k.startswith(oid):
                return
            yield k[len(oid) :], v[OBJECT_VALUE.size :]

    # ------------------------------------------------------------------ rows

    def add(self, rows: Sequence[tuple[bytes, Record]]) -> None:
        """Index blocks whose files are in place, in one transaction. Raises lmdb.Error."""
        if not rows:
            return
        with self.write_lock:
            delta = Totals()
            with self._env.begin(write=True) as txn:
                for digest, rec in rows:
                    pinned = rec.object_id in self._pinned
                    old = txn.get(digest, db=self._chunks)
                    if old is not None:  # not expected (checked under the stripe), but stay exact
                        was = Record.decode(old)
                        delta.chunks -= 1
                        delta.logical_bytes -= was.logical
                        delta.disk_bytes -= was.stored
                        delta.pinned_bytes -= was.stored if pinned else 0
                    txn.put(digest, rec.encode(), db=self._chunks)
                    txn.put(rec.object_id + digest, OBJECT_VALUE.pack(rec.index) + rec.etag, db=self._objects)
                    delta.chunks += 1
                    delta.logical_bytes += rec.logical
                    delta.disk_bytes += rec.stored
                    delta.pinned_bytes += rec.stored if pinned else 0
            self._apply(delta)

    def remove(self, batch: Victims, *, evicted: bool) -> tuple[list[bytes], int]:
        """Drop rows in one transaction. A victim chosen at access time ``t`` is spared if it was read
        after ``t`` (None: unconditional). Returns (digests removed, bytes on disk they held)."""
        removed: list[bytes] = []
        delta = Totals()
        with self.write_lock:
            with self._env.begin(write=True) as txn:
                for digest, chosen_atime in batch:
                    raw = txn.get(digest, db=self._chunks)
                    if raw is None:
                        continue
                    rec = Record.decode(raw)
                    if chosen_atime is not None:
                        with self._mem:
                            latest = max(rec.atime, self._pending.get(digest, rec.atime))
                        if latest > chosen_atime:
                            continue
                    oid = rec.object_id
                    txn.delete(digest, db=self._chunks)
                    txn.delete(oid + digest, db=self._objects)
                    removed.append(digest)
                    delta.chunks -= 1
                    delta.logical_bytes -= rec.logical
                    delta.disk_bytes -= rec.stored
                    delta.pinned_bytes -= rec.stored if oid in self._pinned else 0
            if evicted:
                delta.evictions = len(removed)
            self._apply(delta, removed)
        return removed, -delta.disk_bytes

    def _apply(self, delta: Totals, removed: Iterable[bytes] = ()) -> None:
        """Add a delta to the totals; called under ``write_lock`` right after the commit."""
        with self._mem:
            self._totals.add(delta)
            for digest in removed:
                self._pending.pop(digest, None)

    def note_corrupt(self, count: int) -> None:
        with self._mem:
            self._totals.corrupt += count

    # ------------------------------------------------------------------ access times

    def note_read(self, digests: Iterable[bytes], at: float | None = None) -> None:
        """Batch access times in memory (flushed by :meth:`flush_access_times`). Past 65,536 pending
        times it flushes itself, so memory stays bounded even if nobody calls maintenance."""
        now = self._clock() if at is None else at
        with self._mem:
            for digest in digests:
                if self._pending.get(digest, -math.inf) < now:
                    self._pending[digest] = now
            flush = len(self._pending) >= _PENDING_FLUSH_AT
        if flush:
            self.flush_access_times()

    def note_reads_at(self, times: Iterable[tuple[bytes, float]]) -> int:
        """Access times recorded elsewhere (other processes); a time in the future is taken as now,
        so a skewed clock cannot keep a block young for ever. Returns how many were recorded."""
        now = self._clock()
        count = 0
        with self._mem:
            for digest, at in times:
                at = min(at, now)
                if self._pending.get(digest, -math.inf) < at:
                    self._pending[digest] = at
                count += 1
        return count

    def flush_access_times(self) -> None:
        """Write the batched access times in one transaction. Holding ``write_lock`` from the swap to
        the commit means an eviction scan sees every access time in either place.

        If the index cannot be written (a full disk), the batch is dropped: access times only order
        eviction, and a read must not fail for them."""
        with self.write_lock:
            with self._mem:
                pending, self._pending = self._pending, {}
            if not pending:
                return
            try:
                with self._env.begin(write=True, db=self._chunks) as txn:
                    for digest, atime in pending.items():
                        raw = txn.get(digest)
                        if raw is None:
                            continue  # evicted meanwhile
                        values = CHUNK_RECORD.unpack_from(raw)
                        if atime > values[0]:
                            txn.put(digest, CHUNK_RECORD.pack(atime, *values[1:]) + raw[CHUNK_RECORD.size :])
            except lmdb.Error as exc:
                log.warning("dropped %d access times: cannot write the chunk index (%s)", len(pending), exc)

    def candidates(self, protect: frozenset[bytes]) -> list[tuple[float, bytes, int]]:
        """(latest access time, digest, bytes on disk) of every evictable chunk: one read-txn scan,
        merged with the access times not yet flushed; never pinned or protected ones. O(chunks)."""
        with self.write_lock:  # see flush_access_times
            with self._mem:
                pending = dict(self._pending)
                pinned = frozenset(self._pinned)
            txn = self._env.begin(db=self._chunks)
        try:
            out: list[tuple[float, bytes, int]] = []
            for digest, raw in txn.cursor():
                if digest in protect:
                    continue
                atime, _, _, stored, _, blen, klen, _ = CHUNK_RECORD.unpack_from(raw)
                if pinned and _raw_object_id(raw, blen, klen) in pinned:
                    continue
                out.append((max(atime, pending.get(digest, atime)), digest, stored))
            return out
        finally:
            txn.abort()

    # ------------------------------------------------------------------ pins

    def set_pinned(self, bucket: bytes, key: bytes, pinned: bool) -> None:
        """Pin (exempt from eviction and age-out, present and future blocks) or unpin one object."""
        oid = object_id(bucket, key)
        with self.write_lock:
            if (oid in self._pinned) == pinned:
                return
            size = 0
            with self._env.begin(write=True) as txn:
                if pinned:
                    txn.put(oid, len(bucket).to_bytes(2, "little") + bucket + key, db=self._pins)
                else:
                    txn.delete(oid, db=self._pins)
                for digest, _ in self._object_rows(txn, oid):
                    raw = txn.get(digest, db=self._chunks)
                    if raw is not None:
                        size += Record.decode(raw).stored
            with self._mem:
                if pinned:
                    self._pinned.add(oid)
                    self._totals.pinned_bytes += size
                else:
                    self._pinned.discard(oid)
                    self._totals.pinned_bytes -= size
