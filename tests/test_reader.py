"""The direct reader (issue 13) on real mounts: byte equality, every fallback reason, races.

Each test makes a moto-backed mount, warms (or not) its cache through the mount and then
reads with :mod:`tierfs.reader`. The bytes must always be the bucket's current ones; the
counters say which door served them, so each test also shows that the path it means to
exercise was the one taken.
"""

from __future__ import annotations

import errno
import hashlib
import io
import multiprocessing
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from mounting import Mounter, tierfs_ok, wait_until
from readerkit import (
    Loaded,
    MiB,
    load,
    open_cache_to_everyone,
    published,
    sample_files,
    set_cache_format,
    wait_maintenance,
)

from tierfs import reader
from tierfs.reader import Reader, TierFile
from tierfs.reader.view import CacheView, Fallback
from tools.servers import MotoS3

pytestmark = pytest.mark.fuse


def fallbacks(r: Reader) -> dict[str, int]:
    return dict(r.stats()["fallbacks"])


@pytest.fixture
def loaded(moto: MotoS3, bucket: Callable[..., str], mounter: Mounter) -> Loaded:
    files = sample_files(12, 110 * 1024)
    files["big/multi.bin"] = random.Random(7).randbytes(3 * MiB + 12345)
    # A short metadata TTL (the kernel's attribute timeout too) lets tests see settled records soon.
    return load(moto, bucket, mounter, files, "--writeback-delay", "60", "--metadata-ttl", "2")


def test_direct_reads_are_byte_equal_and_file_objects_behave(loaded: Loaded) -> None:
    loaded.warm()
    r = Reader()
    for rel, body in loaded.files.items():
        with r.open(loaded.path(rel)) as f:
            assert f.read() == body
    assert fallbacks(r) == {}
    assert r.stats()["direct_reads"] >= len(loaded.files)

    body = loaded.files["big/multi.bin"]
    with TierFile(loaded.path("big/multi.bin"), r) as raw:
        assert raw.direct and raw.size == len(body) and raw.seekable() and raw.readable()
        # positional reads across block boundaries, and past the end
        ranges = [(0, 10), (MiB - 5, 10), (MiB - 1, 2 * MiB + 2), (len(body) - 3, 100), (len(body), 5)]
        for offset, size in ranges:
            assert raw.pread(size, offset) == body[offset : offset + size]
        buf = bytearray(MiB + 7)
        assert raw.preadinto(buf, 2 * MiB - 3) == len(buf)
        assert bytes(buf) == body[2 * MiB - 3 : 3 * MiB + 4]
        assert raw.seek(-100, io.SEEK_END) == len(body) - 100
        assert raw.tell() == len(body) - 100
        small = bytearray(64)
        assert raw.readinto(small) == 64 and bytes(small) == body[-100:-36]
        assert raw.tell() == len(body) - 36
        raw.seek(5)
        assert raw.read(7) == body[5:12]
        assert raw.read() == body[12:]
        assert raw.read() == b""
    assert raw.closed
    with pytest.raises(ValueError):
        raw.read(1)
    with r.open(loaded.path("big/multi.bin")) as buffered:
        assert isinstance(buffered, io.BufferedReader)
        buffered.seek(MiB + 1)
        assert buffered.read(100) == body[MiB + 1 : MiB + 101]
    assert fallbacks(r) == {}
    # the module-level API goes through the process's default reader
    with reader.open(loaded.path("train/0001.bin")) as f:
        assert f.read() == loaded.files["train/0001.bin"]
    assert reader.stats()["direct_reads"] >= 1


def test_a_miss_goes_through_the_mount_which_hydrates_it(loaded: Loaded) -> None:
    r = Reader()
    rel = "train/0003.bin"
    written = loaded.mount.status()["cold_objects_written"]
    with r.open(loaded.path(rel)) as f:
        assert f.read() == loaded.files[rel]
    assert fallbacks(r) == {"miss": 1}
    # The cold engine answers the READ before its cache write (docs/coldpath.md): wait for it.
    deadline = time.monotonic() + 10
    while loaded.mount.status()["cold_objects_written"] <= written and time.monotonic() < deadline:
        time.sleep(0.02)
    with r.open(loaded.path(rel)) as f:  # the mount stored it for next time
        assert f.read() == loaded.files[rel]
    assert fallbacks(r) == {"miss": 1}
    # a file partly cached: the cached block direct, the others through the mount, one version
    rel = "big/multi.bin"
    body = loaded.files[rel]
    with open(loaded.path(rel), "rb") as f:
        f.seek(MiB)
        assert f.read(10) == body[MiB : MiB + 10]  # hydrates the block(s) around offset 1 MiB only
    with r.open(loaded.path(rel)) as f:
        assert f.read() == body
    assert r.stats()["fallbacks"]["miss"] >= 2
    assert r.stats()["direct_reads"] >= 2


def test_dirty_and_uploading_files_are_read_through_the_mount(loaded: Loaded) -> None:
    loaded.warm()
    r = Reader()
    rel = "train/0004.bin"
    with open(loaded.path(rel), "r+b") as f:  # staged now; the upload waits --writeback-delay (60 s)
        f.write(b"CHANGED")
    expected = b"CHANGED" + loaded.files[rel][7:]
    with r.open(loaded.path(rel)) as f:
        assert f.read() == expected
    assert fallbacks(r) == {"dirty": 1}
    new = loaded.path("train/new.bin")
    with open(new, "wb") as f:
        f.write(b"fresh" * 1000)
    with r.open(new) as f:
        assert f.read() == b"fresh" * 1000
    assert fallbacks(r) == {"dirty": 2}
    # A file object opened before a write through the mount sees the write, as a mount handle does.
    other = "train/0003.bin"
    early = r.open(loaded.path(other), buffering=0)
    assert isinstance(early, TierFile)
    assert early.pread(4, 0) == loaded.files[other][:4] and early.direct
    with open(loaded.path(other), "r+b") as f:
        f.write(b"WXYZ")
    assert early.pread(6, 0) == b"WXYZ" + loaded.files[other][4:6]
    assert not early.direct
    early.close()
    assert fallbacks(r)["dirty"] == 3
    tierfs_ok("flush", str(loaded.mount.path))  # uploaded and retired: clean again
    wait_until(lambda: not any((loaded.mount.cache_dir / "staging").iterdir()), 20, "staging retired")

    def direct_again() -> bool:
        # The kernel may still hold the attributes from before the upload settled (a "version"
        # fallback) until its attribute timeout passes; the bytes are right either way.
        with r.open(loaded.path(rel)) as f:
            assert f.read() == expected
        return r.stats()["direct_reads"] >= 1

    wait_until(direct_again, 15, "the uploaded file is read directly")
    assert fallbacks(r)["dirty"] == 3


def test_an_object_changed_in_the_bucket_is_never_served_stale(loaded: Loaded) -> None:
    loaded.warm()
    r = Reader()
    rel = "train/0005.bin"
    with r.open(loaded.path(rel)) as f:
        assert f.read() == loaded.files[rel]
    old = r.open(loaded.path(rel), buffering=0)  # pinned to the old version, like a mount handle
    assert isinstance(old, TierFile)
    assert old.pread(10, 50) == loaded.files[rel][50:60]  # it has served this version directly
    changed = b"new version " * 20_000
    loaded.put(rel, changed)
    tierfs_ok("refresh", loaded.path("train"))
    # until the kernel drops its cached attributes, the stat and the record disagree: version
    wait_until(lambda: os.stat(loaded.path(rel)).st_size == len(changed), 10, "new size visible")
    with r.open(loaded.path(rel)) as f:
        assert f.read() == changed
    assert set(fallbacks(r)) <= {"version", "miss"} and fallbacks(r)
    with r.open(loaded.path(rel)) as f:
        assert f.read() == changed
    # The old handle stands for the old version: it serves that version's bytes while they are
    # cached (as a mount handle pinned at open does), or fails; it never mixes in the new ones.
    for offset in (0, 1000):
        try:
            data = old.pread(100, offset)
        except OSError as exc:
            assert exc.errno in (errno.ESTALE, errno.EIO)
        else:
            assert data == loaded.files[rel][offset : offset + 100]
    old.close()


def test_version_mismatch_between_stat_and_record(loaded: Loaded) -> None:
    loaded.warm()
    r = Reader()
    path = loaded.path("train/0006.bin")
    st = os.stat(path)
    view = r.view(st.st_dev)
    assert view.resolve(st).size == st.st_size
    for changed in (
        os.stat_result((*st[:6], st.st_size + 1, *st[7:])),
        os.stat_result((*st[:8], st.st_mtime + 1, st.st_ctime)),
    ):
        with pytest.raises(Fallback) as caught:
            view.resolve(changed)
        assert caught.value.reason == "version"


def test_a_corrupted_block_is_detected_and_read_through_the_mount(loaded: Loaded) -> None:
    loaded.warm()
    rel = "train/0007.bin"
    chunk = loaded.chunk_path(rel)
    raw = bytearray(chunk.read_bytes())
    raw[-1000] ^= 0xFF  # in the payload, in place: the digest of its page no longer matches
    chunk.write_bytes(bytes(raw))
    r = Reader()
    with r.open(loaded.path(rel)) as f:
        assert f.read() == loaded.files[rel]
    assert fallbacks(r) == {"corrupt": 1}
    # Again: still detected (the mount served the bytes from the kernel's page cache, so the
    # daemon has not looked at the damaged file yet), still the right bytes.
    with r.open(loaded.path(rel)) as f:
        assert f.read() == loaded.files[rel]
    assert fallbacks(r) == {"corrupt": 2}
    assert r.stats()["direct_reads"] == 0


def test_a_block_evicted_during_the_read_is_detected(loaded: Loaded, monkeypatch: pytest.MonkeyPatch) -> None:
    loaded.warm()
    rel = "train/0008.bin"
    r = Reader()
    path = loaded.path(rel)
    view = r.view(os.stat(path).st_dev)
    real = view._blocks.read_ident

    def evict_while_reading(*args: object, **kwargs: object) -> tuple[bytes, tuple[int, int]]:
        result = real(*args, **kwargs)  # type: ignore[arg-type]
        loaded.evict(rel)  # the index entry and the file go while we hold the bytes
        return result

    monkeypatch.setattr(view._blocks, "read_ident", evict_while_reading)
    with r.open(path) as f:
        assert f.read() == loaded.files[rel]
    assert fallbacks(r) == {"evicted": 1}
    monkeypatch.undo()
    # rewritten under it: same index entry, another file at the path
    chunk = loaded.chunk_path(rel)
    wait_until(chunk.exists, 10, "re-hydrated")
    real2 = view._blocks.read_ident

    def rewrite_while_reading(*args: object, **kwargs: object) -> tuple[bytes, tuple[int, int]]:
        result = real2(*args, **kwargs)  # type: ignore[arg-type]
        tmp = chunk.with_name(chunk.name + ".x")
        tmp.write_bytes(chunk.read_bytes())
        os.replace(tmp, chunk)
        return result

    monkeypatch.setattr(view._blocks, "read_ident", rewrite_while_reading)
    with r.open(path) as f:
        assert f.read() == loaded.files[rel]
    assert fallbacks(r) == {"evicted": 2}


def test_another_cache_format_and_a_missing_cache_fall_back(loaded: Loaded, tmp_path: Path) -> None:
    loaded.warm()
    rel = "train/0009.bin"
    saved = set_cache_format(loaded.mount.cache_dir, (99).to_bytes(4, "little"))
    try:
        r = Reader()
        with r.open(loaded.path(rel)) as f:
            assert f.read() == loaded.files[rel]
        assert fallbacks(r) == {"format": 1}
    finally:
        set_cache_format(loaded.mount.cache_dir, saved)
    # a cache dir that is not this mount's (wrong mapping): refused, not trusted
    wrong = tmp_path / "wrong"
    wrong.mkdir()
    r = Reader(cache_dirs={str(loaded.mount.path): wrong})
    with r.open(loaded.path(rel)) as f:
        assert f.read() == loaded.files[rel]
    assert fallbacks(r) == {"unreadable": 1}
    # not a tierfs mount at all: an ordinary file read
    plain = tmp_path / "plain.bin"
    plain.write_bytes(b"plain")
    with r.open(plain) as f:
        assert f.read() == b"plain"
    assert fallbacks(r)["not_tierfs"] == 1


def test_a_stale_heartbeat_is_not_trusted(loaded: Loaded) -> None:
    """reader.json of a daemon that stopped publishing (dead, or another mount reusing the
    device number) is refused."""
    loaded.warm()
    record = published(loaded.mount)
    record["heartbeat"] = time.time() - 3600
    path = loaded.mount.cache_dir / "reader.json"
    path.write_text(__import__("json").dumps(record))
    r = Reader()
    with r.open(loaded.path("train/0010.bin")) as f:
        assert f.read() == loaded.files["train/0010.bin"]
    assert fallbacks(r) == {"unreadable": 1}


_CHILD = r"""
import json, os, sys
from tierfs.reader import Reader  # imported first: the interpreter's files may be root's only
os.setgroups([]); os.setgid(65534); os.setuid(65534)
r = Reader(cache_dirs={sys.argv[1]: sys.argv[2]})
out = {}
for path in sys.argv[3:]:
    try:
        with r.open(path) as f:
            out[path] = f.read().hex()
    except PermissionError:
        out[path] = "EACCES"
r.flush()
print(json.dumps({"files": out, "stats": r.stats()}))
"""


def _as_nobody(loaded: Loaded, *paths: str) -> dict[str, object]:
    result = subprocess.run(
        [sys.executable, "-c", _CHILD, str(loaded.mount.path), str(loaded.mount.cache_dir), *paths],
        capture_output=True, text=True, timeout=60, cwd="/",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    parsed: dict[str, object] = __import__("json").loads(result.stdout)
    return parsed


@pytest.fixture
def public_dir() -> Iterator[Path]:
    """A directory every uid may traverse (pytest's tmp_path is root's only); removed after the
    mounts in it (requested before ``mounter``, so torn down after it)."""
    base = Path(tempfile.mkdtemp(prefix="tierfs-reader-"))
    os.chmod(base, 0o755)
    yield base
    shutil.rmtree(base, ignore_errors=True)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run a reader as another uid")
def test_permissions_of_the_mount_path_are_never_bypassed(
    public_dir: Path, moto: MotoS3, bucket: Callable[..., str], mounter: Mounter
) -> None:
    files = {"open.bin": b"o" * 5000, "secret.bin": b"s" * 5000}
    loaded = load(
        moto, bucket, mounter, files, "--allow-other",
        mountpoint=public_dir / "mnt", cache_dir=public_dir / "cache",
    )  # fmt: skip
    loaded.warm()
    os.chmod(loaded.path("secret.bin"), 0o600)  # root's own file
    secret, public = loaded.path("secret.bin"), loaded.path("open.bin")
    # The cache dir is 0700: another user reads what the mount lets it read, through the mount.
    got = _as_nobody(loaded, public, secret)
    assert got["files"] == {public: (b"o" * 5000).hex(), secret: "EACCES"}
    assert got["stats"]["fallbacks"] == {"unreadable": 1}  # type: ignore[index]
    # Even with the cache opened to everyone, the mount path's permissions decide.
    open_cache_to_everyone(loaded.mount.cache_dir)
    got = _as_nobody(loaded, public, secret)
    assert got["files"] == {public: (b"o" * 5000).hex(), secret: "EACCES"}
    assert got["stats"]["fallbacks"] == {}  # type: ignore[index]
    assert got["stats"]["direct_reads"] == 1  # type: ignore[index]


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run a reader as another uid")
def test_cache_group_lets_members_read_directly_but_not_what_the_mount_refuses(
    public_dir: Path, moto: MotoS3, bucket: Callable[..., str], mounter: Mounter
) -> None:
    files = {"open.bin": b"o" * 5000, "secret.bin": b"s" * 5000}
    loaded = load(
        moto, bucket, mounter, files, "--allow-other", "--cache-group", "65534",
        mountpoint=public_dir / "mnt", cache_dir=public_dir / "cache",
    )  # fmt: skip
    loaded.warm()
    os.chmod(loaded.path("secret.bin"), 0o600)
    wait_maintenance(loaded.mount)
    st = os.stat(loaded.mount.cache_dir)
    assert (st.st_mode & 0o7777, st.st_gid) == (0o2750, 65534)
    chunk = os.stat(loaded.chunk_path("open.bin"))
    assert (chunk.st_mode & 0o777, chunk.st_gid) == (0o640, 65534)
    secret, public = loaded.path("secret.bin"), loaded.path("open.bin")
    got = _as_nobody(loaded, public, secret)
    assert got["files"] == {public: (b"o" * 5000).hex(), secret: "EACCES"}
    assert got["stats"]["fallbacks"] == {}  # type: ignore[index]
    assert got["stats"]["direct_reads"] == 1  # type: ignore[index]
    assert got["stats"]["access_records_dropped"] == 0  # type: ignore[index]


def test_direct_reads_count_as_use_for_lru_and_status(loaded: Loaded) -> None:
    loaded.warm()
    rel = "train/0002.bin"
    before = loaded.chunk_atime(rel)
    assert before is not None
    time.sleep(1.1)
    r = Reader()
    for _ in range(3):
        with r.open(loaded.path(rel)) as f:
            assert f.read() == loaded.files[rel]
    loaded.evict("train/0011.bin")
    with r.open(loaded.path("train/0011.bin")) as f:  # a miss, for the fallback counter
        assert f.read() == loaded.files["train/0011.bin"]
    r.flush()
    wait_maintenance(loaded.mount)
    wait_maintenance(loaded.mount)  # applied, then flushed to the index by the next pass at the latest
    after = loaded.chunk_atime(rel)
    assert after is not None and after > before + 1
    status = loaded.status()
    assert status["direct_reads"] >= 3
    assert status["direct_access_records"] >= 1
    assert status["direct_fallbacks"].get("miss", 0) >= 1
    assert not list((loaded.mount.cache_dir / "access").glob("*.acc"))


def _reader_proc(
    paths: list[str], digests: dict[str, str], seconds: float, queue: multiprocessing.Queue[object]
) -> None:
    """One of the 8 reader processes: random whole-file reads, each checked against its sha256."""
    r = Reader()
    rng = random.Random(os.getpid())
    wrong = reads = 0
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        path = rng.choice(paths)
        with r.open(path, buffering=0) as f:
            data = f.read()
        reads += 1
        if hashlib.sha256(data).hexdigest() != digests[path]:
            wrong += 1
    r.flush()
    queue.put({"wrong": wrong, "reads": reads, **r.stats()})


def test_eviction_while_eight_processes_read(
    moto: MotoS3, bucket: Callable[..., str], mounter: Mounter
) -> None:
    files = sample_files(40, 200 * 1024, seed=3)
    # 8 MiB cap over 8 MiB of data: the mount keeps evicting while the readers read
    loaded = load(moto, bucket, mounter, files, "--cache-size", "8M", "--cache-min-free", "0")
    loaded.warm()
    paths = [loaded.path(rel) for rel in files]
    digests = {loaded.path(rel): hashlib.sha256(body).hexdigest() for rel, body in files.items()}
    ctx = multiprocessing.get_context("fork")
    queue: multiprocessing.Queue[object] = ctx.Queue()
    procs = [ctx.Process(target=_reader_proc, args=(paths, digests, 8.0, queue)) for _ in range(8)]
    for p in procs:
        p.start()
    rng = random.Random(5)
    deadline = time.monotonic() + 7.0
    while time.monotonic() < deadline:
        loaded.evict(*rng.sample(list(files), 5))
        time.sleep(0.2)
    results = [queue.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(30)
        assert p.exitcode == 0
    assert sum(r["wrong"] for r in results) == 0  # type: ignore[index,misc]
    assert sum(r["direct_reads"] for r in results) > 0  # type: ignore[index,misc]
    reasons: dict[str, int] = {}
    for res in results:
        for k, v in res["fallbacks"].items():  # type: ignore[index]
            reasons[k] = reasons.get(k, 0) + v
    assert reasons.get("miss", 0) + reasons.get("evicted", 0) > 0, reasons


def test_a_fresh_looking_cache_of_another_mount_is_refused(
    moto: MotoS3, bucket: Callable[..., str], mounter: Mounter
) -> None:
    """A remount may get the device number of a mount that just went away, whose reader.json
    still looks fresh: the namespace must also match the mount (its root's mtime, to the ns)."""
    a = load(moto, bucket, mounter, {"a.bin": b"a" * 100})
    b = load(moto, bucket, mounter, {"b.bin": b"b" * 100})
    dev_b = os.stat(b.mount.path).st_dev
    reasons: list[str] = []
    for _ in range(3):  # a's daemon may rewrite its reader.json between our write and the open
        forged = published(a.mount)
        forged.update(dev=[os.major(dev_b), os.minor(dev_b)], heartbeat=time.time())
        (a.mount.cache_dir / "reader.json").write_text(__import__("json").dumps(forged))
        with pytest.raises(Fallback) as caught:
            CacheView(a.mount.cache_dir, dev_b, str(b.mount.path))
        reasons.append(str(caught.value))
        if "is not the cache of the mount" in reasons[-1]:
            break
    assert "is not the cache of the mount" in reasons[-1], reasons
    view = CacheView(b.mount.cache_dir, dev_b, str(b.mount.path))  # its own cache is accepted
    view.close()
