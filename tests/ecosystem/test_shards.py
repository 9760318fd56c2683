"""WebDataset-style tar shards on a real mount: tierfs's ShardDataset and the ``webdataset`` package."""

from __future__ import annotations

from typing import Any

import pytest
import webdataset as wds
from conftest import DataMount, MakeMount
from datafiles import tar_shard
from readerkit import wait_maintenance
from torch.utils.data import DataLoader
from webdataset.gopen import gopen_schemes

from tierfs import reader
from tierfs.reader.datasets import ShardDataset

pytestmark = pytest.mark.fuse

SHARDS, PER_SHARD = 4, 50


@pytest.fixture
def shards(data_mount: MakeMount) -> DataMount:
    files = {f"shards/train-{s:04d}.tar": tar_shard(s * PER_SHARD, PER_SHARD) for s in range(SHARDS)}
    return data_mount(files)


def check_sample(key: str, label: bytes, body: bytes) -> int:
    n = int(key.rsplit("sample", 1)[1])
    assert label == str(n % 10).encode() and body == bytes([n % 256]) * (1000 + n)
    return n


def from_sample(sample: dict[str, Any]) -> int:
    return check_sample(sample["__key__"], sample["cls"], sample["bin"])


def test_shard_dataset_in_a_dataloader_reads_directly_when_warm(shards: DataMount) -> None:
    shards.warm(*shards.files)
    before = reader.stats()
    loader = DataLoader(
        ShardDataset(shards.path("shards"), transform=from_sample),
        batch_size=None, num_workers=2,
    )  # fmt: skip
    assert sorted(loader) == list(range(SHARDS * PER_SHARD))
    # worker processes count in their own readers and report to the daemon
    wait_maintenance(shards.mount)
    assert shards.status()["direct_reads"] > 0
    assert reader.stats()["fallbacks"] == before["fallbacks"]


def test_the_webdataset_package_through_the_mount_path(shards: DataMount) -> None:
    urls = shards.path("shards/train-{0000..0003}.tar")
    pipeline = wds.WebDataset(urls, shardshuffle=False).to_tuple("__key__", "cls", "bin")
    numbers = [check_sample(key, label, body) for key, label, body in pipeline]
    assert numbers == list(range(SHARDS * PER_SHARD))
    # shards split over the DataLoader's workers by webdataset's default workersplitter
    loader = DataLoader(wds.WebDataset(urls, shardshuffle=False).to_tuple("__key__", "cls", "bin"),
                        batch_size=None, num_workers=2)  # fmt: skip
    assert sorted(check_sample(*sample) for sample in loader) == list(range(SHARDS * PER_SHARD))


def test_the_webdataset_package_through_the_direct_reader(shards: DataMount) -> None:
    """webdataset opens URLs with its own ``gopen`` (no fsspec), so a ``tierfs://`` URL needs its scheme
    registered once: the one line docs/reader.md shows."""
    gopen_schemes["tierfs"] = lambda url, mode="rb", bufsize=8192, **kw: reader.open(
        url[len("tierfs://") :]
    )
    shards.warm(*shards.files)
    before = reader.stats()
    urls = shards.url("shards/train-{0000..0003}.tar")
    pipeline = wds.WebDataset(urls, shardshuffle=False).to_tuple("__key__", "cls", "bin")
    assert [check_sample(*sample) for sample in pipeline] == list(range(SHARDS * PER_SHARD))
    after = reader.stats()
    # all of each shard but the end-of-archive padding tarfile stops before (up to 10 KiB a shard)
    assert after["direct_bytes"] - before["direct_bytes"] >= 0.9 * sum(len(b) for b in shards.files.values())
    assert after["fallbacks"] == before["fallbacks"]
