"""The hydrator: turns (object version, offset, length) into bytes.

Lookup order for every block is the cache tiers' (``tierfs.cache.stack.Tiers``): memory (on
the loop), then the local disk tier (a worker thread), then, inside the fetch of a missing run,
the shared tier (``tierfs.cache.shared``, with its own short timeout), then the origin. Misses
are fetched as
*runs* of consecutive blocks in one ranged GET, so the request size is decoupled from
the 1 MiB cache granularity: a cold 110 KiB sample is one GET, a sequential reader's
GETs start at ``first_run_blocks`` MiB and double up to ``max_run_blocks`` MiB.

Invariants:
- Every GET carries ``If-Match: <etag captured at open>``. A handle therefore reads
  one version of an object; if the object changed in the bucket, uncached blocks fail
  with EIO instead of mixing versions (docs/consistency.md).
- A block is fetched at most once at a time: concurrent readers of the same block wait
  for the one fetch in flight (``_inflight``) and take its bytes or its error from it.
- Bounded waits: every fetch has a deadline of ``2 x timeout`` (the store's own per-call
  bound, ``--timeout``), covering the wait for an S3 slot, the GET and one integrity retry,
  and a reader waiting on someone else's fetch waits no longer than that fetch's deadline.
  A fetch that failed is remembered for ``FAILURE_MEMORY`` seconds, so the kernel's
  immediate re-ask for the same pages fails at once instead of doubling the caller's wait.
- Integrity: a body that fails the store's checksum (IntegrityError) or has the wrong
  length is never cached or served; the run is fetched once more, then the read fails.
- The cache is an optimisation, never a reason to fail a read: when storing a fetched
  block fails (ENOSPC, an LMDB map or disk error) the bytes are served uncached and
  ``cache_store_failed`` counts it. A shared tier that is down, slow or full is a miss.
- Hits are counted once, here (``HydratorStats``); the shared tier counts its own.
- Sequential readers are detected per inode; the read-ahead window doubles per sequential
  READ up to ``max_window_blocks``, and is fetched by background tasks in GETs that double
  in size up to ``max_run`` blocks (docs/coldpath.md, "Large sequential reads"). What is
  fetched ahead waits in the stream's own buffer (``_SeqState.ahead``) until its reader
  passes it, not in the memory tier; all streams together hold at most
  ``READ_AHEAD_BUDGET`` bytes ahead (in flight or buffered), so memory stays bounded however
  many run, and a stream never flushes the hot tier.
- A READ is never answered after its cache write: with the cold engine's writer, every fetch
  (the CRT's and the worker threads') queues its blocks for the writer after the answer.
- Nothing here blocks the trio loop: S3 and disk I/O run in worker threads, except the GETs of
  the cold engine (``read/engine.py``, docs/coldpath.md): a run the CRT takes is sent from the
  loop with no thread waiting on it, answered before its cache write, and stored by the
  engine's cache-writer thread; its blocks stay in ``_unstored`` until that write lands.
"""

from __future__ import annotations

import errno
import functools
import logging
import math
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import trio

from ..cache.chunkkey import ChunkKey
from ..cache.stack import Tiers
from ..errors import IntegrityError, StoreError, Unavailable
from ..store.objectstore import GetResult, ObjectInfo, ObjectStore
from .engine import Accepted, CacheWriter, ColdGets, GetGauge, WriteJob

log = logging.getLogger(__name__)

RunBlocking = Callable[..., Awaitable[Any]]


@dataclass(frozen=True)
class ObjectVersion:
    """One version of one object, as captured when a file was opened."""

    ino: int
    key: str
    etag: str
    size: int
    # A snapshot's pinned version on a versioned bucket (docs/snapshots.md): GETs ask for it by id,
    # so it stays readable after an overwrite or delete. Cache blocks stay keyed by the ETag.
    version_id: str = ""


@dataclass
class HydratorStats:
    cache_hits: int = 0
    cache_misses: int = 0
    bytes_from_cache: int = 0
    bytes_from_s3: int = 0
    s3_get_requests: int = 0
    prefetched_blocks: int = 0
    partial_reads: int = 0  # random reads served from a few pages of a disk-cached block
    cache_store_failed: int = 0  # fetched blocks served uncached: the cache could not store them
    integrity_retries: int = 0  # GETs refused by their checksum or length check and fetched again
    errors: int = 0


@dataclass
class _SeqState:
    """One sequential reader of one inode: where it is, its read-ahead window, and the blocks
    fetched ahead of it that it has not read yet (index -> (chunk digest, bytes)). Those stay
    here, not in the memory tier: a stream reads each block once (the page cache keeps it after),
    and a 2 GiB model load must not flush the hot tier of small files. The digest ties a block
    to the version that was read ahead, so a new version never gets an old version's bytes."""

    next_offset: int = -1
    window: int = 0
    ahead_until: int = -1  # last block index already scheduled for read-ahead
    run: int = 0  # blocks in the stream's last read-ahead GET (each one doubles, to max_run)
    last_read: float = 0.0  # trio clock of the stream's last READ
    ahead: dict[int, tuple[bytes, bytes]] = field(default_factory=dict)


@dataclass(eq=False)  # compared and hashed by identity
class _Flight:
    """One ranged GET in progress, registered under the digest of each block it fetches.

    Readers of those blocks wait on ``done`` (never past ``deadline``) and then take the
    bytes or the error from here, not from the memory LRU or the disk: those may not hold
    the blocks (evicted, or a full disk), and refetching them would make the wait unbounded.
    """

    deadline: float
    done: trio.Event = field(default_factory=trio.Event)
    blocks: dict[int, bytes] = field(default_factory=dict)
    error: StoreError | None = None


@dataclass(eq=False)
class _Unstored:
    """Blocks answered to their readers whose cache write has not landed yet: reads take them from
    here meanwhile, and a prefetch waits on ``stored`` before it checks that they are resident."""

    blocks: dict[bytes, bytes]
    stored: trio.Event = field(default_factory=trio.Event)


class _WriteAfterAnswer:
    """The cache write of one fetched run, queued for the cache writer after its readers were
    answered (docs/coldpath.md). Made on the loop before the GET; ``job`` on the thread that has
    the bytes; ``hold`` on the loop once the answer is there. Until the write lands the blocks
    stay in the hydrator's ``_unstored``, where reads take them and a prefetch waits on them.
    The write may land before the loop resumes the fetch (then nothing is held)."""

    def __init__(self, hydrator: Hydrator, obj: ObjectVersion, run: list[int]) -> None:
        self._hydrator = hydrator
        self._obj = obj
        self._blocks = len(run)
        self._token = trio.lowlevel.current_trio_token()
        self._pending: _Unstored | None = None
        self._landed = False

    def job(self, items: list[tuple[ChunkKey, bytes]], fill_shared: list[tuple[ChunkKey, bytes]],
            learn: tuple[int, ObjectInfo] | None) -> WriteJob:  # fmt: skip
        return WriteJob(items, fill_shared, learn, self._stored, self._token)

    def hold(self, blocks: dict[bytes, bytes]) -> None:  # on the loop, with the answer
        if not self._landed:
            self._pending = _Unstored(blocks)
            self._hydrator._unstored.update(dict.fromkeys(blocks, self._pending))

    def _stored(self, error: str | None) -> None:  # on the loop, once the cache write is done
        self._landed = True
        pending = self._pending
        if pending is not None:
            unstored = self._hydrator._unstored
            for digest in pending.blocks:
                if unstored.get(digest) is pending:
                    del unstored[digest]
            pending.stored.set()
        if error is not None:
            self._hydrator._note_store_failure(self._obj, self._blocks, error)


@dataclass(frozen=True)
class _Fetched:
    """What the worker thread hands back: the blocks, and why the cache could not store them."""

    blocks: dict[int, bytes]
    store_error: str | None
    origin_gets: int = 0  # ranged GETs sent to the origin (none when the shared tier had the run)
    origin_bytes: int = 0


def _again(error: StoreError) -> StoreError:
    """A fresh copy of an error that one fetch hands to several readers: re-raising one instance
    from many tasks would keep extending its traceback. The class (EIO, ENOENT...) is kept."""
    try:
        copy = type(error)(*error.args)
    except TypeError:  # a subclass with another constructor
        return Unavailable(str(error))
    copy.__cause__ = error.__cause__
    return copy


def contiguous_runs(indices: list[int], max_run: int) -> list[list[int]]:
    """Split block indices into sorted runs of consecutive blocks, each at most ``max_run`` long.

    A ranged GET covers one run; handing it a list with a gap would put each block's
    neighbour's bytes in its place, so every fetch goes through here.
    """
    runs: list[list[int]] = []
    for i in sorted(set(indices)):
        if runs and runs[-1][-1] == i - 1 and len(runs[-1]) < max_run:
            runs[-1].append(i)
        else:
            runs.append([i])
    return runs


# Objects up to this size are read from the disk cache on the trio thread (see _from_disk):
# small file I/O, like the LMDB reads the loop already does, not the big I/O kept off it.
LOOP_READ_MAX = 256 * 1024
# After a failed fetch the kernel asks again for the same pages within milliseconds (the
# read-ahead request failed, then the reader's own page read). Answering that re-ask from
# memory keeps a frozen server's EIO within one fetch deadline per caller; a second later,
# a new read tries the server again.
FAILURE_MEMORY = 1.0
FAILURES_KEPT = 4096  # bound on remembered failures (one entry per block)
# A round (disk, then fetch or wait) leaves blocks missing only if a fetch it waited on was
# cancelled; a bound on rounds keeps even that from looping, and each round is bounded in time.
MAX_ROUNDS = 3
#: Bytes fetched ahead of sequential readers and not read yet, over all of them: read-ahead
#: stops scheduling past it until readers catch up, so memory stays bounded however many
#: streams run at once (mountpoint-s3's and gcsfuse's prefetchers have such a budget too).
READ_AHEAD_BUDGET = 64 << 20
#: A stream whose reader has not read for this long gives up its buffer when another stream needs
#: the budget (a loader that keeps a shard open while it reads others must not starve them).
IDLE_STREAM = 2.0
#: A prefetch (``hydrate``) fetches a file in runs of this many blocks, one run at a time per file:
#: ``tierfs prefetch --jobs 16`` then holds at most 16 such runs in memory.
FILL_RUN_BLOCKS = 8
MetadataSink = Callable[[int, ObjectInfo], None]  # (ino, info) -> None, blocking, called in a thread


class Hydrator:
    def __init__(
        self,
        *,
        bucket: str,
        store: ObjectStore,
        tiers: Tiers,
        run_s3: RunBlocking,
        run_io: RunBlocking,
        block_size: int,
        spawn: Callable[[Callable[[], Awaitable[None]]], None],
        learn_metadata: MetadataSink | None = None,
        first_run_blocks: int = 2,
        max_run_blocks: int = 8,
        max_window_blocks: int = 64,
        max_parallel_runs: int = 16,
        timeout: float | None = None,
        cold_gets: ColdGets | None = None,
    ) -> None:
        """``timeout`` is the store's bound on one call (``--timeout``); a fetch then gets
        ``2 x timeout`` in total, slot wait and integrity retry included. None: the store's
        own ``timeout`` attribute (S3ObjectStore has one), else no bound of our own."""
        self.bucket = bucket
        self.store = store
        self.tiers = tiers
        self._run_s3 = run_s3
        self._run_io = run_io
        self.block_size = block_size
        self._spawn = spawn
        self._learn = learn_metadata
        self.first_run = first_run_blocks
        self.max_run = max_run_blocks
        self.max_window = max_window_blocks
        self.max_parallel_runs = max_parallel_runs
        self.stats = HydratorStats()
        self.gets = GetGauge()
        bound = timeout if timeout is not None else getattr(store, "timeout", None)
        self.timeout = float(bound) if isinstance(bound, int | float) and bound > 0 else math.inf
        self._inflight: dict[bytes, _Flight] = {}
        self._failed: OrderedDict[bytes, tuple[float, StoreError]] = OrderedDict()  # digest -> (until, error)
        self._seq: dict[int, _SeqState] = {}
        self._ahead_bytes = 0  # bytes in every _SeqState.ahead, and read-ahead GETs in flight
        # The cold engine (read/engine.py): GETs the CRT takes are sent from the loop, answered
        # before their cache write, and stored by one writer thread in batches. Not with a shared
        # tier, whose lookups are blocking and belong in a worker thread (_fetch_run_blocking).
        self._cold = cold_gets if cold_gets is not None and not tiers.shared else None
        # Every fetch's cache write goes to the writer, the worker-thread path's (large runs, the
        # shared tier) too: a READ is never answered after its cache write.
        self._writer = CacheWriter(tiers, learn_metadata) if cold_gets is not None else None
        self._unstored: dict[bytes, _Unstored] = {}

    def engine_status(self) -> dict[str, int]:
        """The cold engine's counters: GETs in flight (now, peak), the cache writes it batched, and
        the bytes read ahead of sequential readers (in flight or buffered; READ_AHEAD_BUDGET)."""
        writer = self._writer
        return {
            "s3_gets_in_flight": self.gets.now,
            "s3_gets_in_flight_peak": self.gets.peak,
            "cold_cache_writes": writer.batches if writer else 0,
            "cold_objects_written": writer.objects if writer else 0,
            "read_ahead_bytes": self._ahead_bytes,
        }

    def close(self) -> None:
        """Store what the cache writer still holds (before the tiers close)."""
        if self._writer is not None:
            self._writer.close()

    # -- public ---------------------------------------------------------------------------------------

    def chunk_key(self, obj: ObjectVersion, index: int) -> ChunkKey:
        return ChunkKey(self.bucket, obj.key, obj.etag, index)

    def block_count(self, obj: ObjectVersion) -> int:
        return (obj.size + self.block_size - 1) // self.block_size

    async def read(self, obj: ObjectVersion, offset: int, length: int) -> bytes:
        end = min(offset + length, obj.size)
        if offset >= end:
            return b""
        first, last = offset // self.block_size, (end - 1) // self.block_size
        streaming = self._note_access(obj, offset, end, last) or offset == 0
        if first == last and not streaming:
            part = await self._part_from_disk(obj, first, offset, end)
            if part is not None:
                return part
        # A small object read whole in one request now sits in the kernel's page cache (the
        # handle keeps it across opens while its version is unchanged): a copy in the memory
        # tier would only push out blocks that are still useful, and cost a put per file.
        whole_small = offset == 0 and end == obj.size <= LOOP_READ_MAX
        state = self._seq.get(obj.ino) if streaming else None
        blocks = await self.blocks(
            obj, range(first, last + 1), widen=streaming, remember=not whole_small and state is None
        )
        if state is not None:
            # The blocks before this READ's last one are read; the next READ starts in that one.
            self._keep_ahead(obj, {last: blocks[last]})
            self._drop_ahead(state, last)
        if first == last:
            base = first * self.block_size
            return blocks[first][offset - base : end - base]
        data = b"".join(blocks[i] for i in range(first, last + 1))
        base = first * self.block_size
        return data[offset - base : end - base]

    async def blocks(
        self, obj: ObjectVersion, indices: range | list[int], *, widen: bool = False, remember: bool = True
    ) -> dict[int, bytes]:
        """Return the requested blocks, fetching whatever no cache holds.

        With ``widen`` (a sequential reader), a miss fetches its whole aligned segment
        of ``first_run`` blocks in one GET, so the kernel's concurrent read-ahead requests
        for the neighbouring blocks wait on that GET instead of each sending their own; the
        stream's read-ahead fetches past it in growing GETs.
        Without ``remember``, blocks read from the disk tier or fetched are not copied into memory.
        Each block's ChunkKey is made once here, so its digest is computed once per read.
        """
        cks = {i: self.chunk_key(obj, i) for i in indices}
        out: dict[int, bytes] = {}
        missing: list[int] = []
        stream = self._seq.get(obj.ino)
        ahead = stream.ahead if stream is not None else {}
        for i, ck in cks.items():
            data = self.tiers.from_memory(ck)
            if data is None and ahead:
                kept = ahead.get(i)
                data = kept[1] if kept is not None and kept[0] == ck.digest() else None
            if data is None and self._unstored:
                data = self._from_unstored(ck)
            if data is not None:
                out[i] = data
            else:
                missing.append(i)
        if out:
            self.stats.cache_hits += len(out)
            self.stats.bytes_from_cache += sum(len(b) for b in out.values())
            self.tiers.touch_local([cks[i] for i in out])
        for _ in range(MAX_ROUNDS):
            missing = await self._from_disk(obj, missing, out, cks, remember=remember)
            if not missing:
                return out
            missing = await self._fetch_missing(obj, missing, out, widen=widen, remember=remember)
            if not missing:
                return out
        raise Unavailable(f"GET {obj.key}: blocks {missing[:4]} still missing after {MAX_ROUNDS} fetches")

    async def hydrate(self, obj: ObjectVersion, on_bytes: Callable[[int], None] | None = None) -> None:
        """Make every block of ``obj`` resident in the local tiers (``tierfs prefetch``), taking it
        from the shared tier where that has it, and filling the shared tier with what came from the
        origin, so a prefetch on one node warms every node.

        Raises OSError(ENOSPC) if the cache could not keep the blocks: a prefetch that left
        nothing resident must not report success."""
        total = self.block_count(obj)
        step = FILL_RUN_BLOCKS
        for start in range(0, total, step):
            indices = range(start, min(start + step, total))
            # Blocks a READ fetched moments ago may still be on their way to the cache writer:
            # wait for those writes first, so that what counts as resident is the index.
            await self.settled(obj, indices)
            todo = self._not_indexed(obj, indices)
            if todo:
                await self._fetch_blocks(obj, todo, remember=False)  # residency on disk is the point
                await self.settled(obj, todo)
                if self._not_indexed(obj, todo):
                    raise OSError(errno.ENOSPC, f"the chunk cache could not store {obj.key}")
            if on_bytes is not None:
                on_bytes(min(obj.size, (start + step) * self.block_size) - start * self.block_size)

    def forget(self, ino: int) -> None:
        state = self._seq.pop(ino, None)
        if state is not None:
            self._drop_ahead(state, self._ALL)

    def start_fetch(self, obj: ObjectVersion) -> None:
        """OPEN of a small object: fetch it whole now, so its first READ finds the GET in flight
        (or done) instead of starting it one kernel round trip later."""
        if self._cold is None or not 0 < obj.size <= LOOP_READ_MAX or not obj.etag:
            return
        ck = self.chunk_key(obj, 0)
        if self._held_or_coming(ck) or self._failed.get(ck.digest(), (0.0,))[0] > trio.current_time():
            return

        async def fetch() -> None:
            if self._held_or_coming(ck):  # the READ ran between OPEN and this task: its fetch is the one
                return
            try:
                await self._fetch_blocks(obj, [0], remember=False)
            except StoreError as exc:  # the READ gets it from the remembered failure
                log.debug("fetch at open of %s failed: %s", obj.key, exc)

        self._spawn(fetch)

    # -- internals ------------------------------------------------------------------------------------

    def _held_or_coming(self, ck: ChunkKey) -> bool:
        """Whether a block needs no new fetch: a GET of it is in flight, its answer waits for the
        cache writer, or a tier on this node holds it (index lookups only; on the loop)."""
        digest = ck.digest()
        return (
            digest in self._inflight
            or digest in self._unstored
            or self.tiers.in_memory(ck)
            or self.tiers.held_locally(ck)
        )

    def _not_indexed(self, obj: ObjectVersion, indices: range | list[int]) -> list[int]:
        """The blocks no local tier holds.

        An index lookup is a few microseconds of LMDB read, so it runs here on the loop;
        a thread hop is paid only where there is a block file to read.
        """
        return [
            i
            for i in indices
            if (ck := self.chunk_key(obj, i)).digest() not in self._unstored
            and not self.tiers.held_locally(ck)
        ]

    def _from_unstored(self, ck: ChunkKey) -> bytes | None:
        digest = ck.digest()
        pending = self._unstored.get(digest)
        return None if pending is None else pending.blocks.get(digest)

    async def settled(self, obj: ObjectVersion, indices: range | list[int]) -> None:
        """Wait (within one fetch deadline) until the cache writes of these blocks landed or failed.

        The cold engine answers reads before it stores their blocks: a caller that promises
        residency (``hydrate``, a hinted fetch) waits here before it checks the index."""
        with trio.move_on_after(2 * self.timeout if math.isfinite(self.timeout) else 60.0):
            for i in indices:
                pending = self._unstored.get(self.chunk_key(obj, i).digest())
                if pending is not None:
                    await pending.stored.wait()

    async def _part_from_disk(self, obj: ObjectVersion, index: int, offset: int, end: int) -> bytes | None:
        """A random read of part of a block that only the disk cache holds: read and check just
        the pages it covers (a 128 KiB pread then costs 128 KiB of disk, not 1 MiB), and keep it
        out of memory. None sends the read down the whole-block path (memory, disk, S3)."""
        base = index * self.block_size
        if end - offset >= min(self.block_size, obj.size - base):
            return None  # the whole block is wanted anyway
        ck = self.chunk_key(obj, index)
        if self.tiers.in_memory(ck) or not self.tiers.held_locally(ck):
            return None
        data: bytes | None = await self._run_io(
            lambda: self.tiers.get_local_range(ck, offset - base, end - offset)
        )
        if data is None or len(data) != end - offset:
            return None
        self.stats.cache_hits += 1
        self.stats.partial_reads += 1
        self.stats.bytes_from_cache += len(data)
        return data

    async def _from_disk(
        self,
        obj: ObjectVersion,
        missing: list[int],
        out: dict[int, bytes],
        cks: dict[int, ChunkKey],
        *,
        remember: bool = True,
    ) -> list[int]:
        """Read the ``missing`` blocks the disk tier holds into ``out``; returns those still missing."""
        if not missing:
            return missing
        if obj.size <= LOOP_READ_MAX:
            # A small object's one block is read right here: a thread hop costs more CPU than the
            # read (four context switches; measured +45% warm small files/s on 2 vCPUs). Bigger
            # reads keep to the I/O threads, where concurrent readers overlap their disk waits.
            # get_local answers None for a block the index lacks, so no index lookup goes first.
            found = {i: self.tiers.get_local(cks[i]) for i in missing}
        else:
            indexed = [i for i in missing if self.tiers.held_locally(cks[i])]
            if not indexed:
                return missing  # a miss makes no thread hop (index lookups run on the loop)
            found = await self._run_io(lambda: {i: self.tiers.get_local(cks[i]) for i in indexed})
        still: list[int] = []
        hits: list[tuple[ChunkKey, bytes]] = []
        for i in missing:
            data = found.get(i)
            if data is None:
                still.append(i)
                continue
            out[i] = data
            hits.append((cks[i], data))
            self.stats.bytes_from_cache += len(data)
        self.stats.cache_hits += len(hits)
        if remember and hits:
            self.tiers.remember(hits)
        return still

    async def _fetch_missing(
        self,
        obj: ObjectVersion,
        missing: list[int],
        out: dict[int, bytes],
        *,
        widen: bool = False,
        remember: bool = True,
    ) -> list[int]:
        """Fetch runs of missing blocks in parallel; blocks already in flight are awaited, not refetched.

        A waited-for fetch hands over its bytes or its error, and is waited for no longer than
        its own deadline. Returns the blocks still missing (none in practice: every fetch
        hands over all of its blocks or an error; see MAX_ROUNDS).
        """
        self._raise_recent_failure(obj, missing)
        waits: dict[int, _Flight] = {}
        todo: list[int] = []
        for i in missing:
            flight = self._inflight.get(self.chunk_key(obj, i).digest())
            if flight is not None:
                waits[i] = flight
            else:
                todo.append(i)
        wanted = self._segments_of(obj, todo) if widen else todo
        results = await self._fetch_blocks(obj, wanted, remember=remember)
        if widen:
            self._keep_ahead(obj, {i: results[i] for i in wanted if i in results and i not in missing})
        for waited in dict.fromkeys(waits.values()):
            await self._wait(obj, waited)
        still: list[int] = []
        for i in missing:
            data = results.get(i)
            flight = waits.get(i)
            if data is None and flight is not None:
                if flight.error is not None:
                    raise _again(flight.error)
                data = flight.blocks.get(i)
            if data is None:
                still.append(i)
            else:
                out[i] = data
        return still

    async def _wait(self, obj: ObjectVersion, flight: _Flight) -> None:
        """Wait for another task's fetch, never past the deadline that fetch itself has."""
        with trio.move_on_at(flight.deadline):
            await flight.done.wait()
        if not flight.done.is_set():
            budget = 2 * self.timeout
            raise Unavailable(f"GET {obj.key}: the fetch it waited on got no answer within {budget:g} s")

    def _raise_recent_failure(self, obj: ObjectVersion, indices: list[int]) -> None:
        """Fail at once for a block whose fetch failed less than FAILURE_MEMORY seconds ago."""
        if not self._failed:
            return
        now = trio.current_time()
        while self._failed:
            oldest = next(iter(self._failed.values()))
            if oldest[0] > now:
                break
            self._failed.popitem(last=False)
        for i in indices:
            remembered = self._failed.get(self.chunk_key(obj, i).digest())
            if remembered is not None:
                raise _again(remembered[1])

    def _remember_failure(self, digests: list[bytes], error: StoreError) -> None:
        until = trio.current_time() + FAILURE_MEMORY
        for digest in digests:
            self._failed.pop(digest, None)
            self._failed[digest] = (until, error)
        while len(self._failed) > FAILURES_KEPT:
            self._failed.popitem(last=False)

    def _segments_of(self, obj: ObjectVersion, indices: list[int]) -> list[int]:
        """``indices`` plus the rest of their aligned segments that nothing holds or fetches yet.

        An object of at most ``max_run`` blocks is one segment: fetched whole in one GET, its
        body is checked against the object's checksum or MD5 ETag (ranged GETs have none)."""
        wanted = set(indices)
        total = self.block_count(obj)
        unit = self.max_run if total <= self.max_run else self.first_run
        for base in {i - i % unit for i in indices}:
            for j in range(base, min(base + unit, total)):
                if j in wanted:
                    continue
                if not self._held_or_coming(self.chunk_key(obj, j)):
                    wanted.add(j)
        return sorted(wanted)

    async def _fetch_blocks(
        self, obj: ObjectVersion, indices: list[int], *, remember: bool = True
    ) -> dict[int, bytes]:
        """Fetch any set of blocks: one ranged GET per contiguous run, runs in parallel.

        Failures are collected rather than left to the nursery, so callers see the
        StoreError itself (EIO/ENOENT mapping) and never an ExceptionGroup. The first
        failure cancels the runs not yet done: the caller fails anyway, and against a
        frozen server they would each wait out their own deadline. At most
        ``max_parallel_runs`` runs start at once, so that a big request (hydrating a
        whole file) does not queue its own runs past their deadlines for an S3 slot.
        ``remember`` keeps the fetched blocks in the memory tier as well as on disk.
        """
        runs = contiguous_runs(indices, self.max_run)
        if len(runs) <= 1:
            return await self._fetch_run_shared(obj, runs[0], remember) if runs else {}
        results: dict[int, bytes] = {}
        failures: list[StoreError] = []
        started = trio.CapacityLimiter(self.max_parallel_runs)

        async def fetch(run: list[int]) -> None:
            try:
                async with started:
                    results.update(await self._fetch_run_shared(obj, run, remember))
            except StoreError as exc:
                failures.append(exc)
                nursery.cancel_scope.cancel()

        async with trio.open_nursery() as nursery:
            for run in runs:
                nursery.start_soon(fetch, run)
        if failures:
            raise failures[0]
        return results

    async def _fetch_run_shared(
        self, obj: ObjectVersion, run: list[int], remember: bool = True
    ) -> dict[int, bytes]:
        """Fetch one run under a flight that concurrent readers of its blocks wait on."""
        if run != list(range(run[0], run[0] + len(run))):
            raise AssertionError(f"not a contiguous run of blocks: {run}")
        flight = _Flight(deadline=trio.current_time() + 2 * self.timeout)
        digests = [self.chunk_key(obj, i).digest() for i in run]
        for digest in digests:
            self._inflight[digest] = flight
        try:
            fetched = await self._fetch_run_checked(obj, run, flight.deadline)
            self.stats.s3_get_requests += fetched.origin_gets
            self.stats.cache_misses += len(run)
            self.stats.bytes_from_s3 += fetched.origin_bytes
            if fetched.store_error is not None:
                self._note_store_failure(obj, len(fetched.blocks), fetched.store_error)
            if remember:
                self.tiers.remember([(self.chunk_key(obj, i), block) for i, block in fetched.blocks.items()])
            flight.blocks = fetched.blocks
            return fetched.blocks
        except StoreError as exc:
            self.stats.errors += 1
            flight.error = exc
            self._remember_failure(digests, exc)
            raise
        except BaseException:
            flight.error = Unavailable(f"GET {obj.key}: the fetch was cancelled")
            raise
        finally:
            for digest in digests:
                if self._inflight.get(digest) is flight:  # never retire a flight registered since
                    del self._inflight[digest]
            flight.done.set()

    async def _fetch_run_checked(self, obj: ObjectVersion, run: list[int], deadline: float) -> _Fetched:
        """The GET of one run within ``deadline``: a body that fails its check is fetched once more.

        A GET must start by ``deadline - timeout`` (it may then take ``timeout``), so waiting
        for an S3 slot is cut short there; the integrity retry only runs if a whole call
        still fits. Nothing of a refused body has been cached (see _fetch_run_blocking).
        """
        start_by = deadline - self.timeout if math.isfinite(self.timeout) else math.inf
        retried = False
        while True:
            with trio.move_on_at(start_by):
                try:
                    if self._cold is not None and self._cold.usable(self.store, self._run_length(obj, run)):
                        return await self._fetch_run_cold(obj, run)
                    after = _WriteAfterAnswer(self, obj, run) if self._writer is not None else None
                    fetched: _Fetched = await self._run_s3(self._fetch_run_blocking, obj, run, after)
                    if after is not None:
                        after.hold({self.chunk_key(obj, i).digest(): b for i, b in fetched.blocks.items()})
                    return fetched
                except IntegrityError as exc:
                    if retried or trio.current_time() > start_by:
                        raise
                    retried = True
                    self.stats.integrity_retries += 1
                    log.warning("%s; fetching it again", exc)
                    continue
            raise Unavailable(f"GET {obj.key}: no S3 slot free within {self.timeout:g} s")

    def _note_store_failure(self, obj: ObjectVersion, blocks: int, error: str) -> None:
        """Count blocks served uncached; log the first failure and then every 1,000th, not each."""
        if self.stats.cache_store_failed % 1000 == 0:
            log.warning(
                "cannot store %s in the chunk cache (%s): serving it uncached (%d blocks so far)",
                obj.key,
                error,
                self.stats.cache_store_failed + blocks,
            )
        self.stats.cache_store_failed += blocks

    def _fetch_run_blocking(
        self, obj: ObjectVersion, run: list[int], after: _WriteAfterAnswer | None = None
    ) -> _Fetched:
        """A run of blocks from the shared tier where it has them, the rest from the origin (one
        ranged GET per contiguous gap), then one local cache write for the run: queued for the
        cache writer (``after``), so the READ is answered before it, or done here without one.

        Runs in a worker thread, so it touches neither memory nor ``self.stats``. A shared tier
        is asked only for a version with an ETag (its keys are content-addressed by it), and its
        answer is checked by the tier (digest and identity) and here (length). The blocks that
        came from the origin are queued for the shared tier. A cache that cannot store the blocks
        (a full disk) does not fail the read.
        """
        out: dict[int, bytes] = {}
        if self.tiers.shared and obj.etag:
            found = self.tiers.get_shared([self.chunk_key(obj, i) for i in run])
            for i, data in zip(run, found, strict=True):
                if data is not None and len(data) == self._block_length(obj, i):
                    out[i] = data
        from_origin: dict[int, bytes] = {}
        gaps = contiguous_runs([i for i in run if i not in out], len(run))
        learnt: ObjectInfo | None = None
        for gap in gaps:
            blocks, learnt = self._get_run(obj, gap)
            from_origin.update(blocks)
        out.update(from_origin)
        keys = {i: self.chunk_key(obj, i) for i in run}
        items = [(keys[i], out[i]) for i in run]
        fill = [(keys[i], from_origin[i]) for i in run if i in from_origin] if obj.etag else []
        fetched = sum(len(b) for b in from_origin.values())
        if after is not None and self._writer is not None:
            self._writer.submit(after.job(items, fill, (obj.ino, learnt) if learnt is not None else None))
            return _Fetched(out, None, len(gaps), fetched)
        if learnt is not None and self._learn is not None:
            self._learn(obj.ino, learnt)
        return _Fetched(out, self.tiers.store_fetched(items, fill_shared=fill), len(gaps), fetched)

    def _run_length(self, obj: ObjectVersion, run: list[int]) -> int:
        return min(obj.size, (run[-1] + 1) * self.block_size) - run[0] * self.block_size

    async def _fetch_run_cold(self, obj: ObjectVersion, run: list[int]) -> _Fetched:
        """One run through the cold engine: sent from the loop, no thread waiting on it.

        On the CRT thread that received the body: the length check and the cut into blocks
        (``accept``); then the blocks go to the loop (one hand-off) and to the cache writer,
        which stores them after the reader was answered and learns the metadata off this path.
        Until the write lands the blocks are kept in ``_unstored``; if it fails (a full disk) they
        are dropped from there and a later read fetches them again.
        """
        assert self._cold is not None and self._writer is not None
        start = run[0] * self.block_size
        length = self._run_length(obj, run)
        keys = {i: self.chunk_key(obj, i) for i in run}
        writer = self._writer
        after = _WriteAfterAnswer(self, obj, run)

        def accept(result: GetResult) -> Accepted[dict[int, bytes]]:  # on the CRT thread
            data = result.data
            if len(data) != length:
                raise IntegrityError(f"GET {obj.key}: wanted {length} bytes at {start}, got {len(data)}")
            view = memoryview(data)
            size = self.block_size
            blocks = {i: bytes(view[n * size : (n + 1) * size]) for n, i in enumerate(run)}
            items = [(keys[i], blocks[i]) for i in run]
            learn = (obj.ino, result.info) if result.info.metadata else None

            def then() -> None:
                writer.submit(after.job(items, [], learn))

            return blocks, then

        store = self._cold.store  # one that has start_get (ColdGets.usable said so)
        send = functools.partial(
            store.start_get, obj.key, start, length, obj.etag or None, object_size=obj.size,
            version_id=obj.version_id or None,
        )  # fmt: skip
        blocks = await self._cold.get(obj.key, send, accept, self.gets)
        after.hold({keys[i].digest(): blocks[i] for i in run})
        return _Fetched(blocks, None, 1, length)

    def _block_length(self, obj: ObjectVersion, index: int) -> int:
        return min(self.block_size, obj.size - index * self.block_size)

    def _get_run(self, obj: ObjectVersion, run: list[int]) -> tuple[dict[int, bytes], ObjectInfo | None]:
        """One ranged GET from the origin for a contiguous run of blocks, and what its answer
        taught about the object (its headers, when they carry metadata) for ``learn_metadata``.

        The body is checked before anything is stored: the store verifies checksums
        (IntegrityError), and a body of another length than asked (the object's end
        included) is refused the same way, so a truncated body is never cached or served.
        """
        start = run[0] * self.block_size
        length = min(obj.size, (run[-1] + 1) * self.block_size) - start
        # object_size lets the store ask for a whole object without a Range header, so the
        # server's stored checksum comes back and the body is checked against it.
        with self.gets:
            result: GetResult = self.store.get_range(
                obj.key, start, length, if_match=obj.etag or None, object_size=obj.size,
                **({"version_id": obj.version_id} if obj.version_id else {}),
            )  # fmt: skip
        data = result.data
        if len(data) != length:
            raise IntegrityError(f"GET {obj.key}: wanted {length} bytes at {start}, got {len(data)}")
        view = memoryview(data)
        blocks = {i: bytes(view[n * self.block_size : (n + 1) * self.block_size]) for n, i in enumerate(run)}
        return blocks, result.info if result.info.metadata else None

    def _note_access(self, obj: ObjectVersion, offset: int, end: int, last_block: int) -> bool:
        """Detect a sequential reader and keep a growing read-ahead window in flight.

        The kernel's own read-ahead sends several READs at once, which arrive a little
        out of order, so "sequential" tolerates a jitter of a few blocks. Read-ahead is
        scheduled in GETs that double in size (``first_run`` to ``max_run`` blocks), while
        ``READ_AHEAD_BUDGET`` allows.
        """
        state = self._seq.setdefault(obj.ino, _SeqState())
        state.last_read = trio.current_time()
        jitter = (2 + state.window) * self.block_size
        sequential = state.next_offset >= 0 and -jitter <= offset - state.next_offset <= 2 * self.block_size
        if not sequential:
            state.next_offset = end
            state.window = state.run = 0
            state.ahead_until = last_block
            self._drop_ahead(state, self._ALL)
            return False
        state.next_offset = max(state.next_offset, end)
        state.window = min(self.max_window, max(2 * self.first_run, state.window * 2))
        total = self.block_count(obj)
        target = min(total - 1, last_block + state.window)
        begin = max(state.ahead_until, last_block) + 1
        while begin <= target:
            # Each GET of a stream is twice the last, up to max_run: the first bytes come soon
            # (a small GET), and a long stream pays the per-request cost rarely (big ones).
            size = min(self.max_run, max(self.first_run, 2 * state.run))
            run = list(range(begin, min(begin + size, total)))
            cost = self._run_length(obj, run)
            if self._ahead_bytes + cost > READ_AHEAD_BUDGET:
                self._reclaim_idle(state)
            if self._ahead_bytes + cost > READ_AHEAD_BUDGET:
                break  # later READs schedule the rest, once readers have consumed what is ahead
            state.run = size
            self._ahead_bytes += cost
            state.ahead_until = run[-1]
            begin = run[-1] + 1
            self._spawn(functools.partial(self._read_ahead, obj, run, cost))
        return True

    def _keep_ahead(self, obj: ObjectVersion, blocks: dict[int, bytes]) -> None:
        """Keep blocks fetched ahead of a sequential reader until it reads them (see _SeqState)."""
        state = self._seq.get(obj.ino)
        if state is None or not blocks:
            return
        floor = state.next_offset // self.block_size
        for i, data in blocks.items():
            if i >= floor and i not in state.ahead:
                state.ahead[i] = (self.chunk_key(obj, i).digest(), data)
                self._ahead_bytes += len(data)

    def _reclaim_idle(self, wanting: _SeqState) -> None:
        """Drop the buffers of the streams whose readers have been idle for ``IDLE_STREAM`` s."""
        idle_since = wanting.last_read - IDLE_STREAM
        for state in self._seq.values():
            if state is not wanting and state.ahead and state.last_read < idle_since:
                self._drop_ahead(state, self._ALL)

    _ALL = 1 << 62  # every block index: ``_drop_ahead(state, _ALL)`` empties a stream's buffer

    def _drop_ahead(self, state: _SeqState, below: int) -> None:
        """Forget the blocks of a stream's buffer under index ``below`` (read, or the stream gone)."""
        for i in [i for i in state.ahead if i < below]:
            self._ahead_bytes -= len(state.ahead.pop(i)[1])

    async def _read_ahead(self, obj: ObjectVersion, run: list[int], cost: int) -> None:
        """Fetch blocks a sequential reader will want into its stream buffer; not those in flight
        or failing just now (a reader that wants them will get the remembered error, and the
        server a rest). ``cost`` was counted against the budget when this was scheduled."""
        try:
            await self._read_ahead_run(obj, run)
        finally:
            self._ahead_bytes -= cost

    async def _read_ahead_run(self, obj: ObjectVersion, run: list[int]) -> None:
        now = trio.current_time()
        idle = []
        for i in run:
            digest = self.chunk_key(obj, i).digest()
            failed = self._failed.get(digest)
            if digest not in self._inflight and (failed is None or failed[0] <= now):
                idle.append(i)
        todo = self._not_indexed(obj, idle)
        if not todo:
            return
        try:
            self._keep_ahead(obj, await self._fetch_blocks(obj, todo, remember=False))
            self.stats.prefetched_blocks += len(todo)
        except StoreError as exc:
            log.debug("read-ahead of %s failed: %s", obj.key, exc)
