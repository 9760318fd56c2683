"""The read path under faults, through real mounts (issue 11): what a reader gets is the object's
bytes or EIO, never other bytes, never a hang, and never an error that is only the cache's.

- A full cache disk never fails a read: the bytes are served uncached (``cache_store_failed``),
  and a remount on the same full disk starts and serves reads too.
- A frozen server gives EIO within 2 x ``--timeout`` to every reader, including one that waits
  on another reader's fetch of the same block.
- Through tools/faultproxy.py: 25% of requests failed, delayed, closed or truncated give right
  bytes or EIO; a byte flipped in transit is never served and never stays in the cache.
"""

from __future__ import annotations

import contextlib
import errno
import os
import random
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from mounting import Mount, Mounter

from tools.faultproxy import OBJECT_PATH, FaultProxy, Rule
from tools.servers import SeaweedFS, s3_client

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

KiB = 1 << 10
MiB = 1 << 20
# Every GET of these covers the whole object (at most one 8-block run), so its MD5 ETag can be
# checked; they span the awscrt (<= 2 MiB) and the boto3 GET paths.
WHOLE_OBJECT_SIZES = (1 * KiB, 110 * KiB, 110 * KiB, 700 * KiB, 1536 * KiB, 3 * MiB, 5 * MiB + 3)

pytestmark = pytest.mark.fuse


def put_objects(client: S3Client, bucket: str, sizes: tuple[int, ...], seed: int) -> dict[str, bytes]:
    """Random objects ``f00``, ``f01``... of the given sizes, stored in the bucket; name -> bytes."""
    rng = random.Random(seed)
    objects = {f"f{n:02d}": rng.randbytes(size) for n, size in enumerate(sizes)}
    for name, body in objects.items():
        client.put_object(Bucket=bucket, Key=name, Body=body)
    return objects


def read_or_error(path: Path) -> bytes | OSError:
    """The whole file as one reader sees it, or the error it got."""
    try:
        return path.read_bytes()
    except OSError as exc:
        return exc


def check_reads(mount: Mount, objects: dict[str, bytes], *, eio_allowed: bool) -> int:
    """Read every object through ``mount``: each read is the right bytes or (if allowed) EIO, never
    other bytes or another error. Returns how many reads got the right bytes."""
    good = 0
    for name, body in objects.items():
        got = read_or_error(mount.path / name)
        if isinstance(got, OSError):
            assert eio_allowed and got.errno == errno.EIO, f"{name}: {got}\n{mount.log_text()[-3000:]}"
            continue
        assert len(got) == len(body), f"{name}: {len(got)} bytes read, the object has {len(body)}"
        assert got == body, f"{name}: wrong bytes served (first difference at {first_difference(got, body)})"
        good += 1
    return good


def first_difference(a: bytes, b: bytes) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))


def listing(mount: Mount, attempts: int = 20) -> set[str]:
    """The root directory's names; a LIST hit by an injected fault is simply asked again."""
    for _ in range(attempts - 1):
        with contextlib.suppress(OSError):
            return set(os.listdir(mount.path))
    return set(os.listdir(mount.path))


# --------------------------------------------------------------------------- full cache disk


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 64 MiB tmpfs, unmounted at teardown. Request it *before* ``mounter`` so that the tierfs
    mounts on it are taken down first (fixtures are torn down in reverse order)."""
    path = tmp_path / "small-disk"
    path.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m,mode=0700", "tmpfs", str(path)], check=True)
    try:
        yield path
    finally:
        if subprocess.run(["umount", str(path)], check=False).returncode != 0:
            subprocess.run(["umount", "-l", str(path)], check=False)


def fill(directory: Path) -> int:
    """Write a filler file until the filesystem refuses with ENOSPC; returns its size."""
    written = 0
    with (directory / "filler").open("wb", buffering=0) as out:
        for size in (MiB, 4 * KiB):
            chunk = b"\xa5" * size
            while True:
                try:
                    written += out.write(chunk)
                except OSError as exc:
                    assert exc.errno == errno.ENOSPC, exc
                    break
    return written


def test_a_full_cache_disk_never_fails_a_read_not_even_after_a_remount(
    small_disk: Path, seaweed: SeaweedFS, bucket: Callable[..., str], mounter: Mounter
) -> None:
    name = bucket()
    objects = put_objects(
        s3_client(seaweed.endpoint_url), name, (110 * KiB, 110 * KiB, 3 * MiB, 9 * MiB, 17 * MiB), 1
    )
    cache = small_disk / "cache"
    mount = mounter(f"s3://{name}", cache_dir=cache)
    assert listing(mount) == set(objects)
    first = next(iter(objects))
    assert (mount.path / first).read_bytes() == objects[first]  # cached while there was room

    assert fill(small_disk) > 0
    assert os.statvfs(small_disk).f_bavail * os.statvfs(small_disk).f_frsize < MiB
    assert check_reads(mount, objects, eio_allowed=False) == len(objects)
    assert "cannot store" in mount.log_text(), "no block failed to be stored: the disk was not full"

    mount.umount()
    again = mounter(f"s3://{name}", cache_dir=cache)  # the cache opens on the full disk
    assert listing(again) == set(objects)
    assert check_reads(again, objects, eio_allowed=False) == len(objects)
    again.umount()


# --------------------------------------------------------------------------- frozen server

TIMEOUT = 3.0
# 2 x --timeout, plus slack for a loaded 2-core machine (issue 11: EIO within 2 x --timeout).
EIO_BOUND = 2 * TIMEOUT + 3.0


class TimedRead:
    """One ``pread`` in a thread, timed, so the test keeps control if it blocks."""

    def __init__(self, path: Path, offset: int, length: int) -> None:
        self.fd = os.open(path, os.O_RDONLY)
        self.offset, self.length = offset, length
        self.result: bytes | OSError | None = None
        self.elapsed = 0.0
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        started = time.monotonic()
        try:
            self.result = os.pread(self.fd, self.length, self.offset)
        except OSError as exc:
            self.result = exc
        self.elapsed = time.monotonic() - started

    def start(self) -> None:
        self._thread.start()

    def join(self, timeout: float) -> bool:
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def close(self) -> None:
        os.close(self.fd)


def test_a_frozen_server_gives_every_reader_eio_within_twice_the_timeout(
    seaweed: SeaweedFS, bucket: Callable[..., str], mounter: Mounter
) -> None:
    name = bucket()
    objects = put_objects(s3_client(seaweed.endpoint_url), name, (24 * MiB, 110 * KiB), 2)
    with FaultProxy(seaweed.endpoint_url) as proxy:
        mount = mounter(f"s3://{name}", "--timeout", str(TIMEOUT), endpoint_url=proxy.endpoint_url)
        assert listing(mount) == set(objects)
        readers = [TimedRead(mount.path / "f00", 8 * MiB, 256 * KiB) for _ in range(2)]
        readers.append(TimedRead(mount.path / "f01", 0, 64 * KiB))
        try:
            proxy.set_rules([Rule("stall", stall_max=120.0)])  # accepted, never answered: a frozen server
            for reader in readers:
                reader.start()
                time.sleep(0.2)  # the second reader of f00 finds the first one's fetch in flight
            for reader in readers:
                assert reader.join(EIO_BOUND * 3), f"read still blocked {EIO_BOUND * 3} s into the stall"
            for reader in readers:
                assert isinstance(reader.result, OSError), (
                    f"read of a frozen server returned {reader.result!r}"
                )
                assert reader.result.errno == errno.EIO, reader.result
                assert reader.elapsed <= EIO_BOUND, f"EIO after {reader.elapsed:.1f} s, bound {EIO_BOUND} s"
            assert proxy.stalled > 0  # the server really never answered
        finally:
            proxy.set_rules([])
            proxy.release()
            for reader in readers:
                reader.join(EIO_BOUND * 3)
                reader.close()
        time.sleep(1.5)  # past the hydrator's memory of the failure
        assert check_reads(mount, objects, eio_allowed=False) == len(objects)  # thawed: served again
        mount.umount()


# --------------------------------------------------------------------------- faults in transit


def test_requests_failed_delayed_closed_or_truncated_give_right_bytes_or_eio(
    seaweed: SeaweedFS, bucket: Callable[..., str], mounter: Mounter
) -> None:
    name = bucket()
    rng = random.Random(3)
    sizes = (*WHOLE_OBJECT_SIZES, 12 * MiB + 5, *(rng.randrange(1, 300 * KiB) for _ in range(40)))
    objects = put_objects(s3_client(seaweed.endpoint_url), name, sizes, 3)
    # Each mode once at a fixed place among the object GETs, so none can be missed by chance...
    certain = [
        Rule(mode, methods={"GET"}, path=OBJECT_PATH, skip=skip, count=1)
        for mode, skip in (("error", 1), ("truncate", 2), ("close", 3), ("delay", 4))
    ]
    # ...and 25% of all requests (LIST and HEAD included) hit at random.
    random_faults = [
        Rule("error", 0.07, statuses=(503, 500)),
        Rule("delay", 0.06, delay=(0.05, 0.4)),
        Rule("close", 0.06),
        Rule("truncate", 0.06),
    ]
    with FaultProxy(seaweed.endpoint_url, [*certain, *random_faults], seed=4) as proxy:
        mount = mounter(f"s3://{name}", "--timeout", "10", endpoint_url=proxy.endpoint_url)
        assert listing(mount) == set(objects)
        good = check_reads(mount, objects, eio_allowed=True)
        assert good >= len(objects) // 2, f"only {good} of {len(objects)} reads succeeded"
        assert {"error", "delay", "close", "truncate"} <= set(proxy.counts), proxy.counts
        assert sum(proxy.counts.values()) >= 8, proxy.counts

        proxy.set_rules([])  # nothing wrong may have stayed in the cache: read it back from there
        mount.umount()
        again = mounter(f"s3://{name}", cache_dir=mount.cache_dir, endpoint_url=proxy.endpoint_url)
        assert check_reads(again, objects, eio_allowed=False) == len(objects)
        assert again.status()["bytes_from_cache"] > 0, "nothing was read back from the chunk cache"
        again.umount()


def test_a_byte_flipped_in_transit_is_never_served_nor_cached(
    seaweed: SeaweedFS, bucket: Callable[..., str], mounter: Mounter
) -> None:
    """Needs the store's verification of GET bodies (ETag MD5 / x-amz-checksum-*): without it the
    flipped bytes are served and cached, and this test fails."""
    name = bucket()
    objects = put_objects(s3_client(seaweed.endpoint_url), name, WHOLE_OBJECT_SIZES, 5)
    flips = [Rule("flip", 0.3, methods={"GET"}, path=OBJECT_PATH)]
    with FaultProxy(seaweed.endpoint_url, flips, seed=6) as proxy:
        mount = mounter(f"s3://{name}", endpoint_url=proxy.endpoint_url)
        assert listing(mount) == set(objects)
        good = check_reads(mount, objects, eio_allowed=True)
        assert proxy.counts["flip"] > 0
        assert good > 0

        proxy.set_rules([])
        mount.umount()  # drops the kernel's page cache; tierfs's chunk cache stays
        again = mounter(f"s3://{name}", cache_dir=mount.cache_dir, endpoint_url=proxy.endpoint_url)
        assert check_reads(again, objects, eio_allowed=False) == len(objects)
        assert again.status()["bytes_from_cache"] > 0, "nothing was read back from the chunk cache"
        again.umount()
