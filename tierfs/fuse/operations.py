"""The FUSE adapter: pyfuse3 requests in, :class:`tierfs.fs.FileSystem` calls, errno out.

It only translates: bytes names to ``str``, pyfuse3's request context to a
:class:`~tierfs.fs.posix.Caller`, ``SetattrFields`` to :class:`~tierfs.fs.posix.AttrChanges`,
records to ``EntryAttributes``. Every POSIX rule and every transaction across the layers is the
file system's (tierfs/fs/). Every handler is wrapped by :func:`fuse_errors`, the one errno
map, so only ``FUSEError`` ever reaches pyfuse3. Handlers run on the trio loop and do there
only what the file system's rules allow.
"""

from __future__ import annotations

import errno
import os
from contextlib import aclosing
from typing import Any

import pyfuse3

from ..fs import AttrChanges, Caller, FileSystem
from ..meta.records import Inode
from .errnos import ErrorCounter, entry_attributes, fuse_errors, negative_entry

_errors = ErrorCounter()
handler = fuse_errors(_errors)


def caller_of(ctx: Any) -> Caller:
    return Caller(uid=ctx.uid, gid=ctx.gid, umask=getattr(ctx, "umask", 0))


def changes_of(attr: pyfuse3.EntryAttributes, fields: pyfuse3.SetattrFields) -> AttrChanges:
    return AttrChanges(
        size=attr.st_size if fields.update_size else None,
        mode=attr.st_mode if fields.update_mode else None,
        uid=attr.st_uid if fields.update_uid else None,
        gid=attr.st_gid if fields.update_gid else None,
        atime_ns=attr.st_atime_ns if fields.update_atime else None,
        mtime_ns=attr.st_mtime_ns if fields.update_mtime else None,
        ctime_ns=attr.st_ctime_ns if fields.update_ctime else None,
    )


class TierOperations(pyfuse3.Operations):
    """pyfuse3 operations of a tierfs mount: a translation of :class:`FileSystem`."""

    supports_dot_lookup = True
    enable_writeback_cache = False

    def __init__(self, fs: FileSystem, *, kernel_timeout: float) -> None:
        super().__init__()
        self.fs = fs
        self.timeout = fs.kernel_timeout(kernel_timeout)  # an immutable namespace's own, if it has one
        self.errors = _errors

    def _attrs(self, inode: Inode) -> pyfuse3.EntryAttributes:
        return entry_attributes(inode, timeout=self.timeout, blksize=self.fs.block_size)

    # -- metadata -------------------------------------------------------------------------------------

    @handler
    async def lookup(self, parent_inode: int, name: bytes, ctx: Any = None) -> pyfuse3.EntryAttributes:
        node = await self.fs.lookup(parent_inode, os.fsdecode(name))
        return negative_entry(self.timeout) if node is None else self._attrs(node)

    @handler
    async def getattr(self, inode: int, ctx: Any = None) -> pyfuse3.EntryAttributes:
        return self._attrs(self.fs.getattr(inode))

    @handler
    async def forget(self, inode_list: Any) -> None:
        """Inodes live in LMDB, not on the heap: there is nothing to free when the kernel forgets."""

    @handler
    async def statfs(self, ctx: Any = None) -> pyfuse3.StatvfsData:
        stats = self.fs.statfs()
        st = pyfuse3.StatvfsData()
        st.f_bsize = st.f_frsize = stats.block_size
        st.f_blocks = st.f_bfree = st.f_bavail = stats.blocks
        st.f_files = st.f_ffree = st.f_favail = stats.files
        st.f_namemax = stats.name_max
        return st

    # -- directories ----------------------------------------------------------------------------------

    @handler
    async def opendir(self, inode: int, ctx: Any = None) -> int:
        return await self.fs.opendir(inode)

    @handler
    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        async with aclosing(self.fs.readdir(fh, start_id)) as entries:
            async for name, node, next_id in entries:
                if not pyfuse3.readdir_reply(token, os.fsencode(name), self._attrs(node), next_id):
                    return

    @handler
    async def releasedir(self, fh: int) -> None:
        self.fs.releasedir(fh)

    # -- files ----------------------------------------------------------------------------------------

    @handler
    async def open(self, inode: int, flags: int, ctx: Any = None) -> pyfuse3.FileInfo:
        fh, keep_cache = await self.fs.open(inode, flags)
        info = pyfuse3.FileInfo(fh=fh)
        info.keep_cache = keep_cache
        return info

    @handler
    async def read(self, fh: int, off: int, size: int) -> bytes:
        return await self.fs.read(fh, off, size)

    @handler
    async def release(self, fh: int) -> None:
        await self.fs.release(fh)

    async def flush(self, fh: int) -> None:
        """close(2) has nothing to do (``FileSystem.flush``): ENOSYS makes the kernel stop sending
        FLUSH for the whole connection, which saves one round trip per close() (docs/design.md)."""
        raise pyfuse3.FUSEError(errno.ENOSYS)

    @handler
    async def fsync(self, fh: int, datasync: bool) -> None:
        await self.fs.fsync(fh)

    # -- writes ---------------------------------------------------------------------------------------

    @handler
    async def create(
        self, parent_inode: int, name: bytes, mode: int, flags: int, ctx: Any
    ) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        fh, node = await self.fs.create(parent_inode, os.fsdecode(name), mode, caller_of(ctx))
        return pyfuse3.FileInfo(fh=fh), self._attrs(node)

    @handler
    async def write(self, fh: int, off: int, buf: bytes) -> int:
        return await self.fs.write(fh, off, buf)

    @handler
    async def mkdir(self, parent_inode: int, name: bytes, mode: int, ctx: Any) -> pyfuse3.EntryAttributes:
        return self._attrs(await self.fs.mkdir(parent_inode, os.fsdecode(name), mode, caller_of(ctx)))

    @handler
    async def symlink(
        self, parent_inode: int, name: bytes, target: bytes, ctx: Any
    ) -> pyfuse3.EntryAttributes:
        return self._attrs(await self.fs.symlink(parent_inode, os.fsdecode(name), target, caller_of(ctx)))

    @handler
    async def readlink(self, inode: int, ctx: Any = None) -> bytes:
        return await self.fs.readlink(inode)

    @handler
    async def unlink(self, parent_inode: int, name: bytes, ctx: Any) -> None:
        await self.fs.unlink(parent_inode, os.fsdecode(name))

    @handler
    async def rmdir(self, parent_inode: int, name: bytes, ctx: Any) -> None:
        await self.fs.rmdir(parent_inode, os.fsdecode(name))

    @handler
    async def rename(
        self,
        parent_inode_old: int,
        name_old: bytes,
        parent_inode_new: int,
        name_new: bytes,
        flags: int,
        ctx: Any,
    ) -> None:
        await self.fs.rename(
            parent_inode_old, os.fsdecode(name_old), parent_inode_new, os.fsdecode(name_new), flags
        )

    @handler
    async def setattr(
        self,
        inode: int,
        attr: pyfuse3.EntryAttributes,
        fields: pyfuse3.SetattrFields,
        fh: int | None,
        ctx: Any,
    ) -> pyfuse3.EntryAttributes:
        return self._attrs(await self.fs.setattr(inode, changes_of(attr, fields)))

    @handler
    async def link(
        self, inode: int, new_parent_inode: int, new_name: bytes, ctx: Any
    ) -> pyfuse3.EntryAttributes:
        return self._attrs(await self.fs.link(inode, new_parent_inode, os.fsdecode(new_name)))

    @handler
    async def mknod(
        self, parent_inode: int, name: bytes, mode: int, rdev: int, ctx: Any
    ) -> pyfuse3.EntryAttributes:
        return self._attrs(await self.fs.mknod(parent_inode, os.fsdecode(name), mode, rdev, caller_of(ctx)))
