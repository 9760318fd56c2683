"""Prometheus metrics for one mount (``--metrics-addr HOST:PORT``).

The mount already counts everything in its status dict (the same numbers ``tierfs status``
shows), so this module keeps no counters of its own: a custom collector calls
``status_fn`` on every scrape and translates the dict. Counting twice would let the two
views drift apart. The one thing the status dict cannot express is a latency
distribution, so the S3 request histogram :data:`S3_LATENCY` lives here and the object
store observes it around each call.

Everything is registered on private registries, never on prometheus_client's global
one, so several mounts (or tests) in one process do not collide.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from threading import Thread
from typing import Any
from wsgiref.simple_server import WSGIServer

from prometheus_client import Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector, CollectorRegistry

from ..units import split_addr

log = logging.getLogger(__name__)

StatusFn = Callable[[], Mapping[str, Any]]

#: Private registry of the process-wide S3 latency histogram (one object store per process).
S3_REGISTRY = CollectorRegistry(auto_describe=True)

#: Wall time of one S3 API call, retries included, by operation (``get_object``, ...).
#: Buckets span a warm loopback GET (ms) up to the default request timeout (30 s).
S3_LATENCY = Histogram(
    "tierfs_s3_request_seconds",
    "Duration of S3 API calls, retries included, by operation",
    ["op"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0),
    registry=S3_REGISTRY,
)


def latency_status() -> dict[str, Any]:
    """The S3 latency histogram as plain numbers for the status dict: the bucket bounds (seconds)
    and, by operation, the cumulative count at each bound followed by the total.

    ``tierfs stats`` takes percentiles of the requests *between two polls* from the difference of
    two such snapshots, which a mean or a since-mount percentile could not give.
    """
    bounds: list[float] = []
    counts: dict[str, list[int]] = {}
    for family in S3_REGISTRY.collect():
        for sample in family.samples:
            if not sample.name.endswith("_bucket"):
                continue
            op = sample.labels["op"]
            le = sample.labels["le"]
            counts.setdefault(op, []).append(int(sample.value))
            if le != "+Inf" and (not bounds or float(le) > bounds[-1]):
                bounds.append(float(le))
    return {"s3_latency_bounds": bounds, "s3_latency_counts": counts}


@dataclass(frozen=True)
class _Spec:
    """How one scalar status key becomes one metric."""

    key: str
    name: str
    help: str
    counter: bool  # monotonic since mount start; else a gauge


_SCALARS: tuple[_Spec, ...] = (
    _Spec("cache_hits", "tierfs_cache_hits", "Block reads served from the chunk cache", True),
    _Spec("cache_misses", "tierfs_cache_misses", "Block reads that had to fetch from S3", True),
    _Spec("evictions", "tierfs_cache_evictions", "Chunks evicted by size, free-space or age limits", True),
    _Spec("cache_corrupt", "tierfs_cache_corrupt", "Cached chunks that failed validation", True),
    _Spec(
        "cache_store_failed",
        "tierfs_cache_store_failed",
        "Fetched blocks served uncached: the cache could not store them",
        True,
    ),
    _Spec(
        "integrity_retries",
        "tierfs_integrity_retries",
        "GETs refused by a checksum or length check and fetched again",
        True,
    ),
    _Spec("s3_bytes_fetched", "tierfs_s3_fetched_bytes", "Bytes received from S3 GETs", True),
    _Spec("errors", "tierfs_errors", "Operations that failed with an I/O error", True),
    _Spec("conflicts", "tierfs_conflicts", "Uploads that lost a race (saved as .conflict)", True),
    _Spec("uploads_done", "tierfs_uploads_done", "Write-back operations completed", True),
    _Spec("uploads_failed", "tierfs_uploads_failed", "Write-back operations that failed", True),
    _Spec("bytes_uploaded", "tierfs_uploaded_bytes", "Bytes uploaded by write-back", True),
    _Spec("prefetched_blocks", "tierfs_prefetched_blocks", "Blocks fetched by read-ahead", True),
    _Spec("partial_reads", "tierfs_partial_reads", "Random reads served from part of a cached block", True),
    _Spec("hidden_keys", "tierfs_hidden_keys", "Keys hidden because they are not valid POSIX names", True),
    _Spec("shadowed_keys", "tierfs_shadowed_keys", "Objects shadowed by a directory of the same name", True),
    _Spec("cache_bytes", "tierfs_cache_bytes", "Logical bytes held in the chunk cache", False),
    _Spec("cache_bytes_on_disk", "tierfs_cache_disk_bytes", "Bytes the chunk cache uses on disk", False),
    _Spec("cache_limit_bytes", "tierfs_cache_limit_bytes", "Configured cache size cap", False),
    _Spec("cache_free_disk_bytes", "tierfs_cache_free_disk_bytes", "Free bytes on the cache disk", False),
    _Spec("chunks_cached", "tierfs_cache_chunks", "Chunks in the cache", False),
    _Spec("pinned_bytes", "tierfs_cache_pinned_bytes", "Bytes on disk of pinned objects", False),
    _Spec("compression_ratio", "tierfs_cache_compression_ratio", "Logical / on-disk cache bytes", False),
    _Spec("dirty_files", "tierfs_dirty_files", "Files written locally and not yet uploaded", False),
    _Spec("dirty_bytes", "tierfs_dirty_bytes", "Bytes written locally and not yet uploaded", False),
    _Spec("uploads_pending", "tierfs_uploads_pending", "Write-back operations queued", False),
    _Spec("uptime_seconds", "tierfs_uptime_seconds", "Seconds since the mount started", False),
    _Spec("direct_reads", "tierfs_direct_reads", "Reads served by direct readers from the cache dir", True),
    _Spec("direct_bytes", "tierfs_direct_bytes", "Bytes served by direct readers from the cache dir", True),
    _Spec("shared_hits", "tierfs_shared_hits", "Blocks served from the shared cache tier", True),
    _Spec("shared_misses", "tierfs_shared_misses", "Shared-tier lookups that found no valid entry", True),
    _Spec("shared_bytes", "tierfs_shared_bytes", "Bytes served from the shared cache tier", True),
    _Spec("shared_puts", "tierfs_shared_puts", "Blocks uploaded to the shared cache tier", True),
    _Spec("shared_put_dropped", "tierfs_shared_put_dropped", "Shared-tier fills dropped (queue full)", True),
    _Spec("shared_errors", "tierfs_shared_errors", "Shared-tier requests failed or entries invalid", True),
    _Spec("shared_get_ms", "tierfs_shared_get_ms", "Mean latency of a shared-tier GET (ms)", False),
    _Spec("memory_hits", "tierfs_memory_hits", "Blocks served from the memory tier", True),
    _Spec("memory_hit_bytes", "tierfs_memory_hit_bytes", "Bytes served from the memory tier", True),
    _Spec("disk_hits", "tierfs_disk_hits", "Blocks (or parts) served from the local disk tier", True),
    _Spec("disk_hit_bytes", "tierfs_disk_hit_bytes", "Bytes served from the local disk tier", True),
    _Spec("s3_in_flight", "tierfs_s3_in_flight", "Origin requests started, not yet answered", False),
    _Spec("uploads_running", "tierfs_uploads_running", "Write-back operations being uploaded now", False),
    _Spec("hints_received", "tierfs_hints_received", "Paths hinted by loaders (read next)", True),
    _Spec("hints_fetched", "tierfs_hints_fetched", "Hinted files fetched ahead of their reader", True),
    _Spec("hints_dropped_behind", "tierfs_hints_dropped_behind", "Hints dropped: reader past them", True),
    _Spec("hints_skipped_full", "tierfs_hints_skipped_full", "Hints skipped: no room in the cache", True),
    _Spec("hints_missing", "tierfs_hints_missing", "Hinted paths that named no file", True),
    _Spec("hints_demand_fetches", "tierfs_hints_demand_fetches", "Files fetched whole for a miss", True),
    _Spec("hints_queued", "tierfs_hints_queued", "Hints queued, not yet fetched", False),
    _Spec("hints_ahead_bytes", "tierfs_hints_ahead_bytes", "Hinted bytes ahead of readers", False),
)


class StatusCollector(Collector):
    """Reads the mount's status dict at scrape time and yields it as Prometheus metric families.

    Keys missing from the dict, or ``None`` (e.g. no cache cap), are left out rather than
    reported as 0: an absent series is honest, a fake zero is not.
    """

    def __init__(self, status_fn: StatusFn) -> None:
        self._status_fn = status_fn

    def collect(self) -> Iterator[Metric]:
        up = GaugeMetricFamily("tierfs_up", "1 if the mount answered the status query of this scrape")
        try:
            status = self._status_fn()
        except Exception as exc:  # a failing scrape must not take the HTTP thread down
            log.warning("metrics: status query failed: %s", exc)
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        yield from _labelled_counter(
            status, "s3_requests", "tierfs_s3_requests", "S3 API calls by operation", "op"
        )
        yield from _labelled_counter(
            status, "direct_fallbacks", "tierfs_direct_fallbacks", "Direct reads sent to the mount", "reason"
        )
        yield from _read_bytes_family(status)
        yield from _snapshot_families(status)
        for spec in _SCALARS:
            value = status.get(spec.key)
            if isinstance(value, bool) or not isinstance(value, int | float):
                continue
            family = (CounterMetricFamily if spec.counter else GaugeMetricFamily)(spec.name, spec.help)
            family.add_metric([], float(value))
            yield family


def _labelled_counter(
    status: Mapping[str, Any], key: str, name: str, help: str, label: str
) -> Iterator[Metric]:
    """A status dict of counts by one label (e.g. fallbacks by reason) as one counter family."""
    counts = status.get(key)
    if not isinstance(counts, Mapping):
        return
    family = CounterMetricFamily(name, help, labels=[label])
    for value, count in sorted(counts.items()):
        family.add_metric([str(value)], float(count))
    yield family


def _read_bytes_family(status: Mapping[str, Any]) -> Iterator[Metric]:
    family = CounterMetricFamily("tierfs_read_bytes", "Bytes served to readers, by source", labels=["source"])
    found = False
    for source, key in (("cache", "bytes_from_cache"), ("s3", "bytes_from_s3")):
        value = status.get(key)
        if isinstance(value, int | float):
            family.add_metric([source], float(value))
            found = True
    if found:
        yield family


#: Per mounted snapshot (docs/snapshots.md), labelled by its name: key in status["snapshot"], metric, help.
_SNAPSHOT_GAUGES = (
    ("cached_bytes", "tierfs_snapshot_cached_bytes", "Bytes of its looked-up files cached on this node"),
    ("hits", "tierfs_snapshot_hits", "Block reads of the snapshot served from the cache"),
    ("misses", "tierfs_snapshot_misses", "Block reads of the snapshot fetched from S3"),
    ("last_use", "tierfs_snapshot_last_use_seconds", "Unix time of the last read of the snapshot"),
    ("files", "tierfs_snapshot_files", "Files in the snapshot"),
    ("bytes", "tierfs_snapshot_bytes", "Bytes of the snapshot's files"),
)


def _snapshot_families(status: Mapping[str, Any]) -> Iterator[Metric]:
    snapshot = status.get("snapshot")
    if not isinstance(snapshot, Mapping):
        return
    for key, name, help in _SNAPSHOT_GAUGES:
        value = snapshot.get(key)
        if isinstance(value, int | float) and not isinstance(value, bool):
            family = GaugeMetricFamily(name, help, labels=["snapshot"])
            family.add_metric([str(snapshot.get("name", ""))], float(value))
            yield family


class MetricsServer:
    """A running metrics endpoint; :meth:`close` stops it. ``port`` is the bound one (useful with 0)."""

    def __init__(self, server: WSGIServer, thread: Thread) -> None:
        self._server = server
        self._thread = thread
        self.host: str = str(server.server_address[0])
        self.port: int = int(server.server_address[1])

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5.0)


def build_registry(status_fn: StatusFn) -> CollectorRegistry:
    """One mount's registry: its status collector plus the process-wide S3 latency histogram."""
    registry = CollectorRegistry(auto_describe=False)  # describing would call status_fn at registration
    registry.register(StatusCollector(status_fn))
    registry.register(S3_REGISTRY)
    return registry


def serve(addr: str, status_fn: StatusFn) -> MetricsServer:
    """Serve ``/metrics`` on ``addr`` from a daemon thread of prometheus_client; return a handle.

    ``status_fn`` runs in the HTTP thread on every scrape; if it must read state owned by an
    event loop, have it hop onto the loop (e.g. ``trio.from_thread.run_sync``). Raises
    OSError if the address cannot be bound, so a typo fails the mount instead of silently
    serving nothing.
    """
    host, port = split_addr(addr)
    server, thread = start_http_server(port, host, registry=build_registry(status_fn))
    handle = MetricsServer(server, thread)
    log.info("serving Prometheus metrics on %s:%d/metrics", host, handle.port)
    return handle
