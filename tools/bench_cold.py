"""Cold small files and ``tierfs prefetch`` against the client's own ceiling, in one run.

Issue 16 holds tierfs's cold small-file reads and its prefetch of a directory to the rate
of awscrt's ``make_request`` with 16 requests in flight: the cheapest way this machine has
to pull small objects, so what tierfs costs beyond it is its own. A user who does not
prefetch copies the directory instead, with ``aws s3 cp --recursive``; that row is here too,
as is raw boto3 with 8 threads.

Every row reads the same objects, cold (fresh cache directory, page cache dropped):

* ``crt16``: raw awscrt GETs, 16 in flight from one thread, bodies counted and dropped;
* ``boto3``: ``get_object`` with 8 threads;
* ``aws cp``: ``aws s3 cp --recursive`` of the directory to local disk (if awscli is installed);
* ``tierfs read``: 8 threads read every file whole through a fresh mount;
* ``tierfs prefetch``: ``tierfs prefetch --recursive --jobs J`` of the directory on a fresh
  mount (the bytes land in the chunk cache; nothing is read through FUSE).

Run: ``make bench-cold`` or ``python -m tools.bench_cold [--files N] [--size S]``. Nothing
asserts on the numbers; the verdict column only compares them with the targets.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from tierfs.units import parse_size
from tools.bench import TierfsSystem
from tools.bench_workloads import (
    Dataset,
    Measure,
    bench_client,
    boto3_small,
    drop_caches,
    log,
    rate,
    read_small,
    seed,
)
from tools.crt_baseline import crt_small
from tools.servers import ACCESS_KEY, REGION, SECRET_KEY, SeaweedFS, child_env

REPO_ROOT = Path(__file__).resolve().parent.parent
BUCKET = "tierfs-bench-cold"
TARGET = 0.7  # tierfs rows >= 0.7 x crt16 (issue 16)


def aws_cp(endpoint_url: str, bucket: str, prefix: str, dest: Path, files: int) -> Measure | None:
    """``aws s3 cp --recursive`` of ``prefix`` to ``dest``; None when awscli is not installed."""
    aws = shutil.which("aws")
    if aws is None:
        return None
    env = child_env()
    env.update(AWS_ACCESS_KEY_ID=ACCESS_KEY, AWS_SECRET_ACCESS_KEY=SECRET_KEY, AWS_DEFAULT_REGION=REGION)
    command = [aws, "--endpoint-url", endpoint_url, "s3", "cp", "--recursive", "--only-show-errors"]
    start = time.perf_counter()
    subprocess.run([*command, f"s3://{bucket}/{prefix}", str(dest)], check=True, env=env)
    seconds = time.perf_counter() - start
    nbytes = sum(p.stat().st_size for p in dest.rglob("*") if p.is_file())
    return rate(files, nbytes, seconds, "files/s", False)


def tierfs_prefetch(mount: TierfsSystem, path: Path, files: int, jobs: int) -> Measure:
    """``tierfs prefetch --recursive`` of ``path``, timed from the command's start to its exit."""
    command = [sys.executable, "-m", "tierfs", "prefetch", "--recursive", "--jobs", str(jobs), str(path)]
    start = time.perf_counter()
    subprocess.run(command, check=True, env=child_env(), cwd=REPO_ROOT, stdout=subprocess.DEVNULL)
    seconds = time.perf_counter() - start
    done = mount.status()
    return rate(files, int(done.get("bytes_from_s3", 0)), seconds, "files/s", False)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tools.bench_cold", description=__doc__.splitlines()[0])
    p.add_argument("--files", type=int, default=2000, help="number of small files (default 2000)")
    p.add_argument("--size", type=parse_size, default=110 * 1024, help="size of each (default 110K)")
    p.add_argument("--threads", type=int, default=8, help="reader threads and boto3 threads (default 8)")
    p.add_argument("--jobs", type=int, default=16, help="tierfs prefetch --jobs (default 16)")
    p.add_argument(
        "--tierfs-arg", action="append", default=[], metavar="ARG", help="extra `tierfs mount` argument"
    )
    p.add_argument(
        "--json-out", type=Path, help="JSON output (default bench-out/bench-cold-<timestamp>.json)"
    )
    args = p.parse_args(argv)
    dataset = Dataset(args.files, args.size, 0, 0)
    keys = dataset.small_keys()
    results: dict[str, Measure] = {}
    workdir = Path(tempfile.mkdtemp(prefix="tierfs-bench-cold-", dir="/var/tmp"))
    try:
        with SeaweedFS(workdir / "seaweed") as server:
            client = bench_client(server.endpoint_url)
            client.create_bucket(Bucket=BUCKET)
            log(f"seeding {args.files} files")
            seed(client, BUCKET, dataset)

            def measure(name: str, fn: Callable[[], Measure | None]) -> None:
                drop_caches()
                result = fn()
                if result is not None:
                    results[name] = result
                    log(f"{name:16} {result.value:10.1f} {result.unit} ({result.seconds:.2f} s)")

            measure("crt16", lambda: crt_small(server.endpoint_url, BUCKET, keys))
            measure("boto3", lambda: boto3_small(client, BUCKET, keys, args.threads))
            measure(
                "aws cp", lambda: aws_cp(server.endpoint_url, BUCKET, "small/", workdir / "cp", len(keys))
            )
            mount = TierfsSystem(workdir, server.endpoint_url, BUCKET, args.tierfs_arg)
            for name, run in (
                ("tierfs read", lambda m: read_small(m, keys, args.threads, True)),
                ("tierfs prefetch", lambda m: tierfs_prefetch(mount, m / "small", len(keys), args.jobs)),
            ):
                with mount.mounted(fresh=True) as mounted:
                    measure(name, lambda run=run, path=mounted.path: run(path))  # type: ignore[misc]
            mount.cleanup()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    print(render(results))
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out = args.json_out or REPO_ROOT / "bench-out" / f"bench-cold-{stamp}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    report = {
        "dataset": {"files": args.files, "size": args.size},
        "cpus": os.cpu_count(),
        "loadavg": os.getloadavg(),
        "results": {k: vars(v) for k, v in results.items()},
    }
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nJSON written to {out}")
    return 0


def render(results: dict[str, Measure]) -> str:
    """One line per row: files/s, MiB/s, and the ratio to crt16 (with the target where one applies)."""
    base = results.get("crt16")
    lines = [f"{'row':16} {'files/s':>9} {'MiB/s':>8} {'x crt16':>8}  target", "-" * 56]
    for name, m in results.items():
        ratio = m.value / base.value if base is not None and base.value > 0 else None
        verdict = ""
        if name.startswith("tierfs") and ratio is not None:
            verdict = f">= {TARGET}x  {'PASS' if ratio >= TARGET else 'MISS'}"
        mib = m.nbytes / m.seconds / (1 << 20) if m.seconds > 0 else 0.0
        shown = "-" if ratio is None else f"{ratio:.2f}"
        lines.append(f"{name:16} {m.value:9,.0f} {mib:8,.1f} {shown:>8}  {verdict}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
