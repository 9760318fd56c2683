"""Start-up pieces of a mount that come before any layer: logging, and the object store.

The store is built and its bucket probed here, before the mount wires the layers, so bad
input (a wrong endpoint, a missing bucket, denied credentials) fails as one line with no
mount half made.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

from ..config import MountConfig
from ..errors import AccessDenied, ConfigError, NotFound, Unavailable
from ..store.objectstore import S3ObjectStore
from .metrics import S3_LATENCY


def preflight_store(cfg: MountConfig) -> Any:
    """Build the S3 client and prove the bucket is usable, mapping failures to one line.

    The probe uses a short timeout and one retry, so bad input fails fast; the store
    the mount keeps uses the configured limits.
    """

    def store(**limits: Any) -> S3ObjectStore:
        return S3ObjectStore(
            cfg.source.bucket, endpoint_url=cfg.endpoint_url, region=cfg.region, profile=cfg.profile, **limits
        )

    probe = store(timeout=min(cfg.timeout, 15.0), retries=1, max_pool=2, fast_gets=False)
    where = cfg.endpoint_url or "the default S3 endpoint"
    try:
        probe.check_bucket()
    except NotFound:
        raise ConfigError(f"bucket {cfg.source.bucket!r} does not exist at {where}") from None
    except AccessDenied as exc:
        raise ConfigError(
            f"access to bucket {cfg.source.bucket!r} denied (check credentials): {exc}"
        ) from None
    except Unavailable as exc:
        raise ConfigError(f"cannot reach {where}: {exc}") from None
    return store(
        timeout=cfg.timeout,
        retries=cfg.retries,
        max_pool=cfg.s3_concurrency + 8,
        part_size=cfg.part_size,
        multipart_threshold=cfg.multipart_threshold,
        part_concurrency=cfg.upload_concurrency,
        observe=lambda op, seconds: S3_LATENCY.labels(op).observe(seconds),
    )


def shared_store(cfg: MountConfig) -> S3ObjectStore | None:
    """The client of the shared cache tier's bucket, or None without ``--shared-cache``.

    Every call is bounded by ``--shared-cache-timeout`` with no retries: the tier answers fast or is
    a miss. A bucket that does not exist or refuses our credentials is a configuration error, found
    here; a tier that does not answer now is not (it may come up later; until then reads use the
    origin), so that only logs a warning.
    """
    shared = cfg.shared_cache
    if shared is None:
        return None
    endpoint = cfg.shared_cache_endpoint_url or cfg.endpoint_url
    store = S3ObjectStore(
        shared.bucket,
        endpoint_url=endpoint,
        region=cfg.region,
        profile=cfg.shared_cache_profile or cfg.profile,
        timeout=cfg.shared_cache_timeout,
        retries=0,
        max_pool=32,
        observe=lambda op, seconds: S3_LATENCY.labels(f"shared_{op}").observe(seconds),
    )
    where = endpoint or "the default S3 endpoint"
    try:
        store.check_bucket()
    except NotFound:
        raise ConfigError(f"shared cache bucket {shared.bucket!r} does not exist at {where}") from None
    except AccessDenied as exc:
        raise ConfigError(f"access to shared cache bucket {shared.bucket!r} denied: {exc}") from None
    except Unavailable as exc:
        log = logging.getLogger("tierfs")
        log.warning("shared cache tier at %s not answering (%s): reads use the origin", where, exc)
    return store


def setup_logging(cfg: MountConfig, daemonized: bool) -> None:
    level = getattr(logging, cfg.log_level.upper(), logging.INFO)
    handlers: list[logging.Handler] = []
    if cfg.log_file is not None:
        handlers.append(logging.FileHandler(cfg.log_file))
    elif daemonized:
        handlers.append(logging.FileHandler(cfg.resolved_cache_dir / "tierfs.log"))
    else:
        handlers.append(logging.StreamHandler(sys.stderr))
    logging.basicConfig(
        level=level, handlers=handlers, format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True
    )
    for noisy in ("botocore", "boto3", "urllib3", "s3transfer"):
        logging.getLogger(noisy).setLevel(max(level, logging.WARNING))
