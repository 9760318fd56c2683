"""Issue "cache tiers": the user's handles on the chunk cache, on a real mount over a real server.

prefetch/evict/pin/unpin through the CLI, the size cap and the age limit, compression,
the metrics endpoint, one mount per cache dir, and who may use the control channel.

Which chunks of an object are on disk is read from the cache directory itself (the chunk
path is part of the documented format, docs/cache-format.md), because every other view
can be served by a layer above the chunk cache: the kernel page cache, which we drop,
and the daemon's in-memory hot blocks, which we cannot.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from mounting import Mount, Mounter, MountFailed, run_tierfs, tierfs_ok, wait_until

from tierfs.cache.chunkkey import ChunkKey
from tools.servers import SeaweedFS, child_env, free_port, s3_client

MiB = 1 << 20
NOBODY = 65534
as_root = pytest.mark.skipif(os.geteuid() != 0, reason="dropping caches and switching uid need root")


def drop_page_cache() -> None:
    """Make the next read reach the daemon instead of the kernel's copy of the file."""
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def read_direct(path: Path) -> bytes:
    """Read with O_DIRECT: every read reaches the daemon, whatever the page cache holds."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    try:
        parts = []
        while chunk := os.read(fd, 4 * MiB):
            parts.append(chunk)
        return b"".join(parts)
    finally:
        os.close(fd)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class Bucket:
    """A bucket on a server, with the objects this test put there (key -> body)."""

    def __init__(self, server: SeaweedFS, name: str) -> None:
        self.server = server
        self.name = name
        self.s3 = s3_client(server.endpoint_url)
        self.bodies: dict[str, bytes] = {}

    def put(self, key: str, body: bytes) -> None:
        self.s3.put_object(Bucket=self.name, Key=key, Body=body)
        self.bodies[key] = body

    def etag(self, key: str) -> str:
        return str(self.s3.head_object(Bucket=self.name, Key=key)["ETag"]).strip('"')

    def blocks_on_disk(self, mount: Mount, key: str) -> int:
        """How many of the object's 1 MiB chunks exist as files in the mount's cache dir."""
        etag, blocks = self.etag(key), -(-len(self.bodies[key]) // MiB)
        count = 0
        for index in range(blocks):
            name = ChunkKey(self.name, key, etag, index).digest().hex()
            count += (mount.cache_dir / "chunks" / name[:2] / name).is_file()
        return count


@pytest.fixture
def weed_bucket(seaweed: SeaweedFS, bucket: Callable[..., str]) -> Bucket:
    return Bucket(seaweed, bucket())


@pytest.fixture
def private_seaweed(tmp_path: Path) -> Iterator[SeaweedFS]:
    """A SeaweedFS this test may stop; requested before ``mounter`` so that it is torn down after it."""
    with SeaweedFS(tmp_path / "weed") as server:
        yield server


# --------------------------------------------------------------------------- prefetch / evict


@as_root
def test_prefetched_tree_reads_with_the_server_down(private_seaweed: SeaweedFS, mounter: Mounter) -> None:
    private_seaweed.create_bucket("prefetch")
    data = Bucket(private_seaweed, "prefetch")
    data.put("dir/a.bin", os.urandom(300_000))
    data.put("dir/sub/b.bin", os.urandom(int(2.5 * MiB)))
    data.put("dir/sub/deeper/c.txt", b"small\n")
    data.put("dir/empty", b"")
    data.put("outside.bin", os.urandom(1000))
    mount = mounter(
        "s3://prefetch", "--timeout", "2", "--retries", "0", endpoint_url=private_seaweed.endpoint_url
    )
    result = run_tierfs("prefetch", str(mount.path / "dir"), "--recursive")
    assert result.returncode == 0, result.stdout + result.stderr
    status = mount.status()
    assert status["s3_get_requests"] >= 3  # every non-empty file under dir/ was fetched...
    assert status["bytes_from_s3"] == sum(len(b) for k, b in data.bodies.items() if k.startswith("dir/"))
    private_seaweed.stop()
    drop_page_cache()
    for key, body in data.bodies.items():
        if key.startswith("dir/"):
            assert sha((mount.path / key).read_bytes()) == sha(body), key
    with pytest.raises(OSError):  # ...and nothing else was: outside.bin needs the server
        (mount.path / "outside.bin").read_bytes()


def test_evict_makes_the_next_read_go_to_s3(mounter: Mounter, weed_bucket: Bucket) -> None:
    weed_bucket.put("f.bin", os.urandom(int(1.5 * MiB)))
    mount = mounter(f"s3://{weed_bucket.name}")
    path = mount.path / "f.bin"
    assert path.read_bytes() == weed_bucket.bodies["f.bin"]
    assert path.read_bytes() == weed_bucket.bodies["f.bin"]
    gets, server_gets = mount.status()["s3_get_requests"], weed_bucket.server.request_count(weed_bucket.name)
    assert weed_bucket.blocks_on_disk(mount, "f.bin") == 2
    tierfs_ok("evict", str(path))
    assert weed_bucket.blocks_on_disk(mount, "f.bin") == 0
    assert path.read_bytes() == weed_bucket.bodies["f.bin"]
    assert mount.status()["s3_get_requests"] > gets
    assert weed_bucket.server.request_count(weed_bucket.name) > server_gets
    assert weed_bucket.blocks_on_disk(mount, "f.bin") == 2


# --------------------------------------------------------------------------- limits


def test_pinned_file_survives_lru_until_unpinned(mounter: Mounter, weed_bucket: Bucket) -> None:
    weed_bucket.put("pinned.bin", os.urandom(2 * MiB))
    first = [f"a/{i}.bin" for i in range(6)]  # 12 MiB: more than the 8 MiB cap
    second = [f"b/{i}.bin" for i in range(6)]
    for key in first + second:
        weed_bucket.put(key, os.urandom(2 * MiB))
    mount = mounter(f"s3://{weed_bucket.name}", "--cache-size", "8M", "--cache-min-free", "0")
    assert (mount.path / "pinned.bin").read_bytes() == weed_bucket.bodies["pinned.bin"]
    tierfs_ok("pin", str(mount.path / "pinned.bin"))
    assert mount.status()["pinned_bytes"] >= 2 * MiB
    for key in first:
        assert (mount.path / key).read_bytes() == weed_bucket.bodies[key]
    status = mount.status()
    assert status["evictions"] > 0
    assert status["cache_bytes_on_disk"] <= 8 * MiB
    assert weed_bucket.blocks_on_disk(mount, "a/0.bin") == 0  # the oldest unpinned data went first
    assert weed_bucket.blocks_on_disk(mount, "pinned.bin") == 2  # though older still, it stayed
    tierfs_ok("unpin", str(mount.path / "pinned.bin"))
    assert mount.status()["pinned_bytes"] == 0
    for key in second:  # fresh data: every read stores chunks and pushes old ones out
        assert (mount.path / key).read_bytes() == weed_bucket.bodies[key]
    assert weed_bucket.blocks_on_disk(mount, "pinned.bin") == 0
    assert mount.status()["cache_bytes_on_disk"] <= 8 * MiB


def test_max_age_drops_unread_chunks_and_keeps_read_ones(mounter: Mounter, weed_bucket: Bucket) -> None:
    weed_bucket.put("stale.bin", os.urandom(int(1.5 * MiB)))
    weed_bucket.put("busy.bin", os.urandom(int(1.5 * MiB)))
    mount = mounter(f"s3://{weed_bucket.name}", "--cache-max-age", "2s")
    for key in ("stale.bin", "busy.bin"):
        assert (mount.path / key).read_bytes() == weed_bucket.bodies[key]
    # The cold engine stores the blocks after it answered the READ (docs/coldpath.md).
    wait_until(lambda: mount.status()["chunks_cached"] == 4, 10, "both files' blocks stored")

    def stale_gone_while_busy_is_read() -> bool:
        assert read_direct(mount.path / "busy.bin") == weed_bucket.bodies["busy.bin"]
        time.sleep(0.4)
        return weed_bucket.blocks_on_disk(mount, "stale.bin") == 0

    wait_until(stale_gone_while_busy_is_read, 10, "stale.bin aged out")
    assert weed_bucket.blocks_on_disk(mount, "busy.bin") == 2
    status = mount.status()
    assert status["chunks_cached"] == 2
    assert status["evictions"] == 2


# --------------------------------------------------------------------------- compression


def test_zstd_compresses_on_disk_and_reads_back_exactly(mounter: Mounter, weed_bucket: Bucket) -> None:
    text = b"".join(b"line %08d: the quick brown fox jumps over the lazy dog\n" % i for i in range(60_000))
    weed_bucket.put("random.bin", os.urandom(2 * MiB))
    weed_bucket.put("text.txt", text)  # ~3.4 MiB of very compressible text
    weed_bucket.put("zeros.bin", bytes(2 * MiB))
    # Daemon mode, so that the daemon is not our child: ``tierfs umount`` waits for it to exit,
    # and a child of ours would linger as a zombie until we reap it.
    mount = mounter(f"s3://{weed_bucket.name}", "--cache-compression", "zstd", foreground=False)
    assert (mount.path / "random.bin").read_bytes() == weed_bucket.bodies["random.bin"]
    status = mount.status()
    assert status["compression_ratio"] == pytest.approx(1.0, abs=0.01)  # stored raw: nothing to gain
    for key in ("text.txt", "zeros.bin"):
        assert (mount.path / key).read_bytes() == weed_bucket.bodies[key]
    status = mount.status()
    assert status["cache_bytes"] == sum(len(b) for b in weed_bucket.bodies.values())
    assert status["cache_bytes_on_disk"] < status["cache_bytes"] / 2
    assert status["compression_ratio"] > 2
    # A fresh daemon on the same cache has nothing in memory: these reads decompress from disk.
    mount.umount()
    again = mounter(f"s3://{weed_bucket.name}", "--cache-compression", "zstd", cache_dir=mount.cache_dir)
    for key, body in weed_bucket.bodies.items():
        assert (again.path / key).read_bytes() == body, key
    assert again.status()["s3_get_requests"] == 0


# --------------------------------------------------------------------------- metrics


def test_metrics_endpoint_serves_the_counters(mounter: Mounter, weed_bucket: Bucket) -> None:
    weed_bucket.put("m.bin", os.urandom(MiB + 5))
    port = free_port()
    mount = mounter(f"s3://{weed_bucket.name}", "--metrics-addr", f"127.0.0.1:{port}")
    assert (mount.path / "m.bin").read_bytes() == weed_bucket.bodies["m.bin"]
    # The cold engine stores the blocks after it answered the READ (docs/coldpath.md): wait for it.
    deadline = time.monotonic() + 10
    while mount.status()["chunks_cached"] < 2 and time.monotonic() < deadline:
        time.sleep(0.02)
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    values = {
        name: float(value)
        for name, value in re.findall(r"^(\S+) (\S+)$", text, flags=re.MULTILINE)
        if not name.startswith("#")
    }
    status = mount.status()
    assert values["tierfs_up"] == 1
    assert values['tierfs_s3_requests_total{op="get_object"}'] == status["s3_get_requests"] >= 1
    assert values['tierfs_read_bytes_total{source="s3"}'] == status["bytes_from_s3"] == MiB + 5
    assert values["tierfs_cache_misses_total"] >= 2
    assert values["tierfs_cache_chunks"] == 2
    assert values['tierfs_s3_request_seconds_count{op="get_object"}'] >= 1  # the latency histogram


# --------------------------------------------------------------------------- ownership


def test_second_mount_of_a_cache_dir_is_refused(mounter: Mounter, weed_bucket: Bucket) -> None:
    weed_bucket.put("x.txt", b"still here\n")
    first = mounter(f"s3://{weed_bucket.name}")
    with pytest.raises(MountFailed) as failed:
        mounter(f"s3://{weed_bucket.name}", cache_dir=first.cache_dir, foreground=False)
    headline, *log = str(failed.value).splitlines()
    assert re.fullmatch(r"tierfs mount exited with [1-9]\d*", headline), headline
    said = [line for line in log if line.strip() and not line.startswith("===")]
    assert len(said) == 1, said
    assert "in use by another tierfs mount" in said[0]
    assert (first.path / "x.txt").read_bytes() == b"still here\n"
    assert first.status()["pid"] == first.pid


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A directory another uid can traverse (pytest's tmp_path is 0700)."""
    path = Path(tempfile.mkdtemp(prefix="tierfs-cc-", dir="/tmp"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def tierfs_as(uid: int | None, *args: str) -> subprocess.CompletedProcess[str]:
    prefix = [] if uid is None else ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups"]
    return subprocess.run(
        [*prefix, sys.executable, "-m", "tierfs", *args],
        env=child_env(), cwd="/", capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip


@as_root
def test_other_users_cannot_use_the_control_channel(
    shared_dir: Path, mounter: Mounter, weed_bucket: Bucket
) -> None:  # shared_dir first: it is removed after the mount inside it is gone
    weed_bucket.put("f.bin", os.urandom(1000))
    mount = mounter(f"s3://{weed_bucket.name}", mountpoint=shared_dir / "mnt")
    for args in (("status", str(mount.path), "--json"), ("prefetch", str(mount.path / "f.bin"))):
        refused = tierfs_as(NOBODY, *args)
        assert refused.returncode != 0, refused.stdout
        assert "permission denied" in refused.stderr.lower(), refused.stderr
    assert mount.status()["s3_get_requests"] == 0  # the refused prefetch did nothing
    allowed = tierfs_as(None, "prefetch", str(mount.path / "f.bin"))
    assert allowed.returncode == 0, allowed.stderr
    assert mount.status()["s3_get_requests"] == 1
