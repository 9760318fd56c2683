"""Bounded flush and umount on real mounts: uploads that fail for good or for too long.

Issue 11 asks that ``tierfs flush`` and ``tierfs umount`` never hang: a permanent error (the
bucket deleted under the mount, so every PUT gets NoSuchBucket) is reported within seconds,
exit != 0, naming each file not uploaded; transient errors (the server gone, connection
refused) are retried up to ``--flush-timeout`` and then reported the same way. Either way
the data stays staged and journaled: a later flush, or the next mount, uploads it, and
``tierfs status`` lists the failing files. umount does not unmount then (unless
--no-flush), and ``fusermount3 -u`` still works while a flush keeps failing.

Servers are real (moto on loopback); nothing in the S3 path is patched.
"""

from __future__ import annotations

import functools
import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from mounting import REPO_ROOT, Mount, Mounter, run_tierfs, tierfs_command, wait_until

from tools import faultproxy
from tools.faultproxy import FaultProxy, Rule
from tools.servers import MotoS3, child_env, s3_client

PAYLOAD = os.urandom(100 * 1024) + b"the last acknowledged write"
NAME = "lost.bin"
PERMANENT_BOUND = 30.0  # "within seconds": generous for a loaded 2-core machine, far below any retry loop
pytestmark = pytest.mark.fuse


@pytest.fixture
def own_moto() -> Iterator[MotoS3]:
    """A moto of this test alone, which the test may stop to make every request fail (refused)."""
    server = MotoS3()
    server.start()
    try:
        yield server
    finally:
        server.stop()


def timed_tierfs(*args: str, timeout: float = 120.0) -> tuple[subprocess.CompletedProcess[str], float]:
    started = time.monotonic()
    result = run_tierfs(*args, timeout=timeout)
    return result, time.monotonic() - started


def error_lines(result: subprocess.CompletedProcess[str]) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.startswith("tierfs: error:")]


def names_the_file(result: subprocess.CompletedProcess[str], name: str = NAME) -> bool:
    """One ``tierfs: error: flush failed: <path>: <error>`` line for the file, with an error after it."""
    prefix = "tierfs: error: flush failed: "
    for line in error_lines(result):
        if line.startswith(prefix):
            path, sep, error = line[len(prefix) :].partition(": ")
            if path.endswith(name) and sep and error.strip():
                return True
    return False


def staged_copies(mount: Mount) -> list[Path]:
    """Files in the mount's staging area holding exactly PAYLOAD."""
    root = mount.cache_dir / "staging"
    return [p for p in root.rglob("*") if p.is_file() and p.read_bytes() == PAYLOAD]


def write_unuploaded(mount: Mount, endpoint: str, bucket: str) -> None:
    """Write NAME through the mount; a long --writeback-delay keeps it from the bucket until a flush."""
    (mount.path / NAME).write_bytes(PAYLOAD)
    listed = s3_client(endpoint).list_objects_v2(Bucket=bucket)
    assert listed.get("KeyCount", 0) == 0, "uploaded before the test meant to"


def write_then_lose_bucket(mount: Mount, endpoint: str, bucket: str) -> None:
    """Write NAME (not yet uploaded), then delete the bucket: every PUT gets NoSuchBucket."""
    write_unuploaded(mount, endpoint, bucket)
    s3_client(endpoint).delete_bucket(Bucket=bucket)


def context(mount: Mount, *results: subprocess.CompletedProcess[str]) -> str:
    shown = "\n".join(f"{r.args[-1]}: rc={r.returncode}\n{r.stdout}{r.stderr}" for r in results)
    return f"{shown}\n--- mount log ---\n{mount.log_text()[-6000:]}"


@pytest.mark.parametrize("fault", ["bucket-deleted", "403-on-put"])
def test_permanent_error_fails_flush_and_umount_within_seconds_and_keeps_the_data(
    mounter: Mounter, moto: MotoS3, bucket: Callable[..., str], fault: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The two permanent faults of issue 11's table: the bucket deleted under the mount
    (NoSuchBucket), and 403 AccessDenied on PUT (from a proxy in front of moto)."""
    # The proxy labels statuses it has no S3 code for "InternalError", which S3 clients rightly
    # retry; a real S3 403 says AccessDenied. (The proxy runs in this process.)
    monkeypatch.setitem(faultproxy._ERROR_CODES, 403, "AccessDenied")
    name = bucket(moto)
    with FaultProxy(moto.endpoint_url, []) as proxy:
        endpoint = proxy.endpoint_url if fault == "403-on-put" else moto.endpoint_url
        mount = mounter(f"s3://{name}", "--writeback-delay", "1h", endpoint_url=endpoint)
        heal: Callable[[], None]
        if fault == "bucket-deleted":
            write_then_lose_bucket(mount, moto.endpoint_url, name)
            heal = functools.partial(moto.create_bucket, name)
        else:
            write_unuploaded(mount, moto.endpoint_url, name)
            proxy.set_rules([Rule("error", methods={"PUT"}, statuses=(403,))])
            heal = functools.partial(proxy.set_rules, [])
        check_permanent_failure_and_recovery(mount, heal)
        body = s3_client(moto.endpoint_url).get_object(Bucket=name, Key=NAME)["Body"].read()
        assert body == PAYLOAD
        mount.umount()


def check_permanent_failure_and_recovery(mount: Mount, heal: Callable[[], None]) -> None:
    """flush and umount fail within seconds naming NAME, status lists it, nothing is lost,
    and once ``heal`` has removed the fault a plain flush uploads it."""

    flushed, flush_seconds = timed_tierfs("flush", str(mount.path))
    assert flushed.returncode == 1, context(mount, flushed)
    assert flush_seconds < PERMANENT_BOUND, context(mount, flushed)
    assert names_the_file(flushed), context(mount, flushed)
    assert "not uploaded" in error_lines(flushed)[-1]

    status = mount.status()
    failing = status["failing"]
    assert [path for path in failing if path.endswith(NAME)], status
    assert all(str(error).strip() for error in failing.values())
    table = run_tierfs("status", str(mount.path))
    assert any(line.strip().startswith(NAME) for line in table.stdout.splitlines()), table.stdout

    unmounted, umount_seconds = timed_tierfs("umount", str(mount.path))
    assert unmounted.returncode == 1, context(mount, unmounted)
    assert umount_seconds < PERMANENT_BOUND, context(mount, unmounted)
    assert names_the_file(unmounted), context(mount, unmounted)
    assert "not unmounting" in error_lines(unmounted)[-1]
    assert mount.mounted, "umount unmounted although the flush failed"

    # Nothing was lost: the mount still serves the bytes, staging holds them, and once the fault
    # is gone a later flush uploads them.
    assert (mount.path / NAME).read_bytes() == PAYLOAD
    assert staged_copies(mount), "the staged copy is gone"
    heal()
    again = run_tierfs("flush", str(mount.path))
    assert again.returncode == 0, context(mount, again)
    assert mount.status()["failing"] == {}


def test_transient_errors_fail_the_flush_after_flush_timeout(
    mounter: Mounter, own_moto: MotoS3, bucket: Callable[..., str]
) -> None:
    """The server gone (connection refused) is retried until --flush-timeout, then reported;
    umount refuses until --no-flush, which unmounts at once."""
    name = bucket(own_moto)
    mount = mounter(
        f"s3://{name}",
        "--writeback-delay", "1h", "--flush-timeout", "3", "--timeout", "2", "--retries", "0",
        endpoint_url=own_moto.endpoint_url,
    )  # fmt: skip
    (mount.path / NAME).write_bytes(PAYLOAD)
    own_moto.stop()

    flushed, seconds = timed_tierfs("flush", str(mount.path))
    assert flushed.returncode == 1, context(mount, flushed)
    assert seconds >= 3, "a transient error ended the flush before --flush-timeout"
    assert seconds < 3 + 2 * 2 + 5 + 5 + 30, context(mount, flushed)  # the daemon's hard stop, plus slack
    assert names_the_file(flushed), context(mount, flushed)
    assert "timeout" in error_lines(flushed)[-1], context(mount, flushed)
    assert [path for path in mount.status()["failing"] if path.endswith(NAME)]

    # umount's own --flush-timeout overrides the mount's for that call.
    unmounted, seconds = timed_tierfs("umount", str(mount.path), "--flush-timeout", "1")
    assert unmounted.returncode == 1, context(mount, unmounted)
    assert seconds >= 1
    assert names_the_file(unmounted), context(mount, unmounted)
    assert "not unmounting" in error_lines(unmounted)[-1]
    assert mount.mounted

    assert staged_copies(mount)
    forced = run_tierfs("umount", str(mount.path), "--no-flush")
    assert forced.returncode == 0, context(mount, forced)
    assert not mount.mounted
    assert mount.wait_exited(30), context(mount, forced)


def test_sigterm_gives_up_on_a_permanent_error_and_the_next_mount_uploads(
    mounter: Mounter, moto: MotoS3, bucket: Callable[..., str]
) -> None:
    """systemd's stop (SIGTERM) flushes within --flush-timeout; what failed stays journaled."""
    name = bucket(moto)
    first = mounter(
        f"s3://{name}", "--writeback-delay", "1h", "--flush-timeout", "600", endpoint_url=moto.endpoint_url
    )
    write_then_lose_bucket(first, moto.endpoint_url, name)
    os.kill(first.pid, signal.SIGTERM)
    assert first.wait_exited(PERMANENT_BOUND), f"daemon still flushing after SIGTERM\n{first.log_text()}"
    assert not first.mounted
    assert NAME in first.log_text()  # the log says which file was not uploaded

    moto.create_bucket(name)
    second = mounter(f"s3://{name}", endpoint_url=moto.endpoint_url, cache_dir=first.cache_dir)
    flushed = run_tierfs("flush", str(second.path))
    assert flushed.returncode == 0, context(second, flushed)
    body = s3_client(moto.endpoint_url).get_object(Bucket=name, Key=NAME)["Body"].read()
    assert body == PAYLOAD
    second.umount()


def test_fusermount_unmounts_while_a_flush_keeps_failing(
    mounter: Mounter, own_moto: MotoS3, bucket: Callable[..., str]
) -> None:
    """A flush retrying a dead server must not pin the mount: fusermount3 -u works, the daemon
    exits, and the waiting `tierfs flush` returns with an error instead of hanging."""
    name = bucket(own_moto)
    mount = mounter(
        f"s3://{name}", "--writeback-delay", "1h", "--timeout", "2", "--retries", "0",
        endpoint_url=own_moto.endpoint_url,
    )  # fmt: skip
    (mount.path / NAME).write_bytes(PAYLOAD)
    own_moto.stop()
    flush = subprocess.Popen(
        tierfs_command("flush", str(mount.path)),
        env=child_env(),
        cwd=REPO_ROOT,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_until(lambda: bool(mount.status()["failing"]), 60, "the flush's upload failing")
        assert flush.poll() is None, "the flush ended before --flush-timeout (600 s) on a transient error"
        done = subprocess.run(
            ["fusermount3", "-u", str(mount.path)], capture_output=True, text=True, check=False
        )
        assert done.returncode == 0, done.stderr
        assert mount.wait_exited(30), f"daemon alive after fusermount3 -u\n{mount.log_text()}"
        assert not mount.mounted
        _, err = flush.communicate(timeout=30)
        assert flush.returncode != 0
        assert "tierfs: error:" in err
    finally:
        if flush.poll() is None:
            flush.kill()
            flush.wait()
