"""POSIX attributes stored in S3 user metadata.

We write the header names FSx for Lustre uses, so that a bucket shared with an FSx
file system (or AWS DataSync) keeps its owners, modes and times both ways. We also
read what s3fs writes, because buckets populated by s3fs are common and losing their
modes on the first tierfs mount would be a regression for those users.

boto3 returns user metadata with the ``x-amz-meta-`` prefix removed and the names
lowercased; that is the form :func:`decode` takes and :func:`encode` produces.
Metadata is written by other tools, so a malformed value is ignored (the mount's
defaults apply) rather than making the object unreadable.
"""

from __future__ import annotations

import os
import re
import stat
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation

from .records import SPECIAL_TYPES

# FSx for Lustre names.
FSX_MODE = "file-permissions"
FSX_UID = "file-owner"
FSX_GID = "file-group"
FSX_MTIME = "file-mtime"
FSX_ATIME = "file-atime"
# Ours: the device number of a character or block device, as ``<major>:<minor>`` in decimal.
# FSx has no header for it; its file-permissions carries the type bits, which is enough for
# FIFOs and sockets.
TIERFS_RDEV = "tierfs-rdev"
# s3fs names.
S3FS_MODE = "mode"
S3FS_UID = "uid"
S3FS_GID = "gid"
S3FS_MTIME = "mtime"

_MAX_ID = (1 << 32) - 2  # (uid_t)-1 means "no change" to the kernel and is never a real owner
_MAX_MODE = 0o177777
_FSX_TIME_RE = re.compile(r"^(\d+)(ns)?$")
_DECIMAL_RE = re.compile(r"^\d+$")
_RDEV_RE = re.compile(r"^(\d{1,10}):(\d{1,10})$")
_NS_PER_S = 1_000_000_000
_NS_PER_MS = 1_000_000


@dataclass(frozen=True)
class PosixMeta:
    """What the headers say; None where they are absent or unreadable."""

    mode: int | None = None  # full st_mode as stored (type bits may be missing)
    uid: int | None = None
    gid: int | None = None
    mtime_ns: int | None = None
    atime_ns: int | None = None
    rdev: int | None = None


@dataclass(frozen=True)
class ResolvedAttrs:
    """Attributes to show after the mount's defaults filled the gaps."""

    mode: int  # full st_mode including its type bits
    uid: int
    gid: int
    mtime_ns: int
    atime_ns: int
    rdev: int = 0

    @property
    def is_symlink(self) -> bool:
        return stat.S_ISLNK(self.mode)


def _fsx_mode(text: str) -> int | None:
    try:
        value = int(text, 8)
    except ValueError:
        return None
    return value if 0 <= value <= _MAX_MODE else None


def _s3fs_mode(text: str) -> int | None:
    """s3fs writes decimal st_mode (``33188``); a leading 0 marks an octal value written by hand or script."""
    if not _DECIMAL_RE.match(text):
        return None
    if len(text) > 1 and text.startswith("0"):
        return _fsx_mode(text)
    value = int(text)
    return value if value <= _MAX_MODE else None


def _id(text: str) -> int | None:
    if not _DECIMAL_RE.match(text):
        return None
    value = int(text)
    return value if value <= _MAX_ID else None


def _fsx_time(text: str) -> int | None:
    """``<n>ns`` is nanoseconds (what FSx writes); a bare number is read as epoch milliseconds, the unit
    tools that don't add a suffix use."""
    match = _FSX_TIME_RE.match(text)
    if not match:
        return None
    number, suffix = match.groups()
    return int(number) if suffix else int(number) * _NS_PER_MS


def _s3fs_time(text: str) -> int | None:
    """s3fs writes whole seconds; other writers add a fraction. Decimal keeps nanoseconds exact."""
    try:
        seconds = Decimal(text)
    except InvalidOperation:
        return None
    if not seconds.is_finite() or seconds < 0:
        return None
    return int(seconds * _NS_PER_S)


def _rdev(text: str) -> int | None:
    match = _RDEV_RE.match(text)
    if not match:
        return None
    major, minor = (int(g) for g in match.groups())
    if major >= 1 << 32 or minor >= 1 << 32:
        return None
    return os.makedev(major, minor)


def _first(metadata: Mapping[str, str], *candidates: tuple[str, Callable[[str], int | None]]) -> int | None:
    """The first candidate header that is present *and* parses; so a garbage FSx value falls back to s3fs."""
    for name, parse in candidates:
        raw = metadata.get(name)
        if raw is None:
            continue
        value = parse(raw.strip())
        if value is not None:
            return value
    return None


def decode(metadata: Mapping[str, str]) -> PosixMeta:
    """Read POSIX attributes from user metadata; FSx names win over s3fs names."""
    lowered = {str(k).lower(): str(v) for k, v in metadata.items()}
    return PosixMeta(
        mode=_first(lowered, (FSX_MODE, _fsx_mode), (S3FS_MODE, _s3fs_mode)),
        uid=_first(lowered, (FSX_UID, _id), (S3FS_UID, _id)),
        gid=_first(lowered, (FSX_GID, _id), (S3FS_GID, _id)),
        mtime_ns=_first(lowered, (FSX_MTIME, _fsx_time), (S3FS_MTIME, _s3fs_time)),
        atime_ns=_first(lowered, (FSX_ATIME, _fsx_time)),
        rdev=_first(lowered, (TIERFS_RDEV, _rdev)),
    )


def encode(meta: PosixMeta) -> dict[str, str]:
    """User metadata for ``meta`` in FSx names only; absent fields are left out."""
    out: dict[str, str] = {}
    if meta.mode is not None:
        out[FSX_MODE] = f"{meta.mode:07o}"
    if meta.uid is not None:
        out[FSX_UID] = str(meta.uid)
    if meta.gid is not None:
        out[FSX_GID] = str(meta.gid)
    if meta.mtime_ns is not None:
        out[FSX_MTIME] = f"{meta.mtime_ns}ns"
    if meta.atime_ns is not None:
        out[FSX_ATIME] = f"{meta.atime_ns}ns"
    if meta.rdev:
        out[TIERFS_RDEV] = f"{os.major(meta.rdev)}:{os.minor(meta.rdev)}"
    return out


def resolve(
    meta: PosixMeta,
    *,
    is_dir: bool,
    size: int = 0,
    default_uid: int,
    default_gid: int,
    default_file_mode: int,
    default_dir_mode: int,
    fallback_mtime_ns: int,
) -> ResolvedAttrs:
    """Fill the gaps in ``meta`` with the mount's defaults.

    The object's shape decides file versus directory, since a header can be stale or
    copied; only S_IFLNK is taken from the header, because a symlink is stored as a
    plain object whose body is the target and nothing else marks it, and so are the
    special types (FIFO, socket, devices), but only for a zero-byte object: a header
    copied onto an object with data must not hide that data.
    """
    header_type = stat.S_IFMT(meta.mode) if meta.mode is not None else 0
    if is_dir:
        file_type = stat.S_IFDIR
    elif header_type == stat.S_IFLNK or (header_type in SPECIAL_TYPES and size == 0):
        file_type = header_type
    else:
        file_type = stat.S_IFREG
    if meta.mode is not None:
        perms = stat.S_IMODE(meta.mode)
    else:
        perms = default_dir_mode if is_dir else default_file_mode
    mtime_ns = meta.mtime_ns if meta.mtime_ns is not None else fallback_mtime_ns
    return ResolvedAttrs(
        mode=file_type | perms,
        uid=meta.uid if meta.uid is not None else default_uid,
        gid=meta.gid if meta.gid is not None else default_gid,
        mtime_ns=mtime_ns,
        atime_ns=meta.atime_ns if meta.atime_ns is not None else mtime_ns,
        rdev=(meta.rdev or 0) if file_type in (stat.S_IFCHR, stat.S_IFBLK) else 0,
    )
