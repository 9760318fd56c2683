"""The file system as a library: every POSIX operation of a tierfs mount, without FUSE.

:class:`FileSystem` takes plain Python values (inode numbers, ``str`` names, a
:class:`~tierfs.fs.posix.Caller`) and returns records (:class:`~tierfs.meta.records.Inode`,
shown with what is only in memory yet: a staged size, the time of the last write) and handle
numbers. It refuses with :class:`~tierfs.fs.posix.PosixError`; failures of the layers below
(``StoreError``, ``OSError``) pass through unchanged, to be mapped to errno once by the caller
(``fuse.errnos``). The FUSE adapter translates into these calls; the in-process tests drive
them directly (tests/test_fs_model.py).

It owns the transactions that cross the namespace, write-back and the read path: a rename
or unlink changes the namespace and journals the bucket's side in one bracket, and a read asks
the read path's one question, where a file's bytes are now (``read.places.BytePlaces``, which
write-back answers), once per READ before the hydrator fetches.

Rules (see also tierfs/fs/__init__.py):
- every method is a coroutine or a plain call on the trio loop; what it does there is short
  (LMDB reads, dict work). LMDB writes run through ``run_io`` (worker threads), S3 and disk
  work inside the layers it calls, in their limiters.
- what each transaction holds, outermost first (the one lock order, never taken the other way):
  1. ``Namespace.tombstones.holding(keys)``: the old keys of a rename or unlink stay hidden
     from listings until the journal has their delete;
  2. ``WriteBack.renaming(node)``: between the namespace's move and its journal entries, no
     op of the inode settles its record;
  3. write-back's per-file staging lock (inside ``WriteBack``), then
  4. one LMDB write transaction (``run_io``; the group committer's lock is innermost).
- a read-only mount (no write-back) answers every change with EROFS.
"""

from __future__ import annotations

import dataclasses
import errno
import os
import stat
import time
from collections.abc import AsyncGenerator, Awaitable, Callable
from typing import Any

from ..errors import NotFound
from ..meta import keys
from ..meta.namespace import Namespace, Unlinked, child_key
from ..meta.records import Flag, Inode, Kind, kind_of_mode
from ..meta.view import DirectoryCursors
from ..read.follow import read_following
from ..read.hydrator import Hydrator, ObjectVersion
from ..read.places import BytePlaces, InTheBucket, Where
from ..writeback import WriteBack
from .handles import FileHandle, Handles
from .posix import RENAME_EXCHANGE, RENAME_NOREPLACE, AttrChanges, Caller, FsStats, PosixError, check_name

RunBlocking = Callable[..., Awaitable[Any]]
SYMLINK_MAX = 1 << 16


class FileSystem:
    """The POSIX operations of one mount over its namespace, read path and write-back."""

    def __init__(
        self,
        namespace: Namespace,
        hydrator: Hydrator,
        *,
        block_size: int,
        writeback: WriteBack | None = None,
        run_io: RunBlocking | None = None,
        version_ids: Callable[[int], str] | None = None,
    ) -> None:
        """``version_ids(ino)``: the version id that pins an inode's bytes (a snapshot mount on a
        versioned bucket, docs/snapshots.md); reads then GET that version."""
        self.ns = namespace
        self.hydrator = hydrator
        self.block_size = block_size
        self.wb = writeback
        # The read path's one question (read/places.py): write-back answers it; without it (read-only)
        # every file's bytes are under its own key.
        self.places: BytePlaces = writeback if writeback is not None else InTheBucket()
        self._run_io = run_io
        self._version_ids = version_ids
        self.handles = Handles()
        # An immutable namespace (a snapshot) reads its directories from cursors (docs/snapshots.md).
        self._cursors = namespace if isinstance(namespace, DirectoryCursors) else None

    @property
    def read_only(self) -> bool:
        return self.wb is None

    def kernel_timeout(self, configured: float) -> float:
        """How long the kernel may keep an entry or attribute: ``configured``, or an immutable
        namespace's own (effectively infinite) timeout."""
        return configured if self._cursors is None else self._cursors.kernel_timeout

    # -- helpers --------------------------------------------------------------------------------------

    def shown(self, inode: Inode) -> Inode:
        """``inode`` as stat(2) shows it: the staged size, and the last write's time while open."""
        if self.wb is not None:
            size = self.wb.size_of(inode.ino)
            if size is not None and size != inode.size:
                inode = inode.with_(size=size)
        written = self.handles.written_at.get(inode.ino, 0)
        if written > inode.mtime_ns:
            inode = inode.with_(mtime_ns=written, ctime_ns=max(written, inode.ctime_ns))
        return inode

    def _writable(self) -> WriteBack:
        if self.wb is None or self._run_io is None:
            raise PosixError(errno.EROFS)
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
            raise PosixError(errno.ENOTDIR)
        return node

    def _inode(self, ino: int) -> Inode:
        inode = self.ns.get(ino) or self.handles.unlinked_open.get(ino)
        if inode is None:
            raise PosixError(errno.ENOENT)
        return inode

    def _handle(self, fh: int) -> FileHandle:
        handle = self.handles.files.get(fh)
        if handle is None:
            raise PosixError(errno.EBADF)
        return handle

    # -- metadata -------------------------------------------------------------------------------------

    async def lookup(self, parent: int, name: str) -> Inode | None:
        """The entry ``name`` of ``parent``; None if there is none (a cacheable negative answer)."""
        if name == ".":
            return self.getattr(parent)
        if name == "..":
            return self.getattr(self._inode(parent).parent)
        if len(os.fsencode(name)) > keys.NAME_MAX:
            raise PosixError(errno.ENAMETOOLONG)
        try:
            return self.shown(await self.ns.lookup(parent, name))
        except NotFound:
            return None

    def getattr(self, ino: int) -> Inode:
        return self.shown(self._inode(ino))

    def statfs(self) -> FsStats:
        return FsStats(block_size=self.block_size)

    # -- directories ----------------------------------------------------------------------------------

    async def opendir(self, ino: int) -> int:
        node = await self._dir(ino)
        if self._cursors is not None:  # no listing at opendir: readdir goes on from the kernel's offset
            return self.handles.open_cursor_dir(ino, self._cursors.dir_key_of(node))
        await self.ns.learn_empty_below(node)
        return self.handles.open_dir(list(self.ns.children(ino)))

    async def readdir(self, fh: int, start: int) -> AsyncGenerator[tuple[str, Inode, int]]:
        """(name, attributes, the offset of the next entry) from ``start`` on; entries removed
        since opendir are skipped. A cursor-read directory's offsets are the namespace's cursors.
        Callers that stop early close the iterator (``contextlib.aclosing``)."""
        opened = self.handles.cursor_dirs.get(fh)
        if opened is not None and self._cursors is not None:
            async for name, entry, after in self._cursors.read_from(*opened, start):
                yield name, self.shown(entry), after
            return
        entries = self.handles.dirs.get(fh)
        if entries is None:
            raise PosixError(errno.EBADF)
        for index in range(start, len(entries)):
            name, ino = entries[index]
            node = self.ns.get(ino)
            if node is not None:
                yield name, self.shown(node), index + 1

    def releasedir(self, fh: int) -> None:
        self.handles.dirs.pop(fh, None)
        self.handles.cursor_dirs.pop(fh, None)

    # -- files ----------------------------------------------------------------------------------------

    def version_of(self, node: Inode) -> ObjectVersion:
        """The bytes of ``node`` as the bucket holds them *now*: after a rename, the data stays
        under the old key until the journaled copy has run (``BytePlaces.where``)."""
        key = self.places.where(node.ino, node.key).key
        if self._version_ids is not None:
            return ObjectVersion(node.ino, key, node.etag, node.size, self._version_ids(node.ino))
        return ObjectVersion(node.ino, key, node.etag, node.size)

    def _staged(self, ino: int) -> bool:
        return self.places.where(ino, "").staged

    async def open(self, ino: int, flags: int) -> tuple[int, bool]:
        """open(2) of a file: (handle, whether the kernel may keep its page cache of it)."""
        node = self._inode(ino)
        if node.is_dir:
            raise PosixError(errno.EISDIR)
        writable = bool(flags & (os.O_WRONLY | os.O_RDWR | os.O_TRUNC | os.O_APPEND))
        if writable:
            wb = self._writable()
            self.handles.follow_local(ino)
            await wb.open_for_write(node, truncate=bool(flags & os.O_TRUNC))
            if flags & os.O_TRUNC:  # a change of the data like a write: its time is kept the same way
                self.handles.written_at[ino] = time.time_ns()
        follow = writable or self._staged(ino)
        handle = FileHandle(self.version_of(node), writable, follow)
        fh = self.handles.register(handle)
        if not follow:
            self.hydrator.start_fetch(handle.version)  # a small object: its READ finds the GET going
        return fh, self.handles.keep_cache(node)

    async def read(self, fh: int, offset: int, size: int) -> bytes:
        handle = self._handle(fh)
        where, version = self._locate(handle)  # the one question per READ: where are the bytes now
        if where.staged:
            staged = await self.places.read_staged(version.ino, offset, size)
            if staged is not None:
                return staged
            where, version = self._locate(handle)  # retired meanwhile: the bucket has them now
        return await read_following(
            lambda: self._locate(handle)[1], lambda v: self.hydrator.read(v, offset, size), first=version
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

    async def release(self, fh: int) -> None:
        closed = self.handles.close(fh)  # before any await: follow_local walks the open handles
        if closed is None:
            return
        handle, last = closed
        ino = handle.version.ino
        if last:
            self.hydrator.forget(ino)
        if handle.writable and self.wb is not None:
            await self.wb.release_writer(ino, self.handles.written_at.get(ino))
        self.handles.closed(ino)

    async def flush(self, fh: int) -> None:
        """close(2) of one descriptor: nothing to do. A close uploads later (after
        --writeback-delay) and fsync(2) is the durable point (docs/writeback.md)."""

    async def fsync(self, fh: int) -> None:
        handle = self.handles.files.get(fh)
        if handle is None or self.wb is None:
            return
        await self.wb.fsync(handle.version.ino)

    # -- writes ---------------------------------------------------------------------------------------

    async def create(self, parent: int, name: str, mode: int, caller: Caller) -> tuple[int, Inode]:
        """open(2) with O_CREAT of a new file: (a writable handle, its attributes)."""
        wb = self._writable()
        node = await self._new_entry(parent, name, Kind.FILE, stat.S_IFREG | (mode & 0o7777), caller)
        await wb.created(node, open_writer=True)
        fh = self.handles.register(FileHandle(self.version_of(node), writable=True, follow=True))
        self.handles.note_served(node)
        return fh, self.shown(node)

    async def _new_entry(
        self, parent_ino: int, name: str, kind: Kind, mode: int, caller: Caller, *, rdev: int = 0
    ) -> Inode:
        """A new entry owned by the caller. Below a set-group-ID directory it takes the directory's
        group (and a new directory keeps the bit), as on Linux: this is the filesystem's job, the
        kernel only passes the caller's ids."""
        parent = await self._dir(parent_ino)
        check_name(parent, name, is_dir=kind is Kind.DIR)
        if self.ns.child(parent_ino, name) is not None:
            raise PosixError(errno.EEXIST)
        mode &= ~caller.umask
        gid = caller.gid
        if parent.mode & stat.S_ISGID:
            gid = parent.gid
            if kind is Kind.DIR:
                mode |= stat.S_ISGID
        node: Inode = await self._io(
            lambda: self.ns.create(parent, name, kind, mode=mode, uid=caller.uid, gid=gid, rdev=rdev)
        )
        return node

    async def write(self, fh: int, offset: int, data: bytes) -> int:
        handle = self._handle(fh)
        if not handle.writable:
            raise PosixError(errno.EBADF)
        written: int = await self._writable().write(handle.version.ino, offset, data)
        self.handles.written_at[handle.version.ino] = time.time_ns()
        return written

    async def mkdir(self, parent: int, name: str, mode: int, caller: Caller) -> Inode:
        wb = self._writable()
        node = await self._new_entry(parent, name, Kind.DIR, stat.S_IFDIR | (mode & 0o7777), caller)
        await wb.created(node)
        return self.shown(node)

    async def symlink(self, parent: int, name: str, target: bytes, caller: Caller) -> Inode:
        wb = self._writable()
        node = await self._new_entry(parent, name, Kind.SYMLINK, stat.S_IFLNK | 0o777, caller)
        node = await self._io(lambda: self.ns.update(node.ino, size=len(target))) or node
        await wb.created(node, content=target)
        return self.shown(node)

    async def readlink(self, ino: int) -> bytes:
        node = self._inode(ino)
        if node.kind is not Kind.SYMLINK:
            raise PosixError(errno.EINVAL)
        if self._staged(ino):
            staged = await self.places.read_staged(ino, 0, SYMLINK_MAX)
            if staged is not None:
                return staged
        return await self.hydrator.read(self.version_of(self._inode(ino)), 0, node.size)

    async def mknod(self, parent: int, name: str, mode: int, rdev: int, caller: Caller) -> Inode:
        """Regular files, FIFOs, sockets and devices. The kernel gives a special inode its pipe,
        socket or device behaviour itself (its open never reaches us); we keep its mode and
        ``rdev`` and export it as a zero-byte object whose headers carry them."""
        wb = self._writable()
        kind = kind_of_mode(mode)
        if kind not in (Kind.FILE, Kind.SPECIAL):
            raise PosixError(errno.EINVAL)
        keep_rdev = stat.S_ISCHR(mode) or stat.S_ISBLK(mode)
        node = await self._new_entry(
            parent, name, kind, stat.S_IFMT(mode) | (mode & 0o7777), caller, rdev=rdev if keep_rdev else 0
        )
        await wb.created(node)
        return self.shown(node)

    async def link(self, ino: int, new_parent: int, new_name: str) -> Inode:
        """A hard link: one more name for the inode (directories are refused). The bucket
        has no links, so the new name is exported as a copy of the object (docs/namespace.md)."""
        wb = self._writable()
        node = self._inode(ino)
        if node.is_dir:
            raise PosixError(errno.EPERM)
        parent = await self._dir(new_parent)
        check_name(parent, new_name, is_dir=False)
        if self.ns.child(parent.ino, new_name) is not None:
            raise PosixError(errno.EEXIST)
        key = child_key(parent.key, new_name, is_dir=False)
        linked: Inode = await self._io(self.ns.link, node, parent, new_name)
        await wb.linked(linked, key)
        return self.shown(linked)

    async def unlink(self, parent: int, name: str) -> None:
        self._writable()
        node = await self._existing(parent, name)
        if node is None:
            raise PosixError(errno.ENOENT)
        if node.is_dir:
            raise PosixError(errno.EISDIR)
        await self._drop_name(self._inode(parent), name, node)

    async def rmdir(self, parent: int, name: str) -> None:
        self._writable()
        node = await self._existing(parent, name)
        if node is None:
            raise PosixError(errno.ENOENT)
        if not node.is_dir:
            raise PosixError(errno.ENOTDIR)
        await self.ns.ensure_listed(node.ino)
        await self._drop_name(self._inode(parent), name, node)

    async def _drop_name(self, parent: Inode, name: str, node: Inode) -> None:
        """Remove one name of ``node`` in the namespace and journal what the bucket must do:
        delete the inode with its last name, delete only this name's object while other hard
        links remain, or move the record to another of its names when this one was its own."""
        wb = self._writable()
        key = child_key(parent.key, name, is_dir=node.is_dir)
        with self.ns.tombstones.holding(node.key, key):
            gone: Unlinked | None = await self._io(self.ns.remove, parent.ino, name)
            if gone is None:
                raise PosixError(errno.ENOENT)
            if gone.remaining is None:
                if self.handles.is_open(gone.node.ino):
                    self.handles.unlinked_open[gone.node.ino] = gone.node.with_(
                        nlink=0, ctime_ns=time.time_ns()
                    )
                await wb.removed(gone.node)
            elif gone.promoted:
                await wb.promoted(gone.remaining, gone.node.key)
            else:
                await wb.name_removed(gone.key)

    async def rename(
        self, old_parent_ino: int, old_name: str, new_parent_ino: int, new_name: str, flags: int
    ) -> None:
        wb = self._writable()
        if flags & RENAME_EXCHANGE:
            raise PosixError(errno.EINVAL)
        old_parent, new_parent = await self._dir(old_parent_ino), await self._dir(new_parent_ino)
        node = self.ns.child(old_parent.ino, old_name)
        if node is None:
            raise PosixError(errno.ENOENT)
        if node.is_dir and self._is_below(new_parent, node.ino):
            raise PosixError(errno.EINVAL)  # into itself (the kernel refuses it first, as Linux does)
        check_name(new_parent, new_name, is_dir=node.is_dir)
        target = self.ns.child(new_parent.ino, new_name)
        if target is not None:
            if target.ino == node.ino:
                return  # two names of one inode: POSIX says rename does nothing
            if flags & RENAME_NOREPLACE:
                raise PosixError(errno.EEXIST)
            if target.is_dir and not node.is_dir:
                raise PosixError(errno.EISDIR)
            if node.is_dir and not target.is_dir:
                raise PosixError(errno.ENOTDIR)
            if target.is_dir:
                await self.ns.ensure_listed(target.ino)
                if next(iter(self.ns.children(target.ino)), None) is not None:
                    raise PosixError(errno.ENOTEMPTY)
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

    def _is_below(self, node: Inode, ancestor: int) -> bool:
        """Whether ``node`` is ``ancestor`` or lies below it."""
        seen = 0
        while seen < 4096:
            if node.ino == ancestor:
                return True
            if node.parent == node.ino:
                return False
            parent = self.ns.get(node.parent)
            if parent is None:
                return False
            node, seen = parent, seen + 1
        return False

    async def _list_subtree(self, ino: int) -> None:
        """A directory rename moves every key below it; the namespace must know them all first."""
        async for _ in self.ns.walk(self._inode(ino)):
            pass

    async def setattr(self, ino: int, changes: AttrChanges) -> Inode:
        node = self._inode(ino)
        wb = self._writable()
        if changes.size is not None:
            if node.is_dir:
                raise PosixError(errno.EISDIR)
            self.handles.follow_local(ino)
            await wb.truncate(node, changes.size)
        update: dict[str, Any] = {}
        if changes.mode is not None:
            update["mode"] = stat.S_IFMT(node.mode) | stat.S_IMODE(changes.mode)
        if changes.uid is not None:
            update["uid"] = changes.uid
        if changes.gid is not None:
            update["gid"] = changes.gid
        if changes.atime_ns is not None:
            update["atime_ns"] = changes.atime_ns
        now = time.time_ns()
        if changes.mtime_ns is not None:
            update["mtime_ns"] = changes.mtime_ns
            self.handles.written_at.pop(ino, None)  # an explicit time wins over the last write's
        elif changes.size is not None:
            update["mtime_ns"] = now
        exported = bool(update) and not (changes.size is not None and set(update) == {"mtime_ns"})
        # Every attribute change is a status change, even chown(-1, -1): ctime becomes now
        # (or what the caller asks for).
        update["ctime_ns"] = changes.ctime_ns if changes.ctime_ns is not None else now
        update["flags"] = node.flags | Flag.META_KNOWN
        updated = await self._io(lambda: self.ns.update(ino, **update))
        if updated is None:
            raise PosixError(errno.ENOENT)
        if exported:
            await wb.metadata_changed(updated)
        return self.getattr(ino)
