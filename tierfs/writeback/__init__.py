"""Write-back export: the journal, staging files, scheduler, streams and uploader behind ``WriteBack``.

``core.WriteBack`` is the façade over parts, each of which alone changes its own state: ``journal``
(the durable op list in LMDB), ``ledger`` (its ops in memory, indexed per inode), ``files`` (staging
files, their writers and when they retire), ``staging`` (the files themselves), ``writes`` (a file's
changes become staging work and journal entries), ``executor`` (journals ops, starts and runs them),
``settle`` (what a finished op means for the record and its staging file), ``waiters`` (fsync and
flush), ``rename_journal`` (the bucket side of renames), ``renames`` (what a directory rename in
progress holds back), ``attempts`` (failed ops and when they are retried), ``wakeup`` (the
executor's wake-ups), ``schedule`` (which ops may start), ``stream`` (multipart uploads of files
written sequentially) and ``upload`` (one op against the bucket). See docs/writeback.md for the
state machine these parts follow. It may import read, cache, meta, store and the bottom modules.
Trio loop: the async API runs on the loop; file I/O, LMDB writes and S3 calls go through
``run_io``/``run_s3`` (worker threads).
"""

from .core import WriteBack, WriteBackStats

__all__ = ["WriteBack", "WriteBackStats"]
