"""Write-back export: local changes become ordinary objects, and a crash loses none of them.

This is the coordinator. It follows the state machine of docs/writeback.md ("The life of
a key" and "The life of a staged file") and delegates each job to one part:

- journal.Journal: the durable, ordered list of pending ops (committed before an ack);
- files.StagedFiles: staging files, writers, and when a staging file may retire;
- schedule.startable: which ops may start (per-key journal order);
- upload.Uploader: one op against the bucket, with conditions and conflict handling.

Failures: transient ones (timeouts, 5xx, 429, connection errors) retry with backoff and
stay journaled; permanent ones (403, 400, a deleted bucket) are not retried during a
flush, which then fails at once naming the files (errors.FlushFailed). Either way the
data stays staged and journaled for a later flush or the next mount.

Everything here runs on the trio loop; blocking work goes through ``run_s3``/``run_io``.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import trio

from ..config import DEFAULT_FLUSH_TIMEOUT
from ..errors import FlushFailed, Permanent, StoreError
from ..meta.namespace import Namespace
from ..meta.records import Flag, Inode, Kind
from ..read.follow import read_following
from ..read.hydrator import Hydrator, ObjectVersion
from ..read.places import Where
from ..store.objectstore import ObjectStore
from .attempts import Attempts
from .files import BlockSink, StagedFiles
from .journal import Journal, Op
from .ledger import JournalOp, Ledger
from .renames import DirRenames
from .schedule import NODE_OPS, startable, target_key
from .staging import Staging
from .stream import Stream, Streams
from .upload import Outcome, Uploader, headers_of

log = logging.getLogger("tierfs.writeback")

RunBlocking = Callable[..., Awaitable[Any]]
Progress = Callable[[dict[str, Any]], Awaitable[None]]
COALESCE = 0.01  # seconds the executor lets wake-ups gather before it looks at the journal again

@dataclass
class WriteBackStats:
    uploads_done: int = 0
    uploads_failed: int = 0
    bytes_uploaded: int = 0
    conflicts: int = 0


class WriteBack:
    def __init__(
        self,
        *,
        bucket: str,
        namespace: Namespace,
        store: ObjectStore,
        hydrator: Hydrator,
        staging: Staging,
        journal: Journal,
        cache: BlockSink,
        run_s3: RunBlocking,
        run_io: RunBlocking,
        delay: float,
        concurrency: int = 16,
        upload_concurrency: int = 8,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.ns = namespace
        self.store = store
        self.staging = staging
        self.journal = journal
        self.files = StagedFiles(
            bucket=bucket, staging=staging, hydrator=hydrator, cache=cache, run_io=run_io
        )
        self.uploader = Uploader(store, staging.path, record_upload=journal.record_upload)
        self.streams = Streams(
            store=store,
            journal=journal,
            staging_path=staging.path,
            run_s3=run_s3,
            run_io=run_io,
            limit=upload_concurrency,
            on_ended=lambda: self._signal(),
        )
        self._run_s3 = run_s3
        self._run_io = run_io
        self.delay = delay
        self.concurrency = concurrency
        self._clock = clock
        self.stats = WriteBackStats()
        self.ledger = Ledger(journal, namespace, run_io)
        # seq -> the key a running op writes, fixed when it starts: a rename meanwhile moves
        # the node, not the upload in flight (see renamed()).
        self._running: dict[int, str] = {}
        self._started_gen: dict[int, int] = {}  # seq of a running put -> its staging file's gen at start
        # ino -> (key, ETag, gen at its start) of the last put that settled under the node's name:
        # what a staging file may retire as once nothing else is pending (see _quiesce).
        self._last_put: dict[int, tuple[str, str, int]] = {}
        self.attempts = Attempts(clock)
        self._flushing = 0
        self._fsyncs = 0  # fsync calls waiting: the executor does not coalesce wake-ups meanwhile
        self._wake = trio.Event()
        self._changed = trio.Event()
        self.dir_renames = DirRenames()  # what is held back while a directory rename is journaled
        if self.ledger.ops:
            log.info("write-back: replaying %d journaled operations", len(self.ledger.ops))

    # -- queries ----------------------------------------------------------------------------------------

    def where(self, ino: int, key: str) -> Where:
        """Where the bytes of ``ino`` (now named ``key``) are right now: the one question the read
        path asks (``read.places.BytePlaces``, which write-back satisfies). Short and on the loop
        (two dict lookups)."""
        if self.is_staged(ino):
            return Where(True, key)
        return Where(False, self.data_key(ino, key))

    def data_key(self, ino: int, key: str) -> str:
        """Where the bytes of ``ino`` (now named ``key``) are in the bucket right now (Ledger.data_key)."""
        return self.ledger.data_key(ino, key)

    def is_staged(self, ino: int) -> bool:
        return ino in self.files.staged

    def size_of(self, ino: int) -> int | None:
        return self.files.size_of(ino)

    def status(self) -> dict[str, Any]:
        dirty = {op.ino for op in self.ledger.ops if op.kind == "put"}
        return {
            "dirty_files": len(dirty),
            "dirty_bytes": sum(self.files.size_of(i) or 0 for i in dirty),
            "uploads_pending": len(self.ledger.ops),
            "uploads_running": len(self._running),
            "uploads_done": self.stats.uploads_done,
            "uploads_failed": self.stats.uploads_failed,
            "bytes_uploaded": self.stats.bytes_uploaded,
            "conflicts": self.stats.conflicts,
            "failing": self.attempts.failing(),
        }

    def _node_key(self, ino: int) -> str | None:
        node = self.ns.get(ino)
        return node.key if node is not None else None

    # -- journal plumbing -------------------------------------------------------------------------------

    async def _append(self, *ops: JournalOp, drop: list[Op] | None = None) -> None:
        """Journal ``ops`` (and forget ``drop``) in one transaction, then wake the executor."""
        for op in await self.ledger.append(ops, drop or [], self._running):
            self._forget_attempts(op)
        self._wake.set()

    def _forget_attempts(self, op: Op) -> None:
        self.attempts.forget(op.seq)

    def _waiting_puts(self, inos: Callable[[int], bool]) -> list[Op]:
        return self.ledger.waiting_puts(inos, self._running)

    def _has_waiting_put(self, ino: int) -> bool:
        return self.ledger.waiting_put(ino, self._running) is not None

    def _put(self, node: Inode) -> tuple[str, dict[str, Any]]:
        return ("put", {"ino": node.ino, "key": node.key})

    # -- the FUSE adapter's calls ----------------------------------------------------------------------

    async def open_for_write(self, node: Inode, *, truncate: bool) -> None:
        """Make ``node`` writable: stage its content (unless truncating) and count the writer.

        The writer is counted before anything is awaited, so an upload finishing meanwhile
        cannot retire the staging file under us.
        """
        log.debug("write-back: open for write ino %d %s truncate=%s", node.ino, node.key, truncate)
        self.files.add_writer(node.ino)
        try:
            async with self.files.lock(node.ino):
                if not truncate:
                    await self._stage(node)
                else:
                    await self._truncate_staged(node, 0)
            if truncate:
                await self._ensure_waiting_put(node.ino)
        except BaseException:
            self.files.drop_writer(node.ino, self._clock())
            raise
        if truncate and self.files.writers(node.ino) == 1:
            self.streams.begin(node.ino)  # empty, one writer: streamed if it is written sequentially
        else:
            self.streams.end(node.ino, "another writer" if truncate else "opened without O_TRUNC")

    async def _truncate_staged(self, node: Inode, size: int) -> None:
        """Under the file's lock: journal the change, then make the staging file ``size`` long."""
        await self._stage(node, empty=size == 0)
        async with self.files.mutating(node.ino):
            await self._mark_dirty(node)
            await self.files.truncate(node.ino, size)

    async def _stage(self, node: Inode, *, empty: bool = False) -> None:
        """Stage ``node`` (from where its bytes are now, unless ``empty``). From then on its bytes are
        local: copies still pending from earlier renames no longer say where they are (data_key)."""
        if node.ino in self.files.staged:
            return
        if empty:
            await self.files.stage(node.ino, None)
        else:
            await read_following(
                lambda: self._source_of(self.ns.get(node.ino) or node),
                lambda source: self.files.stage(node.ino, source),
            )
        self.ledger.staged(node.ino)

    def _source_of(self, node: Inode) -> ObjectVersion:
        return ObjectVersion(node.ino, self.data_key(node.ino, node.key), node.etag, node.size)

    async def created(self, node: Inode, content: bytes = b"", *, open_writer: bool = False) -> None:
        """A new file, symlink or directory was created here (``open_writer``: by create(2), still open)."""
        if node.kind is Kind.DIR:
            await self._append(("marker", {"ino": node.ino}))
            return
        if open_writer:
            self.files.add_writer(node.ino)
        await self.files.create(node.ino, content)
        await self._append(self._put(node))
        if open_writer:
            self.streams.begin(node.ino)

    async def write(self, ino: int, offset: int, data: bytes) -> int:
        node = self.ns.get(ino)
        if node is None:  # unlinked while open: POSIX keeps it writable, the bucket never sees it
            return await self.files.write(ino, offset, data)
        async with self.files.mutating(ino):
            await self._mark_dirty(node)
            written = await self.files.write(ino, offset, data)
        await self._ensure_waiting_put(ino)
        if self.streams.candidate(ino):
            await self._streamed(node, offset, written)
        return written

    async def _streamed(self, node: Inode, offset: int, length: int) -> None:
        """Tell the stream of ``node`` about a write; it may hold the writer back."""
        ino = node.ino
        put = self.ledger.waiting_put(ino, self._running)
        if put is None:
            self.streams.end(ino, "no put waiting")
            return
        await self.streams.wrote(
            ino, offset, length, key=put.key, seq=put.seq,
            headers=lambda: headers_of(node, self.journal.token(put.seq)),
        )  # fmt: skip

    async def read_staged(self, ino: int, offset: int, size: int) -> bytes | None:
        """Read the staging file; None if it retired meanwhile (the bucket version has its bytes)."""
        return await self.files.read(ino, offset, size)

    async def truncate(self, node: Inode, size: int) -> None:
        """truncate(2): under the staging lock, so no retirement can interleave."""
        with self.files.holding_writer(node.ino, self._clock):  # the staging file must stay meanwhile
            self.streams.end(node.ino, "truncated")
            async with self.files.lock(node.ino):
                await self._truncate_staged(node, size)
            await self._ensure_waiting_put(node.ino)

    async def _mark_dirty(self, node: Inode) -> None:
        """Journal a put for ``node`` unless one is already waiting (not yet running)."""
        if not self._has_waiting_put(node.ino):
            await self._append(self._put(node))
            flags = node.flags | Flag.LOCAL | Flag.META_KNOWN
            if flags != node.flags:
                await self._run_io(self.ns.update, node.ino, flags=flags)

    async def _ensure_waiting_put(self, ino: int) -> None:
        """After a mutation: if the put journaled before it has started meanwhile, it may have
        read the file without this change, so journal another one."""
        if not self._has_waiting_put(ino):
            node = self.ns.get(ino)
            if node is not None:
                await self._append(self._put(node))

    async def release_writer(self, ino: int, written_ns: int | None = None) -> None:
        """A writer closed. ``written_ns``: when it last wrote, which becomes the mtime and ctime
        the record keeps (the adapter shows them from memory until then)."""
        writers = self.files.drop_writer(ino, self._clock())
        if writers is None:
            return
        node = self.ns.get(ino)
        if node is None:
            if not writers:  # unlinked while open: the staging file has no one left
                await self.files.discard(ino)
            return
        if not self.ledger.pending(ino):
            if not writers and node.etag:
                # Opened for writing but never written: the staging file equals the object.
                await self.files.retire(ino, node.key, node.etag, lambda: self._still_needed(ino))
            return
        size = self.files.size_of(ino)
        if size is not None:
            times: dict[str, int] = {}
            if written_ns is not None:
                times = {"mtime_ns": written_ns, "ctime_ns": max(written_ns, node.ctime_ns)}
            await self._run_io(lambda: self.ns.update(ino, size=size, **times))
        self._wake.set()

    def _still_needed(self, ino: int, besides: int = 0) -> bool:
        return self.ledger.put_journaled(ino, besides=besides) or self.files.writers(ino) > 0

    async def metadata_changed(self, node: Inode) -> None:
        """chmod/chown/utimens: a pending put carries the headers; otherwise rewrite them in place."""
        self.streams.end(node.ino, "attributes changed")  # its headers went with its first part
        if self._has_waiting_put(node.ino) or (node.flags & Flag.LOCAL and not node.etag):
            return
        if not node.key:
            return  # the root of a whole-bucket mount has no object to carry its attributes
        kind = "marker" if node.is_dir else "meta"
        await self._append((kind, {"ino": node.ino}))

    async def removed(self, node: Inode) -> None:
        """unlink/rmdir: drop pending uploads of the inode and delete its key in the bucket."""
        log.debug("write-back: removed ino %d %s", node.ino, node.key)
        self.streams.end(node.ino, "unlinked")
        drop = self._waiting_puts(lambda ino: ino == node.ino)
        await self._append(("delete", {"key": node.key}), drop=drop)
        if not self.files.writers(node.ino):
            await self.files.discard(node.ino)

    async def linked(self, node: Inode, key: str) -> None:
        """link(2): the new name ``key`` becomes a copy of the inode's object (after its pending put)."""
        await self._append(("copy", {"src": node.key, "key": key, "ino": 0}))

    async def name_removed(self, key: str) -> None:
        """One hard link of an inode was unlinked; its object goes, the inode's other names stay."""
        await self._append(("delete", {"key": key}))

    async def promoted(self, node: Inode, old_key: str) -> None:
        """The record's own name was unlinked and ``node`` now carries another of its hard links:
        like a rename from ``old_key``, except that the new key holds a copy already. It is deleted
        first, so that the rename's put (a staged file) finds the key free and is not a conflict."""
        async with self.renaming(node):
            await self._append(("delete", {"key": node.key}))
            await self.renamed(node, old_key)

    @contextlib.asynccontextmanager
    async def renaming(self, node: Inode) -> AsyncIterator[None]:
        """Bracket a rename from before the namespace moves ``node`` until its journal entries exist.

        In between, the moved record is LOCAL but nothing is journaled under its new name yet:
        an op of the inode finishing then must not settle it (a listing would drop the entry
        whose object the pending copy has not made yet).
        """
        with self.dir_renames.bracket(node.is_dir), self.ledger.holding([] if node.is_dir else [node.ino]):
            yield
        for ino in self.dir_renames.take_deferred():
            await self._quiesce(ino)
        if not node.is_dir:
            await self._quiesce(node.ino)

    async def renamed(self, moved: Inode, old_key: str) -> None:
        """Journal the bucket side of a rename that the namespace already carried out.

        A waiting put of a moved file is re-journaled at the end, under the new key: it
        must come after everything journaled for that key before (e.g. the delete of a
        file the rename replaced), and ordering is by journal position.
        """
        log.debug("write-back: renamed ino %d %s -> %s", moved.ino, old_key, moved.key)
        if not moved.is_dir:
            self.streams.end(moved.ino, "renamed")
            async with self.files.lock(moved.ino):  # the staging file must not be retired meanwhile
                if moved.ino in self.files.staged:  # its bytes are here (dirty, or open for writing)
                    # The node's ETag described the old key; the new key has no object of ours yet.
                    await self._run_io(self.ns.update, moved.ino, etag="")
                    waiting = self._waiting_puts(lambda ino: ino == moved.ino)
                    await self._append(self._put(moved), ("delete", {"key": old_key}), drop=waiting)
                else:
                    await self._append(
                        ("copy", {"src": old_key, "key": moved.key, "ino": moved.ino}),
                        ("delete", {"key": old_key}),
                    )
            return
        await self._renamed_dir(moved, old_key)

    async def _renamed_dir(self, moved: Inode, old_key: str) -> None:
        """Journal the bucket side of a directory rename.

        Puts below the old name that have not started are frozen until they are re-journaled
        under the new name. Uploads already in flight write under the old name, and may
        finish before or after the listing below sees them: do them again under the new
        name and delete what they wrote. Their staging files are held until then.
        """
        try:
            with self.dir_renames.freezing(old_key):
                await self._journal_dir_rename(moved, old_key)
        finally:
            self._wake.set()

    async def _journal_dir_rename(self, moved: Inode, old_key: str) -> None:
        by_seq = {op.seq: op for op in self.ledger.ops}
        in_flight = [
            (by_seq[seq], key)
            for seq, key in self._running.items()
            if key.startswith(old_key) and seq in by_seq and by_seq[seq].kind in ("put", "marker")
        ]
        with self.ledger.holding([op.ino for op, _ in in_flight if op.kind == "put"]):
            remote = await self._run_s3(lambda: list(self.store.list_tree(old_key)))
            # The moved directory's marker first: it exists even while empty.
            ops: list[tuple[str, dict[str, Any]]] = [("marker", {"ino": moved.ino})]
            for obj in remote:
                new_key = moved.key + obj.key[len(old_key) :]
                local = await self._run_io(self.ns.path_of_key, new_key)
                if local is not None and local.key == new_key and self._has_waiting_put(local.ino):
                    ops.append(("delete", {"key": obj.key}))  # an extra hard link (other key) is copied
                elif local is not None and local.is_dir:
                    # A marker is rewritten, not copied: some servers (SeaweedFS) store ``dir/``
                    # keys as directories that CopyObject cannot read.
                    ops.append(("marker", {"ino": local.ino}))
                    ops.append(("delete", {"key": obj.key}))
                else:
                    ops.append(("copy", {"src": obj.key, "key": new_key, "ino": local.ino if local else 0}))
                    ops.append(("delete", {"key": obj.key}))
            if not any(obj.key == old_key for obj in remote):
                ops.append(("delete", {"key": old_key}))  # tombstones the old prefix until all below is gone

            def below(ino: int) -> bool:
                node = self.ns.get(ino)
                return node is not None and node.key.startswith(moved.key)

            waiting = self._waiting_puts(below)
            requeued: set[int] = set()
            for op in waiting + [op for op, _ in in_flight if op.kind == "put"]:
                node = self.ns.get(op.ino)
                if node is not None and op.ino not in requeued:
                    requeued.add(op.ino)
                    await self._run_io(self.ns.update, op.ino, etag="")
                    ops.append(self._put(node))
            for op, key in in_flight:
                if op.kind == "marker" and op.ino not in requeued:
                    requeued.add(op.ino)
                    ops.append(("marker", {"ino": op.ino}))
                ops.append(("delete", {"key": key}))
            await self._append(*ops, drop=waiting)

    async def fsync(self, ino: int) -> None:
        """Upload ``ino`` now and return once the bucket has it (or raise after a failure)."""
        def mine() -> list[Op]:
            return [op for op in self.ledger.ops_of(ino) if op.kind in NODE_OPS]

        if not mine():
            return
        self._fsyncs += 1
        # try again now, and judge by this attempt, not by the one before
        self.attempts.retry_now(op.seq for op in mine())
        self._wake.set()
        try:
            with self.files.forced(ino):
                while pending := mine():
                    failed = self.attempts.of(op.seq for op in pending)
                    if failed and not any(op.seq in self._running for op in pending):
                        kind = Permanent if failed[0].permanent else StoreError
                        what, error = failed[0].what, failed[0].error
                        raise kind(f"upload of {what} failed ({error}); it stays journaled")
                    await self._changed_wait()
        finally:
            self._fsyncs -= 1

    async def _changed_wait(self) -> None:
        event = self._changed
        await event.wait()

    async def flush_all(
        self, progress: Progress | None = None, *, timeout: float | None = None
    ) -> dict[str, Any]:
        """Carry out the whole journal now (``tierfs flush`` / umount), reporting progress.

        Returns once the journal is empty. Raises FlushFailed, naming every path still
        pending with its last error, as soon as nothing but permanently failed ops (and
        the ops queued behind them) is left, or when ``timeout`` seconds have passed.
        """
        self._flushing += 1
        self.attempts.retry_now()
        self._wake.set()
        started = time.monotonic()
        deadline = started + (DEFAULT_FLUSH_TIMEOUT if timeout is None else timeout)
        start_done, start_bytes = self.stats.uploads_done, self.stats.bytes_uploaded
        total = len(self.ledger.ops)
        total_bytes = sum(self.files.size_of(op.ino) or 0 for op in self.ledger.ops if op.kind == "put")
        try:
            while self.ledger.ops:
                if progress is not None:
                    await progress(
                        {
                            "done_files": self.stats.uploads_done - start_done,
                            "total_files": max(
                                total, self.stats.uploads_done - start_done + len(self.ledger.ops)
                            ),
                            "done_bytes": self.stats.bytes_uploaded - start_bytes,
                            "total_bytes": total_bytes,
                        }
                    )
                if self._stuck_on_permanent():
                    raise FlushFailed(self._pending_failures(), "permanent errors, not retrying")
                if time.monotonic() >= deadline:
                    raise FlushFailed(
                        self._pending_failures(), f"flush timeout ({deadline - started:.0f} s) passed"
                    )
                with trio.move_on_after(min(0.25, max(0.0, deadline - time.monotonic()))):
                    await self._changed_wait()
        finally:
            self._flushing -= 1
            self.attempts.after_flush()
        return {
            "uploaded_files": self.stats.uploads_done - start_done,
            "uploaded_bytes": self.stats.bytes_uploaded - start_bytes,
            "seconds": round(time.monotonic() - started, 3),
        }

    def _stuck_on_permanent(self) -> bool:
        """Nothing runs or can start, and a permanent failure is why."""
        if self._running or not self.attempts.any_permanent():
            return False
        return not startable(self.ledger.ops, self._running, self._ready, self._node_key, self.concurrency)

    def _pending_failures(self) -> dict[str, str]:
        """Every pending op, named by path, with its last error (or what it waits for)."""
        out = self.attempts.failing()
        for op in self.ledger.ops:
            what = self._what(op)
            out.setdefault(what, "running" if op.seq in self._running else "waiting behind a failed upload")
        return out

    def _what(self, op: Op, key: str = "") -> str:
        """An op named as a user knows it: the path under the mount of the key it writes."""
        key = key or self._running.get(op.seq) or target_key(op, self._node_key) or op.key
        if not key:
            return f"inode {op.ino}"
        prefix = self.ns.policy.root_prefix
        return key[len(prefix) :] if prefix and key.startswith(prefix) else key

    # -- the executor ----------------------------------------------------------------------------------

    async def recover(self) -> None:
        """After a restart: abort multipart uploads a crash left, and size staged files from disk."""
        for seq, key, upload_id in await self._run_io(self.journal.open_uploads):
            try:
                await self._run_s3(self.store.abort_multipart, key, upload_id)
                await self._run_io(self.journal.forget_upload, seq)
                log.info("write-back: aborted multipart upload %s of %s left by a crash", upload_id, key)
            except StoreError as exc:
                log.warning("write-back: could not abort multipart upload %s of %s: %s", upload_id, key, exc)
        async def resize(ino: int) -> None:
            size = await self._run_io(self.staging.size, ino)
            self.files.recovered(ino, size)
            node = await self._run_io(self.ns.update, ino, size=size)
            if node is None or not self.ledger.pending(ino):
                await self.files.discard(ino)  # unlinked, or uploaded just before the crash

        # Concurrently, so the record updates share group commits: the mount serves nothing
        # (not even `tierfs flush`) before this is done.
        async with trio.open_nursery() as nursery:
            for ino in sorted(self.files.staged):
                nursery.start_soon(resize, ino)

    async def run(self, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        await self.recover()
        async with trio.open_nursery() as nursery:
            self.streams.nursery = nursery
            task_status.started()
            while True:
                self._wake = trio.Event()
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
                    await self._wake.wait()
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
            self._running.pop(op.seq, None)
            self._started_gen.pop(op.seq, None)
            self._signal()
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
            self._running.pop(op.seq, None)
            self._started_gen.pop(op.seq, None)
            self._signal()

    def _failed(self, op: Op, key: str, exc: Exception) -> None:
        self.stats.uploads_failed += 1
        permanent = isinstance(exc, Permanent)
        what = self._what(op, key)
        error = f"{type(exc).__name__}: {exc}"
        self.attempts.failed(op.seq, what, error, permanent=permanent, flushing=bool(self._flushing))
        message = f"write-back {op.kind} {what} failed ({'permanent' if permanent else 'will retry'})"
        if isinstance(exc, StoreError):
            log.warning("%s: %s", message, exc)
        else:
            log.exception(message)

    def _signal(self) -> None:
        self._wake.set()
        changed, self._changed = self._changed, trio.Event()
        changed.set()

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
                await self._settle(op, key, outcome)
        await self.ledger.complete(op)
        self._forget_attempts(op)
        if op.ino and op.kind != "delete":
            await self._quiesce(op.ino)

    async def _settle(self, op: Op, key: str, outcome: Outcome) -> None:
        """Record what the bucket now has at ``key``, if ``key`` is still the node's name."""
        node = self.ns.get(op.ino)
        log.debug(
            "write-back: settle #%d ino %d at %s: etag %s (node %s, etag %s)",
            op.seq, op.ino, key, outcome.etag, node.key if node else None, node.etag if node else None,
        )  # fmt: skip
        if node is None or node.key != key:
            # Renamed (or removed) meanwhile: our ETag describes a key that is no longer its name,
            # unless a copy still pending reads from it: then reads go there (data_key), with it.
            if node is not None and op.kind == "copy" and outcome.etag:
                chain = [o for o in self.ledger.copies_of(op.ino) if o.seq != op.seq]
                if chain and chain[0].src == key:
                    await self._run_io(lambda: self.ns.update(op.ino, etag=outcome.etag))
            return
        if outcome.conflict_key:
            if self._pending_for(op.ino, besides=op.seq):
                return  # later changes of ours follow; they will find the same conflict
            # The bucket's version wins the name; ours lives on under the conflict name.
            self._last_put.pop(op.ino, None)
            await self._run_io(lambda: self.ns.settle(op.ino, etag="", flags=Flag.NONE))
            await self._run_io(self.ns.update, node.parent, checked=0.0)
            await self.files.discard(op.ino)
            return
        changes: dict[str, Any] = {"etag": outcome.etag or node.etag, "flags": node.flags | Flag.META_KNOWN}
        if op.kind == "put":
            # ETag and size describe one object: once the file is no longer staged, reads go to
            # the bucket with both. While it is staged, attributes come from the staging file.
            changes["size"] = outcome.size
            self._last_put[op.ino] = (key, outcome.etag, self._started_gen.get(op.seq, -1))
        await self._run_io(lambda: self.ns.settle(op.ino, **changes))

    def _pending_for(self, ino: int, *, besides: int = 0) -> bool:
        """Anything of ``ino`` still to do: a writer, a put on its way, or any journaled op."""
        return self._still_needed(ino, besides=besides) or any(
            o.seq != besides for o in self.ledger.ops_of(ino)
        )

    def _pending_at_name(self, ino: int, key: str) -> bool:
        """Anything of ``ino`` still to do under its current name ``key``. Ops it left behind under
        names it had before (a copy or an upload in flight when it was renamed again) do not count:
        their results never describe the node (see _settle), and a delete of that name follows."""
        return self._still_needed(ino) or any(
            o.kind == "put" or target_key(o, self._node_key) == key for o in self.ledger.ops_of(ino)
        )

    async def _quiesce(self, ino: int) -> None:
        """After the last pending op of ``ino`` under its current name: the record stops being
        LOCAL, and the staging file retires if its bytes are exactly the last settled upload's."""
        node = self.ns.get(ino)
        if node is None:
            self._last_put.pop(ino, None)
            return
        if self.dir_renames.defer(ino):
            return  # renaming() runs it once the rename is journaled
        if self._pending_at_name(ino, node.key):
            return
        last = self._last_put.pop(ino, None)
        if node.flags & Flag.LOCAL and node.etag:
            await self._run_io(lambda: self.ns.settle(ino, flags=node.flags & ~Flag.LOCAL))
        if last is None or ino not in self.files.staged:
            return
        key, etag, gen = last

        def still_needed() -> bool:
            current = self.ns.get(ino)
            return (
                current is None
                or current.key != key
                or current.etag != etag
                or self._pending_at_name(ino, key)
                or not self.files.unchanged_since(ino, gen)
            )

        if not still_needed():
            await self.files.retire(ino, key, etag, still_needed)
