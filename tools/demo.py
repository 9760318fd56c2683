"""``make demo``: mount a small sample dataset from a local SeaweedFS and verify every byte.

It shows the whole user path end to end - a real S3 server, ``tierfs mount`` in daemon
mode exactly as a user would run it, plain file reads through the kernel, ``tierfs
status`` and ``tierfs umount`` - and doubles as a smoke test: every file is checked
against the SHA-256 of what was uploaded and any mismatch makes the exit status 1.
The server and the mount are taken down on every path out, including failures.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

from tierfs.units import format_bytes
from tools.servers import SeaweedFS, child_env, force_unmount, is_fuse_mounted, s3_client, terminate_pid

BUCKET = "demo"
CLASSES = ("cat", "dog", "bird")
FILES_PER_CLASS = 20
SAMPLE_SIZE = 100 << 10
SHARD_SIZE = 20 << 20
README = b"tierfs demo dataset: 3 classes x 20 samples of 100 KiB, plus one 20 MiB shard.\n"


def sample_dataset() -> dict[str, bytes]:
    """Key -> body: an image-classification-like tree of small samples plus one large shard."""
    data = {
        f"train/{cls}/{cls}-{i:03d}.bin": os.urandom(SAMPLE_SIZE)
        for cls in CLASSES
        for i in range(FILES_PER_CLASS)
    }
    data["shards/shard-0000.tar"] = os.urandom(SHARD_SIZE)
    data["README.txt"] = README
    return data


def upload(endpoint_url: str, dataset: dict[str, bytes]) -> None:
    client = s3_client(endpoint_url, read_timeout=60.0)

    def put(key: str) -> None:
        client.put_object(Bucket=BUCKET, Key=key, Body=dataset[key])

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(put, dataset))  # list() re-raises the first failure


def tierfs(*args: str, capture: bool = True, timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tierfs", *args],
        env=child_env(),
        capture_output=capture,
        text=True,
        timeout=timeout,
        check=False,
    )


@contextmanager
def mounted(endpoint_url: str, work: Path) -> Iterator[Path]:
    """``tierfs mount`` in daemon mode (it returns once the mount is live); always unmounted after."""
    mnt, log = work / "mnt", work / "tierfs.log"
    mnt.mkdir()
    source = f"s3://{BUCKET}"
    args = [source, str(mnt), "--endpoint-url", endpoint_url, "--cache-dir", str(work / "cache")]
    result = tierfs("mount", *args, "--log-file", str(log))
    daemon_pid: int | None = None
    try:
        if result.returncode != 0 or not is_fuse_mounted(mnt):
            raise RuntimeError(f"tierfs mount failed ({result.returncode}): {result.stderr}\n{tail(log)}")
        status = tierfs("status", str(mnt), "--json")
        if status.returncode == 0:
            daemon_pid = int(json.loads(status.stdout)["pid"])
        print(f"mounted {source} at {mnt} (daemon pid {daemon_pid})")
        yield mnt
    finally:
        unmounted = tierfs("umount", str(mnt))
        if unmounted.returncode != 0:
            print(f"tierfs umount failed: {unmounted.stderr.strip()}; forcing", file=sys.stderr)
            print(tail(log), file=sys.stderr)
        force_unmount(mnt)  # no-op after a clean umount
        if daemon_pid is not None:
            terminate_pid(daemon_pid)  # no-op once the daemon has exited


def tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except FileNotFoundError:
        return "(no tierfs log)"


def read_and_verify(mnt: Path, expected: dict[str, str]) -> tuple[list[str], int, float]:
    """Read every file under ``mnt``; return (problems, bytes read, seconds)."""
    problems: list[str] = []
    seen: set[str] = set()
    total = 0
    start = time.perf_counter()
    for root, _dirs, files in os.walk(mnt):
        for name in files:
            path = Path(root, name)
            key = path.relative_to(mnt).as_posix()
            digest = hashlib.sha256()
            with path.open("rb") as f:
                while chunk := f.read(1 << 20):
                    digest.update(chunk)
                    total += len(chunk)
            seen.add(key)
            if key not in expected:
                problems.append(f"unexpected file {key}")
            elif digest.hexdigest() != expected[key]:
                problems.append(f"content mismatch in {key}")
    elapsed = time.perf_counter() - start
    problems.extend(f"missing file {key}" for key in sorted(expected.keys() - seen))
    return problems, total, elapsed


def report(label: str, files: int, total: int, seconds: float) -> None:
    rate = total / seconds / 1e6 if seconds > 0 else float("inf")
    print(f"{label}: {files} files, {format_bytes(total)} in {seconds:.2f} s ({rate:.1f} MB/s)")


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="tierfs-demo-") as tmp:
        work = Path(tmp)
        print("starting SeaweedFS ...")
        with SeaweedFS(work / "seaweed") as server:
            server.create_bucket(BUCKET)
            dataset = sample_dataset()
            upload(server.endpoint_url, dataset)
            expected = {key: hashlib.sha256(body).hexdigest() for key, body in dataset.items()}
            size = sum(map(len, dataset.values()))
            print(f"seeded s3://{BUCKET}: {len(dataset)} objects, {format_bytes(size)}")

            with mounted(server.endpoint_url, work) as mnt:
                problems, total, seconds = read_and_verify(mnt, expected)
                report("first read (from S3)", len(expected), total, seconds)
                if not problems:
                    problems, total, seconds = read_and_verify(mnt, expected)
                    report("second read (cached)", len(expected), total, seconds)
                print(f"\n$ tierfs status {mnt}")
                sys.stdout.flush()
                tierfs("status", str(mnt), capture=False)
                print()
        for problem in problems:
            print(f"FAIL: {problem}", file=sys.stderr)
        if problems:
            print(f"demo FAILED: {len(problems)} problem(s)", file=sys.stderr)
            return 1
        print("demo OK: every byte read through tierfs matched what was uploaded")
        return 0


if __name__ == "__main__":
    sys.exit(main())
