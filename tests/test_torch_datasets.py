"""The PyTorch datasets on a real mount, with DataLoader worker processes; and without torch.

torch is the optional extra ``tierfs[torch]``; ``make test`` installs the pinned CPU build, so
under CI (``CI`` set) a missing torch fails these tests instead of skipping them.
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
import tarfile
from collections.abc import Callable

import pytest
from mounting import Mounter
from readerkit import Loaded, load, sample_files, wait_maintenance

from tierfs.reader.datasets import FileDataset, ShardDataset, split_shards
from tools.servers import MotoS3

if os.environ.get("CI"):
    import torch  # noqa: F401  (must be there: make test installs it)
else:
    pytest.importorskip("torch", reason="torch is the optional extra tierfs[torch]")

from torch.utils.data import DataLoader


def _tar(samples: dict[str, dict[str, bytes]]) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w") as tar:
        for key, parts in samples.items():
            for ext, body in parts.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(body)
                tar.addfile(info, io.BytesIO(body))
    return out.getvalue()


def _shards(count: int, per_shard: int) -> dict[str, bytes]:
    files = {}
    for s in range(count):
        samples = {
            f"s{s:02d}_{i:03d}": {"jpg": os.urandom(2000), "cls": str(s * per_shard + i).encode()}
            for i in range(per_shard)
        }
        files[f"shards/shard-{s:02d}.tar"] = _tar(samples)
    return files


@pytest.fixture
def loaded(moto: MotoS3, bucket: Callable[..., str], mounter: Mounter) -> Loaded:
    files = sample_files(16, 20 * 1024)
    files.update(_shards(6, 10))
    result = load(moto, bucket, mounter, files)
    result.warm()
    return result


@pytest.mark.fuse
def test_file_dataset_with_worker_processes(loaded: Loaded) -> None:
    ds = FileDataset(loaded.path("train"), transform=lambda b: (len(b), b[:8]))
    assert ds.files == sorted(ds.files) and len(ds) == 16
    expected = [loaded.files[os.path.relpath(p, loaded.mount.path)] for p in ds.files]
    loader = DataLoader(ds, batch_size=None, shuffle=False, num_workers=2)
    got = list(loader)
    assert [(n, bytes(head)) for n, head in got] == [(len(b), b[:8]) for b in expected]
    raw = FileDataset(loaded.path("train"))
    assert raw[3] == expected[3]


@pytest.mark.fuse
def test_worker_processes_report_their_counters_to_the_daemon(loaded: Loaded) -> None:
    """DataLoader workers end with os._exit: their last access records and counters still reach
    `tierfs status` (flushed by multiprocessing's finalizers)."""
    loaded.evict(*[rel for rel in loaded.files if rel.startswith("train/")])
    before = loaded.status()
    ds = FileDataset(loaded.path("train"))
    for epoch in range(2):  # cold (misses through the mount), then direct
        assert len(list(DataLoader(ds, batch_size=4, num_workers=2, collate_fn=lambda b: b))) == 4, epoch
    wait_maintenance(loaded.mount)
    after = loaded.status()
    assert after["direct_fallbacks"].get("miss", 0) - before["direct_fallbacks"].get("miss", 0) == 16
    assert after["direct_reads"] - before["direct_reads"] == 16


@pytest.mark.fuse
def test_shard_dataset_splits_shards_across_workers_and_ranks(loaded: Loaded) -> None:
    seen: list[str] = []
    for rank in range(2):
        ds = ShardDataset(loaded.path("shards"), rank=rank, world_size=2, transform=lambda s: s["cls"])
        loader = DataLoader(ds, batch_size=None, num_workers=3)
        seen.extend(bytes(x).decode() for x in loader)
    assert sorted(seen, key=int) == [str(i) for i in range(60)]  # every sample exactly once
    # samples come whole and in order within a shard
    first = next(iter(ShardDataset([loaded.path("shards/shard-00.tar")])))
    assert first["__key__"] == "s00_000" and first["cls"] == b"0" and len(first["jpg"]) == 2000
    # shuffled with a seed: the same order on every rank, another one next epoch
    a = ShardDataset(loaded.path("shards"), shuffle=True, seed=1)
    b = ShardDataset(loaded.path("shards"), shuffle=True, seed=1)
    assert a.my_shards() == b.my_shards()
    b.set_epoch(1)
    assert sorted(a.my_shards()) == sorted(b.my_shards()) and a.my_shards() != b.my_shards()


def test_split_shards_gives_each_shard_to_one_slot() -> None:
    shards = [f"s{i}" for i in range(10)]
    parts = [split_shards(shards, r, 2, w, 3) for r in range(2) for w in range(3)]
    assert sorted(s for p in parts for s in p) == sorted(shards)
    assert max(map(len, parts)) - min(map(len, parts)) <= 1


def test_datasets_import_and_work_without_torch(tmp_path: os.PathLike[str]) -> None:
    root = os.path.join(tmp_path, "d")
    os.makedirs(root)
    for i in range(3):
        with open(os.path.join(root, f"{i}.bin"), "wb") as f:
            f.write(bytes([i]) * 10)
    code = (
        "import sys; sys.modules['torch'] = None\n"  # makes `import torch` fail
        "from tierfs.reader.datasets import FileDataset, ShardDataset\n"
        f"ds = FileDataset({root!r})\n"
        "assert len(ds) == 3 and ds[2] == bytes([2]) * 10, ds.files\n"
        "assert ShardDataset([]).my_shards() == []\n"
        "print('ok')\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.stdout.strip() == "ok", result.stderr
