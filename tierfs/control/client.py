"""The client side of the control socket: request framing, errors and a blocking client.

Trio-free and cheap to import (stdlib only), so that any process can talk to a mount: the
CLI, and Python code beside a mount such as the direct reader (``tierfs.reader``). The
server (``protocol.ControlServer``) runs inside the daemon's trio loop and speaks the same
framing, which lives here once.

Framing, one request per connection: the client sends ``{"op": ..., "args": {...}}`` and a
newline; the server answers any number of ``{"progress": {...}}`` lines, then exactly one
``{"ok": true, "result": ...}`` or ``{"ok": false, "error": "one line"}``. A client that
disconnects cancels its operation.

Bounded waits: a progress update may carry ``"deadline": SECONDS``, the server's promise
that the final reply comes within that many seconds from now (a flush states its
``--flush-timeout`` plus slack). The client strips it from what it shows and gives up
:data:`DEADLINE_GRACE` seconds after it, so even a daemon whose operation is stuck while
its loop still sends progress cannot keep a caller waiting for ever. A failed flush
answers ``{"ok": false, "error": ..., "reason": ..., "failures": {path: last error}}``,
which the client raises as :class:`tierfs.errors.FlushFailed`, so the CLI can name each
file that was not uploaded.

Where the socket of a mount is, and the errors of talking to it: :mod:`tierfs.control.registry`.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from ..errors import FlushFailed, TierfsError
from .registry import ControlError, ControlTimeout, ControlUnavailable

if TYPE_CHECKING:
    import socket

DEADLINE_GRACE = 5.0  # the client waits this long past a deadline the server promised


def one_line(text: str) -> str:
    """``text`` as one line for the user (replies and errors never span lines)."""
    return " ".join(text.split()) or "unknown error"


def encode_message(message: Mapping[str, Any]) -> bytes:
    """One protocol line: compact JSON and a newline (anything JSON cannot encode becomes a string)."""
    return json.dumps(message, default=str, separators=(",", ":")).encode() + b"\n"


class ControlClient:
    """Blocking client for CLI commands (plain sockets: the CLI has no event loop)."""

    def __init__(self, sock_path: str | os.PathLike[str], *, mountpoint: str | None = None) -> None:
        self.sock_path = os.fspath(sock_path)
        self.where = mountpoint or self.sock_path

    def call(
        self,
        op: str,
        args: Mapping[str, Any] | None = None,
        on_progress: Callable[[dict[str, Any]], None] | None = None,
        timeout: float | None = 30.0,
    ) -> Any:
        """Send one request and return its result.

        ``timeout`` bounds the connect and each wait for the next line (progress keeps a
        long operation alive); None waits forever, for operations that report progress.
        A deadline the server states in a progress line bounds the whole wait as well
        (ControlTimeout); a failed flush is raised as FlushFailed.
        """
        import socket  # here, not at the top: the direct reader imports this module for its errors

        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        with sock:
            try:
                sock.connect(self.sock_path)
            except (FileNotFoundError, ConnectionRefusedError, NotADirectoryError):
                raise ControlUnavailable(f"no tierfs mount at {self.where}") from None
            except PermissionError:
                raise ControlError(f"permission denied talking to the tierfs mount at {self.where}") from None
            except TimeoutError:
                raise ControlUnavailable(f"the tierfs daemon of {self.where} does not answer") from None
            # The server may refuse us before reading the request; its reply is still queued.
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                sock.sendall(encode_message({"op": op, "args": dict(args or {})}))
            return self._read_reply(sock, op, on_progress)

    def _read_reply(
        self, sock: socket.socket, op: str, on_progress: Callable[[dict[str, Any]], None] | None
    ) -> Any:
        silence = sock.gettimeout()
        deadline: float | None = None  # monotonic, once the server has promised one
        past_deadline = False  # whether the wait that may time out next ends at the deadline
        try:
            with sock.makefile("rb") as lines:
                while True:
                    if deadline is not None:
                        left = deadline - time.monotonic()
                        past_deadline = silence is None or left <= silence
                        if left <= 0:
                            raise TimeoutError
                        sock.settimeout(left if silence is None else min(silence, left))
                    raw = lines.readline()
                    if not raw:
                        break
                    message = self._decode(raw)
                    progress = message.get("progress")
                    if isinstance(progress, dict):
                        promised = progress.pop("deadline", None)
                        if isinstance(promised, int | float) and not isinstance(promised, bool):
                            deadline = time.monotonic() + float(promised) + DEADLINE_GRACE
                        if on_progress is not None and progress:
                            on_progress(progress)
                        continue
                    if "progress" in message:
                        continue
                    if message.get("ok") is True:
                        return message.get("result")
                    raise self._error(message)
        except TimeoutError:
            if past_deadline:
                raise ControlTimeout(
                    f"the tierfs daemon of {self.where} did not finish {op} by its deadline"
                ) from None
            raise ControlTimeout(f"timed out waiting for the tierfs daemon of {self.where}") from None
        except ConnectionResetError:
            pass
        raise ControlError(f"the tierfs daemon of {self.where} closed the connection without answering")

    def _decode(self, raw: bytes) -> dict[str, Any]:
        try:
            message = json.loads(raw)
        except ValueError:
            raise ControlError(f"garbled reply from the tierfs daemon of {self.where}") from None
        if not isinstance(message, dict):
            raise ControlError(f"garbled reply from the tierfs daemon of {self.where}")
        return message

    @staticmethod
    def _error(message: Mapping[str, Any]) -> TierfsError:
        """The exception an error reply stands for: FlushFailed when it names failed files."""
        failures = message.get("failures")
        if isinstance(failures, dict):
            named = {str(path): one_line(str(error)) for path, error in failures.items()}
            return FlushFailed(named, one_line(str(message.get("reason") or "flush failed")))
        return ControlError(one_line(str(message.get("error") or "unknown error")))
