"""The shared cache tier (docs/shared-cache.md) on real servers: an origin SeaweedFS, a second
SeaweedFS as the shared tier, and two mounts ("nodes") with separate cache dirs.

Origin requests are counted at the origin server (its Prometheus counters), not by tierfs.
"""

from __future__ import annotations

import os
import random
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from mounting import Mount, Mounter, tierfs_ok, wait_until

from tools.servers import SeaweedFS, free_port, s3_client

MiB = 1 << 20


@pytest.fixture(scope="module")
def tier_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedFS]:
    """The shared tier's own cluster: a second SeaweedFS, so it can be frozen without the origin."""
    with SeaweedFS(tmp_path_factory.mktemp("shared-tier")) as server:
        yield server


@pytest.fixture(autouse=True)
def _restore_tier(tier_server: SeaweedFS) -> Iterator[None]:
    yield
    tier_server.ensure_running()


class Nodes:
    """Two nodes mounting one origin bucket, sharing one tier bucket."""

    def __init__(self, mounter: Mounter, origin: SeaweedFS, origin_bucket: str, tier: SeaweedFS,
                 tier_bucket: str) -> None:  # fmt: skip
        self.origin, self.bucket, self.tier, self.tier_bucket = origin, origin_bucket, tier, tier_bucket
        self.client = s3_client(origin.endpoint_url)
        self.tier_client = s3_client(tier.endpoint_url)
        self._mounter = mounter

    def mount(self, *extra: str, endpoint: str | None = None) -> Mount:
        return self._mounter(
            f"s3://{self.bucket}",
            "--shared-cache", f"s3://{self.tier_bucket}/blocks",
            "--shared-cache-endpoint-url", endpoint or self.tier.endpoint_url,
            *extra,
        )  # fmt: skip

    def put(self, key: str, size: int, seed: int) -> bytes:
        body = random.Random(seed).randbytes(size)
        self.client.put_object(Bucket=self.bucket, Key=key, Body=body)
        return body

    def origin_gets(self) -> int:
        return self.origin.request_count(self.bucket, "GET")

    def tier_entries(self) -> list[str]:
        pages = self.tier_client.get_paginator("list_objects_v2").paginate(Bucket=self.tier_bucket)
        return [o["Key"] for page in pages for o in page.get("Contents", [])]


@pytest.fixture
def nodes(mounter: Mounter, seaweed: SeaweedFS, tier_server: SeaweedFS, bucket: Callable[..., str]) -> Nodes:
    return Nodes(mounter, seaweed, bucket(), tier_server, bucket(tier_server))


def filled(node: Mount, blocks: int) -> None:
    """Wait until ``node`` has uploaded ``blocks`` fills and has none queued."""

    def done() -> bool:
        s = node.status()
        return bool(s["shared_puts"] >= blocks and s["shared_queue_bytes"] == 0)

    wait_until(done, 30, f"{blocks} blocks filled into the shared tier")


def read(path: Path) -> bytes:
    return path.read_bytes()


def test_node_b_reads_what_node_a_fetched_without_the_origin(nodes: Nodes) -> None:
    big = nodes.put("data/big.bin", 2 * MiB + 12345, 1)  # three blocks
    small = nodes.put("data/small.bin", 110 * 1024, 2)  # stored whole: one entry
    a = nodes.mount()
    assert read(a.path / "data/big.bin") == big and read(a.path / "data/small.bin") == small
    filled(a, 4)
    assert len(nodes.tier_entries()) == 4

    b = nodes.mount()
    os.stat(b.path / "data/big.bin"), os.stat(b.path / "data/small.bin")  # metadata is not data
    before = nodes.origin_gets()
    assert read(b.path / "data/big.bin") == big and read(b.path / "data/small.bin") == small
    assert nodes.origin_gets() == before, "node B's first read went to the origin"
    s = b.status()
    assert s["shared_hits"] == 4 and s["shared_bytes"] == len(big) + len(small)
    assert s["shared_errors"] == 0 and s["shared_puts"] == 0  # B fills nothing it got from the tier
    assert s["bytes_from_s3"] == 0


def test_a_changed_object_is_never_served_from_the_tier(nodes: Nodes) -> None:
    v1 = nodes.put("obj", MiB + 7, 3)
    a = nodes.mount()
    assert read(a.path / "obj") == v1
    filled(a, 2)
    v2 = nodes.put("obj", MiB + 7, 4)  # same size and key, other bytes and ETag

    b = nodes.mount()
    assert read(b.path / "obj") == v2
    s = b.status()
    assert s["shared_hits"] == 0 and s["shared_misses"] == 2  # looked up under v2's names only


def test_a_corrupted_or_foreign_entry_is_ignored_and_refetched(nodes: Nodes) -> None:
    one = nodes.put("one", 300 * 1024, 5)
    two = nodes.put("two", 300 * 1024, 6)
    a = nodes.mount()
    assert read(a.path / "one") == one
    filled(a, 1)
    (entry_one,) = nodes.tier_entries()
    assert read(a.path / "two") == two
    filled(a, 2)
    (entry_two,) = [e for e in nodes.tier_entries() if e != entry_one]
    raw = nodes.tier_client.get_object(Bucket=nodes.tier_bucket, Key=entry_one)["Body"].read()
    damaged = raw[:-1] + bytes([raw[-1] ^ 1])
    nodes.tier_client.put_object(Bucket=nodes.tier_bucket, Key=entry_one, Body=damaged)
    nodes.tier_client.put_object(Bucket=nodes.tier_bucket, Key=entry_two, Body=raw)  # one's valid entry

    b = nodes.mount()
    os.stat(b.path / "one"), os.stat(b.path / "two")
    before = nodes.origin_gets()
    assert read(b.path / "one") == one and read(b.path / "two") == two
    assert nodes.origin_gets() == before + 2  # both refetched from the origin
    s = b.status()
    assert s["shared_hits"] == 0 and s["shared_errors"] == 2
    filled(b, 2)  # and the tier is repaired with the right bytes
    c = nodes.mount()
    os.stat(c.path / "one"), os.stat(c.path / "two")
    before = nodes.origin_gets()
    assert read(c.path / "one") == one and read(c.path / "two") == two
    assert nodes.origin_gets() == before and c.status()["shared_hits"] == 2


def test_a_frozen_tier_costs_one_timeout_not_one_per_block(nodes: Nodes) -> None:
    bodies = {f"f{n}": nodes.put(f"f{n}", 2 * MiB + 1, 10 + n) for n in range(4)}  # 3 blocks each
    b = nodes.mount("--shared-cache-timeout", "0.5")
    with nodes.tier.frozen():
        for name, body in bodies.items():
            assert read(b.path / name) == body
        s = b.status()
    assert s["errors"] == 0 and s["shared_hits"] == 0 and s["shared_errors"] >= 1
    # After the first failure the tier is skipped (BACKOFF), so the 12 blocks did not each wait for it.
    assert s["shared_misses"] <= 3, s
    assert s["bytes_from_s3"] == sum(len(v) for v in bodies.values())


def test_a_tier_that_is_down_at_mount_time_never_fails_a_read(nodes: Nodes) -> None:
    body = nodes.put("f", MiB + 3, 20)
    b = nodes.mount(endpoint=f"http://127.0.0.1:{free_port()}")  # nothing listens there
    assert read(b.path / "f") == body
    s = b.status()
    assert s["errors"] == 0 and s["shared_hits"] == 0 and s["shared_errors"] >= 1
    assert "not answering" in b.log_text()


def test_prefetch_on_a_warms_b(nodes: Nodes) -> None:
    bodies = {f"set/s{n}": nodes.put(f"set/s{n}", 150 * 1024 * (n + 1), 30 + n) for n in range(5)}
    a = nodes.mount()
    tierfs_ok("prefetch", str(a.path / "set"), "--recursive")
    filled(a, 5)

    b = nodes.mount()
    for key in bodies:
        os.stat(b.path / key)
    before = nodes.origin_gets()
    for key, body in bodies.items():
        assert read(b.path / key) == body
    assert nodes.origin_gets() == before
    assert b.status()["shared_hits"] == 5
