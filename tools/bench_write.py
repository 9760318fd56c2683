"""Write rows of the benchmark: data written through tierfs until it is durable in the bucket.

``python -m tools.bench_write`` (``make bench-write``). Each row is timed
against its raw baseline in the same run, against the same server:

- **checkpoint**: one file written with 1 MiB writes, then ``tierfs flush`` (durable), against
  boto3's multipart upload of the same bytes (16 MiB parts, 8 threads);
- **small files**: N files of 110 KiB written by 8 threads, then ``tierfs flush``, against
  ``put_object`` with 8 threads;
- **close to durable**: the time from ``close`` of a sequentially written file until
  ``tierfs flush`` returns, against uploading that file after close (boto3 as above), which
  is what a write-back without streaming must at least spend.

Numbers are only as steady as the machine: on 2 shared cores the client, the daemon and the
server compete, so compare ratios from one run, never absolute figures across runs.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import boto3.s3.transfer

from tierfs.units import format_bytes, parse_size
from tools.bench import TierfsSystem, s3_endpoint
from tools.bench_workloads import bench_client, log, run_quiet
from tools.servers import child_env

MiB = 1 << 20
WRITE_SIZE = MiB
THREADS = 8
PART_SIZE = 16 * MiB

#: (row, baseline, target ratio, higher is better)
TARGETS = (
    ("checkpoint", "boto3 multipart", 0.9, True),
    ("small files", "boto3 put_object", 0.8, True),
    ("close to durable", "upload after close", 0.2, False),
)


@dataclass
class Row:
    name: str
    tierfs: float  # seconds
    raw: float  # seconds
    baseline: str
    unit_count: float  # bytes or files moved, for the rate columns
    unit: str
    notes: dict[str, Any] = field(default_factory=dict)


class WritableTierfs(TierfsSystem):
    """The benchmark's tierfs mount without ``--read-only``: the write rows need a writable one."""

    def command(self) -> list[str]:
        return [arg for arg in super().command() if arg != "--read-only"]

    def flush(self) -> None:
        result = run_quiet([sys.executable, "-m", "tierfs", "flush", str(self.mountpoint)], env=child_env())
        if result.returncode != 0:
            raise RuntimeError(f"tierfs flush failed: {result.stderr}")


def _write_file(path: Path, size: int, block: bytes) -> None:
    with path.open("wb", buffering=0) as fh:
        left = size
        while left > 0:
            left -= fh.write(block[: min(left, len(block))])


def _parallel(fn: Callable[[int], object], count: int) -> None:
    with concurrent.futures.ThreadPoolExecutor(THREADS) as pool:
        for _ in pool.map(fn, range(count)):
            pass


def _timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def raw_multipart(client: Any, bucket: str, key: str, local: Path) -> float:
    config = boto3.s3.transfer.TransferConfig(
        multipart_threshold=PART_SIZE, multipart_chunksize=PART_SIZE, max_concurrency=THREADS
    )
    return _timed(lambda: client.upload_file(str(local), bucket, key, Config=config))


def checkpoint_rows(mount: WritableTierfs, client: Any, bucket: str, work: Path, size: int) -> list[Row]:
    block = os.urandom(WRITE_SIZE)
    local = work / "checkpoint.local"
    _write_file(local, size, block)
    raw = raw_multipart(client, bucket, "raw/checkpoint.bin", local)
    target = mount.mountpoint / "checkpoint.bin"

    write_start = time.perf_counter()
    _write_file(target, size, block)
    closed = time.perf_counter()
    mount.flush()
    durable = time.perf_counter()
    local.unlink()
    stored = client.head_object(Bucket=bucket, Key="checkpoint.bin")["ContentLength"]
    if stored != size:
        raise RuntimeError(f"the bucket holds {stored} bytes of the checkpoint, not {size}")
    return [
        Row("checkpoint", durable - write_start, raw, "boto3 multipart", size, "B",
            {"write_s": round(closed - write_start, 3)}),
        Row("close to durable", durable - closed, raw, "upload after close", size, "B"),
    ]  # fmt: skip


def small_files_row(mount: WritableTierfs, client: Any, bucket: str, count: int, size: int) -> Row:
    bodies = [os.urandom(size) for _ in range(16)]

    def raw_put(i: int) -> None:
        client.put_object(Bucket=bucket, Key=f"raw/small/{i:06d}", Body=bodies[i % 16])

    raw = _timed(lambda: _parallel(raw_put, count))
    root = mount.mountpoint / "small"
    root.mkdir()

    def write(i: int) -> None:
        with (root / f"{i:06d}").open("wb", buffering=0) as fh:
            fh.write(bodies[i % 16])

    start = time.perf_counter()
    _parallel(write, count)
    written = time.perf_counter()
    mount.flush()
    durable = time.perf_counter()
    stored = client.list_objects_v2(Bucket=bucket, Prefix="small/", MaxKeys=1000)["KeyCount"]
    if stored != min(count, 1000):
        raise RuntimeError(f"the bucket holds {stored} of the {count} small files after the flush")
    return Row("small files", durable - start, raw, "boto3 put_object", count, "files",
               {"write_s": round(written - start, 3)})  # fmt: skip


def _rate(row: Row, seconds: float) -> str:
    if row.unit == "files":
        return f"{row.unit_count / seconds:,.0f} files/s"
    return f"{row.unit_count / seconds / 1e6:,.0f} MB/s"


def render(rows: Sequence[Row]) -> str:
    targets = {name: (ratio, higher) for name, _, ratio, higher in TARGETS}
    lines = [
        "| row | tierfs | raw baseline | tierfs / raw | target |",
        "|---|---|---|---|---|",
    ]
    for row in rows:
        ratio_of_times = row.tierfs / row.raw if row.raw else float("nan")
        want, higher = targets[row.name]
        if higher:  # a rate: raw time / tierfs time
            shown = 1 / ratio_of_times
            verdict = "PASS" if shown >= want else "MISS"
            lines.append(
                f"| {row.name} | {_rate(row, row.tierfs)} | {_rate(row, row.raw)} ({row.baseline}) "
                f"| {shown:.2f} | >= {want} {verdict} |"
            )
        else:
            verdict = "PASS" if ratio_of_times <= want else "MISS"
            lines.append(
                f"| {row.name} | {row.tierfs:.2f} s | {row.raw:.2f} s ({row.baseline}) "
                f"| {ratio_of_times:.2f} | <= {want} {verdict} |"
            )
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m tools.bench_write", description=__doc__.splitlines()[0])
    p.add_argument("--endpoint-url", help="use this S3 endpoint instead of starting SeaweedFS")
    p.add_argument("--bucket", default="tierfs-bench-write", help="bucket to write into (made if missing)")
    p.add_argument("--checkpoint-size", type=parse_size, default=1 << 30, help="default 1G")
    p.add_argument("--small-files", type=int, default=1000, help="default 1000")
    p.add_argument("--small-size", type=parse_size, default=110 * 1024, help="default 110K")
    p.add_argument("--quick", action="store_true", help="smoke-test size: 256 MiB checkpoint, 300 files")
    p.add_argument("--tierfs-arg", action="append", default=[], help="extra mount argument (repeatable)")
    p.add_argument("--workdir", type=Path, help="where caches and mounts go (default: a temp dir)")
    p.add_argument("--json-out", type=Path, help="also write the rows as JSON here")
    args = p.parse_args(argv)
    if args.quick:
        args.checkpoint_size, args.small_files = 256 * MiB, 300
    return args


@contextlib.contextmanager
def _workdir(given: Path | None) -> Iterator[Path]:
    work = given or Path(tempfile.mkdtemp(prefix="tierfs-bench-write-", dir="/var/tmp"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        yield work
    finally:
        if given is None:
            shutil.rmtree(work, ignore_errors=True)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    rows: list[Row] = []
    with _workdir(args.workdir) as work, s3_endpoint(args, work) as endpoint:
        client = bench_client(endpoint)
        existing = client.exceptions.BucketAlreadyOwnedByYou, client.exceptions.BucketAlreadyExists
        with contextlib.suppress(*existing):
            client.create_bucket(Bucket=args.bucket)
        mount = WritableTierfs(work, endpoint, args.bucket, args.tierfs_arg)
        try:
            with mount.mounted(fresh=True):
                log(f"checkpoint: {format_bytes(args.checkpoint_size)}")
                rows += checkpoint_rows(mount, client, args.bucket, work, args.checkpoint_size)
                log(f"small files: {args.small_files} x {format_bytes(args.small_size)}")
                rows.append(small_files_row(mount, client, args.bucket, args.small_files, args.small_size))
        finally:
            mount.cleanup()
    print(f"load average at end: {os.getloadavg()[0]:.2f} (2 shared cores: numbers are noisy)")
    print(render(rows))
    if args.json_out is not None:
        args.json_out.write_text(json.dumps([asdict(r) for r in rows], indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
