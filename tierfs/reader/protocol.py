"""What the daemon publishes in its cache directory for direct readers, and what they write back.

Both sides import this module, so the file names, the record layouts and the version
numbers exist once. The daemon side (``publish``, ``apply_access_records``) runs in the
mount's maintenance pass; the reader side lives in :mod:`tierfs.reader.view`.

``<cache_dir>/reader.json`` (rewritten by every maintenance pass, at most 5 s apart):
the protocol and cache format versions, block size, bucket, the FUSE device number of the
mount (``st_dev`` of every file in it), the daemon's pid, a heartbeat time, and the
(st_dev, st_ino) of both LMDB lock files. A reader serves nothing unless all of them fit:
the device number proves the cache belongs to the mount the path is on (inode numbers
only mean something in their own namespace), the heartbeat that a live daemon still owns
it, and the lock files that the reader's LMDB reader slots are in the table the daemon's
writer honours (a lock file bind-mounted from an old cache would not be).

``<cache_dir>/access/*.acc``: one file per batch of direct reads of one process, written
to a temp name and renamed, so the daemon never sees half a batch and never has to lock.
Layout: ``TFSA``, u8 version, 3 bytes 0, u32 length of a JSON object (the process's
counter deltas since its previous batch), the JSON, then (32-byte chunk digest, f64 time)
records.
"""

from __future__ import annotations

import contextlib
import json
import os
import struct
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import cacheformat as fmt

PROTOCOL = 1
READER_FILE = "reader.json"
ACCESS_DIR = "access"
ACCESS_SUFFIX = ".acc"
HEARTBEAT_MAX_AGE = 60.0  # seconds; maintenance rewrites the file every <= 5 s
REASONS = ("miss", "dirty", "version", "evicted", "corrupt", "unreadable", "format", "not_tierfs")

_ACCESS_HEAD = struct.Struct("<4sB3xI")
_ACCESS_MAGIC = b"TFSA"
_ACCESS_VERSION = 1
ACCESS_RECORD = struct.Struct("<32sd")
_MAX_ACCESS_FILE = 64 << 20  # a bigger file is not ours to parse (bounded memory in the daemon)
_STALE_TMP = 300.0


def encode_access_batch(counters: dict[str, Any], times: dict[bytes, float]) -> bytes:
    meta = json.dumps(counters, separators=(",", ":")).encode()
    body = b"".join(ACCESS_RECORD.pack(d, t) for d, t in times.items())
    return _ACCESS_HEAD.pack(_ACCESS_MAGIC, _ACCESS_VERSION, len(meta)) + meta + body


def decode_access_batch(raw: bytes) -> tuple[dict[str, Any], list[tuple[bytes, float]]]:
    """Counters and (digest, time) records of one batch; ValueError if it is not one."""
    if len(raw) < _ACCESS_HEAD.size:
        raise ValueError("short access batch")
    magic, version, meta_len = _ACCESS_HEAD.unpack_from(raw)
    if magic != _ACCESS_MAGIC or version != _ACCESS_VERSION:
        raise ValueError("not an access batch")
    at = _ACCESS_HEAD.size + meta_len
    counters = json.loads(raw[_ACCESS_HEAD.size : at])
    if not isinstance(counters, dict) or (len(raw) - at) % ACCESS_RECORD.size:
        raise ValueError("bad access batch")
    records = [ACCESS_RECORD.unpack_from(raw, pos) for pos in range(at, len(raw), ACCESS_RECORD.size)]
    return counters, records


@dataclass
class DirectTotals:
    """The direct readers' counters as the daemon summed them from their batches (this mount's life)."""

    direct_reads: int = 0
    direct_bytes: int = 0
    fallbacks: dict[str, int] = field(default_factory=dict)
    access_records: int = 0
    batches: int = 0
    bad_batches: int = 0

    def add(self, counters: dict[str, Any]) -> None:
        self.direct_reads += int(counters.get("direct_reads", 0))
        self.direct_bytes += int(counters.get("direct_bytes", 0))
        for reason, n in dict(counters.get("fallbacks", {})).items():
            if reason in REASONS:
                self.fallbacks[reason] = self.fallbacks.get(reason, 0) + int(n)


def lock_ident(env_dir: Path) -> list[int]:
    st = os.stat(env_dir / "lock.mdb")
    return [st.st_dev, st.st_ino]


def publish(
    cache_dir: Path,
    *,
    block_size: int,
    cache_format: int,
    bucket: str,
    source: str,
    dev: tuple[int, int],
    snapshot: str | None = None,
) -> None:
    """Write reader.json atomically (temp file + rename): readers see the old one or the new one."""
    record = {
        "protocol": PROTOCOL,
        "format": cache_format,
        "block_size": block_size,
        "bucket": bucket,
        "source": source,
        "dev": list(dev),
        "pid": os.getpid(),
        "heartbeat": time.time(),
        "locks": {env: lock_ident(cache_dir / env) for env in (fmt.META_ENV, fmt.INDEX_ENV)},
    }
    if snapshot is not None:  # a snapshot mount: inode records come from this manifest copy
        record["snapshot"] = snapshot
    tmp = cache_dir / f".{READER_FILE}.tmp"
    tmp.write_text(json.dumps(record))
    os.chmod(tmp, 0o600 | (os.stat(cache_dir).st_mode & 0o040))  # readable by the group only if the dir is
    os.replace(tmp, cache_dir / READER_FILE)
    access = cache_dir / ACCESS_DIR
    with contextlib.suppress(FileExistsError):
        access.mkdir(mode=0o700)


def apply_access_records(
    cache_dir: Path, touch: Callable[[Iterable[tuple[bytes, float]]], int], totals: DirectTotals
) -> int:
    """Feed every complete batch in ``<cache_dir>/access`` to ``touch`` (ChunkCache.touch_digests),
    add its counters to ``totals``, and remove it. Returns the number of records applied."""
    applied = 0
    directory = cache_dir / ACCESS_DIR
    try:
        entries = list(os.scandir(directory))
    except FileNotFoundError:
        return 0
    now = time.time()
    for entry in entries:
        if not entry.name.endswith(ACCESS_SUFFIX):
            with contextlib.suppress(OSError):
                if entry.name.startswith(".tmp.") and now - entry.stat().st_mtime > _STALE_TMP:
                    os.unlink(entry.path)  # a reader died between writing and renaming
            continue
        try:
            if entry.stat(follow_symlinks=False).st_size > _MAX_ACCESS_FILE or not entry.is_file(
                follow_symlinks=False
            ):
                raise ValueError("not a batch file")
            with open(entry.path, "rb") as f:
                counters, records = decode_access_batch(f.read(_MAX_ACCESS_FILE + 1))
        except (OSError, ValueError):
            totals.bad_batches += 1
        else:
            applied += touch(records)
            totals.add(counters)
            totals.access_records += len(records)
            totals.batches += 1
        with contextlib.suppress(OSError):
            os.unlink(entry.path)
    return applied
