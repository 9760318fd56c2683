"""``tierfs snapshot create|import|list|show|delete`` (docs/snapshots.md).

SOURCE is ``s3://BUCKET[/PREFIX]`` or a path on a tierfs mount; a mounted path is flushed
first through the mount's control socket, so files written through it are in the snapshot
with the owners and modes the mount shows.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import lmdb

from .config import MountConfig, Source
from .control.client import ControlClient
from .control.registry import mount_holding
from .errors import ConfigError, NotFound
from .snapshot.build import parse_time
from .snapshot.create import create, import_source
from .snapshot.format import SUFFIX
from .snapshot.location import check_name, listing_prefix, open_manifest, resolve
from .snapshot.usage import Usage, cached
from .store.objectstore import S3ObjectStore
from .units import format_bytes

Flush = Callable[[Mapping[str, Any], float | None], Any]


@dataclass
class Resolved:
    """A SOURCE argument: the bucket and prefix, the endpoint, and (a mounted path) the mount."""

    source: Source
    endpoint_url: str | None
    mount_root: str | None = None
    cache_dir: str | None = None
    record: Mapping[str, Any] | None = None
    pinned: bool = False  # a snapshot mount: it shows a snapshot, not the bucket


def _resolve_source(text: str, ns: argparse.Namespace) -> Resolved:
    from .cli import ENDPOINT_ENV  # the mount's own rule; imported late, as cli imports this module

    endpoint = ns.endpoint_url or next((os.environ[v] for v in ENDPOINT_ENV if os.environ.get(v)), None)
    if text.startswith("s3://"):
        return Resolved(Source.parse(text), endpoint)
    record, rel = mount_holding(text)
    status = ControlClient(str(record["socket"]), mountpoint=str(record["mountpoint"])).call(
        "status", {}, timeout=30
    )
    mounted = Source.parse(str(record["source"]))
    prefix = mounted.prefix + ("" if rel == "." else rel.strip("/") + "/")
    return Resolved(
        Source(mounted.bucket, prefix),
        status.get("endpoint_url") or endpoint,
        mount_root=os.path.join(str(record["mountpoint"]), "" if rel == "." else rel),
        cache_dir=str(record.get("cache_dir") or ""),
        record=record,
        pinned=bool(status.get("snapshot")),
    )


def _store(bucket: str, where: Resolved, ns: argparse.Namespace) -> S3ObjectStore:
    # No CRT client: the commands make few GETs, and its buffers would cost ~150 MiB of RSS.
    return S3ObjectStore(
        bucket, endpoint_url=where.endpoint_url, region=ns.region, profile=ns.profile, timeout=ns.timeout,
        fast_gets=False,
    )  # fmt: skip


def _progress(count: int) -> None:
    if sys.stderr.isatty():
        print(f"\r{count:,} keys", end="", file=sys.stderr, flush=True)


def cmd_create(ns: argparse.Namespace, flush: Flush) -> int:
    where = _resolve_source(ns.source, ns)
    check_name(ns.name)
    if where.pinned:
        raise ConfigError(f"{ns.source} is on a snapshot mount: snapshot s3://... or a writable mount")
    if where.record is not None:
        flush(where.record, None)
    store = _store(where.source.bucket, where, ns)
    import_rows = None
    if getattr(ns, "file", None) is not None:
        import_rows = import_source(ns.format, ns.file, where.source.prefix, store)
    ref, footer = create(
        store, where.source, ns.name, to=ns.to,
        as_of_ns=parse_time(ns.as_of) if getattr(ns, "as_of", None) else None,
        as_of_text=getattr(ns, "as_of", None), import_rows=import_rows,
        import_kind=f"import-{ns.format}" if import_rows is not None else "",
        mount_root=where.mount_root, tmpdir=ns.tmpdir, progress=_progress,
    )  # fmt: skip
    if sys.stderr.isatty():
        print(file=sys.stderr)
    print(
        f"snapshot {ns.name} of {where.source}: {footer.files:,} files, {footer.dirs:,} directories, "
        f"{format_bytes(footer.total_bytes)}{' (version ids pinned)' if footer.versioned else ''} -> {ref}"
    )
    return 0


def cmd_list(ns: argparse.Namespace) -> int:
    where = _resolve_source(ns.source, ns)
    store = _store(where.source.bucket, where, ns)
    prefix = listing_prefix(where.source)
    names = []
    for page in store.list_dir(prefix):
        for info in page.objects:
            if info.key.endswith(SUFFIX):
                names.append((info.key[len(prefix) : -len(SUFFIX)], info))
    if ns.json:
        print(json.dumps([{"name": n, "size": i.size, "created": i.mtime_ns / 1e9} for n, i in names]))
        return 0
    for name, info in names:
        when = datetime.fromtimestamp(info.mtime_ns / 1e9, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        print(f"{name}\t{when}\t{format_bytes(info.size)}")
    return 0


def _cache_dir(where: Resolved, ns: argparse.Namespace) -> Path:
    if ns.cache_dir:
        return Path(ns.cache_dir)
    if where.cache_dir:
        return Path(where.cache_dir)
    return MountConfig(
        source=where.source, mountpoint=Path("/"), endpoint_url=where.endpoint_url
    ).resolved_cache_dir


def node_usage(cache_dir: Path, manifest_rows: Any, source: Source) -> Usage | None:
    """The snapshot's blocks in ``cache_dir``'s chunk index (read-only, beside a running mount)."""
    index = cache_dir / "index"
    if not (index / "data.mdb").exists():
        return None
    env = lmdb.open(str(index), readonly=True, lock=False, max_dbs=32, subdir=True)
    try:
        chunks = env.open_db(b"cache.chunks", create=False)
        meta = env.open_db(b"cache.meta", create=False)
        with env.begin(db=meta) as txn:
            raw = txn.get(b"block_size")
        block_size = int.from_bytes(raw, "little") if raw else 1 << 20
        with env.begin(db=chunks) as txn:
            return cached(
                manifest_rows,
                source.bucket,
                source.prefix,
                block_size,
                lambda ck: txn.get(ck.digest()) is not None,
            )
    except lmdb.Error:
        return None
    finally:
        env.close()


def cmd_show(ns: argparse.Namespace) -> int:
    where = _resolve_source(ns.source, ns)
    manifest, ref = open_manifest(where.source, ns.name, lambda b: _store(b, where, ns), None)
    try:
        summary: dict[str, Any] = {
            "manifest": str(ref),
            "manifest_bytes": manifest.size,
            **manifest.footer.summary(),
        }
        cache_dir = _cache_dir(where, ns)
        usage = node_usage(cache_dir, manifest.rows(fetch=True), where.source)
        summary["cache_dir"] = str(cache_dir)
        summary["cached_bytes"] = usage.bytes_cached if usage else 0
        summary["cached_files"] = usage.files_cached if usage else 0
    finally:
        manifest.close()
    if ns.json:
        print(json.dumps(summary, indent=2))
        return 0
    for key, value in summary.items():
        if key in ("total_bytes", "cached_bytes", "manifest_bytes"):
            value = f"{format_bytes(int(value))} ({value:,} bytes)"
        elif key == "created_ns":
            key, value = "created", datetime.fromtimestamp(int(value) / 1e9, UTC).isoformat()
        print(f"{key}: {value}")
    return 0


def cmd_delete(ns: argparse.Namespace) -> int:
    where = _resolve_source(ns.source, ns)
    ref = resolve(where.source, ns.name)
    if ref.path:
        os.unlink(ref.path)
        return 0
    store = _store(ref.bucket, where, ns)
    try:
        store.head(ref.key)
    except NotFound:
        raise ConfigError(f"no snapshot named {ns.name!r} of {where.source}") from None
    store.delete(ref.key)
    print(f"deleted {ref}")
    return 0


def add_parser(sub: Any, flush: Flush) -> None:
    """The ``snapshot`` command and its subcommands, on ``tierfs``'s subparsers."""
    snap = sub.add_parser("snapshot", help="named, immutable versions of a prefix (docs/snapshots.md)")
    verbs = snap.add_subparsers(dest="verb", metavar="VERB", required=True)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("source", metavar="SOURCE", help="s3://BUCKET[/PREFIX] or a path on a tierfs mount")
        p.add_argument(
            "--endpoint-url", metavar="URL", help="S3 endpoint (default: $AWS_ENDPOINT_URL_S3 ...)"
        )
        p.add_argument("--region", metavar="REGION")
        p.add_argument("--profile", metavar="NAME")
        p.add_argument("--timeout", type=float, default=30.0, metavar="SECONDS", help="one S3 request")

    create_p = verbs.add_parser("create", help="snapshot what SOURCE holds now (or --as-of a time)")
    common(create_p)
    create_p.add_argument("name", metavar="NAME")
    create_p.add_argument(
        "--as-of", metavar="TIME", help="the newest versions at or before TIME (versioned bucket)"
    )
    create_p.add_argument(
        "--to", metavar="URL", help="write the manifest here instead (s3://BUCKET/KEY or a path)"
    )
    create_p.add_argument("--tmpdir", metavar="DIR", help="scratch space for the manifest (default $TMPDIR)")
    create_p.set_defaults(func=lambda ns: cmd_create(ns, flush))

    import_p = verbs.add_parser("import", help="make a snapshot from a key list another tool wrote")
    common(import_p)
    import_p.add_argument("name", metavar="NAME")
    import_p.add_argument("file", metavar="FILE")
    import_p.add_argument("--format", choices=("keys", "mountpoint-csv"), default="keys")
    import_p.add_argument("--to", metavar="URL")
    import_p.add_argument("--tmpdir", metavar="DIR")
    import_p.set_defaults(func=lambda ns: cmd_create(ns, flush))

    list_p = verbs.add_parser("list", help="the snapshots of SOURCE")
    common(list_p)
    list_p.add_argument("--json", action="store_true")
    list_p.set_defaults(func=cmd_list)

    show_p = verbs.add_parser("show", help="counts, bytes, and how much of it this node caches")
    common(show_p)
    show_p.add_argument("name", metavar="NAME")
    show_p.add_argument("--cache-dir", metavar="DIR", help="the cache dir to count (default: the mount's)")
    show_p.add_argument("--json", action="store_true")
    show_p.set_defaults(func=cmd_show)

    delete_p = verbs.add_parser("delete", help="delete a snapshot's manifest (never the data)")
    common(delete_p)
    delete_p.add_argument("name", metavar="NAME")
    delete_p.set_defaults(func=cmd_delete)
