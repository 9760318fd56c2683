"""Binary records of the namespace, as stored in LMDB.

Records are packed with :mod:`struct` rather than pickled or JSON-encoded: a
200,000-object namespace then costs ~100 bytes per object on disk and nothing on the
Python heap between requests, and decoding one is a single ``unpack_from``.
"""

from __future__ import annotations

import stat
import struct
from dataclasses import dataclass, replace
from enum import IntEnum, IntFlag

ROOT_INO = 1


class Kind(IntEnum):
    FILE = 1
    DIR = 2
    SYMLINK = 3


class Flag(IntFlag):
    NONE = 0
    META_KNOWN = 1  # POSIX headers have been read (HEAD/GET) or written by us
    LOCAL = 2  # created or changed here; the bucket may not have it yet (write-back owns it)
    MARKER = 4  # a ``dir/`` marker object exists for this directory


_HEAD = struct.Struct(">BBQQqqIIIdHHH")


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

    @property
    def is_dir(self) -> bool:
        return self.kind is Kind.DIR

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
        )

    @classmethod
    def unpack(cls, ino: int, raw: bytes) -> Inode:
        (kind, flags, parent, size, mtime, atime, mode, uid, gid, checked, ln, lk, le) = _HEAD.unpack_from(
            raw
        )
        off = _HEAD.size
        name = bytes(raw[off : off + ln]).decode()
        key = bytes(raw[off + ln : off + ln + lk]).decode()
        etag = bytes(raw[off + ln + lk : off + ln + lk + le]).decode()
        return cls(
            ino, Kind(kind), Flag(flags), parent, size, mtime, atime, mode, uid, gid, checked, name, key, etag
        )


def type_bits(kind: Kind) -> int:
    return {Kind.FILE: stat.S_IFREG, Kind.DIR: stat.S_IFDIR, Kind.SYMLINK: stat.S_IFLNK}[kind]


def kind_of_mode(mode: int) -> Kind:
    if stat.S_ISDIR(mode):
        return Kind.DIR
    if stat.S_ISLNK(mode):
        return Kind.SYMLINK
    return Kind.FILE


def ino_key(ino: int) -> bytes:
    return ino.to_bytes(8, "big")


def dentry_key(parent: int, name: str) -> bytes:
    return parent.to_bytes(8, "big") + name.encode()
