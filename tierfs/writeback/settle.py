"""Settling: what a finished op means for the namespace record and the file's staging file.

After an op has reached the bucket, the record learns what the bucket now has at its key
(``settle``); after the last pending op of a file under its current name, the record stops
being LOCAL and the staging file retires if its bytes are exactly the last settled upload's
(``quiesce``; docs/writeback.md, "The life of a staged file"). This part alone changes
``_last_put``: per inode, the (key, ETag, staging generation at its start) of the last put that
settled under the node's name. Runs on the trio loop; record updates go through ``run_io``.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

from ..meta.namespace import Namespace
from ..meta.records import Flag
from .files import StagedFiles
from .journal import Op
from .ledger import Ledger
from .renames import DirRenames
from .schedule import target_key
from .upload import Outcome

log = logging.getLogger("tierfs.writeback")

RunBlocking = Callable[..., Awaitable[Any]]


class Settler:
    def __init__(
        self,
        *,
        namespace: Namespace,
        ledger: Ledger,
        files: StagedFiles,
        dir_renames: DirRenames,
        run_io: RunBlocking,
    ) -> None:
        self.ns = namespace
        self.ledger = ledger
        self.files = files
        self.dir_renames = dir_renames
        self._run_io = run_io
        self._last_put: dict[int, tuple[str, str, int]] = {}

    def still_needed(self, ino: int, besides: int = 0) -> bool:
        """``ino``'s staging file is still needed: a writer, or a put on its way (other than ``besides``)."""
        return self.ledger.put_journaled(ino, besides=besides) or self.files.writers(ino) > 0

    def _node_key(self, ino: int) -> str | None:
        node = self.ns.get(ino)
        return node.key if node is not None else None

    def _pending_for(self, ino: int, *, besides: int = 0) -> bool:
        """Anything of ``ino`` still to do: a writer, a put on its way, or any journaled op."""
        return self.still_needed(ino, besides=besides) or any(
            o.seq != besides for o in self.ledger.ops_of(ino)
        )

    def _pending_at_name(self, ino: int, key: str) -> bool:
        """Anything of ``ino`` still to do under its current name ``key``. Ops it left behind under
        names it had before (a copy or an upload in flight when it was renamed again) do not count:
        their results never describe the node (see settle), and a delete of that name follows."""
        return self.still_needed(ino) or any(
            o.kind == "put" or target_key(o, self._node_key) == key for o in self.ledger.ops_of(ino)
        )

    async def settle(self, op: Op, key: str, outcome: Outcome, gen: int) -> None:
        """Record what the bucket now has at ``key``, if ``key`` is still the node's name.
        ``gen``: the staging file's generation when the op (a put) started."""
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
            self._last_put[op.ino] = (key, outcome.etag, gen)
        await self._run_io(lambda: self.ns.settle(op.ino, **changes))

    async def quiesce(self, ino: int) -> None:
        """After the last pending op of ``ino`` under its current name: the record stops being
        LOCAL, and the staging file retires if its bytes are exactly the last settled upload's."""
        node = self.ns.get(ino)
        if node is None:
            self._last_put.pop(ino, None)
            return
        if self.dir_renames.defer(ino):
            return  # WriteBack.renaming runs it once the rename is journaled
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
