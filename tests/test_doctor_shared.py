"""``tierfs doctor --shared-cache``: the shared tier's checks against real tiers on loopback.

A healthy tier (moto, its own bucket, with and without an age-out rule), a tier that is down (a
port nobody listens on, and a listener that never answers), a read-only tier (tools/faultproxy.py
in front of moto answering 403 AccessDenied to every PUT, as a bucket with a deny-write policy
does), and the origin itself (same bucket and prefix, a prefix inside it, and the same server
spelled ``localhost`` instead of ``127.0.0.1``).
"""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest
import test_doctor
from mounting import run_tierfs

from tierfs import doctor, doctor_shared
from tierfs.config import Source
from tierfs.doctor import FAIL, OK, SKIP, WARN
from tools.faultproxy import FaultProxy, Rule
from tools.servers import MotoS3, s3_client

# The machine checks' fixtures for an endpoint that is down: a refused port, a listener that never answers.
refused_port = test_doctor.refused_port
silent_server = test_doctor.silent_server


def by_name(results: list[doctor.Result]) -> dict[str, doctor.Result]:
    return {r.name: r for r in results}


def check(
    origin: str | None, origin_endpoint: str | None, tier: str, tier_endpoint: str | None = None
) -> dict[str, doctor.Result]:
    options = doctor.Options(
        endpoint_url=origin_endpoint, source=Source.parse(origin) if origin else None, timeout=2.0
    )
    shared = doctor_shared.SharedOptions(Source.parse(tier), tier_endpoint)
    return by_name(doctor_shared.run_shared_checks(options, shared))


def age_out_rule(endpoint: str, bucket: str, prefix: str, days: int = 7) -> None:
    s3_client(endpoint).put_bucket_lifecycle_configuration(
        Bucket=bucket,
        LifecycleConfiguration={
            "Rules": [
                {"ID": "age", "Status": "Enabled", "Filter": {"Prefix": prefix}, "Expiration": {"Days": days}}
            ]
        },
    )


def test_a_healthy_tier_with_an_age_out_rule_passes(
    moto: MotoS3, bucket: Callable[..., str], s3_env: None
) -> None:
    origin, tier = bucket(moto), bucket(moto)
    age_out_rule(moto.endpoint_url, tier, "")
    found = check(f"s3://{origin}/data", moto.endpoint_url, f"s3://{tier}/cache")
    assert {r.status for r in found.values()} == {OK}, found
    assert "7 days" in found["shared tier: age-out"].detail
    keys = s3_client(moto.endpoint_url).list_objects_v2(Bucket=tier).get("KeyCount", 0)
    assert keys == 0, "the write probe must be deleted again"


def test_a_tier_without_an_age_out_rule_warns_with_the_command_to_add_one(
    moto: MotoS3, bucket: Callable[..., str], s3_env: None
) -> None:
    origin, tier = bucket(moto), bucket(moto)
    found = check(f"s3://{origin}", moto.endpoint_url, f"s3://{tier}/imagenet")
    age = found["shared tier: age-out"]
    assert age.status == WARN and "never expire" in age.detail
    assert "put-bucket-lifecycle-configuration" in age.fix and '"Prefix": "imagenet/"' in age.fix
    age_out_rule(moto.endpoint_url, tier, "other/")  # a rule for another prefix does not count
    age = check(f"s3://{origin}", moto.endpoint_url, f"s3://{tier}/imagenet")["shared tier: age-out"]
    assert age.status == WARN and "none expires imagenet/" in age.detail


def test_a_tier_that_is_down_fails_in_bounded_time(
    moto: MotoS3, bucket: Callable[..., str], s3_env: None, refused_port: int, silent_server: str
) -> None:
    origin = bucket(moto)
    for endpoint in (f"http://127.0.0.1:{refused_port}", silent_server):
        started = time.monotonic()
        found = check(f"s3://{origin}", moto.endpoint_url, "s3://tier-bucket", endpoint)
        assert time.monotonic() - started < 10
        down = found["shared tier: endpoint"]
        assert down.status == FAIL and down.fix, found
        for what in ("reachable", "writable", "age-out"):
            assert found[f"shared tier: {what}"].status == SKIP


def test_a_missing_tier_bucket_fails_with_the_command_to_create_it(
    moto: MotoS3, bucket: Callable[..., str], s3_env: None
) -> None:
    found = check(f"s3://{bucket(moto)}", moto.endpoint_url, "s3://no-such-tier-bucket")
    assert found["shared tier: reachable"].status == FAIL
    assert "aws s3 mb s3://no-such-tier-bucket" in found["shared tier: reachable"].fix


def test_a_read_only_tier_fails_the_write_check(
    moto: MotoS3, bucket: Callable[..., str], s3_env: None
) -> None:
    origin, tier = bucket(moto), bucket(moto)
    with FaultProxy(moto.endpoint_url, [Rule("error", methods={"PUT"}, statuses=(403,))], seed=1) as proxy:
        found = check(f"s3://{origin}", moto.endpoint_url, f"s3://{tier}", proxy.endpoint_url)
        assert proxy.counts["error"] >= 1
    assert found["shared tier: reachable"].status == OK
    writable = found["shared tier: writable"]
    assert writable.status == FAIL and "read-only" in writable.detail and "AccessDenied" in writable.detail
    assert "s3:PutObject" in writable.fix


@pytest.mark.parametrize(
    ("origin", "tier", "status"),
    [
        ("s3://data-bucket/train", "s3://data-bucket/train", FAIL),  # the origin itself
        ("s3://data-bucket/train", "s3://data-bucket/train/cache", FAIL),  # inside the mounted prefix
        ("s3://data-bucket/train", "s3://data-bucket", FAIL),  # contains it
        ("s3://data-bucket", "s3://data-bucket/cache", FAIL),  # the whole bucket is mounted
        ("s3://data-bucket/train", "s3://data-bucket/cache", WARN),  # same bucket, beside it
        ("s3://data-bucket/train", "s3://cache-bucket/train", OK),
    ],
)
def test_a_tier_that_is_the_origin_fails(origin: str, tier: str, status: str) -> None:
    found = doctor_shared.check_overlap(
        Source.parse(origin), "http://127.0.0.1:9", doctor_shared.SharedOptions(Source.parse(tier))
    )
    assert found.status == status, found
    if status != OK:
        assert "--shared-cache s3://" in found.fix


def test_the_same_server_spelled_differently_is_still_the_origin() -> None:
    found = doctor_shared.check_overlap(
        Source.parse("s3://data-bucket"), "http://127.0.0.1:8333",
        doctor_shared.SharedOptions(Source.parse("s3://data-bucket"), "http://localhost:8333"),
    )  # fmt: skip
    assert found.status == FAIL
    other = doctor_shared.check_overlap(
        Source.parse("s3://data-bucket"), "http://127.0.0.1:8333",
        doctor_shared.SharedOptions(Source.parse("s3://data-bucket"), "http://127.0.0.1:8334"),
    )  # fmt: skip
    assert other.status == OK  # another cluster may well have a bucket of the same name


def test_cli_reports_the_origin_as_tier_with_its_fix(moto: MotoS3, bucket: Callable[..., str]) -> None:
    origin = bucket(moto)
    done = run_tierfs(
        "doctor", f"s3://{origin}/train", "--endpoint-url", moto.endpoint_url,
        "--shared-cache", f"s3://{origin}/train", "--timeout", "5",
    )  # fmt: skip
    assert done.returncode == 1, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    at = next(n for n, line in enumerate(lines) if line.startswith("FAIL  shared tier: not the origin"))
    assert "fix: use a bucket of its own" in lines[at + 1], done.stdout
    assert any(line.startswith("ok    shared tier: writable") for line in lines), done.stdout


def test_cli_shared_options_need_shared_cache() -> None:
    done = run_tierfs("doctor", "--shared-cache-profile", "x")
    assert done.returncode == 2 and "need --shared-cache" in done.stderr and "Traceback" not in done.stderr
