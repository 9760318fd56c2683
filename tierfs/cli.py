"""The ``tierfs`` command line and the ``mount.tierfs`` helper.

One table (:data:`MOUNT_OPTIONS`) describes every mount option once; it drives both
the long ``--options`` and the ``-o name=value`` form that fstab, mount(8) and
mount.fuse3 use, so the two spellings can never drift apart. Long options win over
``-o`` values; within ``-o`` the last occurrence wins.

Error contract: every expected failure is one line ``tierfs: error: ...`` on stderr,
exit 2 for usage/configuration errors and 1 for runtime failures; no tracebacks.
Commands other than ``mount`` talk to the daemon over the control socket (see
:mod:`tierfs.control.client`) and never stat inside a mount, so they work on a hung mount.
"""

from __future__ import annotations

import argparse
import grp
import json
import math
import os
import pwd
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, MutableMapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

from . import __version__, snapshot_cli
from .config import MountConfig, Source
from .control.client import ControlClient
from .control.progress import ProgressBar
from .control.registry import ControlError, ControlTimeout, ControlUnavailable, mount_holding, pid_alive
from .errors import ConfigError, FlushFailed
from .units import format_bytes, parse_duration, parse_mode, parse_size, split_addr

ENDPOINT_ENV = ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")
UMOUNT_WAIT = 60.0  # seconds to wait for the daemon to exit after the kernel unmount
# flush/umount give up after this long without a line from the daemon (a flush sends one every few
# seconds), and past the deadline the daemon states, so a hung daemon hangs neither.
FLUSH_SILENCE = 30.0
STATUS_AFTER_TIMEOUT = 5.0  # how long a timed-out flush waits for status, to name the failing files

# mount(8)/systemd options that say nothing to tierfs; they reach us through fstab.
IGNORED_OPTIONS = frozenset(
    {
        "rw", "auto", "noauto", "user", "nouser", "users", "owner", "group", "_netdev", "nofail",
        "defaults", "exec", "noexec", "suid", "nosuid", "dev", "nodev", "atime", "noatime",
        "relatime", "nodiratime", "diratime", "strictatime", "lazytime",
        "default_permissions",  # always on: the kernel checks modes, we never second-guess it
    }
)  # fmt: skip
IGNORED_PREFIXES = ("x-", "comment=")


class UsageError(ConfigError):
    """Bad command line; argparse's errors are turned into this so they print as one line."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{message} (see '{self.prog} --help')")


# --------------------------------------------------------------------------- value parsers


def _parse_share(text: str) -> float:
    """``10%`` or ``0.1``; a bare number of 1 or more is refused rather than guessed at."""
    raw = text.strip()
    try:
        value = float(raw[:-1]) / 100 if raw.endswith("%") else float(raw)
    except ValueError:
        raise ConfigError(f"invalid share {text!r} (expected e.g. 10% or 0.1)") from None
    if not 0 <= value < 1:
        raise ConfigError(f"invalid share {text!r} (must be at least 0 and below 100%)")
    return value


def _parse_compression(text: str) -> int | None:
    """``none``/``off``, ``zstd`` (level 3, zstd's own default) or ``zstd:LEVEL``."""
    name, _, level = text.strip().lower().partition(":")
    if name in ("none", "off") and not level:
        return None
    if name != "zstd":
        raise ConfigError(f"invalid compression {text!r} (expected none, zstd or zstd:LEVEL)")
    if not level:
        return 3
    if not level.isdigit() or not 1 <= int(level) <= 22:
        raise ConfigError(f"invalid zstd level {level!r} (expected 1..22)")
    return int(level)


def _parse_duration(text: str) -> float:
    return parse_duration(text)


def _parse_ttl(text: str) -> float:
    return parse_duration(text, allow_indefinite=True)


def _parse_interval(text: str) -> float | None:
    """Like a duration, but ``off``/``none``/``0`` disables the periodic job."""
    if text.strip().lower() in ("off", "none", "never"):
        return None
    value = parse_duration(text)
    return value if value > 0 else None


def _parse_count(text: str, minimum: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise ConfigError(f"invalid number {text!r}") from None
    if value < minimum:
        raise ConfigError(f"{value} is too small (minimum {minimum})")
    return value


def _parse_retries(text: str) -> int:
    return _parse_count(text, 0)


def _parse_concurrency(text: str) -> int:
    return _parse_count(text, 1)


def _parse_id(text: str, lookup_name: Callable[[str], int], what: str) -> int:
    """A numeric id or a name from the passwd/group database."""
    if text.isdigit():
        return int(text)
    try:
        return lookup_name(text)
    except KeyError:
        raise ConfigError(f"unknown {what} {text!r}") from None


def _parse_uid(text: str) -> int:
    return _parse_id(text, lambda n: pwd.getpwnam(n).pw_uid, "user")


def _parse_gid(text: str) -> int:
    return _parse_id(text, lambda n: grp.getgrnam(n).gr_gid, "group")


def _parse_log_level(text: str) -> str:
    level = text.strip().upper()
    if level not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
        raise ConfigError(f"invalid log level {text!r} (expected debug, info, warning or error)")
    return level


def _parse_addr(text: str) -> str:
    """``HOST:PORT`` (``[v6]:PORT``, or ``:PORT`` for all interfaces), checked as metrics will read it."""
    try:
        split_addr(text)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    return text


def _parse_existing_file(text: str) -> str:
    path = os.path.abspath(os.path.expanduser(text))
    if not os.path.isfile(path):
        raise ConfigError(f"{text!r} is not a readable file")
    return path


def _parse_abs_path(text: str) -> Path:
    """Absolute, because the daemon outlives the caller's working directory."""
    return Path(os.path.abspath(os.path.expanduser(text)))


def _parse_str(text: str) -> str:
    if not text:
        raise ConfigError("must not be empty")
    return text


def _parse_bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "yes", "true", "on"):
        return True
    if lowered in ("0", "no", "false", "off"):
        return False
    raise ConfigError(f"invalid boolean {text!r} (expected yes or no)")


# --------------------------------------------------------------------------- the option table


@dataclass(frozen=True)
class MountOption:
    """One mount option: ``--name-with-dashes`` and ``-o name_with_underscores`` both set ``field``."""

    name: str
    help: str
    parse: Callable[[str], Any] | None = None  # None: a flag without value
    metavar: str | None = None
    field: str | None = None  # MountConfig attribute, when it differs from name
    short: str | None = None

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def target(self) -> str:
        return self.field or self.name

    def convert(self, raw: str | None, spelled: str) -> Any:
        """The config value for ``raw`` (None: a bare flag), with ``spelled`` naming it in errors."""
        try:
            if self.parse is None:
                return True if raw is None else _parse_bool(raw)
            if raw is None:
                raise ConfigError("needs a value")
            return self.parse(raw)
        except ConfigError as exc:
            raise ConfigError(f"{spelled}: {exc}") from None


MOUNT_OPTIONS: tuple[MountOption, ...] = (
    MountOption(
        "endpoint_url",
        "S3 endpoint (default: $AWS_ENDPOINT_URL_S3, then $AWS_ENDPOINT_URL)",
        _parse_str,
        "URL",
    ),
    MountOption("region", "S3 region", _parse_str, "REGION"),
    MountOption("profile", "AWS profile to take credentials from", _parse_str, "NAME"),
    MountOption(
        "credentials_file",
        "AWS shared credentials file (keeps secrets off the command line)",
        _parse_existing_file,
        "FILE",
    ),
    MountOption(
        "cache_dir", "persistent cache directory (default: under /var/cache/tierfs)", _parse_abs_path, "DIR"
    ),
    MountOption(
        "cache_size", "cache size cap, e.g. 200G (default: only --cache-min-free applies)", parse_size, "SIZE"
    ),
    MountOption(
        "cache_min_free",
        "share of the cache disk kept free, e.g. 10%% or 0.1 (default 10%%)",
        _parse_share,
        "PCT",
    ),
    MountOption(
        "cache_max_age",
        "drop cached data unused for this long (default 1d; 'indefinite')",
        _parse_ttl,
        "DURATION",
    ),
    MountOption("cache_compression", "none, zstd or zstd:LEVEL (default none)", _parse_compression, "ALGO"),
    MountOption(
        "cache_group",
        "let members of GROUP read the cache directly with tierfs.reader (default: its owner only)",
        _parse_gid,
        "GROUP",
    ),
    MountOption(
        "metadata_ttl", "trust listed metadata this long, or 'indefinite' (default 60)", _parse_ttl, "SECONDS"
    ),
    MountOption("read_only", "mount read-only (-o ro does the same)"),
    MountOption("nonempty", "mount even if MOUNTPOINT is not empty (its entries are hidden while mounted)"),
    MountOption("foreground", "stay in the foreground", short="-f"),
    MountOption("allow_other", "let other users access the mount"),
    MountOption("uid", "owner of objects without POSIX metadata (default: you)", _parse_uid, "UID"),
    MountOption("gid", "group of objects without POSIX metadata (default: yours)", _parse_gid, "GID"),
    MountOption("file_mode", "mode of files without POSIX metadata (default 0644)", parse_mode, "MODE"),
    MountOption("dir_mode", "mode of directories without POSIX metadata (default 0755)", parse_mode, "MODE"),
    MountOption("timeout", "timeout of one S3 request (default 30)", _parse_duration, "SECONDS"),
    MountOption("retries", "extra attempts after a transient S3 failure (default 2)", _parse_retries, "N"),
    MountOption("log_level", "debug, info, warning or error (default info)", _parse_log_level, "LEVEL"),
    MountOption("log_file", "write the log to FILE", _parse_abs_path, "FILE"),
    MountOption(
        "writeback_delay",
        "upload a written file this long after its last close (default 5s)",
        _parse_duration,
        "DURATION",
    ),
    MountOption(
        "flush_timeout",
        "flush, umount and SIGTERM give up on uploads that keep failing after this long (default 600)",
        _parse_duration,
        "SECONDS",
    ),
    MountOption(
        "import_interval",
        "re-list directories this often to pick up remote changes (default off)",
        _parse_interval,
        "DURATION",
    ),
    MountOption("metrics_addr", "serve Prometheus metrics on HOST:PORT", _parse_addr, "HOST:PORT"),
    MountOption("s3_concurrency", "parallel S3 requests (default 16)", _parse_concurrency, "N"),
    MountOption(
        "shared_cache",
        "a cache tier shared by nodes, in a bucket of an S3-compatible cluster (default off)",
        Source.parse,
        "s3://BUCKET[/PREFIX]",
    ),
    MountOption(
        "shared_cache_endpoint_url", "endpoint of the shared tier (default: the origin's)", _parse_str, "URL"
    ),
    MountOption(
        "shared_cache_profile", "AWS profile for the shared tier (default: the origin's)", _parse_str, "NAME"
    ),
    MountOption(
        "shared_cache_timeout",
        "a read waits this long for the shared tier before using the origin (default 0.5)",
        _parse_duration,
        "SECONDS",
    ),
    MountOption("part_size", "part size of multipart uploads (default 16M)", parse_size, "SIZE"),
    MountOption(
        "multipart_threshold", "upload files from this size as multipart (default 64M)", parse_size, "SIZE"
    ),
    MountOption(
        "upload_concurrency",
        "parts uploaded at once, over all files; memory is this many parts (default 8)",
        _parse_concurrency,
        "N",
    ),
    MountOption("debug_fuse", "log every FUSE request (very verbose)", field="fuse_debug"),
    MountOption(
        "snapshot",
        "mount the snapshot NAME of SOURCE (or a manifest URL) read-only, without LIST (docs/snapshots.md)",
        _parse_str,
        "NAME|URL",
    ),
    MountOption(
        "as_of",
        "mount SOURCE read-only as it was at TIME (a versioned bucket), e.g. 2026-12-01T00:00:00Z",
        _parse_str,
        "TIME",
    ),
)
_OPTIONS_BY_NAME = {opt.name: opt for opt in MOUNT_OPTIONS}


def parse_o_options(text: str, *, sloppy: bool = False) -> dict[str, Any]:
    """Parse one ``-o a=b,c`` string into MountConfig field values.

    mount(8)/systemd options are ignored, ``ro`` means read-only. Unknown options are
    an error unless ``sloppy`` (mount(8)'s ``-s``), because a typo in fstab silently
    ignored would give a mount that behaves differently from what the admin wrote.
    """
    values: dict[str, Any] = {}
    for item in text.split(","):
        item = item.strip()
        if not item:
            continue
        name, eq, raw = item.partition("=")
        if name in IGNORED_OPTIONS or item.startswith(IGNORED_PREFIXES):
            continue
        if name == "ro" and not eq:
            values["read_only"] = True
            continue
        opt = _OPTIONS_BY_NAME.get(name.replace("-", "_"))
        if opt is None:
            if sloppy:
                continue
            raise ConfigError(f"unknown mount option {name!r} in -o {text!r}")
        values[opt.target] = opt.convert(raw if eq else None, f"-o {opt.name}")
    return values


def add_mount_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("source", metavar="SOURCE", help="s3://BUCKET[/PREFIX]")
    parser.add_argument("mountpoint", metavar="MOUNTPOINT", help="an existing empty directory")
    for opt in MOUNT_OPTIONS:
        flags = [opt.flag] + ([opt.short] if opt.short else [])
        if opt.parse is None:
            parser.add_argument(
                *flags, dest=opt.name, action="store_true", default=argparse.SUPPRESS, help=opt.help
            )
        else:
            parser.add_argument(
                *flags, dest=opt.name, metavar=opt.metavar, default=argparse.SUPPRESS, help=opt.help
            )
    parser.add_argument(
        "-o",
        dest="options",
        action="append",
        default=[],
        metavar="OPT[=VAL],...",
        help="mount(8)-style options, '_' for '-' (e.g. -o cache_size=200G,ro)",
    )


def config_from_namespace(ns: argparse.Namespace, *, sloppy: bool = False) -> MountConfig:
    """Merge ``-o`` values and long options (which win) into a validated MountConfig."""
    values: dict[str, Any] = {}
    for text in ns.options:
        values.update(parse_o_options(text, sloppy=sloppy))
    for opt in MOUNT_OPTIONS:
        if hasattr(ns, opt.name):
            raw = getattr(ns, opt.name)
            values[opt.target] = opt.convert(None if raw is True else raw, opt.flag)
    if values.get("endpoint_url") is None:
        values["endpoint_url"] = next((os.environ[v] for v in ENDPOINT_ENV if os.environ.get(v)), None)
    config = MountConfig(
        source=Source.parse(ns.source), mountpoint=Path(os.path.abspath(ns.mountpoint)), **values
    )
    config.validate()
    return config


def parse_mount_args(argv: Sequence[str]) -> MountConfig:
    """``SOURCE MOUNTPOINT [options]`` (what follows ``tierfs mount``) as a MountConfig."""
    parser = _Parser(prog="tierfs mount")
    add_mount_arguments(parser)
    return config_from_namespace(parser.parse_args(list(argv)))


def apply_environment(config: MountConfig, environ: MutableMapping[str, str]) -> None:
    """Hand file-based settings to boto3 through the environment, which the daemon inherits
    across its fork; secrets themselves never pass through our command line."""
    if config.credentials_file:
        environ["AWS_SHARED_CREDENTIALS_FILE"] = config.credentials_file


def _run_mount(config: MountConfig) -> int:
    apply_environment(config, os.environ)
    from .daemon.lifecycle import run_mount  # lazy: --help and option parsing work without pyfuse3

    return run_mount(config)


# --------------------------------------------------------------------------- commands


def _mountpoint_record(path: str) -> dict[str, Any]:
    """The registry record of the mount whose mountpoint is exactly ``path`` (symlinks allowed)."""
    record, rel = mount_holding(path)
    if rel != ".":
        raise ControlError(
            f"{path} is not a mountpoint (it is inside the tierfs mount at {record['mountpoint']})"
        )
    return record


def _client(record: Mapping[str, Any]) -> ControlClient:
    return ControlClient(str(record["socket"]), mountpoint=str(record["mountpoint"]))


def _client_for_mountpoint(path: str) -> ControlClient:
    return _client(_mountpoint_record(path))


def _call_with_progress(
    client: ControlClient, op: str, args: Mapping[str, Any], label: str, silence: float | None = None
) -> Any:
    """Call ``op`` drawing its progress; ``silence`` bounds the wait for each line (None: Ctrl-C only)."""
    bar = ProgressBar(label)
    try:
        return client.call(op, args, on_progress=bar.update, timeout=silence)
    finally:
        bar.finish()


def cmd_mount(ns: argparse.Namespace) -> int:
    config = config_from_namespace(ns, sloppy=getattr(ns, "sloppy", False))
    if getattr(ns, "fake", False):
        return 0
    return _run_mount(config)


def cmd_umount(ns: argparse.Namespace) -> int:
    path = os.path.abspath(ns.mountpoint)
    try:
        record: dict[str, Any] | None = _mountpoint_record(path)
    except ControlUnavailable:
        record = None  # no live daemon (crashed, or never registered): still unmount the kernel side
    if record is not None and not ns.no_flush:
        try:
            _flush(record, ns.flush_timeout)
        except ControlUnavailable:
            pass  # the daemon is gone: unmounting is still the right thing
        except FlushFailed as exc:
            _print_failures("tierfs", exc)
            raise ControlError(
                f"flush failed ({exc.reason}), not unmounting: {_not_uploaded(exc)}; it stays staged and "
                "journaled (--no-flush unmounts anyway, and the next mount uploads it)"
            ) from None
        except ControlError as exc:
            raise ControlError(
                f"flush failed, not unmounting: {exc} (--no-flush unmounts anyway; dirty data stays "
                "in the local journal and is uploaded by the next mount)"
            ) from None
    _kernel_unmount(path, lazy=ns.lazy)
    if record is not None:
        _wait_for_exit(int(record["pid"]), ns.wait)
    return 0


def _flush(record: Mapping[str, Any], timeout: float | None) -> Any:
    """Ask the daemon to flush (within ``timeout``, default its --flush-timeout); FlushFailed if not all
    was uploaded. The wait is bounded even when the daemon is stuck: its failing files then come
    from ``status``, if it still answers that."""
    client = _client(record)
    args = {} if timeout is None else {"timeout": timeout}
    try:
        return _call_with_progress(client, "flush", args, "flush", silence=FLUSH_SILENCE)
    except ControlTimeout as exc:
        try:
            status = client.call("status", {}, timeout=STATUS_AFTER_TIMEOUT)
            failing = status.get("failing") if isinstance(status, Mapping) else None
        except ControlError:
            failing = None
        named = {str(k): str(v) for k, v in failing.items()} if isinstance(failing, Mapping) else {}
        raise FlushFailed(named, str(exc)) from None


def _print_failures(prog: str, exc: FlushFailed) -> None:
    """One line per file that could not be uploaded, with its last error."""
    for path, error in sorted(exc.failures.items()):
        print(f"{prog}: error: flush failed: {path}: {' '.join(error.split())}", file=sys.stderr)


def _not_uploaded(exc: FlushFailed) -> str:
    count = len(exc.failures)
    if not count:
        return "changes not uploaded"
    return f"{count} file{'s' if count != 1 else ''} not uploaded"


def _kernel_unmount(path: str, *, lazy: bool) -> None:
    """fusermount3 works for the mount's owner without root; umount(8) is the fallback."""
    commands = [["fusermount3", "-u", *(["-z"] if lazy else []), path],
                ["umount", *(["-l"] if lazy else []), path]]  # fmt: skip
    for command in commands:
        if shutil.which(command[0]) is None:
            continue
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        if done.returncode == 0:
            return
        detail = " ".join(done.stderr.split()) or f"exit status {done.returncode}"
        raise ControlError(f"{command[0]} failed: {detail}")
    raise ControlError("neither fusermount3 nor umount is installed")


def _wait_for_exit(pid: int, limit: float) -> None:
    deadline = time.monotonic() + limit
    while pid_alive(pid):
        if time.monotonic() >= deadline:
            raise ControlError(f"unmounted, but the daemon (pid {pid}) is still running after {limit:g}s")
        time.sleep(0.1)


def flatten(data: Mapping[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    """Nested status dicts as dotted keys, in the daemon's order."""
    rows: list[tuple[str, Any]] = []
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            rows.extend(flatten(value, name + "."))
        else:
            rows.append((name, value))
    return rows


def format_value(key: str, value: Any) -> str:
    """Sizes (a ``bytes`` or ``size`` word in the key) via format_bytes; infinities as 'indefinite'."""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int | float):
        words = key.rsplit(".", 1)[-1].split("_")
        if isinstance(value, float) and math.isinf(value):
            return "indefinite"
        if "bytes" in words or "size" in words:
            return format_bytes(value)
        return f"{value:g}" if isinstance(value, float) else str(value)
    if value is None:
        return "-"
    if isinstance(value, list | tuple):
        return ", ".join(str(v) for v in value) or "-"
    if isinstance(value, Mapping):
        return "-"
    return str(value)


def format_status(status: Mapping[str, Any]) -> list[str]:
    """Aligned ``key  value`` rows; ``failing`` (path -> last upload error) as a count, then one
    indented line per file, because paths make poor dotted keys."""
    failing = status.get("failing")
    if not isinstance(failing, Mapping):
        failing = None
    rows = flatten({k: len(v) if k == "failing" and failing is not None else v for k, v in status.items()})
    width = max((len(k) for k, _ in rows), default=0)
    lines: list[str] = []
    for key, value in rows:
        lines.append(f"{key.ljust(width)}  {format_value(key, value)}")
        if key == "failing" and failing is not None:
            lines.extend(
                f"  {path}: {' '.join(str(error).split())}" for path, error in sorted(failing.items())
            )
    return lines


def cmd_status(ns: argparse.Namespace) -> int:
    result = _client_for_mountpoint(ns.mountpoint).call("status", {}, timeout=ns.timeout)
    if ns.json:
        print(json.dumps(result, indent=2, sort_keys=False))
    elif isinstance(result, Mapping):
        print("\n".join(format_status(result)))
    else:
        print(result)
    return 0


def cmd_stats(ns: argparse.Namespace) -> int:
    """``tierfs stats``: rates from the daemon's status counters, redrawn every interval."""
    from . import stats  # lazy: rich is imported only for this command

    poll = stats.status_poller(_client_for_mountpoint(ns.mountpoint), ns.timeout)
    try:
        return stats.run(poll, interval=ns.interval, once=ns.once, count=ns.count, force_plain=ns.plain)
    except KeyboardInterrupt:
        return 0  # Ctrl-C is how a live view is left


def cmd_flush(ns: argparse.Namespace) -> int:
    _flush(_mountpoint_record(ns.mountpoint), ns.timeout)
    return 0


def _group_by_mount(paths: Sequence[str]) -> list[tuple[dict[str, Any], list[str]]]:
    """Group PATH arguments by the mount holding them, keeping the command-line order."""
    groups: dict[str, tuple[dict[str, Any], list[str]]] = {}
    for path in paths:
        record, rel = mount_holding(path)
        groups.setdefault(str(record["socket"]), (record, []))[1].append(rel)
    return list(groups.values())


def _report_failed(op: str, result: Any) -> bool:
    """Print one line per failed file; True if there were any."""
    failed = result.get("failed") if isinstance(result, Mapping) else None
    if not failed:
        return False
    for item in failed:
        if isinstance(item, Mapping):
            line = f"{item.get('path', '?')}: {item.get('error', 'failed')}"
        else:
            line = str(item)
        print(f"tierfs: error: {op} failed: {' '.join(line.split())}", file=sys.stderr)
    return True


def _path_command(op: str, with_progress: bool) -> Callable[[argparse.Namespace], int]:
    def run(ns: argparse.Namespace) -> int:
        paths = ns.paths if isinstance(ns.paths, list) else [ns.paths]
        failed = False
        for record, rels in _group_by_mount(paths):
            args: dict[str, Any] = {"paths": rels, "recursive": ns.recursive}
            if getattr(ns, "jobs", None) is not None:
                args["jobs"] = ns.jobs
            client = _client(record)
            if with_progress:
                result = _call_with_progress(client, op, args, op)
            else:
                result = client.call(op, args, timeout=None)
            failed = _report_failed(op, result) or failed
        return 1 if failed else 0

    return run


def _read_path_list(source: str, base: str) -> list[str]:
    """The paths listed in ``source`` ('-': stdin), one per line, made absolute against ``base``;
    blank lines and lines starting with '#' are skipped."""
    try:
        if source == "-":
            lines = sys.stdin.read().splitlines()
        else:
            with open(source, encoding="utf-8", errors="surrogateescape") as fh:
                lines = fh.read().splitlines()
    except OSError as exc:
        raise ConfigError(f"cannot read the path list {source}: {exc.strerror or exc}") from None
    listed = (raw.strip() for raw in lines)
    return [os.path.join(base, line) for line in listed if line and not line.startswith("#")]


def _prefetch_command(plain: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """``tierfs prefetch``: PATH arguments as before; with ``--from FILE`` the listed files too, in
    their order, in requests of a few thousand paths. Every listed path is checked to lie
    on a tierfs mount before anything is sent (one line names the first that does not)."""
    from .reader.hints import MountPaths, batches

    def run(ns: argparse.Namespace) -> int:
        if ns.from_file is None:
            if not ns.paths:
                raise ConfigError("tierfs prefetch needs a PATH or --from FILE")
            return plain(ns)
        if len(ns.paths) > 1:
            raise ConfigError("with --from, give at most one PATH: the directory relative paths start from")
        base = os.path.abspath(ns.paths[0]) if ns.paths else os.getcwd()
        mounts = MountPaths()
        groups: dict[str, tuple[dict[str, Any], list[str]]] = {}
        for path in _read_path_list(ns.from_file, base):
            found = mounts.locate(path)
            if found is None:
                raise ConfigError(f"{path} (listed in {ns.from_file}) is not on a tierfs mount")
            groups.setdefault(str(found[0]["socket"]), (found[0], []))[1].append(found[1])
        failed = False
        for record, rels in groups.values():
            client = _client(record)
            for batch in batches(rels):
                args: dict[str, Any] = {"paths": batch, "recursive": ns.recursive}
                if ns.jobs is not None:
                    args["jobs"] = ns.jobs
                result = _call_with_progress(client, "prefetch", args, "prefetch")
                failed = _report_failed("prefetch", result) or failed
        return 1 if failed else 0

    return run


def _positive_int(text: str) -> int:
    try:
        return _parse_count(text, 1)
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _seconds(text: str) -> float:
    try:
        return parse_duration(text)
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _positive_seconds(text: str) -> float:
    value = _seconds(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive duration")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="tierfs", description="Mount an S3 bucket as POSIX files with a local cache.")
    parser.add_argument("--version", action="version", version=f"tierfs {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    mount = sub.add_parser("mount", help="mount s3://BUCKET[/PREFIX] on MOUNTPOINT")
    add_mount_arguments(mount)
    mount.set_defaults(func=cmd_mount)

    umount = sub.add_parser("umount", help="flush, then unmount")
    umount.add_argument("mountpoint", metavar="MOUNTPOINT")
    umount.add_argument("--no-flush", action="store_true", help="unmount without uploading dirty files first")
    umount.add_argument("--lazy", action="store_true", help="detach now, clean up when no longer busy")
    umount.add_argument(
        "--wait",
        type=_seconds,
        default=UMOUNT_WAIT,
        metavar="SECONDS",
        help=f"wait this long for the daemon to exit (default {UMOUNT_WAIT:g})",
    )
    umount.add_argument(
        "--flush-timeout",
        type=_positive_seconds,
        default=None,
        metavar="SECONDS",
        help="give up the flush after this long (default: the mount's --flush-timeout)",
    )
    umount.set_defaults(func=cmd_umount)

    status = sub.add_parser("status", help="show the state of a mount")
    status.add_argument("mountpoint", metavar="MOUNTPOINT")
    status.add_argument("--json", action="store_true", help="print machine-readable JSON")
    status.add_argument("--timeout", type=_seconds, default=30.0, metavar="SECONDS", help=argparse.SUPPRESS)
    status.set_defaults(func=cmd_status)

    flush = sub.add_parser("flush", help="upload every dirty file now")
    flush.add_argument("mountpoint", metavar="MOUNTPOINT")
    flush.add_argument(
        "--timeout",
        type=_positive_seconds,
        default=None,
        metavar="SECONDS",
        help="give up after this long (default: the mount's --flush-timeout)",
    )
    flush.set_defaults(func=cmd_flush)

    path_commands = (
        ("prefetch", "download files into the cache", True),
        ("evict", "drop files from the cache", False),
        ("pin", "keep files in the cache regardless of age and size", False),
        ("unpin", "undo pin", False),
    )
    for name, text, progress in path_commands:
        cmd = sub.add_parser(name, help=text)
        cmd.add_argument("paths", nargs="*" if name == "prefetch" else "+", metavar="PATH")
        cmd.add_argument(
            "--recursive", "-r", action="store_true", help="include everything below directories"
        )
        if name == "prefetch":
            cmd.add_argument(
                "--jobs",
                "-j",
                type=_positive_int,
                default=None,
                metavar="N",
                help="files downloaded in parallel",
            )
            cmd.add_argument(
                "--from",
                dest="from_file",
                metavar="FILE",
                help="also the paths listed in FILE, one per line ('-': stdin); relative ones are "
                "relative to PATH (then the only PATH) or the current directory",
            )
            cmd.set_defaults(func=_prefetch_command(_path_command(name, progress)))
            continue
        cmd.set_defaults(func=_path_command(name, progress))

    snapshot_cli.add_parser(sub, flush=_flush)

    refresh = sub.add_parser("refresh", help="forget cached metadata and re-list from S3")
    refresh.add_argument("paths", metavar="PATH")
    refresh.add_argument("--recursive", "-r", action="store_true", help="also below directories")
    refresh.set_defaults(func=_path_command("refresh", False))

    stats = sub.add_parser("stats", help="a live view of a mount: reads by tier, S3 latency, write-back")
    stats.add_argument("mountpoint", metavar="MOUNTPOINT")
    stats.add_argument("--once", action="store_true", help="print one frame (after one interval) and exit")
    stats.add_argument(
        "--interval", type=_positive_seconds, default=1.0, metavar="SECONDS", help="redraw period (default 1)"
    )
    stats.add_argument("--count", type=_positive_int, default=None, metavar="N", help="stop after N frames")
    stats.add_argument("--plain", action="store_true", help="plain text frames even on a terminal")
    stats.add_argument("--timeout", type=_seconds, default=10.0, metavar="SECONDS", help=argparse.SUPPRESS)
    stats.set_defaults(func=cmd_stats)

    doctor = sub.add_parser("doctor", help="check this machine for what mounts need, and say how to fix it")
    doctor.add_argument(
        "source", nargs="?", metavar="SOURCE", help="s3://BUCKET[/PREFIX]: also check the bucket"
    )
    for opt in MOUNT_OPTIONS:
        if opt.name in DOCTOR_OPTIONS | DOCTOR_SHARED_OPTIONS:
            flags = [opt.flag]
            if opt.parse is None:
                doctor.add_argument(*flags, dest=opt.name, action="store_true", help=opt.help)
            else:
                doctor.add_argument(*flags, dest=opt.name, metavar=opt.metavar, default=None, help=opt.help)
    doctor.add_argument(
        "--timeout", type=_positive_seconds, default=5.0, metavar="SECONDS",
        help="limit for reaching the endpoint and the bucket (default 5)",
    )  # fmt: skip
    # The PATH mount.fuse3's /bin/sh searches; unset by default, as mount(8) leaves it (tests).
    doctor.add_argument("--mount-path", default=None, help=argparse.SUPPRESS)
    doctor.set_defaults(func=cmd_doctor)
    return parser


# What `tierfs doctor` takes from the mount options: the ones its checks depend on.
DOCTOR_OPTIONS = frozenset(
    {"endpoint_url", "region", "profile", "credentials_file", "cache_dir", "cache_size", "cache_min_free",
     "allow_other"}
)  # fmt: skip


# The shared-tier options: with --shared-cache, doctor also checks that tier (tierfs.doctor_shared).
DOCTOR_SHARED_OPTIONS = frozenset({"shared_cache", "shared_cache_endpoint_url", "shared_cache_profile"})


def _doctor_checks(ns: argparse.Namespace) -> Callable[[Any], list[Any]] | None:
    """The machine checks plus the shared tier's, when ``--shared-cache`` was given; else None."""
    from . import doctor, doctor_shared

    values = {
        opt.name: opt.convert(raw, opt.flag)
        for opt in MOUNT_OPTIONS
        if opt.name in DOCTOR_SHARED_OPTIONS and (raw := getattr(ns, opt.name, None)) is not None
    }
    if "shared_cache" not in values:
        if values:
            raise ConfigError("--shared-cache-endpoint-url and --shared-cache-profile need --shared-cache")
        return None
    shared = doctor_shared.SharedOptions(
        values["shared_cache"], values.get("shared_cache_endpoint_url"), values.get("shared_cache_profile")
    )
    return lambda options: doctor.run_checks(options) + doctor_shared.run_shared_checks(options, shared)


def cmd_doctor(ns: argparse.Namespace) -> int:
    """Parse like ``mount`` (same option table, same endpoint fallback), check, report."""
    from . import doctor  # lazy: boto3 is imported only for the checks

    values: dict[str, Any] = {}
    for opt in MOUNT_OPTIONS:
        raw = getattr(ns, opt.name, None)
        if opt.name in DOCTOR_OPTIONS and raw not in (None, False):
            values[opt.target] = opt.convert(None if raw is True else raw, opt.flag)
    if values.get("endpoint_url") is None:
        values["endpoint_url"] = next((os.environ[v] for v in ENDPOINT_ENV if os.environ.get(v)), None)
    source = Source.parse(ns.source) if ns.source else None
    options = doctor.Options(source=source, timeout=ns.timeout, mount_path=ns.mount_path, **values)
    checks = _doctor_checks(ns)
    return doctor.run(options) if checks is None else doctor.run(options, checks=checks)


def _run(prog: str, action: Callable[[], int]) -> int:
    """Turn expected errors into one line and an exit code."""
    try:
        return action()
    except ConfigError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    except FlushFailed as exc:
        _print_failures(prog, exc)
        print(
            f"{prog}: error: flush failed ({exc.reason}): {_not_uploaded(exc)}; it stays staged and "
            "journaled for a later flush or the next mount",
            file=sys.stderr,
        )
        return 1
    except ControlError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        where = f": {exc.filename}" if exc.filename else ""
        print(f"{prog}: error: {exc.strerror or exc}{where}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130


def main(argv: Sequence[str] | None = None) -> int:
    """``tierfs COMMAND ...``; also ``tierfs s3://... MOUNTPOINT -o ...`` as mount.fuse3 runs it."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0].startswith("s3://"):
        args.insert(0, "mount")

    def action() -> int:
        ns = build_parser().parse_args(args)
        code: int = ns.func(ns)
        return code

    return _run("tierfs", action)


def build_helper_parser() -> argparse.ArgumentParser:
    """mount(8)'s helper calling convention: ``SOURCE MOUNTPOINT [-sfnv] [-N NS] [-o OPTS] [-t TYPE]``."""
    parser = _Parser(prog="mount.tierfs", description="mount(8) helper for tierfs (fstab type 'tierfs')")
    parser.add_argument("source", metavar="SOURCE")
    parser.add_argument("mountpoint", metavar="MOUNTPOINT")
    parser.add_argument("-o", dest="options", action="append", default=[], metavar="OPTIONS")
    parser.add_argument("-s", dest="sloppy", action="store_true", help="ignore unknown options")
    parser.add_argument("-f", dest="fake", action="store_true", help="check everything but do not mount")
    parser.add_argument("-n", dest="no_mtab", action="store_true", help="accepted; there is no mtab to write")
    parser.add_argument("-v", dest="verbose", action="store_true", help="accepted")
    parser.add_argument("-N", dest="namespace", metavar="NS", help="accepted (mount namespace, unsupported)")
    parser.add_argument("-t", dest="type", metavar="TYPE", help="accepted")
    return parser


def mount_helper_main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``mount.tierfs``, which mount(8) runs for fstab entries of type ``tierfs``."""
    args = list(sys.argv[1:] if argv is None else argv)

    def action() -> int:
        ns = build_helper_parser().parse_args(args)
        if ns.namespace:
            raise ConfigError("-N (mount namespaces) is not supported")
        return cmd_mount(ns)

    return _run("mount.tierfs", action)
