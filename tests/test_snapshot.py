"""Dataset versions (issue 22) on real servers and real mounts: snapshots, pinned reads,
``--as-of``, zero LISTs counted at the server, shared cache blocks, bad input, imports and the
direct reader on a snapshot mount (docs/snapshots.md)."""

from __future__ import annotations

import errno
import os
import re
import subprocess
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest
from mounting import Mounter, run_tierfs, tierfs_ok, wait_until

from tierfs.reader import Reader
from tools.servers import MotoS3, SeaweedFS, free_port, s3_client

pytestmark = pytest.mark.fuse

BEFORE = {
    "a.txt": b"alpha v1\n" * 100,
    "d/b.bin": os.urandom(300_000),
    "d/e/c.txt": b"gamma stays\n" * 50,
    "d/e/same.bin": os.urandom(2_500_000),  # several blocks, unchanged in every version
}


def put_all(client: object, bucket: str, prefix: str, files: dict[str, bytes]) -> None:
    for rel, body in files.items():
        client.put_object(Bucket=bucket, Key=prefix + rel, Body=body)  # type: ignore[attr-defined]


def tree(root: Path) -> dict[str, bytes | None]:
    """Every file under ``root`` with its bytes (None: the read failed with EIO)."""
    out: dict[str, bytes | None] = {}
    for directory, _, files in os.walk(root):
        for name in files:
            path = Path(directory, name)
            try:
                out[str(path.relative_to(root))] = path.read_bytes()
            except OSError as exc:
                assert exc.errno == errno.EIO, exc
                out[str(path.relative_to(root))] = None
    return out


def snap(server: MotoS3 | SeaweedFS, *args: str) -> subprocess.CompletedProcess[str]:
    return run_tierfs("snapshot", *args, "--endpoint-url", server.endpoint_url)


def change_bucket(client: object, bucket: str) -> None:
    """Overwrite one object, delete one, add one."""
    client.put_object(Bucket=bucket, Key="data/a.txt", Body=b"alpha v2 NEW\n")  # type: ignore[attr-defined]
    client.delete_object(Bucket=bucket, Key="data/d/b.bin")  # type: ignore[attr-defined]
    client.put_object(Bucket=bucket, Key="data/new.txt", Body=b"added later")  # type: ignore[attr-defined]


def versioned_bucket(server: MotoS3 | SeaweedFS, bucket: Callable[..., str]) -> tuple[object, str]:
    name = bucket(server)
    client = s3_client(server.endpoint_url)
    client.put_bucket_versioning(Bucket=name, VersioningConfiguration={"Status": "Enabled"})
    return client, name


def snapshot_then_change(server: MotoS3 | SeaweedFS, bucket: Callable[..., str]) -> tuple[object, str]:
    """A versioned bucket holding BEFORE under data/, snapshot v1 of it, then change_bucket."""
    client, name = versioned_bucket(server, bucket)
    put_all(client, name, "data/", BEFORE)
    assert snap(server, "create", f"s3://{name}/data", "v1").returncode == 0
    change_bucket(client, name)
    return client, name


def unversioned_snapshot(moto: MotoS3, bucket: Callable[..., str]) -> tuple[object, str]:
    """A moto bucket (no versioning) holding BEFORE under data/, and its snapshot v1."""
    name = bucket(moto)
    client = s3_client(moto.endpoint_url)
    put_all(client, name, "data/", BEFORE)
    assert snap(moto, "create", f"s3://{name}/data", "v1").returncode == 0
    return client, name


def test_snapshot_of_a_versioned_bucket_serves_the_old_bytes_with_zero_lists(
    seaweed: SeaweedFS, bucket: Callable[..., str], mounter: Mounter
) -> None:
    _, name = snapshot_then_change(seaweed, bucket)
    listed = snap(seaweed, "list", f"s3://{name}/data")
    assert listed.stdout.split("\t")[0] == "v1", listed
    lists_before = seaweed.request_count(name, "LIST")
    mount = mounter(f"s3://{name}/data", "--snapshot", "v1")
    tierfs_ok("prefetch", str(mount.path / "d"), "--recursive")  # pinned through the control socket
    gets = seaweed.request_count(name, "GET")
    assert tree(mount.path) == BEFORE  # old bytes, the deleted object, not the added one
    assert seaweed.request_count(name, "GET") - gets == 1  # only a.txt was not prefetched
    os.stat(mount.path / "d" / "e" / "c.txt")
    assert not (mount.path / "new.txt").exists()
    with pytest.raises(OSError) as refused:
        (mount.path / "x.txt").write_bytes(b"no")
    assert refused.value.errno == errno.EROFS
    with pytest.raises(OSError) as refused:
        os.unlink(mount.path / "a.txt")
    assert refused.value.errno == errno.EROFS
    status = mount.status()
    assert status["snapshot"]["name"] == "v1" and status["snapshot"]["versioned"] is True
    assert status["snapshot"]["files"] == len(BEFORE)
    assert status["s3_list_requests"] == 0
    mount.umount()
    assert seaweed.request_count(name, "LIST") == lists_before, "a snapshot mount listed the bucket"


def test_unversioned_snapshot_gives_eio_for_changed_objects_never_new_bytes(
    moto: MotoS3, bucket: Callable[..., str], mounter: Mounter
) -> None:
    client, name = unversioned_snapshot(moto, bucket)
    change_bucket(client, name)
    mount = mounter(f"s3://{name}/data", "--snapshot", "v1", endpoint_url=moto.endpoint_url)
    seen = tree(mount.path)
    assert set(seen) == set(BEFORE)
    assert seen["a.txt"] is None  # overwritten: EIO, never the new bytes
    assert seen["d/b.bin"] is None  # deleted
    assert seen["d/e/c.txt"] == BEFORE["d/e/c.txt"]
    assert seen["d/e/same.bin"] == BEFORE["d/e/same.bin"]
    mount.umount()
    assert "data/a.txt" in mount.log_text()  # the log line names the key that changed


def test_as_of_reproduces_the_tree_with_delete_markers(
    seaweed: SeaweedFS, bucket: Callable[..., str], mounter: Mounter
) -> None:
    client, name = versioned_bucket(seaweed, bucket)
    put_all(client, name, "data/", {**BEFORE, "gone-early.txt": b"deleted before T"})
    client.delete_object(Bucket=name, Key="data/gone-early.txt")  # type: ignore[attr-defined]
    time.sleep(1.2)  # LastModified has whole seconds
    when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    time.sleep(1.2)
    change_bucket(client, name)
    mount = mounter(f"s3://{name}/data", "--as-of", when)
    assert tree(mount.path) == BEFORE
    mount.umount()
    assert not list((mount.cache_dir / "snapshots").glob("as-of-*"))  # its own manifest went with it
    made = snap(seaweed, "create", f"s3://{name}/data", "t0", "--as-of", when)
    assert made.returncode == 0, made.stderr
    again = mounter(f"s3://{name}/data", "-o", "snapshot=t0")
    assert tree(again.path) == BEFORE


def test_two_snapshots_share_cached_blocks(
    seaweed: SeaweedFS, bucket: Callable[..., str], mounter: Mounter
) -> None:
    _, name = snapshot_then_change(seaweed, bucket)
    assert snap(seaweed, "create", f"s3://{name}/data", "v2").returncode == 0
    first = mounter(f"s3://{name}/data", "--snapshot", "v1")
    assert (first.path / "d/e/same.bin").read_bytes() == BEFORE["d/e/same.bin"]
    cache = first.cache_dir
    first.umount()
    shown = tierfs_ok(
        "snapshot", "show", f"s3://{name}/data", "v2", "--json", "--cache-dir", str(cache),
        "--endpoint-url", seaweed.endpoint_url,
    )  # fmt: skip
    assert shown["cached_bytes"] == len(BEFORE["d/e/same.bin"])
    port = free_port()
    second = mounter(
        f"s3://{name}/data", "--snapshot", "v2", "--metrics-addr", f"127.0.0.1:{port}", cache_dir=cache
    )
    gets = seaweed.request_count(name, "GET")
    assert (second.path / "d/e/same.bin").read_bytes() == BEFORE["d/e/same.bin"]
    assert seaweed.request_count(name, "GET") == gets, "the shared object was fetched again"
    assert (second.path / "a.txt").read_bytes() == b"alpha v2 NEW\n"
    status = second.status()["snapshot"]
    assert status["name"] == "v2" and status["hits"] > 0
    assert status["files"] == len(BEFORE)  # one deleted, one added since v1
    wait_until(
        lambda: second.status()["snapshot"].get("cached_bytes", 0) >= len(BEFORE["d/e/same.bin"]),
        30,
        "status counts the snapshot's cached bytes",
    )
    assert second.status()["snapshot"]["last_use"] is not None
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        scraped = response.read().decode()
    assert re.search(r'tierfs_snapshot_hits\{snapshot="v2"\} [1-9]', scraped), scraped


def test_bad_input_is_refused_with_nothing_mounted(
    moto: MotoS3, bucket: Callable[..., str], tmp_path: Path
) -> None:
    name = bucket(moto)
    client = s3_client(moto.endpoint_url)
    put_all(client, name, "data/", BEFORE)
    put_all(client, name, "other/", {"x": b"x"})
    assert snap(moto, "create", f"s3://{name}/data", "v1").returncode == 0
    manifest = client.get_object(Bucket=name, Key=".tierfs/snapshots/data/v1.tsnap")["Body"].read()
    corrupt = bytearray(manifest)
    corrupt[10] ^= 0xFF  # inside the first page
    client.put_object(Bucket=name, Key="m/corrupt.tsnap", Body=bytes(corrupt))
    client.put_object(Bucket=name, Key="m/truncated.tsnap", Body=manifest[: len(manifest) // 2])
    mnt = tmp_path / "mnt"
    mnt.mkdir()

    def refused(source: str, *args: str) -> str:
        cache = tmp_path / source.rsplit("/", 1)[-1]  # a cache dir belongs to one source
        result = run_tierfs(
            "mount", source, str(mnt), "--endpoint-url", moto.endpoint_url, "--cache-dir", str(cache), *args
        )
        assert result.returncode != 0, result
        assert not os.path.ismount(mnt) and not os.listdir(mnt)
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1, result.stderr
        return lines[0]

    assert "corrupt" in refused(f"s3://{name}/data", "--snapshot", f"s3://{name}/m/corrupt.tsnap")
    assert "truncated" in refused(f"s3://{name}/data", "--snapshot", f"s3://{name}/m/truncated.tsnap")
    assert "not of" in refused(
        f"s3://{name}/other", "--snapshot", f"s3://{name}/.tierfs/snapshots/data/v1.tsnap"
    )
    assert "no snapshot named 'nope'" in refused(f"s3://{name}/data", "--snapshot", "nope")
    assert "versioned bucket" in refused(f"s3://{name}/data", "--as-of", "2026-01-01T00:00:00Z")
    assert (
        "versioned bucket" in snap(moto, "create", f"s3://{name}/data", "t", "--as-of", "2026-01-01").stderr
    )
    # A key list naming keys S3 or SeaweedFS would refuse or rename: refused whole, nothing written.
    for bad in ("data/a/../b", "data/a//b", "data/" + "k" * 1100):
        keys = tmp_path / "keys.txt"
        keys.write_text(f"data/a.txt\n{bad}\n")
        result = snap(moto, "import", f"s3://{name}/data", "bad", str(keys), "--format", "keys")
        assert result.returncode != 0 and "would be refused" in result.stderr, result.stderr
    assert snap(moto, "list", f"s3://{name}/data").stdout.split()[0] == "v1"
    assert "bad" not in snap(moto, "list", f"s3://{name}/data").stdout
    # A manifest crafted with such a key (written past the importer's check) is refused at mount.
    from tierfs.snapshot.format import Footer, ManifestWriter, new_row

    crafted = tmp_path / "crafted.tsnap"
    with crafted.open("wb") as out:
        writer = ManifestWriter(out, Footer(name, "data/", "x", 1, False, "test"))
        writer.add(new_row("a/../b", size=1, etag="e"))
        writer.finish()
    assert "S3 would refuse" in refused(f"s3://{name}/data", "--snapshot", str(crafted))
    assert snap(moto, "create", f"s3://{name}/data", "v1").returncode != 0  # immutable


def test_imports_of_key_lists_and_mountpoint_csv(
    moto: MotoS3, bucket: Callable[..., str], mounter: Mounter, tmp_path: Path
) -> None:
    name = bucket(moto)
    client = s3_client(moto.endpoint_url)
    put_all(client, name, "data/", BEFORE)
    keys = tmp_path / "keys.txt"
    keys.write_text("# two of them\ndata/d/e/c.txt\ndata/a.txt\n")
    assert snap(moto, "import", f"s3://{name}/data", "k", str(keys), "--format", "keys").returncode == 0
    etag = client.head_object(Bucket=name, Key="data/d/b.bin")["ETag"]
    csv = tmp_path / "m.csv"
    csv.write_text(
        f'data/d/b.bin,{etag},{len(BEFORE["d/b.bin"])}\n"data/d/e/c.txt",x,{len(BEFORE["d/e/c.txt"])}\n'
    )
    assert (
        snap(moto, "import", f"s3://{name}/data", "c", str(csv), "--format", "mountpoint-csv").returncode == 0
    )
    mount = mounter(f"s3://{name}/data", "--snapshot", "k", endpoint_url=moto.endpoint_url)
    assert tree(mount.path) == {"a.txt": BEFORE["a.txt"], "d/e/c.txt": BEFORE["d/e/c.txt"]}
    mount.umount()
    other = mounter(f"s3://{name}/data", "--snapshot", "c", endpoint_url=moto.endpoint_url)
    # The CSV's second ETag is wrong on purpose: that file is EIO, never bytes of another version.
    assert tree(other.path) == {"d/b.bin": BEFORE["d/b.bin"], "d/e/c.txt": None}


def test_direct_reader_on_a_snapshot_mount(
    moto: MotoS3, bucket: Callable[..., str], mounter: Mounter
) -> None:
    _, name = unversioned_snapshot(moto, bucket)
    mount = mounter(f"s3://{name}/data", "--snapshot", "v1", endpoint_url=moto.endpoint_url)
    path = mount.path / "d/e/same.bin"
    assert path.read_bytes() == BEFORE["d/e/same.bin"]  # warms the cache through the mount
    deadline = time.monotonic() + 30
    while not (mount.cache_dir / "reader.json").exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    time.sleep(6)  # one maintenance pass publishes the snapshot's manifest copy
    r = Reader()
    with r.open(path) as f:
        assert f.read() == BEFORE["d/e/same.bin"]
    assert r.stats()["direct_bytes"] == len(BEFORE["d/e/same.bin"]), r.stats()


def test_snapshot_of_a_mounted_path_flushes_and_keeps_owners_and_modes(
    seaweed: SeaweedFS, bucket: Callable[..., str], mounter: Mounter
) -> None:
    name = bucket(seaweed)
    live = mounter(f"s3://{name}", "--writeback-delay", "60")
    (live.path / "sub" / "deep").mkdir(parents=True)
    (live.path / "sub" / "deep" / "f.bin").write_bytes(b"written through the mount")
    os.chmod(live.path / "sub" / "deep" / "f.bin", 0o600)
    os.chown(live.path / "sub" / "deep" / "f.bin", 1234, 5678)
    os.symlink("deep/f.bin", live.path / "sub" / "link")
    made = snap(seaweed, "create", str(live.path / "sub"), "v1")  # flushes the pending uploads first
    assert made.returncode == 0, made.stderr
    assert sorted(os.listdir(live.path)) == ["sub"]  # the bucket's .tierfs/ is never shown
    pinned = mounter(f"s3://{name}/sub", "--snapshot", "v1")
    st = os.lstat(pinned.path / "deep" / "f.bin")
    assert (st.st_mode & 0o7777, st.st_uid, st.st_gid) == (0o600, 1234, 5678)
    assert (pinned.path / "deep" / "f.bin").read_bytes() == b"written through the mount"
    assert os.readlink(pinned.path / "link") == "deep/f.bin"


def test_cache_max_age_ages_out_a_snapshot_nobody_reads(
    moto: MotoS3, bucket: Callable[..., str], mounter: Mounter
) -> None:
    """The chunk cache's age-out covers snapshot blocks: they are ordinary blocks, aged by access time."""
    _, name = unversioned_snapshot(moto, bucket)
    mount = mounter(
        f"s3://{name}/data", "--snapshot", "v1", "--cache-max-age", "3s", endpoint_url=moto.endpoint_url
    )
    assert (mount.path / "d/e/same.bin").read_bytes() == BEFORE["d/e/same.bin"]
    assert mount.status()["chunks_cached"] >= 3
    wait_until(lambda: mount.status()["chunks_cached"] == 0, 60, "unread snapshot blocks aged out")
    assert (mount.path / "d/e/same.bin").read_bytes() == BEFORE["d/e/same.bin"]  # and read again from S3


def test_a_directory_of_several_manifest_pages_lists_every_entry_once(
    moto: MotoS3, bucket: Callable[..., str], mounter: Mounter, tmp_path: Path
) -> None:
    """readdir from manifest cursors (docs/snapshots.md "Listing at scale"): 2,600 entries in one
    directory span three pages and many readdir calls, each resumed at the kernel's offset."""
    name = bucket(moto)
    files = {f"big/f{i:05d}.jpg": 1000 + i for i in range(2600)}
    files |= {"big/f00007.jpg/inner": 5, "big/sub/x": 6, "big/z": 7}  # a directory shadowing a file
    csv = tmp_path / "m.csv"
    csv.write_text("".join(f"data/{key},etag-{size},{size}\n" for key, size in files.items()))
    assert (
        snap(moto, "import", f"s3://{name}/data", "big", str(csv), "--format", "mountpoint-csv").returncode
        == 0
    )
    mount = mounter(f"s3://{name}/data", "--snapshot", "big", endpoint_url=moto.endpoint_url)
    listed = os.listdir(mount.path / "big")
    expected = {key.split("/")[1] for key in files}
    assert len(listed) == len(expected) and set(listed) == expected
    with os.scandir(mount.path / "big") as entries:
        sizes = {
            e.name: e.stat(follow_symlinks=False).st_size for e in entries if e.is_file(follow_symlinks=False)
        }
    shown = {key.split("/")[1]: size for key, size in files.items() if key.count("/") == 1}
    del shown["f00007.jpg"]  # the directory f00007.jpg/ shadows the file
    assert sizes == shown and (mount.path / "big/f00007.jpg").is_dir()
    walked = subprocess.run(
        ["find", str(mount.path)], capture_output=True, check=True, text=True
    ).stdout.split()
    assert len(walked) == len(set(walked)) == 1 + 1 + len(expected) + 2  # root, big/, its entries, inner, x
