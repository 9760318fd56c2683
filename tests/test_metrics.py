"""The Prometheus endpoint: a real HTTP server scraped over loopback, fed by a fake status dict."""

from __future__ import annotations

import re
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from typing import Any

import pytest

from tierfs.daemon import metrics
from tierfs.units import split_addr
from tools.servers import free_port

STATUS: dict[str, Any] = {
    "s3_requests": {"get_object": 12, "list_objects_v2": 3},
    "bytes_from_cache": 4096,
    "bytes_from_s3": 1_048_576,
    "cache_hits": 7,
    "cache_misses": 2,
    "evictions": 5,
    "uploads_pending": 4,
    "dirty_bytes": 123,
    "errors": 1,
    "conflicts": 2,
    "cache_bytes": 2_000_000,
    "cache_bytes_on_disk": 1_000_000,
    "cache_limit_bytes": None,  # no cap: the series must be absent, not 0
    "compression_ratio": 2.0,
    "direct_reads": 40,
    "direct_bytes": 4_400_000,
    "direct_fallbacks": {"dirty": 2, "miss": 9},
    "read_only": False,  # booleans are not metrics
    "operations": {},
}


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text: str = response.read().decode()
    return text


def samples(text: str) -> dict[str, float]:
    """``{'name{labels}': value}`` of every sample line (comments skipped)."""
    found: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            found[name] = float(value)
    return found


@pytest.fixture
def served() -> Iterator[tuple[metrics.MetricsServer, list[int]]]:
    """A metrics server on a free port whose status_fn counts its calls."""
    calls: list[int] = []

    def status() -> Mapping[str, Any]:
        calls.append(1)
        return STATUS

    server = metrics.serve(f"127.0.0.1:{free_port()}", status)
    try:
        yield server, calls
    finally:
        server.close()


def test_scrape_exposes_the_status_counters(served: tuple[metrics.MetricsServer, list[int]]) -> None:
    server, _ = served
    values = samples(scrape(server.port))
    expected = {
        "tierfs_up": 1,
        'tierfs_s3_requests_total{op="get_object"}': 12,
        'tierfs_s3_requests_total{op="list_objects_v2"}': 3,
        'tierfs_read_bytes_total{source="cache"}': 4096,
        'tierfs_read_bytes_total{source="s3"}': 1_048_576,
        "tierfs_cache_hits_total": 7,
        "tierfs_cache_misses_total": 2,
        "tierfs_cache_evictions_total": 5,
        "tierfs_uploads_pending": 4,
        "tierfs_dirty_bytes": 123,
        "tierfs_errors_total": 1,
        "tierfs_conflicts_total": 2,
        "tierfs_cache_bytes": 2_000_000,
        "tierfs_cache_disk_bytes": 1_000_000,
        "tierfs_cache_compression_ratio": 2.0,
        "tierfs_direct_reads_total": 40,
        "tierfs_direct_bytes_total": 4_400_000,
        'tierfs_direct_fallbacks_total{reason="dirty"}': 2,
        'tierfs_direct_fallbacks_total{reason="miss"}': 9,
    }
    for name, value in expected.items():
        assert values.get(name) == value, f"{name}: {values.get(name)} != {value}"
    assert not any(name.startswith("tierfs_cache_limit_bytes") for name in values)
    assert not any("read_only" in name for name in values)


def test_every_scrape_reads_the_status_afresh(served: tuple[metrics.MetricsServer, list[int]]) -> None:
    """No caching and no counting of our own: each scrape is one status query."""
    server, calls = served
    scrape(server.port)
    scrape(server.port)
    assert len(calls) == 2


def test_s3_latency_histogram_is_exposed(served: tuple[metrics.MetricsServer, list[int]]) -> None:
    server, _ = served
    before = samples(scrape(server.port)).get('tierfs_s3_request_seconds_count{op="head_object"}', 0.0)
    metrics.S3_LATENCY.labels(op="head_object").observe(0.02)
    metrics.S3_LATENCY.labels(op="head_object").observe(3.0)
    values = samples(scrape(server.port))
    assert values['tierfs_s3_request_seconds_count{op="head_object"}'] == before + 2
    buckets = {
        match[1]: v
        for k, v in values.items()
        if (match := re.fullmatch(r'tierfs_s3_request_seconds_bucket\{le="([^"]+)",op="head_object"\}', k))
    }
    assert buckets["0.025"] - buckets["0.01"] >= 1  # the 20 ms call
    assert buckets["+Inf"] == before + 2


def test_failing_status_reports_down_instead_of_erroring() -> None:
    def broken() -> Mapping[str, Any]:
        raise RuntimeError("loop gone")

    server = metrics.serve(f"127.0.0.1:{free_port()}", broken)
    try:
        values = samples(scrape(server.port))
    finally:
        server.close()
    assert values["tierfs_up"] == 0
    assert "tierfs_cache_hits_total" not in values


def test_close_releases_the_port() -> None:
    port = free_port()
    metrics.serve(f"127.0.0.1:{port}", lambda: STATUS).close()
    with pytest.raises(urllib.error.URLError):
        scrape(port)
    metrics.serve(f"127.0.0.1:{port}", lambda: STATUS).close()  # bindable again


def test_address_in_use_fails_loudly() -> None:
    server = metrics.serve(f"127.0.0.1:{free_port()}", lambda: STATUS)
    try:
        with pytest.raises(OSError):
            metrics.serve(f"127.0.0.1:{server.port}", lambda: STATUS)
    finally:
        server.close()


@pytest.mark.parametrize(
    ("addr", "expected"),
    [("127.0.0.1:9100", ("127.0.0.1", 9100)), ("[::1]:80", ("::1", 80)), (":9100", ("0.0.0.0", 9100))],
)
def test_split_addr(addr: str, expected: tuple[str, int]) -> None:
    assert split_addr(addr) == expected


@pytest.mark.parametrize("addr", ["localhost", "host:99999", "[::1:80"])
def test_split_addr_rejects_garbage(addr: str) -> None:
    with pytest.raises(ValueError, match="HOST:PORT"):
        split_addr(addr)
