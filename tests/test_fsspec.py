"""``tierfs://`` through fsspec on a real mount: registration, reads served directly, metadata."""

from __future__ import annotations

from collections.abc import Callable

import fsspec
import pytest
from mounting import Mounter
from readerkit import Loaded, load, sample_files

from tierfs.reader.filesystem import TierFileSystem
from tools.servers import MotoS3

pytestmark = pytest.mark.fuse


@pytest.fixture
def loaded(moto: MotoS3, bucket: Callable[..., str], mounter: Mounter) -> Loaded:
    return load(moto, bucket, mounter, sample_files(5, 50 * 1024))


def test_the_entry_point_registers_the_protocol() -> None:
    assert fsspec.get_filesystem_class("tierfs") is TierFileSystem


def test_fsspec_open_reads_the_cache_directly(loaded: Loaded) -> None:
    loaded.warm()
    fs = fsspec.filesystem("tierfs")
    assert isinstance(fs, TierFileSystem)
    before = fs.reader.stats()["direct_reads"]
    # The counters are the process's: a miss of an earlier test in this process is not this one's.
    misses = fs.reader.stats()["fallbacks"].get("miss", 0)
    for rel, body in loaded.files.items():
        with fsspec.open(f"tierfs://{loaded.path(rel)}", "rb") as f:
            assert f.read() == body
        assert fs.cat_file(f"tierfs://{loaded.path(rel)}", start=100, end=200) == body[100:200]
        assert fs.cat_file(loaded.path(rel), start=-10) == body[-10:]
    assert fs.reader.stats()["direct_reads"] - before >= 2 * len(loaded.files), fs.reader.stats()
    assert fs.reader.stats()["fallbacks"].get("miss", 0) == misses


def test_fsspec_metadata_and_writes_go_through_the_mount(loaded: Loaded) -> None:
    fs = fsspec.filesystem("tierfs")
    root = f"tierfs://{loaded.mount.path}"
    names = fs.ls(f"{root}/train", detail=False)
    assert names == sorted(loaded.path(rel) for rel in loaded.files)
    info = fs.info(f"{root}/train/0001.bin")
    assert info["type"] == "file" and info["size"] == len(loaded.files["train/0001.bin"])
    assert fs.isdir(f"{root}/train") and not fs.exists(f"{root}/nothing")
    assert sorted(fs.glob(f"{root}/train/000[12].bin")) == [
        loaded.path("train/0001.bin"), loaded.path("train/0002.bin"),
    ]  # fmt: skip
    fs.mkdir(f"{root}/out")
    with fs.open(f"{root}/out/new.txt", "wb") as f:
        f.write(b"new")
    assert fs.cat_file(f"{root}/out/new.txt") == b"new"
    fs.pipe_file(f"{root}/train/written.bin", b"written")
    assert fs.cat_file(f"{root}/train/written.bin") == b"written"  # dirty: through the mount
    fs.rm_file(f"{root}/train/written.bin")
    assert not fs.exists(f"{root}/train/written.bin")
