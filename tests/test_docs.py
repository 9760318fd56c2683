"""What the docs state, checked against the code wherever that is cheap (as mountpoint-s3 tests SEMANTICS.md).

A number or default quoted in README.md or docs/ that no longer matches the constant behind
it is a defect of the docs; these tests make such drift fail the build instead of misleading
a user.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tierfs.cache import shared
from tierfs.cli import parse_mount_args
from tierfs.daemon import stack
from tierfs.fuse import kerneltune
from tierfs.meta import tombstones
from tierfs.read import hydrator
from tierfs.store import objectstore
from tierfs.units import parse_duration, parse_size
from tierfs.writeback import attempts as writeback_attempts
from tierfs.writeback import core as writeback_core

ROOT = Path(__file__).resolve().parent.parent


def _text(name: str) -> str:
    return (ROOT / name).read_text()


def _readme_defaults() -> dict[str, str]:
    """``--option`` -> the default column of the README's option table."""
    rows = re.findall(r"^\| `--([a-z-]+)` \| `([^`]*)` \|", _text("README.md"), re.MULTILINE)
    return dict(rows)


@pytest.mark.parametrize(
    ("option", "field"),
    [
        ("metadata-ttl", "metadata_ttl"),
        ("cache-max-age", "cache_max_age"),
        ("writeback-delay", "writeback_delay"),
        ("timeout", "timeout"),
        ("flush-timeout", "flush_timeout"),
    ],
)
def test_readme_option_defaults_are_the_parsed_defaults(option: str, field: str) -> None:
    config = parse_mount_args(["s3://bucket", "/mnt/data"])
    documented = _readme_defaults()[option]
    assert parse_duration(documented) == getattr(config, field), f"README says --{option} {documented}"


@pytest.mark.parametrize(
    ("option", "field"),
    [
        ("part-size", "part_size"),
        ("multipart-threshold", "multipart_threshold"),
        ("upload-concurrency", "upload_concurrency"),
    ],
)
def test_readme_upload_defaults_are_the_parsed_defaults(option: str, field: str) -> None:
    config = parse_mount_args(["s3://bucket", "/mnt/data"])
    assert parse_size(_readme_defaults()[option]) == getattr(config, field), f"README says --{option}"
    # The store's own defaults (quoted in docs/writeback.md) are the mount's.
    store_default = {
        "part_size": objectstore.MULTIPART_PART_SIZE,
        "multipart_threshold": objectstore.MULTIPART_THRESHOLD,
        "upload_concurrency": objectstore.PART_CONCURRENCY,
    }
    assert getattr(config, field) == store_default[field]


def test_readme_cache_min_free_default() -> None:
    config = parse_mount_args(["s3://bucket", "/mnt/data"])
    assert _readme_defaults()["cache-min-free"] == f"{round(config.cache_min_free * 100)}%"


def test_design_doc_numbers() -> None:
    design = " ".join(_text("docs/design.md").split())  # line breaks are not part of the claims
    assert f"a second limiter of {stack.IO_THREADS}" in design
    assert f"at most {hydrator.LOOP_READ_MAX // 1024} KiB" in design
    assert f"GETs of {objectstore.CRT_MAX_GET >> 20} MiB or less go to the CRT" in design
    assert f"raised to {kerneltune.DEFAULT_READ_AHEAD_KB // 1024} MiB" in design
    assert f"`max_background` to {kerneltune.DEFAULT_MAX_BACKGROUND}" in design
    assert f"own pool of {shared.LOOKUP_THREADS} threads (`shared.LOOKUP_THREADS`)" in design


def test_writeback_doc_numbers() -> None:
    doc = " ".join(_text("docs/writeback.md").split())  # line breaks are not part of the claims
    first, second, later = writeback_attempts.RETRY_BACKOFF
    assert f"retried after {first:g} s, {second:g} s, then every {later:g} s" in doc
    assert writeback_attempts.PERMANENT_BACKOFF == 60.0 and "retried once a minute" in doc
    assert f"default {writeback_core.DEFAULT_FLUSH_TIMEOUT:g} s" in doc
    assert f"multipart from {objectstore.MULTIPART_THRESHOLD >> 20} MiB" in doc
    assert f"{objectstore.MULTIPART_PART_SIZE >> 20} MiB parts" in doc
    assert f"up to {writeback_core.WriteBack.__init__.__kwdefaults__['concurrency']} at once" in doc


def test_tombstone_grace_outlives_a_listing() -> None:
    """docs/writeback.md relies on a tombstone outliving any one directory listing."""
    assert tombstones.GRACE >= 10 * 60


def test_shared_cache_doc_numbers() -> None:
    doc = " ".join(_text("docs/shared-cache.md").split())
    config = parse_mount_args(["s3://bucket", "/mnt/data"])
    assert f"`--shared-cache-timeout SECONDS` | `{config.shared_cache_timeout:g}`" in doc
    assert f"skipped for {shared.BACKOFF:g} s (`shared.BACKOFF`)" in doc
    assert f"at most {shared.QUEUE_BYTES >> 20} MiB (`shared.QUEUE_BYTES`)" in doc
    assert f"emptied by {['no', 'one', 'two', 'three'][shared.WRITERS]} background threads" in doc
    assert f"a {shared._ENTRY.size}-byte header (`struct \"{shared._ENTRY.format}\"`)" in doc
    assert f"magic `{shared.ENTRY_MAGIC.decode()}`, version {shared.ENTRY_VERSION}" in doc
    assert _readme_defaults()["shared-cache-timeout"] == f"{config.shared_cache_timeout:g}"


def test_the_layer_table_lists_every_module_of_each_package() -> None:
    """docs/design.md's layer table names each package's modules: a module added or removed
    without the table following would make the one-page picture of the tree untrue."""
    rows = re.findall(r"^\| [^|]+ \| `tierfs/([a-z]+)/` \| ([^|]+) \|", _text("docs/design.md"), re.MULTILINE)
    assert len(rows) >= 8, rows
    for package, cell in rows:
        listed = set(re.findall(r"`([a-z0-9_]+)`", cell))
        present = {p.stem for p in (ROOT / "tierfs" / package).glob("*.py")} - {"__init__"}
        assert listed == present, f"tierfs/{package}: table {sorted(listed)}, tree {sorted(present)}"
