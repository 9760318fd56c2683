"""Streaming uploads: a file written sequentially from offset 0 goes up while it is written.

A file that is created (or opened with ``O_TRUNC``) by one writer and then only appended to
is uploaded as it grows. Once it reaches the multipart threshold a multipart upload starts
(its id is journaled under the file's *waiting put*, ``wb.uploads``, before any part), and each
full part goes up as soon as it is written, ``limit`` parts at a time. When that put runs (at
close, fsync or flush; a streamed file does not wait for ``--writeback-delay``) it uploads only
the rest and completes the upload under the put's usual condition (upload.Uploader).

Anything else ends the stream and the file falls back to the upload after close: a write
anywhere but at the end, a truncate, another writer, a rename, an unlink, a failed part, or
its put being replaced in the journal. An ended stream's upload is aborted, and its journal
record dropped, before a put of the file may start (``blocks``). After a crash the next mount
aborts every recorded upload (WriteBack.recover) and replays the put as a whole-file upload.

The writer is held back while ``limit`` parts are in flight and another full part waits, so
it never gets more than about ``limit + 1`` parts ahead of the bucket: close-to-durable stays
short and the staging disk is not the only thing keeping up. Each wait is bounded by the part
uploads' own time rule; a part that fails ends the stream, which releases the writer.

Runs on the trio loop; S3 calls go through ``run_s3``, journal writes through ``run_io``.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

from ..errors import StoreError
from ..store.objectstore import ObjectStore, Part
from .journal import Journal

log = logging.getLogger("tierfs.writeback")

RunBlocking = Callable[..., Awaitable[Any]]


@dataclass
class Stream:
    """One file's upload in progress: which put it belongs to and which parts are in the bucket."""

    ino: int
    key: str
    seq: int  # the put whose upload this is: the journal's record of the upload id is named by it
    headers: dict[str, str]
    upload_id: str = ""  # "" until CreateMultipartUpload has answered
    parts: dict[int, Part] = field(default_factory=dict)
    started: int = 0  # parts 1..started have been started
    running: int = 0  # part uploads (and the create) in flight
    broken: bool = False  # ended: never complete it; abort once nothing is in flight
    changed: trio.Event = field(default_factory=trio.Event)

    def signal(self) -> None:
        changed, self.changed = self.changed, trio.Event()
        changed.set()

    async def settled(self) -> None:
        """Wait until no part upload (nor the create) is in flight."""
        while self.running:
            await self.changed.wait()

    def uploaded_parts(self) -> list[Part]:
        """The parts 1..n that are all in the bucket (a completion sends them and the rest)."""
        out: list[Part] = []
        while (number := len(out) + 1) in self.parts:
            out.append(self.parts[number])
        return out


class Streams:
    """Every file's stream; write-back's parts (writes, renames, executor) say what happens to files."""

    def __init__(
        self,
        *,
        store: ObjectStore,
        journal: Journal,
        staging_path: Callable[[int], Path],
        run_s3: RunBlocking,
        run_io: RunBlocking,
        limit: int,
        on_ended: Callable[[], None],
    ) -> None:
        self.store = store
        self.journal = journal
        self._path = staging_path
        self._run_s3 = run_s3
        self._run_io = run_io
        self.limit = max(1, limit)
        # Parts of all streams waiting for the store take at most this many S3 slots (which
        # reads share): the store's own bound on parts in flight is the same number.
        self._parts = trio.CapacityLimiter(self.limit)
        self._on_ended = on_ended  # wakes the executor: a put held back by an abort may start
        self.nursery: trio.Nursery | None = None  # the executor's (serve_in); no streaming before
        self._written: dict[int, int] = {}  # ino -> bytes written contiguously from offset 0
        self.active: dict[int, Stream] = {}
        self._ending: dict[int, Stream] = {}  # ended, abort not done: a put of the file must wait

    def serve_in(self, nursery: trio.Nursery) -> None:
        """The executor runs: streams' uploads and aborts run as tasks of its nursery from now on."""
        self.nursery = nursery

    # -- what the coordinator reports -----------------------------------------------------------------

    def begin(self, ino: int) -> None:
        """A writer opened ``ino`` empty (create, O_TRUNC) and is its only writer: a candidate."""
        self.end(ino, "reopened")
        self._written[ino] = 0

    def end(self, ino: int, why: str) -> None:
        """Whatever ``ino``'s stream was, it is over; its upload is aborted in the background."""
        self._written.pop(ino, None)
        stream = self.active.pop(ino, None)
        if stream is None:
            return
        log.debug("write-back: stream of %s ended (%s); it is uploaded after close", stream.key, why)
        stream.broken = True
        stream.signal()
        self._ending[ino] = stream
        assert self.nursery is not None  # a stream exists only once the executor runs
        self.nursery.start_soon(self._abort, stream)

    async def wrote(
        self, ino: int, offset: int, length: int, *, key: str, seq: int, headers: Callable[[], dict[str, str]]
    ) -> None:
        """``length`` bytes were written at ``offset``; ``seq`` is the file's waiting put.

        Starts the stream at the threshold, starts the parts that are complete, and holds the
        writer back while the bucket lags (see the module docstring).
        """
        written = self._written.get(ino)
        if written is None:
            return
        if offset != written:
            self.end(ino, "a write elsewhere than at the end")
            return
        written += length
        self._written[ino] = written
        stream = self.active.get(ino)
        if stream is not None and (stream.seq != seq or stream.key != key):
            self.end(ino, "its put was replaced")
            return
        if stream is None:
            if self.nursery is None or not self.store.is_multipart(written):
                return
            stream = self.active[ino] = Stream(ino, key, seq, headers(), running=1)
            self.nursery.start_soon(self._create, stream)
        self._pump(stream)
        while self._lagging(stream):
            await stream.changed.wait()  # bounded by the part uploads' time rule

    def take(self, ino: int, seq: int, key: str) -> Stream | None:
        """The put ``seq`` of ``ino`` starts: hand it the file's stream if it is this put's.

        From here the stream is the put's: nothing more is streamed for the file (a later
        change goes by the upload after close).
        """
        stream = self.active.get(ino)
        if stream is None or stream.seq != seq or stream.key != key:
            return None
        del self.active[ino]
        self._written.pop(ino, None)
        return stream

    def blocks(self, ino: int, seq: int, key: str) -> bool:
        """Whether a put of ``ino`` must not start yet: an ended stream's abort is still under way
        (its journal record shares the put's name), or the file's stream belongs to another put."""
        if ino in self._ending:
            return True
        stream = self.active.get(ino)
        if stream is not None and (stream.seq != seq or stream.key != key):
            self.end(ino, "its put was replaced")
            return True
        return False

    def streaming(self, ino: int) -> bool:
        return ino in self.active

    def candidate(self, ino: int) -> bool:
        """Whether writes to ``ino`` are being followed (it may stream, or does)."""
        return ino in self._written

    # -- the uploads ------------------------------------------------------------------------------------

    def _lagging(self, stream: Stream) -> bool:
        """All ``limit`` slots are busy and another full part waits: the writer is ahead enough."""
        busy = stream.running >= self.limit
        return busy and not stream.broken and self._full_parts(stream) > stream.started

    def _full_parts(self, stream: Stream) -> int:
        return self._written.get(stream.ino, 0) // self.store.part_size

    def _pump(self, stream: Stream) -> None:
        """Start the parts that are fully written, up to ``limit`` in flight."""
        if stream.broken or not stream.upload_id or self.nursery is None:
            return
        while stream.running < self.limit and stream.started < self._full_parts(stream):
            stream.started += 1
            stream.running += 1
            self.nursery.start_soon(self._part, stream, stream.started)

    async def _create(self, stream: Stream) -> None:
        try:
            upload_id = await self._run_s3(self.store.create_multipart, stream.key, stream.headers)
            try:
                await self._run_io(self.journal.record_upload, stream.seq, stream.key, upload_id)
            finally:
                stream.upload_id = upload_id  # only now may parts go: the id is journaled (or aborted)
        except (StoreError, OSError) as exc:
            log.warning("write-back: could not stream %s (%s); it is uploaded after close", stream.key, exc)
            self._fail(stream)
        finally:
            stream.running -= 1
            stream.signal()
        self._pump(stream)

    async def _part(self, stream: Stream, number: int) -> None:
        try:
            async with self._parts:
                (part,) = await self._run_s3(
                    self.store.upload_parts, stream.key, stream.upload_id, self._path(stream.ino), [number]
                )
            stream.parts[number] = part
        except (StoreError, OSError, ValueError) as exc:
            log.warning("write-back: part %d of %s failed (%s); upload after close", number, stream.key, exc)
            self._fail(stream)
        finally:
            stream.running -= 1
            stream.signal()
        self._pump(stream)

    def _fail(self, stream: Stream) -> None:
        if self.active.get(stream.ino) is stream:
            self.end(stream.ino, "an upload failed")
        else:
            stream.broken = True  # already taken by its put, which sees it broken and falls back

    async def _abort(self, stream: Stream) -> None:
        """Abort an ended stream's upload once nothing of it is in flight, then drop its record."""
        try:
            await stream.settled()
            if stream.upload_id:
                await self.discard(stream)
        finally:
            if self._ending.get(stream.ino) is stream:
                del self._ending[stream.ino]
            self._on_ended()

    async def discard(self, stream: Stream) -> None:
        """Abort ``stream``'s upload and forget it. If the abort fails the record stays, and the
        next mount aborts it (no orphan parts stay billed either way)."""
        try:
            await self._run_s3(self.store.abort_multipart, stream.key, stream.upload_id)
        except StoreError as exc:
            log.warning("write-back: could not abort the upload of %s (%s); next mount will", stream.key, exc)
            return
        with contextlib.suppress(OSError):
            await self._run_io(self.journal.forget_upload, stream.seq)
