"""``tierfs snapshot create`` and ``import``: rows from a source, a manifest in a temporary
file (flat memory), then one upload that never replaces an existing snapshot."""

from __future__ import annotations

import os
import stat
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path

from ..config import Source
from ..errors import ConfigError, NotFound, PreconditionFailed
from ..store.objectstore import S3ObjectStore
from .build import (
    Counted,
    TreeBuilder,
    keys_from_lines,
    rows_from_keys,
    rows_from_list,
    rows_from_mountpoint_csv,
    rows_from_versions,
)
from .format import (
    GID,
    KEY,
    KIND,
    KIND_SPECIAL,
    KIND_SYMLINK,
    MODE,
    MTIME,
    UID,
    Footer,
    ManifestWriter,
    Row,
)
from .location import ManifestRef, resolve
from .sorter import checked_order, sorted_rows


def is_versioned(store: S3ObjectStore) -> bool:
    """Whether the bucket has (or had) versioning: then version ids pin a snapshot's objects."""
    return store.versioning() in ("Enabled", "Suspended")


def posix_from(mount_root: str) -> Callable[[Row], None]:
    """For a snapshot of a mounted path: the attributes the mount shows (owner, mode, type and
    mtime of files written through it), by one ``lstat`` per entry through the mount."""

    def enrich(row: Row) -> None:
        try:
            st = os.lstat(os.path.join(mount_root, row[KEY].rstrip("/")))
        except OSError:
            return  # not shown by the mount (e.g. shadowed): the bucket's word stands
        row[MODE], row[UID], row[GID] = st.st_mode, st.st_uid, st.st_gid
        row[MTIME] = st.st_mtime_ns
        if stat.S_ISLNK(st.st_mode):
            row[KIND] = KIND_SYMLINK
        elif not stat.S_ISREG(st.st_mode) and not stat.S_ISDIR(st.st_mode):
            row[KIND] = KIND_SPECIAL

    return enrich


def write_manifest(
    out_path: Path,
    footer: Footer,
    rows: Iterable[Row],
    *,
    enrich: Callable[[Row], None] | None = None,
    progress: Callable[[int], None] | None = None,
) -> int:
    """Write ``rows`` (sorted) as a manifest at ``out_path``; returns its size."""
    with open(out_path, "wb") as out:
        writer = ManifestWriter(out, footer)
        tree = TreeBuilder(writer, enrich=enrich)
        for count, row in enumerate(rows, 1):
            tree.add(row)
            if progress is not None and count % 100_000 == 0:
                progress(count)
        size = writer.finish()
        out.flush()
        os.fsync(out.fileno())
    return size


def create(
    store: S3ObjectStore,
    source: Source,
    name: str,
    *,
    to: str | None = None,
    as_of_ns: int | None = None,
    as_of_text: str | None = None,
    import_rows: Callable[[bool], Iterable[Row]] | None = None,
    import_kind: str = "",
    mount_root: str | None = None,
    tmpdir: str | None = None,
    progress: Callable[[int], None] | None = None,
) -> tuple[ManifestRef, Footer]:
    """Make the snapshot ``name`` of ``source`` (or write it to ``to``); refuse to replace one."""
    where = resolve(source, to or name)
    if where.bucket and where.bucket != source.bucket:
        raise ConfigError(f"write manifests of {source} to its own bucket or a local path, not {where}")
    versioned = is_versioned(store)
    if as_of_ns is not None and not versioned:
        raise ConfigError(f"--as-of needs a versioned bucket: s3://{source.bucket} has versioning off")
    _refuse_existing(store, where)
    footer = Footer(
        bucket=source.bucket, prefix=source.prefix, name=name, created_ns=time.time_ns(),
        versioned=versioned, source="", as_of=as_of_text,
    )  # fmt: skip
    counter = Counted(footer)
    rows: Iterable[Row]
    if import_rows is not None:
        kind = import_kind
        rows = sorted_rows(import_rows(versioned), tmpdir=tmpdir)
    elif versioned:
        kind = "as-of" if as_of_ns is not None else "versions"
        rows = checked_order(rows_from_versions(store, source.prefix, counter, as_of_ns))
    else:
        kind = "list"
        rows = checked_order(rows_from_list(store, source.prefix, counter))
    footer.source = "mount" if mount_root is not None else kind
    with tempfile.TemporaryDirectory(dir=tmpdir, prefix="tierfs-snapshot-") as scratch:
        path = Path(scratch) / "manifest"
        write_manifest(
            path, footer, rows, enrich=posix_from(mount_root) if mount_root else None, progress=progress
        )
        _publish(store, where, path)
    return where, footer


def _refuse_existing(store: S3ObjectStore, where: ManifestRef) -> None:
    if where.path:
        if os.path.exists(where.path):
            raise ConfigError(f"{where.path} exists; snapshots are immutable (delete it first)")
        return
    try:
        store.head(where.key)
    except NotFound:
        return
    raise ConfigError(f"snapshot {where} exists; snapshots are immutable (delete it first)")


def _publish(store: S3ObjectStore, where: ManifestRef, path: Path) -> None:
    if where.path:
        os.link(path, where.path)  # fails if it appeared meanwhile, never replaces it
        return
    try:
        store.put_file(where.key, path, {}, if_none_match=True)
    except PreconditionFailed:
        raise ConfigError(f"snapshot {where} was created meanwhile by someone else") from None


def import_source(fmt: str, file: str, prefix: str, store: S3ObjectStore) -> Callable[[bool], Iterable[Row]]:
    """The rows of an imported key list: ``keys`` (one key per line; HEADs fill in the rest) or
    ``mountpoint-csv`` (key,etag,size[,checksum]; no request)."""

    def rows(versioned: bool) -> Iterable[Row]:
        with open(file, encoding="utf-8", newline="") as text:
            if fmt == "keys":
                yield from rows_from_keys(store, prefix, keys_from_lines(text, prefix), versioned=versioned)
            else:
                yield from rows_from_mountpoint_csv(text, prefix)

    if fmt not in ("keys", "mountpoint-csv"):
        raise ConfigError(f"--format must be keys or mountpoint-csv, not {fmt!r}")
    return rows
