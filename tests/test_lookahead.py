"""The look-ahead's bounds in-process (``tierfs.control.lookahead``), with a fake namespace and
fetcher: the window in files and bytes, drop-behind, a full cache, and one fetch per file when a
reader's miss meets the look-ahead. tests/test_hints.py covers the same on real mounts."""

from __future__ import annotations

import errno

import trio

from tierfs.control.lookahead import LookAhead
from tierfs.read.hydrator import ObjectVersion

MiB = 1 << 20


class Fake:
    """Files of given sizes; fetches wait until released, so tests see what is in flight."""

    def __init__(self, sizes: dict[str, int], budget: int = 1 << 40) -> None:
        self.sizes = sizes
        self.budget = budget
        self.fetching: list[str] = []
        self.fetched: list[str] = []
        self.release = trio.Event()
        self.full = False

    async def resolve(self, path: str) -> ObjectVersion | None:
        size = self.sizes.get(path)
        return None if size is None else ObjectVersion(1, path, "etag", size)

    async def hydrate(self, version: ObjectVersion) -> None:
        self.fetching.append(version.key)
        await self.release.wait()
        if self.full:
            raise OSError(errno.ENOSPC, "full")
        self.fetched.append(version.key)

    def look_ahead(self, **kw: int) -> LookAhead:
        return LookAhead(
            resolve=self.resolve, hydrate=self.hydrate, budget=lambda: self.budget,
            workers=kw.get("workers", 4), max_files=kw.get("max_files", 1000), max_bytes=1 << 40,
            is_cached=lambda v: v.key in self.fetched,
        )  # fmt: skip


async def settle() -> None:
    await trio.testing.wait_all_tasks_blocked(0.01)


async def test_the_window_bounds_files_and_bytes_and_moves_with_the_reader() -> None:
    paths = [f"f{i}" for i in range(20)]
    fake = Fake(dict.fromkeys(paths, MiB), budget=5 * MiB)
    la = fake.look_ahead(workers=8, max_files=3)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(la.run)
        la.hint("s", paths=paths, start=0, position=None, end=False)
        await settle()
        assert fake.fetching == ["f0", "f1", "f2"]  # the file window, though 8 workers are idle
        la.hint("s", paths=[], start=None, position=2, end=False)
        await settle()
        assert fake.fetching == ["f0", "f1", "f2", "f3", "f4"]
        la.max_files = 100
        la.hint("s", paths=[], start=None, position=3, end=False)
        await settle()
        # bytes now: f3..f7 is 5 MiB ahead of position 3, the budget
        assert fake.fetching[-1] == "f7" and la.status()["hints_ahead_bytes"] <= 5 * MiB
        fake.release.set()
        la.hint("s", paths=[], start=None, position=18, end=False)
        await settle()
        status = la.status()
        assert status["hints_dropped_behind"] == 18 - 8  # f8..f17 were never started
        assert sorted(fake.fetched[-2:]) == ["f18", "f19"] and status["hints_queued"] == 0
        nursery.cancel_scope.cancel()


async def test_a_file_that_does_not_fit_waits_at_the_head_of_the_queue() -> None:
    fake = Fake({"a": 3 * MiB, "b": 3 * MiB, "c": MiB}, budget=4 * MiB)
    la = fake.look_ahead(workers=1)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(la.run)
        la.hint("s", paths=["a", "b", "c"], start=0, position=None, end=False)
        fake.release.set()
        await settle()
        assert fake.fetched == ["a"]  # b does not fit beside a; c must not jump the queue
        la.hint("s", paths=[], start=None, position=1, end=False)
        await settle()
        assert fake.fetched == ["a", "b", "c"]
        nursery.cancel_scope.cancel()


async def test_a_full_cache_pauses_the_stream_until_the_reader_moves() -> None:
    fake = Fake({f"f{i}": MiB for i in range(6)})
    fake.full = True
    fake.release.set()
    la = fake.look_ahead(workers=1)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(la.run)
        la.hint("s", paths=[f"f{i}" for i in range(6)], start=0, position=None, end=False)
        await settle()
        assert fake.fetching == ["f0"] and la.status()["hints_skipped_full"] == 1
        fake.full = False
        la.hint("s", paths=[], start=None, position=1, end=False)
        await settle()
        assert fake.fetched == [f"f{i}" for i in range(1, 6)]
        nursery.cancel_scope.cancel()


async def test_a_miss_waits_for_the_look_ahead_fetch_of_the_same_file() -> None:
    fake = Fake({"a": MiB})
    la = fake.look_ahead()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(la.run)
        la.hint("s", paths=["a"], start=0, position=None, end=False)
        await settle()
        assert fake.fetching == ["a"]
        nursery.start_soon(la.fetch_now, ObjectVersion(1, "a", "etag", MiB))
        await settle()
        fake.release.set()
        await settle()
        assert fake.fetching == ["a"] and fake.fetched == ["a"], "one fetch for the hint and the miss"
        assert la.status()["hints_demand_fetches"] == 1
        nursery.cancel_scope.cancel()


async def test_chunks_sent_again_are_not_queued_twice_and_a_gap_is_refused() -> None:
    fake = Fake({})
    la = fake.look_ahead()
    assert la.hint("s", paths=["a", "b"], start=0, position=None, end=False)["accepted"] == 2
    assert la.hint("s", paths=["a", "b", "c"], start=0, position=None, end=False)["accepted"] == 3
    assert la.status()["hints_queued"] == 3 and la.status()["hints_received"] == 3
    try:
        la.hint("s", paths=["z"], start=7, position=None, end=False)
    except ValueError as exc:
        assert "out of order" in str(exc)
    else:
        raise AssertionError("a gap in the numbering was accepted")
    la.hint("s", paths=[], start=None, position=None, end=True)
    assert la.status()["hint_streams"] == 0


def test_hint_requests_are_cut_by_count_and_by_size() -> None:
    from tierfs.reader.hints import batches

    assert [len(b) for b in batches([f"p{i}" for i in range(5)], count=2)] == [2, 2, 1]
    long = ["x" * 1000] * 10
    cut = list(batches(long, count=100, size=3000))
    assert [len(b) for b in cut] == [2, 2, 2, 2, 2] and [p for b in cut for p in b] == long
    assert list(batches([])) == []
