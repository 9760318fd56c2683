"""The cache tiers in-process: the composition's order and fan-out, the memory tier, and the shared
tier's entries, names and fill queue against a real moto server."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import lmdb

from tierfs.cache.chunkcache import ChunkCache
from tierfs.cache.chunkkey import ChunkKey
from tierfs.cache.memory import MemoryTier
from tierfs.cache.shared import SharedTier, decode_entry, encode_entry, identity
from tierfs.cache.stack import Tiers
from tierfs.cache.tier import Level
from tierfs.store.objectstore import S3ObjectStore
from tools.servers import MotoS3

BLOCK = 4096


def ck(key: str, index: int = 0, etag: str = "e1") -> ChunkKey:
    return ChunkKey("bkt", key, etag, index)


def disk_tier(tmp_path: Path) -> ChunkCache:
    env = lmdb.open(str(tmp_path / "index"), max_dbs=16, map_size=1 << 26)
    return ChunkCache(env, tmp_path / "cache", block_size=BLOCK, limit_bytes=None, min_free=0.0,
                      max_age=math.inf, compression_level=None)  # fmt: skip


def test_tiers_are_composed_in_level_order(tmp_path: Path) -> None:
    disk, memory = disk_tier(tmp_path), MemoryTier(1 << 20)
    tiers = Tiers([disk, memory])  # given out of order
    assert [t.level for t in tiers.all] == [Level.MEMORY, Level.LOCAL]
    tiers.put_many([(ck("a"), b"aaa")])  # write-back's hand-over: below memory only
    assert not tiers.in_memory(ck("a")) and tiers.held_locally(ck("a"))
    assert tiers.get_local(ck("a")) == b"aaa"


def test_drop_object_reaches_every_tier_and_keeps_the_current_version(tmp_path: Path) -> None:
    disk, memory = disk_tier(tmp_path), MemoryTier(1 << 20)
    tiers = Tiers([memory, disk])
    old, new = ck("f", etag="v1"), ck("f", etag="v2")
    for key in (old, new):
        tiers.remember([(key, b"x" * 100)])
        disk.put(key, b"x" * 100)
    freed = tiers.drop_object("bkt", "f", keep_etag="v2")
    assert freed > 100  # bytes on disk, header included
    assert not tiers.in_memory(old) and not tiers.held_locally(old)
    assert tiers.in_memory(new) and tiers.held_locally(new)
    tiers.drop_object("bkt", "f")
    assert not tiers.in_memory(new) and not tiers.held_locally(new)
    assert tiers.status()["memory_cache_bytes"] == 0


def test_memory_tier_is_a_bounded_lru() -> None:
    memory = MemoryTier(250)
    memory.put_many([(ck("a"), b"a" * 100), (ck("b"), b"b" * 100)])
    assert memory.get(ck("a")) is not None  # a is now the most recent
    memory.put_many([(ck("c"), b"c" * 100)])
    assert [memory.contains(ck(k)) for k in "abc"] == [True, False, True] and memory.size == 200


def test_a_chunk_keys_digest_is_computed_once_and_equality_sees_only_its_fields() -> None:
    a, b = ck("k"), ck("k")
    first = a.digest()
    assert a.digest() is first  # kept on the instance: a warm read asks for it several times
    assert b.digest() == first and a == b and hash(a) == hash(b)  # the memo is no part of equality
    assert ck("k", 1).digest() != first and ck("k", etag="e2").digest() != first
    assert a.object_id() is a.object_id() and a.object_id() == ck("k", 3, "e9").object_id()
    assert ck("other").object_id() != a.object_id()


def test_entries_validate_identity_and_bytes() -> None:
    one, two = identity("http://o", ck("k", 0)), identity("http://o", ck("k", 1))
    entry = encode_entry(one, b"block bytes")
    assert decode_entry(one, entry) == b"block bytes"
    assert decode_entry(two, entry) is None  # a foreign entry: another block's bytes under this name
    assert decode_entry(one, entry[:-1] + b"X") is None  # damaged
    assert decode_entry(one, entry[:-1]) is None  # truncated
    assert decode_entry(one, b"") is None


def test_names_are_content_addressed() -> None:
    base = identity("http://origin-a", ck("k"))
    assert identity("http://origin-b", ck("k")) != base  # two origins never collide
    assert identity("http://origin-a", ck("k", etag="e2")) != base  # a changed object has other names
    assert identity("http://origin-a", ck("k")) == base


def shared(moto: MotoS3, bucket: Callable[..., str], **options: object) -> SharedTier:
    name = bucket(moto)
    store = S3ObjectStore(name, endpoint_url=moto.endpoint_url, timeout=5.0, retries=0)
    return SharedTier(store, prefix="p/", origin="http://o", block_size=BLOCK, **options)  # type: ignore[arg-type]


def test_a_fill_is_read_back_by_another_node(moto: MotoS3, bucket: Callable[..., str], s3_env: None) -> None:
    a = shared(moto, bucket)
    store = a._store  # the same bucket, as a second node would see it
    b = SharedTier(store, prefix="p/", origin="http://o", block_size=BLOCK)
    try:
        assert b.get(ck("k")) is None
        a.put_many([(ck("k"), b"z" * BLOCK)])
        assert a.drain(10)
        assert b.get_many([ck("k"), ck("k", 1)]) == [b"z" * BLOCK, None]
        s = b.status()
        assert (s["shared_hits"], s["shared_misses"], s["shared_bytes"]) == (1, 2, BLOCK)
        assert a.status()["shared_puts"] == 1
    finally:
        a.close()
        b.close()


def test_the_fill_queue_is_bounded_and_holds_a_block_once(
    moto: MotoS3, bucket: Callable[..., str], s3_env: None
) -> None:
    tier = shared(moto, bucket, queue_bytes=250, writers=0)  # nothing drains: the queue only fills
    try:
        tier.put_many([(ck("a"), b"a" * 100), (ck("a"), b"a" * 100), (ck("b"), b"b" * 100)])
        tier.put_many([(ck("c"), b"c" * 100)])  # does not fit: dropped, never waited for
        s = tier.status()
        assert s["shared_queue_bytes"] == 200 and s["shared_put_dropped"] == 1
    finally:
        tier.close(drain=0)
    assert tier.status()["shared_put_dropped"] == 3  # what was still queued at close
