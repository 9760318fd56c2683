"""The chunk file format: encoding a block into a self-validating file, and reading it back.

One job: bytes <-> file. No index, no counters, no locks. The disk tier (``chunkcache``)
writes and reads through it, and so does the direct reader of :mod:`tierfs.reader` in other
processes, so both apply exactly the checks of docs/cache-format.md. Thread-safe (the zstd
codecs are per thread). Blocking: worker threads, except the hydrator's read of a small
object's block (``read.hydrator.LOOP_READ_MAX``).

Each file validates itself (magic, names, index, lengths, an xxh3-64 digest per 64 KiB page
of the logical data), so files need no fsync: a torn or stale file is detected on read and
dropped like a miss. Per-page digests let a small random read fetch and check only the pages
it needs.
"""

from __future__ import annotations

import contextlib
import os
import struct
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import xxhash

from ..cacheformat import CHUNK_FORMAT_VERSION
from .chunkkey import ChunkKey

MAGIC = b"TFSC"
PAGE = 64 * 1024  # the unit a partial read fetches and validates
_DIGEST = struct.Struct("<Q")
FLAG_ZSTD = 0x01
MIN_SAVING = 0.05  # store compressed only if that saves at least this share (JPEGs etc. stay raw)
TMP_PREFIX = ".tmp."

# magic, version, flags, reserved, block index, logical length, stored (payload) length, page count,
# key length, etag length, bucket length; then bucket, key, etag bytes; then one xxh3-64 digest per
# PAGE of the logical data (little-endian u64 each); then the payload.
_HEADER = struct.Struct("<4sBBHQQQIHHH")


def _page_count(logical: int) -> int:
    return (logical + PAGE - 1) // PAGE


def _page_digests(data: bytes | memoryview) -> bytes:
    """The digest table of a chunk: xxh3-64 of each PAGE of ``data`` (about 0.04 ms per MiB)."""
    view = memoryview(data)
    return b"".join(
        _DIGEST.pack(xxhash.xxh3_64_intdigest(view[i : i + PAGE])) for i in range(0, len(view), PAGE)
    )


def unlink_quiet(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


@dataclass(frozen=True)
class Encoded:
    """A block encoded as a file: computed before any lock is taken (compression is the costly part)."""

    logical: int
    flags: int
    parts: tuple[bytes, bytes, bytes, bytes]  # header, names, page digests, payload

    @property
    def stored(self) -> int:
        """Bytes on disk, header included."""
        return sum(len(p) for p in self.parts)


class Invalid(Exception):
    """A chunk file failed validation (or could not be read); ``ident`` is (st_dev, st_ino) if known."""

    def __init__(self, reason: str, ident: tuple[int, int] | None) -> None:
        super().__init__(reason)
        self.ident = ident


def _zstd() -> Any:
    """The zstandard module, imported on first use rather than with this module: the direct
    reader (``tierfs.reader``) imports this module in every fresh DataLoader worker, and a cache
    written without compression never needs zstd (its import is ~10 % of the reader's)."""
    import zstandard

    return zstandard


class _Codecs(threading.local):
    """zstd (de)compressor objects are not thread-safe: one pair per thread, created on first use."""

    def __init__(self, level: int | None) -> None:
        self.level = level
        self._compressor: Any = None
        self._decompressor: Any = None

    @property
    def compressor(self) -> Any:
        if self._compressor is None and self.level is not None:
            self._compressor = _zstd().ZstdCompressor(level=self.level)
        return self._compressor

    @property
    def decompressor(self) -> Any:
        if self._decompressor is None:
            self._decompressor = _zstd().ZstdDecompressor()
        return self._decompressor



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
        so a chunk being read is never lost mid-read. Raises :class:`Invalid`."""
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
            raise Invalid(f"open: {exc}", None) from exc
        ident: tuple[int, int] | None = None
        try:
            st = os.fstat(fd)
            ident = (st.st_dev, st.st_ino)
            head = _pread_exact(fd, prefix + table_max, 0)
            if len(head) < prefix:
                raise Invalid("short header", ident)
            fields = _HEADER.unpack_from(head)
            magic, version, flags, _, index, logical, stored, pages, klen, elen, blen = fields
            if magic != MAGIC or version != CHUNK_FORMAT_VERSION or flags & ~FLAG_ZSTD:
                raise Invalid("bad magic/version/flags", ident)
            if (index, blen, klen, elen) != (ck.index, len(bucket), len(key), len(etag)):
                raise Invalid("header names another chunk", ident)
            if head[_HEADER.size : prefix] != names:
                raise Invalid("header names another chunk", ident)
            data_at = prefix + _DIGEST.size * pages
            if logical > self._block_size or pages != _page_count(logical) or st.st_size != data_at + stored:
                raise Invalid("bad lengths", ident)
            table = head[prefix:data_at]
            end = min(logical, start + want)
            if flags & FLAG_ZSTD:
                payload = _pread_exact(fd, stored, data_at)
                if len(payload) != stored:
                    raise Invalid("short payload", ident)
                first, last, base = 0, pages, 0
            else:
                if stored != logical:
                    raise Invalid("bad lengths", ident)
                first, last = (start // PAGE, (end - 1) // PAGE + 1) if start < end else (0, 0)
                base = first * PAGE
                size = min(logical, last * PAGE) - base
                payload = _pread_exact(fd, size, data_at + base)
                if len(payload) != size:
                    raise Invalid("short payload", ident)
        except OSError as exc:
            raise Invalid(f"read: {exc}", ident) from exc
        finally:
            os.close(fd)
        data = self._decode_payload(payload, flags, logical, ident) if flags & FLAG_ZSTD else payload
        view = memoryview(data)
        for page in range(first, min(last, pages)):
            at = page * PAGE - base
            (expected,) = _DIGEST.unpack_from(table, page * _DIGEST.size)
            if xxhash.xxh3_64_intdigest(view[at : at + PAGE]) != expected:
                raise Invalid("digest mismatch", ident)
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
            if _zstd().frame_content_size(payload) != logical:
                raise Invalid("bad zstd content size", ident)
            data: bytes = self._decompressors.decompressor.decompress(payload, max_output_size=logical)
        except _zstd().ZstdError as exc:
            raise Invalid(f"zstd: {exc}", ident) from exc
        if len(data) != logical:
            raise Invalid("bad lengths", ident)
        return data


class BlockWriter:
    """Encodes blocks (zstd when it pays) and writes them as files, atomically by rename."""

    def __init__(self, block_size: int, compression_level: int | None) -> None:
        self._block_size = block_size
        self._codecs = _Codecs(compression_level)

    def encode(self, ck: ChunkKey, data: bytes) -> Encoded:
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
            CHUNK_FORMAT_VERSION,
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
        return Encoded(len(data), flags, (header, bucket + key + etag, _page_digests(data), payload))

    @staticmethod
    def write(path: str, encoded: Encoded, mode: int) -> None:
        """Temp file in the final directory, then rename: readers see the old file or the new one. No
        fsync: after a crash a torn file fails validation and is dropped. The caller holds the block's
        stripe; a FileNotFoundError (its directory is gone) is the caller's to handle."""
        tmp = f"{os.path.dirname(path)}/{TMP_PREFIX}{os.path.basename(path)}.{os.getpid()}"
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
        try:
            fd = os.open(tmp, flags, mode)
        except FileExistsError:  # left by a crashed writer of the same pid; we hold the stripe
            os.unlink(tmp)
            fd = os.open(tmp, flags, mode)
        try:
            try:
                _write_all(fd, encoded.parts)
            finally:
                os.close(fd)
            os.replace(tmp, path)
        except BaseException:
            unlink_quiet(tmp)
            raise
