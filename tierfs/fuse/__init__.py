"""The FUSE adapter: translates pyfuse3 requests into calls on the layers below, and nothing more.

``operations`` is the pyfuse3 ``Operations`` implementation: it translates each request into a call
on ``tierfs.fs.FileSystem`` and owns no state of its own; ``errnos`` maps the tierfs error
vocabulary to errno once (only ``FUSEError`` may leave a handler) and builds entry attributes;
``kerneltune`` raises the kernel's per-mount FUSE knobs in sysfs. It may import fs, writeback, read,
cache, meta, store and the bottom modules, never control or daemon. Trio loop: every handler is a
trio task on the loop and does only short work there (what the file system's rules allow); S3, disk
I/O and LMDB writes happen in the layers below, in worker threads. ``kerneltune.tune`` blocks and
runs in a worker thread, and kernel invalidations (``invalidate_inode``/``invalidate_entry``) never
run on the loop.
"""
