"""The local disk tier: fixed-size blocks of S3 object data in files, surviving remounts.

The cache outlives the mount (unlike mountpoint-s3's), so warm data survives a remount. This
module is the tier's facade and owns the files and their locks; the parts with one job each are
``blockfile`` (the self-validating file format), ``index`` (the LMDB index and running totals)
and ``eviction`` (limits, LRU, age-out). The on-disk format and policies are docs/cache-format.md.
Trio-loop rules: a ``LOCAL`` tier (``tierfs.cache.tier``); every public method is thread-safe.

Who is the authority for what:

* The LMDB index says which chunks exist; a file without an index entry is never served.
* Each file validates itself, so files need no fsync: a torn or stale file is detected on read and
  dropped like a miss.
* The cache is an optimisation: a full disk (or a full or failing index) never fails a read. ``put`` then
  raises OSError and leaves the cache consistent, the caller serves the bytes uncached; a read that finds a
  bad file still answers "miss" if the index cannot record its removal; and opening or closing the cache
  on a full disk only logs what it could not record.

Locking, outermost first (never acquired in another order, so no deadlock): the evictor's lock ->
per-digest stripe locks (sorted) -> the index's ``write_lock`` -> its in-memory lock. Reads of a
warm chunk take no stripe and no write lock.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import shutil
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lmdb

from ..cacheformat import CHUNK_DIR, chunk_path
from .blockfile import TMP_PREFIX, BlockReader, BlockWriter, Encoded, Invalid, unlink_quiet
from .chunkkey import ChunkKey, enc, object_id
from .eviction import HIGH_WATER, DiskSpace, Evictor, Limits, statvfs_space
from .index import ChunkIndex, Record, Victims, index_error
from .tier import Blocks, Level

log = logging.getLogger(__name__)

_STRIPES = 256
_DELETE_BATCH = 512  # victims per write txn: a few ms each, and one commit per 512 victims


@dataclass(frozen=True)
class CacheStats:
    """A snapshot for status and tests. Byte counts on disk include the file headers;
    ``pinned_bytes`` counts bytes on disk of pinned objects' chunks. Hits are counted once, by
    the read path (``read.hydrator.HydratorStats``), not here."""

    chunks: int
    logical_bytes: int
    disk_bytes: int
    pinned_bytes: int
    evictions: int
    corrupt: int
    limit_bytes: int | None
    free_disk_bytes: int
    compression_ratio: float


class ChunkCache:
    """Blocks of object data on local disk, LRU/age evicted, pinnable, surviving remounts."""

    name = "disk"
    level = Level.LOCAL
    # Mode of new chunk files: 0600, or 0640 once the mount opens the cache to a group
    # (--cache-group, for direct readers; tierfs.reader.daemon sets it).
    file_mode = 0o600

    def __init__(
        self,
        env: lmdb.Environment,
        root: Path,
        *,
        block_size: int,
        limit_bytes: int | None,
        min_free: float,
        max_age: float,
        compression_level: int | None,
        clock: Callable[[], float] = time.time,
        disk_space: DiskSpace = statvfs_space,
    ) -> None:
        """``disk_space`` returns (total, available) bytes of the cache filesystem; injectable for tests."""
        if block_size <= 0:
            raise ValueError("block_size must be positive")
        self._root = Path(root)
        self._chunk_dir = os.path.join(self._root, CHUNK_DIR)
        self._block_size = block_size
        self._clock = clock
        self._reader = BlockReader(block_size)
        self._writer = BlockWriter(block_size, compression_level)
        self._index = ChunkIndex(env, block_size, clock)
        self._evictor = Evictor(
            self._index,
            self._root,
            Limits(limit_bytes, min_free, max_age),
            remove=lambda victims: self._remove(victims, evicted=True),
            clock=clock,
            disk_space=disk_space,
        )
        self._stripes = [threading.Lock() for _ in range(_STRIPES)]
        self._closed = False

        self._make_dir(str(self._root))
        self._make_tree()
        self._open()

    # ------------------------------------------------------------------ open / close

    def _open(self) -> None:
        """Bring index and files into agreement, then compute the running totals with one scan."""
        void, clean = self._index.open()
        if void:
            self._index.clear()
            shutil.rmtree(self._chunk_dir, ignore_errors=True)
            self._make_tree()
            clean = True
        if not clean:
            self._reconcile_tree()
        self._index.mark_open()
        self._index.recount()

    def _make_tree(self) -> None:
        """``chunks/`` and its 256 fan-out directories, made once at open rather than per write.

        One level of 256 directories, not two of 65,536: a fresh cache would otherwise pay a
        mkdir for nearly every block it stores, and a full tree would hold 256 MiB of directory
        blocks. A few thousand entries per directory is nothing for ext4's or XFS's hashed
        directories. On a full disk the tree may stay incomplete: a write makes it again when a
        directory is missing, and a read of a missing file is a miss."""
        try:
            self._make_dir(self._chunk_dir)
            for i in range(256):
                self._make_dir(os.path.join(self._chunk_dir, f"{i:02x}"))
        except OSError as exc:
            if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
                raise
            log.warning("chunk cache directories incomplete: %s", exc)

    def _reconcile_tree(self) -> None:
        """After an unclean shutdown only: one walk of the tree removes temp files and files the index
        does not know, and drops index entries whose file is gone. After a clean close this walk is
        skipped (a 200k-file walk costs seconds); a missing file is then found lazily by get()."""
        present: set[bytes] = set()
        with os.scandir(self._chunk_dir) as top:
            fanouts = [e.path for e in top if len(e.name) == 2 and e.is_dir(follow_symlinks=False)]
        for fanout in fanouts:
            with os.scandir(fanout) as entries:
                for entry in entries:
                    if entry.name.startswith(TMP_PREFIX):
                        unlink_quiet(entry.path)
                    elif len(entry.name) == 64:
                        with contextlib.suppress(ValueError):
                            present.add(bytes.fromhex(entry.name))
        indexed = self._index.digests()
        for digest in present - indexed:
            unlink_quiet(self._path(digest))
        self._remove([(d, None) for d in indexed - present], evicted=False)

    def close(self) -> None:
        """Persist batched access times and mark the cache clean. The environment belongs to the caller
        and stays open. Other threads must have stopped using the cache."""
        if self._closed:
            return
        self._index.flush_access_times()
        self._index.mark_clean()
        self._closed = True

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("chunk cache is closed")

    # ------------------------------------------------------------------ paths and locks

    def _path(self, digest: bytes) -> str:
        return chunk_path(self._chunk_dir, digest)

    @staticmethod
    def _make_dir(path: str) -> None:
        """Create (or tighten) a cache directory to 0700: the cache holds other users' object data."""
        try:
            os.mkdir(path, 0o700)
        except FileExistsError:
            if os.stat(path).st_mode & 0o777 == 0o700:
                return
        os.chmod(path, 0o700)

    @contextlib.contextmanager
    def _locked(self, digests: Iterable[bytes]) -> Iterator[None]:
        """Hold the stripe locks of ``digests`` in ascending order: every mutation of one chunk's file
        and index entry happens under its stripe, so file and index never disagree for long."""
        with contextlib.ExitStack() as stack:
            for i in sorted({d[0] for d in digests}):
                stack.enter_context(self._stripes[i])
            yield

    # ------------------------------------------------------------------ reading

    def contains(self, ck: ChunkKey) -> bool:
        """Index lookup only: no file I/O, no counters."""
        self._check_open()
        return self._index.contains(ck.digest())

    def get(self, ck: ChunkKey) -> bytes | None:
        """The validated logical bytes of ``ck``, or None. An invalid file is removed and counted."""
        return self.get_range(ck, 0, self._block_size)

    def get_many(self, cks: Sequence[ChunkKey]) -> list[bytes | None]:
        return [self.get(ck) for ck in cks]

    def get_range(self, ck: ChunkKey, start: int, length: int) -> bytes | None:
        """Up to ``length`` validated bytes of ``ck`` from ``start`` (fewer at the chunk's end), or None.

        Only the pages covering the range are read and checked, so a 128 KiB random read costs
        a 128 KiB disk read rather than a whole block's. An invalid file is removed and counted.
        """
        self._check_open()
        digest = ck.digest()
        if not self._index.contains(digest):
            return None
        try:
            data = self._reader.read(self._path(digest), ck, start, length)
        except Invalid as bad:
            try:
                corrupt = self._discard(digest, bad.ident)
            except lmdb.Error as exc:  # a full index cannot record the removal: still just a miss
                log.warning("cannot drop an invalid chunk from the index: %s", exc)
                corrupt = True
            self._index.note_corrupt(int(corrupt))
            return None
        self._index.note_read([digest])
        return data

    def _discard(self, digest: bytes, ident: tuple[int, int] | None) -> bool:
        """Remove an invalid file and its index entry, unless a put replaced the file meanwhile. False if
        there was nothing to remove (an eviction got there first: a benign race, not corruption)."""
        path = self._path(digest)
        with self._locked([digest]):
            try:
                st = os.stat(path)
                current: tuple[int, int] | None = (st.st_dev, st.st_ino)
            except OSError:
                current = None
            if current is not None and current != ident:
                return False  # a fresh file took its place; it will be validated on its own read
            if current is not None:
                unlink_quiet(path)
            removed = self._remove_locked([(digest, None)], evicted=False)[0]
            return removed > 0 or current is not None

    # ------------------------------------------------------------------ writing

    def put(self, ck: ChunkKey, data: bytes, *, protect: Iterable[ChunkKey] = ()) -> None:
        """Store one block. See :meth:`put_many`."""
        self.put_many([(ck, data)], protect=protect)

    def put_many(self, items: Blocks, *, protect: Iterable[ChunkKey] = ()) -> None:
        """Store blocks (e.g. a run fetched by one ranged GET) with one index transaction. If that takes
        the cache over its hard limit, evict LRU chunks synchronously down to the low-water mark; the
        chunks just stored and those in ``protect`` are never chosen.

        Raises OSError (ENOSPC, EIO...) if a file cannot be written or the index cannot commit (an
        LMDB error is raised as OSError too, so callers handle one type); the cache stays consistent:
        none of the blocks is indexed and their files are gone. Once the blocks are stored, a failing
        eviction is logged, not raised: the blocks are there, and maintenance evicts later."""
        self._check_open()
        unique = {ck.digest(): (ck, data) for ck, data in items}
        if not unique:
            return
        with self._locked(unique):
            fresh = self._index.absent(unique)
            written: list[bytes] = []
            rows: list[tuple[bytes, Record]] = []
            try:
                for digest in fresh:
                    ck, data = unique[digest]
                    encoded = self._writer.encode(ck, data)
                    self._write_file(digest, encoded)
                    written.append(digest)
                    bucket, key, etag = ck.names()
                    rec = Record(self._clock(), ck.index, encoded.logical, encoded.stored, encoded.flags,
                                 bucket, key, etag)  # fmt: skip
                    rows.append((digest, rec))
                self._index.add(rows)
            except BaseException as exc:
                for digest in written:
                    unlink_quiet(self._path(digest))
                if isinstance(exc, lmdb.Error):
                    raise index_error(exc) from exc
                raise
        already = set(unique) - set(fresh)
        if already:  # someone else cached it first: count this as a use, not as a new write
            self._index.note_read(already)
        keep = set(unique) | {ck.digest() for ck in protect}
        try:
            self._evictor.enforce(frozenset(keep))
        except (OSError, lmdb.Error) as exc:
            log.warning("eviction after a put failed: %s", exc)

    def _write_file(self, digest: bytes, encoded: Encoded) -> None:
        path = self._path(digest)
        try:
            self._writer.write(path, encoded, self.file_mode)
        except FileNotFoundError:  # its fan-out directory was removed behind our back
            self._make_tree()
            self._writer.write(path, encoded, self.file_mode)

    # ------------------------------------------------------------------ access times

    def touch(self, cks: Iterable[ChunkKey]) -> None:
        """Record reads served from memory above this cache, so LRU and age-out see them.

        Cheap enough for the event loop: no I/O, one short lock; persisted by the next maintenance
        pass like the times recorded by :meth:`get`.
        """
        self._index.note_read([ck.digest() for ck in cks])

    def touch_digests(self, times: Iterable[tuple[bytes, float]]) -> int:
        """Record reads that other processes made straight from the cache directory (the access
        records of :mod:`tierfs.reader`, applied by the daemon's maintenance), so LRU and
        age-out see them like hits. Returns how many were recorded."""
        return self._index.note_reads_at(times)

    # ------------------------------------------------------------------ removal

    def _remove(self, victims: Victims, *, evicted: bool) -> int:
        """Remove chunks in batches, each under its stripes and one short write txn. Returns the count."""
        count = 0
        for start in range(0, len(victims), _DELETE_BATCH):
            batch = victims[start : start + _DELETE_BATCH]
            with self._locked(d for d, _ in batch):
                count += self._remove_locked(batch, evicted=evicted)[0]
        return count

    def _remove_locked(self, batch: Victims, *, evicted: bool) -> tuple[int, int]:
        """Caller holds the stripes of ``batch``. Index first, then files: a crash in between leaves
        orphan files (removed by the next unclean-start walk), never an entry pointing at nothing.
        Returns (count, bytes on disk freed)."""
        removed, freed = self._index.remove(batch, evicted=evicted)
        for digest in removed:
            unlink_quiet(self._path(digest))
        return len(removed), freed

    def enforce_limits(self, *, protect: Iterable[ChunkKey] = ()) -> int:
        """Past the high-water mark, evict least-recently-read chunks (never pinned or protected ones)
        down to the low-water mark. Returns the number evicted."""
        self._check_open()
        self._index.flush_access_times()
        return self._evictor.enforce(frozenset(ck.digest() for ck in protect), HIGH_WATER)

    def sweep_aged(self, now: float | None = None) -> int:
        """Evict chunks not read for ``max_age`` seconds, except pinned ones. Returns the number evicted."""
        self._check_open()
        self._index.flush_access_times()
        return self._evictor.sweep_aged(now)

    def maintain(self) -> None:
        """The periodic pass: persist access times, age out, then evict past the high-water mark."""
        self.sweep_aged()
        self.enforce_limits()

    # ------------------------------------------------------------------ objects and pins

    def drop_object(self, bucket: str, key: str, keep_etag: str | None = None) -> int:
        """Remove the object's chunks except those of ``keep_etag`` (the object changed, or the user
        evicted it). Not counted as evictions; pins stay. Returns bytes on disk freed."""
        self._check_open()
        keep = None if keep_etag is None else enc(keep_etag)
        digests = self._index.object_digests(object_id(enc(bucket), enc(key)), keep)
        freed = 0
        for start in range(0, len(digests), _DELETE_BATCH):
            batch = digests[start : start + _DELETE_BATCH]
            with self._locked(batch):
                freed += self._remove_locked([(d, None) for d in batch], evicted=False)[1]
        return freed

    def pin(self, bucket: str, key: str) -> None:
        """Exempt every chunk of the object, present and future, from eviction and age-out."""
        self._check_open()
        self._index.set_pinned(enc(bucket), enc(key), True)

    def unpin(self, bucket: str, key: str) -> None:
        """Make the object's chunks evictable again (they keep their access times)."""
        self._check_open()
        self._index.set_pinned(enc(bucket), enc(key), False)

    # ------------------------------------------------------------------ stats

    def stats(self) -> CacheStats:
        t = self._index.totals()
        return CacheStats(
            chunks=t.chunks,
            logical_bytes=t.logical_bytes,
            disk_bytes=t.disk_bytes,
            pinned_bytes=t.pinned_bytes,
            evictions=t.evictions,
            corrupt=t.corrupt,
            limit_bytes=self._evictor.limits.limit_bytes,
            free_disk_bytes=self._evictor.free_disk_bytes(),
            compression_ratio=t.logical_bytes / t.disk_bytes if t.disk_bytes else 1.0,
        )

    def status(self) -> dict[str, Any]:
        s = self.stats()
        return {
            "cache_bytes": s.logical_bytes,
            "cache_bytes_on_disk": s.disk_bytes,
            "cache_limit_bytes": s.limit_bytes,
            "cache_free_disk_bytes": s.free_disk_bytes,
            "chunks_cached": s.chunks,
            "pinned_bytes": s.pinned_bytes,
            "evictions": s.evictions,
            "cache_corrupt": s.corrupt,
            "compression_ratio": round(s.compression_ratio, 3),
        }
