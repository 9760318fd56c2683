"""Where the bytes of a file are now: the one question the read path asks per READ.

A file's bytes are either staged locally (written here and not yet uploaded, or uploaded and not
yet retired from staging) or in the bucket under some key, which is not always the file's own
name: after a rename, they stay under the old key until the journaled server-side copy has run
(docs/writeback.md, "The life of a key"). Reads used to ask write-back twice per READ
(``is_staged``, then ``data_key``); :class:`BytePlaces` asks once and answers both.

Loop rules: :meth:`BytePlaces.where` runs on the trio loop and must be a few dictionary lookups,
never I/O nor an await, since every READ pays it. :meth:`BytePlaces.read_staged` is async, runs on
the loop and does its file I/O in worker threads; it answers None when the staging file retired
meanwhile (the bucket then has the bytes, so the read asks :meth:`where` again).

The read layer defines this seam; write-back implements it (``WriteBack.where`` and
``read_staged``) and the file system (``fs.FileSystem``) asks it, so the read path never imports
the write-back layer above it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True, slots=True)
class Where:
    """The answer: ``staged`` (read it with ``read_staged``), else the bucket ``key`` holding it."""

    staged: bool
    key: str


class BytePlaces(Protocol):
    def where(self, ino: int, key: str) -> Where:
        """Where the bytes of ``ino``, named ``key`` in the namespace, are right now (on the loop)."""
        ...

    async def read_staged(self, ino: int, offset: int, size: int) -> bytes | None:
        """Bytes of a staged file; None if its staging file retired since :meth:`where` said so."""
        ...


class InTheBucket:
    """A mount without write-back (read-only): every file's bytes are under its own key."""

    def where(self, ino: int, key: str) -> Where:
        return Where(False, key)

    async def read_staged(self, ino: int, offset: int, size: int) -> bytes | None:
        return None
