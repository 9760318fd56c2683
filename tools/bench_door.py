"""The Python door's start-up cost: a fresh process's ``import tierfs.reader`` and first direct read.

Issue 23 asks that a fresh process import the reader and serve its first direct read in
<= 30 ms, because a PyTorch DataLoader with ``persistent_workers=False`` (its default) starts
new worker processes every epoch and each pays this again.

``make bench-door`` (``python -m tools.bench_door``) starts a SeaweedFS gateway, seeds
``--files`` files of ``--size`` bytes, mounts the bucket read-only with tierfs, warms every
file through the mount and waits until the daemon has published its cache for direct
readers. Then it runs ``--procs`` fresh ``python -c`` processes, one after another, each of
which times (wall clock and its own CPU) ``import tierfs.reader`` and then one whole direct
read of a different warm file, and reports which heavy modules the import pulled in. It
prints the median and p90 of each.

If torch is installed it also runs ``--epochs`` DataLoader epochs (``--workers`` workers,
``persistent_workers=False``, fork start method, shuffled) over the warm files through the
direct reader and through the mount, and prints the median and p90 of the epoch times and the
samples/s. With fork, workers inherit the parent's imports: what each of them pays per epoch is
its first open of the cache (the view) and the reads.

Nothing asserts on the numbers. Wall-clock figures depend on the machine's load, which is
printed with them; the CPU figures are the process's own (``time.process_time``).
"""

from __future__ import annotations

import argparse
import compileall
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tierfs.units import parse_size
from tools.bench import REPO_ROOT, TierfsSystem
from tools.bench_workloads import Dataset, log, seeded_seaweed
from tools.servers import child_env

BUCKET = "tierfs-bench-door"
TARGET_MS = 30.0  # import + first direct read (issue 23)
# Modules the door must not pull in (checked in every child, reported as a count).
HEAVY = ("trio", "pyfuse3", "tierfs.fuse", "tierfs.control.protocol", "tierfs.control.ops", "boto3", "awscrt")

# One fresh process: time the import and the first read, say whether the read was direct.
CHILD = """
import json, sys, time
t0, c0 = time.perf_counter(), time.process_time()
import tierfs.reader
t1, c1 = time.perf_counter(), time.process_time()
with tierfs.reader.open(sys.argv[1], buffering=0) as f:
    n = len(f.read())
t2, c2 = time.perf_counter(), time.process_time()
heavy = [m for m in sys.argv[2].split(",") if m in sys.modules]
print(json.dumps({"import_ms": (t1 - t0) * 1e3, "read_ms": (t2 - t1) * 1e3,
                  "import_cpu_ms": (c1 - c0) * 1e3, "read_cpu_ms": (c2 - c1) * 1e3,
                  "bytes": n, "direct": tierfs.reader.stats()["direct_reads"], "heavy": heavy}))
"""


def quantiles(values: Sequence[float]) -> tuple[float, float]:
    """(median, p90) of ``values``; p90 by the nearest-rank method."""
    ordered = sorted(values)
    p90 = ordered[max(0, -(-len(ordered) * 9 // 10) - 1)]
    return statistics.median(ordered), p90


def run_child(path: Path, env: dict[str, str]) -> dict[str, Any]:
    done = subprocess.run(
        [sys.executable, "-c", CHILD, str(path), ",".join(HEAVY)],
        env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    if done.returncode != 0:
        raise RuntimeError(f"child failed ({done.returncode}): {done.stderr.strip()[-2000:]}")
    result: dict[str, Any] = json.loads(done.stdout.splitlines()[-1])
    return result


def wait_direct(path: Path, env: dict[str, str], timeout: float = 30.0) -> None:
    """Until a fresh process reads ``path`` directly (the daemon publishes reader.json every <= 5 s)."""
    deadline = time.monotonic() + timeout
    while True:
        if run_child(path, env)["direct"] > 0:
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"no direct read of {path} after {timeout:.0f} s")
        time.sleep(0.5)


def fresh_processes(paths: Sequence[Path], procs: int, env: dict[str, str]) -> dict[str, Any]:
    runs = [run_child(paths[i % len(paths)], env) for i in range(procs)]
    summary: dict[str, Any] = {"procs": procs, "direct_all": all(r["direct"] > 0 for r in runs)}
    summary["heavy_modules"] = sorted({m for r in runs for m in r["heavy"]})
    for name in ("import_ms", "read_ms", "import_cpu_ms", "read_cpu_ms"):
        summary[name] = quantiles([r[name] for r in runs])
    summary["total_ms"] = quantiles([r["import_ms"] + r["read_ms"] for r in runs])
    summary["total_cpu_ms"] = quantiles([r["import_cpu_ms"] + r["read_cpu_ms"] for r in runs])
    return summary


def epochs(paths: Sequence[Path], *, count: int, workers: int, batch: int) -> dict[str, Any] | None:
    """DataLoader epochs over ``paths``, direct and through the mount; None without torch."""
    try:
        import torch
        from torch.utils.data import DataLoader
    except ImportError:
        log("torch is not installed: no DataLoader epochs")
        return None
    from tools.bench_accel import DirectFiles, PlainFiles, _collate

    results: dict[str, Any] = {}
    for name, dataset in (("direct", DirectFiles([str(p) for p in paths])), ("mount", PlainFiles(paths))):
        seconds = []
        for epoch in range(count):
            loader = DataLoader(
                dataset, batch_size=batch, shuffle=True, num_workers=workers, collate_fn=_collate,
                persistent_workers=False, multiprocessing_context="fork",
                generator=torch.Generator().manual_seed(epoch),
            )  # fmt: skip
            start = time.perf_counter()
            total = sum(loader)
            seconds.append(time.perf_counter() - start)
            if total <= 0:
                raise RuntimeError("an epoch read nothing")
        median, p90 = quantiles(seconds)
        results[name] = {"epoch_s": (median, p90), "samples_per_s": len(paths) / median}
    return results


def render(door: dict[str, Any], loader: dict[str, Any] | None, load: tuple[float, float, float]) -> str:
    lines = [f"load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} on {os.cpu_count()} CPUs", ""]
    lines.append(f"{door['procs']} fresh processes (median / p90, ms)")
    for label, name in (
        ("import tierfs.reader", "import_ms"),
        ("first direct read", "read_ms"),
        ("import + first read", "total_ms"),
        ("  CPU: import", "import_cpu_ms"),
        ("  CPU: first read", "read_cpu_ms"),
        ("  CPU: both", "total_cpu_ms"),
    ):
        median, p90 = door[name]
        lines.append(f"  {label:22} {median:8.1f} {p90:8.1f}")
    verdict = "PASS" if door["total_ms"][0] <= TARGET_MS else "MISS"
    lines.append(f"  target: import + first read <= {TARGET_MS:.0f} ms (median): {verdict}")
    heavy = door["heavy_modules"] or "none"
    lines.append(f"  every first read direct: {door['direct_all']}; heavy modules imported: {heavy}")
    if loader:
        lines += ["", "DataLoader epochs, persistent_workers=False (median / p90 s, samples/s at the median)"]
        for name, row in loader.items():
            median, p90 = row["epoch_s"]
            lines.append(f"  {name:8} {median:8.3f} {p90:8.3f} {row['samples_per_s']:10.0f}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tools.bench_door", description=__doc__.splitlines()[0])
    p.add_argument("--files", type=int, default=256, help="warm files (default 256)")
    p.add_argument("--size", type=parse_size, default=110 * 1024, help="size of each (default 110K)")
    p.add_argument("--procs", type=int, default=40, help="fresh processes to time (default 40)")
    p.add_argument("--epochs", type=int, default=5, help="DataLoader epochs per data path (default 5)")
    p.add_argument("--workers", type=int, default=4, help="DataLoader workers (default 4)")
    p.add_argument("--batch", type=int, default=16, help="DataLoader batch size (default 16)")
    p.add_argument(
        "--tierfs-arg", action="append", default=[], metavar="ARG", help="extra `tierfs mount` argument"
    )
    p.add_argument("--json-out", type=Path, help="JSON output (default bench-out/bench-door-TIMESTAMP.json)")
    args = p.parse_args(argv)
    # An installed tierfs has its bytecode compiled; a checkout whose sources changed has stale
    # .pyc files, and with PYTHONDONTWRITEBYTECODE set every fresh process would compile them
    # again (that doubled the import's cost here). Compile once, as pip does at install time.
    compileall.compile_dir(str(REPO_ROOT / "tierfs"), quiet=1)
    dataset = Dataset(args.files, args.size, 0, 0)
    env = child_env()
    workdir = Path(tempfile.mkdtemp(prefix="tierfs-bench-door-", dir="/var/tmp"))
    try:
        with seeded_seaweed(workdir, BUCKET, dataset) as server:
            mount = TierfsSystem(workdir, server.endpoint_url, BUCKET, args.tierfs_arg)
            with mount.mounted(fresh=True) as mounted:
                paths = [mounted.path / key for key in dataset.small_keys()]
                for path in paths:  # warm: every block lands in the chunk cache
                    path.read_bytes()
                wait_direct(paths[0], env)
                log(f"timing {args.procs} fresh processes")
                load = os.getloadavg()
                door = fresh_processes(paths, args.procs, env)
                loader = epochs(paths, count=args.epochs, workers=args.workers, batch=args.batch)
            mount.cleanup()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    print(render(door, loader, load))
    out = args.json_out or REPO_ROOT / "bench-out" / f"bench-door-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    report = {"args": vars(args) | {"json_out": str(out)}, "loadavg": load, "door": door, "loader": loader}
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nJSON written to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
