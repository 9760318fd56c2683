"""Tell a tierfs daemon which files will be read next, and ask it to fetch a missed file now.

The client side of the ``hint`` control op (docs/reader.md, "Hints"). Standard library only, no
trio: DataLoader workers import the reader, and this must stay light. It speaks the control
socket's framing through the trio-free control client (:mod:`tierfs.control.client`, plain
``socket``), and finds the socket through the trio-free registry (:mod:`tierfs.control.registry`).

* :func:`prefetch` (``tierfs.reader.prefetch``) starts a :class:`HintStream`: a background
  thread sends the paths in order, in chunks of :data:`CHUNK`, as fast as the daemon's queue
  takes them, so a list of a million paths never holds up the caller; the caller reports its
  reading position with :meth:`HintStream.advance`, and the daemon drops what falls behind it.
* :func:`fetch_now` is the direct reader's answer to a miss: the daemon fetches the whole file
  into the cache at its full concurrency and answers when it is there, and the reader then
  reads it from the cache.

Hints are an optimisation: a daemon that is gone, refuses or times out only ends the stream
(``HintStream.error`` says why); nothing raises into the loader.
"""

from __future__ import annotations

import bisect
import contextlib
import os
import threading
from array import array
from collections.abc import Iterable, Iterator
from typing import Any

from ..control.registry import ControlError, mount_holding

CHUNK = 2048  # paths per request (~100 KiB of JSON for ordinary names)
CHUNK_BYTES = 512 << 10  # and at most this much path text, well below the daemon's 1 MiB request limit
CALL_TIMEOUT = 30.0  # seconds for one hint call (connect, and each wait for a line)
RETRY_WAIT = 0.2  # seconds before offering again what a full daemon queue did not take
POSITION_EVERY = 0.1  # seconds: the least time between two position-only updates


class HintsUnavailable(Exception):
    """No daemon took the hint (not a tierfs path, no mount answers, or it refused)."""


def call(sock_path: str, op: str, args: dict[str, Any], timeout: float = CALL_TIMEOUT) -> Any:
    """One request over the control socket (the trio-free client); the result, or HintsUnavailable."""
    from ..control.client import ControlClient  # at first use: `import tierfs.reader` stays light

    try:
        return ControlClient(sock_path).call(op, args, timeout=timeout)
    except (ControlError, OSError, ValueError) as exc:  # ControlError covers error replies, timeouts
        raise HintsUnavailable(f"{op}: {exc}") from None


def batches(items: Iterable[str], count: int = CHUNK, size: int = CHUNK_BYTES) -> Iterator[list[str]]:
    """``items`` in lists of at most ``count`` items and ``size`` bytes of text (one request each)."""
    batch: list[str] = []
    held = 0
    for item in items:
        if batch and (len(batch) >= count or held + len(item) > size):
            yield batch
            batch, held = [], 0
        batch.append(item)
        held += len(item) + 4  # quotes, comma, some escaping
    if batch:
        yield batch


class MountPaths:
    """Maps paths to (mount's registry record, path relative to its mountpoint), one registry walk
    per directory: a million paths in a few directories cost a few walks, not a million.
    Also used by ``tierfs prefetch --from``."""

    def __init__(self) -> None:
        self._dirs: dict[str, tuple[dict[str, Any], str] | None] = {}

    def locate(self, path: str) -> tuple[dict[str, Any], str] | None:
        """None if ``path`` is on no tierfs mount that answers the registry."""
        directory, name = os.path.split(os.path.abspath(path))
        if directory not in self._dirs:
            try:
                record, rel = mount_holding(directory)
                self._dirs[directory] = (record, "" if rel == "." else rel)
            except (ControlError, OSError):
                self._dirs[directory] = None
        found = self._dirs[directory]
        if found is None or not name:
            return None
        return found[0], f"{found[1]}/{name}" if found[1] else name


_mounts = MountPaths()
_mounts_pid = os.getpid()


def _locate(path: str | os.PathLike[str]) -> tuple[str, str] | None:
    global _mounts, _mounts_pid
    if os.getpid() != _mounts_pid:  # a forked worker starts its own map
        _mounts, _mounts_pid = MountPaths(), os.getpid()
    found = _mounts.locate(os.fspath(path))
    return None if found is None else (str(found[0]["socket"]), found[1])


def fetch_now(path: str | os.PathLike[str], *, ino: int, etag: str, timeout: float = CALL_TIMEOUT) -> bool:
    """Have the daemon fetch the file at ``path`` whole into its cache now, if it is still the version
    ``ino``/``etag`` (what a direct reader resolved); True once it is there."""
    where = _locate(path)
    if where is None:
        return False
    try:
        result = call(where[0], "hint", {"wait": True, "ino": ino, "etag": etag}, timeout)
    except HintsUnavailable:  # the read goes through the mount instead (no logging: it costs the import)
        return False
    return isinstance(result, dict) and result.get("fetched") == 1


class HintStream:
    """The paths a loader will read, in order, sent to the daemon by a background thread.

    One stream serves one mount: the mount of the first path that is on one. Paths on no
    tierfs mount or on another mount are skipped (``skipped``); their numbers still count, so
    :meth:`advance` takes positions in the caller's own list.
    """

    def __init__(self, paths: Iterable[str | os.PathLike[str]]) -> None:
        self.id = os.urandom(16).hex()
        self.sent = 0
        self.skipped = 0
        self.error: str | None = None
        self._paths = iter(paths)
        self._sock: str | None = None
        self._seqs = array("q")  # the caller's index of each path sent, ascending
        self._position = 0  # the caller's position
        self._sent_position = 0  # in the daemon's numbering (paths of this mount only)
        self._reported = -1
        self._lock = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="tierfs-hints", daemon=True)
        self._thread.start()

    def advance(self, position: int) -> None:
        """The caller has handed its first ``position`` paths to its readers. Never blocks."""
        with self._lock:
            if position > self._position:
                self._position = position
                self._lock.notify()

    def close(self) -> None:
        """Stop sending, and have the daemon forget what is still queued (waits at most briefly)."""
        with self._lock:
            self._closed = True
            self._lock.notify()
        if threading.current_thread() is not self._thread:
            self._thread.join(CALL_TIMEOUT)

    def __enter__(self) -> HintStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- the thread ---------------------------------------------------------------------------------

    def _ours(self) -> Iterator[str]:
        """The relative paths of this stream's mount; notes each one's index in the caller's list."""
        for index, path in enumerate(self._paths):
            where = _locate(path)
            if where is None or (self._sock is not None and where[0] != self._sock):
                self.skipped += 1
                continue
            self._sock = where[0]
            self._seqs.append(index)
            yield where[1]

    def _daemon_position(self) -> int:
        """The caller's position in the daemon's numbering: how many sent paths lie before it."""
        return bisect.bisect_left(self._seqs, self._position)

    def _send(self, args: dict[str, Any]) -> dict[str, Any]:
        assert self._sock is not None
        position = self._daemon_position()
        if position > self._reported:
            args["position"] = position
        result = call(self._sock, "hint", {"stream": self.id, **args})
        if "position" in args:
            self._reported = position
        return result if isinstance(result, dict) else {}

    def _run(self) -> None:
        try:
            for rels in batches(self._ours()):
                start = self.sent
                while rels:
                    with self._lock:
                        if self._closed:
                            return
                    taken = int(self._send({"paths": rels, "start": start}).get("accepted", 0))
                    self.sent += taken
                    start += taken
                    rels = rels[taken:]
                    if rels:
                        with self._lock:
                            self._lock.wait(RETRY_WAIT)
            while True:  # everything sent: keep the daemon told where the reader is
                with self._lock:
                    if not self._closed and self._daemon_position() <= self._reported:
                        self._lock.wait(POSITION_EVERY * 10)
                    if self._closed:
                        return
                if self._sock is None:
                    return
                if self._daemon_position() > self._reported:
                    self._send({})
                    with self._lock:
                        self._lock.wait(POSITION_EVERY)
        except Exception as exc:  # HintsUnavailable, or the caller's iterable failed: hints just stop
            self.error = str(exc)
        finally:
            self._end()

    def _end(self) -> None:
        if self._sock is None:
            return
        with contextlib.suppress(HintsUnavailable):
            call(self._sock, "hint", {"stream": self.id, "end": True}, timeout=5.0)


def prefetch(paths: Iterable[str | os.PathLike[str]]) -> HintStream:
    """Tell the daemon the files in ``paths`` will be read in this order; returns the stream.

    Returns at once: the paths are sent by a background thread (``paths`` may be a lazy
    iterable, consumed by that thread). Report progress with ``stream.advance(n)`` (the first
    ``n`` paths are handed to readers), and ``stream.close()`` when done."""
    return HintStream(paths)
