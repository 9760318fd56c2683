"""``tierfs doctor --shared-cache s3://BUCKET[/PREFIX]``: is the shared cache tier usable?

A shared tier that is down, refuses writes, or lives inside the origin does not fail a mount
(reads fall through to the origin, see docs/shared-cache.md), which is exactly why it goes
unnoticed: every node then pays the origin for what it meant to share. The checks, each with its
fix:

* **overlap**: the tier must not be the origin bucket and prefix, nor inside it, nor contain it.
  Cache entries inside the mounted prefix would show up as files in the mount (and be read as
  data by anyone listing it), and an age-out rule for them would delete dataset objects.
  "Same place" means the same endpoint (host resolved, port) and bucket with overlapping prefixes.
* **reachable**: HeadBucket with the tier's own endpoint and credentials, one attempt, bounded.
* **writable**: a probe object PUT under the tier's prefix and deleted again. A tier that cannot
  be written is never filled, so every node keeps missing it.
* **age-out**: an enabled lifecycle rule with an expiration covering the prefix; the tier is never
  cleaned by tierfs itself. Servers without lifecycle support (NotImplemented) get the cluster-TTL
  advice instead.

Kept out of :mod:`tierfs.doctor` (whose checks are about this machine) and called from the CLI
through ``doctor.run``'s ``checks`` hook; it reuses that module's :class:`~tierfs.doctor.Result`.
"""

from __future__ import annotations

import socket
import uuid
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from .config import Source
from .doctor import FAIL, OK, SKIP, WARN, Options, Result, check_endpoint

PROBE_DIR = ".tierfs-doctor/"  # where the write probe goes, under the tier's prefix
_DENIED = frozenset(
    {"403", "AccessDenied", "AllAccessDisabled", "InvalidAccessKeyId", "SignatureDoesNotMatch"}
)
_NO_LIFECYCLE = frozenset({"NoSuchLifecycleConfiguration"})
_UNSUPPORTED = frozenset({"NotImplemented", "501", "MethodNotAllowed", "405"})


@dataclass(frozen=True)
class SharedOptions:
    """The tier as the mount would use it: its own endpoint and profile default to the origin's."""

    tier: Source
    endpoint_url: str | None = None
    profile: str | None = None


def _place(endpoint_url: str | None) -> tuple[str, Any]:
    """Where an endpoint points, for comparing two of them: (scheme-less host identity, port).
    Host names are resolved so that ``localhost`` and ``127.0.0.1`` are one place."""
    if endpoint_url is None:
        return ("aws", None)
    parts = urlsplit(endpoint_url)
    host = (parts.hostname or "").lower()
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        addresses = frozenset(str(info[4][0]) for info in infos)
    except OSError:
        addresses = frozenset({host})
    return (",".join(sorted(addresses)), port)


def _overlaps(a: str, b: str) -> bool:
    """Two prefixes (empty or ending in '/') overlap when one contains the other."""
    return a.startswith(b) or b.startswith(a)


def check_overlap(origin: Source | None, origin_endpoint: str | None, shared: SharedOptions) -> Result:
    name = "shared tier: not the origin"
    if origin is None:
        return Result(name, SKIP, "give SOURCE (s3://BUCKET/PREFIX) to compare the tier with the origin")
    tier = shared.tier
    same_bucket = tier.bucket == origin.bucket
    tier_endpoint = shared.endpoint_url or origin_endpoint
    if not same_bucket or _place(tier_endpoint) != _place(origin_endpoint):
        return Result(name, OK, f"{tier} is apart from the origin {origin}")
    if not _overlaps(tier.prefix, origin.prefix):
        return Result(
            name, WARN,
            f"{tier} is in the origin's bucket, beside (not inside) the mounted prefix {origin}",
            "a bucket of its own is safer: a lifecycle rule or policy for the tier cannot then touch "
            "dataset objects (e.g. --shared-cache s3://tierfs-cache/" + origin.prefix + ")",
        )  # fmt: skip
    where = "is the origin itself" if tier.prefix == origin.prefix else "overlaps the origin"
    return Result(
        name, FAIL,
        f"{tier} {where} ({origin}): cache entries would appear as files in the mount, and an age-out "
        "rule would delete dataset objects",
        "use a bucket of its own for the tier, e.g. --shared-cache s3://tierfs-cache/"
        + (origin.prefix or f"{origin.bucket}/"),
    )  # fmt: skip


def _client(options: Options, shared: SharedOptions) -> Any:
    import boto3
    import botocore.config
    import botocore.session

    core = botocore.session.get_session()
    if options.credentials_file:
        core.set_config_variable("credentials_file", options.credentials_file)
    session = boto3.session.Session(botocore_session=core, profile_name=shared.profile or options.profile)
    config = botocore.config.Config(
        connect_timeout=options.timeout,
        read_timeout=options.timeout,
        retries={"total_max_attempts": 1},
        s3={"addressing_style": "path"},
    )
    return session.client(
        "s3",
        endpoint_url=shared.endpoint_url or options.endpoint_url,
        region_name=options.region or session.region_name or "us-east-1",
        config=config,
    )


def _code(exc: Exception) -> str:
    response = getattr(exc, "response", None) or {}
    code = response.get("Error", {}).get("Code")
    return str(code or response.get("ResponseMetadata", {}).get("HTTPStatusCode"))


def check_reachable(client: Any, shared: SharedOptions) -> Result:
    import botocore.exceptions

    name = "shared tier: reachable"
    bucket = shared.tier.bucket
    try:
        client.head_bucket(Bucket=bucket)
    except botocore.exceptions.ClientError as exc:
        code = _code(exc)
        if code in ("404", "NoSuchBucket"):
            return Result(
                name, FAIL, f"{bucket}: no such bucket on the tier's endpoint (the mount refuses to start)",
                f"create it: aws s3 mb s3://{bucket} --endpoint-url ENDPOINT",
            )  # fmt: skip
        if code in _DENIED:
            return Result(
                name, FAIL, f"{bucket}: access denied ({code})",
                "give the tier's credentials (--shared-cache-profile) s3:ListBucket, s3:GetObject and "
                "s3:PutObject on the bucket",
            )  # fmt: skip
        return Result(name, FAIL, f"{bucket}: {code}: {exc}", "see the tier's server logs")
    except botocore.exceptions.BotoCoreError as exc:
        return Result(
            name, FAIL,
            f"{bucket}: {exc}: the tier is down or the address is wrong; mounts still work, but every read "
            "goes to the origin",
            "start the tier's S3 service, or fix --shared-cache-endpoint-url",
        )  # fmt: skip
    return Result(name, OK, f"s3://{bucket} answers and the tier's credentials may read it")


def check_writable(client: Any, shared: SharedOptions) -> Result:
    """PUT then DELETE a small probe under the tier's prefix (the only write doctor ever makes)."""
    import botocore.exceptions

    name = "shared tier: writable"
    tier = shared.tier
    key = f"{tier.prefix}{PROBE_DIR}{uuid.uuid4().hex}"
    try:
        client.put_object(Bucket=tier.bucket, Key=key, Body=b"tierfs doctor write probe\n")
    except botocore.exceptions.ClientError as exc:
        code = _code(exc)
        if code in _DENIED:
            return Result(
                name, FAIL,
                f"PUT s3://{tier.bucket}/{key} refused ({code}): the tier is read-only for these "
                "credentials, so no node ever fills it",
                f"allow s3:PutObject on arn:aws:s3:::{tier.bucket}/{tier.prefix}* for the tier's credentials "
                "(--shared-cache-profile), or remove the deny policy / read-only mode on the bucket",
            )  # fmt: skip
        return Result(name, FAIL, f"PUT s3://{tier.bucket}/{key}: {code}: {exc}", "see the tier's logs")
    except botocore.exceptions.BotoCoreError as exc:
        return Result(name, FAIL, f"PUT s3://{tier.bucket}/{key}: {exc}", "check the tier's endpoint")
    try:
        client.delete_object(Bucket=tier.bucket, Key=key)
    except (botocore.exceptions.ClientError, botocore.exceptions.BotoCoreError) as exc:
        return Result(
            name, WARN, f"the probe was written but not deleted ({exc})",
            f"delete s3://{tier.bucket}/{key} by hand; allow s3:DeleteObject if you want doctor to clean up",
        )  # fmt: skip
    return Result(name, OK, f"a probe object was written and deleted under s3://{tier.bucket}/{tier.prefix}")


def _covers(rule: Any, prefix: str) -> bool:
    """Whether an enabled lifecycle rule expires objects under ``prefix``."""
    if not isinstance(rule, dict) or rule.get("Status") != "Enabled":
        return False
    expiration = rule.get("Expiration") or {}
    if not (expiration.get("Days") or expiration.get("Date")):
        return False
    filt = rule.get("Filter") or {}
    rule_prefix = filt.get("Prefix")
    if rule_prefix is None:
        rule_prefix = (filt.get("And") or {}).get("Prefix", rule.get("Prefix", ""))
    return prefix.startswith(str(rule_prefix or ""))


def check_age_out(client: Any, shared: SharedOptions) -> Result:
    import botocore.exceptions

    name = "shared tier: age-out"
    tier = shared.tier
    rule_json = (
        '{"Rules": [{"ID": "tierfs-age-out", "Status": "Enabled", '
        f'"Filter": {{"Prefix": "{tier.prefix}"}}, "Expiration": {{"Days": 7}}}}]}}'
    )
    fix = (
        f"aws s3api put-bucket-lifecycle-configuration --bucket {tier.bucket} --endpoint-url ENDPOINT "
        f"--lifecycle-configuration '{rule_json}' (docs/shared-cache.md, Age-out)"
    )
    try:
        rules = client.get_bucket_lifecycle_configuration(Bucket=tier.bucket).get("Rules", [])
    except botocore.exceptions.ClientError as exc:
        code = _code(exc)
        if code in _NO_LIFECYCLE:
            return Result(name, WARN, f"s3://{tier.bucket} has no lifecycle rule: entries never expire", fix)
        if code in _UNSUPPORTED:
            return Result(
                name, WARN, f"the tier's server has no lifecycle rules ({code}): nothing ages entries out",
                "use the cluster's TTL, e.g. SeaweedFS: weed shell "
                f"fs.configure -locationPrefix=/buckets/{tier.bucket}/ -ttl=7d -apply",
            )  # fmt: skip
        return Result(
            name, WARN, f"cannot read the lifecycle rules ({code})",
            "allow s3:GetLifecycleConfiguration, or check the rules by hand: " + fix,
        )  # fmt: skip
    except botocore.exceptions.BotoCoreError as exc:
        return Result(name, WARN, f"cannot read the lifecycle rules: {exc}", fix)
    covering = [r for r in rules if _covers(r, tier.prefix)]
    if not covering:
        return Result(
            name, WARN,
            f"{len(rules)} lifecycle rule(s) on s3://{tier.bucket}, none expires {tier.prefix or 'it'}",
            fix,
        )  # fmt: skip
    rule = covering[0]
    expiration = rule.get("Expiration", {})
    after = f"{expiration['Days']} days" if expiration.get("Days") else f"on {expiration.get('Date')}"
    return Result(name, OK, f"rule {rule.get('ID', '?')!r} expires entries after {after}")


def run_shared_checks(options: Options, shared: SharedOptions) -> list[Result]:
    """Every shared-tier check; the S3 ones are skipped when the tier cannot be reached."""
    results = [check_overlap(options.source, options.endpoint_url, shared)]
    endpoint_url = shared.endpoint_url or options.endpoint_url
    endpoint = check_endpoint(endpoint_url, options.timeout)
    results.append(Result("shared tier: endpoint", endpoint.status, endpoint.detail, endpoint.fix))
    if endpoint.status == FAIL:
        for what in ("reachable", "writable", "age-out"):
            results.append(Result(f"shared tier: {what}", SKIP, "needs the tier's endpoint to answer"))
        return results
    client = _client(options, shared)
    reachable = check_reachable(client, shared)
    results.append(reachable)
    if reachable.status == FAIL:
        results += [Result(f"shared tier: {w}", SKIP, "needs the bucket") for w in ("writable", "age-out")]
        return results
    results += [check_writable(client, shared), check_age_out(client, shared)]
    return results
