"""The direct reader: per-process state (views, counters, access records) and its file objects.

A :class:`Reader` finds the cache directory of the mount a path is on, resolves the file
the way the kernel sees it (``os.stat`` on the mount path, which the kernel usually
answers from its attribute cache), checks that the caller may read it through the mount
(``os.access`` with the effective ids: the cache directory's own permissions are not the
file's), and serves the blocks of that version straight from the chunk files. Everything
it cannot serve goes through an ordinary descriptor on the mount, which also hydrates the
cache for next time. One Reader per process is the default (:func:`default_reader`); it
notices a fork (DataLoader workers) and starts afresh in the child.
"""

from __future__ import annotations

import atexit
import errno
import io
import os
import stat
import sys
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..control.registry import ControlError, lookup
from ..mountinfo import by_device
from . import hints, protocol
from .view import CacheView, Fallback, Version

CACHE_DIR_ENV = "TIERFS_CACHE_DIR"  # DIR, or MOUNTPOINT=DIR[:MOUNTPOINT=DIR...] (containers)
ACCESS_FLUSH_SECONDS = 1.0
ACCESS_FLUSH_RECORDS = 8192
RETRY_VIEW_SECONDS = 2.0  # a mount whose cache could not be opened is tried again after this
# A miss in a file of more than one block and up to this size has the daemon fetch the whole file
# (docs/reader.md, "Hints"); a one-block file is read through the mount (measured cheaper: one FUSE
# read against a control round trip plus a read of the cache), and so are bigger files, whose
# read-ahead the mount streams. TIERFS_MISS_FETCH=0 turns it off.
MISS_FETCH_MAX = 8 << 20
MISS_FETCH_ENV = "TIERFS_MISS_FETCH"
_EFFECTIVE = os.access in os.supports_effective_ids

# Views are per process, not per Reader: LMDB (and py-lmdb) allow one open environment per
# path in a process, and every Reader of the process may share them. So they are keyed by the
# cache directory alone (its real path): a cache dir that a new mount (another device number)
# took over gets its old view closed before a new one is opened.
_VIEWS: dict[str, CacheView] = {}
# (dev, cache dir) -> (retry at, reason, reader.json as it was) after a failure to open a view. A
# new reader.json (a daemon (re)publishing) makes the retry due at once.
_FAILED: dict[tuple[int, str], tuple[float, str, tuple[int, int] | None]] = {}
_VIEWS_LOCK = threading.Lock()
_VIEWS_PID = os.getpid()


def _views() -> dict[str, CacheView]:
    global _VIEWS_PID
    if os.getpid() != _VIEWS_PID:  # inherited through fork(): nothing of the parent is ours
        with _VIEWS_LOCK:
            if os.getpid() != _VIEWS_PID:
                for view in _VIEWS.values():
                    view.close()  # parks the environments, never closes them in a child
                _VIEWS.clear()
                _FAILED.clear()
                _VIEWS_PID = os.getpid()
    return _VIEWS


def _drop_view(view: CacheView) -> None:
    """Forget a view whose mount is gone or changed (never a failure: a new mount of the same cache
    dir may open it again at once) and close its environments."""
    with _VIEWS_LOCK:
        key = _view_key(view.root)
        if _VIEWS.get(key) is view:
            del _VIEWS[key]
        view.close()


def _view_key(root: Path) -> str:
    return os.path.realpath(root)


def _published_ident(root: Path) -> tuple[int, int] | None:
    try:
        st = os.stat(root / protocol.READER_FILE)
    except OSError:
        return None
    return (st.st_ino, st.st_mtime_ns)


class _StillFailing(Fallback):
    """A Fallback remembered from a recent failure (or a mount that is not tierfs): looking the
    mount up again at once would only cost time."""


def _env_cache_dirs() -> dict[str, Path] | Path | None:
    raw = os.environ.get(CACHE_DIR_ENV, "").strip()
    if not raw:
        return None
    if "=" not in raw:
        return Path(raw)
    pairs = (item.split("=", 1) for item in raw.split(":") if "=" in item)
    return {os.path.abspath(m): Path(d) for m, d in pairs}


class Reader:
    """Direct reads for one process. Thread-safe; ``stats()`` gives its counters."""

    def __init__(self, cache_dirs: Mapping[str, str | os.PathLike[str]] | None = None) -> None:
        """``cache_dirs`` maps a mountpoint to its cache directory where discovery cannot find it
        (another user's registry, a container); ``$TIERFS_CACHE_DIR`` does the same."""
        self._explicit = {os.path.abspath(m): Path(d) for m, d in (cache_dirs or {}).items()}
        self.miss_fetch = os.environ.get(MISS_FETCH_ENV, "1") != "0"
        self._lock = threading.Lock()
        self._reset()
        atexit.register(self.flush)

    def _reset(self) -> None:
        self._pid = os.getpid()
        self._mounts: dict[int, tuple[str, str] | None] = {}  # dev -> (mountpoint, fstype) or None
        self._roots: dict[int, Path | tuple[float, str]] = {}  # dev -> cache dir, or (retry at, reason)
        self._mountinfo_read = 0.0
        self._totals: dict[str, Any] = _no_counts()
        # Pending access records and counter deltas, one batch per view: each mount's daemon gets
        # the reads of its own cache, never another's (a view's mount gone: the batch is dropped).
        self._batches: dict[int, _Batch] = {}
        self._last_flush = time.monotonic()
        self._seq = 0
        self._dropped = 0
        self._miss_fetches = 0
        # DataLoader workers end with os._exit, which skips atexit; multiprocessing still runs
        # its finalizers first, so the last batch of access records is not lost. A process that
        # multiprocessing started has imported it already; any other ends through atexit, so
        # the reader never imports multiprocessing itself (it costs a fresh process ~10 ms).
        mp_util = sys.modules.get("multiprocessing.util")
        if mp_util is not None:
            mp_util.Finalize(self, Reader.flush, args=(self,), exitpriority=10)

    def _check_fork(self) -> None:
        if os.getpid() != self._pid:  # inherited through fork(): nothing of the parent is ours
            with self._lock:
                if os.getpid() != self._pid:
                    self._reset()

    # -- discovery --------------------------------------------------------------------------------------

    def _mount_of(self, dev: int, fresh: bool = False) -> tuple[str, str] | None:
        """The (mountpoint, fstype) of device ``dev``, from /proc/self/mountinfo. A tierfs mount
        is remembered (its view checks it is still the same mount); a number not in the snapshot
        is read afresh at once (the kernel just reported a file on it, so it is mounted now); any
        other answer is kept for a second (anonymous device numbers are reused by every virtual
        file system). ``fresh``: a remembered mount just failed, read again."""
        known = self._mounts.get(dev)
        now = time.monotonic()
        stale = dev not in self._mounts or (
            (known is None or known[1] != "fuse.tierfs") and now - self._mountinfo_read > 1.0
        )
        if fresh or stale:
            self._mountinfo_read = now
            self._mounts = {d: (info.mountpoint, info.fstype) for d, info in by_device().items()}
            self._roots = {d: r for d, r in self._roots.items() if d in self._mounts}
            _prune_views(self._mounts)
            known = self._mounts.setdefault(dev, None)
        return known

    def _cache_dir_of(self, mountpoint: str) -> Path:
        if mountpoint in self._explicit:
            return self._explicit[mountpoint]
        env = _env_cache_dirs()
        if isinstance(env, Path):
            return env
        if env and mountpoint in env:
            return env[mountpoint]
        try:
            record = lookup(mountpoint)
        except (OSError, ControlError) as exc:
            raise Fallback("unreadable", f"cannot find the cache of {mountpoint}: {exc}") from None
        if record is None or not record.get("cache_dir"):
            raise Fallback("unreadable", f"no cache dir known for {mountpoint} (set ${CACHE_DIR_ENV})")
        return Path(str(record["cache_dir"]))

    def view(self, dev: int) -> CacheView:
        """The open view of the cache of the mount with device ``dev``, or Fallback.

        Everything remembered about ``dev`` (its mountpoint, cache dir and view) is checked
        against the mount the kernel shows now (CacheView.check_current) on every call. When
        what was remembered fails, the mount is looked up afresh once before giving up: device
        numbers, mountpoints and cache dirs are all reused as mounts come and go."""
        self._check_fork()
        remembered = isinstance(self._roots.get(dev), Path) or self._mounts.get(dev) is not None
        try:
            return self._view(dev, fresh=False)
        except _StillFailing:
            raise  # a recent failure, not yet due to be tried again: no lookup for it
        except Fallback:
            if not remembered:
                raise
        self._roots.pop(dev, None)
        return self._view(dev, fresh=True)

    def _root_of(self, dev: int, fresh: bool) -> tuple[Path, str]:
        """(cache dir, mountpoint) of the mount with device ``dev``, or Fallback."""
        root = self._roots.get(dev)
        if isinstance(root, tuple) and time.monotonic() < root[0] and not fresh:
            raise _StillFailing(root[1])
        mount = self._mount_of(dev, fresh)
        if mount is None or mount[1] != "fuse.tierfs":
            raise _StillFailing("not_tierfs")
        if isinstance(root, Path) and not fresh:
            return root, mount[0]
        try:
            found = self._cache_dir_of(mount[0])
        except Fallback as fb:
            self._roots[dev] = (time.monotonic() + RETRY_VIEW_SECONDS, fb.reason)
            raise
        self._roots[dev] = found
        return found, mount[0]

    def _view(self, dev: int, fresh: bool) -> CacheView:
        root, mountpoint = self._root_of(dev, fresh)
        views = _views()
        key = _view_key(root)
        known = views.get(key)
        if known is not None and known.dev == dev and known.mountpoint == mountpoint:
            try:
                known.check_current()
                return known
            except Fallback:
                _drop_view(known)  # its mount is gone or changed: the next view is opened at once
                raise
        failed = _FAILED.get((dev, key))
        if failed is not None and time.monotonic() < failed[0] and _published_ident(root) == failed[2]:
            raise _StillFailing(failed[1])
        with _VIEWS_LOCK:
            current = views.get(key)
            if current is not None and current.dev == dev and current.mountpoint == mountpoint:
                return current
            if current is not None:  # the cache dir's old mount is gone: one environment per path
                del views[key]
                current.close()
            ident = _published_ident(root)
            try:
                view = CacheView(root, dev, mountpoint)
            except Fallback as fb:
                _FAILED[(dev, key)] = (time.monotonic() + RETRY_VIEW_SECONDS, fb.reason, ident)
                raise
            _FAILED.pop((dev, key), None)
            views[key] = view
            return view

    # -- counters and access records ----------------------------------------------------------------------

    def count_fallback(self, reason: str, view: CacheView | None = None) -> None:
        """One read (or open) through the mount. Counted for ``tierfs status`` of ``view``'s mount
        when it is known; without a view (no tierfs cache was found) in this process's stats only."""
        with self._lock:
            _add(self._totals, reason=reason)
            if view is not None:
                _add(self._batch(view).delta, reason=reason)
            due = time.monotonic() - self._last_flush >= ACCESS_FLUSH_SECONDS
        if due:
            self.flush()

    def _batch(self, view: CacheView) -> _Batch:
        batch = self._batches.get(id(view))
        if batch is None or batch.view is not view:
            batch = self._batches[id(view)] = _Batch(view)
        return batch

    def fetch_missing(self, path: str, version: Version, block_size: int) -> bool:
        """A direct read missed: have the daemon fetch the whole (small) file into the cache now, at
        its full concurrency, so the read is then served from the cache. True once it is there."""
        if not self.miss_fetch or not block_size < version.size <= MISS_FETCH_MAX:
            return False
        if not hints.fetch_now(path, ino=version.ino, etag=version.etag):
            return False
        with self._lock:
            self._miss_fetches += 1
        return True

    def count_direct(self, view: CacheView, digest: bytes, nbytes: int) -> None:
        with self._lock:
            _add(self._totals, nbytes=nbytes)
            batch = self._batch(view)
            _add(batch.delta, nbytes=nbytes)
            batch.times[digest] = time.time()
            due = (
                len(batch.times) >= ACCESS_FLUSH_RECORDS
                or time.monotonic() - self._last_flush >= ACCESS_FLUSH_SECONDS
            )
        if due:
            self.flush()

    def flush(self) -> None:
        """Write the pending access records (and counter deltas) as one batch file per cache dir for
        its daemon. A batch whose view was closed (its mount went away) or whose daemon no longer
        publishes the cache is dropped: the next daemon of that cache dir did not serve those reads."""
        if os.getpid() != self._pid:
            return
        with self._lock:
            batches = list(self._batches.values())
            self._batches = {}
            self._last_flush = time.monotonic()
            seqs = range(self._seq + 1, self._seq + 1 + len(batches))
            self._seq += len(batches)
        dropped = 0
        for batch, seq in zip(batches, seqs, strict=True):
            if not batch.view.still_published():
                dropped += len(batch.times)
            elif not _write_batch(batch, seq):
                # No writable access dir (a read-only bind mount): the reads were served, but LRU
                # and `tierfs status` will not see them.
                dropped += len(batch.times)
        if dropped:
            with self._lock:
                self._dropped += dropped

    def stats(self) -> dict[str, Any]:
        """This process's counters since it started (or forked): direct block reads and bytes,
        fallbacks by reason, and access records that could not be written."""
        self._check_fork()
        with self._lock:
            return {
                "direct_reads": self._totals["direct_reads"],
                "direct_bytes": self._totals["direct_bytes"],
                "fallbacks": dict(self._totals["fallbacks"]),
                "access_records_dropped": self._dropped,
                "miss_fetches": self._miss_fetches,
            }

    def open(self, path: str | os.PathLike[str], buffering: int = -1) -> io.BufferedReader | TierFile:
        """Open ``path`` for reading, like ``open(path, "rb", buffering)``."""
        raw = TierFile(os.fspath(path), self)
        if buffering == 0:
            return raw
        return io.BufferedReader(raw, buffering if buffering > 1 else io.DEFAULT_BUFFER_SIZE)


class _Batch:
    """The access records and counter deltas of one view not yet written for its daemon."""

    __slots__ = ("delta", "times", "view")

    def __init__(self, view: CacheView) -> None:
        self.view = view
        self.delta: dict[str, Any] = _no_counts()
        self.times: dict[bytes, float] = {}


def _no_counts() -> dict[str, Any]:
    return {"direct_reads": 0, "direct_bytes": 0, "fallbacks": {}}


def _add(counts: dict[str, Any], *, nbytes: int | None = None, reason: str | None = None) -> None:
    if nbytes is not None:
        counts["direct_reads"] += 1
        counts["direct_bytes"] += nbytes
    if reason is not None:
        counts["fallbacks"][reason] = counts["fallbacks"].get(reason, 0) + 1


def _write_batch(batch: _Batch, seq: int) -> bool:
    directory = batch.view.root / protocol.ACCESS_DIR
    tmp = directory / f".tmp.{os.getpid()}.{seq}"
    try:
        with open(tmp, "wb") as f:
            f.write(protocol.encode_access_batch(batch.delta, batch.times))
        os.rename(tmp, directory / f"{os.getpid()}-{seq}-{os.urandom(4).hex()}{protocol.ACCESS_SUFFIX}")
    except OSError:
        return False
    return True


def _prune_views(mounts: Mapping[int, tuple[str, str] | None]) -> None:
    """Close the views of mounts that mountinfo no longer shows (their LMDB environments and
    mappings would otherwise stay open for the life of the process)."""
    views = _views()
    with _VIEWS_LOCK:
        gone = [
            view for view in views.values()
            if mounts.get(view.dev) != (view.mountpoint, "fuse.tierfs")
        ]  # fmt: skip
    for view in gone:
        _drop_view(view)


_default: Reader | None = None
_default_lock = threading.Lock()


def default_reader() -> Reader:
    global _default
    if _default is None:
        with _default_lock:
            if _default is None:
                _default = Reader()
    return _default


class TierFile(io.RawIOBase):
    """A file under a tierfs mount, read from the cache directory where it can be, else through the mount.

    One file object serves one version: the one resolved at open. If a read must fall back
    and the mount by then serves another version, the file switches wholly to the mount
    when it has not served any byte directly yet, and raises ESTALE otherwise, as a handle
    through the mount pinned to a version that is gone fails (docs/consistency.md).
    """

    def __init__(self, path: str, reader: Reader | None = None) -> None:
        super().__init__()
        self.name = path
        self.mode = "rb"
        self._reader = reader or default_reader()
        self._fd: int | None = None
        self._pos = 0
        self._served_direct = False
        self._stale = False
        self._asked_daemon = False  # a miss asks the daemon to fetch the file once per file object
        self._view: CacheView | None = None
        self._version: Version | None = None
        st = os.stat(path)
        if stat.S_ISDIR(st.st_mode):
            raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), path)
        # The kernel's permission check on the mount path, for this process's effective ids:
        # the cache directory may be open to a group, the file need not be.
        if not (os.access(path, os.R_OK, effective_ids=True) if _EFFECTIVE else os.access(path, os.R_OK)):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), path)
        view: CacheView | None = None
        try:
            view = self._reader.view(st.st_dev)
            self._version = view.resolve(st)
            self._view = view
            self._size = self._version.size
        except Fallback as fb:
            self._reader.count_fallback(fb.reason, view)
            self._view = self._version = None
            self._open_mount()

    # -- the mount side ---------------------------------------------------------------------------------

    def _open_mount(self) -> int:
        if self._stale:
            raise OSError(errno.ESTALE, "the file changed while it was open", self.name)
        if self._fd is None:
            fd = os.open(self.name, os.O_RDONLY | os.O_CLOEXEC)
            if self._view is not None and self._version is not None and not self._view.still(self._version):
                # The mount now serves another version than the one this file object stands for.
                if self._served_direct:
                    os.close(fd)
                    self._stale = True
                    raise OSError(errno.ESTALE, "the file changed while it was open", self.name)
                self._view = self._version = None
            self._fd = fd
            if self._view is None:
                self._size = os.fstat(fd).st_size
        return self._fd

    def _mount_readinto(self, out: memoryview, offset: int) -> int:
        fd = self._open_mount()
        done = 0
        while done < len(out):
            got = os.preadv(fd, [out[done:]], offset + done)
            if got == 0:
                break
            done += got
        return done

    # -- reads ------------------------------------------------------------------------------------------

    def _follow_local_changes(self) -> None:
        """Before each read: a write through the mount since the open (the file is staged or
        LOCAL now) must be seen, as a mount handle sees it (it follows the inode). Such a file
        is read wholly through the mount from then on. Costs one LMDB lookup and one stat."""
        view, version = self._view, self._version
        if view is None or version is None:
            return
        try:
            changed = view.changed_here(version)
        except Fallback as fb:
            self._reader.count_fallback(fb.reason, view)
            changed = True
        if changed:
            self._reader.count_fallback("dirty", view)
            self._view = self._version = None
            if self._fd is not None:  # it was opened for another version: a new handle follows
                os.close(self._fd)
                self._fd = None
            self._open_mount()

    def _read_block(
        self, view: CacheView, version: Version, index: int, start: int, take: int
    ) -> tuple[bytes, bytes]:
        """``view.read_block``; on the first miss the daemon fetches the file and the read is tried again."""
        try:
            return view.read_block(version, index, start, take)
        except Fallback as fb:
            if fb.reason != "miss" or self._asked_daemon:
                raise
            self._asked_daemon = True
            if not self._reader.fetch_missing(self.name, version, view.block_size):
                raise  # counted by the caller, which reads through the mount
        found = view.read_block(version, index, start, take)  # a Fallback now is the caller's to count
        self._reader.count_fallback("miss", view)  # still a miss: the daemon fetched it, not a hit
        return found

    def preadinto(self, buffer: Any, offset: int) -> int:
        """Read into ``buffer`` at ``offset`` without moving the position (pread(2)); returns the count."""
        self._checkClosed()
        self._follow_local_changes()
        out = memoryview(buffer).cast("B")
        if offset < 0:
            raise ValueError("negative offset")
        total = max(0, min(len(out), self._size - offset))
        done = 0
        while done < total:
            view, version = self._view, self._version
            if view is None or version is None:
                return done + self._mount_readinto(out[done:total], offset + done)
            pos = offset + done
            index, start = divmod(pos, view.block_size)
            take = min(total - done, view.block_size - start)
            try:
                data, digest = self._read_block(view, version, index, start, take)
            except Fallback as fb:
                self._reader.count_fallback(fb.reason, view)
                self._open_mount()
                if self._view is None:
                    continue  # switched wholly to the mount
                got = self._mount_readinto(out[done : done + take], pos)
                done += got
                if got < take:
                    break
                continue
            out[done : done + take] = data
            self._served_direct = True
            self._reader.count_direct(view, digest, take)
            done += take
        return done

    def pread(self, size: int, offset: int) -> bytes:
        """``size`` bytes at ``offset`` (fewer at the end), without moving the position."""
        self._checkClosed()
        self._follow_local_changes()
        size = max(0, min(size, self._size - offset))
        view, version = self._view, self._version
        if view is not None and version is not None and size:
            index, start = divmod(offset, view.block_size)
            if start + size <= view.block_size:  # one block: hand over the validated bytes as they are
                try:
                    data, digest = self._read_block(view, version, index, start, size)
                except Fallback as fb:  # this block through the mount (one block: all of the range)
                    self._reader.count_fallback(fb.reason, view)
                    buf = bytearray(size)
                    got = self._mount_readinto(memoryview(buf), offset)
                    return bytes(buf) if got == size else bytes(buf[:got])
                else:
                    self._served_direct = True
                    self._reader.count_direct(view, digest, size)
                    return data
        buf = bytearray(size)
        got = self.preadinto(buf, offset)
        return bytes(buf) if got == size else bytes(buf[:got])

    def readinto(self, buffer: Any) -> int:
        got = self.preadinto(buffer, self._pos)
        self._pos += got
        return got

    def read(self, size: int | None = -1) -> bytes:
        if size is None or size < 0:
            return self.readall()
        data = self.pread(size, self._pos)
        self._pos += len(data)
        return data

    def readall(self) -> bytes:
        data = self.pread(max(0, self._size - self._pos), self._pos)
        self._pos += len(data)
        return data

    # -- position and the rest of io.RawIOBase -------------------------------------------------------------

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        self._checkClosed()
        if whence == io.SEEK_SET:
            pos = offset
        elif whence == io.SEEK_CUR:
            pos = self._pos + offset
        elif whence == io.SEEK_END:
            pos = self._size + offset
        else:
            raise ValueError(f"invalid whence {whence}")
        if pos < 0:
            raise OSError(errno.EINVAL, "negative seek position")
        self._pos = pos
        return pos

    def tell(self) -> int:
        self._checkClosed()
        return self._pos

    @property
    def size(self) -> int:
        return self._size

    @property
    def direct(self) -> bool:
        """Whether reads are still served from the cache directory where they can be."""
        return self._view is not None

    def close(self) -> None:
        if not self.closed and self._fd is not None:
            os.close(self._fd)
            self._fd = None
        super().close()
