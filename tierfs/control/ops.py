"""The control operations a running mount answers: status, flush, prefetch, evict, pin, unpin, refresh.

Paths arrive relative to the mountpoint and are resolved through the namespace (never
through the kernel mount, which could be the thing that is hung). Long operations
report progress at most every 0.25 s. A flush also states its deadline in a progress
line every few seconds (see :mod:`tierfs.control.client`), so the CLI waiting for it knows how
long to wait, and notices a daemon that stopped answering within seconds.
"""

from __future__ import annotations

import errno
import logging
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol

import trio

from ..cache.stack import Tiers
from ..config import MountConfig
from ..errors import NotFound, StoreError
from ..meta.namespace import Namespace
from ..meta.records import ROOT_INO, Inode
from ..read.hydrator import Hydrator, ObjectVersion
from . import protocol, registry
from .lookahead import HintError, LookAhead, cache_budget

log = logging.getLogger(__name__)

Progress = Callable[[dict[str, Any]], Awaitable[None]]
FLUSH_HEARTBEAT = 5.0  # seconds between a flush's deadline lines; the CLI's silence bound is larger
HINT_WINDOW_FILES = 4096  # hinted files fetched ahead of a reader at most (docs/reader.md, "Hints")
HINT_WINDOW_BYTES = 4 << 30  # and bytes, further bounded by the cache (lookahead.cache_budget)
SMALL_BLOCKS = 64  # a hinted file of at most this many blocks is checked in the index before a fetch


class FileData(Protocol):
    """Where a file's bytes are now (``tierfs.fs.FileSystem`` answers it; short, on the loop)."""

    def version_of(self, node: Inode) -> ObjectVersion:
        """The version of ``node``'s bytes the bucket holds now: a renamed file's data stays
        under its old key until the journaled copy ran."""
        ...


@dataclass(frozen=True)
class MountParts:
    """What the control operations act on, handed over by the mount's wiring (tierfs.daemon.mount).

    Layers and callables, not the mount itself: control depends on the layers below it and
    on nothing above. ``files`` is the one rule for where a file's bytes are now (a
    renamed file's data stays under its old key until the journaled copy ran).
    """

    cfg: MountConfig
    namespace: Namespace
    hydrator: Hydrator
    tiers: Tiers
    status: Callable[[], dict[str, Any]]
    flush: Callable[..., Awaitable[dict[str, Any]]]  # (progress, *, timeout) -> result
    flush_deadline: Callable[[float], float]
    files: FileData
    run_io: Callable[..., Awaitable[Any]]
    invalidate: Callable[[int], None]


class ControlOps:
    def __init__(self, parts: MountParts) -> None:
        self.parts = parts
        self.ns = parts.namespace
        self.active: dict[str, dict[str, Any]] = {}
        cfg = parts.cfg
        self.lookahead = LookAhead(
            resolve=self._hinted_version,
            hydrate=self._hydrate_hinted,
            budget=lambda: cache_budget(
                status=parts.tiers.status,
                limit_bytes=cfg.cache_size,
                min_free=cfg.cache_min_free,
                cache_dir=str(cfg.resolved_cache_dir),
            ),
            workers=cfg.s3_concurrency,
            max_files=HINT_WINDOW_FILES,
            max_bytes=HINT_WINDOW_BYTES,
            is_cached=self._cached_whole,
        )

    async def serve(self, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        cfg = self.parts.cfg
        handlers = {
            "status": self.status,
            "flush": self.flush,
            "prefetch": self.prefetch,
            "evict": self.evict,
            "pin": self.pin,
            "unpin": self.unpin,
            "refresh": self.refresh,
            "hint": self.hint,
        }
        _, sock_path = registry.registry_paths(str(cfg.mountpoint))
        server = protocol.ControlServer(str(sock_path), handlers, owner_uid=os.getuid())
        registry.register(
            str(cfg.mountpoint),
            pid=os.getpid(),
            source=str(cfg.source),
            cache_dir=str(cfg.resolved_cache_dir),
            uid=os.getuid(),
        )
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self.lookahead.run)
                await nursery.start(server.serve)
                task_status.started()
        finally:
            registry.unregister(str(cfg.mountpoint))

    # -- path resolution -------------------------------------------------------------------------------

    async def resolve(self, path: str) -> Inode:
        node = self.ns.get(ROOT_INO)
        assert node is not None
        for part in [p for p in path.split("/") if p not in ("", ".")]:
            node = await self.ns.lookup(node.ino, part)
        return node

    async def files(self, paths: list[str], recursive: bool) -> AsyncIterator[tuple[str, Inode]]:
        """Yield (path, file inode) for the given paths; directories only with ``recursive``."""
        for path in paths:
            root = await self.resolve(path)
            top = "" if path.strip("/") == "." else path.strip("/")
            if root.is_dir and not recursive:
                raise IsADirectoryError(f"{top or '/'} is a directory (use --recursive)")
            async for rel, node in self.ns.walk(root):
                if not node.is_dir:
                    yield f"{top}/{rel}".strip("/"), node

    # -- operations --------------------------------------------------------------------------------------

    async def _hinted_version(self, path: str) -> ObjectVersion | None:
        """What a hinted path names now: the version to fetch, or None (a directory, or a file
        with no uploaded version yet: the reader reads those through the mount)."""
        node = await self.resolve(path)
        if node.is_dir or not node.etag:
            return None
        return self.parts.files.version_of(node)

    async def _hydrate_hinted(self, version: ObjectVersion) -> None:
        """Make a hinted (or missed) file whole in the disk cache. A file of one GET's run goes through
        the read path, which waits for a fetch of the same blocks already in flight (a reader's READ
        through the mount) instead of sending a second GET; a bigger one through the prefetch entry
        point, run by run, so its bytes are never all in memory. OSError(ENOSPC) if the cache could
        not keep it, as ``tierfs prefetch`` reports it."""
        hydrator = self.parts.hydrator
        count = hydrator.block_count(version)
        if count > hydrator.max_run:
            await hydrator.hydrate(version)
            return
        await hydrator.blocks(version, range(count), remember=False)
        await hydrator.settled(version, range(count))  # the cold engine stores after it answers
        if not self._cached_whole(version):
            raise OSError(errno.ENOSPC, f"the chunk cache could not store {version.key}")

    def _cached_whole(self, version: ObjectVersion) -> bool:
        """Whether every block of a small file is in a local tier (index lookups only, on the loop)."""
        hydrator = self.parts.hydrator
        count = hydrator.block_count(version)
        if count > SMALL_BLOCKS:
            return False
        return all(self.parts.tiers.held_locally(hydrator.chunk_key(version, i)) for i in range(count))

    async def hint(self, args: dict[str, Any], progress: Progress) -> dict[str, Any]:
        """Hints of what a loader reads next (docs/reader.md, "Hints"): ``stream`` (the client's id),
        ``paths`` (relative to the mountpoint, numbered from ``start``), ``position`` (the reader's),
        ``end`` (forget the stream). With ``wait``, ``ino`` and ``etag``, that file is fetched now
        instead (a direct reader's miss) and the reply comes once it is in the cache."""
        if args.get("wait"):
            return await self._fetch_inode(args)
        paths = args.get("paths") or []
        if not isinstance(paths, list) or not all(isinstance(p, str) for p in paths):
            raise protocol.ControlError("hint: paths must be a list of strings")
        stream = args.get("stream")
        start, position = args.get("start"), args.get("position")
        for name, value in (("start", start), ("position", position)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
                raise protocol.ControlError(f"hint: {name} must be a count, not {value!r}")
        if not isinstance(stream, str) or not stream or len(stream) > 128:
            raise protocol.ControlError("hint: stream must be a short non-empty string")
        try:
            end = bool(args.get("end"))
            return self.lookahead.hint(stream, paths=paths, start=start, position=position, end=end)
        except HintError as exc:
            raise protocol.ControlError(str(exc)) from None

    async def _fetch_inode(self, args: dict[str, Any]) -> dict[str, Any]:
        """A direct reader's miss, named by inode and ETag (what it resolved at open): no path walk.
        Fetched only while the namespace still has that version; else the reader goes to the mount."""
        ino, etag = args.get("ino"), args.get("etag")
        if isinstance(ino, bool) or not isinstance(ino, int) or not isinstance(etag, str):
            raise protocol.ControlError("hint: ino must be an inode number and etag a string")
        node = self.ns.get(ino)
        if node is None or node.is_dir or not node.etag or node.etag != etag:
            return {"fetched": 0, "failed": [{"path": f"inode {ino}", "error": "not that version now"}]}
        try:
            await self.lookahead.fetch_now(self.parts.files.version_of(node))
        except (StoreError, OSError) as exc:
            return {"fetched": 0, "failed": [{"path": f"inode {ino}", "error": str(exc)}]}
        return {"fetched": 1, "failed": []}

    async def status(self, args: dict[str, Any], progress: Progress) -> dict[str, Any]:
        result = self.parts.status()
        result["operations"] = dict(self.active)
        return result

    async def flush(self, args: dict[str, Any], progress: Progress) -> dict[str, Any]:
        """Upload everything pending; FlushFailed (names and errors) if that fails or times out.

        ``args["timeout"]`` overrides the mount's --flush-timeout for this call.
        """
        raw = args.get("timeout")
        if raw is not None and (isinstance(raw, bool) or not isinstance(raw, int | float) or raw <= 0):
            raise protocol.ControlError(f"invalid flush timeout {raw!r} (expected positive seconds)")
        timeout = self.parts.cfg.flush_timeout if raw is None else float(raw)
        deadline = trio.current_time() + self.parts.flush_deadline(timeout)

        async def heartbeat() -> None:
            while True:
                await progress({"deadline": round(max(0.0, deadline - trio.current_time()), 3)})
                await trio.sleep(FLUSH_HEARTBEAT)

        result: dict[str, Any] = {}
        failure: Exception | None = None
        async with trio.open_nursery() as nursery:
            nursery.start_soon(heartbeat)
            try:
                result = await self.parts.flush(progress, timeout=timeout)
            except Exception as exc:  # raised after the nursery, so it is not wrapped in a group
                failure = exc
            nursery.cancel_scope.cancel()
        if failure is not None:
            raise failure
        return result

    async def prefetch(self, args: dict[str, Any], progress: Progress) -> dict[str, Any]:
        hydrator = self.parts.hydrator
        jobs = max(1, int(args.get("jobs") or 8))
        state = {"done_files": 0, "done_bytes": 0, "total_files": 0, "total_bytes": 0}
        failed: list[dict[str, str]] = []
        op_id = f"prefetch-{time.monotonic_ns()}"
        self.active[op_id] = state
        last_report = 0.0

        async def report(force: bool = False) -> None:
            nonlocal last_report
            now = time.monotonic()
            if force or now - last_report >= 0.25:
                last_report = now
                await progress(dict(state))

        def on_bytes(n: int) -> None:
            state["done_bytes"] += n

        async def worker(todo: Iterator[tuple[str, Inode]]) -> None:
            """One of ``jobs`` workers sharing one iterator: a task per file would cost memory
            in proportion to the directory (a million files, a million tasks)."""
            for path, node in todo:
                try:
                    await hydrator.hydrate(self.parts.files.version_of(node), on_bytes)
                    state["done_files"] += 1
                except (StoreError, OSError) as exc:
                    failed.append({"path": path, "error": str(exc)})
                await report()

        try:
            targets: list[tuple[str, Inode]] = []
            try:
                async for path, node in self.files(list(args.get("paths", [])), bool(args.get("recursive"))):
                    targets.append((path, node))
            except (NotFound, StoreError, OSError) as exc:
                raise protocol.ControlError(f"cannot resolve path: {exc}") from None
            state["total_files"] = len(targets)
            state["total_bytes"] = sum(n.size for _, n in targets)
            await report(force=True)
            todo = iter(targets)
            async with trio.open_nursery() as nursery:
                for _ in range(min(jobs, len(targets))):
                    nursery.start_soon(worker, todo)
            await report(force=True)
        finally:
            del self.active[op_id]
        return {**state, "failed": failed}

    async def _each_file(self, args: dict[str, Any], action: Callable[[Inode], Any]) -> dict[str, Any]:
        count = 0
        try:
            async for _, node in self.files(list(args.get("paths", [])), bool(args.get("recursive"))):
                await self.parts.run_io(action, node)
                count += 1
        except (NotFound, StoreError, OSError) as exc:
            raise protocol.ControlError(str(exc)) from None
        return {"files": count}

    async def evict(self, args: dict[str, Any], progress: Progress) -> dict[str, Any]:
        bucket = self.parts.cfg.source.bucket
        freed = 0

        dropped: list[Inode] = []

        def drop(node: Inode) -> None:
            nonlocal freed
            freed += self.parts.tiers.drop_object(bucket, self._data_key(node))
            dropped.append(node)

        result = await self._each_file(args, drop)
        # Every tier dropped its copy (memory included); the kernel's goes too, so the next read
        # really goes down the tiers. The shared tier keeps its entries: they are content-addressed
        # copies of the same version, and serve this node's next read as they serve every node's.
        for node in dropped:
            self.parts.invalidate(node.ino)
        return {**result, "freed_bytes": freed}

    def _data_key(self, node: Inode) -> str:
        return self.parts.files.version_of(node).key

    async def pin(self, args: dict[str, Any], progress: Progress) -> dict[str, Any]:
        bucket = self.parts.cfg.source.bucket
        return await self._each_file(args, lambda node: self.parts.tiers.pin(bucket, self._data_key(node)))

    async def unpin(self, args: dict[str, Any], progress: Progress) -> dict[str, Any]:
        bucket = self.parts.cfg.source.bucket
        return await self._each_file(args, lambda node: self.parts.tiers.unpin(bucket, self._data_key(node)))

    async def refresh(self, args: dict[str, Any], progress: Progress) -> dict[str, Any]:
        ns = self.ns
        recursive = bool(args.get("recursive"))
        listed = 0
        try:
            for path in list(args.get("paths", [])):
                node = await self.resolve(path)
                if not node.is_dir:
                    await ns.ensure_listed(node.parent, force=True)
                    listed += 1
                    continue
                if not recursive:
                    await ns.ensure_listed(node.ino, force=True)
                    listed += 1
                    continue
                async for _, below in ns.walk(node, force=True):
                    listed += below.is_dir
        except (NotFound, StoreError, OSError) as exc:
            raise protocol.ControlError(str(exc)) from None
        return {"directories_listed": listed}
