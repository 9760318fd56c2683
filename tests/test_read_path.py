"""Acceptance tests of the read path ("read path" issue), on real mounts against real servers.

What a user sees through the mount must be exactly what the bucket holds: every listable
object as a file with the same bytes, every prefix as a directory, and keys that have
no faithful POSIX spelling hidden (and counted) rather than mangled. The cache must
survive a remount so that re-reading costs no GET at all, and must respect its size cap
however much is read. The expected views are computed here from the key list with our
own rules, independently of tierfs's key mapping.
"""

from __future__ import annotations

import hashlib
import os
import random
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from mounting import Mount, Mounter

from tools.servers import MotoS3, SeaweedFS, s3_client

KiB = 1 << 10
MiB = 1 << 20
NAME_MAX = 255


# --------------------------------------------------------------------------- helpers


def upload(endpoint_url: str, bucket: str, objects: Mapping[str, bytes]) -> None:
    """PUT every object, in parallel: a thousand sequential PUTs would dominate the test's run time."""
    client = s3_client(endpoint_url, read_timeout=60.0)

    def put(key: str) -> None:
        client.put_object(Bucket=bucket, Key=key, Body=objects[key])

    with ThreadPoolExecutor(max_workers=8) as pool:
        list(pool.map(put, objects))


def listed_keys(endpoint_url: str, bucket: str) -> set[str]:
    """Every key in the bucket, as boto3 lists it (no delimiter: hostile keys included)."""
    client = s3_client(endpoint_url)
    keys: set[str] = set()
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        keys.update(obj["Key"] for obj in page.get("Contents", []))
    return keys


def segment_visible(segment: str) -> bool:
    return segment not in ("", ".", "..") and len(segment.encode()) <= NAME_MAX


def expected_tree(keys: Iterable[str]) -> tuple[set[str], set[str]]:
    """(files, dirs) a POSIX view of ``keys`` must show, as paths relative to the mount root.

    A key contributes every directory along its path up to its first segment that can't
    be a POSIX name; it is a file only if all its segments can, and it is not a ``dir/``
    marker. A file whose path is also a directory is shadowed by the directory.
    """
    files: set[str] = set()
    dirs: set[str] = set()
    for key in keys:
        marker = key.endswith("/")
        parts = key[:-1].split("/") if marker else key.split("/")
        last = len(parts) - 1
        visible = True
        for i, part in enumerate(parts):
            if not segment_visible(part):
                visible = False
                break
            if i < last or marker:
                dirs.add("/".join(parts[: i + 1]))
        if visible and not marker:
            files.add(key)
    return files - dirs, dirs


def walk_tree(root: Path) -> tuple[set[str], set[str]]:
    """(files, dirs) under ``root`` as ``os.walk`` sees them, relative to ``root``."""
    files: set[str] = set()
    dirs: set[str] = set()
    for here, subdirs, names in os.walk(root):
        rel = os.path.relpath(here, root)
        prefix = "" if rel == "." else rel + "/"
        dirs.update(prefix + d for d in subdirs)
        files.update(prefix + n for n in names)
    return files, dirs


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(256 * KiB):
            digest.update(block)
    return digest.hexdigest()


def read_all(root: Path, files: Iterable[str]) -> dict[str, str]:
    """sha256 of every file in ``files`` read through the mount, a few readers at a time."""
    ordered = sorted(files)
    with ThreadPoolExecutor(max_workers=4) as pool:
        digests = list(pool.map(lambda rel: sha256_file(root / rel), ordered))
    return dict(zip(ordered, digests, strict=True))


def nested_dataset(rng: random.Random, tops: int, subs: int, per_dir: int) -> dict[str, bytes]:
    """``tops`` x ``subs`` x ``per_dir`` small files (0..20 KiB, some empty) under ``dNN/sNN/``."""
    objects: dict[str, bytes] = {}
    for t in range(tops):
        for s in range(subs):
            for f in range(per_dir):
                size = 0 if rng.random() < 0.05 else rng.randrange(1, 20 * KiB + 1)
                objects[f"d{t:02d}/s{s:02d}/f{f:02d}.bin"] = rng.randbytes(size)
    return objects


def big_files(rng: random.Random, prefix: str) -> dict[str, bytes]:
    """Files that cross 1 MiB block boundaries, one of them by a single byte."""
    sizes = {
        "just-over-a-block.bin": MiB + 1,
        "two-and-a-half.bin": 5 * MiB // 2,
        "three-minus.bin": 3 * MiB - 7,
    }
    return {prefix + name: rng.randbytes(size) for name, size in sizes.items()}


# --------------------------------------------------------------------------- 1. listing and bytes


HOSTILE_KEYS = {
    "a/../b": b"dot-dot segment",
    "a//b": b"empty segment",
    "./x": b"dot segment",
    "x/./y": b"dot segment deeper down",
    "L" * 300: b"name over NAME_MAX",
    "deep/" + "M" * 256: b"name over NAME_MAX below a visible directory",
    "clash": b"shadowed by the directory clash/",
    "clash/inner": b"inside the directory that shadows its sibling object",
}
MARKERS = ["d00/", "d03/s05/", "emptydir/", "marked-only/sub/"]


def test_walk_and_bytes_match_the_bucket_with_hostile_keys(
    moto: MotoS3, bucket: Callable[..., str], mounter: Mounter
) -> None:
    rng = random.Random(1)
    name = bucket(moto)
    objects = nested_dataset(rng, 10, 10, 10)
    objects.update(big_files(rng, "d05/s05/"))
    objects.update(HOSTILE_KEYS)
    objects.update(dict.fromkeys(MARKERS, b""))
    upload(moto.endpoint_url, name, objects)
    keys = listed_keys(moto.endpoint_url, name)
    assert keys == set(objects), "moto must keep hostile keys verbatim for this test to mean anything"

    expected_files, expected_dirs = expected_tree(keys)
    # Sanity of our own rules on the cases the issue names.
    assert {"clash", "a/b", "b", "x", "L" * 300} & expected_files == set()
    assert {"clash", "emptydir", "marked-only/sub", "a", "deep"} <= expected_dirs
    assert len(expected_files) >= 1000

    mount = mounter(f"s3://{name}", endpoint_url=moto.endpoint_url)
    files, dirs = walk_tree(mount.path)
    assert dirs == expected_dirs
    assert files == expected_files
    assert os.listdir(mount.path / "emptydir") == []

    digests = read_all(mount.path, files)
    expected = {rel: hashlib.sha256(objects[rel]).hexdigest() for rel in expected_files}
    assert digests == expected
    for rel in expected_files:
        assert (mount.path / rel).stat().st_size == len(objects[rel])

    status = mount.status()
    assert status["hidden_keys"] > 0
    assert status["shadowed_keys"] > 0


# --------------------------------------------------------------------------- 2. warm remount


def inode_numbers(root: Path, files: Iterable[str]) -> dict[str, int]:
    return {rel: (root / rel).stat().st_ino for rel in files}


def test_remount_on_the_same_cache_rereads_without_any_get(
    seaweed: SeaweedFS, bucket: Callable[..., str], mounter: Mounter
) -> None:
    rng = random.Random(2)
    name = bucket()
    objects = nested_dataset(rng, 3, 4, 5)
    objects.update(big_files(rng, "big/"))
    upload(seaweed.endpoint_url, name, objects)
    args = ("--metadata-ttl", "indefinite")

    first = mounter(f"s3://{name}", *args)
    files, _ = walk_tree(first.path)
    assert files == set(objects)
    expected = {rel: hashlib.sha256(body).hexdigest() for rel, body in objects.items()}
    assert read_all(first.path, files) == expected
    inodes = inode_numbers(first.path, files)
    first.umount()  # also waits for the daemon to exit, or fails with its log

    second = mounter(f"s3://{name}", *args, cache_dir=first.cache_dir)
    gets_before = seaweed.request_count(name, "GET")  # HEAD is counted as GET too
    files_again, _ = walk_tree(second.path)
    assert files_again == files
    assert read_all(second.path, files_again) == expected
    assert inode_numbers(second.path, files_again) == inodes
    assert seaweed.request_count(name, "GET") == gets_before
    status = second.status()
    assert status["s3_get_requests"] == 0
    assert status["s3_head_requests"] == 0
    assert status["cache_hits"] > 0


# --------------------------------------------------------------------------- 3. size cap


def disk_bytes(directory: Path) -> int:
    return sum(
        os.lstat(os.path.join(here, n)).st_size for here, _, names in os.walk(directory) for n in names
    )


def test_dataset_four_times_the_cache_cap_reads_exactly_and_stays_under_it(
    seaweed: SeaweedFS, bucket: Callable[..., str], mounter: Mounter
) -> None:
    rng = random.Random(3)
    name = bucket()
    objects = {f"part-{i:02d}.bin": rng.randbytes(MiB + rng.randrange(0, MiB // 4)) for i in range(40)}
    upload(seaweed.endpoint_url, name, objects)
    cap = 10 * MiB
    assert sum(map(len, objects.values())) >= 4 * cap

    mount = mounter(f"s3://{name}", "--cache-size", "10M")
    expected = {rel: hashlib.sha256(body).hexdigest() for rel, body in objects.items()}
    assert read_all(mount.path, objects) == expected

    status = mount.status()
    assert status["cache_limit_bytes"] == cap
    assert status["cache_bytes_on_disk"] <= status["cache_limit_bytes"]
    assert status["evictions"] > 0
    assert disk_bytes(mount.cache_dir / "chunks") <= cap


# --------------------------------------------------------------------------- 4. daemon mode


def test_daemon_mode_returns_only_once_the_mount_is_live(
    seaweed: SeaweedFS, bucket: Callable[..., str], mounter: Mounter
) -> None:
    name = bucket()
    objects = {"hello.txt": b"hello from the bucket\n", "dir/inner.txt": b"inner\n"}
    upload(seaweed.endpoint_url, name, objects)

    mount: Mount = mounter(f"s3://{name}", foreground=False)  # waits for the launcher to exit 0
    assert mount.process.returncode == 0
    assert sorted(os.listdir(mount.path)) == ["dir", "hello.txt"]
    assert (mount.path / "hello.txt").read_bytes() == objects["hello.txt"]
    assert mount.pid != mount.process.pid  # the launcher exited; a forked daemon serves the mount
    mount.umount()
