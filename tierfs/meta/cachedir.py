"""The cache directory: its lock, its two LMDB environments and its ownership by one source.

``<cache_dir>/meta`` holds the durable records of a mount: namespace (``ns.*``) and
write-back journal (``wb.*``). It is opened with ``sync=True, metasync=False``: each
commit costs one fdatasync (~0.3 ms here), a power loss can undo at most the last commit
and never corrupts the database. Write transactions therefore run in worker threads,
never on the trio loop. The chunk index (``cache.*``) lives in a second environment,
``<cache_dir>/index``, committed without fsync: it is only a cache, and it is dropped
after an OS crash rather than trusted (see ``_open_index_env``).

A cache directory belongs to exactly one mount at a time: a second mount of the same
directory is refused with a clear error (flock on ``<cache_dir>/lock``) rather than
shared. Sharing one index between daemons would need cross-process coordination of
eviction and write-back that buys little: two containers that want the same data
should bind-mount one tierfs mount instead (see docs/deployment.md).
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
from pathlib import Path
from typing import Any

import lmdb

from .. import cacheformat as fmt
from ..errors import ConfigError

log = logging.getLogger(__name__)


class CacheDir:
    """Owns ``<cache_dir>``: creates it 0700, takes the exclusive lock and opens LMDB."""

    def __init__(self, path: Path, owner_tag: str) -> None:
        self.path = path
        try:
            path.mkdir(mode=0o700, parents=True, exist_ok=True)
            os.chmod(path, 0o700)
        except OSError as exc:
            raise ConfigError(f"cannot create cache dir {path}: {exc.strerror}") from None
        self._lock_fd = self._take_lock(path / fmt.LOCK_FILE)
        self.env: Any = _open_env(path / fmt.META_ENV, sync=True)
        self._check_owner(owner_tag)
        self.index_env: Any = self._open_index_env()

    def _open_index_env(self) -> Any:
        """The chunk cache's index: its own LMDB environment, committed *without* fsync.

        The index only describes a cache, so an fsync per stored block (one per cold
        file) buys nothing; it was the cold path's bottleneck. A process crash loses
        nothing (LMDB's writes are in the page cache). An OS crash may leave it torn,
        so if the machine rebooted while the index was open we drop the whole cache
        rather than trust it; the namespace and the journal live in ``meta``, which
        is fully synced, and are unaffected.
        """
        state = self.path / fmt.INDEX_STATE_FILE
        boot = _boot_id()
        try:
            previous_boot, previous_state = state.read_text().split()
        except (OSError, ValueError):
            previous_boot, previous_state = boot, "clean"
        if previous_state != "clean" and previous_boot != boot:
            import shutil

            log.warning("the machine went down while the cache was open; dropping the chunk cache")
            shutil.rmtree(self.path / fmt.INDEX_ENV, ignore_errors=True)
            shutil.rmtree(self.path / fmt.CHUNK_DIR, ignore_errors=True)
        state.write_text(f"{boot} open\n")
        return _open_env(self.path / fmt.INDEX_ENV, sync=False)

    @staticmethod
    def _take_lock(lock_path: Path) -> int:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise ConfigError(
                    f"cache dir {lock_path.parent} is in use by another tierfs mount (pid {holder}); "
                    "give each mount its own --cache-dir"
                ) from None
            raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        return fd

    def _check_owner(self, owner_tag: str) -> None:
        meta = self.env.open_db(fmt.DB_META)
        with self.env.begin(write=True, db=meta) as txn:
            stored = txn.get(fmt.META_OWNER)
            if stored is None:
                txn.put(fmt.META_OWNER, owner_tag.encode())
                txn.put(fmt.META_SCHEMA, fmt.SCHEMA_VERSION)
            elif stored.decode() != owner_tag:
                raise ConfigError(
                    f"cache dir {self.path} belongs to {stored.decode()}, not {owner_tag}; "
                    "use another --cache-dir"
                )
            elif txn.get(fmt.META_SCHEMA) != fmt.SCHEMA_VERSION:
                raise ConfigError(f"cache dir {self.path} has an unknown format; remove it or use another")

    def close(self) -> None:
        self.index_env.sync(True)
        self.index_env.close()
        (self.path / fmt.INDEX_STATE_FILE).write_text(f"{_boot_id()} clean\n")
        self.env.close()
        os.close(self._lock_fd)


def _open_env(path: Path, *, sync: bool) -> Any:
    """An LMDB environment as tierfs uses them; only whether commits fsync differs."""
    return lmdb.open(
        str(path),
        map_size=fmt.MAP_SIZE,
        max_dbs=fmt.MAX_DBS,
        sync=sync,
        metasync=False,
        readahead=False,
        max_readers=fmt.MAX_READERS,
        mode=0o600,
    )


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return "unknown"
