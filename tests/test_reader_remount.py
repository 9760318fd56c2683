"""The process's default reader while mounts come and go: every remembered piece of its state (the
device -> mountpoint map, the device -> cache dir map, the per-process views and their LMDB
environments, the pending access-record batches, ``$TIERFS_CACHE_DIR``) can be keyed by something
a new mount reuses: its device number, mountpoint, cache dir, inode numbers. After a remount the
reader must serve the new mount's bytes (never the old cache's), read them directly at once (not
after a penalty), and count them to the mount whose reads they were.

The two mounts' buckets hold files with the same names and sizes (so the same inode numbers and,
uploaded within a second, the same mtimes) and other bytes: a namespace of the old mount that
were taken for the new one would pick a version and serve the old object's blocks.
``HEARTBEAT_CHECK`` runs both ways: 0 (reader.json is read on every open) and an hour (only the
per-open check of the mount itself stands between a stale view and a wrong byte).
"""

from __future__ import annotations

import os
import random
from collections.abc import Callable
from pathlib import Path

import pytest
from mounting import Mounter, wait_until
from readerkit import Loaded, load, published, wait_maintenance

from tierfs.reader import core, default_reader, protocol, view
from tools.servers import MotoS3

pytestmark = pytest.mark.fuse

NAMES = [f"train/{i:04d}.bin" for i in range(3)]
SIZE = 100_000  # one block each: one direct read per file


def _files(seed: int) -> dict[str, bytes]:
    rng = random.Random(seed)
    return {name: rng.randbytes(SIZE) for name in NAMES}


def _mount(
    moto: MotoS3, bucket: Callable[..., str], mounter: Mounter, files: dict[str, bytes],
    mountpoint: Path, cache_dir: Path, monkeypatch: pytest.MonkeyPatch, via_env: bool,
    again: Loaded | None = None,
) -> Loaded:  # fmt: skip
    """Mount (``again``: that mount's bucket and files again: a cache dir belongs to one source, and
    its namespace is the same one), then wait until reader.json is this daemon's (a reused cache
    dir holds the last one's) and every file is cached."""
    if via_env:
        monkeypatch.setenv(core.CACHE_DIR_ENV, f"{mountpoint}={cache_dir}")
    if again is None:
        loaded = load(moto, bucket, mounter, files, mountpoint=mountpoint, cache_dir=cache_dir)
    else:
        source = f"s3://{again.bucket}"
        mount = mounter(source, endpoint_url=moto.endpoint_url, mountpoint=mountpoint, cache_dir=cache_dir)
        loaded = Loaded(mount, again.bucket, again.endpoint, again.files)
    wait_until(lambda: published(loaded.mount)["pid"] == loaded.mount.pid, 15, "reader.json of this daemon")
    loaded.warm()
    return loaded


def _read_all(loaded: Loaded) -> None:
    reader = default_reader()
    for name in NAMES:
        with reader.open(loaded.path(name)) as f:
            assert f.read() == loaded.files[name], f"wrong bytes for {name}: {reader.stats()}"


def _batches(cache_dir: Path) -> dict[str, int]:
    """The access batches waiting in a cache dir: name -> the direct reads it counts."""
    found = {}
    for path in (cache_dir / protocol.ACCESS_DIR).glob(f"*{protocol.ACCESS_SUFFIX}"):
        counters, _records = protocol.decode_access_batch(path.read_bytes())
        found[path.name] = int(counters["direct_reads"])
    return found


@pytest.mark.parametrize("heartbeat_check", [0.0, 3600.0], ids=["daemon-each-open", "daemon-hourly"])
@pytest.mark.parametrize(
    ("same_mountpoint", "same_cache", "via_env"),
    [(0, 0, 0), (1, 0, 0), (0, 1, 0), (1, 1, 0), (1, 0, 1)],
    ids=["new-all", "same-mountpoint", "same-cache", "same-both", "same-mountpoint-env"],
)
def test_the_default_reader_serves_a_new_mount_directly_and_counts_to_it(
    moto: MotoS3, bucket: Callable[..., str], mounter: Mounter, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch, heartbeat_check: float,
    same_mountpoint: int, same_cache: int, via_env: int,
) -> None:  # fmt: skip
    monkeypatch.setattr(view, "HEARTBEAT_CHECK", heartbeat_check)
    reader = default_reader()
    env = bool(via_env)
    first = _mount(moto, bucket, mounter, _files(1), tmp_path / "m1", tmp_path / "c1", monkeypatch, env)
    start = reader.stats()
    _read_all(first)  # every cache of the reader now knows the first mount; its batch is pending
    assert reader.stats()["direct_reads"] == start["direct_reads"] + len(NAMES), reader.stats()
    first_dev = os.stat(first.mount.path).st_dev
    first.mount.umount()
    old_batches = _batches(first.mount.cache_dir)

    mountpoint = tmp_path / ("m1" if same_mountpoint else "m2")
    cache_dir = tmp_path / ("c1" if same_cache else "c2")
    again = first if same_cache else None
    second = _mount(moto, bucket, mounter, _files(2), mountpoint, cache_dir, monkeypatch, env, again)
    reused_dev = os.stat(second.mount.path).st_dev == first_dev  # likely, never certain: not asserted
    before = reader.stats()
    _read_all(second)  # the second mount's bytes (another cache: the first's differ), at once directly
    after = reader.stats()
    assert after["direct_reads"] == before["direct_reads"] + len(NAMES), (reused_dev, before, after)
    assert after["fallbacks"] == before["fallbacks"], (reused_dev, before, after)

    reader.flush()
    if not same_cache:  # the first mount's pending batch went nowhere: its daemon is gone
        assert _batches(first.mount.cache_dir) == old_batches
    wait_maintenance(second.mount)
    status = second.status()
    # Exactly the second mount's reads: none of the first mount's pending batch. The batches the
    # first mount's daemon left unapplied in a cache dir that the second one took over are the
    # second daemon's to apply (written while the first served it).
    left = sum(old_batches.values()) if same_cache else 0
    if heartbeat_check == 0:
        assert status["direct_reads"] == len(NAMES) + left, (reused_dev, left, status)
    else:  # reads before the reader saw the new daemon (same cache, same namespace) are dropped
        assert left <= status["direct_reads"] <= len(NAMES) + left, (reused_dev, left, status)
    assert status["direct_fallbacks"] == {}, (reused_dev, status)


def test_fallbacks_are_counted_to_the_mount_they_happened_on(
    moto: MotoS3, bucket: Callable[..., str], mounter: Mounter, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    """Two mounts at once: a miss on one and direct reads on the other, and a file on no tierfs
    mount: each daemon sees its own, and the file elsewhere is counted in this process only."""
    reader = default_reader()
    one = _mount(moto, bucket, mounter, _files(3), tmp_path / "m1", tmp_path / "c1", monkeypatch, False)
    two = _mount(moto, bucket, mounter, _files(4), tmp_path / "m2", tmp_path / "c2", monkeypatch, False)
    one.evict(NAMES[0])  # one block: a miss read through the mount, no fetch by the daemon
    elsewhere = tmp_path / "local.bin"
    elsewhere.write_bytes(b"local")
    before = reader.stats()
    with reader.open(one.path(NAMES[0])) as f:
        assert f.read() == one.files[NAMES[0]]
    _read_all(two)
    with reader.open(str(elsewhere)) as f:
        assert f.read() == b"local"
    after = reader.stats()
    assert after["fallbacks"].get("not_tierfs", 0) == before["fallbacks"].get("not_tierfs", 0) + 1, after
    reader.flush()
    wait_maintenance(one.mount)
    wait_maintenance(two.mount)
    first, second = one.status(), two.status()
    assert first["direct_reads"] == 0 and sum(first["direct_fallbacks"].values()) >= 1, first
    assert "not_tierfs" not in first["direct_fallbacks"], first
    assert second["direct_reads"] == len(NAMES) and second["direct_fallbacks"] == {}, second
