"""Ranged GETs through the AWS Common Runtime (awscrt), the cold read path's hot loop.

Why: on a 2-core node the client's CPU per request caps cold small-file rates. boto3
spends ~3.7 ms of CPU per GET; the CRT's native HTTP client and signer ~0.7 ms
(measured in tools/bench.py and noted in docs/design.md). Everything else (LIST, HEAD,
PUT, multipart, copy) stays on boto3, where per-call cost does not matter.

Credentials are not resolved a second time: the CRT asks boto3's credential object on
every signing, so environment, profiles, shared files and refreshes behave exactly as
for boto3. The CRT retries nothing itself: :class:`~tierfs.store.objectstore.S3ObjectStore`
retries under one deadline for both clients, and each attempt here is cancelled when it
runs over the time it was given (the CRT has no read timeout of its own, so a stalled or
trickling body would otherwise hold the caller forever).
"""

from __future__ import annotations

import re
import threading
from collections.abc import Mapping
from typing import Any
from urllib.parse import quote, urlsplit

from awscrt import auth, io, s3
from awscrt.http import HttpHeaders, HttpRequest

from ..errors import Unavailable
from .s3errors import classify

_CODE = re.compile(rb"<Code>([^<]{1,128})</Code>")


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

        def delegate() -> auth.AwsCredentials:
            frozen = credentials.get_frozen_credentials()
            return auth.AwsCredentials(frozen.access_key, frozen.secret_key, frozen.token)

        provider = auth.AwsCredentialsProvider.new_delegate(delegate)
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

        request = self._client.make_request(
            type=s3.S3RequestType.DEFAULT,
            operation_name="GetObject",
            request=HttpRequest("GET", path, headers),
            on_headers=on_headers,
            on_body=on_body,
        )
        try:
            request.finished_future.result(max(timeout, 0.0))
        except s3.S3ResponseError as exc:
            match = _CODE.search(exc.body or b"")
            code = match.group(1).decode(errors="replace") if match else ""
            raise classify(
                exc.status_code, code, f"GET {key}: {exc.status_code} {code or exc.name}"
            ) from None
        except TimeoutError:
            request.cancel()
            raise Unavailable(f"GET {key}: no complete answer within {timeout:.1f} s") from None
        except Exception as exc:  # CRT connection errors arrive as plain AwsCrtError
            raise classify(None, "", f"GET {key}: {type(exc).__name__}: {exc}") from None
        if overflow:
            raise Unavailable(f"GET {key}: the server sent more than {length} bytes")
        view.release()
        del body[received:]  # the object may end before the requested range does
        return bytes(body), int(response.get("status", 0)), response.get("headers", {})
