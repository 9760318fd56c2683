"""tierfs's FUSE handlers without the kernel: CPU per request of each handler, in process.

``tools.bench_fuseops`` measures a live mount, where the kernel and pyfuse3 take their share of
every request (``nullfs`` is that share). This benchmark drives :class:`TierOperations` directly
on the trio loop, over the same layers a mount builds (``daemon.stack.build_stack``, read-only,
SeaweedFS on loopback), so what it reports is tierfs's own code per request:

* ``cold``: 8 tasks read every file once as the kernel would (LOOKUP, OPEN, a pause of one
  scheduling round for the kernel's round trip, one READ of the whole file, RELEASE); the loop's
  CPU per file, the process's, and the GETs sent (a file should cost one);
* ``warm``: the same again, the bytes now in the local cache;
* one line per handler, warm and alone: ``lookup``, ``getattr``, ``open+release`` (µs per call,
  the best of 5 passes).

Run: ``python -m tools.bench_handlers [--files N]``. Nothing asserts on the numbers.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path

import trio

from tierfs.daemon.stack import StackSettings, build_stack
from tierfs.fuse.operations import TierOperations
from tierfs.meta.records import ROOT_INO
from tierfs.store.objectstore import S3ObjectStore
from tierfs.units import parse_size
from tools.bench_workloads import Dataset, log, seeded_seaweed, shuffled
from tools.servers import child_env

BUCKET = "tierfs-bench-handlers"
READERS = 8

Target = tuple[int, bytes]  # (parent inode, name)


async def resolve(ops: TierOperations, keys: Sequence[str]) -> list[Target]:
    """Each key's (parent inode, name), the directories looked up once (which lists them)."""
    dirs: dict[tuple[int, str], int] = {}
    out = []
    for key in keys:
        *path, leaf = key.split("/")
        ino = ROOT_INO
        for name in path:
            if (ino, name) not in dirs:
                dirs[ino, name] = (await ops.lookup(ino, name.encode())).st_ino
            ino = dirs[ino, name]
        out.append((ino, leaf.encode()))
    return out


async def read_file(ops: TierOperations, parent: int, name: bytes, size: int) -> None:
    """What the kernel sends for ``open(); read(); close()`` of a small file with a cold dentry."""
    entry = await ops.lookup(parent, name)
    info = await ops.open(entry.st_ino, os.O_RDONLY)
    # The READ comes one kernel round trip after OPEN's answer: by then the fetch OPEN spawned
    # has started (two scheduling rounds here; one leaves their order to trio's shuffle).
    await trio.sleep(0)
    await trio.sleep(0)
    data = await ops.read(info.fh, 0, size)
    if len(data) != entry.st_size:
        raise RuntimeError(f"read {len(data)} bytes of {entry.st_size}")
    await ops.release(info.fh)


async def timed_pass(ops: TierOperations, targets: list[Target], size: int) -> tuple[float, float]:
    """Every file read once by READERS tasks: (loop CPU, process CPU) in ms per file."""
    send, receive = trio.open_memory_channel[Target](len(targets))
    for target in targets:
        send.send_nowait(target)
    send.close()

    async def reader() -> None:
        async for parent, name in receive:
            await read_file(ops, parent, name, size)

    loop0, cpu0 = time.thread_time(), time.process_time()
    async with trio.open_nursery() as nursery:
        for _ in range(READERS):
            nursery.start_soon(reader)
    n = len(targets)
    return (time.thread_time() - loop0) * 1000 / n, (time.process_time() - cpu0) * 1000 / n


async def per_call(
    targets: list[Target], call: Callable[[int, bytes], Awaitable[object]], rounds: int = 5
) -> float:
    """µs of loop CPU per ``call(parent, name)``, one at a time: the best of ``rounds`` passes over
    every target (the least disturbed by whatever else the machine runs)."""
    best = float("inf")
    for _ in range(rounds):
        start = time.thread_time()
        for parent, name in targets:
            await call(parent, name)
        best = min(best, time.thread_time() - start)
    return best * 1e6 / len(targets)


async def run(store: S3ObjectStore, cache: Path, keys: Sequence[str], size: int) -> None:
    async with trio.open_nursery() as nursery:
        stack = build_stack(
            store, cache, "bench", StackSettings(bucket=BUCKET, read_only=True),
            spawn=lambda task: nursery.start_soon(task),
        )  # fmt: skip
        try:
            ops = TierOperations(stack.fs, kernel_timeout=60.0)
            targets = await resolve(ops, keys)
            read_size = (size + 4095) // 4096 * 4096  # the kernel asks for whole pages
            for phase in ("cold", "warm", "warm"):
                loop, process = await timed_pass(ops, targets, read_size)
                await trio.sleep(1.0)  # the cache writer stores the last blocks
                gets = stack.hydrator.stats.s3_get_requests
                log(f"{phase}: loop {loop:.3f} ms/file, process {process:.3f} ms/file, GETs so far {gets}")

            async def lookup(parent: int, name: bytes) -> object:
                return await ops.lookup(parent, name)

            async def getattr_(parent: int, name: bytes) -> object:
                return await ops.getattr(parent)

            async def open_release(parent: int, name: bytes) -> None:
                info = await ops.open((await ops.lookup(parent, name)).st_ino, os.O_RDONLY)
                await ops.release(info.fh)

            looked_up = await per_call(targets, lookup)
            log(f"lookup       {looked_up:.1f} us/call")
            log(f"getattr      {await per_call(targets, getattr_):.1f} us/call")
            log(f"open+release {await per_call(targets, open_release) - looked_up:.1f} us/call")
        finally:
            nursery.cancel_scope.cancel()
            stack.close()


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tools.bench_handlers", description=__doc__.splitlines()[0])
    p.add_argument("--files", type=int, default=2000, help="number of small files (default 2000)")
    p.add_argument("--size", type=parse_size, default=110 * 1024, help="size of each (default 110K)")
    args = p.parse_args(argv)
    os.environ.update(child_env())  # the store's credentials and proxy rules, as a mount gets them
    dataset = Dataset(args.files, args.size, 0, 0)
    workdir = Path(tempfile.mkdtemp(prefix="tierfs-bench-handlers-", dir="/var/tmp"))
    try:
        with seeded_seaweed(workdir, BUCKET, dataset) as server:
            store = S3ObjectStore(BUCKET, endpoint_url=server.endpoint_url)
            trio.run(run, store, workdir / "cache", shuffled(dataset.small_keys()), args.size)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    print(f"load average {os.getloadavg()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
