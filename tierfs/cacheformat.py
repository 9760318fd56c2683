"""The cache directory's on-disk format: every name, record layout and version, in one place.

Two kinds of process read a cache directory: the mount's daemon (the disk tier in
``tierfs.cache``, the namespace and journal in ``tierfs.meta`` and ``tierfs.writeback``) and
the direct reader (``tierfs.reader``) in any Python process beside it. Both import this
module and nothing of each other, so the format is written down once and the reader stays
light (stdlib only here: no trio, no LMDB binding, no S3 client). docs/cache-format.md
describes the same layout in prose; a change to either is a change to both.

Layout of ``<cache_dir>``::

    lock            flock of the one daemon that owns the directory (its pid)
    meta/           LMDB, synced commits: namespace (ns.*), write-back journal (wb.*), meta
    index/          LMDB, unsynced commits: the chunk index (cache.*)
    index.state     "<boot id> open|clean" (an OS crash while open drops index/ and chunks/)
    chunks/xx/<hex> one self-validating file per cached block (``tierfs.cache.blockfile``)
    staging/<ino>   files being written through the mount (write-back owns their bytes)
    reader.json     what the daemon publishes for direct readers (``tierfs.reader.protocol``)
    access/         direct readers' access-record batches for the daemon
"""

from __future__ import annotations

import struct
from typing import Final

# -- the directory ---------------------------------------------------------------------------------------
LOCK_FILE: Final = "lock"
META_ENV: Final = "meta"
INDEX_ENV: Final = "index"
INDEX_STATE_FILE: Final = "index.state"
CHUNK_DIR: Final = "chunks"
STAGING_DIR: Final = "staging"

# -- LMDB environments: how both envs are opened (a reader must pass the same map size and may
# open no more named databases than the writer allows) --------------------------------------------------
MAP_SIZE: Final = 1 << 38  # 256 GiB of address space; the file only grows as records are written
MAX_DBS: Final = 32
MAX_READERS: Final = 256

# -- the durable environment, ``meta`` -------------------------------------------------------------------
DB_META: Final = b"meta"  # cache-dir facts: owner, schema
META_OWNER: Final = b"owner"  # the source (mount owner tag) this cache belongs to
META_SCHEMA: Final = b"schema"  # SCHEMA_VERSION of the namespace and journal records
SCHEMA_VERSION: Final = b"1"
DB_INODES: Final = b"ns.inodes"  # records.ino_key(ino) -> records.Inode
DB_DENTRIES: Final = b"ns.dentries"  # records.dentry_key(parent, name) -> ino
DB_LINKS: Final = b"ns.links"  # extra names of hard-linked inodes (records.link_key)
DB_JOURNAL: Final = b"wb.journal"  # u64 big-endian seq -> one journalled write-back op
DB_WB_STATE: Final = b"wb.state"  # next seq, cache id
DB_UPLOADS: Final = b"wb.uploads"  # seq -> the multipart upload in flight for that op

# -- the chunk index environment, ``index`` --------------------------------------------------------------
DB_CHUNKS: Final = b"cache.chunks"  # digest -> CHUNK_RECORD + bucket + key + etag
DB_OBJECTS: Final = b"cache.objects"  # object id + digest -> OBJECT_VALUE + etag
DB_PINS: Final = b"cache.pins"  # object id -> u16 bucket length + bucket + key
DB_CACHE_META: Final = b"cache.meta"  # the keys below
CACHE_META_BLOCK_SIZE: Final = b"block_size"  # u64 little-endian
CACHE_META_FORMAT: Final = b"format"  # u32 little-endian CHUNK_FORMAT_VERSION
CACHE_META_CLEAN: Final = b"clean"  # present only after a clean close

# A cache.chunks value: last access time, block index, logical size, bytes on disk (header
# included), flags, bucket/key/etag lengths; then the bucket, key, etag bytes. Fixed fields
# first, so that the eviction scan (and the direct reader's length check) unpack them without
# touching the names.
CHUNK_RECORD: Final = struct.Struct("<dQQQBHHH")
CHUNK_RECORD_LOGICAL: Final = 2  # the field of CHUNK_RECORD holding the logical size
CHUNK_RECORD_ACCESS_END: Final = 8  # bytes of the access time, the only field a hit rewrites
OBJECT_VALUE: Final = struct.Struct("<Q")  # a cache.objects value: block index, then the etag bytes

# -- chunk files -----------------------------------------------------------------------------------------
# 2: an xxh3-64 digest per 64 KiB page of logical data replaced the CRC32 of the whole block (1).
CHUNK_FORMAT_VERSION: Final = 2


def encode_format_version() -> bytes:
    """CHUNK_FORMAT_VERSION as ``cache.meta`` stores it."""
    return CHUNK_FORMAT_VERSION.to_bytes(4, "little")


def chunk_path(chunk_dir: str, digest: bytes) -> str:
    """Where the block with ``digest`` lives: one level of 256 fan-out directories.

    An f-string rather than ``os.path.join``: this runs once per block read, and join's
    checks cost more than the rest of it."""
    name = digest.hex()
    return f"{chunk_dir}/{name[0:2]}/{name}"
