"""The object store's two GET paths (awscrt for small ranges, boto3 for the rest) against a real server.

Both must return the same bytes and the same ObjectInfo, and map the same failures onto the
same error vocabulary, because the hydrator cannot tell which one served it.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import pytest

from tierfs.errors import NotFound, PreconditionFailed
from tierfs.store.objectstore import CRT_MAX_GET, S3ObjectStore, crc32c_b64, parse_timestamp
from tools.servers import MotoS3, S3Server, SeaweedFS, s3_client

BODY = bytes(range(256)) * 1000  # 256,000 bytes, every offset distinguishable


@pytest.fixture
def seeded(moto: MotoS3, bucket: Callable[..., str], s3_env: None) -> str:
    name = bucket(moto)
    client = s3_client(moto.endpoint_url)
    client.put_object(Bucket=name, Key="dir/obj.bin", Body=BODY, Metadata={"file-permissions": "0100640"})
    client.put_object(Bucket=name, Key="empty", Body=b"")
    return name


def stores(moto: MotoS3, name: str) -> tuple[S3ObjectStore, S3ObjectStore]:
    fast = S3ObjectStore(name, endpoint_url=moto.endpoint_url, timeout=5.0, retries=0)
    plain = S3ObjectStore(name, endpoint_url=moto.endpoint_url, timeout=5.0, retries=0, fast_gets=False)
    assert fast.fast_gets, "awscrt is a dependency: small GETs must take the CRT path"
    assert not plain.fast_gets
    return fast, plain


@pytest.mark.parametrize(("start", "length"), [(0, 1), (0, len(BODY)), (1000, 4096), (len(BODY) - 10, 4096)])
def test_both_paths_return_the_same_range_and_info(
    moto: MotoS3, seeded: str, start: int, length: int
) -> None:
    fast, plain = stores(moto, seeded)
    a = fast.get_range("dir/obj.bin", start, length)
    b = plain.get_range("dir/obj.bin", start, length)
    assert a.data == b.data == BODY[start : start + length]
    assert a.info == b.info
    assert a.info.size == len(BODY)
    assert a.info.metadata == {"file-permissions": "0100640"}
    assert fast.requests["get_object"] == plain.requests["get_object"] == 1


def test_zero_byte_object_reads_as_empty_on_both_paths(moto: MotoS3, seeded: str) -> None:
    for store in stores(moto, seeded):
        result = store.get_range("empty", 0, 1)
        assert result.data == b""
        assert result.info.size == 0


def test_both_paths_map_missing_and_changed_objects_alike(moto: MotoS3, seeded: str) -> None:
    etag = s3_client(moto.endpoint_url).head_object(Bucket=seeded, Key="dir/obj.bin")["ETag"].strip('"')
    for store in stores(moto, seeded):
        with pytest.raises(NotFound):
            store.get_range("dir/missing", 0, 100)
        with pytest.raises(PreconditionFailed):
            store.get_range("dir/obj.bin", 0, 100, if_match="0" * 32)
        assert store.get_range("dir/obj.bin", 0, 100, if_match=etag).data == BODY[:100]


def test_ranges_on_both_sides_of_the_crt_threshold(moto: MotoS3, seeded: str) -> None:
    """GETs up to CRT_MAX_GET take the CRT, larger ones boto3; the bytes must not care."""
    client = s3_client(moto.endpoint_url)
    big = bytes(CRT_MAX_GET + 4096)
    client.put_object(Bucket=seeded, Key="big", Body=big)
    fast, _ = stores(moto, seeded)
    assert fast.get_range("big", 0, len(big)).data == big
    assert fast.get_range("big", 0, CRT_MAX_GET).data == big[:CRT_MAX_GET]
    assert fast.requests["get_object"] == 2


@pytest.mark.parametrize(
    "text",
    [
        "2026-11-23T15:16:07.000Z",
        "2026-11-23T15:16:07Z",
        "2026-11-23T15:16:07+00:00",
        "Mon, 23 Nov 2026 15:16:07 GMT",
    ],
)
def test_timestamps_parse_to_the_same_aware_instant(text: str) -> None:
    parsed = parse_timestamp(text)
    assert parsed == datetime(2026, 11, 23, 15, 16, 7, tzinfo=UTC)
    assert parsed.utcoffset() is not None


def test_listing_and_head_agree_on_size_etag_and_mtime(moto: MotoS3, seeded: str) -> None:
    fast, _ = stores(moto, seeded)
    (page,) = list(fast.list_dir("dir/"))
    (listed,) = page.objects
    head = fast.head("dir/obj.bin")
    assert (listed.key, listed.size, listed.etag) == (head.key, head.size, head.etag)
    assert head.mtime_ns > 0
    assert abs(listed.mtime_ns - head.mtime_ns) < 1_000_000_000  # HEAD has whole seconds, LIST has ms


# --------------------------------------------------------------------------- uploads and multipart

PART = 5 << 20  # S3's smallest part


@pytest.fixture(params=["moto", "seaweed"])
def server(request: pytest.FixtureRequest, s3_env: None) -> S3Server:
    """Both servers: expected ETags and multipart bookkeeping must hold on each."""
    found: S3Server = request.getfixturevalue(request.param)
    return found


def multipart_store(server: S3Server, name: str) -> S3ObjectStore:
    return S3ObjectStore(
        name, endpoint_url=server.endpoint_url, timeout=10.0, part_size=PART, multipart_threshold=PART
    )


@pytest.mark.parametrize(
    "size", [0, 1000, PART - 1, 2 * PART + 1234], ids=["empty", "small", "below", "3-parts"]
)
def test_expected_etag_is_what_the_server_gives(
    server: S3Server, bucket: Callable[..., str], tmp_path: Path, size: int
) -> None:
    store = multipart_store(server, bucket(server))
    path = tmp_path / "f"
    path.write_bytes(os.urandom(size))
    expected = store.expected_etag(path)
    assert ("-" in expected) == (size >= PART)
    assert store.put_file("k", path, {}) == expected
    assert store.head("k").etag == expected


def test_on_upload_id_comes_before_any_part_and_the_upload_completes(
    server: S3Server, bucket: Callable[..., str], tmp_path: Path
) -> None:
    name = bucket(server)
    store = multipart_store(server, name)
    path = tmp_path / "f"
    body = os.urandom(2 * PART + 10)
    path.write_bytes(body)
    seen: list[tuple[str, list[tuple[str, str]], int]] = []

    def journal(upload_id: str) -> None:
        parts = s3_client(server.endpoint_url).list_parts(Bucket=name, Key="dir/k", UploadId=upload_id)
        seen.append((upload_id, store.list_multipart_uploads("dir/"), len(parts.get("Parts", []))))

    etag = store.put_file("dir/k", path, {"a": "b"}, on_upload_id=journal)
    ((upload_id, listed, parts_then),) = seen
    assert listed == [("dir/k", upload_id)] and parts_then == 0
    assert store.list_multipart_uploads("dir/") == []
    assert etag.endswith("-3")
    assert store.get_range("dir/k", 0, len(body)).data == body


def test_a_failing_journal_hook_aborts_the_upload(
    server: S3Server, bucket: Callable[..., str], tmp_path: Path
) -> None:
    store = multipart_store(server, bucket(server))
    path = tmp_path / "f"
    path.write_bytes(os.urandom(PART + 10))

    def refuse(upload_id: str) -> None:
        raise OSError("journal full")

    with pytest.raises(OSError, match="journal full"):
        store.put_file("k", path, {}, on_upload_id=refuse)
    assert store.list_multipart_uploads("") == []
    with pytest.raises(NotFound):
        store.head("k")


def test_abort_multipart_is_idempotent(server: S3Server, bucket: Callable[..., str]) -> None:
    """Replay may abort an upload that is already gone (aborted, completed, or never created)."""
    name = bucket(server)
    store = multipart_store(server, name)
    upload_id = s3_client(server.endpoint_url).create_multipart_upload(Bucket=name, Key="k")["UploadId"]
    assert store.list_multipart_uploads("") == [("k", upload_id)]
    store.abort_multipart("k", upload_id)
    assert store.list_multipart_uploads("") == []
    store.abort_multipart("k", upload_id)
    store.abort_multipart("k", "no-such-upload-id")


def test_uploads_carry_a_crc32c_the_server_keeps(
    seaweed: SeaweedFS, bucket: Callable[..., str], s3_env: None, tmp_path: Path
) -> None:
    """SeaweedFS verifies and stores the CRC32C of each PUT (and of each part: a composite)."""
    name = bucket()
    store = multipart_store(seaweed, name)
    client = s3_client(seaweed.endpoint_url)
    store.put_bytes("small", BODY, {})
    head = client.head_object(Bucket=name, Key="small", ChecksumMode="ENABLED")
    assert head["ChecksumCRC32C"] == crc32c_b64(BODY)
    path = tmp_path / "f"
    path.write_bytes(os.urandom(PART + 10))
    store.put_file("big", path, {})
    head = client.head_object(Bucket=name, Key="big", ChecksumMode="ENABLED")
    assert head["ChecksumCRC32C"].endswith("-2")


def test_whole_object_reads_by_size_hint_on_both_paths(moto: MotoS3, seeded: str) -> None:
    """With ``object_size`` the GET has no Range header; the bytes and info must not change."""
    etag = s3_client(moto.endpoint_url).head_object(Bucket=seeded, Key="dir/obj.bin")["ETag"].strip('"')
    for store in stores(moto, seeded):
        whole = store.get_range("dir/obj.bin", 0, len(BODY), etag, object_size=len(BODY))
        assert whole.data == BODY and whole.info.size == len(BODY)
        empty = store.get_range("empty", 0, 1, "d41d8cd98f00b204e9800998ecf8427e", object_size=0)
        assert empty.data == b"" and empty.info.size == 0
        with pytest.raises(PreconditionFailed):
            store.get_range("dir/obj.bin", 0, len(BODY), "0" * 32, object_size=len(BODY))
