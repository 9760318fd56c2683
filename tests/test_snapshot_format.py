"""The snapshot manifest without servers: the format round trip, checks, the bounded-memory
sort, directories the keys imply, and the namespace's shadowing and lookups (docs/snapshots.md)."""

from __future__ import annotations

import contextlib
import io
import random
from pathlib import Path

import pytest
import trio

from tierfs.errors import NotFound
from tierfs.meta.view import DirectoryCursors
from tierfs.snapshot import manifest as manifest_module
from tierfs.snapshot.build import TreeBuilder, rows_from_mountpoint_csv
from tierfs.snapshot.format import KEY, PARENT, Footer, ManifestError, ManifestWriter, Row, new_row
from tierfs.snapshot.manifest import Manifest, PageMissing
from tierfs.snapshot.namespace import IMMUTABLE_TIMEOUT, Defaults, SnapshotNamespace
from tierfs.snapshot.sorter import sorted_rows

KEYS = ["a", "a-x", "a/b/c", "a/b/d", "a/e", "a/z/", "b", "b/x", "c"]


def build(keys: list[str], page_entries: int = 3) -> bytes:
    out = io.BytesIO()
    writer = ManifestWriter(out, Footer("bkt", "p/", "n", 1, False, "test"), page_entries=page_entries)
    tree = TreeBuilder(writer)
    for key in keys:
        tree.add(new_row(key, size=len(key), etag=f"e-{key}"))
    writer.finish()
    return out.getvalue()


def opened(data: bytes, local: Path | None = None) -> Manifest:
    return Manifest(len(data), lambda offset, length: data[offset : offset + length], local)


async def inline(fn: object, *args: object) -> object:
    return fn(*args)  # type: ignore[operator]


def test_round_trip_implies_directories_and_parents() -> None:
    manifest = opened(build(KEYS))
    rows = [row for _, row in manifest.rows()]
    assert [r[KEY] for r in rows] == [
        "a",
        "a-x",
        "a/",
        "a/b/",
        "a/b/c",
        "a/b/d",
        "a/e",
        "a/z/",
        "b",
        "b/",
        "b/x",
        "c",
    ]
    by_key = {r[KEY]: r for r in rows}
    assert by_key["a/b/c"][PARENT] == 3 and by_key["a/b/"][PARENT] == 2 and by_key["a/"][PARENT] == -1
    assert manifest.footer.files == 8 and manifest.footer.dirs == 4 and manifest.footer.total_bytes == 22


def test_namespace_lookups_listings_and_shadowing() -> None:
    ns = SnapshotNamespace(opened(build(KEYS)), "p/", Defaults(7, 8, 0o640, 0o750), inline)

    async def check() -> None:
        await ns.ensure_listed(1)
        assert sorted(name for name, _ in ns.children(1)) == ["a", "a-x", "b", "c"]  # files a and b shadowed
        a = await ns.lookup(1, "a")
        assert a.is_dir and a.key == "p/a/" and (a.uid, a.gid, a.mode & 0o777) == (7, 8, 0o750)
        await ns.ensure_listed(a.ino)
        assert sorted(name for name, _ in ns.children(a.ino)) == ["b", "e", "z"]
        c = await ns.lookup((await ns.lookup(a.ino, "b")).ino, "c")
        assert (c.key, c.etag, c.size) == ("p/a/b/c", "e-a/b/c", 5)
        assert ns.get(c.ino) == c and ns.get(c.parent) is not None and ns.get(c.parent).name == "b"  # type: ignore[union-attr]
        with pytest.raises(NotFound):
            await ns.lookup(1, "nope")
        with pytest.raises(NotFound):
            await ns.lookup(1, "..")
        walked = [rel async for rel, _ in ns.walk(a)]
        assert walked == ["b", "b/c", "b/d", "e", "z"]

    trio.run(check)


def test_pages_come_from_the_local_copy_and_holes_are_misses(tmp_path: Path) -> None:
    keys = [f"d{i // 10:02d}/f{i:04d}" for i in range(200)]
    data = build(keys, page_entries=8) + b""
    big = data
    local = tmp_path / "copy.tsnap"
    manifest = Manifest(len(big), lambda o, n: big[o : o + n], local)  # small: fetched whole, all checked
    assert manifest.local_pages == len(manifest.footer.pages)
    reader = Manifest(len(big), None, local)  # another process: local only
    assert reader.find("d03/f0031") is not None
    end = manifest.footer.pages[-1].offset + manifest.footer.pages[-1].length
    local.write_bytes(b"\0" * end + big[end:])  # pages gone, footer kept
    cold = Manifest(len(big), None, local)
    with pytest.raises(PageMissing):
        cold.find("d03/f0031")


@pytest.mark.parametrize("cut", ["truncated", "flipped-page", "flipped-footer"])
def test_damaged_manifests_are_refused(cut: str) -> None:
    data = bytearray(build(KEYS))
    if cut == "truncated":
        data = data[: len(data) - 10]
    elif cut == "flipped-page":
        data[5] ^= 1
    else:
        data[len(data) - 40] ^= 1
    with pytest.raises(ManifestError):
        opened(bytes(data))


def test_unsorted_input_is_sorted_in_bounded_runs_and_conflicts_refused(tmp_path: Path) -> None:
    keys = [f"k{i:05d}" for i in range(1000)]
    shuffled = keys[:]
    random.Random(3).shuffle(shuffled)
    rows: list[Row] = [new_row(k, size=1) for k in shuffled] + [new_row("k00007", size=1)]  # one exact repeat
    assert [r[KEY] for r in sorted_rows(rows, run_rows=64, tmpdir=str(tmp_path))] == keys
    with pytest.raises(ManifestError, match="listed twice"):
        list(sorted_rows([new_row("x", size=1), new_row("x", size=2)], run_rows=1, tmpdir=str(tmp_path)))


def test_mountpoint_csv_rows() -> None:
    text = io.StringIO('key,etag,size\np/a.txt,"\\"abc\\"",12\n"p/with,comma",def,3,crc\n')
    rows = list(rows_from_mountpoint_csv(text, "p/"))
    assert [(r[KEY], r[2]) for r in rows] == [("a.txt", 12), ("with,comma", 3)]
    with pytest.raises(ManifestError, match="not below the prefix"):
        list(rows_from_mountpoint_csv(io.StringIO("q/x,e,1\n"), "p/"))


def test_fill_fetches_the_missing_pages_in_few_gets(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(manifest_module, "EAGER_BYTES", 0)  # as if it were large: pages on demand
    monkeypatch.setattr(manifest_module, "TAIL_BYTES", 64)  # and its first GET held the trailer only
    data = build([f"d{i // 10:02d}/f{i:04d}" for i in range(300)], page_entries=8)
    gets: list[tuple[int, int]] = []

    def fetch(offset: int, length: int) -> bytes:
        gets.append((offset, length))
        return data[offset : offset + length]

    manifest = Manifest(len(data), fetch, tmp_path / "m.tsnap")
    assert manifest.local_pages == 0
    manifest.row(5, fetch=True)  # one page on demand
    gets.clear()
    manifest.fill(chunk_bytes=len(data) // 3)
    assert manifest.local_pages == len(manifest.footer.pages)
    assert 2 <= len(gets) <= 5  # a few ranged GETs, not one per page
    again = Manifest(len(data), fetch, tmp_path / "m.tsnap")  # a remount: the local copy is kept
    gets.clear()
    again.fill()
    assert gets == [] and [r[KEY] for _, r in again.rows(fetch=False)] == [r[KEY] for _, r in manifest.rows()]


def cursor_walk(ns: SnapshotNamespace, ino: int) -> list[tuple[str, int]]:
    """(name, ino) of a directory read as the FUSE adapter reads it: one entry per call, resumed
    from the cursor the previous call returned, decoded pages only (a missing one loaded first)."""
    out: list[tuple[str, int]] = []
    cursor = 0
    node = ns.record(ino, fetch=True)
    assert node is not None
    for _ in range(10_000):  # bounded: a livelock fails the test instead of hanging it
        try:
            step = next(ns.rows_of(ino, cursor, dir_key=ns.dir_key_of(node), decoded_only=True), None)
        except PageMissing as missing:
            ns.manifest.page(missing.index, fetch=True)
            continue
        if step is None:
            return out
        ordinal, _, cursor = step
        key = ns.manifest.row(ordinal)[KEY]
        out.append((key.rstrip("/").rsplit("/", 1)[-1], ordinal + 2))
    raise AssertionError("the cursor made no progress")


def test_readdir_cursor_resumes_across_pages_with_every_entry_once(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(manifest_module, "DECODED_PAGES", 3)  # pages come and go during the walk
    keys = [f"big/f{i:03d}" for i in range(60)] + ["big/f010/x", "big/f011.bak", "big/sub/a", "big/sub/b"]
    keys += ["big/z.txt", "top"]
    ns = SnapshotNamespace(
        opened(build(sorted(keys), page_entries=4)), "", Defaults(0, 0, 0o644, 0o755), inline
    )
    root = cursor_walk(ns, 1)
    assert sorted(name for name, _ in root) == ["big", "top"]
    big = dict(root)["big"]
    listed = cursor_walk(ns, big)
    names = [name for name, _ in listed]
    # f010 is a file and a directory: the directory shadows it; sub's run is skipped, not listed.
    expected = sorted({f"f{i:03d}" for i in range(60)} | {"f011.bak", "sub", "z.txt"})
    assert sorted(names) == expected and len(names) == len(set(names))
    assert ns.counters.shadowed_keys == 1
    for name, ino in listed:  # each number is the entry the name says
        node = ns.record(ino, fetch=True)
        assert node is not None and node.name == name and node.parent == big
    assert sorted(name for name, _ in cursor_walk(ns, dict(listed)["sub"])) == ["a", "b"]
    assert list(ns.rows_of(dict(listed)["z.txt"], fetch=True)) == []  # not a directory: nothing


def test_decoded_only_never_decodes_and_scans_keep_the_kept_pages(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(manifest_module, "DECODED_PAGES", 2)
    manifest = opened(build([f"k{i:03d}" for i in range(40)], page_entries=4))
    with pytest.raises(PageMissing):
        manifest.row(0, decoded_only=True)  # a page not on the heap: the caller decodes it off the loop
    first = manifest.page(0, fetch=False)
    assert manifest.row(0, decoded_only=True) is first[0]
    assert len(list(manifest.local_rows())) == 40  # the usage count's scan of every page
    assert manifest.decoded(0) is first and manifest.decoded(5) is None  # nothing of it kept


def test_read_from_resumes_at_every_kernel_offset(monkeypatch: pytest.MonkeyPatch) -> None:
    """The file system's readdir of a snapshot (``DirectoryCursors.read_from``): the kernel takes
    one entry per READDIR and comes back with the offset it was given, pages come and go
    between calls (3 kept), and a missing page is decoded through ``run_blocking``."""
    monkeypatch.setattr(manifest_module, "DECODED_PAGES", 3)
    keys = sorted([f"d/f{i:03d}" for i in range(30)] + ["d/f004/x", "d/sub/a", "e"])
    ns = SnapshotNamespace(opened(build(keys, page_entries=4)), "", Defaults(0, 0, 0o644, 0o755), inline)
    assert isinstance(ns, DirectoryCursors) and ns.kernel_timeout == IMMUTABLE_TIMEOUT

    async def one_at_a_time(ino: int, dir_key: str) -> list[tuple[str, int]]:
        out: list[tuple[str, int]] = []
        cursor = 0
        for _ in range(1000):  # bounded: no progress fails the test instead of hanging it
            async with contextlib.aclosing(ns.read_from(ino, dir_key, cursor)) as entries:
                step = await anext(entries, None)
            if step is None:
                return out
            name, node, cursor = step
            assert node.name == name and node.parent == ino
            out.append((name, node.ino))
        raise AssertionError("the cursor made no progress")

    async def check() -> None:
        d = await ns.lookup(1, "d")
        listed = await one_at_a_time(d.ino, ns.dir_key_of(d))
        expected = sorted({f"f{i:03d}" for i in range(30)} | {"sub"})  # the directory f004/ shadows the file
        assert sorted(name for name, _ in listed) == expected and len(listed) == len(expected)
        assert dict(listed)["f004"] == (await ns.lookup(d.ino, "f004")).ino
        whole = [(name, node.ino) async for name, node, _ in ns.read_from(d.ino, ns.dir_key_of(d), 0)]
        assert whole == listed

    trio.run(check)
