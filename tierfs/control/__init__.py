"""The control layer: ``tierfs status/flush/prefetch/evict/pin/...`` against a running mount.

``protocol`` is the JSON-lines protocol over a Unix socket (the daemon's server and the CLI's
client); ``registry`` the mount registry that finds a mount's socket (standard library only, so
light clients such as the direct reader's hints use it without trio); ``lookahead`` the queue of
hinted files the daemon fetches ahead of their readers (docs/reader.md, "Hints"); ``ops``
implements the operations a mount answers, on the parts the mount's wiring hands it; ``progress``
renders their progress on a terminal. A new CLI verb adds an operation to ``ops`` and a command
to ``tierfs.cli``. It may import fuse,
writeback, read, cache, meta, store and the bottom modules, never daemon. Trio loop: the server
and the operations run as trio tasks on the mount's loop and keep only short work there; cache
and LMDB writes go through the mount's ``run_io``, S3 through its limiter. The client and
progress are blocking CLI-side code and never run inside the daemon's loop.
"""
