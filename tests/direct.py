"""The write-back stack without FUSE: Namespace + ChunkCache + Hydrator + WriteBack on one cache dir.

Why: the FUSE mount hides *which* layer broke and makes races slow to set up. Here the layers
are built by ``tierfs.daemon.stack.build_stack``, the function a mount builds them with, over a real
S3 server (moto on loopback) wrapped in :class:`tierfs.store.faultstore.FaultStore`, and driven with
write-back's calls in the order ``tierfs/fs/core.py`` makes them (``Stack.fs`` is the file system
itself). Tests then look at the bucket and the journal directly.

A :class:`Stack` can also *crash*: with ``abandon=True`` its S3 worker threads are abandoned
when the stack is cancelled, so an upload stalled on the wire neither finishes nor aborts,
as after ``kill -9``; a new stack on the same cache dir then replays the journal.
"""

from __future__ import annotations

import contextlib
import random
import stat
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio

from tierfs.cache.chunkkey import ChunkKey
from tierfs.daemon.stack import StackSettings, build_stack
from tierfs.meta.records import ROOT_INO, Inode, Kind
from tierfs.read.hydrator import ObjectVersion
from tierfs.store.faultstore import FaultStore
from tierfs.store.objectstore import S3ObjectStore
from tierfs.writeback.journal import Op
from tools.servers import s3_client

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

KiB = 1 << 10
MiB = 1 << 20
BLOCK = MiB
CONFLICT_MARK = ".conflict-"


@dataclass(frozen=True)
class Options:
    """How a stack is built. Defaults: uploads only on flush/fsync (a long write-back delay)."""

    delay: float = 3600.0
    timeout: float = 5.0
    retries: int = 1
    multipart_threshold: int = 64 * MiB
    part_size: int = 16 * MiB
    s3_concurrency: int = 8
    abandon: bool = False  # abandon S3 threads on cancel: a "crash" leaves them where they are
    seed: int = 0


class Stack:
    """One in-process tierfs minus FUSE, on ``home`` (the cache dir), against ``endpoint``."""

    def __init__(self, home: Path, endpoint: str, bucket: str, options: Options) -> None:
        self.home = home
        self.bucket = bucket
        self.options = options
        home.mkdir(parents=True, exist_ok=True)
        self.inner = S3ObjectStore(
            bucket,
            endpoint_url=endpoint,
            timeout=options.timeout,
            retries=options.retries,
            part_size=options.part_size,
            multipart_threshold=options.multipart_threshold,
        )
        self.store = FaultStore(self.inner, seed=options.seed)
        settings = StackSettings(
            bucket=bucket, block_size=BLOCK, writeback_delay=options.delay,
            s3_concurrency=options.s3_concurrency,
        )
        # The owner tag must not depend on the endpoint: a replay after a "crash" may reach
        # the same server without the proxy the crashed stack went through.
        self.layers = build_stack(
            self.store, home, f"direct|s3://{bucket}", settings, abandon_on_cancel=options.abandon
        )
        self.cachedir = self.layers.cachedir
        self.cache = self.layers.disk
        self.memory = self.layers.memory
        self.tiers = self.layers.tiers
        self.commit = self.layers.commit
        self.ns = self.layers.namespace
        self.hydrator = self.layers.hydrator
        self.fs = self.layers.fs
        assert self.layers.journal is not None and self.layers.writeback is not None
        self.journal = self.layers.journal
        self.wb = self.layers.writeback
        self.run_s3 = self.layers.run_s3
        self.run_io = self.layers.run_io
        self.closed = False

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.store.clear()  # a stall left behind would hold a worker thread for its whole bound
        self.layers.close()

    # -- the FUSE adapter's calls, in tierfs/fuse/operations.py's order --------------------------------------

    async def root(self) -> Inode:
        return await self.ns.ensure_listed(ROOT_INO)

    def node(self, name: str) -> Inode:
        node = self.ns.child(ROOT_INO, name)
        assert node is not None, f"{name} is not in the namespace"
        return node

    async def create(self, name: str, data: bytes = b"", *, close: bool = True) -> Inode:
        """create(2) + write(2) [+ close(2)]: ns.create, then wb.created(open_writer=True)."""
        root = await self.root()
        node: Inode = await self.run_io(
            lambda: self.ns.create(root, name, Kind.FILE, mode=stat.S_IFREG | 0o644, uid=0, gid=0)
        )
        await self.wb.created(node, open_writer=True)
        if data:
            await self.wb.write(node.ino, 0, data)
        if close:
            await self.wb.release_writer(node.ino)
        return node

    async def mkdir(self, name: str) -> Inode:
        """mkdir(2): ns.create of a directory, then wb.created (a ``dir/`` marker put)."""
        root = await self.root()
        node: Inode = await self.run_io(
            lambda: self.ns.create(root, name, Kind.DIR, mode=stat.S_IFDIR | 0o755, uid=0, gid=0)
        )
        await self.wb.created(node)
        return node

    async def write_open(self, name: str, data: bytes, *, truncate: bool, close: bool = True) -> Inode:
        """open(2) for writing (``O_TRUNC`` if ``truncate``), pwrite at 0 [+ close(2)]."""
        await self.root()
        node = self.node(name)
        await self.wb.open_for_write(node, truncate=truncate)
        await self.wb.write(node.ino, 0, data)
        if close:
            await self.wb.release_writer(node.ino)
        return node

    async def open_writer(self, name: str, *, truncate: bool = False) -> Inode:
        """open(2) for writing, without writing yet."""
        await self.root()
        node = self.node(name)
        await self.wb.open_for_write(node, truncate=truncate)
        return node

    async def pwrite(self, name: str, offset: int, data: bytes) -> None:
        """write(2) through a handle opened for writing."""
        written = await self.wb.write(self.node(name).ino, offset, data)
        assert written == len(data), f"short write: {written} of {len(data)} bytes"

    async def close_writer(self, name: str) -> None:
        await self.wb.release_writer(self.node(name).ino)

    async def truncate(self, name: str, size: int) -> None:
        await self.wb.truncate(self.node(name), size)

    async def remove(self, name: str) -> None:
        """unlink(2): ns.remove, then wb.removed."""
        node = self.node(name)
        await self.run_io(self.ns.remove, ROOT_INO, name)
        await self.wb.removed(node)

    async def rename(self, old: str, new: str) -> None:
        """rename(2) as fuse.operations does it: wb.removed(target) for a replaced name, then
        ns.rename and wb.renamed inside wb.renaming."""
        root = await self.root()
        node = self.node(old)
        target = self.ns.child(ROOT_INO, new)
        if target is not None:
            await self.run_io(self.ns.remove, ROOT_INO, new)
            await self.wb.removed(target)
        async with self.wb.renaming(node):
            moved, old_key = await self.run_io(self.ns.rename, root, old, root, new)
            await self.wb.renamed(moved, old_key)

    async def read(self, name: str) -> bytes:
        """The whole file as a read through the mount gets it (fs.read with a following handle)."""
        node = self.node(name)
        if self.wb.is_staged(node.ino):
            size = self.wb.size_of(node.ino)
            staged = await self.wb.read_staged(node.ino, 0, max(size or 0, node.size) + 1)
            if staged is not None:
                return staged
            node = self.node(name)  # retired meanwhile: its bytes are now the node's version
        version = ObjectVersion(node.ino, self.wb.data_key(node.ino, node.key), node.etag, node.size)
        return await self.hydrator.read(version, 0, node.size)

    async def flush(self, timeout: float = 30.0) -> dict[str, Any]:
        result: dict[str, Any] = await self.wb.flush_all(timeout=timeout)
        return result

    # -- what the cache dir holds --------------------------------------------------------------------

    def journal_ops(self) -> list[Op]:
        return self.journal.load()

    def staged_files(self) -> list[Path]:
        return sorted(p for p in (self.home / "staging").iterdir() if p.is_file())

    def cached_blocks(self, key: str, etag: str, size: int) -> list[bytes | None]:
        """What the chunk cache holds for each block of (key, etag) (None: nothing)."""
        count = max(1, (size + BLOCK - 1) // BLOCK)
        return [self.cache.get(ChunkKey(self.bucket, key, etag, i)) for i in range(count)]


def payload(seed: int, size: int) -> bytes:
    """Deterministic random bytes: a test's data, reproducible from its seed."""
    return random.Random(seed).randbytes(size)


@contextlib.asynccontextmanager
async def running(
    home: Path, endpoint: str, bucket: str, options: Options | None = None
) -> AsyncIterator[Stack]:
    """A stack whose write-back executor runs (replaying the journal first, as a mount does).

    On the way out the executor is cancelled and the cache dir closed, whatever happened.
    With ``options.abandon`` that is a crash: S3 calls in flight are left running, unanswered.
    """
    stack = Stack(home, endpoint, bucket, options or Options())
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(stack.wb.run)
            try:
                yield stack
            finally:
                if not stack.options.abandon:
                    stack.store.clear()  # let stalled calls go, or cancelling would wait their bound
                nursery.cancel_scope.cancel()
    finally:
        stack.close()


async def wait_for(check: Callable[[], bool], timeout: float, what: str) -> None:
    """Poll ``check`` on the loop every 20 ms; fail with ``what`` if it does not hold within ``timeout``."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout} s: {what}")
        await trio.sleep(0.02)


async def wait_stalled(store: FaultStore, count: int = 1, timeout: float = 10.0) -> None:
    """Wait (in a thread: FaultStore's wait blocks) until ``count`` calls are held by a stall."""
    held = await trio.to_thread.run_sync(store.wait_stalled, count, timeout)
    assert held, f"no {count} stalled store call(s) within {timeout} s (calls: {dict(store.calls)})"


class Bucket:
    """The bucket as another S3 client sees it (boto3, straight to the server)."""

    def __init__(self, endpoint: str, name: str) -> None:
        self.name = name
        self.client: S3Client = s3_client(endpoint)

    def list_keys(self) -> list[str]:
        pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=self.name)
        return sorted(o["Key"] for page in pages for o in page.get("Contents", ()))

    def contents(self) -> dict[str, bytes]:
        return {key: self.get(key) for key in self.list_keys()}

    def get(self, key: str) -> bytes:
        return self.client.get_object(Bucket=self.name, Key=key)["Body"].read()

    def head(self, key: str) -> dict[str, Any]:
        return dict(self.client.head_object(Bucket=self.name, Key=key))

    def put(self, key: str, body: bytes) -> str:
        return self.client.put_object(Bucket=self.name, Key=key, Body=body)["ETag"].strip('"')

    def conflict_keys(self) -> list[str]:
        return [key for key in self.list_keys() if CONFLICT_MARK in key]

    def multipart_uploads(self) -> list[tuple[str, str]]:
        uploads = self.client.list_multipart_uploads(Bucket=self.name).get("Uploads", ())
        return [(u["Key"], u["UploadId"]) for u in uploads]
