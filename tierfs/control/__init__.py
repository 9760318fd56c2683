"""The control layer: ``tierfs status/flush/prefetch/evict/pin/...`` against a running mount.

``registry`` finds a mount's daemon by mountpoint or by any path, and ``client`` is the
JSON-lines framing over its Unix socket, with the errors and a blocking client: both are
trio-free and stdlib only, because the CLI and the direct reader (``tierfs.reader``) import
them. ``protocol`` is the daemon's server; ``ops`` implements the operations a mount answers,
on the parts the mount's wiring hands it; ``lookahead`` the queue of hinted files the daemon
fetches ahead of their readers (docs/reader.md, "Hints"); ``progress`` renders their progress on a terminal.
A new CLI verb adds an operation to ``ops`` and a command to ``tierfs.cli``. It may import
fuse, writeback, read, cache, meta, store and the bottom modules, never daemon. Trio loop: the
server and the operations run as trio tasks on the mount's loop and keep only short work
there; cache and LMDB writes go through the mount's ``run_io``, S3 through its limiter. The
client and progress are blocking caller-side code and never run inside the daemon's loop.
"""
