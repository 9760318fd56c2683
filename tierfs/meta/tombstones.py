"""Keys deleted here that a listing must not bring back.

A delete is journaled at once and carried out later, so for a while the bucket still has
the key. A listing that runs meanwhile must hide it (pending tombstones). A listing that
*started* before the delete reached the bucket may also have fetched its page before the
delete and apply it after; so a tombstone outlives its delete by the time it completed,
and a listing asks "was this deleted at or after I started?" (``hides(key, since)``).

Completed tombstones are kept for ``GRACE`` seconds (longer than any listing of one
directory takes: every LIST page is bounded by ``--timeout``) and at most ``MAX_DONE`` of
them, the oldest dropped first, so memory stays bounded on a mount that deletes millions.

Thread-safe: write-back updates it on the trio loop, listings read it in worker threads.
"""

from __future__ import annotations

import contextlib
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator

GRACE = 600.0
MAX_DONE = 100_000


class Tombstones:
    def __init__(self, clock: Callable[[], float]) -> None:
        self._clock = clock
        self._pending: dict[str, int] = {}
        self._done: OrderedDict[str, float] = OrderedDict()
        self._lock = threading.Lock()

    def add(self, key: str) -> None:
        with self._lock:
            self._pending[key] = self._pending.get(key, 0) + 1

    def remove(self, key: str, *, done: bool) -> None:
        """One pending delete of ``key`` left the journal; ``done`` if the bucket carried it out."""
        with self._lock:
            count = self._pending.get(key, 0) - 1
            if count > 0:
                self._pending[key] = count
            else:
                self._pending.pop(key, None)
            if done:
                now = self._clock()
                self._done[key] = now
                self._done.move_to_end(key)
                while self._done and (
                    len(self._done) > MAX_DONE or next(iter(self._done.values())) < now - GRACE
                ):
                    self._done.popitem(last=False)

    @contextlib.contextmanager
    def holding(self, *keys: str) -> Iterator[None]:
        """Hide ``keys`` from listings while an unlink or rename is between the namespace and the journal.

        The namespace drops the entry first and the journaled delete (which then hides the
        key until the bucket has it) comes a thread hop later; a listing in that gap would
        otherwise bring the old name back from the bucket.
        """
        for key in keys:
            self.add(key)
        try:
            yield
        finally:
            for key in keys:
                self.remove(key, done=False)

    def pending(self, key: str) -> bool:
        return key in self._pending

    def hides(self, key: str, since: float) -> bool:
        """True if ``key`` or a ``dir/`` above it is being deleted, or was deleted at or after ``since``."""
        with self._lock:
            if not self._pending and not self._done:
                return False
            if self._hit(key, since):
                return True
            pos = key.find("/")
            while 0 <= pos < len(key) - 1:
                if self._hit(key[: pos + 1], since):
                    return True
                pos = key.find("/", pos + 1)
            return False

    def _hit(self, key: str, since: float) -> bool:
        if key in self._pending:
            return True
        done = self._done.get(key)
        return done is not None and done >= since
