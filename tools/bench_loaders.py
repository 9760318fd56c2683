"""The PyTorch DataLoader rows of ``tools.bench``: one shuffled epoch, read by real DataLoader workers.

Each row runs in a child process (``python -m tools.bench_loaders``), so that torch is
imported before the clock starts and the workers are forked, as a training script's are,
from a process that holds no boto3 pools or CRT event-loop threads (the benchmark's own
process holds both, and forking those is unsafe). The clock runs from ``iter(loader)``
(forking the workers included) to the last batch.

Every row reads the same samples in the same order (the keys file holds them already
shuffled, and the sampler walks them in that order), ``--batch`` samples per batch, each
sample read whole and only its length returned:

* ``files``: the builtin ``open`` on a directory (a local copy, the tierfs, s3fs or rclone mount);
* ``direct``: tierfs's own ``FileDataset`` (the direct reader, ``tierfs.reader``) on a tierfs mount;
* ``hinted``: the same, after handing the epoch's paths, in order, to tierfs's hint call
  (:func:`hint_call`); the row is skipped, with the reason, when tierfs has no such call;
* ``s3torch``: AWS's ``s3torchconnector`` ``S3MapDataset`` over the same keys (no cache at all).

The child prints one JSON object: ``{"seconds", "items", "nbytes"}``, or ``{"skip": reason}``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from tools.bench_workloads import Measure, rate, shuffled
from tools.servers import REGION, child_env

REPO_ROOT = Path(__file__).resolve().parent.parent
KINDS = ("files", "direct", "hinted", "s3torch")
# Names the hint call may have in tierfs.reader, first match wins (issue 21 leaves the name open).
HINT_NAMES = ("prefetch", "hint", "prefetch_paths", "hint_paths")


class Skipped(Exception):
    """A row that cannot run on this machine or this tierfs; the message says why."""


def loader_epoch(
    kind: str,
    keys: Sequence[str],
    workdir: Path,
    workers: int,
    dropped: bool,
    *,
    root: Path | None = None,
    endpoint_url: str = "",
    bucket: str = "",
    batch: int = 32,
) -> Measure:
    """Run one DataLoader epoch of ``kind`` in a child process over ``keys`` in the benchmark's
    shuffled order; files/s. Raises :class:`Skipped` when the child says the row cannot run."""
    keys_file = workdir / "loader-keys.txt"
    keys_file.write_text("".join(f"{k}\n" for k in shuffled(keys, seed=1)))
    command = [sys.executable, "-m", "tools.bench_loaders", "--kind", kind, "--keys-file", str(keys_file)]
    command += ["--workers", str(workers), "--batch", str(batch), "--root", str(root or "")]
    command += ["--endpoint", endpoint_url, "--bucket", bucket, "--region", REGION]
    result = subprocess.run(
        command, env=child_env(), cwd=REPO_ROOT, capture_output=True, text=True, timeout=3600, check=False
    )
    lines = result.stdout.strip().splitlines()
    if result.returncode != 0 or not lines:
        raise RuntimeError(f"DataLoader {kind} failed ({result.returncode}): {result.stderr.strip()[-800:]}")
    out = json.loads(lines[-1])
    if "skip" in out:
        raise Skipped(out["skip"])
    return rate(int(out["items"]), int(out["nbytes"]), float(out["seconds"]), "files/s", dropped)


# --------------------------------------------------------------------------- the child process


def read_file(path: str) -> int:
    with open(path, "rb", buffering=0) as f:
        return len(f.read())


def read_s3(reader: Any) -> int:
    """s3torchconnector's transform: its item is an S3Reader over the object."""
    return len(reader.read())


def total(batch: list[int]) -> int:
    """The collate function: a batch becomes its byte count (nothing is decoded)."""
    return sum(batch)


def hint_call() -> Callable[[Sequence[str]], Any] | None:
    """tierfs's public "these paths come next" call, if this tierfs has one (issue 21)."""
    import tierfs.reader

    for name in HINT_NAMES:
        call = getattr(tierfs.reader, name, None)
        if callable(call):
            return call  # type: ignore[no-any-return]
    return None


NO_HINTS = f"tierfs.reader has none of {', '.join(HINT_NAMES)} (no hint API in this tierfs)"


class Files:
    """Map-style dataset over a list of paths, read with the builtin open."""

    def __init__(self, paths: Sequence[str]) -> None:
        self.paths = list(paths)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> int:
        return read_file(self.paths[index])


def build(args: argparse.Namespace, keys: list[str]) -> tuple[Any, list[int], Callable[[], None]]:
    """The dataset, the sampler's index order, and what to do once the epoch's clock has started."""

    def nothing() -> None:
        return None

    if args.kind == "files":  # DataLoader takes any object with __len__ and __getitem__
        return Files([os.path.join(args.root, k) for k in keys]), list(range(len(keys))), nothing
    if args.kind == "s3torch":
        from s3torchconnector import S3ClientConfig, S3MapDataset

        dataset = S3MapDataset.from_objects(
            [f"s3://{args.bucket}/{k}" for k in keys],
            region=args.region,
            endpoint=args.endpoint,
            transform=read_s3,
            s3client_config=S3ClientConfig(force_path_style=True),
        )
        return dataset, list(range(len(keys))), nothing
    from tierfs.reader.datasets import FileDataset

    top = os.path.join(args.root, os.path.commonpath(keys)) if len(keys) > 1 else args.root
    files = FileDataset(top, transform=len)
    index = {os.path.relpath(path, args.root): i for i, path in enumerate(files.files)}
    order = [index[k] for k in keys]
    if args.kind == "direct":
        return files, order, nothing
    hint = hint_call()
    if hint is None:
        raise Skipped(NO_HINTS)
    paths = [files.files[i] for i in order]
    return files, order, lambda: hint(paths)


def epoch(args: argparse.Namespace) -> dict[str, Any]:
    import torch.utils.data

    with open(args.keys_file) as f:
        keys = [line.strip() for line in f if line.strip()]
    try:
        dataset, order, before = build(args, keys)
    except (Skipped, ModuleNotFoundError) as exc:  # a missing index is a bug, not a skip
        return {"skip": str(exc)}
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=args.batch,
        sampler=order,
        num_workers=args.workers,
        collate_fn=total,
    )
    start = time.perf_counter()
    before()
    nbytes = sum(loader)
    return {"seconds": time.perf_counter() - start, "items": len(order), "nbytes": nbytes}


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tools.bench_loaders", description=__doc__.splitlines()[0])
    p.add_argument("--kind", choices=KINDS, required=True)
    p.add_argument("--keys-file", required=True, help="the samples' keys, one a line, in reading order")
    p.add_argument("--root", default="", help="the directory the keys are under (not for s3torch)")
    p.add_argument("--workers", type=int, default=8)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--endpoint", help="s3torch: the S3 endpoint")
    p.add_argument("--bucket", help="s3torch: the bucket")
    p.add_argument("--region", default="us-east-1")
    print(json.dumps(epoch(p.parse_args(argv))), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
