"""The cold fetch engine: GETs with no thread waiting on them, and cache writes after the answer.

Why (docs/coldpath.md has the numbers): a cold GET used to cost four thread hand-offs (the loop
to a worker thread, the worker to the CRT, the CRT's answer back to the waiting worker, the
worker back to the loop), with a worker thread parked for the whole round trip and the cache
write done before the READ was answered. Here a GET is sent from the trio loop
(``ObjectStore.start_get``: the CRT queues it and returns), its bytes are checked and cut into
blocks on the CRT thread that received them, handed to the loop once (``run_sync_soon``), and
queued for one cache-writer thread that stores whatever has arrived in one batch (one index
transaction for many objects) and learns the object's metadata there, off the fetch's path.

Loop rules: :meth:`ColdGets.get` runs on the loop and never blocks it (``start_get`` only queues
the request). ``accept`` runs on a CRT thread and must not block. :class:`CacheWriter` runs its
own thread; its ``on_stored`` callbacks run on the loop, one hand-off per batch.

The time rule is the store's (docs/design.md, "The object store"): one call is bounded by
``timeout`` in total, Unavailable is retried at most ``retries`` times with the store's jittered
back-off, no attempt starts with less than ``MIN_ATTEMPT`` left, and an attempt that runs out is
cancelled.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import trio

from ..cache.chunkkey import ChunkKey
from ..cache.stack import Tiers
from ..errors import StoreError, Unavailable
from ..store.objectstore import CRT_MAX_GET, GetResult, ObjectInfo, retry_pause

log = logging.getLogger(__name__)

T = TypeVar("T")
Blocks = list[tuple[ChunkKey, bytes]]
MetadataSink = Callable[[int, ObjectInfo], None]  # (ino, info) -> None, blocking, called in a thread
#: What ``accept`` makes of a checked answer, on the CRT thread: the value handed to the loop, and
#: what to do once it is on its way there (queue the cache write: after, so the loop learns of the
#: bytes before it can learn that they were stored).
Accepted = tuple[T, Callable[[], None] | None]

#: Starts one GET attempt: ``send(on_done=...)`` returns its cancel function (None: not a CRT GET).
Send = Callable[..., Callable[[], None] | None]

#: Bytes queued for the cache writer at most; a CRT thread that would go past it waits (as a full
#: socket buffer would make the sender wait), so memory stays bounded whatever the disk does.
PENDING_MAX = 32 << 20
#: Objects one cache write stores at most: one index transaction for all of them.
BATCH_MAX = 64


class GetGauge:
    """GETs to the origin in flight now, and the most seen at once: how much the engine overlaps.

    Thread-safe (the blocking path counts in its worker threads), under a lock of its own."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.now = 0
        self.peak = 0

    def __enter__(self) -> None:
        with self._lock:
            self.now += 1
            self.peak = max(self.peak, self.now)

    def __exit__(self, *exc: object) -> None:
        with self._lock:
            self.now -= 1


class _Attempt(Generic[T]):
    """One GET attempt's answer, handed from a CRT thread to the loop exactly once."""

    def __init__(self) -> None:
        self.done = trio.Event()
        self.value: T | StoreError | None = None

    def deliver(self, value: T | StoreError) -> None:  # on the loop
        self.value = value
        self.done.set()


class ColdGets:
    """Ranged GETs under the store's time rule, many in flight, none holding a thread."""

    def __init__(self, store: Any, *, limiter: trio.CapacityLimiter, timeout: float, retries: int) -> None:
        self.store = store
        self.limiter = limiter
        self.timeout = timeout
        self.retries = retries

    @staticmethod
    def usable(store: Any, length: int) -> bool:
        """Whether a GET of ``length`` bytes goes through this engine (the CRT takes it)."""
        fast = getattr(store, "fast_gets", False) and hasattr(store, "start_get")
        return bool(fast) and 0 < length <= CRT_MAX_GET

    async def get(
        self,
        key: str,
        send: Send,
        accept: Callable[[GetResult], Accepted[T]],
        gauge: GetGauge | None = None,
    ) -> T:
        """The value ``accept`` made of the checked answer of the GET of ``key`` that ``send`` starts
        (``ObjectStore.start_get`` with the request's arguments bound), within ``timeout``, retries
        included.

        ``accept`` may raise a StoreError (IntegrityError for a short body): the attempt then
        failed like any other and is retried if the budget allows. ``gauge`` counts the GET as
        in flight once it holds a slot."""
        async with self.limiter:
            with gauge if gauge is not None else contextlib.nullcontext():
                deadline = trio.current_time() + self.timeout
                tries = 0
                while True:
                    tries += 1
                    try:
                        return await self._attempt(key, send, accept, deadline)
                    except Unavailable as exc:
                        await trio.sleep(
                            retry_pause(exc, tries, self.retries, deadline - trio.current_time())
                        )

    async def _attempt(
        self,
        key: str,
        send: Send,
        accept: Callable[[GetResult], Accepted[T]],
        deadline: float,
    ) -> T:
        """One attempt: ``send(on_done=...)`` starts the GET; its answer is awaited until ``deadline``."""
        token = trio.lowlevel.current_trio_token()
        attempt: _Attempt[T] = _Attempt()

        def finished(result: GetResult | StoreError) -> None:  # on a CRT thread
            then: Callable[[], None] | None = None
            value: T | StoreError
            if isinstance(result, StoreError):
                value = result
            else:
                try:
                    value, then = accept(result)
                except StoreError as exc:
                    value = exc
                except Exception as exc:  # never let a bug escape into the CRT's thread
                    value = Unavailable(f"GET {key}: {type(exc).__name__}: {exc}")
            with contextlib.suppress(trio.RunFinishedError):
                token.run_sync_soon(attempt.deliver, value)
            if then is not None:
                then()

        cancel = send(on_done=finished)
        if cancel is None:  # not a GET for the CRT after all (see usable)
            raise Unavailable(f"GET {key}: this GET cannot be sent without a thread")
        try:
            # Shielded like the worker thread it replaces: a GET that other readers of its blocks
            # wait on runs to its answer or its deadline even if the task that sent it is cancelled.
            with trio.CancelScope(deadline=deadline, shield=True):
                await attempt.done.wait()
        finally:
            if not attempt.done.is_set():
                cancel()  # out of time (or the loop is going away): the CRT drops the request
        if not attempt.done.is_set():
            raise Unavailable(f"GET {key}: no complete answer within {self.timeout:g} s")
        value = attempt.value
        if isinstance(value, StoreError):
            raise value
        return value  # type: ignore[return-value]


@dataclass(eq=False)
class WriteJob:
    """The blocks of one GET for the cache writer, what the GET taught about the object (``learn``:
    ino and ObjectInfo, or None), and what the loop (``token``) runs once they are stored."""

    items: Blocks
    fill_shared: Blocks
    learn: tuple[int, ObjectInfo] | None
    on_stored: Callable[[str | None], None]
    token: trio.lowlevel.TrioToken
    size: int = field(init=False)

    def __post_init__(self) -> None:
        self.size = sum(len(b) for _, b in self.items)


class CacheWriter:
    """One thread that stores fetched blocks after their readers were answered, in batches.

    ``submit`` is called on the thread that received the bytes; the writer stores everything
    queued by then with one ``Tiers.store_fetched`` (one index transaction), applies the metadata
    the GETs taught (``learn``: a namespace write only when the headers say more than the
    listing), then tells the loop, once per batch, which submissions were stored and why not.
    A cache that cannot store (a full disk) never fails a read: the loop drops the bytes it
    kept for the meantime, and later reads fetch them again.
    """

    def __init__(self, tiers: Tiers, learn: MetadataSink | None, *, pending_max: int = PENDING_MAX) -> None:
        self.tiers = tiers
        self._learn = learn
        self._pending_max = pending_max
        self._queue: queue.SimpleQueue[WriteJob | None] = queue.SimpleQueue()
        self._room = threading.Condition()
        self._pending = 0
        self._thread: threading.Thread | None = None
        self.batches = 0  # cache writes made (each one index transaction)
        self.objects = 0  # submissions stored or refused

    def submit(self, job: WriteJob) -> None:
        """Queue a job for the cache (any thread). Its ``on_stored(error or None)`` runs on the loop."""
        size = job.size
        with self._room:
            self._room.wait_for(lambda: self._pending == 0 or self._pending + size <= self._pending_max, 60)
            self._pending += size
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="tierfs-cache-writer", daemon=True)
                self._thread.start()
        self._queue.put(job)

    def close(self, timeout: float = 30.0) -> None:
        """Store what is queued, then stop the thread (before the tiers close)."""
        thread = self._thread
        if thread is not None:
            self._queue.put(None)
            thread.join(timeout)

    def _run(self) -> None:
        while True:
            first = self._queue.get()
            if first is None:
                return
            jobs = [first]
            stop = False
            while len(jobs) < BATCH_MAX:
                try:
                    job = self._queue.get_nowait()
                except queue.Empty:
                    break
                if job is None:
                    stop = True
                    break
                jobs.append(job)
            self._store(jobs)
            if stop:
                return

    def _store(self, jobs: list[WriteJob]) -> None:
        try:
            error = self.tiers.store_fetched(
                [item for job in jobs for item in job.items],
                fill_shared=[item for job in jobs for item in job.fill_shared],
            )
        except Exception as exc:  # the writer must outlive any failure; the reads were answered
            log.exception("cache write failed")
            error = f"{type(exc).__name__}: {exc}"
        for job in jobs:
            if job.learn is not None and self._learn is not None:
                try:
                    self._learn(*job.learn)
                except Exception:
                    log.exception("learning the metadata of a GET failed")
        self.batches += 1
        self.objects += len(jobs)
        with self._room:
            self._pending -= sum(job.size for job in jobs)
            self._room.notify_all()
        by_loop: dict[trio.lowlevel.TrioToken, list[Callable[[str | None], None]]] = {}
        for job in jobs:
            by_loop.setdefault(job.token, []).append(job.on_stored)
        for token, callbacks in by_loop.items():
            with contextlib.suppress(trio.RunFinishedError):
                token.run_sync_soon(_call_all, callbacks, error)


def _call_all(callbacks: list[Callable[[str | None], None]], error: str | None) -> None:
    for callback in callbacks:
        callback(error)
