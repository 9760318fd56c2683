"""A non-empty mountpoint is refused unless ``-o nonempty`` (or ``--nonempty``), as s3fs does.

Mounting over files hides them; ``--help`` promises "an existing empty directory". The
refusal must be one line, exit != 0, and leave nothing behind: no mount, no daemon, no
cache directory (so no lock), no registry entry.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest
from mounting import Mounter, run_tierfs

from tierfs.control.registry import lookup
from tools.servers import MotoS3, force_unmount, is_fuse_mounted, s3_client, terminate_pid

pytestmark = pytest.mark.fuse


def processes_naming(path: Path) -> list[int]:
    """Pids whose command line mentions ``path`` (a daemon left behind would)."""
    needle = os.fsencode(str(path))
    found = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry.name}/cmdline", "rb") as fh:
                if needle in fh.read():
                    found.append(int(entry.name))
        except OSError:
            continue
    return found


def occupied_mountpoint(tmp_path: Path) -> Path:
    mnt = tmp_path / "occupied"
    mnt.mkdir()
    (mnt / "keep.txt").write_text("local file under the mountpoint\n")
    return mnt


@pytest.mark.parametrize("mode", [[], ["-f"]], ids=["daemon", "foreground"])
def test_non_empty_mountpoint_is_refused_and_nothing_is_left(
    tmp_path: Path, moto: MotoS3, bucket: Callable[..., str], mode: list[str]
) -> None:
    name = bucket(moto)
    mnt = occupied_mountpoint(tmp_path)
    cache = tmp_path / "cache"
    args = ["mount", f"s3://{name}", str(mnt), "--endpoint-url", moto.endpoint_url, "--cache-dir", str(cache)]
    try:
        done = run_tierfs(*args, *mode, timeout=60)
        assert done.returncode != 0
        assert done.stderr.splitlines() == [
            f"tierfs: error: mount point {mnt} is not empty (use -o nonempty to mount over its contents)"
        ]
        assert not is_fuse_mounted(mnt)
        assert not cache.exists(), "the refused mount created (and may have locked) its cache directory"
        assert lookup(mnt) is None, "the refused mount left a registry entry"
        assert processes_naming(mnt) == [], "the refused mount left a process behind"
        assert run_tierfs("status", str(mnt)).returncode != 0
        assert (mnt / "keep.txt").read_text() == "local file under the mountpoint\n"
    finally:  # should the refusal regress, take down what it mounted
        force_unmount(mnt)
        for pid in processes_naming(mnt):
            terminate_pid(pid)


@pytest.mark.parametrize("spelling", [["-o", "nonempty"], ["--nonempty"]], ids=["-o", "long"])
def test_nonempty_mounts_over_the_contents_and_uncovers_them_again(
    tmp_path: Path, mounter: Mounter, moto: MotoS3, bucket: Callable[..., str], spelling: list[str]
) -> None:
    name = bucket(moto)
    s3_client(moto.endpoint_url).put_object(Bucket=name, Key="remote.txt", Body=b"from the bucket\n")
    mnt = occupied_mountpoint(tmp_path)
    mount = mounter(f"s3://{name}", *spelling, endpoint_url=moto.endpoint_url, mountpoint=mnt)
    assert sorted(os.listdir(mnt)) == ["remote.txt"]  # the local file is hidden, not merged
    assert (mnt / "remote.txt").read_bytes() == b"from the bucket\n"
    mount.umount()
    assert sorted(os.listdir(mnt)) == ["keep.txt"]
    assert (mnt / "keep.txt").read_text() == "local file under the mountpoint\n"
