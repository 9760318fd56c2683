"""The namespace layer: S3 keys as a tree of inodes, kept in LMDB.

Invariants (see docs/namespace.md):
- A directory is listed with one paginated ``ListObjectsV2(Delimiter='/')`` the first
  time it is looked up or read, and again once its listing is older than the metadata
  TTL. Nothing else ever asks S3 about metadata, so a million small files cost no HEAD.
- Inode numbers are allocated from a persistent counter and bound to (parent, name) in
  LMDB, so they are stable across remounts that use the same cache dir and never reused.
- Only a *complete* listing may delete entries. A failed LIST or HEAD (timeout, 5xx)
  raises :class:`~tierfs.errors.Unavailable` and changes nothing (rclone #9530).
- Entries flagged LOCAL belong to write-back and are never overwritten or removed by a
  listing; the journal decides their fate. So do hard-linked inodes (nlink > 1): the
  record holds the first name, ``ns.links`` the others (docs/namespace.md).
- A key and a prefix with the same name show the directory; the object is logged as
  shadowed. Hostile keys (``..``, empty segments, NUL, >255 bytes) are hidden and counted.

Reads are short LMDB read transactions and may run on the trio loop. Listings run in a
worker thread (S3 calls plus one write transaction per page of 1,000 entries).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any, ParamSpec, TypeVar

import trio

from .. import cacheformat as fmt
from ..errors import NotFound, StoreError
from ..store.objectstore import ObjectInfo, ObjectStore
from . import keys, posixmeta
from .groupcommit import GroupCommit
from .records import (
    ROOT_INO,
    Flag,
    Inode,
    Kind,
    dentry_key,
    ino_key,
    kind_of_mode,
    link_key,
    split_link_key,
    type_bits,
)
from .tombstones import Tombstones

log = logging.getLogger(__name__)

P = ParamSpec("P")
T = TypeVar("T")
RunBlocking = Callable[..., Awaitable[Any]]
ChangeHook = Callable[[Inode, Inode | None], None]  # (old, new or None when deleted); called in a thread
EntryHook = Callable[[int, str], None]  # (parent ino, name) appeared or vanished; called in a thread


@dataclass(frozen=True)
class NamespacePolicy:
    bucket: str
    root_prefix: str
    ttl: float
    uid: int
    gid: int
    file_mode: int
    dir_mode: int


@dataclass
class NamespaceCounters:
    lists: int = 0
    hidden_keys: int = 0
    shadowed_keys: int = 0


def _local_since(node: Inode, started: float) -> bool:
    """Whether a listing that started at ``started`` must leave ``node`` alone.

    LOCAL entries belong to write-back. An entry that write-back settled *after* the listing
    started (``checked`` is set to the settle time) may be newer than what the listing's
    pages show: applying the page would bring back the version our upload just replaced,
    or drop a file whose object the page predates.
    """
    hard_linked = node.nlink > 1 and not node.is_dir  # a directory's nlink counts subdirectories
    return bool(node.flags & Flag.LOCAL) or hard_linked or node.checked > started


@dataclass(frozen=True)
class Unlinked:
    """What removing one name did. ``remaining`` is the record after, when other hard links keep
    the inode: its key is ``key`` unless the removed name was the record's own (``promoted``)."""

    node: Inode  # the record before
    key: str  # the key of the removed name
    remaining: Inode | None = None

    @property
    def promoted(self) -> bool:
        return self.remaining is not None and self.remaining.key != self.node.key


def needs_head(node: Inode) -> bool:
    """A zero-byte object whose headers were never read may be a FIFO, socket or device (its
    type bits are in ``file-permissions``), and it is never opened to read them for free: a
    FIFO's open never reaches us. So these, and only these, cost one HEAD, once."""
    return (
        node.kind is Kind.FILE
        and node.size == 0
        and bool(node.etag)
        and not node.flags & (Flag.META_KNOWN | Flag.LOCAL)
    )


def child_key(parent_prefix: str, name: str, *, is_dir: bool) -> str:
    """The key of entry ``name`` below a directory: the one place local entries get keys."""
    return keys.dir_prefix(parent_prefix, name) if is_dir else keys.file_key(parent_prefix, name)


class Namespace:
    def __init__(
        self,
        env: Any,
        store: ObjectStore,
        policy: NamespacePolicy,
        run_blocking: RunBlocking,
        *,
        clock: Callable[[], float] = time.time,
        spawn: Callable[[Callable[[], Awaitable[None]]], None] | None = None,
        commit: GroupCommit | None = None,
    ) -> None:
        self.env = env
        self.commit = commit or GroupCommit(env)  # record updates (see update)
        self.store = store
        self.policy = policy
        self._run = run_blocking
        self._clock = clock
        self.inodes = env.open_db(fmt.DB_INODES)
        self.dentries = env.open_db(fmt.DB_DENTRIES)
        self.meta = env.open_db(fmt.DB_META)
        self.links = env.open_db(fmt.DB_LINKS)
        self.counters = NamespaceCounters()
        self.change_hooks: list[ChangeHook] = []
        self.entry_hooks: list[EntryHook] = []
        self.attr_hooks: list[Callable[[int], None]] = []  # attributes of an inode changed
        # Keys deleted here (write-back adds and retires them): a listing must not resurrect them.
        self.tombstones = Tombstones(clock)
        self._listing: dict[int, trio.Event] = {}
        # Starts background tasks for listing one level ahead of a walker (see _list_ahead); None: never.
        self.spawn = spawn
        self.list_ahead_limit = trio.CapacityLimiter(4)
        self._ensure_root()

    # -- records -----------------------------------------------------------------------------------

    def _ensure_root(self) -> None:
        with self.env.begin(write=True) as txn:
            if txn.get(ino_key(ROOT_INO), db=self.inodes) is None:
                now = time.time_ns()
                root = Inode(
                    ROOT_INO, Kind.DIR, Flag.NONE, ROOT_INO, 0, now, now,
                    type_bits(Kind.DIR) | self.policy.dir_mode, self.policy.uid, self.policy.gid,
                    0.0, "", self.policy.root_prefix, "", now, 0, 2,
                )  # fmt: skip
                txn.put(ino_key(ROOT_INO), root.pack(), db=self.inodes)
                if txn.get(b"next_ino", db=self.meta) is None:
                    txn.put(b"next_ino", (ROOT_INO + 1).to_bytes(8, "big"), db=self.meta)

    def get(self, ino: int) -> Inode | None:
        with self.env.begin(buffers=True) as txn:
            raw = txn.get(ino_key(ino), db=self.inodes)
            return Inode.unpack(ino, raw) if raw is not None else None

    def child(self, parent: int, name: str) -> Inode | None:
        with self.env.begin(buffers=True) as txn:
            raw_ino = txn.get(dentry_key(parent, name), db=self.dentries)
            if raw_ino is None:
                return None
            ino = int.from_bytes(raw_ino, "big")
            raw = txn.get(ino_key(ino), db=self.inodes)
            return Inode.unpack(ino, raw) if raw is not None else None

    def children(self, parent: int) -> Iterator[tuple[str, int]]:
        """(name, ino) of every entry, in name order. One read transaction, names only."""
        prefix = parent.to_bytes(8, "big")
        out: list[tuple[str, int]] = []
        with self.env.begin(buffers=True) as txn:
            cur = txn.cursor(db=self.dentries)
            if cur.set_range(prefix):
                for k, v in cur:
                    if bytes(k[:8]) != prefix:
                        break
                    out.append((bytes(k[8:]).decode(), int.from_bytes(v, "big")))
        return iter(out)

    def is_fresh(self, inode: Inode) -> bool:
        if inode.checked <= 0:
            return False
        return math.isinf(self.policy.ttl) or self._clock() - inode.checked < self.policy.ttl

    # -- the public async operations ------------------------------------------------------------------

    def _parent_and_child(self, parent: int, name: str) -> tuple[Inode | None, Inode | None]:
        """The records of a directory and of one of its entries, in one read transaction."""
        with self.env.begin(buffers=True) as txn:
            raw = txn.get(ino_key(parent), db=self.inodes)
            if raw is None:
                return None, None
            directory = Inode.unpack(parent, raw)
            raw_ino = txn.get(dentry_key(parent, name), db=self.dentries)
            if raw_ino is None:
                return directory, None
            ino = int.from_bytes(raw_ino, "big")
            raw = txn.get(ino_key(ino), db=self.inodes)
            return directory, Inode.unpack(ino, raw) if raw is not None else None

    async def lookup(self, parent_ino: int, name: str) -> Inode:
        """Resolve one name; lists/revalidates the parent when needed. Raises NotFound/Unavailable.

        A fresh parent (the common, warm case) costs one read transaction for both records,
        not one for the parent's freshness and another for the entry."""
        parent, child = self._parent_and_child(parent_ino, name)
        if parent is None or (parent.is_dir and not self.is_fresh(parent)):
            parent = await self.ensure_listed(parent_ino)
            child = self.child(parent_ino, name) if parent.is_dir else None
        if not parent.is_dir:
            raise NotADirectoryError(parent_ino)
        if child is None:
            raise NotFound(f"{parent.key}{name}")
        if needs_head(child):
            await self.learn_empty([child])
            child = self.child(parent_ino, name) or child
        return child

    async def learn_empty_below(self, directory: Inode) -> None:
        """Before a directory's entries are shown: HEAD its unread zero-byte objects, if its last
        listing found any (``Flag.EMPTY_UNREAD``), so that readdir shows FIFOs as FIFOs. Other
        directories cost nothing here."""
        if not directory.flags & Flag.EMPTY_UNREAD:
            return
        await self.learn_empty(await self._run(self._unread_children, directory.ino))

        def settle_flag() -> None:
            with self.env.begin(write=True) as txn:
                current = self._get_in(txn, directory.ino)
                if current is not None and not any(
                    needs_head(child) for child in self._children_records_in(txn, directory.ino)
                ):
                    cleared = current.with_(flags=current.flags & ~Flag.EMPTY_UNREAD)
                    txn.put(ino_key(directory.ino), cleared.pack(), db=self.inodes)

        await self._run(settle_flag)

    def _children_records_in(self, txn: Any, parent: int) -> Iterator[Inode]:
        for _, ino in self._children_in(txn, parent):
            node = self._get_in(txn, ino)
            if node is not None:
                yield node

    def _unread_children(self, parent: int) -> list[Inode]:
        with self.env.begin(buffers=True) as txn:
            return [node for node in self._children_records_in(txn, parent) if needs_head(node)]

    async def learn_empty(self, nodes: list[Inode]) -> None:
        """HEAD zero-byte objects whose headers were never read, concurrently (see :func:`needs_head`).

        A failed HEAD leaves the entry a regular empty file for now and is tried again next time.
        """

        def head_one(node: Inode) -> None:
            try:
                info = self.store.head(node.key)
            except StoreError as exc:
                log.debug("HEAD of empty object %s failed: %s", node.key, exc)
                return
            self.learn_metadata(node.ino, info, remember=True)

        async with trio.open_nursery() as nursery:
            for node in nodes:
                if needs_head(node):
                    nursery.start_soon(self._run, head_one, node)

    async def ensure_listed(self, ino: int, *, force: bool = False, ahead: bool = True) -> Inode:
        """Return the directory record, after (re)listing it if it is stale or ``force`` is set.

        With ``ahead``, a listing made for a caller also starts background listings of
        the subdirectories it found (one level only), so a tree walk finds them ready:
        ``os.walk`` of a cold tree then waits for about one LIST per level, not per directory.
        """
        listed_since: float | None = None  # the record's ``checked`` before a listing we made or awaited
        while True:
            inode = self.get(ino)
            if inode is None:
                raise NotFound(f"inode {ino}")
            if not inode.is_dir or (self.is_fresh(inode) and not force):
                return inode
            if listed_since is not None and inode.checked > listed_since:
                # A listing ended since the request: as fresh as it gets. Under a TTL of 0 the
                # record is never "fresh", and asking again would relist forever.
                return inode
            listed_since = inode.checked
            pending = self._listing.get(ino)
            if pending is not None:
                await pending.wait()
                force = False  # a listing that started after our request is as good as ours
                continue
            done = self._listing[ino] = trio.Event()
            try:
                await self._run(self._relist, inode)
            finally:
                del self._listing[ino]
                done.set()
            force = False
            if ahead and self.policy.ttl > 0:  # under TTL 0 a listing ahead is stale before it is used
                self._list_ahead(ino)

    def _list_ahead(self, ino: int) -> None:
        if self.spawn is None:
            return
        for _, child_ino in self.children(ino):
            child = self.get(child_ino)
            if child is None or not child.is_dir or self.is_fresh(child) or child_ino in self._listing:
                continue

            async def list_child(target: int = child_ino) -> None:
                async with self.list_ahead_limit:
                    try:
                        await self.ensure_listed(target, ahead=False)
                    except (StoreError, OSError) as exc:
                        log.debug("listing ahead of inode %d failed: %s", target, exc)

            self.spawn(list_child)

    async def walk(self, root: Inode, *, force: bool = False) -> AsyncIterator[tuple[str, Inode]]:
        """Every entry at and below ``root`` as (path relative to it, record), depth first, names in
        order; each directory is listed (``ensure_listed``, ``force`` to relist) before its entries."""
        stack = [("", root)]
        while stack:
            rel, node = stack.pop()
            yield rel, node
            if not node.is_dir:
                continue
            await self.ensure_listed(node.ino, force=force)
            for name, ino in reversed(list(self.children(node.ino))):
                child = self.get(ino)
                if child is not None:
                    stack.append((f"{rel}/{name}".lstrip("/"), child))

    # -- listing (worker thread) -----------------------------------------------------------------------

    def _relist(self, directory: Inode) -> None:
        started = self._clock()
        seen: set[str] = set()
        hidden: set[str] = set()  # names of tombstoned keys: neither added nor removed here
        deferred_files: dict[str, ObjectInfo] = {}
        changes: list[tuple[Inode, Inode | None]] = []
        before = {name for name, _ in self.children(directory.ino)} if directory.checked > 0 else None
        marker = False
        empty_unread = False
        self.counters.lists += 1
        for page in self.store.list_dir(directory.key):
            with self.env.begin(write=True) as txn:
                for prefix in page.prefixes:
                    name = self._visible_name(directory.key, prefix, started, hidden)
                    if name is not None:
                        self._apply_dir(txn, directory, name, seen, changes, started)
                for obj in page.objects:
                    if obj.key == directory.key:
                        marker = True
                        continue
                    name = self._visible_name(directory.key, obj.key, started, hidden)
                    if name is None:
                        continue
                    if name in seen:
                        self._shadowed(obj.key)
                        continue
                    existing = self._child_in(txn, directory.ino, name)
                    if existing is not None and existing.is_dir and not _local_since(existing, started):
                        deferred_files[name] = obj  # its prefix may come on a later page
                        continue
                    self._apply_file(txn, directory, name, obj, existing, changes, started)
                    seen.add(name)
                    changed = existing is None or existing.etag != obj.etag or needs_head(existing)
                    if obj.size == 0 and changed:
                        empty_unread = True
        with self.env.begin(write=True) as txn:
            for name, obj in deferred_files.items():
                if name in seen:
                    self._shadowed(obj.key)
                    continue
                existing = self._child_in(txn, directory.ino, name)
                self._apply_file(txn, directory, name, obj, existing, changes, started)
                seen.add(name)
            for name, ino in list(self._children_in(txn, directory.ino)):
                if name in seen:
                    continue
                gone = self._get_in(txn, ino)
                if gone is None or name in hidden or _local_since(gone, started):
                    continue
                self._remove_subtree(txn, directory.ino, name, gone, changes)
            current = self._get_in(txn, directory.ino) or directory
            flags = (current.flags | Flag.MARKER) if marker else (current.flags & ~Flag.MARKER)
            flags = (flags | Flag.EMPTY_UNREAD) if empty_unread else flags
            txn.put(
                ino_key(directory.ino), current.with_(checked=started, flags=flags).pack(), db=self.inodes
            )
        self._notify(changes)
        if before is not None:
            # The kernel may hold negative dentries for new names and positive ones for
            # vanished names; both must go so that NEW and DELETED show within the TTL.
            for name in before.symmetric_difference(seen):
                for entry_hook in self.entry_hooks:
                    entry_hook(directory.ino, name)

    def _visible_name(self, dir_key: str, key: str, started: float, hidden: set[str]) -> str | None:
        """The entry name of ``key``, or None for a key this listing must not apply.

        A tombstoned key is recorded in ``hidden``: the bucket's word on it is out of date in
        both directions, so the listing neither adds it nor removes a local entry of that name.
        """
        if self.tombstones.hides(key, started):
            hidden_name = keys.child_name(dir_key, key)
            if hidden_name is not None:
                hidden.add(hidden_name)
            return None
        if keys.is_own_key(dir_key, key):
            return None  # tierfs's own objects (snapshot manifests): not data, not counted
        name = keys.child_name(dir_key, key)
        if name is None:
            self.counters.hidden_keys += 1
            log.info("hiding key %r: not representable as a POSIX name", key)
        return name

    def _shadowed(self, key: str) -> None:
        self.counters.shadowed_keys += 1
        log.warning("object %r is shadowed by a directory of the same name", key)

    def _apply_dir(
        self,
        txn: Any,
        parent: Inode,
        name: str,
        seen: set[str],
        changes: list[tuple[Inode, Inode | None]],
        started: float,
    ) -> None:
        existing = self._child_in(txn, parent.ino, name)
        if existing is not None and not existing.is_dir:
            if _local_since(existing, started):
                seen.add(name)
                return
            if name in seen:
                self._shadowed(existing.key)
            self._remove_subtree(txn, parent.ino, name, existing, changes)
            existing = None
        seen.add(name)
        if existing is None:
            now = time.time_ns()
            self._insert(
                txn, parent.ino, name, Kind.DIR, size=0, mtime_ns=now,
                key=child_key(parent.key, name, is_dir=True), etag="",
            )

    def _apply_file(
        self,
        txn: Any,
        parent: Inode,
        name: str,
        obj: ObjectInfo,
        existing: Inode | None,
        changes: list[tuple[Inode, Inode | None]],
        started: float,
    ) -> None:
        now = self._clock()
        if existing is None:
            self._insert(
                txn, parent.ino, name, Kind.FILE, obj.size, obj.mtime_ns, obj.key, obj.etag, checked=now
            )
            return
        if _local_since(existing, started):
            return
        if existing.is_dir:
            self._remove_subtree(txn, parent.ino, name, existing, changes)
            self._insert(
                txn, parent.ino, name, Kind.FILE, obj.size, obj.mtime_ns, obj.key, obj.etag, checked=now
            )
            return
        if existing.etag == obj.etag and existing.size == obj.size:
            return  # unchanged: no write, the listing time lives on the directory
        updated = existing.with_(
            size=obj.size,
            etag=obj.etag,
            mtime_ns=obj.mtime_ns,
            flags=existing.flags & ~Flag.META_KNOWN,
            kind=Kind.FILE,  # until its headers are read again: a symlink or FIFO may be data now
            rdev=0,
            ctime_ns=0,  # changed elsewhere: ctime follows mtime, as for every foreign object
            mode=type_bits(Kind.FILE) | self.policy.file_mode,
            uid=self.policy.uid,
            gid=self.policy.gid,
            checked=now,
        )
        txn.put(ino_key(existing.ino), updated.pack(), db=self.inodes)
        changes.append((existing, updated))

    def _insert(
        self,
        txn: Any,
        parent: int,
        name: str,
        kind: Kind,
        size: int,
        mtime_ns: int,
        key: str,
        etag: str,
        *,
        checked: float = 0.0,
        mode: int | None = None,
        uid: int | None = None,
        gid: int | None = None,
        flags: Flag = Flag.NONE,
        rdev: int = 0,
        ctime_ns: int = 0,
    ) -> Inode:
        ino = int.from_bytes(txn.get(b"next_ino", db=self.meta), "big")
        txn.put(b"next_ino", (ino + 1).to_bytes(8, "big"), db=self.meta)
        perm = self.policy.dir_mode if kind is Kind.DIR else self.policy.file_mode
        inode = Inode(
            ino, kind, flags, parent, size, mtime_ns, mtime_ns,
            mode if mode is not None else type_bits(kind) | perm,
            self.policy.uid if uid is None else uid, self.policy.gid if gid is None else gid,
            checked, name, key, etag, ctime_ns, rdev, 2 if kind is Kind.DIR else 1,
        )  # fmt: skip
        txn.put(ino_key(ino), inode.pack(), db=self.inodes)
        txn.put(dentry_key(parent, name), ino_key(ino), db=self.dentries)
        if kind is Kind.DIR:
            self._count_subdir_in(txn, parent, +1)
        return inode

    def _count_subdir_in(self, txn: Any, ino: int, delta: int) -> None:
        """A directory's nlink is 2 + its subdirectories (each one's ``..``), as on ext4."""
        node = self._get_in(txn, ino)
        if node is not None and node.is_dir:
            txn.put(ino_key(ino), node.with_(nlink=max(2, node.nlink + delta)).pack(), db=self.inodes)

    def _remove_subtree(
        self, txn: Any, parent: int, name: str, inode: Inode, changes: list[tuple[Inode, Inode | None]]
    ) -> None:
        """Forget an entry that a complete listing no longer shows, and everything below it."""
        stack = [(parent, name, inode)]
        while stack:
            p, n, node = stack.pop()
            if node.is_dir:
                for child_name, child_ino in list(self._children_in(txn, node.ino)):
                    child = self._get_in(txn, child_ino)
                    if child is not None:
                        stack.append((node.ino, child_name, child))
            elif not self.is_own_name(node, p, n):  # an extra hard link: the inode keeps its other names
                txn.delete(dentry_key(p, n), db=self.dentries)
                txn.delete(link_key(node.ino, p, n), db=self.links)
                current = self._get_in(txn, node.ino)
                if current is not None:
                    fewer = current.with_(nlink=max(1, current.nlink - 1))
                    txn.put(ino_key(node.ino), fewer.pack(), db=self.inodes)
                continue
            txn.delete(dentry_key(p, n), db=self.dentries)
            txn.delete(ino_key(node.ino), db=self.inodes)
            if node.is_dir:
                self._count_subdir_in(txn, p, -1)
            changes.append((node, None))

    # -- helpers inside a transaction ---------------------------------------------------------------

    def _get_in(self, txn: Any, ino: int) -> Inode | None:
        raw = txn.get(ino_key(ino), db=self.inodes)
        return Inode.unpack(ino, raw) if raw is not None else None

    def _child_in(self, txn: Any, parent: int, name: str) -> Inode | None:
        raw_ino = txn.get(dentry_key(parent, name), db=self.dentries)
        return self._get_in(txn, int.from_bytes(raw_ino, "big")) if raw_ino is not None else None

    def _children_in(self, txn: Any, parent: int) -> Iterator[tuple[str, int]]:
        prefix = parent.to_bytes(8, "big")
        cur = txn.cursor(db=self.dentries)
        if not cur.set_range(prefix):
            return
        for k, v in cur:
            if bytes(k[:8]) != prefix:
                return
            yield bytes(k[8:]).decode(), int.from_bytes(v, "big")

    def _notify(self, changes: list[tuple[Inode, Inode | None]]) -> None:
        for old, new in changes:
            for hook in self.change_hooks:
                try:
                    hook(old, new)
                except Exception:
                    log.exception("change hook failed for %s", old.key)

    # -- updates from data reads ----------------------------------------------------------------------

    def learn_metadata(self, ino: int, info: ObjectInfo, *, remember: bool = False) -> None:
        """Apply POSIX headers that a GET/HEAD returned (blocking; call from a thread).

        Headers are free with the first GET of an object, so attributes of files that
        have been read are exact without any HEAD; see docs/namespace.md. Objects without
        headers cost no write at all, unless ``remember`` (the HEAD of an empty object,
        which is never repeated) asks for the record to say they were read.
        """
        if info.metadata is None:
            return
        node = self.get(ino)
        if node is None or node.flags & (Flag.META_KNOWN | Flag.LOCAL) or node.etag != info.etag:
            return
        attrs = posixmeta.resolve(
            posixmeta.decode(info.metadata),
            is_dir=node.is_dir,
            size=node.size,
            default_uid=self.policy.uid,
            default_gid=self.policy.gid,
            default_file_mode=self.policy.file_mode,
            default_dir_mode=self.policy.dir_mode,
            fallback_mtime_ns=node.mtime_ns,
        )
        kind = node.kind if node.is_dir else kind_of_mode(attrs.mode)
        changes = {
            "kind": kind,
            "mode": attrs.mode,
            "uid": attrs.uid,
            "gid": attrs.gid,
            "mtime_ns": attrs.mtime_ns,
            "rdev": attrs.rdev,
        }
        if not remember and all(getattr(node, k) == v for k, v in changes.items()):
            return  # no headers beyond what the listing gave: spare the commit (and its fsync)
        with self.env.begin(write=True) as txn:
            current = self._get_in(txn, ino)
            if current is None or current.etag != info.etag or current.flags & Flag.LOCAL:
                return
            updated = current.with_(
                **changes, atime_ns=attrs.atime_ns or attrs.mtime_ns, flags=current.flags | Flag.META_KNOWN
            )
            txn.put(ino_key(ino), updated.pack(), db=self.inodes)
        for hook in self.attr_hooks:
            hook(ino)

    # -- local mutations (write-back) -------------------------------------------------------------------
    # These run in worker threads: each is one short write transaction.

    def create(
        self,
        parent: Inode,
        name: str,
        kind: Kind,
        *,
        mode: int,
        uid: int,
        gid: int,
        size: int = 0,
        rdev: int = 0,
    ) -> Inode:
        """Add a LOCAL entry (created here; write-back will make it an object); the parent's
        mtime and ctime change in the same transaction."""
        now = time.time_ns()
        key = child_key(parent.key, name, is_dir=kind is Kind.DIR)
        with self.env.begin(write=True) as txn:
            if self._child_in(txn, parent.ino, name) is not None:
                raise FileExistsError(name)
            checked = self._clock() if kind is Kind.DIR else 0.0  # a new directory is complete as it is
            node = self._insert(
                txn, parent.ino, name, kind, size, now, key, "",
                checked=checked, mode=mode, uid=uid, gid=gid, flags=Flag.LOCAL | Flag.META_KNOWN, rdev=rdev,
                ctime_ns=now,
            )  # fmt: skip
            self._touch_in(txn, parent.ino, now)
            return node

    def _touch_in(self, txn: Any, ino: int, now: int, *, mtime: bool = True) -> None:
        """A directory's entries changed (or an inode's metadata did): its ctime, and mtime, become now."""
        node = self._get_in(txn, ino)
        if node is not None:
            changed = node.with_(ctime_ns=now, mtime_ns=now) if mtime else node.with_(ctime_ns=now)
            txn.put(ino_key(ino), changed.pack(), db=self.inodes)

    def put(self, inode: Inode) -> None:
        with self.env.begin(write=True) as txn:
            txn.put(ino_key(inode.ino), inode.pack(), db=self.inodes)

    def update(self, ino: int, **changes: object) -> Inode | None:
        """Read-modify-write of one record in one transaction; None if it is gone.

        Goes through the group committer: updates made at the same moment (uploads settling
        together) share a transaction and a flush with each other and with the journal's.
        """

        return self._rewrite(ino, lambda node: node.with_(**changes))

    def record_write(self, ino: int, size: int, written_ns: int | None) -> Inode | None:
        """A writer's close: its size, and the time of its last write as the mtime, in one
        transaction. The ctime becomes that time unless the record's is later already: a chmod
        that ran between the last write and the close (RELEASE comes after close(2) returns)
        keeps its later ctime, as a read-then-update in two steps would not."""
        if written_ns is None:
            return self.update(ino, size=size)
        at = written_ns

        def written(node: Inode) -> Inode:
            return node.with_(size=size, mtime_ns=at, ctime_ns=max(at, node.ctime_ns))

        return self._rewrite(ino, written)

    def _rewrite(self, ino: int, change: Callable[[Inode], Inode]) -> Inode | None:
        """The record made from the current one by ``change``, written in the transaction that read
        it (through the group committer); None if it is gone."""

        def apply(txn: Any) -> Inode | None:
            node = self._get_in(txn, ino)
            if node is None:
                return None
            node = change(node)
            txn.put(ino_key(ino), node.pack(), db=self.inodes)
            return node

        return self.commit.run(apply)

    def settle(self, ino: int, **changes: object) -> Inode | None:
        """Write-back's update after the bucket took a change: marks the record as settled now.

        A listing that started before this moment leaves the record alone (``_local_since``).
        """
        return self.update(ino, checked=self._clock(), **changes)

    def is_own_name(self, node: Inode, parent: int, name: str) -> bool:
        """Whether (parent, name) is the name the record carries, not one of its extra hard links."""
        return node.parent == parent and node.name == name

    def _link_names_in(self, txn: Any, ino: int) -> list[tuple[int, str]]:
        prefix = ino_key(ino)
        out: list[tuple[int, str]] = []
        cur = txn.cursor(db=self.links)
        if cur.set_range(prefix):
            for k in cur.iternext(values=False):
                if bytes(k[:8]) != prefix:
                    break
                _, parent, name = split_link_key(bytes(k))
                out.append((parent, name))
        return out

    def link_keys(self, ino: int) -> list[str]:
        """The keys of the extra names of a hard-linked inode (each is exported as its own object)."""
        with self.env.begin(buffers=True) as txn:
            out: list[str] = []
            for parent, name in self._link_names_in(txn, ino):
                directory = self._get_in(txn, parent)
                if directory is not None:
                    out.append(child_key(directory.key, name, is_dir=False))
            return out

    def link(self, node: Inode, new_parent: Inode, new_name: str) -> Inode:
        """link(2): one more name for ``node``; its nlink and ctime, and the directory's times, change."""
        now = time.time_ns()
        with self.env.begin(write=True) as txn:
            if self._child_in(txn, new_parent.ino, new_name) is not None:
                raise FileExistsError(new_name)
            current = self._get_in(txn, node.ino)
            if current is None:
                raise FileNotFoundError(node.name)
            txn.put(dentry_key(new_parent.ino, new_name), ino_key(node.ino), db=self.dentries)
            txn.put(link_key(node.ino, new_parent.ino, new_name), b"", db=self.links)
            linked = current.with_(nlink=current.nlink + 1, ctime_ns=now)
            txn.put(ino_key(node.ino), linked.pack(), db=self.inodes)
            self._touch_in(txn, new_parent.ino, now)
            return linked

    def remove(self, parent: int, name: str) -> Unlinked | None:
        """Unlink one name (a directory must be empty); None if there is no such entry.

        The inode goes with its last name. While other hard links remain, removing the
        record's own name moves the record to one of them (``Unlinked.promoted``).
        """
        now = time.time_ns()
        with self.env.begin(write=True) as txn:
            node = self._child_in(txn, parent, name)
            if node is None:
                return None
            if node.is_dir and next(iter(self._children_in(txn, node.ino)), None) is not None:
                raise OSError(39, "Directory not empty")  # ENOTEMPTY
            txn.delete(dentry_key(parent, name), db=self.dentries)
            self._touch_in(txn, parent, now)
            directory = self._get_in(txn, parent)
            key = child_key(directory.key if directory else "", name, is_dir=node.is_dir)
            if node.is_dir:
                self._count_subdir_in(txn, parent, -1)
            if node.nlink <= 1 or node.is_dir:
                txn.delete(ino_key(node.ino), db=self.inodes)
                return Unlinked(node, node.key)
            remaining = node.with_(nlink=node.nlink - 1, ctime_ns=now)
            if self.is_own_name(node, parent, name):
                links = self._link_names_in(txn, node.ino)
                new_parent, new_name = links[0]
                txn.delete(link_key(node.ino, new_parent, new_name), db=self.links)
                target = self._get_in(txn, new_parent)
                remaining = remaining.with_(
                    parent=new_parent, name=new_name, flags=remaining.flags | Flag.LOCAL,
                    key=child_key(target.key if target else "", new_name, is_dir=False),
                )  # fmt: skip
            else:
                txn.delete(link_key(node.ino, parent, name), db=self.links)
            txn.put(ino_key(node.ino), remaining.pack(), db=self.inodes)
            return Unlinked(node, key, remaining)

    def rename_link(
        self, node: Inode, old_parent: Inode, old_name: str, new_parent: Inode, new_name: str
    ) -> str:
        """Move an extra hard-link name (the record keeps its own); returns the new name's key."""
        now = time.time_ns()
        with self.env.begin(write=True) as txn:
            txn.delete(dentry_key(old_parent.ino, old_name), db=self.dentries)
            txn.delete(link_key(node.ino, old_parent.ino, old_name), db=self.links)
            txn.put(dentry_key(new_parent.ino, new_name), ino_key(node.ino), db=self.dentries)
            txn.put(link_key(node.ino, new_parent.ino, new_name), b"", db=self.links)
            for ino in {old_parent.ino, new_parent.ino}:
                self._touch_in(txn, ino, now)
            self._touch_in(txn, node.ino, now, mtime=False)
        return child_key(new_parent.key, new_name, is_dir=False)

    def rename(self, old_parent: Inode, old_name: str, new_parent: Inode, new_name: str) -> tuple[Inode, str]:
        """Move an entry (and, for a directory, rewrite the keys of everything below it).

        The caller has already removed any target entry. Returns the moved inode and
        its old key. Bucket changes are the write-back journal's business. The moved
        inode's ctime and both directories' mtime and ctime become now.
        """
        now = time.time_ns()
        with self.env.begin(write=True) as txn:
            node = self._child_in(txn, old_parent.ino, old_name)
            if node is None:
                raise FileNotFoundError(old_name)
            old_key = node.key
            new_key = child_key(new_parent.key, new_name, is_dir=node.is_dir)
            txn.delete(dentry_key(old_parent.ino, old_name), db=self.dentries)
            txn.put(dentry_key(new_parent.ino, new_name), ino_key(node.ino), db=self.dentries)
            for ino in {old_parent.ino, new_parent.ino}:
                self._touch_in(txn, ino, now)
            if node.is_dir and old_parent.ino != new_parent.ino:
                self._count_subdir_in(txn, old_parent.ino, -1)
                self._count_subdir_in(txn, new_parent.ino, +1)
            # Moved entries are LOCAL until write-back has copied them: a listing of the
            # new place must not drop them while the bucket does not show them yet.
            moved = node.with_(
                parent=new_parent.ino, name=new_name, key=new_key, flags=node.flags | Flag.LOCAL, ctime_ns=now
            )
            txn.put(ino_key(node.ino), moved.pack(), db=self.inodes)
            if node.is_dir:
                stack = [node.ino]
                while stack:
                    directory = stack.pop()
                    for _, child_ino in list(self._children_in(txn, directory)):
                        child = self._get_in(txn, child_ino)
                        if child is None or child.parent != directory:
                            continue  # an extra hard link: its key follows its directory's (link_keys)
                        relocated = child.with_(
                            key=new_key + child.key[len(old_key) :], flags=child.flags | Flag.LOCAL
                        )
                        txn.put(ino_key(child_ino), relocated.pack(), db=self.inodes)
                        if child.is_dir:
                            stack.append(child_ino)
            return moved, old_key

    def path_of_key(self, key: str) -> Inode | None:
        """The local entry for a bucket key, walking only what LMDB already knows (no S3)."""
        node = self.get(ROOT_INO)
        rest = key[len(self.policy.root_prefix) :]
        for part in [p for p in rest.split("/") if p]:
            if node is None:
                return None
            node = self.child(node.ino, part)
        return node
