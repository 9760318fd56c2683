"""The vocabulary of the file-system layer: its errors, its callers and its requests, free of FUSE.

``PosixError`` carries the errno a POSIX call answers with (EEXIST, ENOTEMPTY, ...): the file
system decides it, ``fuse.errnos`` hands it to the kernel unchanged and without logging it, as
it is the caller's mistake and not a fault. Pure data and pure checks: all of it may run on the
trio loop.
"""

from __future__ import annotations

import errno
import os
from dataclasses import dataclass

from ..meta import keys
from ..meta.namespace import child_key
from ..meta.records import Inode

RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2


class PosixError(OSError):
    """A POSIX call refused with ``errno`` (the file system's answer, not a failure of a layer)."""

    def __init__(self, code: int) -> None:
        super().__init__(code, os.strerror(code))


@dataclass(frozen=True)
class Caller:
    """Who makes a request: the ids a new entry gets, and the umask applied to its mode."""

    uid: int = 0
    gid: int = 0
    umask: int = 0


@dataclass(frozen=True)
class AttrChanges:
    """What setattr(2) and its relatives (truncate, chmod, chown, utimensat) change; None: unchanged."""

    size: int | None = None
    mode: int | None = None  # permission bits only; the file type never changes
    uid: int | None = None
    gid: int | None = None
    atime_ns: int | None = None
    mtime_ns: int | None = None
    ctime_ns: int | None = None  # None: now (every attribute change is a status change)


@dataclass(frozen=True)
class FsStats:
    """statfs(2). A bucket has no fixed capacity: a large one is reported, as mountpoint-s3 and s3fs do."""

    block_size: int
    blocks: int = 1 << 30
    files: int = 1 << 30
    name_max: int = keys.NAME_MAX


def check_name(parent: Inode, name: str, *, is_dir: bool) -> None:
    """ENAMETOOLONG for a name over 255 bytes or a key over S3's 1 KiB; EINVAL for a name
    the listing rules would hide (it could never come back from the bucket)."""
    if len(os.fsencode(name)) > keys.NAME_MAX:
        raise PosixError(errno.ENAMETOOLONG)
    if not keys.is_safe_name(name):
        raise PosixError(errno.EINVAL)
    if not keys.key_fits(child_key(parent.key, name, is_dir=is_dir)):
        raise PosixError(errno.ENAMETOOLONG)
