"""Dataset versions at scale (issue 22; docs/snapshots.md "Scale"): how fast a fresh node can use a
big snapshot, what it costs in memory and disk, and how a snapshot mount's ``find`` compares with
today's cold LIST walk.

Rows, all from one run:

1. **Synthetic snapshot of ``--entries`` entries** (default 1,000,000; stat-only, no objects):
   the manifest is written directly (not N PUTs) and uploaded; then a fresh node (empty cache
   dir) mounts it with ``--snapshot``: seconds from the mount command to the first ``stat`` of a
   deep path, GETs that took, a full ``find`` (seconds, entries), the daemon's peak RSS and CPU,
   and the manifest bytes per entry (in the bucket, and on the node's disk after the find).
2. **Real objects, ``--objects`` M** (default 100,000; 0 skips): M one-byte objects, then
   ``find`` on a plain mount (today's cold LIST walk) against ``find`` on a snapshot mount of
   the same prefix, and ``tierfs snapshot create`` of M/4 and of M objects (seconds and peak
   RSS: flat RSS means the create is streaming).
3. **Format alternatives** for the same entries: building an LMDB of them (what "an LMDB file
   fetched once" or "import into the namespace" would hold), bytes per entry raw and zstd'd.

``python -m tools.bench_snapshot [--entries N] [--objects M] [--server moto|seaweedfs] [--json]``
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import lmdb
import zstandard

from tierfs.snapshot.build import TreeBuilder
from tierfs.snapshot.format import Footer, ManifestWriter, Row, new_row
from tools.bench import TierfsSystem
from tools.bench_rss import MotoProcess, Seeder, object_keys
from tools.bench_workloads import bench_client, log, process_status_kib
from tools.servers import SeaweedFS, child_env

SYNTH_BUCKET = "snap-synth"
REAL_BUCKET = "snap-real"


def synthetic_key(i: int) -> str:
    """Four levels, 1,000 files per leaf directory: ``train/shardNNN/classNNN/sampleNNNNNNNN.jpg``."""
    return f"train/shard{i // 100_000:03d}/class{(i // 1000) % 100:03d}/sample{i:08d}.jpg"


def synthetic_rows(count: int) -> Iterator[Row]:
    for i in range(count):
        key = synthetic_key(i)
        yield new_row(
            key,
            size=110_000 + i % 5000,
            etag=hashlib.md5(key.encode()).hexdigest(),
            mtime_ns=1_764_000_000 * 10**9 + i,
        )


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def write_synthetic(path: Path, count: int) -> dict[str, Any]:
    started, cpu = time.perf_counter(), time.process_time()
    with path.open("wb") as out:
        writer = ManifestWriter(
            out, Footer(SYNTH_BUCKET, "", "synthetic", time.time_ns(), False, "synthetic")
        )
        tree = TreeBuilder(writer)
        for row in synthetic_rows(count):
            tree.add(row)
        size = writer.finish()
    return {
        "entries": writer.footer.entries,
        "manifest_bytes": size,
        "manifest_bytes_per_entry": round(size / writer.footer.entries, 1),
        "write_seconds": round(time.perf_counter() - started, 1),
        "write_cpu_seconds": round(time.process_time() - cpu, 1),
    }


def find(root: Path) -> tuple[float, int]:
    started = time.perf_counter()
    out = subprocess.run(["find", str(root)], capture_output=True, check=True).stdout
    return time.perf_counter() - started, out.count(b"\n")


def synthetic_row(endpoint: str, workdir: Path, count: int, *, walk: bool = True) -> dict[str, Any]:
    client = bench_client(endpoint)
    client.create_bucket(Bucket=SYNTH_BUCKET)
    manifest = workdir / "synthetic.tsnap"
    result = write_synthetic(manifest, count)
    log(f"manifest: {result['entries']:,} entries, {result['manifest_bytes']:,} bytes")
    client.upload_file(str(manifest), SYNTH_BUCKET, ".tierfs/snapshots/synthetic.tsnap")
    manifest.unlink()
    mount = TierfsSystem(workdir / "synth", endpoint, SYNTH_BUCKET, ["--snapshot", "synthetic"])
    deep = mount.mountpoint / synthetic_key(count - 1)
    started = time.perf_counter()
    proc, pid = mount.start()
    try:
        live = time.perf_counter()
        os.stat(deep)
        result["first_stat_seconds"] = round(time.perf_counter() - started, 2)  # mount command included
        result["mount_seconds"] = round(live - started, 2)
        result["stat_after_mount_seconds"] = round(time.perf_counter() - live, 3)
        result["first_stat_gets"] = mount.status().get("s3_get_requests")
        result["rss_after_first_stat_mib"] = round(process_status_kib(pid, "VmHWM") / 1024, 1)
        if walk:
            cpu = cpu_seconds(pid)
            seconds, entries = find(mount.mountpoint)
            result["find_seconds"] = round(seconds, 1)
            result["find_entries"] = entries
            result["find_daemon_cpu_seconds"] = round(cpu_seconds(pid) - cpu, 1)
            # The figure that holds under load: the daemon's CPU per entry found (readdir and all).
            result["find_daemon_cpu_us_per_entry"] = round(
                (cpu_seconds(pid) - cpu) / max(entries, 1) * 1e6, 1
            )
        result["peak_rss_mib"] = round(process_status_kib(pid, "VmHWM") / 1024, 1)
        status = mount.status()
        result["s3_list_requests"] = status.get("s3_list_requests")
        local = sum(p.stat().st_blocks * 512 for p in (mount.cache_dir / "snapshots").glob("*.tsnap"))
        meta = sum(p.stat().st_blocks * 512 for p in (mount.cache_dir / "meta").glob("*.mdb"))
        result["node_metadata_bytes_per_entry"] = round((local + meta) / result["entries"], 1)
    finally:
        mount.unmount()
        proc.wait(30)
    log(f"synthetic: {json.dumps(result)}")
    return result


def run_tierfs_measured(*args: str) -> tuple[float, int, str]:
    """``tierfs ARGS`` in a child that reports its own peak RSS: (seconds, peak KiB, stderr)."""
    code = (
        # VmHWM, not ru_maxrss: Linux carries ru_maxrss over fork and exec from the parent.
        "import sys\nfrom tierfs.cli import main\nrc = main(sys.argv[1:])\n"
        "hwm = [l for l in open('/proc/self/status') if l.startswith('VmHWM:')][0].split()[1]\n"
        "print('MAXRSS', hwm, file=sys.stderr)\nsys.exit(rc)"
    )
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, env=child_env()
    )
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"tierfs {' '.join(args)}: {done.stderr}")
    peak = int(done.stderr.rsplit("MAXRSS", 1)[1].split()[0])
    return seconds, peak, done.stderr


def real_row(endpoint: str, workdir: Path, count: int, threads: int) -> dict[str, Any]:
    client = bench_client(endpoint)
    client.create_bucket(Bucket=REAL_BUCKET)
    quarter = count // 4
    keys = [f"a/{k}" for k in object_keys(quarter)] + [f"b/{k}" for k in object_keys(count - quarter)]
    started = time.perf_counter()
    # One byte each: a zero-byte object would cost today's walk a HEAD too (docs/namespace.md),
    # which is not what this row compares.
    Seeder(endpoint, REAL_BUCKET, threads, body=b"x").seed(keys)
    log(f"seeded {count:,} objects in {time.perf_counter() - started:.0f} s")
    result: dict[str, Any] = {"objects": count}
    for label, source, n in (
        ("quarter", f"s3://{REAL_BUCKET}/a", quarter),
        ("all", f"s3://{REAL_BUCKET}", count),
    ):
        seconds, peak, _ = run_tierfs_measured(
            "snapshot",
            "create",
            source,
            f"bench-{label}",
            "--endpoint-url",
            endpoint,
            "--tmpdir",
            str(workdir),
        )
        result[f"create_{n}_seconds"] = round(seconds, 1)
        result[f"create_{n}_peak_rss_mib"] = round(peak / 1024, 1)
        log(f"snapshot create of {n:,} objects: {seconds:.1f} s, peak RSS {peak / 1024:.0f} MiB")
    plain = TierfsSystem(workdir / "plain", endpoint, REAL_BUCKET)
    proc, pid = plain.start()
    try:
        cpu = cpu_seconds(pid)
        seconds, entries = find(plain.mountpoint)
        result["list_walk_find_seconds"] = round(seconds, 1)
        result["list_walk_find_entries"] = entries
        result["list_walk_daemon_cpu_us_per_entry"] = round(
            (cpu_seconds(pid) - cpu) / max(entries, 1) * 1e6, 1
        )
        status = plain.status()
        result["list_walk_list_requests"] = status.get("s3_list_requests")
        result["list_walk_head_requests"] = status.get("s3_head_requests")
    finally:
        plain.unmount()
        proc.wait(30)
    pinned = TierfsSystem(workdir / "pinned", endpoint, REAL_BUCKET, ["--snapshot", "bench-all"])
    proc, pid = pinned.start()
    try:
        cpu = cpu_seconds(pid)
        seconds, entries = find(pinned.mountpoint)
        result["snapshot_find_seconds"] = round(seconds, 1)
        result["snapshot_find_entries"] = entries
        result["snapshot_daemon_cpu_us_per_entry"] = round(
            (cpu_seconds(pid) - cpu) / max(entries, 1) * 1e6, 1
        )
        result["snapshot_list_requests"] = pinned.status().get("s3_list_requests")
    finally:
        pinned.unmount()
        proc.wait(30)
    result["find_speedup"] = round(
        result["list_walk_find_seconds"] / max(result["snapshot_find_seconds"], 0.01), 1
    )
    log(f"real objects: {json.dumps(result)}")
    return result


def lmdb_row(workdir: Path, count: int) -> dict[str, Any]:
    """The same entries as an LMDB (key -> packed size, mtime, ids, binary MD5): what a node would
    fetch whole before its first stat ("an LMDB file fetched once"), or import entry by entry."""
    path = workdir / "lmdb"
    env = lmdb.open(str(path), map_size=1 << 36, sync=False, writemap=True)
    started = time.process_time()
    with env.begin(write=True) as txn:
        for row in synthetic_rows(count):
            packed = struct.pack("<BQqIII", 1, row[2], row[5], 0, 0, 0) + bytes.fromhex(row[3])
            txn.put(row[0].encode(), packed)
    cpu = time.process_time() - started
    size = (env.info()["last_pgno"] + 1) * env.stat()["psize"]
    env.close()
    with (path / "data.mdb").open("rb") as f:
        packed_size = len(zstandard.ZstdCompressor(level=3).compress(f.read(size)))
    return {
        "lmdb_bytes_per_entry": round(size / count, 1),
        "lmdb_zstd_bytes_per_entry": round(packed_size / count, 1),
        "lmdb_build_cpu_us_per_entry": round(cpu / count * 1e6, 2),
    }


def render(result: dict[str, Any]) -> str:
    lines = ["| row | value |", "|---|---|"]
    for section, values in result.items():
        if isinstance(values, dict):
            for key, value in values.items():
                lines.append(f"| {section}: {key} | {value} |")
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--entries", type=int, default=1_000_000, help="synthetic snapshot size")
    parser.add_argument(
        "--objects", type=int, default=100_000, help="real objects for the LIST comparison (0: skip)"
    )
    parser.add_argument("--server", choices=("moto", "seaweedfs"), default="moto")
    parser.add_argument("--threads", type=int, default=16, help="seeding threads")
    parser.add_argument("--no-lmdb", action="store_true", help="skip the LMDB comparison")
    parser.add_argument("--stat-only", action="store_true", help="first stat, RSS and disk only: no find")
    parser.add_argument("--json", action="store_true")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    result: dict[str, Any] = {"load_average": os.getloadavg()[0]}
    with tempfile.TemporaryDirectory(prefix="bench-snapshot-") as tmp:
        workdir = Path(tmp)
        server_cm: Any = MotoProcess() if args.server == "moto" else SeaweedFS(workdir / "seaweed")
        with server_cm as server:
            result["synthetic"] = synthetic_row(
                server.endpoint_url, workdir, args.entries, walk=not args.stat_only
            )
            if args.objects:
                result["real"] = real_row(server.endpoint_url, workdir, args.objects, args.threads)
        if not args.no_lmdb:
            result["format"] = lmdb_row(workdir, min(args.entries, 1_000_000))
    result["self_peak_rss_mib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    print(json.dumps(result, indent=2) if args.json else render(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
