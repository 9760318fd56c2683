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
  listing; the journal decides their fate.
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

from ..errors import NotFound, StoreError
from ..store.objectstore import ObjectInfo, ObjectStore
from . import keys, posixmeta
from .groupcommit import GroupCommit
from .records import ROOT_INO, Flag, Inode, Kind, dentry_key, ino_key, type_bits
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
    return bool(node.flags & Flag.LOCAL) or node.checked > started


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
        self.inodes = env.open_db(b"ns.inodes")
        self.dentries = env.open_db(b"ns.dentries")
        self.meta = env.open_db(b"meta")
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
                    0.0, "", self.policy.root_prefix, "",
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

    async def lookup(self, parent_ino: int, name: str) -> Inode:
        """Resolve one name; lists/revalidates the parent when needed. Raises NotFound/Unavailable."""
        parent = await self.ensure_listed(parent_ino)
        if not parent.is_dir:
            raise NotADirectoryError(parent_ino)
        child = self.child(parent_ino, name)
        if child is None:
            raise NotFound(f"{parent.key}{name}")
        return child

    async def ensure_listed(self, ino: int, *, force: bool = False, ahead: bool = True) -> Inode:
        """Return the directory record, after (re)listing it if it is stale or ``force`` is set.

        With ``ahead``, a listing made for a caller also starts background listings of
        the subdirectories it found (one level only), so a tree walk finds them ready:
        ``os.walk`` of a cold tree then waits for about one LIST per level, not per directory.
        """
        while True:
            inode = self.get(ino)
            if inode is None:
                raise NotFound(f"inode {ino}")
            if not inode.is_dir or (self.is_fresh(inode) and not force):
                return inode
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
            if ahead:
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
    ) -> Inode:
        ino = int.from_bytes(txn.get(b"next_ino", db=self.meta), "big")
        txn.put(b"next_ino", (ino + 1).to_bytes(8, "big"), db=self.meta)
        perm = self.policy.dir_mode if kind is Kind.DIR else self.policy.file_mode
        inode = Inode(
            ino, kind, flags, parent, size, mtime_ns, mtime_ns,
            mode if mode is not None else type_bits(kind) | perm,
            self.policy.uid if uid is None else uid, self.policy.gid if gid is None else gid,
            checked, name, key, etag,
        )  # fmt: skip
        txn.put(ino_key(ino), inode.pack(), db=self.inodes)
        txn.put(dentry_key(parent, name), ino_key(ino), db=self.dentries)
        return inode

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
            txn.delete(dentry_key(p, n), db=self.dentries)
            txn.delete(ino_key(node.ino), db=self.inodes)
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

    def learn_metadata(self, ino: int, info: ObjectInfo) -> None:
        """Apply POSIX headers that a GET/HEAD returned (blocking; call from a thread).

        Headers are free with the first GET of an object, so attributes of files that
        have been read are exact without any HEAD; see docs/namespace.md. Objects without
        headers cost no write at all.
        """
        if info.metadata is None:
            return
        node = self.get(ino)
        if node is None or node.flags & (Flag.META_KNOWN | Flag.LOCAL) or node.etag != info.etag:
            return
        attrs = posixmeta.resolve(
            posixmeta.decode(info.metadata),
            is_dir=node.is_dir,
            default_uid=self.policy.uid,
            default_gid=self.policy.gid,
            default_file_mode=self.policy.file_mode,
            default_dir_mode=self.policy.dir_mode,
            fallback_mtime_ns=node.mtime_ns,
        )
        kind = Kind.SYMLINK if attrs.mode & 0o170000 == 0o120000 else node.kind
        changes = {
            "kind": kind,
            "mode": attrs.mode,
            "uid": attrs.uid,
            "gid": attrs.gid,
            "mtime_ns": attrs.mtime_ns,
        }
        if all(getattr(node, k) == v for k, v in changes.items()):
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
        self, parent: Inode, name: str, kind: Kind, *, mode: int, uid: int, gid: int, size: int = 0
    ) -> Inode:
        """Add a LOCAL entry (created here; write-back will make it an object)."""
        now = time.time_ns()
        key = child_key(parent.key, name, is_dir=kind is Kind.DIR)
        with self.env.begin(write=True) as txn:
            if self._child_in(txn, parent.ino, name) is not None:
                raise FileExistsError(name)
            checked = self._clock() if kind is Kind.DIR else 0.0  # a new directory is complete as it is
            return self._insert(
                txn, parent.ino, name, kind, size, now, key, "",
                checked=checked, mode=mode, uid=uid, gid=gid, flags=Flag.LOCAL | Flag.META_KNOWN,
            )  # fmt: skip

    def put(self, inode: Inode) -> None:
        with self.env.begin(write=True) as txn:
            txn.put(ino_key(inode.ino), inode.pack(), db=self.inodes)

    def update(self, ino: int, **changes: object) -> Inode | None:
        """Read-modify-write of one record in one transaction; None if it is gone.

        Goes through the group committer: updates made at the same moment (uploads settling
        together) share a transaction and a flush with each other and with the journal's.
        """

        def apply(txn: Any) -> Inode | None:
            node = self._get_in(txn, ino)
            if node is None:
                return None
            node = node.with_(**changes)
            txn.put(ino_key(ino), node.pack(), db=self.inodes)
            return node

        return self.commit.run(apply)

    def settle(self, ino: int, **changes: object) -> Inode | None:
        """Write-back's update after the bucket took a change: marks the record as settled now.

        A listing that started before this moment leaves the record alone (``_local_since``).
        """
        return self.update(ino, checked=self._clock(), **changes)

    def remove(self, parent: int, name: str) -> Inode | None:
        """Unlink one entry (a directory must be empty); returns what was removed."""
        with self.env.begin(write=True) as txn:
            node = self._child_in(txn, parent, name)
            if node is None:
                return None
            if node.is_dir and next(iter(self._children_in(txn, node.ino)), None) is not None:
                raise OSError(39, "Directory not empty")  # ENOTEMPTY
            txn.delete(dentry_key(parent, name), db=self.dentries)
            txn.delete(ino_key(node.ino), db=self.inodes)
            return node

    def rename(self, old_parent: Inode, old_name: str, new_parent: Inode, new_name: str) -> tuple[Inode, str]:
        """Move an entry (and, for a directory, rewrite the keys of everything below it).

        The caller has already removed any target entry. Returns the moved inode and
        its old key. Bucket changes are the write-back journal's business.
        """
        with self.env.begin(write=True) as txn:
            node = self._child_in(txn, old_parent.ino, old_name)
            if node is None:
                raise FileNotFoundError(old_name)
            old_key = node.key
            new_key = child_key(new_parent.key, new_name, is_dir=node.is_dir)
            txn.delete(dentry_key(old_parent.ino, old_name), db=self.dentries)
            txn.put(dentry_key(new_parent.ino, new_name), ino_key(node.ino), db=self.dentries)
            # Moved entries are LOCAL until write-back has copied them: a listing of the
            # new place must not drop them while the bucket does not show them yet.
            moved = node.with_(
                parent=new_parent.ino, name=new_name, key=new_key, flags=node.flags | Flag.LOCAL
            )
            txn.put(ino_key(node.ino), moved.pack(), db=self.inodes)
            if node.is_dir:
                stack = [node.ino]
                while stack:
                    for _, child_ino in list(self._children_in(txn, stack.pop())):
                        child = self._get_in(txn, child_ino)
                        if child is None:
                            continue
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
