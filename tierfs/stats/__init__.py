"""``tierfs stats MOUNTPOINT``: a live view of where a mount's reads come from, redrawn every second.

In the spirit of ``juicefs stats``: reads/s and MB/s by tier (memory, local disk, shared, origin)
and for the direct reader, hit ratio, S3 requests in flight and latency percentiles, write-back
queue and dirty bytes, errors, and one line per mounted snapshot. :mod:`.frame` computes a screen
from two status snapshots, :mod:`.render` draws it (rich on a terminal, plain text otherwise),
:mod:`.live` polls the daemon. See README "Watching a mount".
"""

from .frame import Frame, Snapshot, build
from .live import run, status_poller

__all__ = ["Frame", "Snapshot", "build", "run", "status_poller"]
