"""One screen of ``tierfs stats``: rates and gauges computed from two status snapshots.

The daemon only keeps counters since it started (the same ones ``tierfs status`` and the
Prometheus endpoint show); every per-second figure here is the difference of two snapshots
divided by the time between them, computed client-side, so watching costs the daemon one cheap
status call per second and no state. Pure functions of their inputs: nothing here talks to a
socket or a terminal (see :mod:`tierfs.stats.render` and :mod:`tierfs.stats.live`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

#: Percentiles shown for the S3 latency of each operation.
PERCENTILES = (0.5, 0.9, 0.99)


@dataclass(frozen=True)
class Snapshot:
    """A status dict and the monotonic time it was taken at."""

    at: float
    status: Mapping[str, Any]


@dataclass(frozen=True)
class TierRow:
    """Reads per second and bytes per second served by one level (memory ... origin)."""

    tier: str
    reads_per_s: float
    bytes_per_s: float


@dataclass(frozen=True)
class LatencyRow:
    """Requests of one S3 operation answered during the interval, and their latency percentiles.

    A percentile is ``None`` when it lies beyond the largest histogram bound (then ``over`` is that
    bound): the histogram cannot say how much beyond."""

    op: str
    requests: int
    percentiles: tuple[float | None, ...]
    over: float | None = None


@dataclass(frozen=True)
class SnapshotRow:
    """One mounted dataset snapshot (whatever the daemon reports for it): its scalar fields, and
    the per-second rate of each numeric field that moved."""

    name: str
    values: dict[str, Any]
    rates: dict[str, float]


@dataclass
class Frame:
    mountpoint: str
    interval: float
    tiers: list[TierRow] = field(default_factory=list)
    hit_ratio: float | None = None  # blocks found in a cache tier / all block lookups, this interval
    hit_ratio_total: float | None = None  # the same since the mount started
    gets_in_flight: int | None = None
    latency: list[LatencyRow] = field(default_factory=list)
    direct_reads_per_s: float = 0.0
    direct_bytes_per_s: float = 0.0
    direct_fallbacks_per_s: float = 0.0
    direct_fallback_reasons: dict[str, int] = field(default_factory=dict)  # over the direct window
    uploads_pending: int = 0
    uploads_running: int = 0
    uploads_per_s: float = 0.0
    upload_bytes_per_s: float = 0.0
    dirty_files: int = 0
    dirty_bytes: int = 0
    errors: int = 0
    errors_per_s: float = 0.0
    upload_failures: int = 0
    shared_errors: int | None = None
    snapshots: list[SnapshotRow] = field(default_factory=list)


def _num(status: Mapping[str, Any], key: str) -> float:
    value = status.get(key)
    if isinstance(value, bool) or not isinstance(value, int | float):
        return 0.0
    return float(value)


def _sum_map(status: Mapping[str, Any], key: str) -> int:
    value = status.get(key)
    if not isinstance(value, Mapping):
        return 0
    return sum(int(v) for v in value.values() if isinstance(v, int | float))


def _map_delta(old: Mapping[str, Any], new: Mapping[str, Any], key: str) -> dict[str, int]:
    before = old.get(key) if isinstance(old.get(key), Mapping) else {}
    after = new.get(key) if isinstance(new.get(key), Mapping) else {}
    assert isinstance(before, Mapping) and isinstance(after, Mapping)
    out = {str(k): int(v) - int(before.get(k, 0)) for k, v in after.items() if isinstance(v, int | float)}
    return {k: v for k, v in out.items() if v > 0}


def quantile(q: float, bounds: Sequence[float], counts: Sequence[int]) -> tuple[float | None, float | None]:
    """The ``q`` quantile of a histogram, as Prometheus' ``histogram_quantile`` estimates it: linear
    interpolation within the bucket that holds it. ``counts`` are cumulative, one per bound and a
    last one for +Inf. Returns ``(value, None)``, or ``(None, last_bound)`` when it lies in +Inf."""
    total = counts[-1] if counts else 0
    if total <= 0:
        return None, None
    target = q * total
    lower, below = 0.0, 0
    for bound, cumulative in zip(bounds, counts, strict=False):
        if cumulative >= target:
            inside = cumulative - below
            share = (target - below) / inside if inside else 1.0
            return lower + (bound - lower) * share, None
        lower, below = bound, cumulative
    return None, bounds[-1] if bounds else None


def latency_rows(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[LatencyRow]:
    """Percentiles of the requests answered between the two snapshots, per operation."""
    bounds = new.get("s3_latency_bounds")
    after = new.get("s3_latency_counts")
    if not isinstance(bounds, list) or not isinstance(after, Mapping):
        return []
    before = old.get("s3_latency_counts")
    before = before if isinstance(before, Mapping) else {}
    rows: list[LatencyRow] = []
    for op, counts in sorted(after.items()):
        prior = before.get(op) or [0] * len(counts)
        if len(prior) != len(counts):
            prior = [0] * len(counts)
        delta = [int(a) - int(b) for a, b in zip(counts, prior, strict=True)]
        if not delta or delta[-1] <= 0:
            continue
        values: list[float | None] = []
        over: float | None = None
        for q in PERCENTILES:
            value, beyond = quantile(q, bounds, delta)
            values.append(value)
            over = beyond if beyond is not None else over
        rows.append(LatencyRow(str(op), delta[-1], tuple(values), over))
    return rows


def snapshot_rows(old: Mapping[str, Any], new: Mapping[str, Any], interval: float) -> list[SnapshotRow]:
    """One row per entry of the status' ``snapshots`` (a mapping of name -> fields, or a list of
    field mappings with a ``name`` or ``id``) and for its ``snapshot`` (the pinned one). Only scalar
    fields are shown; nothing about their meaning is assumed, so whatever the daemon reports per
    snapshot appears here."""
    rows: list[SnapshotRow] = []
    for name, fields in _snapshot_entries(new).items():
        prior = _snapshot_entries(old).get(name, {})
        values = {
            k: v
            for k, v in fields.items()
            if k != "name" and (isinstance(v, str | int | float | bool) or v is None)
        }
        rates = {
            k: (v - prior[k]) / interval
            for k, v in values.items()
            if isinstance(v, int | float) and not isinstance(v, bool)
            and isinstance(prior.get(k), int | float) and v != prior[k] and interval > 0
        }  # fmt: skip
        rows.append(SnapshotRow(name, values, rates))
    return rows


def _snapshot_entries(status: Mapping[str, Any]) -> dict[str, Mapping[str, Any]]:
    """``snapshots`` (several) and ``snapshot`` (the one a ``--snapshot`` mount pins, with its
    ``name``), whichever the daemon reports."""
    found = _entries(status.get("snapshots"))
    one = status.get("snapshot")
    if isinstance(one, Mapping):
        found[str(one.get("name", "snapshot"))] = one
    return found


def _entries(raw: Any) -> dict[str, Mapping[str, Any]]:
    if isinstance(raw, Mapping):
        return {str(k): v for k, v in raw.items() if isinstance(v, Mapping)}
    if isinstance(raw, list):
        out: dict[str, Mapping[str, Any]] = {}
        for n, item in enumerate(raw):
            if isinstance(item, Mapping):
                out[str(item.get("name", item.get("id", n)))] = item
        return out
    return {}


#: Direct readers run in client processes: they report their counts in batch files (at least once
#: a second) that the daemon adds up in its maintenance pass (every 5 s), so their counters move in
#: steps. Their rates are taken over this window, not the last interval, to show a rate, not bursts.
DIRECT_WINDOW = 6.0


def build(old: Snapshot, new: Snapshot, direct_from: Snapshot | None = None) -> Frame:
    """The frame for the interval between two snapshots of the same mount; the direct reader's
    rates over ``direct_from`` .. ``new`` (a snapshot about :data:`DIRECT_WINDOW` old) if given."""
    a, b = old.status, new.status
    dt = max(new.at - old.at, 1e-6)
    far = direct_from or old
    direct_dt = max(new.at - far.at, 1e-6)

    def rate(key: str) -> float:
        return max(0.0, _num(b, key) - _num(a, key)) / dt

    def direct_rate(key: str) -> float:
        return max(0.0, _num(b, key) - _num(far.status, key)) / direct_dt

    tiers = [
        TierRow("memory", rate("memory_hits"), rate("memory_hit_bytes")),
        TierRow("local disk", rate("disk_hits"), rate("disk_hit_bytes")),
    ]
    if "shared_hits" in b:
        tiers.append(TierRow("shared", rate("shared_hits"), rate("shared_bytes")))
    origin_gets = _num(b.get("s3_requests", {}), "get_object") - _num(a.get("s3_requests", {}), "get_object")
    tiers.append(TierRow("origin", max(0.0, origin_gets) / dt, rate("s3_bytes_fetched")))
    hits = _num(b, "cache_hits") - _num(a, "cache_hits")
    misses = _num(b, "cache_misses") - _num(a, "cache_misses")
    fallbacks = _map_delta(far.status, b, "direct_fallbacks")
    in_flight = b.get("s3_in_flight")
    total_ratio = b.get("hit_ratio")
    shared_errors = b.get("shared_errors")
    return Frame(
        mountpoint=str(b.get("mountpoint", "")),
        interval=dt,
        tiers=tiers,
        hit_ratio=hits / (hits + misses) if hits + misses > 0 else None,
        hit_ratio_total=float(total_ratio) if isinstance(total_ratio, int | float) else None,
        gets_in_flight=int(in_flight) if isinstance(in_flight, int) else None,
        latency=latency_rows(a, b),
        direct_reads_per_s=direct_rate("direct_reads"),
        direct_bytes_per_s=direct_rate("direct_bytes"),
        direct_fallbacks_per_s=sum(fallbacks.values()) / direct_dt,
        direct_fallback_reasons=fallbacks,
        uploads_pending=int(_num(b, "uploads_pending")),
        uploads_running=int(_num(b, "uploads_running")),
        uploads_per_s=rate("uploads_done"),
        upload_bytes_per_s=rate("bytes_uploaded"),
        dirty_files=int(_num(b, "dirty_files")),
        dirty_bytes=int(_num(b, "dirty_bytes")),
        errors=int(_num(b, "errors")),
        errors_per_s=rate("errors"),
        upload_failures=int(_num(b, "uploads_failed")),
        shared_errors=int(shared_errors) if isinstance(shared_errors, int) else None,
        snapshots=snapshot_rows(a, b, dt),
    )
