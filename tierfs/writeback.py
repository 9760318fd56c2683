"""Write-back export: local changes become ordinary objects, and a crash loses none of them.

Every change is journaled (tierfs.journal) before it is acknowledged, with its data in
a staging file (tierfs.staging). An executor task carries the journal out:

- Ordering is per key: an op waits for every earlier op that touches the same key
  (for ``copy`` also its source; a ``dir/`` delete waits for everything below it).
  Unrelated keys upload in parallel, bounded by ``concurrency``.
- A ``put`` becomes ready ``delay`` seconds after the last writer closed the file, or
  at once on fsync / ``tierfs flush`` / unmount. fsync returns only after the upload.
- Before replacing an object we make sure it is still the version we started from:
  HEAD, then a conditional PUT (If-Match; If-None-Match for new files). If someone else changed it,
  ours is uploaded under ``<key>.conflict-<UTC time>`` and the remote one is kept:
  both survive (docs/writeback.md).
- Transient failures retry with backoff forever; the op stays in the journal.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import trio

from . import posixmeta
from .chunkcache import ChunkKey
from .errors import NotFound, PreconditionFailed, StoreError
from .hydrator import Hydrator, ObjectVersion
from .journal import Journal, Op
from .namespace import Namespace
from .objectstore import ObjectStore
from .records import Flag, Inode, Kind
from .staging import Staging

log = logging.getLogger(__name__)

RunBlocking = Callable[..., Awaitable[Any]]
_NODE_OPS = ("put", "marker", "meta")  # ops that act on an inode's current key
RETIRE_BATCH_BLOCKS = 16  # blocks moved from a staging file into the chunk cache per transaction
Progress = Callable[[dict[str, Any]], Awaitable[None]]


@dataclass
class WriteBackStats:
    uploads_done: int = 0
    uploads_failed: int = 0
    bytes_uploaded: int = 0
    conflicts: int = 0


@dataclass
class _Outcome:
    etag: str = ""
    size: int = 0
    conflict_key: str = ""
    skipped: bool = False


@dataclass
class _Dirty:
    writers: int = 0
    last_close: float = 0.0
    forced: bool = False
    retry_at: float = 0.0
    waiters: list[trio.Event] = field(default_factory=list)


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
        cache: Any,
        run_s3: RunBlocking,
        run_io: RunBlocking,
        delay: float,
        concurrency: int = 16,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.bucket = bucket
        self.ns = namespace
        self.store = store
        self.hydrator = hydrator
        self.staging = staging
        self.journal = journal
        self.cache = cache
        self._run_s3 = run_s3
        self._run_io = run_io
        self.delay = delay
        self.concurrency = concurrency
        self._clock = clock
        self.stats = WriteBackStats()
        self.ops: list[Op] = journal.load()
        # seq -> the key a running put/marker/meta writes, fixed when it starts: a rename
        # meanwhile moves the node, not the upload in flight (see renamed()).
        self._running: dict[int, str] = {}
        self._retry_at: dict[int, float] = {}
        self._dirty: dict[int, _Dirty] = {}
        self._sizes: dict[int, int] = {}
        self._staged: set[int] = set(staging.inos())
        self._flush_all = 0
        self._wake = trio.Event()
        self._changed = trio.Event()
        self._staging_locks: dict[int, trio.Lock] = {}
        self._held: dict[int, int] = {}  # ino -> puts on their way into the journal (see _holding)
        self.tombstones: dict[str, int] = {}
        self._copies: dict[int, list[Op]] = {}  # ino -> its pending rename copies, in journal order
        for op in self.ops:
            self._track(op)
        self.ns.is_tombstoned = self.is_tombstoned
        if self.ops:
            log.info("write-back: replaying %d journaled operations", len(self.ops))

    # -- queries ----------------------------------------------------------------------------------------

    def is_tombstoned(self, key: str) -> bool:
        """True while a delete of ``key`` or of a ``dir/`` above it is pending (thread-safe read)."""
        if not self.tombstones:
            return False
        if key in self.tombstones:
            return True
        pos = key.find("/")
        while 0 <= pos < len(key) - 1:
            if key[: pos + 1] in self.tombstones:
                return True
            pos = key.find("/", pos + 1)
        return False

    def data_key(self, ino: int, key: str) -> str:
        """Where the bytes of ``ino`` (now named ``key``) are in the bucket right now.

        A rename of an uploaded file changes its key at once but moves the object only
        when the journaled server-side copy runs; until then the data is still under
        the source of the first pending copy, and reads must go there.
        """
        pending = self._copies.get(ino)
        return pending[0].src if pending else key

    def is_staged(self, ino: int) -> bool:
        return ino in self._staged

    def size_of(self, ino: int) -> int | None:
        return self._sizes.get(ino)

    def status(self) -> dict[str, Any]:
        puts = [op for op in self.ops if op.kind == "put"]
        dirty = {op.ino for op in puts}
        return {
            "dirty_files": len(dirty),
            "dirty_bytes": sum(self._sizes.get(i, 0) for i in dirty),
            "uploads_pending": len(self.ops),
            "uploads_running": len(self._running),
            "uploads_done": self.stats.uploads_done,
            "uploads_failed": self.stats.uploads_failed,
            "bytes_uploaded": self.stats.bytes_uploaded,
            "conflicts": self.stats.conflicts,
        }

    # -- journal plumbing -------------------------------------------------------------------------------

    def _tomb(self, key: str, delta: int) -> None:
        count = self.tombstones.get(key, 0) + delta
        if count > 0:
            self.tombstones[key] = count
        else:
            self.tombstones.pop(key, None)

    def _track(self, op: Op) -> None:
        """Index a journaled op: deletes tombstone their key, copies record where the data still is."""
        if op.kind == "delete":
            self._tomb(op.key, +1)
        elif op.kind == "copy" and op.ino:
            self._copies.setdefault(op.ino, []).append(op)

    def _untrack(self, op: Op) -> None:
        if op.kind == "delete":
            self._tomb(op.key, -1)
        elif op.kind == "copy" and op.ino:
            pending = [o for o in self._copies.get(op.ino, ()) if o.seq != op.seq]
            if pending:
                self._copies[op.ino] = pending
            else:
                self._copies.pop(op.ino, None)

    async def _append(self, *ops: tuple[str, dict[str, Any]], drop: list[Op] | None = None) -> None:
        """Journal ``ops`` (and forget ``drop``) in one transaction, then wake the executor."""
        gone = drop or []
        with self._holding([fields["ino"] for kind, fields in ops if kind == "put"]):
            appended: list[Op] = await self._run_io(
                lambda: self.journal.append(*ops, remove=[op.seq for op in gone])
            )
        if gone:
            seqs = {op.seq for op in gone}
            self.ops = [op for op in self.ops if op.seq not in seqs]
            for op in gone:
                self._untrack(op)
        self.ops.extend(appended)
        for op in appended:
            self._track(op)
        self._wake.set()

    def _waiting_puts(self, inos: Callable[[int], bool]) -> list[Op]:
        """Journaled puts of the matching inodes that have not started yet."""
        return [op for op in self.ops if op.kind == "put" and op.seq not in self._running and inos(op.ino)]

    def _has_pending_put(self, ino: int) -> bool:
        return any(op.kind == "put" and op.ino == ino and op.seq not in self._running for op in self.ops)

    def _put_journaled(self, ino: int) -> bool:
        """A put of ``ino`` is waiting, running or being journaled: its staging file is still needed."""
        return ino in self._held or any(op.kind == "put" and op.ino == ino for op in self.ops)

    @contextlib.contextmanager
    def _holding(self, inos: list[int]) -> Iterator[None]:
        """Keep the staging files of ``inos`` from being retired while a put for them is on its way.

        Appending to the journal happens in a worker thread; an upload finishing meanwhile
        must not retire a staging file that the op about to be appended still needs.
        """
        for ino in inos:
            self._held[ino] = self._held.get(ino, 0) + 1
        try:
            yield
        finally:
            for ino in inos:
                if self._held[ino] > 1:
                    self._held[ino] -= 1
                else:
                    del self._held[ino]

    def _lock(self, ino: int) -> trio.Lock:
        return self._staging_locks.setdefault(ino, trio.Lock())

    # -- the FUSE adapter's calls ----------------------------------------------------------------------

    async def open_for_write(self, node: Inode, *, truncate: bool) -> None:
        """Make ``node`` writable: stage its content (unless truncating) and count the writer."""
        async with self._lock(node.ino):
            if node.ino not in self._staged:
                if truncate or node.size == 0:
                    await self._run_io(self.staging.create, node.ino)
                    self._sizes[node.ino] = 0
                else:
                    await self._hydrate_into_staging(node)
                self._staged.add(node.ino)
            elif truncate:
                await self._run_io(self.staging.truncate, node.ino, 0)
                self._sizes[node.ino] = 0
        self._dirty.setdefault(node.ino, _Dirty()).writers += 1
        if truncate:
            await self.mark_dirty(node.ino)

    async def _hydrate_into_staging(self, node: Inode) -> None:
        version = ObjectVersion(node.ino, self.data_key(node.ino, node.key), node.etag, node.size)
        blocks = await self.hydrator.blocks(version, range(self.hydrator.block_count(version)))
        bs = self.hydrator.block_size
        await self._run_io(
            self.staging.write_blocks,
            node.ino,
            ((i * bs, data) for i, data in sorted(blocks.items())),
            node.size,
        )
        self._sizes[node.ino] = node.size

    async def created(self, node: Inode, content: bytes = b"") -> None:
        """A new file, symlink or directory was created here."""
        if node.kind is Kind.DIR:
            await self._append(("marker", {"ino": node.ino}))
            return
        await self._run_io(self.staging.create, node.ino, content)
        self._staged.add(node.ino)
        self._sizes[node.ino] = len(content)
        await self._append(("put", {"ino": node.ino}))

    async def add_writer(self, ino: int) -> None:
        self._dirty.setdefault(ino, _Dirty()).writers += 1

    async def write(self, ino: int, offset: int, data: bytes) -> int:
        await self.mark_dirty(ino)
        written: int = await self._run_io(self.staging.pwrite, ino, offset, data)
        self._sizes[ino] = max(self._sizes.get(ino, 0), offset + written)
        return written

    async def read(self, ino: int, offset: int, size: int) -> bytes:
        data: bytes = await self._run_io(self.staging.pread, ino, offset, size)
        return data

    async def truncate(self, node: Inode, size: int) -> None:
        """truncate(2) without a writer: under the staging lock, so no retirement can interleave."""
        async with self._lock(node.ino):
            if node.ino not in self._staged:
                if size == 0:
                    await self._run_io(self.staging.create, node.ino)
                else:
                    await self._hydrate_into_staging(node)
                self._staged.add(node.ino)
            await self._run_io(self.staging.truncate, node.ino, size)
            self._sizes[node.ino] = size
            await self.mark_dirty(node.ino)

    async def mark_dirty(self, ino: int) -> None:
        """Journal a put for ``ino`` unless one is already waiting (not yet running)."""
        if not self._has_pending_put(ino):
            await self._append(("put", {"ino": ino}))
            await self._run_io(self.ns.update, ino, flags=self._local_flags(ino))

    def _local_flags(self, ino: int) -> Flag:
        node = self.ns.get(ino)
        return (node.flags if node else Flag.NONE) | Flag.LOCAL | Flag.META_KNOWN

    async def release_writer(self, ino: int) -> None:
        state = self._dirty.get(ino)
        if state is None:
            return
        state.writers = max(0, state.writers - 1)
        state.last_close = self._clock()
        if not any(op.ino == ino for op in self.ops):
            if not state.writers:  # opened for writing but never written: nothing to upload
                node = self.ns.get(ino)
                if node is not None and node.etag:
                    await self._retire_staging(ino, node.key, node.etag)
            return
        if ino in self._sizes:
            await self._run_io(self.ns.update, ino, size=self._sizes[ino], mtime_ns=time.time_ns())
        self._wake.set()

    async def metadata_changed(self, node: Inode) -> None:
        """chmod/chown/utimens: a pending put carries the headers; otherwise rewrite them in place."""
        if self._has_pending_put(node.ino) or (node.flags & Flag.LOCAL and not node.etag):
            return
        kind = "marker" if node.is_dir else "meta"
        await self._append((kind, {"ino": node.ino}))

    async def removed(self, node: Inode) -> None:
        """unlink/rmdir: drop pending uploads of the inode and delete its key in the bucket."""
        drop = self._waiting_puts(lambda ino: ino == node.ino)
        await self._append(("delete", {"key": node.key}), drop=drop)
        if not self._dirty.get(node.ino, _Dirty()).writers:
            await self._discard_staging(node.ino)

    async def renamed(self, moved: Inode, old_key: str) -> None:
        """Journal the bucket side of a rename that the namespace already carried out.

        A waiting put of a moved file is moved to the end of the journal: it writes the
        file's *new* key, so it must come after everything journaled for that key before
        (e.g. the delete of a file the rename replaced), and ordering is by journal position.
        """
        if not moved.is_dir:
            async with self._lock(moved.ino):  # the staging file must not be retired meanwhile
                waiting = self._waiting_puts(lambda ino: ino == moved.ino)
                if moved.ino in self._staged:  # its bytes are here (dirty, or open for writing): upload them
                    await self._append(
                        ("put", {"ino": moved.ino}), ("delete", {"key": old_key}), drop=waiting
                    )
                else:
                    await self._append(
                        ("copy", {"src": old_key, "key": moved.key, "ino": moved.ino}),
                        ("delete", {"key": old_key}),
                    )
            return
        # Uploads already in flight write under the old name, and may finish before or after
        # the listing below sees them: do them again under the new name and delete what
        # they wrote. Their staging files are held until those puts are journaled.
        by_seq = {op.seq: op for op in self.ops}
        in_flight = [
            (by_seq[seq], key)
            for seq, key in self._running.items()
            if key.startswith(old_key) and seq in by_seq and by_seq[seq].kind in ("put", "marker")
        ]
        with self._holding([op.ino for op, _ in in_flight if op.kind == "put"]):
            remote = await self._run_s3(lambda: list(self.store.list_tree(old_key)))
            ops: list[tuple[str, dict[str, Any]]] = [
                ("marker", {"ino": moved.ino})
            ]  # exists even while empty
            for obj in remote:
                new_key = moved.key + obj.key[len(old_key) :]
                local = await self._run_io(self.ns.path_of_key, new_key)
                if local is not None and self._has_pending_put(local.ino):
                    ops.append(("delete", {"key": obj.key}))
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
            requeued = {op.ino for op in waiting}
            ops.extend(("put", {"ino": ino}) for ino in requeued)
            for op, key in in_flight:
                if op.ino not in requeued:
                    requeued.add(op.ino)
                    ops.append((op.kind, {"ino": op.ino}))
                ops.append(("delete", {"key": key}))
            await self._append(*ops, drop=waiting)

    async def fsync(self, ino: int) -> None:
        """Upload ``ino`` now and return once the bucket has it (or raise EIO after a failure)."""
        state = self._dirty.setdefault(ino, _Dirty())
        state.forced = True
        self._retry_at.clear()
        self._wake.set()
        try:
            while True:
                mine = [op for op in self.ops if op.ino == ino and op.kind in ("put", "meta", "marker")]
                if not mine:
                    return
                if any(op.seq in self._retry_at for op in mine):
                    raise StoreError(f"upload of inode {ino} failed; it stays journaled and will be retried")
                await self._changed_wait()
        finally:
            state.forced = False

    async def _changed_wait(self) -> None:
        event = self._changed
        await event.wait()

    async def flush_all(self, progress: Progress | None = None) -> dict[str, Any]:
        """Carry out the whole journal now (``tierfs flush`` / umount), reporting progress."""
        self._flush_all += 1
        self._retry_at.clear()
        self._wake.set()
        start_done, start_bytes, started = (
            self.stats.uploads_done,
            self.stats.bytes_uploaded,
            time.monotonic(),
        )
        total = len(self.ops)
        total_bytes = sum(self._sizes.get(op.ino, 0) for op in self.ops if op.kind == "put")
        try:
            while self.ops:
                if progress is not None:
                    await progress(
                        {
                            "done_files": self.stats.uploads_done - start_done,
                            "total_files": max(total, self.stats.uploads_done - start_done + len(self.ops)),
                            "done_bytes": self.stats.bytes_uploaded - start_bytes,
                            "total_bytes": total_bytes,
                        }
                    )
                with trio.move_on_after(0.25):
                    await self._changed_wait()
        finally:
            self._flush_all -= 1
        return {
            "uploaded_files": self.stats.uploads_done - start_done,
            "uploaded_bytes": self.stats.bytes_uploaded - start_bytes,
            "seconds": round(time.monotonic() - started, 3),
        }

    # -- the executor ----------------------------------------------------------------------------------

    async def recover(self) -> None:
        """After a restart: staged sizes come from the staging files, the only truth a crash leaves."""
        for ino in sorted(self._staged):
            size = await self._run_io(self.staging.size, ino)
            self._sizes[ino] = size
            node = await self._run_io(self.ns.update, ino, size=size)
            if node is None or not any(op.ino == ino for op in self.ops):
                await self._discard_staging(ino)  # unlinked, or uploaded just before the crash

    async def run(self, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        await self.recover()
        async with trio.open_nursery() as nursery:
            task_status.started()
            while True:
                self._wake = trio.Event()
                for op in self._schedule():
                    node = self.ns.get(op.ino) if op.kind in _NODE_OPS and op.ino else None
                    self._running[op.seq] = node.key if node is not None else ""
                    nursery.start_soon(self._execute, op, self._running[op.seq])
                wait = self._next_deadline() - self._clock()
                with trio.move_on_after(max(0.05, wait) if not math.isinf(wait) else math.inf):
                    await self._wake.wait()

    def _ready(self, op: Op, now: float) -> bool:
        if self._retry_at.get(op.seq, 0.0) > now:
            return False
        if op.kind != "put":
            return True
        state = self._dirty.get(op.ino)
        if state is None:
            return True  # replayed after a restart, or never opened: nobody is writing
        if self._flush_all or state.forced:
            return True
        return state.writers == 0 and now - state.last_close >= self.delay

    def _next_deadline(self) -> float:
        deadline = math.inf
        for op in self.ops:
            if op.seq in self._running:
                continue
            retry = self._retry_at.get(op.seq)
            if retry is not None:
                deadline = min(deadline, retry)
            state = self._dirty.get(op.ino) if op.kind == "put" else None
            if state is not None and state.writers == 0:
                deadline = min(deadline, state.last_close + self.delay)
        return deadline

    def _op_keys(self, op: Op) -> set[str]:
        keys = {op.key} if op.key else set()
        if op.src:
            keys.add(op.src)
        if self._running.get(op.seq):
            keys.add(self._running[op.seq])
        if op.kind in _NODE_OPS and op.ino:
            node = self.ns.get(op.ino)
            if node is not None:
                keys.add(node.key)
        return keys

    def _schedule(self) -> list[Op]:
        """The ops to start now: ready, and no earlier op touches one of their keys.

        Runs on every wake-up (each journal append), so the cheap readiness check comes
        first and keys (an LMDB read per inode op) are resolved only up to the last ready op:
        a long journal of files still being written costs no key lookups.
        """
        if len(self._running) >= self.concurrency:
            return []
        now = self._clock()
        last_ready = -1
        for index, op in enumerate(self.ops):
            if op.seq not in self._running and self._ready(op, now):
                last_ready = index
        blocked: set[str] = set()
        earlier: list[str] = []
        start: list[Op] = []
        for op in self.ops[: last_ready + 1]:
            keys = self._op_keys(op)
            waits = bool(keys & blocked) or (
                op.kind == "delete" and op.key.endswith("/") and any(k.startswith(op.key) for k in earlier)
            )
            earlier.extend(keys)
            if op.seq in self._running or waits or not self._ready(op, now):
                blocked |= keys
                continue
            if len(self._running) + len(start) >= self.concurrency:
                break
            start.append(op)
            blocked |= keys
        return start

    async def _execute(self, op: Op, key: str) -> None:
        log.debug(
            "write-back: %s #%d %s", op.kind, op.seq, " -> ".join(k for k in (op.src, op.key or key) if k)
        )
        try:
            outcome: _Outcome = await self._run_s3(self._execute_blocking, op, key)
        except Exception as exc:
            # Whatever went wrong, the op stays journaled and is retried: an escaping
            # exception would take the executor, and with it the whole mount, down.
            self.stats.uploads_failed += 1
            backoff = 5.0 if op.seq in self._retry_at else 1.0
            self._retry_at[op.seq] = self._clock() + backoff
            what = f"write-back {op.kind} {op.key or key or op.ino} failed (will retry)"
            if isinstance(exc, StoreError):
                log.warning("%s: %s", what, exc)
            else:
                log.exception(what)
            self._running.pop(op.seq, None)
            self._signal()
            return
        except BaseException:
            self._running.pop(op.seq, None)
            raise
        try:
            await self._finish(op, outcome)
        except Exception:  # the bucket has the change; only local bookkeeping failed
            log.exception("write-back: bookkeeping after %s #%d failed", op.kind, op.seq)
        finally:
            self._running.pop(op.seq, None)
            self._signal()

    def _signal(self) -> None:
        self._wake.set()
        changed, self._changed = self._changed, trio.Event()
        changed.set()

    async def _finish(self, op: Op, outcome: _Outcome) -> None:
        await self._run_io(self.journal.remove, op.seq)
        self.ops = [o for o in self.ops if o.seq != op.seq]
        self._retry_at.pop(op.seq, None)
        self._untrack(op)
        if outcome.skipped:
            return
        self.stats.uploads_done += 1
        if op.kind == "put":
            self.stats.bytes_uploaded += outcome.size
        if outcome.conflict_key:
            self.stats.conflicts += 1
        if op.kind in ("put", "meta", "copy", "marker") and op.ino:
            await self._settle(op.ino, outcome)

    async def _settle(self, ino: int, outcome: _Outcome) -> None:
        """After an upload: record the new ETag; once nothing is pending, retire the staging file."""
        pending = self._put_journaled(ino)
        state = self._dirty.get(ino)
        writers = state.writers if state else 0
        if outcome.conflict_key:
            # The bucket's version wins the name; ours lives on under the conflict name.
            node = await self._run_io(self.ns.update, ino, etag="", flags=Flag.NONE, checked=0.0)
            if node is not None:
                await self._run_io(self.ns.update, node.parent, checked=0.0)
            await self._discard_staging(ino)
            return
        node = self.ns.get(ino)
        if node is None:
            return
        flags = node.flags | Flag.META_KNOWN
        if not pending and not writers:
            flags &= ~Flag.LOCAL
        changes: dict[str, Any] = {"etag": outcome.etag or node.etag, "flags": flags}
        if outcome.size or ino in self._staged:
            changes["size"] = outcome.size
        await self._run_io(self.ns.update, ino, **changes)
        if not pending and not writers and ino in self._staged:
            await self._retire_staging(ino, node.key, outcome.etag)

    async def _retire_staging(self, ino: int, key: str, etag: str) -> None:
        async with self._lock(ino):
            # Re-checked here: a put may have been journaled (or even started) since the
            # caller looked, e.g. by a rename during the previous upload.
            if self._put_journaled(ino) or (self._dirty.get(ino) and self._dirty[ino].writers):
                return
            # No longer staged from here on, before any await: a rename meanwhile must copy
            # the uploaded object rather than journal a put of a file that is going away.
            self._staged.discard(ino)

            def move() -> None:
                """Hand the uploaded bytes to the chunk cache, some blocks at a time (bounded memory)."""
                bs = self.hydrator.block_size
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
                self.staging.remove(ino)

            if etag:
                await self._run_io(move)
            else:
                await self._run_io(self.staging.remove, ino)
            self._forget_staging(ino)
        self._drop_idle_lock(ino)

    async def _discard_staging(self, ino: int) -> None:
        async with self._lock(ino):  # never while a retirement reads the file
            await self._run_io(self.staging.remove, ino)
            self._forget_staging(ino)
        self._drop_idle_lock(ino)

    def _drop_idle_lock(self, ino: int) -> None:
        """Forget the staging lock of a file that is no longer staged, unless someone holds or awaits it.

        One lock per file ever written would otherwise stay for the life of the mount.
        """
        lock = self._staging_locks.get(ino)
        idle = lock is not None and not lock.locked() and lock.statistics().tasks_waiting == 0
        if idle and ino not in self._staged:
            del self._staging_locks[ino]

    def _forget_staging(self, ino: int) -> None:
        self._staged.discard(ino)
        self._sizes.pop(ino, None)
        self._dirty.pop(ino, None)

    # -- one operation against the bucket (worker thread) ---------------------------------------------

    def _headers(self, node: Inode) -> dict[str, str]:
        return posixmeta.encode(
            posixmeta.PosixMeta(
                mode=node.mode, uid=node.uid, gid=node.gid, mtime_ns=node.mtime_ns, atime_ns=node.atime_ns
            )
        )

    def _execute_blocking(self, op: Op, key: str) -> _Outcome:
        if op.kind == "delete":
            with contextlib.suppress(NotFound):
                self.store.delete(op.key)
            return _Outcome()
        node = self.ns.get(op.ino) if op.ino else None
        if op.kind == "copy":
            try:
                etag = self.store.copy(op.src, op.key)
            except NotFound:
                log.warning("rename source %s vanished before it was copied", op.src)
                return _Outcome(skipped=True)
            return _Outcome(etag=etag, size=node.size if node else 0)
        if node is None:
            return _Outcome(skipped=True)  # removed since; a later delete op covers the bucket
        node = node.with_(key=key or node.key)
        if op.kind == "marker":
            etag = self.store.put_bytes(node.key, b"", self._headers(node))
            return _Outcome(etag=etag)
        if op.kind == "meta":
            try:
                etag = self.store.replace_metadata(node.key, self._headers(node), if_match=node.etag or None)
            except PreconditionFailed:
                log.warning("metadata change of %s lost a race with another writer; keeping theirs", node.key)
                return _Outcome(conflict_key=node.key)
            except NotFound:
                return _Outcome(skipped=True)
            return _Outcome(etag=etag, size=node.size)
        return self._upload(node)

    def _upload(self, node: Inode) -> _Outcome:
        path = self.staging.path(node.ino)
        if not path.exists():
            log.error("journaled upload of %s has no staging file; nothing to upload", node.key)
            return _Outcome(skipped=True)
        try:
            return self._upload_staged(node, path)
        except FileNotFoundError:  # unlinked or replaced while we uploaded; its delete is journaled
            log.info("staging file of %s went away during its upload", node.key)
            return _Outcome(skipped=True)

    def _upload_staged(self, node: Inode, path: Path) -> _Outcome:
        """Replace the object only if it is still the version we started from.

        Replacing an existing object costs a HEAD right before the PUT, and the PUT also
        carries If-Match: servers that ignore conditional writes (older RGW, MinIO or
        Ozone releases) are still protected, apart from a race in the HEAD-to-PUT gap.
        A file new here is sent with If-None-Match alone. A refused PUT is followed by a
        HEAD to tell a remote change (conflict) from a remote delete.
        """
        size = path.stat().st_size
        headers = self._headers(node)
        base = node.etag
        if base:
            try:
                current = self.store.head(node.key).etag
            except NotFound:
                current = ""  # deleted remotely: nothing of theirs to lose, upload as new
            if current and current != base:
                return self._upload_conflict(node, path, size, headers, current)
            base = current
        try:
            etag = self.store.put_file(node.key, path, headers, if_match=base or None, if_none_match=not base)
        except (PreconditionFailed, NotFound):
            try:
                current = self.store.head(node.key).etag
            except NotFound:
                current = ""
            if current and current != base:
                return self._upload_conflict(node, path, size, headers, current)
            # Deleted remotely (no conflict: nothing of theirs can be lost), or the server
            # refused an ETag that does match: retry once on what we just saw.
            try:
                etag = self.store.put_file(
                    node.key, path, headers, if_match=current or None, if_none_match=not current
                )
            except (PreconditionFailed, NotFound):
                return self._upload_conflict(node, path, size, headers, "?")
        return _Outcome(etag=etag, size=size)

    def _upload_conflict(
        self, node: Inode, path: Any, size: int, headers: dict[str, str], theirs: str
    ) -> _Outcome:
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S.%fZ")
        conflict_key = f"{node.key}.conflict-{stamp}"
        self.store.put_file(conflict_key, path, headers)
        log.warning(
            "conflict: %s changed in the bucket (etag %s, ours was based on %s); our version is saved as %s",
            node.key, theirs or "deleted", node.etag or "nothing", conflict_key,
        )  # fmt: skip
        return _Outcome(size=size, conflict_key=conflict_key)
