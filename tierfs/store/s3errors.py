"""The one error map of the object store: an S3 answer (status and error code) to a tierfs error.

Both clients use it: boto3's errors (``objectstore.map_error``) and the CRT reader's
(``crtget``). Message text is never inspected; it differs between servers and versions.
"""

from __future__ import annotations

from ..errors import (
    AccessDenied,
    IntegrityError,
    NotFound,
    Permanent,
    PreconditionFailed,
    RangeNotSatisfiable,
    StoreError,
    Unavailable,
)

_NOT_FOUND_CODES = frozenset({"NoSuchKey", "NoSuchBucket", "NoSuchUpload", "NotFound", "404"})
_PRECONDITION_CODES = frozenset({"PreconditionFailed", "ConditionalRequestConflict", "412"})
_RANGE_CODES = frozenset({"InvalidRange", "416"})
_DENIED_CODES = frozenset(
    {
        "AccessDenied",
        "AllAccessDisabled",
        "AccountProblem",
        "Forbidden",
        "InvalidAccessKeyId",
        "InvalidSecurity",
        "SignatureDoesNotMatch",
        "403",
    }
)
# Codes that heal by themselves although some arrive with a 4xx status (RequestTimeout is a
# 400, ExpiredToken a 400 that a credential refresh cures, RequestTimeTooSkewed a 403 that
# botocore's clock correction cures, OperationAborted a 409 "try again").
_TRANSIENT_CODES = frozenset(
    {
        "RequestTimeout",
        "RequestTimeTooSkewed",
        "ExpiredToken",
        "TokenRefreshRequired",
        "OperationAborted",
        "SlowDown",
        "Throttling",
        "ThrottlingException",
        "RequestLimitExceeded",
        "TooManyRequests",
        "InternalError",
        "ServiceUnavailable",
    }
)
# The server received other bytes than we sent (a flip in transit): retrying heals it.
_INTEGRITY_CODES = frozenset({"BadDigest", "XAmzContentSHA256Mismatch", "XAmzContentChecksumMismatch"})


def classify(status: int | None, code: str, message: str) -> StoreError:
    """The one place where an S3 answer becomes a tierfs error, by status and error code.

    ``status`` is the HTTP status (None when no response arrived), ``code`` the S3 error
    code from the body ('' when absent, e.g. for HEAD). Message text is never inspected:
    it differs between servers and versions.
    """
    if code in _INTEGRITY_CODES:
        return IntegrityError(message)
    if code in _TRANSIENT_CODES:
        return Unavailable(message)
    if status == 404 or code in _NOT_FOUND_CODES:
        return NotFound(message)
    if status == 412 or code in _PRECONDITION_CODES:
        return PreconditionFailed(message)
    if status == 416 or code in _RANGE_CODES:
        return RangeNotSatisfiable(message)
    if status == 403 or code in _DENIED_CODES:
        return AccessDenied(message)
    if status is not None and 400 <= status < 500 and status not in (408, 429):
        return Permanent(message)
    return Unavailable(message)  # 5xx, 408, 429, no answer at all
