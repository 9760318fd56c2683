"""The read path: (object version, offset, length) to bytes.

``hydrator`` looks every block up through the cache tiers (``cache.stack.Tiers``: memory, the
local disk, and inside a fetch the shared tier) and then S3,
fetching misses as contiguous runs in one ranged GET pinned to the version seen at open, and
drives sequential read-ahead. It may import the cache, meta and store layers and the bottom
modules only. Trio loop: its async API runs on the loop and never blocks it. The memory tier
and bookkeeping are on the loop, and so is the read of a small object's cached block (at most
``LOOP_READ_MAX``); every other chunk-cache call and every S3 GET runs in a worker thread
behind the I/O or S3 limiter. ``follow`` retries a read whose bytes moved to a new key while
it waited (a rename's server-side copy and the delete of its source ran meanwhile). ``engine``
is the cold fetch engine: CRT GETs sent from the loop with no thread waiting on them, answered
before their cache write, which one writer thread batches (its loop rules are in its docstring).
``places`` is the one question a READ asks of the layers above: where the file's bytes are now
(staged, or under which key); ``BytePlaces.where`` runs on the loop and does no I/O.
"""
