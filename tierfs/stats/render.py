"""Drawing a :class:`~tierfs.stats.frame.Frame`: rich tables for a terminal, plain lines otherwise.

Both renderings carry the same figures in the same order, so a script that parses the plain form
(``tierfs stats MNT --once | grep origin``) reads what an operator sees on screen.
"""

from __future__ import annotations

from typing import Any

from rich.console import Group
from rich.table import Table
from rich.text import Text

from ..units import format_bytes
from .frame import PERCENTILES, Frame, LatencyRow


def _rate_bytes(n: float) -> str:
    return f"{n / 1e6:.1f} MB/s"


def _ratio(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def _ms(value: float | None, over: float | None) -> str:
    if value is not None:
        return f"{1000 * value:.1f} ms"
    return f">{1000 * over:.0f} ms" if over is not None else "-"


def _latency_cells(row: LatencyRow) -> list[str]:
    return [_ms(v, row.over) for v in row.percentiles]


def _pct_names() -> list[str]:
    return [f"p{round(100 * q):d}" for q in PERCENTILES]


def _snapshot_text(values: dict[str, Any], rates: dict[str, float]) -> str:
    parts = []
    for key, value in values.items():
        text = f"{key}={value}"
        if key in rates:
            text += f" ({rates[key]:+.1f}/s)"
        parts.append(text)
    return "  ".join(parts) or "-"


def _errors_text(frame: Frame) -> str:
    shared = "" if frame.shared_errors is None else f", shared tier {frame.shared_errors}"
    return f"{frame.errors} ({frame.errors_per_s:.1f}/s), upload failures {frame.upload_failures}{shared}"


def plain(frame: Frame) -> list[str]:
    """The frame as lines of ``label  value`` text, for pipes, logs and tests."""
    lines = [f"tierfs stats {frame.mountpoint}  (interval {frame.interval:.2f} s)"]
    lines.append("tier          reads/s      MB/s")
    for row in frame.tiers:
        lines.append(f"{row.tier:<12} {row.reads_per_s:8.1f} {row.bytes_per_s / 1e6:9.2f}")
    lines.append(f"hit ratio     {_ratio(frame.hit_ratio)} (since mount {_ratio(frame.hit_ratio_total)})")
    in_flight = "-" if frame.gets_in_flight is None else str(frame.gets_in_flight)
    lines.append(f"s3 in flight  {in_flight}")
    if frame.latency:
        for lat in frame.latency:
            cells = " ".join(f"{n}={c}" for n, c in zip(_pct_names(), _latency_cells(lat), strict=True))
            lines.append(f"s3 latency    {lat.op} n={lat.requests} {cells}")
    else:
        lines.append("s3 latency    no requests answered in this interval")
    reasons = ", ".join(f"{k}={v}" for k, v in sorted(frame.direct_fallback_reasons.items())) or "-"
    lines.append(
        f"direct reader {frame.direct_reads_per_s:.1f} reads/s {_rate_bytes(frame.direct_bytes_per_s)} "
        f"fallbacks {frame.direct_fallbacks_per_s:.1f}/s ({reasons})"
    )
    lines.append(
        f"write-back    pending {frame.uploads_pending} (running {frame.uploads_running}) "
        f"done {frame.uploads_per_s:.1f}/s {_rate_bytes(frame.upload_bytes_per_s)} "
        f"dirty {frame.dirty_files} files {format_bytes(frame.dirty_bytes)}"
    )
    lines.append(f"errors        {_errors_text(frame)}")
    for snap in frame.snapshots:
        lines.append(f"snapshot      {snap.name}  {_snapshot_text(snap.values, snap.rates)}")
    return lines


def rich_view(frame: Frame) -> Group:
    """The frame as rich tables (redrawn in place by :class:`rich.live.Live`)."""
    header = Text(
        f"tierfs stats {frame.mountpoint}  (every {frame.interval:.1f} s, Ctrl-C to quit)", style="bold"
    )
    tiers = Table(expand=False)
    tiers.add_column("tier")
    tiers.add_column("reads/s", justify="right")
    tiers.add_column("MB/s", justify="right")
    for row in frame.tiers:
        tiers.add_row(row.tier, f"{row.reads_per_s:.1f}", f"{row.bytes_per_s / 1e6:.2f}")
    direct = (f"{frame.direct_reads_per_s:.1f}", f"{frame.direct_bytes_per_s / 1e6:.2f}")
    tiers.add_row("direct reader (6 s)", *direct, style="cyan")

    summary = Table.grid(padding=(0, 2))
    summary.add_column(style="bold")
    summary.add_column()
    summary.add_row("hit ratio", f"{_ratio(frame.hit_ratio)} (since mount {_ratio(frame.hit_ratio_total)})")
    summary.add_row("s3 in flight", "-" if frame.gets_in_flight is None else str(frame.gets_in_flight))
    reasons = ", ".join(f"{k}={v}" for k, v in sorted(frame.direct_fallback_reasons.items())) or "-"
    summary.add_row("direct fallbacks", f"{frame.direct_fallbacks_per_s:.1f}/s ({reasons})")
    summary.add_row(
        "write-back",
        f"pending {frame.uploads_pending} (running {frame.uploads_running}) done {frame.uploads_per_s:.1f}/s "
        f"{_rate_bytes(frame.upload_bytes_per_s)}",
    )
    summary.add_row("dirty", f"{frame.dirty_files} files, {format_bytes(frame.dirty_bytes)}")
    errors = Text(_errors_text(frame))
    if frame.errors_per_s > 0:
        errors.stylize("bold red")
    summary.add_row("errors", errors)

    latency = Table()
    latency.add_column("S3 op (this interval)")
    latency.add_column("n", justify="right")
    for name in _pct_names():
        latency.add_column(name, justify="right")
    for lat in frame.latency:
        latency.add_row(lat.op, str(lat.requests), *_latency_cells(lat))
    if not frame.latency:
        latency.add_row("-", "0", *["-" for _ in PERCENTILES])

    parts: list[Any] = [header, tiers, summary, latency]
    if frame.snapshots:
        snaps = Table(title="snapshots", title_justify="left")
        snaps.add_column("snapshot")
        snaps.add_column("fields")
        for snap in frame.snapshots:
            snaps.add_row(snap.name, _snapshot_text(snap.values, snap.rates))
        parts.append(snaps)
    return Group(*parts)
