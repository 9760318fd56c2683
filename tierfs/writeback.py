"""Write-back export: local changes become ordinary objects, and a crash loses none of them.

Every change is journaled (tierfs.journal) before it is acknowledged, with its data in
a staging file (tierfs.staging). An executor task carries the journal out:

- Ordering is per key: an op waits for every earlier op that touches the same key
  (for ``copy`` also its source; a ``dir/`` delete waits for everything below it).
  Unrelated keys upload in parallel, bounded by ``concurrency``.
- A ``put`` becomes ready ``delay`` seconds after the last writer closed the file, or
  at once on fsync / ``tierfs flush`` / unmount. fsync returns only after the upload.
- Before replacing an object we make sure it is still the version we started from:
  HEAD, then a conditional PUT (If-Match / If-None-Match). If someone else changed it,
  ours is uploaded under ``<key>.conflict-<UTC time>`` and the remote one is kept:
  both survive (docs/writeback.md).
- Transient failures retry with backoff forever; the op stays in the journal.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
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
        concurrency: int = 4,
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
        self._running: set[int] = set()
        self._retry_at: dict[int, float] = {}
        self._dirty: dict[int, _Dirty] = {}
        self._sizes: dict[int, int] = {}
        self._staged: set[int] = set(staging.inos())
        self._flush_all = 0
        self._wake = trio.Event()
        self._changed = trio.Event()
        self._staging_locks: dict[int, trio.Lock] = {}
        self.tombstones: dict[str, int] = {}
        for op in self.ops:
            if op.kind == "delete":
                self._tomb(op.key, +1)
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

    async def _append(self, *ops: tuple[str, dict[str, Any]]) -> None:
        appended: list[Op] = await self._run_io(self.journal.append, *ops)
        self.ops.extend(appended)
        for op in appended:
            if op.kind == "delete":
                self._tomb(op.key, +1)
        self._wake.set()

    def _has_pending_put(self, ino: int) -> bool:
        return any(op.kind == "put" and op.ino == ino and op.seq not in self._running for op in self.ops)

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
        version = ObjectVersion(node.ino, node.key, node.etag, node.size)
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
        if node.ino not in self._staged:
            async with self._lock(node.ino):
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
        drop = [
            op for op in self.ops if op.kind == "put" and op.ino == node.ino and op.seq not in self._running
        ]
        if drop:
            await self._run_io(self.journal.remove, *[op.seq for op in drop])
            self.ops = [op for op in self.ops if op not in drop]
        await self._append(("delete", {"key": node.key}))
        if not self._dirty.get(node.ino, _Dirty()).writers:
            await self._discard_staging(node.ino)

    async def renamed(self, moved: Inode, old_key: str) -> None:
        """Journal the bucket side of a rename that the namespace already carried out."""
        if not moved.is_dir:
            if moved.flags & Flag.LOCAL and (self._has_pending_put(moved.ino) or not moved.etag):
                if not self._has_pending_put(moved.ino):
                    await self._append(("put", {"ino": moved.ino}))
            else:
                await self._append(("copy", {"src": old_key, "key": moved.key, "ino": moved.ino}))
            await self._append(("delete", {"key": old_key}))
            return
        remote = await self._run_s3(lambda: list(self.store.list_tree(old_key)))
        ops: list[tuple[str, dict[str, Any]]] = []
        for obj in remote:
            new_key = moved.key + obj.key[len(old_key) :]
            local = await self._run_io(self.ns.path_of_key, new_key)
            if local is not None and self._has_pending_put(local.ino):
                ops.append(("delete", {"key": obj.key}))
            else:
                ops.append(("copy", {"src": obj.key, "key": new_key, "ino": local.ino if local else 0}))
                ops.append(("delete", {"key": obj.key}))
        if not any(obj.key == old_key for obj in remote):
            ops.append(("delete", {"key": old_key}))  # tombstones the old prefix until all below is gone
        ops.insert(0, ("marker", {"ino": moved.ino}))  # the new directory exists even while empty
        await self._append(*ops)

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
                    self._running.add(op.seq)
                    nursery.start_soon(self._execute, op)
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
        if op.kind in ("put", "marker", "meta") and op.ino:
            node = self.ns.get(op.ino)
            if node is not None:
                keys.add(node.key)
        return keys

    def _schedule(self) -> list[Op]:
        now = self._clock()
        blocked: set[str] = set()
        earlier: list[str] = []
        start: list[Op] = []
        for op in self.ops:
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

    async def _execute(self, op: Op) -> None:
        try:
            outcome: _Outcome = await self._run_s3(self._execute_blocking, op)
        except StoreError as exc:
            self.stats.uploads_failed += 1
            attempt = self._retry_at.get(op.seq, 0.0)
            backoff = 1.0 if not attempt else 5.0
            self._retry_at[op.seq] = self._clock() + backoff
            log.warning("write-back %s %s failed (will retry): %s", op.kind, op.key or op.ino, exc)
            self._running.discard(op.seq)
            self._signal()
            return
        except BaseException:
            self._running.discard(op.seq)
            raise
        await self._finish(op, outcome)
        self._running.discard(op.seq)
        self._signal()

    def _signal(self) -> None:
        self._wake.set()
        changed, self._changed = self._changed, trio.Event()
        changed.set()

    async def _finish(self, op: Op, outcome: _Outcome) -> None:
        await self._run_io(self.journal.remove, op.seq)
        self.ops = [o for o in self.ops if o.seq != op.seq]
        self._retry_at.pop(op.seq, None)
        if op.kind == "delete":
            self._tomb(op.key, -1)
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
        pending = self._has_pending_put(ino) or any(o.ino == ino and o.kind == "put" for o in self.ops)
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
            if self._has_pending_put(ino) or (self._dirty.get(ino) and self._dirty[ino].writers):
                return

            def move() -> None:
                bs = self.hydrator.block_size
                data = self.staging.read_all(ino)
                blocks = range(0, max(1, (len(data) + bs - 1) // bs))
                self.cache.put_many(
                    [(ChunkKey(self.bucket, key, etag, i), data[i * bs : (i + 1) * bs]) for i in blocks]
                )
                self.staging.remove(ino)

            if etag:
                await self._run_io(move)
            else:
                await self._run_io(self.staging.remove, ino)
            self._staged.discard(ino)
            self._sizes.pop(ino, None)
            self._dirty.pop(ino, None)

    async def _discard_staging(self, ino: int) -> None:
        await self._run_io(self.staging.remove, ino)
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

    def _execute_blocking(self, op: Op) -> _Outcome:
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
        size = path.stat().st_size
        base = node.etag
        headers = self._headers(node)
        try:
            current = self.store.head(node.key).etag
        except NotFound:
            current = ""
        if current and current != base:
            return self._upload_conflict(node, path, size, headers, current)
        try:
            # A remote delete of our base is no conflict: nothing of theirs can be lost.
            etag = self.store.put_file(
                node.key, path, headers, if_match=current or None, if_none_match=not current
            )
        except PreconditionFailed:
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
