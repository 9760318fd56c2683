"""Two-node benchmark of the shared cache tier (docs/shared-cache.md): node A cold, node B cold, B warm.

The origin is one SeaweedFS behind a shaping proxy (``tools.faultproxy``: per-request latency and a
bandwidth cap, like a bucket in a remote region); the shared tier is a second SeaweedFS with no
shaping, as a cluster next to the GPU nodes would be. Two tierfs mounts with separate cache dirs
are the two nodes. One epoch reads every file of the dataset once, in a shuffled order, with
several reader threads (an ML loader's pattern):

1. node A, cold: everything comes from the origin, and A fills the shared tier;
2. node B, cold (an empty cache dir): everything should come from the shared tier;
3. node B, warm: B remounted on its cache dir, from its local disk.

Targets (issue 14): B's cold epoch at least 3x faster than A's, and the origin bytes of B's
epoch (counted at the proxy) at most 1% of the dataset.

    .venv/bin/python -m tools.bench_shared                     # a short run (~64 MiB)
    .venv/bin/python -m tools.bench_shared --large-files 64 --small-files 2000
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import random
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from tierfs.units import format_bytes, parse_size
from tools.bench import TierfsSystem
from tools.bench_workloads import wait_for
from tools.faultproxy import FaultProxy
from tools.servers import SeaweedFS, s3_client

SPEEDUP_TARGET = 3.0
ORIGIN_SHARE_TARGET = 0.01


class Node(TierfsSystem):
    """One node: a tierfs mount with its own mountpoint and cache dir, using the shared tier."""

    def __init__(
        self, name: str, workdir: Path, endpoint_url: str, bucket: str, extra: Sequence[str]
    ) -> None:
        self.name = name  # before the base class names the mountpoint and cache dir after it
        super().__init__(workdir, endpoint_url, bucket, extra)


@dataclass
class Row:
    phase: str
    seconds: float
    mb_per_s: float
    files_per_s: float
    origin_bytes: int
    origin_gets: int
    shared_hits: int


def seed(endpoint: str, bucket: str, large: int, large_size: int, small: int, small_size: int) -> list[str]:
    client = s3_client(endpoint, read_timeout=60.0)
    keys: list[str] = []
    rng = random.Random(14)
    for n in range(large):
        keys.append(f"large/{n:04d}.bin")
        client.put_object(Bucket=bucket, Key=keys[-1], Body=rng.randbytes(large_size))
    for n in range(small):
        keys.append(f"small/{n // 100:02d}/{n:05d}.jpg")
        client.put_object(Bucket=bucket, Key=keys[-1], Body=rng.randbytes(small_size))
    return keys


def epoch(root: Path, keys: Sequence[str], threads: int, seed: int) -> tuple[float, int]:
    """Read every file once in a shuffled order; (seconds, bytes)."""
    order = list(keys)
    random.Random(seed).shuffle(order)

    def read(key: str) -> int:
        with open(root / key, "rb") as f:
            return len(f.read())

    started = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
        total = sum(pool.map(read, order))
    return time.perf_counter() - started, total


def run_phase(node: Node, phase: str, fresh: bool, keys: Sequence[str], proxy: FaultProxy,
              threads: int, drain: bool) -> Row:  # fmt: skip
    with node.mounted(fresh=fresh) as mounted:
        bytes_before, gets_before = proxy.body_bytes, proxy.by_method["GET"]
        seconds, total = epoch(mounted.path, keys, threads, seed=len(phase))
        origin_bytes, gets = proxy.body_bytes - bytes_before, proxy.by_method["GET"] - gets_before
        status = node.status()
        if drain:  # A's fills must be in the tier before B starts
            wait_for(lambda: node.status().get("shared_queue_bytes") == 0, 120, f"{phase}: fills drained")
    return Row(
        phase=phase,
        seconds=round(seconds, 3),
        mb_per_s=round(total / seconds / 1e6, 1),
        files_per_s=round(len(keys) / seconds, 1),
        origin_bytes=origin_bytes,
        origin_gets=gets,
        shared_hits=int(status.get("shared_hits", 0)),
    )


def render(rows: Sequence[Row], dataset: int, files: int) -> str:
    lines = [
        f"dataset: {files} files, {format_bytes(dataset)}",
        "",
        "| epoch | seconds | MB/s | files/s | origin GET requests (listings included) | origin bytes "
        "| shared hits |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        share = r.origin_bytes / dataset if dataset else 0.0
        lines.append(
            f"| {r.phase} | {r.seconds:.2f} | {r.mb_per_s} | {r.files_per_s} | {r.origin_gets} | "
            f"{format_bytes(r.origin_bytes)} ({share:.1%}) | {r.shared_hits} |"
        )
    a, b = rows[0], rows[1]
    speedup = a.seconds / b.seconds if b.seconds else float("inf")
    share = b.origin_bytes / dataset if dataset else 0.0
    lines += [
        "",
        f"node B cold vs node A cold: {speedup:.1f}x faster (target >= {SPEEDUP_TARGET:g}x: "
        f"{'met' if speedup >= SPEEDUP_TARGET else 'NOT met'})",
        f"origin bytes of B's cold epoch: {share:.2%} of the dataset (target <= {ORIGIN_SHARE_TARGET:.0%}: "
        f"{'met' if share <= ORIGIN_SHARE_TARGET else 'NOT met'})",
    ]
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m tools.bench_shared", description=__doc__.split("\n")[0])
    p.add_argument("--large-files", type=int, default=8, help="files of --large-size (default 8)")
    p.add_argument("--large-size", type=parse_size, default=parse_size("4M"))
    p.add_argument("--small-files", type=int, default=300, help="files of --small-size (default 300)")
    p.add_argument("--small-size", type=parse_size, default=parse_size("110K"))
    p.add_argument("--latency", type=float, default=0.03, help="seconds per origin request (default 0.03)")
    p.add_argument("--bandwidth", type=float, default=100e6, help="origin bytes/s (default 100e6)")
    p.add_argument("--threads", type=int, default=8, help="reader threads per epoch (default 8)")
    p.add_argument("--workdir", type=Path, help="where servers, mounts and caches live (default: a temp dir)")
    p.add_argument("--json", type=Path, help="also write the rows here")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="tierfs-bench-shared-"))
    workdir.mkdir(parents=True, exist_ok=True)
    with SeaweedFS(workdir / "origin") as origin, SeaweedFS(workdir / "tier") as tier:
        origin.create_bucket("bench-origin")
        tier.create_bucket("bench-tier")
        keys = seed(origin.endpoint_url, "bench-origin", args.large_files, args.large_size,
                    args.small_files, args.small_size)  # fmt: skip
        dataset = args.large_files * args.large_size + args.small_files * args.small_size
        with FaultProxy(origin.endpoint_url, latency=args.latency, bandwidth=args.bandwidth) as proxy:
            shared = ["--shared-cache", "s3://bench-tier/ds",
                      "--shared-cache-endpoint-url", tier.endpoint_url]  # fmt: skip
            a = Node("node-a", workdir, proxy.endpoint_url, "bench-origin", shared)
            b = Node("node-b", workdir, proxy.endpoint_url, "bench-origin", shared)
            try:
                rows = [
                    run_phase(a, "node A, cold", True, keys, proxy, args.threads, drain=True),
                    run_phase(b, "node B, cold (shared tier)", True, keys, proxy, args.threads, drain=False),
                    run_phase(b, "node B, warm (local disk)", False, keys, proxy, args.threads, drain=False),
                ]
            finally:
                a.cleanup()
                b.cleanup()
    print(render(rows, dataset, len(keys)))
    if args.json:
        payload: dict[str, Any] = {
            "dataset_bytes": dataset, "files": len(keys), "rows": [asdict(r) for r in rows],
            "latency": args.latency, "bandwidth": args.bandwidth,
        }  # fmt: skip
        args.json.write_text(json.dumps(payload, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
