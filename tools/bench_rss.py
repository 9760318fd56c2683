"""Peak RSS of the tierfs daemon as a large namespace (default 200,000 objects) is listed and stat-ed.

The question this answers is "how much memory does a mount need per object it has
seen?". A bucket of tiny objects is seeded (1,000 per directory), tierfs is mounted with
an empty cache, and the tree is walked and stat-ed directory by directory; the daemon's
VmHWM (peak resident set) is read at 0 objects and at 1/4, 1/2 and all of them, which
gives the growth per object.

Seeding speed matters more than anything else here: boto3 costs ~4 ms of client CPU per
request on this class of machine, so 200k PUTs through it would take many minutes. The
seeder speaks plain HTTP/1.1 with keep-alive from many threads and sends unsigned PUTs,
which SeaweedFS (and moto) accept while no IAM is configured; if the endpoint demands
signatures it falls back to boto3.

``python -m tools.bench_rss [--objects N] [--server seaweedfs|moto] [--endpoint-url URL]``
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import http.client
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from tools.bench import TierfsSystem, counter_delta
from tools.bench_workloads import bench_client, log, process_status_kib
from tools.servers import SeaweedFS, free_port, terminate_process_group

PER_DIR = 1000
MANIFEST_PREFIX = "rss-manifest-"


def object_keys(count: int) -> list[str]:
    """``dNNNN/fNNNNNNN``: ``PER_DIR`` objects per directory, in walk order."""
    return [f"d{i // PER_DIR:04d}/f{i:07d}" for i in range(count)]


class Seeder:
    """Many threads, one keep-alive HTTP connection each, unsigned zero-byte PUTs."""

    def __init__(self, endpoint_url: str, bucket: str, threads: int, body: bytes = b"") -> None:
        """``body``: every object's bytes (tools/bench_snapshot.py seeds non-empty objects)."""
        self.body = body
        url = urllib.parse.urlsplit(endpoint_url)
        self.host, self.port = url.hostname or "127.0.0.1", url.port or 80
        self.bucket = bucket
        self.threads = threads
        self._local = threading.local()

    def _connection(self) -> http.client.HTTPConnection:
        conn: http.client.HTTPConnection | None = getattr(self._local, "conn", None)
        if conn is None:
            conn = http.client.HTTPConnection(self.host, self.port, timeout=60)
            self._local.conn = conn
        return conn

    def put(self, key: str) -> int:
        """PUT one object; returns the HTTP status (reconnecting if the server closed the socket)."""
        path = f"/{self.bucket}/{urllib.parse.quote(key)}"
        for attempt in range(3):
            conn = self._connection()
            try:
                conn.request("PUT", path, body=self.body, headers={"Content-Length": str(len(self.body))})
                response = conn.getresponse()
                response.read()
                if response.status < 500 or attempt == 2:
                    return response.status
            except (http.client.HTTPException, OSError):
                conn.close()
                self._local.conn = None
                if attempt == 2:
                    raise
            time.sleep(0.1 * (attempt + 1))
        raise AssertionError("unreachable")

    def unsigned_allowed(self, key: str) -> bool:
        return self.put(key) == 200

    def seed(self, keys: Sequence[str]) -> None:
        def batch(chunk: Sequence[str]) -> None:
            for key in chunk:
                status = self.put(key)
                if status != 200:
                    raise RuntimeError(f"PUT {key}: HTTP {status}")

        size = max(1, len(keys) // (self.threads * 8))
        chunks = [keys[i : i + size] for i in range(0, len(keys), size)]
        with concurrent.futures.ThreadPoolExecutor(self.threads) as pool:
            for future in [pool.submit(batch, c) for c in chunks]:
                future.result()


def seed_boto3(endpoint_url: str, bucket: str, keys: Sequence[str], threads: int) -> None:
    """The slow path, for endpoints that insist on signed requests."""
    client = bench_client(endpoint_url, pool=threads)
    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
        list(pool.map(lambda k: client.put_object(Bucket=bucket, Key=k, Body=b""), keys))


def prepare(endpoint_url: str, bucket: str, count: int, threads: int) -> float | None:
    """Create and seed the bucket unless its manifest says it already holds ``count`` objects.

    Returns the seeding time in seconds, or None when the existing bucket was reused.
    """
    client = bench_client(endpoint_url)
    manifest = f"{MANIFEST_PREFIX}{count}"
    names = {b["Name"] for b in client.list_buckets().get("Buckets", [])}
    if bucket in names:
        found = client.list_objects_v2(Bucket=bucket, Prefix=MANIFEST_PREFIX).get("Contents", [])
        if [o["Key"] for o in found] == [manifest]:
            log(f"bucket {bucket} already holds {count} objects: not re-seeding")
            return None
        if client.list_objects_v2(Bucket=bucket, MaxKeys=1).get("KeyCount", 0):
            raise SystemExit(f"bucket {bucket} holds other data; choose another --bucket")
    else:
        client.create_bucket(Bucket=bucket)
    keys = object_keys(count)
    seeder = Seeder(endpoint_url, bucket, threads)
    start = time.perf_counter()
    if seeder.unsigned_allowed(keys[0]):
        seeder.seed(keys[1:])
    else:
        log("endpoint rejects unsigned PUTs: seeding through boto3 (slow)")
        seed_boto3(endpoint_url, bucket, keys, threads)
    elapsed = time.perf_counter() - start
    client.put_object(Bucket=bucket, Key=manifest, Body=b"")
    return elapsed


class MotoProcess:
    """moto's S3 server in its own process (``moto_server``), so its Python work does not share our GIL."""

    def __init__(self) -> None:
        self.port = free_port()
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> MotoProcess:
        cmd = [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)]
        self._proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        deadline = time.monotonic() + 30
        while True:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port), timeout=1):
                return self
            if self._proc.poll() is not None or time.monotonic() > deadline:
                self.__exit__()
                raise RuntimeError("moto_server did not start")
            time.sleep(0.1)

    def __exit__(self, *exc: object) -> None:
        if self._proc is not None:
            terminate_process_group(self._proc)
            self._proc = None


@contextlib.contextmanager
def endpoint(args: argparse.Namespace, workdir: Path) -> Iterator[str]:
    if args.endpoint_url:
        yield args.endpoint_url
    elif args.server == "moto":
        with MotoProcess() as moto:
            yield moto.endpoint_url
    else:
        with SeaweedFS(workdir / "seaweed") as server:
            yield server.endpoint_url


def checkpoints(count: int) -> list[int]:
    """0, 1/4, 1/2 and all of the objects, rounded to whole directories (0 / 50k / 100k / 200k by default)."""
    marks = {0, count}
    for fraction in (0.25, 0.5):
        marks.add(min(count, round(count * fraction / PER_DIR) * PER_DIR))
    return sorted(marks)


def stat_dir(path: Path) -> int:
    """List one directory and stat every entry in it, as ``ls -l`` or a dataset indexer would."""
    count = 0
    with os.scandir(path) as entries:
        for entry in entries:
            os.stat(entry.path)
            count += 1
    return count


def walk_and_measure(mount: TierfsSystem, pid: int, count: int, threads: int) -> list[dict[str, Any]]:
    """Stat the tree directory by directory, reading the daemon's memory at every checkpoint."""
    root = mount.mountpoint
    dirs = sorted(os.listdir(root))
    dirs = [d for d in dirs if (root / d).is_dir()]
    points: list[dict[str, Any]] = []
    seen, done_dirs = 0, 0
    started = time.perf_counter()

    def sample(objects: int) -> None:
        point = {
            "objects": objects,
            "vm_hwm_mib": round(process_status_kib(pid, "VmHWM") / 1024, 1),
            "vm_rss_mib": round(process_status_kib(pid, "VmRSS") / 1024, 1),
            # Anonymous = Python heap; file = mapped files, mostly LMDB pages the kernel may reclaim.
            "rss_anon_mib": round(process_status_kib(pid, "RssAnon") / 1024, 1),
            "rss_file_mib": round(process_status_kib(pid, "RssFile") / 1024, 1),
            "elapsed_seconds": round(time.perf_counter() - started, 2),
        }
        points.append(point)
        log(f"{objects:>8} objects: peak RSS {point['vm_hwm_mib']} MiB, anon {point['rss_anon_mib']} MiB")

    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
        for mark in checkpoints(count):
            needed = -(-(mark - seen) // PER_DIR) if mark > seen else 0
            batch = dirs[done_dirs : done_dirs + needed]
            seen += sum(pool.map(lambda d: stat_dir(root / d), batch))
            done_dirs += len(batch)
            sample(seen)
    return points


def growth(points: Sequence[dict[str, Any]]) -> float | None:
    """Bytes of peak RSS per object, from the first to the last checkpoint."""
    first, last = points[0], points[-1]
    if last["objects"] <= first["objects"]:
        return None
    grown_mib = float(last["vm_hwm_mib"]) - float(first["vm_hwm_mib"])
    return grown_mib * 1024 * 1024 / (int(last["objects"]) - int(first["objects"]))


def render(result: dict[str, Any]) -> str:
    lines = [
        f"{'objects':>9}  {'peak RSS (VmHWM)':>17}  {'RSS':>9}  {'anon':>9}  {'file':>9}  {'walk time':>9}"
    ]
    for p in result["points"]:
        lines.append(
            f"{p['objects']:>9,}  {p['vm_hwm_mib']:>13.1f} MiB  {p['vm_rss_mib']:>5.1f} MiB"
            f"  {p['rss_anon_mib']:>5.1f} MiB  {p['rss_file_mib']:>5.1f} MiB  {p['elapsed_seconds']:>7.1f} s"
        )
    per_object = result["bytes_per_object"]
    lines.append(
        f"growth: {'-' if per_object is None else f'{per_object:,.0f}'} bytes of peak RSS per object"
    )
    if result["seed_seconds"] is not None:
        lines.append(
            f"seeded {result['objects']:,} objects in {result['seed_seconds']:.1f} s ({result['server']})"
        )
    lines.append(f"metadata on disk after the walk: {result['cache_dir_mib']:.1f} MiB")
    return "\n".join(lines)


def du_mib(path: Path) -> float:
    total = 0
    for dirpath, _, files in os.walk(path):
        for name in files:
            with contextlib.suppress(FileNotFoundError):
                total += os.stat(os.path.join(dirpath, name)).st_blocks * 512
    return total / (1024 * 1024)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m tools.bench_rss", description=__doc__.splitlines()[0])
    p.add_argument("--objects", type=int, default=200_000, help="objects in the namespace (default 200000)")
    p.add_argument("--server", choices=("seaweedfs", "moto"), default="seaweedfs", help="server to start")
    p.add_argument("--endpoint-url", help="use this S3 endpoint instead of starting a server")
    p.add_argument("--bucket", help="bucket to seed / reuse (default tierfs-rss-<objects>)")
    p.add_argument("--seed-threads", type=int, default=32, help="seeding threads (default 32)")
    p.add_argument("--threads", type=int, default=8, help="threads walking the mount (default 8)")
    p.add_argument(
        "--tierfs-arg", action="append", default=[], metavar="ARG", help="extra `tierfs mount` argument"
    )
    p.add_argument("--workdir", type=Path, help="work directory (default: a temp dir, deleted afterwards)")
    p.add_argument("--json-out", type=Path, help="JSON output (default bench-out/rss-<timestamp>.json)")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    bucket = args.bucket or f"tierfs-rss-{args.objects}"
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="tierfs-rss-", dir="/var/tmp"))
    workdir.mkdir(parents=True, exist_ok=True)
    server = "given endpoint" if args.endpoint_url else args.server
    mount: TierfsSystem | None = None
    try:
        with endpoint(args, workdir) as url:
            log(f"seeding {args.objects:,} empty objects into {bucket} ({server})")
            seed_seconds = prepare(url, bucket, args.objects, args.seed_threads)
            if seed_seconds is not None:
                log(f"seeded in {seed_seconds:.1f} s ({args.objects / seed_seconds:,.0f} PUTs/s)")
            mount = TierfsSystem(workdir, url, bucket, args.tierfs_arg)
            with mount.mounted(fresh=True) as m:
                before = mount.status()
                points = walk_and_measure(mount, m.pid, args.objects, args.threads)
                status = counter_delta(before, mount.status())
                cache_mib = du_mib(mount.cache_dir)
    finally:
        if mount is not None:
            mount.cleanup()
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    result = {
        "objects": args.objects,
        "server": server,
        "seed_seconds": None if seed_seconds is None else round(seed_seconds, 2),
        "points": points,
        "bytes_per_object": growth(points),
        "cache_dir_mib": round(cache_mib, 1),
        "tierfs_status": status,
        "loadavg": os.getloadavg(),
    }
    print(render(result))
    out = (
        args.json_out
        or Path(__file__).resolve().parent.parent / "bench-out" / f"rss-{time.strftime('%Y%m%d-%H%M%S')}.json"
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nJSON written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
