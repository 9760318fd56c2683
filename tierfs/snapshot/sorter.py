"""Sorting rows by key in bounded memory, for key lists that do not arrive sorted.

A LIST answers in key order, but an imported key list or CSV may be in any order. Rows are
sorted in runs of ``run_rows``, each run spilled to a temporary file, and the runs merged
(``heapq.merge``), so memory stays one run however long the list. Exact duplicates are
dropped; two different rows for one key are refused: a manifest must say which version of a
key it means. A LIST's rows skip the sort (:func:`checked_order`).
"""

from __future__ import annotations

import heapq
import json
import tempfile
from collections.abc import Iterable, Iterator
from typing import IO

from .format import KEY, ManifestError, Row

RUN_ROWS = 200_000


def _spill(rows: list[Row], directory: str | None) -> IO[str]:
    rows.sort(key=lambda row: row[KEY])
    out = tempfile.TemporaryFile("w+", encoding="utf-8", dir=directory)  # noqa: SIM115 (closed by the caller)
    for row in rows:
        out.write(json.dumps(row, ensure_ascii=False))
        out.write("\n")
    out.seek(0)
    return out


def _read(run: IO[str]) -> Iterator[Row]:
    for line in run:
        yield json.loads(line)


def sorted_rows(rows: Iterable[Row], *, run_rows: int = RUN_ROWS, tmpdir: str | None = None) -> Iterator[Row]:
    """``rows`` in key order, each key once."""
    runs: list[IO[str]] = []
    buffer: list[Row] = []
    try:
        for row in rows:
            buffer.append(row)
            if len(buffer) >= run_rows:
                runs.append(_spill(buffer, tmpdir))
                buffer = []
        if not runs:
            buffer.sort(key=lambda row: row[KEY])
            yield from _unique(buffer)
            return
        runs.append(_spill(buffer, tmpdir))
        yield from _unique(heapq.merge(*(_read(r) for r in runs), key=lambda row: row[KEY]))
    finally:
        for run in runs:
            run.close()


def checked_order(rows: Iterable[Row]) -> Iterator[Row]:
    """Rows that must already be in key order (a LIST answers so); a server that breaks the
    order is refused rather than trusted to make a table that bisects wrongly."""
    previous: str | None = None
    for row in rows:
        if previous is not None and row[KEY] <= previous:
            raise ManifestError(f"the listing is not in key order at {row[KEY]!r}")
        previous = row[KEY]
        yield row


def _unique(rows: Iterable[Row]) -> Iterator[Row]:
    previous: Row | None = None
    for row in rows:
        if previous is not None and row[KEY] == previous[KEY]:
            if row != previous:
                raise ManifestError(f"key {row[KEY]!r} is listed twice with different metadata")
            continue
        previous = row
        yield row
