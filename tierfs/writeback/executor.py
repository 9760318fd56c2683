"""The executor: journals ops, starts those that may run, and carries each out against the bucket.

It alone changes which ops are running (``_running``: seq -> the key a running op writes,
fixed when it starts, so a rename meanwhile moves the node, not the upload in flight), the
staging generation each running put started from, how many flushes and fsyncs are waiting
(the executor does not coalesce wake-ups then), and the upload counters. Other parts read
``running``; fsync and flush waiters enter ``flushing``/``urgent``. What a finished op means
for the namespace and its staging file is the ``Settler``'s job.

Runs on the trio loop; each op's bucket call runs in a worker thread through ``run_s3``.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import trio

from ..errors import Permanent, StoreError
from ..meta.namespace import Namespace
from .attempts import Attempts
from .files import StagedFiles
from .journal import Journal, Op
from .ledger import JournalOp, Ledger
from .renames import DirRenames
from .schedule import startable, target_key
from .settle import Settler
from .stream import Stream, Streams
from .upload import Outcome, Uploader
from .wakeup import Wakeup

log = logging.getLogger("tierfs.writeback")

RunBlocking = Callable[..., Awaitable[Any]]
COALESCE = 0.01  # seconds the executor lets wake-ups gather before it looks at the journal again


@dataclass
class WriteBackStats:
    uploads_done: int = 0
    uploads_failed: int = 0
    bytes_uploaded: int = 0
    conflicts: int = 0


class Executor:
    def __init__(
        self,
        *,
        namespace: Namespace,
        journal: Journal,
        ledger: Ledger,
        files: StagedFiles,
        streams: Streams,
        uploader: Uploader,
        attempts: Attempts,
        dir_renames: DirRenames,
        settler: Settler,
        wakeup: Wakeup,
        run_s3: RunBlocking,
        delay: float,
        concurrency: int,
        clock: Callable[[], float],
    ) -> None:
        self.ns = namespace
        self.journal = journal
        self.ledger = ledger
        self.files = files
        self.streams = streams
        self.uploader = uploader
        self.attempts = attempts
        self.dir_renames = dir_renames
        self.settler = settler
        self.wakeup = wakeup
        self._run_s3 = run_s3
        self.delay = delay
        self.concurrency = concurrency
        self._clock = clock
        self.stats = WriteBackStats()
        self._running: dict[int, str] = {}
        self._started_gen: dict[int, int] = {}  # seq of a running put -> its staging file's gen at start
        self._flushing = 0
        self._fsyncs = 0  # fsync calls waiting: the executor does not coalesce wake-ups meanwhile

    # -- what other parts ask and enter -------------------------------------------------------------------

    @property
    def running(self) -> Mapping[int, str]:
        """seq -> the key each running op writes (read-only)."""
        return MappingProxyType(self._running)

    @property
    def is_flushing(self) -> bool:
        return bool(self._flushing)

    @contextlib.contextmanager
    def flushing(self) -> Iterator[None]:
        """A flush waits: every put is ready now, and permanent failures are not retried."""
        self._flushing += 1
        try:
            yield
        finally:
            self._flushing -= 1

    @contextlib.contextmanager
    def urgent(self) -> Iterator[None]:
        """An fsync waits: passes run at once, without coalescing wake-ups."""
        self._fsyncs += 1
        try:
            yield
        finally:
            self._fsyncs -= 1

    async def append(self, *ops: JournalOp, drop: list[Op] | None = None) -> None:
        """Journal ``ops`` (and forget the ops of ``drop`` that have not started) in one
        transaction, then wake the executor."""
        for op in await self.ledger.append(ops, drop or [], self._running):
            self.attempts.forget(op.seq)
        self.wakeup.wake()

    def waiting_puts(self, inos: Callable[[int], bool]) -> list[Op]:
        return self.ledger.waiting_puts(inos, self._running)

    def waiting_put(self, ino: int) -> Op | None:
        return self.ledger.waiting_put(ino, self._running)

    def stuck_on_permanent(self) -> bool:
        """Nothing runs or can start, and a permanent failure is why."""
        if self._running or not self.attempts.any_permanent():
            return False
        return not startable(self.ledger.ops, self._running, self._ready, self._node_key, self.concurrency)

    def what(self, op: Op, key: str = "") -> str:
        """An op named as a user knows it: the path under the mount of the key it writes."""
        key = key or self._running.get(op.seq) or target_key(op, self._node_key) or op.key
        if not key:
            return f"inode {op.ino}"
        prefix = self.ns.policy.root_prefix
        return key[len(prefix) :] if prefix and key.startswith(prefix) else key

    def _node_key(self, ino: int) -> str | None:
        node = self.ns.get(ino)
        return node.key if node is not None else None

    # -- the loop -----------------------------------------------------------------------------------------

    async def run(self, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            self.streams.serve_in(nursery)
            task_status.started()
            while True:
                woken = self.wakeup.rearm()
                ops = self.ledger.ops
                for op in startable(ops, self._running, self._ready, self._node_key, self.concurrency):
                    key = target_key(op, self._node_key) or ""
                    self._running[op.seq] = key
                    stream = None
                    if op.kind == "put":
                        self._started_gen[op.seq] = self.files.gen(op.ino)
                        stream = self.streams.take(op.ino, op.seq, key)
                    nursery.start_soon(self._execute, op, key, stream)
                wait = self._next_deadline() - self._clock()
                with trio.move_on_after(max(0.05, wait) if not math.isinf(wait) else math.inf):
                    await woken.wait()
                if not (self._flushing or self._fsyncs):
                    # Coalesce wake-ups: a burst of creates and closes would otherwise cost one
                    # pass over the whole journal each (quadratic in the burst). A flush or an
                    # fsync is waited for, so their passes run at once.
                    await trio.sleep(COALESCE)

    def _ready(self, op: Op) -> bool:
        now = self._clock()
        if self.attempts.held_back(op.seq, now) or self.ledger.dropping(op.seq):
            return False
        if self.dir_renames.holds(op):
            return False
        if op.kind != "put":
            return True
        if self.streams.blocks(op.ino, op.seq, op.key):
            return False  # an ended stream's upload is being aborted; its record has this put's name
        return bool(self._flushing) or self.files.due(
            op.ino, now, self.delay, streaming=self.streams.streaming(op.ino)
        )

    def _next_deadline(self) -> float:
        """When the executor must look again by itself: the next retry, or the next put whose
        write-back delay runs out (none while flushing: every put is ready then)."""
        deadline = self.attempts.next_retry(self._running)
        if self._flushing:
            return deadline
        inos = {op.ino for op in self.ledger.ops if op.kind == "put" and op.seq not in self._running}
        for ino in inos:
            due = self.files.due_at(ino, self.delay)
            if due is not None:
                deadline = min(deadline, due)
        return deadline

    # -- one op -------------------------------------------------------------------------------------------

    async def _execute(self, op: Op, key: str, stream: Stream | None = None) -> None:
        path = " -> ".join(k for k in (op.src, key) if k)
        log.debug("write-back: %s #%d ino %d %s", op.kind, op.seq, op.ino, path)
        try:
            if stream is not None:
                await stream.settled()  # its parts in flight are in the bucket or failed
                if stream.broken:
                    await self.streams.discard(stream)
                    stream = None
            outcome: Outcome = await self._run_s3(self._execute_blocking, op, key, stream)
        except Exception as exc:
            # Whatever went wrong, the op stays journaled and is retried: an escaping
            # exception would take the executor, and with it the whole mount, down.
            self._failed(op, key, exc)
            self._ended(op)
            return
        except BaseException:
            self._running.pop(op.seq, None)
            self._started_gen.pop(op.seq, None)
            raise
        try:
            await self._finish(op, key, outcome)
        except Exception:  # the bucket has the change; only local bookkeeping failed
            log.exception("write-back: bookkeeping after %s #%d failed", op.kind, op.seq)
        finally:
            self._ended(op)

    def _ended(self, op: Op) -> None:
        self._running.pop(op.seq, None)
        self._started_gen.pop(op.seq, None)
        self.wakeup.signal()

    def _failed(self, op: Op, key: str, exc: Exception) -> None:
        self.stats.uploads_failed += 1
        permanent = isinstance(exc, Permanent)
        what = self.what(op, key)
        error = f"{type(exc).__name__}: {exc}"
        self.attempts.failed(op.seq, what, error, permanent=permanent, flushing=bool(self._flushing))
        message = f"write-back {op.kind} {what} failed ({'permanent' if permanent else 'will retry'})"
        if isinstance(exc, StoreError):
            log.warning("%s: %s", message, exc)
        else:
            log.exception(message)

    def _execute_blocking(self, op: Op, key: str, stream: Stream | None = None) -> Outcome:
        """One op against the bucket (worker thread): what to write, and on which base."""
        if op.kind == "delete":
            return self.uploader.delete(op)
        node = self.ns.get(op.ino) if op.ino else None
        if op.kind == "copy":
            return self.uploader.copy(op, node.size if node else 0)
        if node is None:
            return Outcome(skipped=True)  # removed since; a later delete op covers the bucket
        token = self.journal.token(op.seq)
        if op.kind == "marker":
            return self.uploader.marker(node, key, token)
        # The version this op replaces: the node's ETag describes its key once every earlier op
        # on that key has finished and settled, which per-key ordering guarantees. A meta runs
        # before the copy of a rename (which waits for its key), so the ETag is still the old key's.
        if op.kind == "meta":
            return self.uploader.meta(node, key, node.etag, token)
        if node.key != key:
            # Renamed after this put was scheduled: the rename journaled a put under the new
            # name and a delete of this one, so uploading here would only be undone.
            log.debug("write-back: put #%d of %s skipped: renamed to %s", op.seq, key, node.key)
            if stream is not None:
                self.uploader.abort(stream)
            return Outcome(skipped=True)
        return self.uploader.put(op, node, key, node.etag, token, stream)

    async def _finish(self, op: Op, key: str, outcome: Outcome) -> None:
        """Settle the namespace first, then drop the op: a crash between replays an op whose
        object carries its own name, which the uploader recognises as done."""
        if not outcome.skipped:
            self.stats.uploads_done += 1
            if op.kind == "put":
                self.stats.bytes_uploaded += outcome.size
            if outcome.conflict_key:
                self.stats.conflicts += 1
            if op.kind in ("put", "meta", "copy", "marker") and op.ino:
                await self.settler.settle(op, key, outcome, self._started_gen.get(op.seq, -1))
        await self.ledger.complete(op)
        self.attempts.forget(op.seq)
        if op.ino and op.kind != "delete":
            await self.settler.quiesce(op.ino)
