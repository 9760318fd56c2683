"""awscrt's S3 client as a benchmark baseline: the cheapest way this machine has to pull objects.

Shared by ``tools.bench`` (cold small files, large sequential, model load) and
``tools.bench_cold`` (cold small files against ``tierfs prefetch``), so both measure the
same client the same way: static credentials, SigV4, TLS off for the loopback gateway, the
``host`` header set, bodies counted and dropped in the CRT's own callback threads.

* :func:`crt_small`: whole-object GETs, ``inflight`` requests at a time from one thread.
* :func:`crt_large`: one auto-ranged ``GET_OBJECT`` meta request per key (the CRT splits it
  into ``part_size`` ranged GETs and runs them in parallel), every key at once.

Either way at most ``connections`` (16) connections are open, so "awscrt with 16 in flight"
means the same for small and large objects.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from typing import Any
from urllib.parse import quote, urlsplit

from awscrt import auth, io, s3
from awscrt.http import HttpHeaders, HttpRequest

from tools.bench_workloads import Measure, MiB, rate
from tools.servers import ACCESS_KEY, REGION, SECRET_KEY


class CrtBaseline:
    """One CRT S3 client for a run of GETs; counts received bytes and collects failures."""

    def __init__(
        self, endpoint_url: str, bucket: str, part_size: int = 8 * MiB, connections: int = 16
    ) -> None:
        self.netloc = urlsplit(endpoint_url).netloc
        self.bucket = bucket
        elg = io.EventLoopGroup(2)
        bootstrap = io.ClientBootstrap(elg, io.DefaultHostResolver(io.EventLoopGroup(1)))
        credentials = auth.AwsCredentialsProvider.new_static(ACCESS_KEY, SECRET_KEY)
        self.client = s3.S3Client(
            bootstrap=bootstrap,
            region=REGION,
            tls_mode=s3.S3RequestTlsMode.DISABLED,
            part_size=part_size,
            max_active_connections_override=connections,
            signing_config=s3.create_default_s3_signing_config(
                region=REGION, credential_provider=credentials
            ),
        )
        self._lock = threading.Lock()
        self.received = 0
        self.errors: list[str] = []

    def get(self, key: str, request_type: s3.S3RequestType, done: threading.Semaphore) -> None:
        """Start one GET of ``key``; ``done`` is released when it has finished (well or not)."""

        def on_body(chunk: bytes, offset: int, **_: Any) -> None:
            with self._lock:
                self.received += len(chunk)

        def on_done(error: BaseException | None = None, status_code: int | None = None, **_: Any) -> None:
            if error is not None or status_code not in (200, 206):
                with self._lock:
                    self.errors.append(f"{key}: {status_code} {error}")
            done.release()

        headers = HttpHeaders([("host", self.netloc)])
        self.client.make_request(
            type=request_type,
            operation_name="GetObject" if request_type == s3.S3RequestType.DEFAULT else None,
            request=HttpRequest("GET", f"/{self.bucket}/{quote(key, safe='/~')}", headers),
            on_body=on_body,
            on_done=on_done,
        )

    def run(self, keys: Sequence[str], inflight: int, request_type: s3.S3RequestType) -> float:
        """GET every key with at most ``inflight`` requests open; returns the wall time in seconds."""
        slots = threading.Semaphore(inflight)
        start = time.perf_counter()
        for key in keys:
            slots.acquire()
            self.get(key, request_type, slots)
        for _ in range(inflight):  # every request has finished once all slots are back
            slots.acquire()
        seconds = time.perf_counter() - start
        if self.errors:
            raise RuntimeError(f"{len(self.errors)} CRT GETs failed, e.g. {self.errors[0]}")
        return seconds


def crt_small(endpoint_url: str, bucket: str, keys: Sequence[str], inflight: int = 16) -> Measure:
    """GET every key whole with the CRT's S3 client, ``inflight`` requests at a time. Unit: files/s."""
    crt = CrtBaseline(endpoint_url, bucket, connections=inflight)
    seconds = crt.run(keys, inflight, s3.S3RequestType.DEFAULT)
    return rate(len(keys), crt.received, seconds, "files/s", False)


def crt_large(endpoint_url: str, bucket: str, keys: Sequence[str], part_size: int = 8 * MiB) -> Measure:
    """Every key as one auto-ranged GET_OBJECT (``part_size`` parts, in parallel), all keys at once. MiB/s."""
    crt = CrtBaseline(endpoint_url, bucket, part_size)
    seconds = crt.run(keys, max(1, len(keys)), s3.S3RequestType.GET_OBJECT)
    return rate(len(keys), crt.received, seconds, "MiB/s", False)
