"""Raise the kernel's per-mount FUSE knobs once the mount is live (root only).

libfuse gives no way to set these through mount options (``max_background`` and
``max_readahead`` are rejected by ``fuse_session_new``), but the kernel exposes them in
sysfs once the connection exists:

* ``/sys/class/bdi/<major>:<minor>/read_ahead_kb`` - the readahead window. The default
  128 KiB means one 128 KiB READ at a time for a sequential reader, so every request pays
  a full daemon round trip; a window of several MiB lets the kernel keep many 1 MiB READs
  in flight, which the daemon serves concurrently.
* ``/sys/fs/fuse/connections/<id>/max_background`` (default 12) - how many asynchronous
  (readahead, write-back) requests may be queued to the daemon at once.
* ``/sys/fs/fuse/connections/<id>/congestion_threshold`` (default 9) - above this many
  background requests the kernel *skips* readahead, so a low value throttles a wide
  readahead window back to almost nothing.

The mount's device number comes from ``/proc/self/mountinfo``. The mountpoint is never
``stat``-ed: the daemon calls this from inside its own start-up, and a stat of its own
mountpoint would be a FUSE request that nobody may be serving yet (a deadlock).

Everything is best effort: without root, or without fusectl mounted (containers), the
knobs are skipped with a debug message and the mount simply runs with kernel defaults.
"""

from __future__ import annotations

import errno
import logging
import os
from pathlib import Path

from .. import mountinfo

log = logging.getLogger(__name__)

# 16 MiB: sequential reads of large objects (checkpoints, shards, media) need about
# bandwidth x latency bytes in flight; 1 GB/s at ~15 ms per request is ~16 MiB. The kernel
# grows the window only for sequential streams (a random reader's window starts from its
# own request size), so a large value costs little for shuffled small-file reads.
DEFAULT_READ_AHEAD_KB = 16384
# 64 in-flight async requests cover a 16 MiB window in 1 MiB READs four times over, leaving
# room for write-back while a reader streams; the daemon runs each request as a trio task.
DEFAULT_MAX_BACKGROUND = 64
# 75 % of max_background, the same ratio as the kernel's own defaults (9 of 12).
DEFAULT_CONGESTION_THRESHOLD = 48

def _write_existing(path: Path, text: str) -> None:
    """Write to a file that must already exist: sysfs attributes are never created (no O_CREAT)."""
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.write(fd, text.encode())
    finally:
        os.close(fd)


def _write_knob(path: Path, value: int) -> bool:
    """Write one sysfs value; False (logged at debug) if the file is absent or not ours to write."""
    try:
        _write_existing(path, f"{value}\n")
    except OSError as exc:
        if exc.errno in (errno.ENOENT, errno.EACCES, errno.EPERM, errno.EROFS):
            log.debug("skipping kernel knob %s: %s", path, exc.strerror)
            return False
        log.warning("could not set kernel knob %s=%d: %s", path, value, exc)
        return False
    return True


def ensure_fusectl(sysfs_root: str = "/sys") -> bool:
    """Mount the fusectl filesystem if it is missing (systemd normally does it at boot).

    Without it ``/sys/fs/fuse/connections`` is empty and neither ``max_background`` nor
    the ``abort`` escape hatch is reachable. Needs root; silently does nothing otherwise.
    """
    target = Path(sysfs_root) / "fs" / "fuse" / "connections"
    if not target.is_dir() or any(target.iterdir()):
        return target.is_dir()
    if any(m.fstype == "fusectl" for m in mountinfo.entries()):
        return True
    import subprocess

    result = subprocess.run(
        ["mount", "-t", "fusectl", "fusectl", str(target)], capture_output=True, text=True, check=False
    )
    if result.returncode != 0:
        log.debug("cannot mount fusectl: %s", result.stderr.strip())
    return result.returncode == 0


def tune(
    mountpoint: str,
    *,
    read_ahead_kb: int = DEFAULT_READ_AHEAD_KB,
    max_background: int = DEFAULT_MAX_BACKGROUND,
    congestion_threshold: int = DEFAULT_CONGESTION_THRESHOLD,
    sysfs_root: str = "/sys",
    mountinfo_text: str | None = None,
) -> dict[str, int]:
    """Apply the knobs to the live FUSE mount at ``mountpoint``; return the ones that were set.

    Never raises for an environment that forbids tuning. Only files opened after this
    call see the new readahead window (the kernel copies it into each open file).
    """
    if sysfs_root == "/sys" and mountinfo_text is None and os.geteuid() == 0:
        ensure_fusectl()
    info = mountinfo.fuse_mount_at(mountpoint, mountinfo_text)
    if info is None:
        log.warning("no FUSE mount at %s in mountinfo; kernel knobs left at defaults", mountpoint)
        return {}
    root = Path(sysfs_root)
    connection = root / "fs" / "fuse" / "connections" / str(info.connection)
    # max_background before congestion_threshold: the pair is then never inverted midway.
    knobs = [
        ("read_ahead_kb", root / "class" / "bdi" / info.bdi_name / "read_ahead_kb", read_ahead_kb),
        ("max_background", connection / "max_background", max_background),
        ("congestion_threshold", connection / "congestion_threshold", congestion_threshold),
    ]
    applied = {name: value for name, path, value in knobs if _write_knob(path, value)}
    if applied:
        log.info("tuned FUSE connection %s at %s: %s", info.bdi_name, mountpoint, applied)
    return applied


def abort_connection(connection: int, *, sysfs_root: str = "/sys") -> bool:
    """Abort a hung FUSE connection so callers get ENOTCONN instead of hanging in D state.

    ``connection`` is :attr:`tierfs.mountinfo.MountInfo.connection` (the minor number for ``fuse.*`` mounts).
    Returns False if no such connection exists (already gone); any other failure, notably
    PermissionError when not root, propagates because the caller asked for this explicitly.
    """
    path = Path(sysfs_root) / "fs" / "fuse" / "connections" / str(connection) / "abort"
    try:
        _write_existing(path, "1\n")
    except FileNotFoundError:
        return False
    return True
