"""Wake-ups between the write-back parts: "look at the journal again" and "an op ended".

The executor sleeps until woken (a journal append, a writer closing, a stream ending) or until
its next deadline; fsync and flush waiters sleep until an op ends. Only this part changes the
two events. Plain trio events on the loop.
"""

from __future__ import annotations

import trio


class Wakeup:
    """How the parts tell the executor to look at the journal again (``wake``), and how waiters
    learn that an op ended (``signal`` wakes both)."""

    def __init__(self) -> None:
        self._wake = trio.Event()
        self._changed = trio.Event()

    def wake(self) -> None:
        self._wake.set()

    def signal(self) -> None:
        self._wake.set()
        changed, self._changed = self._changed, trio.Event()
        changed.set()

    async def changed(self) -> None:
        event = self._changed
        await event.wait()

    def rearm(self) -> trio.Event:
        """A new pass of the executor: the event the next ``wake`` sets."""
        self._wake = trio.Event()
        return self._wake
