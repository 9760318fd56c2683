"""The daemon's side of direct reads, run by the mount's maintenance pass (every <= 5 s).

Kept here rather than in mount.py so that the mount only calls :meth:`DirectReaders.maintain`
and merges :meth:`DirectReaders.status`: publishing reader.json (the heartbeat readers
require), applying the readers' access records to the chunk index's LRU, summing their
counters for ``tierfs status``, and clearing LMDB reader slots left by dead reader processes
(``reader_check``), which would otherwise fill the 256-slot table.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from ..chunkcache import FORMAT_VERSION, ChunkCache
from ..kerneltune import find_mount
from . import protocol

log = logging.getLogger(__name__)


class DirectReaders:
    def __init__(
        self, *, cache_dir: Path, mountpoint: str, bucket: str, source: str, block_size: int
    ) -> None:
        self.cache_dir = cache_dir
        self.mountpoint = mountpoint
        self.bucket = bucket
        self.source = source
        self.block_size = block_size
        self.totals = protocol.DirectTotals()
        self._dev: tuple[int, int] | None = None

    def maintain(self, cache: ChunkCache, envs: tuple[Any, ...]) -> None:
        """One pass; never raises (direct reads are an optimisation, maintenance must go on)."""
        try:
            if self._dev is None:
                info = find_mount(self.mountpoint)
                if info is None:
                    return  # not mounted yet: readers fall back meanwhile
                self._dev = (info.major, info.minor)
            protocol.publish(
                self.cache_dir, block_size=self.block_size, cache_format=FORMAT_VERSION,
                bucket=self.bucket, source=self.source, dev=self._dev,
            )  # fmt: skip
        except Exception as exc:  # OSError mostly; nothing here may stop maintenance
            log.warning("cannot publish %s for direct readers: %s", protocol.READER_FILE, exc)
        try:
            protocol.apply_access_records(self.cache_dir, cache.touch_digests, self.totals)
        except Exception as exc:
            log.warning("cannot apply direct readers' access records: %s", exc)
        for env in envs:
            try:
                env.reader_check()
            except Exception as exc:  # lmdb.Error; a failed check only leaves stale slots
                log.debug("reader_check: %s", exc)

    def status(self) -> dict[str, Any]:
        t = self.totals
        return {
            "direct_reads": t.direct_reads,
            "direct_bytes": t.direct_bytes,
            "direct_fallbacks": dict(sorted(t.fallbacks.items())),
            "direct_access_records": t.access_records,
        }

    @staticmethod
    def empty_status() -> dict[str, Any]:
        return {"direct_reads": 0, "direct_bytes": 0, "direct_fallbacks": {}, "direct_access_records": 0}
