"""The file-system core: POSIX semantics over the namespace, the read path and write-back, without FUSE.

``core`` holds :class:`FileSystem`, one object with every POSIX operation (lookup, getattr,
setattr, create, mknod, mkdir, symlink, readlink, link, unlink, rmdir, rename, open, read,
write, flush, fsync, release, opendir/readdir/releasedir, statfs) and the transactions that
cross the layers below; ``handles`` keeps what lives only while files are open; ``posix`` is
its vocabulary (``PosixError`` with an errno, ``Caller``, ``AttrChanges``, ``FsStats``) and
the name checks. The FUSE adapter translates into it; the in-process tests drive it directly.

It may import writeback, read, cache, meta, store and the bottom modules, never fuse, control
or daemon, and not pyfuse3. Trio loop: every call runs on the loop and keeps only short work
there (LMDB reads, dict work); LMDB writes go to worker threads through ``run_io``, S3 and disk
I/O happen in the layers it calls. Lock order, outermost first: namespace tombstone holds,
write-back's rename bracket, write-back's per-file staging lock, one LMDB write transaction
(core's docstring says what each protects).
"""

from .core import FileSystem
from .posix import AttrChanges, Caller, FsStats, PosixError

__all__ = ["AttrChanges", "Caller", "FileSystem", "FsStats", "PosixError"]
