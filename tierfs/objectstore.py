"""The object-store seam: everything tierfs asks of S3, and nothing else.

Every method is *blocking* and is called from a worker thread (``trio.to_thread``)
behind a bounded ``CapacityLimiter``; none may be called on the trio loop.
Every call is bounded in time: connect/read timeouts come from ``--timeout`` and
botocore retries at most ``--retries`` times, so a stalled server turns into
:class:`~tierfs.errors.Unavailable` (EIO) instead of a hung caller.

Errors are mapped onto the small vocabulary of :mod:`tierfs.errors`. Only a definite
404 becomes :class:`NotFound`; timeouts, resets, 5xx and throttling are
:class:`Unavailable` and never mean "deleted".
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any, BinaryIO, Protocol

import boto3
import botocore.config
import botocore.exceptions
import botocore.session
import botocore.utils

from .errors import AccessDenied, NotFound, PreconditionFailed, RangeNotSatisfiable, StoreError, Unavailable
from .metrics import S3_LATENCY


@dataclass(frozen=True)
class ObjectInfo:
    """What a LIST or HEAD tells about one object. ``metadata`` is only known after HEAD/GET."""

    key: str
    size: int
    etag: str
    mtime_ns: int
    metadata: Mapping[str, str] | None = None


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
    """The narrow interface the rest of tierfs uses. Implementations must be thread-safe."""

    bucket: str

    def check_bucket(self) -> None:
        """Raise NotFound/AccessDenied/Unavailable unless the bucket is usable."""

    def list_dir(self, prefix: str) -> Iterator[ListPage]:
        """Yield the pages of one 'directory' level below ``prefix`` (which ends in '/' or is '')."""
        ...

    def list_tree(self, prefix: str) -> Iterator[ObjectInfo]:
        """Every object below ``prefix``, recursively (used by directory renames)."""
        ...

    def head(self, key: str) -> ObjectInfo: ...

    def get_range(self, key: str, start: int, length: int, if_match: str | None = None) -> GetResult:
        """Read ``length`` bytes from ``start`` (fewer at end of object). ``if_match`` pins the version."""
        ...

    def put_bytes(
        self,
        key: str,
        data: bytes,
        metadata: Mapping[str, str],
        if_match: str | None = None,
        if_none_match: bool = False,
    ) -> str:
        """Store an object and return its new ETag."""
        ...

    def put_file(
        self,
        key: str,
        path: Path,
        metadata: Mapping[str, str],
        if_match: str | None = None,
        if_none_match: bool = False,
    ) -> str:
        """Upload a local file (multipart when large) and return its new ETag."""
        ...

    def replace_metadata(self, key: str, metadata: Mapping[str, str], if_match: str | None = None) -> str:
        """Rewrite only the user metadata (CopyObject onto itself). Returns the new ETag."""
        ...

    def copy(self, src_key: str, dst_key: str) -> str: ...

    def delete(self, key: str) -> None: ...


def _make_crt_reader(
    bucket: str, endpoint_url: str | None, client: Any, session: Any, timeout: float, retries: int
) -> Any:
    """The awscrt fast path for GETs, or None where awscrt or credentials are unavailable."""
    try:
        from .crtget import CrtRangeReader
    except ImportError:
        return None
    credentials = session.get_credentials()
    if credentials is None:
        return None  # anonymous access: boto3 handles it
    return CrtRangeReader(
        bucket=bucket,
        endpoint_url=endpoint_url or client.meta.endpoint_url,
        region=client.meta.region_name,
        credentials=credentials,
        timeout=timeout,
        retries=retries,
    )


def parse_timestamp(value: str) -> datetime:
    """A timestamp from a response: ISO 8601 (LIST bodies) by the stdlib, anything else by botocore."""
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        return botocore.utils.parse_timestamp(value)  # type: ignore[no-any-return]
    return parsed if parsed.tzinfo is not None else parsed.replace(tzinfo=UTC)


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


class S3ObjectStore:
    """:class:`ObjectStore` over boto3. One client, shared by all worker threads (boto3 clients are)."""

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
        fast_gets: bool = True,
    ) -> None:
        self.bucket = bucket
        self.part_size = part_size
        self.multipart_threshold = multipart_threshold
        core = botocore.session.get_session()
        # botocore parses every LastModified of a LIST page with dateutil: ~0.1 ms per key, which is
        # half the client CPU of listing. ISO-8601 goes through the stdlib parser instead.
        core.get_component("response_parser_factory").set_parser_defaults(timestamp_parser=parse_timestamp)
        session = boto3.session.Session(botocore_session=core, profile_name=profile)
        cfg = botocore.config.Config(
            connect_timeout=timeout,
            read_timeout=timeout,
            retries={"max_attempts": retries + 1, "mode": "standard"},
            max_pool_connections=max_pool,
            s3={"addressing_style": "path"},
            tcp_keepalive=True,
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
        )
        self._client: Any = session.client(
            "s3",
            endpoint_url=endpoint_url,
            region_name=region or session.region_name or "us-east-1",
            config=cfg,
        )
        self.requests: dict[str, int] = {}
        self.bytes_fetched = 0
        self._lock = threading.Lock()
        self._crt: Any = None
        if fast_gets:
            self._crt = _make_crt_reader(bucket, endpoint_url, self._client, session, timeout, retries)

    @property
    def fast_gets(self) -> bool:
        """Whether small ranged GETs go through awscrt (False without awscrt or credentials)."""
        return self._crt is not None

    # -- bookkeeping -------------------------------------------------------------------------------

    def _count(self, op: str, nbytes: int = 0) -> None:
        with self._lock:
            self.requests[op] = self.requests.get(op, 0) + 1
            self.bytes_fetched += nbytes

    def _call(self, op: str, **kwargs: Any) -> Any:
        self._count(op)
        started = time.perf_counter()
        try:
            return getattr(self._client, op)(Bucket=self.bucket, **kwargs)
        except Exception as exc:  # every failure is classified; none escapes as a botocore type
            raise map_error(exc, f"{op} {kwargs.get('Key', kwargs.get('Prefix', ''))}") from exc
        finally:
            S3_LATENCY.labels(op).observe(time.perf_counter() - started)

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

    def head(self, key: str) -> ObjectInfo:
        resp = self._call("head_object", Key=key)
        return _info_from_response(key, resp)

    def get_range(self, key: str, start: int, length: int, if_match: str | None = None) -> GetResult:
        if self._crt is not None and 0 < length <= CRT_MAX_GET:
            try:
                return self._crt_get_range(key, start, length, if_match)
            except RangeNotSatisfiable:
                if start != 0:
                    raise
                return GetResult(b"", self.head(key))  # a zero-byte object has no byte 0
        kwargs: dict[str, Any] = {"Key": key, "Range": f"bytes={start}-{start + length - 1}"}
        if if_match:
            kwargs["IfMatch"] = f'"{if_match}"'
        try:
            resp = self._call("get_object", **kwargs)
        except StoreError as exc:
            if "InvalidRange" in str(exc) and start == 0:
                # A zero-byte object has no byte 0; S3 answers 416. It is simply empty.
                info = self.head(key)
                return GetResult(b"", info)
            raise
        try:
            data = resp["Body"].read()
        except Exception as exc:
            raise map_error(exc, f"get_object body {key}") from exc
        finally:
            resp["Body"].close()
        with self._lock:
            self.bytes_fetched += len(data)
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
        return GetResult(data, info)

    def _crt_get_range(self, key: str, start: int, length: int, if_match: str | None) -> GetResult:
        self._count("get_object")
        started = time.perf_counter()
        try:
            data, _, headers = self._crt.get(key, start, length, if_match)
        finally:
            S3_LATENCY.labels("get_object").observe(time.perf_counter() - started)
        with self._lock:
            self.bytes_fetched += len(data)
        total = headers.get("content-range", "").rsplit("/", 1)[-1]
        modified = headers.get("last-modified")
        info = ObjectInfo(
            key=key,
            size=int(total) if total.isdigit() else int(headers.get("content-length", len(data))),
            etag=normalize_etag(headers.get("etag")),
            mtime_ns=_to_ns(parsedate_to_datetime(modified)) if modified else 0,
            metadata={k[len("x-amz-meta-") :]: v for k, v in headers.items() if k.startswith("x-amz-meta-")},
        )
        return GetResult(data, info)

    # -- writes ------------------------------------------------------------------------------------

    @staticmethod
    def _conditions(if_match: str | None, if_none_match: bool) -> dict[str, str]:
        cond: dict[str, str] = {}
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
            **self._conditions(if_match, if_none_match),
        )
        return normalize_etag(resp.get("ETag"))

    def put_file(
        self,
        key: str,
        path: Path,
        metadata: Mapping[str, str],
        if_match: str | None = None,
        if_none_match: bool = False,
    ) -> str:
        size = path.stat().st_size
        if size < self.multipart_threshold:
            return self.put_bytes(key, path.read_bytes(), metadata, if_match, if_none_match)
        with path.open("rb") as fh:
            return self._multipart(key, fh, size, metadata, if_match, if_none_match)

    def _multipart(
        self,
        key: str,
        fh: BinaryIO,
        size: int,
        metadata: Mapping[str, str],
        if_match: str | None,
        if_none_match: bool,
    ) -> str:
        """Sequential multipart upload with bounded memory (one part at a time per file).

        Concurrency comes from uploading several files at once, which the write-back
        layer bounds. An unfinished upload is always aborted so no orphan parts stay billed.
        """
        upload = self._call("create_multipart_upload", Key=key, Metadata=dict(metadata))
        upload_id = upload["UploadId"]
        try:
            parts = []
            number = 1
            while True:
                chunk = fh.read(self.part_size)
                if not chunk:
                    break
                resp = self._call("upload_part", Key=key, UploadId=upload_id, PartNumber=number, Body=chunk)
                parts.append({"PartNumber": number, "ETag": resp["ETag"]})
                number += 1
            resp = self._call(
                "complete_multipart_upload",
                Key=key,
                UploadId=upload_id,
                MultipartUpload={"Parts": parts},
                **self._conditions(if_match, if_none_match),
            )
            return normalize_etag(resp.get("ETag"))
        except BaseException:
            with contextlib.suppress(StoreError):
                self._call("abort_multipart_upload", Key=key, UploadId=upload_id)
            raise

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


def _info_from_response(key: str, resp: Mapping[str, Any]) -> ObjectInfo:
    return ObjectInfo(
        key=key,
        size=int(resp.get("ContentLength", 0)),
        etag=normalize_etag(resp.get("ETag")),
        mtime_ns=_to_ns(resp.get("LastModified")),
        metadata=resp.get("Metadata") or {},
    )


_NOT_FOUND_CODES = {"404", "NoSuchKey", "NoSuchBucket", "NotFound"}
_DENIED_CODES = {"403", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "Forbidden"}
_PRECONDITION_CODES = {"412", "PreconditionFailed", "ConditionalRequestConflict"}


def map_error(exc: BaseException, what: str) -> StoreError:
    """Classify any boto3/botocore failure. Unknown failures are transient, never 'not found'."""
    if isinstance(exc, StoreError):
        return exc
    if isinstance(exc, botocore.exceptions.ClientError):
        err = exc.response.get("Error", {})
        code = str(err.get("Code", ""))
        status = str(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", ""))
        message = f"{what}: {code or status} {err.get('Message', '')}".strip()
        if code in _NOT_FOUND_CODES or status == "404":
            return NotFound(message)
        if code in _PRECONDITION_CODES or status == "412":
            return PreconditionFailed(message)
        if code in _DENIED_CODES or status == "403":
            return AccessDenied(message)
        return Unavailable(message)
    return Unavailable(f"{what}: {type(exc).__name__}: {exc}")
