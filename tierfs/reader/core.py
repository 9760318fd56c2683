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
# path in a process, and every Reader of the process may share them.
# (dev, cache dir) -> its view, or (retry at, reason) after a failure to open it.
_VIEWS: dict[tuple[int, str], CacheView | tuple[float, str]] = {}
_VIEWS_LOCK = threading.Lock()
_VIEWS_PID = os.getpid()


def _views() -> dict[tuple[int, str], CacheView | tuple[float, str]]:
    global _VIEWS_PID
    if os.getpid() != _VIEWS_PID:  # inherited through fork(): nothing of the parent is ours
        with _VIEWS_LOCK:
            if os.getpid() != _VIEWS_PID:
                for view in _VIEWS.values():
                    if isinstance(view, CacheView):
                        view.close()  # parks the environments, never closes them in a child
                _VIEWS.clear()
                _VIEWS_PID = os.getpid()
    return _VIEWS


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
        self._totals: dict[str, Any] = {"direct_reads": 0, "direct_bytes": 0, "fallbacks": {}}
        self._delta: dict[str, Any] = {"direct_reads": 0, "direct_bytes": 0, "fallbacks": {}}
        self._times: dict[bytes, float] = {}
        self._times_root: Path | None = None
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

    def _mount_of(self, dev: int) -> tuple[str, str] | None:
        if dev in self._mounts:
            return self._mounts[dev]
        now = time.monotonic()
        if now - self._mountinfo_read > 1.0 or not self._mounts:
            self._mountinfo_read = now
            found: dict[int, tuple[str, str] | None] = {
                dev: (info.mountpoint, info.fstype) for dev, info in by_device().items()
            }
            self._mounts = found
        result = self._mounts.get(dev)
        self._mounts.setdefault(dev, result)
        return result

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
        """The open view of the cache of the mount with device ``dev``, or Fallback."""
        self._check_fork()
        known = isinstance(self._roots.get(dev), Path)
        try:
            return self._view(dev)
        except Fallback:
            if not known:
                raise
            # The cache dir found earlier failed: a remount may have given its device number to
            # another mount with another cache. Find the cache again before giving up.
            self._roots.pop(dev, None)
            self._mounts.pop(dev, None)
            return self._view(dev)

    def _view(self, dev: int) -> CacheView:
        root = self._roots.get(dev)
        if not isinstance(root, Path):
            if root is not None and time.monotonic() < root[0]:
                raise Fallback(root[1])
            mount = self._mount_of(dev)
            if mount is None or mount[1] != "fuse.tierfs":
                if mount is None:
                    self._mounts.pop(dev, None)  # not mounted when last looked: look again next time
                raise Fallback("not_tierfs")
            try:
                root = self._cache_dir_of(mount[0])
            except Fallback as fb:
                self._roots[dev] = (time.monotonic() + RETRY_VIEW_SECONDS, fb.reason)
                # Device numbers are reused as mounts come and go: the mountpoint remembered for
                # this one may be another (gone) mount's. Read mountinfo again on the retry.
                self._mounts.pop(dev, None)
                raise
            self._roots[dev] = root
        key = (dev, str(root))
        views = _views()
        known = views.get(key)
        if isinstance(known, CacheView):
            try:
                known.check_alive()
                return known
            except Fallback as fb:
                with _VIEWS_LOCK:
                    if views.get(key) is known:
                        known.close()
                        views[key] = (time.monotonic() + RETRY_VIEW_SECONDS, fb.reason)
                raise
        if known is not None and time.monotonic() < known[0]:
            raise Fallback(known[1])
        with _VIEWS_LOCK:
            current = views.get(key)
            if isinstance(current, CacheView):
                return current
            try:
                mount = self._mount_of(dev)
                view = CacheView(root, dev, mount[0] if mount is not None else None)
            except Fallback as fb:
                views[key] = (time.monotonic() + RETRY_VIEW_SECONDS, fb.reason)
                raise
            views[key] = view
            return view

    # -- counters and access records ----------------------------------------------------------------------

    def count_fallback(self, reason: str) -> None:
        with self._lock:
            for target in (self._totals, self._delta):
                target["fallbacks"][reason] = target["fallbacks"].get(reason, 0) + 1
            due = time.monotonic() - self._last_flush >= ACCESS_FLUSH_SECONDS
        if due:
            self.flush()

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
            for target in (self._totals, self._delta):
                target["direct_reads"] += 1
                target["direct_bytes"] += nbytes
            other_root = self._times_root is not None and self._times_root != view.root
        if other_root:  # one batch file per cache dir
            self.flush()
        with self._lock:
            self._times_root = view.root
            self._times[digest] = time.time()
            due = (
                len(self._times) >= ACCESS_FLUSH_RECORDS
                or time.monotonic() - self._last_flush >= ACCESS_FLUSH_SECONDS
            )
        if due:
            self.flush()

    def flush(self) -> None:
        """Write the pending access records (and counter deltas) as one batch file for the daemon."""
        if os.getpid() != self._pid:
            return
        with self._lock:
            root, times, delta = self._times_root, self._times, self._delta
            self._times, self._times_root = {}, None
            self._delta = {"direct_reads": 0, "direct_bytes": 0, "fallbacks": {}}
            self._last_flush = time.monotonic()
            self._seq += 1
            seq = self._seq
        if root is None:
            if delta["direct_reads"] or delta["fallbacks"]:
                root = self._any_root()
            if root is None:
                return
        directory = root / protocol.ACCESS_DIR
        tmp = directory / f".tmp.{os.getpid()}.{seq}"
        try:
            with open(tmp, "wb") as f:
                f.write(protocol.encode_access_batch(delta, times))
            os.rename(tmp, directory / f"{os.getpid()}-{seq}-{os.urandom(4).hex()}{protocol.ACCESS_SUFFIX}")
        except OSError:
            # No writable access dir (a read-only bind mount): the reads were served, but LRU
            # and `tierfs status` will not see them.
            with self._lock:
                self._dropped += len(times)

    def _any_root(self) -> Path | None:
        for view in _views().values():
            if isinstance(view, CacheView):
                return view.root
        return None

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
        try:
            self._view = self._reader.view(st.st_dev)
            self._version = self._view.resolve(st)
            self._size = self._version.size
        except Fallback as fb:
            self._reader.count_fallback(fb.reason)
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
            self._reader.count_fallback(fb.reason)
            changed = True
        if changed:
            self._reader.count_fallback("dirty")
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
        self._reader.count_fallback("miss")  # still a miss: the daemon fetched it, not a hit
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
                self._reader.count_fallback(fb.reason)
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
                    self._reader.count_fallback(fb.reason)
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
