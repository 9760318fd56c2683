"""Reading a manifest by pages: the footer at open, then each page when first needed.

A node never imports a snapshot entry by entry. It fetches the tail (trailer and footer:
about 20 bytes per 1,024 entries plus their first keys), then one page per lookup that
needs it, with ranged GETs pinned to the manifest object's ETag (and version). Fetched pages
are written into a sparse local copy (``CACHE_DIR/snapshots/<id>.tsnap``), so a node fetches
each page once across remounts, and direct readers in other processes read the same file.
A page is trusted only after its CRC matches the footer's, so a hole in the sparse file or
a torn write is a miss, never wrong metadata. Small manifests (``EAGER_BYTES``) are fetched
whole and every page checked before the mount goes live.

Threading: :meth:`Manifest.page` with ``fetch=False`` reads only the local copy (a small
``pread`` plus decode; callers on the trio loop use it) and raises :class:`PageMissing`
otherwise; ``fetch=True`` may make a GET and belongs in a worker thread.
"""

from __future__ import annotations

import bisect
import os
import threading
import zlib
from collections import OrderedDict
from collections.abc import Callable, Iterator
from pathlib import Path

from .format import (
    KEY,
    TRAILER_SIZE,
    Footer,
    ManifestError,
    Row,
    checked_footer,
    decode_page,
    parse_trailer,
)

TAIL_BYTES = 256 << 10  # the first GET: trailer, footer and (small manifests) everything
EAGER_BYTES = 8 << 20  # manifests up to this size are fetched whole and checked at open
FILL_BYTES = 8 << 20  # one ranged GET of the background fill
DECODED_PAGES = 64  # decoded pages kept on the heap (~0.3 MiB each at 1,024 entries)

#: fetch(offset, length) -> exactly those bytes of the manifest object (a ranged GET).
Fetch = Callable[[int, int], bytes]


class PageMissing(Exception):
    """The page is not in the local copy; fetch it (in a worker thread) and ask again."""

    def __init__(self, index: int) -> None:
        super().__init__(index)
        self.index = index


class Manifest:
    """One snapshot manifest, opened for lookups. Thread-safe."""

    def __init__(self, size: int, fetch: Fetch | None, local: Path | None) -> None:
        self.size = size
        self._fetch = fetch
        self._lock = threading.Lock()
        self._decoded: OrderedDict[int, list[Row]] = OrderedDict()
        self._last: tuple[int, list[Row]] | None = None  # the page asked for last (one tuple: atomic)
        self.fetched_pages = 0
        self.on_close: Callable[[], None] | None = None
        self._fd: int | None = None
        self.local_path = local  # the local copy direct readers open (None: kept in memory)
        self._whole: bytes = b""  # a small manifest fetched whole, when there is no local copy
        if local is not None:
            flags = os.O_RDWR | os.O_CREAT if fetch is not None else os.O_RDONLY
            self._fd = os.open(local, flags, 0o640)
            if fetch is not None and os.fstat(self._fd).st_size != size:
                os.ftruncate(self._fd, size)  # sparse: holes are pages not fetched yet
        try:
            self.footer = self._open_footer()
        except BaseException:
            self.close()
            raise
        self.first_keys = [p.first_key for p in self.footer.pages]
        self.first_ordinals = [p.first_ordinal for p in self.footer.pages]
        self._verified = bytearray(len(self.footer.pages))  # pages whose local bytes passed their CRC
        if fetch is not None and size <= EAGER_BYTES:
            self._load_everything()

    def close(self) -> None:
        if self.on_close is not None:
            self.on_close()
            self.on_close = None
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    # -- bytes ----------------------------------------------------------------------------------------

    def _local(self, offset: int, length: int) -> bytes:
        if self._fd is None:
            return self._whole[offset : offset + length]
        return os.pread(self._fd, length, offset)

    def _remote(self, offset: int, length: int) -> bytes:
        if self._fetch is None:
            raise ManifestError("manifest page is not in the local copy")
        data = self._fetch(offset, length)
        if len(data) != length:
            raise ManifestError(f"manifest is truncated (wanted {length} bytes at {offset}, got {len(data)})")
        if self._fd is not None:
            os.pwrite(self._fd, data, offset)
        return data

    def _open_footer(self) -> Footer:
        tail_len = min(self.size, TAIL_BYTES)
        tail = self._local(self.size - tail_len, tail_len)
        try:
            offset, length, crc = parse_trailer(tail, self.size)
            raw = self._local(offset, length)
            return checked_footer(raw, crc)
        except ManifestError:
            if self._fetch is None:
                raise
        tail = self._remote(self.size - tail_len, tail_len)
        offset, length, crc = parse_trailer(tail, self.size)
        start = self.size - tail_len
        if offset >= start:
            raw = tail[offset - start : offset - start + length]
        else:
            raw = self._remote(offset, self.size - TRAILER_SIZE - offset)
        return checked_footer(raw, crc)

    def _load_everything(self) -> None:
        """A small manifest: one GET, then every page checked, so a bad one fails the mount."""
        pages = self.footer.pages
        if not pages:
            return
        end = pages[-1].offset + pages[-1].length
        data = self._remote(0, end)
        if self._fd is None:
            self._whole = data
        for index, ref in enumerate(pages):
            decode_page(data[ref.offset : ref.offset + ref.length], ref)
            self._verified[index] = 1

    # -- pages ----------------------------------------------------------------------------------------

    def decoded(self, index: int) -> list[Row] | None:
        """Page ``index`` if it is decoded on the heap already (no I/O, no decode: a dict lookup)."""
        last = self._last  # a readdir or walk asks for one page many times in a row: no lock then
        if last is not None and last[0] == index:
            return last[1]
        with self._lock:
            rows = self._decoded.get(index)
            if rows is not None:
                self._decoded.move_to_end(index)
                self._last = (index, rows)
            return rows

    def page(self, index: int, *, fetch: bool, decoded_only: bool = False) -> list[Row]:
        """The rows of page ``index``. ``decoded_only``: only a page decoded already, else
        PageMissing (callers on the trio loop then decode it in a worker thread: ~2.6 ms)."""
        rows = self.decoded(index)
        if rows is not None:
            return rows
        if decoded_only:
            raise PageMissing(index)
        rows = self._read_page(index, fetch=fetch)
        with self._lock:
            self._decoded[index] = rows
            if len(self._decoded) > DECODED_PAGES:
                self._decoded.popitem(last=False)
            self._last = (index, rows)
        return rows

    def _read_page(self, index: int, *, fetch: bool) -> list[Row]:
        """Decode page ``index`` from the local copy (or fetch it), without keeping it."""
        ref = self.footer.pages[index]
        raw = self._local(ref.offset, ref.length)
        try:
            rows = decode_page(raw, ref)
        except ManifestError:
            if self._verified[index] and self._fd is not None:
                # Checked good before (maybe by fill while this read ran): read it once more.
                rows = decode_page(self._local(ref.offset, ref.length), ref)
            elif not fetch or self._fetch is None:
                raise PageMissing(index) from None
            else:
                rows = decode_page(self._remote(ref.offset, ref.length), ref)
                with self._lock:
                    self.fetched_pages += 1
        self._verified[index] = 1
        return rows

    def fill(self, chunk_bytes: int = FILL_BYTES) -> int:
        """Make every page local: pages already in the local copy are checked (CRC) and kept, the
        rest fetched in ranged GETs of about ``chunk_bytes``, so a node fetches the manifest once
        and a ``find`` never waits for one GET per page. Blocking (a worker thread); returns the
        bytes fetched. Keys are still checked when each page is first decoded."""
        pages = self.footer.pages
        fetched = 0
        index = 0
        while index < len(pages):
            if self._verified[index] or self._local_ok(index):
                index += 1
                continue
            end = index + 1
            start = pages[index].offset
            while (
                end < len(pages)
                and not self._verified[end]
                and pages[end].offset + pages[end].length - start <= chunk_bytes
            ):
                end += 1
            last = pages[end - 1]
            data = self._remote(start, last.offset + last.length - start)
            fetched += len(data)
            for k in range(index, end):
                ref = pages[k]
                if zlib.crc32(data[ref.offset - start : ref.offset - start + ref.length]) != ref.crc:
                    raise ManifestError(f"manifest page at {ref.offset} is corrupt (checksum)")
                self._verified[k] = 1
            with self._lock:
                self.fetched_pages += end - index
            index = end
        return fetched

    def _local_ok(self, index: int) -> bool:
        ref = self.footer.pages[index]
        if self._fd is None or zlib.crc32(self._local(ref.offset, ref.length)) != ref.crc:
            return False
        self._verified[index] = 1
        return True

    @property
    def local_pages(self) -> int:
        return sum(self._verified)

    # -- lookups (each may raise PageMissing when fetch is False) -------------------------------------

    def page_of(self, ordinal: int) -> int:
        """The index of the page holding ``ordinal``."""
        index = bisect.bisect_right(self.first_ordinals, ordinal) - 1
        if index < 0 or ordinal >= self.footer.entries:
            raise IndexError(ordinal)
        return index

    def row(self, ordinal: int, *, fetch: bool = False, decoded_only: bool = False) -> Row:
        index = self.page_of(ordinal)
        return self.page(index, fetch=fetch, decoded_only=decoded_only)[ordinal - self.first_ordinals[index]]

    def lower_bound(self, key: str, *, fetch: bool = False, decoded_only: bool = False) -> int:
        """The ordinal of the first entry whose key is >= ``key`` (``entries`` if none)."""
        index = bisect.bisect_right(self.first_keys, key) - 1
        if index < 0:
            return 0
        rows = self.page(index, fetch=fetch, decoded_only=decoded_only)
        lo, hi = 0, len(rows)
        while lo < hi:
            mid = (lo + hi) // 2
            if rows[mid][KEY] < key:
                lo = mid + 1
            else:
                hi = mid
        return self.first_ordinals[index] + lo

    def find(self, key: str, *, fetch: bool = False, decoded_only: bool = False) -> int | None:
        ordinal = self.lower_bound(key, fetch=fetch, decoded_only=decoded_only)
        if (
            ordinal < self.footer.entries
            and self.row(ordinal, fetch=fetch, decoded_only=decoded_only)[KEY] == key
        ):
            return ordinal
        return None

    def local_rows(self) -> Iterator[tuple[int, Row]]:
        """(ordinal, row) of every page already local, without fetching any. A scan of every page
        (the usage count) must not evict the pages a ``find`` is reading: pages not decoded
        already are decoded here and dropped, never put in the kept set."""
        for index, ref in enumerate(self.footer.pages):
            if self._verified[index]:
                try:
                    rows = self.decoded(index) or self._read_page(index, fetch=False)
                except (PageMissing, ManifestError):
                    continue
                for n, row in enumerate(rows):
                    yield ref.first_ordinal + n, row

    def rows(self, start: int = 0, *, fetch: bool = True) -> Iterator[tuple[int, Row]]:
        """(ordinal, row) from ``start`` to the end, page by page."""
        index = max(0, bisect.bisect_right(self.first_ordinals, start) - 1)
        for i in range(index, len(self.footer.pages)):
            first = self.first_ordinals[i]
            for n, row in enumerate(self.page(i, fetch=fetch)):
                if first + n >= start:
                    yield first + n, row
