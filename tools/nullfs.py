"""A do-nothing pyfuse3 filesystem: the binding's own ceiling, measured in the same run as tierfs.

Issue 16 asks that warm FUSE reads be judged against what pyfuse3 itself can serve on this
machine, not against a local disk the binding can never reach. This filesystem shows the same
tree as the benchmark's small files (``Dataset.small_keys``: the same names, directories and
sizes) and answers every request from memory with no work at all: a dict lookup for LOOKUP,
a prebuilt attribute object for GETATTR, a counter for OPEN, a slice of one buffer for READ.
Whatever tierfs costs beyond these numbers is tierfs's own.

Two modes, as the benchmark rows need:

* ``--keep-cache``: OPEN sets ``keep_cache``, so after the first read the kernel serves the
  bytes from its page cache and only OPEN/RELEASE reach the daemon (the "page-cache hits" row);
* without it, the page cache is dropped at every open and every READ reaches the daemon (the
  row tierfs's "warm on disk" is compared with).

Kernel entry and attribute timeouts are long (as tierfs's metadata TTL is) so that LOOKUP and
GETATTR are served by the kernel after the first pass in both.

Run as ``python -m tools.nullfs MOUNTPOINT --files N --size BYTES [--keep-cache]``; it serves
in the foreground until unmounted (``fusermount3 -u``) or sent SIGTERM/SIGINT.
"""

from __future__ import annotations

import argparse
import errno
import os
import signal
import stat
import sys
from collections.abc import Sequence
from typing import Any

import pyfuse3
import trio

from tierfs.units import parse_size
from tools.bench_workloads import Dataset

TIMEOUT = 300.0  # seconds the kernel may keep entries and attributes


class NullFS(pyfuse3.Operations):  # type: ignore[misc]  # pyfuse3 ships no type information
    """A read-only tree of ``files`` files of ``size`` bytes, every byte from one shared buffer."""

    def __init__(self, keys: Sequence[str], size: int, keep_cache: bool) -> None:
        super().__init__()
        self.keep_cache = keep_cache
        self.data = os.urandom(size)
        self.children: dict[int, dict[bytes, int]] = {pyfuse3.ROOT_INODE: {}}
        self.attrs: dict[int, pyfuse3.EntryAttributes] = {
            pyfuse3.ROOT_INODE: self._attr(pyfuse3.ROOT_INODE, stat.S_IFDIR | 0o755, 0)
        }
        next_ino = pyfuse3.ROOT_INODE + 1
        for key in keys:
            parent = pyfuse3.ROOT_INODE
            *dirs, leaf = key.split("/")
            for name in dirs:
                entries = self.children[parent]
                ino = entries.get(name.encode())
                if ino is None:
                    ino, next_ino = next_ino, next_ino + 1
                    entries[name.encode()] = ino
                    self.children[ino] = {}
                    self.attrs[ino] = self._attr(ino, stat.S_IFDIR | 0o755, 0)
                parent = ino
            ino, next_ino = next_ino, next_ino + 1
            self.children[parent][leaf.encode()] = ino
            self.attrs[ino] = self._attr(ino, stat.S_IFREG | 0o644, size)
        self.listings = {ino: sorted(entries.items()) for ino, entries in self.children.items()}

    @staticmethod
    def _attr(ino: int, mode: int, size: int) -> pyfuse3.EntryAttributes:
        attr = pyfuse3.EntryAttributes()
        attr.st_ino = ino
        attr.st_mode = mode
        attr.st_nlink = 2 if stat.S_ISDIR(mode) else 1
        attr.st_size = size
        attr.st_blksize = 128 * 1024
        attr.st_blocks = (size + 511) // 512
        attr.entry_timeout = TIMEOUT
        attr.attr_timeout = TIMEOUT
        return attr

    def _get(self, ino: int) -> pyfuse3.EntryAttributes:
        try:
            return self.attrs[ino]
        except KeyError:
            raise pyfuse3.FUSEError(errno.ENOENT) from None

    async def lookup(self, parent_inode: int, name: bytes, ctx: Any = None) -> pyfuse3.EntryAttributes:
        ino = self.children.get(parent_inode, {}).get(name)
        if ino is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return self.attrs[ino]

    async def getattr(self, inode: int, ctx: Any = None) -> pyfuse3.EntryAttributes:
        return self._get(inode)

    async def opendir(self, inode: int, ctx: Any = None) -> int:
        if inode not in self.listings:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        return inode

    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        entries = self.listings[fh]
        for index in range(start_id, len(entries)):
            name, ino = entries[index]
            if not pyfuse3.readdir_reply(token, name, self.attrs[ino], index + 1):
                return

    async def open(self, inode: int, flags: int, ctx: Any = None) -> pyfuse3.FileInfo:
        if flags & (os.O_WRONLY | os.O_RDWR):
            raise pyfuse3.FUSEError(errno.EROFS)
        info = pyfuse3.FileInfo(fh=inode)
        info.keep_cache = self.keep_cache
        return info

    async def read(self, fh: int, off: int, size: int) -> bytes:
        return self.data[off : off + size]

    async def release(self, fh: int) -> None:
        return None

    async def releasedir(self, fh: int) -> None:
        return None


async def _serve() -> None:
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_unmount_on_signal, nursery.cancel_scope)
        await pyfuse3.main(min_tasks=4, max_tasks=256)
        nursery.cancel_scope.cancel()


async def _unmount_on_signal(scope: trio.CancelScope) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for _ in signals:
            scope.cancel()
            return


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tools.nullfs", description=__doc__.splitlines()[0])
    p.add_argument("mountpoint")
    p.add_argument("--files", type=int, required=True, help="number of small files (as the benchmark's)")
    p.add_argument("--size", type=parse_size, required=True, help="size of each file")
    p.add_argument("--keep-cache", action="store_true", help="let the kernel keep file pages across opens")
    args = p.parse_args(argv)
    keys = Dataset(args.files, args.size, 0, 0).small_keys()
    fs = NullFS(keys, args.size, args.keep_cache)
    pyfuse3.init(fs, args.mountpoint, {"fsname=nullfs", "subtype=nullfs", "ro", "default_permissions"})
    try:
        trio.run(_serve)
    finally:
        pyfuse3.close(unmount=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
