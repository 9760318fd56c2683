"""Issue 12 on real mounts: special files, hard links, ctime and the rules for other users.

Each group is checked through the kernel, in the bucket (keys, bodies, headers) and after
a remount: warm (same cache dir: the namespace keeps everything) and, where it differs,
cold (a new cache dir: only what the objects say). The other-uid rules run in forked
children that drop to uid 65534 on an ``--allow-other`` mount (tools/posixcheck.py).
"""

from __future__ import annotations

import contextlib
import os
import random
import socket
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from mounting import REPO_ROOT, Mount, Mounter
from test_posix_write import FAST, bucket_keys, flush, get_object

from tools.servers import SeaweedFS, s3_client

pytestmark = pytest.mark.fuse


@pytest.fixture
def s3(seaweed: SeaweedFS) -> Any:
    return s3_client(seaweed.endpoint_url, read_timeout=60.0)


@pytest.fixture
def bucket_name(bucket: Callable[..., str]) -> str:
    return bucket()


def make_specials(root: Path) -> None:
    os.mkfifo(root / "fifo", 0o640)
    os.mknod(root / "chr", stat.S_IFCHR | 0o600, os.makedev(1, 3))
    os.mknod(root / "blk", stat.S_IFBLK | 0o640, os.makedev(8, 17))
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(root / "sock"))
    sock.close()


def assert_specials(root: Path) -> None:
    fifo, chr_, blk, sock = (os.lstat(root / n) for n in ("fifo", "chr", "blk", "sock"))
    assert stat.S_ISFIFO(fifo.st_mode) and stat.S_IMODE(fifo.st_mode) == 0o640
    assert stat.S_ISCHR(chr_.st_mode) and chr_.st_rdev == os.makedev(1, 3)
    assert (
        stat.S_ISBLK(blk.st_mode) and blk.st_rdev == os.makedev(8, 17) and stat.S_IMODE(blk.st_mode) == 0o640
    )
    assert stat.S_ISSOCK(sock.st_mode)


def pipe_through(path: Path, payload: bytes) -> bytes:
    pid = os.fork()
    if pid == 0:  # the writer
        try:
            with open(path, "wb") as writer:
                writer.write(payload)
        finally:
            os._exit(0)
    with open(path, "rb") as reader:
        data = reader.read()
    os.waitpid(pid, 0)
    return data


def test_special_files_export_and_come_back(
    bucket_name: str, mounter: Mounter, s3: Any, tmp_path: Path
) -> None:
    mount = mounter(f"s3://{bucket_name}", *FAST)
    make_specials(mount.path)
    assert pipe_through(mount.path / "fifo", b"a working pipe") == b"a working pipe"
    assert_specials(mount.path)
    flush(mount)
    body, meta = get_object(s3, bucket_name, "fifo")
    assert body == b"" and meta["file-permissions"] == "0010640"
    assert get_object(s3, bucket_name, "blk")[1]["tierfs-rdev"] == "8:17"
    assert get_object(s3, bucket_name, "chr")[1]["file-permissions"] == "0020600"
    assert get_object(s3, bucket_name, "sock")[1]["file-permissions"].startswith("014")
    mount.umount()
    warm = mounter(f"s3://{bucket_name}", *FAST, cache_dir=mount.cache_dir)
    assert_specials(warm.path)
    warm.umount()
    cold = mounter(f"s3://{bucket_name}", *FAST, cache_dir=tmp_path / "cold-cache")
    assert sorted(os.listdir(cold.path)) == ["blk", "chr", "fifo", "sock"]
    assert_specials(cold.path)  # read back from the headers alone
    assert pipe_through(cold.path / "fifo", b"again") == b"again"


def test_foreign_special_objects_use_fsx_type_bits(bucket_name: str, mounter: Mounter, s3: Any) -> None:
    """Objects written by FSx or another tool: the type bits of file-permissions decide, for
    zero-byte objects only (a copied header must not hide data)."""
    s3.put_object(Bucket=bucket_name, Key="d/pipe", Body=b"", Metadata={"file-permissions": "0010600"})
    s3.put_object(Bucket=bucket_name, Key="d/dev", Body=b"",
                  Metadata={"file-permissions": "0020644", "tierfs-rdev": "10:200"})  # fmt: skip
    s3.put_object(
        Bucket=bucket_name, Key="d/data", Body=b"not a pipe", Metadata={"file-permissions": "0010644"}
    )
    s3.put_object(Bucket=bucket_name, Key="d/empty", Body=b"")
    mount = mounter(f"s3://{bucket_name}", *FAST)
    assert stat.S_ISFIFO(os.lstat(mount.path / "d" / "pipe").st_mode)
    dev = os.lstat(mount.path / "d" / "dev")
    assert stat.S_ISCHR(dev.st_mode) and dev.st_rdev == os.makedev(10, 200)
    data = os.lstat(mount.path / "d" / "data")
    assert stat.S_ISREG(data.st_mode) and data.st_size == 10
    assert stat.S_ISREG(os.lstat(mount.path / "d" / "empty").st_mode)
    # ctime of a foreign object defaults to its mtime (FSx has no ctime header)
    assert data.st_ctime_ns == data.st_mtime_ns


def test_hard_links(bucket_name: str, mounter: Mounter, s3: Any, tmp_path: Path) -> None:
    mount = mounter(f"s3://{bucket_name}", *FAST)
    first, second, third = (mount.path / n for n in ("first", "second", "sub/third"))
    first.write_bytes(b"version 1")
    os.mkdir(mount.path / "sub")
    os.link(first, second)
    os.link(second, third)
    assert [os.lstat(p).st_nlink for p in (first, second, third)] == [3, 3, 3]
    assert len({os.lstat(p).st_ino for p in (first, second, third)}) == 1
    with open(second, "r+b") as f:
        f.write(b"VERSION")
    assert first.read_bytes() == b"VERSION 1" == third.read_bytes()
    flush(mount)
    for key in ("first", "second", "sub/third"):
        assert get_object(s3, bucket_name, key)[0] == b"VERSION 1", key
    os.chmod(third, 0o600)
    with open(first, "ab") as f:
        f.write(b" and more")
    flush(mount)  # a later change uploads every name, headers included
    for key in ("first", "second", "sub/third"):
        body, meta = get_object(s3, bucket_name, key)
        assert body == b"VERSION 1 and more" and meta["file-permissions"] == "0100600", key
    os.unlink(first)  # the record's own name: another link takes over
    assert os.lstat(second).st_nlink == 2 and second.read_bytes() == b"VERSION 1 and more"
    os.rename(third, mount.path / "moved")
    assert os.lstat(mount.path / "moved").st_nlink == 2
    flush(mount)
    assert bucket_keys(s3, bucket_name) == {"second", "moved", "sub/"}
    assert get_object(s3, bucket_name, "moved")[0] == b"VERSION 1 and more"
    mount.umount()
    warm = mounter(f"s3://{bucket_name}", *FAST, cache_dir=mount.cache_dir)
    a, b = os.lstat(warm.path / "second"), os.lstat(warm.path / "moved")
    assert a.st_ino == b.st_ino and a.st_nlink == b.st_nlink == 2
    warm.umount()
    cold = mounter(f"s3://{bucket_name}", *FAST, cache_dir=tmp_path / "cold-cache")
    a, b = os.lstat(cold.path / "second"), os.lstat(cold.path / "moved")
    assert a.st_ino != b.st_ino and a.st_nlink == b.st_nlink == 1  # independent objects
    assert (cold.path / "moved").read_bytes() == b"VERSION 1 and more"


def test_ctime_and_directory_times_survive_remount(bucket_name: str, mounter: Mounter) -> None:
    mount = mounter(f"s3://{bucket_name}", *FAST)
    root = mount.path
    os.mkdir(root / "d")
    path = root / "d" / "f"
    path.write_bytes(b"x")
    created = os.lstat(path)
    dir_before = os.lstat(root / "d")
    os.chmod(path, 0o600)
    after_chmod = os.lstat(path)
    assert after_chmod.st_ctime_ns > created.st_ctime_ns
    assert after_chmod.st_mtime_ns == created.st_mtime_ns
    os.chown(path, -1, -1)
    assert os.lstat(path).st_ctime_ns > after_chmod.st_ctime_ns
    os.utime(path, ns=(1_500_000_000_000_000_001, 1_600_000_000_000_000_002))
    st = os.lstat(path)
    assert (st.st_atime_ns, st.st_mtime_ns) == (1_500_000_000_000_000_001, 1_600_000_000_000_000_002)
    assert st.st_ctime_ns > after_chmod.st_ctime_ns  # utimes is a status change too
    os.utime(path, ns=(1_400_000_000_000_000_000, st.st_mtime_ns))  # "omit" mtime: it stays
    assert os.lstat(path).st_mtime_ns == 1_600_000_000_000_000_002
    fd = os.open(path, os.O_WRONLY)
    before_write = os.fstat(fd)
    os.write(fd, b"y")
    during = os.fstat(fd)
    os.close(fd)
    assert during.st_mtime_ns > before_write.st_mtime_ns and during.st_ctime_ns > before_write.st_ctime_ns
    (root / "d" / "g").write_bytes(b"")
    dir_after = os.lstat(root / "d")
    assert dir_after.st_mtime_ns > dir_before.st_mtime_ns and dir_after.st_ctime_ns > dir_before.st_ctime_ns
    final = os.lstat(path)
    flush(mount)
    mount.umount()
    warm = mounter(f"s3://{bucket_name}", *FAST, cache_dir=mount.cache_dir)
    again = os.lstat(warm.path / "d" / "f")
    assert (again.st_ctime_ns, again.st_mtime_ns) == (final.st_ctime_ns, final.st_mtime_ns)
    assert os.lstat(warm.path / "d").st_mtime_ns == dir_after.st_mtime_ns


def test_links_and_specials_survive_a_crash(bucket_name: str, mounter: Mounter, s3: Any) -> None:
    """Everything is journaled before it is acknowledged: SIGKILL, remount, and the bucket gets it."""
    mount = mounter(f"s3://{bucket_name}", "--writeback-delay", "1h")
    (mount.path / "file").write_bytes(b"linked bytes")
    os.link(mount.path / "file", mount.path / "alias")
    os.mkfifo(mount.path / "fifo")
    mount.kill9()
    mount.force_unmount()
    again = mounter(f"s3://{bucket_name}", *FAST, cache_dir=mount.cache_dir)
    assert os.lstat(again.path / "alias").st_nlink == 2
    assert stat.S_ISFIFO(os.lstat(again.path / "fifo").st_mode)
    flush(again)
    assert get_object(s3, bucket_name, "alias")[0] == b"linked bytes"
    assert get_object(s3, bucket_name, "fifo")[1]["file-permissions"].startswith("001")


@pytest.fixture
def public_dir() -> Iterator[Path]:
    """A mountpoint other uids can reach (pytest's tmp_path is private to root)."""
    path = Path(tempfile.mkdtemp(prefix="tierfs-posix-", dir="/tmp"))
    path.chmod(0o755)
    yield path
    for leftover in (path / "mnt", path):  # rmdir, never rmtree: it must not descend into a mount
        with contextlib.suppress(OSError):
            leftover.rmdir()


def test_matrix_as_root_and_other_uid(public_dir: Path, bucket_name: str, mounter: Mounter) -> None:
    """tools/posixcheck: every file type, links, sticky directories, chown/chmod by non-owners,
    setuid clearing, open/utimes permissions and name limits, partly as uid 65534."""
    mount: Mount = mounter(f"s3://{bucket_name}", *FAST, "--allow-other", mountpoint=public_dir / "mnt")
    os.chmod(mount.path, 0o755)
    result = subprocess.run(
        [sys.executable, "-m", "tools.posixcheck", str(mount.path),
         "--only", "types", "--only", "perms", "--only", "names", "--only", "fifo", "--only", "unlinked"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, f"{result.stdout}\n{result.stderr}\n--- mount log ---\n{mount.log_text()}"
    assert "FAIL" not in result.stdout
    passed, total = result.stdout.strip().splitlines()[-1].split()[0].split("/")
    assert passed == total and int(total) > 100
    mount.umount()


@pytest.mark.parametrize("seed", [12, 29, 47])
def test_random_links_renames_and_writes_export_every_name(
    seed: int, bucket_name: str, mounter: Mounter, s3: Any
) -> None:
    """A seeded mix of link, unlink, rename, write and chmod over a few names, flushed at random
    points: afterwards every name in the mount is an object with its bytes and mode, and the
    bucket holds nothing else."""
    rng = random.Random(seed)
    mount = mounter(f"s3://{bucket_name}", *FAST)
    root = mount.path
    os.mkdir(root / "sub")
    names = [f"n{i}" for i in range(6)] + [f"sub/m{i}" for i in range(4)]

    def existing() -> list[str]:
        return [n for n in names if os.path.lexists(root / n)]

    for step in range(160):
        here = existing()
        free = [n for n in names if n not in here]
        op = rng.choice(["create", "link", "unlink", "rename", "write", "chmod", "flush"])
        if op == "create" and free:
            (root / rng.choice(free)).write_bytes(f"created at {step}".encode())
        elif op == "link" and here and free:
            os.link(root / rng.choice(here), root / rng.choice(free))
        elif op == "unlink" and here:
            os.unlink(root / rng.choice(here))
        elif op == "rename" and here:
            os.rename(root / rng.choice(here), root / rng.choice(names))
        elif op == "write" and here:
            with open(root / rng.choice(here), "ab") as f:
                f.write(f" +{step}".encode())
        elif op == "chmod" and here:
            os.chmod(root / rng.choice(here), rng.choice([0o600, 0o640, 0o644]))
        elif op == "flush":
            flush(mount)
    flush(mount)
    expected = {n: ((root / n).read_bytes(), stat.S_IMODE(os.lstat(root / n).st_mode)) for n in existing()}
    assert bucket_keys(s3, bucket_name) - {"sub/"} == set(expected)
    for name, (body, mode) in expected.items():
        got, meta = get_object(s3, bucket_name, name)
        assert got == body, name
        assert int(meta["file-permissions"], 8) & 0o7777 == mode, name
    inodes: dict[int, int] = {}
    for name in expected:
        st = os.lstat(root / name)
        inodes[st.st_ino] = inodes.get(st.st_ino, 0) + 1
    for name in expected:
        st = os.lstat(root / name)
        assert st.st_nlink == inodes[st.st_ino], name
    links = {name: os.lstat(root / name).st_nlink for name in expected}
    mount.umount()
    warm = mounter(f"s3://{bucket_name}", *FAST, cache_dir=mount.cache_dir)
    for name, (body, _) in expected.items():
        assert (warm.path / name).read_bytes() == body, name
        assert os.lstat(warm.path / name).st_nlink == links[name], name


def test_readdir_shows_foreign_special_files_with_their_type(
    bucket_name: str, mounter: Mounter, s3: Any
) -> None:
    """readdirplus hands the kernel attributes without a lookup: the zero-byte objects of a listed
    directory are HEADed before its entries are shown, once."""
    for i in range(3):
        fifo = {"file-permissions": "0010644"}
        s3.put_object(Bucket=bucket_name, Key=f"d/pipe{i}", Body=b"", Metadata=fifo)
    s3.put_object(Bucket=bucket_name, Key="d/plain", Body=b"data")
    mount = mounter(f"s3://{bucket_name}", *FAST)
    with os.scandir(mount.path / "d") as entries:  # d_type alone: no lookup, no stat
        regular = {e.name: e.is_file(follow_symlinks=False) for e in entries}
    assert regular == {"pipe0": False, "pipe1": False, "pipe2": False, "plain": True}
    assert stat.S_ISFIFO(os.lstat(mount.path / "d" / "pipe1").st_mode)


def test_listings_keep_hard_links_whose_objects_do_not_exist_yet(
    bucket_name: str, mounter: Mounter, s3: Any
) -> None:
    """A relisting while the link's object does not exist yet keeps the name (and its nlink).
    (That directories, whose nlink counts their subdirectories, are still dropped by listings
    is test_consistency's sweep test.)"""
    s3.put_object(Bucket=bucket_name, Key="other", Body=b"")
    mount = mounter(f"s3://{bucket_name}", "--writeback-delay", "1h", "--metadata-ttl", "1s")
    (mount.path / "f").write_bytes(b"data")  # its upload waits an hour, and the copy behind it
    os.link(mount.path / "f", mount.path / "alias")
    time.sleep(1.5)
    assert sorted(os.listdir(mount.path)) == ["alias", "f", "other"]  # the root was listed again
    assert os.lstat(mount.path / "alias").st_nlink == 2
    assert (mount.path / "alias").read_bytes() == b"data"
    assert bucket_keys(s3, bucket_name) == {"other"}
