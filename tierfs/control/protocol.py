"""The server side of the control socket: it runs inside the daemon's trio loop.

The framing, the errors and the blocking client are :mod:`tierfs.control.client`; where a
mount's socket is, :mod:`tierfs.control.registry`. Both are trio-free, so that a process
that only talks to a mount (the CLI, the direct reader) never imports this module or trio.

One request per connection (see ``client``). The server admits only root and the mount's
owner (SO_PEERCRED), drops a client that sends no request within ``REQUEST_TIMEOUT``, runs
the operation's handler as a trio task, forwards its progress lines, and cancels it when the
client disconnects. A handler's ``TierfsError`` becomes a one-line error reply; anything
else is logged and answered as one line too, so the server survives every handler.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import stat
import struct
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import trio

from ..errors import FlushFailed, TierfsError
from .client import encode_message, one_line
from .registry import ControlError

__all__ = ["ControlError", "ControlServer", "Handler", "ProgressCallback", "peer_allowed", "peer_uid"]

log = logging.getLogger(__name__)

ProgressCallback = Callable[[dict[str, Any]], Awaitable[None]]
Handler = Callable[[dict[str, Any], ProgressCallback], Awaitable[Any]]

MAX_REQUEST_BYTES = 1 << 20
REQUEST_TIMEOUT = 30.0  # a connected client that never sends a request is dropped after this
_PEERCRED = struct.Struct("iII")  # struct ucred: pid_t pid; uid_t uid; gid_t gid


def peer_uid(sock: socket.socket | trio.socket.SocketType) -> int:
    """The uid of the process at the other end of a connected AF_UNIX socket (SO_PEERCRED)."""
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size)
    _pid, uid, _gid = _PEERCRED.unpack(raw)
    return int(uid)


def peer_allowed(uid: int, owner_uid: int) -> bool:
    """Only root and the mount's owner may steer it: flush/evict/prefetch cost money and I/O."""
    return uid in (0, owner_uid)


class _LineReader:
    """Reads the single request line, keeping whatever follows for the disconnect watcher."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.buffer = bytearray()

    async def readline(self) -> bytes | None:
        while b"\n" not in self.buffer:
            if len(self.buffer) > MAX_REQUEST_BYTES:
                raise ControlError("request too long")
            data = await self.stream.receive_some(65536)
            if not data:
                return None
            self.buffer += data
        line, _, rest = bytes(self.buffer).partition(b"\n")
        self.buffer = bytearray(rest)
        return line


def _parse_request(line: bytes) -> tuple[str, dict[str, Any]]:
    try:
        request = json.loads(line)
    except ValueError:
        raise ControlError("malformed request (not JSON)") from None
    if not isinstance(request, dict) or not isinstance(request.get("op"), str):
        raise ControlError('malformed request (expected {"op": ..., "args": {...}})')
    args = request.get("args") or {}
    if not isinstance(args, dict):
        raise ControlError("malformed request (args must be an object)")
    return request["op"], args


class ControlServer:
    """Serves the control socket of one mount inside the daemon's trio loop."""

    def __init__(
        self, sock_path: str | os.PathLike[str], handlers: Mapping[str, Handler], owner_uid: int
    ) -> None:
        self.sock_path = os.fspath(sock_path)
        self.handlers = handlers
        self.owner_uid = owner_uid

    async def _remove_stale(self) -> None:
        """Unlink a socket left by a dead daemon, but never a live one's or a non-socket file."""
        try:
            st = os.lstat(self.sock_path)
        except FileNotFoundError:
            return
        if not stat.S_ISSOCK(st.st_mode):
            raise ControlError(f"{self.sock_path} exists and is not a socket")
        probe = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        with probe:
            try:
                await probe.connect(self.sock_path)
            except OSError:
                os.unlink(self.sock_path)
                return
        raise ControlError(f"another tierfs daemon is already listening on {self.sock_path}")

    def _secure_socket(self) -> None:
        os.chmod(self.sock_path, 0o600)
        if os.stat(self.sock_path).st_uid == self.owner_uid:
            return
        try:
            os.chown(self.sock_path, self.owner_uid, -1)
        except PermissionError:
            # Only root can give the socket away; the peer-credential check still admits the owner.
            log.warning("cannot chown control socket %s to uid %d", self.sock_path, self.owner_uid)

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Bind, secure and serve the socket until cancelled; removes the socket on the way out."""
        await self._remove_stale()
        sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        bound_ino: int | None = None
        try:
            await sock.bind(self.sock_path)
            bound_ino = os.stat(self.sock_path).st_ino
            self._secure_socket()
            sock.listen(64)
            listener = trio.SocketListener(sock)
            task_status.started()
            await trio.serve_listeners(self._serve_connection, [listener])
        finally:
            sock.close()
            if bound_ino is not None:
                self._unlink_if_ours(bound_ino)

    def _unlink_if_ours(self, ino: int) -> None:
        try:
            if os.stat(self.sock_path).st_ino == ino:
                os.unlink(self.sock_path)
        except FileNotFoundError:
            pass

    async def _serve_connection(self, stream: trio.SocketStream) -> None:
        async with stream:
            try:
                await self._converse(stream)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                log.debug("control client went away")
            except Exception:
                log.exception("control connection failed")

    async def _converse(self, stream: trio.SocketStream) -> None:
        uid = peer_uid(stream.socket)
        if not peer_allowed(uid, self.owner_uid):
            log.warning("refused control connection from uid %d", uid)
            await stream.send_all(encode_message({"ok": False, "error": "permission denied"}))
            return
        reader = _LineReader(stream)
        try:
            with trio.fail_after(REQUEST_TIMEOUT):
                line = await reader.readline()
            if line is None:
                return
            op, args = _parse_request(line)
        except (ControlError, trio.TooSlowError) as exc:
            message = "timed out waiting for the request" if isinstance(exc, trio.TooSlowError) else str(exc)
            await stream.send_all(encode_message({"ok": False, "error": message}))
            return
        handler = self.handlers.get(op)
        if handler is None:
            await stream.send_all(encode_message({"ok": False, "error": f"unknown operation {op!r}"}))
            return
        reply = await self._run(op, handler, args, reader)
        if reply is not None:
            await stream.send_all(encode_message(reply))

    async def _run(
        self, op: str, handler: Handler, args: dict[str, Any], reader: _LineReader
    ) -> dict[str, Any] | None:
        """Run one handler; None if the client disconnected (and the handler was cancelled)."""
        stream = reader.stream
        reply: dict[str, Any] | None = None
        sending = trio.Lock()  # a handler's tasks may report at once; a stream takes one sender

        async def progress(update: dict[str, Any]) -> None:
            # A failed send means the client left: the watcher sees that and cancels us.
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                async with sending:
                    await stream.send_all(encode_message({"progress": update}))

        async def watch_disconnect(scope: trio.CancelScope) -> None:
            try:
                while await stream.receive_some(65536):
                    pass  # anything after the request line is ignored
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass
            log.info("control client disconnected; cancelling %s", op)
            scope.cancel()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(watch_disconnect, nursery.cancel_scope)
            try:
                reply = {"ok": True, "result": await handler(args, progress)}
            except TierfsError as exc:
                log.warning("control %s failed: %s", op, exc)
                reply = {"ok": False, "error": one_line(str(exc))}
                if isinstance(exc, FlushFailed):
                    reply.update(reason=exc.reason, failures=exc.failures)
            except Exception as exc:
                log.exception("control %s crashed", op)
                reply = {"ok": False, "error": one_line(f"{type(exc).__name__}: {exc}")}
            nursery.cancel_scope.cancel()
        return reply
