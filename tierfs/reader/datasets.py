"""PyTorch datasets over a tierfs mount, read through :mod:`tierfs.reader`; importable without torch.

* :class:`FileDataset`, map-style: every file under a directory, listed once at construction
  in a stable (sorted) order, so every DataLoader worker and every rank agrees on what index
  ``i`` is; item ``i`` is the file's bytes, or ``transform(bytes)``.
* :class:`ShardDataset`, iterable: tar shards (WebDataset style: members sharing a basename
  up to the first dot form one sample), split across ranks and DataLoader workers so each
  shard is read by exactly one worker of one rank per epoch.
* :class:`HintedSampler` wraps a sampler of a :class:`FileDataset` (``ds.sampler(shuffle=True)``
  makes one): the DataLoader iterates it in its main process, so at the start of each epoch it
  knows the whole order and hands it to the daemon as hints (:func:`tierfs.reader.prefetch`),
  then reports how far the DataLoader has got as it yields indices. Workers read hinted
  files from the cache (docs/reader.md, "Hints").

Without torch the classes are plain Python objects with the same behaviour (the base classes
are only what makes DataLoader accept them), so preprocessing code can use them too.
"""

from __future__ import annotations

import os
import random
import tarfile
from collections.abc import Callable, Iterable, Iterator, Sequence, Sized
from typing import Any

from .core import Reader, default_reader
from .hints import HintStream, prefetch

POSITION_STEP = 32  # indices yielded between two position reports (each only wakes the hint thread)
# Indices a DataLoader holds between its sampler and its workers' reads: num_workers x
# prefetch_factor x batch_size (8 x 2 x 64 = 1,024). The sampler reports its position this far
# back, so the files handed to workers and not yet read are still fetched ahead, not dropped.
IN_FLIGHT = 1024


def _torch_data() -> Any:
    """torch.utils.data, or None: torch is an optional extra (tierfs[torch])."""
    try:
        import torch.utils.data as data
    except ImportError:
        return None
    return data


_data: Any = _torch_data()
_MapBase: Any = _data.Dataset if _data is not None else object
_IterBase: Any = _data.IterableDataset if _data is not None else object


def _worker_info() -> Any:
    return _data.get_worker_info() if _data is not None else None


def _list_files(root: str, extensions: Sequence[str] | None) -> list[str]:
    out: list[str] = []
    for directory, dirs, names in os.walk(root):
        dirs.sort()
        for name in sorted(names):
            if extensions is None or name.endswith(tuple(extensions)):
                out.append(os.path.join(directory, name))
    out.sort()
    return out


class FileDataset(_MapBase):  # type: ignore[misc]
    """Map-style dataset of the files under ``root``: ``ds[i]`` is their bytes or ``transform(bytes)``."""

    def __init__(
        self,
        root: str | os.PathLike[str],
        transform: Callable[[bytes], Any] | None = None,
        *,
        extensions: Sequence[str] | None = None,
        reader: Reader | None = None,
    ) -> None:
        self.root = os.fspath(root)
        self.files = _list_files(self.root, extensions)  # once: a listing per epoch costs LISTs
        self.transform = transform
        self._reader = reader

    def __len__(self) -> int:
        return len(self.files)

    def sampler(
        self,
        *,
        shuffle: bool = False,
        seed: int = 0,
        base: Iterable[int] | None = None,
        in_flight: int = IN_FLIGHT,
    ) -> HintedSampler:
        """A sampler for ``DataLoader(ds, sampler=ds.sampler(shuffle=True))`` that hints each epoch's
        order to the daemon: ``base`` (any sampler of indices) or the indices in order, reshuffled
        with ``seed + epoch`` per epoch with ``shuffle`` (call ``set_epoch`` like a DistributedSampler).
        ``in_flight``: see IN_FLIGHT; raise it for bigger batches or more workers."""
        return HintedSampler(self.files, base, shuffle=shuffle, seed=seed, in_flight=in_flight)

    def __getitem__(self, index: int) -> Any:
        reader = self._reader or default_reader()
        with reader.open(self.files[index], buffering=0) as f:
            data = f.read()
        return self.transform(data) if self.transform is not None else data


class HintedSampler:
    """Yields the indices of ``base`` (or ``range(len(paths))``, shuffled per epoch with ``shuffle``),
    and at the start of each iteration hints the paths in that order to the daemon.

    A stream lives until the next epoch's iteration starts (or the daemon forgets it, 10 minutes
    after its last word): the sampler runs out well before the workers have read what it gave.
    The order is taken whole first (a million indices take tens of milliseconds), and the paths
    are sent by a background thread, so the first batch never waits for the hints. Every
    POSITION_STEP indices it tells the daemon how far the DataLoader's workers have got (its own
    position less ``in_flight``): hints behind that are dropped, and the look-ahead window moves on.
    """

    def __init__(
        self,
        paths: Sequence[str],
        base: Iterable[int] | None = None,
        *,
        shuffle: bool = False,
        seed: int = 0,
        in_flight: int = IN_FLIGHT,
    ) -> None:
        self.paths = paths
        self.in_flight = in_flight
        self._stream: HintStream | None = None
        self.base = base
        self.shuffle = shuffle
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        if self.base is not None and hasattr(self.base, "set_epoch"):
            self.base.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.base) if isinstance(self.base, Sized) else len(self.paths)

    def order(self) -> list[int]:
        if self.base is not None:
            return [int(i) for i in self.base]
        indices = list(range(len(self.paths)))
        if self.shuffle:
            random.Random(self.seed + self.epoch).shuffle(indices)
        return indices

    def __iter__(self) -> Iterator[int]:
        order = self.order()
        paths = self.paths
        # The previous epoch's stream ends now, not when its sampler ran out: a DataLoader takes
        # the last indices long before its workers have read them, and those hints still count.
        if self._stream is not None:
            self._stream.close()
        stream = self._stream = prefetch(paths[i] for i in order)
        for n, index in enumerate(order):
            if n % POSITION_STEP == 0 and n > self.in_flight:
                stream.advance(n - self.in_flight)
            yield index


def _rank_and_world(rank: int | None, world_size: int | None) -> tuple[int, int]:
    if rank is not None and world_size is not None:
        return rank, world_size
    try:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return dist.get_rank(), dist.get_world_size()
    except ImportError:
        pass
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def split_shards(
    shards: Sequence[str], rank: int, world_size: int, worker: int, workers: int
) -> list[str]:
    """The shards of one (rank, worker): every ``world_size * workers``-th, so each shard goes to
    exactly one of them and the counts differ by at most one."""
    slot, slots = rank * workers + worker, world_size * workers
    return [s for i, s in enumerate(shards) if i % slots == slot]


class ShardDataset(_IterBase):  # type: ignore[misc]
    """Iterable dataset of WebDataset-style tar shards; yields ``{"__key__": KEY, EXT: bytes, ...}``
    (or ``transform(sample)``). ``shuffle`` reorders the shards with ``seed + epoch`` before they
    are split (call :meth:`set_epoch` each epoch), the same order on every rank."""

    def __init__(
        self,
        shards: Sequence[str | os.PathLike[str]] | str | os.PathLike[str],
        transform: Callable[[dict[str, Any]], Any] | None = None,
        *,
        shuffle: bool = False,
        seed: int = 0,
        rank: int | None = None,
        world_size: int | None = None,
        reader: Reader | None = None,
    ) -> None:
        if isinstance(shards, str | os.PathLike):
            self.shards = _list_files(os.fspath(shards), (".tar",))
        else:
            self.shards = [os.fspath(s) for s in shards]
        self.transform = transform
        self.shuffle = shuffle
        self.seed = seed
        self.epoch = 0
        self.rank, self.world_size = rank, world_size
        self._reader = reader

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def my_shards(self) -> list[str]:
        shards = list(self.shards)
        if self.shuffle:
            random.Random(self.seed + self.epoch).shuffle(shards)
        rank, world = _rank_and_world(self.rank, self.world_size)
        info = _worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        return split_shards(shards, rank, world, worker, workers)

    def __iter__(self) -> Iterator[Any]:
        reader = self._reader or default_reader()
        shards = self.my_shards()
        with prefetch(shards) as hints:  # this worker's shards, in the order it reads them
            for n, shard in enumerate(shards):
                hints.advance(n)
                yield from self._samples(reader, shard)

    def _samples(self, reader: Reader, shard: str) -> Iterator[Any]:
        with reader.open(shard) as f, tarfile.open(fileobj=f, mode="r|") as tar:
            sample: dict[str, Any] = {}
            for member in tar:
                if not member.isfile():
                    continue
                base = os.path.basename(member.name)
                key, _, ext = base.partition(".")
                key = os.path.join(os.path.dirname(member.name), key)
                if sample and sample["__key__"] != key:
                    yield self._emit(sample)
                    sample = {}
                extracted = tar.extractfile(member)
                assert extracted is not None
                sample.setdefault("__key__", key)
                sample["__shard__"] = shard
                sample[ext] = extracted.read()
            if sample:
                yield self._emit(sample)

    def _emit(self, sample: dict[str, Any]) -> Any:
        return self.transform(sample) if self.transform is not None else sample
