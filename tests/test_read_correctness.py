"""The read-speed optimisations must never change a byte ("read speed" issue, correctness side).

Block-granular caching, run fetches, read-ahead windows and the deduplication of
concurrent fetches all split and join ranges; every seam is a place for an off-by-one.
These tests read through those seams on real mounts and compare with the source bytes.
Objects carry their own offsets (every 8-byte word holds its position), so a misplaced
range shows up as a wrong byte, never as coincidentally equal data.
"""

from __future__ import annotations

import os
import random
import threading
import time
from array import array
from collections.abc import Callable
from pathlib import Path

import pytest
from mounting import Mount, Mounter, run_tierfs

from tools.servers import SeaweedFS, s3_client

KiB = 1 << 10
MiB = 1 << 20


def offset_pattern(size: int, salt: int = 0) -> bytes:
    """``size`` bytes whose 8-byte little-endian words hold their own offset (xor ``salt``)."""
    words = array("Q", (offset ^ salt for offset in range(0, size + 7, 8)))
    return words.tobytes()[:size]


def put(seaweed: SeaweedFS, bucket: str, key: str, body: bytes) -> None:
    s3_client(seaweed.endpoint_url, read_timeout=60.0).put_object(Bucket=bucket, Key=key, Body=body)


def read_sequentially(path: Path, buffer_size: int) -> bytes:
    parts: list[bytes] = []
    with path.open("rb", buffering=0) as f:
        while chunk := f.read(buffer_size):
            parts.append(chunk)
    return b"".join(parts)


def drop_page_cache(path: Path) -> None:
    """Evict the file's pages from the kernel so the next reads reach the daemon again."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


# --------------------------------------------------------------------------- 8. block and window edges


def test_reads_across_block_and_read_ahead_boundaries(
    seaweed: SeaweedFS, bucket: Callable[..., str], mounter: Mounter
) -> None:
    name = bucket()
    size = 19 * MiB // 2  # 9.5 MiB: nine full blocks and a final half block
    sequential_src = offset_pattern(size, salt=0x5EC)
    edges_src = offset_pattern(size, salt=0xED6E)
    put(seaweed, name, "sequential.bin", sequential_src)
    put(seaweed, name, "edges.bin", edges_src)
    mount = mounter(f"s3://{name}")

    # Cold sequential reads with an odd buffer size walk through every read-ahead window edge.
    assert read_sequentially(mount.path / "sequential.bin", 333 * KiB) == sequential_src

    # Cold reads straddling each block edge, then the final partial block and EOF.
    fd = os.open(mount.path / "edges.bin", os.O_RDONLY)
    try:
        for block in range(9, 0, -1):
            edge = block * MiB
            assert os.pread(fd, 10, edge - 3) == edges_src[edge - 3 : edge + 7], f"edge at {block} MiB"
        assert os.pread(fd, 3 * KiB, 9 * MiB + 5) == edges_src[9 * MiB + 5 : 9 * MiB + 5 + 3 * KiB]
        assert os.pread(fd, 100, size - 5) == edges_src[-5:]
        assert os.pread(fd, 100, size) == b""
        assert os.pread(fd, 100, size + MiB) == b""
    finally:
        os.close(fd)
    assert os.stat(mount.path / "edges.bin").st_size == size

    # The same seams again from the daemon's caches rather than the kernel's page cache.
    for rel in ("sequential.bin", "edges.bin"):
        drop_page_cache(mount.path / rel)
    assert read_sequentially(mount.path / "edges.bin", 333 * KiB) == edges_src
    assert read_sequentially(mount.path / "sequential.bin", MiB + 1) == sequential_src


# --------------------------------------------------------------------------- 9. concurrent readers


def sequential_reader(buffer_size: int) -> Callable[[Path, int], bytes]:
    return lambda path, size: read_sequentially(path, buffer_size)


def reverse_chunk_reader(path: Path, size: int) -> bytes:
    """1 MiB chunks from the end to the start, reassembled in file order."""
    parts: dict[int, bytes] = {}
    fd = os.open(path, os.O_RDONLY)
    try:
        for offset in range((size - 1) // MiB * MiB, -1, -MiB):
            parts[offset] = os.pread(fd, MiB, offset)
    finally:
        os.close(fd)
    return b"".join(parts[o] for o in sorted(parts))


def random_pread_reader(seed: int) -> Callable[[Path, int], bytes]:
    """64 KiB preads covering the whole file in a shuffled order."""

    def read(path: Path, size: int) -> bytes:
        offsets = list(range(0, size, 64 * KiB))
        random.Random(seed).shuffle(offsets)
        parts: dict[int, bytes] = {}
        fd = os.open(path, os.O_RDONLY)
        try:
            for offset in offsets:
                parts[offset] = os.pread(fd, 64 * KiB, offset)
        finally:
            os.close(fd)
        return b"".join(parts[o] for o in sorted(parts))

    return read


READERS: list[Callable[[Path, int], bytes]] = [
    sequential_reader(128 * KiB),
    sequential_reader(333 * KiB),
    sequential_reader(4 * MiB),
    reverse_chunk_reader,
    reverse_chunk_reader,
    random_pread_reader(1),
    random_pread_reader(2),
    random_pread_reader(3),
]


def test_concurrent_readers_of_one_cold_file_get_exact_bytes_and_share_fetches(
    seaweed: SeaweedFS, bucket: Callable[..., str], mounter: Mounter
) -> None:
    name = bucket()
    size = 20 * MiB
    source = offset_pattern(size, salt=0xC0C0)
    put(seaweed, name, "shared.bin", source)
    mount = mounter(f"s3://{name}")
    path = mount.path / "shared.bin"

    results: list[bytes | BaseException | None] = [None] * len(READERS)
    barrier = threading.Barrier(len(READERS))

    def run(i: int) -> None:
        try:
            barrier.wait()
            results[i] = READERS[i](path, size)
        except BaseException as exc:
            results[i] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(READERS))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert not any(t.is_alive() for t in threads), "a reader is still blocked"
    for i, result in enumerate(results):
        assert not isinstance(result, BaseException), f"reader {i} failed: {result!r}"
        assert result == source, f"reader {i} read wrong bytes"

    status = mount.status()
    blocks = size // MiB
    assert 0 < status["s3_get_requests"] <= 2 * blocks
    assert status["cache_misses"] <= 2 * blocks
    assert status["s3_bytes_fetched"] <= 2 * size


def test_prefetch_around_a_cached_block_keeps_every_block_in_place(
    seaweed: SeaweedFS, bucket: Callable[..., str], mounter: Mounter
) -> None:
    """One block cached in the middle of a cold file, then ``tierfs prefetch``: every block stays put."""
    name = bucket()
    size = 12 * MiB
    source = offset_pattern(size, salt=0x9A9)
    put(seaweed, name, "holey.bin", source)
    mount = mounter(f"s3://{name}")
    path = mount.path / "holey.bin"

    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)  # no kernel read-ahead: only block 1 is fetched
        assert os.pread(fd, 10, MiB + 5) == source[MiB + 5 : MiB + 15]
    finally:
        os.close(fd)
    result = run_tierfs("prefetch", str(path))
    assert result.returncode == 0, result.stderr
    drop_page_cache(path)
    got = read_sequentially(path, MiB)
    wrong = [i for i in range(size // MiB) if got[i * MiB : (i + 1) * MiB] != source[i * MiB : (i + 1) * MiB]]
    assert wrong == [], f"blocks {wrong} hold the wrong bytes"


# --------------------------------------------------------------------------- 10. changed objects


def read_through(mount: Mount, rel: str) -> bytes:
    return read_sequentially(mount.path / rel, 64 * KiB)


@pytest.mark.parametrize(
    ("old_size", "new_size"),
    [(100, 7 * MiB // 2), (7 * MiB // 2, 50)],
    ids=["small-to-big", "big-to-small"],
)
def test_object_replaced_in_the_bucket_is_read_new_after_the_ttl(
    seaweed: SeaweedFS, bucket: Callable[..., str], mounter: Mounter, old_size: int, new_size: int
) -> None:
    name = bucket()
    rng = random.Random(old_size)
    old, new = rng.randbytes(old_size), rng.randbytes(new_size)
    put(seaweed, name, "dir/changing.bin", old)
    ttl = 1.0
    mount = mounter(f"s3://{name}", "--metadata-ttl", str(ttl))

    for _ in range(2):  # the second read is served from the kernel's page cache
        assert read_through(mount, "dir/changing.bin") == old
    put(seaweed, name, "dir/changing.bin", new)
    time.sleep(ttl * 2.5)

    assert (mount.path / "dir/changing.bin").stat().st_size == new_size
    got = read_through(mount, "dir/changing.bin")
    assert len(got) == new_size
    assert got == new
    assert read_through(mount, "dir/changing.bin") == new


# --------------------------------------------------------------------------- 11. exact sizes


def test_empty_and_block_aligned_files_read_exactly(
    seaweed: SeaweedFS, bucket: Callable[..., str], mounter: Mounter
) -> None:
    name = bucket()
    sizes = {"empty.bin": 0, "one-block.bin": MiB, "two-blocks.bin": 2 * MiB, "one-less.bin": MiB - 1}
    objects = {rel: offset_pattern(size, salt=i) for i, (rel, size) in enumerate(sizes.items())}
    for rel, body in objects.items():
        put(seaweed, name, rel, body)
    mount = mounter(f"s3://{name}")

    for rel, body in objects.items():
        path = mount.path / rel
        assert path.stat().st_size == len(body)
        assert read_sequentially(path, 256 * KiB) == body, rel
        with path.open("rb") as f:
            f.seek(len(body))
            assert f.read(10) == b"", f"{rel}: read at EOF"
    with (mount.path / "empty.bin").open("rb") as f:
        assert f.read() == b""
    assert mount.status()["errors"] == 0


# --------------------------------------------------------------------------- partial reads of cached blocks


def test_random_reads_from_the_disk_cache_read_only_their_pages_and_stay_exact(
    seaweed: SeaweedFS, bucket: Callable[..., str], mounter: Mounter
) -> None:
    """After a remount, random preads are served from a few checked 64 KiB pages of a cached block.

    The offsets straddle page and block edges and the file's end; the ranges must still be exact
    and no GET may be needed, and the status must show that the partial path served them.
    """
    name = bucket()
    size = 7 * MiB // 2  # 3.5 MiB: blocks 0-2 full, block 3 half
    src = offset_pattern(size, salt=0x9A6E)
    put(seaweed, name, "data.bin", src)
    first = mounter(f"s3://{name}")
    assert read_sequentially(first.path / "data.bin", MiB) == src  # hydrate every block
    first.umount()  # also waits for the daemon to exit, or fails with its log

    second = mounter(f"s3://{name}", cache_dir=first.cache_dir)
    rng = random.Random(11)
    offsets = [64 * KiB - 5, MiB - 100, MiB + 64 * KiB * 3 + 1, 3 * MiB + 7, size - 20]
    offsets += [rng.randrange(size) for _ in range(40)]
    fd = os.open(second.path / "data.bin", os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)  # no kernel read-ahead: READs stay small
        for offset in offsets:
            length = rng.choice([1, 100, 4 * KiB, 70 * KiB, 200 * KiB])
            assert os.pread(fd, length, offset) == src[offset : offset + length], (offset, length)
    finally:
        os.close(fd)
    status = second.status()
    assert status["s3_get_requests"] == 0
    assert status["partial_reads"] > 0
    assert status["errors"] == 0


# --------------------------------------------------------------------------- damaged cache files


def test_damaged_cache_files_are_refetched_not_served(
    seaweed: SeaweedFS, bucket: Callable[..., str], mounter: Mounter
) -> None:
    """A flipped byte in a cached block (small objects are checked on the loop, large ones in a
    thread) is caught by its page digest, counted, and the block is fetched again from S3."""
    name = bucket()
    objects = {"small.bin": offset_pattern(100 * KiB, salt=1), "large.bin": offset_pattern(3 * MiB, salt=2)}
    for rel, body in objects.items():
        put(seaweed, name, rel, body)
    first = mounter(f"s3://{name}")
    for rel, body in objects.items():
        assert read_sequentially(first.path / rel, MiB) == body
    first.umount()  # also waits for the daemon to exit, or fails with its log

    chunk_files = [p for p in (first.cache_dir / "chunks").rglob("*") if p.is_file()]
    assert len(chunk_files) == 4  # one block of small.bin, three of large.bin
    for path in chunk_files:
        raw = bytearray(path.read_bytes())
        raw[-1] ^= 0x40
        path.write_bytes(bytes(raw))

    second = mounter(f"s3://{name}", cache_dir=first.cache_dir)
    for rel, body in objects.items():
        assert read_sequentially(second.path / rel, MiB) == body
    status = second.status()
    assert status["cache_corrupt"] == 4
    assert status["s3_get_requests"] >= 2
    assert status["errors"] == 0
