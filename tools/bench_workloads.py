"""The benchmark's dataset and the workloads it times, independent of which system is read.

Every workload takes a directory (a tierfs, s3fs or rclone mount, or the local copy) or
an S3 client, reads the same dataset and returns a :class:`Measure`. Keeping the read
code identical for every system is what makes the ratios in the report meaningful:
only the thing under the path changes.

The dataset imitates an ImageNet-style training set: many ~110 KiB samples in class
folders plus a few large shards (tar/WebDataset-like). Contents are random bytes so that
no layer can win by compressing them.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import io
import json
import os
import random
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import boto3
import boto3.s3.transfer
import botocore.config

from tools.servers import ACCESS_KEY, REGION, SECRET_KEY, SeaweedFS, child_env

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

MiB = 1024 * 1024
READ_SIZE = 1 * MiB  # sequential reads use 1 MiB buffers, like a tar/WebDataset reader
PREAD_SIZE = 128 * 1024
CLASSES = 50
MANIFEST_KEY = "bench-manifest.json"


# --------------------------------------------------------------------------- dataset


@dataclass(frozen=True)
class Dataset:
    """Which objects the benchmark reads; equal specs mean an already seeded bucket can be reused."""

    small_files: int
    small_size: int
    shards: int
    shard_size: int
    model_size: int = 0  # 0: no model file (the cold model-load row is not run)

    def small_keys(self) -> list[str]:
        """``small/nCCC/img_IIIIII.JPEG``, spread round-robin over the class folders."""
        return [f"small/n{i % CLASSES:03d}/img_{i:07d}.JPEG" for i in range(self.small_files)]

    def shard_keys(self) -> list[str]:
        return [f"shards/shard-{i:03d}.tar" for i in range(self.shards)]

    def model_keys(self) -> list[str]:
        """The one large model file of the cold model-load row, if the dataset has one."""
        return ["model/model-00001.safetensors"] if self.model_size else []

    @property
    def small_bytes(self) -> int:
        return self.small_files * self.small_size

    @property
    def shard_bytes(self) -> int:
        return self.shards * self.shard_size

    def manifest(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True).encode()


def bench_client(endpoint_url: str, pool: int = 64) -> S3Client:
    """A boto3 client sized for parallel transfers (botocore's default pool of 10 would throttle 16 threads).

    Static dummy credentials: SeaweedFS without IAM accepts any key, and the benchmark
    must not pick up whatever profile the host happens to have.
    """
    config = botocore.config.Config(
        max_pool_connections=pool,
        connect_timeout=5.0,
        read_timeout=120.0,
        retries={"mode": "standard", "total_max_attempts": 5},
        s3={"addressing_style": "path"},
    )
    return boto3.client(
        "s3",
        endpoint_url=endpoint_url,
        aws_access_key_id=os.environ.get("AWS_ACCESS_KEY_ID", ACCESS_KEY),
        aws_secret_access_key=os.environ.get("AWS_SECRET_ACCESS_KEY", SECRET_KEY),
        region_name=REGION,
        config=config,
    )


class RandomStream(io.RawIOBase):
    """``size`` incompressible bytes produced on demand, so a 512 MiB shard never sits in memory."""

    def __init__(self, size: int) -> None:
        self._left = size

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        n = min(len(buffer), self._left)
        buffer[:n] = os.urandom(n)
        self._left -= n
        return n


def _transfer_config(threads: int) -> boto3.s3.transfer.TransferConfig:
    return boto3.s3.transfer.TransferConfig(
        multipart_threshold=64 * MiB, multipart_chunksize=64 * MiB, max_concurrency=threads
    )


def dataset_present(client: S3Client, bucket: str, dataset: Dataset) -> bool:
    """True if ``bucket`` holds this exact dataset: the manifest is written only after every object."""
    try:
        body = client.get_object(Bucket=bucket, Key=MANIFEST_KEY)["Body"].read()
    except client.exceptions.NoSuchKey:
        return False
    return bool(body == dataset.manifest())


def seed(client: S3Client, bucket: str, dataset: Dataset, threads: int = 16) -> float:
    """Upload the dataset with parallel PUTs; returns the wall time. The manifest goes last."""
    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
        futures = [
            pool.submit(client.put_object, Bucket=bucket, Key=key, Body=os.urandom(dataset.small_size))
            for key in dataset.small_keys()
        ]
        for future in futures:
            future.result()
    large = [(key, dataset.shard_size) for key in dataset.shard_keys()]
    for key, size in [*large, *((key, dataset.model_size) for key in dataset.model_keys())]:
        client.upload_fileobj(
            io.BufferedReader(RandomStream(size), buffer_size=MiB),
            bucket,
            key,
            Config=_transfer_config(threads),
        )
    client.put_object(Bucket=bucket, Key=MANIFEST_KEY, Body=dataset.manifest())
    return time.perf_counter() - start


def download(client: S3Client, bucket: str, dataset: Dataset, dest: Path, threads: int = 8) -> float:
    """Copy the dataset to local disk with parallel GETs: the "download it first" baseline, in seconds."""
    start = time.perf_counter()
    for key in dataset.small_keys():
        (dest / key).parent.mkdir(parents=True, exist_ok=True)

    def fetch(key: str) -> None:
        body = client.get_object(Bucket=bucket, Key=key)["Body"].read()
        (dest / key).write_bytes(body)

    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
        list(pool.map(fetch, dataset.small_keys()))
    for key in dataset.shard_keys():
        (dest / key).parent.mkdir(parents=True, exist_ok=True)
        client.download_file(bucket, key, str(dest / key), Config=_transfer_config(threads))
    os.sync()  # the data is only "downloaded" once it is on disk, not just in dirty pages
    return time.perf_counter() - start


# Debian's awscli (`make bench-deps`) first: an `aws` earlier on PATH may be any version, or a shim.
AWS_CLI_PATHS = ("/usr/bin/aws",)


def aws_cli() -> str | None:
    """The ``aws`` command the copy-first baseline uses, or None when awscli is not installed."""
    found = next((p for p in AWS_CLI_PATHS if os.access(p, os.X_OK)), None)
    return found or shutil.which("aws")


def aws_copy(aws: str, endpoint_url: str, bucket: str, prefixes: Sequence[str], dest: Path) -> float:
    """``aws s3 cp --recursive`` of the objects under ``prefixes`` to ``dest``: the copy-first baseline.

    One command for all prefixes (``--exclude "*"`` then an ``--include`` each), with awscli's
    default concurrency, as a user would type it; the host's AWS config and credentials files
    are hidden so only the loopback gateway's dummy keys apply. Returns seconds, synced to disk.
    """
    env = child_env()  # dummy keys, no AWS_CA_BUNDLE (some tools choke on a proxy's bundle)
    env["AWS_CONFIG_FILE"] = env["AWS_SHARED_CREDENTIALS_FILE"] = str(dest / ".no-aws-config")
    filters = ["--exclude", "*", *(arg for p in prefixes for arg in ("--include", f"{p}/*"))]
    command = [aws, "--endpoint-url", endpoint_url, "s3", "cp", "--recursive", "--only-show-errors"]
    dest.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    result = subprocess.run(
        [*command, *filters, f"s3://{bucket}/", str(dest)],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        raise RuntimeError(f"aws s3 cp failed ({result.returncode}): {result.stderr.strip()[-500:]}")
    os.sync()  # the data is only "copied" once it is on disk, not just in dirty pages
    return time.perf_counter() - start


# --------------------------------------------------------------------------- caches and processes


def is_root() -> bool:
    return os.geteuid() == 0


_warned = False


def drop_caches() -> bool:
    """Write back dirty pages and drop the page cache, dentries and inodes (root only).

    Without root the "cold" and "warm on disk" numbers include page-cache hits; we warn
    once and carry on rather than fail, and the report records that caches were not dropped.
    """
    global _warned
    if not is_root():
        if not _warned:
            print(
                "WARNING: not root, cannot drop the page cache: cold/on-disk numbers are optimistic",
                file=sys.stderr,
            )
            _warned = True
        return False
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")
    return True


def _clock_ticks() -> int:
    return os.sysconf("SC_CLK_TCK")


def process_cpu_seconds(pid: int) -> float:
    """User + system CPU of ``pid`` so far, from /proc/<pid>/stat."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _clock_ticks()


def process_status_kib(pid: int, name: str) -> int:
    """A ``kB`` line of /proc/<pid>/status, e.g. ``VmHWM`` (peak RSS) or ``VmRSS``."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(name + ":"):
            return int(line.split()[1])
    raise KeyError(name)


def reset_peak_rss(pid: int) -> bool:
    """Reset VmHWM to the current RSS (``clear_refs`` 5, Linux ≥ 4.0) so a peak belongs to one phase."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5\n")
    except OSError:
        return False
    return True


@dataclass
class ProcessUsage:
    """CPU seconds and peak RSS of a daemon over one phase."""

    cpu_seconds: float
    peak_rss_mib: float
    peak_reset: bool  # False: the peak covers the daemon's whole life, not just this phase


class UsageMeter:
    """Measures a daemon's CPU and peak RSS across a ``with`` block; tolerates a daemon that is gone."""

    def __init__(self, pid: int | None) -> None:
        self.pid = pid
        self.usage: ProcessUsage | None = None

    def __enter__(self) -> UsageMeter:
        if self.pid is not None:
            self._reset = reset_peak_rss(self.pid)
            self._cpu0 = process_cpu_seconds(self.pid)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.pid is None:
            return
        with contextlib.suppress(OSError, KeyError):
            self.usage = ProcessUsage(
                cpu_seconds=round(process_cpu_seconds(self.pid) - self._cpu0, 3),
                peak_rss_mib=round(process_status_kib(self.pid, "VmHWM") / 1024, 1),
                peak_reset=self._reset,
            )


# --------------------------------------------------------------------------- results


@dataclass
class Measure:
    """One timed workload on one system; ``value`` is in ``unit`` (higher is better, except seconds)."""

    value: float
    unit: str
    seconds: float
    items: int
    nbytes: int
    page_cache_dropped: bool = False
    extra: dict[str, Any] = field(default_factory=dict)


def rate(items: int, nbytes: int, seconds: float, unit: str, dropped: bool) -> Measure:
    seconds = max(seconds, 1e-9)
    value = nbytes / MiB / seconds if unit == "MiB/s" else items / seconds
    return Measure(round(value, 1), unit, round(seconds, 3), items, nbytes, dropped)


def _parallel(fn: Callable[[Any], int], items: Iterable[Any], threads: int) -> int:
    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
        return sum(pool.map(fn, items))


def shuffled(items: Sequence[str], seed: int = 0) -> list[str]:
    """A fixed shuffle: every system reads the files in the same (ML-like, non-sorted) order."""
    out = list(items)
    random.Random(seed).shuffle(out)
    return out


# --------------------------------------------------------------------------- file-system workloads


def stat_tree(root: Path, threads: int, dropped: bool) -> Measure:
    """os.walk + os.stat of every entry; the class folders are walked in parallel. Unit: entries/s."""
    start = time.perf_counter()
    top = os.listdir(root)

    def walk(name: str) -> int:
        path = root / name
        os.stat(path)
        count = 1
        if not path.is_dir():
            return count
        for dirpath, dirnames, filenames in os.walk(path):
            for entry in (*dirnames, *filenames):
                os.stat(os.path.join(dirpath, entry))
                count += 1
        return count

    # Walk each class folder as its own job, so 8 threads really overlap.
    jobs = [f"{name}/{sub}" for name in top if (root / name).is_dir() for sub in os.listdir(root / name)]
    jobs += [name for name in top if not (root / name).is_dir()]
    count = len(top) + _parallel(walk, jobs, threads)
    return rate(count, 0, time.perf_counter() - start, "entries/s", dropped)


def read_whole(path: str | Path) -> int:
    """Read a file to the end with one large buffer, as a decoder reading a JPEG would."""
    total = 0
    with open(path, "rb", buffering=0) as f:
        while chunk := f.read(READ_SIZE):
            total += len(chunk)
    return total


def read_small(root: Path, keys: Sequence[str], threads: int, dropped: bool) -> Measure:
    """Read every small file whole, in the fixed shuffled order, with ``threads`` threads. Unit: files/s."""
    paths = [root / key for key in shuffled(keys)]
    start = time.perf_counter()
    nbytes = _parallel(read_whole, paths, threads)
    return rate(len(paths), nbytes, time.perf_counter() - start, "files/s", dropped)


def read_sequential(root: Path, keys: Sequence[str], dropped: bool) -> Measure:
    """Read each shard front to back with 1 MiB reads, one thread per shard (shards in parallel). MiB/s."""
    start = time.perf_counter()
    nbytes = _parallel(read_whole, [root / key for key in keys], max(1, len(keys)))
    return rate(len(keys), nbytes, time.perf_counter() - start, "MiB/s", dropped)


def _offsets(size: int, count: int, seed: int) -> list[int]:
    """Random 4 KiB-aligned offsets of 128 KiB reads that fit within ``size``."""
    rng = random.Random(seed)
    last = max(0, (size - PREAD_SIZE) // 4096)
    return [rng.randint(0, last) * 4096 for _ in range(count)]


def random_pread(
    root: Path, keys: Sequence[str], size: int, count: int, threads: int, dropped: bool
) -> Measure:
    """``count`` 128 KiB preads at random offsets spread over the shards, ``threads`` threads. preads/s."""
    fds = [os.open(root / key, os.O_RDONLY) for key in keys]
    try:
        per_thread = max(1, count // threads)

        def worker(index: int) -> int:
            total = 0
            for i, offset in enumerate(_offsets(size, per_thread, seed=index)):
                total += len(os.pread(fds[(index + i) % len(fds)], PREAD_SIZE, offset))
            return total

        start = time.perf_counter()
        nbytes = _parallel(worker, range(threads), threads)
        elapsed = time.perf_counter() - start
    finally:
        for fd in fds:
            os.close(fd)
    return rate(per_thread * threads, nbytes, elapsed, "preads/s", dropped)


def epoch_one(
    root: Path, dataset: Dataset, threads: int, dropped: bool, setup_seconds: float = 0.0
) -> Measure:
    """Read every small file and every shard once; ``setup_seconds`` (mount or download) counts too."""
    start = time.perf_counter()
    small = read_small(root, dataset.small_keys(), threads, dropped)
    large = read_sequential(root, dataset.shard_keys(), dropped)
    elapsed = time.perf_counter() - start + setup_seconds
    return Measure(
        round(elapsed, 3),
        "s",
        round(elapsed, 3),
        small.items + large.items,
        small.nbytes + large.nbytes,
        dropped,
        {
            "setup_seconds": round(setup_seconds, 3),
            "small_seconds": small.seconds,
            "large_seconds": large.seconds,
        },
    )


# --------------------------------------------------------------------------- raw boto3 workloads


def boto3_list(client: S3Client, bucket: str) -> Measure:
    """ListObjectsV2 of the whole bucket: what "stat everything" costs without a file system. entries/s."""
    start = time.perf_counter()
    count = 0
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        count += len(page.get("Contents", []))
    return rate(count, 0, time.perf_counter() - start, "entries/s", False)


def boto3_small(client: S3Client, bucket: str, keys: Sequence[str], threads: int) -> Measure:
    """Whole-object GETs of every small file in the shuffled order, ``threads`` threads. files/s."""
    order = shuffled(keys)

    def get(key: str) -> int:
        return len(client.get_object(Bucket=bucket, Key=key)["Body"].read())

    start = time.perf_counter()
    nbytes = _parallel(get, order, threads)
    return rate(len(order), nbytes, time.perf_counter() - start, "files/s", False)


def boto3_sequential(client: S3Client, bucket: str, keys: Sequence[str], size: int, streams: int) -> Measure:
    """Each shard split into ``streams`` ranged GETs streamed in 1 MiB pieces, all shards at once. MiB/s."""
    step = -(-size // streams)
    ranges = [(key, lo, min(size, lo + step) - 1) for key in keys for lo in range(0, size, step)]

    def get(job: tuple[str, int, int]) -> int:
        key, lo, hi = job
        body = client.get_object(Bucket=bucket, Key=key, Range=f"bytes={lo}-{hi}")["Body"]
        return sum(len(chunk) for chunk in body.iter_chunks(READ_SIZE))

    start = time.perf_counter()
    nbytes = _parallel(get, ranges, len(ranges))
    return rate(len(keys), nbytes, time.perf_counter() - start, "MiB/s", False)


def boto3_random(
    client: S3Client, bucket: str, keys: Sequence[str], size: int, count: int, threads: int
) -> Measure:
    """The random-pread workload as 128 KiB ranged GETs (every read goes to S3). preads/s."""
    per_thread = max(1, count // threads)

    def worker(index: int) -> int:
        total = 0
        for i, offset in enumerate(_offsets(size, per_thread, seed=index)):
            key = keys[(index + i) % len(keys)]
            rng = f"bytes={offset}-{offset + PREAD_SIZE - 1}"
            total += len(client.get_object(Bucket=bucket, Key=key, Range=rng)["Body"].read())
        return total

    start = time.perf_counter()
    nbytes = _parallel(worker, range(threads), threads)
    return rate(per_thread * threads, nbytes, time.perf_counter() - start, "preads/s", False)


# --------------------------------------------------------------------------- helpers for mounts


def wait_for(
    predicate: Callable[[], bool], timeout: float, what: str, alive: Callable[[], bool] | None = None
) -> None:
    """Poll ``predicate`` until true; fail early if ``alive`` says the process behind it died."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if alive is not None and not alive():
            raise RuntimeError(f"{what}: process exited")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what}: not ready after {timeout} s")
        time.sleep(0.05)


def run_quiet(
    cmd: Sequence[str], timeout: float = 60.0, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout, check=False, env=env)


_print_lock = threading.Lock()


def log(message: str) -> None:
    """Progress lines on stderr, so stdout carries only the report."""
    with _print_lock:
        print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def seeded_seaweed(workdir: Path, bucket: str, dataset: Dataset) -> Iterator[SeaweedFS]:
    """A SeaweedFS gateway under ``workdir`` whose ``bucket`` holds ``dataset``: the set-up of a
    benchmark that needs no other server. Stopped (by pid) on the way out."""
    with SeaweedFS(workdir / "seaweed") as server:
        client = bench_client(server.endpoint_url)
        client.create_bucket(Bucket=bucket)
        log(f"seeding {dataset.small_files} files of {dataset.small_size} bytes")
        seed(client, bucket, dataset)
        yield server
