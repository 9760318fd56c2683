"""The staging lifecycle: which inodes have local bytes, and when those bytes may go.

A file is *staged* from the moment it is opened for writing (or truncated, or created)
until its bytes are in the bucket and nobody can change them any more. While staged,
the staging file is the only truth for reads and writes of that inode.

Retiring a staging file (moving its bytes into the chunk cache under the ETag the upload
got, then deleting it) is allowed only when all of these hold (docs/writeback.md):
- no writer has the file open;
- no put of the inode is waiting, running or on its way into the journal (``Pending``);
- the staging file is unchanged since the upload that produced that ETag *started*:
  every mutation bumps ``gen`` when it begins and again when it ends, the executor
  records ``gen`` when a put starts, and a retire compares the two. A write that raced
  the upload therefore can never be cached under the ETag of bytes that lack it.

Methods are called on the trio loop; file I/O goes through ``run_io`` (worker threads).
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import trio

from ..cache.chunkkey import ChunkKey
from ..read.hydrator import Hydrator, ObjectVersion
from .staging import Staging

RunBlocking = Callable[..., Awaitable[Any]]
RETIRE_BATCH_BLOCKS = 16  # blocks moved from a staging file into the chunk cache per transaction
HYDRATE_BATCH_BLOCKS = 16  # blocks fetched into a staging file per step (bounded memory for big files)


class BlockSink(Protocol):
    """Where retired staging bytes go: the cache tiers (``cache.stack.Tiers.put_many``; blocking,
    worker threads only). Never a tier directly: every tier below memory gets them."""

    def put_many(
        self, items: Sequence[tuple[ChunkKey, bytes]], *, protect: Iterable[ChunkKey] = ()
    ) -> None: ...


@dataclass
class FileState:
    """Per staged inode. Dropped when the staging file goes, so memory follows dirty files."""

    writers: int = 0
    last_close: float = 0.0
    forced: bool = False
    size: int = 0
    gen: int = 0  # bumped at the start and at the end of every mutation of the staging file
    busy: int = 0  # mutations in progress


class StagedFiles:
    def __init__(
        self,
        *,
        bucket: str,
        staging: Staging,
        hydrator: Hydrator,
        cache: BlockSink,
        run_io: RunBlocking,
    ) -> None:
        self.bucket = bucket
        self.staging = staging
        self.hydrator = hydrator
        self.cache = cache
        self._run_io = run_io
        self.states: dict[int, FileState] = {}
        self.staged: set[int] = set(staging.inos())
        self._locks: dict[int, trio.Lock] = {}

    # -- queries ---------------------------------------------------------------------------------------

    def state(self, ino: int) -> FileState:
        return self.states.setdefault(ino, FileState())

    def writers(self, ino: int) -> int:
        state = self.states.get(ino)
        return state.writers if state else 0

    def gen(self, ino: int) -> int:
        state = self.states.get(ino)
        return state.gen if state else 0

    def unchanged_since(self, ino: int, gen: int) -> bool:
        state = self.states.get(ino)
        return state is None or (state.gen == gen and state.busy == 0)

    def size_of(self, ino: int) -> int | None:
        state = self.states.get(ino)
        return state.size if state is not None and ino in self.staged else None

    # -- writers: the only place their counts and times change ------------------------------------------

    def add_writer(self, ino: int) -> None:
        """A writer opens ``ino`` (counted before anything is awaited, so no retirement races it)."""
        self.state(ino).writers += 1

    def drop_writer(self, ino: int, now: float) -> int | None:
        """A writer of ``ino`` is gone at ``now`` (its close starts the write-back delay).
        Returns the writers left, None if ``ino`` has no state (nothing staged, nobody writing)."""
        state = self.states.get(ino)
        if state is None:
            return None
        state.writers = max(0, state.writers - 1)
        state.last_close = now
        return state.writers

    @contextlib.contextmanager
    def holding_writer(self, ino: int, clock: Callable[[], float]) -> Iterator[None]:
        """Count a writer while a change that is not a write lasts (truncate(2)): the staging file
        must stay; its end counts as a close."""
        self.add_writer(ino)
        try:
            yield
        finally:
            self.drop_writer(ino, clock())

    @contextlib.contextmanager
    def forced(self, ino: int) -> Iterator[None]:
        """An fsync of ``ino`` waits: its put is due now, whatever the write-back delay says."""
        state = self.state(ino)
        state.forced = True
        try:
            yield
        finally:
            state.forced = False

    def due(self, ino: int, now: float, delay: float, *, streaming: bool) -> bool:
        """Whether a put of ``ino`` may start: nobody writes it and the delay after the last close
        ran out (forced by an fsync, or streaming: most of it is in the bucket already, at once)."""
        state = self.states.get(ino)
        if state is None:
            return True  # replayed after a restart, or never opened: nobody is writing
        if state.forced:
            return True
        if state.writers:
            return False
        return streaming or now - state.last_close >= delay

    def due_at(self, ino: int, delay: float) -> float | None:
        """When a waiting put of ``ino`` becomes due by itself (None: only once a writer closes)."""
        state = self.states.get(ino)
        if state is None or state.writers:
            return None
        return state.last_close + delay

    def recovered(self, ino: int, size: int) -> None:
        """After a restart: the staging file of ``ino`` is ``size`` bytes long."""
        self.state(ino).size = size

    # -- mutations ---------------------------------------------------------------------------------------

    def lock(self, ino: int) -> trio.Lock:
        return self._locks.setdefault(ino, trio.Lock())

    @contextlib.asynccontextmanager
    async def mutating(self, ino: int) -> AsyncIterator[FileState]:
        """Bracket one change of a staging file (see the module docstring for why twice)."""
        state = self.state(ino)
        state.gen += 1
        state.busy += 1
        try:
            yield state
        finally:
            state.busy -= 1
            state.gen += 1

    async def stage(self, ino: int, source: ObjectVersion | None) -> None:
        """Give ``ino`` a staging file unless it has one: empty, or hydrated from ``source``.

        Call under :meth:`lock`. A file not staged has no upload running (a retirement needs
        none pending), so creating its staging file races with nothing.
        """
        if ino in self.staged:
            return
        state = self.state(ino)
        if source is None or source.size == 0:
            await self._run_io(self.staging.create, ino)
            state.size = 0
        else:
            await self._hydrate(source)
            state.size = source.size
        self.staged.add(ino)

    async def _hydrate(self, source: ObjectVersion) -> None:
        bs = self.hydrator.block_size
        total = self.hydrator.block_count(source)
        for first in range(0, total, HYDRATE_BATCH_BLOCKS):
            batch = range(first, min(total, first + HYDRATE_BATCH_BLOCKS))
            blocks = await self.hydrator.blocks(source, batch)

            def write(blocks: dict[int, bytes] = blocks) -> None:
                for i, data in sorted(blocks.items()):
                    self.staging.fill(source.ino, i * bs, data)

            await self._run_io(write)
        await self._run_io(self.staging.finish_fill, source.ino, source.size)

    async def create(self, ino: int, content: bytes) -> None:
        await self._run_io(self.staging.create, ino, content)
        self.staged.add(ino)
        self.state(ino).size = len(content)

    async def write(self, ino: int, offset: int, data: bytes) -> int:
        async with self.mutating(ino) as state:
            written: int = await self._run_io(self.staging.pwrite, ino, offset, data)
            state.size = max(state.size, offset + written)
        return written

    async def truncate(self, ino: int, size: int) -> None:
        async with self.mutating(ino) as state:
            await self._run_io(self.staging.truncate, ino, size)
            state.size = size

    async def read(self, ino: int, offset: int, size: int) -> bytes | None:
        """None if the staging file retired meanwhile: its bytes are then the node's new version."""

        def pread() -> bytes | None:
            try:
                return self.staging.pread(ino, offset, size)
            except FileNotFoundError:
                return None

        data: bytes | None = await self._run_io(pread)
        return data

    # -- the end of a staging file ----------------------------------------------------------------------

    async def retire(self, ino: int, key: str, etag: str, still_needed: Callable[[], bool]) -> bool:
        """Move the bytes into the chunk cache under (``key``, ``etag``) and drop the staging file.

        ``still_needed`` is asked again under the lock, after every await that could have let
        a writer or a new put in. Returns whether the file was retired.
        """
        async with self.lock(ino):
            if still_needed() or ino not in self.staged:
                return False
            # No longer staged from here on, before any await: a rename meanwhile must copy
            # the uploaded object rather than journal a put of a file that is going away.
            self.staged.discard(ino)
            bs = self.hydrator.block_size

            def move() -> None:
                """Hand the uploaded bytes to the chunk cache, some blocks at a time (bounded memory)."""
                try:
                    blocks = max(1, (self.staging.size(ino) + bs - 1) // bs)
                    for first in range(0, blocks, RETIRE_BATCH_BLOCKS):
                        batch = range(first, min(blocks, first + RETIRE_BATCH_BLOCKS))
                        self.cache.put_many(
                            [
                                (ChunkKey(self.bucket, key, etag, i), self.staging.pread(ino, i * bs, bs))
                                for i in batch
                            ]
                        )
                except FileNotFoundError:
                    return  # unlinked meanwhile; the cache would only have been a convenience
                except OSError:
                    pass  # a full cache disk: the bucket has the bytes, the cache is a convenience
                self.staging.remove(ino)

            await self._run_io(move if etag else (lambda: self.staging.remove(ino)))
            self._forget(ino)
        self._drop_idle_lock(ino)
        return True

    async def discard(self, ino: int) -> None:
        async with self.lock(ino):  # never while a retirement reads the file
            await self._run_io(self.staging.remove, ino)
            self._forget(ino)
        self._drop_idle_lock(ino)

    def _forget(self, ino: int) -> None:
        self.staged.discard(ino)
        state = self.states.get(ino)
        if state is not None and not state.writers and not state.busy:
            del self.states[ino]

    def _drop_idle_lock(self, ino: int) -> None:
        """Forget the lock of a file that is no longer staged, unless someone holds or awaits it.

        One lock per file ever written would otherwise stay for the life of the mount.
        """
        lock = self._locks.get(ino)
        idle = lock is not None and not lock.locked() and lock.statistics().tasks_waiting == 0
        if idle and ino not in self.staged:
            del self._locks[ino]
