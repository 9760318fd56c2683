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
RETRIES = 64  # page fetches one lookup may need (depth of a path is far less)
IMMUTABLE_TIMEOUT = 365 * 86400.0  # a year: what the kernel takes as "no need to ask again"
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
        self.run_blocking = run_blocking
        self.counters = SnapshotCounters(hidden_keys=manifest.footer.hidden_keys)
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

    def posix(self, row: Row) -> tuple[str, int, int, int, int]:
        """(name, st_mode, uid, gid, nlink) of a row, the mount's defaults filled in: the one place
        both the inode records and the FUSE adapter's per-page replies take them from."""
        kind = _KINDS[row[KIND]]
        rel: str = row[KEY]
        uid, gid = row[UID], row[GID]
        return (
            rel[rel.rfind("/", 0, -1) + 1 : -1] if rel[-1] == "/" else rel[rel.rfind("/") + 1 :],
            row[MODE] or self._default_modes[kind],
            self.defaults.uid if uid < 0 else uid,
            self.defaults.gid if gid < 0 else gid,
            2 if kind is Kind.DIR else 1,
        )

    def node(self, ordinal: int, row: Row) -> Inode:
        """The inode record of entry ``ordinal`` (its ``row``)."""
        name, mode, uid, gid, nlink = self.posix(row)
        return Inode(
            ordinal + FIRST_INO, _KINDS[row[KIND]], Flag.META_KNOWN if row[MODE] else Flag.NONE,
            row[PARENT] + FIRST_INO if row[PARENT] >= 0 else ROOT_INO, row[SIZE], row[MTIME], row[MTIME],
            mode, uid, gid, math.inf, name, self.prefix + row[KEY], row[ETAG], 0, 0, nlink,
        )  # fmt: skip

    def _dir_key(self, ino: int, *, fetch: bool, decoded_only: bool = False) -> str | None:
        """The manifest key of directory ``ino`` ("" for the root), or None if it is not one."""
        if ino == ROOT_INO:
            return ""
        row = self.manifest.row(ino - FIRST_INO, fetch=fetch, decoded_only=decoded_only)
        return str(row[KEY]) if row[KEY].endswith("/") else None

    def record(self, ino: int, *, fetch: bool = False) -> Inode | None:
        """The inode (None: no such number); PageMissing when its page is not local and not ``fetch``."""
        if ino == ROOT_INO:
            return self.root
        ordinal = ino - FIRST_INO
        if not 0 <= ordinal < self.manifest.footer.entries:
            return None
        return self.node(ordinal, self.manifest.row(ordinal, fetch=fetch))

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
                return self.node(ordinal, self.manifest.row(ordinal, fetch=fetch))
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
                await self.load_page(missing.index)
        raise Unavailable("snapshot manifest: a lookup needed more pages than expected")

    async def lookup(self, parent_ino: int, name: str) -> Inode:
        node = await self._with_pages(lambda: self._find_child(parent_ino, name, fetch=False))
        if node is None:
            raise NotFound(f"{name} in snapshot directory {parent_ino}")
        return node

    # -- directories ------------------------------------------------------------------------------------
    #
    # A directory is read from a cursor over the manifest, never materialised: its entries are the
    # rows below its key in key order, a subdirectory's run skipped with one ``lower_bound``. A
    # cursor is the ordinal to go on from plus 1 (0: the directory's first entry), so a readdir
    # resumed at any offset, across pages, needs no per-handle state and no list of names.

    #: A snapshot never changes: an entry or attribute the kernel learnt never needs asking again.
    kernel_timeout = IMMUTABLE_TIMEOUT

    async def read_from(self, ino: int, dir_key: str, cursor: int) -> AsyncIterator[tuple[str, Inode, int]]:
        """(name, record, cursor after it) of directory ``ino`` (key ``dir_key``) from ``cursor``
        on (``meta.view.DirectoryCursors``): rows of pages on the heap are read on the loop, a page
        not decoded yet is decoded in a worker thread and the walk goes on from the last cursor."""
        misses = 0
        while True:
            try:
                for ordinal, row, after in self.rows_of(ino, cursor, dir_key=dir_key, decoded_only=True):
                    node = self.node(ordinal, row)
                    yield node.name, node, after
                    cursor, misses = after, 0
                return
            except PageMissing as missing:
                misses += 1  # in a row, without an entry in between: bounded, so never a hang
                if misses > RETRIES:
                    raise Unavailable("snapshot manifest: a readdir needed too many pages") from None
                await self.load_page(missing.index)

    def dir_key_of(self, directory: Inode) -> str:
        """The manifest key of a directory record ("" for the root)."""
        return directory.key[len(self.prefix) :]

    def first_cursor(self, ino: int) -> int:
        """The cursor of the first entry of directory ``ino`` (its run starts right after its row)."""
        return 1 if ino == ROOT_INO else ino - FIRST_INO + 2

    def rows_of(
        self,
        ino: int,
        cursor: int = 0,
        *,
        dir_key: str | None = None,
        fetch: bool = False,
        decoded_only: bool = False,
    ) -> Iterator[tuple[int, Row, int]]:
        """(ordinal, row, cursor after it) of directory ``ino``'s visible entries from ``cursor`` on, in
        key order. Reads pages through ``fetch``/``decoded_only`` (Manifest.page): a page it may
        not read raises PageMissing, and the caller goes on from the last cursor it got. A caller
        that knows the directory's ``dir_key`` (:meth:`dir_key_of`) spares reading its row: each
        step then needs at most three pages (the row's, the next one's, and a skip's)."""
        if dir_key is None:
            dir_key = self._dir_key(ino, fetch=fetch, decoded_only=decoded_only)
        if dir_key is None:
            return
        manifest = self.manifest
        end = manifest.footer.entries
        ordinal = (cursor or self.first_cursor(ino)) - 1
        while ordinal < end:  # one page per turn: the rows of a page are walked without a bisect each
            index = manifest.page_of(ordinal)
            rows = manifest.page(index, fetch=fetch, decoded_only=decoded_only)
            first = manifest.first_ordinals[index]
            while ordinal - first < len(rows):
                row = rows[ordinal - first]
                key: str = row[KEY]
                if not key.startswith(dir_key):
                    return
                if key[-1] == "/":
                    after = manifest.lower_bound(_successor(key), fetch=fetch, decoded_only=decoded_only)
                    yield ordinal, row, after + 1
                else:
                    after = ordinal + 1
                    following = rows[after - first][KEY] if after - first < len(rows) else None
                    if not self._shadowed(key, after, following, fetch=fetch, decoded_only=decoded_only):
                        yield ordinal, row, after + 1
                ordinal = after

    def _shadowed(
        self, key: str, after: int, following: str | None, *, fetch: bool, decoded_only: bool
    ) -> bool:
        """Whether the file ``key`` is hidden by a directory of the same name. Keys starting with
        ``key`` follow it directly (the table is sorted), so only a file whose next row
        (``following``, None: on the next page) extends its key needs the search for ``key + "/"``."""
        if after >= self.manifest.footer.entries:
            return False
        if following is None:
            following = self.manifest.row(after, fetch=fetch, decoded_only=decoded_only)[KEY]
        if not following.startswith(key):
            return False
        if self.manifest.find(key + "/", fetch=fetch, decoded_only=decoded_only) is None:
            return False
        with self._lock:
            self.counters.shadowed_keys += 1
        return True

    async def load_page(self, index: int) -> None:
        """Decode page ``index`` (fetching it if it is not local) in a worker thread, and keep it."""
        await self.run_blocking(functools.partial(self.manifest.page, index, fetch=True))

    async def ensure_listed(self, ino: int, *, force: bool = False, ahead: bool = True) -> Inode:
        """The inode; for a directory, the page of its first entries is decoded (a worker thread)."""
        node = await self._with_pages(lambda: self.record(ino))
        if node is None:
            raise NotFound(f"snapshot inode {ino}")
        first = self.first_cursor(ino) - 1
        if node.is_dir and first < self.manifest.footer.entries:
            index = self.manifest.page_of(first)
            if self.manifest.decoded(index) is None:  # no thread hop for a page on the heap
                await self.load_page(index)
        return node

    def children(self, parent: int) -> Iterator[tuple[str, int]]:
        """(name, ino) of a directory's entries, lazily from local pages (key order, not sorted)."""
        try:
            for ordinal, row, _ in self.rows_of(parent):
                key: str = row[KEY]
                yield key[key.rfind("/", 0, len(key) - 1) + 1 :].rstrip("/"), ordinal + FIRST_INO
        except PageMissing as missing:
            raise Unavailable(f"snapshot manifest page {missing.index} is not local") from None

    async def learn_empty_below(self, directory: Inode) -> None:
        """Nothing to learn: the manifest holds every entry's type."""

    async def walk(self, root: Inode, *, force: bool = False) -> AsyncIterator[tuple[str, Inode]]:
        """Everything below ``root`` in key order, one page per worker-thread hop."""
        if not root.is_dir:
            return
        base = root.key[len(self.prefix) :]
        start = 0 if root.ino == ROOT_INO else root.ino - FIRST_INO + 1
        while True:
            batch, done = await self.run_blocking(self._batch, base, start)
            for ordinal, row in batch:
                yield row[KEY][len(base) :].rstrip("/"), self.node(ordinal, row)
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
