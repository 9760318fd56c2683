"""The one description of a mount that every layer reads.

The CLI, the fstab helper and the tests all build a :class:`MountConfig`; nothing else
parses options. Defaults are chosen to match what users of s3fs/rclone/mountpoint-s3
expect; the README's option table lists them (tests/test_docs.py checks that it matches).
"""

from __future__ import annotations

import hashlib
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

from .errors import ConfigError

MiB = 1 << 20
MIN_PART_SIZE = 5 * MiB  # S3's smallest part (all but the last)
MAX_PART_SIZE = 5 * 1024 * MiB  # and its largest
DEFAULT_CACHE_ROOT = Path("/var/cache/tierfs")
DEFAULT_TIMEOUT = 30.0  # --timeout: the bound on one S3 call, retries included
# flush/umount/SIGTERM give up on transient upload errors after this (--flush-timeout); also what
# a flush that is given no timeout waits (writeback)
DEFAULT_FLUSH_TIMEOUT = 600.0


@dataclass(frozen=True)
class Source:
    """``s3://BUCKET[/PREFIX]``; ``prefix`` is either empty or ends with ``/``."""

    bucket: str
    prefix: str = ""

    @classmethod
    def parse(cls, text: str) -> Source:
        if not text.startswith("s3://"):
            raise ConfigError(f"source must look like s3://BUCKET[/PREFIX], got {text!r}")
        rest = text[len("s3://") :]
        bucket, _, prefix = rest.partition("/")
        if len(bucket) < 3 or not all(c.isalnum() or c in "-." for c in bucket):
            raise ConfigError(f"invalid bucket name {bucket!r} in {text!r}")
        prefix = prefix.strip("/")
        return cls(bucket, prefix + "/" if prefix else "")

    def __str__(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}"


@dataclass
class MountConfig:
    """Everything a mount needs. Times are seconds, sizes bytes; ``math.inf`` means 'never'."""

    source: Source
    mountpoint: Path
    endpoint_url: str | None = None
    region: str | None = None
    profile: str | None = None
    credentials_file: str | None = None
    cache_dir: Path | None = None  # None: DEFAULT_CACHE_ROOT / <hash of source>
    cache_size: int | None = None  # None: only the free-space floor applies
    cache_min_free: float = 0.10  # share of the cache disk kept free
    cache_max_age: float = 86400.0
    cache_compression: int | None = None  # zstd level, None = off
    block_size: int = MiB  # cache granularity; see docs/cache-format.md
    metadata_ttl: float = 60.0
    read_only: bool = False
    foreground: bool = False
    allow_other: bool = False
    uid: int = field(default_factory=os.getuid)
    gid: int = field(default_factory=os.getgid)
    file_mode: int = 0o644
    dir_mode: int = 0o755
    timeout: float = DEFAULT_TIMEOUT  # one S3 request
    retries: int = 2  # extra attempts after the first, for transient failures
    log_level: str = "INFO"
    log_file: Path | None = None
    writeback_delay: float = 5.0
    flush_timeout: float = DEFAULT_FLUSH_TIMEOUT
    nonempty: bool = False  # mount over a directory that has entries (they are hidden while mounted)
    import_interval: float | None = None
    metrics_addr: str | None = None
    s3_concurrency: int = 16
    # Multipart uploads (docs/writeback.md, "Uploads"): files of at least multipart_threshold bytes
    # go up in part_size parts, upload_concurrency parts at once over all files (which bounds
    # their memory to upload_concurrency * part_size).
    part_size: int = 16 * MiB
    multipart_threshold: int = 64 * MiB
    upload_concurrency: int = 8
    fuse_debug: bool = False
    cache_group: int | None = None  # gid whose members may read the cache directly (docs/reader.md)
    # The shared cache tier (docs/shared-cache.md): a bucket on an S3-compatible cluster near the nodes.
    shared_cache: Source | None = None
    shared_cache_endpoint_url: str | None = None  # None: the origin's endpoint
    shared_cache_profile: str | None = None  # None: the origin's credentials
    shared_cache_timeout: float = 0.5  # a read waits this long for the tier, then goes to the origin
    # Dataset versions (docs/snapshots.md): a read-only mount pinned to a snapshot (a name of the
    # source's, or a manifest URL), or to the bucket's versions at a time (a versioned bucket).
    snapshot: str | None = None
    as_of: str | None = None

    @property
    def resolved_cache_dir(self) -> Path:
        if self.cache_dir is not None:
            return self.cache_dir
        digest = hashlib.sha256(f"{self.endpoint_url}|{self.source}".encode()).hexdigest()[:16]
        return DEFAULT_CACHE_ROOT / f"{self.source.bucket}-{digest}"

    @property
    def kernel_timeout(self) -> float:
        """Entry/attr timeout handed to the kernel: the metadata TTL, capped for 'indefinite'."""
        return 365 * 86400.0 if math.isinf(self.metadata_ttl) else self.metadata_ttl

    def validate(self) -> None:
        if self.timeout <= 0:
            raise ConfigError("--timeout must be positive")
        if self.flush_timeout <= 0:
            raise ConfigError("--flush-timeout must be positive")
        if self.cache_size is not None and self.cache_size < 8 * self.block_size:
            raise ConfigError(f"--cache-size must be at least {8 * self.block_size // MiB} MiB")
        if not 0 <= self.cache_min_free < 1:
            raise ConfigError("--cache-min-free must be a share between 0 and 1 (e.g. 0.1 or 10%)")
        if not MIN_PART_SIZE <= self.part_size <= MAX_PART_SIZE:
            raise ConfigError(
                f"--part-size must be within {MIN_PART_SIZE // MiB} MiB..{MAX_PART_SIZE // MiB} MiB"
            )
        if self.multipart_threshold < self.part_size:
            raise ConfigError("--multipart-threshold must be at least --part-size")
        if self.cache_compression is not None and not 1 <= self.cache_compression <= 22:
            raise ConfigError("zstd level must be within 1..22")
        if self.shared_cache_timeout <= 0:
            raise ConfigError("--shared-cache-timeout must be positive")
        if self.snapshot is not None and self.as_of is not None:
            raise ConfigError("--snapshot and --as-of pin the mount twice: give one of them")
        if self.snapshot is not None or self.as_of is not None:
            self.read_only = True  # a pinned version is never written through the mount
        if self.shared_cache is not None and self.shared_cache == self.source:
            raise ConfigError("--shared-cache must not be the mounted bucket and prefix itself")
