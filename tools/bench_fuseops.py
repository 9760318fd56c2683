"""The FUSE side of a small-file read: requests per file by kind, and the daemon's CPU per file.

``docs/coldpath.md`` finds about 1 ms of daemon CPU per cold 110 KiB file spent outside the
fetch engine (``tierfs prefetch`` of the same files costs that much less than reading them
through the mount). This benchmark shows where: every row reads the same small files whole
(``open``, ``read`` to EOF, ``close``) with 8 threads after the kernel's dentries and page cache
were dropped, and reports

* the daemon's CPU per file (``/proc/PID/stat``) and split by thread name;
* with ``--ops``, a second pass on a fresh mount under ``strace -e read=FD`` of the daemon's
  ``/dev/fuse`` descriptor: every request the kernel sent, decoded by opcode, per file (the
  CPU of that pass is not reported: strace slows every syscall).

Rows: ``tierfs cold`` (fresh cache, listings warm in the daemon, data from S3),
``tierfs disk`` (the same mount again after the page cache is dropped: bytes from the local
chunk cache, no S3) and ``nullfs`` (tools/nullfs.py without keep_cache: the binding's floor,
every READ reaching a daemon that does nothing).

Run: ``python -m tools.bench_fuseops [--files N] [--ops] [--rows "tierfs cold,tierfs disk,nullfs"]``.
Nothing asserts on the numbers.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from tierfs.units import parse_size
from tools.bench import Mounted, MountSystem, NullSystem, TierfsSystem
from tools.bench_cold import thread_cpu
from tools.bench_workloads import Dataset, drop_caches, log, process_cpu_seconds, read_small, seeded_seaweed

BUCKET = "tierfs-bench-fuseops"

# include/uapi/linux/fuse.h
OPCODES = {
    1: "LOOKUP", 2: "FORGET", 3: "GETATTR", 4: "SETATTR", 5: "READLINK", 14: "OPEN", 15: "READ",
    16: "WRITE", 17: "STATFS", 18: "RELEASE", 20: "FSYNC", 21: "SETXATTR", 22: "GETXATTR",
    23: "LISTXATTR", 25: "FLUSH", 26: "INIT", 27: "OPENDIR", 28: "READDIR", 29: "RELEASEDIR",
    36: "INTERRUPT", 41: "IOCTL", 42: "POLL", 44: "BATCH_FORGET", 46: "READDIRPLUS", 48: "LSEEK",
}  # fmt: skip
_DUMP = re.compile(r"^(?:\d+\s+)? \| 00000  ((?:[0-9a-f]{2} ){8})")


def fuse_fds(pid: int) -> list[int]:
    """The daemon's descriptors open on /dev/fuse."""
    fds = []
    for link in Path(f"/proc/{pid}/fd").iterdir():
        try:
            if os.readlink(link) == "/dev/fuse":
                fds.append(int(link.name))
        except OSError:
            continue
    return fds


def trace_requests(pid: int, out: Path) -> subprocess.Popen[bytes] | None:
    """``strace`` dumping the first bytes of every read of the daemon's /dev/fuse (its requests)."""
    strace, fds = shutil.which("strace"), fuse_fds(pid)
    if strace is None or not fds:
        return None
    spec = ",".join(map(str, fds))
    command = [strace, "-f", "-qq", "-e", "trace=read", "-e", f"read={spec}", "-o", str(out), "-p", str(pid)]
    return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def requests_in(trace: Path) -> Counter[str]:
    """Requests by opcode name in a ``trace_requests`` output: the header's second u32 of each dump."""
    counts: Counter[str] = Counter()
    with trace.open(errors="replace") as lines:
        for line in lines:
            match = _DUMP.match(line)
            if match:
                raw = bytes.fromhex(match.group(1).replace(" ", ""))
                opcode = int.from_bytes(raw[4:8], "little")
                counts[OPCODES.get(opcode, str(opcode))] += 1
    return counts


def warm_listings(root: Path) -> None:
    """List every directory once, so the daemon knows every entry before the data is read."""
    for sub in os.listdir(root / "small"):
        os.listdir(root / "small" / sub)


def loop_cpu_seconds(pid: int) -> float:
    """CPU seconds of the daemon's main thread (its thread id is its pid): the trio loop, which
    serves every FUSE request. The cache writer and the other threads are in the per-name split."""
    fields = Path(f"/proc/{pid}/task/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def profiler(pid: int, out: Path | None) -> subprocess.Popen[bytes] | None:
    """``py-spy record --native --threads`` of the daemon into ``out`` (collapsed stacks, busy samples
    only: ``--native`` shows the time spent in pyfuse3's Cython and libfuse); None without py-spy."""
    spy = shutil.which("py-spy") or shutil.which("py-spy", path=str(Path(sys.executable).parent))
    if spy is None or out is None:
        return None
    command = [
        spy,
        "record",
        "--native",
        "--threads",
        "-r",
        "250",
        "-f",
        "raw",
        "-o",
        str(out),
        "-p",
        str(pid),
    ]
    return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def evict_pages(root: Path, keys: Sequence[str]) -> None:
    """Drop only the page cache of the files read through the mount (``POSIX_FADV_DONTNEED``): the
    next read reaches the daemon again, while dentries, the daemon's cache files and LMDB pages stay
    cached, so the pass measures the FUSE requests and the daemon's handlers, not the disk."""
    for key in keys:
        fd = os.open(root / key, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def evict(mounted: Mounted, keys: Sequence[str], how: str) -> None:
    """``all``: the kernel's dentries, inodes and page cache (``drop_caches``); ``pages``: ``evict_pages``."""
    if how == "all":
        drop_caches()
    else:
        evict_pages(mounted.path, keys)


def cpu_pass(
    mounted: Mounted,
    keys: Sequence[str],
    threads: int,
    *,
    how: str = "all",
    repeat: int = 1,
    profile: Path | None = None,
) -> dict[str, object]:
    """Read every file ``repeat`` times (``evict``-ed before each pass, outside the measure); the
    daemon's CPU per file read, its loop's, and by thread name, optionally under ``profiler``."""
    spy = profiler(mounted.pid, profile)
    if spy is not None:
        time.sleep(1.0)
    seconds = cpu = loop = 0.0
    by_thread: Counter[str] = Counter()
    for _ in range(repeat):
        evict(mounted, keys, how)
        before = thread_cpu(mounted.pid)
        cpu0, loop0 = process_cpu_seconds(mounted.pid), loop_cpu_seconds(mounted.pid)
        start = time.perf_counter()
        read_small(mounted.path, keys, threads, True)
        seconds += time.perf_counter() - start
        cpu += process_cpu_seconds(mounted.pid) - cpu0
        loop += loop_cpu_seconds(mounted.pid) - loop0
        after = thread_cpu(mounted.pid)
        by_thread.update({k: v - before.get(k, 0.0) for k, v in after.items()})
    if spy is not None:
        spy.send_signal(signal.SIGINT)
        spy.wait(60)
    n = len(keys) * repeat
    return {
        "files_per_s": round(n / seconds, 1),
        "cpu_ms_per_file": round(cpu * 1000 / n, 3),
        "loop_cpu_ms_per_file": round(loop * 1000 / n, 3),
        "cpu_ms_by_thread": {k: round(v * 1000 / n, 3) for k, v in by_thread.most_common() if v > 0},
    }


def ops_pass(mounted: Mounted, keys: Sequence[str], threads: int, how: str, trace: Path) -> dict[str, float]:
    """Read every file once under ``trace_requests``; the requests per file by opcode."""
    evict(mounted, keys, how)
    tracer = trace_requests(mounted.pid, trace)
    if tracer is None:
        return {}
    time.sleep(1.0)  # strace attaches to every thread first
    read_small(mounted.path, keys, threads, True)
    time.sleep(0.5)  # the last RELEASEs are sent after close() returns
    tracer.send_signal(signal.SIGINT)
    tracer.wait(60)
    counts = requests_in(trace)
    return {name: round(c / len(keys), 2) for name, c in counts.most_common()}


# row -> (system, eviction before each pass, whether it repeats). A system's rows run in this
# order on one fresh mount: "tierfs cold" first (nothing cached), then the rows that read again.
ROWS = {
    "tierfs cold": ("tierfs", "all", False),
    "tierfs disk": ("tierfs", "all", True),
    "tierfs warm": ("tierfs", "pages", True),
    "nullfs": ("nullfs", "all", True),
    "nullfs warm": ("nullfs", "pages", True),
}


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tools.bench_fuseops", description=__doc__.splitlines()[0])
    p.add_argument("--files", type=int, default=1000, help="number of small files (default 1000)")
    p.add_argument("--size", type=parse_size, default=110 * 1024, help="size of each (default 110K)")
    p.add_argument("--threads", type=int, default=8, help="reader threads (default 8)")
    p.add_argument("--ops", action="store_true", help="also count the FUSE requests per file (strace)")
    p.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated rows of: {', '.join(ROWS)}")
    p.add_argument("--repeat", type=int, default=1, help="passes of the warm rows (default 1)")
    p.add_argument(
        "--py-spy", type=Path, metavar="DIR", help="py-spy --native each CPU pass into DIR/<row>.raw"
    )
    p.add_argument("--json-out", type=Path, help="also write the report as JSON here")
    p.add_argument("--tierfs-arg", action="append", default=[], metavar="ARG", help="extra mount argument")
    args = p.parse_args(argv)
    rows = {r.strip() for r in args.rows.split(",")}
    dataset = Dataset(args.files, args.size, 0, 0)
    keys = dataset.small_keys()
    workdir = Path(tempfile.mkdtemp(prefix="tierfs-bench-fuseops-", dir="/var/tmp"))
    report: dict[str, dict[str, object]] = {}
    try:
        with contextlib.ExitStack() as stack:
            systems: dict[str, MountSystem] = {"nullfs": NullSystem(workdir, dataset, keep_cache=False)}
            if any(ROWS[row][0] == "tierfs" for row in rows if row in ROWS):  # nullfs needs no bucket
                server = stack.enter_context(seeded_seaweed(workdir, BUCKET, dataset))
                systems = {
                    "tierfs": TierfsSystem(workdir, server.endpoint_url, BUCKET, args.tierfs_arg),
                    **systems,
                }
            for name, system in systems.items():
                mine = [row for row, (of, _, _) in ROWS.items() if of == name and row in rows]
                for kind in ("cpu", "ops") if args.ops else ("cpu",):
                    if not mine:
                        break
                    with system.mounted(fresh=True) as mounted:
                        if name == "tierfs":
                            warm_listings(mounted.path)  # the rows measure data, not listings
                            if "tierfs cold" not in mine:  # the other rows read cached data
                                read_small(mounted.path, keys, args.threads, True)
                        for row in mine:
                            _, how, repeats = ROWS[row]
                            if kind == "cpu":
                                profile = (
                                    args.py_spy / f"{row.replace(' ', '-')}.raw" if args.py_spy else None
                                )
                                measured = cpu_pass(
                                    mounted, keys, args.threads, how=how,
                                    repeat=args.repeat if repeats else 1, profile=profile,
                                )  # fmt: skip
                                report.setdefault(row, {}).update(measured)
                            else:
                                trace = workdir / f"{row.replace(' ', '-')}.trace"
                                ops = ops_pass(mounted, keys, args.threads, how, trace)
                                report.setdefault(row, {})["requests_per_file"] = ops
                            log(f"{row:12} {report[row]}")
                system.cleanup()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    print(f"load average {os.getloadavg()}")
    if args.json_out is not None:
        dump = {"files": args.files, "size": args.size, "loadavg": os.getloadavg(), "rows": report}
        args.json_out.write_text(json.dumps(dump, indent=2) + "\n")
    for row, values in report.items():
        print(f"{row:12} {values}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
