"""The manifest file format, version 1: a sorted table of zstd-compressed pages, a footer
that indexes them, and a fixed trailer (docs/snapshots.md, "Manifest format").

Why this shape: a node must answer ``stat`` of one path in a 10M-entry snapshot without
reading 10M entries first. Entries are sorted by key (UTF-8 byte order, which is Python's
``str`` order), so a lookup is a bisect over the footer's first keys, then one page. The
footer sits at the end so the writer can stream (it learns the counts last) and a reader
needs one ranged GET of the tail to start. Every page, the footer and the trailer carry a
CRC32, so a truncated or corrupt manifest is refused rather than half-believed.

An entry is a row ``[key, kind, size, etag, version_id, mtime_ns, mode, uid, gid, parent]``
relative to the snapshot's prefix. Directories are entries too (key ending in ``/``), emitted
before their contents; ``parent`` is the ordinal of the parent directory (-1: the root).
``mode`` 0 and ``uid``/``gid`` -1 mean "unknown": the mount's defaults apply.
"""

from __future__ import annotations

import json
import struct
import zlib
from dataclasses import dataclass, field
from typing import Any, BinaryIO

import zstandard

from ..errors import ConfigError
from ..meta.keys import MAX_KEY_BYTES

FORMAT = 1
MAGIC = b"TIERSNAP"
# magic, format, footer length, footer offset, footer CRC32, then the CRC32 of those 28 bytes.
TRAILER = struct.Struct("<8sIIQI")
TRAILER_SIZE = TRAILER.size + 4
PAGE_ENTRIES = 1024
SUFFIX = ".tsnap"

# Row fields, by position (a list per entry keeps json.loads of a page the whole decode).
KEY, KIND, SIZE, ETAG, VERSION, MTIME, MODE, UID, GID, PARENT = range(10)
KIND_FILE, KIND_DIR, KIND_SYMLINK, KIND_SPECIAL = 1, 2, 3, 4


class ManifestError(ConfigError):
    """The manifest is truncated, corrupt, of another format, or names keys S3 would refuse.
    A ConfigError: the commands and the mount report it as one line and exit non-zero."""


Row = list[Any]


def new_row(
    key: str, *, kind: int = KIND_FILE, size: int = 0, etag: str = "", version_id: str = "",
    mtime_ns: int = 0, mode: int = 0, uid: int = -1, gid: int = -1,
) -> Row:  # fmt: skip
    return [key, kind, size, etag, version_id, mtime_ns, mode, uid, gid, -1]


def key_problem(key: str) -> str | None:
    """Why S3 or SeaweedFS would refuse (or silently rename) ``key`` as an object key, or None.

    S3 refuses empty keys, keys over 1 KiB and keys that are not UTF-8; SeaweedFS refuses
    ``.``/``..`` segments and turns ``a//b`` into ``a/b`` (docs/namespace.md); a NUL byte
    cannot be a POSIX name. A manifest naming such a key is refused as a whole.
    """
    if not key or key[0] == "/":
        return "empty or absolute key"
    if not key.isascii():  # an ASCII key is valid UTF-8 and at most one byte per character
        try:
            size = len(key.encode("utf-8"))
        except UnicodeEncodeError:
            return "not valid UTF-8"
    else:
        size = len(key)
    if size > MAX_KEY_BYTES:
        return f"longer than {MAX_KEY_BYTES} bytes"
    if "\0" in key:
        return "contains a NUL byte"
    if "//" in key:
        return "has an empty segment"
    if "." in key:  # only then can a segment be . or ..
        body = key[:-1] if key.endswith("/") else key
        for segment in body.split("/"):
            if segment in (".", ".."):
                return f"has a {segment!r} segment"
    return None


@dataclass
class PageRef:
    first_key: str
    first_ordinal: int
    offset: int
    length: int
    crc: int


@dataclass
class Footer:
    """What the trailer points at: the snapshot's identity, its totals and the page index."""

    bucket: str
    prefix: str
    name: str
    created_ns: int
    versioned: bool
    source: str  # how it was made: list, versions, as-of, import-keys, import-mountpoint-csv, mount
    as_of: str | None = None
    entries: int = 0
    files: int = 0
    dirs: int = 0
    total_bytes: int = 0
    hidden_keys: int = 0
    pages: list[PageRef] = field(default_factory=list)

    def to_bytes(self) -> bytes:
        record = {k: v for k, v in self.__dict__.items() if k != "pages"}
        record["format"] = FORMAT
        record["pages"] = [[p.first_key, p.first_ordinal, p.offset, p.length, p.crc] for p in self.pages]
        return zstandard.ZstdCompressor(level=6).compress(json.dumps(record, separators=(",", ":")).encode())

    @classmethod
    def from_bytes(cls, raw: bytes) -> Footer:
        try:
            record = json.loads(zstandard.ZstdDecompressor().decompress(raw))
            if record.pop("format") != FORMAT:
                raise ManifestError(f"manifest format {record.get('format')!r} is not {FORMAT}")
            pages = [
                PageRef(str(k), int(o), int(off), int(n), int(c)) for k, o, off, n, c in record.pop("pages")
            ]
            return cls(**record, pages=pages)
        except ManifestError:
            raise
        except Exception as exc:  # any malformed footer is one kind of failure
            raise ManifestError(f"malformed manifest footer: {exc}") from None

    def summary(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k != "pages"} | {"pages": len(self.pages)}


def parse_trailer(tail: bytes, total_size: int) -> tuple[int, int, int]:
    """(footer offset, footer length, footer CRC) from the last bytes of a manifest of
    ``total_size`` bytes, or ManifestError when it is truncated, corrupt or of another format."""
    if total_size < TRAILER_SIZE or len(tail) < TRAILER_SIZE:
        raise ManifestError("manifest is truncated (no trailer)")
    raw = tail[-TRAILER_SIZE:]
    if zlib.crc32(raw[: TRAILER.size]) != int.from_bytes(raw[TRAILER.size :], "little"):
        raise ManifestError("manifest is truncated or corrupt (trailer checksum)")
    magic, fmt, length, offset, crc = TRAILER.unpack_from(raw)
    if magic != MAGIC:
        raise ManifestError("not a tierfs snapshot manifest")
    if fmt != FORMAT:
        raise ManifestError(f"manifest format {fmt} is not {FORMAT} (made by another tierfs version)")
    if offset + length + TRAILER_SIZE != total_size:
        raise ManifestError("manifest is truncated or corrupt (footer position)")
    return offset, length, crc


def checked_footer(raw: bytes, crc: int) -> Footer:
    if zlib.crc32(raw) != crc:
        raise ManifestError("manifest is corrupt (footer checksum)")
    return Footer.from_bytes(raw)


def decode_page(raw: bytes, ref: PageRef) -> list[Row]:
    """The rows of one page, checked: CRC, first key and ordinal as indexed, keys sorted and valid."""
    if len(raw) != ref.length or zlib.crc32(raw) != ref.crc:
        raise ManifestError(f"manifest page at {ref.offset} is corrupt (checksum)")
    try:
        rows: list[Row] = json.loads(zstandard.ZstdDecompressor().decompress(raw))
    except Exception as exc:
        raise ManifestError(f"manifest page at {ref.offset} is malformed: {exc}") from None
    if not rows or rows[0][KEY] != ref.first_key:
        raise ManifestError(f"manifest page at {ref.offset} does not match its index")
    previous = ""
    for row in rows:
        key = row[KEY]
        if not isinstance(key, str) or len(row) != PARENT + 1:
            raise ManifestError(f"manifest page at {ref.offset} has a malformed entry")
        problem = key_problem(key)
        if problem is not None:
            raise ManifestError(f"manifest names key {key!r}, which S3 would refuse: {problem}")
        if key <= previous:
            raise ManifestError(f"manifest keys are not sorted at {key!r}")
        previous = key
    return rows


class ManifestWriter:
    """Writes a manifest from rows that arrive sorted by key, directories included.

    Memory is one page of rows plus the page index (about 60 bytes per 1,024 entries), so a
    snapshot of any size is written in flat memory. The caller's rows must already carry
    their ``parent`` ordinals (:class:`tierfs.snapshot.build.TreeBuilder` sets them).
    """

    def __init__(self, out: BinaryIO, footer: Footer, *, page_entries: int = PAGE_ENTRIES) -> None:
        self.out = out
        self.footer = footer
        self.page_entries = page_entries
        self._rows: list[Row] = []
        self._offset = 0
        self._zstd = zstandard.ZstdCompressor(level=3)
        self._last = ""

    def add(self, row: Row) -> int:
        """Append one row; returns its ordinal."""
        key = row[KEY]
        if key <= self._last:
            raise ValueError(f"rows out of order: {key!r} after {self._last!r}")
        self._last = key
        ordinal = self.footer.entries
        self.footer.entries += 1
        if row[KIND] == KIND_DIR:
            self.footer.dirs += 1
        else:
            self.footer.files += 1
            self.footer.total_bytes += int(row[SIZE])
        self._rows.append(row)
        if len(self._rows) >= self.page_entries:
            self._flush_page()
        return ordinal

    def _flush_page(self) -> None:
        if not self._rows:
            return
        raw = self._zstd.compress(json.dumps(self._rows, separators=(",", ":"), ensure_ascii=False).encode())
        first = self.footer.entries - len(self._rows)
        self.footer.pages.append(PageRef(self._rows[0][KEY], first, self._offset, len(raw), zlib.crc32(raw)))
        self.out.write(raw)
        self._offset += len(raw)
        self._rows = []

    def finish(self) -> int:
        """Write the last page, the footer and the trailer; returns the manifest's size."""
        self._flush_page()
        footer = self.footer.to_bytes()
        self.out.write(footer)
        head = TRAILER.pack(MAGIC, FORMAT, len(footer), self._offset, zlib.crc32(footer))
        self.out.write(head + zlib.crc32(head).to_bytes(4, "little"))
        return self._offset + len(footer) + TRAILER_SIZE
