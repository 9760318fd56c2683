"""The cache directory: its lock, its LMDB environment and its ownership by one source.

One LMDB environment (``<cache_dir>/meta``) holds every durable record of a mount:
namespace (``ns.*``), chunk index (``cache.*``) and write-back journal (``wb.*``).
It is opened with ``sync=True, metasync=False``: each commit costs one fdatasync
(~0.3 ms here), a power loss can undo at most the last commit and never corrupts the
database. Write transactions therefore run in worker threads, never on the trio loop.

A cache directory belongs to exactly one mount at a time: a second mount of the same
directory is refused with a clear error (flock on ``<cache_dir>/lock``) rather than
shared. Sharing one index between daemons would need cross-process coordination of
eviction and write-back that buys little: two containers that want the same data
should bind-mount one tierfs mount instead (see docs/deployment.md).
"""

from __future__ import annotations

import errno
import fcntl
import os
from pathlib import Path
from typing import Any

import lmdb

from .errors import ConfigError

MAP_SIZE = 1 << 38  # 256 GiB of address space; the file only grows as records are written
SCHEMA_VERSION = b"1"


class CacheDir:
    """Owns ``<cache_dir>``: creates it 0700, takes the exclusive lock and opens LMDB."""

    def __init__(self, path: Path, owner_tag: str) -> None:
        self.path = path
        try:
            path.mkdir(mode=0o700, parents=True, exist_ok=True)
            os.chmod(path, 0o700)
        except OSError as exc:
            raise ConfigError(f"cannot create cache dir {path}: {exc.strerror}") from None
        self._lock_fd = self._take_lock(path / "lock")
        self.env: Any = lmdb.open(
            str(path / "meta"),
            map_size=MAP_SIZE,
            max_dbs=32,
            sync=True,
            metasync=False,
            readahead=False,
            max_readers=256,
            mode=0o600,
        )
        self._check_owner(owner_tag)

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
        meta = self.env.open_db(b"meta")
        with self.env.begin(write=True, db=meta) as txn:
            stored = txn.get(b"owner")
            if stored is None:
                txn.put(b"owner", owner_tag.encode())
                txn.put(b"schema", SCHEMA_VERSION)
            elif stored.decode() != owner_tag:
                raise ConfigError(
                    f"cache dir {self.path} belongs to {stored.decode()}, not {owner_tag}; "
                    "use another --cache-dir"
                )
            elif txn.get(b"schema") != SCHEMA_VERSION:
                raise ConfigError(f"cache dir {self.path} has an unknown format; remove it or use another")

    def close(self) -> None:
        self.env.close()
        os.close(self._lock_fd)
