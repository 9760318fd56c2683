"""Helpers shared by the direct-reader tests: a loaded, warmed mount and a look into its cache."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mounting import Mount, Mounter, tierfs_ok, wait_until

from tierfs.cache.chunkkey import ChunkKey
from tierfs.reader import protocol
from tools.servers import MotoS3, s3_client

_ATIME = """
import sys, lmdb
from tierfs.cacheformat import CHUNK_RECORD, DB_CHUNKS
env = lmdb.open(sys.argv[1], readonly=True, max_dbs=32, lock=True)
with env.begin() as txn:
    raw = txn.get(bytes.fromhex(sys.argv[2]), db=env.open_db(DB_CHUNKS, txn=txn, create=False))
print(None if raw is None else CHUNK_RECORD.unpack_from(raw)[0])
"""
_SET_META = """
import sys, lmdb
from tierfs.cacheformat import CACHE_META_FORMAT, DB_CACHE_META, MAP_SIZE
env = lmdb.open(sys.argv[1], max_dbs=32, map_size=MAP_SIZE)
db = env.open_db(DB_CACHE_META)
with env.begin(write=True, db=db) as txn:
    old = txn.get(CACHE_META_FORMAT)
    txn.put(CACHE_META_FORMAT, bytes.fromhex(sys.argv[2]))
print(old.hex())
"""

KiB = 1 << 10
MiB = 1 << 20


@dataclass
class Loaded:
    mount: Mount
    bucket: str
    endpoint: str
    files: dict[str, bytes]  # path relative to the mount -> content

    def path(self, rel: str) -> str:
        return str(self.mount.path / rel)

    def put(self, key: str, body: bytes) -> None:
        s3_client(self.endpoint).put_object(Bucket=self.bucket, Key=key, Body=body)

    def etag(self, key: str) -> str:
        return str(s3_client(self.endpoint).head_object(Bucket=self.bucket, Key=key)["ETag"]).strip('"')

    def chunk_path(self, key: str, index: int = 0) -> Path:
        name = ChunkKey(self.bucket, key, self.etag(key), index).digest().hex()
        return self.mount.cache_dir / "chunks" / name[:2] / name

    def chunk_atime(self, key: str, index: int = 0) -> float | None:
        """Last access time of a chunk in the daemon's index. Read in a child process: one process
        may open an LMDB environment only once, and this one's readers may hold it."""
        digest = ChunkKey(self.bucket, key, self.etag(key), index).digest()
        out = subprocess.run(
            [sys.executable, "-c", _ATIME, str(self.mount.cache_dir / "index"), digest.hex()],
            capture_output=True, text=True, check=True, timeout=30,
        ).stdout.strip()  # fmt: skip
        return None if out == "None" else float(out)

    def warm(self, rels: list[str] | None = None) -> None:
        rels = rels if rels is not None else list(self.files)
        for rel in rels:
            with open(self.path(rel), "rb") as f:
                assert f.read() == self.files[rel]
        # The cold engine stores blocks after it answered the READ (docs/coldpath.md); a prefetch
        # of what was read returns once those writes landed, so the cache holds it from here on.
        tierfs_ok("prefetch", *[self.path(r) for r in rels])

    def status(self) -> dict[str, Any]:
        return self.mount.status()

    def evict(self, *rels: str) -> None:
        tierfs_ok("evict", *[self.path(r) for r in rels])


def sample_files(count: int, size: int, seed: int = 1) -> dict[str, bytes]:
    rng = random.Random(seed)
    return {f"train/{i:04d}.bin": rng.randbytes(size + rng.randrange(0, 4096)) for i in range(count)}


def load(
    moto: MotoS3, bucket: Callable[..., str], mounter: Mounter, files: dict[str, bytes], *args: str,
    mountpoint: Path | None = None, cache_dir: Path | None = None,
) -> Loaded:
    """Upload ``files`` to a fresh moto bucket and mount it; returns once readers may start."""
    name = bucket(moto)
    client = s3_client(moto.endpoint_url)
    for key, body in files.items():
        client.put_object(Bucket=name, Key=key, Body=body)
    mount = mounter(
        f"s3://{name}", *args, endpoint_url=moto.endpoint_url, mountpoint=mountpoint, cache_dir=cache_dir
    )
    wait_until(lambda: (mount.cache_dir / protocol.READER_FILE).exists(), 15, "reader.json published")
    return Loaded(mount, name, moto.endpoint_url, dict(files))


def published(mount: Mount) -> dict[str, Any]:
    record: dict[str, Any] = json.loads((mount.cache_dir / protocol.READER_FILE).read_text())
    return record


def wait_maintenance(mount: Mount, timeout: float = 15.0) -> None:
    """Until the daemon has run one more maintenance pass (its heartbeat moved on)."""
    before = published(mount)["heartbeat"]
    wait_until(lambda: published(mount)["heartbeat"] > before, timeout, "a maintenance pass")
    time.sleep(0.2)


def open_cache_to_everyone(cache_dir: Path) -> None:
    """What an admin's group option would do, for tests that read the cache as another uid:
    directories searchable and readable, files readable, LMDB lock files and access/ writable."""
    for root, _dirs, names in os.walk(cache_dir):
        os.chmod(root, 0o755)
        for name in names:
            os.chmod(os.path.join(root, name), 0o644)
    for env in ("meta", "index"):
        os.chmod(cache_dir / env / "lock.mdb", 0o666)
    os.chmod(cache_dir / protocol.ACCESS_DIR, 0o1777)
    os.chmod(cache_dir / "staging", 0o711)


def set_cache_format(cache_dir: Path, raw: bytes) -> bytes:
    """Write the index's cache.meta format (from a child process); returns the previous value."""
    out = subprocess.run(
        [sys.executable, "-c", _SET_META, str(cache_dir / "index"), raw.hex()],
        capture_output=True, text=True, check=True, timeout=30,
    ).stdout.strip()  # fmt: skip
    return bytes.fromhex(out)
