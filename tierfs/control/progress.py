"""Terminal progress for long control operations (flush, prefetch).

The daemon sends progress dicts with ``done_bytes``, ``total_bytes``, ``done_files`` and
``total_files`` (any may be missing). On a TTY we redraw one line on stderr; otherwise
(logs, systemd, CI) we print a plain line at most every few seconds so the output
stays readable. The formatting functions are pure so they can be tested directly.
"""

from __future__ import annotations

import math
import shutil
import sys
import time
from collections import deque
from collections.abc import Callable, Mapping
from typing import Any, TextIO

from ..units import format_bytes

BAR_WIDTH = 24
RATE_WINDOW = 5.0  # seconds of history the rate is averaged over


def format_eta(seconds: float | None) -> str:
    """``1:02:03`` / ``2:05``; ``--:--`` when unknown."""
    if seconds is None or not math.isfinite(seconds) or seconds < 0:
        return "--:--"
    total = round(seconds)
    hours, rest = divmod(total, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def format_rate(bytes_per_second: float | None) -> str:
    if bytes_per_second is None or not math.isfinite(bytes_per_second):
        return "-- B/s"
    return f"{format_bytes(bytes_per_second)}/s"


def render_bar(fraction: float, width: int = BAR_WIDTH) -> str:
    fraction = min(max(fraction, 0.0), 1.0)
    filled = int(fraction * width)
    return "[" + "#" * filled + "." * (width - filled) + "]"


def _number(progress: Mapping[str, Any], key: str) -> int | None:
    value = progress.get(key)
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return int(value)


def render_line(label: str, progress: Mapping[str, Any], rate: float | None) -> str:
    """One status line, e.g. ``flush [###...]  45%  1.2 GiB / 2.6 GiB  12/30 files  8.5 MiB/s  ETA 0:17``."""
    done_bytes = _number(progress, "done_bytes") or 0
    total_bytes = _number(progress, "total_bytes")
    done_files = _number(progress, "done_files")
    total_files = _number(progress, "total_files")
    parts = [label]
    if total_bytes:
        fraction = done_bytes / total_bytes
        parts.append(f"{render_bar(fraction)} {fraction * 100:3.0f}%")
        parts.append(f"{format_bytes(done_bytes)} / {format_bytes(total_bytes)}")
    else:
        parts.append(format_bytes(done_bytes))
    if done_files is not None:
        parts.append(
            f"{done_files}/{total_files} files" if total_files is not None else f"{done_files} files"
        )
    parts.append(format_rate(rate))
    if total_bytes:
        eta = (total_bytes - done_bytes) / rate if rate else None
        parts.append(f"ETA {format_eta(eta)}")
    return "  ".join(parts)


class RateMeter:
    """Bytes per second over the last RATE_WINDOW seconds, so a stall shows up quickly."""

    def __init__(self, window: float = RATE_WINDOW) -> None:
        self.window = window
        self.samples: deque[tuple[float, int]] = deque()

    def add(self, now: float, done_bytes: int) -> float | None:
        self.samples.append((now, done_bytes))
        while len(self.samples) > 2 and now - self.samples[1][0] >= self.window:
            self.samples.popleft()
        first_t, first_b = self.samples[0]
        if now - first_t <= 0:
            return None
        return max(done_bytes - first_b, 0) / (now - first_t)


class ProgressBar:
    """Feed it progress dicts (``update``) and call ``finish`` once; writes to ``stream``."""

    def __init__(
        self,
        label: str,
        stream: TextIO | None = None,
        *,
        is_tty: bool | None = None,
        clock: Callable[[], float] = time.monotonic,
        plain_interval: float = 5.0,
        tty_interval: float = 0.1,
    ) -> None:
        self.label = label
        self.stream = stream if stream is not None else sys.stderr
        self.is_tty = self.stream.isatty() if is_tty is None else is_tty
        self.clock = clock
        self.interval = tty_interval if self.is_tty else plain_interval
        self.meter = RateMeter()
        self.last: Mapping[str, Any] | None = None
        self.rate: float | None = None
        self.last_draw: float | None = None
        self.printed: str | None = None

    def update(self, progress: Mapping[str, Any]) -> None:
        now = self.clock()
        self.last = progress
        self.rate = self.meter.add(now, _number(progress, "done_bytes") or 0)
        if self.last_draw is None or now - self.last_draw >= self.interval:
            self.last_draw = now
            self._draw()

    def _draw(self) -> None:
        if self.last is None:
            return
        line = render_line(self.label, self.last, self.rate)
        if line == self.printed:
            return
        self.printed = line
        if self.is_tty:
            width = shutil.get_terminal_size((100, 20)).columns
            self.stream.write("\r" + line[: max(width - 1, 10)] + "\x1b[K")
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def finish(self) -> None:
        """Draw the final state (if anything was reported) and end the line."""
        if self.last is None:
            return
        self._draw()
        if self.is_tty:
            self.stream.write("\n")
            self.stream.flush()
