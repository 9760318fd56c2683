"""Cheap small-file write-back and parallel multipart (issue 16), in-process against moto.

- a put whose base the record knows is one conditional PUT, without a HEAD first;
- a key deleted remotely (AWS and moto answer If-Match with 404 then) is uploaded as new;
- another writer's change still wins the key (the 412 path), ours goes to a conflict name;
- a multipart upload cut into parts uploaded in parallel gives the ETag the store predicts.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from direct import Bucket, MiB, Options, payload, running

from tierfs.store.objectstore import S3ObjectStore
from tools.servers import MotoS3


async def test_replacing_a_file_costs_one_put_and_no_head(
    moto: MotoS3, where: tuple[str, Bucket], tmp_path: Path
) -> None:
    name, bucket = where
    async with running(tmp_path / "cache", moto.endpoint_url, name, Options()) as stack:
        await stack.create("f", payload(1, 50_000))
        await stack.create("g", payload(2, 50_000))
        await stack.flush()
        before = dict(stack.store.calls)
        await stack.write_open("f", payload(3, 60_000), truncate=True)
        await stack.write_open("g", payload(4, 70_000), truncate=True)
        await stack.flush()
        calls = {k: v - before.get(k, 0) for k, v in stack.store.calls.items()}
        assert calls.get("head", 0) == 0, calls
        assert calls.get("put_file") == 2, calls
        assert bucket.get("f") == payload(3, 60_000) and bucket.get("g") == payload(4, 70_000)
        assert bucket.conflict_keys() == []


async def test_a_key_deleted_remotely_is_uploaded_as_new(
    moto: MotoS3, where: tuple[str, Bucket], tmp_path: Path
) -> None:
    name, bucket = where
    async with running(tmp_path / "cache", moto.endpoint_url, name, Options()) as stack:
        await stack.create("f", payload(1, 10_000))
        await stack.flush()
        bucket.client.delete_object(Bucket=name, Key="f")
        await stack.write_open("f", payload(2, 20_000), truncate=True)
        await stack.flush()
        assert bucket.get("f") == payload(2, 20_000)
        assert bucket.conflict_keys() == []
        assert stack.wb.stats.conflicts == 0 and stack.wb.stats.uploads_failed == 0


async def test_another_writers_change_still_keeps_the_key(
    moto: MotoS3, where: tuple[str, Bucket], tmp_path: Path
) -> None:
    """Without the HEAD, the conditional PUT's 412 is what finds the other writer."""
    name, bucket = where
    async with running(tmp_path / "cache", moto.endpoint_url, name, Options()) as stack:
        await stack.create("f", payload(1, 10_000))
        await stack.flush()
        bucket.put("f", b"theirs")
        await stack.write_open("f", payload(2, 20_000), truncate=True)
        await stack.flush()
        assert bucket.get("f") == b"theirs"
        (conflict,) = bucket.conflict_keys()
        assert bucket.get(conflict) == payload(2, 20_000)
        assert stack.wb.stats.conflicts == 1


@pytest.mark.parametrize("concurrency", [1, 3])
def test_parallel_parts_give_the_predicted_etag(
    moto: MotoS3, where: tuple[str, Bucket], tmp_path: Path, concurrency: int
) -> None:
    name, bucket = where
    store = S3ObjectStore(
        name, endpoint_url=moto.endpoint_url, part_size=5 * MiB, multipart_threshold=5 * MiB,
        part_concurrency=concurrency, fast_gets=False,
    )  # fmt: skip
    path = tmp_path / "big"
    data = payload(7, 17 * MiB + 3)  # four parts, the last short
    path.write_bytes(data)
    recorded: list[str] = []
    etag = store.put_file("big", path, {"k": "v"}, if_none_match=True, on_upload_id=recorded.append)
    assert etag == store.expected_etag(path) and etag.endswith("-4")
    assert bucket.get("big") == data
    assert len(recorded) == 1 and bucket.multipart_uploads() == []
