"""The daemon's side of direct reads, run by the mount's maintenance pass (every <= 5 s).

Kept here rather than in daemon/mount.py so that the mount only calls :meth:`DirectReaders.maintain`
and merges :meth:`DirectReaders.status`: publishing reader.json (the heartbeat readers
require), applying the readers' access records to the chunk index's LRU, summing their
counters for ``tierfs status``, and clearing LMDB reader slots left by dead reader processes
(``reader_check``), which would otherwise fill the 256-slot table.
"""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path
from typing import Any

from .. import cacheformat as fmt
from ..cache.chunkcache import ChunkCache
from ..mountinfo import fuse_mount_at
from . import protocol

log = logging.getLogger(__name__)


class DirectReaders:
    def __init__(
        self, *, cache_dir: Path, mountpoint: str, bucket: str, source: str, block_size: int,
        group: int | None = None, snapshot: str | None = None,
    ) -> None:  # fmt: skip
        """``group``: the --cache-group gid, whose members may read the cache (docs/reader.md);
        ``snapshot``: the local manifest copy of a snapshot mount, whose records readers use."""
        self.group = group
        self.snapshot = snapshot
        self._opened_files = False
        self.cache_dir = cache_dir
        self.mountpoint = mountpoint
        self.bucket = bucket
        self.source = source
        self.block_size = block_size
        self.totals = protocol.DirectTotals()
        self._dev: tuple[int, int] | None = None

    def maintain(self, cache: ChunkCache, envs: tuple[Any, ...]) -> None:
        """One pass; never raises (direct reads are an optimisation, maintenance must go on)."""
        if self.group is not None:
            try:
                cache.file_mode = 0o640
                self._open_to_group()
            except Exception as exc:
                log.warning("cannot open the cache to group %d: %s", self.group, exc)
        try:
            if self._dev is None:
                info = fuse_mount_at(self.mountpoint)
                if info is None:
                    return  # not mounted yet: readers fall back meanwhile
                self._dev = (info.major, info.minor)
            protocol.publish(
                self.cache_dir, block_size=self.block_size, cache_format=fmt.CHUNK_FORMAT_VERSION,
                bucket=self.bucket, source=self.source, dev=self._dev, snapshot=self.snapshot,
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

    def _open_to_group(self) -> None:
        """--cache-group: what a member needs to read directly, and nothing more. Directories
        0750 (setgid, so new files take the group), the staging dir 0710 (names can be
        checked, staged data not read), chunk and LMDB data files 0640, the LMDB lock files
        0660 (LMDB readers write their slot there), access/ 2770. Re-applied every pass: the
        cache and CacheDir make their directories 0700 when they open. Existing chunk files
        are fixed once (one walk); new ones are made 0640."""
        gid = self.group
        assert gid is not None
        root = self.cache_dir

        def fix(path: Path | str, mode: int) -> None:
            st = os.lstat(path)
            if st.st_gid != gid:
                os.lchown(path, -1, gid)
            if stat.S_IMODE(st.st_mode) != mode:
                os.chmod(path, mode)

        fix(root, 0o2750)
        chunks = root / fmt.CHUNK_DIR
        fix(chunks, 0o2750)
        with os.scandir(chunks) as fanouts:
            dirs = [e.path for e in fanouts if e.is_dir(follow_symlinks=False)]
        for d in dirs:
            fix(d, 0o2750)
        for env in (fmt.META_ENV, fmt.INDEX_ENV):
            fix(root / env, 0o2750)
            fix(root / env / "data.mdb", 0o640)
            fix(root / env / "lock.mdb", 0o660)
        if (root / fmt.STAGING_DIR).exists():
            fix(root / fmt.STAGING_DIR, 0o2710)
        access = root / protocol.ACCESS_DIR
        access.mkdir(exist_ok=True)
        fix(access, 0o2770)
        if not self._opened_files:
            for d in dirs:
                with os.scandir(d) as entries:
                    for e in entries:
                        if e.is_file(follow_symlinks=False) and not e.name.startswith("."):
                            fix(e.path, 0o640)
            self._opened_files = True

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
