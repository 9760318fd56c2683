"""The FUSE adapter of a snapshot mount: :class:`TierOperations` with directories read from a page
cursor over the manifest (docs/snapshots.md "Listing at scale").

A snapshot is immutable, so three things a live mount cannot do are safe here:

- **Kernel timeouts are effectively infinite** (:data:`IMMUTABLE_TIMEOUT`): an entry or attribute
  the kernel learnt (from readdirplus or a lookup) never needs asking again.
- **readdir keeps no listing.** ``opendir`` records the directory; each ``readdir`` goes on from
  the kernel's offset, which is a cursor into the manifest (ordinal + 1), so a directory of
  millions of entries costs no memory per handle, and an offset resumed on another page lands
  on the same next entry.
- **A page's replies are built once.** The names and ``EntryAttributes`` of a page's 1,024 rows
  are made together in a worker thread the first time a readdir needs them (the decode of a
  page not on the heap, ~2.6 ms, runs there too, never on the trio loop), and the last
  :data:`REPLY_PAGES` pages' are kept for later readdirs and lookups.
"""

from __future__ import annotations

import errno
import os
import threading
from collections import OrderedDict
from typing import Any, cast

import pyfuse3

from ..meta.namespace import Namespace
from ..meta.records import ROOT_INO
from ..read.hydrator import Hydrator
from ..snapshot.format import KEY, MTIME, SIZE, Row
from ..snapshot.manifest import PageMissing
from ..snapshot.namespace import FIRST_INO, RETRIES, SnapshotNamespace
from .operations import TierOperations, handler

IMMUTABLE_TIMEOUT = 365 * 86400.0  # a year: what the kernel takes as "no need to ask again"
REPLY_PAGES = 64  # pages whose readdir replies are kept (~0.3 MiB each)

#: One page's replies: (name as bytes, attributes) per row, in row order.
PageReplies = list[tuple[bytes, pyfuse3.EntryAttributes]]


class RepliesMissing(PageMissing):
    """The page's rows are decoded but its replies are not built yet."""


class SnapshotOperations(TierOperations):
    """pyfuse3 operations of a ``--snapshot``/``--as-of`` mount (read-only, immutable)."""

    def __init__(self, namespace: SnapshotNamespace, hydrator: Hydrator, **options: Any) -> None:
        options["kernel_timeout"] = IMMUTABLE_TIMEOUT
        super().__init__(cast(Namespace, namespace), hydrator, **options)
        self.snap = namespace
        self._open_dirs: dict[int, tuple[int, str]] = {}  # fh -> (directory inode, its manifest key)
        self._replies: OrderedDict[int, PageReplies] = OrderedDict()
        self._replies_lock = threading.Lock()
        self._last_replies: tuple[int, PageReplies] = (0, [])  # (first ordinal, replies): loop only

    # -- per-page replies ---------------------------------------------------------------------------

    def _make_reply(self, ino: int, row: Row) -> tuple[bytes, pyfuse3.EntryAttributes]:
        """One entry's reply, straight from its row (no inode record: this runs once per entry
        of a ``find``)."""
        name, mode, uid, gid, nlink = self.snap.posix(row)
        size, mtime = row[SIZE], row[MTIME]
        attrs = pyfuse3.EntryAttributes()
        attrs.st_ino = ino
        attrs.entry_timeout = attrs.attr_timeout = self.timeout
        attrs.st_mode, attrs.st_nlink, attrs.st_uid, attrs.st_gid = mode, nlink, uid, gid
        attrs.st_size, attrs.st_blocks, attrs.st_blksize = size, (size + 511) // 512, self.blksize
        attrs.st_atime_ns = attrs.st_mtime_ns = attrs.st_ctime_ns = mtime
        return os.fsencode(name), attrs

    def _build_replies(self, index: int) -> None:
        """Worker thread: decode page ``index`` (fetching it if needed) and make its replies."""
        manifest = self.snap.manifest
        first = manifest.first_ordinals[index] + FIRST_INO
        replies = [self._make_reply(first + n, row) for n, row in enumerate(manifest.page(index, fetch=True))]
        with self._replies_lock:
            self._replies[index] = replies
            if len(self._replies) > REPLY_PAGES:
                self._replies.popitem(last=False)

    def _reply(self, ordinal: int) -> tuple[bytes, pyfuse3.EntryAttributes]:
        """The reply of entry ``ordinal``: from its page's replies if built; a subdirectory's alone
        on the loop (a listing of subdirectories touches one row per page: building whole pages
        for it cost a build per page twice over in a ``find``, measured); else PageMissing."""
        first, replies = self._last_replies  # the page of the entry before, nearly always
        if not 0 <= ordinal - first < len(replies):
            manifest = self.snap.manifest
            index = manifest.page_of(ordinal)
            found = self._replies.get(index)  # a dict read: atomic under the GIL
            if found is None:
                row = manifest.row(ordinal, decoded_only=True)
                if row[KEY][-1] == "/":  # ~3 µs: cheaper than a thread hop
                    return self._make_reply(ordinal + FIRST_INO, row)
                raise RepliesMissing(index)
            first, replies = manifest.first_ordinals[index], found
            self._last_replies = (first, replies)
        return replies[ordinal - first]

    async def _load(self, index: int) -> None:
        await self.snap.run_blocking(self._build_replies, index)

    # -- directories ---------------------------------------------------------------------------------

    @handler
    async def opendir(self, inode: int, ctx: Any = None) -> int:
        node = await self.ns.ensure_listed(inode)
        if not node.is_dir:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        fh = self._new_fh()
        self._open_dirs[fh] = (inode, self.snap.dir_key_of(node))
        return fh

    @handler
    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        opened = self._open_dirs.get(fh)
        if opened is None:
            raise pyfuse3.FUSEError(errno.EBADF)
        ino, dir_key = opened
        cursor, misses = start_id, 0
        while True:
            try:
                for ordinal, after in self.snap.entries(ino, cursor, dir_key=dir_key, decoded_only=True):
                    name, attrs = self._reply(ordinal)
                    if not pyfuse3.readdir_reply(token, name, attrs, after):
                        return
                    cursor, misses = after, 0
                return
            except PageMissing as missing:
                misses += 1  # in a row, without an entry in between: bounded, so never a hang
                if misses > RETRIES:
                    raise pyfuse3.FUSEError(errno.EIO) from None
                if isinstance(missing, RepliesMissing):
                    await self._load(missing.index)
                else:  # rows only (a subdirectory's row, a skip): no replies built for one row
                    await self.snap.load_page(missing.index)

    @handler
    async def releasedir(self, fh: int) -> None:
        self._open_dirs.pop(fh, None)

    # -- attributes from the kept replies ------------------------------------------------------------

    @handler
    async def getattr(self, inode: int, ctx: Any = None) -> pyfuse3.EntryAttributes:
        if inode != ROOT_INO and 0 <= inode - FIRST_INO < self.snap.manifest.footer.entries:
            try:
                return self._reply(inode - FIRST_INO)[1]
            except PageMissing:
                pass
        return self._attrs(self._inode(inode))
