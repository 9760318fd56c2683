"""Persistent local chunk cache: fixed-size blocks of S3 object data on local disk, indexed in LMDB.

The cache outlives the mount (unlike mountpoint-s3's), so warm data survives a remount. It is a plain
blocking library: the hydrator calls it from worker threads, and every public method is thread-safe. The
one exception to "never on the trio loop" is the hydrator's read of a small object's cached block
(``hydrator.LOOP_READ_MAX``), measured cheaper than the thread hop (docs/design.md). The on-disk
format and the policies are described in docs/cache-format.md.

Who is the authority for what:

* The LMDB index says which chunks exist; a file without an index entry is never served.
* Each file validates itself (magic, names, index, lengths, an xxh3-64 digest per 64 KiB page of the
  logical data), so files need no fsync: a torn or stale file is detected on read and dropped like a
  miss. Per-page digests let a small random read fetch and check only the pages it needs.
* The running totals live in memory and are rebuilt by one index scan at open; nothing derivable is
  persisted.
* The cache is an optimisation: a full disk (or a full or failing index) never fails a read. ``put`` then
  raises OSError and leaves the cache consistent, the caller serves the bytes uncached; a read that finds a
  bad file still answers "miss" if the index cannot record its removal; and opening or closing the cache
  on a full disk only logs what it could not record.

Locking, outermost first (never acquired in another order, so no deadlock):
``_evict_lock`` -> per-digest stripe locks (sorted) -> ``_write_lock`` (one LMDB write txn at a time, and
in-memory totals updated in commit order) -> ``_mem`` (counters, pending access times; held for
microseconds). Reads of a warm chunk take no stripe and no write lock.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import logging
import math
import os
import shutil
import struct
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lmdb
import xxhash
import zstandard

log = logging.getLogger(__name__)

MAGIC = b"TFSC"
# 2: an xxh3-64 digest per PAGE of logical data replaced the CRC32 of the whole block (version 1).
FORMAT_VERSION = 2
PAGE = 64 * 1024  # the unit a partial read fetches and validates
_DIGEST = struct.Struct("<Q")
FLAG_ZSTD = 0x01
LOW_WATER = 0.90  # eviction stops at this share of the (effective) limit, so it runs in bursts, not per put
# Background maintenance already starts at this share, so the eviction a reader's put does
# synchronously (only past the hard limit) stays rare: readers are not the ones who wait.
HIGH_WATER = 0.95
MIN_SAVING = 0.05  # store compressed only if that saves at least this share (JPEGs etc. stay raw)
TMP_PREFIX = ".tmp."

# magic, version, flags, reserved, block index, logical length, stored (payload) length, page count,
# key length, etag length, bucket length; then bucket, key, etag bytes; then one xxh3-64 digest per
# PAGE of the logical data (little-endian u64 each); then the payload.
_HEADER = struct.Struct("<4sBBHQQQIHHH")
# Index record (value in cache.chunks): last access time, block index, logical size, bytes on disk
# (header included), flags, bucket/key/etag lengths; then bucket, key, etag bytes. Fixed fields first so
# that the eviction scan can unpack them without touching the names.
_RECORD = struct.Struct("<dQQQBHHH")
_OBJ_VALUE = struct.Struct("<Q")  # value in cache.objects: block index, followed by the etag bytes

_CHUNK_TAG = b"tierfs-chunk-v1\0"
_OBJECT_TAG = b"tierfs-object-v1\0"
_STRIPES = 256
_DELETE_BATCH = 512  # victims per write txn: a few ms each, and one commit fsync per 512 victims
_PENDING_FLUSH_AT = 65536  # bound memory of batched access times even if nobody calls maintenance

_META_BLOCK_SIZE = b"block_size"
_META_FORMAT = b"format"
_META_CLEAN = b"clean"


def _enc(text: str) -> bytes:
    """UTF-8, injective even for lone surrogates (keys decoded from non-UTF-8 names)."""
    return text.encode("utf-8", "surrogatepass")


def _dec(raw: bytes) -> str:
    return raw.decode("utf-8", "surrogatepass")


def _page_count(logical: int) -> int:
    return (logical + PAGE - 1) // PAGE


def _page_digests(data: bytes | memoryview) -> bytes:
    """The digest table of a chunk: xxh3-64 of each PAGE of ``data`` (about 0.04 ms per MiB)."""
    view = memoryview(data)
    return b"".join(
        _DIGEST.pack(xxhash.xxh3_64_intdigest(view[i : i + PAGE])) for i in range(0, len(view), PAGE)
    )


def _lp(raw: bytes) -> bytes:
    """Length-prefixed field: makes the concatenation of several fields unambiguous."""
    return len(raw).to_bytes(4, "little") + raw


def _object_id(bucket: bytes, key: bytes) -> bytes:
    """Fixed 32-byte id of (bucket, key): S3 keys (up to 1 KiB) do not fit LMDB's 511-byte key limit."""
    return hashlib.sha256(_OBJECT_TAG + _lp(bucket) + _lp(key)).digest()


@dataclass(frozen=True)
class ChunkKey:
    """One block of one version of one object. The ETag is part of the identity, so a changed object
    can never be served from the old object's chunks."""

    bucket: str
    key: str
    etag: str
    index: int

    def __post_init__(self) -> None:
        if self.index < 0:
            raise ValueError(f"negative block index {self.index}")

    def names(self) -> tuple[bytes, bytes, bytes]:
        """Encoded (bucket, key, etag), in the order they appear in a chunk file."""
        return _enc(self.bucket), _enc(self.key), _enc(self.etag)

    def digest(self) -> bytes:
        """sha256 over a length-prefixed encoding of all four fields: names the file and the index row."""
        bucket, key, etag = self.names()
        return hashlib.sha256(
            _CHUNK_TAG + _lp(bucket) + _lp(key) + _lp(etag) + self.index.to_bytes(8, "little")
        ).digest()


@dataclass(frozen=True)
class CacheStats:
    """A snapshot for metrics and ``tierfs status``. Byte counts on disk include the file headers;
    ``pinned_bytes`` counts bytes on disk of pinned objects' chunks."""

    chunks: int
    logical_bytes: int
    disk_bytes: int
    pinned_bytes: int
    evictions: int
    hits: int
    misses: int
    bytes_served: int
    corrupt: int
    limit_bytes: int | None
    free_disk_bytes: int
    compression_ratio: float


@dataclass
class _Totals:
    chunks: int = 0
    logical_bytes: int = 0
    disk_bytes: int = 0
    pinned_bytes: int = 0
    evictions: int = 0
    hits: int = 0
    misses: int = 0
    bytes_served: int = 0
    corrupt: int = 0


@dataclass(frozen=True)
class _Record:
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
            _RECORD.pack(
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
    def decode(cls, raw: bytes) -> _Record:
        atime, index, logical, stored, flags, blen, klen, elen = _RECORD.unpack_from(raw)
        pos = _RECORD.size
        bucket = raw[pos : pos + blen]
        key = raw[pos + blen : pos + blen + klen]
        etag = raw[pos + blen + klen : pos + blen + klen + elen]
        return cls(atime, index, logical, stored, flags, bucket, key, etag)

    @property
    def object_id(self) -> bytes:
        return _object_id(self.bucket, self.key)

    def chunk_key(self) -> ChunkKey:
        return ChunkKey(_dec(self.bucket), _dec(self.key), _dec(self.etag), self.index)


@dataclass(frozen=True)
class _Prepared:
    """A chunk encoded for writing: computed before any lock is taken (compression is the costly part)."""

    digest: bytes
    object_id: bytes
    record: _Record
    parts: tuple[bytes, bytes, bytes, bytes]  # header, names, page digests, payload


class _Invalid(Exception):
    """A chunk file failed validation (or could not be read); ``ident`` is (st_dev, st_ino) if known."""

    def __init__(self, reason: str, ident: tuple[int, int] | None) -> None:
        super().__init__(reason)
        self.ident = ident


class _Codecs(threading.local):
    """zstd (de)compressor objects are not thread-safe: one pair per thread, created on first use."""

    def __init__(self, level: int | None) -> None:
        self.compressor = zstandard.ZstdCompressor(level=level) if level is not None else None
        self.decompressor = zstandard.ZstdDecompressor()


def _statvfs_space(path: Path) -> tuple[int, int]:
    """(total bytes, bytes available to unprivileged users) of the filesystem holding ``path``."""
    st = os.statvfs(path)
    return st.f_blocks * st.f_frsize, st.f_bavail * st.f_frsize


def _write_all(fd: int, parts: Sequence[bytes]) -> None:
    """One writev in practice; loops only if the kernel writes short."""
    total = sum(len(p) for p in parts)
    done = os.writev(fd, parts)
    if done < total:
        rest = memoryview(b"".join(parts))[done:]
        while rest:
            rest = rest[os.write(fd, rest) :]


def _pread_exact(fd: int, size: int, offset: int) -> bytes:
    """One pread in practice (regular file); loops only on a short read, stops at EOF."""
    data = os.pread(fd, size, offset)
    if len(data) == size or not data:
        return data
    parts = [data]
    got = len(data)
    while got < size:
        more = os.pread(fd, size - got, offset + got)
        if not more:
            break
        parts.append(more)
        got += len(more)
    return b"".join(parts)


def _index_error(exc: lmdb.Error) -> OSError:
    """An index (LMDB) failure as the OSError callers of ``put`` handle: a full map is ENOSPC; a
    failed commit carries LMDB's errno (a full disk surfaces as EIO from mdb_txn_commit)."""
    if isinstance(exc, lmdb.MapFullError):
        return OSError(errno.ENOSPC, f"chunk index full: {exc}")
    code = getattr(exc, "code", None)
    return OSError(
        code if isinstance(code, int) and code in errno.errorcode else errno.EIO, f"chunk index: {exc}"
    )


def _unlink_quiet(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


class BlockReader:
    """Reads and validates chunk files, and nothing else: no index, no counters, no writes.

    ChunkCache reads through it, and so does the direct reader of :mod:`tierfs.reader` in
    other processes, so both apply exactly the checks of docs/cache-format.md. Thread-safe.
    """

    def __init__(self, block_size: int) -> None:
        self._block_size = block_size
        self._decompressors = _Codecs(None)

    def read(self, path: str, ck: ChunkKey, start: int = 0, length: int | None = None) -> bytes:
        """open + fstat + one pread of header, names and digest table + one pread of the pages covering
        ``[start, start + length)``, each page checked against its digest. A compressed chunk is read,
        decompressed and checked whole. The file is read while open; eviction may unlink it
        concurrently, but on Linux an unlinked file's data stays readable through an open descriptor,
        so a chunk being read is never lost mid-read. Raises :class:`_Invalid`."""
        data, _ = self.read_ident(path, ck, start, length)
        return data

    def read_ident(
        self, path: str, ck: ChunkKey, start: int = 0, length: int | None = None
    ) -> tuple[bytes, tuple[int, int]]:
        """:meth:`read`, also returning (st_dev, st_ino) of the file that was read, so a caller can
        tell afterwards whether the path still names that file (an eviction or a rewrite since)."""
        bucket, key, etag = ck.names()
        names = bucket + key + etag
        prefix = _HEADER.size + len(names)
        table_max = _DIGEST.size * _page_count(self._block_size)
        want = self._block_size if length is None else length
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            raise _Invalid(f"open: {exc}", None) from exc
        ident: tuple[int, int] | None = None
        try:
            st = os.fstat(fd)
            ident = (st.st_dev, st.st_ino)
            head = _pread_exact(fd, prefix + table_max, 0)
            if len(head) < prefix:
                raise _Invalid("short header", ident)
            fields = _HEADER.unpack_from(head)
            magic, version, flags, _, index, logical, stored, pages, klen, elen, blen = fields
            if magic != MAGIC or version != FORMAT_VERSION or flags & ~FLAG_ZSTD:
                raise _Invalid("bad magic/version/flags", ident)
            if (index, blen, klen, elen) != (ck.index, len(bucket), len(key), len(etag)):
                raise _Invalid("header names another chunk", ident)
            if head[_HEADER.size : prefix] != names:
                raise _Invalid("header names another chunk", ident)
            data_at = prefix + _DIGEST.size * pages
            if logical > self._block_size or pages != _page_count(logical) or st.st_size != data_at + stored:
                raise _Invalid("bad lengths", ident)
            table = head[prefix:data_at]
            end = min(logical, start + want)
            if flags & FLAG_ZSTD:
                payload = _pread_exact(fd, stored, data_at)
                if len(payload) != stored:
                    raise _Invalid("short payload", ident)
                first, last, base = 0, pages, 0
            else:
                if stored != logical:
                    raise _Invalid("bad lengths", ident)
                first, last = (start // PAGE, (end - 1) // PAGE + 1) if start < end else (0, 0)
                base = first * PAGE
                size = min(logical, last * PAGE) - base
                payload = _pread_exact(fd, size, data_at + base)
                if len(payload) != size:
                    raise _Invalid("short payload", ident)
        except OSError as exc:
            raise _Invalid(f"read: {exc}", ident) from exc
        finally:
            os.close(fd)
        data = self._decode_payload(payload, flags, logical, ident) if flags & FLAG_ZSTD else payload
        view = memoryview(data)
        for page in range(first, min(last, pages)):
            at = page * PAGE - base
            (expected,) = _DIGEST.unpack_from(table, page * _DIGEST.size)
            if xxhash.xxh3_64_intdigest(view[at : at + PAGE]) != expected:
                raise _Invalid("digest mismatch", ident)
        if start >= end:
            return b"", ident
        if start == base and end - base == len(data):
            return data, ident
        return data[start - base : end - base], ident

    def _decode_payload(
        self, payload: bytes, flags: int, logical: int, ident: tuple[int, int] | None
    ) -> bytes:
        try:
            # Checked before decompressing so a corrupt frame header cannot ask for a huge buffer.
            if zstandard.frame_content_size(payload) != logical:
                raise _Invalid("bad zstd content size", ident)
            data = self._decompressors.decompressor.decompress(payload, max_output_size=logical)
        except zstandard.ZstdError as exc:
            raise _Invalid(f"zstd: {exc}", ident) from exc
        if len(data) != logical:
            raise _Invalid("bad lengths", ident)
        return data


class ChunkCache:
    """Blocks of object data on local disk, LRU/age evicted, pinnable, surviving remounts."""

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
        disk_space: Callable[[Path], tuple[int, int]] = _statvfs_space,
    ) -> None:
        """``disk_space`` returns (total, available) bytes of the cache filesystem; injectable for tests."""
        if block_size <= 0:
            raise ValueError("block_size must be positive")
        self._env = env
        self._root = Path(root)
        self._chunk_dir = os.path.join(self._root, "chunks")
        self._block_size = block_size
        self._limit_bytes = limit_bytes
        self._min_free = min_free
        self._max_age = max_age
        self._compression_level = compression_level
        self._clock = clock
        self._disk_space = disk_space
        self._codecs = _Codecs(compression_level)
        self._blocks = BlockReader(block_size)

        self._chunks = env.open_db(b"cache.chunks")  # digest -> _Record
        self._objects = env.open_db(b"cache.objects")  # object_id + digest -> index + etag
        self._pins = env.open_db(b"cache.pins")  # object_id -> bucket length + bucket + key
        self._meta = env.open_db(b"cache.meta")  # block size; 'clean' flag while closed cleanly

        self._stripes = [threading.Lock() for _ in range(_STRIPES)]
        self._evict_lock = threading.Lock()
        self._write_lock = threading.Lock()
        self._mem = threading.Lock()
        self._totals = _Totals()
        self._pending: dict[bytes, float] = {}  # digest -> access time not yet written to the index
        self._pinned: set[bytes] = set()
        self._closed = False

        self._make_dir(str(self._root))
        self._make_tree()
        self._open_index()

    # ------------------------------------------------------------------ open / close

    def _open_index(self) -> None:
        """Bring index and files into agreement, then compute the running totals with one scan."""
        with self._env.begin() as txn:
            stored_bs = txn.get(_META_BLOCK_SIZE, db=self._meta)
            stored_format = txn.get(_META_FORMAT, db=self._meta)
            clean = txn.get(_META_CLEAN, db=self._meta) is not None
            self._pinned = {oid for oid, _ in txn.cursor(db=self._pins)}
        if stored_bs is not None and (
            int.from_bytes(stored_bs, "little") != self._block_size
            or stored_format != FORMAT_VERSION.to_bytes(4, "little")
        ):
            # Block i means a different byte range under another block size, and files of another
            # format would all fail validation: everything cached is void. (A new cache has no
            # block size yet, and nothing to wipe.)
            self._wipe()
            clean = True
        if not clean:
            self._reconcile_tree()
        try:
            with self._write_lock, self._env.begin(write=True) as txn:
                txn.put(_META_BLOCK_SIZE, self._block_size.to_bytes(8, "little"), db=self._meta)
                txn.put(_META_FORMAT, FORMAT_VERSION.to_bytes(4, "little"), db=self._meta)
                txn.delete(_META_CLEAN, db=self._meta)  # absent while open: a crash leaves it absent
        except lmdb.Error as exc:
            # A full disk must not keep the mount from starting: reads are then served uncached.
            # The clean flag may stay set, so a crash now skips the reconcile walk; get() still
            # treats a missing or stray file as a miss, which is all the walk protects.
            log.warning("chunk cache opened read-mostly: cannot update its index (%s)", exc)
        self._recount()

    def _wipe(self) -> None:
        with self._write_lock, self._env.begin(write=True) as txn:
            txn.drop(self._chunks, delete=False)
            txn.drop(self._objects, delete=False)
        shutil.rmtree(self._chunk_dir, ignore_errors=True)
        self._make_tree()

    def _make_tree(self) -> None:
        """``chunks/`` and its 256 fan-out directories, made once at open rather than per write.

        One level of 256 directories, not two of 65,536: a fresh cache would otherwise pay a
        mkdir for nearly every block it stores, and a full tree would hold 256 MiB of directory
        blocks. A few thousand entries per directory is nothing for ext4's or XFS's hashed
        directories. On a full disk the tree may stay incomplete: _write_file makes it again
        when a directory is missing, and a read of a missing file is a miss."""
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
        for fanout in self._scandirs(self._chunk_dir):
            with os.scandir(fanout) as entries:
                for entry in entries:
                    if entry.name.startswith(TMP_PREFIX):
                        _unlink_quiet(entry.path)
                    elif len(entry.name) == 64:
                        with contextlib.suppress(ValueError):
                            present.add(bytes.fromhex(entry.name))
        with self._env.begin() as txn:
            indexed = set(txn.cursor(db=self._chunks).iternext(values=False))
        for digest in present - indexed:
            _unlink_quiet(self._path(digest))
        self._remove([(d, None) for d in indexed - present], evicted=False)

    @staticmethod
    def _scandirs(path: str) -> Iterator[str]:
        with os.scandir(path) as entries:
            dirs = [e.path for e in entries if len(e.name) == 2 and e.is_dir(follow_symlinks=False)]
        yield from dirs

    def _recount(self) -> None:
        totals = _Totals()
        with self._env.begin() as txn:
            for _, raw in txn.cursor(db=self._chunks):
                _, _, logical, stored, _, blen, klen, _ = _RECORD.unpack_from(raw)
                totals.chunks += 1
                totals.logical_bytes += logical
                totals.disk_bytes += stored
                if self._pinned and self._raw_object_id(raw, blen, klen) in self._pinned:
                    totals.pinned_bytes += stored
        with self._mem:
            self._totals = totals

    @staticmethod
    def _raw_object_id(raw: bytes, blen: int, klen: int) -> bytes:
        """Object id straight from an encoded index record, for scans that skip full decoding."""
        pos = _RECORD.size
        return _object_id(raw[pos : pos + blen], raw[pos + blen : pos + blen + klen])

    def close(self) -> None:
        """Persist batched access times and mark the cache clean. The environment belongs to the caller
        and stays open. Other threads must have stopped using the cache."""
        if self._closed:
            return
        self.flush_access_times()
        try:
            with self._write_lock, self._env.begin(write=True) as txn:
                txn.put(_META_CLEAN, b"1", db=self._meta)
        except lmdb.Error as exc:  # a full disk: the next open treats this close as unclean, which is safe
            log.warning("chunk cache not marked clean: %s", exc)
        self._closed = True

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("chunk cache is closed")

    # ------------------------------------------------------------------ paths and locks

    def _path(self, digest: bytes) -> str:
        name = digest.hex()
        return os.path.join(self._chunk_dir, name[0:2], name)

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
        with self._env.begin(db=self._chunks) as txn:
            return txn.get(ck.digest()) is not None

    def get(self, ck: ChunkKey) -> bytes | None:
        """The validated logical bytes of ``ck``, or None. An invalid file is removed and counted."""
        return self.get_range(ck, 0, self._block_size)

    def get_range(self, ck: ChunkKey, start: int, length: int) -> bytes | None:
        """Up to ``length`` validated bytes of ``ck`` from ``start`` (fewer at the chunk's end), or None.

        Only the pages covering the range are read and checked, so a 128 KiB random read costs
        a 128 KiB disk read rather than a whole block's. An invalid file is removed and counted.
        """
        self._check_open()
        digest = ck.digest()
        with self._env.begin(db=self._chunks) as txn:
            indexed = txn.get(digest) is not None
        if not indexed:
            with self._mem:
                self._totals.misses += 1
            return None
        try:
            data = self._read_validated(self._path(digest), ck, start, length)
        except _Invalid as bad:
            try:
                corrupt = self._discard(digest, bad.ident)
            except lmdb.Error as exc:  # a full index cannot record the removal: still just a miss
                log.warning("cannot drop an invalid chunk from the index: %s", exc)
                corrupt = True
            with self._mem:
                self._totals.misses += 1
                self._totals.corrupt += corrupt
            return None
        now = self._clock()
        with self._mem:
            self._totals.hits += 1
            self._totals.bytes_served += len(data)
            if self._pending.get(digest, -math.inf) < now:
                self._pending[digest] = now
            flush = len(self._pending) >= _PENDING_FLUSH_AT
        if flush:
            self.flush_access_times()
        return data

    def _read_validated(self, path: str, ck: ChunkKey, start: int = 0, length: int | None = None) -> bytes:
        """See :meth:`BlockReader.read`: the validation is shared with the direct reader
        (tierfs.reader), so the two can never disagree about what a valid chunk is."""
        return self._blocks.read(path, ck, start, length)

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
                _unlink_quiet(path)
            removed = self._remove_locked([(digest, None)], evicted=False)[0]
            return removed > 0 or current is not None

    def verify(self) -> int:
        """Read and validate every indexed chunk; invalid ones are removed. Returns how many. Slow: for
        `tierfs fsck`-style use, not for the periodic maintenance."""
        self._check_open()
        with self._env.begin(db=self._chunks) as txn:
            todo = [(d, _Record.decode(raw).chunk_key()) for d, raw in txn.cursor()]
        bad = 0
        for digest, ck in todo:
            try:
                self._read_validated(self._path(digest), ck)
            except _Invalid as exc:
                bad += self._discard(digest, exc.ident)
        with self._mem:
            self._totals.corrupt += bad
        return bad

    # ------------------------------------------------------------------ writing

    def put(self, ck: ChunkKey, data: bytes, *, protect: Iterable[ChunkKey] = ()) -> None:
        """Store one block. See :meth:`put_many`."""
        self.put_many([(ck, data)], protect=protect)

    def put_many(self, items: Iterable[tuple[ChunkKey, bytes]], *, protect: Iterable[ChunkKey] = ()) -> None:
        """Store blocks (e.g. a run fetched by one ranged GET) with one index transaction. If that takes
        the cache over its hard limit, evict LRU chunks synchronously down to the low-water mark; the
        chunks just stored and those in ``protect`` are never chosen.

        Raises OSError (ENOSPC, EIO...) if a file cannot be written or the index cannot commit (an
        LMDB error is raised as OSError too, so callers handle one type); the cache stays consistent:
        none of the blocks is indexed and their files are gone. Once the blocks are stored, a failing
        eviction is logged, not raised: the blocks are there, and maintenance evicts later."""
        self._check_open()
        prepared = list({p.digest: p for p in map(self._prepare, items)}.values())
        if not prepared:
            return
        with self._locked(p.digest for p in prepared):
            with self._env.begin(db=self._chunks) as txn:
                fresh = [p for p in prepared if txn.get(p.digest) is None]
            written: list[_Prepared] = []
            try:
                for p in fresh:
                    self._write_file(p)
                    written.append(p)
                self._index_new(written)
            except BaseException as exc:
                for p in written:
                    _unlink_quiet(self._path(p.digest))
                if isinstance(exc, lmdb.Error):
                    raise _index_error(exc) from exc
                raise
        fresh_digests = {p.digest for p in fresh}
        already = [p.digest for p in prepared if p.digest not in fresh_digests]
        if already:  # someone else cached it first: count this as a use, not as a new write
            now = self._clock()
            with self._mem:
                self._pending.update(dict.fromkeys(already, now))
        keep = {p.digest for p in prepared} | {ck.digest() for ck in protect}
        try:
            self._enforce(frozenset(keep))
        except (OSError, lmdb.Error) as exc:
            log.warning("eviction after a put failed: %s", exc)

    def _prepare(self, item: tuple[ChunkKey, bytes]) -> _Prepared:
        ck, data = item
        if len(data) > self._block_size:
            raise ValueError(f"chunk of {len(data)} bytes exceeds block size {self._block_size}")
        bucket, key, etag = ck.names()
        if max(len(bucket), len(key), len(etag)) > 0xFFFF:
            raise ValueError("bucket, key or etag too long for the chunk header")
        payload, flags = data, 0
        compressor = self._codecs.compressor
        if compressor is not None and data:
            packed = compressor.compress(data)
            if len(packed) <= len(data) * (1 - MIN_SAVING):
                payload, flags = packed, FLAG_ZSTD
        header = _HEADER.pack(
            MAGIC,
            FORMAT_VERSION,
            flags,
            0,
            ck.index,
            len(data),
            len(payload),
            _page_count(len(data)),
            len(key),
            len(etag),
            len(bucket),
        )
        names = bucket + key + etag
        digests = _page_digests(data)
        stored = len(header) + len(names) + len(digests) + len(payload)
        record = _Record(self._clock(), ck.index, len(data), stored, flags, bucket, key, etag)
        return _Prepared(ck.digest(), _object_id(bucket, key), record, (header, names, digests, payload))

    def _write_file(self, p: _Prepared) -> None:
        """Temp file in the final directory, then rename: readers see the old file or the new one. No
        fsync: after a crash a torn file fails validation and is dropped."""
        path = self._path(p.digest)
        tmp = f"{os.path.dirname(path)}/{TMP_PREFIX}{p.digest.hex()}.{os.getpid()}"
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
        try:
            fd = os.open(tmp, flags, self.file_mode)
        except FileNotFoundError:  # its fan-out directory was removed behind our back
            self._make_tree()
            fd = os.open(tmp, flags, self.file_mode)
        except FileExistsError:  # left by a crashed writer of the same pid; we hold the stripe
            os.unlink(tmp)
            fd = os.open(tmp, flags, self.file_mode)
        try:
            try:
                _write_all(fd, p.parts)
            finally:
                os.close(fd)
            os.replace(tmp, path)
        except BaseException:
            _unlink_quiet(tmp)
            raise

    def _index_new(self, written: Sequence[_Prepared]) -> None:
        if not written:
            return
        with self._write_lock:
            delta = _Totals()
            with self._env.begin(write=True) as txn:
                for p in written:
                    old = txn.get(p.digest, db=self._chunks)
                    if old is not None:  # not expected (we checked under the stripe), but stay exact
                        rec = _Record.decode(old)
                        delta.chunks -= 1
                        delta.logical_bytes -= rec.logical
                        delta.disk_bytes -= rec.stored
                        if p.object_id in self._pinned:
                            delta.pinned_bytes -= rec.stored
                    txn.put(p.digest, p.record.encode(), db=self._chunks)
                    txn.put(
                        p.object_id + p.digest,
                        _OBJ_VALUE.pack(p.record.index) + p.record.etag,
                        db=self._objects,
                    )
                    delta.chunks += 1
                    delta.logical_bytes += p.record.logical
                    delta.disk_bytes += p.record.stored
                    if p.object_id in self._pinned:
                        delta.pinned_bytes += p.record.stored
            self._apply(delta)

    def _apply(self, delta: _Totals, removed: Iterable[bytes] = ()) -> None:
        """Add an index delta to the totals; called under ``_write_lock`` right after the commit, so the
        totals follow the index in commit order."""
        with self._mem:
            t = self._totals
            t.chunks += delta.chunks
            t.logical_bytes += delta.logical_bytes
            t.disk_bytes += delta.disk_bytes
            t.pinned_bytes += delta.pinned_bytes
            t.evictions += delta.evictions
            for digest in removed:
                self._pending.pop(digest, None)

    # ------------------------------------------------------------------ access times

    def touch(self, cks: Iterable[ChunkKey]) -> None:
        """Record reads served from memory above this cache, so LRU and age-out see them.

        Cheap enough for the event loop: no I/O, one short lock; persisted by
        :meth:`flush_access_times` like the times recorded by :meth:`get`.
        """
        now = self._clock()
        with self._mem:
            for ck in cks:
                self._pending[ck.digest()] = now

    def touch_digests(self, times: Iterable[tuple[bytes, float]]) -> int:
        """Record reads that other processes made straight from the cache directory (the access
        records of :mod:`tierfs.reader`, applied by the daemon's maintenance), so LRU and
        age-out see them like hits. A time in the future is taken as now, so a skewed clock
        cannot keep a block young for ever. Returns how many were recorded."""
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
        """Write the access times batched by get() in one transaction. Holding ``_write_lock`` from the
        swap to the commit means an eviction scan sees every access time in either place.

        If the index cannot be written (a full disk), the batch is dropped: access times only order
        eviction, and a read (get() flushes past 65,536 pending times) must not fail for them."""
        with self._write_lock:
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
                        fields = _RECORD.unpack_from(raw)
                        if atime > fields[0]:
                            txn.put(digest, _RECORD.pack(atime, *fields[1:]) + raw[_RECORD.size :])
            except lmdb.Error as exc:
                log.warning("dropped %d access times: cannot write the chunk index (%s)", len(pending), exc)

    # ------------------------------------------------------------------ removal

    def _remove(self, victims: Sequence[tuple[bytes, float | None]], *, evicted: bool) -> tuple[int, int]:
        """Remove chunks in batches, each under its stripes and one short write txn. A victim chosen with
        access time ``t`` is spared if it was read after ``t`` (None: unconditional). Returns (count,
        bytes on disk freed)."""
        count = freed = 0
        for start in range(0, len(victims), _DELETE_BATCH):
            batch = victims[start : start + _DELETE_BATCH]
            with self._locked(d for d, _ in batch):
                n, size = self._remove_locked(batch, evicted=evicted)
            count += n
            freed += size
        return count, freed

    def _remove_locked(
        self, batch: Sequence[tuple[bytes, float | None]], *, evicted: bool
    ) -> tuple[int, int]:
        """Caller holds the stripes of ``batch``. Index first, then files: a crash in between leaves
        orphan files (removed by the next unclean-start walk), never an entry pointing at nothing."""
        removed: list[bytes] = []
        delta = _Totals()
        with self._write_lock:
            with self._env.begin(write=True) as txn:
                for digest, chosen_atime in batch:
                    raw = txn.get(digest, db=self._chunks)
                    if raw is None:
                        continue
                    rec = _Record.decode(raw)
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
                    if oid in self._pinned:
                        delta.pinned_bytes -= rec.stored
            if evicted:
                delta.evictions = len(removed)
            self._apply(delta, removed)
        for digest in removed:
            _unlink_quiet(self._path(digest))
        return len(removed), -delta.disk_bytes

    def _candidates(self, protect: frozenset[bytes]) -> list[tuple[float, bytes, int]]:
        """(latest access time, digest, bytes on disk) of every evictable chunk: one read-txn scan, merged
        with the access times not yet flushed. Runs in a background thread; O(chunks)."""
        with self._write_lock:  # see flush_access_times
            with self._mem:
                pending = dict(self._pending)
                pinned = frozenset(self._pinned)
            txn = self._env.begin(db=self._chunks)
        try:
            out: list[tuple[float, bytes, int]] = []
            for digest, raw in txn.cursor():
                if digest in protect:
                    continue
                atime, _, _, stored, _, blen, klen, _ = _RECORD.unpack_from(raw)
                if pinned and self._raw_object_id(raw, blen, klen) in pinned:
                    continue
                out.append((max(atime, pending.get(digest, atime)), digest, stored))
            return out
        finally:
            txn.abort()

    def _eviction_target(self, trigger: float = 1.0) -> int | None:
        """Bytes on disk to evict down to, or None while under ``trigger`` times the hard limit. The hard
        limit is ``limit_bytes`` and, with a free-space floor, whatever keeps ``min_free`` of the filesystem
        free; the target is the low-water mark of the smaller one."""
        with self._mem:
            disk = self._totals.disk_bytes
            limit, min_free = self._limit_bytes, self._min_free
        effective: float = math.inf if limit is None else limit
        if min_free > 0:
            total, available = self._disk_space(self._root)
            effective = min(effective, disk + available - min_free * total)
        if disk <= effective * trigger:
            return None
        return max(0, int(effective * LOW_WATER))

    def _enforce(self, protect: frozenset[bytes], trigger: float = 1.0) -> int:
        with self._evict_lock:  # one eviction at a time; the target is recomputed once we get the lock
            target = self._eviction_target(trigger)
            if target is None:
                return 0
            candidates = self._candidates(protect)
            candidates.sort()
            with self._mem:
                excess = self._totals.disk_bytes - target
            victims: list[tuple[bytes, float | None]] = []
            for atime, digest, stored in candidates:
                if excess <= 0:
                    break
                victims.append((digest, atime))
                excess -= stored
            return self._remove(victims, evicted=True)[0]

    def enforce_limits(self, *, protect: Iterable[ChunkKey] = ()) -> int:
        """Periodic maintenance: past the high-water mark, evict least-recently-read chunks (never pinned or
        protected ones) down to the low-water mark. Returns the number evicted."""
        self._check_open()
        self.flush_access_times()
        return self._enforce(frozenset(ck.digest() for ck in protect), HIGH_WATER)

    def sweep_aged(self, now: float | None = None) -> int:
        """Evict chunks not read for ``max_age`` seconds, except pinned ones. Returns the number evicted."""
        self._check_open()
        self.flush_access_times()
        with self._mem:
            max_age = self._max_age
        if not math.isfinite(max_age):
            return 0
        cutoff = (self._clock() if now is None else now) - max_age
        victims: list[tuple[bytes, float | None]] = [
            (digest, atime) for atime, digest, _ in self._candidates(frozenset()) if atime < cutoff
        ]
        return self._remove(victims, evicted=True)[0]

    def set_limits(self, limit_bytes: int | None, min_free: float, max_age: float) -> None:
        """Change the limits of a live cache; takes effect at the next put or maintenance call."""
        with self._mem:
            self._limit_bytes, self._min_free, self._max_age = limit_bytes, min_free, max_age

    # ------------------------------------------------------------------ objects and pins

    def _object_rows(self, txn: Any, oid: bytes) -> Iterator[tuple[bytes, int, bytes]]:
        """(digest, block index, etag) of every cached chunk of one object: a prefix scan."""
        cursor = txn.cursor(db=self._objects)
        if not cursor.set_range(oid):
            return
        for k, v in cursor.iternext():
            if not k.startswith(oid):
                return
            yield k[len(oid) :], _OBJ_VALUE.unpack_from(v)[0], v[_OBJ_VALUE.size :]

    def object_chunks(self, bucket: str, key: str) -> list[ChunkKey]:
        """Every cached chunk of (bucket, key), of any ETag, ordered by ETag then block index."""
        self._check_open()
        with self._env.begin() as txn:
            rows = list(self._object_rows(txn, _object_id(_enc(bucket), _enc(key))))
        chunks = [ChunkKey(bucket, key, _dec(etag), index) for _, index, etag in rows]
        return sorted(chunks, key=lambda ck: (ck.etag, ck.index))

    def drop_object(self, bucket: str, key: str, keep_etag: str | None = None) -> int:
        """Remove the object's chunks except those of ``keep_etag`` (the object changed, or the user
        evicted it). Not counted as evictions; pins stay. Returns bytes on disk freed."""
        self._check_open()
        keep = None if keep_etag is None else _enc(keep_etag)
        with self._env.begin() as txn:
            victims: list[tuple[bytes, float | None]] = [
                (digest, None)
                for digest, _, etag in self._object_rows(txn, _object_id(_enc(bucket), _enc(key)))
                if etag != keep
            ]
        return self._remove(victims, evicted=False)[1]

    def pin(self, bucket: str, key: str) -> None:
        """Exempt every chunk of the object, present and future, from eviction and age-out."""
        self._check_open()
        bucket_b, key_b = _enc(bucket), _enc(key)
        oid = _object_id(bucket_b, key_b)
        with self._write_lock:
            if oid in self._pinned:
                return
            size = 0
            with self._env.begin(write=True) as txn:
                txn.put(oid, len(bucket_b).to_bytes(2, "little") + bucket_b + key_b, db=self._pins)
                for digest, _, _ in self._object_rows(txn, oid):
                    raw = txn.get(digest, db=self._chunks)
                    if raw is not None:
                        size += _Record.decode(raw).stored
            with self._mem:
                self._pinned.add(oid)
                self._totals.pinned_bytes += size

    def unpin(self, bucket: str, key: str) -> None:
        """Make the object's chunks evictable again (they keep their access times)."""
        self._check_open()
        oid = _object_id(_enc(bucket), _enc(key))
        with self._write_lock:
            if oid not in self._pinned:
                return
            size = 0
            with self._env.begin(write=True) as txn:
                txn.delete(oid, db=self._pins)
                for digest, _, _ in self._object_rows(txn, oid):
                    raw = txn.get(digest, db=self._chunks)
                    if raw is not None:
                        size += _Record.decode(raw).stored
            with self._mem:
                self._pinned.discard(oid)
                self._totals.pinned_bytes -= size

    def is_pinned(self, bucket: str, key: str) -> bool:
        with self._mem:
            return _object_id(_enc(bucket), _enc(key)) in self._pinned

    # ------------------------------------------------------------------ stats

    def stats(self) -> CacheStats:
        _, available = self._disk_space(self._root)
        with self._mem:
            t = self._totals
            return CacheStats(
                chunks=t.chunks,
                logical_bytes=t.logical_bytes,
                disk_bytes=t.disk_bytes,
                pinned_bytes=t.pinned_bytes,
                evictions=t.evictions,
                hits=t.hits,
                misses=t.misses,
                bytes_served=t.bytes_served,
                corrupt=t.corrupt,
                limit_bytes=self._limit_bytes,
                free_disk_bytes=available,
                compression_ratio=t.logical_bytes / t.disk_bytes if t.disk_bytes else 1.0,
            )
