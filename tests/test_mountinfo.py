"""Parsing /proc/self/mountinfo: the one parser the daemon, doctor and the direct reader share."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tierfs.mountinfo import (
    MountInfo,
    by_device,
    entries,
    fuse_mount_at,
    mount_containing,
    parse_line,
    unescape,
)

# Real-looking lines: root fs, a tmpfs, an s3fs FUSE mount, a tierfs mount whose path holds
# a space, a tab and a backslash, a fuseblk mount (block major), and a tmpfs stacked on top
# of /mnt/stacked after a FUSE mount there.
MOUNTINFO = "\n".join(
    [
        "22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw,errors=remount-ro",
        "25 22 0:23 / /mnt/data rw,nosuid shared:5 master:2 - tmpfs tmpfs rw,size=1024k",
        "31 22 0:45 / /mnt/s3fs rw,nosuid,nodev,relatime shared:9 - fuse.s3fs s3fs rw,user_id=0,group_id=0",
        r"40 22 0:52 / /mnt/my\040data\011x\134y rw,nosuid,nodev,relatime shared:12 - fuse.tierfs "
        r"s3://bucket/pre\040fix rw,user_id=0,group_id=0,allow_other",
        "41 22 8:17 / /media/usb rw,relatime - fuseblk /dev/sdb1 rw,user_id=0,group_id=0",
        "50 22 0:60 / /mnt/stacked rw - fuse.tierfs s3://old rw,user_id=0,group_id=0",
        "51 50 0:61 / /mnt/stacked rw - fuse.tierfs s3://new rw,user_id=0,group_id=0",
        "52 22 0:62 / /mnt/tmp-on-top rw - fuse.tierfs s3://under rw",
        "53 52 0:63 / /mnt/tmp-on-top rw - tmpfs tmpfs rw",
        "this line is garbage",
        "",
    ]
)


def test_parse_line_fields() -> None:
    info = parse_line(MOUNTINFO.splitlines()[1])
    assert info == MountInfo(
        mount_id=25,
        parent_id=22,
        major=0,
        minor=23,
        root="/",
        mountpoint="/mnt/data",
        options="rw,nosuid",
        optional_fields=("shared:5", "master:2"),
        fstype="tmpfs",
        source="tmpfs",
        super_options="rw,size=1024k",
    )


@pytest.mark.parametrize("line", ["", "garbage", "1 2 x:y / /a rw - fuse s rw", "1 2 0:5 / /a rw no-sep"])
def test_malformed_lines_are_ignored(line: str) -> None:
    assert parse_line(line) is None


def test_fuse_mount_at_unescapes_octal_paths() -> None:
    info = fuse_mount_at("/mnt/my data\tx\\y", MOUNTINFO)
    assert info is not None
    assert (info.fstype, info.source, info.bdi_name, info.connection) == (
        "fuse.tierfs",
        "s3://bucket/pre fix",
        "0:52",
        52,
    )
    assert "allow_other" in info.super_options


def test_fuse_mount_at_only_matches_fuse() -> None:
    assert fuse_mount_at("/mnt/data", MOUNTINFO) is None  # tmpfs
    assert fuse_mount_at("/", MOUNTINFO) is None  # ext4
    assert fuse_mount_at("/mnt/nothing", MOUNTINFO) is None
    s3fs = fuse_mount_at("/mnt/s3fs", MOUNTINFO)
    assert s3fs is not None and s3fs.fstype == "fuse.s3fs"


def test_fuse_mount_at_normalises_lexically() -> None:
    info = fuse_mount_at("/mnt/./s3fs/", MOUNTINFO)
    assert info is not None and info.mount_id == 31


def test_fuse_mount_at_takes_topmost_of_stacked_mounts() -> None:
    info = fuse_mount_at("/mnt/stacked", MOUNTINFO)
    assert info is not None and info.source == "s3://new"
    # A non-FUSE mount on top hides nothing from us: the FUSE one below is still reported.
    under = fuse_mount_at("/mnt/tmp-on-top", MOUNTINFO)
    assert under is not None and under.source == "s3://under"


def test_fuseblk_connection_folds_in_major() -> None:
    info = fuse_mount_at("/media/usb", MOUNTINFO)
    assert info is not None
    assert info.bdi_name == "8:17"
    assert info.connection == (8 << 20) | 17


def test_fuse_mount_at_reads_real_mountinfo_without_fuse_entry(tmp_path: Path) -> None:
    # tmp_path is certainly not a FUSE mount; this exercises the /proc/self/mountinfo path.
    assert fuse_mount_at(str(tmp_path)) is None




@pytest.mark.parametrize(
    ("field", "expected"),
    [
        ("/plain", "/plain"),
        (r"/a\040b", "/a b"),
        (r"/tab\011nl\012bs\134", "/tab\tnl\nbs\\"),
        (r"/not\08octal", r"/not\08octal"),  # 8 is no octal digit: kept as it is
        ("/trailing\\", "/trailing\\"),
        (r"/caf\303\251", "/caf\u00e9"),  # escaped UTF-8 bytes recombine into one character
    ],
)
def test_unescape(field: str, expected: str) -> None:
    assert unescape(field) == expected


def test_mount_containing_takes_the_longest_prefix_not_a_mere_string_prefix() -> None:
    text = "22 1 8:1 / / rw - ext4 /dev/sda1 rw\n30 22 0:40 / /mnt/my\\040data rw - xfs /dev/nvme0n1 rw\n"
    inner = mount_containing("/mnt/my data/x", text)
    assert inner is not None
    assert (inner.mountpoint, inner.fstype, inner.source) == ("/mnt/my data", "xfs", "/dev/nvme0n1")
    outer = mount_containing("/mnt/my datax", text)
    assert outer is not None and outer.mountpoint == "/"


def test_by_device_maps_st_dev_to_the_mount() -> None:
    mounts = by_device(MOUNTINFO)
    assert mounts[os.makedev(0, 45)].mountpoint == "/mnt/s3fs"
    assert mounts[os.makedev(8, 17)].fstype == "fuseblk"
    assert len(list(entries(MOUNTINFO))) == 9  # the garbage and the empty line are skipped


def test_this_process_sees_its_root_mount() -> None:
    root = mount_containing(str(Path("/").resolve()))
    assert root is not None and root.mountpoint == "/"
    assert by_device()[os.stat("/").st_dev].mountpoint == "/"
