"""Accelerator utilisation, in the spirit of MLPerf Storage: how many emulated accelerators can
the data path keep >= 90% busy?

``make bench-accel`` (``python -m tools.bench_accel``) starts a SeaweedFS gateway, seeds
``--files`` samples of ``--size`` bytes, and feeds emulated accelerators from one PyTorch
DataLoader with ``--workers`` worker processes (shuffled, batches of ``--batch``). Each
accelerator takes a batch, "computes" for ``--compute`` seconds (a sleep: the accelerator
is another device, it costs the host no CPU) and takes the next. Its utilisation is
compute time over wall time, after its first batch (start-up is not the steady state).
For each data path and state, N grows (1, 2, 3, 4, 6, 8, 12, ...) until the mean
utilisation falls below 90%; the table reports the largest N that stayed above it.

Data paths: a local copy, the tierfs FUSE mount, the direct reader (tierfs.reader, same
mount and cache), and s3fs / rclone where installed. States: cold (tierfs: every cached
block evicted, kernel pages dropped with them; local: the page cache of each file dropped
with posix_fadvise; s3fs/rclone: a fresh mount) and warm (everything read once before).
A cold trial that needs more samples than the dataset has is cut at one pass, so a cold
trial never reads a warm sample.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import queue
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from tools.bench import REPO_ROOT, RcloneSystem, S3fsSystem, TierfsSystem, available_systems
from tools.bench_workloads import bench_client
from tools.servers import SeaweedFS, child_env

N_STEPS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 80, 96, 128)
THRESHOLD = 0.90


def log(message: str) -> None:
    print(f"[bench-accel] {message}", file=sys.stderr, flush=True)


class PlainFiles:
    """Map-style dataset reading files with the builtin open (local copy, FUSE, s3fs, rclone)."""

    def __init__(self, paths: Sequence[str]) -> None:
        self.paths = list(paths)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> int:
        with open(self.paths[index], "rb") as f:
            return len(f.read())


class DirectFiles(PlainFiles):
    """The same through tierfs.reader (one Reader per worker process, made after the fork)."""

    def __getitem__(self, index: int) -> int:
        from tierfs import reader

        with reader.open(self.paths[index], buffering=0) as f:
            return len(f.read())


def _collate(batch: list[int]) -> int:
    return sum(batch)


@dataclass
class Trial:
    accelerators: int
    utilisation: float
    samples_per_s: float
    seconds: float


def run_trial(
    dataset: PlainFiles, accelerators: int, *, batch: int, compute: float, workers: int, samples: int
) -> Trial:
    """Utilisation is measured from each accelerator's ``per_accelerator // 3``-th batch on."""
    per_accelerator = max(1, samples // batch // accelerators)
    """One DataLoader (shuffled, ``samples`` samples) feeding ``accelerators`` emulated ones."""
    import torch
    from torch.utils.data import DataLoader, RandomSampler

    generator = torch.Generator().manual_seed(1)
    sampler = RandomSampler(
        dataset, replacement=samples > len(dataset), num_samples=samples, generator=generator
    )
    loader = DataLoader(
        dataset, batch_size=batch, sampler=sampler, num_workers=workers, collate_fn=_collate,
        prefetch_factor=4, persistent_workers=False,
    )  # fmt: skip
    batches: queue.Queue[int | None] = queue.Queue(maxsize=accelerators)
    busy = [0.0] * accelerators
    span = [0.0] * accelerators
    done_bytes = [0]

    def feed() -> None:
        for b in loader:
            done_bytes[0] += b
            batches.put(b)
        for _ in range(accelerators):
            batches.put(None)

    skip = max(1, per_accelerator // 3)  # the first batches fill the pipeline: not the steady state
    ends: list[float] = [0.0] * accelerators
    starts: list[float | None] = [None] * accelerators

    def accelerator(i: int) -> None:
        n = 0
        while True:
            got = batches.get()
            if got is None:
                break
            if n == skip:
                starts[i] = time.perf_counter()
            time.sleep(compute)
            if n >= skip:
                busy[i] += compute
                ends[i] = time.perf_counter()
            n += 1
        begun = starts[i]
        span[i] = ends[i] - begun if begun is not None else 0.0

    start = time.perf_counter()
    threads = [threading.Thread(target=accelerator, args=(i,)) for i in range(accelerators)]
    for t in threads:
        t.start()
    feed()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    measured = [(b, s) for b, s in zip(busy, span, strict=True) if s > 0]
    util = sum(b / s for b, s in measured) / len(measured) if measured else 0.0
    steady = [s for s in starts if s is not None]
    rate = sum(b / compute for b, _ in measured) * batch / (max(ends) - min(steady)) if steady else 0.0
    return Trial(accelerators, round(min(util, 1.0), 3), round(rate, 1), round(wall, 2))


def warm_up(dataset: PlainFiles, batch: int, workers: int) -> None:
    """Read every sample once, in order, through a DataLoader like the trials'."""
    from torch.utils.data import DataLoader

    for _ in DataLoader(dataset, batch_size=batch, num_workers=workers, collate_fn=_collate):
        pass


def drop_local_pages(paths: Sequence[str]) -> None:
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def largest_busy(
    name: str, dataset: PlainFiles, *, cold: bool, reset: Callable[[], None], args: argparse.Namespace
) -> tuple[int, list[Trial]]:
    """Grow N until utilisation drops below the threshold; returns the last N that held it."""
    best, trials = 0, []
    for n in N_STEPS:
        if cold and n * args.batch * 6 > len(dataset):
            # Fewer than 6 batches each from one pass: too short to measure a steady state.
            return -best, trials  # negative: "at least", the dataset is too small to test more
        want = n * args.batch * args.batches_per_accelerator
        samples = min(want, len(dataset)) if cold else want
        if cold:
            reset()
        trial = run_trial(
            dataset, n, batch=args.batch, compute=args.compute, workers=args.workers, samples=samples
        )
        trials.append(trial)
        log(f"{name:7} {'cold' if cold else 'warm'} N={n:3}: utilisation {trial.utilisation:.1%}, "
            f"{trial.samples_per_s:,.0f} samples/s")  # fmt: skip
        if trial.utilisation < THRESHOLD:
            break
        best = n
    return best, trials


def seed(endpoint: str, bucket: str, files: int, size: int, local: Path) -> list[str]:
    client = bench_client(endpoint)
    client.create_bucket(Bucket=bucket)
    keys = [f"train/n{i % 100:03d}/{i:07d}.bin" for i in range(files)]
    import concurrent.futures

    def put(key: str) -> None:
        body = os.urandom(size)
        target = local / key
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(body)
        client.put_object(Bucket=bucket, Key=key, Body=body)

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        list(pool.map(put, keys))
    return keys


def tierfs_cmd(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "tierfs", *args], env=child_env(), check=True, capture_output=True)


@contextlib.contextmanager
def mounted(system: Any) -> Iterator[Path]:
    with system.mounted(fresh=True) as m:
        yield Path(m.path)


def render(results: dict[str, dict[str, Any]], args: argparse.Namespace) -> str:
    need = args.batch / args.compute
    lines = [
        f"{args.files} samples of {args.size // 1024} KiB, DataLoader with {args.workers} workers, "
        f"batches of {args.batch}, {args.compute * 1000:.0f} ms compute per batch "
        f"(one accelerator wants {need:.0f} samples/s); {os.cpu_count()} CPUs",
        "",
        "| data path | cold: accelerators >= 90% busy | warm: accelerators >= 90% busy"
        " | warm samples/s at that N |",
        "|---|---|---|---|",
    ]
    for name, r in results.items():
        if "skipped" in r:
            lines.append(f"| {name} | {r['skipped']} | | |")
            continue
        rates = [t["samples_per_s"] for t in r["warm_trials"] if t["accelerators"] == r["warm"]]
        warm_rate = rates[0] if rates else None
        cold, warm = (
            f">= {abs(n)}" if n < 0 or n == N_STEPS[-1] else str(n) for n in (r["cold"], r["warm"])
        )
        lines.append(f"| {name} | {cold} | {warm} | {warm_rate or '-'} |")
    local = abs(results.get("local", {}).get("warm") or 0)
    direct = abs(results.get("direct", {}).get("warm") or 0)
    fuse = abs(results.get("fuse", {}).get("warm") or 0)
    if local and direct:
        lines.append("")
        lines.append(f"direct / local (warm accelerators): {direct / local:.2f}x; direct / FUSE: "
                     f"{direct / fuse if fuse else float('inf'):.2f}x")  # fmt: skip
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--files", type=int, default=2000)
    p.add_argument("--size", type=int, default=110 * 1024)
    p.add_argument("--workers", type=int, default=8)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--compute", type=float, default=0.1, help="seconds of accelerator time per batch")
    p.add_argument("--batches-per-accelerator", type=int, default=30)
    p.add_argument("--systems", default="local,fuse,direct,s3fs,rclone")
    p.add_argument("--json-out", type=Path)
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    import warnings as _warnings

    import tierfs.reader

    _warnings.filterwarnings("ignore", message=".*worker processes in total.*")
    wanted = [s.strip() for s in args.systems.split(",") if s.strip()]
    _, warnings = available_systems(",".join(s for s in wanted if s in ("s3fs", "rclone")))
    workdir = Path(tempfile.mkdtemp(prefix="tierfs-bench-accel-"))
    results: dict[str, dict[str, Any]] = {}
    bucket = f"accel-{int(time.time())}"
    try:
        with SeaweedFS(workdir / "seaweed") as server:
            local = workdir / "local"
            log(f"seeding {args.files} samples")
            keys = seed(server.endpoint_url, bucket, args.files, args.size, local)

            def measure(name: str, paths: list[str], reset: Callable[[], None], direct: bool = False) -> None:
                ds: PlainFiles = DirectFiles(paths) if direct else PlainFiles(paths)
                cold, cold_trials = largest_busy(name, ds, cold=True, reset=reset, args=args)
                # one full pass first, so that "warm" means every sample was read once
                warm_up(ds, args.batch, args.workers)
                warm, warm_trials = largest_busy(name, ds, cold=False, reset=lambda: None, args=args)
                results[name] = {
                    "cold": cold, "warm": warm,
                    "cold_trials": [asdict(t) for t in cold_trials],
                    "warm_trials": [asdict(t) for t in warm_trials],
                }  # fmt: skip

            if "local" in wanted:
                paths = [str(local / k) for k in keys]
                measure("local", paths, lambda: drop_local_pages(paths))
            tierfs = TierfsSystem(workdir, server.endpoint_url, bucket, ["--cache-min-free", "0"])
            for name in ("fuse", "direct"):
                if name not in wanted:
                    continue
                with tierfs.mounted(fresh=True) as m:
                    paths = [str(Path(m.path) / k) for k in keys]
                    time.sleep(1.5)  # the daemon's first maintenance pass publishes reader.json

                    def evict(mnt: Path = Path(m.path)) -> None:
                        tierfs_cmd("evict", "--recursive", str(mnt / "train"))

                    measure(name, paths, evict, direct=name == "direct")
                    if name == "direct":
                        results[name]["status"] = {
                            k: v for k, v in tierfs.status().items() if k.startswith("direct_")
                        }
            for name, cls in (("s3fs", S3fsSystem), ("rclone", RcloneSystem)):
                if name not in wanted:
                    continue
                if any(w.startswith(name) for w in warnings):
                    results[name] = {"skipped": "not installed"}
                    continue
                system = cls(workdir, server.endpoint_url, bucket)
                state: dict[str, Any] = {}

                def remount(system: Any = system, state: dict[str, Any] = state) -> None:
                    if "ctx" in state:
                        state["ctx"].__exit__(None, None, None)
                    state["ctx"] = system.mounted(fresh=True)
                    state["ctx"].__enter__()

                remount()
                try:
                    paths = [str(system.mountpoint / k) for k in keys]
                    measure(name, paths, remount)
                finally:
                    state["ctx"].__exit__(None, None, None)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    table = render(results, args)
    print(table)
    out = args.json_out or REPO_ROOT / "bench-out" / f"bench-accel-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    options = {k: str(v) for k, v in vars(args).items()}
    out.write_text(json.dumps({"options": options, "results": results}, indent=2))
    log(f"results in {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
