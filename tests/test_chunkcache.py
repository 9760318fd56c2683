"""Tests of the persistent chunk cache: real files under tmp_path and a real LMDB environment."""

from __future__ import annotations

import random
import stat
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import lmdb
import pytest

from tierfs.cache.blockfile import PAGE
from tierfs.cache.chunkcache import CacheStats, ChunkCache
from tierfs.cache.chunkkey import ChunkKey

BLOCK = 4096


class FakeClock:
    """Injected time: access times and age-out become deterministic."""

    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def open_env(path: Path) -> lmdb.Environment:
    """Opened the way the lead opens it for the daemon."""
    return lmdb.open(str(path), max_dbs=16, sync=True, metasync=False, map_size=1 << 30)


class Harness:
    """One cache directory plus its LMDB env, reopenable like a remount."""

    def __init__(self, tmp_path: Path) -> None:
        self.env_path = tmp_path / "index"
        self.root = tmp_path / "cache"
        self.clock = FakeClock()
        self.env = open_env(self.env_path)
        self.caches: list[ChunkCache] = []

    def open(self, **overrides: object) -> ChunkCache:
        options: dict[str, object] = {
            "block_size": BLOCK,
            "limit_bytes": None,
            "min_free": 0.0,
            "max_age": float("inf"),
            "compression_level": None,
            "clock": self.clock,
        }
        options.update(overrides)
        cache = ChunkCache(self.env, self.root, **options)  # type: ignore[arg-type]
        self.caches.append(cache)
        return cache

    def remount(self, cache: ChunkCache, **overrides: object) -> ChunkCache:
        cache.close()
        self.env.close()
        self.env = open_env(self.env_path)
        return self.open(**overrides)

    def chunk_path(self, ck: ChunkKey) -> Path:
        name = ck.digest().hex()
        return self.root / "chunks" / name[:2] / name

    def files(self) -> list[Path]:
        return sorted(p for p in (self.root / "chunks").rglob("*") if p.is_file())


@pytest.fixture
def h(tmp_path: Path) -> Iterator[Harness]:
    harness = Harness(tmp_path)
    yield harness
    for cache in harness.caches:
        cache.close()
    harness.env.close()


def ck(key: str, index: int = 0, etag: str = '"e1"', bucket: str = "bkt") -> ChunkKey:
    return ChunkKey(bucket, key, etag, index)


def noise(size: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(size)


def totals(s: CacheStats) -> tuple[int, int, int, int]:
    return s.chunks, s.logical_bytes, s.disk_bytes, s.pinned_bytes


# ---------------------------------------------------------------- basics


def test_round_trip_and_counters(h: Harness) -> None:
    cache = h.open()
    full, short = noise(BLOCK, 1), b"tail of the object"
    cache.put(ck("a", 0), full)
    cache.put(ck("a", 1), short)
    cache.put(ck("empty"), b"")

    assert cache.get(ck("a", 0)) == full
    assert cache.get(ck("a", 1)) == short
    assert cache.get(ck("empty")) == b""
    assert cache.get(ck("a", 2)) is None
    assert cache.contains(ck("a", 1)) and not cache.contains(ck("a", 2))

    s = cache.stats()
    assert (s.chunks, s.logical_bytes) == (3, BLOCK + len(short))
    assert s.disk_bytes > s.logical_bytes  # headers
    assert s.corrupt == 0 and s.evictions == 0


def test_oversized_block_is_rejected(h: Harness) -> None:
    cache = h.open()
    with pytest.raises(ValueError):
        cache.put(ck("a"), bytes(BLOCK + 1))
    assert cache.stats().chunks == 0


def test_digest_is_unambiguous() -> None:
    assert ck("bc", bucket="a").digest() != ck("c", bucket="ab").digest()
    assert ChunkKey("b", "k", "e", 1).digest() != ChunkKey("b", "k", "e1", 0).digest()
    assert ChunkKey("b", "k", "e", 1).digest() == ChunkKey("b", "k", "e", 1).digest()


def test_changed_etag_misses(h: Harness) -> None:
    cache = h.open()
    cache.put(ck("a", etag='"old"'), b"old contents")
    assert cache.get(ck("a", etag='"new"')) is None
    assert cache.get(ck("a", etag='"old"')) == b"old contents"


def test_put_many_stores_a_run(h: Harness) -> None:
    cache = h.open()
    run = [(ck("big", i), noise(BLOCK, i)) for i in range(5)]
    cache.put_many(run)
    assert [cache.get(k) for k, _ in run] == [d for _, d in run]
    assert cache.stats().chunks == 5


def test_persists_across_remount(h: Harness) -> None:
    cache = h.open()
    data = {ck(f"obj{i}", j): noise(1000 + i, i * 10 + j) for i in range(4) for j in range(2)}
    for k, v in data.items():
        cache.put(k, v)
    cache.pin("bkt", "obj1")
    before = totals(cache.stats())

    cache = h.remount(cache, limit_bytes=1)
    assert totals(cache.stats()) == before
    for k, v in data.items():
        assert cache.get(k) == v
    assert cache.enforce_limits() == 6  # the pin survived the remount: obj1's two chunks stay
    assert [k.key for k in data if cache.contains(k)] == ["obj1", "obj1"]


def test_file_and_directory_modes(h: Harness) -> None:
    cache = h.open()
    cache.put(ck("a"), b"secret")
    path = h.chunk_path(ck("a"))
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    for d in (path.parent, path.parent.parent, h.root / "chunks", h.root):
        assert stat.S_IMODE(d.stat().st_mode) == 0o700, d


def test_existing_root_is_tightened(h: Harness) -> None:
    h.root.mkdir(mode=0o755)
    h.root.chmod(0o755)
    h.open()
    assert stat.S_IMODE(h.root.stat().st_mode) == 0o700


# ---------------------------------------------------------------- validation


def flip_last_byte(path: Path) -> None:
    raw = bytearray(path.read_bytes())
    raw[-1] ^= 0x01
    path.write_bytes(bytes(raw))


def truncate(path: Path) -> None:
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) - 10])


def append_garbage(path: Path) -> None:
    with path.open("ab") as f:
        f.write(b"junk")


@pytest.mark.parametrize("damage", [flip_last_byte, truncate, append_garbage, Path.unlink])
@pytest.mark.parametrize("level", [None, 3])
def test_damaged_file_is_a_miss_and_removed(
    h: Harness, damage: Callable[[Path], None], level: int | None
) -> None:
    cache = h.open(compression_level=level)
    victim, other = ck("victim"), ck("other")
    cache.put(victim, b"compressible " * 200)
    cache.put(other, b"fine")
    damage(h.chunk_path(victim))

    assert cache.get(victim) is None
    assert not h.chunk_path(victim).exists()
    assert not cache.contains(victim)
    s = cache.stats()
    assert (s.corrupt, s.chunks) == (1, 1)
    assert cache.get(other) == b"fine"
    # The miss is an ordinary one afterwards, and the chunk can be cached again.
    cache.put(victim, b"refetched")
    assert cache.get(victim) == b"refetched"


def test_file_naming_another_chunk_is_rejected(h: Harness) -> None:
    cache = h.open()
    a, b = ck("aaaa"), ck("bbbb")  # same name lengths: only the bytes in the header differ
    cache.put(a, b"contents of a")
    cache.put(b, b"contents of b")
    h.chunk_path(a).write_bytes(h.chunk_path(b).read_bytes())

    assert cache.get(a) is None
    assert cache.stats().corrupt == 1
    assert cache.get(b) == b"contents of b"


def test_wrong_block_index_in_header_is_rejected(h: Harness) -> None:
    cache = h.open()
    cache.put(ck("a", 0), b"block zero")
    cache.put(ck("a", 1), b"block one!")
    h.chunk_path(ck("a", 0)).write_bytes(h.chunk_path(ck("a", 1)).read_bytes())
    assert cache.get(ck("a", 0)) is None
    assert cache.stats().corrupt == 1


# ---------------------------------------------------------------- compression


def test_zstd_compresses_text_and_keeps_random_raw(h: Harness) -> None:
    cache = h.open(compression_level=3)
    text = (b"the quick brown fox jumps over the lazy dog\n" * 100)[:BLOCK]
    cache.put(ck("text"), text)
    s = cache.stats()
    assert s.disk_bytes < s.logical_bytes and s.compression_ratio > 1
    assert cache.get(ck("text")) == text

    cache.put(ck("jpeg"), noise(BLOCK, 7))
    added = cache.stats().disk_bytes - s.disk_bytes
    assert added > BLOCK  # stored raw: payload plus header
    assert h.chunk_path(ck("jpeg")).stat().st_size == added
    assert cache.get(ck("jpeg")) == noise(BLOCK, 7)


def test_compressed_chunks_readable_without_compression(h: Harness) -> None:
    cache = h.open(compression_level=19)
    text = b"a" * BLOCK
    cache.put(ck("t"), text)
    cache = h.remount(cache, compression_level=None)
    assert cache.get(ck("t")) == text


# ---------------------------------------------------------------- eviction


def fill(cache: ChunkCache, clock: FakeClock, names: list[str]) -> dict[str, int]:
    """Put one full block per name, one second apart; returns bytes on disk per chunk."""
    sizes: dict[str, int] = {}
    for name in names:
        before = cache.stats().disk_bytes
        cache.put(ck(name), noise(BLOCK, hash(name) & 0xFFFF))
        sizes[name] = cache.stats().disk_bytes - before
        clock.advance(1)
    return sizes


def test_lru_eviction_respects_limit_and_recent_reads(h: Harness) -> None:
    names = [f"obj{i:02d}" for i in range(11)]
    probe = h.open()
    per_chunk = fill(probe, h.clock, names[:1])["obj00"]
    probe.drop_object("bkt", "obj00")
    limit = 10 * per_chunk

    cache = h.remount(probe, limit_bytes=limit)
    fill(cache, h.clock, names[:10])
    assert cache.stats().disk_bytes == limit and cache.stats().evictions == 0
    for name in names[:5]:  # read the oldest five: now obj05 and obj06 are the least recently read
        h.clock.advance(1)
        assert cache.get(ck(name)) is not None

    fill(cache, h.clock, names[10:])  # over the limit: evict to 90 % = 9 chunks
    s = cache.stats()
    assert s.disk_bytes <= int(limit * 0.9)
    assert s.evictions == 2
    assert [n for n in names if not cache.contains(ck(n))] == ["obj05", "obj06"]
    assert not h.chunk_path(ck("obj05")).exists()


def test_background_eviction_starts_below_the_hard_limit(h: Harness) -> None:
    """Maintenance evicts past 95 % of the limit, so readers' puts rarely have to; a put alone does not."""
    names = [f"obj{i:02d}" for i in range(20)]
    probe = h.open()
    per_chunk = fill(probe, h.clock, names[:1])["obj00"]
    probe.drop_object("bkt", "obj00")
    limit = 20 * per_chunk

    cache = h.remount(probe, limit_bytes=limit)
    fill(cache, h.clock, names)  # exactly at the hard limit: no put went over it, none evicted
    assert cache.stats().disk_bytes == limit and cache.stats().evictions == 0
    assert cache.enforce_limits() == 2  # past the 95 % high-water mark: down to 90 % = 18 chunks
    assert cache.stats().disk_bytes <= int(limit * 0.9)
    assert [n for n in names if not cache.contains(ck(n))] == ["obj00", "obj01"]  # least recently read


def test_access_times_survive_remount(h: Harness) -> None:
    cache = h.open()
    sizes = fill(cache, h.clock, ["a", "b", "c"])
    h.clock.advance(10)
    assert cache.get(ck("a")) is not None  # a is now the most recently read

    cache = h.remount(cache, limit_bytes=2 * sizes["a"])  # low water 1.8 chunks: keep one
    assert cache.enforce_limits() == 2
    assert [n for n in "abc" if cache.contains(ck(n))] == ["a"]


def test_enforce_limits_after_lowering_the_limit(h: Harness) -> None:
    cache = h.open()
    sizes = fill(cache, h.clock, [f"o{i}" for i in range(10)])
    assert cache.enforce_limits() == 0
    cache = h.remount(cache, limit_bytes=sizes["o0"] * 5)  # a remount with a smaller --cache-size
    assert cache.enforce_limits() == 6  # down to 90 % of 5 chunks = 4 chunks
    assert [k.key for k in map(ck, ["o6", "o7", "o8", "o9"]) if cache.contains(k)] == ["o6", "o7", "o8", "o9"]


def test_protected_chunks_are_not_evicted(h: Harness) -> None:
    cache = h.open()
    sizes = fill(cache, h.clock, ["old", "mid", "new"])
    cache = h.remount(cache, limit_bytes=sizes["old"])
    assert cache.enforce_limits(protect=[ck("old")]) == 2
    assert cache.contains(ck("old"))


def test_free_space_floor_triggers_eviction(h: Harness) -> None:
    disk = {"total": 1_000_000, "available": 500_000}

    def space(_: Path) -> tuple[int, int]:
        return disk["total"], disk["available"]

    cache = h.open(min_free=0.10, disk_space=space)
    sizes = fill(cache, h.clock, [f"o{i}" for i in range(6)])
    assert cache.enforce_limits() == 0
    # Someone else filled the disk. The floor is 10 % of 1 MB = 100 kB; the cache may use what it holds
    # plus what is available above the floor: 6 chunks - 4 chunks = 2 chunks, low water 1.8 chunks.
    per = sizes["o0"]
    disk["available"] = 100_000 - 4 * per
    assert cache.enforce_limits() == 5
    assert cache.stats().free_disk_bytes == disk["available"]
    assert [n for n in (f"o{i}" for i in range(6)) if cache.contains(ck(n))] == ["o5"]


def test_pinned_objects_survive_eviction_until_unpinned(h: Harness) -> None:
    cache = h.open()
    cache.pin("bkt", "keep")  # pinned before any chunk exists: applies to chunks cached later
    fill(cache, h.clock, ["a", "b"])
    cache.put(ck("keep", 0), noise(BLOCK, 1))
    cache.put(ck("keep", 1), noise(100, 2))
    fill(cache, h.clock, ["c", "d"])
    pinned = cache.stats().pinned_bytes
    assert pinned > BLOCK + 100

    cache = h.remount(cache, limit_bytes=1)
    assert cache.enforce_limits() == 4
    s = cache.stats()
    assert s.chunks == 2 and s.disk_bytes == pinned == s.pinned_bytes
    assert cache.get(ck("keep", 1)) == noise(100, 2)

    cache.unpin("bkt", "keep")
    assert cache.stats().pinned_bytes == 0
    assert cache.enforce_limits() == 2
    assert cache.stats().chunks == 0


def test_sweep_aged_keeps_recently_read(h: Harness) -> None:
    cache = h.open(max_age=3600.0)
    fill(cache, h.clock, ["read", "unread", "pinned"])
    cache.pin("bkt", "pinned")
    h.clock.advance(3000)
    assert cache.get(ck("read")) is not None
    h.clock.advance(1000)  # unread and pinned are now 4000 s old; read is 1000 s old

    assert cache.sweep_aged() == 1
    assert [n for n in ("read", "unread", "pinned") if cache.contains(ck(n))] == ["read", "pinned"]
    assert cache.sweep_aged(now=h.clock.now + 3000) == 1
    assert cache.contains(ck("pinned")) and not cache.contains(ck("read"))
    assert cache.stats().evictions == 2


def test_sweep_aged_disabled_by_infinite_age(h: Harness) -> None:
    cache = h.open()
    fill(cache, h.clock, ["a"])
    assert cache.sweep_aged(now=h.clock.now + 1e9) == 0


# ---------------------------------------------------------------- objects


def test_drop_object_keeps_current_etag(h: Harness) -> None:
    cache = h.open()
    for etag in ('"v1"', '"v2"'):
        for i in range(3):
            cache.put(ck("obj", i, etag=etag), noise(BLOCK, i))
    cache.put(ck("other"), b"untouched")
    v1_bytes = sum(h.chunk_path(ck("obj", i, etag='"v1"')).stat().st_size for i in range(3))

    assert cache.drop_object("bkt", "obj", keep_etag='"v2"') == v1_bytes
    for i in range(3):
        assert not cache.contains(ck("obj", i, etag='"v1"'))
        assert cache.get(ck("obj", i, etag='"v2"')) == noise(BLOCK, i)

    assert cache.drop_object("bkt", "obj") > 0
    assert not any(cache.contains(ck("obj", i, etag='"v2"')) for i in range(3))
    assert cache.get(ck("other")) == b"untouched"
    assert cache.stats().chunks == 1 and cache.stats().evictions == 0


def test_object_index_separates_similar_names(h: Harness) -> None:
    cache = h.open()
    cache.put(ck("a/b"), b"1")
    cache.put(ck("a/bc"), b"2")
    cache.put(ChunkKey("bkt2", "a/b", '"e1"', 0), b"3")
    long_key = "k" * 1024  # longer than LMDB's key limit: the index must not use raw names as keys
    cache.put(ck(long_key), b"4")
    cache.drop_object("bkt", "a/b")  # drops exactly that object: not a/bc, not a/b of bkt2
    assert not cache.contains(ck("a/b"))
    assert cache.get(ck("a/bc")) == b"2" and cache.get(ChunkKey("bkt2", "a/b", '"e1"', 0)) == b"3"
    assert cache.get(ck(long_key)) == b"4"
    cache.drop_object("bkt", long_key)
    assert not cache.contains(ck(long_key))


# ---------------------------------------------------------------- crash recovery


def test_unclean_shutdown_is_reconciled(h: Harness) -> None:
    cache = h.open()
    for name in ("a", "b", "c"):
        cache.put(ck(name), name.encode() * 100)
    h.chunk_path(ck("a")).unlink()  # index entry without a file
    stray = h.chunk_path(ck("b")).parent / ".tmp.deadbeef.1"
    stray.write_bytes(b"half written")
    orphan_key = ck("orphan")
    orphan = h.chunk_path(orphan_key)
    orphan.parent.mkdir(parents=True, exist_ok=True)
    orphan.write_bytes(h.chunk_path(ck("c")).read_bytes())

    # No close(): a crash. A new instance on the same environment must reconcile.
    h.caches.remove(cache)
    cache = h.open()
    assert not stray.exists() and not orphan.exists()
    assert not cache.contains(ck("a"))
    s = cache.stats()
    assert s.chunks == 2 and s.disk_bytes == sum(p.stat().st_size for p in h.files())
    assert cache.get(ck("b")) == b"b" * 100


def test_block_size_change_voids_the_cache(h: Harness) -> None:
    cache = h.open()
    cache.put(ck("a"), b"x" * 100)
    cache = h.remount(cache, block_size=2 * BLOCK)
    assert cache.get(ck("a")) is None
    assert cache.stats().chunks == 0 and h.files() == []


def test_closed_cache_refuses_work(h: Harness) -> None:
    cache = h.open()
    cache.close()
    with pytest.raises(RuntimeError):
        cache.get(ck("a"))


# ---------------------------------------------------------------- concurrency


def test_concurrent_get_put_stays_consistent(h: Harness) -> None:
    per_chunk_guess = BLOCK + 64
    cache = h.open(compression_level=3, limit_bytes=24 * per_chunk_guess)  # small: evicts all the time
    objects = [f"obj{i}" for i in range(16)]

    def payload(key: ChunkKey) -> bytes:
        seed = hash((key.key, key.etag, key.index)) & 0xFFFF
        # half compressible, half random, short last blocks
        body = noise(BLOCK, seed) if seed % 2 else bytes([seed % 251]) * BLOCK
        return body[: BLOCK - (seed % 300) * (key.index == 3)]

    errors: list[str] = []
    hits: list[int] = []
    barrier = threading.Barrier(8)

    def worker(n: int) -> None:
        rng = random.Random(n)
        barrier.wait()
        for _ in range(300):
            key = ck(rng.choice(objects), rng.randrange(4), etag=rng.choice(['"v1"', '"v2"']))
            action = rng.random()
            if action < 0.45:
                cache.put(key, payload(key))
            elif action < 0.9:
                got = cache.get(key)
                if got is not None and got != payload(key):
                    errors.append(f"wrong data for {key}")
                hits.append(got is not None)
            elif action < 0.95:
                cache.drop_object(key.bucket, key.key, keep_etag=key.etag)
            elif action < 0.97:
                (cache.pin if rng.random() < 0.5 else cache.unpin)(key.bucket, key.key)
            else:
                cache.enforce_limits()

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()

    assert errors == []
    live = cache.stats()
    assert live.corrupt == 0 and any(hits) and live.evictions > 0
    files = h.files()
    assert len(files) == live.chunks
    assert sum(p.stat().st_size for p in files) == live.disk_bytes

    recounted = h.remount(cache, compression_level=3)
    assert totals(recounted.stats()) == totals(live)
    every = [ck(o, i, etag=e) for o in objects for i in range(4) for e in ('"v1"', '"v2"')]
    held = [k for k in every if recounted.contains(k)]
    assert len(held) == live.chunks
    assert all(recounted.get(k) == payload(k) for k in held)  # every file valid, none dropped
    assert recounted.stats().corrupt == 0


# ----------------------------------------------------------------------------- partial reads (format 2)

BIG = 4 * PAGE + 1000  # a chunk of four whole pages and a short fifth one


def big_block() -> bytes:
    return random.Random(7).randbytes(BIG)


@pytest.mark.parametrize("level", [None, 3])
@pytest.mark.parametrize(
    ("start", "length"),
    [
        (0, BIG),
        (0, 1),
        (PAGE - 1, 2),  # straddles a page boundary
        (PAGE, PAGE),  # exactly one page
        (3 * PAGE + 5, 2 * PAGE),  # runs into the short last page and past the end
        (BIG - 1, 10),
        (BIG, 10),  # at the end: nothing
        (BIG + PAGE, 10),  # past the end: nothing
    ],
)
def test_get_range_returns_exactly_the_requested_bytes(
    h: Harness, level: int | None, start: int, length: int
) -> None:
    cache = h.open(block_size=8 * PAGE, compression_level=level)
    data = big_block()
    cache.put(ck("big"), data)
    assert cache.get_range(ck("big"), start, length) == data[start : start + length]
    assert cache.stats().corrupt == 0


def test_partial_read_checks_only_the_pages_it_reads(h: Harness) -> None:
    cache = h.open(block_size=8 * PAGE)
    data = big_block()
    cache.put(ck("big"), data)
    path = h.chunk_path(ck("big"))
    raw = bytearray(path.read_bytes())
    raw[len(raw) - BIG + 3 * PAGE + 17] ^= 0xFF  # damage page 3 of the payload
    path.write_bytes(bytes(raw))

    assert cache.get_range(ck("big"), 0, 2 * PAGE) == data[: 2 * PAGE]  # pages 0-1: still valid
    assert cache.stats().corrupt == 0
    assert cache.get_range(ck("big"), 3 * PAGE, 100) is None  # page 3: caught, file dropped
    assert cache.stats().corrupt == 1
    assert not path.exists()
    assert not cache.contains(ck("big"))


def test_cache_of_another_format_is_wiped_at_open(h: Harness) -> None:
    cache = h.open()
    cache.put(ck("old"), b"written by another format")
    cache.close()
    meta = h.env.open_db(b"cache.meta")
    with h.env.begin(write=True) as txn:
        txn.delete(b"format", db=meta)  # what a version-1 cache looks like
    reopened = h.remount(cache)
    assert reopened.stats().chunks == 0
    assert reopened.get(ck("old")) is None
    assert h.files() == []
    reopened.put(ck("new"), b"fresh")
    again = h.remount(reopened)
    assert again.get(ck("new")) == b"fresh"  # the current format survives a remount
