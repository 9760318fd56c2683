"""Error vocabulary shared by every layer.

The object store turns botocore's many exception types into these few, so that the
layers above can decide between ENOENT, EIO and a conflict without knowing botocore.
The most important distinction is NotFound (a definite 404) versus Unavailable
(anything transient): only the former may ever make a file disappear.
"""

from __future__ import annotations


class TierfsError(Exception):
    """Base class of every error tierfs raises on purpose."""


class ConfigError(TierfsError):
    """Bad user input (options, source URL, cache dir). Reported as one line, exit 2."""


class StoreError(TierfsError):
    """An object-store call failed."""


class NotFound(StoreError):
    """The server answered a definite 404 (NoSuchKey / NoSuchBucket)."""


class PreconditionFailed(StoreError):
    """A conditional request (If-Match / If-None-Match) did not hold: someone else changed the object."""


class AccessDenied(StoreError):
    """The credentials are wrong or lack permission (403)."""


class RangeNotSatisfiable(StoreError):
    """HTTP 416: the requested range starts at or past the end of the object."""


class Unavailable(StoreError):
    """Timeout, connection failure, 5xx or throttling after bounded retries. Never means 'deleted'."""
