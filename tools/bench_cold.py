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
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from tierfs.units import parse_size
from tools.bench import Mounted, TierfsSystem
from tools.bench_workloads import (
    Dataset,
    Measure,
    MiB,
    UsageMeter,
    bench_client,
    boto3_sequential,
    boto3_small,
    drop_caches,
    log,
    rate,
    read_sequential,
    read_small,
    seed,
)
from tools.crt_baseline import crt_small
from tools.servers import ACCESS_KEY, REGION, SECRET_KEY, SeaweedFS, child_env

REPO_ROOT = Path(__file__).resolve().parent.parent
BUCKET = "tierfs-bench-cold"


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


def strace_counts(pid: int) -> subprocess.Popen[str] | None:
    """``strace -f -c -p PID`` running until it is interrupted (None: strace is not installed)."""
    strace = shutil.which("strace")
    if strace is None:
        return None
    return subprocess.Popen(
        [strace, "-f", "-c", "-p", str(pid)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )


def syscalls_per_item(trace: subprocess.Popen[str] | None, items: int) -> dict[str, float]:
    """Stop a ``strace -c`` and return its call counts divided by ``items`` (the largest ten)."""
    if trace is None:
        return {}
    trace.send_signal(signal.SIGINT)
    _, table = trace.communicate(timeout=60)
    counts: dict[str, float] = {}
    for line in table.splitlines():
        parts = line.split()
        # "% time seconds usecs/call calls [errors] syscall": the name is last, the calls fourth
        if len(parts) >= 5 and parts[0][0].isdigit() and parts[-1] != "total":
            counts[parts[-1]] = round(int(parts[3]) / max(items, 1), 2)
    return dict(sorted(counts.items(), key=lambda kv: -kv[1])[:10])


def py_spy(pid: int, out: Path) -> subprocess.Popen[bytes] | None:
    """``py-spy record --threads --idle`` of the daemon into ``out`` (raw, collapsed stacks) until
    interrupted; None when py-spy is not installed (``pip install py-spy``)."""
    spy = shutil.which("py-spy") or shutil.which("py-spy", path=str(Path(sys.executable).parent))
    if spy is None:
        return None
    command = [spy, "record", "--threads", "--idle", "-r", "200", "-f", "raw", "-o", str(out), "-p", str(pid)]
    return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def thread_cpu(pid: int) -> dict[str, float]:
    """CPU seconds of each of the daemon's live threads, summed by thread name (digits dropped:
    "tierfs-s3_3" and "tierfs-s3_5" are one kind). Threads that ended are missing: the difference
    from the process total is theirs."""
    ticks = os.sysconf("SC_CLK_TCK")
    out: dict[str, float] = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            name = (task / "comm").read_text().strip()
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        kind = re.sub(r"\d+", "N", name)
        out[kind] = out.get(kind, 0.0) + (int(fields[11]) + int(fields[12])) / ticks
    return out


def daemon_row(
    mounted: Mounted,
    status: Callable[[], dict[str, Any]],
    run: Callable[[], Measure],
    *,
    per: str,
    trace: bool,
    profile: Path | None = None,
) -> Measure:
    """``run()`` while the daemon's CPU, peak RSS, GETs in flight (and with ``trace`` its syscalls)
    are measured; they go into the Measure's ``extra``. ``per`` is "file" or "MiB"."""
    tracer = strace_counts(mounted.pid) if trace else None
    spy = py_spy(mounted.pid, profile) if profile is not None else None
    if tracer is not None or spy is not None:
        time.sleep(1.0)  # the tracers attach to every thread before the phase starts
    before = thread_cpu(mounted.pid)
    with UsageMeter(mounted.pid) as meter:
        result = run()
    after = thread_cpu(mounted.pid)
    items = result.items if per == "file" else max(1, result.nbytes) / MiB
    calls = syscalls_per_item(tracer, int(items))
    if spy is not None:
        spy.send_signal(signal.SIGINT)  # py-spy writes its samples when interrupted
        spy.wait(60)
    done = status()
    usage = meter.usage
    if usage is not None:
        result.extra["daemon_cpu_ms_per_" + per.lower()] = round(usage.cpu_seconds * 1000 / items, 3)
        result.extra["daemon_peak_rss_mib"] = usage.peak_rss_mib
    result.extra["gets_in_flight_peak"] = done.get("s3_gets_in_flight_peak")
    result.extra["s3_get_requests"] = done.get("s3_get_requests")
    if calls:
        result.extra["syscalls_per_" + per.lower()] = calls
    by_thread = {k: round((v - before.get(k, 0.0)) * 1000 / items, 3) for k, v in after.items()}
    result.extra["cpu_ms_by_thread"] = {
        k: v for k, v in sorted(by_thread.items(), key=lambda kv: -kv[1]) if v
    }
    return result


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tools.bench_cold", description=__doc__.splitlines()[0])
    p.add_argument("--files", type=int, default=2000, help="number of small files (default 2000)")
    p.add_argument("--size", type=parse_size, default=110 * 1024, help="size of each (default 110K)")
    p.add_argument("--threads", type=int, default=8, help="reader threads and boto3 threads (default 8)")
    p.add_argument("--jobs", type=int, default=16, help="tierfs prefetch --jobs (default 16)")
    p.add_argument(
        "--large", type=parse_size, default=256 << 20,
        help="size of the one large file read sequentially (default 256M; 2G is the model-load row; 0 skips)",
    )  # fmt: skip
    p.add_argument(
        "--streams", type=int, default=8, help="boto3 ranged streams of the large file (default 8)"
    )
    p.add_argument("--strace", action="store_true", help="count the daemon's syscalls per file and per MiB")
    p.add_argument(
        "--py-spy", type=Path, metavar="DIR", help="py-spy record each tierfs phase into DIR/<row>.raw"
    )
    p.add_argument(
        "--rows", default="crt16,boto3,aws cp,tierfs read,tierfs prefetch,boto3 large,tierfs large",
        help="comma-separated rows to run (default all)",
    )  # fmt: skip
    p.add_argument(
        "--tierfs-arg", action="append", default=[], metavar="ARG", help="extra `tierfs mount` argument"
    )
    p.add_argument(
        "--json-out", type=Path, help="JSON output (default bench-out/bench-cold-<timestamp>.json)"
    )
    args = p.parse_args(argv)
    rows = {r.strip() for r in args.rows.split(",")}
    dataset = Dataset(args.files, args.size, 1 if args.large else 0, args.large)
    keys = dataset.small_keys()
    results: dict[str, Measure] = {}
    workdir = Path(tempfile.mkdtemp(prefix="tierfs-bench-cold-", dir="/var/tmp"))
    try:
        with SeaweedFS(workdir / "seaweed") as server:
            client = bench_client(server.endpoint_url)
            client.create_bucket(Bucket=BUCKET)
            log(f"seeding {args.files} files and a {args.large >> 20} MiB file")
            seed(client, BUCKET, dataset)

            def measure(name: str, fn: Callable[[], Measure | None]) -> None:
                if name not in rows:
                    return
                drop_caches()
                result = fn()
                if result is not None:
                    results[name] = result
                    log(
                        f"{name:16} {result.value:10.1f} {result.unit} ({result.seconds:.2f}s) {result.extra}"
                    )

            measure("crt16", lambda: crt_small(server.endpoint_url, BUCKET, keys))
            measure("boto3", lambda: boto3_small(client, BUCKET, keys, args.threads))
            measure(
                "aws cp", lambda: aws_cp(server.endpoint_url, BUCKET, "small/", workdir / "cp", len(keys))
            )
            if args.large:
                large = dataset.shard_keys()
                measure(
                    "boto3 large", lambda: boto3_sequential(client, BUCKET, large, args.large, args.streams)
                )
            mount = TierfsSystem(workdir, server.endpoint_url, BUCKET, args.tierfs_arg)
            phases: list[tuple[str, str, Callable[[Path], Measure]]] = [
                ("tierfs read", "file", lambda m: read_small(m, keys, args.threads, True)),
                (
                    "tierfs prefetch",
                    "file",
                    lambda m: tierfs_prefetch(mount, m / "small", len(keys), args.jobs),
                ),
            ]
            if args.large:
                phases.append(
                    ("tierfs large", "MiB", lambda m: read_sequential(m, dataset.shard_keys(), True))
                )
            for name, per, run in phases:
                if name not in rows:
                    continue
                with mount.mounted(fresh=True) as mounted:
                    if per == "file":
                        os.listdir(mounted.path / "small")  # listings warm: the phase measures data
                        for sub in os.listdir(mounted.path / "small"):
                            os.listdir(mounted.path / "small" / sub)
                    spy_out = args.py_spy / f"{name.replace(' ', '-')}.raw" if args.py_spy else None
                    measure(
                        name,
                        lambda run=run, mounted=mounted, per=per, spy_out=spy_out: daemon_row(  # type: ignore[misc]
                            mounted,
                            mount.status,
                            lambda: run(mounted.path),
                            per=per,
                            trace=args.strace,
                            profile=spy_out,
                        ),
                    )
            mount.cleanup()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    print(render(results))
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out = args.json_out or REPO_ROOT / "bench-out" / f"bench-cold-{stamp}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    report = {
        "dataset": {"files": args.files, "size": args.size, "large": args.large},
        "cpus": os.cpu_count(),
        "loadavg": os.getloadavg(),
        "results": {k: vars(v) for k, v in results.items()},
    }
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nJSON written to {out}")
    return 0


def render(results: dict[str, Measure]) -> str:
    """One line per row: its rate, MiB/s, the ratio to its baseline (crt16 for small files, boto3's
    ranged streams for the large file) and the daemon's CPU per file or per MiB."""
    lines = [
        f"{'row':16} {'rate':>12} {'MiB/s':>8} {'x base':>7} {'cpu ms':>12} {'rss MiB':>8} {'in flight':>9}"
    ]
    lines.append("-" * 80)
    for name, m in results.items():
        base = results.get("boto3 large" if "large" in name else "crt16")
        ratio = m.value / base.value if base is not None and base.value > 0 else None
        mib = m.nbytes / m.seconds / MiB if m.seconds > 0 else 0.0
        cpu = m.extra.get("daemon_cpu_ms_per_file") or m.extra.get("daemon_cpu_ms_per_mib")
        per = "/file" if "daemon_cpu_ms_per_file" in m.extra else "/MiB"
        cpu_shown = "-" if cpu is None else f"{cpu:.2f}{per}"
        rss = m.extra.get("daemon_peak_rss_mib", "-")
        flight = m.extra.get("gets_in_flight_peak", "-")
        shown = "-" if ratio is None else f"{ratio:.2f}"
        rate_shown = f"{m.value:,.0f} {m.unit.split('/')[0]}/s"
        lines.append(
            f"{name:16} {rate_shown:>12} {mib:8,.1f} {shown:>7} {cpu_shown:>12} {rss!s:>8} {flight!s:>9}"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
