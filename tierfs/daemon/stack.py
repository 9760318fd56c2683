"""One function builds the layers of a mount: the daemon and the in-process tests share it.

:func:`build_stack` opens the cache dir and wires, on it and an object store, every layer
from the cache tiers up to the file system (:class:`tierfs.fs.FileSystem`); what is left to
its caller is what only a live mount has (the FUSE adapter, kernel invalidations, the control
server, background tasks), so a test drives exactly the stack a mount serves. Building opens
files and LMDB environments (blocking, before the trio loop runs); :meth:`Stack.close` closes
them. ``run_s3`` and ``run_io`` are the two bounded thread pools every layer's blocking work
goes through (docs/design.md, "Threading rules").
"""

from __future__ import annotations

import functools
import math
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import trio

from ..cache.chunkcache import ChunkCache
from ..cache.memory import MemoryTier
from ..cache.stack import Tiers
from ..cache.tier import CacheTier
from ..config import DEFAULT_TIMEOUT, MountConfig
from ..fs import FileSystem
from ..meta.cachedir import CacheDir
from ..meta.groupcommit import GroupCommit
from ..meta.namespace import Namespace, NamespacePolicy
from ..meta.view import NamespaceView
from ..read.engine import ColdGets
from ..read.hydrator import Hydrator
from ..store.objectstore import ObjectStore
from ..writeback import WriteBack
from ..writeback.journal import Journal
from ..writeback.staging import Staging

IO_THREADS = 8
HOT_BYTES = 64 << 20  # the memory tier
# GETs the cold engine keeps in flight per --s3-concurrency slot: they hold no thread, and each
# is at most CRT_MAX_GET (2 MiB), so 4 x 16 = 64 in flight cost at most 128 MiB, and about
# 7 MiB for 110 KiB files (docs/coldpath.md).
COLD_GETS_PER_SLOT = 4
Spawn = Callable[[Callable[[], Awaitable[None]]], None]


@dataclass(frozen=True)
class StackSettings:
    """What the layers need to know of a mount's configuration (``from_config`` for a mount)."""

    bucket: str
    root_prefix: str = ""
    block_size: int = 1 << 20
    metadata_ttl: float = 60.0
    uid: int = 0
    gid: int = 0
    file_mode: int = 0o644
    dir_mode: int = 0o755
    cache_size: int | None = None
    cache_min_free: float = 0.0
    cache_max_age: float = math.inf
    cache_compression: int | None = None
    read_only: bool = False
    writeback_delay: float = 5.0
    upload_concurrency: int = 8
    s3_concurrency: int = 16
    timeout: float | None = None  # the store's bound on one call; None: the store's own
    retries: int = 2  # the store's extra attempts, which the cold engine's GETs follow too

    @classmethod
    def from_config(cls, cfg: MountConfig) -> StackSettings:
        return cls(
            bucket=cfg.source.bucket, root_prefix=cfg.source.prefix, block_size=cfg.block_size,
            metadata_ttl=cfg.metadata_ttl, uid=cfg.uid, gid=cfg.gid, file_mode=cfg.file_mode,
            dir_mode=cfg.dir_mode, cache_size=cfg.cache_size, cache_min_free=cfg.cache_min_free,
            cache_max_age=cfg.cache_max_age, cache_compression=cfg.cache_compression,
            read_only=cfg.read_only, writeback_delay=cfg.writeback_delay,
            upload_concurrency=cfg.upload_concurrency, s3_concurrency=cfg.s3_concurrency, timeout=cfg.timeout,
            retries=cfg.retries,
        )  # fmt: skip


@dataclass(frozen=True)
class Pinning:
    """A mount pinned to a snapshot (docs/snapshots.md): the read-only namespace it serves, the
    version id that pins each inode's bytes, and the store its reads go through."""

    view: NamespaceView
    version_ids: Callable[[int], str]
    reads: ObjectStore


class Stack:
    """The layers of one mount on one cache dir, from the cache tiers up to the file system.

    Made by :func:`build_stack`, which fills in the layers; this class holds them and the two
    bounded thread pools their blocking work goes through.
    """

    disk: ChunkCache
    memory: MemoryTier
    tiers: Tiers
    commit: GroupCommit
    namespace: Namespace
    hydrator: Hydrator
    journal: Journal | None
    writeback: WriteBack | None
    fs: FileSystem

    def __init__(
        self, store: ObjectStore, cachedir: CacheDir, settings: StackSettings, *, abandon: bool
    ) -> None:
        self.store = store
        self.cachedir = cachedir
        self.settings = settings
        self._abandon = abandon
        self.s3_limiter = trio.CapacityLimiter(settings.s3_concurrency)
        self.io_limiter = trio.CapacityLimiter(IO_THREADS)

    async def run_s3(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Run blocking S3 work in a worker thread, at most ``s3_concurrency`` at once. With
        ``abandon_on_cancel`` a cancelled call is left running unanswered, as after ``kill -9``."""
        return await trio.to_thread.run_sync(
            functools.partial(fn, *args, **kwargs), limiter=self.s3_limiter, abandon_on_cancel=self._abandon
        )

    async def run_io(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Run blocking disk/LMDB work in a worker thread, bounded separately from S3 work."""
        return await trio.to_thread.run_sync(functools.partial(fn, *args, **kwargs), limiter=self.io_limiter)

    def close(self) -> None:
        try:
            if hasattr(self, "hydrator"):
                self.hydrator.close()  # the cache writer stores what it holds before the tiers close
            if hasattr(self, "tiers"):
                self.tiers.close()
        finally:
            self.cachedir.close()


def build_stack(
    store: ObjectStore,
    cache_root: Path,
    owner: str,
    settings: StackSettings,
    *,
    shared: Sequence[CacheTier] = (),
    spawn: Spawn | None = None,
    abandon_on_cancel: bool = False,
    pin: Callable[[Stack], Pinning] | None = None,
) -> Stack:
    """The layers of a mount of ``store`` on the cache dir ``cache_root`` (owned by ``owner``, the
    tag a cache dir keeps of its source). ``spawn`` starts background tasks (read-ahead, lazy
    listings); without it none run. ``pin`` makes a mount pinned to a snapshot (called once the cache
    dir is open): its file system serves the snapshot's namespace and reads its versions.
    Blocking (it opens files and LMDB): before the loop runs."""
    stack = Stack(store, CacheDir(cache_root, owner), settings, abandon=abandon_on_cancel)
    try:
        _wire(stack, cache_root, shared, spawn, pin)
    except BaseException:
        stack.close()
        raise
    return stack


def _wire(
    stack: Stack,
    cache_root: Path,
    shared: Sequence[CacheTier],
    spawn: Spawn | None,
    pin: Callable[[Stack], Pinning] | None,
) -> None:
    s = stack.settings
    env = stack.cachedir.env
    stack.disk = ChunkCache(
        stack.cachedir.index_env,
        cache_root,
        block_size=s.block_size,
        limit_bytes=s.cache_size,
        min_free=s.cache_min_free,
        max_age=s.cache_max_age,
        compression_level=s.cache_compression,
    )
    stack.memory = MemoryTier(HOT_BYTES)
    stack.tiers = Tiers([stack.memory, stack.disk, *shared])
    policy = NamespacePolicy(
        bucket=s.bucket, root_prefix=s.root_prefix, ttl=s.metadata_ttl, uid=s.uid, gid=s.gid,
        file_mode=s.file_mode, dir_mode=s.dir_mode,
    )  # fmt: skip
    stack.commit = GroupCommit(env)  # one committer for the env: record updates and journal share flushes
    stack.namespace = Namespace(env, stack.store, policy, stack.run_s3, spawn=spawn, commit=stack.commit)
    pinning = pin(stack) if pin is not None else None
    stack.hydrator = Hydrator(
        bucket=s.bucket,
        store=pinning.reads if pinning else stack.store,
        tiers=stack.tiers,
        run_s3=stack.run_s3,
        run_io=stack.run_io,
        block_size=s.block_size,
        spawn=spawn or (lambda task: None),  # no spawner: no read-ahead
        learn_metadata=None if pinning else stack.namespace.learn_metadata,
        timeout=s.timeout,
        max_parallel_runs=s.s3_concurrency,
        cold_gets=_cold_gets(stack, pinning.reads if pinning else stack.store),
    )
    stack.journal = None
    stack.writeback = None
    if not s.read_only:
        stack.journal = Journal(env, stack.commit)
        stack.writeback = WriteBack(
            bucket=s.bucket,
            namespace=stack.namespace,
            store=stack.store,
            hydrator=stack.hydrator,
            staging=Staging(cache_root / "staging"),
            journal=stack.journal,
            cache=stack.tiers,
            run_s3=stack.run_s3,
            run_io=stack.run_io,
            delay=s.writeback_delay,
            upload_concurrency=s.upload_concurrency,
        )
    stack.fs = FileSystem(
        cast(Namespace, pinning.view) if pinning else stack.namespace,  # pinned: only the view's calls
        stack.hydrator,
        block_size=s.block_size,
        writeback=stack.writeback,
        run_io=stack.run_io,
        version_ids=pinning.version_ids if pinning else None,
    )


def _cold_gets(stack: Stack, store: Any) -> ColdGets:
    """The cold engine's GETs (read/engine.py) through ``store`` (a pinned mount's PinnedReads
    too): many in flight, none holding a thread, under the store's own time rule."""
    s = stack.settings
    timeout = s.timeout if s.timeout is not None else getattr(stack.store, "timeout", DEFAULT_TIMEOUT)
    limiter = trio.CapacityLimiter(COLD_GETS_PER_SLOT * s.s3_concurrency)
    return ColdGets(store, limiter=limiter, timeout=timeout, retries=s.retries)
