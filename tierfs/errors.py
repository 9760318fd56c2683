"""Error vocabulary shared by every layer.

The object store turns botocore's and awscrt's many failure types into these few, so that
the layers above can decide between ENOENT, EIO, a conflict and "give up now" without
knowing either client. Two distinctions matter most:

- NotFound (a definite 404) versus Unavailable (anything transient): only the former may
  ever make a file disappear.
- Permanent versus Unavailable: a permanent refusal (403, 400, NoSuchBucket on a write, any
  4xx but 404/408/412/416/429) will not heal by retrying, so write-back reports it at once
  instead of retrying forever; Unavailable (timeouts, connection errors, 5xx, 429, 408) is
  retried up to a deadline.
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


class Permanent(StoreError):
    """The server refused the request in a way retrying cannot fix (403, 400, other 4xx)."""


class AccessDenied(Permanent):
    """The credentials are wrong or lack permission (403)."""


class RangeNotSatisfiable(StoreError):
    """HTTP 416: the requested range starts at or past the end of the object."""


class Unavailable(StoreError):
    """Timeout, connection failure, 5xx or throttling after bounded retries. Never means 'deleted'."""


class IntegrityError(Unavailable):
    """Bytes from the server failed their checksum (ETag MD5 or x-amz-checksum-*).

    Transient by nature (a flipped bit in transit): the bytes are never cached or served,
    and the caller may fetch again.
    """


class FlushFailed(TierfsError):
    """``flush``/``umount`` could not get every pending change into the bucket.

    ``failures`` maps each path (or key) that is still pending to its last error. The data
    stays staged and journaled for a later flush or the next mount.
    """

    def __init__(self, failures: dict[str, str], reason: str) -> None:
        self.failures = dict(failures)
        self.reason = reason
        named = "; ".join(f"{path}: {error}" for path, error in sorted(self.failures.items())[:20])
        more = f" (+{len(self.failures) - 20} more)" if len(self.failures) > 20 else ""
        super().__init__(f"{reason}: {named}{more}" if named else reason)
