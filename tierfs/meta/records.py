"""Binary records of the namespace, as stored in LMDB.

Records are packed with :mod:`struct` rather than pickled or JSON-encoded: a
200,000-object namespace then costs ~100 bytes per object on disk and nothing on the
Python heap between requests, and decoding one is a single ``unpack_from``.
"""

from __future__ import annotations

import functools
import stat
import struct
from dataclasses import dataclass, replace
from enum import IntEnum, IntFlag

ROOT_INO = 1


class Kind(IntEnum):
    FILE = 1
    DIR = 2
    SYMLINK = 3
    SPECIAL = 4  # FIFO, socket, character or block device: ``mode`` carries which, ``rdev`` the device


class Flag(IntFlag):
    NONE = 0
    META_KNOWN = 1  # POSIX headers have been read (HEAD/GET) or written by us
    LOCAL = 2  # created or changed here; the bucket may not have it yet (write-back owns it)
    MARKER = 4  # a ``dir/`` marker object exists for this directory
    EMPTY_UNREAD = 8  # a directory holds zero-byte objects whose headers were never read (needs_head)


_KINDS = {int(k): k for k in Kind}  # a dict lookup: calling an enum per record showed in LOOKUP's profile


@functools.cache
def _flags(value: int) -> Flag:
    """Flag(value), memoised: the field is one byte, so at most 256 entries."""
    return Flag(value)


_HEAD = struct.Struct(">BBQQqqIIIdHHH")
# Appended after the strings, so records written before it existed still decode (with
# ctime = mtime, no device and one name): a cache dir survives the upgrade.
_TAIL = struct.Struct(">qQI")


@dataclass(frozen=True, slots=True)
class Inode:
    """One namespace entry. ``key`` is relative to the bucket; a directory's key ends with '/'."""

    ino: int
    kind: Kind
    flags: Flag
    parent: int
    size: int
    mtime_ns: int
    atime_ns: int
    mode: int  # full st_mode, type bits included
    uid: int
    gid: int
    checked: float  # files: last time validated; dirs: last complete listing (0 = never listed)
    name: str
    key: str
    etag: str
    ctime_ns: int = 0  # 0: never changed here (shown as mtime, the rule for foreign objects)
    rdev: int = 0  # device number of a character or block device
    nlink: int = 1  # names of this inode (hard links); a directory: 2 + its subdirectories

    @property
    def is_dir(self) -> bool:
        return self.kind is Kind.DIR

    @property
    def shown_ctime_ns(self) -> int:
        return self.ctime_ns or self.mtime_ns

    def with_(self, **changes: object) -> Inode:
        return replace(self, **changes)  # type: ignore[arg-type]

    def pack(self) -> bytes:
        name, key, etag = self.name.encode(), self.key.encode(), self.etag.encode()
        return (
            _HEAD.pack(
                self.kind,
                self.flags,
                self.parent,
                self.size,
                self.mtime_ns,
                self.atime_ns,
                self.mode,
                self.uid,
                self.gid,
                self.checked,
                len(name),
                len(key),
                len(etag),
            )
            + name
            + key
            + etag
            + _TAIL.pack(self.ctime_ns, self.rdev, self.nlink)
        )

    @classmethod
    def unpack(cls, ino: int, raw: bytes) -> Inode:
        (kind, flags, parent, size, mtime, atime, mode, uid, gid, checked, ln, lk, le) = _HEAD.unpack_from(
            raw
        )
        off = _HEAD.size
        # str() decodes a memoryview (LMDB buffers=True) without copying it to bytes first.
        name = str(raw[off : off + ln], "utf-8")
        key = str(raw[off + ln : off + ln + lk], "utf-8")
        end = off + ln + lk + le
        etag = str(raw[off + ln + lk : end], "utf-8")
        if len(raw) >= end + _TAIL.size:
            ctime, rdev, nlink = _TAIL.unpack_from(raw, end)
        else:  # written before the tail: subdirectories were not counted
            ctime, rdev, nlink = 0, 0, 2 if kind == Kind.DIR else 1
        return cls(
            ino, _KINDS.get(kind) or Kind(kind), _flags(flags), parent, size, mtime, atime, mode, uid, gid,
            checked, name, key, etag, ctime, rdev, nlink,
        )  # fmt: skip


SPECIAL_TYPES = frozenset({stat.S_IFIFO, stat.S_IFSOCK, stat.S_IFCHR, stat.S_IFBLK})


def type_bits(kind: Kind) -> int:
    """The st_mode type of a kind; a SPECIAL record keeps its own type in ``mode``."""
    return {Kind.FILE: stat.S_IFREG, Kind.DIR: stat.S_IFDIR, Kind.SYMLINK: stat.S_IFLNK}[kind]


def kind_of_mode(mode: int) -> Kind:
    file_type = stat.S_IFMT(mode)
    if file_type == stat.S_IFDIR:
        return Kind.DIR
    if file_type == stat.S_IFLNK:
        return Kind.SYMLINK
    if file_type in SPECIAL_TYPES:
        return Kind.SPECIAL
    return Kind.FILE


def ino_key(ino: int) -> bytes:
    return ino.to_bytes(8, "big")


def dentry_key(parent: int, name: str) -> bytes:
    return parent.to_bytes(8, "big") + name.encode()


def link_key(ino: int, parent: int, name: str) -> bytes:
    """A hard link's extra name of ``ino`` (the record holds its first name): ino, parent, name."""
    return ino.to_bytes(8, "big") + dentry_key(parent, name)


def split_link_key(raw: bytes) -> tuple[int, int, str]:
    return int.from_bytes(raw[:8], "big"), int.from_bytes(raw[8:16], "big"), bytes(raw[16:]).decode()
