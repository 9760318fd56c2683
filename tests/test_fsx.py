"""An fsx-style exerciser: thousands of random file operations checked against an in-memory model.

A handful of files are written, truncated, renamed, closed and reopened at random
through the mount, while write-back uploads them in the background (short delay) and
fsync forces some uploads in the middle of writing. Every read is compared with the
model (name -> bytearray). Halfway through, the mount is unmounted (which flushes)
and mounted again on the same cache dir; the bucket must then hold exactly the model,
and so must it after a final flush.

The seed is printed so that a failure can be replayed with ``TIERFS_FSX_SEED=<seed>``.
"""

from __future__ import annotations

import os
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
from mounting import Mount, Mounter
from test_posix_write import bucket_keys, flush, get_object

from tools.servers import SeaweedFS, s3_client

pytestmark = pytest.mark.fuse

OPS = 10_000
NAMES = ("alpha", "beta", "gamma", "delta", "epsilon", "zeta")
INITIAL = NAMES[:4]
MAX_SIZE = 384 * 1024  # spans a few cache blocks' worth of offsets without slowing reads down


@dataclass
class Exerciser:
    """The files under test: the model, and the open descriptors of the mount's files."""

    mount: Mount
    rng: random.Random
    model: dict[str, bytearray] = field(default_factory=dict)
    fds: dict[str, int] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)
    times: dict[str, float] = field(default_factory=dict)

    def path(self, name: str) -> str:
        return str(self.mount.path / name)

    def fd(self, name: str) -> int:
        if name not in self.fds:
            self.fds[name] = os.open(self.path(name), os.O_RDWR)
        return self.fds[name]

    def close(self, name: str) -> None:
        fd = self.fds.pop(name, None)
        if fd is not None:
            os.close(fd)

    def close_all(self) -> None:
        for name in list(self.fds):
            self.close(name)

    # -- operations --------------------------------------------------------------------------------

    def create(self, name: str) -> None:
        self.fds[name] = os.open(self.path(name), os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
        self.model[name] = bytearray()

    def pwrite(self, name: str) -> None:
        data = self.model[name]
        length = self.rng.choice((1, 7, 512, 4096, 4096, 20_000, 70_000)) if self.rng.random() < 0.2 else 100
        length = self.rng.randrange(1, length + 1)
        if self.rng.random() < 0.3 and data:  # overwrite inside the file
            offset = self.rng.randrange(0, len(data))
        else:
            offset = self.rng.randrange(0, MAX_SIZE)
        length = min(length, MAX_SIZE - offset) or 1
        buf = self.rng.randbytes(length)
        assert os.pwrite(self.fd(name), buf, offset) == length
        if offset > len(data):
            data.extend(bytes(offset - len(data)))
        data[offset : offset + length] = buf

    def check_read(self, name: str) -> None:
        data = self.model[name]
        if self.rng.random() < 0.15:
            offset, length = 0, len(data) + 100  # the whole file, and EOF
        else:
            offset = self.rng.randrange(0, len(data) + 2)
            length = self.rng.randrange(1, 16_384)
        got = os.pread(self.fd(name), length, offset)
        want = bytes(data[offset : offset + length])
        assert got == want, f"{name}: {len(got)} bytes at {offset} differ from the model (want {len(want)})"

    def truncate(self, name: str) -> None:
        data = self.model[name]
        size = (
            self.rng.randrange(0, MAX_SIZE)
            if self.rng.random() < 0.3
            else self.rng.randrange(0, len(data) + 1)
        )
        if name in self.fds:
            os.ftruncate(self.fds[name], size)
        else:
            os.truncate(self.path(name), size)
        if size < len(data):
            del data[size:]
        else:
            data.extend(bytes(size - len(data)))

    def rename(self, name: str) -> None:
        target = self.rng.choice([n for n in NAMES if n != name])
        self.close(target)  # an open descriptor of a replaced file would see an unlinked inode
        os.rename(self.path(name), self.path(target))
        self.model[target] = self.model.pop(name)
        if name in self.fds:
            self.fds[target] = self.fds.pop(name)  # the descriptor follows the inode

    def reopen(self, name: str) -> None:
        self.close(name)
        if self.rng.random() < 0.05:  # O_TRUNC through open
            self.fds[name] = os.open(self.path(name), os.O_RDWR | os.O_TRUNC)
            self.model[name].clear()

    def fsync(self, name: str) -> None:
        os.fsync(self.fd(name))

    def stat(self, name: str) -> None:
        size = os.stat(self.path(name)).st_size
        assert size == len(self.model[name]), f"{name}: st_size {size}, model {len(self.model[name])}"

    def step(self) -> None:
        name = self.rng.choice(sorted(self.model))
        roll = self.rng.random()
        op: Callable[[str], None]
        if roll < 0.60:
            op = self.pwrite
        elif roll < 0.82:
            op = self.check_read
        elif roll < 0.88:
            op = self.truncate
        elif roll < 0.91:
            op = self.rename
        elif roll < 0.97:
            op = self.reopen
        elif roll < 0.99:
            op = self.stat
        else:
            op = self.fsync
        self.counts[op.__name__] = self.counts.get(op.__name__, 0) + 1
        t0 = time.perf_counter()
        op(name)
        self.times[op.__name__] = self.times.get(op.__name__, 0.0) + time.perf_counter() - t0

    # -- whole-state checks ------------------------------------------------------------------------

    def check_mount(self) -> None:
        assert sorted(os.listdir(self.mount.path)) == sorted(self.model)
        for name, data in self.model.items():
            with open(self.path(name), "rb") as fh:
                assert fh.read() == data, f"{name} differs from the model through the mount"

    def check_bucket(self, client: Any, bucket: str) -> None:
        assert bucket_keys(client, bucket) == set(self.model)
        for name, data in self.model.items():
            assert get_object(client, bucket, name)[0] == data, f"{name} differs from the model in the bucket"


def test_random_operations_match_the_model(
    bucket: Callable[..., str], mounter: Mounter, seaweed: SeaweedFS
) -> None:
    seed = int(os.environ.get("TIERFS_FSX_SEED", time.time_ns() % 1_000_000_007))
    print(f"fsx seed: {seed} (replay with TIERFS_FSX_SEED={seed})")
    name = bucket()
    client = s3_client(seaweed.endpoint_url, read_timeout=60.0)
    args = (f"s3://{name}", "--writeback-delay", "0.3s")
    mount = mounter(*args)
    fsx = Exerciser(mount, random.Random(seed))
    for file_name in INITIAL:
        fsx.create(file_name)
    try:
        for i in range(OPS):
            if i == OPS // 2:
                fsx.close_all()
                fsx.check_mount()
                mount.umount()  # flushes first
                fsx.check_bucket(client, name)
                mount = fsx.mount = mounter(*args, cache_dir=mount.cache_dir)
                fsx.check_mount()
            fsx.step()
    except Exception:
        print(f"fsx failed after ops {fsx.counts}; seed {seed}")
        raise
    finally:
        fsx.close_all()
    print(f"fsx ops: {fsx.counts} {fsx.times}")
    fsx.check_mount()
    flush(mount)
    fsx.check_bucket(client, name)
    status = mount.status()
    assert (status["uploads_pending"], status["conflicts"], status["uploads_failed"]) == (0, 0, 0)
