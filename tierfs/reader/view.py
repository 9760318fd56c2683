"""A read-only view of one mount's cache directory, shared by every file a process opens.

Why the reader opens the daemon's own LMDB environments read-only instead of asking the
daemon: the namespace (``meta`` env, ``ns.inodes``) already maps each inode number to the
key, ETag, size, mtime and flags the daemon itself uses when it opens the file, and the
chunk index (``index`` env) says which blocks of that version are cached. Reading both
costs a few microseconds and no round trip, and there is nothing to keep in sync: the
reader sees exactly the records the daemon acts on. LMDB is made for this (one writer,
many reader processes), with readers registered in the lock file's reader table so that
the writer never reuses a page a reader is looking at. That is why the lock files must be
writable for readers (docs/reader.md, containers) and why a reader refuses an environment
whose lock file is not the one the daemon uses.

What is checked, and where it falls back (never a wrong or stale byte):

* ``Fallback("not_tierfs" | "unreadable" | "format")`` when the path is not on a tierfs
  mount, the cache directory cannot be read or locked, the daemon's heartbeat is stale, or
  the cache is of another format / block size / schema;
* ``"version"`` when the kernel's stat (size, mtime) does not match the namespace record;
* ``"dirty"`` when the record is flagged LOCAL, has no ETag yet, or a staging file exists
  (write-back owns the bytes; only the mount serves them);
* per block: ``"miss"`` (not indexed), ``"corrupt"`` (failed validation), ``"evicted"``
  (the index entry or the file changed while it was read: detected afterwards, not just
  made unlikely).
"""

from __future__ import annotations

import json
import os
import stat
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import lmdb

from .. import cacheformat as fmt
from ..cache.blockfile import BlockReader, Invalid
from ..cache.chunkkey import ChunkKey
from ..meta.records import Flag, Inode, Kind, ino_key
from . import protocol

if TYPE_CHECKING:
    from ..snapshot.namespace import SnapshotNamespace


async def _no_fetch(*_: Any) -> None:
    raise Fallback("miss", "snapshot manifest page not local")


HEARTBEAT_CHECK = 1.0  # seconds between re-reads of reader.json
# LMDB environments inherited through fork() must never be closed in the child: closing
# clears reader slots by the pid recorded at open (the parent's). They are parked here.
_ORPHANED_ENVS: list[Any] = []


class Fallback(Exception):
    """This read (or this file) must go through the mount; ``reason`` is one of protocol.REASONS."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


@dataclass(frozen=True)
class Version:
    """The version of a file a direct read serves: what the daemon would pin at open."""

    ino: int
    bucket: str
    key: str
    etag: str
    size: int
    mtime_ns: int


def _open_env(path: Path) -> Any:
    lock = path / "lock.mdb"
    # LMDB opens a lock file it cannot write *without* a reader slot (EROFS is tolerated):
    # the writer could then reuse pages under us. Refuse that instead.
    if not os.access(lock, os.R_OK | os.W_OK) or not os.access(path / "data.mdb", os.R_OK):
        raise Fallback("unreadable", f"{path}: the LMDB files are not readable and lockable")
    try:
        return lmdb.open(
            str(path), readonly=True, lock=True, create=False, max_dbs=fmt.MAX_DBS, map_size=fmt.MAP_SIZE,
            readahead=False, max_readers=fmt.MAX_READERS, subdir=True,
        )  # fmt: skip
    except lmdb.Error as exc:
        raise Fallback("unreadable", f"{path}: {exc}") from None


class CacheView:
    """One cache directory opened for direct reads by this process."""

    def __init__(self, root: Path, dev: int, mountpoint: str | None = None) -> None:
        self.root = root
        self.dev = dev
        self.mountpoint = mountpoint
        self.pid = os.getpid()
        self.published = self._read_published()
        self.bucket = str(self.published["bucket"])
        self.block_size = int(self.published["block_size"])
        self._chunk_dir = str(root / fmt.CHUNK_DIR)
        self._staging = str(root / fmt.STAGING_DIR)
        self._blocks = BlockReader(self.block_size)
        self._meta_env = _open_env(root / fmt.META_ENV)
        try:
            self._index_env = _open_env(root / fmt.INDEX_ENV)
        except Fallback:
            self._meta_env.close()
            raise
        self._checked = time.monotonic()
        self._mount_seen: tuple[int, int, int, int] | None = None  # the mount root's stat last matched
        self.closed = False
        self._snapshot: SnapshotNamespace | None = None
        try:
            self._open_snapshot()
            self._open_dbs()
            self._check_locks()
            self._check_mount()
        except BaseException:
            self.close()
            raise

    def _open_dbs(self) -> None:
        try:
            # Named databases of a read-only environment: opened outside any caller's transaction
            # (py-lmdb then keeps the handle; one opened inside a read txn dies with it).
            self._inodes = self._meta_env.open_db(fmt.DB_INODES, create=False)
            meta = self._meta_env.open_db(fmt.DB_META, create=False)
            self._chunks = self._index_env.open_db(fmt.DB_CHUNKS, create=False)
            cmeta = self._index_env.open_db(fmt.DB_CACHE_META, create=False)
            with self._meta_env.begin(db=meta) as txn:
                schema = txn.get(fmt.META_SCHEMA)
            with self._index_env.begin(db=cmeta) as txn:
                version, bs = txn.get(fmt.CACHE_META_FORMAT), txn.get(fmt.CACHE_META_BLOCK_SIZE)
        except lmdb.Error as exc:
            raise Fallback("format", f"{self.root}: {exc}") from None
        if schema != fmt.SCHEMA_VERSION:
            raise Fallback("format", f"namespace schema {schema!r}")
        if version != fmt.encode_format_version() or bs is None:
            raise Fallback("format", f"cache format {version!r}")
        if int.from_bytes(bs, "little") != self.block_size:
            raise Fallback("format", "block size differs from the published one")

    def _open_snapshot(self) -> None:
        """A snapshot mount's records are its manifest's (docs/snapshots.md): the local copy the
        daemon keeps, read-only. A page the daemon has not fetched is a miss, never a fetch."""
        path = self.published.get("snapshot")
        if not path:
            return
        # Imported here, for snapshot mounts only: they pull in zstandard and the manifest code,
        # which every fresh DataLoader worker of a live mount would otherwise pay for.
        from ..snapshot.format import ManifestError
        from ..snapshot.manifest import Manifest
        from ..snapshot.namespace import Defaults, SnapshotNamespace

        try:
            manifest = Manifest(os.stat(path).st_size, None, Path(path))
        except (OSError, ManifestError) as exc:
            raise Fallback("unreadable", f"snapshot manifest {path}: {exc}") from None
        defaults = Defaults(0, 0, 0o644, 0o755)  # attributes are the kernel's; only versions are read here
        self._snapshot = SnapshotNamespace(manifest, manifest.footer.prefix, defaults, _no_fetch)

    def _read_published(self) -> dict[str, Any]:
        try:
            record = json.loads((self.root / protocol.READER_FILE).read_text())
        except FileNotFoundError:
            raise Fallback("unreadable", f"{self.root}: no {protocol.READER_FILE} (no daemon)") from None
        except (OSError, ValueError) as exc:
            raise Fallback("unreadable", f"{self.root}: {exc}") from None
        if not isinstance(record, dict) or record.get("protocol") != protocol.PROTOCOL:
            raise Fallback("format", "reader protocol")
        if record.get("format") != fmt.CHUNK_FORMAT_VERSION:
            raise Fallback("format", f"cache format {record.get('format')!r}")
        try:
            major, minor = record.get("dev", (0, 0))
            dev = os.makedev(int(major), int(minor))
            heartbeat = float(record.get("heartbeat", 0))
            int(record["block_size"]), str(record["bucket"])
        except (TypeError, ValueError, KeyError, OverflowError):
            raise Fallback("format", f"{self.root}: malformed {protocol.READER_FILE}") from None
        if dev != self.dev:
            raise Fallback("unreadable", f"{self.root} belongs to another mount")
        if abs(time.time() - heartbeat) > protocol.HEARTBEAT_MAX_AGE:
            raise Fallback("unreadable", f"{self.root}: the daemon's heartbeat is stale")
        return record

    def _check_locks(self) -> None:
        locks = self.published.get("locks", {})
        for name in (fmt.META_ENV, fmt.INDEX_ENV):
            try:
                ident = protocol.lock_ident(self.root / name)
            except OSError as exc:
                raise Fallback("unreadable", str(exc)) from None
            if ident != list(locks.get(name, ())):
                raise Fallback("unreadable", f"{name}/lock.mdb is not the daemon's lock file")

    def _check_mount(self) -> None:
        """The namespace must be the mount's own: the record of the mountpoint's inode must have
        the mtime the kernel reports for it, to the nanosecond (for the mount root, the moment
        this namespace was created). The device number alone is not enough: a remount may get
        the number of a mount that just went away, whose reader.json still looks fresh."""
        if self.mountpoint is None:
            return
        try:
            st = os.stat(self.mountpoint)
        except OSError as exc:
            raise Fallback("unreadable", f"{self.mountpoint}: {exc}") from None
        seen = (st.st_dev, st.st_ino, st.st_mtime_ns, st.st_ctime_ns)
        if seen == self._mount_seen:
            return  # the kernel shows the very root this namespace was matched to
        node = self._record(st.st_ino)
        if st.st_dev != self.dev or node is None or node.kind is not Kind.DIR:
            raise Fallback("unreadable", f"{self.root} is not the cache of the mount at {self.mountpoint}")
        if node.mtime_ns != st.st_mtime_ns:
            raise Fallback("unreadable", f"{self.root} is not the cache of the mount at {self.mountpoint}")
        self._mount_seen = seen

    def check_current(self) -> None:
        """Before a file is resolved: is this view still the cache of the mount with its device
        number? Device numbers, mountpoints and cache dirs are all reused as mounts come and go,
        and a namespace that is not the mount's must never pick a version (its records could
        match a new mount's file by inode, size and mtime, and its blocks are another object's).
        One stat of the mountpoint (the kernel answers it from its attribute cache), compared
        with the root it last matched; the daemon's pid in reader.json at most once a second."""
        if self.closed:
            raise Fallback("unreadable", f"{self.root}: the view was closed")
        self._check_mount()
        self.check_alive()

    def check_alive(self) -> None:
        """At most once a second: is the daemon that published this cache still the one serving it?"""
        now = time.monotonic()
        if now - self._checked < HEARTBEAT_CHECK:
            return
        fresh = self._read_published()
        if fresh.get("pid") != self.published.get("pid") or fresh.get("locks") != self.published.get("locks"):
            raise Fallback("unreadable", "the cache was reopened by another daemon")
        self.published = fresh
        self._check_mount()
        self._checked = now

    def still_published(self) -> bool:
        """Whether the daemon this view was checked against still publishes the cache (for a batch
        of access records: its counters are that daemon's). When not, the next check_current
        re-checks at once, whatever the time since the last."""
        try:
            same = not self.closed and self._read_published().get("pid") == self.published.get("pid")
        except Fallback:
            same = False
        if not same:
            self._checked = float("-inf")
        return same

    def close(self) -> None:
        self.closed = True
        if getattr(self, "_snapshot", None) is not None:
            assert self._snapshot is not None
            self._snapshot.manifest.close()
        for env in (getattr(self, "_meta_env", None), getattr(self, "_index_env", None)):
            if env is None:
                continue
            if os.getpid() == self.pid:
                env.close()
            else:
                _ORPHANED_ENVS.append(env)

    # -- versions ---------------------------------------------------------------------------------------

    def _record(self, ino: int) -> Inode | None:
        if self.closed:
            raise Fallback("unreadable", f"{self.root}: the view was closed")
        if self._snapshot is not None:
            from ..snapshot.format import ManifestError  # loaded already: _open_snapshot imported it
            from ..snapshot.manifest import PageMissing

            try:
                return self._snapshot.record(ino)
            except (PageMissing, ManifestError, IndexError):
                raise Fallback("miss", "snapshot manifest page not local") from None
        try:
            with self._meta_env.begin(db=self._inodes, buffers=True) as txn:
                raw = txn.get(ino_key(ino))
                return Inode.unpack(ino, bytes(raw)) if raw is not None else None
        except lmdb.Error as exc:  # e.g. a full reader table: the mount can still serve it
            raise Fallback("unreadable", f"namespace: {exc}") from None
        except ValueError as exc:  # a record this version cannot decode
            raise Fallback("format", f"namespace record: {exc}") from None

    def resolve(self, st: os.stat_result) -> Version:
        """The version the daemon would serve for the file the kernel stat'ed, or Fallback."""
        self.check_alive()
        node = self._record(st.st_ino)
        if node is None or node.kind is not Kind.FILE or not stat.S_ISREG(st.st_mode):
            raise Fallback("version", "no file record for this inode")
        if node.flags & Flag.LOCAL or not node.etag or self._staged(node.ino):
            raise Fallback("dirty")
        if node.size != st.st_size or node.mtime_ns != st.st_mtime_ns:
            raise Fallback("version", "the kernel's attributes differ from the namespace record")
        return Version(node.ino, self.bucket, node.key, node.etag, node.size, node.mtime_ns)

    def still(self, version: Version) -> bool:
        """Whether ``version`` is still what the daemon serves for its inode (clean, same ETag).
        A view that cannot tell (closed: its mount went away) says no: never assume a version."""
        try:
            node = self._record(version.ino)
            return (
                node is not None
                and not node.flags & Flag.LOCAL
                and not self._staged(version.ino)
                and (node.key, node.etag, node.size) == (version.key, version.etag, version.size)
            )
        except Fallback:
            return False

    def changed_here(self, version: Version) -> bool:
        """Whether the inode was changed through the mount (or removed) since ``version`` was
        resolved: a mount handle then follows the inode, so a file object must too."""
        node = self._record(version.ino)
        return node is None or bool(node.flags & Flag.LOCAL) or self._staged(version.ino)

    def _staged(self, ino: int) -> bool:
        try:
            os.stat(f"{self._staging}/{ino}")
        except FileNotFoundError:
            return False
        except OSError as exc:  # cannot tell: never guess that a file is clean
            raise Fallback("unreadable", f"staging: {exc}") from None
        return True

    # -- blocks -----------------------------------------------------------------------------------------

    def chunk_path(self, digest: bytes) -> str:
        return fmt.chunk_path(self._chunk_dir, digest)

    def _indexed(self, digest: bytes) -> bytes | None:
        if self.closed:
            raise Fallback("unreadable", f"{self.root}: the view was closed")
        try:
            with self._index_env.begin(db=self._chunks) as txn:
                raw: bytes | None = txn.get(digest)
                return raw
        except lmdb.Error as exc:
            raise Fallback("unreadable", f"chunk index: {exc}") from None

    def read_block(self, version: Version, index: int, start: int, length: int) -> tuple[bytes, bytes]:
        """(validated bytes of block ``index`` from ``start``, digest), exactly ``length`` of them.

        After the read, the index entry must still be the one found before it (all fields
        but the access time) and the path must still name the file that was read; otherwise
        the block was evicted or rewritten meanwhile and the read falls back."""
        ck = ChunkKey(version.bucket, version.key, version.etag, index)
        digest = ck.digest()
        before = self._indexed(digest)
        if before is None:
            raise Fallback("miss")
        expected = min(self.block_size, version.size - index * self.block_size)
        if fmt.CHUNK_RECORD.unpack_from(before)[fmt.CHUNK_RECORD_LOGICAL] != expected:
            raise Fallback("corrupt", "indexed length does not fit the object size")
        path = self.chunk_path(digest)
        try:
            data, ident = self._blocks.read_ident(path, ck, start, length)
        except Invalid as bad:
            reason = "evicted" if bad.ident is None and self._indexed(digest) is None else "corrupt"
            raise Fallback(reason, str(bad)) from None
        after = self._indexed(digest)
        end = fmt.CHUNK_RECORD_ACCESS_END
        if after is None or after[end:] != before[end:]:
            raise Fallback("evicted", "index entry changed during the read")
        try:
            st = os.stat(path)
        except OSError:
            raise Fallback("evicted", "file removed during the read") from None
        if (st.st_dev, st.st_ino) != ident:
            raise Fallback("evicted", "file replaced during the read")
        if len(data) != length:
            raise Fallback("corrupt", "short block")
        return data, digest
