"""The object store's two GET paths (awscrt for small ranges, boto3 for the rest) against a real server.

Both must return the same bytes and the same ObjectInfo, and map the same failures onto the
same error vocabulary, because the hydrator cannot tell which one served it.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime

import pytest

from tierfs.errors import NotFound, PreconditionFailed
from tierfs.objectstore import CRT_MAX_GET, S3ObjectStore, parse_timestamp
from tools.servers import MotoS3, s3_client

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
