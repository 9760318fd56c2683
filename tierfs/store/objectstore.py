"""The object-store seam: everything tierfs asks of S3, and nothing else.

Every method is *blocking* and is called from a worker thread (``trio.to_thread``)
behind a bounded ``CapacityLimiter``; none may be called on the trio loop.

**Time.** ``timeout`` bounds how long a caller waits for one request, retries and the
body transfer included (see :class:`ObjectStore`). A frozen server therefore costs a
reader at most ~``timeout`` before :class:`~tierfs.errors.Unavailable` (EIO), never a
multiple of it.

**Errors** are classified once, by HTTP status and S3 error code (never by message
text), in :func:`classify`; both clients (boto3 here, awscrt in :mod:`tierfs.store.crtget`)
call it. Only a definite 404 becomes :class:`NotFound`; timeouts, resets, 5xx and
throttling are :class:`Unavailable` and never mean "deleted".

**Integrity.** Whole-object reads are checked against the server's stored checksum
(``x-amz-checksum-*``) or else the ETag when it is a plain MD5; uploads carry a CRC32C
that the server verifies before it stores anything (:func:`verify_whole_object`).
"""

from __future__ import annotations

import base64
import concurrent.futures
import contextlib
import hashlib
import random
import re
import threading
import time
import zlib
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any, Protocol, TypeVar

import boto3
import botocore.config
import botocore.exceptions
import botocore.session
import botocore.utils
from awscrt import checksums

from ..errors import IntegrityError, NotFound, Permanent, RangeNotSatisfiable, StoreError, Unavailable
from .crtget import CrtRangeReader
from .s3errors import classify

T = TypeVar("T")

#: ``observe(op, seconds)``: called once per store request (retries included), e.g. to feed
#: a latency histogram. The store does not import the metrics module; the daemon wires it.
Observe = Callable[[str, float], None]


#: One uploaded part, as CompleteMultipartUpload wants it (PartNumber, ETag, ChecksumCRC32C).
Part = dict[str, Any]


@dataclass(frozen=True)
class ObjectInfo:
    """What a LIST or HEAD tells about one object. ``metadata`` is only known after HEAD/GET."""

    key: str
    size: int
    etag: str
    mtime_ns: int
    metadata: Mapping[str, str] | None = None
    version_id: str = ""  # known after HEAD/GET on a versioned bucket


@dataclass(frozen=True)
class ObjectVersionInfo:
    """One entry of ListObjectVersions: a version of a key, or a delete marker (``deleted``)."""

    key: str
    version_id: str
    is_latest: bool
    deleted: bool
    size: int
    etag: str
    mtime_ns: int


@dataclass
class ListPage:
    """One page of ``ListObjectsV2`` with ``Delimiter='/'``."""

    objects: list[ObjectInfo] = field(default_factory=list)
    prefixes: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class GetResult:
    data: bytes
    info: ObjectInfo  # size is the whole object's size, etag its current ETag


class ObjectStore(Protocol):
    """The narrow interface the rest of tierfs uses. Implementations must be thread-safe.

    **The time rule.** Every call that makes one request (``head``, ``get_range``,
    ``put_bytes``, ``replace_metadata``, ``copy``, ``delete``, ``abort_multipart``, one page of
    a listing) returns or raises within about ``timeout`` seconds *in total*: connection,
    retries, back-off and the transfer of the body included. A retry is never started
    past the deadline. A stalled or trickling server therefore yields
    :class:`~tierfs.errors.Unavailable` after ~``timeout``, not ``(retries + 1)`` times it.
    ``put_file`` of a multipart size is a sequence of such requests, each bounded alike
    (so at most ``parts + 2`` times ``timeout``). A request whose caller gave up may still
    be executed by the server (as with any timeout): conditional headers are what keep a
    late write from overwriting a newer one.

    **Errors.** NotFound (a definite 404), PreconditionFailed (412), RangeNotSatisfiable
    (416), AccessDenied (403), Permanent (other 4xx but 408/429), Unavailable (the rest;
    IntegrityError when bytes fail their checksum). Nothing else escapes.
    """

    bucket: str
    part_size: int  # multipart uploads are cut into parts of this size (the last may be shorter)

    def check_bucket(self) -> None:
        """Raise NotFound/AccessDenied/Unavailable unless the bucket is usable."""

    def list_dir(self, prefix: str) -> Iterator[ListPage]:
        """Yield the pages of one 'directory' level below ``prefix`` (which ends in '/' or is '')."""
        ...

    def list_tree(self, prefix: str) -> Iterator[ObjectInfo]:
        """Every object below ``prefix``, recursively (used by directory renames)."""
        ...

    def head(self, key: str, *, version_id: str | None = None) -> ObjectInfo: ...

    def get_range(
        self,
        key: str,
        start: int,
        length: int,
        if_match: str | None = None,
        *,
        object_size: int | None = None,
        version_id: str | None = None,
    ) -> GetResult:
        """Read ``length`` bytes from ``start`` (fewer at end of object). ``if_match`` pins the version;
        ``version_id`` (a versioned bucket) reads that version even after it was overwritten or deleted.

        When the answer holds the whole object, its bytes are verified (stored checksum,
        else a plain-MD5 ETag) and a mismatch raises IntegrityError. Servers send their
        stored checksum only for un-ranged GETs: pass ``object_size`` (the size of the
        ``if_match`` version) and a read of the whole object is asked without a Range
        header, so the cheap CRC is checked instead of MD5.
        """
        ...

    def put_bytes(
        self,
        key: str,
        data: bytes,
        metadata: Mapping[str, str],
        if_match: str | None = None,
        if_none_match: bool = False,
    ) -> str:
        """Store an object (the server verifies its CRC32C) and return its new ETag."""
        ...

    def put_file(
        self,
        key: str,
        path: Path,
        metadata: Mapping[str, str],
        if_match: str | None = None,
        if_none_match: bool = False,
        *,
        on_upload_id: Callable[[str], None] | None = None,
    ) -> str:
        """Upload a local file (multipart when large) and return its new ETag.

        For a multipart upload ``on_upload_id(upload_id)`` is called right after
        CreateMultipartUpload and before any part, so that a journal can record the id
        and a crash leaves no orphan (replay calls :meth:`abort_multipart`). If it raises,
        the upload is aborted and the error propagates.
        """
        ...

    def is_multipart(self, size: int) -> bool:
        """Whether :meth:`put_file` sends a file of ``size`` bytes as a multipart upload (local, cheap)."""
        ...

    def create_multipart(self, key: str, metadata: Mapping[str, str]) -> str:
        """Start a multipart upload of ``key`` with ``metadata``; returns its upload id."""
        ...

    def upload_parts(
        self, key: str, upload_id: str, path: Path, numbers: Iterable[int], *, size: int | None = None
    ) -> list[Part]:
        """Upload parts ``numbers`` (1-based, cut every ``part_size`` bytes) of the file at ``path``,
        its first ``size`` bytes (default: all), in parallel within a store-wide bound; each part
        is one request under the time rule."""
        ...

    def complete_multipart(
        self, key: str, upload_id: str, parts: list[Part], if_match: str | None, if_none_match: bool
    ) -> str:
        """Complete an upload from its ``parts`` (any order) under the conditions; returns the ETag."""
        ...

    def abort_multipart(self, key: str, upload_id: str) -> None:
        """Abort an unfinished multipart upload. An upload that is already gone is success."""
        ...

    def list_multipart_uploads(self, prefix: str) -> list[tuple[str, str]]:
        """Every unfinished multipart upload below ``prefix``, as (key, upload_id)."""
        ...

    def expected_etag(self, path: Path) -> str:
        """The ETag ``put_file(path)`` will get: plain MD5 hex, or MD5-of-part-MD5s + '-N'."""
        ...

    def replace_metadata(self, key: str, metadata: Mapping[str, str], if_match: str | None = None) -> str:
        """Rewrite only the user metadata (CopyObject onto itself). Returns the new ETag."""
        ...

    def copy(self, src_key: str, dst_key: str) -> str: ...

    def delete(self, key: str) -> None: ...


# --------------------------------------------------------------------------- error classification


def map_error(exc: BaseException, what: str) -> StoreError:
    """Classify any boto3/botocore failure. Unknown failures are transient, never 'not found'."""
    if isinstance(exc, StoreError):
        return exc
    if isinstance(exc, botocore.exceptions.ClientError):
        err = exc.response.get("Error", {})
        code = str(err.get("Code", ""))
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        message = f"{what}: {code or status} {err.get('Message', '')}".strip()
        return classify(int(status) if status else None, code, message)
    if isinstance(exc, botocore.exceptions.FlexibleChecksumError):
        return IntegrityError(f"{what}: {exc}")
    if isinstance(exc, botocore.exceptions.ParamValidationError):
        return Permanent(f"{what}: {exc}")  # a request S3 would refuse with 400
    return Unavailable(f"{what}: {type(exc).__name__}: {exc}")


# --------------------------------------------------------------------------- integrity

_PLAIN_MD5 = re.compile(r"[0-9a-f]{32}")


def _b64(value: int, size: int) -> str:
    return base64.b64encode(value.to_bytes(size, "big")).decode()


def crc32c_b64(data: bytes | memoryview) -> str:
    """The CRC32C of ``data`` as S3 writes it (base64 of 4 big-endian bytes). ~65 GB/s here."""
    return _b64(checksums.crc32c(data), 4)


#: Whole-object checksums a server may return, cheapest first. Measured on this machine
#: (1 core): CRC32C and CRC64NVME ~65 GB/s (awscrt), CRC32 ~7.5 GB/s (zlib), SHA-1 and
#: SHA-256 ~2.2 GB/s, MD5 ~0.93 GB/s.
_CHECKSUMS: tuple[tuple[str, Callable[[bytes], str]], ...] = (
    ("x-amz-checksum-crc32c", crc32c_b64),
    ("x-amz-checksum-crc64nvme", lambda d: _b64(checksums.crc64nvme(d), 8)),
    ("x-amz-checksum-crc32", lambda d: _b64(zlib.crc32(d), 4)),
    ("x-amz-checksum-sha1", lambda d: base64.b64encode(hashlib.sha1(d).digest()).decode()),
    ("x-amz-checksum-sha256", lambda d: base64.b64encode(hashlib.sha256(d).digest()).decode()),
)


def verify_whole_object(what: str, data: bytes, etag: str, headers: Mapping[str, str]) -> str | None:
    """Check the bytes of a *whole* object; return what was checked (None: nothing to check).

    The server's stored full-object checksum is preferred: it is cheap and independent of
    how the object was encrypted. A composite (multipart, ``...-N``) checksum covers parts,
    not these bytes, so it is skipped. Otherwise a plain-MD5 ETag is compared, except for
    SSE-KMS/SSE-C objects, whose ETag is not the MD5 of the data. Multipart ETags
    (``...-N``) cannot be checked from the bytes alone.

    Cost of the MD5 fallback on this machine: 0.12 ms per 110 KiB body (about a fifth of
    the CRT's 0.63 ms CPU per GET) and 8.9 ms per 8 MiB body (about the CPU boto3 spends
    receiving it). With a stored CRC32C the check costs 0.002 ms and 0.12 ms.
    """
    if headers.get("x-amz-checksum-type", "").upper() != "COMPOSITE":
        for header, digest in _CHECKSUMS:
            expected = headers.get(header)
            if expected and "-" not in expected:
                if digest(data) != expected:
                    raise IntegrityError(f"{what}: {header} mismatch: the bytes are not the object's")
                return header
    encryption = headers.get("x-amz-server-side-encryption", "")
    if encryption.startswith("aws:kms") or "x-amz-server-side-encryption-customer-algorithm" in headers:
        return None
    if _PLAIN_MD5.fullmatch(etag):
        if hashlib.md5(data).hexdigest() != etag:
            raise IntegrityError(f"{what}: MD5 of the body does not match ETag {etag}")
        return "etag-md5"
    return None


# --------------------------------------------------------------------------- helpers


def _make_crt_reader(
    bucket: str, endpoint_url: str | None, client: Any, session: Any, connect_timeout: float
) -> Any:
    """The awscrt fast path for GETs, or None without credentials (anonymous access goes to boto3)."""
    credentials = session.get_credentials()
    if credentials is None:
        return None  # anonymous access: boto3 handles it
    return CrtRangeReader(
        bucket=bucket,
        endpoint_url=endpoint_url or client.meta.endpoint_url,
        region=client.meta.region_name,
        credentials=credentials,
        connect_timeout=connect_timeout,
    )


def parse_timestamp(value: str) -> datetime:
    """A timestamp from a response: ISO 8601 (LIST bodies) by the stdlib, anything else by botocore."""
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        return botocore.utils.parse_timestamp(value)  # type: ignore[no-any-return]
    return parsed if parsed.tzinfo is not None else parsed.replace(tzinfo=UTC)


def _asks_whole(start: int, length: int, if_match: str | None, object_size: int | None) -> bool:
    """Whether a GET may go without a Range header, so that the server returns its stored
    checksum: only for the whole of a pinned version (else a grown object could come whole)."""
    return start == 0 and if_match is not None and object_size is not None and length >= object_size


def normalize_etag(etag: str | None) -> str:
    return (etag or "").strip('"')


def _to_ns(value: datetime | None) -> int:
    return int(value.timestamp() * 1_000_000_000) if value else 0


MULTIPART_THRESHOLD = 64 << 20
# awscrt costs ~1.1 ms of CPU per 110 KiB GET against boto3's ~2.6 ms, but it hands the body
# to Python in small callbacks: above ~2 MiB boto3 is cheaper (0.7 vs 2.2 ms per MiB for 8 MiB
# GETs from SeaweedFS on loopback, 2 cores; see docs/design.md). Small objects and random misses go to the
# CRT, large sequential runs to boto3.
CRT_MAX_GET = 2 << 20
MULTIPART_PART_SIZE = 16 << 20
#: Parts in flight at once, over all multipart uploads of one store (it bounds their memory too).
PART_CONCURRENCY = 8
#: No attempt is started with less than this left of the budget: it could not finish.
MIN_ATTEMPT = 0.05


def backoff(attempt: int) -> float:
    """Full-jitter exponential back-off before retry ``attempt`` (1-based): up to 0.1, 0.2, 0.4 ... 2 s."""
    return random.uniform(0.0, min(2.0, 0.1 * 2 ** (attempt - 1)))


def retry_pause(error: Unavailable, tries: int, retries: int, left: float) -> float:
    """The time rule's answer after attempt ``tries`` failed with ``error`` and ``left`` seconds of
    the call's budget remain: the back-off before the next attempt, or raise the error (naming
    the attempts) when no retry is allowed or none could start with MIN_ATTEMPT left. One policy
    for the blocking store and the loop-side cold engine (tierfs/read/engine.py)."""
    pause = backoff(tries)
    if tries > retries or pause > left - MIN_ATTEMPT:
        if tries > 1:
            raise type(error)(f"{error} (after {tries} attempts)") from error
        raise error
    return pause


class S3ObjectStore:
    """:class:`ObjectStore` over boto3 (and awscrt for small GETs).

    One boto3 client is shared by all threads (boto3 clients are thread-safe). Each boto3
    attempt runs on a private pool thread while the caller waits at most for what is left
    of its budget: socket timeouts alone bound each ``recv``, not a whole request, so a
    trickling or stalled body could otherwise hold a caller for many times ``timeout``.
    An abandoned attempt ends by itself within ``timeout`` (its socket timeouts) and is
    never retried.
    """

    def __init__(
        self,
        bucket: str,
        *,
        endpoint_url: str | None = None,
        region: str | None = None,
        profile: str | None = None,
        timeout: float = 30.0,
        retries: int = 2,
        max_pool: int = 32,
        part_size: int = MULTIPART_PART_SIZE,
        multipart_threshold: int = MULTIPART_THRESHOLD,
        part_concurrency: int = PART_CONCURRENCY,
        fast_gets: bool = True,
        observe: Observe | None = None,
    ) -> None:
        self.bucket = bucket
        self.timeout = timeout
        self.retries = retries
        self.part_size = part_size
        self.multipart_threshold = multipart_threshold
        self.part_concurrency = part_concurrency
        self._part_slots = threading.BoundedSemaphore(part_concurrency)
        self._observe = observe
        core = botocore.session.get_session()
        # botocore parses every LastModified of a LIST page with dateutil: ~0.1 ms per key, which is
        # half the client CPU of listing. ISO-8601 goes through the stdlib parser instead.
        core.get_component("response_parser_factory").set_parser_defaults(timestamp_parser=parse_timestamp)
        session = boto3.session.Session(botocore_session=core, profile_name=profile)
        cfg = botocore.config.Config(
            connect_timeout=timeout,
            read_timeout=timeout,
            # Retries are ours (see _retrying): botocore's would not respect the deadline.
            retries={"total_max_attempts": 1, "mode": "standard"},
            max_pool_connections=max_pool + part_concurrency,
            # UNSIGNED-PAYLOAD on plain-HTTP endpoints too, as botocore already does over HTTPS:
            # every PUT and part carries a CRC32C the server verifies, and the signature covers
            # that header, so hashing each body again with SHA-256 (~2.5 ms of CPU per MiB
            # here, the largest client cost of a checkpoint upload) buys nothing.
            s3={"addressing_style": "path", "payload_signing_enabled": False},
            tcp_keepalive=True,
            # Checksums are sent explicitly (CRC32C on every PUT and part), so botocore's
            # own calculation would only duplicate them.
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
        )
        self._client: Any = session.client(
            "s3",
            endpoint_url=endpoint_url,
            region_name=region or session.region_name or "us-east-1",
            config=cfg,
        )
        self._pool = concurrent.futures.ThreadPoolExecutor(
            # Part uploads hold one of their own slots while they wait here, on top of the callers.
            max_workers=max_pool + part_concurrency,
            thread_name_prefix="tierfs-s3",
        )
        self.requests: dict[str, int] = {}
        self.bytes_fetched = 0
        self.in_flight = 0  # requests started and not yet answered, retries included (`tierfs stats`)
        self._lock = threading.Lock()
        self._crt: Any = None
        if fast_gets:
            self._crt = _make_crt_reader(bucket, endpoint_url, self._client, session, timeout)

    @property
    def fast_gets(self) -> bool:
        """Whether small ranged GETs go through awscrt (False without awscrt or credentials)."""
        return self._crt is not None

    # -- bookkeeping and the time rule -------------------------------------------------------------

    def _count(self, op: str, nbytes: int = 0) -> None:
        with self._lock:
            self.requests[op] = self.requests.get(op, 0) + 1
            self.bytes_fetched += nbytes

    def _retrying(self, op: str, what: str, attempt: Callable[[float], T]) -> T:
        """Run ``attempt(budget_left)`` until it succeeds, fails for good, or the deadline passes.

        Only Unavailable (incl. IntegrityError) is retried, at most ``retries`` times, and
        only if the back-off leaves at least MIN_ATTEMPT of the budget.
        """
        started = time.monotonic()
        deadline = started + self.timeout
        tries = 0
        with self._lock:
            self.in_flight += 1
        try:
            while True:
                self._count(op)
                tries += 1
                try:
                    return attempt(deadline - time.monotonic())
                except Unavailable as exc:
                    time.sleep(retry_pause(exc, tries, self.retries, deadline - time.monotonic()))
        finally:
            with self._lock:
                self.in_flight -= 1
            if self._observe is not None:
                self._observe(op, time.monotonic() - started)

    def _call(self, op: str, *, finish: Callable[[Any], Any] | None = None, **kwargs: Any) -> Any:
        """One S3 operation under the time rule. ``finish(resp)`` (body read, checks) runs inside
        the attempt, so a stalled body is bounded too and a failed check is retried."""
        what = f"{op} {kwargs.get('Key', kwargs.get('Prefix', ''))}".rstrip()

        def work() -> Any:
            try:
                resp = getattr(self._client, op)(Bucket=self.bucket, **kwargs)
                return finish(resp) if finish is not None else resp
            except Exception as exc:  # every failure is classified; none escapes as a botocore type
                raise map_error(exc, what) from exc

        def attempt(budget: float) -> Any:
            try:
                future = self._pool.submit(work)
            except RuntimeError as exc:  # the pool is shut down (interpreter exit)
                raise Unavailable(f"{what}: {exc}") from None
            try:
                return future.result(timeout=max(budget, 0.0))
            except concurrent.futures.TimeoutError:
                future.cancel()  # abandoned: it ends by its own socket timeouts
                raise Unavailable(f"{what}: no complete answer within {self.timeout:g} s") from None

        return self._retrying(op, what, attempt)

    # -- reads -------------------------------------------------------------------------------------

    def check_bucket(self) -> None:
        self._call("head_bucket")

    def list_dir(self, prefix: str) -> Iterator[ListPage]:
        return self._list(prefix, "/")

    def list_tree(self, prefix: str) -> Iterator[ObjectInfo]:
        for page in self._list(prefix, None):
            yield from page.objects

    def _list(self, prefix: str, delimiter: str | None) -> Iterator[ListPage]:
        token: str | None = None
        while True:
            kwargs: dict[str, Any] = {"Prefix": prefix, "MaxKeys": 1000}
            if delimiter:
                kwargs["Delimiter"] = delimiter
            if token:
                kwargs["ContinuationToken"] = token
            resp = self._call("list_objects_v2", **kwargs)
            page = ListPage(
                objects=[
                    ObjectInfo(
                        key=o["Key"],
                        size=int(o["Size"]),
                        etag=normalize_etag(o.get("ETag")),
                        mtime_ns=_to_ns(o.get("LastModified")),
                    )
                    for o in resp.get("Contents", ())
                ],
                prefixes=[p["Prefix"] for p in resp.get("CommonPrefixes", ())],
            )
            yield page
            token = resp.get("NextContinuationToken")
            if not resp.get("IsTruncated") or not token:
                return

    def head(self, key: str, *, version_id: str | None = None) -> ObjectInfo:
        extra: dict[str, Any] = {"VersionId": version_id} if version_id else {}
        resp = self._call("head_object", Key=key, **extra)
        return _info_from_response(key, resp)

    def versioning(self) -> str:
        """The bucket's versioning state: "Enabled", "Suspended" or "" (never enabled)."""
        resp = self._call("get_bucket_versioning")
        return str(resp.get("Status") or "")

    def list_versions(self, prefix: str) -> Iterator[ObjectVersionInfo]:
        """Every version and delete marker below ``prefix`` (ListObjectVersions), in key order,
        each key's versions newest first as S3 lists them."""
        marker: dict[str, Any] = {}
        while True:
            resp = self._call("list_object_versions", Prefix=prefix, MaxKeys=1000, **marker)
            found = [(v, False) for v in resp.get("Versions", ())] + [
                (d, True) for d in resp.get("DeleteMarkers", ())
            ]
            # The answer splits versions from delete markers; S3's order is key, then newest first.
            # LastModified may have whole seconds: on a tie the latest one is the newest, and a
            # delete marker is taken to follow the version it hides.
            found.sort(key=_version_order)
            for v, deleted in found:
                yield ObjectVersionInfo(
                    key=v["Key"], version_id=str(v.get("VersionId") or ""), is_latest=bool(v.get("IsLatest")),
                    deleted=deleted, size=int(v.get("Size", 0)), etag=normalize_etag(v.get("ETag")),
                    mtime_ns=_to_ns(v.get("LastModified")),
                )  # fmt: skip
            if not resp.get("IsTruncated"):
                return
            marker = {"KeyMarker": resp.get("NextKeyMarker", "")}
            if resp.get("NextVersionIdMarker"):
                marker["VersionIdMarker"] = resp["NextVersionIdMarker"]

    def get_range(
        self,
        key: str,
        start: int,
        length: int,
        if_match: str | None = None,
        *,
        object_size: int | None = None,
        version_id: str | None = None,
    ) -> GetResult:
        whole = _asks_whole(start, length, if_match, object_size)
        try:
            if self._crt is not None and 0 < length <= CRT_MAX_GET:
                return self._crt_get_range(key, start, length, if_match, whole, version_id)
            return self._boto_get_range(key, start, length, if_match, whole, version_id)
        except RangeNotSatisfiable:
            if start != 0:
                raise
            # A zero-byte object has no byte 0; S3 answers 416.
            return GetResult(b"", self.head(key, version_id=version_id))

    def _boto_get_range(
        self, key: str, start: int, length: int, if_match: str | None, whole: bool, version_id: str | None
    ) -> GetResult:
        kwargs: dict[str, Any] = {"Key": key}
        if version_id:
            kwargs["VersionId"] = version_id
        if not whole:
            kwargs["Range"] = f"bytes={start}-{start + length - 1}"
        if if_match:
            kwargs["IfMatch"] = f'"{if_match}"'
        if start == 0:  # only then can the answer be the whole object, the case checksums cover
            kwargs["ChecksumMode"] = "ENABLED"

        def finish(resp: Any) -> GetResult:
            try:
                data: bytes = resp["Body"].read()
            finally:
                resp["Body"].close()
            if len(data) > length:  # un-ranged, yet not the pinned size: not what was asked for
                raise Unavailable(f"get_object {key}: the server sent {len(data)} bytes, not {length}")
            total = int(resp.get("ContentRange", "/0").rsplit("/", 1)[-1] or 0) or int(
                resp.get("ContentLength", 0)
            )
            info = ObjectInfo(
                key=key,
                size=total,
                etag=normalize_etag(resp.get("ETag")),
                mtime_ns=_to_ns(resp.get("LastModified")),
                metadata=resp.get("Metadata") or {},
            )
            return self._checked(data, info, start, resp["ResponseMetadata"].get("HTTPHeaders", {}))

        result: GetResult = self._call("get_object", finish=finish, **kwargs)
        with self._lock:
            self.bytes_fetched += len(result.data)
        return result

    def _crt_get_range(
        self, key: str, start: int, length: int, if_match: str | None, whole: bool, version_id: str | None
    ) -> GetResult:
        def attempt(budget: float) -> GetResult:
            data, _, headers = self._crt.get(
                key, start, length, if_match, whole=whole, timeout=budget, version_id=version_id
            )
            return self._crt_result(key, start, data, headers)

        result = self._retrying("get_object", f"get_object {key}", attempt)
        with self._lock:
            self.bytes_fetched += len(result.data)
        return result

    def _crt_result(self, key: str, start: int, data: bytes, headers: Mapping[str, str]) -> GetResult:
        """A CRT answer as a checked GetResult (raises IntegrityError when the bytes fail their check)."""
        total = headers.get("content-range", "").rsplit("/", 1)[-1]
        modified = headers.get("last-modified")
        info = ObjectInfo(
            key=key,
            size=int(total) if total.isdigit() else int(headers.get("content-length", len(data))),
            etag=normalize_etag(headers.get("etag")),
            mtime_ns=_to_ns(parsedate_to_datetime(modified)) if modified else 0,
            metadata={k[len("x-amz-meta-") :]: v for k, v in headers.items() if k.startswith("x-amz-meta-")},
        )
        return self._checked(data, info, start, headers)

    def start_get(
        self,
        key: str,
        start: int,
        length: int,
        if_match: str | None,
        *,
        object_size: int | None,
        on_done: Callable[[GetResult | StoreError], None],
        version_id: str | None = None,
    ) -> Callable[[], None] | None:
        """One attempt of :meth:`get_range`, sent without a waiting thread: returns a cancel function
        at once, or None when this GET is not one for the CRT (then call :meth:`get_range`).

        ``on_done`` is called exactly once, on a CRT thread, with the checked result or the error;
        it must not block long. The caller owns the time rule (bound the wait, cancel, retry
        Unavailable within ``timeout`` and ``retries``): the cold fetch engine does, on the loop.
        """
        if self._crt is None or not 0 < length <= CRT_MAX_GET:
            return None
        whole = _asks_whole(start, length, if_match, object_size)
        self._count("get_object")
        started = time.monotonic()
        with self._lock:
            self.in_flight += 1

        def finished(answer: tuple[bytes, int, Mapping[str, str], StoreError | None]) -> None:
            # In flight and latency per attempt here: the engine owns the retries of this request.
            with self._lock:
                self.in_flight -= 1
            if self._observe is not None:
                self._observe("get_object", time.monotonic() - started)
            data, _, headers, error = answer
            try:
                if error is not None:
                    raise error
                result = self._crt_result(key, start, data, headers)
                with self._lock:
                    self.bytes_fetched += len(data)
            except StoreError as exc:
                on_done(exc)
            except Exception as exc:  # a malformed answer; never let it escape into the CRT
                on_done(Unavailable(f"get_object {key}: {type(exc).__name__}: {exc}"))
            else:
                on_done(result)

        request = self._crt.start(
            key, start, length, if_match, whole=whole, version_id=version_id, on_done=finished
        )
        return request.cancel  # type: ignore[no-any-return]

    @staticmethod
    def _checked(data: bytes, info: ObjectInfo, start: int, headers: Mapping[str, str]) -> GetResult:
        """Verify the bytes when they are the whole object (the only case a checksum covers)."""
        if start == 0 and len(data) == info.size:
            verify_whole_object(f"get_object {info.key}", data, info.etag, headers)
        return GetResult(data, info)

    # -- writes ------------------------------------------------------------------------------------

    @staticmethod
    def _conditions(if_match: str | None, if_none_match: bool) -> dict[str, Any]:
        cond: dict[str, Any] = {}
        if if_match:
            cond["IfMatch"] = f'"{if_match}"'
        if if_none_match:
            cond["IfNoneMatch"] = "*"
        return cond

    def put_bytes(
        self,
        key: str,
        data: bytes,
        metadata: Mapping[str, str],
        if_match: str | None = None,
        if_none_match: bool = False,
    ) -> str:
        resp = self._call(
            "put_object",
            Key=key,
            Body=data,
            Metadata=dict(metadata),
            ChecksumCRC32C=crc32c_b64(data),
            **self._conditions(if_match, if_none_match),
        )
        return normalize_etag(resp.get("ETag"))

    def is_multipart(self, size: int) -> bool:
        return size >= self.multipart_threshold

    def put_file(
        self,
        key: str,
        path: Path,
        metadata: Mapping[str, str],
        if_match: str | None = None,
        if_none_match: bool = False,
        *,
        on_upload_id: Callable[[str], None] | None = None,
    ) -> str:
        size = path.stat().st_size
        if not self.is_multipart(size):
            return self.put_bytes(key, path.read_bytes(), metadata, if_match, if_none_match)
        upload_id = self.create_multipart(key, metadata)
        try:
            if on_upload_id is not None:
                on_upload_id(upload_id)
            numbers = range(1, -(-size // self.part_size) + 1)
            parts = self.upload_parts(key, upload_id, path, numbers, size=size)
            return self.complete_multipart(key, upload_id, parts, if_match, if_none_match)
        except BaseException:
            # An unfinished upload is aborted on the way out so no orphan parts stay billed;
            # a crash instead leaves it to the journal (``on_upload_id``) and replay.
            with contextlib.suppress(StoreError):
                self.abort_multipart(key, upload_id)
            raise

    def create_multipart(self, key: str, metadata: Mapping[str, str]) -> str:
        upload = self._call(
            "create_multipart_upload", Key=key, Metadata=dict(metadata), ChecksumAlgorithm="CRC32C"
        )
        upload_id: str = upload["UploadId"]
        return upload_id

    def upload_parts(
        self, key: str, upload_id: str, path: Path, numbers: Iterable[int], *, size: int | None = None
    ) -> list[Part]:
        """Upload parts ``numbers`` of ``path`` (cut every ``part_size`` bytes), up to
        ``part_concurrency`` at once.

        Memory is bounded store-wide, not per file: a part's bytes are read only once one of
        the ``part_concurrency`` slots shared by all uploads is free, so at most that many
        parts (``part_concurrency * part_size`` bytes) are in memory however many files are
        uploading. The first failure cancels the parts not yet started and propagates.
        """
        numbers = list(numbers)
        end = path.stat().st_size if size is None else size
        if len(numbers) <= 1:
            return [self._upload_part(key, upload_id, path, n, end) for n in numbers]
        with concurrent.futures.ThreadPoolExecutor(
            max_workers=min(self.part_concurrency, len(numbers)), thread_name_prefix="tierfs-part"
        ) as parts_pool:
            futures = [parts_pool.submit(self._upload_part, key, upload_id, path, n, end) for n in numbers]
            try:
                return [future.result() for future in futures]
            except BaseException:
                for future in futures:
                    future.cancel()
                raise

    def _upload_part(self, key: str, upload_id: str, path: Path, number: int, end: int) -> Part:
        with self._part_slots:
            start = (number - 1) * self.part_size
            with path.open("rb") as fh:
                fh.seek(start)
                chunk = fh.read(max(0, min(self.part_size, end - start)))
            crc = crc32c_b64(chunk)
            resp = self._call(
                "upload_part", Key=key, UploadId=upload_id, PartNumber=number, Body=chunk, ChecksumCRC32C=crc
            )
        return {"PartNumber": number, "ETag": resp["ETag"], "ChecksumCRC32C": crc}

    def complete_multipart(
        self, key: str, upload_id: str, parts: list[Part], if_match: str | None, if_none_match: bool
    ) -> str:
        resp = self._call(
            "complete_multipart_upload",
            Key=key,
            UploadId=upload_id,
            MultipartUpload={"Parts": sorted(parts, key=lambda p: int(p["PartNumber"]))},
            **self._conditions(if_match, if_none_match),
        )
        return normalize_etag(resp.get("ETag"))

    def abort_multipart(self, key: str, upload_id: str) -> None:
        with contextlib.suppress(NotFound):  # NoSuchUpload: aborted or completed already
            self._call("abort_multipart_upload", Key=key, UploadId=upload_id)

    def list_multipart_uploads(self, prefix: str) -> list[tuple[str, str]]:
        found: list[tuple[str, str]] = []
        markers: dict[str, Any] = {}
        while True:
            resp = self._call("list_multipart_uploads", Prefix=prefix, **markers)
            found.extend((u["Key"], u["UploadId"]) for u in resp.get("Uploads", ()))
            if not resp.get("IsTruncated"):
                return found
            markers = {
                "KeyMarker": resp.get("NextKeyMarker", ""),
                "UploadIdMarker": resp.get("NextUploadIdMarker", ""),
            }
            if not markers["KeyMarker"]:
                return found

    def expected_etag(self, path: Path) -> str:
        """Computed from the file as :meth:`put_file` would cut it (this store's threshold and part size).

        Checked against SeaweedFS 4.x and moto 5: both return exactly this for single-part
        and multipart uploads. Costs one MD5 pass over the file (~0.93 GB/s here).
        """
        with path.open("rb") as fh:
            if path.stat().st_size < self.multipart_threshold:
                return hashlib.file_digest(fh, "md5").hexdigest()
            digests = []
            while chunk := fh.read(self.part_size):
                digests.append(hashlib.md5(chunk).digest())
        return f"{hashlib.md5(b''.join(digests)).hexdigest()}-{len(digests)}"

    def replace_metadata(self, key: str, metadata: Mapping[str, str], if_match: str | None = None) -> str:
        kwargs: dict[str, Any] = {}
        if if_match:
            kwargs["CopySourceIfMatch"] = f'"{if_match}"'
        resp = self._call(
            "copy_object",
            Key=key,
            CopySource={"Bucket": self.bucket, "Key": key},
            Metadata=dict(metadata),
            MetadataDirective="REPLACE",
            **kwargs,
        )
        return normalize_etag(resp.get("CopyObjectResult", {}).get("ETag"))

    def copy(self, src_key: str, dst_key: str) -> str:
        resp = self._call("copy_object", Key=dst_key, CopySource={"Bucket": self.bucket, "Key": src_key})
        return normalize_etag(resp.get("CopyObjectResult", {}).get("ETag"))

    def delete(self, key: str) -> None:
        self._call("delete_object", Key=key)


def _version_order(item: tuple[Mapping[str, Any], bool]) -> tuple[str, int, bool, bool]:
    """ListObjectVersions order: key, newest first; on a LastModified tie the latest first, then
    a delete marker before the version it hides."""
    version, deleted = item
    return version["Key"], -_to_ns(version.get("LastModified")), not version.get("IsLatest"), not deleted


def _info_from_response(key: str, resp: Mapping[str, Any]) -> ObjectInfo:
    return ObjectInfo(
        key=key,
        size=int(resp.get("ContentLength", 0)),
        etag=normalize_etag(resp.get("ETag")),
        mtime_ns=_to_ns(resp.get("LastModified")),
        metadata=resp.get("Metadata") or {},
        version_id=str(resp.get("VersionId") or ""),
    )
