"""The polling loop of ``tierfs stats``: one ``status`` call per interval over the control socket.

Status, not a new control operation: it already carries every counter (the Prometheus endpoint is
built from the same dict), and it is cheap enough at one call a second (a few dict reads and one
statvfs). Each call is bounded by ``timeout``; a daemon that stops answering ends the view with a
clear error instead of a frozen screen.
"""

from __future__ import annotations

import sys
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from typing import Any, TextIO

from rich.console import Console
from rich.live import Live

from ..control.client import ControlClient
from . import render
from .frame import DIRECT_WINDOW, Frame, Snapshot, build

Poll = Callable[[], Mapping[str, Any]]


def status_poller(client: ControlClient, timeout: float) -> Poll:
    def poll() -> Mapping[str, Any]:
        result = client.call("status", {}, timeout=timeout)
        if not isinstance(result, Mapping):
            raise TypeError(f"unexpected status answer: {type(result).__name__}")
        return result

    return poll


def _sample(poll: Poll) -> Snapshot:
    return Snapshot(time.monotonic(), poll())


def frames(poll: Poll, interval: float, count: int | None = None) -> Iterator[Frame]:
    """Yield one :class:`Frame` per interval (``count`` of them, or forever). The first comes after
    one interval: a rate needs two snapshots."""
    previous = _sample(poll)
    recent: deque[Snapshot] = deque([previous])  # for the direct reader's longer window
    produced = 0
    while count is None or produced < count:
        time.sleep(max(0.0, interval - (time.monotonic() - previous.at)))
        current = _sample(poll)
        while len(recent) > 1 and current.at - recent[1].at >= DIRECT_WINDOW:
            recent.popleft()
        yield build(previous, current, direct_from=recent[0])
        recent.append(current)
        produced += 1
        previous = current


def run(
    poll: Poll, *, interval: float = 1.0, once: bool = False, count: int | None = None,
    out: TextIO | None = None, force_plain: bool = False,
) -> int:  # fmt: skip
    """Draw until interrupted (or ``count`` frames; ``once`` is one frame and exit).

    On a terminal the view is redrawn in place by rich; otherwise (a pipe, a file, ``--plain``) each
    frame is printed as plain lines, separated by a blank line, so logs and scripts can read it."""
    stream = out if out is not None else sys.stdout
    limit = 1 if once else count
    terminal = stream.isatty() and not force_plain
    if not terminal:
        for n, frame in enumerate(frames(poll, interval, limit)):
            if n:
                stream.write("\n")
            stream.write("\n".join(render.plain(frame)) + "\n")
            stream.flush()
        return 0
    console = Console(file=stream)
    if once:
        for frame in frames(poll, interval, 1):
            console.print(render.rich_view(frame))
        return 0
    with Live(console=console, auto_refresh=False, screen=False) as live:
        for frame in frames(poll, interval, limit):
            live.update(render.rich_view(frame), refresh=True)
    return 0
