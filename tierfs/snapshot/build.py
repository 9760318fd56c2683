"""Building a manifest: rows from a source (a LIST, ListObjectVersions, an imported key list),
directories filled in, written in flat memory (docs/snapshots.md, "Making a snapshot").

Every source yields rows of *files* (and explicit ``dir/`` markers) keyed relative to the
snapshot's prefix, in key order; :class:`TreeBuilder` adds the directories every key implies
(each before its contents, so a directory's subtree is one contiguous run of the table) and
gives each row its parent's ordinal.
"""

from __future__ import annotations

import concurrent.futures
import csv
import io
import logging
from collections.abc import Callable, Iterable, Iterator
from datetime import UTC, datetime

from ..meta import keys
from ..store.objectstore import ObjectVersionInfo, S3ObjectStore, normalize_etag
from .format import (
    KEY,
    KIND,
    KIND_DIR,
    PARENT,
    Footer,
    ManifestError,
    ManifestWriter,
    Row,
    key_problem,
    new_row,
)

log = logging.getLogger(__name__)

#: Where manifests live in their bucket; a mount of the whole bucket hides this top-level directory.
META_DIR = keys.OWN_PREFIX
HEAD_THREADS = 16


class TreeBuilder:
    """Adds the implied directories to sorted rows and sets every row's parent ordinal."""

    def __init__(self, writer: ManifestWriter, *, enrich: Callable[[Row], None] | None = None) -> None:
        """``enrich(row)`` may fill in POSIX attributes of each row (directories included)."""
        self.writer = writer
        self._enrich = enrich
        self._open: list[tuple[str, int]] = []  # (directory key, ordinal), outermost first

    def add(self, row: Row) -> None:
        key: str = row[KEY]
        while self._open and not key.startswith(self._open[-1][0]):
            self._open.pop()
        is_dir = key.endswith("/")
        parent_end = key.rfind("/", 0, len(key) - 1) + 1  # the parent directory's key length
        depth_done = len(self._open[-1][0]) if self._open else 0
        # Directories between the innermost open one and this row's parent.
        cut = key.find("/", depth_done)
        while 0 <= cut < parent_end:
            self._open_dir(new_row(key[: cut + 1], kind=KIND_DIR))
            cut = key.find("/", cut + 1)
        if is_dir:
            row[KIND] = KIND_DIR
            self._open_dir(row)
        else:
            self._write(row)

    def _write(self, row: Row) -> int:
        row[PARENT] = self._open[-1][1] if self._open else -1
        if self._enrich is not None:
            self._enrich(row)
        return self.writer.add(row)

    def _open_dir(self, row: Row) -> None:
        self._open.append((row[KEY], self._write(row)))


def visible(key: str, prefix: str) -> str | None:
    """The key relative to ``prefix`` if a mount would show it, else None (hidden keys are
    counted by the caller; tierfs's own ``.tierfs/`` directory is never part of a snapshot)."""
    if not key.startswith(prefix):
        return None
    rel = key[len(prefix) :]
    if not prefix and rel.startswith(META_DIR):
        return None
    if rel == "" or key_problem(rel) is not None:
        return None
    body = rel[:-1] if rel.endswith("/") else rel
    if any(keys.name_problem(part) for part in body.split("/")):
        return None
    return rel


class Counted:
    """Counts the keys a source skipped in the footer's ``hidden_keys`` (written last)."""

    def __init__(self, footer: Footer) -> None:
        self.footer = footer

    def skip(self, key: str) -> None:
        self.footer.hidden_keys += 1
        log.info("snapshot: hiding key %r (not representable as a POSIX path)", key)


def rows_from_list(store: S3ObjectStore, prefix: str, counter: Counted) -> Iterator[Row]:
    """The current objects below ``prefix`` (an unversioned bucket): ETags pin them."""
    for info in store.list_tree(prefix):
        rel = visible(info.key, prefix)
        if rel is None:
            if not (not prefix and info.key.startswith(META_DIR)) and info.key != prefix:
                counter.skip(info.key)
            continue
        yield new_row(rel, size=info.size, etag=info.etag, mtime_ns=info.mtime_ns)


def rows_from_versions(
    store: S3ObjectStore, prefix: str, counter: Counted, as_of_ns: int | None
) -> Iterator[Row]:
    """Each key's newest version at or before ``as_of_ns`` (None: its latest), skipping keys whose
    chosen version is a delete marker; version ids pin them. One key's versions at a time."""

    def choose(versions: list[ObjectVersionInfo]) -> ObjectVersionInfo | None:
        if as_of_ns is None:
            return next((v for v in versions if v.is_latest), None)
        # Listed newest first; LastModified has whole seconds, so a tie keeps the listed order.
        return next((v for v in versions if v.mtime_ns <= as_of_ns), None)

    def emit(versions: list[ObjectVersionInfo]) -> Iterator[Row]:
        chosen = choose(versions)
        if chosen is None or chosen.deleted:
            return
        rel = visible(chosen.key, prefix)
        if rel is None:
            if not (not prefix and chosen.key.startswith(META_DIR)) and chosen.key != prefix:
                counter.skip(chosen.key)
            return
        yield new_row(
            rel, size=chosen.size, etag=chosen.etag, version_id=chosen.version_id, mtime_ns=chosen.mtime_ns
        )

    group: list[ObjectVersionInfo] = []
    for version in store.list_versions(prefix):
        if group and version.key != group[0].key:
            yield from emit(group)
            group = []
        group.append(version)
    if group:
        yield from emit(group)


def _relative(key: str, prefix: str, line: int) -> str:
    if not key.startswith(prefix):
        raise ManifestError(f"line {line}: key {key!r} is not below the prefix {prefix!r}")
    rel = key[len(prefix) :]
    problem = key_problem(rel) if rel else "the prefix itself"
    if problem is not None:
        raise ManifestError(f"line {line}: key {key!r} would be refused by S3: {problem}")
    return rel


def keys_from_lines(lines: Iterable[str], prefix: str) -> Iterator[str]:
    """A plain key list: one full object key per line; blank lines and ``#`` comments skipped."""
    for number, line in enumerate(lines, 1):
        key = line.rstrip("\r\n")
        if not key.strip() or key.startswith("#"):
            continue
        yield _relative(key, prefix, number)


def rows_from_keys(
    store: S3ObjectStore, prefix: str, rel_keys: Iterable[str], *, versioned: bool
) -> Iterator[Row]:
    """A plain key list says nothing but the keys: one HEAD each (16 at a time, in order) gives
    size, ETag, mtime and, on a versioned bucket, the version id that pins it."""

    def head(rel: str) -> Row:
        info = store.head(prefix + rel)
        version = info.version_id if versioned else ""
        return new_row(rel, size=info.size, etag=info.etag, version_id=version, mtime_ns=info.mtime_ns)

    with concurrent.futures.ThreadPoolExecutor(HEAD_THREADS) as pool:
        window: list[concurrent.futures.Future[Row]] = []
        for rel in rel_keys:
            window.append(pool.submit(head, rel))
            if len(window) >= 4 * HEAD_THREADS:
                yield window.pop(0).result()
        for future in window:
            yield future.result()


def rows_from_mountpoint_csv(text: io.TextIOBase | Iterable[str], prefix: str) -> Iterator[Row]:
    """mountpoint-s3's manifest CSV: ``key,etag,size[,checksum]`` per row (no header; a first row
    whose size is not a number is taken as one). Pinned by ETag; no request is made."""
    for number, fields in enumerate(csv.reader(text), 1):
        if not fields or (len(fields) == 1 and not fields[0].strip()):
            continue
        if len(fields) not in (3, 4):
            raise ManifestError(f"line {number}: expected key,etag,size[,checksum], got {len(fields)} fields")
        key, etag, size = fields[0], fields[1], fields[2].strip()
        if not size.isdigit():
            if number == 1:
                continue  # a header row
            raise ManifestError(f"line {number}: size {size!r} is not a number")
        yield new_row(_relative(key, prefix, number), size=int(size), etag=normalize_etag(etag))


def parse_time(text: str) -> int:
    """An ISO-8601 time (``2026-12-01T00:00:00Z``; no zone means UTC) as Unix nanoseconds."""
    try:
        when = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        raise ManifestError(
            f"--as-of {text!r} is not an ISO-8601 time such as 2026-12-01T00:00:00Z"
        ) from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return int(when.timestamp() * 1_000_000_000)
