"""Mount lifecycle: preflight, daemonize, wire the layers, serve, shut down cleanly.

Start-up order matters:
1. Validate everything that can be wrong *before* mounting (mountpoint, bucket,
   credentials, endpoint, cache dir lock), so bad input gets one line and exit != 0
   with nothing mounted.
2. Without ``-f`` we fork first (before any thread, LMDB handle or trio loop exists),
   and the parent waits on a pipe: it exits 0 only when the child reports the mount
   live, otherwise it prints the child's one-line reason and exits 1.
3. The mount is live once ``pyfuse3.init`` returned and the loop runs; only then are
   READY=1 (systemd) and the parent notified and the kernel knobs raised.

Shut-down: SIGTERM/SIGINT or ``fusermount3 -u`` end ``pyfuse3.main``; background
tasks are cancelled, write-back is drained (unless unmounted with --no-flush),
access times are persisted and LMDB is closed.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

from .. import mountinfo
from ..config import MountConfig
from ..errors import ConfigError, TierfsError
from . import memory
from .mount import Mount

log = logging.getLogger("tierfs")


def _mounted_at(mountpoint: str) -> bool:
    """True if something is mounted at ``mountpoint`` (from /proc/self/mountinfo; never stats it)."""
    return any(info.mountpoint == mountpoint for info in mountinfo.entries())


def check_mountpoint(path: Path, *, nonempty: bool = False) -> str:
    """The absolute mountpoint, refused unless it is an existing directory, not mounted on, and
    empty (unless ``nonempty``): mounting over files hides them, which is rarely what was meant
    (a typo'd path, or a mount that already failed once and left data behind), so, as s3fs
    does, it takes an explicit ``-o nonempty``. Runs before anything is created or locked."""
    mountpoint = os.path.abspath(path)
    if _mounted_at(mountpoint):
        raise ConfigError(f"{mountpoint} is already a mount point")
    if not os.path.isdir(mountpoint):
        raise ConfigError(f"mount point {mountpoint} does not exist or is not a directory")
    if not nonempty:
        try:
            with os.scandir(mountpoint) as entries:
                occupied = next(entries, None) is not None
        except OSError as exc:
            raise ConfigError(f"cannot read mount point {mountpoint}: {exc.strerror or exc}") from None
        if occupied:
            raise ConfigError(
                f"mount point {mountpoint} is not empty (use -o nonempty to mount over its contents)"
            )
    return mountpoint


def run_mount(cfg: MountConfig) -> int:
    """Entry point of ``tierfs mount``. Returns the process exit code."""
    try:
        cfg.validate()
        cfg.mountpoint = Path(check_mountpoint(cfg.mountpoint, nonempty=cfg.nonempty))
    except ConfigError as exc:
        print(f"tierfs: error: {exc}", file=sys.stderr)
        return 2
    if cfg.foreground:
        return _serve_reporting(cfg, report=None)
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: becomes the daemon
        os.close(read_fd)
        os.setsid()
        _detach_stdio()
        code = _serve_reporting(cfg, report=write_fd)
        os._exit(code)
    os.close(write_fd)
    message = _read_all(read_fd)
    if message.startswith("OK"):
        return 0
    _, code = os.waitpid(pid, 0)
    reason = message.removeprefix("ERR ").strip() or "the mount daemon exited before the mount was live"
    print(f"tierfs: error: {reason}", file=sys.stderr)
    return os.waitstatus_to_exitcode(code) or 1


def _read_all(fd: int) -> str:
    chunks = []
    while True:
        data = os.read(fd, 4096)
        if not data:
            break
        chunks.append(data)
    os.close(fd)
    return b"".join(chunks).decode(errors="replace")


def _detach_stdio() -> None:
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)
    os.close(devnull)


def _serve_reporting(cfg: MountConfig, report: int | None) -> int:
    """Run the mount; report 'OK' or 'ERR reason' on ``report`` (the parent's pipe), once."""

    def tell(message: str) -> None:
        nonlocal report
        if report is not None:
            try:
                os.write(report, message.encode())
            finally:
                os.close(report)
                report = None

    memory.limit_arenas()  # before any worker thread exists (docs in tierfs/daemon/memory.py)
    try:
        with Mount(cfg, daemonized=report is not None) as mount:
            mount.serve(on_live=lambda: tell("OK\n"))
        return 0
    except TierfsError as exc:
        message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        tell(f"ERR {message}\n")
        if report is None:
            print(f"tierfs: error: {message}", file=sys.stderr)
        return 1
    except RuntimeError as exc:  # pyfuse3.init failures (permissions, bad options)
        tell(f"ERR mount failed: {exc}\n")
        if report is None:
            print(f"tierfs: error: mount failed: {exc}", file=sys.stderr)
        return 1
    except BaseException as exc:
        log.exception("mount daemon failed")
        tell(f"ERR {type(exc).__name__}: {exc}\n")
        return 1
    finally:
        tell("ERR the mount daemon stopped before the mount was live\n")
