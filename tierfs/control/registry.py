"""The mount registry: where a running mount's daemon can be found, by mountpoint or by any path.

Why a registry and not ioctls/xattrs on the mount: a mount that is hung (S3 down, a stuck
request) must still answer ``status`` and ``umount``, and a caller that touched a path
inside it would hang with it. So nothing here ever stats inside a mount: callers find the
daemon through small JSON files keyed by the mountpoint's path, and talk to it over the
AF_UNIX socket named there (:mod:`tierfs.control.client`). The daemon registers
(``control.ops``); the CLI, ``doctor`` and the direct reader (which takes the cache dir from
the record) look mounts up. Trio-free and stdlib only: the reader imports it in every
DataLoader worker.

Registry: ``<dir>/<sha256(mountpoint)[:24]>.json`` holding ``pid``, ``mountpoint``,
``socket``, ``source``, ``cache_dir`` and ``uid``; the socket is ``<dir>/<hash>.sock``.
``<dir>`` is ``/run/tierfs/mounts`` for root, else ``$XDG_RUNTIME_DIR/tierfs`` or
``/tmp/tierfs-<uid>``; ``$TIERFS_RUNTIME_DIR`` overrides all of them (tests, containers).
The directory is 0700 and owned by its user; the socket is 0600 and owned by the
mount's owner, and the server also checks SO_PEERCRED (uid 0 or the owner only).

Mountpoint naming: the key is ``abspath`` of the mountpoint with symlinks resolved in
its *parent* only, because resolving the last component would stat the mount root.
The mount and its callers therefore agree as long as they name the same path once the
parent is resolved; :func:`mount_holding` additionally follows symlinks component by
component from ``/`` and stops at the first registered mountpoint, so paths given
through a symlinked directory still find their mount.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import stat
from collections import deque
from pathlib import Path
from typing import Any

from ..errors import TierfsError

RUNTIME_DIR_ENV = "TIERFS_RUNTIME_DIR"
SYSTEM_REGISTRY = Path("/run/tierfs/mounts")
_MAX_SYMLINKS = 40  # Linux's MAXSYMLINKS


class ControlError(TierfsError):
    """An error reply from the daemon, or no daemon to talk to. The message is one line for the user."""


class ControlUnavailable(ControlError):
    """No daemon answers (not mounted, daemon dead, socket gone): callers such as umount may go on."""


class ControlTimeout(ControlError):
    """The daemon took the request but did not answer in time (hung, or stuck past its own deadline).

    Unlike ControlUnavailable, the daemon is there and may still hold work (umount must not
    treat it as gone).
    """


def normalize_mountpoint(path: str | os.PathLike[str]) -> str:
    """``abspath`` with symlinks resolved in the parent directory only (never stats the mount root)."""
    absolute = os.path.abspath(os.fspath(path))
    parent, name = os.path.split(absolute)
    if not name:
        return absolute
    return os.path.join(os.path.realpath(parent), name)


def _digest(normalized: str) -> str:
    return hashlib.sha256(normalized.encode("utf-8", "surrogateescape")).hexdigest()[:24]


def _candidate_dirs() -> list[Path]:
    """Registry directories in search order; the first usable one is where a mount registers."""
    override = os.environ.get(RUNTIME_DIR_ENV)
    if override:
        return [Path(override)]
    dirs = [SYSTEM_REGISTRY]
    if os.geteuid() != 0:
        xdg = os.environ.get("XDG_RUNTIME_DIR")
        if xdg and os.path.isabs(xdg):
            dirs.append(Path(xdg) / "tierfs")
        dirs.append(Path(f"/tmp/tierfs-{os.geteuid()}"))
    return dirs


def _ensure_private_dir(path: Path) -> None:
    """Create ``path`` 0700, and refuse one someone else owns: /tmp is shared, so a pre-created
    directory could otherwise let another user swap our socket or registry files."""
    path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
    with contextlib.suppress(FileExistsError):
        path.mkdir(mode=0o700)
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid():
        raise ControlError(f"refusing to use {path}: not a directory owned by uid {os.geteuid()}")
    if stat.S_IMODE(st.st_mode) != 0o700:
        os.chmod(path, 0o700)


def _writable_registry_dir() -> Path:
    errors: list[str] = []
    for candidate in _candidate_dirs():
        try:
            _ensure_private_dir(candidate)
            return candidate
        except (OSError, ControlError) as exc:
            errors.append(f"{candidate}: {exc}")
    raise ControlError("no usable registry directory (" + "; ".join(errors) + ")")


def registry_paths(mountpoint: str | os.PathLike[str]) -> tuple[Path, Path]:
    """``(json_path, sock_path)`` where a mount at ``mountpoint`` registers; creates the directory."""
    directory = _writable_registry_dir()
    digest = _digest(normalize_mountpoint(mountpoint))
    return directory / f"{digest}.json", directory / f"{digest}.sock"


def register(
    mountpoint: str | os.PathLike[str],
    *,
    source: str,
    cache_dir: str | os.PathLike[str],
    uid: int,
    pid: int | None = None,
) -> Path:
    """Write the registry record of this mount atomically; returns the JSON path."""
    json_path, sock_path = registry_paths(mountpoint)
    record = {
        "pid": os.getpid() if pid is None else pid,
        "mountpoint": normalize_mountpoint(mountpoint),
        "socket": str(sock_path),
        "source": source,
        "cache_dir": os.fspath(cache_dir),
        "uid": uid,
    }
    tmp = json_path.with_name(f"{json_path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(record) + "\n", encoding="utf-8")
    os.replace(tmp, json_path)
    return json_path


def unregister(mountpoint: str | os.PathLike[str], pid: int | None = None) -> None:
    """Remove this mount's record and socket, unless they already belong to another process."""
    pid = os.getpid() if pid is None else pid
    digest = _digest(normalize_mountpoint(mountpoint))
    for directory in _candidate_dirs():
        json_path = directory / f"{digest}.json"
        record = _read_record(json_path)
        if record is None or record.get("pid") != pid:
            continue
        for path in (Path(str(record.get("socket", directory / f"{digest}.sock"))), json_path):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()


class _Denied(Exception):
    """A registry directory exists but this user may not read it (it belongs to root)."""


def _read_record(json_path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(json_path.read_text(encoding="utf-8"))
    except PermissionError:
        raise _Denied(str(json_path.parent)) from None
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


DENIED_MESSAGE = "permission denied: only root or the mount's owner may control a tierfs mount"


def pid_alive(pid: int) -> bool:
    """True while ``pid`` runs. A zombie (exited, not yet reaped by its parent) is not alive."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def _lookup_normalized(normalized: str, denied: list[str] | None = None) -> dict[str, Any] | None:
    """The live record for ``normalized``; registry dirs we may not read are noted in ``denied``."""
    digest = _digest(normalized)
    for directory in _candidate_dirs():
        try:
            record = _read_record(directory / f"{digest}.json")
        except _Denied as exc:
            if denied is not None:
                denied.append(str(exc))
            continue
        if record is None or record.get("mountpoint") != normalized:
            continue
        pid = record.get("pid")
        if isinstance(pid, int) and pid_alive(pid):
            return record
    return None


def lookup(mountpoint: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The live registry record of the mount at ``mountpoint``, or None. Never stats inside the mount.

    Raises ControlError (permission denied) when the record may exist in a registry
    directory this user cannot read, rather than claiming there is no mount.
    """
    denied: list[str] = []
    record = _lookup_normalized(normalize_mountpoint(mountpoint), denied)
    if record is None and denied:
        raise ControlError(DENIED_MESSAGE)
    return record


def mount_holding(path: str | os.PathLike[str]) -> tuple[dict[str, Any], str]:
    """Find the mount holding ``path``: ``(record, path relative to the mountpoint)``.

    Resolves symlinks one component at a time from ``/`` and stops at the first
    registered mountpoint, so nothing inside a mount is ever looked at. The relative
    part is normalised lexically ('.' for the mount root): symlinks inside the mount
    are the daemon's business. Raises ControlUnavailable if no mount holds the path.
    """
    text = os.fspath(path)
    if not os.path.isabs(text):
        text = os.path.join(os.getcwd(), text)
    pending = deque(text.split("/"))
    current = "/"
    links = 0
    denied: list[str] = []
    while pending:
        part = pending.popleft()
        if part in ("", "."):
            continue
        if part == "..":
            current = os.path.dirname(current)
            continue
        candidate = os.path.join(current, part)
        record = _lookup_normalized(candidate, denied)
        if record is not None:
            rest = os.path.normpath("/".join(p for p in pending if p))
            if rest != ".." and not rest.startswith("../"):
                return record, rest
            current = candidate  # the path leaves the mount again: keep walking outside it
            continue
        try:
            target = os.readlink(candidate)
        except OSError:
            current = candidate  # not a symlink (or missing): take it literally
            continue
        links += 1
        if links > _MAX_SYMLINKS:
            raise ControlError(f"too many levels of symbolic links in {os.fspath(path)}")
        pending.extendleft(reversed(target.split("/")))
        if target.startswith("/"):
            current = "/"
    if denied:
        raise ControlError(DENIED_MESSAGE)
    raise ControlUnavailable(f"no tierfs mount at {os.fspath(path)}")


