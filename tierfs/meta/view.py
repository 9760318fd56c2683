"""What the file system needs of a namespace to serve a read-only mount.

:class:`tierfs.meta.namespace.Namespace` (the bucket, listed lazily into LMDB) has it, and so
has :class:`tierfs.snapshot.namespace.SnapshotNamespace` (a snapshot manifest, never listed).
The FUSE adapter and the control operations call only these on a read-only mount: every
writing call sits behind the write-back check that refuses it with EROFS first.

Loop rules: ``get``, ``child`` and ``children`` are synchronous and short (LMDB reads or pages
already local) and may run on the trio loop; the async calls may fetch (list a directory, fetch
a manifest page) in worker threads.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from typing import Protocol, runtime_checkable

from .records import Inode


class NamespaceView(Protocol):
    def get(self, ino: int) -> Inode | None: ...

    def child(self, parent: int, name: str) -> Inode | None: ...

    def children(self, parent: int) -> Iterator[tuple[str, int]]:
        """(name, ino) of a directory's entries; call after ``ensure_listed``."""
        ...

    async def lookup(self, parent_ino: int, name: str) -> Inode:
        """One entry, or NotFound."""
        ...

    async def ensure_listed(self, ino: int, *, force: bool = False, ahead: bool = True) -> Inode:
        """The inode, with its entries known if it is a directory."""
        ...

    async def learn_empty_below(self, directory: Inode) -> None: ...

    def walk(self, root: Inode, *, force: bool = False) -> AsyncIterator[tuple[str, Inode]]:
        """(path relative to ``root``, inode) of everything below ``root``."""
        ...


@runtime_checkable
class DirectoryCursors(Protocol):
    """A namespace that never changes under a mount (a snapshot, docs/snapshots.md "Listing at
    scale"), which therefore reads a directory from any offset with no listing kept per open
    handle: the offset handed to the kernel is a cursor into the namespace itself. The file
    system reads such a namespace's directories this way; the FUSE adapter applies its
    ``kernel_timeout`` (an entry or attribute learnt once never needs asking again).

    Loop rules: ``dir_key_of`` is a plain call; ``read_from`` runs on the loop and decodes a
    page not local yet in a worker thread."""

    kernel_timeout: float

    def dir_key_of(self, directory: Inode) -> str:
        """The directory's own key in the namespace, which its cursors are read under."""
        ...

    def read_from(self, ino: int, dir_key: str, cursor: int) -> AsyncIterator[tuple[str, Inode, int]]:
        """(name, record, cursor of the next entry) of directory ``ino`` from ``cursor`` on (0: its
        first entry), in a stable order."""
        ...
