"""Deployment paths, end to end: fstab and mount(8), helpers, namespaces, allow_other, packaging files.

Everything here runs the real tools an administrator runs (util-linux ``mount``/``umount``,
``mount.fuse3``, ``unshare``, ``nsenter``, ``setpriv``) against a real SeaweedFS, and the
fstab lines are taken verbatim from docs/deployment.md, so the documented lines are the
tested lines.

Two facts about mount(8) shape these tests:

* mount(8) wipes ``PATH`` (and ``HOME``, ``SHELL``, ...) from the environment before it
  runs a helper, and mount.fuse3 then runs ``tierfs`` through ``/bin/sh -c``, whose
  default search path is ``/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin``.
  A ``tierfs`` that lives only in a virtualenv is therefore never found, whatever the
  caller's PATH says. Tests of type ``fuse.tierfs`` link this virtualenv's ``tierfs``
  into ``/usr/local/bin`` for their duration (exactly what a system-wide pip install
  does), creating the link only if nothing is there and removing only their own link.
* mount(8) looks for ``mount.TYPE`` helpers only in ``/sbin`` (and ``/sbin/fs.d``,
  ``/sbin/fs``); ``mount -t tierfs`` links ``/sbin/mount.tierfs`` the same temporary way.

Mounts made by mount(8) or a helper are daemonised by tierfs itself; each is registered
with a :class:`mounting.Mount` as soon as the kernel lists it, so teardown unmounts it and
stops its daemon by pid even when the test failed.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import tomllib
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import yaml
from mounting import REPO_ROOT, Mount, Mounter, wait_until

from tierfs.control.registry import lookup
from tools.servers import (
    ACCESS_KEY,
    SECRET_KEY,
    SeaweedFS,
    child_env,
    is_fuse_mounted,
    s3_client,
    terminate_process_group,
)

pytestmark = pytest.mark.fuse

VENV_BIN = Path(sys.executable).parent
DOCS = REPO_ROOT / "docs" / "deployment.md"
PACKAGING = REPO_ROOT / "packaging"
COMMAND_TIMEOUT = 60.0
NOBODY = 65534
# Everything mount(8), mount.fuse3 and systemd may hand us that must not change the mount.
IGNORED = "rw,_netdev,nofail,defaults,x-systemd.automount,comment=foo,noatime"
PAYLOAD = os.urandom(1536 * 1024 + 7)  # spans two 1 MiB cache blocks, odd tail


# --------------------------------------------------------------------------- helpers


def mount_env() -> dict[str, str]:
    """Server credentials plus this virtualenv first on PATH (effective for direct helper calls only)."""
    env = child_env()
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', os.defpath)}"
    return env


def run(command: list[str], timeout: float = COMMAND_TIMEOUT) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        command, env=mount_env(), capture_output=True, text=True, timeout=timeout, check=False
    )


def mount_options(path: Path) -> set[str]:
    """Per-mount and super-block options (``ro``, ``allow_other``, ...) of the mount at ``path``."""
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields = line.split()
        if fields[4] == str(path):
            return {*fields[5].split(","), *fields[fields.index("-") + 3].split(",")}
    raise AssertionError(f"{path} is not in /proc/self/mountinfo")


def processes_naming(text: str) -> list[int]:
    """Pids whose command line mentions ``text`` (a daemon left behind by a failed mount)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        with contextlib.suppress(OSError):
            if text in (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"):
                found.append(int(entry.name))
    return found


@contextlib.contextmanager
def temporary_link(link: Path, target: Path) -> Iterator[None]:
    """``link -> target`` for the duration; never replaces anything, removes only its own link.

    If ``link`` already resolves to ``target`` (a previous install), it is used as is; if
    it is something else, the test is skipped rather than run against a foreign binary.
    """
    if os.path.lexists(link):
        if link.resolve() == target.resolve():
            yield
            return
        pytest.skip(f"{link} exists and is not this virtualenv's {target.name}; not replacing it")
    link.symlink_to(target)
    try:
        yield
    finally:
        if link.is_symlink() and os.readlink(link) == str(target):
            link.unlink()


@pytest.fixture
def system_tierfs() -> Iterator[None]:
    """``tierfs`` where mount.fuse3's ``/bin/sh`` finds it (see the module docstring)."""
    with temporary_link(Path("/usr/local/bin/tierfs"), VENV_BIN / "tierfs"):
        yield


@pytest.fixture
def sbin_helper() -> Iterator[None]:
    """``/sbin/mount.tierfs``, the only place mount(8) looks for the ``tierfs`` type's helper."""
    with temporary_link(Path("/sbin/mount.tierfs"), VENV_BIN / "mount.tierfs"):
        yield


class SystemMounts:
    """Mounts made by mount(8) or a helper (not by :class:`Mounter`), torn down like Mounter's."""

    def __init__(self, tmp_path: Path) -> None:
        self._tmp = tmp_path
        self._mounts: list[Mount] = []

    def run(
        self, command: list[str], mountpoint: Path, cache_dir: Path, env: dict[str, str] | None = None
    ) -> subprocess.CompletedProcess[str]:
        """Run a mount command; if the kernel then lists ``mountpoint``, own that mount and its daemon."""
        proc = subprocess.Popen(
            command,
            env=env if env is not None else mount_env(),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,
        )
        try:
            out, err = proc.communicate(timeout=COMMAND_TIMEOUT)
        except subprocess.TimeoutExpired:
            terminate_process_group(proc)
            out, err = proc.communicate()
        done = subprocess.CompletedProcess(command, proc.returncode, out.decode(), err.decode())
        if is_fuse_mounted(mountpoint):
            # The daemonised tierfs logs into its cache dir.
            mount = Mount(mountpoint, cache_dir, cache_dir / "tierfs.log", proc, foreground=False)
            self._mounts.append(mount)
            record = lookup(mountpoint)  # the registry file: no CLI process to start
            assert record is not None, f"{mountpoint} is mounted but its daemon is not registered"
            mount.pid = int(record["pid"])
        return done

    def mounted(self, mountpoint: Path, done: subprocess.CompletedProcess[str]) -> Mount:
        """The mount at ``mountpoint`` made by ``done``, or a failure carrying the command's output."""
        for mount in self._mounts:
            if mount.path == mountpoint:
                return mount
        command = " ".join(done.args)
        raise AssertionError(
            f"{command} exited {done.returncode}, nothing mounted\n{done.stdout}{done.stderr}"
        )

    def cleanup(self) -> None:
        for mount in reversed(self._mounts):
            mount.cleanup()
        self._mounts.clear()


@pytest.fixture
def system_mounts(tmp_path: Path) -> Iterator[SystemMounts]:
    mounts = SystemMounts(tmp_path)
    try:
        yield mounts
    finally:
        mounts.cleanup()


@pytest.fixture
def source(seaweed: SeaweedFS, bucket: Callable[..., str]) -> str:
    """A fresh bucket holding ``prefix/data.bin`` (PAYLOAD); returns its name."""
    name = bucket()
    s3_client(seaweed.endpoint_url).put_object(Bucket=name, Key="prefix/data.bin", Body=PAYLOAD)
    return name


def assert_umount_ends_daemon(mount: Mount) -> None:
    """util-linux ``umount`` (no flush by tierfs) must unmount and make the daemon exit by itself."""
    done = run(["umount", str(mount.path)])
    assert done.returncode == 0, done.stderr
    assert not is_fuse_mounted(mount.path)
    assert mount.wait_exited(COMMAND_TIMEOUT), f"daemon {mount.pid} outlived umount\n{mount.log_text()}"


def fstab_lines() -> list[str]:
    """The ```fstab blocks of docs/deployment.md, one entry per non-comment line."""
    blocks = re.findall(r"```fstab\n(.*?)```", DOCS.read_text(), re.S)
    return [line for block in blocks for line in block.splitlines() if line.strip() and line[0] != "#"]


def localise(line: str, bucket: str, mountpoint: Path, endpoint: str, tmp_path: Path) -> str:
    """Replace the documented placeholders by this test's bucket, paths and server.

    A documented credentials file becomes a real one holding the server's keys.
    """
    replacements = {
        "s3://bucket/prefix": f"s3://{bucket}/prefix",
        "/mnt/data": str(mountpoint),
        "http://10.0.0.5:8333": endpoint,
        "/var/cache/tierfs": str(tmp_path / "cache"),
    }
    for placeholder, value in replacements.items():
        assert placeholder in line, f"documented fstab line lost its {placeholder!r}: {line}"
        line = line.replace(placeholder, value)
    if "/etc/tierfs/credentials" in line:
        credentials = tmp_path / "credentials"
        credentials.write_text(
            f"[tierfs]\naws_access_key_id = {ACCESS_KEY}\naws_secret_access_key = {SECRET_KEY}\n"
        )
        credentials.chmod(0o600)
        line = line.replace("/etc/tierfs/credentials", str(credentials))
    return line


def read_as_nobody(path: Path) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", "cat", str(path)],
        capture_output=True,
        timeout=COMMAND_TIMEOUT,
        check=False,
    )


# --------------------------------------------------------------------------- fstab and mount(8)


@pytest.mark.parametrize("entry", [0, 1], ids=["boot", "automount"])
def test_documented_fstab_entry(
    entry: int,
    tmp_path: Path,
    seaweed: SeaweedFS,
    source: str,
    system_tierfs: None,
    system_mounts: SystemMounts,
) -> None:
    """``mount -T FSTAB MNT`` with the documented line mounts, reads right, and ``umount`` ends it."""
    lines = fstab_lines()
    assert len(lines) == 2, lines
    mnt = tmp_path / "data"
    mnt.mkdir()
    line = localise(lines[entry], source, mnt, seaweed.endpoint_url, tmp_path)
    fstab = tmp_path / "fstab"
    fstab.write_text(line + "\n")
    cache_dir = Path(re.search(r"cache_dir=([^,\s]+)", line)[1])  # type: ignore[index]
    env = mount_env()
    if "credentials_file=" in line:  # the keys must come from that file, not from us
        del env["AWS_ACCESS_KEY_ID"], env["AWS_SECRET_ACCESS_KEY"]

    done = system_mounts.run(["mount", "-T", str(fstab), str(mnt)], mnt, cache_dir, env=env)
    mount = system_mounts.mounted(mnt, done)
    assert done.returncode == 0, done.stderr

    assert {"rw", "allow_other"} <= mount_options(mnt)
    assert (mnt / "data.bin").read_bytes() == PAYLOAD
    assert_umount_ends_daemon(mount)


@pytest.mark.parametrize("how", ["mount -t fuse.tierfs", "mount.tierfs", "mount -t tierfs"])
def test_every_entry_point_mounts_and_ignores_mount8_options(
    how: str,
    tmp_path: Path,
    seaweed: SeaweedFS,
    source: str,
    system_mounts: SystemMounts,
    request: pytest.FixtureRequest,
) -> None:
    """mount(8) with either type and the helper run directly, all with the options mount(8) and
    systemd add (``rw``, ``_netdev``, ``nofail``, ``defaults``, ``x-systemd.*``, ``comment=``,
    ``noatime``): each mounts and reads the same bytes. (``mount -t fuse.tierfs`` is
    mount.fuse3 running ``tierfs SRC MNT -o ...``, so that form is covered too.)"""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    cache = tmp_path / "cache"
    src = f"s3://{source}/prefix"
    opts = f"{IGNORED},allow_other,endpoint_url={seaweed.endpoint_url},cache_dir={cache},cache_size=200M"
    commands = {
        "mount -t fuse.tierfs": (["mount", "-t", "fuse.tierfs", src, str(mnt), "-o", opts], "system_tierfs"),
        "mount -t tierfs": (["mount", "-t", "tierfs", src, str(mnt), "-o", opts], "sbin_helper"),
        "mount.tierfs": ([str(VENV_BIN / "mount.tierfs"), src, str(mnt), "-o", opts], None),
    }
    command, link_fixture = commands[how]
    if link_fixture is not None:
        request.getfixturevalue(link_fixture)

    done = system_mounts.run(command, mnt, cache)
    mount = system_mounts.mounted(mnt, done)
    assert done.returncode == 0, done.stderr
    assert {"rw", "allow_other"} <= mount_options(mnt)
    assert hashlib.sha256((mnt / "data.bin").read_bytes()).digest() == hashlib.sha256(PAYLOAD).digest()
    assert_umount_ends_daemon(mount)


def test_ro_option_gives_a_read_only_mount(
    tmp_path: Path, seaweed: SeaweedFS, source: str, system_tierfs: None, system_mounts: SystemMounts
) -> None:
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    cache = tmp_path / "cache"
    fstab = tmp_path / "fstab"
    fstab.write_text(
        f"s3://{source}/prefix {mnt} fuse.tierfs _netdev,ro,endpoint_url={seaweed.endpoint_url},"
        f"cache_dir={cache} 0 0\n"
    )
    done = system_mounts.run(["mount", "-T", str(fstab), str(mnt)], mnt, cache)
    mount = system_mounts.mounted(mnt, done)

    assert "ro" in mount_options(mnt)
    assert (mnt / "data.bin").read_bytes() == PAYLOAD
    writes: list[Callable[[], object]] = [
        lambda: (mnt / "new.txt").write_bytes(b"x"),
        lambda: (mnt / "data.bin").open("r+b"),
        lambda: (mnt / "dir").mkdir(),
        lambda: (mnt / "data.bin").unlink(),
        lambda: (mnt / "data.bin").rename(mnt / "moved.bin"),
    ]
    for write in writes:
        with pytest.raises(OSError) as caught:
            write()
        assert caught.value.errno == 30, caught.value  # EROFS
    assert_umount_ends_daemon(mount)


@pytest.mark.parametrize("how", ["mount -T fstab", "mount.tierfs"])
def test_unknown_option_fails_with_one_line_and_mounts_nothing(
    how: str,
    tmp_path: Path,
    seaweed: SeaweedFS,
    source: str,
    system_tierfs: None,
    system_mounts: SystemMounts,
) -> None:
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    cache = tmp_path / "cache"
    opts = f"_netdev,endpoint_url={seaweed.endpoint_url},cache_dir={cache},cache_sise=200M"
    if how == "mount.tierfs":
        command = [str(VENV_BIN / "mount.tierfs"), f"s3://{source}", str(mnt), "-o", opts]
    else:
        fstab = tmp_path / "fstab"
        fstab.write_text(f"s3://{source} {mnt} fuse.tierfs {opts} 0 0\n")
        command = ["mount", "-T", str(fstab), str(mnt)]

    done = system_mounts.run(command, mnt, cache)

    assert done.returncode != 0
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, done.stderr
    assert "unknown mount option 'cache_sise'" in lines[0]
    assert "Traceback" not in done.stdout + done.stderr
    assert not is_fuse_mounted(mnt)
    assert processes_naming(str(mnt)) == []
    assert not cache.exists()


def test_unit_file_passes_systemd_analyze(tmp_path: Path, system_tierfs: None) -> None:
    """The shipped unit is valid for systemd (252 here) once ``/usr/local/bin/tierfs`` exists."""
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed")
    units = tmp_path / "units"
    units.mkdir()
    shutil.copy(PACKAGING / "systemd" / "tierfs@.service", units)
    done = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", "tierfs@mnt-data.service"],
        env={**os.environ, "SYSTEMD_UNIT_PATH": f"{units}:"},
        capture_output=True,
        text=True,
        timeout=COMMAND_TIMEOUT,
        check=False,
    )
    assert done.returncode == 0 and not done.stderr.strip(), done.stderr


# --------------------------------------------------------------------------- mount namespaces


def test_bind_mount_in_a_private_namespace_reads_the_same_bytes(
    tmp_path: Path, source: str, mounter: Mounter
) -> None:
    mount = mounter(f"s3://{source}/prefix")
    bound = tmp_path / "bound"
    bound.mkdir()
    script = (
        'mount --bind "$1" "$2" && grep -q " $2 [^-]*- fuse.tierfs " /proc/self/mountinfo'
        ' && sha256sum "$2/data.bin"'
    )
    unshare = ["unshare", "--mount", "--propagation", "unchanged"]
    done = subprocess.run(
        [*unshare, "sh", "-c", script, "sh", str(mount.path), str(bound)],
        capture_output=True,
        text=True,
        timeout=COMMAND_TIMEOUT,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split()[0] == hashlib.sha256(PAYLOAD).hexdigest()
    assert not is_fuse_mounted(bound)  # the bind stayed inside the namespace, which is gone now
    assert_umount_ends_daemon(mount)


def _namespace_of(pid: int) -> str:
    return os.readlink(f"/proc/{pid}/ns/mnt")


def test_mount_under_a_shared_mount_reaches_an_existing_slave_namespace(
    tmp_path: Path, source: str, mounter: Mounter
) -> None:
    """A mount made *after* a container/namespace started still appears in it (rshared/HostToContainer)."""
    shared = tmp_path / "shared"
    (shared / "data").mkdir(parents=True)
    subprocess.run(["mount", "--bind", str(shared), str(shared)], check=True, timeout=COMMAND_TIMEOUT)
    namespace: subprocess.Popen[bytes] | None = None
    mount: Mount | None = None
    try:
        subprocess.run(["mount", "--make-shared", str(shared)], check=True, timeout=COMMAND_TIMEOUT)
        namespace = subprocess.Popen(
            ["unshare", "--mount", "--propagation", "slave", "sleep", "120"], start_new_session=True
        )
        deadline = time.monotonic() + COMMAND_TIMEOUT
        while _namespace_of(namespace.pid) == _namespace_of(os.getpid()):  # unshare not done yet
            assert namespace.poll() is None and time.monotonic() < deadline, "unshare did not start"
            time.sleep(0.02)

        mount = mounter(f"s3://{source}/prefix", mountpoint=shared / "data")
        target = shared / "data"
        script = (
            f'grep -q " {target} [^-]*- fuse.tierfs " /proc/self/mountinfo  && sha256sum {target}/data.bin'
        )
        done = subprocess.run(
            ["nsenter", f"--mount=/proc/{namespace.pid}/ns/mnt", "sh", "-c", script],
            capture_output=True,
            text=True,
            timeout=COMMAND_TIMEOUT,
            check=False,
        )
        assert done.returncode == 0, done.stderr
        assert done.stdout.split()[0] == hashlib.sha256(PAYLOAD).hexdigest()
        # The unmount propagates into the namespace too, so the daemon exits although the
        # namespace still lives (otherwise its copy of the mount would keep the daemon alive).
        assert_umount_ends_daemon(mount)
    finally:
        if mount is not None:
            mount.cleanup()
        if namespace is not None:
            terminate_process_group(namespace, grace=1.0)
        subprocess.run(["umount", str(shared)], timeout=COMMAND_TIMEOUT, check=False)


# --------------------------------------------------------------------------- allow_other


@pytest.fixture
def public_dir() -> Iterator[Path]:
    """A directory other users can traverse (pytest's tmp_path is 0700 root), for mountpoints."""
    path = Path(tempfile.mkdtemp(prefix="tierfs-allow-other-", dir="/tmp"))
    path.chmod(0o755)
    try:
        yield path
    finally:  # rmdir only: never delete recursively where a mount might still be
        for child in path.iterdir():
            with contextlib.suppress(OSError):
                child.rmdir()
        with contextlib.suppress(OSError):
            path.rmdir()


def test_allow_other_lets_other_users_in_subject_to_modes(
    public_dir: Path, seaweed: SeaweedFS, bucket: Callable[..., str], mounter: Mounter
) -> None:
    name = bucket()
    client = s3_client(seaweed.endpoint_url)
    client.put_object(Bucket=name, Key="private.bin", Body=PAYLOAD)  # no metadata: --file-mode 0640
    fsx = {"file-permissions": "0100644", "file-owner": "0", "file-group": "0"}
    client.put_object(Bucket=name, Key="shared.bin", Body=PAYLOAD, Metadata=fsx)
    mnt = public_dir / "mnt"
    mount = mounter(
        f"s3://{name}",
        "--allow-other",
        *("--file-mode", "0640", "--uid", "0", "--gid", "0"),
        mountpoint=mnt,
    )

    assert (mnt / "shared.bin").read_bytes() == PAYLOAD  # root's first read teaches tierfs the header
    # ... which the cold engine applies off the READ's path, moments later (docs/namespace.md).
    wait_until(lambda: (mnt / "shared.bin").stat().st_mode == 0o100644, 10, "the learnt header shown")
    assert (mnt / "private.bin").stat().st_mode == 0o100640

    allowed = read_as_nobody(mnt / "shared.bin")
    assert allowed.returncode == 0, allowed.stderr
    assert allowed.stdout == PAYLOAD
    refused = read_as_nobody(mnt / "private.bin")
    assert refused.returncode != 0
    assert b"Permission denied" in refused.stderr
    assert_umount_ends_daemon(mount)


def test_without_allow_other_other_users_are_refused_everything(
    public_dir: Path, source: str, mounter: Mounter
) -> None:
    mnt = public_dir / "mnt"
    mount = mounter(f"s3://{source}/prefix", "--file-mode", "0644", mountpoint=mnt)
    assert (mnt / "data.bin").read_bytes() == PAYLOAD  # the owner (root) reads

    for command in (["cat", str(mnt / "data.bin")], ["ls", str(mnt)], ["stat", str(mnt)]):
        done = subprocess.run(
            ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", *command],
            capture_output=True,
            text=True,
            timeout=COMMAND_TIMEOUT,
            check=False,
        )
        assert done.returncode != 0 and "Permission denied" in done.stderr, (command, done.stderr)
    assert_umount_ends_daemon(mount)


# --------------------------------------------------------------------------- packaging files


def test_fstab_example_carries_the_documented_entries() -> None:
    """packaging/fstab.example, README.md and the docs must not drift apart (the docs' lines are
    tested above)."""

    def normal(line: str) -> str:
        return " ".join(line.lstrip("#").split())

    entries = {normal(line) for line in (PACKAGING / "fstab.example").read_text().splitlines()}
    readme = {normal(line) for line in (REPO_ROOT / "README.md").read_text().splitlines()}
    for line in fstab_lines():
        assert normal(line) in entries, line
        assert normal(line) in readme, f"README.md lacks the tested fstab line: {line}"


def test_dockerfile_copies_what_the_build_needs() -> None:
    """The image's ``pip wheel .`` needs pyproject.toml, the readme it names and the package,
    all present in the repository; every stage's base Python satisfies requires-python."""
    dockerfile = (PACKAGING / "Dockerfile").read_text()
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    from_context = {  # COPY --from=STAGE copies between stages, not from the repository
        src for line in re.findall(r"^COPY\s+(?!--from=)(.+)$", dockerfile, re.M) for src in line.split()[:-1]
    }
    assert {"pyproject.toml", project["readme"], "tierfs"} <= from_context, from_context
    for src in from_context:
        assert (REPO_ROOT / src).exists(), f"Dockerfile copies {src}, which the repository lacks"
    minimum = re.fullmatch(r">=(\d+)\.(\d+)", project["requires-python"])
    assert minimum is not None
    bases = re.findall(r"^FROM python:(\d+)\.(\d+)", dockerfile, re.M)
    assert bases
    for major, minor in bases:
        assert (int(major), int(minor)) >= (int(minimum[1]), int(minimum[2]))
    assert set(project["scripts"]) == {"tierfs", "mount.tierfs"}
    assert re.search(r'^ENTRYPOINT \["tierfs"\]', dockerfile, re.M)


def test_kubernetes_manifests_are_valid_yaml_with_the_expected_shape() -> None:
    daemonset, pod = (PACKAGING / "kubernetes" / f for f in ("daemonset.yaml", "training-pod.yaml"))
    docs = {doc["kind"]: doc for doc in yaml.safe_load_all(daemonset.read_text())}
    assert set(docs) == {"ConfigMap", "DaemonSet"}
    spec = docs["DaemonSet"]["spec"]["template"]["spec"]
    (container,) = spec["containers"]
    assert container["securityContext"]["privileged"] is True
    mounts = {m["name"]: m for m in container["volumeMounts"]}
    assert mounts["tierfs-mounts"]["mountPropagation"] == "Bidirectional"
    assert container["lifecycle"]["preStop"]["exec"]["command"][:2] == ["tierfs", "umount"]
    assert spec["terminationGracePeriodSeconds"] >= 600
    consumer = yaml.safe_load(pod.read_text())
    for c in consumer["spec"]["initContainers"] + consumer["spec"]["containers"]:
        (volume,) = c["volumeMounts"]
        assert volume["mountPropagation"] == "HostToContainer" and volume["readOnly"] is True
    host_path = consumer["spec"]["volumes"][0]["hostPath"]["path"]
    assert host_path == "/mnt/tierfs/data" and "/mnt/tierfs/data" in container["args"][0]


def test_docs_mark_each_block_with_its_test() -> None:
    """Every ``tested-by`` marker in the docs names a test that exists (no TODOs left)."""
    markers = re.findall(r"<!-- tested-by: (.*?) -->", DOCS.read_text())
    assert markers
    for marker in markers:
        assert "TODO" not in marker, marker
        for ref in re.findall(r"tests/(\w+\.py)(?:::(\w+))?(?:::(\w+))?", marker):
            module, first, second = ref
            text = (REPO_ROOT / "tests" / module).read_text()
            if first.startswith("Test"):  # a class, or one of its methods
                assert re.search(rf"^class {first}\b", text, re.M), f"{module}::{first} does not exist"
                if second:
                    assert re.search(rf"^    def {second}\b", text, re.M), f"{first}::{second} absent"
            elif first:
                assert re.search(rf"^def {first}\b", text, re.M), f"{module}::{first} in docs does not exist"


def test_machine_changing_install_tests_are_run_by_ci() -> None:
    """`make test` leaves tests/test_install.py out, so each of its classes must have a Make
    target and .ci/run must call every one of them; otherwise they would silently never run."""
    makefile = (REPO_ROOT / "Makefile").read_text()
    ci = (REPO_ROOT / ".ci" / "run").read_text()
    classes = re.findall(r"^class (Test\w+)", (REPO_ROOT / "tests" / "test_install.py").read_text(), re.M)
    assert sorted(classes) == ["TestContainer", "TestDebianPackage", "TestMakeInstall"]
    assert "--ignore=tests/test_install.py" in makefile
    for target, cls in (("install-test", "TestMakeInstall"), ("deb-test", "TestDebianPackage"),
                        ("container-test", "TestContainer")):  # fmt: skip
        rule = re.search(rf"^{target}:.*\n((?:\t.*\n)+)", makefile, re.M)
        assert rule is not None and f"tests/test_install.py::{cls}" in rule[1], target
        assert re.search(rf"^make {target}$", ci, re.M), f".ci/run does not run make {target}"
