"""The cold fetch engine (tierfs/read/engine.py, docs/coldpath.md), on real S3 servers.

- A READ is answered before its cache write: with the cache writer held, the read returns; when
  that write then fails (a full disk), the bytes are dropped, and a later read fetches them again
  and still gets the right bytes.
- Many GETs in flight: the engine's GETs hold no thread, so a burst of cold reads has more in
  flight than the 16 worker threads the old path allowed.
- Under faults in transit (503s, delays past the timeout, bodies cut short) through
  tools/faultproxy.py, every read is the object's bytes or Unavailable, within its time bound,
  and nothing wrong stays in the cache.
- Through a real mount on a full cache disk, small files (OPEN starts their fetch) read right.
- A large file read sequentially through a mount is byte-exact, and the daemon's peak RSS stays
  bounded.
"""

from __future__ import annotations

import errno
import hashlib
import os
import random
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import trio
from mounting import Mounter
from test_chunkcache import Harness
from test_read_faults import Workers, check_reads, fill, listing, put_objects, small_disk  # noqa: F401

from tierfs.cache.chunkcache import ChunkCache
from tierfs.cache.chunkkey import ChunkKey
from tierfs.cache.memory import MemoryTier
from tierfs.cache.stack import Tiers
from tierfs.errors import Unavailable
from tierfs.read.engine import ColdGets
from tierfs.read.hydrator import Hydrator, ObjectVersion
from tierfs.store.objectstore import S3ObjectStore
from tools.faultproxy import OBJECT_PATH, FaultProxy, Rule
from tools.servers import SeaweedFS, s3_client

KiB = 1 << 10
MiB = 1 << 20

pytestmark = pytest.mark.usefixtures("s3_env")  # credentials in the environment, as a mount has them


class HeldDisk(ChunkCache):
    """A real chunk cache whose writes wait until the test lets them go, then fail as a full disk
    would (``fail``) or land: it shows whether a READ waited for its cache write."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.release = threading.Event()
        self.fail = True
        self.writes = 0

    def put_many(self, items: Any, *, protect: Any = ()) -> None:
        self.writes += 1
        if not self.release.wait(30):
            raise AssertionError("the test never released the cache write")
        if self.fail:
            raise OSError(errno.ENOSPC, "No space left on device (held disk)")
        super().put_many(items, protect=protect)


class Rig(Workers):
    """A hydrator with the cold engine over a real S3 server, without FUSE."""

    def __init__(
        self, endpoint_url: str, bucket: str, tmp_path: Path, *, timeout: float = 5.0, retries: int = 2,
        inflight: int = 64, disk: type[ChunkCache] = ChunkCache,
    ) -> None:  # fmt: skip
        self.client = s3_client(endpoint_url)
        self.bucket = bucket
        self.store = S3ObjectStore(bucket, endpoint_url=endpoint_url, timeout=timeout, retries=retries)
        assert self.store.fast_gets, "the cold engine needs awscrt and credentials"
        self.harness = Harness(tmp_path)
        self.disk = disk(self.harness.env, self.harness.root, block_size=MiB, limit_bytes=None, min_free=0.0,
                         max_age=float("inf"), compression_level=None)  # fmt: skip
        self.limiter = trio.CapacityLimiter(8)
        self.hydrator = Hydrator(
            bucket=bucket,
            store=self.store,
            tiers=Tiers([MemoryTier(64 << 20), self.disk]),
            run_s3=self.run_s3,
            run_io=self.run_io,
            block_size=MiB,
            spawn=lambda task: None,
            timeout=timeout,
            cold_gets=ColdGets(
                self.store, limiter=trio.CapacityLimiter(inflight), timeout=timeout, retries=retries
            ),
        )

    def put(self, key: str, body: bytes) -> ObjectVersion:
        etag = self.client.put_object(Bucket=self.bucket, Key=key, Body=body)["ETag"].strip('"')
        return ObjectVersion(int(hashlib.sha1(key.encode()).hexdigest()[:8], 16), key, etag, len(body))

    def close(self) -> None:
        self.hydrator.close()
        self.disk.close()
        self.harness.env.close()


def gets(rig: Rig) -> int:
    return rig.store.requests.get("get_object", 0)


# --------------------------------------------------------------------------- answered before the write


@pytest.fixture
def held(seaweed: SeaweedFS, bucket: Callable[..., str], tmp_path: Path) -> Iterator[tuple[Rig, HeldDisk]]:
    """A rig whose cache writes wait for the test (and then fail, until told otherwise)."""
    rig = Rig(seaweed.endpoint_url, bucket(), tmp_path, disk=HeldDisk)
    assert isinstance(rig.disk, HeldDisk)
    try:
        yield rig, rig.disk
    finally:
        rig.disk.release.set()
        rig.close()


async def test_a_read_is_answered_before_its_cache_write_and_a_failed_write_is_fetched_again(
    held: tuple[Rig, HeldDisk],
) -> None:
    rig, disk = held
    body = random.Random(1).randbytes(110 * KiB)
    obj = rig.put("sample.jpg", body)
    with trio.fail_after(10):  # the cache write is held: only an answer before it can return
        assert await rig.hydrator.read(obj, 0, obj.size) == body
    assert disk.writes <= 1 and not disk.release.is_set()
    # Meanwhile the bytes are served from what the loop kept, without another GET.
    before = gets(rig)
    assert await rig.hydrator.read(obj, 0, 4 * KiB) == body[: 4 * KiB]
    assert gets(rig) == before

    disk.release.set()  # the write now fails, as on a full disk
    with trio.fail_after(10):
        while rig.hydrator.stats.cache_store_failed == 0:
            await trio.sleep(0.01)
    assert rig.hydrator.engine_status()["cold_objects_written"] >= 1
    assert disk.get(rig.hydrator.chunk_key(obj, 0)) is None, "a refused write left a block"
    # Later reads are still right: the kept bytes were dropped, so the object is fetched again
    # (once the file was closed: till then its reader's stream buffer still holds the block).
    rig.hydrator.forget(obj.ino)
    assert await rig.hydrator.read(obj, 0, obj.size) == body
    assert gets(rig) == before + 1

    disk.fail = False  # room again: the next fetch is stored and then served from the disk
    other = rig.put("other.jpg", body[::-1])
    assert await rig.hydrator.read(other, 0, other.size) == body[::-1]
    with trio.fail_after(10):
        while disk.get(rig.hydrator.chunk_key(other, 0)) is None:
            await trio.sleep(0.01)
    assert disk.get(rig.hydrator.chunk_key(other, 0)) == body[::-1]


async def test_a_prefetch_waits_for_the_cache_write_and_reports_a_full_disk(
    held: tuple[Rig, HeldDisk],
) -> None:
    """``tierfs prefetch`` promises residency: it waits for the writer and fails if nothing stayed."""
    rig, disk = held
    obj = rig.put("a", b"x" * (300 * KiB))
    disk.release.set()
    with pytest.raises(OSError) as caught:
        await rig.hydrator.hydrate(obj)
    assert caught.value.errno == errno.ENOSPC
    disk.fail = False
    await rig.hydrator.hydrate(obj)
    assert disk.get(ChunkKey(rig.bucket, obj.key, obj.etag, 0)) == b"x" * (300 * KiB)


# --------------------------------------------------------------------------- many in flight


async def test_a_burst_of_cold_reads_keeps_many_gets_in_flight_and_reads_right_bytes(
    seaweed: SeaweedFS, bucket: Callable[..., str], tmp_path: Path
) -> None:
    rig = Rig(seaweed.endpoint_url, bucket(), tmp_path, inflight=64)
    try:
        rng = random.Random(2)
        bodies = {f"s/{n:03d}": rng.randbytes(rng.randrange(1, 200 * KiB)) for n in range(160)}
        objs = {key: rig.put(key, body) for key, body in bodies.items()}
        got: dict[str, bytes] = {}

        async def read(key: str) -> None:
            got[key] = await rig.hydrator.read(objs[key], 0, objs[key].size)

        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                for key in bodies:
                    nursery.start_soon(read, key)
        assert got == bodies
        status = rig.hydrator.engine_status()
        # The old path held a worker thread per GET, 16 at most; these hold none.
        assert status["s3_gets_in_flight_peak"] > 16, status
        assert status["s3_gets_in_flight"] == 0
        assert gets(rig) == len(bodies)
        with trio.fail_after(10):  # every object is stored, in fewer writes than objects
            while rig.hydrator.engine_status()["cold_objects_written"] < len(bodies):
                await trio.sleep(0.01)
        assert all(rig.disk.get(rig.hydrator.chunk_key(o, 0)) is not None for o in objs.values())
    finally:
        rig.close()


# --------------------------------------------------------------------------- faults in transit


async def test_the_engine_under_503s_delays_and_cut_bodies_gives_right_bytes_or_unavailable(
    seaweed: SeaweedFS, bucket: Callable[..., str], tmp_path: Path
) -> None:
    name = bucket()
    rng = random.Random(4)
    bodies = {f"f/{n:03d}": rng.randbytes(rng.randrange(1, 300 * KiB)) for n in range(80)}
    client = s3_client(seaweed.endpoint_url)
    for key, body in bodies.items():
        client.put_object(Bucket=name, Key=key, Body=body)
    timeout = 2.0
    faults = [
        Rule("error", 0.15, methods={"GET"}, path=OBJECT_PATH, statuses=(503,)),
        Rule("truncate", 0.15, methods={"GET"}, path=OBJECT_PATH),
        Rule("delay", 0.08, methods={"GET"}, path=OBJECT_PATH, delay=(timeout + 0.5, timeout + 1.0)),
        Rule("close", 0.05, methods={"GET"}, path=OBJECT_PATH),
    ]
    with FaultProxy(seaweed.endpoint_url, faults, seed=7) as proxy:
        rig = Rig(proxy.endpoint_url, name, tmp_path, timeout=timeout, retries=2)
        try:
            etags = {k: client.head_object(Bucket=name, Key=k)["ETag"].strip('"') for k in bodies}
            objs = {k: ObjectVersion(n + 1, k, etags[k], len(b)) for n, (k, b) in enumerate(bodies.items())}
            results: dict[str, bytes | Exception] = {}
            took: dict[str, float] = {}

            async def read(key: str) -> None:
                started = trio.current_time()
                try:
                    results[key] = await rig.hydrator.read(objs[key], 0, objs[key].size)
                except Unavailable as exc:
                    results[key] = exc
                took[key] = trio.current_time() - started

            async with trio.open_nursery() as nursery:
                for key in bodies:
                    nursery.start_soon(read, key)
            good = [k for k, v in results.items() if isinstance(v, bytes)]
            for key, value in results.items():
                if isinstance(value, bytes):
                    assert value == bodies[key], f"{key}: wrong bytes under faults"
            # Each fetch is bounded: 2 x timeout (an integrity retry included), plus slack for load.
            assert max(took.values()) <= 2 * timeout + 3.0, max(took.values())
            assert len(good) >= len(bodies) // 2, f"only {len(good)} of {len(bodies)} reads succeeded"
            assert {"error", "truncate", "delay"} <= set(proxy.counts), proxy.counts
            # Nothing wrong stayed: with the faults gone, every object reads right (cache or origin).
            proxy.set_rules([])
            await trio.sleep(1.1)  # past the memory of failed fetches
            for key, obj in objs.items():
                assert await rig.hydrator.read(obj, 0, obj.size) == bodies[key]
        finally:
            rig.close()


# --------------------------------------------------------------------------- through a mount


def test_small_files_read_right_through_a_mount_on_a_full_cache_disk(
    small_disk: Path,  # noqa: F811
    seaweed: SeaweedFS,
    bucket: Callable[..., str],
    mounter: Mounter,
) -> None:
    name = bucket()
    objects = put_objects(s3_client(seaweed.endpoint_url), name, tuple(110 * KiB for _ in range(24)), 8)
    mount = mounter(f"s3://{name}", cache_dir=small_disk / "cache")
    assert listing(mount) == set(objects)
    assert fill(small_disk) > 0
    assert check_reads(mount, objects, eio_allowed=False) == len(objects)
    status = mount.status()
    assert status["cache_store_failed"] > 0, "nothing failed to be stored: the disk was not full"
    assert status["cold_objects_written"] >= len(objects)  # the cold engine fetched them
    mount.umount()


def test_a_large_file_read_sequentially_is_byte_exact_with_bounded_memory(
    seaweed: SeaweedFS, bucket: Callable[..., str], mounter: Mounter
) -> None:
    name = bucket()
    size = 96 * MiB + 12345
    body = random.Random(9).randbytes(size)
    s3_client(seaweed.endpoint_url).put_object(Bucket=name, Key="model.bin", Body=body)
    mount = mounter(f"s3://{name}")
    digest = hashlib.sha256()
    read = 0
    with open(mount.path / "model.bin", "rb", buffering=0) as f:
        while chunk := f.read(MiB):
            assert chunk == body[read : read + len(chunk)], f"wrong bytes at {read}"
            digest.update(chunk)
            read += len(chunk)
    assert read == size and digest.digest() == hashlib.sha256(body).digest()
    pid = mount.status()["pid"]
    peak_kib = next(
        int(line.split()[1]) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
        if line.startswith("VmHWM:")
    )  # fmt: skip
    assert peak_kib < 300 * 1024, f"daemon peak RSS {peak_kib >> 10} MiB"
    mount.umount()


def test_open_starts_the_fetch_of_a_small_file(
    seaweed: SeaweedFS, bucket: Callable[..., str], mounter: Mounter
) -> None:
    """OPEN fetches a small object whole, so an open without a read still warms it."""
    name = bucket()
    body = os.urandom(50 * KiB)
    s3_client(seaweed.endpoint_url).put_object(Bucket=name, Key="one", Body=body)
    mount = mounter(f"s3://{name}")
    assert listing(mount) == {"one"}
    fd = os.open(mount.path / "one", os.O_RDONLY)
    try:
        deadline = time.monotonic() + 10
        while mount.status()["s3_get_requests"] < 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert mount.status()["s3_get_requests"] == 1, "OPEN did not start the fetch"
        assert os.pread(fd, len(body), 0) == body
        assert mount.status()["s3_get_requests"] == 1, "the READ fetched it a second time"
    finally:
        os.close(fd)
    mount.umount()
