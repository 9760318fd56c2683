"""The identity of a cached block: (bucket, key, ETag, block index), and its digest.

Every tier names a block by this key, so a changed object (a new ETag) can never be served
from the old object's blocks, in any tier. The digest names the block's file and index row
on local disk (docs/cache-format.md); the shared tier hashes the origin in as well
(``tierfs.cache.shared``).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass

_CHUNK_TAG = b"tierfs-chunk-v1\0"
_OBJECT_TAG = b"tierfs-object-v1\0"


def enc(text: str) -> bytes:
    """UTF-8, injective even for lone surrogates (keys decoded from non-UTF-8 names)."""
    return text.encode("utf-8", "surrogatepass")


def lp(raw: bytes) -> bytes:
    """Length-prefixed field: makes the concatenation of several fields unambiguous."""
    return len(raw).to_bytes(4, "little") + raw


def object_id(bucket: bytes, key: bytes) -> bytes:
    """Fixed 32-byte id of (bucket, key): S3 keys (up to 1 KiB) do not fit LMDB's 511-byte key limit."""
    return hashlib.sha256(_OBJECT_TAG + lp(bucket) + lp(key)).digest()


@dataclass(frozen=True)
class ChunkKey:
    """One block of one version of one object. The ETag is part of the identity, so a changed object
    can never be served from the old object's chunks."""

    bucket: str
    key: str
    etag: str
    index: int

    def __post_init__(self) -> None:
        if self.index < 0:
            raise ValueError(f"negative block index {self.index}")

    def names(self) -> tuple[bytes, bytes, bytes]:
        """Encoded (bucket, key, etag), in the order they appear in a chunk file."""
        return enc(self.bucket), enc(self.key), enc(self.etag)

    def _memo(self, name: str, make: Callable[[], bytes]) -> bytes:
        """``make()``, computed once per instance. The memo is not a field, so equality and
        hashing still see only the four fields (the dataclass is frozen: hence __dict__)."""
        memo: bytes | None = self.__dict__.get(name)
        if memo is None:
            memo = make()
            object.__setattr__(self, name, memo)
        return memo

    def digest(self) -> bytes:
        """sha256 over a length-prefixed encoding of all four fields: names the file and the index row.

        Computed once per key and kept on the instance: one warm read asks every tier and the
        flight table for it (memory, index, file path, access time), and the encoding plus the
        hash were a measurable part of a warm read's time on the trio loop (docs/benchmarks.md)."""

        def make() -> bytes:
            bucket, key, etag = self.names()
            return hashlib.sha256(
                _CHUNK_TAG + lp(bucket) + lp(key) + lp(etag) + self.index.to_bytes(8, "little")
            ).digest()

        return self._memo("_digest", make)

    def object_id(self) -> bytes:
        """The id of the object (any version) this block belongs to: what pins and drops act on.
        Kept on the instance like :meth:`digest`."""

        def make() -> bytes:
            bucket, key, _ = self.names()
            return object_id(bucket, key)

        return self._memo("_object_id", make)
