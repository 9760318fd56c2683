"""Tell systemd how the mount is doing (``Type=notify``), without libsystemd.

systemd hands a ``Type=notify`` service the address of a datagram socket in
``$NOTIFY_SOCKET``; one datagram of newline-separated ``KEY=VALUE`` lines is the whole
protocol (see sd_notify(3)). Speaking it directly avoids a C dependency for ten lines of
code. Two rules shape this module:

* Outside systemd (``NOTIFY_SOCKET`` unset) every call is a silent no-op, so the daemon
  can call :func:`ready` unconditionally.
* Nothing here ever raises: a notification is advice to the service manager, and a
  failure to deliver it must not take down a live mount. Failures are logged instead.

``READY=1`` must be sent only once the FUSE mount is *live* (the kernel answers requests),
because units ordered ``After=`` this one start as soon as systemd receives it.
"""

from __future__ import annotations

import logging
import os
import socket

log = logging.getLogger(__name__)

_ENV = "NOTIFY_SOCKET"


def _address(raw: str) -> bytes | None:
    """Turn ``$NOTIFY_SOCKET`` into a sockaddr_un path, or None if it is not one we can use.

    A leading ``@`` names a Linux abstract socket, whose address starts with a NUL byte.
    Other forms (``vsock:``, relative paths) are not used by systemd for host services.
    """
    if raw.startswith("@"):
        return b"\0" + os.fsencode(raw[1:])
    if raw.startswith("/"):
        return os.fsencode(raw)
    return None


def notify(*assignments: str) -> bool:
    """Send ``KEY=VALUE`` lines in one datagram; return True if systemd got them.

    Returns False (and does nothing) when not running under a notify-aware manager, and
    False with a warning logged when delivery fails.
    """
    raw = os.environ.get(_ENV)
    if not raw:
        return False
    address = _address(raw)
    if address is None:
        log.warning("ignoring unsupported %s=%r (want an absolute path or @abstract)", _ENV, raw)
        return False
    for line in assignments:
        if "\n" in line or "=" not in line:
            log.warning("not sending malformed sd_notify assignment %r", line)
            return False
    payload = "\n".join(assignments).encode("utf-8", "replace")
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.sendto(payload, address)
    except (OSError, ValueError) as exc:  # ValueError: address too long / embedded NUL in a path
        log.warning("could not notify systemd via %s=%r: %s", _ENV, raw, exc)
        return False
    return True


def _status_line(text: str) -> str:
    """One ``STATUS=`` line; newlines would start a new assignment, so they become spaces."""
    return "STATUS=" + " ".join(text.splitlines())


def ready(status: str | None = None) -> bool:
    """The mount is live: systemd may now start units ordered after this one."""
    lines = ["READY=1"]
    if status is not None:
        lines.append(_status_line(status))
    return notify(*lines)


def stopping(status: str | None = None) -> bool:
    """Shutdown has begun; write-back is being flushed before the mount goes away."""
    lines = ["STOPPING=1"]
    if status is not None:
        lines.append(_status_line(status))
    return notify(*lines)


def extend_timeout(seconds: float) -> bool:
    """Ask for ``seconds`` more before systemd gives up on start-up or shutdown.

    A long flush at stop can outlast ``TimeoutStopSec``; sending this periodically while
    progress is being made keeps systemd from killing a daemon that is still uploading.
    """
    return notify(f"EXTEND_TIMEOUT_USEC={max(0, int(seconds * 1_000_000))}")
