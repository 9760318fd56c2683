"""Failed attempts of journaled ops: when each may be tried again, and what to tell the user.

A transient failure (timeouts, 5xx, 429, connection errors) is retried with a growing
backoff; a permanent one (403, 400, a deleted bucket) is not retried during a flush, which
then fails at once naming the files, and only rarely in the background (credentials may be
fixed). An fsync or a flush wants a fresh attempt now, judged by itself and not by the one
before. Only this part changes these records; the executor reports failures to it and asks
it which ops are held back. Plain dict work on the trio loop.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass

RETRY_BACKOFF = (1.0, 2.0, 5.0)  # seconds before the 1st, 2nd and later retries of a transient failure
PERMANENT_BACKOFF = 60.0  # a permanent failure is retried in the background this rarely (creds may be fixed)


@dataclass
class Failure:
    what: str  # the path or key the op writes
    error: str
    permanent: bool
    attempts: int


class Attempts:
    def __init__(self, clock: Callable[[], float]) -> None:
        self._clock = clock
        self._retry_at: dict[int, float] = {}  # seq -> not before this time
        self._failures: dict[int, Failure] = {}  # seq -> its last failure

    def failed(self, seq: int, what: str, error: str, *, permanent: bool, flushing: bool) -> Failure:
        """Record a failed attempt of op ``seq`` and hold it back (for good while a flush runs,
        if permanent: the flush then reports it)."""
        previous = self._failures.get(seq)
        failure = Failure(what, error, permanent, previous.attempts + 1 if previous else 1)
        self._failures[seq] = failure
        if permanent:
            backoff = math.inf if flushing else PERMANENT_BACKOFF
        else:
            backoff = RETRY_BACKOFF[min(failure.attempts, len(RETRY_BACKOFF)) - 1]
        self._retry_at[seq] = self._clock() + backoff
        return failure

    def forget(self, seq: int) -> None:
        """Op ``seq`` is done or dropped."""
        self._retry_at.pop(seq, None)
        self._failures.pop(seq, None)

    def retry_now(self, seqs: Iterable[int] | None = None) -> None:
        """Try these ops (every op: None) again at once, judged by the new attempt alone."""
        if seqs is None:
            self._retry_at.clear()
            self._failures.clear()
            return
        for seq in seqs:
            self.forget(seq)

    def after_flush(self) -> None:
        """A flush ended: permanent failures it did not retry go back to the background's rare retry."""
        later = self._clock() + PERMANENT_BACKOFF
        for seq, at in self._retry_at.items():
            if math.isinf(at):
                self._retry_at[seq] = later

    # -- queries ----------------------------------------------------------------------------------------

    def held_back(self, seq: int, now: float) -> bool:
        return self._retry_at.get(seq, 0.0) > now

    def next_retry(self, running: Collection[int]) -> float:
        """When the first op that is held back (and not running) may be tried again."""
        return min((at for seq, at in self._retry_at.items() if seq not in running), default=math.inf)

    def of(self, seqs: Iterable[int]) -> list[Failure]:
        return [self._failures[seq] for seq in seqs if seq in self._failures]

    def any_permanent(self) -> bool:
        return any(f.permanent for f in self._failures.values())

    def failing(self) -> dict[str, str]:
        """Each failing op, named by path, with its last error."""
        return {f.what: f.error for f in self._failures.values()}
