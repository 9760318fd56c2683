"""The test harness itself: servers, request counting, stalls, restarts and forced unmounts.

Every other test trusts these helpers to report server-side request counts exactly, to
simulate outages faithfully and to leave nothing mounted or running, so they are tested
against the real thing too.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import botocore.exceptions
import pytest
from mounting import Mounter

from tools.servers import (
    MotoS3,
    SeaweedFS,
    child_env,
    force_unmount,
    is_fuse_mounted,
    pid_alive,
    s3_client,
    terminate_process_group,
)


def wait_for(condition: Callable[[], bool], timeout: float = 10.0) -> bool:
    """Poll ``condition`` until it holds or ``timeout`` passes; return its last value."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def test_seaweed_round_trips_an_object(seaweed: SeaweedFS, bucket: Callable[..., str]) -> None:
    name = bucket()
    body = os.urandom(300_000)
    client = s3_client(seaweed.endpoint_url)
    client.put_object(Bucket=name, Key="dir/blob.bin", Body=body)
    assert client.get_object(Bucket=name, Key="dir/blob.bin")["Body"].read() == body
    listed = client.list_objects_v2(Bucket=name)
    # The warm-up object of create_bucket must not be left behind for tests to trip over.
    assert [o["Key"] for o in listed.get("Contents", [])] == ["dir/blob.bin"]


def test_request_count_is_exact_and_counts_head_as_get(
    seaweed: SeaweedFS, bucket: Callable[..., str]
) -> None:
    name = bucket()
    client = s3_client(seaweed.endpoint_url, attempts=1)
    client.put_object(Bucket=name, Key="k", Body=b"payload")
    gets_before = seaweed.request_count(name, "GET")
    puts_before = seaweed.request_count(name, "PUT")

    for _ in range(5):
        client.get_object(Bucket=name, Key="k")["Body"].read()
    client.head_object(Bucket=name, Key="k")
    expected = gets_before + 6

    # The counter may be bumped just after the response is sent: wait until it has caught
    # up, then require it to be exact (no more requests than we made).
    wait_for(lambda: seaweed.request_count(name, "GET") >= expected)
    assert seaweed.request_count(name, "GET") == expected
    assert seaweed.request_count(name, "PUT") == puts_before
    # A bucket nobody ever asked for counts nothing (a unique name: other tests ask the
    # session server about made-up buckets of their own).
    assert seaweed.request_count(f"never-used-{uuid.uuid4().hex[:12]}", "GET") == 0


def test_freeze_stalls_requests_until_thaw(seaweed: SeaweedFS, bucket: Callable[..., str]) -> None:
    name = bucket()
    setup = s3_client(seaweed.endpoint_url)
    setup.put_object(Bucket=name, Key="k", Body=b"still here")
    client = s3_client(seaweed.endpoint_url, read_timeout=1.0, attempts=1)

    # Connections are accepted by the kernel but never answered: a timeout, not a refusal.
    with seaweed.frozen(), pytest.raises(botocore.exceptions.ReadTimeoutError):
        client.get_object(Bucket=name, Key="k")
    assert client.get_object(Bucket=name, Key="k")["Body"].read() == b"still here"


@pytest.fixture
def private_seaweed(tmp_path: Path) -> Iterator[SeaweedFS]:
    """A SeaweedFS of this test's own, so stopping it cannot disturb the session server."""
    with SeaweedFS(tmp_path / "weed") as server:
        yield server


def _refuses_connections(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) != 0


def test_restart_keeps_endpoint_and_data_and_stop_leaves_nothing(private_seaweed: SeaweedFS) -> None:
    server = private_seaweed
    server.create_bucket("restart-test")
    client = s3_client(server.endpoint_url)
    client.put_object(Bucket="restart-test", Key="k", Body=b"durable")
    first_pid = server.pid

    server.restart()
    assert server.pid != first_pid
    assert client.get_object(Bucket="restart-test", Key="k")["Body"].read() == b"durable"

    pid = server.pid
    server.stop()
    server.stop()  # idempotent
    with pytest.raises(ProcessLookupError):
        os.killpg(pid, 0)  # the whole process group is gone
    assert _refuses_connections(server.s3_port)
    assert not list(Path("/tmp").glob(f"seaweedfs-*-grpc-{server.master_port + 10000}.sock"))

    # What the autouse guard does after a test that left the server stopped, or frozen.
    server.ensure_running()
    assert client.get_object(Bucket="restart-test", Key="k")["Body"].read() == b"durable"
    server.freeze()
    server.ensure_running()
    prompt = s3_client(server.endpoint_url, read_timeout=5.0, attempts=1)
    assert prompt.get_object(Bucket="restart-test", Key="k")["Body"].read() == b"durable"


def test_moto_round_trips_keys_seaweedfs_rejects(moto: MotoS3, bucket: Callable[..., str]) -> None:
    name = bucket(moto)
    client = s3_client(moto.endpoint_url)
    keys = ["a/../b", "a//b", "./c", "d/./e", "sp ace/\u00e9t\u00e9"]
    for i, key in enumerate(keys):
        client.put_object(Bucket=name, Key=key, Body=f"body {i}".encode())
    listed = client.list_objects_v2(Bucket=name)
    assert sorted(o["Key"] for o in listed["Contents"]) == sorted(keys)
    for i, key in enumerate(keys):
        assert client.get_object(Bucket=name, Key=key)["Body"].read() == f"body {i}".encode()


def test_bucket_names_are_unique_and_valid(moto: MotoS3, bucket: Callable[..., str]) -> None:
    names = {bucket(moto) for _ in range(3)}
    assert len(names) == 3
    for name in names:
        assert 3 <= len(name) <= 63
        assert name == name.lower() and "_" not in name and name[0].isalnum() and name[-1].isalnum()


def test_child_env_uses_dummy_credentials_and_drops_host_settings() -> None:
    host = {"AWS_CA_BUNDLE": "/etc/proxy.pem", "AWS_PROFILE": "prod", "AWS_ACCESS_KEY_ID": "real"}
    env = child_env({**host, "PATH": "/bin"})
    assert "AWS_CA_BUNDLE" not in env and "AWS_PROFILE" not in env
    assert env["AWS_ACCESS_KEY_ID"] == "tierfs" and env["AWS_SECRET_ACCESS_KEY"] == "tierfs"
    assert env["AWS_DEFAULT_REGION"] == "us-east-1"
    assert env["PATH"] == "/bin"
    assert "127.0.0.1" in env["NO_PROXY"].split(",")


# A minimal pyfuse3 file system (an empty root directory), so force_unmount can be tested
# on a real FUSE mount independently of tierfs.
EMPTY_FS = """
import errno, stat, sys
import pyfuse3, trio

class Empty(pyfuse3.Operations):
    async def getattr(self, inode, ctx=None):
        if inode != pyfuse3.ROOT_INODE:
            raise pyfuse3.FUSEError(errno.ENOENT)
        attrs = pyfuse3.EntryAttributes()
        attrs.st_ino, attrs.st_mode, attrs.st_nlink = inode, stat.S_IFDIR | 0o755, 2
        return attrs

    async def lookup(self, parent, name, ctx=None):
        raise pyfuse3.FUSEError(errno.ENOENT)

    async def opendir(self, inode, ctx):
        return inode

    async def readdir(self, fh, start_id, token):
        return

pyfuse3.init(Empty(), sys.argv[1], {"fsname=harness", "subtype=harness"})
try:
    trio.run(pyfuse3.main)
finally:
    pyfuse3.close(unmount=False)
"""


@pytest.mark.fuse
def test_force_unmount_removes_a_busy_mount_of_a_frozen_daemon(tmp_path: Path) -> None:
    # A space in the path checks that mountinfo's octal escapes are undone.
    mnt = tmp_path / "mount point"
    mnt.mkdir()
    daemon = subprocess.Popen(
        [sys.executable, "-c", EMPTY_FS, str(mnt)], start_new_session=True, stderr=subprocess.PIPE
    )
    try:
        assert wait_for(lambda: is_fuse_mounted(mnt) or daemon.poll() is not None, timeout=30)
        assert is_fuse_mounted(mnt), daemon.stderr.read().decode() if daemon.stderr else ""
        busy = os.open(mnt, os.O_RDONLY | os.O_DIRECTORY)  # makes a plain unmount fail (EBUSY)
        try:
            os.killpg(daemon.pid, signal.SIGSTOP)  # and the daemon no longer answers
            force_unmount(mnt)
            assert not is_fuse_mounted(mnt)
            # The aborted connection fails fast instead of hanging the caller.
            with pytest.raises(OSError):
                os.listdir(busy)
        finally:
            os.close(busy)
    finally:
        terminate_process_group(daemon)  # first, so that the daemon is never left frozen
        force_unmount(mnt)


@pytest.mark.fuse
def test_mounter_cleanup_leaves_no_mount_and_no_daemon(
    tmp_path: Path, seaweed: SeaweedFS, bucket: Callable[..., str]
) -> None:
    name = bucket()
    s3_client(seaweed.endpoint_url).put_object(Bucket=name, Key="f.txt", Body=b"hello")
    mounts = Mounter(tmp_path, lambda: seaweed.endpoint_url)
    try:
        clean = mounts(f"s3://{name}")
        busy = mounts(f"s3://{name}")
        crashed = mounts(f"s3://{name}")
        daemon = mounts(f"s3://{name}", foreground=False)

        assert clean.status()["pid"] == clean.pid
        clean.umount()
        assert clean.returncode == 0 and not clean.mounted

        assert (busy.path / "f.txt").read_bytes() == b"hello"
        assert daemon.pid != daemon.process.pid and pid_alive(daemon.pid)
        crashed.kill9()
        assert crashed.mounted  # a crashed daemon leaves a dead mount behind
        with (busy.path / "f.txt").open("rb"):  # an open file makes a plain unmount fail
            mounts.cleanup()
    finally:
        mounts.cleanup()
    for mount in (busy, crashed, daemon):
        assert not mount.mounted
        assert not pid_alive(mount.pid)
