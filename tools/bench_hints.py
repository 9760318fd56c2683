"""Hints (issue 21): one cold epoch of shuffled samples through a PyTorch DataLoader, with and without hints.

``python -m tools.bench_hints`` starts a SeaweedFS gateway, seeds ``--files`` samples of
``--size`` bytes, mounts tierfs read-only, and reads one shuffled epoch with a DataLoader of
``--workers`` worker processes (batches of ``--batch``, no compute: the loader's own rate) in
each of these ways, evicting the cache before each so every epoch is cold:

* ``mount``: plain ``open``/``read`` through the FUSE mount;
* ``direct-fuse-miss``: ``tierfs.reader`` with the old miss fallback (one read through the
  mount per missed file; ``TIERFS_MISS_FETCH=0``);
* ``direct``: ``tierfs.reader``, a miss asks the daemon to fetch the file whole (the default);
* ``direct-hints``: ``FileDataset`` with ``ds.sampler(shuffle=True)``: the epoch's order is hinted
  to the daemon by the main process before the first batch;
* ``s3torchconnector``: ``S3MapDataset`` over the same keys, if the package is installed.

For each it prints samples/s, the daemon's CPU seconds per sample (``/proc/PID/stat``), its GETs
and the hint counters. ``--json-out`` saves the rows.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import sys
import tempfile
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tools.bench import TierfsSystem
from tools.bench_accel import PlainFiles, _collate, seed, tierfs_cmd
from tools.servers import SeaweedFS

SYSTEMS = ("mount", "direct-fuse-miss", "direct", "direct-hints", "s3torchconnector")


def log(message: str) -> None:
    print(f"[bench-hints] {message}", file=sys.stderr, flush=True)


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _lengths(data: bytes) -> int:
    return len(data)


def _size_of(item: Any) -> int:
    return len(item.read()) if hasattr(item, "read") else len(item)


def loader_cpu() -> float:
    """CPU seconds of this process and its reaped children (the DataLoader's workers, which end
    with each epoch: ``persistent_workers`` is off)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def epoch(dataset: Any, sampler: Any, args: argparse.Namespace) -> tuple[float, int]:
    """Seconds and bytes of one pass of a DataLoader over ``dataset`` in ``sampler``'s order."""
    from torch.utils.data import DataLoader

    loader = DataLoader(
        dataset, batch_size=args.batch, sampler=sampler, num_workers=args.workers, collate_fn=_collate
    )
    start = time.perf_counter()
    total = sum(loader)
    return time.perf_counter() - start, total


def run_tierfs(
    server: SeaweedFS, bucket: str, keys: list[str], workdir: Path,
    args: argparse.Namespace, wanted: Sequence[str],
) -> dict[str, dict[str, Any]]:
    from tierfs.reader import Reader
    from tierfs.reader.datasets import FileDataset

    rows: dict[str, dict[str, Any]] = {}
    system = TierfsSystem(workdir, server.endpoint_url, bucket, ["--cache-min-free", "0"])
    with system.mounted(fresh=True) as m:
        time.sleep(1.5)  # the first maintenance pass publishes reader.json for direct readers
        root = Path(m.path) / "train"
        order = list(range(len(keys)))
        random.Random(args.seed).shuffle(order)
        for name in [n for n in wanted if n in SYSTEMS[:4]]:  # in the order asked for
            tierfs_cmd("evict", "--recursive", str(root))
            os.environ["TIERFS_MISS_FETCH"] = "0" if name == "direct-fuse-miss" else "1"
            reader = Reader()
            ds: Any
            if name == "mount":
                ds, sampler = PlainFiles([str(Path(m.path) / k) for k in keys]), order
            else:
                ds = FileDataset(root, transform=_lengths, reader=reader)
                assert len(ds.files) == len(keys)
                sampler = ds.sampler(base=order) if name == "direct-hints" else order
            before, cpu, loader = system.status(), cpu_seconds(m.pid), loader_cpu()
            seconds, nbytes = epoch(ds, sampler, args)
            cpu_used, loader_used, after = cpu_seconds(m.pid) - cpu, loader_cpu() - loader, system.status()
            rows[name] = {
                "samples_per_s": round(len(keys) / seconds, 1),
                "seconds": round(seconds, 2),
                "bytes": nbytes,
                "daemon_cpu_ms_per_sample": round(cpu_used * 1000 / len(keys), 3),
                "loader_cpu_ms_per_sample": round(loader_used * 1000 / len(keys), 3),
                "gets": after.get("s3_get_requests", 0) - before.get("s3_get_requests", 0),
                **{k: v - before.get(k, 0) for k, v in after.items() if k.startswith("hints_")},
                "direct_fallbacks": {
                    r: n - before.get("direct_fallbacks", {}).get(r, 0)
                    for r, n in after.get("direct_fallbacks", {}).items()
                },
            }
            log(f"{name:17} {rows[name]['samples_per_s']:8,.0f} samples/s  {rows[name]}")
        os.environ.pop("TIERFS_MISS_FETCH", None)
    return rows


def run_s3torch(server: SeaweedFS, bucket: str, keys: list[str], args: argparse.Namespace) -> dict[str, Any]:
    try:
        from s3torchconnector import S3ClientConfig, S3MapDataset
    except ImportError:
        return {"skipped": "s3torchconnector is not installed"}
    os.environ.setdefault("AWS_ACCESS_KEY_ID", "any")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "any")
    ds = S3MapDataset.from_objects(
        [f"s3://{bucket}/{k}" for k in keys], region="us-east-1", endpoint=server.endpoint_url,
        s3client_config=S3ClientConfig(force_path_style=True), transform=_size_of,
    )  # fmt: skip
    order = list(range(len(keys)))
    random.Random(args.seed).shuffle(order)
    loader = loader_cpu()
    seconds, nbytes = epoch(ds, order, args)
    row = {
        "samples_per_s": round(len(keys) / seconds, 1), "seconds": round(seconds, 2), "bytes": nbytes,
        "loader_cpu_ms_per_sample": round((loader_cpu() - loader) * 1000 / len(keys), 3),
    }  # fmt: skip
    log(f"s3torchconnector  {row['samples_per_s']:8,.0f} samples/s  {row}")
    return row


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--systems", default=",".join(SYSTEMS), help="rows to run (default: all)")
    p.add_argument("--files", type=int, default=2000, help="samples (default 2000)")
    p.add_argument("--size", type=int, default=110 * 1024, help="bytes per sample (default 110 KiB)")
    p.add_argument("--workers", type=int, default=8, help="DataLoader worker processes (default 8)")
    p.add_argument("--batch", type=int, default=16, help="batch size (default 16)")
    p.add_argument("--seed", type=int, default=1, help="the epoch's shuffle (default 1)")
    p.add_argument("--json-out", type=Path, help="also write the rows here as JSON")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    warnings.filterwarnings("ignore", message=".*worker processes in total.*")  # 8 workers on 2 CPUs
    wanted = [s.strip() for s in args.systems.split(",") if s.strip()]
    workdir = Path(tempfile.mkdtemp(prefix="tierfs-bench-hints-"))
    bucket = f"hints-{int(time.time())}"
    rows: dict[str, dict[str, Any]] = {}
    with SeaweedFS(workdir / "seaweed") as server:
        log(f"seeding {args.files} samples of {args.size} bytes")
        keys = seed(server.endpoint_url, bucket, args.files, args.size, workdir / "local")
        keys.sort()  # FileDataset's order: sorted paths
        if "s3torchconnector" in wanted:
            rows["s3torchconnector"] = run_s3torch(server, bucket, keys, args)
        rows.update(run_tierfs(server, bucket, keys, workdir, args, wanted))
    base = rows.get("s3torchconnector", {}).get("samples_per_s")
    print(f"{args.files} samples of {args.size // 1024} KiB, shuffled, DataLoader with {args.workers} "
          f"workers, batches of {args.batch}, cold; {os.cpu_count()} CPUs")  # fmt: skip
    print("| reader | samples/s | x s3torchconnector | daemon CPU ms/sample | loader CPU ms/sample | GETs |")
    print("|---|---|---|---|---|---|")
    for name, row in rows.items():
        rate = row.get("samples_per_s")
        rel = f"{rate / base:.2f}" if rate and base else "-"
        print(f"| {name} | {rate or row.get('skipped')} | {rel} | {row.get('daemon_cpu_ms_per_sample', '-')} "
              f"| {row.get('loader_cpu_ms_per_sample', '-')} | {row.get('gets', '-')} |")  # fmt: skip
    if args.json_out:
        args.json_out.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

