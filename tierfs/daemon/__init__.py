"""The daemon: one live mount, wired and run on one trio loop.

``mount`` builds every layer from a MountConfig, hands each what it needs and owns the
background tasks and the start/stop order; ``lifecycle`` does preflight, daemonizing, serving
and clean shut-down; ``startup`` sets up logging and probes the store before any layer exists;
``sdnotify``, ``metrics`` and ``memory`` talk to systemd, Prometheus and glibc; ``places``
answers the read path's ``BytePlaces`` from write-back. It is the only layer that
knows all the others and may import any of them; only the commands (``tierfs.cli``) may
import it. Trio loop:
the mount's tasks run on it and send all blocking work (S3 calls, disk I/O, LMDB writes,
``pyfuse3`` invalidations, kernel tuning) to worker threads through ``run_s3``/``run_io``;
sdnotify's datagrams and ``memory.trim`` are cheap, never raise and may be called on the loop;
the metrics collector runs in the Prometheus server's thread; preflight, the fork and
opening the cache directory happen before the loop starts.
"""
