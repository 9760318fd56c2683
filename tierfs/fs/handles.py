"""Open handles of a tierfs file system: what lives only while files are open.

A handle pins the bucket version seen at open (docs/consistency.md), or *follows* the inode
once the inode is changed here. The table also keeps, per inode, how many handles are open,
the time of the last write while open (shown as the mtime until the last close records it),
the record of a file unlinked while open (fstat works, nlink 0), and the ETag whose bytes the
kernel may hold in its page cache. Plain dict work: every call may run on the trio loop.
"""

from __future__ import annotations

from collections import Counter, OrderedDict
from dataclasses import dataclass

from ..meta.records import Inode
from ..read.hydrator import ObjectVersion

SERVED_ETAGS_KEPT = 65536


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


class Handles:
    """The open-file and open-directory tables, and what the file system keeps per open inode."""

    def __init__(self) -> None:
        self.files: dict[int, FileHandle] = {}
        self.dirs: dict[int, list[tuple[str, int]]] = {}
        self.cursor_dirs: dict[int, tuple[int, str]] = {}  # fh -> (inode, key) of a cursor-read directory
        self._next_fh = 1
        self._open_count: Counter[int] = Counter()
        self._handles_of: dict[int, set[int]] = {}  # ino -> its open fhs (to make them follow)
        # ETag whose bytes the kernel may hold in its page cache, per inode; bounded so a
        # million-file epoch does not keep a million entries (forgetting one only means
        # the page cache is kept, and the change hook invalidates changed inodes anyway).
        self._served_etag: OrderedDict[int, str] = OrderedDict()
        # ino -> time of its last write(2), while open: mtime and ctime change with every write,
        # but the record is written once, when the last writer closes (not one commit per write).
        self.written_at: dict[int, int] = {}
        # ino -> its last record, for files unlinked while open: fstat still works (nlink 0)
        # until the last handle closes, as POSIX keeps the file until then.
        self.unlinked_open: dict[int, Inode] = {}

    def _new_fh(self) -> int:
        fh = self._next_fh
        self._next_fh += 1
        return fh

    def open_dir(self, entries: list[tuple[str, int]]) -> int:
        fh = self._new_fh()
        self.dirs[fh] = entries
        return fh

    def open_cursor_dir(self, ino: int, dir_key: str) -> int:
        """A directory read from cursors (``meta.view.DirectoryCursors``): no listing is kept."""
        fh = self._new_fh()
        self.cursor_dirs[fh] = (ino, dir_key)
        return fh

    def register(self, handle: FileHandle) -> int:
        fh = self._new_fh()
        self.files[fh] = handle
        self._open_count[handle.version.ino] += 1
        self._handles_of.setdefault(handle.version.ino, set()).add(fh)
        return fh

    def is_open(self, ino: int) -> bool:
        return ino in self._open_count

    def follow_local(self, ino: int) -> None:
        """A local change of ``ino`` begins: every handle open on it now follows the inode."""
        for fh in self._handles_of.get(ino, ()):
            self.files[fh].follow = True

    def keep_cache(self, node: Inode) -> bool:
        """Whether the kernel may keep its page cache of ``node``: not if the object changed since
        we last served it (docs/consistency.md). Records ``node``'s ETag as served."""
        previous = self._served_etag.get(node.ino)
        self.note_served(node)
        return previous is None or previous == node.etag

    def note_served(self, node: Inode) -> None:
        self._served_etag[node.ino] = node.etag
        self._served_etag.move_to_end(node.ino)
        if len(self._served_etag) > SERVED_ETAGS_KEPT:
            self._served_etag.popitem(last=False)

    def close(self, fh: int) -> tuple[FileHandle, bool] | None:
        """Drop ``fh``; returns it and whether it was the inode's last open handle."""
        handle = self.files.pop(fh, None)
        if handle is None:
            return None
        ino = handle.version.ino
        self._handles_of[ino].discard(fh)
        self._open_count[ino] -= 1
        last = self._open_count[ino] <= 0
        if last:
            del self._open_count[ino]
            del self._handles_of[ino]
        return handle, last

    def closed(self, ino: int) -> None:
        """After the release of ``ino``'s last handle: forget what lived only while it was open."""
        if ino not in self._open_count:
            self.written_at.pop(ino, None)
            self.unlinked_open.pop(ino, None)
