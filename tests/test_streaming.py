"""Streaming uploads (tierfs/writeback/stream.py), in-process against moto with 5 MiB parts.

A file written sequentially from offset 0 uploads its full parts while it is written and
completes at close or fsync; a seek back, a truncate or a rename falls back to the upload
after close; a crash mid-stream replays to the right object and leaves no multipart upload
behind at the server.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from pathlib import Path

import pytest
from direct import Bucket, MiB, Options, Stack, payload, running, wait_for
from mounting import Mounter, wait_until
from test_posix_write import flush

from tools.faultproxy import FaultProxy, Rule
from tools.servers import MotoS3, SeaweedFS, s3_client

PARTS = Options(multipart_threshold=5 * MiB, part_size=5 * MiB)  # moto's smallest part is 5 MiB
CHUNK = MiB


async def write_sequentially(stack: Stack, name: str, data: bytes, start: int = 0) -> None:
    for offset in range(start, len(data), CHUNK):
        await stack.pwrite(name, offset, data[offset : offset + CHUNK])


def parts_at_server(bucket: Bucket, key: str) -> int:
    uploads = [upload for k, upload in bucket.multipart_uploads() if k == key]
    if not uploads:
        return 0
    (upload,) = uploads
    return len(bucket.client.list_parts(Bucket=bucket.name, Key=key, UploadId=upload).get("Parts", ()))


def assert_finished(stack: Stack, bucket: Bucket, expected: dict[str, bytes]) -> None:
    for key, body in expected.items():
        assert bucket.get(key) == body, f"{key}: the bucket holds other bytes"
    assert bucket.multipart_uploads() == [], "a multipart upload was left at the server"
    assert stack.journal.open_uploads() == [] and stack.journal_ops() == []
    assert bucket.conflict_keys() == []


async def test_a_sequential_write_uploads_its_parts_before_close(
    moto: MotoS3, where: tuple[str, Bucket], tmp_path: Path
) -> None:
    name, bucket = where
    data = payload(1, 23 * MiB + 11)  # four full parts and a short one
    async with running(tmp_path / "cache", moto.endpoint_url, name, PARTS) as stack:
        await stack.create("ckpt", close=False)
        await write_sequentially(stack, "ckpt", data)
        # Still open: the full parts are (or are going) up already, under a recorded upload id.
        await wait_for(lambda: parts_at_server(bucket, "ckpt") == 4, 20.0, "four parts at the server")
        assert [key for _, key, _ in stack.journal.open_uploads()] == ["ckpt"]
        await stack.close_writer("ckpt")
        await stack.flush()
        assert_finished(stack, bucket, {"ckpt": data})
        assert stack.store.calls.get("put_file", 0) == 0, "the file was uploaded again after close"
        assert bucket.head("ckpt")["ETag"].strip('"') == stack.node("ckpt").etag
        assert await stack.read("ckpt") == data


@pytest.mark.parametrize("how", ["seek-back", "truncate", "rename"])
async def test_anything_but_appending_falls_back_to_the_upload_after_close(
    moto: MotoS3, where: tuple[str, Bucket], tmp_path: Path, how: str
) -> None:
    name, bucket = where
    data = bytearray(payload(2, 16 * MiB))
    async with running(tmp_path / "cache", moto.endpoint_url, name, PARTS) as stack:
        await stack.create("f", close=False)
        await write_sequentially(stack, "f", bytes(data[: 12 * MiB]))
        await wait_for(lambda: parts_at_server(bucket, "f") == 2, 20.0, "two parts at the server")
        final_name = "f"
        if how == "seek-back":
            patch = payload(3, 1000)
            await stack.pwrite("f", 100, patch)
            data[100:1100] = patch
            await write_sequentially(stack, "f", bytes(data), start=12 * MiB)
        elif how == "truncate":
            await stack.truncate("f", 7 * MiB)
            await write_sequentially(stack, "f", bytes(data), start=7 * MiB)
        else:
            await stack.rename("f", "g")
            final_name = "g"
            await write_sequentially(stack, "g", bytes(data), start=12 * MiB)
        # The stream's upload is aborted at the server, not left to the journal.
        await wait_for(lambda: bucket.multipart_uploads() == [], 20.0, "the ended stream aborted")
        await stack.close_writer(final_name)
        await stack.flush()
        assert_finished(stack, bucket, {final_name: bytes(data)})
        assert stack.store.calls["put_file"] == 1, "the fallback is the whole-file upload after close"
        assert stack.store.calls.get("complete_multipart", 0) == 0
        if how == "rename":
            assert "f" not in bucket.list_keys()


async def test_fsync_during_a_stream_returns_with_the_data_in_the_bucket(
    moto: MotoS3, where: tuple[str, Bucket], tmp_path: Path
) -> None:
    name, bucket = where
    data = payload(4, 18 * MiB)
    async with running(tmp_path / "cache", moto.endpoint_url, name, PARTS) as stack:
        node = await stack.create("f", close=False)
        await write_sequentially(stack, "f", data[: 11 * MiB + 5])
        await stack.wb.fsync(node.ino)
        assert bucket.get("f") == data[: 11 * MiB + 5], "fsync returned before the bucket had the data"
        assert stack.store.calls["complete_multipart"] == 1  # the stream was completed, not re-sent
        await write_sequentially(stack, "f", data, start=11 * MiB + 5)
        await stack.close_writer("f")
        await stack.flush()
        assert_finished(stack, bucket, {"f": data})


async def test_a_crash_mid_stream_replays_the_right_object_and_leaves_no_upload(
    moto: MotoS3, where: tuple[str, Bucket], tmp_path: Path
) -> None:
    """The stream's part 3 is held on the wire when the stack "crashes" (abandoned, nothing aborted)."""
    name, bucket = where
    data = payload(5, 17 * MiB + 1)
    proxy = FaultProxy(moto.endpoint_url, [Rule("stall", methods={"PUT"}, path=r"partNumber=3", count=1,
                                                 stall_max=120.0)])  # fmt: skip
    proxy.start()
    try:
        crashing = Options(
            multipart_threshold=5 * MiB, part_size=5 * MiB, timeout=60.0, retries=0, abandon=True
        )
        async with running(tmp_path / "cache", proxy.endpoint_url, name, crashing) as stack:
            await stack.create("f", close=False)
            await write_sequentially(stack, "f", data)
            await wait_for(lambda: proxy.stalled >= 1, 20.0, "part 3 held on the wire")
            recorded = stack.journal.open_uploads()
            assert [(key, upload) for _, key, upload in recorded] == bucket.multipart_uploads()
        proxy.set_rules([Rule("error", statuses=(503,))])
    finally:
        proxy.stop()
    assert len(bucket.multipart_uploads()) == 1  # what the crash left
    async with running(tmp_path / "cache", moto.endpoint_url, name, PARTS) as replayed:
        await replayed.flush()
        assert_finished(replayed, bucket, {"f": data})
        assert replayed.store.calls["abort_multipart"] >= 1
        assert await replayed.read("f") == data


async def test_small_files_do_not_stream(moto: MotoS3, where: tuple[str, Bucket], tmp_path: Path) -> None:
    name, bucket = where
    data = payload(6, 4 * MiB)  # below the threshold
    async with running(tmp_path / "cache", moto.endpoint_url, name, PARTS) as stack:
        await stack.create("s", close=False)
        await write_sequentially(stack, "s", data)
        assert stack.store.calls.get("create_multipart", 0) == 0
        await stack.close_writer("s")
        await stack.flush()
        assert_finished(stack, bucket, {"s": data})


# --------------------------------------------------------------------------- through a real mount


@pytest.mark.fuse
def test_a_mount_streams_a_checkpoint_and_a_kill9_mid_stream_leaves_no_upload(
    bucket: Callable[..., str], mounter: Mounter, seaweed: SeaweedFS
) -> None:
    """Through FUSE on SeaweedFS: parts reach the server while the file is still open; kill -9
    with a stream in flight, remount on the same cache dir: the right object, no upload left."""
    name = bucket()
    client = s3_client(seaweed.endpoint_url)
    small_parts = ("--part-size", "5M", "--multipart-threshold", "5M", "--writeback-delay", "300s")
    mount = mounter(f"s3://{name}", *small_parts)

    def uploads() -> list[str]:
        return [u["Key"] for u in client.list_multipart_uploads(Bucket=name).get("Uploads", ())]

    done = payload(7, 21 * MiB + 3)
    with open(mount.path / "done.bin", "wb") as fh:
        for offset in range(0, len(done), CHUNK):
            fh.write(done[offset : offset + CHUNK])
        fh.flush()
        wait_until(lambda: uploads() == ["done.bin"], 20.0, "a multipart upload while the file is open")
    flush(mount)
    assert client.get_object(Bucket=name, Key="done.bin")["Body"].read() == done
    assert uploads() == []

    crashed = payload(8, 16 * MiB)
    fh = open(mount.path / "crashed.bin", "wb")  # noqa: SIM115 - left open across the kill
    for offset in range(0, len(crashed), CHUNK):
        fh.write(crashed[offset : offset + CHUNK])
    fh.flush()
    wait_until(lambda: uploads() == ["crashed.bin"], 20.0, "the second file streaming")
    mount.kill9()
    with contextlib.suppress(OSError):
        fh.close()
    mount.force_unmount()
    assert uploads() == ["crashed.bin"]  # what the crash left at the server

    again = mounter(f"s3://{name}", *small_parts, cache_dir=mount.cache_dir)
    flush(again)
    assert client.get_object(Bucket=name, Key="crashed.bin")["Body"].read() == crashed
    assert uploads() == [], "an orphan multipart upload stayed at the server"
