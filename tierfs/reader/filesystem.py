"""``tierfs://`` for fsspec: absolute paths under a tierfs mount, read through :mod:`tierfs.reader`.

``fsspec.open("tierfs:///mnt/data/train/0001.jpg", "rb")`` then reads the cached blocks
straight from the cache directory, so pandas, pyarrow and HF datasets get the direct door
without knowing about it. Metadata (``ls``, ``info``) and every write go through the mount
itself, which is the authority for both; only reads of file contents take the direct path.
Registered through the ``fsspec.specs`` entry point in pyproject.toml.
"""

from __future__ import annotations

import os
import shutil
import stat
from typing import Any

from fsspec import AbstractFileSystem

from .core import Reader, TierFile, default_reader


class TierFileSystem(AbstractFileSystem):  # type: ignore[misc]
    protocol = "tierfs"
    root_marker = "/"
    cachable = True

    def __init__(self, cache_dirs: dict[str, str] | None = None, **kwargs: Any) -> None:
        """``cache_dirs`` (mountpoint -> cache dir) is passed to :class:`Reader` for mounts that
        discovery cannot find (see docs/reader.md); without it the process's default reader is used."""
        super().__init__(**kwargs)
        self.reader: Reader = Reader(cache_dirs) if cache_dirs else default_reader()

    @classmethod
    def _strip_protocol(cls, path: Any) -> str:
        text = str(super()._strip_protocol(path))
        return text if text.startswith("/") else "/" + text

    def _info_of(self, path: str, st: os.stat_result) -> dict[str, Any]:
        kind = "directory" if stat.S_ISDIR(st.st_mode) else "file" if stat.S_ISREG(st.st_mode) else "other"
        return {
            "name": path, "size": st.st_size, "type": kind, "mtime": st.st_mtime,
            "mode": st.st_mode, "uid": st.st_uid, "gid": st.st_gid, "ino": st.st_ino,
        }  # fmt: skip

    def info(self, path: str, **kwargs: Any) -> dict[str, Any]:
        path = self._strip_protocol(path)
        return self._info_of(path, os.stat(path))

    def ls(self, path: str, detail: bool = True, **kwargs: Any) -> list[Any]:
        path = self._strip_protocol(path)
        if not os.path.isdir(path):
            return [self.info(path)] if detail else [path]
        with os.scandir(path) as entries:
            found = sorted(
                (self._info_of(e.path, e.stat()) for e in entries), key=lambda item: str(item["name"])
            )
        return found if detail else [item["name"] for item in found]

    def _open(
        self, path: str, mode: str = "rb", block_size: Any = None, autocommit: bool = True,
        cache_options: Any = None, **kwargs: Any,
    ) -> Any:  # fmt: skip
        path = self._strip_protocol(path)
        if mode == "rb":
            return self.reader.open(path)
        return open(path, mode)  # writes: through the mount, which owns write-back

    def cat_file(self, path: str, start: int | None = None, end: int | None = None, **kwargs: Any) -> bytes:
        """Whole files and ranges with one positional read, no buffering layer in between."""
        path = self._strip_protocol(path)
        with TierFile(path, self.reader) as f:
            size = f.size
            begin = 0 if start is None else (start if start >= 0 else max(0, size + start))
            stop = size if end is None else (end if end >= 0 else max(0, size + end))
            return f.pread(max(0, stop - begin), begin)

    def mkdir(self, path: str, create_parents: bool = True, **kwargs: Any) -> None:
        path = self._strip_protocol(path)
        if create_parents:
            os.makedirs(path, exist_ok=True)
        else:
            os.mkdir(path)

    def makedirs(self, path: str, exist_ok: bool = False) -> None:
        os.makedirs(self._strip_protocol(path), exist_ok=exist_ok)

    def rmdir(self, path: str) -> None:
        os.rmdir(self._strip_protocol(path))

    def rm_file(self, path: str) -> None:
        os.unlink(self._strip_protocol(path))

    def _rm(self, path: str) -> None:
        self.rm_file(path)

    def mv(self, path1: str, path2: str, **kwargs: Any) -> None:
        shutil.move(self._strip_protocol(path1), self._strip_protocol(path2))

    def created(self, path: str) -> Any:
        return self.modified(path)

    def modified(self, path: str) -> Any:
        import datetime

        return datetime.datetime.fromtimestamp(os.stat(self._strip_protocol(path)).st_mtime, datetime.UTC)
