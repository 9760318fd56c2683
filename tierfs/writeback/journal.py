"""The write-back journal: every pending bucket change, in order, in LMDB.

An entry is appended (and committed, fdatasync'ed) *before* the operation that caused
it is acknowledged to the kernel, and removed only after the bucket has the change.
After a crash, the next mount with the same cache dir finds the entries and carries
them out in order; the data they refer to lives in staging files (see staging.py).

Ops (``Op.kind``):
- ``put``: upload the staged content of inode ``ino`` to ``key`` (its key when the op was
  journaled; a rename re-journals waiting puts), with the POSIX headers of its current record.
  Entries written before keys were recorded have none and use the inode's current key.
- ``marker``: write the ``dir/`` marker object of directory inode ``ino`` (at its current key).
- ``copy``: server-side copy ``src`` -> ``key`` (rename of a clean file).
- ``delete``: delete ``key``. While pending, ``key`` (and, for ``dir/`` keys,
  everything below it) is tombstoned: a listing will not resurrect it.
- ``meta``: rewrite the headers of inode ``ino``'s object without re-uploading data.

**Group commit.** Every change goes through ``meta.groupcommit.GroupCommit``: the threads
that want to change the journal at the same moment share one write transaction and one flush to disk
(the first of them commits for all), and none of them returns before that flush is done.
So sixteen uploads finishing together cost one fdatasync, not sixteen, and nothing is
acknowledged before it is durable. The cache dir's LMDB omits the meta-page flush at commit
(``metasync=False``: a power loss could undo the last commit), so the committer flushes the
environment once more after each batch; that is what makes an acknowledged entry durable
rather than just committed.

Sequence numbers are never reused, not even across remounts (the counter is stored), so
``<cache-dir id>.<seq>`` names one upload attempt for good: an upload whose response was
lost is recognised as ours after a crash as well as after a retry.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from .. import cacheformat as fmt
from ..meta.groupcommit import GroupCommit

_NEXT_SEQ = b"next-seq"
_CACHE_ID = b"cache-id"


@dataclass(frozen=True)
class Op:
    seq: int
    kind: str
    ino: int = 0
    key: str = ""
    src: str = ""

    def encode(self) -> bytes:
        body: dict[str, Any] = {"kind": self.kind}
        for name in ("ino", "key", "src"):
            if getattr(self, name):
                body[name] = getattr(self, name)
        return json.dumps(body, separators=(",", ":")).encode()

    @classmethod
    def decode(cls, seq: int, raw: bytes) -> Op:
        body = json.loads(raw)
        return cls(
            seq=seq,
            kind=body["kind"],
            ino=body.get("ino", 0),
            key=body.get("key", ""),
            src=body.get("src", ""),
        )


def _seq(seq: int) -> bytes:
    return seq.to_bytes(8, "big")


class Journal:
    """Ordered, durable list of :class:`Op`. Blocking: call from worker threads."""

    def __init__(self, env: Any, commit: GroupCommit | None = None) -> None:
        self.env = env
        self.db = env.open_db(fmt.DB_JOURNAL)
        self.state = env.open_db(fmt.DB_WB_STATE)
        self.uploads = env.open_db(fmt.DB_UPLOADS)
        with env.begin(write=True) as txn:
            cur = txn.cursor(db=self.db)
            last = int.from_bytes(cur.key(), "big") + 1 if cur.last() else 1
            stored = txn.get(_NEXT_SEQ, db=self.state)
            self._next = max(last, int(stored) if stored else 1)
            cache_id = txn.get(_CACHE_ID, db=self.state)
            if cache_id is None:
                cache_id = uuid.uuid4().hex[:16].encode()
                txn.put(_CACHE_ID, cache_id, db=self.state)
        self.cache_id: str = cache_id.decode()
        # Shared with the namespace's record updates when the daemon wires one committer for the
        # environment: a finishing upload's settle and its journal entry's removal then share a flush.
        self.commit = commit or GroupCommit(env)

    def token(self, seq: int) -> str:
        """The name of one op's upload, stored in the object's headers (x-amz-meta-tierfs-op)."""
        return f"{self.cache_id}.{seq}"

    def append(self, *ops: tuple[str, dict[str, Any]], remove: Iterable[int] = ()) -> list[Op]:
        """Append ops atomically (one transaction); returns them with their sequence numbers.

        ``remove`` drops entries in the same transaction. Moving an op to the end of the
        journal (a rename re-orders the upload of a dirty file behind the rename's own
        ops) is thus one atomic step: a crash can never lose the op or run it twice.
        Returns only once the entries are durable (see GroupCommit).
        """
        removed = list(remove)

        def apply(txn: Any) -> list[Op]:
            out = []
            for seq in removed:
                txn.delete(_seq(seq), db=self.db)
            for kind, fields in ops:
                # Numbers are taken only inside the batch's transaction (one leader at a time);
                # a batch rolled back leaves a gap, never a number used twice.
                op = Op(seq=self._next, kind=kind, **fields)
                self._next += 1
                txn.put(_seq(op.seq), op.encode(), db=self.db)
                out.append(op)
            txn.put(_NEXT_SEQ, str(self._next).encode(), db=self.state)
            return out

        return self.commit.run(apply)

    def complete(self, seq: int) -> None:
        """Drop a finished op, and the record of its multipart upload if it had one."""

        def apply(txn: Any) -> None:
            txn.delete(_seq(seq), db=self.db)
            txn.delete(_seq(seq), db=self.uploads)

        self.commit.run(apply)

    def remove(self, *seqs: int) -> None:
        def apply(txn: Any) -> None:
            for seq in seqs:
                txn.delete(_seq(seq), db=self.db)

        self.commit.run(apply)

    def load(self) -> list[Op]:
        with self.env.begin(db=self.db) as txn:
            return [Op.decode(int.from_bytes(k, "big"), v) for k, v in txn.cursor()]

    # -- multipart uploads in flight (so that replay can abort what a crash left) -----------------------

    def record_upload(self, seq: int, key: str, upload_id: str) -> None:
        value = json.dumps([key, upload_id]).encode()
        self.commit.run(lambda txn: txn.put(_seq(seq), value, db=self.uploads))

    def forget_upload(self, seq: int) -> None:
        self.commit.run(lambda txn: txn.delete(_seq(seq), db=self.uploads))

    def open_uploads(self) -> list[tuple[int, str, str]]:
        """(seq, key, upload id) of every multipart upload started and not known to be finished."""
        with self.env.begin(db=self.uploads) as txn:
            out = []
            for k, v in txn.cursor():
                key, upload_id = json.loads(v)
                out.append((int.from_bytes(k, "big"), key, upload_id))
            return out
