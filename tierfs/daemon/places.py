"""The read path's ``BytePlaces`` seam (``tierfs/read/places.py``) answered by write-back.

A small adapter over WriteBack's current methods (``is_staged``, ``data_key``, ``read``): the
read layer may not import write-back, so the daemon, which knows both, joins them here.
"""

from __future__ import annotations

from ..read.places import Where
from ..writeback import WriteBack


class WriteBackPlaces:
    def __init__(self, writeback: WriteBack) -> None:
        self._wb = writeback

    def where(self, ino: int, key: str) -> Where:
        if self._wb.is_staged(ino):
            return Where(True, key)
        return Where(False, self._wb.data_key(ino, key))

    async def read_staged(self, ino: int, offset: int, size: int) -> bytes | None:
        return await self._wb.read(ino, offset, size)
