"""Where a snapshot's manifest lives, and opening one for a mount, ``show`` or a reader.

A named snapshot of ``s3://BUCKET/PREFIX`` is the object
``s3://BUCKET/.tierfs/snapshots/PREFIX/NAME.tsnap`` (docs/snapshots.md): beside the data, so
the bucket's own permissions, replication and lifecycle cover it, but outside every prefix a
snapshot is taken of, so no snapshot contains another (a mount of the whole bucket hides the
top-level ``.tierfs/``). A user may instead give a manifest URL: ``s3://BUCKET/KEY`` (any
bucket at the same endpoint) or a local path. Either way the manifest says which bucket and
prefix it is of, and opening it for another one is refused.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..config import Source
from ..errors import ConfigError, NotFound
from ..store.objectstore import ObjectStore
from .build import META_DIR
from .format import SUFFIX, ManifestError
from .manifest import Manifest

SNAPSHOT_DIR = META_DIR + "snapshots/"
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@+-]{0,127}")


def check_name(name: str) -> str:
    if not NAME_RE.fullmatch(name) or name.endswith(SUFFIX):
        raise ConfigError(
            f"invalid snapshot name {name!r}: use 1-128 letters, digits and . _ @ + - "
            "(starting with a letter or digit)"
        )
    return name


def manifest_key(source: Source, name: str) -> str:
    return f"{SNAPSHOT_DIR}{source.prefix}{check_name(name)}{SUFFIX}"


def listing_prefix(source: Source) -> str:
    return f"{SNAPSHOT_DIR}{source.prefix}"


def is_url(ref: str) -> bool:
    """Whether ``--snapshot`` names a manifest (a URL or path) rather than a snapshot of the source."""
    return "://" in ref or ref.startswith(("/", "./")) or ref.endswith(SUFFIX)


@dataclass(frozen=True)
class ManifestRef:
    """A manifest object: ``bucket``/``key`` in S3, or ``path`` on local disk."""

    bucket: str = ""
    key: str = ""
    path: str = ""

    def __str__(self) -> str:
        return self.path or f"s3://{self.bucket}/{self.key}"


def resolve(source: Source, ref: str) -> ManifestRef:
    if not is_url(ref):
        return ManifestRef(source.bucket, manifest_key(source, ref))
    if ref.startswith("s3://"):
        bucket, _, key = ref[len("s3://") :].partition("/")
        if not bucket or not key:
            raise ConfigError(f"manifest URL {ref!r} must be s3://BUCKET/KEY")
        return ManifestRef(bucket, key)
    path = ref[len("file://") :] if ref.startswith("file://") else ref
    if "://" in path:
        raise ConfigError(f"manifest URL {ref!r}: only s3:// URLs and local paths are supported")
    return ManifestRef(path=os.path.abspath(path))


def open_manifest(
    source: Source,
    ref: str,
    store_for: Callable[[str], ObjectStore],
    local_dir: Path | None,
) -> tuple[Manifest, ManifestRef]:
    """Open the manifest ``ref`` (a snapshot name of ``source`` or a URL) and check it is of
    ``source``. Fetches its footer now (and all of it when small), so every bad input fails
    here, before anything is mounted. Raises ConfigError (ManifestError) with one line."""
    where = resolve(source, ref)
    if where.path:
        try:
            size = os.stat(where.path).st_size
            fd = os.open(where.path, os.O_RDONLY)
        except OSError as exc:
            raise ConfigError(f"cannot read manifest {where.path}: {exc.strerror}") from None
        try:
            manifest = Manifest(size, lambda offset, length: os.pread(fd, length, offset), None)
            manifest.on_close = lambda: os.close(fd)
            _check_of(manifest, source, where)
        except BaseException:
            os.close(fd)
            raise
        return manifest, where
    store = store_for(where.bucket)
    try:
        info = store.head(where.key)
    except NotFound:
        if is_url(ref):
            raise ConfigError(f"no manifest at {where}") from None
        raise ConfigError(
            f"no snapshot named {ref!r} of {source} (see: tierfs snapshot list {source})"
        ) from None

    def fetch(offset: int, length: int) -> bytes:
        return store.get_range(
            where.key, offset, length, if_match=info.etag or None, version_id=info.version_id or None
        ).data

    local = None
    if local_dir is not None:
        local_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        ident = hashlib.sha256(f"{where}|{info.etag}|{info.version_id}".encode()).hexdigest()[:24]
        local = local_dir / f"{ident}{SUFFIX}"
    manifest = Manifest(info.size, fetch, local)
    try:
        _check_of(manifest, source, where)
    except ConfigError:
        manifest.close()
        raise
    return manifest, where


def _check_of(manifest: Manifest, source: Source, where: ManifestRef) -> None:
    footer = manifest.footer
    if (footer.bucket, footer.prefix) != (source.bucket, source.prefix):
        raise ManifestError(
            f"manifest {where} is a snapshot of s3://{footer.bucket}/{footer.prefix}, not of {source}"
        )
