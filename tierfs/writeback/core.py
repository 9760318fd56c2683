"""Write-back export: local changes become ordinary objects, and a crash loses none of them.

This is the façade the file-system core and control call. It follows the state machine of
docs/writeback.md ("The life of a key" and "The life of a staged file"): it turns each POSIX
change into journal entries and staging-file work, and delegates every other job to one part,
each of which alone changes its own fields:

- journal.Journal / ledger.Ledger: the durable, ordered list of pending ops and its indexes;
- files.StagedFiles: staging files, writers, and when a staging file may retire;
- executor.Executor: journals ops, starts those that may run (schedule.startable), carries
  each out (upload.Uploader); settle.Settler: what a finished op means for record and file;
- waiters.Waiters: fsync and flush; rename_journal.RenameJournal: the bucket side of renames.

Failures: transient ones (timeouts, 5xx, 429, connection errors) retry with backoff and
stay journaled; permanent ones (403, 400, a deleted bucket) are not retried during a
flush, which then fails at once naming the files (errors.FlushFailed). Either way the
data stays staged and journaled for a later flush or the next mount.

Everything here runs on the trio loop; blocking work goes through ``run_s3``/``run_io``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from typing import Any

import trio

from ..config import DEFAULT_FLUSH_TIMEOUT
from ..errors import StoreError
from ..meta.namespace import Namespace
from ..meta.records import Inode
from ..read.hydrator import Hydrator
from ..read.places import Where
from ..store.objectstore import ObjectStore
from .attempts import Attempts
from .executor import Executor, WriteBackStats
from .files import BlockSink, StagedFiles
from .journal import Journal
from .ledger import Ledger
from .rename_journal import RenameJournal
from .renames import DirRenames
from .settle import Settler
from .staging import Staging
from .stream import Streams
from .upload import Uploader
from .waiters import Progress, Waiters
from .wakeup import Wakeup
from .writes import Writes

log = logging.getLogger("tierfs.writeback")

RunBlocking = Callable[..., Awaitable[Any]]
__all__ = ["DEFAULT_FLUSH_TIMEOUT", "WriteBack", "WriteBackStats"]


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
        self._run_s3 = run_s3
        self._run_io = run_io
        self._clock = clock
        self.files = StagedFiles(
            bucket=bucket, staging=staging, hydrator=hydrator, cache=cache, run_io=run_io
        )
        self.wakeup = Wakeup()
        self.streams = Streams(
            store=store,
            journal=journal,
            staging_path=staging.path,
            run_s3=run_s3,
            run_io=run_io,
            limit=upload_concurrency,
            on_ended=self.wakeup.signal,
        )
        self.ledger = Ledger(journal, namespace, run_io)
        self.attempts = Attempts(clock)
        self.dir_renames = DirRenames()  # what is held back while a directory rename is journaled
        self.settler = Settler(
            namespace=namespace, ledger=self.ledger, files=self.files, dir_renames=self.dir_renames,
            run_io=run_io,
        )  # fmt: skip
        self.executor = Executor(
            namespace=namespace,
            journal=journal,
            ledger=self.ledger,
            files=self.files,
            streams=self.streams,
            uploader=Uploader(store, staging.path, record_upload=journal.record_upload),
            attempts=self.attempts,
            dir_renames=self.dir_renames,
            settler=self.settler,
            wakeup=self.wakeup,
            run_s3=run_s3,
            delay=delay,
            concurrency=concurrency,
            clock=clock,
        )
        self.stats = self.executor.stats
        self.waiters = Waiters(
            executor=self.executor, ledger=self.ledger, attempts=self.attempts, files=self.files,
            wakeup=self.wakeup,
        )  # fmt: skip
        self.writes = Writes(
            namespace=namespace, journal=journal, ledger=self.ledger, files=self.files,
            streams=self.streams, executor=self.executor, run_io=run_io, clock=clock,
        )  # fmt: skip
        self.renames = RenameJournal(
            namespace=namespace,
            store=store,
            ledger=self.ledger,
            files=self.files,
            streams=self.streams,
            executor=self.executor,
            settler=self.settler,
            dir_renames=self.dir_renames,
            wakeup=self.wakeup,
            run_s3=run_s3,
            run_io=run_io,
        )
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
            "uploads_running": len(self.executor.running),
            "uploads_done": self.stats.uploads_done,
            "uploads_failed": self.stats.uploads_failed,
            "bytes_uploaded": self.stats.bytes_uploaded,
            "conflicts": self.stats.conflicts,
            "failing": self.attempts.failing(),
        }

    # -- the file system's calls -----------------------------------------------------------------------

    async def open_for_write(self, node: Inode, *, truncate: bool) -> None:
        await self.writes.open_for_write(node, truncate=truncate)

    async def created(self, node: Inode, content: bytes = b"", *, open_writer: bool = False) -> None:
        await self.writes.created(node, content, open_writer=open_writer)

    async def write(self, ino: int, offset: int, data: bytes) -> int:
        return await self.writes.write(ino, offset, data)

    async def truncate(self, node: Inode, size: int) -> None:
        await self.writes.truncate(node, size)

    async def metadata_changed(self, node: Inode) -> None:
        await self.writes.metadata_changed(node)

    async def read_staged(self, ino: int, offset: int, size: int) -> bytes | None:
        """Read the staging file; None if it retired meanwhile (the bucket version has its bytes)."""
        return await self.files.read(ino, offset, size)

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
                await self.files.retire(ino, node.key, node.etag, lambda: self.settler.still_needed(ino))
            return
        size = self.files.size_of(ino)
        if size is not None:
            await self._run_io(lambda: self.ns.record_write(ino, size, written_ns))
        self.wakeup.wake()

    async def removed(self, node: Inode) -> None:
        """unlink/rmdir: drop pending uploads of the inode and delete its key in the bucket."""
        log.debug("write-back: removed ino %d %s", node.ino, node.key)
        self.streams.end(node.ino, "unlinked")
        drop = self.executor.waiting_puts(lambda ino: ino == node.ino)
        await self.executor.append(("delete", {"key": node.key}), drop=drop)
        if not self.files.writers(node.ino):
            await self.files.discard(node.ino)

    async def linked(self, node: Inode, key: str) -> None:
        """link(2): the new name ``key`` becomes a copy of the inode's object (after its pending put)."""
        await self.executor.append(("copy", {"src": node.key, "key": key, "ino": 0}))

    async def name_removed(self, key: str) -> None:
        """One hard link of an inode was unlinked; its object goes, the inode's other names stay."""
        await self.executor.append(("delete", {"key": key}))

    # -- renames, waiters and the executor (each its own part) ----------------------------------------

    def renaming(self, node: Inode) -> AbstractAsyncContextManager[None]:
        return self.renames.renaming(node)

    async def renamed(self, moved: Inode, old_key: str) -> None:
        await self.renames.renamed(moved, old_key)

    async def promoted(self, node: Inode, old_key: str) -> None:
        await self.renames.promoted(node, old_key)

    async def fsync(self, ino: int) -> None:
        await self.waiters.fsync(ino)

    async def flush_all(
        self, progress: Progress | None = None, *, timeout: float | None = None
    ) -> dict[str, Any]:
        return await self.waiters.flush_all(progress, timeout=timeout)

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
        await self.executor.run(task_status=task_status)
