"""Read-ahead of sequential readers (tierfs/read/hydrator.py, docs/coldpath.md "Large sequential
reads"), in process over moto: a Hydrator as the daemon builds it (read-ahead tasks spawned, the
cache writer on), over a store that records every GET's range.

- A stream's GETs start small (the first READ's 2 MiB) and double up to ``max_run`` blocks.
- Every byte read is the object's; what was fetched ahead is kept for the stream, not in the
  memory tier, and all of it is let go when the file is closed.
- All streams together never hold more than the read-ahead budget ahead of their readers.
- A stream whose reader went idle gives its buffer up to a stream that needs the budget.
- An object of at most ``max_run`` blocks read from its start is one GET (its checksum covers it).
"""

from __future__ import annotations

import functools
import random
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
import trio
from test_chunkcache import Harness

from tierfs.cache.memory import MemoryTier
from tierfs.cache.stack import Tiers
from tierfs.read import hydrator as hydrator_module
from tierfs.read.engine import ColdGets
from tierfs.read.hydrator import Hydrator, ObjectVersion
from tierfs.store.faultstore import FaultStore
from tierfs.store.objectstore import GetResult, S3ObjectStore
from tools.servers import MotoS3, s3_client

MiB = 1 << 20
KiB = 1 << 10
BUDGET = 24 * MiB  # small, so that a few MiB of reading reaches it (yet three 8 MiB GETs fit)


class RangeLog(FaultStore):
    """Records (key, start, length) of every GET."""

    gets: list[tuple[str, int, int]]

    def get_range(self, key: str, start: int, length: int, *args: Any, **kw: Any) -> GetResult:
        self.gets.append((key, start, length))
        return super().get_range(key, start, length, *args, **kw)


class Streams:
    def __init__(self, moto: MotoS3, bucket: str, home: Path, nursery: trio.Nursery) -> None:
        self.client = s3_client(moto.endpoint_url)
        self.bucket = bucket
        self.store = RangeLog(S3ObjectStore(bucket, endpoint_url=moto.endpoint_url, timeout=10.0, retries=0))
        self.store.gets = []
        self.cache = Harness(home).open(block_size=MiB)
        self.memory = MemoryTier(64 << 20)
        limiter = trio.CapacityLimiter(8)

        async def run_s3(fn: Callable[..., Any], *args: Any) -> Any:
            return await trio.to_thread.run_sync(functools.partial(fn, *args), limiter=limiter)

        async def run_io(fn: Callable[..., Any], *args: Any) -> Any:
            return await trio.to_thread.run_sync(functools.partial(fn, *args))

        self.hydrator = Hydrator(
            bucket=bucket, store=self.store, tiers=Tiers([self.memory, self.cache]), run_s3=run_s3,
            run_io=run_io, block_size=MiB, spawn=nursery.start_soon, timeout=10.0,
            cold_gets=ColdGets(self.store, limiter=trio.CapacityLimiter(8), timeout=10.0, retries=0),
        )  # fmt: skip

    def put(self, key: str, body: bytes, ino: int) -> ObjectVersion:
        etag = self.client.put_object(Bucket=self.bucket, Key=key, Body=body)["ETag"].strip('"')
        return ObjectVersion(ino, key, etag, len(body))

    def ahead(self) -> int:
        return self.hydrator.engine_status()["read_ahead_bytes"]

    async def stream(
        self, obj: ObjectVersion, body: bytes, start: int, end: int, step: int = 256 * KiB
    ) -> None:
        """Read [start, end) of ``obj`` in ``step`` READs, checking each against ``body`` and the
        budget after each."""
        for offset in range(start, end, step):
            assert await self.hydrator.read(obj, offset, step) == body[offset : offset + step]
            # The budget bounds read-ahead; a reader's own block and the pair its first miss
            # fetched come on top of it (at most 2 MiB per stream; two streams here at most).
            assert self.ahead() <= BUDGET + 4 * MiB, self.hydrator.engine_status()

    def gets_of(self, key: str) -> list[tuple[int, int]]:
        return [(start, length) for k, start, length in self.store.gets if k == key]


@pytest.fixture
async def streams(
    moto: MotoS3, bucket: Callable[..., str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, s3_env: None
) -> AsyncIterator[Streams]:
    monkeypatch.setattr(hydrator_module, "READ_AHEAD_BUDGET", BUDGET)
    async with trio.open_nursery() as nursery:
        made = Streams(moto, bucket(moto), tmp_path, nursery)
        try:
            yield made
        finally:
            made.hydrator.close()
            made.cache.close()
            nursery.cancel_scope.cancel()


async def test_a_stream_reads_right_in_growing_gets_and_lets_its_buffer_go(streams: Streams) -> None:
    body = random.Random(1).randbytes(48 * MiB + 77)
    obj = streams.put("shard", body, ino=10)
    await streams.stream(obj, body, 0, obj.size)
    gets = streams.gets_of("shard")
    assert gets[0] == (0, 2 * MiB), gets  # the first READ: its aligned pair of blocks, soon
    lengths = [length for _, length in gets]
    # then GETs that grow (a block already in flight is left out of the next one) to max_run
    biggest = streams.hydrator.max_run * MiB
    assert max(lengths) == biggest and lengths.count(biggest) >= 2, gets
    covered = sorted(gets)
    assert covered[0][0] == 0 and sum(length for _, length in covered) == obj.size, covered  # no byte twice
    # The stream's blocks never went through the memory tier: a long read must not flush it.
    assert not any(streams.memory.contains(streams.hydrator.chunk_key(obj, i)) for i in range(49))
    streams.hydrator.forget(obj.ino)  # the last close
    assert streams.ahead() == 0


async def test_an_object_of_at_most_max_run_blocks_is_one_get_from_its_start(streams: Streams) -> None:
    body = random.Random(2).randbytes(5 * MiB + 3)
    obj = streams.put("small-shard", body, ino=11)
    await streams.stream(obj, body, 0, obj.size)
    assert streams.gets_of("small-shard") == [(0, obj.size)]


async def test_an_idle_stream_gives_its_buffer_to_one_that_reads(streams: Streams) -> None:
    first_body = random.Random(3).randbytes(40 * MiB)
    second_body = random.Random(4).randbytes(40 * MiB)
    first = streams.put("first", first_body, ino=12)
    second = streams.put("second", second_body, ino=13)
    await streams.stream(first, first_body, 0, 4 * MiB)
    with trio.fail_after(20):  # its read-ahead has landed in its buffer (and, later, on disk)
        while streams.hydrator.gets.now or streams.ahead() < 2 * MiB:
            await trio.sleep(0.05)
    await trio.sleep(hydrator_module.IDLE_STREAM + 0.2)  # the first reader went quiet
    await streams.stream(second, second_body, 0, 12 * MiB)
    assert max(length for _, length in streams.gets_of("second")) >= 4 * MiB  # it read ahead
    # The first stream's buffer was given up for it: resuming, the first reader finds its next
    # blocks on disk (the cache writer stored them), not in a buffer, and still reads right.
    disk = streams.hydrator.tiers.reads.status()["disk_hits"]
    await streams.stream(first, first_body, 4 * MiB, 6 * MiB)
    assert streams.hydrator.tiers.reads.status()["disk_hits"] > disk
