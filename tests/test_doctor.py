"""``tierfs doctor``: every check passes where it should and fails, with a fix, where it should.

The checks run in-process against fakes where the real machine cannot be put into the
failing state (a non-root user, a fuse.conf without ``user_allow_other``, an NFS cache
disk), and against the real thing otherwise: /bin/sh's own search for ``tierfs``, a real
FUSE mount and a real tmpfs under the cache dir, moto for the endpoint and the bucket,
a socket that never answers for the endpoint's timeout. The command line is run as a
subprocess, as a user runs it, for the exit status and the report's shape.
"""

from __future__ import annotations

import io
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from mounting import Mounter, run_tierfs

from tierfs import __version__, doctor
from tierfs.config import Source
from tools.servers import MotoS3

VENV_BIN = Path(sys.executable).parent


def statuses(results: list[doctor.Result]) -> dict[str, str]:
    return {r.name: r.status for r in results}


@pytest.fixture
def no_credentials(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """An environment in which boto3's chain finds nothing, and never asks instance metadata."""
    for name in list(os.environ):
        if name.startswith("AWS_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-credentials"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-config"))


@pytest.fixture
def refused_port() -> int:
    """A loopback port nothing listens on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


@pytest.fixture
def silent_server() -> Iterator[str]:
    """A loopback listener that accepts connections (into its backlog) and never answers."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(8)
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"


# --------------------------------------------------------------------------- FUSE


def test_fuse_device_ok_missing_and_not_a_device(tmp_path: Path) -> None:
    assert doctor.check_fuse_device(Path("/dev/null")).status == doctor.OK  # a character device, rw
    missing = doctor.check_fuse_device(tmp_path / "fuse")
    assert missing.status == doctor.FAIL and "modprobe fuse" in missing.fix and "--device" in missing.fix
    regular = tmp_path / "file"
    regular.write_text("")
    assert doctor.check_fuse_device(regular).status == doctor.FAIL


def test_fusermount_found_missing_and_not_setuid(tmp_path: Path) -> None:
    assert doctor.check_fusermount(0, "/usr/bin:/bin").status == doctor.OK
    missing = doctor.check_fusermount(0, str(tmp_path))
    assert missing.status == doctor.FAIL and missing.fix == "apt-get install fuse3"
    fake = tmp_path / "fusermount3"
    fake.write_text("#!/bin/sh\n")
    fake.chmod(0o755)
    assert doctor.check_fusermount(0, str(tmp_path)).status == doctor.OK  # root needs no setuid
    plain = doctor.check_fusermount(1000, str(tmp_path))
    assert plain.status == doctor.FAIL and "chmod u+s" in plain.fix
    fake.chmod(0o4755)
    assert doctor.check_fusermount(1000, str(tmp_path)).status == doctor.OK


@pytest.mark.parametrize(
    ("conf", "expected"),
    [
        (None, doctor.FAIL),
        ("# user_allow_other - Using the allow_other mount option\n#user_allow_other\n", doctor.FAIL),
        ("mount_max = 1000\nuser_allow_other\n", doctor.OK),
        ("  user_allow_other   # shared on purpose\n", doctor.OK),
    ],
    ids=["no-file", "commented-out", "set", "set-with-comment"],
)
def test_allow_other_for_a_non_root_user(tmp_path: Path, conf: str | None, expected: str) -> None:
    path = tmp_path / "fuse.conf"
    if conf is not None:
        path.write_text(conf)
    result = doctor.check_allow_other(True, 1000, path)
    assert result.status == expected, result
    if expected == doctor.FAIL:
        assert f"echo user_allow_other >> {path}" in result.fix


def test_allow_other_needs_nothing_for_root_or_when_not_asked(tmp_path: Path) -> None:
    absent = tmp_path / "fuse.conf"
    assert doctor.check_allow_other(True, 0, absent).status == doctor.OK
    assert doctor.check_allow_other(False, 1000, absent).status == doctor.SKIP


# --------------------------------------------------------------------------- mount(8) helpers


def fake_tierfs(directory: Path, script: str) -> Path:
    directory.mkdir(exist_ok=True)
    path = directory / "tierfs"
    path.write_text(f"#!/bin/sh\n{script}\n")
    path.chmod(0o755)
    return path


def test_fuse_helper_is_looked_up_as_mount_fuse3_does(tmp_path: Path) -> None:
    """Found (and runnable, and this version) on the shell's path: ok; otherwise FAIL or warn."""
    empty = tmp_path / "empty"
    empty.mkdir()
    missing = doctor.check_fuse_helper(str(empty), doctor.SBIN_DIRS)
    assert missing.status == doctor.FAIL
    assert "tierfs: not found" in missing.detail and "make install" in missing.fix

    found = doctor.check_fuse_helper(f"{VENV_BIN}:/usr/bin:/bin", doctor.SBIN_DIRS)
    assert found.status == doctor.OK, found
    assert f"{VENV_BIN}/tierfs (tierfs {__version__})" in found.detail

    broken = tmp_path / "broken"
    fake_tierfs(broken, "echo 'No module named tierfs' >&2; exit 1")
    result = doctor.check_fuse_helper(str(broken), doctor.SBIN_DIRS)
    assert result.status == doctor.FAIL and "No module named tierfs" in result.detail

    old = tmp_path / "old"
    fake_tierfs(old, "echo 'tierfs 0.0.1'")
    assert doctor.check_fuse_helper(str(old), doctor.SBIN_DIRS).status == doctor.WARN

    no_mount_fuse = doctor.check_fuse_helper(f"{VENV_BIN}:/usr/bin:/bin", (str(empty),))
    assert no_mount_fuse.status == doctor.FAIL and no_mount_fuse.fix == "apt-get install fuse3"


def test_default_lookup_is_the_shells_builtin_path_not_ours(monkeypatch: pytest.MonkeyPatch) -> None:
    """Our own PATH (this virtualenv first) must not make the helper check pass: mount(8) drops it."""
    monkeypatch.setenv("PATH", f"{VENV_BIN}:{os.environ.get('PATH', '')}")
    expected = subprocess.run(
        ["env", "-i", "/bin/sh", "-c", "command -v tierfs"], capture_output=True, text=True, check=False
    ).stdout.strip()
    assert doctor.shell_finds("tierfs", None) == (expected or None)
    assert doctor.shell_finds("tierfs", None) != str(VENV_BIN / "tierfs")
    assert doctor.shell_finds("sh", None) == "/usr/bin/sh" or doctor.shell_finds("sh", None) == "/bin/sh"


def test_type_helper_in_sbin(tmp_path: Path) -> None:
    assert doctor.check_type_helper((str(tmp_path),)).status == doctor.WARN
    helper = tmp_path / "mount.tierfs"
    helper.symlink_to(VENV_BIN / "mount.tierfs")
    result = doctor.check_type_helper((str(tmp_path / "nowhere"), str(tmp_path)))
    assert result.status == doctor.OK and str(helper) in result.detail


# --------------------------------------------------------------------------- cache directory


def test_cache_dir_on_local_disk_passes_and_names_the_filesystem(tmp_path: Path) -> None:
    results = doctor.check_cache_dir(tmp_path / "cache" / "data", None, 0.10)
    assert statuses(results) == {"cache dir": "ok", "cache filesystem": "ok", "cache space": "ok"}
    assert "to be created in" in results[0].detail
    entry = doctor.filesystem_of(tmp_path)
    assert entry is not None and entry.fstype in results[1].detail


def test_cache_dir_under_a_file_fails(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    results = doctor.check_cache_dir(tmp_path / "file" / "cache", None, 0.10)
    assert statuses(results)["cache dir"] == doctor.FAIL


def test_cache_space_below_the_floor_fails_and_a_too_big_cap_warns(tmp_path: Path) -> None:
    vfs = os.statvfs(tmp_path)
    free_share = vfs.f_bavail / vfs.f_blocks
    assert free_share < 0.99, "this test needs a disk that is not almost empty"
    full = doctor.check_cache_dir(tmp_path, None, min(0.999, free_share + 0.005))
    space = next(r for r in full if r.name == "cache space")
    assert space.status == doctor.FAIL and "--cache-min-free" in space.fix
    capped = doctor.check_cache_dir(tmp_path, 1 << 60, 0.0)
    assert next(r for r in capped if r.name == "cache space").status == doctor.WARN


def test_cache_on_tmpfs_warns(tmp_path: Path) -> None:
    target = tmp_path / "ram"
    target.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tierfs-doctor", str(target)], check=True)
    try:
        results = doctor.check_cache_dir(target / "cache", None, 0.10)
        fs = next(r for r in results if r.name == "cache filesystem")
        assert fs.status == doctor.WARN and fs.detail.startswith("tmpfs"), fs
    finally:
        subprocess.run(["umount", str(target)], check=True)


@pytest.mark.fuse
def test_cache_inside_a_fuse_mount_fails(moto: MotoS3, bucket: Callable[..., str], mounter: Mounter) -> None:
    mount = mounter(f"s3://{bucket(moto)}", endpoint_url=moto.endpoint_url)
    results = doctor.check_cache_dir(mount.path / "cache", None, 0.10)
    fs = next(r for r in results if r.name == "cache filesystem")
    assert fs.status == doctor.FAIL and fs.detail.startswith("fuse.tierfs"), fs


def test_cache_on_nfs_fails(tmp_path: Path) -> None:
    """No NFS server here: a mountinfo that puts the cache's disk on one."""
    mountinfo = tmp_path / "mountinfo"
    mountinfo.write_text(
        "22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw\n"
        f"90 22 0:50 / {tmp_path} rw,relatime shared:40 - nfs4 filer:/export rw,vers=4.2\n"
    )
    results = doctor.check_cache_dir(tmp_path / "cache", None, 0.10, mountinfo)
    fs = next(r for r in results if r.name == "cache filesystem")
    assert fs.status == doctor.FAIL and "filer:/export" in fs.detail and "LMDB" in fs.detail


def test_filesystem_of_unescapes_mount_points(tmp_path: Path) -> None:
    mountinfo = tmp_path / "mountinfo"
    mountinfo.write_text(
        "22 1 8:1 / / rw - ext4 /dev/sda1 rw\n30 22 0:40 / /mnt/my\\040data rw - xfs /dev/nvme0n1 rw\n"
    )
    spaced = doctor.filesystem_of(Path("/mnt/my data/x"), mountinfo)
    assert spaced is not None and (spaced.mountpoint, spaced.fstype, spaced.source) == (
        "/mnt/my data", "xfs", "/dev/nvme0n1"
    )
    root = doctor.filesystem_of(Path("/mnt/mydata"), mountinfo)
    assert root is not None and (root.mountpoint, root.fstype, root.source) == ("/", "ext4", "/dev/sda1")


# --------------------------------------------------------------------------- S3


def test_credentials_from_the_environment_and_from_a_profile_file(
    no_credentials: None, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAEXAMPLE0001")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-printed-anywhere")
    result, session = doctor.check_credentials(doctor.Options())
    assert result.status == doctor.OK and session is not None
    assert result.detail == "from env (key id ...0001)"
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")

    credentials = tmp_path / "credentials"
    credentials.write_text("[tierfs]\naws_access_key_id = AKIAEXAMPLE0002\naws_secret_access_key = s\n")
    result, _ = doctor.check_credentials(doctor.Options(profile="tierfs", credentials_file=str(credentials)))
    assert (
        result.status == doctor.OK and "0002" in result.detail and "shared-credentials-file" in result.detail
    )
    assert os.environ["AWS_SHARED_CREDENTIALS_FILE"] != str(credentials)  # our environment untouched


def test_no_credentials_and_an_unknown_profile_fail(no_credentials: None) -> None:
    result, session = doctor.check_credentials(doctor.Options())
    assert result.status == doctor.FAIL and session is None and "AWS_ACCESS_KEY_ID" in result.fix
    result, _ = doctor.check_credentials(doctor.Options(profile="nope"))
    assert result.status == doctor.FAIL and "nope" in result.detail


def test_endpoint_answers(moto: MotoS3) -> None:
    result = doctor.check_endpoint(moto.endpoint_url, 5.0)
    assert result.status == doctor.OK and "answered HTTP" in result.detail


def test_endpoint_refused_silent_or_malformed_fails_in_bounded_time(
    refused_port: int, silent_server: str
) -> None:
    refused = doctor.check_endpoint(f"http://127.0.0.1:{refused_port}", 5.0)
    assert refused.status == doctor.FAIL and "refused" in refused.detail.lower()
    started = time.monotonic()
    silent = doctor.check_endpoint(silent_server, 0.5)
    assert time.monotonic() - started < 3.0
    assert silent.status == doctor.FAIL and "no answer within 0.5 s" in silent.detail
    assert doctor.check_endpoint("10.0.0.5:8333", 5.0).status == doctor.FAIL  # no scheme
    assert doctor.check_endpoint(None, 5.0).status == doctor.SKIP


def test_bucket_present_and_missing(moto: MotoS3, bucket: Callable[..., str], s3_env: None) -> None:
    name = bucket(moto)
    options = doctor.Options(endpoint_url=moto.endpoint_url, source=Source.parse(f"s3://{name}/p"))
    _, session = doctor.check_credentials(options)
    assert doctor.check_bucket(options, session).status == doctor.OK
    options.source = Source.parse(f"s3://{name}-missing")
    missing = doctor.check_bucket(options, session)
    assert missing.status == doctor.FAIL and "no such bucket" in missing.detail


# --------------------------------------------------------------------------- report and command line


def test_report_exits_nonzero_only_on_a_failure() -> None:
    good = [doctor.Result("a", doctor.OK, "fine"), doctor.Result("b", doctor.WARN, "hmm", "do x")]
    out = io.StringIO()
    assert doctor.report(good, out) == 0
    assert "fix: do x" in out.getvalue() and "all checks passed (1 warnings)" in out.getvalue()
    out = io.StringIO()
    assert doctor.report([*good, doctor.Result("c", doctor.FAIL, "broken", "do y")], out) == 1
    assert "FAIL  c  broken" in out.getvalue() and "fix: do y" in out.getvalue()
    assert out.getvalue().rstrip().endswith("1 check failed")


def test_version() -> None:
    done = run_tierfs("--version")
    assert done.returncode == 0 and done.stdout.strip() == f"tierfs {__version__}"


@pytest.mark.fuse
def test_cli_passes_on_a_good_setup(tmp_path: Path, moto: MotoS3, bucket: Callable[..., str]) -> None:
    name = bucket(moto)
    done = run_tierfs(
        "doctor", f"s3://{name}/prefix", "--endpoint-url", moto.endpoint_url,
        "--cache-dir", str(tmp_path / "c"), "--allow-other", "--mount-path", f"{VENV_BIN}:/usr/bin:/bin",
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    for check in (
        "fuse device",
        "fusermount3",
        "mount helper",
        "cache dir",
        "credentials",
        "endpoint",
        "bucket",
    ):
        assert any(line.startswith("ok") and f" {check} " in line for line in lines), (check, done.stdout)
    assert "FAIL" not in done.stdout


def test_cli_fails_naming_each_problem_with_its_fix(tmp_path: Path, refused_port: int) -> None:
    (tmp_path / "file").write_text("")
    done = run_tierfs(
        "doctor", "s3://some-bucket", "--endpoint-url", f"http://127.0.0.1:{refused_port}",
        "--cache-dir", str(tmp_path / "file" / "cache"), "--mount-path", str(tmp_path), "--timeout", "2",
    )  # fmt: skip
    assert done.returncode == 1, done.stdout + done.stderr
    failed = [line.split()[1] for line in done.stdout.splitlines() if line.startswith("FAIL")]
    assert failed == ["mount", "cache", "endpoint"], done.stdout  # mount helper, cache dir, endpoint
    assert done.stdout.count("fix: ") >= 3
    assert "skip  bucket" in done.stdout
    assert done.stdout.rstrip().endswith("3 checks failed")


def test_cli_usage_errors_exit_2() -> None:
    done = run_tierfs("doctor", "--cache-size", "lots")
    assert (
        done.returncode == 2 and done.stderr.startswith("tierfs: error:") and "Traceback" not in done.stderr
    )
