"""The direct reader after a device number was reused: FUSE device numbers are handed out again as
mounts come and go, so the mountpoint a reader remembered for one may belong to a mount that is gone.

Seen on a machine where other mounts came and went beside the test's (issue 24's ecosystem
tests): the reader kept the stale dev -> mountpoint mapping, found no cache for that mountpoint,
and sent every read of the live mount through the FUSE path for the life of the process.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import pytest
from mounting import Mounter
from readerkit import load, sample_files

from tierfs.reader import Reader, core
from tierfs.reader.view import Fallback
from tools.servers import MotoS3

pytestmark = pytest.mark.fuse


def test_a_stale_mountpoint_for_a_reused_device_number_is_looked_up_again(
    moto: MotoS3, bucket: Callable[..., str], mounter: Mounter, monkeypatch: pytest.MonkeyPatch
) -> None:
    loaded = load(moto, bucket, mounter, sample_files(1, 50_000))
    loaded.warm()
    path = loaded.path("train/0000.bin")
    dev = os.stat(path).st_dev
    reader = Reader()
    reader._mounts[dev] = ("/gone/mount/of/another/user", "fuse.tierfs")  # what a reused number leaves
    with pytest.raises(Fallback, match="unreadable"):
        reader.view(dev)
    monkeypatch.setattr(core, "RETRY_VIEW_SECONDS", 0.0)
    reader._roots.pop(dev, None)  # the retry is due
    reader._mountinfo_read = 0.0  # and mountinfo may be read again (at most once a second)
    assert reader.view(dev).mountpoint == str(loaded.mount.path)
    with reader.open(path) as f:
        assert f.read() == loaded.files["train/0000.bin"]
    assert reader.stats()["direct_reads"] >= 1
