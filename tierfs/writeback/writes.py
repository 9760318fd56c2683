"""Changes of a file's bytes and attributes: they become staging-file work and journal entries.

open for writing, create, write, truncate and chmod/chown/utimens each stage the file where
needed (from where its bytes are now: ``WriteBack.where``), change it under its staging lock
(``StagedFiles.mutating``), and make sure a put that has not started yet will carry the change
(docs/writeback.md, "The life of a staged file"). Sequential writes of a new file also feed its
stream (``stream.Streams``). This part has no fields of its own: staging state is
``StagedFiles``', the journal's the ``Ledger``'s, running ops the ``Executor``'s. Runs on the trio
loop; file I/O and LMDB writes go through ``run_io``.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

from ..meta.namespace import Namespace
from ..meta.records import Flag, Inode, Kind
from ..read.follow import read_following
from ..read.hydrator import ObjectVersion
from .executor import Executor
from .files import StagedFiles
from .journal import Journal
from .ledger import Ledger, put_of
from .stream import Streams
from .upload import headers_of

log = logging.getLogger("tierfs.writeback")

RunBlocking = Callable[..., Awaitable[Any]]


class Writes:
    def __init__(
        self,
        *,
        namespace: Namespace,
        journal: Journal,
        ledger: Ledger,
        files: StagedFiles,
        streams: Streams,
        executor: Executor,
        run_io: RunBlocking,
        clock: Callable[[], float],
    ) -> None:
        self.ns = namespace
        self.journal = journal
        self.ledger = ledger
        self.files = files
        self.streams = streams
        self.executor = executor
        self._run_io = run_io
        self._clock = clock

    def _has_waiting_put(self, ino: int) -> bool:
        return self.executor.waiting_put(ino) is not None

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
        return ObjectVersion(node.ino, self.ledger.data_key(node.ino, node.key), node.etag, node.size)

    async def created(self, node: Inode, content: bytes = b"", *, open_writer: bool = False) -> None:
        """A new file, symlink or directory was created here (``open_writer``: by create(2), still open)."""
        if node.kind is Kind.DIR:
            await self.executor.append(("marker", {"ino": node.ino}))
            return
        if open_writer:
            self.files.add_writer(node.ino)
        await self.files.create(node.ino, content)
        await self.executor.append(put_of(node))
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
        put = self.executor.waiting_put(ino)
        if put is None:
            self.streams.end(ino, "no put waiting")
            return
        await self.streams.wrote(
            ino, offset, length, key=put.key, seq=put.seq,
            headers=lambda: headers_of(node, self.journal.token(put.seq)),
        )  # fmt: skip

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
            await self.executor.append(put_of(node))
            flags = node.flags | Flag.LOCAL | Flag.META_KNOWN
            if flags != node.flags:
                await self._run_io(self.ns.update, node.ino, flags=flags)

    async def _ensure_waiting_put(self, ino: int) -> None:
        """After a mutation: if the put journaled before it has started meanwhile, it may have
        read the file without this change, so journal another one."""
        if not self._has_waiting_put(ino):
            node = self.ns.get(ino)
            if node is not None:
                await self.executor.append(put_of(node))

    async def metadata_changed(self, node: Inode) -> None:
        """chmod/chown/utimens: a pending put carries the headers; otherwise rewrite them in place."""
        self.streams.end(node.ino, "attributes changed")  # its headers went with its first part
        if self._has_waiting_put(node.ino) or (node.flags & Flag.LOCAL and not node.etag):
            return
        if not node.key:
            return  # the root of a whole-bucket mount has no object to carry its attributes
        kind = "marker" if node.is_dir else "meta"
        await self.executor.append((kind, {"ino": node.ino}))
