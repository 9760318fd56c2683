"""How much of a snapshot this node caches: its files' blocks found in the local chunk index.

Blocks are keyed by (bucket, key, ETag, index) whatever snapshot or mount read them, so the
answer counts blocks that other snapshots sharing the same object versions brought in too.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

from ..cache.chunkkey import ChunkKey
from .format import ETAG, KEY, KIND, KIND_DIR, SIZE, Row


@dataclass
class Usage:
    files: int = 0
    files_cached: int = 0  # every block of the file is cached
    bytes: int = 0
    bytes_cached: int = 0

    def add(self, other: Usage) -> None:
        self.files += other.files
        self.files_cached += other.files_cached
        self.bytes += other.bytes
        self.bytes_cached += other.bytes_cached


def cached(
    rows: Iterator[tuple[int, Row]],
    bucket: str,
    prefix: str,
    block_size: int,
    contains: Callable[[ChunkKey], bool],
) -> Usage:
    usage = Usage()
    for _, row in rows:
        if row[KIND] == KIND_DIR:
            continue
        size: int = row[SIZE]
        usage.files += 1
        usage.bytes += size
        whole = True
        for index in range((size + block_size - 1) // block_size):
            if contains(ChunkKey(bucket, prefix + row[KEY], row[ETAG], index)):
                usage.bytes_cached += min(block_size, size - index * block_size)
            else:
                whole = False
        usage.files_cached += whole
    return usage
