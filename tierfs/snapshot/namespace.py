"""The read-only namespace of a snapshot mount, served from the manifest alone (no LIST, ever).

Inode numbers are the manifest's ordinals plus 2 (the root is 1), so they need no table: the
same snapshot has the same numbers on every node and after every remount, and ``getattr`` is
a bisect over the footer plus a decoded page. Directory entries are the contiguous run of rows
below the directory's key; a subdirectory's own run is skipped with one ``lower_bound``.

The rules of a mount still hold: hidden keys never appear (the manifest has none), and a
directory shadows a file of the same name (docs/namespace.md). Lookups read pages already
local on the loop and fetch a missing page in a worker thread (through ``run_blocking``, the
S3 limiter); listing a directory runs in a worker thread.
"""

from __future__ import annotations

import functools
import math
import stat
import threading
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

from ..errors import NotFound, Unavailable
from ..meta import keys
from ..meta.records import ROOT_INO, Flag, Inode, Kind, type_bits
from .format import ETAG, GID, KEY, KIND, MODE, MTIME, PARENT, SIZE, UID, VERSION, Row
from .manifest import Manifest, PageMissing

T = TypeVar("T")
RunBlocking = Callable[..., Awaitable[Any]]
FIRST_INO = ROOT_INO + 1
LISTINGS_KEPT = 16  # directories whose entry lists are kept (opendir takes its own copy)
RETRIES = 64  # page fetches one lookup may need (depth of a path is far less)
_KINDS = {1: Kind.FILE, 2: Kind.DIR, 3: Kind.SYMLINK, 4: Kind.SPECIAL}


@dataclass
class SnapshotCounters:
    hidden_keys: int = 0
    shadowed_keys: int = 0


@dataclass(frozen=True)
class Defaults:
    """The mount's attributes for entries whose POSIX metadata the snapshot does not know."""

    uid: int
    gid: int
    file_mode: int
    dir_mode: int


def _successor(dir_key: str) -> str:
    """The smallest key after every key below ``dir_key`` (which ends in '/')."""
    return dir_key[:-1] + chr(ord("/") + 1)


class SnapshotNamespace:
    """A :class:`tierfs.meta.view.NamespaceView` over a :class:`Manifest`."""

    def __init__(
        self, manifest: Manifest, prefix: str, defaults: Defaults, run_blocking: RunBlocking
    ) -> None:
        self.manifest = manifest
        self.prefix = prefix
        self.defaults = defaults
        self._run = run_blocking
        self.counters = SnapshotCounters(hidden_keys=manifest.footer.hidden_keys)
        self._listings: OrderedDict[int, list[tuple[str, int]]] = OrderedDict()
        self._lock = threading.Lock()
        self._default_modes = {
            kind: type_bits(kind) | (defaults.dir_mode if kind is Kind.DIR else defaults.file_mode)
            for kind in (Kind.FILE, Kind.DIR, Kind.SYMLINK)
        } | {Kind.SPECIAL: defaults.file_mode}
        created = manifest.footer.created_ns
        self.root = Inode(
            ROOT_INO, Kind.DIR, Flag.NONE, ROOT_INO, 0, created, created, stat.S_IFDIR | defaults.dir_mode,
            defaults.uid, defaults.gid, math.inf, "", prefix, "", created, 0, 2,
        )  # fmt: skip

    # -- records ----------------------------------------------------------------------------------------

    def _inode(self, ordinal: int, row: Row) -> Inode:
        kind = _KINDS[row[KIND]]
        rel: str = row[KEY]
        mode = row[MODE] or self._default_modes[kind]
        uid, gid = row[UID], row[GID]
        name = rel[rel.rfind("/", 0, -1) + 1 : -1] if rel[-1] == "/" else rel[rel.rfind("/") + 1 :]
        return Inode(
            ordinal + FIRST_INO, kind, Flag.META_KNOWN if row[MODE] else Flag.NONE,
            row[PARENT] + FIRST_INO if row[PARENT] >= 0 else ROOT_INO, row[SIZE], row[MTIME], row[MTIME],
            mode, self.defaults.uid if uid < 0 else uid, self.defaults.gid if gid < 0 else gid, math.inf,
            name, self.prefix + rel, row[ETAG], 0, 0, 2 if kind is Kind.DIR else 1,
        )  # fmt: skip

    def _dir_key(self, ino: int, *, fetch: bool) -> str | None:
        """The manifest key of directory ``ino`` ("" for the root), or None if it is not one."""
        if ino == ROOT_INO:
            return ""
        row = self.manifest.row(ino - FIRST_INO, fetch=fetch)
        return str(row[KEY]) if row[KEY].endswith("/") else None

    def record(self, ino: int, *, fetch: bool = False) -> Inode | None:
        """The inode (None: no such number); PageMissing when its page is not local and not ``fetch``."""
        if ino == ROOT_INO:
            return self.root
        ordinal = ino - FIRST_INO
        if not 0 <= ordinal < self.manifest.footer.entries:
            return None
        return self._inode(ordinal, self.manifest.row(ordinal, fetch=fetch))

    def get(self, ino: int) -> Inode | None:
        """The kernel only knows inodes it was given by lookup or readdir, whose pages are local;
        a page missing now (its local copy went bad) is an I/O error, not a fetch on the loop."""
        try:
            return self.record(ino)
        except PageMissing:
            raise Unavailable(f"snapshot manifest page of inode {ino} is not local") from None

    def version_id(self, ino: int) -> str:
        """The version id that pins ``ino``'s bytes on a versioned bucket ("" otherwise)."""
        if ino == ROOT_INO:
            return ""
        return str(self.manifest.row(ino - FIRST_INO)[VERSION])

    def _find_child(self, parent: int, name: str, *, fetch: bool) -> Inode | None:
        if keys.name_problem(name) is not None:
            return None
        dir_key = self._dir_key(parent, fetch=fetch)
        if dir_key is None:
            raise NotADirectoryError(parent)
        for key in (dir_key + name + "/", dir_key + name):  # a directory shadows a file
            ordinal = self.manifest.find(key, fetch=fetch)
            if ordinal is not None:
                return self._inode(ordinal, self.manifest.row(ordinal, fetch=fetch))
        return None

    def child(self, parent: int, name: str) -> Inode | None:
        try:
            return self._find_child(parent, name, fetch=False)
        except PageMissing:
            return None

    async def _with_pages(self, fn: Callable[[], T]) -> T:
        """``fn`` on local pages; each page it misses is fetched in a worker thread, then again."""
        for _ in range(RETRIES):
            try:
                return fn()
            except PageMissing as missing:
                await self._run(functools.partial(self.manifest.page, missing.index, fetch=True))
        raise Unavailable("snapshot manifest: a lookup needed more pages than expected")

    async def lookup(self, parent_ino: int, name: str) -> Inode:
        node = await self._with_pages(lambda: self._find_child(parent_ino, name, fetch=False))
        if node is None:
            raise NotFound(f"{name} in snapshot directory {parent_ino}")
        return node

    # -- directories ------------------------------------------------------------------------------------

    def _list_blocking(self, ino: int) -> list[tuple[str, int]]:
        """(name, ino) of a directory's entries, fetching pages as needed (a worker thread)."""
        dir_key = self._dir_key(ino, fetch=True)
        if dir_key is None:
            return []
        manifest = self.manifest
        entries = manifest.footer.entries
        ordinal = 0 if ino == ROOT_INO else ino - FIRST_INO + 1
        files: list[tuple[str, int]] = []
        dirs: list[tuple[str, int]] = []
        while ordinal < entries:
            key: str = manifest.row(ordinal, fetch=True)[KEY]
            if not key.startswith(dir_key):
                break
            if key.endswith("/"):
                dirs.append((key[len(dir_key) : -1], ordinal + FIRST_INO))
                ordinal = manifest.lower_bound(_successor(key), fetch=True)
            else:
                files.append((key[len(dir_key) :], ordinal + FIRST_INO))
                ordinal += 1
        shown = {name for name, _ in dirs}
        visible = [(name, number) for name, number in files if name not in shown]
        with self._lock:
            self.counters.shadowed_keys += len(files) - len(visible)
        return sorted(visible + dirs)

    async def ensure_listed(self, ino: int, *, force: bool = False, ahead: bool = True) -> Inode:
        node = await self._with_pages(lambda: self.record(ino))
        if node is None:
            raise NotFound(f"snapshot inode {ino}")
        if node.is_dir and ino not in self._listings:
            listing = await self._run(self._list_blocking, ino)
            with self._lock:
                self._listings[ino] = listing
                if len(self._listings) > LISTINGS_KEPT:
                    self._listings.popitem(last=False)
        return node

    def children(self, parent: int) -> Iterator[tuple[str, int]]:
        with self._lock:
            listing = self._listings.get(parent)
        if listing is None:
            raise Unavailable(f"snapshot directory {parent} was not listed first")
        return iter(listing)

    async def learn_empty_below(self, directory: Inode) -> None:
        """Nothing to learn: the manifest holds every entry's type."""

    async def walk(self, root: Inode, *, force: bool = False) -> AsyncIterator[tuple[str, Inode]]:
        """Everything below ``root`` in key order, one page per worker-thread hop."""
        if not root.is_dir:
            return
        base = root.key[len(self.prefix) :]
        start = 0 if root.ino == ROOT_INO else root.ino - FIRST_INO + 1
        while True:
            batch, done = await self._run(self._batch, base, start)
            for ordinal, row in batch:
                yield row[KEY][len(base) :].rstrip("/"), self._inode(ordinal, row)
            if done:
                return
            start = batch[-1][0] + 1

    def _batch(self, base: str, start: int) -> tuple[list[tuple[int, Row]], bool]:
        """Up to a page's worth of rows below ``base`` from ``start``, and whether that was all."""
        out: list[tuple[int, Row]] = []
        for ordinal, row in self.manifest.rows(start):
            if not row[KEY].startswith(base):
                return out, True
            out.append((ordinal, row))
            if len(out) >= 1024:
                return out, False
        return out, True
