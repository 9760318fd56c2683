"""Crash safety of write-back: a SIGKILLed daemon loses nothing that close() had accepted.

With a long write-back delay nothing is uploaded before the kill, so after it the
bucket must not have any of the files, and the next mount on the same cache dir must
carry out the whole journal: uploads (two of them multipart: the store switches to
multipart at 64 MiB and there is no option to lower that), a rename and an unlink.
Renames and unlinks run at once, so the S3 server is stopped while those are made.
"""

from __future__ import annotations

import errno
import hashlib
import os
import random
from collections.abc import Callable

import pytest
from mounting import Mounter
from test_posix_write import bucket_keys, flush

from tools.servers import SeaweedFS, s3_client

pytestmark = pytest.mark.fuse

SMALL_FILES = 50
LARGE_SIZE = 70 * 1024 * 1024  # above objectstore.MULTIPART_THRESHOLD (64 MiB)


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_kill9_then_remount_replays_the_journal(
    bucket: Callable[..., str], mounter: Mounter, seaweed: SeaweedFS
) -> None:
    name = bucket()
    client = s3_client(seaweed.endpoint_url, read_timeout=120.0)
    rng = random.Random(99)
    mount = mounter(f"s3://{name}", "--writeback-delay", "300s")

    # Uploaded before the crash: the targets of a journaled rename and unlink.
    os.mkdir(mount.path / "sub")
    (mount.path / "to-rename").write_bytes(b"renamed after replay")
    (mount.path / "to-unlink").write_bytes(b"deleted after replay")
    flush(mount)
    assert bucket_keys(client, name) == {"sub/", "to-rename", "to-unlink"}

    expected: dict[str, str] = {}
    for i in range(SMALL_FILES):
        rel = f"sub/small-{i:02d}" if i % 3 else f"small-{i:02d}"
        data = rng.randbytes(rng.randrange(0, 200_000))
        (mount.path / rel).write_bytes(data)
        expected[rel] = sha256(data)
    for i in range(2):
        data = rng.randbytes(LARGE_SIZE + i * 12345)
        with open(mount.path / f"large-{i}", "wb") as fh:
            # The first chunk goes last (a seek back): the file is not streamed while written
            # (tests/test_streaming.py crashes streams), so it too waits out the delay and its
            # upload is the replay's, whatever the machine's speed.
            chunk = 4 << 20
            fh.seek(chunk)
            for offset in range(chunk, len(data), chunk):
                fh.write(data[offset : offset + chunk])
            fh.seek(0)
            fh.write(data[:chunk])
        expected[f"large-{i}"] = sha256(data)
    os.rename(mount.path / "small-00", mount.path / "sub" / "moved-dirty")  # a dirty file, renamed
    expected["sub/moved-dirty"] = expected.pop("small-00")
    os.unlink(mount.path / "small-03")  # a dirty file, unlinked: never uploaded at all
    del expected["small-03"]
    assert mount.status()["dirty_files"] == len(expected)

    # Copies and deletes are not delayed; with the server down they stay journaled
    # (connection refused: the requests certainly never reached it) until the kill.
    seaweed.stop()
    try:
        os.rename(mount.path / "to-rename", mount.path / "sub" / "renamed")
        os.unlink(mount.path / "to-unlink")
        mount.kill9()
    finally:
        seaweed.start()
    assert bucket_keys(client, name) == {"sub/", "to-rename", "to-unlink"}, (
        "nothing may be uploaded before the kill"
    )
    with pytest.raises(OSError) as dead:
        os.stat(mount.path / "sub")
    assert dead.value.errno == errno.ENOTCONN
    mount.force_unmount()
    assert not mount.mounted

    again = mounter(f"s3://{name}", "--writeback-delay", "300s", cache_dir=mount.cache_dir)
    flush(again)
    keys = bucket_keys(client, name)
    assert keys == set(expected) | {"sub/", "sub/renamed"}
    for key, digest in expected.items():
        body = client.get_object(Bucket=name, Key=key)["Body"].read()
        assert sha256(body) == digest, f"{key} has the wrong content after replay"
    assert client.get_object(Bucket=name, Key="sub/renamed")["Body"].read() == b"renamed after replay"
    # The replayed mount shows the same tree.
    assert (again.path / "sub" / "renamed").read_bytes() == b"renamed after replay"
    assert not (again.path / "to-unlink").exists()
    assert sha256((again.path / "large-1").read_bytes()) == expected["large-1"]
    status = again.status()
    assert (status["uploads_pending"], status["dirty_files"], status["conflicts"]) == (0, 0, 0)
    assert status["s3_requests"].get("create_multipart_upload") == 2
