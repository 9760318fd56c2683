"""The cache layer: object bytes kept on local disk, surviving remounts.

``tier`` is the one cache-tier interface (``CacheTier``) and ``stack`` composes tiers in
order, memory -> local disk -> shared -> origin; callers hold the composition, never a tier.
The tiers: ``memory`` (an LRU of recent blocks), ``chunkcache`` (the local disk tier: its file
format is ``blockfile``, its LMDB index ``index``, its policy ``eviction``; docs/cache-format.md)
and ``shared`` (an S3-compatible bucket shared by nodes; docs/shared-cache.md). ``chunkkey``
names a block. A new cache tier is one new module here implementing ``CacheTier``.

It may import the bottom modules (errors, units, config) and the store and meta layers only, never
the read path or anything above. Trio loop: by level, as ``tier`` states: the memory tier's
calls and the disk tier's index lookups may run on the loop, and so may the hydrator's read of
a small object's cached block (``read.hydrator.LOOP_READ_MAX``); everything else is blocking,
thread-safe and called from worker threads (the I/O limiter, or the S3 worker of a fetch).
"""
