"""Write-back export: the journal, staging files, scheduler, streams and uploader behind ``WriteBack``.

See docs/writeback.md for the state machine these parts follow.
"""

from .core import BytesAt, WriteBack, WriteBackStats

__all__ = ["BytesAt", "WriteBack", "WriteBackStats"]
