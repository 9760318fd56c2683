"""Group commit for one LMDB environment: many writers' changes, one transaction, one flush.

Blocking: call from worker threads only (never the trio loop). The write-back journal and
the namespace's record updates share one committer per environment (the daemon wires it),
so a burst of small files costs a few flushes instead of several per file. A caller waits
only for the commit carrying its change, which one of the callers is making: the wait is
bounded by one LMDB commit and flush.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

T = TypeVar("T")


@dataclass
class _Change(Generic[T]):
    """One caller's change, waiting for the batch that carries it to be durable."""

    apply: Callable[[Any], T]  # runs inside the shared write transaction
    done: bool = False
    value: T | None = None
    error: BaseException | None = None


class GroupCommit:
    """Leader/follower group commit over one LMDB environment (blocking: worker threads only).

    A caller queues its change. If no commit is under way it becomes the leader: it takes
    every change queued so far, applies them in one write transaction, commits, flushes the
    environment, and only then marks them done. Callers arriving meanwhile queue up for the
    next batch; one of them leads it. A change that raises fails alone: the batch is rolled
    back and its changes are applied one transaction each, so one bad change cannot take
    its neighbours' changes with it (nor report them as done).
    """

    def __init__(self, env: Any) -> None:
        self.env = env
        self._cond = threading.Condition()
        self._queue: list[_Change[Any]] = []
        self._leading = False
        self.batches = 0  # commits made, for tests and status (changes per batch = grouping)
        self.changes = 0

    def run(self, apply: Callable[[Any], T]) -> T:
        change: _Change[T] = _Change(apply)
        with self._cond:
            self._queue.append(change)
            while self._leading and not change.done:
                self._cond.wait()
            if not change.done:
                self._leading = True
                batch, self._queue = self._queue, []
        if not change.done:
            try:
                self._commit(batch)
            finally:
                with self._cond:
                    self._leading = False
                    self._cond.notify_all()
        if change.error is not None:
            raise change.error
        return change.value  # type: ignore[return-value]

    def _commit(self, batch: list[_Change[Any]]) -> None:
        try:
            with self.env.begin(write=True) as txn:
                values = [change.apply(txn) for change in batch]
            self.env.sync(True)
        except Exception:
            self._commit_one_by_one(batch)
            return
        except BaseException as exc:  # nothing is known to be durable: every waiter learns it
            for change in batch:
                change.error, change.done = exc, True
            raise
        self.batches += 1
        self.changes += len(batch)
        for change, value in zip(batch, values, strict=True):
            change.value, change.done = value, True

    def _commit_one_by_one(self, batch: list[_Change[Any]]) -> None:
        for change in batch:
            try:
                with self.env.begin(write=True) as txn:
                    value = change.apply(txn)
                self.env.sync(True)
                change.value = value
                self.batches += 1
                self.changes += 1
            except BaseException as exc:
                change.error = exc
            change.done = True
