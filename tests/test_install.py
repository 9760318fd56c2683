"""Installing tierfs as a system tool (issue 17): ``make install``, the .deb, and a container.

These tests change the machine: they link into the real ``/usr/local/bin`` and ``/sbin``,
install a package with apt, and start a private dockerd. That is the point (mount(8) only
finds helpers in those places, and PATH is dropped before it runs them), so they run
through ``make install-test``, ``make deb-test`` and ``make container-test`` (each run
by .ci/run after ``make test``), one class per target, and every fixture undoes what it
did: uninstall, purge, unmount, dockerd stopped by pid, its mounts and files removed.

Each install refuses to start over a ``tierfs`` that is already on the machine, rather
than replace and then delete someone else's.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
import tomllib
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from mounting import REPO_ROOT, Mounter
from test_deployment import (
    PAYLOAD,
    SystemMounts,
    assert_umount_ends_daemon,
    fstab_lines,
    localise,
    mount_options,
    processes_naming,
    source,  # noqa: F401  (fixture)
    system_mounts,  # noqa: F401  (fixture)
)

from tools.servers import ACCESS_KEY as ACCESS
from tools.servers import SECRET_KEY as SECRET
from tools.servers import SeaweedFS, is_fuse_mounted, s3_client

pytestmark = pytest.mark.fuse

MINIMAL_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"  # what the brief and a bare root shell give mount
INSTALL_TIMEOUT = 600.0
VERSION = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["version"]
SYSTEM_PYTHON = Path("/usr/bin/python3")


def sh(
    command: list[str], timeout: float = 120.0, env: dict[str, str] | None = None, cwd: str | None = None
) -> subprocess.CompletedProcess[str]:
    """Run a command to completion, text output, no exception on failure (tests assert on it)."""
    return subprocess.run(
        command, capture_output=True, text=True, timeout=timeout, check=False, env=env, cwd=cwd
    )


def must(command: list[str], timeout: float = 120.0, env: dict[str, str] | None = None) -> str:
    """Run a command that must succeed; its stdout."""
    done = sh(command, timeout, env)
    assert done.returncode == 0, f"{' '.join(command)} exited {done.returncode}\n{done.stdout}{done.stderr}"
    return done.stdout


def assert_unit_verifies(unit_dir: Path) -> None:
    """systemd-analyze accepts the installed unit as is (its ExecStart= binary exists now)."""
    done = sh(
        ["systemd-analyze", "verify", "--man=no", "tierfs@mnt-data.service"],
        env={**os.environ, "SYSTEMD_UNIT_PATH": f"{unit_dir}:"},
    )
    assert done.returncode == 0 and not done.stderr.strip(), done.stderr


def copy_sources(dest: Path) -> Path:
    """The files `make install` needs, copied away from the checkout (which is then deleted
    by the test, to prove the install does not depend on it)."""
    dest.mkdir(parents=True)
    for name in ("Makefile", "pyproject.toml", "README.md"):
        shutil.copy2(REPO_ROOT / name, dest / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in ("tierfs", "packaging", "docs"):
        shutil.copytree(REPO_ROOT / name, dest / name, ignore=ignore, symlinks=True)
    return dest


def refuse_foreign(paths: list[Path]) -> None:
    """Fail (not skip) when a tierfs is already installed where the test would install one."""
    present = [str(p) for p in paths if os.path.lexists(p)]
    assert not present, f"already on this machine, not replacing: {present} (uninstall it first)"


@contextlib.contextmanager
def links_set_aside(paths: list[Path]) -> Iterator[None]:
    """Symlinks already at ``paths`` (say, a link to a checkout's virtualenv left by an
    interrupted test_deployment run) are moved away for the test and put back after it;
    anything that is not a symlink is someone's install and fails the test instead."""
    saved: dict[Path, str] = {}
    for path in paths:
        if path.is_symlink():
            saved[path] = os.readlink(path)
            path.unlink()
    try:
        refuse_foreign(paths)
        yield
    finally:
        for path, target in saved.items():
            if not os.path.lexists(path):
                path.symlink_to(target)


def fstab_mount(
    mounts: SystemMounts,
    tmp_path: Path,
    seaweed: SeaweedFS,
    bucket_name: str,
    entry: int,
    prefix: Path,
) -> None:
    """``env -i PATH=MINIMAL_PATH mount -T FSTAB MNT`` with the documented fstab line ``entry``,
    a read through it, and ``umount`` ending the daemon.

    The boot line carries no credentials, so its keys come as ``AWS_*`` variables (mount(8)
    keeps them); the automount line reads them from its ``credentials_file=``. The daemon
    must be the interpreter installed in ``prefix``, not this checkout's virtualenv."""
    mnt = tmp_path / f"data{entry}"
    mnt.mkdir()
    line = localise(fstab_lines()[entry], bucket_name, mnt, seaweed.endpoint_url, tmp_path)
    fstab = tmp_path / f"fstab{entry}"
    fstab.write_text(line + "\n")
    cache_dir = Path(re.search(r"cache_dir=([^,\s]+)", line)[1])  # type: ignore[index]
    env = ["env", "-i", f"PATH={MINIMAL_PATH}"]
    if "credentials_file=" not in line:
        env += [f"AWS_ACCESS_KEY_ID={ACCESS}", f"AWS_SECRET_ACCESS_KEY={SECRET}"]
    done = mounts.run([*env, "mount", "-T", str(fstab), str(mnt)], mnt, cache_dir, env={})
    mount = mounts.mounted(mnt, done)
    assert done.returncode == 0, done.stderr
    cmdline = Path(f"/proc/{mount.pid}/cmdline").read_bytes().split(b"\0")
    assert cmdline[0].decode() == f"{prefix}/bin/python", cmdline
    assert {"rw", "allow_other"} <= mount_options(mnt)
    assert (mnt / "data.bin").read_bytes() == PAYLOAD
    assert_umount_ends_daemon(mount)


# --------------------------------------------------------------------------- make install

INSTALL_LINKS = [Path("/usr/local/bin/tierfs"), Path("/sbin/mount.tierfs")]
INSTALL_UNIT = Path("/usr/local/lib/systemd/system/tierfs@.service")


class Installed:
    """A `make install` into a temporary PREFIX, with the links in the real system places."""

    def __init__(self, root: Path) -> None:
        self.src = root / "src"
        self.prefix = root / "opt" / "tierfs"
        self.make_output = ""
        # Directories install will have to create for the unit; uninstall must remove them again.
        self.missing_dirs = [d for d in (INSTALL_UNIT.parent, INSTALL_UNIT.parent.parent) if not d.exists()]

    @property
    def make_vars(self) -> list[str]:
        return [f"PREFIX={self.prefix}", f"INSTALL_PYTHON={SYSTEM_PYTHON}"]

    def install(self) -> Installed:
        started = time.monotonic()
        self.make_output = must(["make", "-C", str(self.src), "install", *self.make_vars], INSTALL_TIMEOUT)
        print(f"make install took {time.monotonic() - started:.1f} s")
        shutil.rmtree(self.src)  # "works after the checkout moves"
        return self

    def cleanup(self) -> None:
        """Uninstall; then, belt and braces, remove any link into our prefix still there."""
        self.uninstall()
        for path in [*INSTALL_LINKS, INSTALL_UNIT]:
            if path.is_symlink() and os.readlink(path).startswith(str(self.prefix)):
                path.unlink()

    def uninstall(self) -> subprocess.CompletedProcess[str]:
        """`make uninstall` from the checkout (the copy installed from is gone by then)."""
        return sh(["make", "-s", "-C", str(REPO_ROOT), "uninstall", *self.make_vars])


@pytest.fixture(scope="class")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Installed]:
    inst = Installed(tmp_path_factory.mktemp("install"))
    copy_sources(inst.src)
    with contextlib.ExitStack() as stack:
        stack.enter_context(links_set_aside(INSTALL_LINKS))
        refuse_foreign([INSTALL_UNIT])
        stack.callback(inst.cleanup)
        yield inst.install()


# The first test also pays for the build (pip downloads on a fresh machine): more than 300 s.
@pytest.mark.timeout(INSTALL_TIMEOUT + 300)
class TestMakeInstall:
    """`make install` with PREFIX in a temporary directory; links in /usr/local/bin and /sbin."""

    def test_uninstall_refuses_a_prefix_it_did_not_make(self, tmp_path: Path) -> None:
        """`make uninstall PREFIX=<a directory that is not our virtualenv>` deletes nothing."""
        prefix = tmp_path / "precious"
        prefix.mkdir()
        (prefix / "data").write_text("keep me")
        done = sh(
            [
                "make",
                "-s",
                "-C",
                str(REPO_ROOT),
                "uninstall",
                f"PREFIX={prefix}",
                f"BINDIR={tmp_path}/bin",
                f"SBINDIR={tmp_path}/sbin",
                f"UNITDIR={tmp_path}/unit",
            ]
        )
        assert done.returncode != 0
        assert "not made by make install" in done.stderr
        assert (prefix / "data").read_text() == "keep me"
        shared = sh(["make", "-s", "-C", str(REPO_ROOT), "install", "PREFIX=/usr/local"])
        assert shared.returncode != 0 and "shared system directory" in shared.stderr

    def test_layout_is_self_contained(self, installed: Installed) -> None:
        prefix = installed.prefix
        assert os.readlink("/usr/local/bin/tierfs") == str(prefix / "bin" / "tierfs")
        assert os.readlink("/sbin/mount.tierfs") == str(prefix / "bin" / "mount.tierfs")
        unit = INSTALL_UNIT.read_text()
        assert "ExecStart=/usr/local/bin/tierfs mount " in unit
        assert_unit_verifies(INSTALL_UNIT.parent)
        assert f"Documentation=file://{prefix}/share/tierfs/deployment.md" in unit
        assert (prefix / "share" / "tierfs" / "deployment.md").is_file()
        example = prefix / "share" / "tierfs" / "tierfs.env.example"
        assert example.read_text() == (REPO_ROOT / "packaging/systemd/tierfs.env.example").read_text()
        # Its own interpreter is the system's versioned Python, not the checkout's virtualenv.
        assert (prefix / "bin" / "tierfs").read_text().splitlines()[0] == f"#!{prefix}/bin/python"
        assert os.path.realpath(prefix / "bin" / "python") == os.path.realpath(SYSTEM_PYTHON)
        assert (prefix / "bin" / "pip").exists()  # ensurepip's own, not the system's
        # Nothing refers to the checkout or to the copy it was installed from.
        for needle in (str(REPO_ROOT), str(installed.src)):
            hits = sh(["grep", "-rlIF", needle, str(prefix / "bin"), str(prefix / "pyvenv.cfg")])
            assert hits.stdout == "", f"{needle} in {hits.stdout}"
        found = sh(
            ["python3", "-c", "import tierfs; print(tierfs.__file__)"],
            cwd="/",
            env={"PATH": f"{prefix}/bin:{MINIMAL_PATH}"},
        )
        assert found.stdout.startswith(str(prefix / "lib")), found

    def test_version_and_doctor_under_mount_path(self, installed: Installed, seaweed: SeaweedFS) -> None:
        """What mount.fuse3 runs (``/bin/sh -c tierfs`` with no PATH) is the installed tierfs."""
        found = must(["env", "-i", "/bin/sh", "-c", "command -v tierfs"]).strip()
        assert found == "/usr/local/bin/tierfs"
        assert must(["env", "-i", "/bin/sh", "-c", "tierfs --version"]).strip() == f"tierfs {VERSION}"
        keys = [
            f"AWS_ACCESS_KEY_ID={ACCESS}",
            f"AWS_SECRET_ACCESS_KEY={SECRET}",
            "AWS_EC2_METADATA_DISABLED=true",
        ]
        cache = str(installed.prefix.parent / "cache")
        doctor = sh(
            ["env", "-i", *keys, "/bin/sh", "-c", 'exec tierfs doctor "$@"', "sh",
             "--endpoint-url", seaweed.endpoint_url, "--cache-dir", cache]
        )  # fmt: skip
        assert doctor.returncode == 0, doctor.stdout + doctor.stderr
        assert re.search(r"^ok +mount helper", doctor.stdout, re.M), doctor.stdout

    @pytest.mark.parametrize("entry", [0, 1], ids=["boot", "automount"])
    def test_fstab_line_mounts_under_minimal_path(
        self,
        entry: int,
        installed: Installed,
        tmp_path: Path,
        seaweed: SeaweedFS,
        source: str,  # noqa: F811
        system_mounts: SystemMounts,  # noqa: F811
    ) -> None:
        fstab_mount(system_mounts, tmp_path, seaweed, source, entry, installed.prefix)

    def test_uninstall_removes_exactly_what_install_added(self, installed: Installed) -> None:
        done = installed.uninstall()
        assert done.returncode == 0, done.stderr
        for path in [*INSTALL_LINKS, INSTALL_UNIT, installed.prefix, *installed.missing_dirs]:
            assert not os.path.lexists(path), path
        again = installed.uninstall()  # idempotent
        assert again.returncode == 0, again.stderr


# --------------------------------------------------------------------------- the .deb

DEB_PATHS = [
    Path("/opt/tierfs"),
    Path("/usr/bin/tierfs"),
    Path("/usr/sbin/mount.tierfs"),
    Path("/lib/systemd/system/tierfs@.service"),
    Path("/usr/share/doc/tierfs"),
]


def dpkg_status(package: str) -> str:
    """``install ok installed``, ``deinstall ok config-files`` ... or '' when dpkg never heard of it."""
    done = sh(["dpkg-query", "-W", "-f=${Status}", package])
    return done.stdout.strip() if done.returncode == 0 else ""


def apt(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    return sh(["apt-get", "-y", "-q", "-o", "DPkg::Lock::Timeout=300", *args], INSTALL_TIMEOUT, env=env)


@pytest.fixture(scope="class")
def deb(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`make deb` into a temporary directory (world-readable, so apt's sandbox user reads it)."""
    out = tmp_path_factory.mktemp("deb")
    out.chmod(0o755)
    started = time.monotonic()
    must(
        ["make", "-s", "-C", str(REPO_ROOT), "deb", f"DEB_DIR={out}", f"INSTALL_PYTHON={SYSTEM_PYTHON}"],
        INSTALL_TIMEOUT,
    )
    print(f"make deb took {time.monotonic() - started:.1f} s")
    arch = must(["dpkg", "--print-architecture"]).strip()
    path = out / f"tierfs_{VERSION}_{arch}.deb"
    assert path.is_file(), list(out.iterdir())
    return path


@pytest.fixture
def deb_installed(deb: Path) -> Iterator[Path]:
    """``apt-get install ./tierfs_*.deb``, purged at teardown whatever happened."""
    assert dpkg_status("tierfs") == "", f"package tierfs already known to dpkg: {dpkg_status('tierfs')}"
    refuse_foreign(DEB_PATHS)
    try:
        done = apt("install", "--no-install-recommends", str(deb))
        assert done.returncode == 0, done.stdout + done.stderr
        yield deb
    finally:
        if dpkg_status("tierfs"):
            apt("purge", "tierfs")


# The first test also pays for the build (pip downloads on a fresh machine): more than 300 s.
@pytest.mark.timeout(INSTALL_TIMEOUT + 300)
class TestDebianPackage:
    def test_control_contents_and_scripts(self, deb: Path) -> None:
        info = must(["dpkg-deb", "-f", str(deb)])
        fields = dict(re.findall(r"^(\S+): (.*)$", info, re.M))
        pyver = must([str(SYSTEM_PYTHON), "-c", "import sys; print('%d.%d' % sys.version_info[:2])"]).strip()
        assert fields["Package"] == "tierfs" and fields["Version"] == VERSION
        assert fields["Architecture"] == must(["dpkg", "--print-architecture"]).strip()
        depends = [d.strip() for d in fields["Depends"].split(",")]
        assert "fuse3" in depends
        assert any(
            re.fullmatch(rf"python{re.escape(pyver)} \(>= {re.escape(pyver)}\.\d+\)", d) for d in depends
        )
        assert int(fields["Installed-Size"]) > 10_000  # KiB: the whole virtualenv is in it

        listing = must(["dpkg-deb", "-c", str(deb)])
        names = {line.split()[5].removeprefix("."): line for line in listing.splitlines()}
        assert "-> /opt/tierfs/bin/tierfs" in names["/usr/bin/tierfs"]
        assert "-> /opt/tierfs/bin/mount.tierfs" in names["/usr/sbin/mount.tierfs"]
        for path in (
            "/opt/tierfs/bin/tierfs",
            "/opt/tierfs/pyvenv.cfg",
            "/lib/systemd/system/tierfs@.service",
            "/opt/tierfs/share/tierfs/tierfs.env.example",
            "/usr/share/doc/tierfs/copyright",
        ):
            assert path in names, path
        assert any(n.startswith(f"/opt/tierfs/lib/python{pyver}/site-packages/pyfuse3") for n in names)
        assert not [
            n for n in names if n.endswith(".pyc") or n.startswith("/usr/local") or n.startswith("/etc")
        ]
        assert all(line.split()[1] == "root/root" for line in listing.splitlines())

        def member(path: str) -> str:
            tar = subprocess.run(["dpkg-deb", "--fsys-tarfile", str(deb)], capture_output=True, check=True)
            return subprocess.run(
                ["tar", "-xO", f".{path}"], input=tar.stdout, capture_output=True, check=True
            ).stdout.decode()

        assert member("/opt/tierfs/bin/tierfs").splitlines()[0] == "#!/opt/tierfs/bin/python"
        assert "ExecStart=/usr/bin/tierfs mount " in member("/lib/systemd/system/tierfs@.service")
        assert "tierfs-deb." not in member("/opt/tierfs/pyvenv.cfg")  # no staging path left

        control = Path(tempfile.mkdtemp(prefix="tierfs-control-"))
        try:
            must(["dpkg-deb", "-e", str(deb), str(control)])
            scripts = {p.name for p in control.iterdir()} - {"control", "md5sums"}
            assert scripts == {"postinst", "prerm", "postrm"}
            for name in scripts:  # nothing enabled, started, created or deleted outside /opt/tierfs
                lines = (control / name).read_text().splitlines()
                text = "\n".join(line for line in lines if not line.lstrip().startswith("#"))
                for word in (
                    "systemctl enable",
                    "systemctl start",
                    "useradd",
                    "adduser",
                    "rm -rf /",
                    "/etc/",
                    "mount ",
                    "modprobe",
                    "pip ",
                ):
                    assert word not in text, (name, word)
        finally:
            shutil.rmtree(control)

    @pytest.mark.parametrize("entry", [1], ids=["automount"])
    def test_apt_install_mount_through_fstab_then_purge(
        self,
        entry: int,
        deb_installed: Path,
        tmp_path: Path,
        seaweed: SeaweedFS,
        source: str,  # noqa: F811
        system_mounts: SystemMounts,  # noqa: F811
    ) -> None:
        assert dpkg_status("tierfs") == "install ok installed"
        assert must(["env", "-i", "/bin/sh", "-c", "command -v tierfs"]).strip() == "/usr/bin/tierfs"
        assert (
            must(["env", "-i", f"PATH={MINIMAL_PATH}", "tierfs", "--version"]).strip() == f"tierfs {VERSION}"
        )
        assert os.path.realpath("/sbin/mount.tierfs") == "/opt/tierfs/bin/mount.tierfs"
        assert_unit_verifies(Path("/lib/systemd/system"))
        # postinst byte-compiled the modules.
        assert list(Path("/opt/tierfs/lib").rglob("tierfs/__pycache__/cli.*.pyc"))

        fstab_mount(system_mounts, tmp_path, seaweed, source, entry, Path("/opt/tierfs"))
        system_mounts.cleanup()

        done = apt("purge", "tierfs")
        assert done.returncode == 0, done.stdout + done.stderr
        assert dpkg_status("tierfs") == ""
        left = [str(p) for p in DEB_PATHS if os.path.lexists(p)]
        left += [str(p) for p in Path("/var/lib/dpkg/info").glob("tierfs.*")]
        assert left == [], f"left behind by purge: {left}"


# --------------------------------------------------------------------------- a container


class Dockerd:
    """A private dockerd (own data root, exec root and socket; no iptables, no bridge; vfs),
    in its own process group, for one test class."""

    IMAGE = "tierfs-reader:issue17"

    def __init__(self, root: Path) -> None:
        self.root = root
        self.socket = root / "docker.sock"
        self.log = root / "dockerd.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        for sub in ("data", "exec"):
            (self.root / sub).mkdir()
        command = [
            "dockerd",
            "--iptables=false",
            "--bridge=none",
            "--storage-driver=vfs",
            "--data-root",
            str(self.root / "data"),
            "--exec-root",
            str(self.root / "exec"),
            "--pidfile",
            str(self.root / "docker.pid"),
            "-H",
            f"unix://{self.socket}",
        ]
        with self.log.open("wb") as log:
            self.proc = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + 60
        while self.docker("version").returncode != 0:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(
                    f"dockerd did not come up\n{self.log.read_text(errors='replace')[-3000:]}"
                )
            time.sleep(0.3)

    def docker(self, *args: str, timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
        return sh(["docker", "-H", f"unix://{self.socket}", *args], timeout)

    def ok(self, *args: str) -> str:
        done = self.docker(*args)
        assert done.returncode == 0, f"docker {' '.join(args)}: {done.stdout}{done.stderr}"
        return done.stdout

    def build_reader_image(self) -> None:
        """An image of one directory: Debian's static busybox and the few applets the test runs."""
        rootfs = self.root / "image"
        (rootfs / "bin").mkdir(parents=True)
        shutil.copy2("/bin/busybox", rootfs / "bin" / "busybox")
        for applet in ("sh", "cat", "sleep", "sha256sum", "ls"):
            (rootfs / "bin" / applet).symlink_to("busybox")
        tar = subprocess.run(["tar", "-C", str(rootfs), "-c", "."], capture_output=True, check=True)
        imported = subprocess.run(
            ["docker", "-H", f"unix://{self.socket}", "import", "-", self.IMAGE],
            input=tar.stdout,
            capture_output=True,
            timeout=120,
            check=False,
        )
        assert imported.returncode == 0, imported.stderr

    def stop(self) -> None:
        """Remove containers, SIGTERM dockerd (it stops containerd), SIGKILL what is left, unmount
        whatever it left under its roots, delete them."""
        if self.proc is not None:
            if self.proc.poll() is None:
                listed = self.docker("ps", "-aq", timeout=30).stdout.split()
                if listed:
                    self.docker("rm", "-f", *listed, timeout=60)
                self.proc.send_signal(signal.SIGTERM)
                try:
                    self.proc.wait(30)
                except subprocess.TimeoutExpired:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(self.proc.pid, signal.SIGKILL)
                    self.proc.wait(10)
            for pid in processes_naming(str(self.root)):  # shims or containerd that outlived it
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        for target in reversed(mounts_under(self.root)):
            sh(["umount", "-l", target], 30)
        shutil.rmtree(self.root, ignore_errors=True)


def mounts_under(root: Path) -> list[str]:
    """Mount points at or below ``root``, outermost first (mountinfo order)."""
    found = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        target = line.split()[4].encode().decode("unicode_escape")
        if target == str(root) or target.startswith(f"{root}/"):
            found.append(target)
    return found


@pytest.fixture(scope="class")
def dockerd() -> Iterator[Dockerd]:
    if shutil.which("dockerd") is None or not os.path.exists("/bin/busybox"):
        pytest.fail(
            "dockerd or busybox is missing: `make container-test` installs docker.io and busybox-static"
        )
    # A short path of its own: dockerd's and containerd's sockets live under it (108-byte limit).
    daemon = Dockerd(Path(tempfile.mkdtemp(prefix="tierfs-dockerd-", dir="/tmp")))
    try:
        daemon.start()
        daemon.build_reader_image()
        yield daemon
    finally:
        daemon.stop()


@pytest.fixture
def shared_dir(dockerd: Dockerd) -> Iterator[Path]:
    """``ROOT/shared`` bind-mounted onto itself and made shared: ``-v ...:rslave`` needs a shared
    or slave source, and this machine's / is private (a host with systemd has / shared)."""
    shared = dockerd.root / f"shared-{uuid.uuid4().hex[:8]}"
    (shared / "data").mkdir(parents=True)
    must(["mount", "--bind", str(shared), str(shared)])
    try:
        must(["mount", "--make-shared", str(shared)])
        yield shared
    finally:
        for target in reversed(mounts_under(shared)):
            sh(["umount", "-l", target], 30)


@pytest.fixture(scope="class")
def tierfs_image(dockerd: Dockerd, deb: Path) -> str:
    """An image of tierfs itself: a Debian root made with debootstrap (python3.11 and fuse3 from
    Debian's archive), the .deb installed in it, ``tierfs`` as entry point. The README's
    ``docker build`` needs python:3.11-slim-bookworm from a registry, which is not reachable."""
    rootfs = dockerd.root / "tierfs-rootfs"
    started = time.monotonic()
    # The host's release and Python, so that the .deb's Depends hold; debootstrap's default mirror.
    release = dict(
        line.split("=", 1) for line in Path("/etc/os-release").read_text().split("\n") if "=" in line
    )
    pyver = must([str(SYSTEM_PYTHON), "-c", "import sys; print('%d.%d' % sys.version_info[:2])"]).strip()
    codename = release["VERSION_CODENAME"].strip('"')
    must(["debootstrap", "--variant=minbase", f"--include=python{pyver},fuse3", codename, str(rootfs)],
         INSTALL_TIMEOUT)  # fmt: skip
    shutil.copy2(deb, rootfs / "tmp" / deb.name)
    must(["chroot", str(rootfs), "dpkg", "-i", f"/tmp/{deb.name}"])
    (rootfs / "tmp" / deb.name).unlink()
    tar = subprocess.run(["tar", "-C", str(rootfs), "-c", "."], capture_output=True, check=True)
    image = "tierfs:issue17"
    imported = subprocess.run(
        ["docker", "-H", f"unix://{dockerd.socket}", "import", "-c", 'ENTRYPOINT ["tierfs"]', "-", image],
        input=tar.stdout, capture_output=True, timeout=300, check=False,
    )  # fmt: skip
    assert imported.returncode == 0, imported.stderr
    shutil.rmtree(rootfs)
    print(f"tierfs image built in {time.monotonic() - started:.1f} s")
    return image


class TestContainer:
    def test_mount_made_after_the_container_started_reaches_it_through_rslave(
        self,
        dockerd: Dockerd,
        shared_dir: Path,
        seaweed: SeaweedFS,
        bucket: Callable[..., str],
        mounter: Mounter,
    ) -> None:
        name = bucket()
        s3_client(seaweed.endpoint_url).put_object(Bucket=name, Key="prefix/data.bin", Body=PAYLOAD)
        hostdir = shared_dir / "data"
        container = f"tierfs-reader-{uuid.uuid4().hex[:8]}"
        dockerd.ok(
            "run",
            "-d",
            "--name",
            container,
            "--network",
            "none",
            "-v",
            f"{hostdir}:/data:rslave",
            Dockerd.IMAGE,
            "/bin/sleep",
            "600",
        )
        try:
            assert dockerd.ok("exec", container, "ls", "-A", "/data") == ""  # nothing there yet

            mount = mounter(f"s3://{name}/prefix", "--allow-other", mountpoint=hostdir)
            inside = dockerd.ok("exec", container, "cat", "/proc/self/mountinfo")
            assert re.search(r" /data [^-]*- fuse\.tierfs ", inside), inside
            digest = dockerd.ok("exec", container, "sha256sum", "/data/data.bin").split()[0]
            assert digest == hashlib.sha256(PAYLOAD).hexdigest()

            assert_umount_ends_daemon(mount)  # the unmount propagates in as well
            assert not is_fuse_mounted(hostdir)
            assert dockerd.ok("exec", container, "ls", "-A", "/data") == ""
        finally:
            dockerd.docker("rm", "-f", container)

    @pytest.mark.timeout(INSTALL_TIMEOUT + 300)
    def test_tierfs_in_a_container_mounts_for_the_host_through_rshared(
        self,
        tierfs_image: str,
        dockerd: Dockerd,
        shared_dir: Path,
        seaweed: SeaweedFS,
        bucket: Callable[..., str],
        tmp_path: Path,
    ) -> None:
        """The README's ``docker run`` of tierfs (device, capability, --env-file, rshared, -f,
        --allow-other), but mounting at a subdirectory of the shared volume: tierfs refuses a
        mount point that is itself a mount (the volume), see the report of issue 17. The host
        sees the mount and reads through it; ``docker stop`` unmounts it everywhere."""
        name = bucket()
        s3_client(seaweed.endpoint_url).put_object(Bucket=name, Key="prefix/data.bin", Body=PAYLOAD)
        env_file = tmp_path / "mnt-data.env"
        env_file.write_text(f"AWS_ACCESS_KEY_ID={ACCESS}\nAWS_SECRET_ACCESS_KEY={SECRET}\n")
        cache = dockerd.root / f"cache-{uuid.uuid4().hex[:8]}"
        cache.mkdir()
        container = f"tierfs-data-{uuid.uuid4().hex[:8]}"
        dockerd.ok(
            "run", "-d", "--name", container, "--network", "host",
            "--device", "/dev/fuse", "--cap-add", "SYS_ADMIN", "--security-opt", "apparmor:unconfined",
            "-v", f"{shared_dir}:/mnt/tierfs:rshared", "-v", f"{cache}:/var/cache/tierfs",
            "--env-file", str(env_file), tierfs_image,
            "mount", f"s3://{name}/prefix", "/mnt/tierfs/data", "-f", "--allow-other",
            "--endpoint-url", seaweed.endpoint_url, "--cache-dir", "/var/cache/tierfs/data",
        )  # fmt: skip
        hostdir = shared_dir / "data"
        try:
            deadline = time.monotonic() + 60
            while not is_fuse_mounted(hostdir):
                logs = dockerd.docker("logs", container).stderr
                running = dockerd.docker("inspect", "-f", "{{.State.Running}}", container).stdout.strip()
                assert running == "true" and time.monotonic() < deadline, f"not mounted on the host\n{logs}"
                time.sleep(0.2)
            assert (
                hashlib.sha256((hostdir / "data.bin").read_bytes()).digest()
                == hashlib.sha256(PAYLOAD).digest()
            )
            dockerd.ok("stop", "-t", "60", container)  # SIGTERM: flush, unmount, exit 0
            assert not is_fuse_mounted(hostdir)
            state = dockerd.ok("inspect", "-f", "{{.State.ExitCode}}", container).strip()
            assert state == "0", dockerd.docker("logs", container).stderr
        finally:
            dockerd.docker("rm", "-f", container)
            if is_fuse_mounted(hostdir):
                sh(["umount", "-l", str(hostdir)], 30)
