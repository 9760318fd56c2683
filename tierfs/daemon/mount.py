"""One live mount: builds the layers from a MountConfig and runs them on one trio loop.

Layering (each a module with one job; see docs/design.md):
object store -> namespace -> chunk cache -> hydrator -> write-back -> FUSE adapter.
This module is the only place that knows all of them; it also owns the background
tasks (maintenance, invalidation, control channel) and the start/stop order.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import signal
import time
from collections.abc import Awaitable, Callable
from typing import Any, cast

import pyfuse3
import trio

from ..cache.chunkcache import ChunkCache
from ..cache.memory import MemoryTier
from ..cache.shared import SharedTier
from ..cache.stack import Tiers
from ..config import MountConfig
from ..control.ops import ControlOps, MountParts
from ..control.protocol import ProgressCallback
from ..errors import ConfigError, FlushFailed
from ..fuse import kerneltune
from ..fuse.operations import TierOperations
from ..fuse.snapshot_ops import SnapshotOperations
from ..meta.cachedir import CacheDir
from ..meta.groupcommit import GroupCommit
from ..meta.importer import sweep_loop
from ..meta.namespace import Namespace, NamespacePolicy
from ..meta.records import Inode
from ..meta.view import NamespaceView
from ..read.hydrator import Hydrator
from ..reader.daemon import DirectReaders
from ..store.objectstore import ObjectStore
from ..writeback import WriteBack
from ..writeback.journal import Journal
from ..writeback.staging import Staging
from . import memory, metrics, sdnotify
from .pinned import PinnedReads, PinnedSnapshot, pinned
from .startup import preflight_store, setup_logging, shared_store

log = logging.getLogger("tierfs")

IO_THREADS = 8
HOT_BYTES = 64 << 20  # the memory tier
# An inode (data and attributes), ("attr", inode) for attributes only, or (parent inode, name).
Invalidation = int | tuple[str, int] | tuple[int, str]
MAINTENANCE_INTERVAL = 5.0
FLUSH_SLACK = 5.0  # seconds a flush may overrun its deadline and in-flight requests before it is cut off


class Mount:
    def __init__(self, cfg: MountConfig, *, daemonized: bool) -> None:
        self.cfg = cfg
        self.daemonized = daemonized
        self.started = time.time()
        self._nursery: trio.Nursery | None = None
        self._invalidations: (
            tuple[trio.MemorySendChannel[Invalidation], trio.MemoryReceiveChannel[Invalidation]] | None
        ) = None
        self._trio_token: trio.lowlevel.TrioToken | None = None

    def __enter__(self) -> Mount:
        cfg = self.cfg
        cache_root = cfg.resolved_cache_dir
        cache_root.mkdir(mode=0o700, parents=True, exist_ok=True)
        setup_logging(cfg, self.daemonized)
        self.store = preflight_store(cfg)
        owner = f"{cfg.endpoint_url or 'aws'}|{cfg.source}"
        self.cachedir = CacheDir(cache_root, owner)
        env = self.cachedir.env
        self.disk = ChunkCache(
            self.cachedir.index_env,
            cache_root,
            block_size=cfg.block_size,
            limit_bytes=cfg.cache_size,
            min_free=cfg.cache_min_free,
            max_age=cfg.cache_max_age,
            compression_level=cfg.cache_compression,
        )
        self.tiers = Tiers([MemoryTier(HOT_BYTES), self.disk, *self._shared_tier()])
        self.s3_limiter = trio.CapacityLimiter(cfg.s3_concurrency)
        self.io_limiter = trio.CapacityLimiter(IO_THREADS)
        policy = NamespacePolicy(
            bucket=cfg.source.bucket,
            root_prefix=cfg.source.prefix,
            ttl=cfg.metadata_ttl,
            uid=cfg.uid,
            gid=cfg.gid,
            file_mode=cfg.file_mode,
            dir_mode=cfg.dir_mode,
        )
        commit = GroupCommit(env)  # one committer for the env: record updates and journal share flushes
        self.namespace = Namespace(env, self.store, policy, self.run_s3, spawn=self.spawn, commit=commit)
        self.namespace.change_hooks.append(self._on_object_changed)
        self.namespace.entry_hooks.append(lambda parent, name: self.queue_invalidation((parent, name)))
        self.namespace.attr_hooks.append(lambda ino: self.queue_invalidation(("attr", ino)))
        # A mount pinned to a snapshot (docs/snapshots.md) serves its namespace from the manifest,
        # opened here so that a bad one fails before anything is mounted; the LMDB one stays unused.
        self.pinned = PinnedSnapshot(cfg, self.store, cache_root, self.run_s3) if pinned(cfg) else None
        self.view: NamespaceView = self.pinned.namespace if self.pinned else self.namespace
        self.hydrator = Hydrator(
            bucket=cfg.source.bucket,
            store=cast(ObjectStore, PinnedReads(self.store)) if self.pinned else self.store,
            tiers=self.tiers,
            run_s3=self.run_s3,
            run_io=self.run_io,
            block_size=cfg.block_size,
            spawn=self.spawn,
            learn_metadata=None if self.pinned else self.namespace.learn_metadata,
            timeout=cfg.timeout,
            max_parallel_runs=cfg.s3_concurrency,
        )
        self.writeback: WriteBack | None = None
        if not cfg.read_only:
            self.writeback = WriteBack(
                bucket=cfg.source.bucket,
                namespace=self.namespace,
                store=self.store,
                hydrator=self.hydrator,
                staging=Staging(cache_root / "staging"),
                journal=Journal(env, commit),
                cache=self.tiers,
                run_s3=self.run_s3,
                run_io=self.run_io,
                delay=cfg.writeback_delay,
                upload_concurrency=cfg.upload_concurrency,
            )
        self.metrics: Any = None
        if cfg.metrics_addr:
            try:
                self.metrics = metrics.serve(cfg.metrics_addr, self._status_from_any_thread)
            except (OSError, ValueError) as exc:
                raise ConfigError(f"cannot serve metrics on {cfg.metrics_addr}: {exc}") from None
        # A pinned mount's adapter reads directories from manifest cursors (docs/snapshots.md).
        operations: Any = SnapshotOperations if self.pinned else TierOperations
        self.ops = operations(
            cast(Namespace, self.view),  # read-only when pinned: only NamespaceView's calls are made
            self.hydrator,
            kernel_timeout=cfg.kernel_timeout,
            block_size=cfg.block_size,
            read_only=cfg.read_only,
            invalidate=self.queue_invalidation,
            writeback=self.writeback,
            run_io=self.run_io,
            version_ids=self.pinned.namespace.version_id if self.pinned else None,
        )
        return self

    def _shared_tier(self) -> list[SharedTier]:
        store = shared_store(self.cfg)
        if store is None or self.cfg.shared_cache is None:
            return []
        # The origin, named as in the cache dir's owner tag: nodes share entries when they name
        # the origin alike (the same --endpoint-url), and two origins never collide.
        origin = self.cfg.endpoint_url or "aws"
        prefix = self.cfg.shared_cache.prefix
        return [SharedTier(store, prefix=prefix, origin=origin, block_size=self.cfg.block_size)]

    def __exit__(self, *exc: object) -> None:
        if self.metrics is not None:
            self.metrics.close()
        try:
            self.tiers.close()
        finally:
            if self.pinned is not None:
                self.pinned.close()
            self.cachedir.close()

    # -- thread helpers -------------------------------------------------------------------------------

    async def run_s3(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Run blocking S3 work in a worker thread, at most ``--s3-concurrency`` at once."""
        return await trio.to_thread.run_sync(functools.partial(fn, *args, **kwargs), limiter=self.s3_limiter)

    async def run_io(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Run blocking disk/LMDB work in a worker thread, bounded separately from S3 work."""
        return await trio.to_thread.run_sync(functools.partial(fn, *args, **kwargs), limiter=self.io_limiter)

    def spawn(self, task: Callable[[], Awaitable[None]]) -> None:
        """Start a background task whose failure is logged, never fatal to the mount."""

        async def guarded() -> None:
            try:
                await task()
            except Exception:
                log.exception("background task failed")

        if self._nursery is not None:
            self._nursery.start_soon(guarded)

    # -- change propagation ---------------------------------------------------------------------------

    def _on_object_changed(self, old: Inode, new: Inode | None) -> None:
        """Namespace hook (worker thread): drop stale chunks, then have the kernel drop its caches."""
        if not old.is_dir:
            self.tiers.drop_object(self.cfg.source.bucket, old.key, keep_etag=new.etag if new else None)
        self.queue_invalidation(old.ino)

    def queue_invalidation(self, item: Invalidation) -> None:
        """Callable from any thread. Invalidation itself runs in a worker thread, never on the loop."""
        if self._invalidations is None or self._trio_token is None:
            return
        send = self._invalidations[0]
        try:
            trio.from_thread.run_sync(send.send_nowait, item, trio_token=self._trio_token)
        except RuntimeError:  # called on the loop itself
            send.send_nowait(item)
        except (trio.WouldBlock, trio.RunFinishedError, trio.ClosedResourceError):
            pass

    async def _invalidator(self) -> None:
        assert self._invalidations is not None
        async for item in self._invalidations[1]:
            try:
                match item:
                    case int(ino):
                        await trio.to_thread.run_sync(pyfuse3.invalidate_inode, ino, False)
                    case ("attr", int(ino)):
                        await trio.to_thread.run_sync(pyfuse3.invalidate_inode, ino, True)
                    case (int(parent), str(name)):
                        await trio.to_thread.run_sync(pyfuse3.invalidate_entry, parent, os.fsencode(name))
            except OSError as exc:  # ENOENT: the kernel does not know it; nothing to drop
                log.debug("invalidate %r: %s", item, exc)

    # -- serving --------------------------------------------------------------------------------------

    def fuse_options(self) -> set[str]:
        cfg = self.cfg
        opts = {f"fsname={cfg.source}", "subtype=tierfs", "default_permissions", "noatime", "nodev", "nosuid"}
        if cfg.allow_other:
            opts.add("allow_other")
        if cfg.read_only:
            opts.add("ro")
        if cfg.fuse_debug:
            opts.add("debug")
        return opts

    def serve(self, on_live: Callable[[], None]) -> None:
        pyfuse3.init(self.ops, str(self.cfg.mountpoint), self.fuse_options())
        try:
            trio.run(self._main, on_live)
        finally:
            pyfuse3.close(unmount=True)

    async def _main(self, on_live: Callable[[], None]) -> None:
        self._trio_token = trio.lowlevel.current_trio_token()
        self._invalidations = trio.open_memory_channel(10_000)
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            nursery.start_soon(self._invalidator)
            nursery.start_soon(self._maintenance)
            nursery.start_soon(self._signals)
            if self.writeback is not None:
                await nursery.start(self.writeback.run)
            if self.pinned is not None:
                nursery.start_soon(self.pinned.fill, self.run_s3)
            if self.cfg.import_interval and self.pinned is None:
                nursery.start_soon(sweep_loop, self.namespace, self.cfg.import_interval)
            await self._start_control(nursery)
            nursery.start_soon(self._announce_live, on_live)
            await pyfuse3.main(min_tasks=4, max_tasks=256)
            log.info("unmounted; shutting down")
            sdnotify.stopping()
            nursery.cancel_scope.cancel()
        self._nursery = None

    async def _signals(self) -> None:
        """SIGTERM/SIGINT (systemd stop, Ctrl-C): upload what is pending, then unmount."""
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for signum in signals:
                log.info("signal %d: flushing write-back, then unmounting", signum)
                sdnotify.stopping("flushing write-back")
                # The flush is bounded; ask systemd for that long rather than be killed mid-upload.
                sdnotify.extend_timeout(self.flush_deadline(self.cfg.flush_timeout))
                try:
                    await self.flush()
                except FlushFailed as exc:  # systemd's TimeoutStopSec may bound it further
                    log.error("unmounting with changes not uploaded (kept for the next mount): %s", exc)
                pyfuse3.terminate()
                return

    def flush_deadline(self, timeout: float) -> float:
        """Seconds within which a flush bounded by ``timeout`` returns, whatever happens: the
        flush deadline, plus an S3 request already running when it passes (--timeout bounds
        one request, retries included, within twice its value), plus slack."""
        return timeout + 2 * self.cfg.timeout + FLUSH_SLACK

    async def flush(
        self, progress: ProgressCallback | None = None, *, timeout: float | None = None
    ) -> dict[str, Any]:
        """Upload everything pending within ``timeout`` (default --flush-timeout), or raise FlushFailed.

        WriteBack.flush_all keeps the deadline and names what failed; the hard stop here only
        guarantees that ``tierfs flush``, ``umount`` and SIGTERM get an answer even if it did not.
        Nothing is dropped either way: what was not uploaded stays staged and journaled.
        """
        if self.writeback is None:
            return {"uploaded_files": 0, "uploaded_bytes": 0}
        limit = self.cfg.flush_timeout if timeout is None else timeout
        with trio.move_on_after(self.flush_deadline(limit)):
            result: dict[str, Any] = await self.writeback.flush_all(progress, timeout=limit)
            return result
        status = self.writeback.status()
        raise FlushFailed(
            dict(status.get("failing") or {}),
            f"flush timeout ({limit:g} s) passed with {status.get('uploads_pending', '?')} changes pending",
        )

    async def _announce_live(self, on_live: Callable[[], None]) -> None:
        tuned = await trio.to_thread.run_sync(kerneltune.tune, str(self.cfg.mountpoint))
        log.info("mounted %s at %s (kernel knobs: %s)", self.cfg.source, self.cfg.mountpoint, tuned)
        sdnotify.ready(f"mounted {self.cfg.source} at {self.cfg.mountpoint}")
        on_live()

    async def _maintenance(self) -> None:
        interval = MAINTENANCE_INTERVAL
        if not math.isinf(self.cfg.cache_max_age):
            interval = max(0.5, min(interval, self.cfg.cache_max_age / 2))
        await self.run_io(self._direct_readers)  # readers may start before the first pass
        while True:
            await trio.sleep(interval)
            try:
                await self.run_io(self._maintain_blocking)
            except Exception:
                log.exception("cache maintenance failed")

    # Direct readers (tierfs.reader, docs/reader.md); made by the first maintenance pass.
    direct_readers: DirectReaders | None = None

    def _direct_readers(self) -> None:
        """Publish reader.json, apply the readers' access records (before the access-time flush,
        so LRU and age-out see them) and sum their counters. Never raises."""
        if self.direct_readers is None:
            self.direct_readers = DirectReaders(
                cache_dir=self.cfg.resolved_cache_dir, mountpoint=str(self.cfg.mountpoint),
                bucket=self.cfg.source.bucket, source=str(self.cfg.source), block_size=self.cfg.block_size,
                group=self.cfg.cache_group,
                snapshot=str(self.pinned.local_path) if self.pinned and self.pinned.local_path else None,
            )  # fmt: skip
        self.direct_readers.maintain(self.disk, (self.cachedir.env, self.cachedir.index_env))

    def _direct_status(self) -> dict[str, Any]:
        return self.direct_readers.status() if self.direct_readers else DirectReaders.empty_status()

    def _maintain_blocking(self) -> None:
        self._direct_readers()
        self.tiers.maintain()  # access times persisted, age-out, eviction
        if self.pinned is not None:
            self.pinned.note_reads(self.hydrator.stats)
            self.pinned.count_usage(self.disk)
        self.cachedir.index_env.sync(True)  # bounds what an OS crash can tear; not needed for safety
        memory.trim()

    async def _start_control(self, nursery: trio.Nursery) -> None:
        self.control = ControlOps(
            MountParts(
                cfg=self.cfg,
                namespace=cast(Namespace, self.view),
                hydrator=self.hydrator,
                tiers=self.tiers,
                status=self.status,
                flush=self.flush,
                flush_deadline=self.flush_deadline,
                version_of=self.ops.version_of,
                run_io=self.run_io,
                invalidate=self.queue_invalidation,
            )
        )
        await nursery.start(self.control.serve)

    def _hint_status(self) -> dict[str, Any]:
        """The look-ahead's counters (control.lookahead); empty until the control server runs."""
        control: ControlOps | None = getattr(self, "control", None)
        return control.lookahead.status() if control is not None else {}

    def _status_from_any_thread(self) -> dict[str, Any]:
        """The status dict, read on the loop (scrapes arrive on prometheus_client's thread)."""
        if self._trio_token is None:
            return self.status()
        try:
            result: dict[str, Any] = trio.from_thread.run_sync(self.status, trio_token=self._trio_token)
            return result
        except trio.RunFinishedError:
            return self.status()

    # -- status -----------------------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        hyd = self.hydrator.stats
        requests = dict(self.store.requests)
        lookups = hyd.cache_hits + hyd.cache_misses
        return {
            "pid": os.getpid(),
            "mountpoint": str(self.cfg.mountpoint),
            "source": str(self.cfg.source),
            "cache_dir": str(self.cfg.resolved_cache_dir),
            "uptime_seconds": round(time.time() - self.started, 1),
            "read_only": self.cfg.read_only,
            "endpoint_url": self.cfg.endpoint_url,
            "snapshot": self.pinned.status(hyd) if self.pinned is not None else None,
            "metadata_ttl": None if math.isinf(self.cfg.metadata_ttl) else self.cfg.metadata_ttl,
            **self.tiers.status(),
            "cache_hits": hyd.cache_hits,
            "cache_misses": hyd.cache_misses,
            "cache_store_failed": hyd.cache_store_failed,
            "integrity_retries": hyd.integrity_retries,
            "hit_ratio": round(hyd.cache_hits / lookups, 4) if lookups else None,
            "bytes_from_cache": hyd.bytes_from_cache,
            "bytes_from_s3": hyd.bytes_from_s3,
            "prefetched_blocks": hyd.prefetched_blocks,
            "partial_reads": hyd.partial_reads,
            "s3_get_requests": requests.get("get_object", 0),
            "s3_list_requests": requests.get("list_objects_v2", 0),
            "s3_head_requests": requests.get("head_object", 0),
            "s3_requests": requests,
            "s3_bytes_fetched": self.store.bytes_fetched,
            "s3_in_flight": self.store.in_flight,
            **metrics.latency_status(),
            "hidden_keys": self.namespace.counters.hidden_keys,
            "shadowed_keys": self.namespace.counters.shadowed_keys,
            "errors": self.ops.errors.count + hyd.errors,
            **self._direct_status(),
            **self._hint_status(),
            **(self.writeback.status() if self.writeback is not None else {
                "dirty_files": 0, "dirty_bytes": 0, "uploads_pending": 0, "uploads_failed": 0, "conflicts": 0,
                "failing": {},
            }),
        }  # fmt: skip
