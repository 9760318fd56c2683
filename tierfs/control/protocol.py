"""The control channel between ``tierfs`` CLI commands and a running mount daemon.

Why a socket and not ioctls/xattrs on the mount: a mount that is hung (S3 down, a
stuck request) must still answer ``status`` and ``umount``, and a CLI that touched a
path inside it would hang with it. So the CLI never stats inside a mount: it finds the
daemon through a registry of small JSON files keyed by the mountpoint's path, and
talks JSON lines over an AF_UNIX socket next to it.

Registry: ``<dir>/<sha256(mountpoint)[:24]>.json`` holding ``pid``, ``mountpoint``,
``socket``, ``source``, ``cache_dir`` and ``uid``; the socket is ``<dir>/<hash>.sock``.
``<dir>`` is ``/run/tierfs/mounts`` for root, else ``$XDG_RUNTIME_DIR/tierfs`` or
``/tmp/tierfs-<uid>``; ``$TIERFS_RUNTIME_DIR`` overrides all of them (tests, containers).
The directory is 0700 and owned by its user; the socket is 0600 and owned by the
mount's owner, and the server also checks SO_PEERCRED (uid 0 or the owner only).

Mountpoint naming: the key is ``abspath`` of the mountpoint with symlinks resolved in
its *parent* only, because resolving the last component would stat the mount root.
The mount and the CLI therefore agree as long as they name the same path once the
parent is resolved; :func:`find_mount` additionally follows symlinks component by
component from ``/`` and stops at the first registered mountpoint, so paths given
through a symlinked directory still find their mount.

Protocol, one request per connection: the client sends ``{"op": ..., "args": {...}}``
and a newline; the server answers any number of ``{"progress": {...}}`` lines, then
exactly one ``{"ok": true, "result": ...}`` or ``{"ok": false, "error": "one line"}``.
A client that disconnects cancels its operation.

Bounded waits: a progress update may carry ``"deadline": SECONDS``, the server's promise
that the final reply comes within that many seconds from now (a flush states its
``--flush-timeout`` plus slack). The client strips it from what it shows and gives up
:data:`DEADLINE_GRACE` seconds after it, so even a daemon whose operation is stuck while
its loop still sends progress cannot keep a CLI command waiting for ever. A failed flush
answers ``{"ok": false, "error": ..., "reason": ..., "failures": {path: last error}}``,
which the client raises as :class:`tierfs.errors.FlushFailed`, so the CLI can name each
file that was not uploaded.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import stat
import struct
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import trio

from ..errors import FlushFailed, TierfsError

# The registry was split out (trio-free, for light clients); re-exported so callers are unchanged.
from .registry import DENIED_MESSAGE as DENIED_MESSAGE
from .registry import RUNTIME_DIR_ENV as RUNTIME_DIR_ENV
from .registry import SYSTEM_REGISTRY as SYSTEM_REGISTRY
from .registry import ControlError as ControlError
from .registry import ControlTimeout as ControlTimeout
from .registry import ControlUnavailable as ControlUnavailable
from .registry import find_mount as find_mount
from .registry import lookup as lookup
from .registry import normalize_mountpoint as normalize_mountpoint
from .registry import pid_alive as pid_alive
from .registry import register as register
from .registry import registry_paths as registry_paths
from .registry import unregister as unregister

log = logging.getLogger(__name__)

ProgressCallback = Callable[[dict[str, Any]], Awaitable[None]]
Handler = Callable[[dict[str, Any], ProgressCallback], Awaitable[Any]]

MAX_REQUEST_BYTES = 1 << 20
REQUEST_TIMEOUT = 30.0  # a connected client that never sends a request is dropped after this
DEADLINE_GRACE = 5.0  # the client waits this long past a deadline the server promised
_PEERCRED = struct.Struct("iII")  # struct ucred: pid_t pid; uid_t uid; gid_t gid


# --------------------------------------------------------------------------- server


def peer_uid(sock: socket.socket | trio.socket.SocketType) -> int:
    """The uid of the process at the other end of a connected AF_UNIX socket (SO_PEERCRED)."""
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size)
    _pid, uid, _gid = _PEERCRED.unpack(raw)
    return int(uid)


def peer_allowed(uid: int, owner_uid: int) -> bool:
    """Only root and the mount's owner may steer it: flush/evict/prefetch cost money and I/O."""
    return uid in (0, owner_uid)


def _one_line(text: str) -> str:
    return " ".join(text.split()) or "unknown error"


def _encode(message: Mapping[str, Any]) -> bytes:
    return json.dumps(message, default=str, separators=(",", ":")).encode() + b"\n"


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
            await stream.send_all(_encode({"ok": False, "error": "permission denied"}))
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
            await stream.send_all(_encode({"ok": False, "error": message}))
            return
        handler = self.handlers.get(op)
        if handler is None:
            await stream.send_all(_encode({"ok": False, "error": f"unknown operation {op!r}"}))
            return
        reply = await self._run(op, handler, args, reader)
        if reply is not None:
            await stream.send_all(_encode(reply))

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
                    await stream.send_all(_encode({"progress": update}))

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
                reply = {"ok": False, "error": _one_line(str(exc))}
                if isinstance(exc, FlushFailed):
                    reply.update(reason=exc.reason, failures=exc.failures)
            except Exception as exc:
                log.exception("control %s crashed", op)
                reply = {"ok": False, "error": _one_line(f"{type(exc).__name__}: {exc}")}
            nursery.cancel_scope.cancel()
        return reply


# --------------------------------------------------------------------------- client


class ControlClient:
    """Blocking client for CLI commands (plain sockets: the CLI has no event loop)."""

    def __init__(self, sock_path: str | os.PathLike[str], *, mountpoint: str | None = None) -> None:
        self.sock_path = os.fspath(sock_path)
        self.where = mountpoint or self.sock_path

    @classmethod
    def for_mountpoint(cls, mountpoint: str | os.PathLike[str]) -> ControlClient:
        record = lookup(mountpoint)
        if record is None:
            raise ControlUnavailable(f"no tierfs mount at {os.fspath(mountpoint)}")
        return cls(str(record["socket"]), mountpoint=str(record["mountpoint"]))

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
                sock.sendall(_encode({"op": op, "args": dict(args or {})}))
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
            named = {str(path): _one_line(str(error)) for path, error in failures.items()}
            return FlushFailed(named, _one_line(str(message.get("reason") or "flush failed")))
        return ControlError(_one_line(str(message.get("error") or "unknown error")))
