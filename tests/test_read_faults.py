"""The read path under faults (issue 11): what a reader gets is the object's bytes or EIO, never
other bytes, never a hang, and never an error that is only the cache's.

Hydrator rules, on a real S3 server (moto) through tierfs.store.faultstore, without FUSE:

- A body that fails its check (IntegrityError, or a length other than asked) is fetched once
  more, then the read fails; nothing of it is cached or served.
- A reader waiting on another reader's stalled fetch, or for an S3 slot, gives up at that
  fetch's deadline (2 x timeout); a failure is remembered for a second, then retried.
- Memory keeps partial reads, not whole small files (the page cache has them) nor prefetches.

Through real mounts:

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
import functools
import math
import os
import random
import subprocess
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import lmdb
import pytest
import trio
from mounting import Mount, Mounter
from test_chunkcache import Harness

from tierfs.cache.chunkcache import ChunkCache
from tierfs.cache.chunkkey import ChunkKey
from tierfs.cache.memory import MemoryTier
from tierfs.cache.stack import Tiers
from tierfs.errors import IntegrityError, Unavailable
from tierfs.read.hydrator import FAILURE_MEMORY, Hydrator, ObjectVersion
from tierfs.store.faultstore import FaultStore
from tierfs.store.objectstore import GetResult, ObjectStore, S3ObjectStore
from tools.faultproxy import OBJECT_PATH, FaultProxy, Rule
from tools.servers import MotoS3, SeaweedFS, s3_client

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

KiB = 1 << 10
MiB = 1 << 20
# Every GET of these covers the whole object (at most one 8-block run), so its MD5 ETag can be
# checked; they span the awscrt (<= 2 MiB) and the boto3 GET paths.
WHOLE_OBJECT_SIZES = (1 * KiB, 110 * KiB, 110 * KiB, 700 * KiB, 1536 * KiB, 3 * MiB, 5 * MiB + 3)


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


# --------------------------------------------------------------------------- the hydrator's rules


class ShortBodies(FaultStore):
    """Cuts the body of the next ``cuts`` GETs in half, as a connection closed early might (awscrt
    returns what arrived), to check that the hydrator's own length check stands behind the store's."""

    def __init__(self, inner: ObjectStore, cuts: int) -> None:
        super().__init__(inner)
        self.cuts = cuts

    def get_range(
        self,
        key: str,
        start: int,
        length: int,
        if_match: str | None = None,
        *,
        object_size: int | None = None,
    ) -> GetResult:
        result = super().get_range(key, start, length, if_match, object_size=object_size)
        if self.cuts <= 0:
            return result
        self.cuts -= 1
        return GetResult(result.data[: len(result.data) // 2], result.info)


class Workers:
    """``run_s3`` and ``run_io`` as the mount hands them to a Hydrator: worker threads, the S3
    calls bounded by ``limiter``."""

    limiter: trio.CapacityLimiter

    async def run_s3(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await trio.to_thread.run_sync(functools.partial(fn, *args), limiter=self.limiter)

    async def run_io(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await trio.to_thread.run_sync(functools.partial(fn, *args))


class Rig(Workers):
    """A Hydrator as the mount builds it, over a fault-injecting store on moto and a real ChunkCache.

    ``slots`` bounds concurrent store calls like ``--s3-concurrency``. Read-ahead tasks are not
    run (``spawn`` drops them): these tests look at one read at a time.
    """

    TIMEOUT = 1.0

    def __init__(
        self,
        moto: MotoS3,
        bucket: str,
        tmp_path: Path,
        *,
        cuts: int = 0,
        slots: int = 8,
        parallel_runs: int = 16,
    ) -> None:
        self.client = s3_client(moto.endpoint_url)
        self.bucket = bucket
        inner = S3ObjectStore(bucket, endpoint_url=moto.endpoint_url, timeout=self.TIMEOUT, retries=0)
        self.store = ShortBodies(inner, cuts)
        self.harness = Harness(tmp_path)
        self.cache = self.harness.open(block_size=MiB)
        self.limiter = trio.CapacityLimiter(slots)
        self.memory = MemoryTier(64 << 20)
        self.hydrator = Hydrator(
            bucket=bucket,
            store=self.store,
            tiers=Tiers([self.memory, self.cache]),
            run_s3=self.run_s3,
            run_io=self.run_io,
            block_size=MiB,
            spawn=lambda task: None,
            max_parallel_runs=parallel_runs,
            timeout=self.TIMEOUT,
        )

    def put(self, key: str, body: bytes) -> ObjectVersion:
        etag = self.client.put_object(Bucket=self.bucket, Key=key, Body=body)["ETag"].strip('"')
        return ObjectVersion(len(key), key, etag, len(body))

    def cached(self, obj: ObjectVersion) -> list[bytes | None]:
        """What the chunk cache holds for each block of ``obj`` (None: nothing)."""
        return [
            self.cache.get(self.hydrator.chunk_key(obj, i)) for i in range(self.hydrator.block_count(obj))
        ]

    def close(self) -> None:
        self.cache.close()


@pytest.fixture
def make_rig(
    moto: MotoS3, bucket: Callable[..., str], tmp_path: Path, s3_env: None
) -> Iterator[Callable[..., Rig]]:
    """Factory: ``make_rig(cuts=0, slots=8)``; every rig's stalls are released and its cache closed."""
    made: list[Rig] = []

    def make(**options: int) -> Rig:
        home = tmp_path / f"rig{len(made)}"
        home.mkdir()
        made.append(Rig(moto, bucket(moto), home, **options))
        return made[-1]

    try:
        yield make
    finally:
        for one in made:
            one.store.release()
            one.close()


@pytest.fixture
def rig(make_rig: Callable[..., Rig]) -> Rig:
    return make_rig()


async def read_all(rig: Rig, obj: ObjectVersion) -> bytes:
    return await rig.hydrator.read(obj, 0, obj.size)


async def test_the_memory_tier_keeps_no_whole_small_file_stream_or_prefetch(rig: Rig) -> None:
    """A whole small file just read sits in the page cache and a prefetch wants the disk: neither
    is copied into the memory tier, where it would push out blocks still in use (issue 16). A
    file read from its start in parts is a stream: its reader's next READ finds the block in the
    stream's own buffer, not on disk, and the memory tier is left alone (issue 21)."""
    body = random.Random(7).randbytes(110 * KiB)
    small = rig.put("small", body)
    first = rig.hydrator.chunk_key(small, 0)
    assert await read_all(rig, small) == body  # cold: fetched and stored on disk
    assert rig.cached(small) == [body] and not rig.memory.contains(first)
    assert await read_all(rig, small) == body  # warm, from the disk tier
    assert not rig.memory.contains(first) and rig.store.calls["get_range"] == 1
    assert await rig.hydrator.read(small, 0, 4 * KiB) == body[: 4 * KiB]  # part of it: more may follow
    disk_reads = rig.hydrator.tiers.reads.status()["disk_hits"]
    assert await rig.hydrator.read(small, 4 * KiB, 4 * KiB) == body[4 * KiB : 8 * KiB]
    assert rig.hydrator.tiers.reads.status()["disk_hits"] == disk_reads  # from the stream's buffer
    assert not rig.memory.contains(first) and rig.store.calls["get_range"] == 1
    large = rig.put("large", random.Random(8).randbytes(MiB + 5))
    await rig.hydrator.hydrate(large)
    assert [len(b or b"") for b in rig.cached(large)] == [MiB, 5]
    assert not any(rig.memory.contains(rig.hydrator.chunk_key(large, i)) for i in range(2))


async def test_a_body_failing_its_check_is_fetched_once_more_then_the_read_fails(rig: Rig) -> None:
    body = random.Random(1).randbytes(300 * KiB)
    first = rig.put("first", body)
    rig.store.fail("get_range", IntegrityError, nth=1)
    assert await read_all(rig, first) == body  # the second GET was good
    assert rig.store.calls["get_range"] == 2
    assert rig.hydrator.stats.integrity_retries == 1
    assert rig.cached(first) == [body]

    second = rig.put("second", body[::-1])
    rig.store.fail("get_range", IntegrityError, nth=[3, 4])
    with pytest.raises(IntegrityError):
        await read_all(rig, second)
    assert rig.store.calls["get_range"] == 4  # once more, not again and again
    assert rig.cached(second) == [None]


@pytest.mark.parametrize("cuts", [1, 2])
async def test_a_short_body_is_never_cached_or_served(make_rig: Callable[..., Rig], cuts: int) -> None:
    rig = make_rig(cuts=cuts)
    body = random.Random(2).randbytes(2 * MiB + 17)  # three blocks, one GET
    obj = rig.put("object", body)
    if cuts == 1:
        assert await read_all(rig, obj) == body  # refetched whole
    else:
        with pytest.raises(IntegrityError):
            await read_all(rig, obj)
        assert rig.cached(obj) == [None, None, None]
        assert rig.memory.size == 0
        await trio.sleep(FAILURE_MEMORY + 0.1)
        assert await read_all(rig, obj) == body  # the store is honest again
    assert rig.cached(obj) == [body[:MiB], body[MiB : 2 * MiB], body[2 * MiB :]]


async def timed(call: Callable[[], Awaitable[object]]) -> tuple[BaseException | None, float]:
    started = trio.current_time()
    try:
        await call()
    except Exception as exc:
        return exc, trio.current_time() - started
    return None, trio.current_time() - started


# 2 x timeout of the fetch waited on, plus slack for a loaded 2-core machine.
WAIT_BOUND = 2 * Rig.TIMEOUT + 1.5


async def test_a_reader_waiting_on_a_stalled_fetch_gives_up_at_that_fetchs_deadline(rig: Rig) -> None:
    body = random.Random(3).randbytes(200 * KiB)
    obj = rig.put("object", body)
    rig.store.stall("get_range", bound=60.0, nth=1)
    first: list[bytes] = []

    async def first_reader() -> None:
        first.append(await read_all(rig, obj))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(first_reader)
        assert await trio.to_thread.run_sync(rig.store.wait_stalled)
        error, waited = await timed(lambda: read_all(rig, obj))  # finds the first reader's fetch
        assert isinstance(error, Unavailable), error
        assert waited <= WAIT_BOUND, f"waited {waited:.1f} s on a fetch allowed {2 * Rig.TIMEOUT} s"
        assert rig.store.calls["get_range"] == 1  # it waited; it did not send a GET of its own
        rig.store.release()
    assert first == [body]  # the stalled call itself went through once released


async def test_a_read_waiting_for_an_s3_slot_gives_up_at_its_deadline(make_rig: Callable[..., Rig]) -> None:
    rig = make_rig(slots=1)
    busy = rig.put("busy", b"b" * 1000)
    other = rig.put("other", b"o" * 1000)
    rig.store.stall("get_range", bound=60.0, nth=1)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(read_all, rig, busy)
        assert await trio.to_thread.run_sync(rig.store.wait_stalled)
        error, waited = await timed(lambda: read_all(rig, other))  # the only slot is taken
        assert isinstance(error, Unavailable) and "slot" in str(error), error
        assert waited <= WAIT_BOUND, f"waited {waited:.1f} s for a slot"
        rig.store.release()
    assert rig.store.calls["get_range"] == 1


async def test_the_first_failed_run_of_a_big_request_cancels_the_runs_not_yet_started(
    make_rig: Callable[..., Rig],
) -> None:
    rig = make_rig(parallel_runs=1)  # runs one after the other, so "not yet started" is certain
    obj = rig.put("big", random.Random(4).randbytes(20 * MiB))  # three runs of at most 8 blocks
    rig.store.fail("get_range", Unavailable, nth=1)
    with pytest.raises(Unavailable):
        await rig.hydrator.blocks(obj, range(20))
    assert rig.store.calls["get_range"] == 1


async def test_a_failed_fetch_is_remembered_for_a_moment_then_tried_again(rig: Rig) -> None:
    body = b"remembered" * 1000
    obj = rig.put("object", body)
    rig.store.fail("get_range", Unavailable, nth=1)
    with pytest.raises(Unavailable):
        await read_all(rig, obj)
    with pytest.raises(Unavailable):
        await read_all(rig, obj)  # the kernel's immediate re-ask: answered from memory
    assert rig.store.calls["get_range"] == 1
    await trio.sleep(FAILURE_MEMORY + 0.1)
    assert await read_all(rig, obj) == body
    assert rig.store.calls["get_range"] == 2


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


def test_a_full_index_is_an_oserror_of_put_and_leaves_the_cache_consistent(tmp_path: Path) -> None:
    """LMDB's MapFullError (and any index error) reaches callers as the OSError they handle."""
    env = lmdb.open(str(tmp_path / "index"), max_dbs=16, map_size=256 * KiB, sync=False)
    cache = ChunkCache(
        env,
        tmp_path / "cache",
        block_size=MiB,
        limit_bytes=None,
        min_free=0.0,
        max_age=math.inf,
        compression_level=None,
    )
    try:
        stored: list[ChunkKey] = []
        with pytest.raises(OSError) as caught:
            for n in range(100_000):
                ck = ChunkKey("bucket", f"key-{n:06d}-" + "k" * 200, "etag", 0)
                cache.put(ck, b"x")
                stored.append(ck)
        assert caught.value.errno == errno.ENOSPC, caught.value
        assert stored, "the index was full before the first chunk"
        assert cache.get(stored[0]) == b"x" and cache.get(stored[-1]) == b"x"
        assert cache.stats().chunks == len(stored)
        chunk_files = [p for p in (tmp_path / "cache" / "chunks").rglob("*") if p.is_file()]
        assert len(chunk_files) == len(stored), "the refused chunk left its file behind"
    finally:
        cache.close()
        env.close()


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
    always = f"^/{name}/f00"
    flips = [
        Rule("flip", methods={"GET"}, path=always),  # every GET of f00: its read must be EIO
        Rule("flip", 0.3, methods={"GET"}, path=OBJECT_PATH),  # and 30% of the others' GETs
    ]
    with FaultProxy(seaweed.endpoint_url, flips, seed=6) as proxy:
        mount = mounter(f"s3://{name}", endpoint_url=proxy.endpoint_url)
        assert listing(mount) == set(objects)
        good = check_reads(mount, objects, eio_allowed=True)
        assert isinstance(read_or_error(mount.path / "f00"), OSError)
        assert flips[0].fired >= 2, "a body that failed its check was not fetched again"
        assert flips[1].fired > 0
        assert 0 < good < len(objects)

        proxy.set_rules([])
        mount.umount()  # drops the kernel's page cache; tierfs's chunk cache stays
        again = mounter(f"s3://{name}", cache_dir=mount.cache_dir, endpoint_url=proxy.endpoint_url)
        assert check_reads(again, objects, eio_allowed=False) == len(objects)
        assert again.status()["bytes_from_cache"] > 0, "nothing was read back from the chunk cache"
        again.umount()
