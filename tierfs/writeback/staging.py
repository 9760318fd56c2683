"""Staging files: the local, authoritative copy of a file that is being written.

A file opened for writing is materialised whole in ``<cache_dir>/staging/<ino>``
(hydrated from the chunk cache / S3 unless opened with O_TRUNC). Writes, truncates and
reads of that inode go to this file until the upload that the journal holds for it has
finished and no writer is left; then its bytes are moved into the chunk cache under the
new ETag and the staging file is removed. Staging files are never evicted: dirty data
leaves the cache only by reaching the bucket.

All methods are blocking (file I/O): call them from worker threads.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path


class Staging:
    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(root, 0o700)

    def path(self, ino: int) -> Path:
        return self.root / str(ino)

    def exists(self, ino: int) -> bool:
        return self.path(ino).exists()

    def inos(self) -> Iterator[int]:
        for entry in os.scandir(self.root):
            if entry.name.isdigit():
                yield int(entry.name)

    def create(self, ino: int, content: bytes = b"") -> None:
        fd = os.open(self.path(ino), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            if content:
                os.pwrite(fd, content, 0)
        finally:
            os.close(fd)

    def _fill_path(self, ino: int) -> Path:
        return self.root / f".{ino}.tmp"

    def fill(self, ino: int, offset: int, data: bytes) -> None:
        """Write one piece of a staging file being hydrated for write (see :meth:`finish_fill`).

        The pieces go to a hidden temporary file, so a crash never leaves a half-hydrated
        staging file that replay would upload; the caller hands over a few blocks at a time,
        which bounds memory for files of any size.
        """
        flags = os.O_WRONLY | os.O_CREAT | (os.O_TRUNC if offset == 0 else 0)
        fd = os.open(self._fill_path(ino), flags, 0o600)
        try:
            os.pwrite(fd, data, offset)
        finally:
            os.close(fd)

    def finish_fill(self, ino: int, size: int) -> None:
        tmp = self._fill_path(ino)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            os.ftruncate(fd, size)
        finally:
            os.close(fd)
        os.replace(tmp, self.path(ino))

    def pread(self, ino: int, offset: int, size: int) -> bytes:
        fd = os.open(self.path(ino), os.O_RDONLY)
        try:
            return os.pread(fd, size, offset)
        finally:
            os.close(fd)

    def pwrite(self, ino: int, offset: int, data: bytes) -> int:
        fd = os.open(self.path(ino), os.O_WRONLY)
        try:
            return os.pwrite(fd, data, offset)
        finally:
            os.close(fd)

    def truncate(self, ino: int, size: int) -> None:
        os.truncate(self.path(ino), size)

    def size(self, ino: int) -> int:
        return self.path(ino).stat().st_size

    def fsync(self, ino: int) -> None:
        fd = os.open(self.path(ino), os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def remove(self, ino: int) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.path(ino).unlink()
