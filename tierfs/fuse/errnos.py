"""Helpers shared by the FUSE adapter: error mapping and attribute conversion.

Only :class:`pyfuse3.FUSEError` may leave a handler: anything else escapes
``pyfuse3.main`` and leaves a dead mount ("Transport endpoint is not connected").
:func:`fuse_errors` maps the tierfs error vocabulary to errno values, passes the file
system's own answers (``fs.PosixError``) through unchanged, and turns every unexpected
exception into a logged EIO.
"""

from __future__ import annotations

import errno
import functools
import logging
from collections.abc import Callable, Coroutine
from typing import Any, ParamSpec, TypeVar

import pyfuse3

from ..errors import AccessDenied, NotFound, StoreError
from ..fs.posix import PosixError
from ..meta.records import Inode, Kind

log = logging.getLogger("tierfs.fuse")

P = ParamSpec("P")
T = TypeVar("T")


def errno_for(exc: BaseException) -> int:
    """The errno for one failure. Store errors: NotFound -> ENOENT, AccessDenied -> EACCES, and
    every other StoreError (Permanent, PreconditionFailed, RangeNotSatisfiable, Unavailable and
    its IntegrityError) -> EIO: a 403 is worth telling apart, the rest only says "try later"."""
    if isinstance(exc, BaseExceptionGroup):
        return errno_for(exc.exceptions[0])
    if isinstance(exc, pyfuse3.FUSEError):
        return exc.errno
    if isinstance(exc, NotFound):
        return errno.ENOENT
    if isinstance(exc, AccessDenied):  # before Permanent, its base class
        return errno.EACCES
    if isinstance(exc, StoreError):
        return errno.EIO
    if isinstance(exc, NotADirectoryError):
        return errno.ENOTDIR
    if isinstance(exc, IsADirectoryError):
        return errno.EISDIR
    if isinstance(exc, OSError) and exc.errno:
        return exc.errno
    return errno.EIO


class ErrorCounter:
    """Counts the errors handed to the kernel, for ``tierfs status``."""

    def __init__(self) -> None:
        self.count = 0


Handler = Callable[P, Coroutine[Any, Any, T]]


def fuse_errors(counter: ErrorCounter) -> Callable[[Handler[P, T]], Handler[P, T]]:
    def decorate(handler: Handler[P, T]) -> Handler[P, T]:
        @functools.wraps(handler)
        async def wrapper(*args: P.args, **kwargs: P.kwargs) -> T:
            try:
                return await handler(*args, **kwargs)
            except pyfuse3.FUSEError:
                raise
            except PosixError as exc:  # the file system's answer (EEXIST, ENOTEMPTY, ...): not a fault
                raise pyfuse3.FUSEError(exc.errno or errno.EIO) from None
            except (StoreError, OSError, ExceptionGroup) as exc:
                code = errno_for(exc)
                if code != errno.ENOENT:
                    counter.count += 1
                    log.warning("%s: %s -> %s", handler.__name__, exc, errno.errorcode.get(code, code))
                raise pyfuse3.FUSEError(code) from None
            except Exception:
                counter.count += 1
                log.exception("unexpected error in %s; answering EIO", handler.__name__)
                raise pyfuse3.FUSEError(errno.EIO) from None

        return wrapper

    return decorate


def entry_attributes(inode: Inode, *, timeout: float, blksize: int) -> pyfuse3.EntryAttributes:
    attrs = pyfuse3.EntryAttributes()
    attrs.st_ino = inode.ino
    attrs.generation = 0
    attrs.entry_timeout = timeout
    attrs.attr_timeout = timeout
    attrs.st_mode = inode.mode
    attrs.st_nlink = max(2, inode.nlink) if inode.kind is Kind.DIR else inode.nlink
    attrs.st_uid = inode.uid
    attrs.st_gid = inode.gid
    attrs.st_rdev = inode.rdev
    attrs.st_size = inode.size
    attrs.st_blksize = blksize
    attrs.st_blocks = (inode.size + 511) // 512
    attrs.st_atime_ns = inode.atime_ns
    attrs.st_mtime_ns = inode.mtime_ns
    attrs.st_ctime_ns = inode.shown_ctime_ns
    return attrs


def negative_entry(timeout: float) -> pyfuse3.EntryAttributes:
    """A cacheable 'no such entry' (st_ino 0), so repeated misses cost no round trip within the TTL."""
    attrs = pyfuse3.EntryAttributes()
    attrs.st_ino = 0
    attrs.entry_timeout = timeout
    return attrs
