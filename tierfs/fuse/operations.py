"""The FUSE adapter: translates pyfuse3 requests into calls on the layers below.

It owns only state that lives while files are open: handles, and the time of the last
write of a file open for writing, shown as its mtime until the close records it.
Everything it does on the trio loop is short (LMDB reads, dict lookups); S3, disk and
LMDB writes happen in the layers it calls, in worker threads. Every handler is wrapped
by :func:`fuse_errors`, so only ``FUSEError`` ever reaches pyfuse3.
"""

from __future__ import annotations

import dataclasses
import errno
import logging
import os
import stat
import time
from collections import Counter, OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pyfuse3

from ..errors import NotFound
from ..meta import keys
from ..meta.namespace import Namespace, Unlinked, child_key
from ..meta.records import Flag, Inode, Kind, kind_of_mode
from ..read.follow import read_following
from ..read.hydrator import Hydrator, ObjectVersion
from ..read.places import BytePlaces, InTheBucket, Where
from ..writeback import WriteBack
from .errnos import ErrorCounter, entry_attributes, fuse_errors, negative_entry

log = logging.getLogger(__name__)

_errors = ErrorCounter()
handler = fuse_errors(_errors)


@dataclass
class FileHandle:
    """One open file. ``version`` pins the bucket version seen at open (docs/consistency.md).

    A handle *follows* the inode instead once the inode is changed here (it was opened
    while staged, or a write, truncate or create touched it since): reads must see the
    last acknowledged write, and after its upload that is the node's new version, never
    the one pinned at open.
    """

    version: ObjectVersion
    writable: bool = False
    follow: bool = False


SERVED_ETAGS_KEPT = 65536
RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2


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
        writeback: WriteBack | None = None,
        run_io: Callable[..., Any] | None = None,
        places: BytePlaces | None = None,
        version_ids: Callable[[int], str] | None = None,
    ) -> None:
        """``places`` answers where a file's bytes are now (read/places.py); without write-back
        they are always in the bucket under the file's own key. ``version_ids(ino)``: the version
        id that pins an inode's bytes (a snapshot mount on a versioned bucket, docs/snapshots.md);
        reads then GET that version."""
        super().__init__()
        self.ns = namespace
        self.hydrator = hydrator
        self.timeout = kernel_timeout
        self.blksize = block_size
        self.read_only = read_only
        self._invalidate = invalidate
        self.wb = writeback
        self.places: BytePlaces = places if places is not None else InTheBucket()
        self._run_io = run_io
        self._version_ids = version_ids
        self.errors = _errors
        self._files: dict[int, FileHandle] = {}
        self._dirs: dict[int, list[tuple[str, int]]] = {}
        self._next_fh = 1
        self._open_count: Counter[int] = Counter()
        self._handles_of: dict[int, set[int]] = {}  # ino -> its open fhs (to make them follow)
        # ETag whose bytes the kernel may hold in its page cache, per inode; bounded so a
        # million-file epoch does not keep a million entries (forgetting one only means
        # the page cache is kept, and the change hook invalidates changed inodes anyway).
        self._served_etag: OrderedDict[int, str] = OrderedDict()
        # ino -> time of its last write(2), while open: mtime and ctime change with every write,
        # but the record is written once, when the last writer closes (not one commit per write).
        self._written_at: dict[int, int] = {}
        # ino -> its last record, for files unlinked while open: fstat still works (nlink 0)
        # until the last handle closes, as POSIX keeps the file until then.
        self._unlinked_open: dict[int, Inode] = {}

    # -- helpers --------------------------------------------------------------------------------------

    def _new_fh(self) -> int:
        fh = self._next_fh
        self._next_fh += 1
        return fh

    def _attrs(self, inode: Inode) -> pyfuse3.EntryAttributes:
        if self.wb is not None:
            size = self.wb.size_of(inode.ino)
            if size is not None and size != inode.size:
                inode = inode.with_(size=size)
        written = self._written_at.get(inode.ino, 0)
        if written > inode.mtime_ns:
            inode = inode.with_(mtime_ns=written, ctime_ns=max(written, inode.ctime_ns))
        return entry_attributes(inode, timeout=self.timeout, blksize=self.blksize)

    def _writable(self) -> WriteBack:
        if self.wb is None or self._run_io is None:
            raise pyfuse3.FUSEError(errno.EROFS)
        return self.wb

    async def _io(self, fn: Callable[..., Any], *args: Any) -> Any:
        assert self._run_io is not None
        return await self._run_io(fn, *args)

    async def _existing(self, parent: int, name: str) -> Inode | None:
        await self.ns.ensure_listed(parent)
        return self.ns.child(parent, name)

    async def _dir(self, ino: int) -> Inode:
        node = await self.ns.ensure_listed(ino)
        if not node.is_dir:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        return node

    def _inode(self, ino: int) -> Inode:
        inode = self.ns.get(ino) or self._unlinked_open.get(ino)
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
        if len(name) > keys.NAME_MAX:
            raise pyfuse3.FUSEError(errno.ENAMETOOLONG)
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
        await self.ns.learn_empty_below(node)
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

    def version_of(self, node: Inode) -> ObjectVersion:
        """The bytes of ``node`` as the bucket holds them *now*: after a rename, the data stays
        under the old key until the journaled copy has run (WriteBack.data_key)."""
        key = self.wb.data_key(node.ino, node.key) if self.wb is not None else node.key
        if self._version_ids is not None:
            return ObjectVersion(node.ino, key, node.etag, node.size, self._version_ids(node.ino))
        return ObjectVersion(node.ino, key, node.etag, node.size)

    @handler
    async def open(self, inode: int, flags: int, ctx: Any = None) -> pyfuse3.FileInfo:
        node = self._inode(inode)
        if node.is_dir:
            raise pyfuse3.FUSEError(errno.EISDIR)
        writable = bool(flags & (os.O_WRONLY | os.O_RDWR | os.O_TRUNC | os.O_APPEND))
        if writable:
            wb = self._writable()
            self._follow_local(inode)
            await wb.open_for_write(node, truncate=bool(flags & os.O_TRUNC))
            if flags & os.O_TRUNC:  # a change of the data like a write: its time is kept the same way
                self._written_at[inode] = time.time_ns()
        follow = writable or (self.wb is not None and self.wb.is_staged(inode))
        handle = FileHandle(self.version_of(node), writable, follow)
        info = pyfuse3.FileInfo(fh=self._register(handle))
        if not follow:
            self.hydrator.start_fetch(handle.version)  # a small object: its READ finds the GET going
        # Keep the kernel's page cache across opens unless the object changed since we
        # last served it: then the stale pages must go (docs/consistency.md).
        previous = self._served_etag.get(inode)
        info.keep_cache = previous is None or previous == node.etag
        self._note_served(node)
        return info

    def _register(self, handle: FileHandle) -> int:
        fh = self._new_fh()
        self._files[fh] = handle
        self._open_count[handle.version.ino] += 1
        self._handles_of.setdefault(handle.version.ino, set()).add(fh)
        return fh

    def _follow_local(self, ino: int) -> None:
        """A local change of ``ino`` begins: every handle open on it now follows the inode."""
        for fh in self._handles_of.get(ino, ()):
            self._files[fh].follow = True

    def _note_served(self, node: Inode) -> None:
        self._served_etag[node.ino] = node.etag
        self._served_etag.move_to_end(node.ino)
        if len(self._served_etag) > SERVED_ETAGS_KEPT:
            self._served_etag.popitem(last=False)

    @handler
    async def read(self, fh: int, off: int, size: int) -> bytes:
        handle = self._files.get(fh)
        if handle is None:
            raise pyfuse3.FUSEError(errno.EBADF)
        where, version = self._locate(handle)  # the one question per READ: where are the bytes now
        if where.staged:
            staged = await self.places.read_staged(version.ino, off, size)
            if staged is not None:
                return staged
            where, version = self._locate(handle)  # retired meanwhile: the bucket has them now
        return await read_following(
            lambda: self._locate(handle)[1], lambda v: self.hydrator.read(v, off, size), first=version
        )

    def _locate(self, handle: FileHandle) -> tuple[Where, ObjectVersion]:
        """Where the bytes read through ``handle`` are now, and the version to read from the bucket
        (asked again if the bytes move meanwhile)."""
        version = handle.version
        if handle.follow or not version.etag:
            # Written through this handle and uploaded since: read the version the bucket now has.
            node = self._inode(version.ino)
            where = self.places.where(node.ino, node.key)
            return where, dataclasses.replace(self.version_of(node), key=where.key)  # its version id too
        current = self.ns.get(version.ino) if self.wb is not None else None
        if current is None:
            return self.places.where(version.ino, version.key), version
        # Renamed since the open: follow the data to wherever the bucket has it now.
        where = self.places.where(current.ino, current.key)
        return where, dataclasses.replace(version, key=where.key)

    @handler
    async def release(self, fh: int) -> None:
        handle = self._files.pop(fh, None)
        if handle is None:
            return
        ino = handle.version.ino
        self._handles_of[ino].discard(fh)  # before any await: _follow_local walks these
        self._open_count[ino] -= 1
        if self._open_count[ino] <= 0:
            del self._open_count[ino]
            del self._handles_of[ino]
            self.hydrator.forget(ino)
        if handle.writable and self.wb is not None:
            await self.wb.release_writer(ino, self._written_at.get(ino))
        if ino not in self._open_count:
            self._written_at.pop(ino, None)
            self._unlinked_open.pop(ino, None)

    async def flush(self, fh: int) -> None:
        """close() uploads later (after --writeback-delay); fsync() is the durable point.

        ENOSYS makes the kernel stop sending FLUSH for the whole connection, which
        saves one round trip per close() of every file (docs/design.md).
        """
        raise pyfuse3.FUSEError(errno.ENOSYS)

    @handler
    async def fsync(self, fh: int, datasync: bool) -> None:
        handle = self._files.get(fh)
        if handle is None or self.wb is None:
            return
        await self.wb.fsync(handle.version.ino)

    # -- writes ---------------------------------------------------------------------------------------

    @handler
    async def create(
        self, parent_inode: int, name: bytes, mode: int, flags: int, ctx: Any
    ) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        wb = self._writable()
        node = await self._new_entry(parent_inode, name, Kind.FILE, stat.S_IFREG | (mode & 0o7777), ctx)
        await wb.created(node, open_writer=True)
        fh = self._register(FileHandle(self.version_of(node), writable=True, follow=True))
        self._note_served(node)
        return pyfuse3.FileInfo(fh=fh), self._attrs(node)

    async def _new_entry(
        self, parent_inode: int, name: bytes, kind: Kind, mode: int, ctx: Any, *, rdev: int = 0
    ) -> Inode:
        """A new entry owned by the caller. Below a set-group-ID directory it takes the directory's
        group (and a new directory keeps the bit), as on Linux: this is the filesystem's job, the
        kernel only passes the caller's ids."""
        text = os.fsdecode(name)
        parent = await self._dir(parent_inode)
        self._check_name(parent, text, is_dir=kind is Kind.DIR)
        if self.ns.child(parent_inode, text) is not None:
            raise pyfuse3.FUSEError(errno.EEXIST)
        umask = getattr(ctx, "umask", 0)
        mode &= ~umask
        gid = ctx.gid
        if parent.mode & stat.S_ISGID:
            gid = parent.gid
            if kind is Kind.DIR:
                mode |= stat.S_ISGID
        node: Inode = await self._io(
            lambda: self.ns.create(parent, text, kind, mode=mode, uid=ctx.uid, gid=gid, rdev=rdev)
        )
        return node

    @handler
    async def write(self, fh: int, off: int, buf: bytes) -> int:
        handle = self._files.get(fh)
        if handle is None or not handle.writable:
            raise pyfuse3.FUSEError(errno.EBADF)
        written: int = await self._writable().write(handle.version.ino, off, buf)
        self._written_at[handle.version.ino] = time.time_ns()
        return written

    @handler
    async def mkdir(self, parent_inode: int, name: bytes, mode: int, ctx: Any) -> pyfuse3.EntryAttributes:
        wb = self._writable()
        node = await self._new_entry(parent_inode, name, Kind.DIR, stat.S_IFDIR | (mode & 0o7777), ctx)
        await wb.created(node)
        return self._attrs(node)

    @handler
    async def symlink(
        self, parent_inode: int, name: bytes, target: bytes, ctx: Any
    ) -> pyfuse3.EntryAttributes:
        wb = self._writable()
        node = await self._new_entry(parent_inode, name, Kind.SYMLINK, stat.S_IFLNK | 0o777, ctx)
        node = await self._io(lambda: self.ns.update(node.ino, size=len(target))) or node
        await wb.created(node, content=target)
        return self._attrs(node)

    @handler
    async def readlink(self, inode: int, ctx: Any = None) -> bytes:
        node = self._inode(inode)
        if node.kind is not Kind.SYMLINK:
            raise pyfuse3.FUSEError(errno.EINVAL)
        if self.wb is not None and self.wb.is_staged(inode):
            staged = await self.wb.read(inode, 0, 1 << 16)
            if staged is not None:
                return staged
        return await self.hydrator.read(self.version_of(self._inode(inode)), 0, node.size)

    @handler
    async def unlink(self, parent_inode: int, name: bytes, ctx: Any) -> None:
        self._writable()
        node = await self._existing(parent_inode, os.fsdecode(name))
        if node is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        if node.is_dir:
            raise pyfuse3.FUSEError(errno.EISDIR)
        await self._drop_name(self._inode(parent_inode), os.fsdecode(name), node)

    @handler
    async def rmdir(self, parent_inode: int, name: bytes, ctx: Any) -> None:
        self._writable()
        node = await self._existing(parent_inode, os.fsdecode(name))
        if node is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        if not node.is_dir:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        await self.ns.ensure_listed(node.ino)
        await self._drop_name(self._inode(parent_inode), os.fsdecode(name), node)

    async def _drop_name(self, parent: Inode, name: str, node: Inode) -> None:
        """Remove one name of ``node`` in the namespace and journal what the bucket must do:
        delete the inode with its last name, delete only this name's object while other hard
        links remain, or move the record to another of its names when this one was its own."""
        wb = self._writable()
        key = child_key(parent.key, name, is_dir=node.is_dir)
        with self.ns.tombstones.holding(node.key, key):
            gone: Unlinked | None = await self._io(self.ns.remove, parent.ino, name)
            if gone is None:
                raise pyfuse3.FUSEError(errno.ENOENT)
            if gone.remaining is None:
                if gone.node.ino in self._open_count:
                    self._unlinked_open[gone.node.ino] = gone.node.with_(nlink=0, ctime_ns=time.time_ns())
                await wb.removed(gone.node)
            elif gone.promoted:
                await wb.promoted(gone.remaining, gone.node.key)
            else:
                await wb.name_removed(gone.key)

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
        wb = self._writable()
        if flags & RENAME_EXCHANGE:
            raise pyfuse3.FUSEError(errno.EINVAL)
        old_name, new_name = os.fsdecode(name_old), os.fsdecode(name_new)
        old_parent, new_parent = await self._dir(parent_inode_old), await self._dir(parent_inode_new)
        node = self.ns.child(old_parent.ino, old_name)
        if node is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        self._check_name(new_parent, new_name, is_dir=node.is_dir)
        target = self.ns.child(new_parent.ino, new_name)
        if target is not None:
            if target.ino == node.ino:
                return  # two names of one inode: POSIX says rename does nothing
            if flags & RENAME_NOREPLACE:
                raise pyfuse3.FUSEError(errno.EEXIST)
            if target.is_dir and not node.is_dir:
                raise pyfuse3.FUSEError(errno.EISDIR)
            if node.is_dir and not target.is_dir:
                raise pyfuse3.FUSEError(errno.ENOTDIR)
            if target.is_dir:
                await self.ns.ensure_listed(target.ino)
                if next(iter(self.ns.children(target.ino)), None) is not None:
                    raise pyfuse3.FUSEError(errno.ENOTEMPTY)
        if node.is_dir:
            await self._list_subtree(node.ino)
        if target is not None:
            await self._drop_name(new_parent, new_name, target)
        if not self.ns.is_own_name(node, old_parent.ino, old_name):
            # An extra hard link moves: copy the inode's object to the new name, drop the old one.
            old_key = child_key(old_parent.key, old_name, is_dir=False)
            with self.ns.tombstones.holding(old_key):
                new_key = await self._io(
                    self.ns.rename_link, node, old_parent, old_name, new_parent, new_name
                )
                await wb.linked(self._inode(node.ino), new_key)
                await wb.name_removed(old_key)
            return
        with self.ns.tombstones.holding(node.key):
            async with wb.renaming(node):
                moved, old_key = await self._io(self.ns.rename, old_parent, old_name, new_parent, new_name)
                await wb.renamed(moved, old_key)

    @staticmethod
    def _check_name(parent: Inode, name: str, *, is_dir: bool) -> None:
        """ENAMETOOLONG for a name over 255 bytes or a key over S3's 1 KiB; EINVAL for a name
        the listing rules would hide (it could never come back from the bucket)."""
        if len(os.fsencode(name)) > keys.NAME_MAX:
            raise pyfuse3.FUSEError(errno.ENAMETOOLONG)
        if not keys.is_safe_name(name):
            raise pyfuse3.FUSEError(errno.EINVAL)
        if not keys.key_fits(child_key(parent.key, name, is_dir=is_dir)):
            raise pyfuse3.FUSEError(errno.ENAMETOOLONG)

    async def _list_subtree(self, ino: int) -> None:
        """A directory rename moves every key below it; the namespace must know them all first."""
        async for _ in self.ns.walk(self._inode(ino)):
            pass

    @handler
    async def setattr(
        self,
        inode: int,
        attr: pyfuse3.EntryAttributes,
        fields: pyfuse3.SetattrFields,
        fh: int | None,
        ctx: Any,
    ) -> pyfuse3.EntryAttributes:
        node = self._inode(inode)
        wb = self._writable()
        if fields.update_size:
            if node.is_dir:
                raise pyfuse3.FUSEError(errno.EISDIR)
            self._follow_local(inode)
            await wb.truncate(node, attr.st_size)
        changes: dict[str, Any] = {}
        if fields.update_mode:
            changes["mode"] = stat.S_IFMT(node.mode) | stat.S_IMODE(attr.st_mode)
        if fields.update_uid:
            changes["uid"] = attr.st_uid
        if fields.update_gid:
            changes["gid"] = attr.st_gid
        if fields.update_atime:
            changes["atime_ns"] = attr.st_atime_ns
        now = time.time_ns()
        if fields.update_mtime:
            changes["mtime_ns"] = attr.st_mtime_ns
            self._written_at.pop(inode, None)  # an explicit time wins over the last write's
        elif fields.update_size:
            changes["mtime_ns"] = now
        exported = bool(changes) and not (fields.update_size and set(changes) == {"mtime_ns"})
        # Every attribute change is a status change, even chown(-1, -1): ctime becomes now
        # (or what the kernel asks for).
        changes["ctime_ns"] = attr.st_ctime_ns if fields.update_ctime else now
        changes["flags"] = node.flags | Flag.META_KNOWN
        updated = await self._io(lambda: self.ns.update(inode, **changes))
        if updated is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        if exported:
            await wb.metadata_changed(updated)
        return self._attrs(self._inode(inode))

    @handler
    async def link(
        self, inode: int, new_parent_inode: int, new_name: bytes, ctx: Any
    ) -> pyfuse3.EntryAttributes:
        """A hard link: one more name for the inode (the kernel refuses directories). The bucket
        has no links, so the new name is exported as a copy of the object (docs/namespace.md)."""
        wb = self._writable()
        node = self._inode(inode)
        if node.is_dir:
            raise pyfuse3.FUSEError(errno.EPERM)
        text = os.fsdecode(new_name)
        parent = await self._dir(new_parent_inode)
        self._check_name(parent, text, is_dir=False)
        if self.ns.child(parent.ino, text) is not None:
            raise pyfuse3.FUSEError(errno.EEXIST)
        key = child_key(parent.key, text, is_dir=False)
        linked: Inode = await self._io(self.ns.link, node, parent, text)
        await wb.linked(linked, key)
        return self._attrs(linked)

    @handler
    async def mknod(
        self, parent_inode: int, name: bytes, mode: int, rdev: int, ctx: Any
    ) -> pyfuse3.EntryAttributes:
        """Regular files, FIFOs, sockets and devices. The kernel gives a special inode its pipe,
        socket or device behaviour itself (its open never reaches us); we keep its mode and
        ``rdev`` and export it as a zero-byte object whose headers carry them."""
        wb = self._writable()
        kind = kind_of_mode(mode)
        if kind not in (Kind.FILE, Kind.SPECIAL):
            raise pyfuse3.FUSEError(errno.EINVAL)
        keep_rdev = stat.S_ISCHR(mode) or stat.S_ISBLK(mode)
        node = await self._new_entry(
            parent_inode, name, kind, stat.S_IFMT(mode) | (mode & 0o7777), ctx, rdev=rdev if keep_rdev else 0
        )
        await wb.created(node)
        return self._attrs(node)
