"""tierfs benchmark: the same dataset read through local disk, raw boto3, tierfs, s3fs and rclone.

``make bench`` (``python -m tools.bench``) starts a SeaweedFS gateway in a temporary
directory (or uses ``--endpoint-url``), seeds an ImageNet-like dataset, and measures every
system in the same run, so that the ratios compare like with like on this machine at
this moment. The workloads themselves live in :mod:`tools.bench_workloads`; this module
mounts and unmounts the systems, sequences cold and warm phases, and prints the report.

Cold means: fresh cache directory, fresh mount, page cache dropped. Warm on disk means:
same cache directory, remounted, page cache dropped. Warm page cache means: read again
without dropping anything. Numbers are wall-clock (``time.perf_counter``); nothing here
asserts on them — the PASS/MISS column only compares them with the targets.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib.util
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import botocore.exceptions

from tierfs.units import format_bytes, parse_size
from tools.bench_loaders import NO_HINTS, Skipped, hint_call, loader_epoch
from tools.bench_workloads import (
    Dataset,
    Measure,
    MiB,
    UsageMeter,
    aws_cli,
    aws_copy,
    bench_client,
    boto3_list,
    boto3_random,
    boto3_sequential,
    boto3_small,
    dataset_present,
    download,
    drop_caches,
    epoch_one,
    is_root,
    log,
    random_pread,
    read_sequential,
    read_small,
    run_quiet,
    seed,
    stat_tree,
    wait_for,
)
from tools.crt_baseline import crt_large, crt_small
from tools.servers import (
    ACCESS_KEY,
    REGION,
    SECRET_KEY,
    SeaweedFS,
    child_env,
    force_unmount,
    is_fuse_mounted,
    terminate_process_group,
)

REPO_ROOT = Path(__file__).resolve().parent.parent
MOUNT_TIMEOUT = 60.0

# (key, label) in report order; the numbers are the workloads of the issue.
WORKLOADS: list[tuple[str, str]] = [
    ("stat_cold", "1 stat every entry, cold"),
    ("stat_remount", "1b stat every entry, remount"),
    ("small_cold", "2 small files, cold"),
    ("large_cold", "3 large sequential, cold"),
    ("pread_warm", "4 128K random pread, warm"),
    ("small_warm_disk", "5 small files, warm on disk"),
    ("large_warm_disk", "6 large seq, warm on disk"),
    ("small_warm_page", "7 small files, warm page cache"),
    ("loader_cold", "8a DataLoader, files, cold"),
    ("loader_warm", "8b DataLoader, files, warm disk"),
    ("loader_direct_cold", "8c DataLoader, tierfs dataset, cold"),
    ("loader_hints_cold", "8d DataLoader, dataset + hints, cold"),
    ("epoch_one", "9 epoch one, s (local: copy-first)"),
    ("model_cold", "10 model load, cold"),
]
# Workloads whose value is in seconds: lower is better.
SECONDS_WORKLOADS = frozenset({"epoch_one"})
SYSTEMS = ("local", "boto3", "crt", "nullfs", "tierfs", "s3fs", "rclone", "s3torch")
# The FUSE clients whose daemon CPU and RSS are compared (issue 21).
DAEMONS = ("tierfs", "s3fs", "rclone")
PEERS = ("s3fs", "rclone")
RSS_LIMIT_MIB = 300.0


@dataclass(frozen=True)
class Target:
    """tierfs's ``metric`` on ``workload`` must reach ``factor`` times the best of ``baselines``' on
    ``baseline_workload`` (default: the same workload); strictly more if ``strict``.

    Metrics: ``value`` (the row's number: a rate, or seconds for :data:`SECONDS_WORKLOADS`),
    ``cpu_item`` / ``cpu_mib`` (daemon CPU per file / per MiB of the phase, lower is better).
    The ratio is always "how many times better tierfs did", so every target reads ``ratio >= factor``.
    """

    label: str
    workload: str
    baselines: tuple[str, ...]
    factor: float
    metric: str = "value"
    baseline_workload: str | None = None
    strict: bool = False


TARGETS = [
    # Issue 21: the first epoch.
    Target("small cold, mount >= 1.5x max(s3fs, rclone)", "small_cold", PEERS, 1.5),
    Target("small cold, mount >= 1.0x boto3 8 threads", "small_cold", ("boto3",), 1.0),
    Target("large seq cold >= 0.9x boto3 8 ranged streams", "large_cold", ("boto3",), 0.9),
    Target("large seq cold >= 1.5x max(s3fs, rclone)", "large_cold", PEERS, 1.5),
    Target("model load cold >= 0.9x boto3 8 ranged streams", "model_cold", ("boto3",), 0.9),
    Target("model load cold >= 1.5x max(s3fs, rclone)", "model_cold", PEERS, 1.5),
    Target("daemon CPU per cold file <= s3fs", "small_cold", ("s3fs",), 1.0, metric="cpu_item"),
    Target("daemon CPU per cold MiB (large) <= s3fs", "large_cold", ("s3fs",), 1.0, metric="cpu_mib"),
    Target("daemon CPU per cold MiB (model) <= s3fs", "model_cold", ("s3fs",), 1.0, metric="cpu_mib"),
    Target("DataLoader cold, mount >= 1.0x s3torchconnector", "loader_cold", ("s3torch",), 1.0),
    Target(
        "DataLoader cold, dataset+hints >= 1.5x s3torch",
        "loader_hints_cold",
        ("s3torch",),
        1.5,
        baseline_workload="loader_cold",
    ),
    Target("epoch one >= 1.2x copy-first", "epoch_one", ("local",), 1.2),
    # Earlier issues (warm paths), kept so a regression shows.
    Target("small warm page cache >= 0.8x local", "small_warm_page", ("local",), 0.8),
    Target("small warm on disk >= 0.5x local", "small_warm_disk", ("local",), 0.5),
    Target("large seq warm on disk >= 0.7x local", "large_warm_disk", ("local",), 0.7),
    Target("random pread warm >= 0.5x local", "pread_warm", ("local",), 0.5),
    Target("stat cold >= 0.5x local", "stat_cold", ("local",), 0.5),
    Target("small warm page cache >= 0.9x nullfs", "small_warm_page", ("nullfs",), 0.9),
    Target("small warm on disk >= 0.8x nullfs", "small_warm_disk", ("nullfs",), 0.8),
]


# --------------------------------------------------------------------------- mounted systems


@dataclass
class Mounted:
    """A live mount: where it is, which process serves it, and how long mounting took."""

    path: Path
    pid: int
    mount_seconds: float


class MountSystem:
    """A FUSE client run as a foreground child in its own session, so we always hold its pid.

    Subclasses say how to build the command; ``fresh`` gives the client an empty cache
    directory (cold), otherwise the previous one is reused (warm on disk).
    """

    name = "mount"

    def __init__(self, workdir: Path, endpoint_url: str, bucket: str) -> None:
        self.workdir = workdir
        self.endpoint_url = endpoint_url
        self.bucket = bucket
        self.mountpoint = workdir / f"mnt-{self.name}"
        self.mountpoint.mkdir(parents=True, exist_ok=True)
        self.log_path = workdir / f"{self.name}.log"
        self._generation = 0
        self.cache_dir = self._cache_path()

    def _cache_path(self) -> Path:
        return self.workdir / f"cache-{self.name}-{self._generation}"

    def _new_cache(self) -> None:
        """A fresh, empty cache directory; the previous one is deleted so runs do not fill the disk."""
        shutil.rmtree(self.cache_dir, ignore_errors=True)
        self._generation += 1
        self.cache_dir = self._cache_path()
        self.cache_dir.mkdir(parents=True)

    def command(self) -> list[str]:
        raise NotImplementedError

    def env(self) -> dict[str, str]:
        return child_env()

    def launch(self) -> subprocess.Popen[bytes]:
        """Start the mount command in its own session, its output appended to the log."""
        with self.log_path.open("ab") as log_file:
            log_file.write(f"\n=== {' '.join(self.command())}\n".encode())
            log_file.flush()
            return subprocess.Popen(
                self.command(),
                env=self.env(),
                cwd=REPO_ROOT,
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def start(self) -> tuple[subprocess.Popen[bytes], int]:
        """Launch the client; returns the launched process and the pid of the serving daemon."""
        proc = self.launch()
        try:
            wait_for(
                lambda: is_fuse_mounted(self.mountpoint),
                MOUNT_TIMEOUT,
                f"{self.name} mount",
                alive=lambda: proc.poll() is None,
            )
        except RuntimeError as exc:
            terminate_process_group(proc)
            raise RuntimeError(f"{exc}\n{self.log_tail()}") from None
        return proc, proc.pid

    def unmount(self) -> None:
        run_quiet(["fusermount3", "-u", str(self.mountpoint)])

    def stop(self, proc: subprocess.Popen[bytes], pid: int) -> None:
        """Unmount (cleanly if possible, forcibly otherwise), then stop the daemon by pid."""
        with contextlib.suppress(Exception):
            self.unmount()
        force_unmount(self.mountpoint)
        if proc.poll() is None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(10)
            terminate_process_group(proc, grace=5.0)
        if pid != proc.pid:
            _stop_pid(pid)

    @contextlib.contextmanager
    def mounted(self, fresh: bool) -> Iterator[Mounted]:
        if fresh:
            self._new_cache()
        start = time.perf_counter()
        proc, pid = self.start()
        try:
            yield Mounted(self.mountpoint, pid, time.perf_counter() - start)
        finally:
            self.stop(proc, pid)

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return ""

    def cleanup(self) -> None:
        force_unmount(self.mountpoint)
        shutil.rmtree(self.cache_dir, ignore_errors=True)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def _stop_pid(pid: int, grace: float = 10.0) -> None:
    """Wait for a daemon we do not parent to exit; SIGTERM and then SIGKILL it if it lingers."""
    for sig in (None, signal.SIGTERM, signal.SIGKILL):
        if sig is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + grace
        while _pid_alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        if not _pid_alive(pid):
            return


class TierfsSystem(MountSystem):
    """``python -m tierfs mount`` in daemon mode, exactly as a user runs it; read-only for the benchmark."""

    name = "tierfs"

    def __init__(self, workdir: Path, endpoint_url: str, bucket: str, extra_args: Sequence[str] = ()) -> None:
        super().__init__(workdir, endpoint_url, bucket)
        self.extra_args = list(extra_args)

    def command(self) -> list[str]:
        return [
            sys.executable,
            "-m",
            "tierfs",
            "mount",
            f"s3://{self.bucket}",
            str(self.mountpoint),
            "--endpoint-url",
            self.endpoint_url,
            "--cache-dir",
            str(self.cache_dir),
            "--log-file",
            str(self.log_path),
            "--read-only",
            *self.extra_args,
        ]

    def start(self) -> tuple[subprocess.Popen[bytes], int]:
        """Daemon mode: the command exits 0 once the mount is live; the daemon's pid comes from status."""
        proc = self.launch()
        try:
            code = proc.wait(MOUNT_TIMEOUT)
        except subprocess.TimeoutExpired:
            terminate_process_group(proc)
            force_unmount(self.mountpoint)
            raise RuntimeError(
                f"tierfs mount did not return in {MOUNT_TIMEOUT} s\n{self.log_tail()}"
            ) from None
        if code != 0 or not is_fuse_mounted(self.mountpoint):
            force_unmount(self.mountpoint)
            raise RuntimeError(f"tierfs mount failed ({code})\n{self.log_tail()}")
        return proc, self.daemon_pid()

    def daemon_pid(self) -> int:
        result = self._tierfs("status", str(self.mountpoint), "--json")
        if result.returncode != 0:
            raise RuntimeError(f"tierfs status failed: {result.stderr}")
        return int(json.loads(result.stdout)["pid"])

    def status(self) -> dict[str, Any]:
        result = self._tierfs("status", str(self.mountpoint), "--json")
        return dict(json.loads(result.stdout)) if result.returncode == 0 else {}

    def unmount(self) -> None:
        self._tierfs("umount", str(self.mountpoint))

    def _tierfs(self, *args: str) -> subprocess.CompletedProcess[str]:
        return run_quiet([sys.executable, "-m", "tierfs", *args], env=child_env())


class NullSystem(MountSystem):
    """tools.nullfs, the do-nothing pyfuse3 filesystem: the binding's ceiling for the small-file rows.

    With ``keep_cache`` it stands for page-cache hits; without, every READ reaches the daemon,
    which is what tierfs's warm-on-disk row pays on top of its own work.
    """

    name = "nullfs"

    def __init__(self, workdir: Path, dataset: Dataset, keep_cache: bool) -> None:
        super().__init__(workdir, "", "")
        self.dataset = dataset
        self.keep_cache = keep_cache

    def command(self) -> list[str]:
        command = [sys.executable, "-m", "tools.nullfs", str(self.mountpoint)]
        command += ["--files", str(self.dataset.small_files), "--size", str(self.dataset.small_size)]
        return command + (["--keep-cache"] if self.keep_cache else [])


class S3fsSystem(MountSystem):
    """s3fs-fuse with its defaults (no local disk cache), path-style requests to the loopback gateway."""

    name = "s3fs"
    binary = "/usr/bin/s3fs"

    def command(self) -> list[str]:
        passwd = self.workdir / "s3fs.passwd"
        passwd.write_text(f"{ACCESS_KEY}:{SECRET_KEY}\n")
        passwd.chmod(0o600)  # s3fs refuses a credentials file others can read
        opts = f"url={self.endpoint_url},use_path_request_style,passwd_file={passwd},endpoint={REGION}"
        return [self.binary, self.bucket, str(self.mountpoint), "-f", "-o", opts]


class RcloneSystem(MountSystem):
    """``rclone mount`` with a full VFS disk cache in our cache directory (its best mode for re-reads)."""

    name = "rclone"
    binary = "/usr/bin/rclone"

    def command(self) -> list[str]:
        config = self.workdir / "rclone.conf"
        config.write_text(
            "[bench]\ntype = s3\nprovider = Other\n"
            f"access_key_id = {ACCESS_KEY}\nsecret_access_key = {SECRET_KEY}\n"
            f"endpoint = {self.endpoint_url}\nregion = {REGION}\nforce_path_style = true\n"
        )
        return [
            self.binary,
            "mount",
            f"bench:{self.bucket}",
            str(self.mountpoint),
            "--config",
            str(config),
            "--vfs-cache-mode",
            "full",
            "--cache-dir",
            str(self.cache_dir),
            "--read-only",
        ]

    def env(self) -> dict[str, str]:
        env = child_env()
        env.pop("AWS_CA_BUNDLE", None)  # rclone fails to load a proxy bundle even for plain HTTP
        return env


# --------------------------------------------------------------------------- the run


@dataclass
class Options:
    threads: int
    workers: int
    preads: int
    workdir: Path
    endpoint_url: str = ""
    loader_systems: tuple[str, ...] = ("local", "tierfs", "s3fs", "rclone")


@dataclass
class Report:
    """Everything a run measured; serialised as the JSON output."""

    started: str
    dataset: dict[str, int]
    machine: dict[str, Any]
    options: dict[str, Any]
    seed_seconds: float | None = None
    download_seconds: float | None = None
    download_tool: str | None = None
    results: dict[str, dict[str, dict[str, Any]]] = field(default_factory=dict)
    usage: list[dict[str, Any]] = field(default_factory=list)
    tierfs_status: dict[str, Any] = field(default_factory=dict)
    targets: list[dict[str, Any]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def record(self, workload: str, system: str, measure: Measure | None) -> None:
        """Keep one row's measure; None (a skipped row) keeps nothing."""
        if measure is None:
            return
        self.results.setdefault(workload, {})[system] = asdict(measure)
        log(f"{system:7} {workload:16} {measure.value:>10.1f} {measure.unit} ({measure.seconds:.2f} s)")

    def value(self, workload: str, system: str) -> float | None:
        entry = self.results.get(workload, {}).get(system)
        return None if entry is None else float(entry["value"])

    def phase_usage(self, workload: str, system: str) -> dict[str, Any] | None:
        return next((u for u in self.usage if u["system"] == system and u["phase"] == workload), None)

    def cpu_ms(self, workload: str, system: str, per: str) -> float | None:
        """The daemon's CPU milliseconds per file (``per="item"``) or per MiB (``"mib"``) in one phase."""
        u = self.phase_usage(workload, system)
        if u is None:
            return None
        amount = float(u["items"] if per == "item" else u["nbytes"] / MiB)
        return 1000.0 * float(u["cpu_seconds"]) / amount if amount > 0 else None

    def metric(self, metric: str, workload: str, system: str) -> float | None:
        """A target's metric; see :class:`Target`."""
        if metric == "value":
            return self.value(workload, system)
        return self.cpu_ms(workload, system, metric.removeprefix("cpu_"))

    def peak_rss(self, system: str) -> tuple[float, str] | None:
        """The highest per-phase peak RSS of ``system``'s daemon, and the phase it was reached in."""
        peaks = [(u["peak_rss_mib"], u["phase"]) for u in self.usage if u["system"] == system]
        return max(peaks) if peaks else None


# Status values that are levels or settings, not counters: reported as they are after the phase.
_STATUS_LEVELS = frozenset(
    {
        "pid",
        "uptime_seconds",
        "metadata_ttl",
        "hit_ratio",
        "compression_ratio",
        "cache_limit_bytes",
        "cache_free_disk_bytes",
    }
)


def counter_delta(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    """Status after a phase, with every counter turned into "how much during the phase"."""
    out: dict[str, Any] = {}
    for key, value in after.items():
        prior = before.get(key)
        is_number = isinstance(value, int | float) and not isinstance(value, bool)
        counts = is_number and isinstance(prior, int | float) and key not in _STATUS_LEVELS
        out[key] = value - prior if counts else value
    return out


class Runner:
    """Runs every workload on every system in one process, against one dataset."""

    def __init__(self, report: Report, dataset: Dataset, opts: Options, client: Any, bucket: str) -> None:
        self.report = report
        self.dataset = dataset
        self.opts = opts
        self.client = client
        self.bucket = bucket

    def skipped(self, system: str, workload: str, reason: str) -> None:
        """A row that cannot run here: a warning in the report, with the reason."""
        self.report.warnings.append(f"{system} {workload} skipped: {reason}")
        log(f"{system} {workload} skipped: {reason}")

    def loader(self, kind: str, root: Path | None, dropped: bool) -> Measure:
        """One cold or warm DataLoader epoch over the small files (see tools.bench_loaders)."""
        o = self.opts
        return loader_epoch(
            kind,
            self.dataset.small_keys(),
            o.workdir,
            o.workers,
            dropped,
            root=root,
            endpoint_url=o.endpoint_url,
            bucket=self.bucket,
        )

    def timed(
        self,
        system: str,
        workload: str,
        pid: int | None,
        fn: Callable[[bool], Measure],
        drop: bool = True,
        probe: Callable[[], dict[str, Any]] | None = None,
    ) -> Measure | None:
        """Run one workload (dropping the page cache first unless told not to) and meter the daemon.

        ``probe`` (tierfs's status) is sampled around the phase, so the JSON shows how many
        GETs, LISTs and cache hits each number came from. A row that cannot run here
        (:class:`Skipped`) is recorded as a warning with its reason, and gives None.
        """
        dropped = drop_caches() if drop else False
        before = probe() if probe is not None else {}
        try:
            with UsageMeter(pid) as meter:
                measure = fn(dropped)
        except Skipped as exc:
            self.skipped(system, workload, str(exc))
            return None
        self.report.record(workload, system, measure)
        if meter.usage is not None:
            self.report.usage.append(
                {
                    "system": system,
                    "phase": workload,
                    "items": measure.items,
                    "nbytes": measure.nbytes,
                    **asdict(meter.usage),
                }
            )
        if probe is not None:
            self.report.tierfs_status[workload] = counter_delta(before, probe())
        return measure

    # -- local ---------------------------------------------------------------------

    def run_local(self, local: Path) -> None:
        """Local disk: "cold" = page cache dropped; it also stands in for warm-on-disk comparisons."""
        ds, o = self.dataset, self.opts
        aws = aws_cli()
        self.report.download_tool = "aws s3 cp --recursive" if aws else "boto3, 8 threads (no awscli found)"
        log(f"copying the dataset to local disk with {self.report.download_tool} (the copy-first baseline)")
        drop_caches()
        seconds = (
            aws_copy(aws, o.endpoint_url, self.bucket, ["small", "shards"], local)
            if aws
            else download(self.client, self.bucket, ds, local, o.threads)
        )
        self.report.download_seconds = round(seconds, 3)
        log(f"the copy took {self.report.download_seconds:.1f} s")
        # Read right after the download with the page cache warm, as a job would start after it.
        epoch_one(local, ds, o.threads, False)
        read_back = epoch_one(local, ds, o.threads, False)
        total = self.report.download_seconds + read_back.seconds
        self.report.record(
            "epoch_one",
            "local",
            Measure(
                round(total, 3),
                "s",
                round(total, 3),
                read_back.items,
                read_back.nbytes,
                False,
                {"download_seconds": self.report.download_seconds, "read_seconds": read_back.seconds},
            ),
        )
        stat = self.timed("local", "stat_cold", None, lambda d: stat_tree(local, o.threads, d))
        self.report.record("stat_remount", "local", stat)  # for a local disk there is no difference
        small = self.timed(
            "local", "small_cold", None, lambda d: read_small(local, ds.small_keys(), o.threads, d)
        )
        self.timed(
            "local",
            "small_warm_page",
            None,
            lambda d: read_small(local, ds.small_keys(), o.threads, d),
            drop=False,
        )
        large = self.timed("local", "large_cold", None, lambda d: read_sequential(local, ds.shard_keys(), d))
        self.timed(
            "local",
            "pread_warm",
            None,
            lambda d: random_pread(local, ds.shard_keys(), ds.shard_size, o.preads, o.threads, d),
        )
        # On local disk "warm on disk" is just "page cache dropped".
        self.report.record("small_warm_disk", "local", small)
        self.report.record("large_warm_disk", "local", large)
        if "local" in o.loader_systems:
            loader = self.timed("local", "loader_cold", None, lambda d: self.loader("files", local, d))
            self.report.record("loader_warm", "local", loader)

    # -- boto3 ---------------------------------------------------------------------

    def run_boto3(self) -> None:
        """Raw parallel GETs: the ceiling of a client with no cache; every read goes to the server."""
        ds, o, c, b = self.dataset, self.opts, self.client, self.bucket
        self.timed("boto3", "stat_cold", None, lambda d: boto3_list(c, b))
        self.timed("boto3", "small_cold", None, lambda d: boto3_small(c, b, ds.small_keys(), o.threads))
        self.timed(
            "boto3",
            "large_cold",
            None,
            lambda d: boto3_sequential(c, b, ds.shard_keys(), ds.shard_size, streams=8),
        )
        self.timed(
            "boto3",
            "pread_warm",
            None,
            lambda d: boto3_random(c, b, ds.shard_keys(), ds.shard_size, o.preads, o.threads),
        )
        if ds.model_size:
            self.timed(
                "boto3",
                "model_cold",
                None,
                lambda d: boto3_sequential(c, b, ds.model_keys(), ds.model_size, streams=8),
            )

    # -- awscrt --------------------------------------------------------------------

    def run_crt(self) -> None:
        """awscrt's S3 client: 16 whole-object GETs in flight, auto-ranged GETs for the large files."""
        ds, o, b = self.dataset, self.opts, self.bucket
        self.timed("crt", "small_cold", None, lambda d: crt_small(o.endpoint_url, b, ds.small_keys(), 16))
        self.timed("crt", "large_cold", None, lambda d: crt_large(o.endpoint_url, b, ds.shard_keys()))
        if ds.model_size:
            self.timed("crt", "model_cold", None, lambda d: crt_large(o.endpoint_url, b, ds.model_keys()))

    # -- s3torchconnector ----------------------------------------------------------

    def run_s3torch(self) -> None:
        """AWS's s3torchconnector S3MapDataset in the same DataLoader: no cache, every sample a GET."""
        self.timed("s3torch", "loader_cold", None, lambda d: self.loader("s3torch", None, d))

    # -- the binding's ceiling -----------------------------------------------------

    def run_nullfs(self, workdir: Path) -> None:
        """The do-nothing filesystem over the same small-file tree, in the two modes tierfs is held to.

        Each mode reads the tree once first, as tierfs's warm rows follow an earlier pass.
        """
        small, o = self.dataset.small_keys(), self.opts
        for keep_cache, workload in ((True, "small_warm_page"), (False, "small_warm_disk")):
            system = NullSystem(workdir, self.dataset, keep_cache)
            with system.mounted(fresh=False) as m:
                read_small(m.path, small, o.threads, False)
                self.timed(
                    "nullfs",
                    workload,
                    m.pid,
                    functools.partial(read_small, m.path, small, o.threads),
                    drop=not keep_cache,
                )
            system.cleanup()

    # -- FUSE mounts ---------------------------------------------------------------

    def run_mount(self, system: MountSystem, epoch: bool) -> None:
        """The cold / warm-on-disk / warm-page-cache sequence for one FUSE client."""
        ds, o, name = self.dataset, self.opts, system.name
        small, shards = ds.small_keys(), ds.shard_keys()
        probe = system.status if isinstance(system, TierfsSystem) else None

        def timed(workload: str, pid: int, fn: Callable[[bool], Measure], drop: bool = True) -> None:
            self.timed(name, workload, pid, fn, drop=drop, probe=probe)

        drop_caches()
        with system.mounted(fresh=True) as m:
            timed("stat_cold", m.pid, lambda d: stat_tree(m.path, o.threads, d))
        with system.mounted(fresh=True) as m:
            timed("small_cold", m.pid, lambda d: read_small(m.path, small, o.threads, d))
        # Same cache directory, remounted within the metadata TTL: what a restarted training job sees.
        with system.mounted(fresh=False) as m:
            timed("stat_remount", m.pid, lambda d: stat_tree(m.path, o.threads, d))
        # Same cache directory: the shards have never been read, so they are still cold.
        with system.mounted(fresh=False) as m:
            timed("large_cold", m.pid, lambda d: read_sequential(m.path, shards, d))
        with system.mounted(fresh=False) as m:
            timed("small_warm_disk", m.pid, lambda d: read_small(m.path, small, o.threads, d))
            timed("small_warm_page", m.pid, lambda d: read_small(m.path, small, o.threads, d), drop=False)
            timed("large_warm_disk", m.pid, lambda d: read_sequential(m.path, shards, d))
            timed(
                "pread_warm",
                m.pid,
                lambda d: random_pread(m.path, shards, ds.shard_size, o.preads, o.threads, d),
            )
        if ds.model_size:
            with system.mounted(fresh=True) as m:
                timed("model_cold", m.pid, lambda d: read_sequential(m.path, ds.model_keys(), d))
        if name in o.loader_systems:
            with system.mounted(fresh=True) as m:
                timed("loader_cold", m.pid, lambda d: self.loader("files", m.path, d))
            with system.mounted(fresh=False) as m:
                timed("loader_warm", m.pid, lambda d: self.loader("files", m.path, d))
        if epoch:
            dropped = drop_caches()  # before mounting, so the mount time is part of the measured epoch
            with system.mounted(fresh=True) as m:
                timed(
                    "epoch_one",
                    m.pid,
                    lambda _: epoch_one(m.path, ds, o.threads, dropped, setup_seconds=m.mount_seconds),
                    drop=False,
                )
        # tierfs's own dataset last: a failing hint call must not cost the rows above.
        if isinstance(system, TierfsSystem):
            for kind, workload in (("direct", "loader_direct_cold"), ("hinted", "loader_hints_cold")):
                if kind == "hinted" and hint_call() is None:  # known here already: spare a mount
                    self.skipped(name, workload, NO_HINTS)
                    continue
                with system.mounted(fresh=True) as m:
                    timed(workload, m.pid, functools.partial(self.loader, kind, m.path))


# --------------------------------------------------------------------------- report


def better(report: Report, workload: str, baseline: str, system: str = "tierfs") -> float | None:
    """How many times better ``system`` did than ``baseline`` on one row (for seconds, the inverse)."""
    ours, theirs = report.value(workload, system), report.value(workload, baseline)
    if ours is None or theirs is None or ours <= 0 or theirs <= 0:
        return None
    return theirs / ours if workload in SECONDS_WORKLOADS else ours / theirs


def target_ratio(report: Report, t: Target) -> tuple[float | None, str | None]:
    """tierfs's ratio to the best measured baseline of ``t``, and which baseline that was."""
    lower_is_better = t.metric != "value" or t.workload in SECONDS_WORKLOADS
    ours = report.metric(t.metric, t.workload, "tierfs")
    theirs = {
        b: v
        for b in t.baselines
        if (v := report.metric(t.metric, t.baseline_workload or t.workload, b)) is not None and v > 0
    }
    if ours is None or ours <= 0 or not theirs:
        return None, None
    best = (min if lower_is_better else max)(theirs, key=lambda b: theirs[b])
    return (theirs[best] / ours if lower_is_better else ours / theirs[best]), best


def evaluate_targets(report: Report) -> None:
    """Every target's ratio and verdict, from the measured numbers only; n/a where one is missing."""
    report.targets = []
    for t in TARGETS:
        r, best = target_ratio(report, t)
        verdict = (
            "n/a" if r is None else ("PASS" if (r > t.factor if t.strict else r >= t.factor) else "MISS")
        )
        report.targets.append(
            {**asdict(t), "against": best, "ratio": None if r is None else round(r, 3), "verdict": verdict}
        )
    peak = report.peak_rss("tierfs")
    report.targets.append(
        {
            "label": f"tierfs daemon peak RSS <= {RSS_LIMIT_MIB:.0f} MiB in every phase",
            "against": None if peak is None else f"{peak[0]:.0f} MiB in {peak[1]}",
            "ratio": None if peak is None else round(RSS_LIMIT_MIB / peak[0], 3),
            "verdict": "n/a" if peak is None else ("PASS" if peak[0] <= RSS_LIMIT_MIB else "MISS"),
        }
    )


def _fmt(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:,.0f}" if value >= 100 else f"{value:,.2f}" if value < 10 else f"{value:,.1f}"


def _table(rows: list[list[str]], left: int = 1) -> list[str]:
    """The first ``left`` columns left-aligned, the numbers right-aligned, a rule under the header."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = [
        "  ".join(
            cell.ljust(w) if i < left else cell.rjust(w)
            for i, (cell, w) in enumerate(zip(row, widths, strict=True))
        )
        for row in rows
    ]
    return [lines[0], "-" * len(lines[0]), *lines[1:]]


def render_targets(report: Report) -> list[str]:
    rows = [["target", "against", "ratio", "verdict"]]
    rows += [[t["label"], t["against"] or "-", _fmt(t["ratio"]), t["verdict"]] for t in report.targets]
    return _table(rows)


# (phase, unit of the CPU row) of the daemon-cost table: per cold file, per cold MiB.
CPU_ROWS = (
    ("small_cold", "item", "ms CPU per cold file (small)"),
    ("loader_cold", "item", "ms CPU per cold file (DataLoader)"),
    ("large_cold", "mib", "ms CPU per cold MiB (large)"),
    ("model_cold", "mib", "ms CPU per cold MiB (model)"),
)


def render_daemons(report: Report, daemons: Sequence[str]) -> list[str]:
    """The FUSE daemons side by side: CPU per cold file and per cold MiB, then peak RSS per phase."""
    if not daemons or not report.usage:
        return []
    lines = ["", "daemon CPU (utime+stime from /proc/PID/stat, before and after each phase)"]
    rows = [["", *daemons]]
    for phase, per, label in CPU_ROWS:
        cells = [_fmt(report.cpu_ms(phase, d, per)) for d in daemons]
        if any(c != "-" for c in cells):
            rows.append([label, *cells])
    lines += _table(rows)
    lines += ["", "daemon peak RSS per phase, MiB (VmHWM after `echo 5 > /proc/PID/clear_refs`)"]
    phases = list(dict.fromkeys(u["phase"] for u in report.usage if u["system"] in daemons))
    rows = [["phase", *daemons]]
    for phase in phases:
        cells = []
        for d in daemons:
            u = report.phase_usage(phase, d)
            cells.append("-" if u is None else f"{u['peak_rss_mib']:.0f}" + ("" if u["peak_reset"] else "*"))
        rows.append([phase, *cells])
    lines += _table(rows)
    if any(not u["peak_reset"] for u in report.usage):
        lines.append("* peak not reset: it covers the daemon's whole life")
    return lines


def render(report: Report, systems: Sequence[str]) -> str:
    """The plain-text report: absolute numbers, ratios of tierfs to each other system, targets."""
    others = [s for s in systems if s != "tierfs"]
    head = ["workload", "unit", *systems, *(f"t/{s}" for s in others)]
    rows = [head]
    for key, label in WORKLOADS:
        entries = report.results.get(key, {})
        if not entries:
            continue
        unit = next(iter(entries.values()))["unit"]
        rows.append(
            [
                label,
                unit,
                *(_fmt(report.value(key, s)) for s in systems),
                *(_fmt(better(report, key, s)) for s in others),
            ]
        )
    lines = [*_table(rows, left=2), ""]
    lines.append(
        "t/X = tierfs relative to X (higher is better; for epoch one, X's seconds / tierfs's seconds)"
    )
    if "local" in systems:
        lines.append(f"local = copy-first: the dataset copied with {report.download_tool}, then read")
    if "nullfs" in systems:
        lines.append(
            "nullfs = the do-nothing pyfuse3 filesystem (tools/nullfs.py): keep_cache in row 7, "
            "every read reaching it in row 5"
        )
    lines.append("")
    lines += render_targets(report)
    lines += render_daemons(report, [s for s in DAEMONS if s in systems])
    for w in report.warnings:
        lines.append(f"WARNING: {w}")
    for e in report.errors:
        lines.append(f"ERROR: {e}")
    return "\n".join(lines)


# --------------------------------------------------------------------------- CLI


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m tools.bench", description=__doc__.splitlines()[0])
    p.add_argument("--endpoint-url", help="use this S3 endpoint instead of starting SeaweedFS")
    p.add_argument("--bucket", default="tierfs-bench", help="bucket to seed / reuse (default tierfs-bench)")
    p.add_argument(
        "--quick", action="store_true", help="smoke-test size: 500 files, 2 x 32 MiB shards, a 64 MiB model"
    )
    p.add_argument("--small-files", type=int, help="number of small files (default 2000)")
    p.add_argument("--small-size", type=parse_size, help="size of a small file (default 110K)")
    p.add_argument("--shards", type=int, help="number of large shards (default 2)")
    p.add_argument("--shard-size", type=parse_size, help="size of a shard (default 256M)")
    p.add_argument(
        "--model-size",
        type=parse_size,
        help="size of the model file of the model-load row, 0: none (default 2G)",
    )
    p.add_argument("--threads", type=int, default=8, help="reader threads (default 8)")
    p.add_argument("--workers", type=int, default=8, help="DataLoader-style worker processes (default 8)")
    p.add_argument("--preads", type=int, help="random 128 KiB preads per run (default 2000; quick 500)")
    p.add_argument(
        "--systems",
        default=",".join(SYSTEMS),
        help="comma list of systems to measure (default: all; s3fs/rclone only if installed)",
    )
    p.add_argument(
        "--tierfs-arg",
        action="append",
        default=[],
        metavar="ARG",
        help="extra argument for `tierfs mount` (repeatable), e.g. --tierfs-arg=--s3-concurrency=32",
    )
    p.add_argument(
        "--workdir", type=Path, help="where caches, mounts and the local copy go (default: a temp dir)"
    )
    p.add_argument("--keep-workdir", action="store_true", help="do not delete the work directory")
    p.add_argument("--json-out", type=Path, help="JSON output (default bench-out/bench-<timestamp>.json)")
    args = p.parse_args(argv)
    # The full size is issue 21's reference: 2,000 x 110 KiB, two 256 MiB shards, a 2 GiB model.
    defaults = (
        (500, 110 * 1024, 2, 32 * MiB, 64 * MiB, 500)
        if args.quick
        else (2000, 110 * 1024, 2, 256 * MiB, 2048 * MiB, 2000)
    )
    for name, default in zip(
        ("small_files", "small_size", "shards", "shard_size", "model_size", "preads"), defaults, strict=True
    ):
        if getattr(args, name) is None:
            setattr(args, name, default)
    return args


def available_systems(requested: str) -> tuple[list[str], list[str]]:
    """The requested systems that can run here, plus a warning for each that cannot."""
    chosen, warnings = [], []
    for name in (s.strip() for s in requested.split(",") if s.strip()):
        if name not in SYSTEMS:
            raise SystemExit(f"unknown system {name!r} (choose from {', '.join(SYSTEMS)})")
        binary = {"s3fs": S3fsSystem.binary, "rclone": RcloneSystem.binary}.get(name)
        if binary is not None and not os.access(binary, os.X_OK):
            warnings.append(f"{name} skipped: {binary} not installed (make bench-deps)")
            continue
        if name == "s3torch" and importlib.util.find_spec("s3torchconnector") is None:
            warnings.append("s3torch skipped: s3torchconnector not installed (make bench-deps)")
            continue
        chosen.append(name)
    return chosen, warnings


@contextlib.contextmanager
def s3_endpoint(args: argparse.Namespace, workdir: Path) -> Iterator[str]:
    """The given endpoint, or a SeaweedFS started for this run and stopped afterwards."""
    if args.endpoint_url:
        yield args.endpoint_url
        return
    log("starting SeaweedFS")
    with SeaweedFS(workdir / "seaweed") as server:
        yield server.endpoint_url


def prepare_bucket(client: Any, bucket: str, dataset: Dataset, report: Report) -> None:
    """Seed the bucket unless it already holds exactly this dataset; refuse to mix datasets."""
    try:  # HEAD, not ListBuckets: a gateway lists only the buckets of the listing identity
        client.head_bucket(Bucket=bucket)
    except botocore.exceptions.ClientError:
        client.create_bucket(Bucket=bucket)
    else:
        if dataset_present(client, bucket, dataset):
            log(f"bucket {bucket} already holds this dataset: not re-seeding")
            return
        if client.list_objects_v2(Bucket=bucket, MaxKeys=1).get("KeyCount", 0):
            raise SystemExit(f"bucket {bucket} holds other data; choose another --bucket")
    log(
        f"seeding {dataset.small_files} x {format_bytes(dataset.small_size)} + "
        f"{dataset.shards} x {format_bytes(dataset.shard_size)} + a {format_bytes(dataset.model_size)} model"
    )
    report.seed_seconds = round(seed(client, bucket, dataset), 3)
    log(f"seeded in {report.seed_seconds:.1f} s")


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    systems, warnings = available_systems(args.systems)
    dataset = Dataset(args.small_files, args.small_size, args.shards, args.shard_size, args.model_size)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    json_out = args.json_out or REPO_ROOT / "bench-out" / f"bench-{stamp}.json"
    if not is_root():
        warnings.append("not root: page cache not dropped, cold and on-disk numbers are optimistic")
    report = Report(
        started=stamp,
        dataset=asdict(dataset),
        machine={
            "cpus": os.cpu_count(),
            "kernel": platform.release(),
            "python": platform.python_version(),
            "root": is_root(),
            "loadavg_at_start": os.getloadavg(),
        },
        options={k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        warnings=warnings,
    )
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="tierfs-bench-", dir="/var/tmp"))
    workdir.mkdir(parents=True, exist_ok=True)
    opts = Options(args.threads, args.workers, args.preads, workdir)
    mounts: list[MountSystem] = []
    try:
        with s3_endpoint(args, workdir) as endpoint:
            client = bench_client(endpoint)
            opts.endpoint_url = endpoint
            prepare_bucket(client, args.bucket, dataset, report)
            runner = Runner(report, dataset, opts, client, args.bucket)
            factories: dict[str, Callable[[], MountSystem]] = {
                "tierfs": lambda: TierfsSystem(workdir, endpoint, args.bucket, args.tierfs_arg),
                "s3fs": lambda: S3fsSystem(workdir, endpoint, args.bucket),
                "rclone": lambda: RcloneSystem(workdir, endpoint, args.bucket),
            }
            for name in systems:
                log(f"=== {name}")
                try:
                    if name == "local":
                        runner.run_local(workdir / "local")
                        shutil.rmtree(workdir / "local", ignore_errors=True)
                    elif name == "boto3":
                        runner.run_boto3()
                    elif name == "crt":
                        runner.run_crt()
                    elif name == "s3torch":
                        runner.run_s3torch()
                    elif name == "nullfs":
                        runner.run_nullfs(workdir)
                    else:
                        mount = factories[name]()
                        mounts.append(mount)
                        runner.run_mount(mount, epoch=name == "tierfs")
                        mount.cleanup()
                except Exception as exc:  # one broken system must not lose the others' numbers
                    report.errors.append(f"{name}: {type(exc).__name__}: {exc}")
                    log(f"{name} failed: {exc}")
    finally:
        for mount in mounts:
            mount.cleanup()
        if not args.keep_workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    report.machine["loadavg_at_end"] = os.getloadavg()
    evaluate_targets(report)
    print(render(report, systems))
    json_out.parent.mkdir(parents=True, exist_ok=True)
    json_out.write_text(json.dumps(asdict(report), indent=2) + "\n")
    print(f"\nJSON written to {json_out}")
    return 1 if report.errors else 0


if __name__ == "__main__":
    sys.exit(main())
