"""Issue "two doors": the bucket changed through S3 while tierfs has it mounted.

What a reader of the mount sees, and when (docs/consistency.md): NEW, CHANGED and DELETED
objects show after the metadata TTL, a store outage is EIO and never "deleted", ``tierfs
refresh`` skips the wait, ``indefinite`` never revalidates by itself, and the optional
import sweep applies changes before anyone looks. Everything runs against real servers;
the importer's unit tests build a real Namespace over moto.
"""

from __future__ import annotations

import errno
import functools
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import lmdb
import pytest
import trio
from mounting import Mounter, tierfs_ok, wait_until

from tierfs.errors import Unavailable
from tierfs.meta import importer
from tierfs.meta.namespace import Namespace, NamespacePolicy
from tierfs.meta.records import ROOT_INO, Inode
from tierfs.store.objectstore import S3ObjectStore
from tools.servers import MotoS3, SeaweedFS, free_port, s3_client

TTL = 1.0
SETTLE = TTL + 3.0  # the TTL, plus a kernel entry timeout, plus slack for a slow CI machine


def read(path: Path) -> bytes:
    with path.open("rb") as f:
        return f.read()


def missing(path: Path) -> bool:
    try:
        path.stat()
    except FileNotFoundError:
        return True
    return False


@pytest.fixture
def private_seaweed(tmp_path: Path) -> Iterator[SeaweedFS]:
    """A SeaweedFS this test may stop; requested before ``mounter`` so that it is torn down after it."""
    with SeaweedFS(tmp_path / "weed") as server:
        yield server


# --------------------------------------------------------------------------- TTL revalidation


def test_new_object_appears_within_ttl(
    mounter: Mounter, bucket: Callable[..., str], seaweed: SeaweedFS
) -> None:
    name = bucket()
    s3 = s3_client(seaweed.endpoint_url)
    s3.put_object(Bucket=name, Key="old.txt", Body=b"old")
    mnt = mounter(f"s3://{name}", "--metadata-ttl", str(TTL)).path
    assert os.listdir(mnt) == ["old.txt"]
    assert missing(mnt / "new.txt")  # also leaves a negative dentry behind, which must expire too
    s3.put_object(Bucket=name, Key="new.txt", Body=b"brand new")
    wait_until(lambda: "new.txt" in os.listdir(mnt), SETTLE, "new.txt listed")
    wait_until(lambda: not missing(mnt / "new.txt"), SETTLE, "new.txt found by stat")
    assert (mnt / "new.txt").stat().st_size == len(b"brand new")
    assert read(mnt / "new.txt") == b"brand new"


def test_changed_object_is_read_exactly_after_ttl(
    mounter: Mounter, bucket: Callable[..., str], seaweed: SeaweedFS
) -> None:
    name = bucket()
    s3 = s3_client(seaweed.endpoint_url)
    old, new = os.urandom(300_000), os.urandom(1_700_000)  # different length, different bytes
    s3.put_object(Bucket=name, Key="data.bin", Body=old)
    path = mounter(f"s3://{name}", "--metadata-ttl", str(TTL)).path / "data.bin"
    assert read(path) == old
    assert read(path) == old  # now in the page cache, which must not outlive the change
    s3.put_object(Bucket=name, Key="data.bin", Body=new)
    seen: list[bytes] = []

    def sees_new() -> bool:
        seen.append(read(path))
        return seen[-1] == new

    wait_until(sees_new, SETTLE, "new version read through the mount")
    assert all(data in (old, new) for data in seen), "a read mixed the old and the new version"
    assert path.stat().st_size == len(new)


def test_deleted_object_disappears_after_ttl(
    mounter: Mounter, bucket: Callable[..., str], seaweed: SeaweedFS
) -> None:
    name = bucket()
    s3 = s3_client(seaweed.endpoint_url)
    s3.put_object(Bucket=name, Key="doomed.txt", Body=b"bye")
    s3.put_object(Bucket=name, Key="stays.txt", Body=b"hi")
    mnt = mounter(f"s3://{name}", "--metadata-ttl", str(TTL)).path
    assert sorted(os.listdir(mnt)) == ["doomed.txt", "stays.txt"]
    assert read(mnt / "doomed.txt") == b"bye"
    s3.delete_object(Bucket=name, Key="doomed.txt")
    wait_until(lambda: os.listdir(mnt) == ["stays.txt"], SETTLE, "doomed.txt gone from the listing")
    with pytest.raises(FileNotFoundError):
        (mnt / "doomed.txt").stat()
    assert read(mnt / "stays.txt") == b"hi"


def test_outage_is_eio_never_enoent(private_seaweed: SeaweedFS, mounter: Mounter, tmp_path: Path) -> None:
    server = private_seaweed
    server.create_bucket("outage")
    body = os.urandom(200_000)
    s3_client(server.endpoint_url).put_object(Bucket="outage", Key="dir/file.bin", Body=body)
    mnt = mounter(
        "s3://outage", "--metadata-ttl", str(TTL), "--timeout", "2", "--retries", "0",
        endpoint_url=server.endpoint_url,
    ).path  # fmt: skip
    path = mnt / "dir" / "file.bin"
    assert read(path) == body
    server.stop()
    errors: list[int] = []

    def lookup_fails() -> bool:
        try:
            path.stat()
        except OSError as exc:
            errors.append(exc.errno or 0)
            return True
        return False  # still within the TTL: served from what was listed

    wait_until(lookup_fails, SETTLE + 5, "a lookup reaching the stopped server")
    assert errors == [errno.EIO], f"lookup failed with {[errno.errorcode.get(e, e) for e in errors]}"
    with pytest.raises(OSError) as listing:
        os.listdir(mnt / "dir")
    assert listing.value.errno == errno.EIO
    server.restart()
    wait_until(lambda: not missing(path) and read(path) == body, 30, "file back after the restart")


def test_round_trip_both_ways(mounter: Mounter, bucket: Callable[..., str], seaweed: SeaweedFS) -> None:
    name = bucket()
    s3 = s3_client(seaweed.endpoint_url)
    from_s3, from_mount = os.urandom(2_500_000), os.urandom(1_300_001)
    s3.put_object(Bucket=name, Key="in/from-s3.bin", Body=from_s3)
    mnt = mounter(f"s3://{name}", "--metadata-ttl", str(TTL)).path
    assert read(mnt / "in" / "from-s3.bin") == from_s3
    (mnt / "out").mkdir()
    (mnt / "out" / "from-mount.bin").write_bytes(from_mount)
    tierfs_ok("flush", str(mnt))
    assert s3.get_object(Bucket=name, Key="out/from-mount.bin")["Body"].read() == from_mount


# --------------------------------------------------------------------------- explicit refresh


def test_refresh_shows_a_change_before_the_ttl(
    mounter: Mounter, bucket: Callable[..., str], seaweed: SeaweedFS
) -> None:
    name = bucket()
    s3 = s3_client(seaweed.endpoint_url)
    old, new = b"version one\n", b"version two, which is longer\n"
    s3.put_object(Bucket=name, Key="sub/notes.txt", Body=old)
    mount = mounter(f"s3://{name}", "--metadata-ttl", "300")
    path = mount.path / "sub" / "notes.txt"
    assert read(path) == old
    s3.put_object(Bucket=name, Key="sub/notes.txt", Body=new)
    assert path.stat().st_size == len(old)  # trusted for 300 s
    assert read(path) == old
    tierfs_ok("refresh", str(path))
    assert path.stat().st_size == len(new)
    assert read(path) == new


def test_indefinite_ttl_never_revalidates_until_refresh(
    mounter: Mounter, bucket: Callable[..., str], seaweed: SeaweedFS
) -> None:
    name = bucket()
    s3 = s3_client(seaweed.endpoint_url)
    old, new = b"A" * 1000, b"B" * 3000
    s3.put_object(Bucket=name, Key="f.txt", Body=old)
    mount = mounter(f"s3://{name}", "--metadata-ttl", "indefinite")
    path = mount.path / "f.txt"
    assert read(path) == old
    s3.put_object(Bucket=name, Key="g.txt", Body=b"new file")
    s3.put_object(Bucket=name, Key="f.txt", Body=new)
    lists = mount.status()["s3_list_requests"]
    time.sleep(TTL + 0.5)  # longer than the TTL of the other tests: nothing may expire here
    assert os.listdir(mount.path) == ["f.txt"]
    assert path.stat().st_size == len(old)
    assert read(path) == old
    assert mount.status()["s3_list_requests"] == lists, "indefinite metadata was revalidated"
    tierfs_ok("refresh", str(mount.path))
    assert sorted(os.listdir(mount.path)) == ["f.txt", "g.txt"]
    assert read(path) == new


# --------------------------------------------------------------------------- background import


def test_import_interval_applies_changes_before_anyone_looks(
    mounter: Mounter, bucket: Callable[..., str], seaweed: SeaweedFS
) -> None:
    name = bucket()
    s3 = s3_client(seaweed.endpoint_url)
    old, new = os.urandom(2_200_000), os.urandom(900_000)
    s3.put_object(Bucket=name, Key="d/big.bin", Body=old)
    mount = mounter(f"s3://{name}", "--metadata-ttl", "300", "--import-interval", "1s")
    path = mount.path / "d" / "big.bin"
    assert read(path) == old
    before = mount.status()
    assert before["chunks_cached"] == 3
    s3.put_object(Bucket=name, Key="d/big.bin", Body=new)
    # Nobody touches the mount now: only the sweep can notice the change and drop the chunks.
    wait_until(lambda: mount.status()["chunks_cached"] == 0, 10, "old chunks dropped by the import sweep")
    assert mount.status()["s3_list_requests"] > before["s3_list_requests"]
    assert path.stat().st_size == len(new)  # despite the 300 s TTL
    assert read(path) == new


# --------------------------------------------------------------------------- importer unit tests


class Harness:
    """A real Namespace over LMDB and moto's S3, with the importer's view of it."""

    def __init__(self, moto: MotoS3, tmp_path: Path, name: str, ttl: float = 300.0) -> None:
        self.s3 = s3_client(moto.endpoint_url)
        self.s3.create_bucket(Bucket=name)
        self.env = lmdb.open(str(tmp_path / "meta"), max_dbs=8, map_size=1 << 26)
        self.store = S3ObjectStore(name, endpoint_url=moto.endpoint_url, timeout=2.0, retries=0)
        policy = NamespacePolicy(
            bucket=name, root_prefix="", ttl=ttl, uid=0, gid=0, file_mode=0o644, dir_mode=0o755
        )
        self.ns = Namespace(self.env, self.store, policy, self.run)
        self.changes: list[tuple[str, str | None]] = []
        self.ns.change_hooks.append(
            lambda old, new: self.changes.append((old.key, new.etag if new else None))
        )
        self.bucket = name

    @staticmethod
    async def run(fn: Callable[..., Any], *args: Any) -> Any:
        return await trio.to_thread.run_sync(functools.partial(fn, *args))

    def put(self, key: str, body: bytes = b"x") -> None:
        self.s3.put_object(Bucket=self.bucket, Key=key, Body=body)

    async def path(self, path: str) -> Inode:
        node = self.ns.get(ROOT_INO)
        assert node is not None
        for part in path.split("/"):
            node = await self.ns.lookup(node.ino, part)
        return node

    @property
    def lists(self) -> int:
        return self.store.requests.get("list_objects_v2", 0)


@pytest.fixture
def harness(moto: MotoS3, tmp_path: Path, request: pytest.FixtureRequest, s3_env: None) -> Iterator[Harness]:
    name = f"imp-{request.node.name.lower().replace('_', '-')[:40]}-{os.getpid()}"
    h = Harness(moto, tmp_path, name)
    try:
        yield h
    finally:
        h.env.close()


async def test_a_zero_metadata_ttl_lists_once_per_lookup_and_returns(
    moto: MotoS3, tmp_path: Path, s3_env: None
) -> None:
    """``--metadata-ttl 0`` means "list on every lookup". A listing's record was never fresh
    under that TTL, so ensure_listed relisted forever and a read of a file below a directory
    hung with the daemon spinning (found while testing the shared tier). A listing that ended
    after the request is as fresh as the caller can get, whatever the TTL."""
    h = Harness(moto, tmp_path, f"ttl-zero-{os.getpid()}", ttl=0.0)
    try:
        h.put("dir/file.bin", b"payload")
        with trio.fail_after(20):
            node = await h.path("dir/file.bin")
            first = h.lists
            again = await h.path("dir/file.bin")
        assert node.ino == again.ino and node.size == len(b"payload")
        assert h.lists - first == 2  # root and dir/, once each, for the second lookup
    finally:
        h.env.close()


async def test_sweep_relists_only_cached_directories(harness: Harness) -> None:
    for key in ("top.txt", "seen/a.txt", "seen/deep/b.txt", "unseen/c.txt"):
        harness.put(key)
    await harness.path("seen/deep/b.txt")  # lists /, seen/ and seen/deep/; unseen/ stays unlisted
    lists = harness.lists
    harness.put("seen/deep/new.txt")
    harness.put("unseen/new.txt")
    assert await importer.sweep_once(harness.ns) == 3
    assert harness.lists == lists + 3
    assert harness.ns.child((await harness.path("seen/deep")).ino, "new.txt") is not None
    unseen = await harness.path("unseen")  # a lookup, not a listing of unseen/ itself
    assert unseen.checked == 0


async def test_sweep_applies_changed_and_deleted_objects(harness: Harness) -> None:
    harness.put("d/changed.txt", b"one")
    harness.put("d/deleted.txt", b"two")
    harness.put("gone/x.txt", b"three")
    changed = await harness.path("d/changed.txt")
    await harness.path("d/deleted.txt")
    await harness.path("gone/x.txt")
    harness.put("d/changed.txt", b"one, but longer")
    harness.s3.delete_object(Bucket=harness.bucket, Key="d/deleted.txt")
    harness.s3.delete_object(Bucket=harness.bucket, Key="gone/x.txt")
    await importer.sweep_once(harness.ns)
    d = await harness.path("d")
    assert harness.ns.child(d.ino, "deleted.txt") is None
    assert harness.ns.child(ROOT_INO, "gone") is None  # dropped with the root's listing, not listed itself
    now = harness.ns.child(d.ino, "changed.txt")
    assert now is not None and now.ino == changed.ino and now.size == len(b"one, but longer")
    keys = {key: etag for key, etag in harness.changes}
    assert keys["d/changed.txt"] == now.etag
    assert keys["d/deleted.txt"] is None and keys["gone/x.txt"] is None


async def test_sweep_with_store_down_deletes_nothing(harness: Harness) -> None:
    harness.put("a/b.txt")
    await harness.path("a/b.txt")
    harness.ns.store = S3ObjectStore(
        harness.bucket, endpoint_url=f"http://127.0.0.1:{free_port()}", timeout=1.0, retries=0
    )  # nothing listens there: connection refused, i.e. Unavailable
    with pytest.raises(Unavailable):
        await importer.sweep_once(harness.ns)
    with trio.move_on_after(0.5):
        await importer.sweep_loop(harness.ns, 0.05)  # logs and carries on; never raises
    assert (await harness.path("a/b.txt")).key == "a/b.txt"
    assert harness.changes == []


async def test_sweep_of_a_never_listed_mount_costs_nothing(harness: Harness) -> None:
    assert await importer.sweep_once(harness.ns) == 0
    assert harness.lists == 0
