"""Is awscrt cheaper than boto3 for small-file uploads? (issue 16: measure before keeping it)

``python -m tools.bench_crt_put [--files 600] [--size 110K]`` starts a SeaweedFS, writes the
files to a local directory, and uploads them twice, reporting rate and client CPU per PUT
(process CPU time, all threads, the CRT's native ones included):

- boto3 ``put_object`` with 8 threads, the body read from the file (what tierfs does);
- awscrt ``S3Client.make_request`` PUT with ``send_filepath`` (the CRT reads the file
  natively), 16 requests in flight, SigV4 with ``UNSIGNED-PAYLOAD``.

On a 2-core machine the server shares the CPU, so the CPU per PUT is the figure to compare.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import os
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from awscrt import auth, io, s3
from awscrt.http import HttpHeaders, HttpRequest

from tierfs.units import parse_size
from tools.bench_workloads import bench_client
from tools.servers import ACCESS_KEY, REGION, SECRET_KEY, SeaweedFS


def measure(name: str, count: int, run: Callable[[], None]) -> tuple[float, float]:
    cpu, wall = time.process_time(), time.perf_counter()
    run()
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    print(f"{name}: {count / wall:,.0f} PUTs/s, {cpu / count * 1000:.2f} ms CPU per PUT")
    return count / wall, cpu / count


def boto3_puts(endpoint: str, bucket: str, files: list[Path]) -> None:
    client = bench_client(endpoint)

    def put(path: Path) -> None:
        client.put_object(Bucket=bucket, Key=f"boto3/{path.name}", Body=path.read_bytes())

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        list(pool.map(put, files))


def crt_puts(endpoint: str, bucket: str, files: list[Path], in_flight: int = 16) -> None:
    host = endpoint.split("://", 1)[1]
    provider = auth.AwsCredentialsProvider.new_static(ACCESS_KEY, SECRET_KEY)
    signing = s3.create_default_s3_signing_config(region=REGION, credential_provider=provider).replace(
        signed_body_value=auth.AwsSignedBodyValue.UNSIGNED_PAYLOAD
    )
    bootstrap = io.ClientBootstrap(io.EventLoopGroup(2), io.DefaultHostResolver(io.EventLoopGroup(1)))
    client = s3.S3Client(
        bootstrap=bootstrap, region=REGION, tls_mode=s3.S3RequestTlsMode.DISABLED, signing_config=signing
    )
    slots = threading.Semaphore(in_flight)
    futures = []
    for path in files:
        slots.acquire()
        headers = HttpHeaders([("host", host), ("content-length", str(path.stat().st_size))])
        request = client.make_request(
            type=s3.S3RequestType.PUT_OBJECT,
            request=HttpRequest("PUT", f"/{bucket}/crt/{path.name}", headers),
            send_filepath=str(path),
        )
        request.finished_future.add_done_callback(lambda _: slots.release())
        futures.append(request.finished_future)
    for future in futures:
        future.result(60)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tools.bench_crt_put", description=__doc__.splitlines()[0])
    p.add_argument("--files", type=int, default=600)
    p.add_argument("--size", type=parse_size, default=110 * 1024)
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="tierfs-crt-put-", dir="/var/tmp") as work:
        root = Path(work)
        files = []
        for i in range(args.files):
            path = root / f"f{i:05d}"
            path.write_bytes(os.urandom(args.size))
            files.append(path)
        with SeaweedFS(root / "seaweed") as server:
            bench_client(server.endpoint_url).create_bucket(Bucket="crt-put")
            print(f"{args.files} x {args.size} B, load average {os.getloadavg()[0]:.2f}")
            url = server.endpoint_url
            measure("boto3 put_object, 8 threads", args.files, lambda: boto3_puts(url, "crt-put", files))
            measure("awscrt send_filepath, 16 in flight", args.files, lambda: crt_puts(url, "crt-put", files))
            stored = bench_client(url).list_objects_v2(Bucket="crt-put", Prefix="crt/")["KeyCount"]
            if stored != min(args.files, 1000):
                raise SystemExit(f"the CRT stored {stored} of {args.files} objects: its figures do not count")
    return 0


if __name__ == "__main__":
    sys.exit(main())
