"""A fault-injecting HTTP/1.1 proxy on loopback, in front of an S3 server, for end-to-end tests.

Why a proxy: tierfs must be tested against faults *on the wire*, through its real clients
(boto3 and awscrt), never against a patched client. Sitting between the mount and SeaweedFS
(or moto), the proxy answers errors, delays, closes connections, truncates bodies, loses
responses after the server acted, flips bytes and stalls, each chosen per request by a seeded
probability, optionally limited to some methods, to a path pattern, or to a countdown.

It speaks plain HTTP/1.1 with keep-alive, which is all S3 clients send to a loopback
endpoint. Requests are forwarded byte for byte (SigV4 signs the Host header and the body, so
nothing that is signed is touched); only an ``Expect: 100-continue`` header, which signers
leave unsigned, is answered here and dropped. Responses are read whole (test objects are
small) and sent with a Content-Length.

Use from tests::

    with FaultProxy(seaweed.endpoint_url, [Rule("flip", 0.2, methods={"GET"})], seed=1) as proxy:
        mount = mounter(f"s3://{bucket}", endpoint_url=proxy.endpoint_url)
        ...
        proxy.set_rules([])          # pass-through from now on
        assert proxy.counts["flip"] > 0

or from the command line (prints the port, runs until SIGINT/SIGTERM, prints the counters)::

    python -m tools.faultproxy --upstream http://127.0.0.1:8333 --flip 0.1 --methods GET

It also shapes traffic like a remote region: ``latency`` seconds added to every request and a
``bandwidth`` cap (bytes/s) on the response bodies of all connections together, a token bucket
(:class:`Pacer`). ``body_bytes`` and ``by_method`` count what reached the client, so a benchmark
can tell how much a client took from the origin behind the proxy::

    python -m tools.faultproxy --upstream http://127.0.0.1:8333 --latency 0.03 --bandwidth 100M
"""

from __future__ import annotations

import argparse
import contextlib
import json
import random
import re
import signal
import socket
import socketserver
import sys
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import BinaryIO, Self
from urllib.parse import urlsplit

MODES = ("error", "delay", "close", "truncate", "lose", "flip", "stall")
UPSTREAM_TIMEOUT = 300.0  # a proxy thread never waits longer for the server (a frozen one included)
_BODYLESS_STATUSES = frozenset({204, 304})
# 403 too: a gateway refusing writes (a read-only bucket) for `tierfs doctor --shared-cache` tests.
_ERROR_CODES = {
    403: "AccessDenied", 500: "InternalError", 502: "BadGateway", 503: "SlowDown", 504: "GatewayTimeout",
}
_MAX_LINE = 65536


@dataclass
class Rule:
    """One kind of fault and the requests it may hit.

    A request matches if its method is in ``methods`` (None: any) and ``path`` (a regular
    expression, searched in the request target, query included) matches. Of the matching
    requests the first ``skip`` pass untouched; after that each is hit with ``probability``,
    at most ``count`` times in all (a countdown; None: no limit). Rules are tried in order and
    the first that fires decides the request's fate, so one request gets at most one fault.

    Mode parameters: ``statuses`` (error: the status is chosen among them), ``delay`` (a
    range of seconds, for delay), ``stall_max`` (stall: the request is held until
    :meth:`FaultProxy.release` or this many seconds, then forwarded).
    """

    mode: str
    probability: float = 1.0
    methods: Iterable[str] | None = None
    path: str | None = None
    skip: int = 0
    count: int | None = None
    statuses: tuple[int, ...] = (503, 500)
    delay: tuple[float, float] = (0.3, 1.5)
    stall_max: float = 60.0
    matched: int = field(default=0, init=False)
    fired: int = field(default=0, init=False)
    _pattern: re.Pattern[str] | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"unknown fault mode {self.mode!r}; one of {', '.join(MODES)}")
        if not 0.0 <= self.probability <= 1.0:
            raise ValueError(f"probability {self.probability} is not in [0, 1]")
        self.methods = None if self.methods is None else frozenset(m.upper() for m in self.methods)
        self._pattern = None if self.path is None else re.compile(self.path)

    def matches(self, method: str, target: str) -> bool:
        if self.methods is not None and method not in self.methods:
            return False
        return self._pattern is None or self._pattern.search(target) is not None


class Pacer:
    """A token bucket shared by every connection: ``rate`` bytes/s, with at most ``burst`` seconds of
    credit. ``reserve(n)`` books ``n`` bytes and returns how long the caller must wait before sending
    them; the clock is injectable so the arithmetic is tested without sleeping."""

    def __init__(
        self, rate: float, *, burst: float = 0.05, clock: Callable[[], float] = time.monotonic
    ) -> None:
        if rate <= 0:
            raise ValueError("bandwidth must be positive")
        self.rate = rate
        self._burst = burst
        self._clock = clock
        self._lock = threading.Lock()
        self._free_at = clock() - burst  # when the booked bytes have drained; starts with full credit

    def reserve(self, size: int) -> float:
        with self._lock:
            now = self._clock()
            start = max(self._free_at, now - self._burst)
            self._free_at = start + size / self.rate
            return max(0.0, self._free_at - now)


@dataclass(frozen=True)
class Injection:
    """A record of one fault applied: for test assertions and the command line's summary."""

    mode: str
    method: str
    target: str
    detail: str = ""


# Object GETs/PUTs/HEADs in path style (/bucket/key...), not bucket-level calls such as LIST.
OBJECT_PATH = r"^/[^/?]+/[^?]"


class _Message:
    """One HTTP message as read off a socket: the raw head, parsed fields, and the body."""

    def __init__(self, head: bytes, start: str, headers: list[tuple[str, str]], body: bytes) -> None:
        self.head = head
        self.start = start
        self.headers = headers
        self.body = body

    def header(self, name: str) -> str | None:
        name = name.lower()
        for key, value in self.headers:
            if key.lower() == name:
                return value
        return None


def _read_head(rfile: BinaryIO) -> tuple[bytes, str, list[tuple[str, str]]] | None:
    """The start line and headers, raw and parsed; None on a clean EOF before the first byte."""
    lines: list[bytes] = []
    while True:
        line = rfile.readline(_MAX_LINE)
        if not line:
            if lines:
                raise ConnectionError("connection closed inside a message head")
            return None
        if not lines and line in (b"\r\n", b"\n"):
            continue  # tolerated between messages
        lines.append(line)
        if line in (b"\r\n", b"\n"):
            break
    text = [raw.decode("latin-1").rstrip("\r\n") for raw in lines[:-1]]
    headers = [(k.strip(), v.strip()) for k, _, v in (h.partition(":") for h in text[1:])]
    return b"".join(lines), text[0], headers


def _read_exact(rfile: BinaryIO, size: int) -> bytes:
    data = rfile.read(size)
    if len(data) != size:
        raise ConnectionError(f"connection closed after {len(data)} of {size} body bytes")
    return data


def _read_chunked(rfile: BinaryIO, raw: bytearray | None) -> bytes:
    """Decode a chunked body; with ``raw``, also keep its exact bytes (to forward them unchanged)."""
    body = bytearray()
    while True:
        line = rfile.readline(_MAX_LINE)
        if raw is not None:
            raw += line
        size = int(line.split(b";", 1)[0].strip() or b"0", 16)
        if size == 0:
            while True:  # trailers, up to the blank line
                trailer = rfile.readline(_MAX_LINE)
                if raw is not None:
                    raw += trailer
                if trailer in (b"\r\n", b"\n", b""):
                    return bytes(body)
        chunk = _read_exact(rfile, size + 2)
        if raw is not None:
            raw += chunk
        body += chunk[:-2]


def _read_request(rfile: BinaryIO) -> tuple[_Message, bytes] | None:
    """A request and its body exactly as sent (chunked framing included)."""
    head = _read_head(rfile)
    if head is None:
        return None
    raw_head, start, headers = head
    message = _Message(raw_head, start, headers, b"")
    if (message.header("transfer-encoding") or "").lower().endswith("chunked"):
        raw = bytearray()
        message.body = _read_chunked(rfile, raw)
        return message, bytes(raw)
    length = int(message.header("content-length") or 0)
    message.body = _read_exact(rfile, length)
    return message, message.body


def _read_response(rfile: BinaryIO, method: str) -> _Message:
    head = _read_head(rfile)
    if head is None:
        raise ConnectionError("the server closed the connection without answering")
    raw_head, start, headers = head
    message = _Message(raw_head, start, headers, b"")
    status = _status_of(message)
    if method == "HEAD" or status in _BODYLESS_STATUSES or 100 <= status < 200:
        return message
    if (message.header("transfer-encoding") or "").lower().endswith("chunked"):
        message.body = _read_chunked(rfile, None)
    elif message.header("content-length") is not None:
        message.body = _read_exact(rfile, int(message.header("content-length") or 0))
    else:
        message.body = rfile.read()  # delimited by the end of the connection
    return message


def _status_of(message: _Message) -> int:
    parts = message.start.split(" ", 2)
    return int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else 0


_HOP_BY_HOP = frozenset({"connection", "keep-alive", "proxy-connection"})


def _response_head(message: _Message, *, content_length: int | None, close: bool) -> bytes:
    """The response head for the client: HTTP/1.1, any chunked framing replaced by a Content-Length,
    and the server's hop-by-hop headers replaced by the client side's own (a server that closes
    after each response, as moto does, must not cost the client its kept-alive connection)."""
    version, _, rest = message.start.partition(" ")
    lines = [f"HTTP/1.1 {rest}" if version.startswith("HTTP/") else message.start]
    for key, value in message.headers:
        lowered = key.lower()
        if lowered in _HOP_BY_HOP:
            continue
        if lowered in ("transfer-encoding", "content-length") and content_length is not None:
            continue
        lines.append(f"{key}: {value}")
    if content_length is not None:
        lines.append(f"Content-Length: {content_length}")
    if close:
        lines.append("Connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def _wants_close(message: _Message) -> bool:
    return (message.header("connection") or "").lower() == "close" or message.start.endswith("HTTP/1.0")


class _Upstream:
    """One keep-alive connection to the server, opened on first use and after the server closed it."""

    def __init__(self, host: str, port: int, track: set[socket.socket], lock: threading.Lock) -> None:
        self._address = (host, port)
        self._sock: socket.socket | None = None
        self._rfile: BinaryIO | None = None
        self._track = track
        self._lock = lock

    def exchange(self, request: bytes, method: str) -> _Message:
        """Send one request and read its response; a stale keep-alive connection is reopened once
        (only when nothing at all came back, so the server cannot have answered it)."""
        for attempt in (1, 2):
            fresh = self._sock is None
            if self._sock is None:
                self._connect()
            assert self._sock is not None and self._rfile is not None
            try:
                self._sock.sendall(request)
                response = _read_response(self._rfile, method)
            except (ConnectionError, OSError):
                self.close()
                if fresh or attempt == 2:
                    raise
                continue
            if _wants_close(response):
                self.close()
            return response
        raise AssertionError("unreachable")

    def _connect(self) -> None:
        sock = socket.create_connection(self._address, timeout=UPSTREAM_TIMEOUT)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with self._lock:
            self._track.add(sock)
        self._sock, self._rfile = sock, sock.makefile("rb")

    def close(self) -> None:
        sock, rfile, self._sock, self._rfile = self._sock, self._rfile, None, None
        if rfile is not None:
            rfile.close()
        if sock is not None:
            with self._lock:
                self._track.discard(sock)
            sock.close()


class _Server(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True
    block_on_close = False

    def __init__(self, address: tuple[str, int], proxy: FaultProxy) -> None:
        self.proxy = proxy
        super().__init__(address, _Handler)


class _Handler(socketserver.BaseRequestHandler):
    server: _Server

    def handle(self) -> None:
        self.server.proxy._serve_connection(self.request)


class FaultProxy:
    """The proxy: start it (or use it as a context manager), point a client at :attr:`endpoint_url`.

    Thread-safe: rules can be changed, stalls released and counters read while requests flow.
    ``counts`` holds how often each mode was applied, ``requests`` how many requests arrived and
    ``forwarded`` how many reached the server, ``connections`` how many client connections were
    accepted; ``injections`` holds the last 10,000 faults applied.
    """

    def __init__(
        self,
        upstream: str,
        rules: Sequence[Rule] = (),
        *,
        seed: int = 0,
        host: str = "127.0.0.1",
        port: int = 0,
        latency: float = 0.0,
        bandwidth: float | None = None,
    ) -> None:
        """``latency``: seconds added to every request; ``bandwidth``: bytes/s of response bodies, over
        all connections together (None: no cap)."""
        url = urlsplit(upstream)
        if url.scheme != "http" or url.hostname is None:
            raise ValueError(f"upstream must be http://HOST:PORT, not {upstream!r}")
        self.upstream = (url.hostname, url.port or 80)
        self._address = (host, port)
        self._lock = threading.Lock()
        self._rules = list(rules)
        self._rng = random.Random(seed)
        self._stall_release = threading.Condition(self._lock)
        self._release_generation = 0
        self._stopping = threading.Event()
        self._sockets: set[socket.socket] = set()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self.counts: Counter[str] = Counter()
        self.requests = 0
        self.forwarded = 0
        self.connections = 0  # client connections accepted (fewer than requests: keep-alive works)
        self.stalled = 0  # requests held by a stall right now
        self.injections: deque[Injection] = deque(maxlen=10_000)
        self.latency = latency
        self._pacer = Pacer(bandwidth) if bandwidth else None
        self.body_bytes = 0  # response body bytes sent to clients
        self.by_method: Counter[str] = Counter()  # requests forwarded, by method

    # -- life cycle ------------------------------------------------------------------------------------

    def start(self) -> None:
        if self._server is not None:
            raise RuntimeError("the proxy is already running")
        self._stopping.clear()
        self._server = _Server(self._address, self)
        self._thread = threading.Thread(target=self._server.serve_forever, name="faultproxy", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop accepting, release every stall and close every connection; safe to call twice."""
        server, self._server = self._server, None
        if server is None:
            return
        self._stopping.set()
        self.release()
        server.shutdown()
        server.server_close()
        with self._lock:
            sockets = list(self._sockets)
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            with contextlib.suppress(OSError):
                sock.close()
        if self._thread is not None:
            self._thread.join(10.0)

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("the proxy is not running")
        port: int = self._server.server_address[1]
        return port

    @property
    def endpoint_url(self) -> str:
        return f"http://{self._address[0]}:{self.port}"

    # -- control ---------------------------------------------------------------------------------------

    def set_rules(self, rules: Sequence[Rule]) -> None:
        """Replace the rules (an empty list makes the proxy a plain pass-through)."""
        with self._lock:
            self._rules = list(rules)

    def release(self) -> None:
        """Let every request held by a stall go on to the server."""
        with self._stall_release:
            self._release_generation += 1
            self._stall_release.notify_all()

    def summary(self) -> dict[str, object]:
        with self._lock:
            return {
                "requests": self.requests,
                "forwarded": self.forwarded,
                "connections": self.connections,
                "faults": dict(self.counts),
                "body_bytes": self.body_bytes,
                "by_method": dict(self.by_method),
            }

    # -- per request -----------------------------------------------------------------------------------

    def _choose(self, method: str, target: str) -> Rule | None:
        with self._lock:
            self.requests += 1
            for rule in self._rules:
                if not rule.matches(method, target):
                    continue
                rule.matched += 1
                if rule.matched <= rule.skip or (rule.count is not None and rule.fired >= rule.count):
                    continue
                if rule.probability >= 1.0 or self._rng.random() < rule.probability:
                    rule.fired += 1
                    return rule
            return None

    def _note(self, mode: str, method: str, target: str, detail: str = "") -> None:
        with self._lock:
            self.counts[mode] += 1
            self.injections.append(Injection(mode, method, target, detail))

    def _random(self) -> float:
        with self._lock:
            return self._rng.random()

    def _serve_connection(self, client: socket.socket) -> None:
        with self._lock:
            self._sockets.add(client)
            self.connections += 1
        client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        rfile = client.makefile("rb")
        upstream = _Upstream(*self.upstream, self._sockets, self._lock)
        try:
            while not self._stopping.is_set():
                if not self._serve_one(client, rfile, upstream):
                    break
        except (ConnectionError, OSError, ValueError):
            pass  # the client or the server went away; nothing to answer
        finally:
            upstream.close()
            rfile.close()
            with self._lock:
                self._sockets.discard(client)
            with contextlib.suppress(OSError):
                client.close()

    def _serve_one(self, client: socket.socket, rfile: BinaryIO, upstream: _Upstream) -> bool:
        """Handle one request; False when the client connection is to be closed."""
        head = _read_head(rfile)
        if head is None:
            return False
        raw_head, start, headers = head
        request = _Message(raw_head, start, headers, b"")
        method, target = [*start.split(" "), "", ""][:2]
        expect = (request.header("expect") or "").lower() == "100-continue"
        if expect:
            client.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
            raw_head = (
                b"".join(
                    line + b"\r\n"
                    for line in raw_head.split(b"\r\n")[:-2]
                    if not line.lower().startswith(b"expect:")
                )
                + b"\r\n"
            )
        if (request.header("transfer-encoding") or "").lower().endswith("chunked"):
            raw_body = bytearray()
            _read_chunked(rfile, raw_body)
            body = bytes(raw_body)
        else:
            body = _read_exact(rfile, int(request.header("content-length") or 0))
        rule = self._choose(method, target)
        mode = rule.mode if rule is not None else None
        if self.latency > 0:
            self._stopping.wait(self.latency)

        if rule is not None and mode == "error":
            status = rule.statuses[int(self._random() * len(rule.statuses)) % len(rule.statuses)]
            self._note("error", method, target, str(status))
            client.sendall(_error_response(status, method))
            return not _wants_close(request)
        if mode == "close":
            self._note("close", method, target)
            return False
        if rule is not None and mode == "delay":
            low, high = rule.delay
            pause = low + (high - low) * self._random()
            self._note("delay", method, target, f"{pause:.3f}")
            self._stopping.wait(pause)
        if rule is not None and mode == "stall":
            self._note("stall", method, target)
            self._stall(rule.stall_max)

        response = upstream.exchange(raw_head + body, method)
        with self._lock:
            self.forwarded += 1
            self.by_method[method] += 1
        payload = response.body
        if mode == "lose":
            self._note("lose", method, target, response.start)
            return False
        if mode == "flip" and payload:
            at = int(self._random() * len(payload)) % len(payload)
            bit = 1 << (int(self._random() * 8) % 8)
            flipped = bytearray(payload)
            flipped[at] ^= bit
            payload = bytes(flipped)
            self._note("flip", method, target, f"byte {at} ^ {bit:#04x}")
        bodyless = method == "HEAD" or _status_of(response) in _BODYLESS_STATUSES
        close = _wants_close(request)
        head_out = _response_head(response, content_length=None if bodyless else len(payload), close=close)
        if mode == "truncate":
            if payload:
                cut = len(payload) // 2
                client.sendall(head_out + payload[:cut])
                self._note("truncate", method, target, f"{cut} of {len(payload)} body bytes")
            else:
                client.sendall(head_out[: len(head_out) // 2])
                self._note("truncate", method, target, "inside the head")
            return False
        if bodyless:
            client.sendall(head_out)
        else:
            self._send_paced(client, head_out, payload)
        return not close

    def _send_paced(self, client: socket.socket, head: bytes, payload: bytes) -> None:
        """Send a response, its body within the bandwidth cap (in 64 KiB slices) if there is one."""
        with self._lock:
            self.body_bytes += len(payload)
        if self._pacer is None:
            client.sendall(head + payload)
            return
        client.sendall(head)
        view = memoryview(payload)
        for at in range(0, len(view), 64 * 1024):
            piece = view[at : at + 64 * 1024]
            self._stopping.wait(self._pacer.reserve(len(piece)))
            client.sendall(piece)

    def _stall(self, bound: float) -> None:
        """Hold the calling request until :meth:`release`, the proxy stops, or ``bound`` seconds."""
        deadline = time.monotonic() + bound
        with self._stall_release:
            generation = self._release_generation
            self.stalled += 1
            try:
                while generation == self._release_generation and not self._stopping.is_set():
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    self._stall_release.wait(left)
            finally:
                self.stalled -= 1


def _error_response(status: int, method: str) -> bytes:
    """An S3-style XML error, as a throttled or failing gateway sends it."""
    code = _ERROR_CODES.get(status, "InternalError")
    body = (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        f"<Error><Code>{code}</Code><Message>injected by faultproxy</Message></Error>"
    ).encode()
    reason = {403: "Forbidden", 500: "Internal Server Error", 503: "Service Unavailable"}.get(status, "Error")
    head = (
        f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/xml\r\n"
        f"Content-Length: {0 if method == 'HEAD' else len(body)}\r\n\r\n"
    ).encode()
    return head if method == "HEAD" else head + body


# --------------------------------------------------------------------------- command line


def _range(text: str) -> tuple[float, float]:
    low, _, high = text.partition(":")
    return float(low), float(high or low)


def rules_from_args(ns: argparse.Namespace) -> list[Rule]:
    """One rule per mode given a probability on the command line, sharing the filters."""
    methods = [m for m in ns.methods.split(",") if m] if ns.methods else None
    statuses = tuple(int(s) for s in ns.status.split(","))
    return [
        Rule(
            mode,
            getattr(ns, mode),
            methods=methods,
            path=ns.path,
            skip=ns.skip,
            count=ns.count,
            statuses=statuses,
            delay=ns.delay_range,
            stall_max=ns.stall_max,
        )
        for mode in MODES
        if getattr(ns, mode) is not None
    ]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m tools.faultproxy", description="Fault-injecting HTTP proxy for S3 on loopback."
    )
    parser.add_argument("--upstream", required=True, help="the server, http://HOST:PORT")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default loopback)")
    parser.add_argument("--port", type=int, default=0, help="port to listen on (default: any free port)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the fault draws")
    for mode, text in (
        ("error", "answer 5xx without forwarding"),
        ("delay", "delay the request by --delay-range seconds"),
        ("close", "close the connection without forwarding"),
        ("truncate", "cut the response body in half and close"),
        ("lose", "forward, then close without sending the response"),
        ("flip", "flip one bit of one byte of the response body"),
        ("stall", "hold the request for --stall-max seconds, then forward"),
    ):
        parser.add_argument(f"--{mode}", type=float, metavar="P", help=f"probability to {text}")
    parser.add_argument("--status", default="503,500", help="statuses for --error (default 503,500)")
    parser.add_argument("--delay-range", type=_range, default=(0.3, 1.5), metavar="LOW:HIGH")
    parser.add_argument("--stall-max", type=float, default=60.0, metavar="SECONDS")
    parser.add_argument("--methods", help="only requests of these methods, e.g. GET,PUT")
    parser.add_argument("--path", help="only requests whose target matches this regular expression")
    parser.add_argument("--skip", type=int, default=0, help="let the first N matching requests through")
    parser.add_argument("--count", type=int, help="inject each fault at most N times")
    parser.add_argument("--latency", type=float, default=0.0, metavar="S", help="added to every request")
    parser.add_argument("--bandwidth", type=_rate, metavar="RATE", help="cap on response bytes/s, e.g. 100M")
    return parser


def _rate(text: str) -> float:
    """Bytes per second: a number with an optional K/M/G suffix (powers of 1000, as network rates)."""
    units = {"K": 1e3, "M": 1e6, "G": 1e9}
    scale = units.get(text[-1:].upper(), 1.0)
    return float(text[:-1] if scale != 1.0 else text) * scale


def main(argv: Sequence[str] | None = None) -> int:
    ns = build_parser().parse_args(argv)
    try:
        rules = rules_from_args(ns)
        proxy = FaultProxy(
            ns.upstream, rules, seed=ns.seed, host=ns.host, port=ns.port, latency=ns.latency,
            bandwidth=ns.bandwidth,
        )  # fmt: skip
    except ValueError as exc:
        print(f"faultproxy: error: {exc}", file=sys.stderr)
        return 2
    done = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: done.set())
    with proxy:
        print(f"faultproxy: listening on {proxy.endpoint_url}, forwarding to {ns.upstream}")
        print(f"port {proxy.port}", flush=True)
        done.wait()
    print(json.dumps(proxy.summary()), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
