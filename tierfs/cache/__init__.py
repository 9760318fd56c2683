"""The cache layer: object bytes kept on local disk, surviving remounts.

``chunkcache`` stores fixed-size self-validating blocks in files indexed by an LMDB
environment, with eviction, age-out, pins and zstd; its on-disk format is docs/cache-format.md.
A new cache tier goes here. It may import the bottom modules (errors, units, config) and the
store and meta layers only, never the read path or anything above. Trio loop: none, with one
measured exception. It is a plain blocking, thread-safe library called from worker threads
(the I/O limiter, or the S3 worker that fetched a run for ``put_many``); only the hydrator's
read of a small object's cached block (``read.hydrator.LOOP_READ_MAX``) runs on the loop.
"""
