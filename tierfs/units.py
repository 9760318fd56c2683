"""Parsing and printing of human sizes and durations (``500M``, ``200G``, ``1d``, ``indefinite``)."""

from __future__ import annotations

import math
import re

from .errors import ConfigError

_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kKmMgGtTpP]?)(i?[bB]?)\s*$")
_SIZE_FACTORS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40, "p": 1 << 50}
_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_DURATION_FACTORS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}


def parse_size(text: str) -> int:
    """Parse ``500M``/``200G``/``1.5GiB``/``4096`` into bytes (binary multiples, like rclone and s3fs)."""
    match = _SIZE_RE.match(text)
    if not match:
        raise ConfigError(f"invalid size {text!r} (expected e.g. 500M, 200G, 4096)")
    number, unit, _ = match.groups()
    return int(float(number) * _SIZE_FACTORS[unit.lower()])


def parse_duration(text: str, *, allow_indefinite: bool = False) -> float:
    """Parse ``30``, ``2s``, ``5m``, ``1d`` into seconds; ``indefinite`` into ``math.inf`` where allowed."""
    if allow_indefinite and text.strip().lower() in ("indefinite", "inf", "infinite", "forever"):
        return math.inf
    match = _DURATION_RE.match(text)
    if not match:
        extra = " or 'indefinite'" if allow_indefinite else ""
        raise ConfigError(f"invalid duration {text!r} (expected e.g. 30, 2s, 5m, 1h, 1d{extra})")
    number, unit = match.groups()
    return float(number) * _DURATION_FACTORS[unit]


def split_addr(addr: str) -> tuple[str, int]:
    """``HOST:PORT``, ``[V6]:PORT`` or ``:PORT`` (all interfaces) -> (host, port); ValueError if not."""
    host, sep, port = addr.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"invalid address {addr!r} (expected HOST:PORT)")
    if host.startswith("[") != host.endswith("]"):
        raise ValueError(f"invalid address {addr!r} (expected HOST:PORT or [IPV6]:PORT)")
    host = host.removeprefix("[").removesuffix("]")
    return host or "0.0.0.0", int(port)


def format_bytes(n: float) -> str:
    """Render a byte count for humans (``1.5 GiB``)."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def parse_mode(text: str) -> int:
    """Parse an octal permission string such as ``0644`` or ``755``."""
    try:
        value = int(text, 8)
    except ValueError:
        raise ConfigError(f"invalid mode {text!r} (expected octal, e.g. 0644)") from None
    if not 0 <= value <= 0o7777:
        raise ConfigError(f"invalid mode {text!r} (must be within 0000..7777)")
    return value
