"""Waiting for the bucket: fsync of one file and ``tierfs flush`` / umount of the whole journal.

Both ask for a fresh attempt now (``Attempts.retry_now``), tell the executor that someone
waits (``Executor.urgent``/``flushing``), and then wait for ops to end, judging by the ledger
and the attempts, until nothing of theirs is pending or a failure says it will not be soon.
They change no other part's fields. Every wait is bounded: an fsync by the file system's
caller, a flush by its ``timeout``. Runs on the trio loop.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Any

import trio

from ..config import DEFAULT_FLUSH_TIMEOUT
from ..errors import FlushFailed, Permanent, StoreError
from .attempts import Attempts
from .executor import Executor
from .files import StagedFiles
from .journal import Op
from .ledger import Ledger
from .schedule import NODE_OPS
from .wakeup import Wakeup

Progress = Callable[[dict[str, Any]], Awaitable[None]]


class Waiters:
    def __init__(
        self, *, executor: Executor, ledger: Ledger, attempts: Attempts, files: StagedFiles, wakeup: Wakeup
    ) -> None:
        self.executor = executor
        self.ledger = ledger
        self.attempts = attempts
        self.files = files
        self.wakeup = wakeup

    async def fsync(self, ino: int) -> None:
        """Upload ``ino`` now and return once the bucket has it (or raise after a failure)."""

        def mine() -> list[Op]:
            return [op for op in self.ledger.ops_of(ino) if op.kind in NODE_OPS]

        if not mine():
            return
        with self.executor.urgent():
            # try again now, and judge by this attempt, not by the one before
            self.attempts.retry_now(op.seq for op in mine())
            self.wakeup.wake()
            with self.files.forced(ino):
                while pending := mine():
                    failed = self.attempts.of(op.seq for op in pending)
                    if failed and not any(op.seq in self.executor.running for op in pending):
                        kind = Permanent if failed[0].permanent else StoreError
                        what, error = failed[0].what, failed[0].error
                        raise kind(f"upload of {what} failed ({error}); it stays journaled")
                    await self.wakeup.changed()

    async def flush_all(
        self, progress: Progress | None = None, *, timeout: float | None = None
    ) -> dict[str, Any]:
        """Carry out the whole journal now (``tierfs flush`` / umount), reporting progress.

        Returns once the journal is empty. Raises FlushFailed, naming every path still
        pending with its last error, as soon as nothing but permanently failed ops (and
        the ops queued behind them) is left, or when ``timeout`` seconds have passed.
        """
        stats = self.executor.stats
        with self.executor.flushing():
            self.attempts.retry_now()
            self.wakeup.wake()
            started = time.monotonic()
            deadline = started + (DEFAULT_FLUSH_TIMEOUT if timeout is None else timeout)
            start_done, start_bytes = stats.uploads_done, stats.bytes_uploaded
            total = len(self.ledger.ops)
            total_bytes = sum(self.files.size_of(op.ino) or 0 for op in self.ledger.ops if op.kind == "put")
            try:
                while self.ledger.ops:
                    if progress is not None:
                        done = stats.uploads_done - start_done
                        await progress(
                            {
                                "done_files": done,
                                "total_files": max(total, done + len(self.ledger.ops)),
                                "done_bytes": stats.bytes_uploaded - start_bytes,
                                "total_bytes": total_bytes,
                            }
                        )
                    if self.executor.stuck_on_permanent():
                        raise FlushFailed(self._pending_failures(), "permanent errors, not retrying")
                    if time.monotonic() >= deadline:
                        raise FlushFailed(
                            self._pending_failures(), f"flush timeout ({deadline - started:.0f} s) passed"
                        )
                    with trio.move_on_after(min(0.25, max(0.0, deadline - time.monotonic()))):
                        await self.wakeup.changed()
            finally:
                self.attempts.after_flush()
        return {
            "uploaded_files": stats.uploads_done - start_done,
            "uploaded_bytes": stats.bytes_uploaded - start_bytes,
            "seconds": round(time.monotonic() - started, 3),
        }

    def _pending_failures(self) -> dict[str, str]:
        """Every pending op, named by path, with its last error (or what it waits for)."""
        out = self.attempts.failing()
        running = self.executor.running
        for op in self.ledger.ops:
            what = self.executor.what(op)
            out.setdefault(what, "running" if op.seq in running else "waiting behind a failed upload")
        return out
