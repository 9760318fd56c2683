"""The write-back journal: every pending bucket change, in order, in LMDB.

An entry is appended (and committed, fdatasync'ed) *before* the operation that caused
it is acknowledged to the kernel, and removed only after the bucket has the change.
After a crash, the next mount with the same cache dir finds the entries and carries
them out in order; the data they refer to lives in staging files (see staging.py).

Ops (``Op.kind``):
- ``put``: upload the staged content of inode ``ino`` to its *current* key, with the
  POSIX headers of its current record. The key is resolved at execution time, so a
  rename of a dirty file needs no journal rewrite.
- ``marker``: write the ``dir/`` marker object of directory inode ``ino``.
- ``copy``: server-side copy ``src`` -> ``key`` (rename of a clean file).
- ``delete``: delete ``key``. While pending, ``key`` (and, for ``dir/`` keys,
  everything below it) is tombstoned: a listing will not resurrect it.
- ``meta``: rewrite the headers of inode ``ino``'s object without re-uploading data.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class Op:
    seq: int
    kind: str
    ino: int = 0
    key: str = ""
    src: str = ""

    def encode(self) -> bytes:
        body = {k: v for k, v in asdict(self).items() if v and k != "seq"}
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


class Journal:
    """Ordered, durable list of :class:`Op`. Blocking: call from worker threads."""

    def __init__(self, env: Any) -> None:
        self.env = env
        self.db = env.open_db(b"wb.journal")
        with env.begin(db=self.db) as txn:
            cur = txn.cursor()
            self._next = int.from_bytes(cur.key(), "big") + 1 if cur.last() else 1

    def append(self, *ops: tuple[str, dict[str, Any]], remove: Iterable[int] = ()) -> list[Op]:
        """Append ops atomically (one transaction); returns them with their sequence numbers.

        ``remove`` drops entries in the same transaction. Moving an op to the end of the
        journal (a rename re-orders the upload of a dirty file behind the rename's own
        ops) is thus one atomic step: a crash can never lose the op or run it twice.
        """
        out = []
        with self.env.begin(write=True, db=self.db) as txn:
            for seq in remove:
                txn.delete(seq.to_bytes(8, "big"))
            for kind, fields in ops:
                op = Op(seq=self._next, kind=kind, **fields)
                self._next += 1
                txn.put(op.seq.to_bytes(8, "big"), op.encode())
                out.append(op)
        return out

    def remove(self, *seqs: int) -> None:
        with self.env.begin(write=True, db=self.db) as txn:
            for seq in seqs:
                txn.delete(seq.to_bytes(8, "big"))

    def load(self) -> list[Op]:
        with self.env.begin(db=self.db) as txn:
            return [Op.decode(int.from_bytes(k, "big"), v) for k, v in txn.cursor()]
