"""A mount pinned to a dataset version (``--snapshot`` or ``--as-of``; docs/snapshots.md):
opens the manifest before anything is mounted, serves the namespace from it, and keeps the
per-snapshot status (bytes cached locally, hits, misses, last use).

``--snapshot`` makes no LIST, ever: the footer and pages come by ranged GETs of the manifest.
``--as-of`` lists the bucket's versions once, here, before the mount goes live, into a
manifest in the cache dir, and from then on serves it exactly like a snapshot.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from ..cache.chunkcache import ChunkCache
from ..config import MountConfig
from ..errors import ConfigError, NotFound, PreconditionFailed
from ..read.hydrator import HydratorStats
from ..snapshot.build import parse_time
from ..snapshot.create import create, is_versioned
from ..snapshot.format import SUFFIX, Row
from ..snapshot.location import open_manifest
from ..snapshot.manifest import Manifest
from ..snapshot.namespace import Defaults, RunBlocking, SnapshotNamespace
from ..snapshot.usage import Usage, cached
from ..store.objectstore import S3ObjectStore

log = logging.getLogger("tierfs")

USAGE_INTERVAL = 60.0  # seconds between recounts of the snapshot's cached bytes
USAGE_ROWS = 100_000  # entries counted per maintenance pass


class PinnedReads:
    """The mount's store, with one rule of pinned reads: an object deleted since the snapshot is
    an I/O error naming its key (as a changed one is, by If-Match), not "no such file" for a
    name the snapshot shows."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def get_range(self, key: str, start: int, length: int, if_match: str | None = None, **kw: Any) -> Any:
        try:
            return self.inner.get_range(key, start, length, if_match, **kw)
        except NotFound as exc:
            raise _gone(key, exc) from None

    def start_get(self, key: str, *args: Any, on_done: Callable[[Any], None], **kw: Any) -> Any:
        """The cold engine's GET (read/engine.py) under the same rule, applied to its answer."""

        def done(answer: Any) -> None:  # on the CRT thread
            on_done(_gone(key, answer) if isinstance(answer, NotFound) else answer)

        return self.inner.start_get(key, *args, on_done=done, **kw)


def _gone(key: str, exc: NotFound) -> PreconditionFailed:
    return PreconditionFailed(f"{key}: gone from the bucket since the snapshot ({exc})")


def pinned(cfg: MountConfig) -> bool:
    """Whether the mount is pinned to a dataset version."""
    return cfg.snapshot is not None or cfg.as_of is not None


class PinnedSnapshot:
    def __init__(self, cfg: MountConfig, store: Any, cache_root: Path, run_blocking: RunBlocking) -> None:
        self.cfg = cfg
        local_dir = cache_root / "snapshots"
        if cfg.as_of is not None:
            self.manifest, self.label = self._build_as_of(cfg, store, local_dir)
        else:
            assert cfg.snapshot is not None
            manifest, ref = open_manifest(
                cfg.source, cfg.snapshot, lambda bucket: self._store_for(store, bucket), local_dir
            )
            self.manifest, self.label = manifest, str(ref)
        self.local_path = self.manifest.local_path
        footer = self.manifest.footer
        defaults = Defaults(cfg.uid, cfg.gid, cfg.file_mode, cfg.dir_mode)
        self.namespace = SnapshotNamespace(self.manifest, cfg.source.prefix, defaults, run_blocking)
        self.name = footer.name
        self.last_use: float | None = None
        self._reads = 0
        self._usage: dict[str, int] = {}
        self._usage_at = 0.0
        self._scan: Iterator[tuple[int, Row]] | None = None  # a count in progress
        self._partial = Usage()
        self._counted_state: tuple[int, ...] = ()  # _cache_state of the last finished count
        self._scan_state: tuple[int, ...] = ()  # _cache_state when the count in progress began
        log.info(
            "snapshot %s of s3://%s/%s: %d entries, %d bytes, made %s%s",
            self.label, footer.bucket, footer.prefix, footer.entries, footer.total_bytes,
            time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(footer.created_ns / 1e9)),
            " (version ids pinned)" if footer.versioned else " (ETags pinned)",
        )  # fmt: skip

    @staticmethod
    def _build_as_of(cfg: MountConfig, store: Any, local_dir: Path) -> tuple[Manifest, str]:
        assert cfg.as_of is not None
        when = parse_time(cfg.as_of)
        if not is_versioned(store):
            raise ConfigError(
                f"--as-of needs a versioned bucket: s3://{cfg.source.bucket} has versioning off"
            )
        local_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        ident = hashlib.sha256(f"{cfg.source}|{cfg.as_of}|{time.time_ns()}".encode()).hexdigest()[:24]
        path = local_dir / f"as-of-{ident}{SUFFIX}"
        with tempfile.TemporaryDirectory(dir=local_dir) as scratch:
            create(store, cfg.source, f"as-of-{ident}", to=str(Path(scratch) / "m.tsnap"), as_of_ns=when,
                   as_of_text=cfg.as_of, tmpdir=scratch)  # fmt: skip
            (Path(scratch) / "m.tsnap").rename(path)
        return Manifest(path.stat().st_size, None, path), f"{cfg.source} as of {cfg.as_of}"

    def close(self) -> None:
        """At unmount: an ``--as-of`` manifest was this mount's own; it goes (a named snapshot's
        local copy stays, so a remount fetches nothing)."""
        self.manifest.close()
        if self.cfg.as_of is not None and self.local_path is not None:
            self.local_path.unlink(missing_ok=True)

    def _store_for(self, store: Any, bucket: str) -> Any:
        """The mount's own store for its bucket; a manifest URL naming another bucket at the same
        endpoint gets a client of its own."""
        if bucket == store.bucket:
            return store
        cfg = self.cfg
        return S3ObjectStore(
            bucket, endpoint_url=cfg.endpoint_url, region=cfg.region, profile=cfg.profile,
            timeout=cfg.timeout, retries=cfg.retries,
        )  # fmt: skip

    async def fill(self, run_blocking: RunBlocking) -> None:
        """Background, after the mount is live: make the whole manifest local (docs/snapshots.md).
        A failure only means lookups keep fetching the pages they need."""
        if self.manifest.local_path is None or self.manifest.local_pages == len(self.manifest.footer.pages):
            return
        started = time.monotonic()
        try:
            fetched = await run_blocking(self.manifest.fill)
        except Exception as exc:
            log.warning("snapshot manifest: background fetch stopped (%s); pages come on demand", exc)
            return
        log.info("snapshot manifest local: %d bytes fetched in %.1f s", fetched, time.monotonic() - started)

    def note_reads(self, stats: HydratorStats) -> None:
        """Called by maintenance: a change in the read counters since the last pass is a use."""
        reads = stats.cache_hits + stats.cache_misses
        if reads != self._reads:
            self._reads = reads
            self.last_use = time.time()

    def count_usage(self, disk: ChunkCache) -> None:
        """Count the snapshot's cached bytes over its local manifest pages (all of them once the
        background fetch is done), USAGE_ROWS entries per maintenance pass so that a 10M-entry
        snapshot costs each pass a bounded slice; a new count starts at most every USAGE_INTERVAL."""
        now = time.monotonic()
        if self._scan is None:
            if self._usage_at and now - self._usage_at < USAGE_INTERVAL:
                return
            state = self._cache_state(disk)
            if state == self._counted_state:
                self._usage_at = now  # nothing a count reads changed: the last answer stands
                return
            if state[0] == 0:  # an empty cache holds none of it: no need to look (a fresh node)
                self._usage, self._usage_at, self._counted_state = (
                    {"cached_bytes": 0, "cached_files": 0},
                    now,
                    state,
                )
                return
            self._scan, self._partial, self._scan_state = self.manifest.local_rows(), Usage(), state
        batch = list(itertools.islice(self._scan, USAGE_ROWS))
        part = cached(
            iter(batch), self.cfg.source.bucket, self.cfg.source.prefix, self.cfg.block_size, disk.contains
        )
        self._partial.add(part)
        if len(batch) < USAGE_ROWS:
            self._usage = {
                "cached_bytes": self._partial.bytes_cached,
                "cached_files": self._partial.files_cached,
            }
            self._scan, self._usage_at, self._counted_state = None, now, self._scan_state

    def _cache_state(self, disk: ChunkCache) -> tuple[int, ...]:
        """What a count depends on: the chunk cache's totals (any block added, evicted, aged out
        or found corrupt changes them) and the manifest pages local. The same state means the
        same answer, so an idle or namespace-only mount (a ``find``) stops paying the count."""
        stats = disk.stats()
        return (stats.chunks, stats.logical_bytes, stats.evictions, stats.corrupt, self.manifest.local_pages)

    def status(self, stats: HydratorStats) -> dict[str, Any]:
        footer = self.manifest.footer
        return {
            "name": self.name,
            "manifest": self.label,
            "created": footer.created_ns / 1e9,
            "versioned": footer.versioned,
            "entries": footer.entries,
            "files": footer.files,
            "bytes": footer.total_bytes,
            "manifest_bytes": self.manifest.size,
            "manifest_pages": len(footer.pages),
            "manifest_pages_local": self.manifest.local_pages,
            "manifest_pages_fetched": self.manifest.fetched_pages,
            "hits": stats.cache_hits,
            "misses": stats.cache_misses,
            "last_use": self.last_use,
            **self._usage,
        }
