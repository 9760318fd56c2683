"""The daemon's look-ahead: fetch the files a loader says it will read next, ahead of it.

A loader (a PyTorch sampler, ``tierfs.reader.prefetch``) sends the order it will read files in
as a *stream* of hints: paths numbered 0, 1, 2, ... in chunks, and from time to time its
reading *position* (how many of them it has handed to its readers). Up to ``workers`` tasks
(the engine's full concurrency, ``--s3-concurrency``) take hints in order and hydrate them
through the same entry point as ``tierfs prefetch`` (``Hydrator.hydrate``), so a hinted file is
whole in the disk cache when the reader gets to it and the direct reader serves it.

Bounds (docs/reader.md, "Hints"):

* A window: at most ``max_files`` hints at or after the position are fetched or in flight, and
  at most ``budget()`` bytes of them, where the budget is the smaller of ``max_bytes`` and half
  of what the cache can hold below its low-water mark besides pinned bytes. The look-ahead's
  blocks are then always the newest half of the unpinned cache: the LRU eviction that its
  writes may trigger takes older blocks first, never pinned ones (the index never offers
  them), never the files fetched ahead and not yet read, and never those the reader took
  within the window. A file bigger than the whole budget is skipped (``skipped_full``).
* A full cache stops the look-ahead instead of thrashing it: a hydrate the cache could not
  store (ENOSPC) pauses the stream until the reader moves on, and counts ``skipped_full``.
* Hints behind the reader are dropped (``dropped_behind``): the reader is there already and
  fetches them itself; fetching them again would only queue in front of the useful ones.
* Staleness: a hint names a path, resolved when its turn comes through the namespace, so the
  fetch takes the version the namespace knows *then* (every GET carries its ETag as If-Match).
  A deleted path is skipped (``missing``); the reader's own open checks the version it reads.

Everything here runs on the trio loop: queue bookkeeping is O(1) per hint, the namespace
lookups and hydrates are the hydrator's and namespace's own (they keep blocking work off it).
"""

from __future__ import annotations

import errno
import logging
import math
import os
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import trio

from ..cache.eviction import LOW_WATER
from ..errors import NotFound, StoreError
from ..read.hydrator import ObjectVersion

log = logging.getLogger(__name__)

MAX_STREAMS = 64  # concurrent hint streams (one per loader, e.g. one per rank on a node)
MAX_QUEUED = 100_000  # hints a stream may have queued; a client sends more as room frees up
MAX_QUEUED_TOTAL = 200_000  # hints all streams may have queued (a few tens of MiB of paths at most)
STREAM_IDLE = 600.0  # seconds without a word from its client before a stream is forgotten
DEMAND_WAIT = 30.0  # seconds a reader's miss waits for the look-ahead's fetch of the same file
IDLE_WAIT = 1.0  # a worker with nothing to do looks again after this (the cache's room may change)
BUDGET_REFRESH = 0.5  # seconds a computed budget is reused

Resolve = Callable[[str], Awaitable[ObjectVersion | None]]  # None: not a regular file
Hydrate = Callable[[ObjectVersion], Awaitable[None]]


class HintError(ValueError):
    """A malformed hint request; the control op answers it as a one-line error."""


@dataclass
class HintCounters:
    received: int = 0
    fetched: int = 0
    fetched_bytes: int = 0
    already_cached: int = 0  # hinted files found whole in the cache: nothing to fetch
    dropped_behind: int = 0
    skipped_full: int = 0
    missing: int = 0  # hinted paths that do not name a file (deleted, a directory)
    failed: int = 0  # fetches that failed (S3 errors); the reader will try again itself
    demand_fetches: int = 0  # files fetched at once for a direct reader's miss


@dataclass
class _Stream:
    queue: deque[tuple[int, str]] = field(default_factory=deque)  # (seq, path) not started yet
    next_seq: int = 0  # the seq the client's next chunk must start at
    position: int = 0  # the reader's position: hints with a smaller seq are behind it
    ahead: dict[int, int] = field(default_factory=dict)  # seq -> bytes, fetched or in flight, >= position
    ahead_bytes: int = 0
    paused_at: int | None = None  # the position at which a full cache stopped this stream
    head_size: int = 0  # bytes of the queue's first hint, once known to be too big for the room left
    touched: float = field(default_factory=time.monotonic)

    def requeue(self, seq: int, path: str) -> None:
        """Put a hint taken from the queue back in its place (near the head: others taken at the
        same time may be back already), keeping the queue in seq order."""
        at = 0
        while at < len(self.queue) and self.queue[at][0] < seq:
            at += 1
        self.queue.insert(at, (seq, path))

    def retire_behind(self, counters: HintCounters) -> None:
        while self.queue and self.queue[0][0] < self.position:
            self.queue.popleft()
            counters.dropped_behind += 1
        for seq in [s for s in self.ahead if s < self.position]:
            self.ahead_bytes -= self.ahead.pop(seq)


class LookAhead:
    def __init__(
        self,
        *,
        resolve: Resolve,
        hydrate: Hydrate,
        budget: Callable[[], int],
        workers: int,
        max_files: int,
        max_bytes: int,
        is_cached: Callable[[ObjectVersion], bool] = lambda _: False,
    ) -> None:
        """``budget()``: bytes the cache can give the look-ahead (see :func:`cache_budget`), called
        at most every BUDGET_REFRESH seconds; ``is_cached`` is an index-only check (loop-safe)."""
        self._resolve = resolve
        self._hydrate = hydrate
        self._budget_fn = budget
        self._is_cached = is_cached
        self.workers = max(1, workers)
        self.max_files = max(1, max_files)
        self.max_bytes = max(1, max_bytes)
        self.counters = HintCounters()
        self._streams: dict[str, _Stream] = {}
        self._order: deque[str] = deque()  # round robin over streams
        self._changed = trio.Event()
        self._budget = (0.0, 0)
        self._inflight: dict[tuple[str, str], trio.Event] = {}  # (key, etag) -> set when fetched

    # -- the control op's side (on the loop, no await) ----------------------------------------------------

    def hint(
        self, stream_id: str, *, paths: list[str], start: int | None, position: int | None, end: bool
    ) -> dict[str, Any]:
        """Queue ``paths`` (numbered from ``start``) and/or move the reader's ``position``.

        Accepts a prefix of ``paths`` that fits MAX_QUEUED; the reply says how many (``accepted``)
        and the room left, so the client sends the rest later. ``end`` forgets the stream."""
        if end:
            gone = self._streams.pop(stream_id, None)
            if gone is not None:
                self.counters.dropped_behind += len(gone.queue)
            self._wake()
            return {"accepted": 0, "queued": 0, "room": 0}
        stream = self._streams.get(stream_id)
        if stream is None:
            self._expire()
            if len(self._streams) >= MAX_STREAMS:
                raise HintError(f"too many hint streams ({MAX_STREAMS}); end one first")
            stream = self._streams[stream_id] = _Stream()
            self._order.append(stream_id)
        stream.touched = time.monotonic()
        if position is not None and position > stream.position:
            stream.position = position
            stream.retire_behind(self.counters)
            if stream.paused_at is not None and position > stream.paused_at:
                stream.paused_at = None
        accepted = 0
        if paths:
            first = stream.next_seq if start is None else start
            if first > stream.next_seq:
                raise HintError(f"hints out of order: expected seq {stream.next_seq}, got {first}")
            skip = min(len(paths), stream.next_seq - first)  # a chunk sent again after a lost reply
            fresh = paths[skip:]
            queued = sum(len(s.queue) for s in self._streams.values())
            accepted = max(0, min(len(fresh), MAX_QUEUED - len(stream.queue), MAX_QUEUED_TOTAL - queued))
            seq = stream.next_seq
            for n in range(accepted):
                if seq + n >= stream.position:
                    stream.queue.append((seq + n, fresh[n]))
                else:
                    self.counters.dropped_behind += 1
            stream.next_seq += accepted
            self.counters.received += accepted
            accepted += skip
        self._wake()
        return {"accepted": accepted, "queued": len(stream.queue), "room": MAX_QUEUED - len(stream.queue)}

    async def fetch_now(self, version: ObjectVersion) -> None:
        """A direct reader's miss: fetch the whole file now, at once, outside any window. If the
        look-ahead is fetching it already, wait for that fetch (bounded) instead of a second GET."""
        self.counters.demand_fetches += 1
        running = self._inflight.get((version.key, version.etag))
        if running is not None:
            with trio.move_on_after(DEMAND_WAIT):
                await running.wait()
            if self._is_cached(version):
                return
        await self._hydrate_once(version)

    async def _hydrate_once(self, version: ObjectVersion) -> None:
        """Hydrate ``version``, registered so that the look-ahead and a reader's miss never both GET it."""
        flight = (version.key, version.etag)
        done = self._inflight.setdefault(flight, trio.Event())
        try:
            await self._hydrate(version)
        finally:
            if self._inflight.get(flight) is done:
                del self._inflight[flight]
            done.set()

    def status(self) -> dict[str, Any]:
        c = self.counters
        return {
            "hints_received": c.received,
            "hints_fetched": c.fetched,
            "hints_fetched_bytes": c.fetched_bytes,
            "hints_already_cached": c.already_cached,
            "hints_dropped_behind": c.dropped_behind,
            "hints_skipped_full": c.skipped_full,
            "hints_missing": c.missing,
            "hints_failed": c.failed,
            "hints_demand_fetches": c.demand_fetches,
            "hints_queued": sum(len(s.queue) for s in self._streams.values()),
            "hints_ahead_bytes": sum(s.ahead_bytes for s in self._streams.values()),
            "hint_streams": len(self._streams),
        }

    # -- the workers ----------------------------------------------------------------------------------

    async def run(self) -> None:
        """Run the workers until cancelled (the control server's lifetime)."""
        async with trio.open_nursery() as nursery:
            for _ in range(self.workers):
                nursery.start_soon(self._worker)

    async def _worker(self) -> None:
        while True:
            changed = self._changed  # taken before looking, so a hint that arrives meanwhile wakes us
            picked = self._pick()
            if picked is None:
                with trio.move_on_after(IDLE_WAIT):
                    await changed.wait()
                continue
            stream, seq, path = picked
            try:
                await self._fetch(stream, seq, path)
            except Exception:  # a worker must outlive any one hint
                log.exception("hinted fetch of %s failed", path)
                self.counters.failed += 1
                self._release(stream, seq)
            self._wake()

    def _pick(self) -> tuple[_Stream, int, str] | None:
        """The next hint any stream may fetch now, round robin over streams; None if none may."""
        for _ in range(len(self._order)):
            stream_id = self._order[0]
            self._order.rotate(-1)
            stream = self._streams.get(stream_id)
            if stream is None:
                self._order.remove(stream_id)
                continue
            stream.retire_behind(self.counters)
            if not stream.queue or stream.paused_at is not None:
                continue
            seq, path = stream.queue[0]
            budget = self.budget()
            if (
                seq >= stream.position + self.max_files
                or stream.ahead_bytes >= budget
                or stream.ahead_bytes + stream.head_size > budget
            ):
                continue  # the window is full: wait for the reader to move on
            stream.queue.popleft()
            stream.head_size = 0
            stream.ahead[seq] = 0  # reserved; its size is known once resolved
            return stream, seq, path
        return None

    async def _fetch(self, stream: _Stream, seq: int, path: str) -> None:
        try:
            version = await self._resolve(path)
        except NotFound:
            version = None
        if version is None:
            self.counters.missing += 1
            self._release(stream, seq)
            return
        if seq not in stream.ahead:  # the reader passed it while we looked it up
            return
        budget = self.budget()
        if version.size > budget:
            self.counters.skipped_full += 1  # would push out what the reader is about to read
            self._release(stream, seq)
            return
        if stream.ahead_bytes + version.size > budget and stream.ahead_bytes > 0:
            # No room for it until the reader takes what is ahead: back to the head of the queue.
            self._release(stream, seq)
            stream.requeue(seq, path)
            stream.head_size = version.size
            return
        stream.ahead[seq] = version.size
        stream.ahead_bytes += version.size
        if self._is_cached(version) or (version.key, version.etag) in self._inflight:
            self.counters.already_cached += 1  # cached, or a reader's miss is fetching it now
            return
        try:
            await self._hydrate_once(version)
        except OSError as exc:
            if exc.errno != errno.ENOSPC:
                raise
            self.counters.skipped_full += 1
            stream.paused_at = stream.position  # resumes when the reader moves on
            self._release(stream, seq)
            log.info("hint look-ahead paused: the cache is full (%s)", exc)
            return
        except StoreError as exc:
            self.counters.failed += 1
            self._release(stream, seq)
            log.debug("hinted fetch of %s failed: %s", path, exc)
            return
        self.counters.fetched += 1
        self.counters.fetched_bytes += version.size

    # -- helpers --------------------------------------------------------------------------------------

    def budget(self) -> int:
        """Bytes the look-ahead may hold ahead of a reader now (cached for BUDGET_REFRESH s)."""
        at, value = self._budget
        now = time.monotonic()
        if now - at > BUDGET_REFRESH:
            value = min(self.max_bytes, self._budget_fn())
            self._budget = (now, value)
        return value

    def _release(self, stream: _Stream, seq: int) -> None:
        stream.ahead_bytes -= stream.ahead.pop(seq, 0)

    def _wake(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    def _expire(self) -> None:
        now = time.monotonic()
        for stream_id in [s for s, st in self._streams.items() if now - st.touched > STREAM_IDLE]:
            del self._streams[stream_id]


def cache_budget(
    *, status: Callable[[], dict[str, Any]], limit_bytes: int | None, min_free: float, cache_dir: str
) -> int:
    """Half of what the disk cache can hold below its low-water mark besides pinned bytes.

    The effective limit is the evictor's (``cache.eviction``): ``--cache-size`` and, with a
    free-space floor, what keeps ``--cache-min-free`` of the filesystem free."""
    tiers = status()
    disk = int(tiers.get("cache_bytes_on_disk") or 0)
    pinned = int(tiers.get("pinned_bytes") or 0)
    effective: float = math.inf if limit_bytes is None else limit_bytes
    if min_free > 0:
        st = os.statvfs(cache_dir)
        effective = min(effective, disk + st.f_bavail * st.f_frsize - min_free * st.f_blocks * st.f_frsize)
    if math.isinf(effective):
        return 1 << 62
    return max(0, int((effective * LOW_WATER - pinned) / 2))
