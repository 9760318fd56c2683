"""Reading bytes that may move while the read waits.

A rename of an uploaded file moves its object only when the journaled server-side copy runs
(docs/writeback.md, "The life of a key"); until then its bytes are still under the copy's
source, and the delete of that source follows the copy. A read computes where the bytes are
(``WriteBack.data_key``) and then waits, for an S3 slot and for the GET itself, and against a
slow server that wait is long enough for the copy and the delete to run: the GET then finds no
object (404) or, after a copy that gave the object a new ETag, another version (412), although
the file is intact under its new key. Found by the stress test with delayed requests: an open
for write right after a rename failed with ENOENT.

So a read that fails that way asks again where the bytes are, and if they moved, reads them
there. The chain of pending copies of one file is short and each step is final, so a few
rounds suffice; the bound keeps a pathological chain from looping.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TypeVar

from ..errors import NotFound, PreconditionFailed
from .hydrator import ObjectVersion

T = TypeVar("T")

MAX_MOVES = 8


async def read_following(
    locate: Callable[[], ObjectVersion],
    read: Callable[[ObjectVersion], Awaitable[T]],
    *,
    first: ObjectVersion | None = None,
) -> T:
    """``read(locate())``, again from the new place while the failure is explained by a move.
    ``first``: where the caller already found the bytes for this read (it is not asked twice)."""
    version = first if first is not None else locate()
    for _ in range(MAX_MOVES):
        try:
            return await read(version)
        except (NotFound, PreconditionFailed):
            moved = locate()
            if moved == version:
                raise
            version = moved
    return await read(version)
