"""The object store's error map, its time rule and its integrity checks, against real servers.

- Errors are classified by status and S3 code (:func:`tierfs.store.s3errors.classify`), the
  same for the boto3 and the awscrt path.
- ``timeout`` bounds a caller's wait for one request in total, retries and body included:
  a frozen SeaweedFS (SIGSTOP) and a server that stalls or trickles a body both give
  Unavailable within 1.5 x timeout (a generous upper bound; the issue asks for 2 x).
- Bytes that change in transit are caught (ETag MD5 or the stored CRC32C), retried, and
  never returned; a PUT whose bytes change in transit is refused by the server (CRC32C).

The transit faults come from :class:`_Proxy`, a small HTTP proxy on loopback in front of
the real server, which can flip a byte of a response or request body or stall a body.
"""

from __future__ import annotations

import base64
import errno
import hashlib
import http.client
import os
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from mounting import Mounter

from tierfs.errors import (
    AccessDenied,
    IntegrityError,
    NotFound,
    Permanent,
    PreconditionFailed,
    RangeNotSatisfiable,
    StoreError,
    Unavailable,
)
from tierfs.store.objectstore import CRT_MAX_GET, S3ObjectStore, crc32c_b64, verify_whole_object
from tierfs.store.s3errors import classify
from tools.servers import MotoS3, S3Server, SeaweedFS, s3_client

TIMEOUT = 2.0
SMALL = bytes(range(256)) * 400  # 102,400 bytes: the CRT path
LARGE = bytes(range(251)) * ((CRT_MAX_GET + 65536) // 251)  # just above CRT_MAX_GET: the boto3 path


def store_for(
    endpoint: str, bucket: str, *, fast: bool, timeout: float = TIMEOUT, retries: int = 3
) -> S3ObjectStore:
    store = S3ObjectStore(bucket, endpoint_url=endpoint, timeout=timeout, retries=retries, fast_gets=fast)
    assert store.fast_gets is fast
    return store


# --------------------------------------------------------------------------- classification


@pytest.mark.parametrize(
    ("status", "code", "expected"),
    [
        (404, "NoSuchKey", NotFound),
        (404, "NoSuchBucket", NotFound),
        (404, "NoSuchUpload", NotFound),
        (404, "", NotFound),  # HEAD: no body, no code
        (412, "PreconditionFailed", PreconditionFailed),
        (409, "ConditionalRequestConflict", PreconditionFailed),
        (416, "InvalidRange", RangeNotSatisfiable),
        (403, "AccessDenied", AccessDenied),
        (403, "SignatureDoesNotMatch", AccessDenied),
        (403, "", AccessDenied),
        (400, "InvalidArgument", Permanent),
        (400, "KeyTooLongError", Permanent),
        (405, "MethodNotAllowed", Permanent),
        (409, "BucketAlreadyExists", Permanent),
        (400, "RequestTimeout", Unavailable),  # a 400 that heals
        (400, "ExpiredToken", Unavailable),  # cured by a credential refresh
        (400, "BadDigest", IntegrityError),  # our bytes changed on the way
        (408, "", Unavailable),
        (429, "", Unavailable),
        (503, "SlowDown", Unavailable),
        (500, "InternalError", Unavailable),
        (501, "NotImplemented", Unavailable),
        (None, "", Unavailable),  # no answer at all
    ],
)
def test_classification_by_status_and_code(status: int | None, code: str, expected: type[StoreError]) -> None:
    error = classify(status, code, "message text is never read")
    assert type(error) is expected
    assert isinstance(error, Permanent) == (expected in (Permanent, AccessDenied))


def test_access_denied_is_permanent_and_integrity_is_transient() -> None:
    """Write-back gives up at once on Permanent and retries Unavailable: the hierarchy decides."""
    assert issubclass(AccessDenied, Permanent)
    assert issubclass(IntegrityError, Unavailable)


@pytest.fixture
def seaweed_bucket(seaweed: SeaweedFS, bucket: Callable[..., str], s3_env: None) -> str:
    name: str = bucket()
    client = s3_client(seaweed.endpoint_url)
    client.put_object(Bucket=name, Key="small", Body=SMALL)
    client.put_object(Bucket=name, Key="large", Body=LARGE)
    client.put_object(Bucket=name, Key="empty", Body=b"")
    return name


@pytest.mark.parametrize("fast", [True, False], ids=["crt", "boto3"])
def test_real_answers_map_alike_on_both_paths(seaweed: SeaweedFS, seaweed_bucket: str, fast: bool) -> None:
    store = store_for(seaweed.endpoint_url, seaweed_bucket, fast=fast)
    with pytest.raises(NotFound):
        store.get_range("missing", 0, 100)
    with pytest.raises(NotFound):
        store.head("missing")
    with pytest.raises(PreconditionFailed):
        store.get_range("small", 0, 100, if_match="0" * 32)
    with pytest.raises(RangeNotSatisfiable):  # 416 by code, not by message text
        store.get_range("small", len(SMALL) + 10, 100)
    assert store.get_range("empty", 0, 100).data == b""  # the 416 of byte 0 of an empty object
    with pytest.raises(Permanent) as refused:  # SeaweedFS: KeyTooLongError, 400
        store.put_bytes("k" * 1100, b"x", {})
    assert not isinstance(refused.value, AccessDenied)
    assert store.requests["put_object"] == 1, "a Permanent refusal is not retried"


def test_missing_bucket_is_not_found(moto: MotoS3, s3_env: None) -> None:
    store = store_for(moto.endpoint_url, "t-no-such-bucket-here", fast=False)
    with pytest.raises(NotFound):
        store.check_bucket()
    with pytest.raises(NotFound):  # NoSuchBucket on a write (moto; SeaweedFS creates the bucket)
        store.put_bytes("k", b"x", {})


# --------------------------------------------------------------------------- a loopback proxy


class _Proxy(ThreadingHTTPServer):
    """A forwarding HTTP proxy on loopback that can damage or stall chosen answers.

    ``mode`` applies to requests whose path ends in ``/<target>``: ``flip`` flips one byte
    of a GET response body, ``flip-request`` one byte of a PUT body, ``stall`` sends the
    headers and 1 KiB of a GET body and then nothing, ``trickle`` one byte every 0.3 s.
    ``times`` limits how many answers are damaged (None: all).
    """

    daemon_threads = True

    def __init__(self, upstream: str) -> None:
        super().__init__(("127.0.0.1", 0), _ProxyHandler)
        host, port = upstream.removeprefix("http://").split(":")
        self.upstream = (host, int(port))
        self.mode = "pass"
        self.target = ""
        self.times: int | None = None
        self.damaged = 0
        self.stop = threading.Event()
        self._lock = threading.Lock()

    @property
    def endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def arm(self, mode: str, target: str, times: int | None = None) -> None:
        self.mode, self.target, self.times, self.damaged = mode, target, times, 0

    def take(self, method: str, path: str) -> str:
        """The fault for this request ('pass' when none), counting it."""
        wanted = {"flip": "GET", "stall": "GET", "trickle": "GET", "flip-request": "PUT"}.get(self.mode)
        if method != wanted or not path.split("?")[0].endswith("/" + self.target):
            return "pass"
        with self._lock:
            if self.times is not None and self.damaged >= self.times:
                return "pass"
            self.damaged += 1
        return self.mode


class _ProxyHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Proxy

    def log_message(self, format: str, *args: object) -> None:  # quiet
        pass

    def _forward(self) -> None:
        fault = self.server.take(self.command, self.path)
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        if fault == "flip-request" and body:
            body = _flip(body)
        upstream = http.client.HTTPConnection(*self.server.upstream, timeout=30)
        try:
            upstream.request(self.command, self.path, body=body or None, headers=dict(self.headers.items()))
            response = upstream.getresponse()
            data = response.read()
        finally:
            upstream.close()
        if fault == "flip" and data:
            data = _flip(data)
        self.send_response(response.status)
        for name, value in response.getheaders():
            if name.lower() not in ("content-length", "transfer-encoding", "connection"):
                self.send_header(name, value)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command == "HEAD":
            return
        if fault == "stall":
            self.wfile.write(data[:1024])
            self.wfile.flush()
            self.server.stop.wait(60)
            self.close_connection = True
            return
        if fault == "trickle":
            for i in range(len(data)):
                if self.server.stop.wait(0.3):
                    break
                self.wfile.write(data[i : i + 1])
                self.wfile.flush()
            self.close_connection = True
            return
        self.wfile.write(data)

    do_GET = do_HEAD = do_PUT = do_POST = do_DELETE = _forward


def _flip(data: bytes) -> bytes:
    middle = len(data) // 2
    return data[:middle] + bytes([data[middle] ^ 0x01]) + data[middle + 1 :]


@pytest.fixture
def proxy_to() -> Iterator[Callable[[S3Server], _Proxy]]:
    """Factory: a proxy in front of a server; all are shut down (and their stalls ended) afterwards."""
    made: list[_Proxy] = []

    def make(server: S3Server) -> _Proxy:
        proxy = _Proxy(server.endpoint_url)
        threading.Thread(target=proxy.serve_forever, daemon=True).start()
        made.append(proxy)
        return proxy

    yield make
    for proxy in made:
        proxy.stop.set()
        proxy.shutdown()
        proxy.server_close()


# --------------------------------------------------------------------------- bounded time


@pytest.mark.parametrize("fast", [True, False], ids=["crt", "boto3"])
@pytest.mark.parametrize("mode", ["stall", "trickle"])
def test_a_stalled_or_trickling_body_is_bounded(
    seaweed: SeaweedFS, seaweed_bucket: str, proxy_to: Callable[[S3Server], _Proxy], fast: bool, mode: str
) -> None:
    """Socket timeouts bound each recv, not a body: a trickle never trips them, the deadline does."""
    proxy = proxy_to(seaweed)
    key, body = ("small", SMALL) if fast else ("large", LARGE)
    proxy.arm(mode, key)
    store = store_for(proxy.endpoint_url, seaweed_bucket, fast=fast)
    started = time.monotonic()
    with pytest.raises(Unavailable):
        store.get_range(key, 0, len(body))
    assert time.monotonic() - started < 1.5 * TIMEOUT
    proxy.arm("pass", key)
    assert store.get_range(key, 0, len(body)).data == body


@pytest.fixture(scope="module")
def freezable(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedFS]:
    """A SeaweedFS of this module's own, so that freezing it cannot stall other tests' server."""
    with SeaweedFS(tmp_path_factory.mktemp("freezable")) as server:
        yield server


def test_a_frozen_server_gives_unavailable_within_the_timeout(freezable: SeaweedFS, s3_env: None) -> None:
    """The issue measured 18-36 s for --timeout 3; each call here must end within 1.5 x timeout
    although it may retry three times."""
    name = "t-frozen"
    freezable.create_bucket(name)
    client = s3_client(freezable.endpoint_url)
    client.put_object(Bucket=name, Key="small", Body=SMALL)
    client.put_object(Bucket=name, Key="large", Body=LARGE)
    fast = store_for(freezable.endpoint_url, name, fast=True)
    plain = store_for(freezable.endpoint_url, name, fast=False)
    assert fast.get_range("small", 0, 10).data == SMALL[:10]  # connections are pooled and warm
    calls: list[tuple[str, Callable[[], object]]] = [
        ("head", lambda: plain.head("small")),
        ("get_range crt", lambda: fast.get_range("small", 0, len(SMALL))),
        ("get_range boto3", lambda: plain.get_range("large", 0, len(LARGE))),
        ("put_bytes", lambda: plain.put_bytes("new", b"x" * 1000, {})),
        ("list_dir", lambda: next(iter(plain.list_dir("")))),
    ]
    with freezable.frozen():
        for what, call in calls:
            started = time.monotonic()
            with pytest.raises(Unavailable):
                call()
            elapsed = time.monotonic() - started
            assert elapsed < 1.5 * TIMEOUT, f"{what} took {elapsed:.1f} s with timeout {TIMEOUT} s"
    assert plain.head("small").size == len(SMALL)  # thawed: the same store works again
    assert fast.get_range("small", 0, len(SMALL)).data == SMALL


def _timed(call: Callable[[], object]) -> tuple[float, BaseException | None]:
    """Run ``call`` in a thread (a FUSE call on a hung mount must not hang the test); (seconds, error)."""
    outcome: list[BaseException | None] = []
    started = time.monotonic()

    def run() -> None:
        try:
            call()
            outcome.append(None)
        except BaseException as exc:
            outcome.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(30.0)
    assert outcome, "the call was still blocked after 30 s"
    return time.monotonic() - started, outcome[0]


@pytest.mark.fuse
def test_through_a_mount_a_frozen_server_gives_eio_within_twice_the_timeout(
    freezable: SeaweedFS, s3_env: None, mounter: Mounter
) -> None:
    """The issue's row: with ``--timeout 3`` a cold read took 18-36 s to fail. A cold read must
    fail with EIO within 2 x ``--timeout`` although the store may retry three times."""
    name = "t-frozen-mount"
    freezable.create_bucket(name)
    client = s3_client(freezable.endpoint_url)
    for key in ("d/small", "d/large"):
        client.put_object(Bucket=name, Key=key, Body=LARGE if key == "d/large" else SMALL)
    mount = mounter(
        f"s3://{name}", "--timeout", str(TIMEOUT), "-o", "retries=3", endpoint_url=freezable.endpoint_url
    )
    assert sorted(os.listdir(mount.path / "d")) == ["large", "small"]  # listed while the server answers
    calls: list[tuple[str, Callable[[], object]]] = [
        ("cold read of a small file", lambda: (mount.path / "d" / "small").read_bytes()),
        ("cold read of a large file", lambda: (mount.path / "d" / "large").read_bytes()),
    ]
    with freezable.frozen():
        for what, call in calls:
            elapsed, error = _timed(call)
            assert isinstance(error, OSError) and error.errno == errno.EIO, f"{what}: {error!r}"
            assert elapsed < 2 * TIMEOUT + 1.0, f"{what}: EIO after {elapsed:.1f} s with --timeout {TIMEOUT}"
    assert (mount.path / "d" / "small").read_bytes() == SMALL


# --------------------------------------------------------------------------- integrity


@pytest.mark.parametrize("fast", [True, False], ids=["crt", "boto3"])
def test_a_byte_flipped_in_transit_is_caught_and_retried(
    moto: MotoS3, bucket: Callable[..., str], s3_env: None, proxy_to: Callable[[S3Server], _Proxy], fast: bool
) -> None:
    """moto gives a plain-MD5 ETag; without a stored checksum the MD5 check catches the flip."""
    name = bucket(moto)
    key, body = ("small", SMALL) if fast else ("large", LARGE)
    proxy = proxy_to(moto)
    store = store_for(proxy.endpoint_url, name, fast=fast)
    store.put_bytes(key, body, {})  # moto ignores a checksum sent as a header: it stores none
    proxy.arm("flip", key, times=1)
    assert store.get_range(key, 0, len(body)).data == body  # the second attempt is clean
    assert (proxy.damaged, store.requests["get_object"]) == (1, 2)
    proxy.arm("flip", key)
    with pytest.raises(IntegrityError, match="MD5"):
        store.get_range(key, 0, len(body))


@pytest.mark.parametrize("fast", [True, False], ids=["crt", "boto3"])
def test_the_stored_crc32c_is_checked_on_whole_object_reads(
    seaweed: SeaweedFS,
    bucket: Callable[..., str],
    s3_env: None,
    proxy_to: Callable[[S3Server], _Proxy],
    fast: bool,
) -> None:
    """SeaweedFS stores the CRC32C the store sends and returns it on an un-ranged GET."""
    name = bucket()
    key, body = ("small", SMALL) if fast else ("large", LARGE)
    proxy = proxy_to(seaweed)
    store = store_for(proxy.endpoint_url, name, fast=fast)
    etag = store.put_bytes(key, body, {})
    assert store.get_range(key, 0, len(body), etag, object_size=len(body)).data == body
    proxy.arm("flip", key)
    with pytest.raises(IntegrityError, match="checksum"):  # ours or botocore's check
        store.get_range(key, 0, len(body), etag, object_size=len(body))
    with pytest.raises(IntegrityError, match="MD5"):  # ranged: no checksum comes back, the ETag does
        store.get_range(key, 0, len(body), etag)


def test_a_put_damaged_in_transit_is_refused_by_the_server(
    seaweed: SeaweedFS, bucket: Callable[..., str], s3_env: None, proxy_to: Callable[[S3Server], _Proxy]
) -> None:
    """Every PUT carries a CRC32C; SeaweedFS answers BadDigest, which is retried as IntegrityError."""
    name = bucket()
    proxy = proxy_to(seaweed)
    store = store_for(proxy.endpoint_url, name, fast=False)
    proxy.arm("flip-request", "obj", times=1)
    store.put_bytes("obj", SMALL, {})  # the retry is clean
    assert (proxy.damaged, store.requests["put_object"]) == (1, 2)
    assert s3_client(seaweed.endpoint_url).get_object(Bucket=name, Key="obj")["Body"].read() == SMALL
    proxy.arm("flip-request", "obj")
    with pytest.raises(IntegrityError):
        store.put_bytes("obj", b"other bytes" * 1000, {})
    assert s3_client(seaweed.endpoint_url).get_object(Bucket=name, Key="obj")["Body"].read() == SMALL


def _b64(digest: bytes) -> str:
    return base64.b64encode(digest).decode()


@pytest.mark.parametrize(
    ("header", "value"),
    [
        ("x-amz-checksum-crc32c", crc32c_b64(SMALL)),
        ("x-amz-checksum-crc32", _b64(zlib.crc32(SMALL).to_bytes(4, "big"))),
        ("x-amz-checksum-sha256", _b64(hashlib.sha256(SMALL).digest())),
        ("x-amz-checksum-sha1", _b64(hashlib.sha1(SMALL).digest())),
    ],
)
def test_each_checksum_algorithm_accepts_the_object_and_rejects_a_flip(header: str, value: str) -> None:
    assert verify_whole_object("k", SMALL, "not-an-md5", {header: value}) == header
    with pytest.raises(IntegrityError):
        verify_whole_object("k", _flip(SMALL), "not-an-md5", {header: value})


def test_what_cannot_be_checked_is_not_refused() -> None:
    """Composite (multipart) checksums and ETags, and SSE-KMS/SSE-C ETags, say nothing about the bytes."""
    md5 = hashlib.md5(SMALL).hexdigest()
    assert verify_whole_object("k", SMALL, md5, {}) == "etag-md5"
    assert verify_whole_object("k", SMALL, md5 + "-3", {}) is None
    composite = {"x-amz-checksum-crc32c": "AAAAAA==-3", "x-amz-checksum-type": "COMPOSITE"}
    assert verify_whole_object("k", SMALL, md5 + "-3", composite) is None
    assert verify_whole_object("k", SMALL, "0" * 32, {"x-amz-server-side-encryption": "aws:kms"}) is None
    ssec = {"x-amz-server-side-encryption-customer-algorithm": "AES256"}
    assert verify_whole_object("k", SMALL, "0" * 32, ssec) is None
    with pytest.raises(IntegrityError):  # SSE-S3 keeps the MD5 ETag: still checked
        verify_whole_object("k", SMALL, "0" * 32, {"x-amz-server-side-encryption": "AES256"})


def test_latency_is_observed_per_call_without_the_metrics_module(
    moto: MotoS3, bucket: Callable[..., str], s3_env: None, tmp_path: Path
) -> None:
    name = bucket(moto)
    seen: list[tuple[str, float]] = []
    store = S3ObjectStore(
        name, endpoint_url=moto.endpoint_url, timeout=5.0, observe=lambda op, s: seen.append((op, s))
    )
    store.put_bytes("k", b"abc", {})
    store.get_range("k", 0, 3)
    with pytest.raises(NotFound):
        store.head("missing")
    assert [op for op, _ in seen] == ["put_object", "get_object", "head_object"]
    assert all(0 <= seconds < 5.0 for _, seconds in seen)
