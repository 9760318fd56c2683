"""``tierfs doctor``: check what users get wrong before a mount fails, and say how to fix each.

A failed FUSE mount from fstab or systemd usually ends in one terse line (``/bin/sh: 1:
tierfs: not found``, ``fusermount3: option allow_other only allowed if ...``) far from
its cause. Each check here looks at one such cause the way the mount itself will meet it:

* the FUSE device and ``fusermount3`` (which a non-root mount and every unmount use);
* ``user_allow_other`` in /etc/fuse.conf, only when a non-root user asks for allow_other;
* the fstab helpers as mount(8) finds them: mount(8) looks for ``mount.TYPE`` only in
  /sbin, /sbin/fs.d and /sbin/fs, and deletes PATH before it runs one, so mount.fuse3's
  ``/bin/sh -c 'tierfs ...'`` searches the shell's built-in path. The check asks that
  very shell, with an empty environment, rather than reading our own PATH, which would
  say yes for a tierfs that lives only in a virtualenv;
* the cache directory's filesystem (LMDB needs a local one, never FUSE or NFS) and its
  free space against ``--cache-min-free``;
* credentials resolvable through boto3's chain, as the daemon resolves them;
* the endpoint answering HTTP within a bounded time, and the bucket, when SOURCE is given.

Each result is ``ok``, ``warn`` (works, but probably not as meant), ``FAIL`` (the mount
or the cache will not work) or ``skip`` (not applicable); ``run`` returns 1 when any
check failed. Nothing here sends a request anywhere but the endpoint it was given: the
credential check never calls STS, and the instance-metadata lookup of boto3's chain
keeps its own 1 s timeout.
"""

from __future__ import annotations

import http.client
import os
import shutil
import ssl
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO
from urllib.parse import urlsplit

from . import __version__
from .config import DEFAULT_CACHE_ROOT, Source
from .mountinfo import PATH as MOUNTINFO_PATH
from .mountinfo import MountInfo, mount_containing
from .mountinfo import read_text as read_mountinfo
from .units import format_bytes

OK, WARN, FAIL, SKIP = "ok", "warn", "FAIL", "skip"
SBIN_DIRS = ("/sbin", "/sbin/fs.d", "/sbin/fs")  # the only places util-linux mount(8) runs helpers from
FUSE_CONF = Path("/etc/fuse.conf")
SYSTEM_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"  # where fusermount3 belongs
FUSE_DEVICE = Path("/dev/fuse")
HELPER_TIMEOUT = 20.0  # a cold start of the installed tierfs (imports) on a busy machine
NETWORK_FILESYSTEMS = frozenset(
    {"nfs", "nfs4", "cifs", "smb3", "smbfs", "9p", "ceph", "glusterfs", "lustre", "afs", "sshfs"}
)
MEMORY_FILESYSTEMS = frozenset({"tmpfs", "ramfs"})


@dataclass(frozen=True)
class Result:
    """One check: what it looked at, what it found, and (if not ok) what to do about it."""

    name: str
    status: str
    detail: str
    fix: str = ""


@dataclass
class Options:
    """What to check. The path fields exist so that tests can point the checks at fakes."""

    endpoint_url: str | None = None
    source: Source | None = None
    cache_dir: Path | None = None
    cache_size: int | None = None
    cache_min_free: float = 0.10
    allow_other: bool = False
    profile: str | None = None
    credentials_file: str | None = None
    region: str | None = None
    timeout: float = 5.0
    euid: int = field(default_factory=os.geteuid)
    fuse_device: Path = FUSE_DEVICE
    fuse_conf: Path = FUSE_CONF
    sbin_dirs: tuple[str, ...] = SBIN_DIRS
    # PATH for mount.fuse3's /bin/sh; None leaves it unset, which is what mount(8) does.
    mount_path: str | None = None


# --------------------------------------------------------------------------- FUSE


def check_fuse_device(path: Path) -> Result:
    name = "fuse device"
    try:
        st = path.stat()
    except FileNotFoundError:
        return Result(
            name,
            FAIL,
            f"{path} does not exist",
            "load the module: modprobe fuse; in a container, pass --device /dev/fuse",
        )
    if not stat.S_ISCHR(st.st_mode):
        return Result(
            name, FAIL, f"{path} is not a character device", f"rm {path} && modprobe -r fuse && modprobe fuse"
        )
    if not os.access(path, os.R_OK | os.W_OK):
        return Result(
            name,
            FAIL,
            f"{path} is not readable and writable by you",
            f"chmod 0666 {path} (Debian's default), or mount as root",
        )
    return Result(name, OK, f"{path} is a character device you can read and write")


def check_fusermount(euid: int, search_path: str) -> Result:
    """fusermount3 unmounts (``tierfs umount``, ``fusermount3 -u``) and mounts for non-root users."""
    name = "fusermount3"
    found = shutil.which("fusermount3", path=search_path)
    if found is None:
        return Result(name, FAIL, "fusermount3 is not installed", "apt-get install fuse3")
    if euid != 0 and not os.stat(found).st_mode & stat.S_ISUID:
        return Result(
            name,
            FAIL,
            f"{found} is not setuid root, so non-root mounts fail",
            f"chown root {found} && chmod u+s {found} (as root)",
        )
    return Result(name, OK, found)


def fuse_conf_allows_other(path: Path) -> bool:
    """True if ``user_allow_other`` is on a line of its own (not commented out)."""
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return False
    return any(line.split("#", 1)[0].strip() == "user_allow_other" for line in lines)


def check_allow_other(allow_other: bool, euid: int, fuse_conf: Path) -> Result:
    name = "allow_other"
    if not allow_other:
        return Result(name, SKIP, "not asked for (--allow-other)")
    if euid == 0:
        return Result(name, OK, "root may pass allow_other without user_allow_other")
    if fuse_conf_allows_other(fuse_conf):
        return Result(name, OK, f"user_allow_other is set in {fuse_conf}")
    return Result(
        name,
        FAIL,
        f"allow_other needs user_allow_other in {fuse_conf} for a non-root user",
        f"echo user_allow_other >> {fuse_conf} (as root; it lets every user share their mounts)",
    )


# --------------------------------------------------------------------------- mount(8) helpers


def shell_finds(command: str, mount_path: str | None) -> str | None:
    """Where mount.fuse3's ``/bin/sh -c`` finds ``command``: asked of /bin/sh itself, with the
    environment mount(8) leaves (no PATH at all unless ``mount_path`` is given)."""
    env = {} if mount_path is None else {"PATH": mount_path}
    try:
        done = subprocess.run(
            ["/bin/sh", "-c", f"command -v {command}"],
            env=env,
            capture_output=True,
            text=True,
            timeout=HELPER_TIMEOUT,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    found = done.stdout.strip()
    return found if done.returncode == 0 and found.startswith("/") else None


def in_sbin(name: str, sbin_dirs: Iterable[str]) -> str | None:
    for directory in sbin_dirs:
        candidate = os.path.join(directory, name)
        if os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
    return None


def this_tierfs() -> str:
    """The ``tierfs`` script next to this interpreter (what a link should point at)."""
    return str(Path(sys.executable).parent / "tierfs")


def check_fuse_helper(mount_path: str | None, sbin_dirs: tuple[str, ...]) -> Result:
    """fstab type ``fuse.tierfs``: mount(8) -> mount.fuse3 -> ``/bin/sh -c 'tierfs SRC MNT -o ...'``."""
    name = "mount helper"
    where = " ".join(sbin_dirs)
    mount_fuse = (
        in_sbin("mount.fuse.tierfs", sbin_dirs)
        or in_sbin("mount.fuse3", sbin_dirs)
        or in_sbin("mount.fuse", sbin_dirs)
    )
    if mount_fuse is None:
        return Result(
            name,
            FAIL,
            f"no mount.fuse3 in {where}: fstab type fuse.tierfs cannot mount",
            "apt-get install fuse3",
        )
    searched = (
        "PATH=" + mount_path if mount_path is not None else "/bin/sh's default path (mount(8) drops PATH)"
    )
    found = shell_finds("tierfs", mount_path)
    if found is None:
        return Result(
            name,
            FAIL,
            f"{mount_fuse} cannot find tierfs on {searched}: fuse.tierfs mounts fail "
            "with '/bin/sh: 1: tierfs: not found'",
            f"make install (links /usr/local/bin/tierfs), the .deb, or ln -s {this_tierfs()} "
            "/usr/local/bin/tierfs",
        )
    env = {} if mount_path is None else {"PATH": mount_path}
    try:
        done = subprocess.run(
            [found, "--version"], env=env, capture_output=True, text=True, timeout=HELPER_TIMEOUT, check=False
        )
        version, error = done.stdout.strip(), " ".join(done.stderr.split())[-200:]
        code = done.returncode
    except (OSError, subprocess.TimeoutExpired) as exc:
        version, error, code = "", str(exc), -1
    if code != 0:
        return Result(
            name,
            FAIL,
            f"{found} does not run ({error or f'exit status {code}'})",
            "reinstall (make install, or the .deb): a link into a moved or deleted virtualenv?",
        )
    if version != f"tierfs {__version__}":
        return Result(
            name,
            WARN,
            f"{mount_fuse} runs {found} ({version}), not this tierfs {__version__}",
            "make install again, or remove the older one",
        )
    return Result(name, OK, f"{mount_fuse} runs {found} ({version})")


def check_type_helper(sbin_dirs: tuple[str, ...]) -> Result:
    """fstab type ``tierfs``: mount(8) runs ``mount.tierfs`` from /sbin directly."""
    name = "mount.tierfs"
    found = in_sbin("mount.tierfs", sbin_dirs)
    if found is None:
        return Result(
            name,
            WARN,
            f"no mount.tierfs in {' '.join(sbin_dirs)}: only type fuse.tierfs works in fstab",
            f"make install, or ln -s {Path(sys.executable).parent / 'mount.tierfs'} /sbin/mount.tierfs",
        )
    return Result(name, OK, f"{found} -> {os.path.realpath(found)}")


# --------------------------------------------------------------------------- cache directory


def filesystem_of(path: Path, mountinfo: Path = Path(MOUNTINFO_PATH)) -> MountInfo | None:
    """The mount holding ``path`` (the longest mount point that is a prefix of it)."""
    return mount_containing(str(path.resolve()), read_mountinfo(str(mountinfo)))


def nearest_existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_cache_dir(
    cache_dir: Path, cache_size: int | None, min_free: float, mountinfo: Path = Path(MOUNTINFO_PATH)
) -> list[Result]:
    """Where the cache will live: writable, on a local disk, and with room above the free floor."""
    results: list[Result] = []
    existing = nearest_existing(cache_dir)
    what = str(cache_dir) if existing == cache_dir else f"{cache_dir} (to be created in {existing})"
    if not existing.is_dir():
        results.append(
            Result("cache dir", FAIL, f"{existing} is not a directory, so {cache_dir} cannot be made",
                   "choose another --cache-dir")
        )  # fmt: skip
    elif not os.access(existing, os.W_OK | os.X_OK):
        results.append(
            Result(
                "cache dir",
                FAIL,
                f"{what} is not writable by you",
                "pick another --cache-dir, or chown it to the mounting user",
            )
        )
    else:
        results.append(Result("cache dir", OK, what))

    entry = filesystem_of(existing, mountinfo)
    fstype = entry.fstype if entry is not None else "unknown"
    on = f"{fstype} ({entry.source} on {entry.mountpoint})" if entry is not None else "unknown"
    if entry is not None and entry.is_fuse:
        results.append(
            Result(
                "cache filesystem",
                FAIL,
                f"{on}: the cache must not live on a FUSE file system "
                "(inside a tierfs mount it would deadlock)",
                "use a local disk, e.g. /var/cache/tierfs",
            )
        )
    elif fstype in NETWORK_FILESYSTEMS:
        results.append(
            Result(
                "cache filesystem",
                FAIL,
                f"{on}: LMDB, the cache index, is unsafe on network file systems",
                "use a local disk (NVMe), e.g. /var/cache/tierfs",
            )
        )
    elif fstype in MEMORY_FILESYSTEMS:
        results.append(
            Result(
                "cache filesystem",
                WARN,
                f"{on}: the cache uses RAM and is gone after a reboot",
                "use a local disk if the cache should survive reboots",
            )
        )
    else:
        results.append(Result("cache filesystem", OK, on))

    vfs = os.statvfs(existing)
    total, free = vfs.f_blocks * vfs.f_frsize, vfs.f_bavail * vfs.f_frsize
    floor = int(total * min_free)
    usable = max(0, free - floor)
    detail = (
        f"{format_bytes(free)} free of {format_bytes(total)}; {format_bytes(usable)} usable above "
        f"the {min_free:.0%} floor (--cache-min-free)"
    )
    if usable == 0:
        results.append(
            Result(
                "cache space",
                FAIL,
                detail + ": nothing can be cached",
                "free space on that disk, lower --cache-min-free, or choose another --cache-dir",
            )
        )
    elif cache_size is not None and cache_size > usable:
        results.append(
            Result(
                "cache space",
                WARN,
                f"{detail}; --cache-size {format_bytes(cache_size)} will not fit",
                "free space, or lower --cache-size: the free floor wins and evicts earlier",
            )
        )
    else:
        results.append(Result("cache space", OK, detail))
    return results


# --------------------------------------------------------------------------- S3


def _session(options: Options) -> Any:
    """A boto3 session as the mount makes one: --profile, and --credentials-file in place of
    ~/.aws/credentials (set on this session only, not in our environment)."""
    import boto3
    import botocore.session

    core = botocore.session.get_session()
    if options.credentials_file:
        core.set_config_variable("credentials_file", options.credentials_file)
    return boto3.session.Session(botocore_session=core, profile_name=options.profile)


def check_credentials(options: Options) -> tuple[Result, Any]:
    """The credentials boto3's chain yields (never printed: only where they came from)."""
    name = "credentials"
    import botocore.exceptions

    try:
        session = _session(options)
        credentials = session.get_credentials()
        key = credentials.access_key if credentials is not None else None
    except botocore.exceptions.ProfileNotFound as exc:
        return Result(
            name, FAIL, str(exc), "add the profile to the credentials file, or drop --profile"
        ), None
    except (botocore.exceptions.BotoCoreError, OSError, ValueError) as exc:
        return Result(
            name, FAIL, f"the credential chain failed: {exc}", "check the credentials and config files"
        ), None
    if not key:
        return (
            Result(
                name,
                FAIL,
                "none found (environment, --profile, shared files, instance role)",
                "set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, or --profile NAME with --credentials-file FILE "
                "(see docs/deployment.md, section 7)",
            ),
            None,
        )
    return Result(name, OK, f"from {credentials.method} (key id ...{key[-4:]})"), session


def check_endpoint(url: str | None, timeout: float) -> Result:
    """Any HTTP answer (403 included) within ``timeout`` means the endpoint is reachable."""
    name = "endpoint"
    if url is None:
        return Result(
            name, SKIP, "no --endpoint-url (or AWS_ENDPOINT_URL[_S3]): AWS S3's own endpoint is used"
        )
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return Result(
            name,
            FAIL,
            f"{url!r} is not an http:// or https:// URL",
            "e.g. --endpoint-url http://10.0.0.5:8333",
        )
    conn: http.client.HTTPConnection
    if parts.scheme == "https":
        conn = http.client.HTTPSConnection(
            parts.hostname,
            parts.port,
            timeout=timeout,
            context=ssl.create_default_context(cafile=os.environ.get("AWS_CA_BUNDLE")),
        )
    else:
        conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout)
    started = time.monotonic()
    try:
        conn.request("HEAD", "/")
        status = conn.getresponse().status
    except ssl.SSLError as exc:
        return Result(
            name, FAIL, f"{url}: TLS failed: {exc}", "set AWS_CA_BUNDLE to the server's CA certificate"
        )
    except TimeoutError:
        return Result(
            name,
            FAIL,
            f"{url}: no answer within {timeout:g} s",
            "check the address, the server and any firewall in between",
        )
    except OSError as exc:
        return Result(
            name, FAIL, f"{url}: {exc.strerror or exc}", "check the address and that the server runs"
        )
    finally:
        conn.close()
    elapsed = (time.monotonic() - started) * 1000
    return Result(name, OK, f"{url} answered HTTP {status} in {elapsed:.0f} ms")


def check_bucket(options: Options, session: Any) -> Result:
    """HeadBucket with the mount's own client settings, one attempt, bounded by ``timeout``."""
    assert options.source is not None
    name = "bucket"
    import botocore.config
    import botocore.exceptions

    config = botocore.config.Config(
        connect_timeout=options.timeout,
        read_timeout=options.timeout,
        retries={"total_max_attempts": 1},
        s3={"addressing_style": "path"},
    )
    client = session.client(
        "s3",
        endpoint_url=options.endpoint_url,
        region_name=options.region or session.region_name or "us-east-1",
        config=config,
    )
    bucket = options.source.bucket
    try:
        client.head_bucket(Bucket=bucket)
    except botocore.exceptions.ClientError as exc:
        code = str(exc.response.get("Error", {}).get("Code", "?"))
        if code in ("404", "NoSuchBucket"):
            return Result(
                name, FAIL, f"{bucket}: no such bucket", "check the name in SOURCE (s3://BUCKET/PREFIX)"
            )
        if code in ("403", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
            return Result(
                name,
                FAIL,
                f"{bucket}: access denied ({code})",
                "check the keys and that their policy allows s3:ListBucket and s3:GetObject",
            )
        return Result(name, FAIL, f"{bucket}: {code}: {exc}", "see the server's logs")
    except botocore.exceptions.BotoCoreError as exc:
        return Result(name, FAIL, f"{bucket}: {exc}", "check --endpoint-url and --region")
    return Result(name, OK, f"s3://{bucket} is there and the credentials may list it")


# --------------------------------------------------------------------------- running


def run_checks(options: Options) -> list[Result]:
    results = [
        check_fuse_device(options.fuse_device),
        check_fusermount(options.euid, SYSTEM_PATH),
        check_allow_other(options.allow_other, options.euid, options.fuse_conf),
        check_fuse_helper(options.mount_path, options.sbin_dirs),
        check_type_helper(options.sbin_dirs),
    ]
    cache_dir = options.cache_dir
    if cache_dir is None:
        cache_dir = DEFAULT_CACHE_ROOT
    results += check_cache_dir(cache_dir, options.cache_size, options.cache_min_free)
    credentials, session = check_credentials(options)
    endpoint = check_endpoint(options.endpoint_url, options.timeout)
    results += [credentials, endpoint]
    if options.source is not None:
        if session is None or endpoint.status == FAIL:
            results.append(Result("bucket", SKIP, "needs working credentials and endpoint"))
        else:
            results.append(check_bucket(options, session))
    return results


def report(results: list[Result], out: TextIO) -> int:
    """Print one line per check (and its fix); 1 if any failed."""
    width = max(len(r.name) for r in results)
    for r in results:
        print(f"{r.status:<5} {r.name:<{width}}  {r.detail}", file=out)
        if r.fix and r.status in (FAIL, WARN):
            print(f"{'':<5} {'':<{width}}  fix: {r.fix}", file=out)
    failed = sum(r.status == FAIL for r in results)
    warned = sum(r.status == WARN for r in results)
    if failed:
        print(f"tierfs doctor: {failed} check{'s' if failed != 1 else ''} failed", file=out)
    else:
        print(f"tierfs doctor: all checks passed{f' ({warned} warnings)' if warned else ''}", file=out)
    return 1 if failed else 0


def run(
    options: Options, out: TextIO | None = None, checks: Callable[[Options], list[Result]] = run_checks
) -> int:
    return report(checks(options), out if out is not None else sys.stdout)
