"""The fault-injecting proxy (tools/faultproxy.py) does what each mode says, against a real server.

The end-to-end fault tests trust the proxy to inject exactly the fault they ask for; a proxy
that forwarded an "error" request, or flipped nothing, would make them pass for the wrong
reason. So each mode is checked here with boto3 talking to moto's S3 through the proxy, and
what reached the server is read back directly from the server, around the proxy.
"""

from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

import boto3
import botocore.config
import botocore.exceptions
import pytest
from mounting import REPO_ROOT, Mounter, tierfs_ok, wait_until

from tools.faultproxy import OBJECT_PATH, FaultProxy, Pacer, Rule
from tools.servers import ACCESS_KEY, REGION, SECRET_KEY, MotoS3, SeaweedFS, child_env, s3_client

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

KiB = 1 << 10
MiB = 1 << 20
BODY = random.Random(7).randbytes(300 * 1024)
KEY = "dir/object.bin"


@pytest.fixture
def proxied(moto: MotoS3, bucket: Callable[..., str]) -> Iterator[tuple[FaultProxy, S3Client, S3Client, str]]:
    """(proxy, client through the proxy, direct client, bucket holding KEY = BODY)."""
    name = bucket(moto)
    direct = s3_client(moto.endpoint_url)
    direct.put_object(Bucket=name, Key=KEY, Body=BODY)
    with FaultProxy(moto.endpoint_url, seed=3) as proxy:
        yield proxy, s3_client(proxy.endpoint_url, read_timeout=30.0, attempts=1), direct, name


def get(client: S3Client, bucket: str, key: str = KEY) -> bytes:
    return client.get_object(Bucket=bucket, Key=key)["Body"].read()


def unchecked_client(endpoint_url: str) -> S3Client:
    """A client that does not verify response checksums, so a flipped body reaches the test."""
    config = botocore.config.Config(
        retries={"mode": "standard", "total_max_attempts": 1},
        s3={"addressing_style": "path"},
        response_checksum_validation="when_required",
    )
    return boto3.client(
        "s3",
        endpoint_url=endpoint_url,
        aws_access_key_id=ACCESS_KEY,
        aws_secret_access_key=SECRET_KEY,
        region_name=REGION,
        config=config,
    )


def test_without_rules_every_request_passes_unchanged_over_kept_alive_connections(
    proxied: tuple[FaultProxy, S3Client, S3Client, str],
) -> None:
    proxy, client, direct, name = proxied
    big = random.Random(8).randbytes(3 << 20)  # large enough for botocore's Expect: 100-continue
    client.put_object(Bucket=name, Key="big", Body=big)
    assert get(direct, name, "big") == big
    for _ in range(5):
        assert get(client, name) == BODY
    assert client.head_object(Bucket=name, Key=KEY)["ContentLength"] == len(BODY)
    listed = client.list_objects_v2(Bucket=name)["Contents"]
    assert {o["Key"] for o in listed} == {KEY, "big"}
    assert proxy.requests == proxy.forwarded == 8
    assert proxy.connections < proxy.requests, "each request opened its own connection: no keep-alive"
    assert not proxy.counts


def test_error_answers_without_forwarding(proxied: tuple[FaultProxy, S3Client, S3Client, str]) -> None:
    proxy, client, direct, name = proxied
    proxy.set_rules([Rule("error", methods={"PUT"}, statuses=(503,))])
    with pytest.raises(botocore.exceptions.ClientError) as caught:
        client.put_object(Bucket=name, Key="never", Body=b"x")
    assert caught.value.response["ResponseMetadata"]["HTTPStatusCode"] == 503
    assert proxy.forwarded == 0
    assert direct.list_objects_v2(Bucket=name, Prefix="never").get("KeyCount") == 0
    assert get(client, name) == BODY  # GETs are not covered by the rule
    proxy.set_rules([Rule("error", statuses=(500,))])
    with pytest.raises(botocore.exceptions.ClientError) as caught:
        client.head_object(Bucket=name, Key=KEY)
    assert caught.value.response["ResponseMetadata"]["HTTPStatusCode"] == 500
    assert proxy.counts["error"] == 2


def test_delay_holds_the_request_then_forwards_it(
    proxied: tuple[FaultProxy, S3Client, S3Client, str],
) -> None:
    proxy, client, _, name = proxied
    proxy.set_rules([Rule("delay", delay=(0.6, 0.6))])
    started = time.monotonic()
    assert get(client, name) == BODY
    assert time.monotonic() - started >= 0.55  # the injected pause is a floor, whatever the machine
    assert proxy.counts["delay"] == 1 and proxy.forwarded == 1


def test_pacer_books_bytes_at_its_rate() -> None:
    now = [100.0]
    pacer = Pacer(1000.0, burst=0.5, clock=lambda: now[0])
    assert pacer.reserve(500) == 0.0  # within the burst credit: no wait
    assert pacer.reserve(1000) == 1.0  # the bucket is a second ahead of the clock
    now[0] += 10  # idle: credit is capped at the burst, not ten seconds
    assert pacer.reserve(1000) == 0.5
    assert pacer.reserve(0) == 0.5


def test_shaping_adds_latency_caps_bandwidth_and_counts_bodies(
    moto: MotoS3, bucket: Callable[..., str]
) -> None:
    name = bucket(moto)
    s3_client(moto.endpoint_url).put_object(Bucket=name, Key=KEY, Body=BODY)
    with FaultProxy(moto.endpoint_url, latency=0.2, bandwidth=1e6) as proxy:
        client = s3_client(proxy.endpoint_url, read_timeout=30.0, attempts=1)
        started = time.monotonic()
        assert get(client, name) == BODY
        elapsed = time.monotonic() - started
    # floors, whatever the machine: 0.2 s of latency, and 300 KiB at 1 MB/s less 0.05 s of burst
    assert elapsed >= 0.2 + len(BODY) / 1e6 - 0.06
    assert proxy.body_bytes == len(BODY) and proxy.by_method == {"GET": 1}


def test_close_drops_the_connection_without_forwarding(
    proxied: tuple[FaultProxy, S3Client, S3Client, str],
) -> None:
    proxy, client, _, name = proxied
    proxy.set_rules([Rule("close", count=1)])
    with pytest.raises(
        (botocore.exceptions.ConnectionClosedError, botocore.exceptions.EndpointConnectionError)
    ):
        get(client, name)
    assert proxy.forwarded == 0
    assert get(client, name) == BODY  # the countdown is spent: the next request passes
    assert proxy.counts["close"] == 1


def test_truncate_cuts_the_body_short(proxied: tuple[FaultProxy, S3Client, S3Client, str]) -> None:
    proxy, client, _, name = proxied
    proxy.set_rules([Rule("truncate", methods={"GET"})])
    with pytest.raises((botocore.exceptions.IncompleteReadError, botocore.exceptions.ResponseStreamingError)):
        get(client, name)
    assert proxy.counts["truncate"] == 1
    assert proxy.injections[-1].detail == f"{len(BODY) // 2} of {len(BODY)} body bytes"


def test_lose_lets_the_server_act_but_the_client_never_hears(
    proxied: tuple[FaultProxy, S3Client, S3Client, str],
) -> None:
    proxy, client, direct, name = proxied
    proxy.set_rules([Rule("lose", methods={"PUT"})])
    data = b"stored although the client was told nothing\n"
    with pytest.raises(
        (botocore.exceptions.ConnectionClosedError, botocore.exceptions.EndpointConnectionError)
    ):
        client.put_object(Bucket=name, Key="lost", Body=data)
    assert proxy.forwarded == 1 and proxy.counts["lose"] == 1
    assert get(direct, name, "lost") == data  # the server did act


def test_flip_changes_exactly_one_byte_of_the_body(
    proxied: tuple[FaultProxy, S3Client, S3Client, str],
) -> None:
    proxy, client, direct, name = proxied
    proxy.set_rules([Rule("flip", methods={"GET"}, path=OBJECT_PATH)])
    got = get(unchecked_client(proxy.endpoint_url), name)
    assert len(got) == len(BODY)
    differing = [i for i, (a, b) in enumerate(zip(got, BODY, strict=True)) if a != b]
    assert len(differing) == 1
    assert bin(got[differing[0]] ^ BODY[differing[0]]).count("1") == 1  # one bit of that byte
    assert get(direct, name) == BODY  # in transit only
    assert client.list_objects_v2(Bucket=name)["KeyCount"] == 1  # LIST is not an object path: untouched
    assert proxy.counts["flip"] == 1


def test_stall_holds_until_released_and_until_its_bound(
    proxied: tuple[FaultProxy, S3Client, S3Client, str],
) -> None:
    proxy, client, _, name = proxied
    proxy.set_rules([Rule("stall", stall_max=120.0, count=1)])
    result: list[bytes] = []
    reader = threading.Thread(target=lambda: result.append(get(client, name)), daemon=True)
    reader.start()
    wait_until(lambda: proxy.stalled == 1, 10.0, "the request is held")
    reader.join(0.5)
    assert reader.is_alive() and proxy.forwarded == 0
    proxy.release()
    reader.join(20.0)
    assert result == [BODY] and proxy.stalled == 0

    proxy.set_rules([Rule("stall", stall_max=0.3)])
    assert get(client, name) == BODY  # nobody releases it: the bound does
    assert proxy.counts["stall"] == 2


def test_countdown_skip_and_methods_choose_which_requests_are_hit(
    proxied: tuple[FaultProxy, S3Client, S3Client, str],
) -> None:
    proxy, client, _, name = proxied
    proxy.set_rules([Rule("error", methods={"GET"}, skip=1, count=2, statuses=(503,))])
    outcomes = []
    for _ in range(5):
        try:
            get(client, name)
            outcomes.append("ok")
        except botocore.exceptions.ClientError:
            outcomes.append("503")
    assert outcomes == ["ok", "503", "503", "ok", "ok"]
    client.head_object(Bucket=name, Key=KEY)  # HEAD is not a GET here


def test_probability_is_seeded(moto: MotoS3, bucket: Callable[..., str]) -> None:
    name = bucket(moto)
    s3_client(moto.endpoint_url).put_object(Bucket=name, Key=KEY, Body=b"x")

    def pattern(seed: int) -> list[bool]:
        with FaultProxy(moto.endpoint_url, [Rule("error", 0.5, statuses=(503,))], seed=seed) as proxy:
            client = s3_client(proxy.endpoint_url, attempts=1)
            hits = []
            for _ in range(30):
                try:
                    client.head_object(Bucket=name, Key=KEY)
                    hits.append(False)
                except botocore.exceptions.ClientError:
                    hits.append(True)
            return hits

    first = pattern(11)
    assert first == pattern(11)
    assert 3 <= sum(first) <= 27  # both outcomes happen at p = 0.5
    assert first != pattern(12)


def test_command_line_reports_its_port_injects_and_prints_counters(
    moto: MotoS3, bucket: Callable[..., str]
) -> None:
    name = bucket(moto)
    s3_client(moto.endpoint_url).put_object(Bucket=name, Key=KEY, Body=BODY)
    command = [sys.executable, "-m", "tools.faultproxy", "--upstream", moto.endpoint_url]
    proc = subprocess.Popen(
        [*command, "--flip", "1", "--methods", "GET", "--path", OBJECT_PATH, "--count", "1"],
        cwd=REPO_ROOT,
        env=child_env(),
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        assert proc.stdout is not None
        proc.stdout.readline()  # "listening on ..."
        port = int(proc.stdout.readline().split()[1])
        client = unchecked_client(f"http://127.0.0.1:{port}")
        first, second = get(client, name), get(client, name)
        assert len(first) == len(BODY) and first != BODY  # flipped, once (--count 1)
        assert second == BODY
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=10)
        assert proc.returncode == 0
        summary = json.loads(out.strip().splitlines()[-1])
        assert summary["faults"] == {"flip": 1} and summary["forwarded"] == 2
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_a_mount_reads_and_writes_through_the_proxy_unchanged(
    seaweed: SeaweedFS, bucket: Callable[..., str], mounter: Mounter
) -> None:
    """Both GET paths (awscrt, boto3) and write-back's PUTs (checksummed) pass through intact."""
    name = bucket()
    rng = random.Random(9)
    stored = {"small": rng.randbytes(100 * KiB), "large": rng.randbytes(9 * MiB + 1)}
    direct = s3_client(seaweed.endpoint_url)
    for key, body in stored.items():
        direct.put_object(Bucket=name, Key=key, Body=body)
    written = {"new-small": rng.randbytes(1000), "new-large": rng.randbytes(12 * MiB + 7)}
    with FaultProxy(seaweed.endpoint_url) as proxy:
        mount = mounter(f"s3://{name}", endpoint_url=proxy.endpoint_url)
        for key, body in stored.items():
            assert (mount.path / key).read_bytes() == body
        for key, body in written.items():
            (mount.path / key).write_bytes(body)
        tierfs_ok("flush", str(mount.path))
        mount.umount()
        assert proxy.forwarded == proxy.requests > 0
    for key, body in written.items():
        assert get(direct, name, key) == body
