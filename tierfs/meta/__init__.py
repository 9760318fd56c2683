"""The metadata layer: S3 keys as a tree of inodes, kept in LMDB. ``namespace`` resolves and lists
directories (the only place that asks S3 about metadata), ``records`` packs the LMDB records,
``keys`` maps S3 keys to POSIX names and back (pure), ``posixmeta`` reads and writes POSIX
attributes in user metadata (pure), ``tombstones`` hides keys deleted here from listings,
``groupcommit`` batches concurrent LMDB writes into one commit and flush (shared by record
updates and the write-back journal), ``importer`` re-lists cached directories in the
background, and ``cachedir`` owns the cache directory: its lock, its ownership by one source
and its two LMDB environments (the durable ``meta`` and the unsynced chunk ``index``). It may
import the store layer and the bottom modules (errors, units, config) only.
Trio loop: short LMDB read transactions (lookups, getattr, readdir of a fresh listing), the
pure helpers and tombstone updates may run on the loop; a listing (S3 LIST plus one LMDB write
transaction per page) and every other write transaction run in worker threads, and the
importer is a trio task that only schedules such listings.
"""
