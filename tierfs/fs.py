"""The FUSE adapter: translates pyfuse3 requests into calls on the layers below.

It owns only per-open-handle state. Everything it does on the trio loop is short
(LMDB reads, dict lookups); S3, disk and LMDB writes happen in the layers it calls,
in worker threads. Every handler is wrapped by :func:`fuse_errors`, so only
``FUSEError`` ever reaches pyfuse3.
"""

from __future__ import annotations

import errno
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pyfuse3

from .errors import NotFound
from .fuseops import ErrorCounter, entry_attributes, fuse_errors, negative_entry
from .hydrator import Hydrator, ObjectVersion
from .namespace import Namespace
from .records import Inode, Kind

log = logging.getLogger(__name__)

_errors = ErrorCounter()
handler = fuse_errors(_errors)


@dataclass
class FileHandle:
    version: ObjectVersion


class TierOperations(pyfuse3.Operations):
    """pyfuse3 operations of a tierfs mount."""

    supports_dot_lookup = True
    enable_writeback_cache = False

    def __init__(
        self,
        namespace: Namespace,
        hydrator: Hydrator,
        *,
        kernel_timeout: float,
        block_size: int,
        read_only: bool,
        invalidate: Callable[[int], None],
    ) -> None:
        super().__init__()
        self.ns = namespace
        self.hydrator = hydrator
        self.timeout = kernel_timeout
        self.blksize = block_size
        self.read_only = read_only
        self._invalidate = invalidate
        self.errors = _errors
        self._files: dict[int, FileHandle] = {}
        self._dirs: dict[int, list[tuple[str, int]]] = {}
        self._next_fh = 1
        self._served_etag: dict[int, str] = {}

    # -- helpers --------------------------------------------------------------------------------------

    def _new_fh(self) -> int:
        fh = self._next_fh
        self._next_fh += 1
        return fh

    def _attrs(self, inode: Inode) -> pyfuse3.EntryAttributes:
        return entry_attributes(inode, timeout=self.timeout, blksize=self.blksize)

    def _inode(self, ino: int) -> Inode:
        inode = self.ns.get(ino)
        if inode is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return inode

    # -- metadata -------------------------------------------------------------------------------------

    @handler
    async def lookup(self, parent_inode: int, name: bytes, ctx: Any = None) -> pyfuse3.EntryAttributes:
        text = os.fsdecode(name)
        if text == ".":
            return self._attrs(self._inode(parent_inode))
        if text == "..":
            parent = self._inode(parent_inode)
            return self._attrs(self._inode(parent.parent))
        try:
            child = await self.ns.lookup(parent_inode, text)
        except NotFound:
            return negative_entry(self.timeout)
        return self._attrs(child)

    @handler
    async def getattr(self, inode: int, ctx: Any = None) -> pyfuse3.EntryAttributes:
        return self._attrs(self._inode(inode))

    @handler
    async def forget(self, inode_list: Any) -> None:
        """Inodes live in LMDB, not on the heap: there is nothing to free when the kernel forgets."""

    @handler
    async def readlink(self, inode: int, ctx: Any = None) -> bytes:
        node = self._inode(inode)
        if node.kind is not Kind.SYMLINK:
            raise pyfuse3.FUSEError(errno.EINVAL)
        return await self.hydrator.read(self._version(node), 0, node.size)

    @handler
    async def statfs(self, ctx: Any = None) -> pyfuse3.StatvfsData:
        """A bucket has no fixed capacity; report a large one, as mountpoint-s3 and s3fs do."""
        st = pyfuse3.StatvfsData()
        st.f_bsize = self.blksize
        st.f_frsize = self.blksize
        st.f_blocks = st.f_bfree = st.f_bavail = 1 << 30
        st.f_files = st.f_ffree = st.f_favail = 1 << 30
        st.f_namemax = 255
        return st

    # -- directories ----------------------------------------------------------------------------------

    @handler
    async def opendir(self, inode: int, ctx: Any = None) -> int:
        node = await self.ns.ensure_listed(inode)
        if not node.is_dir:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        fh = self._new_fh()
        self._dirs[fh] = list(self.ns.children(inode))
        return fh

    @handler
    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        entries = self._dirs.get(fh)
        if entries is None:
            raise pyfuse3.FUSEError(errno.EBADF)
        for index in range(start_id, len(entries)):
            name, ino = entries[index]
            node = self.ns.get(ino)
            if node is None:
                continue  # removed since opendir
            if not pyfuse3.readdir_reply(token, os.fsencode(name), self._attrs(node), index + 1):
                return

    @handler
    async def releasedir(self, fh: int) -> None:
        self._dirs.pop(fh, None)

    # -- files ----------------------------------------------------------------------------------------

    def _version(self, node: Inode) -> ObjectVersion:
        return ObjectVersion(node.ino, node.key, node.etag, node.size)

    @handler
    async def open(self, inode: int, flags: int, ctx: Any = None) -> pyfuse3.FileInfo:
        node = self._inode(inode)
        if node.is_dir:
            raise pyfuse3.FUSEError(errno.EISDIR)
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_TRUNC | os.O_APPEND) and self.read_only:
            raise pyfuse3.FUSEError(errno.EROFS)
        fh = self._new_fh()
        self._files[fh] = FileHandle(self._version(node))
        info = pyfuse3.FileInfo(fh=fh)
        # Keep the kernel's page cache across opens unless the object changed since we
        # last served it: then the stale pages must go (docs/consistency.md).
        previous = self._served_etag.get(inode)
        info.keep_cache = previous is None or previous == node.etag
        self._served_etag[inode] = node.etag
        return info

    @handler
    async def read(self, fh: int, off: int, size: int) -> bytes:
        handle = self._files.get(fh)
        if handle is None:
            raise pyfuse3.FUSEError(errno.EBADF)
        return await self.hydrator.read(handle.version, off, size)

    @handler
    async def release(self, fh: int) -> None:
        handle = self._files.pop(fh, None)
        if handle is not None and not any(h.version.ino == handle.version.ino for h in self._files.values()):
            self.hydrator.forget(handle.version.ino)

    @handler
    async def flush(self, fh: int) -> None:
        return None
