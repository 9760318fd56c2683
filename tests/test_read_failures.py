"""What the read path does when things go wrong: a stalled server, bad input, a busy cache.

A network filesystem must fail the way local ones do: a read that cannot be served
returns EIO within the configured timeout and retries (it never hangs the caller), and
a mount that cannot work is refused up front with one line on stderr and nothing left
mounted, rather than appearing and failing on first use.
"""

from __future__ import annotations

import errno
import os
import random
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from mounting import Mounter, run_tierfs

from tools.servers import MotoS3, SeaweedFS, free_port, is_fuse_mounted, s3_client

MiB = 1 << 20
# A correctness bound, not a performance one: with --timeout 2 and one retry the read must fail
# long before this, and it must not hang forever.
EIO_DEADLINE = 30.0


def mounted_anywhere_under(directory: Path) -> list[str]:
    """Mount points the kernel lists at or below ``directory`` (from mountinfo; never stats them)."""
    prefix = str(directory)
    lines = Path("/proc/self/mountinfo").read_text().splitlines()
    points = [line.split()[4].replace("\\040", " ") for line in lines]
    return [p for p in points if p == prefix or p.startswith(prefix + "/")]


def assert_one_line_error(result_stderr: str) -> str:
    lines = result_stderr.strip().splitlines()
    assert len(lines) == 1, f"expected exactly one line on stderr, got:\n{result_stderr}"
    assert lines[0].startswith("tierfs: error: "), lines[0]
    return lines[0]


# --------------------------------------------------------------------------- 5. server stalls mid-read


class BackgroundRead:
    """One ``pread`` in a thread, so the test keeps control (and can thaw the server) if it hangs."""

    def __init__(self, fd: int, length: int, offset: int) -> None:
        self.error: OSError | None = None
        self.data: bytes | None = None
        self.elapsed = 0.0
        self._thread = threading.Thread(target=self._run, args=(fd, length, offset), daemon=True)

    def _run(self, fd: int, length: int, offset: int) -> None:
        started = time.monotonic()
        try:
            self.data = os.pread(fd, length, offset)
        except OSError as exc:
            self.error = exc
        self.elapsed = time.monotonic() - started

    def start(self) -> None:
        self._thread.start()

    def join(self, timeout: float) -> bool:
        """True if the read finished within ``timeout``."""
        self._thread.join(timeout)
        return not self._thread.is_alive()


def test_read_from_a_stalled_server_fails_with_eio_and_the_mount_still_unmounts(
    seaweed: SeaweedFS, bucket: Callable[..., str], mounter: Mounter
) -> None:
    name = bucket()
    body = random.Random(5).randbytes(32 * MiB)
    s3_client(seaweed.endpoint_url, read_timeout=60.0).put_object(Bucket=name, Key="big.bin", Body=body)
    # Daemon mode so that `tierfs umount` can see the daemon exit (a foreground one is our child).
    mount = mounter(f"s3://{name}", "--timeout", "2", "-o", "retries=1", foreground=False)

    fd = os.open(mount.path / "big.bin", os.O_RDONLY)
    try:
        assert os.pread(fd, 4096, 0) == body[:4096]  # the file is open and being read
        far = len(body) - MiB  # beyond any read-ahead the first read started
        with seaweed.frozen():
            reader = BackgroundRead(fd, 64 * 1024, far)
            reader.start()
            finished = reader.join(EIO_DEADLINE)
            assert finished, f"read still blocked {EIO_DEADLINE} s after the server stalled"
            assert reader.error is not None, "read of an uncached range succeeded while the server was frozen"
            assert reader.error.errno == errno.EIO, reader.error
            os.close(fd)
            fd = -1
            result = run_tierfs("umount", "--no-flush", str(mount.path), timeout=EIO_DEADLINE * 2)
            assert result.returncode == 0, f"{result.stderr}\n{mount.log_text()}"
            assert not mount.mounted
    finally:
        if fd >= 0:
            os.close(fd)


# --------------------------------------------------------------------------- 6. refused mounts


# Daemon and foreground mode report a refusal differently (through the readiness pipe, or
# directly); the preflight behind it is the same, so only the missing bucket runs in both.
MODES = pytest.mark.parametrize("mode_args", [[], ["-f"]], ids=["daemon", "foreground"])


def try_mount(source: str, mountpoint: Path, cache_dir: Path, endpoint: str, *extra: str) -> tuple[int, str]:
    """Run ``tierfs mount``, expecting it to be refused; unmount in case it was not."""
    try:
        result = run_tierfs(
            "mount", source, str(mountpoint), "--endpoint-url", endpoint, "--cache-dir", str(cache_dir),
            "--timeout", "5", *extra,
        )  # fmt: skip
    finally:
        if is_fuse_mounted(mountpoint):
            run_tierfs("umount", "--no-flush", str(mountpoint))
    return result.returncode, result.stderr


@MODES
def test_missing_bucket_is_refused_with_one_line(
    seaweed: SeaweedFS, tmp_path: Path, mode_args: list[str]
) -> None:
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    code, stderr = try_mount(
        "s3://no-such-bucket-here", mnt, tmp_path / "cache", seaweed.endpoint_url, *mode_args
    )
    assert code != 0
    assert "no-such-bucket-here" in assert_one_line_error(stderr)
    assert mounted_anywhere_under(tmp_path) == []


def test_unreachable_endpoint_is_refused_with_one_line(tmp_path: Path) -> None:
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    closed = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    code, stderr = try_mount("s3://some-bucket", mnt, tmp_path / "cache", closed)
    assert code != 0
    assert_one_line_error(stderr)
    assert mounted_anywhere_under(tmp_path) == []


def test_missing_mountpoint_is_refused_with_one_line(
    moto: MotoS3, bucket: Callable[..., str], tmp_path: Path
) -> None:
    name = bucket(moto)  # a bucket that exists, so only the mountpoint is wrong
    mnt = tmp_path / "does-not-exist"
    code, stderr = try_mount(f"s3://{name}", mnt, tmp_path / "cache", moto.endpoint_url)
    assert code != 0
    assert str(mnt) in assert_one_line_error(stderr)
    assert not mnt.exists()
    assert mounted_anywhere_under(tmp_path) == []


def test_second_mount_of_the_same_cache_dir_is_refused_and_the_first_stays_healthy(
    seaweed: SeaweedFS, bucket: Callable[..., str], mounter: Mounter, tmp_path: Path
) -> None:
    name = bucket()
    s3_client(seaweed.endpoint_url).put_object(Bucket=name, Key="file.txt", Body=b"still here\n")
    first = mounter(f"s3://{name}")
    other = tmp_path / "other-mnt"
    other.mkdir()

    code, stderr = try_mount(f"s3://{name}", other, first.cache_dir, seaweed.endpoint_url)
    assert code != 0
    assert "cache" in assert_one_line_error(stderr).lower()
    assert not is_fuse_mounted(other)

    assert first.mounted
    assert os.listdir(first.path) == ["file.txt"]
    assert (first.path / "file.txt").read_bytes() == b"still here\n"
    assert first.status()["errors"] == 0


# --------------------------------------------------------------------------- 7. bad command lines


@pytest.mark.parametrize(
    ("args", "mentions"),
    [
        (["not-a-url", "{mnt}"], "not-a-url"),
        (["s3://some-bucket", "{mnt}", "-o", "no_such_option=1"], "no_such_option"),
        (["s3://some-bucket", "{mnt}", "-o", "retries=many"], "retries"),
        (["s3://some-bucket", "{mnt}", "--cache-size", "1M"], "cache-size"),
        (["s3://some-bucket", "{mnt}", "--bogus-flag"], "bogus-flag"),
        (["s3://some-bucket"], "mountpoint"),
    ],
    ids=["not-a-url", "unknown-o-option", "bad-o-value", "cache-too-small", "unknown-flag", "no-mountpoint"],
)
def test_bad_command_line_is_refused_with_one_line(tmp_path: Path, args: list[str], mentions: str) -> None:
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    argv = [arg.format(mnt=mnt) for arg in args]
    result = run_tierfs(
        "mount", *argv, "--endpoint-url", "http://127.0.0.1:9", "--cache-dir", str(tmp_path / "c")
    )
    assert result.returncode != 0
    assert mentions.lower() in assert_one_line_error(result.stderr).lower()
    assert mounted_anywhere_under(tmp_path) == []
    assert not (tmp_path / "c").exists(), "a refused command line must not create the cache dir"
