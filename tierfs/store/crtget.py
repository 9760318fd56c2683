"""Ranged GETs through the AWS Common Runtime (awscrt), the cold read path's hot loop.

Why: on a 2-core node the client's CPU per request caps cold small-file rates. boto3
spends ~3.7 ms of CPU per GET; the CRT's native HTTP client and signer ~0.7 ms
(measured in tools/bench.py and noted in docs/design.md). Everything else (LIST, HEAD,
PUT, multipart, copy) stays on boto3, where per-call cost does not matter.

Credentials are not resolved a second time: the CRT takes boto3's (static ones once,
refreshable ones at every signing), so environment, profiles, shared files and refreshes
behave exactly as for boto3. The CRT retries nothing itself: :class:`~tierfs.store.objectstore.S3ObjectStore`
retries under one deadline for both clients, and each attempt here is cancelled when it
runs over the time it was given (the CRT has no read timeout of its own, so a stalled or
trickling body would otherwise hold the caller forever).
"""

from __future__ import annotations

import concurrent.futures
import re
import threading
from collections.abc import Callable, Mapping
from typing import Any
from urllib.parse import quote, urlsplit

import botocore.credentials
from awscrt import auth, io, s3
from awscrt.http import HttpHeaders, HttpRequest

from ..errors import StoreError, Unavailable
from .s3errors import classify

_CODE = re.compile(rb"<Code>([^<]{1,128})</Code>")

#: What one GET ends with: (body, status, lowercase headers, error or None).
CrtAnswer = tuple[bytes, int, Mapping[str, str], StoreError | None]


def _provider(credentials: Any) -> auth.AwsCredentialsProvider:
    """The CRT's credentials: boto3's own, never resolved a second time.

    Credentials that refresh (an assumed role, instance metadata, SSO) are asked of boto3 at each
    signing, so refreshes behave exactly as for boto3. Static ones (environment, shared files)
    never change, so they are handed over once: the delegate is a Python call on the CRT's event
    loop thread, which must first take the GIL, and while it waits every request on that event
    loop waits too (py-spy --native: a quarter of the CRT threads' GIL waits; docs/coldpath.md).
    """
    if isinstance(credentials, botocore.credentials.RefreshableCredentials):

        def delegate() -> auth.AwsCredentials:
            frozen = credentials.get_frozen_credentials()
            return auth.AwsCredentials(frozen.access_key, frozen.secret_key, frozen.token)

        return auth.AwsCredentialsProvider.new_delegate(delegate)
    frozen = credentials.get_frozen_credentials()
    return auth.AwsCredentialsProvider.new_static(frozen.access_key, frozen.secret_key, frozen.token)


class CrtRangeReader:
    """Thread-safe: many worker threads may call :meth:`get` at once."""

    def __init__(
        self,
        *,
        bucket: str,
        endpoint_url: str | None,
        region: str,
        credentials: Any,  # botocore Credentials (possibly refreshable)
        connect_timeout: float = 10.0,
    ) -> None:
        self.bucket = bucket
        url = urlsplit(endpoint_url or f"https://s3.{region}.amazonaws.com")
        self.host = url.netloc
        self.base = url.path.rstrip("/")
        tls = s3.S3RequestTlsMode.ENABLED if url.scheme == "https" else s3.S3RequestTlsMode.DISABLED

        provider = _provider(credentials)
        bootstrap = io.ClientBootstrap(io.EventLoopGroup(2), io.DefaultHostResolver(io.EventLoopGroup(1)))
        self._client = s3.S3Client(
            bootstrap=bootstrap,
            region=region,
            tls_mode=tls,
            signing_config=s3.create_default_s3_signing_config(region=region, credential_provider=provider),
            retry_config=s3.S3RetryConfig(max_retries=0),
            connect_timeout_ms=int(connect_timeout * 1000),
        )
        self._lock = threading.Lock()

    def get(
        self,
        key: str,
        start: int,
        length: int,
        if_match: str | None,
        *,
        whole: bool = False,
        timeout: float,
        version_id: str | None = None,
    ) -> tuple[bytes, int, Mapping[str, str]]:
        """Return (data, status, lowercase response headers) within ``timeout`` seconds.

        ``whole`` asks for the whole object (``start`` 0, ``length`` its size) without a
        Range header, so that the server sends its stored checksum. Raises the tierfs
        error vocabulary, classified like boto3's answers.
        """
        answer: concurrent.futures.Future[CrtAnswer] = concurrent.futures.Future()
        request = self.start(
            key, start, length, if_match, whole=whole, version_id=version_id, on_done=answer.set_result
        )
        try:
            data, status, headers, error = answer.result(max(timeout, 0.0))
        except TimeoutError:
            request.cancel()
            raise Unavailable(f"GET {key}: no complete answer within {timeout:.1f} s") from None
        if error is not None:
            raise error
        return data, status, headers

    def start(
        self,
        key: str,
        start: int,
        length: int,
        if_match: str | None,
        *,
        whole: bool = False,
        version_id: str | None = None,
        on_done: Callable[[CrtAnswer], None],
    ) -> s3.S3Request:
        """Send one GET and return at once; ``on_done((data, status, headers, error))`` is called
        once, on a CRT thread, with ``error`` (the tierfs vocabulary) set when it failed. No thread
        waits for the answer: the cold fetch engine keeps many of these in flight from the loop.
        The caller bounds the time and cancels the returned request when it runs out."""
        headers = HttpHeaders([("host", self.host)])
        if not whole:
            headers.add("range", f"bytes={start}-{start + length - 1}")
        if if_match:
            headers.add("if-match", f'"{if_match}"')
        if start == 0:  # the answer may be the whole object: ask for its checksum (AWS needs this)
            headers.add("x-amz-checksum-mode", "ENABLED")
        path = f"{self.base}/{self.bucket}/{quote(key, safe='/~')}"
        if version_id:
            path += f"?versionId={quote(version_id, safe='')}"
        body = bytearray(length)
        view = memoryview(body)
        received = 0
        overflow = False
        response: dict[str, Any] = {}

        def on_headers(status_code: int, headers: list[tuple[str, str]], **_: Any) -> None:
            response["status"] = status_code
            response["headers"] = {k.lower(): v for k, v in headers}

        def on_body(chunk: bytes, offset: int, **_: Any) -> None:
            # The CRT reports offsets within the object (from Content-Range), not the body.
            nonlocal received, overflow
            offset -= start
            if offset + len(chunk) > length:
                overflow = True  # more than asked (the object is not the pinned version)
                return
            view[offset : offset + len(chunk)] = chunk
            received = max(received, offset + len(chunk))

        def on_finish(error: BaseException | None = None, status_code: int | None = None, **_: Any) -> None:
            failure: StoreError | None = None
            if error is not None:
                failure = _classified(key, error)
            elif overflow:
                failure = Unavailable(f"GET {key}: the server sent more than {length} bytes")
            view.release()
            if failure is not None:
                on_done((b"", status_code or 0, {}, failure))
                return
            del body[received:]  # the object may end before the requested range does
            status = int(response.get("status", status_code or 0))
            on_done((bytes(body), status, response.get("headers", {}), None))

        return self._client.make_request(
            type=s3.S3RequestType.DEFAULT,
            operation_name="GetObject",
            request=HttpRequest("GET", path, headers),
            on_headers=on_headers,
            on_body=on_body,
            on_done=on_finish,
        )


def _classified(key: str, error: BaseException) -> StoreError:
    """A failed request in the tierfs vocabulary: an S3 error answer by its status and ``<Code>``,
    anything else (a connection error, a cancelled request) classified without a status."""
    if isinstance(error, s3.S3ResponseError):
        match = _CODE.search(error.body or b"")
        code = match.group(1).decode(errors="replace") if match else ""
        return classify(error.status_code, code, f"GET {key}: {error.status_code} {code or error.name}")
    return classify(None, "", f"GET {key}: {type(error).__name__}: {error}")
