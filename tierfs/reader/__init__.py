"""Direct reads of a tierfs mount's cache from Python: a second door beside the FUSE mount.

``tierfs.reader.open(path)`` returns a binary file whose cached, clean blocks are read
straight from the cache directory (every block checked against its digests) and whose
other bytes come through the mount. The fsspec filesystem ``tierfs://`` and the PyTorch
datasets in :mod:`tierfs.reader.datasets` are built on it. See docs/reader.md.

Every fresh DataLoader worker imports this package, so it stays light: it may import the base
modules (``cacheformat``, ``mountinfo``, ``errors``), ``control.registry``, ``meta.records``,
``cache.chunkkey`` and ``cache.blockfile``, never trio, the FUSE adapter, the control server or
an S3 client (``tests/test_reader_door.py``). Nothing here runs on a trio loop: it is blocking
caller-side code, thread-safe, in the reading process.
"""

from __future__ import annotations

import io
import os
from typing import Any

from .core import CACHE_DIR_ENV, Reader, TierFile, default_reader
from .hints import prefetch as prefetch  # public (docs/reader.md, "Hints"); HintStream is in .hints
from .protocol import REASONS
from .view import Fallback

__all__ = ["CACHE_DIR_ENV", "REASONS", "Fallback", "Reader", "TierFile", "default_reader", "open", "stats"]


def open(
    path: str | os.PathLike[str], mode: str = "rb", buffering: int = -1
) -> io.BufferedReader | TierFile:
    """Open a file under a tierfs mount for reading (``mode`` must be "rb"); buffering 0 gives the raw
    :class:`TierFile` (``pread``, ``preadinto``)."""
    if mode not in ("rb", "br"):
        raise ValueError(f"tierfs.reader.open is read-only and binary, not {mode!r}")
    return default_reader().open(path, buffering)


def stats() -> dict[str, Any]:
    """This process's direct-read counters: direct reads and bytes, fallbacks by reason."""
    return default_reader().stats()
