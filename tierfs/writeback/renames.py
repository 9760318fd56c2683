"""Directory renames in progress: what write-back holds back while one is being journaled.

A directory rename moves every key below it, but the namespace moves at once and the journal
entries follow (``WriteBack.renamed``). In between:

- puts below the old name that have not started are *frozen*: they are re-journaled under
  the new name, and one starting meanwhile would upload to a key the rename deletes;
- records must not stop being LOCAL (no op may *settle* them): a listing would otherwise drop
  entries whose objects the pending copies have not made yet. Settling is *deferred* and run
  once the last directory rename in progress is journaled.

Only this part changes these fields; the executor asks ``holds``, the settler ``defer``. Plain
bookkeeping on the trio loop.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from .journal import Op


class DirRenames:
    def __init__(self) -> None:
        self._frozen: list[str] = []  # old keys of directories whose rename is being journaled
        self._open = 0  # directory renames between the namespace's move and their journal entries
        self._deferred: set[int] = set()  # inodes whose settling waits for them

    def holds(self, op: Op) -> bool:
        """Whether ``op`` must not start: a put below a directory whose rename is being journaled."""
        return bool(self._frozen) and op.kind == "put" and any(op.key.startswith(p) for p in self._frozen)

    def defer(self, ino: int) -> bool:
        """Defer settling ``ino`` while a directory rename is open; whether it was deferred."""
        if self._open:
            self._deferred.add(ino)
        return bool(self._open)

    @contextlib.contextmanager
    def bracket(self, is_dir: bool) -> Iterator[None]:
        """From before the namespace moves a directory until its journal entries exist."""
        self._open += is_dir
        try:
            yield
        finally:
            self._open -= is_dir

    def take_deferred(self) -> list[int]:
        """The inodes to settle now that no directory rename is open (none while one is)."""
        if self._open:
            return []
        deferred, self._deferred = sorted(self._deferred), set()
        return deferred

    @contextlib.contextmanager
    def freezing(self, old_key: str) -> Iterator[None]:
        self._frozen.append(old_key)
        try:
            yield
        finally:
            self._frozen.remove(old_key)
