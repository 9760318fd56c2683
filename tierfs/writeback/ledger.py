"""The journal's pending ops in memory: the list in journal order and the indexes asked of it.

Every question the other parts ask on a write or a finished op ("is a put of this file
waiting?", "is anything pending?", "where are its bytes now?") is answered from per-inode
indexes here, never by a scan of the whole journal. It also keeps the side effects of an op
being pending: a journaled delete tombstones its key in the namespace (a listing must not
bring the object back), and a journaled rename copy records where the data still is.

Only this part changes these fields. The executor's running ops are passed in where they
matter (a running op is never dropped nor counted as waiting). Runs on the trio loop; the
journal's LMDB write goes through ``run_io``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Awaitable, Callable, Collection, Iterator
from typing import Any

from ..meta.namespace import Namespace
from ..meta.records import Inode
from .journal import Journal, Op

RunBlocking = Callable[..., Awaitable[Any]]
JournalOp = tuple[str, dict[str, Any]]  # (kind, fields) of an op to journal


def put_of(node: Inode) -> JournalOp:
    """A put of ``node``'s staged bytes under its current name."""
    return ("put", {"ino": node.ino, "key": node.key})


class Ledger:
    def __init__(self, journal: Journal, namespace: Namespace, run_io: RunBlocking) -> None:
        self.journal = journal
        self.ns = namespace
        self._run_io = run_io
        self.ops: list[Op] = journal.load()
        # ino -> its journaled ops, in journal order.
        self._by_ino: dict[int, list[Op]] = {}
        self._copies: dict[int, list[Op]] = {}  # ino -> its pending rename copies, in journal order
        self._held: dict[int, int] = {}  # ino -> puts on their way into the journal (see holding)
        self._dropping: set[int] = set()  # seqs being dropped from the journal: they must not start
        for op in self.ops:
            self._track(op)

    # -- queries ----------------------------------------------------------------------------------------

    def ops_of(self, ino: int) -> list[Op]:
        return list(self._by_ino.get(ino, ()))

    def pending(self, ino: int) -> bool:
        return ino in self._by_ino

    def copies_of(self, ino: int) -> list[Op]:
        return list(self._copies.get(ino, ()))

    def dropping(self, seq: int) -> bool:
        return seq in self._dropping

    def data_key(self, ino: int, key: str) -> str:
        """Where the bytes of ``ino`` (now named ``key``) are in the bucket right now.

        A rename of an uploaded file changes its key at once but moves the object only
        when the journaled server-side copy runs; until then the data is still under
        the source of the first pending copy, and reads must go there.
        """
        pending = self._copies.get(ino)
        return pending[0].src if pending else key

    def waiting_puts(self, inos: Callable[[int], bool], running: Collection[int]) -> list[Op]:
        """Journaled puts of the matching inodes that have not started yet."""
        return [op for op in self.ops if op.kind == "put" and op.seq not in running and inos(op.ino)]

    def waiting_put(self, ino: int, running: Collection[int]) -> Op | None:
        """The last put of ``ino`` that has not started yet, if any."""
        waiting = [op for op in self._by_ino.get(ino, ()) if op.kind == "put" and op.seq not in running]
        return waiting[-1] if waiting else None

    def put_journaled(self, ino: int, *, besides: int = 0) -> bool:
        """A put of ``ino`` is waiting, running or being journaled: its staging file is still needed."""
        return ino in self._held or any(
            op.kind == "put" and op.seq != besides for op in self._by_ino.get(ino, ())
        )

    # -- changes ----------------------------------------------------------------------------------------

    def staged(self, ino: int) -> None:
        """``ino``'s bytes are local now: copies still pending from earlier renames no longer say
        where they are (``data_key``)."""
        self._copies.pop(ino, None)

    @contextlib.contextmanager
    def holding(self, inos: list[int]) -> Iterator[None]:
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

    async def append(self, ops: tuple[JournalOp, ...], drop: list[Op], running: Collection[int]) -> list[Op]:
        """Journal ``ops`` (and forget the ops of ``drop`` that are not running) in one transaction.
        Returns the ops dropped."""
        ops = tuple(self._with_link_copies(ops))
        gone = [op for op in drop if op.seq not in running]
        seqs = {op.seq for op in gone}
        self._dropping |= seqs
        try:
            with self.holding([fields["ino"] for kind, fields in ops if kind == "put"]):
                appended: list[Op] = await self._run_io(
                    lambda: self.journal.append(*ops, remove=[op.seq for op in gone])
                )
        finally:
            self._dropping -= seqs
        if gone:
            self.ops = [op for op in self.ops if op.seq not in seqs]
            for op in gone:
                self._untrack(op, done=False)
        self.ops.extend(appended)
        for op in appended:
            self._track(op)
        return gone

    async def complete(self, op: Op) -> None:
        """``op`` is carried out: drop it from the journal, then from here."""
        await self._run_io(self.journal.complete, op.seq)
        self.ops = [o for o in self.ops if o.seq != op.seq]
        self._untrack(op, done=True)

    # -- indexes ----------------------------------------------------------------------------------------

    def _track(self, op: Op) -> None:
        """Index a journaled op: deletes tombstone their key, copies record where the data still is."""
        if op.ino:
            self._by_ino.setdefault(op.ino, []).append(op)
        if op.kind == "delete":
            self.ns.tombstones.add(op.key)
        elif op.kind == "copy" and op.ino:
            self._copies.setdefault(op.ino, []).append(op)

    def _untrack(self, op: Op, *, done: bool) -> None:
        if op.ino:
            left = [o for o in self._by_ino.get(op.ino, ()) if o.seq != op.seq]
            if left:
                self._by_ino[op.ino] = left
            else:
                self._by_ino.pop(op.ino, None)
        if op.kind == "delete":
            self.ns.tombstones.remove(op.key, done=done)
        elif op.kind == "copy" and op.ino:
            pending = [o for o in self._copies.get(op.ino, ()) if o.seq != op.seq]
            if pending:
                self._copies[op.ino] = pending
            else:
                self._copies.pop(op.ino, None)

    def _with_link_copies(self, ops: tuple[JournalOp, ...]) -> list[JournalOp]:
        """``ops``, each put or meta of a hard-linked inode followed by copies to its other names.

        The bucket has no links: every name is its own object, and a change of the inode
        must reach all of them. A copy touches its source, so it runs after the op before it.
        """
        out: list[JournalOp] = []
        for kind, fields in ops:
            out.append((kind, fields))
            if kind not in ("put", "meta") or not fields.get("ino"):
                continue
            node = self.ns.get(fields["ino"])
            if node is None or node.is_dir or node.nlink <= 1:
                continue
            src = fields.get("key") or node.key
            out.extend(("copy", {"src": src, "key": key, "ino": 0}) for key in self.ns.link_keys(node.ino))
        return out
