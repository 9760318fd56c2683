"""Rename journalling: the bucket side of a rename that the namespace already carried out.

The bucket has no rename: a file's object is copied to its new key and the old key deleted,
or, when its bytes are staged, a put under the new key replaces the copy. A directory rename
moves every key below it (``plan_dir_rename`` lists them and returns the ops; the caller
journals them). While a rename is between the namespace's move and its journal entries, the
``renaming`` bracket holds settling back (``renames.DirRenames``, ``Ledger.holding``).

This part has no fields of its own; it journals through ``Executor.append``. Runs on the trio
loop; listings go through ``run_s3``, record reads and updates through ``run_io``.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from ..meta.namespace import Namespace
from ..meta.records import Inode
from ..store.objectstore import ObjectStore
from .executor import Executor
from .files import StagedFiles
from .journal import Op
from .ledger import JournalOp, Ledger, put_of
from .renames import DirRenames
from .settle import Settler
from .stream import Streams
from .wakeup import Wakeup

log = logging.getLogger("tierfs.writeback")

RunBlocking = Callable[..., Awaitable[Any]]


class RenameJournal:
    def __init__(
        self,
        *,
        namespace: Namespace,
        store: ObjectStore,
        ledger: Ledger,
        files: StagedFiles,
        streams: Streams,
        executor: Executor,
        settler: Settler,
        dir_renames: DirRenames,
        wakeup: Wakeup,
        run_s3: RunBlocking,
        run_io: RunBlocking,
    ) -> None:
        self.ns = namespace
        self.store = store
        self.ledger = ledger
        self.files = files
        self.streams = streams
        self.executor = executor
        self.settler = settler
        self.dir_renames = dir_renames
        self.wakeup = wakeup
        self._run_s3 = run_s3
        self._run_io = run_io

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
            await self.settler.quiesce(ino)
        if not node.is_dir:
            await self.settler.quiesce(node.ino)

    async def promoted(self, node: Inode, old_key: str) -> None:
        """The record's own name was unlinked and ``node`` now carries another of its hard links:
        like a rename from ``old_key``, except that the new key holds a copy already. It is deleted
        first, so that the rename's put (a staged file) finds the key free and is not a conflict."""
        async with self.renaming(node):
            await self.executor.append(("delete", {"key": node.key}))
            await self.renamed(node, old_key)

    async def renamed(self, moved: Inode, old_key: str) -> None:
        """Journal the bucket side of a rename that the namespace already carried out.

        A waiting put of a moved file is re-journaled at the end, under the new key: it
        must come after everything journaled for that key before (e.g. the delete of a
        file the rename replaced), and ordering is by journal position.
        """
        log.debug("write-back: renamed ino %d %s -> %s", moved.ino, old_key, moved.key)
        if moved.is_dir:
            await self._renamed_dir(moved, old_key)
            return
        self.streams.end(moved.ino, "renamed")
        async with self.files.lock(moved.ino):  # the staging file must not be retired meanwhile
            if moved.ino in self.files.staged:  # its bytes are here (dirty, or open for writing)
                # The node's ETag described the old key; the new key has no object of ours yet.
                await self._run_io(self.ns.update, moved.ino, etag="")
                waiting = self.executor.waiting_puts(lambda ino: ino == moved.ino)
                await self.executor.append(put_of(moved), ("delete", {"key": old_key}), drop=waiting)
            else:
                await self.executor.append(
                    ("copy", {"src": old_key, "key": moved.key, "ino": moved.ino}),
                    ("delete", {"key": old_key}),
                )

    async def _renamed_dir(self, moved: Inode, old_key: str) -> None:
        """Journal the bucket side of a directory rename.

        Puts below the old name that have not started are frozen until they are re-journaled
        under the new name. Uploads already in flight write under the old name, and may
        finish before or after the listing below sees them: do them again under the new
        name and delete what they wrote. Their staging files are held until then.
        """
        try:
            with self.dir_renames.freezing(old_key):
                by_seq = {op.seq: op for op in self.ledger.ops}
                in_flight = [
                    (by_seq[seq], key)
                    for seq, key in self.executor.running.items()
                    if key.startswith(old_key) and seq in by_seq and by_seq[seq].kind in ("put", "marker")
                ]
                with self.ledger.holding([op.ino for op, _ in in_flight if op.kind == "put"]):
                    ops, drop = await self.plan_dir_rename(moved, old_key, in_flight)
                    await self.executor.append(*ops, drop=drop)
        finally:
            self.wakeup.wake()

    async def plan_dir_rename(
        self, moved: Inode, old_key: str, in_flight: list[tuple[Op, str]]
    ) -> tuple[list[JournalOp], list[Op]]:
        """The ops that move every object below ``old_key`` to ``moved.key``, and the waiting puts
        they replace. ``in_flight``: the running puts and markers below ``old_key``, with their keys."""
        remote = await self._run_s3(lambda: list(self.store.list_tree(old_key)))
        # The moved directory's marker first: it exists even while empty.
        ops: list[JournalOp] = [("marker", {"ino": moved.ino})]
        for obj in remote:
            new_key = moved.key + obj.key[len(old_key) :]
            local = await self._run_io(self.ns.path_of_key, new_key)
            waiting_here = local is not None and self.executor.waiting_put(local.ino) is not None
            if local is not None and local.key == new_key and waiting_here:
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

        waiting = self.executor.waiting_puts(below)
        requeued: set[int] = set()
        for op in waiting + [op for op, _ in in_flight if op.kind == "put"]:
            node = self.ns.get(op.ino)
            if node is not None and op.ino not in requeued:
                requeued.add(op.ino)
                await self._run_io(self.ns.update, op.ino, etag="")
                ops.append(put_of(node))
        for op, key in in_flight:
            if op.kind == "marker" and op.ino not in requeued:
                requeued.add(op.ino)
                ops.append(("marker", {"ino": op.ino}))
            ops.append(("delete", {"key": key}))
        return ops, waiting
