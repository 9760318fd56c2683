"""Namespace records: the appended tail (ctime, rdev, nlink) and records written before it."""

from __future__ import annotations

import stat

from tierfs.meta.records import _HEAD, Flag, Inode, Kind, kind_of_mode


def sample(**changes: object) -> Inode:
    base = Inode(
        7, Kind.SPECIAL, Flag.LOCAL, 1, 0, 1_000, 900, stat.S_IFCHR | 0o600, 10, 20, 0.0,
        "dev", "dir/dev", "etag", 1_500, 0x0813, 3,
    )  # fmt: skip
    return base.with_(**changes)


def test_tail_round_trips() -> None:
    node = sample()
    assert Inode.unpack(7, node.pack()) == node
    assert node.shown_ctime_ns == 1_500


def test_records_without_the_tail_still_decode() -> None:
    """A cache dir written before ctime/rdev/nlink existed: ctime shows as mtime, one name."""
    packed = sample().pack()
    old = packed[: len(packed) - 20]  # the tail is >qQI: 20 bytes
    node = Inode.unpack(7, old)
    assert (node.ctime_ns, node.rdev, node.nlink) == (0, 0, 1)
    assert node.shown_ctime_ns == node.mtime_ns == 1_000
    assert node.key == "dir/dev" and node.etag == "etag"
    assert len(old) == _HEAD.size + len(b"dev") + len(b"dir/dev") + len(b"etag")


def test_kind_of_mode() -> None:
    assert kind_of_mode(stat.S_IFIFO | 0o644) is Kind.SPECIAL
    assert kind_of_mode(stat.S_IFSOCK) is Kind.SPECIAL
    assert kind_of_mode(stat.S_IFLNK | 0o777) is Kind.SYMLINK
    assert kind_of_mode(stat.S_IFDIR) is Kind.DIR
    assert kind_of_mode(stat.S_IFREG | 0o600) is Kind.FILE
