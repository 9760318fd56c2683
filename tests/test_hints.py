"""Loaders that say what comes next (issue 21), on real mounts against moto.

A hint stream (``tierfs.reader.prefetch``, the datasets' ``HintedSampler``) hands the daemon the
order files will be read in; the daemon's look-ahead (``tierfs.control.lookahead``) fetches them
ahead of the reader, bounded by a window and by the cache; the direct reader's misses have the
daemon fetch the file whole. Each test checks the bytes against the bucket and counts GETs in
the daemon's status, so it shows the path it means to exercise was the one taken.
"""

from __future__ import annotations

import random
import subprocess
import urllib.request
from collections.abc import Callable
from typing import Any

import pytest
from mounting import Mounter, run_tierfs, wait_until
from readerkit import Loaded, MiB, load, sample_files

from tierfs import reader
from tierfs.control.registry import lookup
from tierfs.reader import Reader
from tierfs.reader.datasets import FileDataset
from tierfs.reader.hints import call
from tools.servers import MotoS3, free_port, s3_client

pytestmark = pytest.mark.fuse


def gets(loaded: Loaded) -> int:
    return int(loaded.status()["s3_get_requests"])


def hint_op(loaded: Loaded, args: dict[str, Any]) -> Any:
    record = lookup(str(loaded.mount.path))
    assert record is not None
    return call(str(record["socket"]), "hint", args)


def settled(loaded: Loaded, count: int) -> Callable[[], bool]:
    """Until the look-ahead has dealt with ``count`` hints one way or another."""

    def check() -> bool:
        s = loaded.status()
        done = s["hints_fetched"] + s["hints_missing"] + s["hints_already_cached"] + s["hints_skipped_full"]
        return bool(done >= count and s["hints_ahead_bytes"] >= 0)

    return check


@pytest.fixture
def loaded(moto: MotoS3, bucket: Callable[..., str], mounter: Mounter) -> Loaded:
    return load(moto, bucket, mounter, sample_files(40, 110 * 1024), "--metadata-ttl", "2")


def test_a_hinted_epoch_is_read_from_the_cache(loaded: Loaded) -> None:
    order = list(loaded.files)
    random.Random(3).shuffle(order)
    paths = [loaded.path(rel) for rel in order]
    with reader.prefetch(paths) as stream:
        wait_until(settled(loaded, len(paths)), 30, "the hinted files fetched")
        before = gets(loaded)
        status = loaded.status()
        assert status["hints_received"] == len(paths) and status["hints_fetched"] == len(paths)
        r = Reader()
        for n, (rel, path) in enumerate(zip(order, paths, strict=True)):
            stream.advance(n)
            with r.open(path) as f:
                assert f.read() == loaded.files[rel]
    assert gets(loaded) == before, "reads after the hints cost no GET"
    stats = r.stats()
    assert stats["fallbacks"] == {} and stats["miss_fetches"] == 0
    assert stream.error is None and stream.sent == len(paths)


def test_the_sampler_hints_each_epoch_in_its_order(loaded: Loaded) -> None:
    ds = FileDataset(str(loaded.mount.path / "train"))
    sampler = ds.sampler(shuffle=True, seed=5)
    r = Reader()
    seen = []
    for index in sampler:  # the main process's side of a DataLoader
        if not seen:
            wait_until(settled(loaded, len(ds)), 30, "the epoch's files fetched")
            before = gets(loaded)
        seen.append(index)
        with r.open(ds.files[index]) as f:
            assert f.read() == loaded.files[f"train/{ds.files[index].rsplit('/', 1)[1]}"]
    assert sorted(seen) == list(range(len(ds))) and seen != sorted(seen)
    assert gets(loaded) == before and r.stats()["fallbacks"] == {}
    assert loaded.status()["hints_received"] == len(ds)


def test_hints_for_deleted_or_changed_objects_never_serve_stale_bytes(loaded: Loaded) -> None:
    s3 = s3_client(loaded.endpoint)
    changed, deleted, fetched_then_changed = "train/0001.bin", "train/0002.bin", "train/0003.bin"
    # One file is fetched by a hint, and changes in the bucket afterwards.
    hint_op(loaded, {"stream": "a", "paths": [fetched_then_changed], "start": 0})
    wait_until(settled(loaded, 1), 30, "the first hint fetched")
    new = {changed: b"new bytes of 0001", fetched_then_changed: b"new bytes of 0003"}
    for key, body in new.items():
        s3.put_object(Bucket=loaded.bucket, Key=key, Body=body)
    s3.delete_object(Bucket=loaded.bucket, Key=deleted)
    assert run_tierfs("refresh", str(loaded.mount.path / "train")).returncode == 0
    hint_op(loaded, {"stream": "b", "paths": [changed, deleted, fetched_then_changed], "start": 0})
    wait_until(settled(loaded, 4), 30, "the second hints dealt with")
    assert loaded.status()["hints_missing"] == 1
    r = Reader()
    for key, body in new.items():
        with r.open(loaded.path(key)) as f:
            assert f.read() == body
    with pytest.raises(FileNotFoundError):
        r.open(loaded.path(deleted))


def test_hints_beyond_the_cache_size_keep_pinned_blocks_and_never_thrash(
    moto: MotoS3, bucket: Callable[..., str], mounter: Mounter
) -> None:
    rng = random.Random(9)
    files = {f"big/{i:02d}.bin": rng.randbytes(MiB + 1000) for i in range(24)}
    files["pinned.bin"] = rng.randbytes(3 * MiB)
    loaded = load(moto, bucket, mounter, files, "--cache-size", "16M", "--cache-min-free", "0")
    assert run_tierfs("pin", loaded.path("pinned.bin")).returncode == 0
    assert run_tierfs("prefetch", loaded.path("pinned.bin")).returncode == 0
    pinned_bytes = loaded.status()["pinned_bytes"]
    assert pinned_bytes > 3 * MiB
    order = [f"big/{i:02d}.bin" for i in range(24)]  # 24 MiB of hints for a 16 MiB cache
    stream = reader.prefetch(loaded.path(rel) for rel in order)
    # Nobody reads yet: the look-ahead stops at its budget, half of what the cache holds besides pins.
    budget = (16 * MiB * 0.9 - pinned_bytes) / 2
    wait_until(lambda: loaded.status()["hints_fetched"] >= 1, 30, "the look-ahead started")
    wait_until(lambda: loaded.status()["hints_queued"] < 24, 30, "hints taken")
    status = loaded.status()
    assert status["hints_ahead_bytes"] <= budget + 2 * MiB and status["hints_fetched"] < 24
    r = Reader()
    for n, rel in enumerate(order):
        stream.advance(n)
        with r.open(loaded.path(rel)) as f:
            assert f.read() == loaded.files[rel]
        assert loaded.status()["hints_ahead_bytes"] <= budget + 2 * MiB
    stream.close()
    status = loaded.status()
    assert status["pinned_bytes"] == pinned_bytes, "the pinned file lost blocks"
    assert status["cache_bytes_on_disk"] <= 16 * MiB
    # No thrash: every file came from S3 once (by a hint or by a reader's miss), never twice.
    assert status["s3_get_requests"] <= 1 + len(order) + 2  # the pin's prefetch, each file once
    stats = r.stats()  # a file the look-ahead had not reached yet was fetched for its miss, never via FUSE
    assert stats["fallbacks"].get("miss", 0) == stats["miss_fetches"] and set(stats["fallbacks"]) <= {"miss"}
    before = gets(loaded)
    with r.open(loaded.path("pinned.bin")) as f:
        assert f.read() == files["pinned.bin"]
    assert gets(loaded) == before, "the pinned file is still whole in the cache"


def test_hints_behind_the_reader_are_dropped(loaded: Loaded) -> None:
    order = list(loaded.files)
    # The reader is at 30 already when the paths arrive: only the last 10 are fetched.
    reply = hint_op(loaded, {"stream": "late", "paths": order, "start": 0, "position": 30})
    assert reply["accepted"] == len(order)
    wait_until(settled(loaded, 10), 30, "the hints ahead of the reader fetched")
    status = loaded.status()
    assert status["hints_dropped_behind"] == 30 and status["hints_fetched"] == 10
    # A position past everything queued drops the rest of a stream.
    hint_op(loaded, {"stream": "late", "position": 40})
    hint_op(loaded, {"stream": "late", "end": True})
    assert loaded.status()["hint_streams"] == 0


def test_a_direct_miss_in_a_multi_block_file_has_the_daemon_fetch_it_whole(
    moto: MotoS3, bucket: Callable[..., str], mounter: Mounter
) -> None:
    rng = random.Random(4)
    files = {f"multi/{i}.bin": rng.randbytes(2 * MiB + 777) for i in range(3)}
    files["small.bin"] = rng.randbytes(110 * 1024)
    loaded = load(moto, bucket, mounter, files)
    r = Reader()
    rels = sorted(k for k in files if k.startswith("multi/"))
    for rel in rels:
        with r.open(loaded.path(rel)) as f:
            assert f.read() == files[rel]
    stats = r.stats()
    # Each file missed once, the daemon fetched it whole, and all its blocks were then read direct.
    assert stats["miss_fetches"] == len(rels) and stats["fallbacks"] == {"miss": len(rels)}
    assert stats["direct_reads"] == 3 * len(rels)
    assert loaded.status()["hints_demand_fetches"] == len(rels)
    # A one-block file's miss is one read through the mount (cheaper than a round trip and a re-read).
    with r.open(loaded.path("small.bin")) as f:
        assert f.read() == files["small.bin"]
    assert r.stats()["miss_fetches"] == len(rels) and r.stats()["fallbacks"] == {"miss": len(rels) + 1}


def test_prefetch_from_a_list(loaded: Loaded, tmp_path: Any) -> None:
    rels = list(loaded.files)[:6]
    listing = tmp_path / "list.txt"
    # relative lines start from the PATH given; absolute ones stand; '#' lines and blanks are skipped
    absolute = [loaded.path(r) for r in rels[3:5]]
    listing.write_text("# a list\n" + "\n".join(rels[:3]) + "\n\n" + "\n".join(absolute))
    assert run_tierfs("prefetch", "--from", str(listing), str(loaded.mount.path)).returncode == 0
    stdin = subprocess.run(
        [*__import__("mounting").tierfs_command("prefetch", "--from", "-")],
        input=loaded.path(rels[5]) + "\n", capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert stdin.returncode == 0, stdin.stderr
    before = gets(loaded)
    r = Reader()
    for rel in rels:
        with r.open(loaded.path(rel)) as f:
            assert f.read() == loaded.files[rel]
    assert gets(loaded) == before and r.stats()["miss_fetches"] == 0


def test_prefetch_from_bad_input_fails_in_one_line(loaded: Loaded, tmp_path: Any) -> None:
    missing = run_tierfs("prefetch", "--from", str(tmp_path / "nope.txt"))
    outside = tmp_path / "outside.txt"
    outside.write_text(f"{loaded.path('train/0000.bin')}\n{tmp_path / 'elsewhere.bin'}\n")
    elsewhere = run_tierfs("prefetch", "--from", str(outside))
    gone = tmp_path / "gone.txt"
    gone.write_text("train/no-such-file.bin\n")
    absent = run_tierfs("prefetch", "--from", str(gone), str(loaded.mount.path))
    cases = ((missing, "nope.txt"), (elsewhere, "not on a tierfs mount"), (absent, "no-such-file"))
    for result, words in cases:
        assert result.returncode != 0
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and words in lines[0], result.stderr
    assert loaded.status()["s3_get_requests"] == 0, "nothing was fetched for a refused list"


def test_a_miss_on_a_version_that_changed_meanwhile_is_not_fetched(
    moto: MotoS3, bucket: Callable[..., str], mounter: Mounter
) -> None:
    rel = "multi.bin"  # two blocks: a miss asks the daemon
    loaded = load(moto, bucket, mounter, {rel: random.Random(6).randbytes(MiB + 4321)}, "--metadata-ttl", "2")
    r = Reader()
    f = r.open(loaded.path(rel), buffering=0)  # resolves the version it stands for: the old one
    s3_client(loaded.endpoint).put_object(Bucket=loaded.bucket, Key=rel, Body=b"the new version")
    assert run_tierfs("refresh", str(loaded.mount.path)).returncode == 0
    before = gets(loaded)
    with f:
        assert f.read() == b"the new version"  # nothing served yet: it switched wholly to the mount
    stats = r.stats()
    assert stats["miss_fetches"] == 0 and stats["fallbacks"].get("miss") == 1
    assert loaded.status()["hints_demand_fetches"] == 0, "the daemon fetched no old version"
    assert gets(loaded) - before == 1


def test_hint_counters_reach_prometheus(moto: MotoS3, bucket: Callable[..., str], mounter: Mounter) -> None:
    port = free_port()
    loaded = load(moto, bucket, mounter, sample_files(6, 20 * 1024), "--metrics-addr", f"127.0.0.1:{port}")
    hint_op(loaded, {"stream": "m", "paths": list(loaded.files), "start": 0, "position": 2})
    wait_until(settled(loaded, 4), 30, "the hints fetched")
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    lines = [line.rpartition(" ") for line in text.splitlines() if line and not line.startswith("#")]
    values = {name: float(value) for name, _, value in lines}
    assert values["tierfs_hints_received_total"] == 6 and values["tierfs_hints_fetched_total"] == 4
    assert values["tierfs_hints_dropped_behind_total"] == 2 and values["tierfs_hints_queued"] == 0
