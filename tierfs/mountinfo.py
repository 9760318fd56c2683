"""``/proc/self/mountinfo``, parsed once for everyone: the daemon, ``doctor`` and the direct reader.

The daemon finds its own FUSE connection here (``fuse.kerneltune``, ``reader.daemon``): it
must never ``stat`` its own mountpoint, which would be a FUSE request nobody may be serving
yet. ``doctor`` asks which file system would hold a cache directory. The direct reader maps a
file's ``st_dev`` to the tierfs mount it is on. Stdlib only and cheap to import: the reader
runs in every DataLoader worker.

Each line is ``ID PARENT MAJOR:MINOR ROOT MOUNTPOINT OPTIONS [OPTIONAL...] - FSTYPE SOURCE
SUPER_OPTIONS`` (proc(5)); the kernel escapes space, tab, newline and backslash in paths
as ``\\ooo`` octal.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import NamedTuple

PATH = "/proc/self/mountinfo"
# The kernel's dev_t keeps the minor number in the low 20 bits (MINORBITS).
_MINOR_BITS = 20


class MountInfo(NamedTuple):
    """One line of mountinfo, paths already unescaped."""

    mount_id: int
    parent_id: int
    major: int
    minor: int
    root: str
    mountpoint: str
    options: str
    optional_fields: tuple[str, ...]
    fstype: str
    source: str
    super_options: str

    @property
    def dev(self) -> int:
        """The ``st_dev`` of every file on this mount."""
        return os.makedev(self.major, self.minor)

    @property
    def bdi_name(self) -> str:
        """Name of the backing-device-info directory under /sys/class/bdi."""
        return f"{self.major}:{self.minor}"

    @property
    def connection(self) -> int:
        """Directory name under /sys/fs/fuse/connections: the kernel's internal dev_t.

        For ``fuse.*`` mounts the major is 0, so this equals the minor; for ``fuseblk``
        it folds the block device's major in.
        """
        return (self.major << _MINOR_BITS) | self.minor

    @property
    def is_fuse(self) -> bool:
        return self.fstype == "fuse" or self.fstype.startswith(("fuse.", "fuseblk"))


def unescape(field: str) -> str:
    r"""Undo the kernel's octal escaping (``\040`` space, ``\011`` tab, ``\012`` newline, ``\134``).

    Done on bytes so that escaped bytes and raw non-ASCII bytes recombine into the same
    filesystem-encoded name ``os.fsdecode`` would give for the real path. A backslash not
    followed by three octal digits is kept as it is.
    """
    if "\\" not in field:
        return field
    head, *pieces = os.fsencode(field).split(b"\\")
    out = bytearray(head)
    for piece in pieces:
        code = piece[:3]
        if len(code) == 3 and all(0x30 <= c <= 0x37 for c in code):
            out.append(int(code, 8))
            out += piece[3:]
        else:
            out += b"\\" + piece
    return os.fsdecode(bytes(out))


def parse_line(line: str) -> MountInfo | None:
    """Parse one mountinfo line; None if it is malformed (never raise on odd kernel output)."""
    fields = line.split(" ")
    try:
        sep = fields.index("-", 6)
        major_text, minor_text = fields[2].split(":")
        fstype, source, super_options = fields[sep + 1 : sep + 4]
        return MountInfo(
            mount_id=int(fields[0]),
            parent_id=int(fields[1]),
            major=int(major_text),
            minor=int(minor_text),
            root=unescape(fields[3]),
            mountpoint=unescape(fields[4]),
            options=fields[5],
            optional_fields=tuple(fields[6:sep]),
            fstype=unescape(fstype),
            source=unescape(source),
            super_options=super_options,
        )
    except ValueError:
        return None


def read_text(path: str = PATH) -> str:
    with open(path, "rb") as f:
        return os.fsdecode(f.read())


def entries(text: str | None = None) -> Iterator[MountInfo]:
    """Every well-formed line of ``text`` (default: this process's mountinfo), in mount order."""
    for line in (read_text() if text is None else text).splitlines():
        info = parse_line(line)
        if info is not None:
            yield info


def fuse_mount_at(mountpoint: str, text: str | None = None) -> MountInfo | None:
    """The FUSE mount whose mountpoint is exactly ``mountpoint`` (the topmost if several are
    stacked), or None.

    ``mountpoint`` is normalised lexically only (``abspath``, no ``realpath``): resolving
    symlinks would stat path components, including the mountpoint itself.
    """
    wanted = os.path.abspath(mountpoint)
    found: MountInfo | None = None
    for info in entries(text):
        if info.mountpoint == wanted and info.is_fuse:
            found = info  # later lines are mounted on top of earlier ones
    return found


def mount_containing(path: str, text: str | None = None) -> MountInfo | None:
    """The mount a file at ``path`` (an absolute path, symlinks already resolved) would be on:
    the longest mountpoint that is ``path`` or one of its parents, the topmost of equals."""
    best: MountInfo | None = None
    for info in entries(text):
        target = info.mountpoint
        inside = path == target or path.startswith(target.rstrip("/") + "/")
        if inside and (best is None or len(target) >= len(best.mountpoint)):
            best = info
    return best


def by_device(text: str | None = None) -> dict[int, MountInfo]:
    """Every mount by its ``st_dev`` (the topmost where a device is mounted more than once)."""
    return {info.dev: info for info in entries(text)}
