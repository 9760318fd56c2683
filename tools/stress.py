"""Concurrency stress test of a real tierfs mount, checked against an in-memory model (issue 11).

Why it exists: under ordinary training-job load (writers that overwrite, rename and
delete while readers read) tierfs served old or mixed bytes after the write had been
acknowledged, and left older versions in the bucket with the newest one at a
``.conflict-`` key. Unit tests of single operations did not show it; only many threads
racing the write-back scheduler did. This tool reproduces that load and checks every
byte:

* **Writers** (at least 8) each own a subtree ``w<N>/`` (and ``w<N>/sub/``) with a small,
  fixed pool of names. They create small (1-200 KiB) and 8 MiB files, overwrite them
  (``O_TRUNC``), patch them in place (``pwrite``, holes included), append, truncate
  (``truncate`` and ``ftruncate``), rename within their tree (to a free name and onto an
  existing one), delete, ``fsync`` some, read back and list their directories.
* **Readers** read random files (and names known to be absent) of every tree.
* **The model** (:class:`Model`) holds the bytes of every file. It is updated when each
  system call returns, i.e. when the write is acknowledged. Every operation on a path
  holds that path's lock (a rename holds both), so no read overlaps a write of the same
  path, and any difference between a read and the model is a tierfs bug, never a race
  of the test. A wrong read is reported with the digest it got and, if those bytes are
  an earlier version of some file, which one (a stale read) or "no version ever
  written" (a mix).
* **After the run** every file is read once more through the mount, ``tierfs flush``
  must exit 0, and the bucket (boto3 list + get of every key) must hold exactly the
  model: the same keys (``dir/`` markers aside), the same bytes, and no ``.conflict-``
  key (tierfs conflicting with itself).
* **Memory**: the daemon's RSS is sampled (``/proc/PID/status``), and its peak
  (``VmHWM``) must stay at or below ``--rss-limit`` (300 MiB, the issue's bound).

Standalone, it starts its own SeaweedFS on loopback:
``python -m tools.stress --seconds 60 --threads 16 [--busy 2] [--delay-faults]``.
``--busy N`` runs N busy loops beside the mount (the CPU contention of the issue);
``--delay-faults`` puts ``tools/faultproxy.py`` in front of the server with 30 % of
requests delayed by 0.3-1.5 s. The exit status is non-zero on any wrong read,
error, bucket mismatch, failed flush or RSS above the limit. ``tests/test_stress.py``
runs :func:`run_stress` at a small size inside ``make test``; ``make stress`` runs it
for 10 minutes. Everything started here (mount, server, proxy, busy loops) is torn
down by pid whatever happens.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import os
import random
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter, deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from tools.bench import TierfsSystem
from tools.bench_workloads import process_status_kib
from tools.faultproxy import FaultProxy, Rule
from tools.servers import SeaweedFS, child_env, s3_client, terminate_process_group

KiB = 1024
MiB = 1024 * KiB
SMALL_MAX = 200 * KiB
BIG_SIZE = 8 * MiB
IO_CHUNK = 1 * MiB  # writes and reads go in 1 MiB pieces, FUSE's max_write
NAMES_PER_DIR = 8  # a small pool, so creates reuse names that were just deleted or renamed away
MAX_BIG_PER_WRITER = 2
DEFAULT_RSS_LIMIT_MIB = 300.0
SHOWN = 10  # wrong reads / errors / mismatches printed in full
HISTORY = 64  # changes remembered per path, for the report on paths with problems
SHOWN_HISTORY = 12  # of which the report prints this many


def digest(data: bytes | bytearray) -> str:
    """Short content id used in reports (sha256, 16 hex digits: enough to tell versions apart)."""
    return hashlib.sha256(data).hexdigest()[:16]


def describe(data: bytes | bytearray | None) -> str:
    return "absent" if data is None else f"{len(data)} B sha256:{digest(data)}"


# --------------------------------------------------------------------------- the model


@dataclass(frozen=True)
class Version:
    """One acknowledged content of one path: which write produced it, and when."""

    path: str
    seq: int
    op: str
    at: float  # time.monotonic()
    wall: float = 0.0  # time.time(), to line up with the mount log
    size: int | None = None  # None: the path is absent after this change
    sha: str = ""

    def line(self) -> str:
        stamp = time.strftime("%H:%M:%S", time.localtime(self.wall)) + f".{int(self.wall * 1000) % 1000:03d}"
        state = "absent" if self.size is None else f"{self.size} B sha256:{self.sha}"
        return f"{stamp} #{self.seq} {self.op} -> {state}"


class Model:
    """What every file must contain, per path, as last acknowledged by a system call.

    Writers call :meth:`set` / :meth:`remove` right after the syscall that made the
    change returned. Every digest ever acknowledged is kept (16 hex digits per version),
    so a wrong read can be classified as "an earlier version of X" (stale) or as bytes
    that were never written (a mix of versions, or garbage).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._files: dict[str, bytes] = {}
        self._last: dict[str, Version] = {}
        self._path_locks: dict[str, threading.Lock] = {}
        self._seen: dict[str, Version] = {}
        self._history: dict[str, deque[Version]] = {}
        self._seq = 0
        self.tainted: set[str] = set()  # paths whose state is unknown after a failed syscall

    @contextlib.contextmanager
    def locked(self, *paths: str) -> Iterator[None]:
        """Hold the per-path locks of ``paths`` (sorted, so two renames cannot deadlock)."""
        with self._lock:
            locks = [self._path_locks.setdefault(p, threading.Lock()) for p in sorted(set(paths))]
        for lock in locks:
            lock.acquire()
        try:
            yield
        finally:
            for lock in reversed(locks):
                lock.release()

    def get(self, path: str) -> bytes | None:
        with self._lock:
            return self._files.get(path)

    def _record(self, path: str, op: str, data: bytes | None, merge: bool = False) -> Version:
        """Note a change of ``path`` (the caller holds the model lock); ``merge`` replaces the
        last history entry (the next 1 MiB piece of one write call is not a new step)."""
        self._seq += 1
        sha = "" if data is None else digest(data)
        version = Version(
            path, self._seq, op, time.monotonic(), time.time(), None if data is None else len(data), sha
        )
        self._last[path] = version
        history = self._history.setdefault(path, deque(maxlen=HISTORY))
        if merge and history and history[-1].op == op:
            history.pop()
        history.append(version)
        return version

    def set(self, path: str, data: bytes, op: str, merge: bool = False) -> None:
        with self._lock:
            self._files[path] = data
            version = self._record(path, op, data, merge)
            self._seen.setdefault(version.sha, version)

    def remove(self, path: str, op: str) -> None:
        with self._lock:
            self._files.pop(path, None)
            self._record(path, op, None)

    def rename(self, src: str, dst: str) -> None:
        with self._lock:
            data = self._files.pop(src)
            self._files[dst] = data
            self._record(src, f"renamed to {dst}", None)
            self._record(dst, f"renamed from {src}", data)

    def history(self, path: str, around: float | None = None) -> list[str]:
        """The last changes of ``path`` (for a report: what happened to it, and when), or
        those within a few seconds before (and one after) the wall-clock time ``around``."""
        with self._lock:
            versions = list(self._history.get(path, ()))
        if around is not None:
            versions = [v for v in versions if around - 6.0 <= v.wall <= around + 1.0]
        return [v.line() for v in versions[-SHOWN_HISTORY:]]

    def last_change(self, path: str) -> Version | None:
        with self._lock:
            return self._last.get(path)

    def identify(self, data: bytes | bytearray) -> str:
        """Which acknowledged version these bytes are, if any."""
        with self._lock:
            version = self._seen.get(digest(data))
        if version is None:
            return "matches no version ever written (mixed or garbage bytes)"
        return f"= version #{version.seq} of {version.path} ({version.op})"

    def paths(self, prefix: str = "") -> list[str]:
        with self._lock:
            return sorted(p for p in self._files if p.startswith(prefix))

    def snapshot(self) -> dict[str, bytes]:
        with self._lock:
            return dict(self._files)


# --------------------------------------------------------------------------- findings


@dataclass(frozen=True)
class WrongRead:
    """A read (or stat, or listing) through the mount that disagreed with the model."""

    thread: str
    path: str
    context: str  # what was checked, e.g. "read after overwrite" or "pread 4096+100"
    expected: str
    got: str
    verdict: str  # stale / mixed, see Model.identify
    since_change: float | None  # seconds since the model's last change of the path
    history: tuple[str, ...] = ()  # the path's last changes when the read was checked

    def line(self) -> str:
        age = "" if self.since_change is None else f", {self.since_change:.2f} s after its last change"
        return (
            f"{self.path} [{self.context}, {self.thread}{age}]: expected {self.expected}, "
            f"got {self.got} {self.verdict}"
        )


@dataclass(frozen=True)
class OpError:
    thread: str
    op: str
    path: str
    error: str
    history: tuple[str, ...] = ()  # the path's last changes when the call failed

    def line(self) -> str:
        return f"{self.op} {self.path} [{self.thread}]: {self.error}"


@dataclass
class Findings:
    """Everything the threads saw, gathered under one lock."""

    wrong_reads: list[WrongRead] = field(default_factory=list)
    errors: list[OpError] = field(default_factory=list)
    ops: Counter[str] = field(default_factory=Counter)
    verified_bytes: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def count(self, op: str, verified: int = 0) -> None:
        with self.lock:
            self.ops[op] += 1
            self.verified_bytes += verified

    def wrong(self, item: WrongRead) -> None:
        with self.lock:
            self.wrong_reads.append(item)

    def error(self, item: OpError) -> None:
        with self.lock:
            self.errors.append(item)


# --------------------------------------------------------------------------- I/O helpers


def write_all(fd: int, data: bytes | memoryview) -> int:
    """``write`` until everything is written (a FUSE write may be short); bytes written."""
    view = memoryview(data)
    done = 0
    while done < len(view):
        done += os.write(fd, view[done : done + IO_CHUNK])
    return done


def read_all(path: str) -> bytes:
    """The whole file through the kernel, in 1 MiB reads, as an application would."""
    fd = os.open(path, os.O_RDONLY)
    try:
        parts = []
        while chunk := os.read(fd, IO_CHUNK):
            parts.append(chunk)
        return b"".join(parts)
    finally:
        os.close(fd)


def pread_range(path: str, offset: int, length: int) -> bytes:
    fd = os.open(path, os.O_RDONLY)
    try:
        parts = []
        while length > 0:
            chunk = os.pread(fd, min(length, IO_CHUNK), offset)
            if not chunk:
                break
            parts.append(chunk)
            offset += len(chunk)
            length -= len(chunk)
        return b"".join(parts)
    finally:
        os.close(fd)


def patch(data: bytes, offset: int, piece: bytes) -> bytes:
    """``data`` after a pwrite of ``piece`` at ``offset`` (a gap past the end reads as zeros)."""
    if offset > len(data):
        data = data + bytes(offset - len(data))
    return data[:offset] + piece + data[offset + len(piece) :]


def range_verdict(want: bytes, got: bytes) -> str:
    """What a wrong partial read returned (a range cannot be matched against whole versions)."""
    if len(got) < len(want) and want.startswith(got):
        return f"{describe(got)}: a short read, the first {len(got)} bytes right (stale size?)"
    same = next(
        (i for i, (a, b) in enumerate(zip(want, got, strict=False)) if a != b), min(len(want), len(got))
    )
    return f"{describe(got)}: different bytes from offset +{same} of the range"


def resized(data: bytes, size: int) -> bytes:
    return data[:size] if size <= len(data) else data + bytes(size - len(data))


# --------------------------------------------------------------------------- workers


class Worker:
    """One thread of the load. Subclasses pick operations; this class checks reads."""

    def __init__(self, name: str, root: Path, model: Model, findings: Findings, seed: int) -> None:
        self.name = name
        self.root = root
        self.model = model
        self.findings = findings
        self.rng = random.Random(seed)

    def step(self) -> None:
        """One operation; the subclasses choose what."""
        raise NotImplementedError

    def path_of(self, rel: str) -> str:
        return str(self.root / rel)

    def fail(self, op: str, rel: str, exc: BaseException) -> None:
        """A syscall failed: record it, and stop checking a path whose state is now unknown."""
        history = tuple(self.model.history(rel))
        self.findings.error(OpError(self.name, op, rel, f"{type(exc).__name__}: {exc}", history))
        self.model.tainted.add(rel)

    def report_wrong(self, rel: str, context: str, expected: str, got: bytes | str) -> None:
        change = self.model.last_change(rel)
        since = None if change is None else time.monotonic() - change.at
        if isinstance(got, str):
            got_text, verdict = got, ""
        else:
            got_text, verdict = describe(got), self.model.identify(got)
        if change is not None:
            context = f"{context}; last change #{change.seq} {change.op}"
        history = tuple(self.model.history(rel))
        self.findings.wrong(WrongRead(self.name, rel, context, expected, got_text, verdict, since, history))

    def verify(self, rel: str, context: str) -> None:
        """Check ``rel`` against the model. The caller holds the path's lock."""
        if rel in self.model.tainted:
            return
        expected = self.model.get(rel)
        path = self.path_of(rel)
        try:
            if expected is None:
                try:
                    got = read_all(path)
                except FileNotFoundError:
                    self.findings.count("verify_absent")
                    return
                self.report_wrong(rel, context, "absent (deleted or renamed away)", got)
                return
            size = os.stat(path).st_size
            if size != len(expected):
                self.report_wrong(rel, f"stat, {context}", f"size {len(expected)}", f"size {size}")
            if expected and self.rng.random() < 0.25:  # a partial read, from anywhere in the file
                offset = self.rng.randrange(len(expected))
                length = self.rng.randrange(1, 256 * KiB)
                got = pread_range(path, offset, length)
                want = expected[offset : offset + length]
                if got != want:
                    self.report_wrong(
                        rel, f"pread {offset}+{length}, {context}", describe(want), range_verdict(want, got)
                    )
                self.findings.count("verify_pread", len(got))
                return
            got = read_all(path)
        except FileNotFoundError as exc:
            self.report_wrong(rel, context, describe(expected), f"ENOENT ({exc.strerror})")
            return
        except OSError as exc:
            self.fail(f"read ({context})", rel, exc)
            return
        if got != expected:
            self.report_wrong(rel, context, describe(expected), got)
        self.findings.count("verify_read", len(got))


class Writer(Worker):
    """Owns ``w<N>/`` and ``w<N>/sub/``; mutates only its own tree, so it alone changes those paths."""

    def __init__(self, index: int, root: Path, model: Model, findings: Findings, seed: int) -> None:
        super().__init__(f"writer{index}", root, model, findings, seed)
        self.tree = f"w{index}"
        self.names = [f"{self.tree}/f{j}" for j in range(NAMES_PER_DIR)] + [
            f"{self.tree}/sub/f{j}" for j in range(NAMES_PER_DIR)
        ]
        self.ops: list[tuple[Callable[[], None], int]] = [
            (self.create_small, 14),
            (self.create_big, 2),
            (self.overwrite, 14),
            (self.pwrite, 12),
            (self.append, 10),
            (self.truncate, 8),
            (self.rename_free, 8),
            (self.rename_onto, 6),
            (self.delete, 8),
            (self.read_own, 14),
            (self.list_own, 2),
        ]

    def setup(self) -> None:
        os.makedirs(self.path_of(f"{self.tree}/sub"), exist_ok=True)

    # -- choosing paths

    def existing(self) -> list[str]:
        return [p for p in self.model.paths(self.tree + "/") if p not in self.model.tainted]

    def free(self) -> list[str]:
        present = set(self.model.paths(self.tree + "/"))
        return [n for n in self.names if n not in present and n not in self.model.tainted]

    def big_count(self) -> int:
        return sum(1 for p in self.existing() if len(self.model.get(p) or b"") >= MiB)

    def small_data(self) -> bytes:
        return self.rng.randbytes(self.rng.randrange(1 * KiB, SMALL_MAX + 1))

    def step(self) -> None:
        funcs, weights = zip(*self.ops, strict=True)
        self.rng.choices(funcs, weights)[0]()

    def after_write(self, fd: int, rel: str, op: str) -> None:
        """fsync some files before close (an fsync must not return before the upload is done)."""
        if self.rng.random() < 0.12:
            os.fsync(fd)
            self.findings.count("fsync")

    def maybe_read_back(self, rel: str, op: str) -> None:
        """Read right after the change, while its upload is (likely) pending or in flight."""
        if self.rng.random() < 0.35:
            self.verify(rel, f"read after {op}")

    # -- operations (each holds the lock of every path it touches)

    def change_file(self, rel: str, op: str, flags: int, write: Callable[[int], None]) -> None:
        """Open ``rel``, let ``write(fd)`` change it (and the model), fsync some, close; then count the
        change and maybe read it back. The caller holds the path's lock."""
        fd = -1
        try:
            fd = os.open(self.path_of(rel), flags, 0o644)
            write(fd)
            self.after_write(fd, rel, op)
            os.close(fd)
            fd = -1
        except OSError as exc:
            self.fail(op, rel, exc)
            return
        finally:
            if fd >= 0:
                os.close(fd)
        self.findings.count(op)
        self.maybe_read_back(rel, op)

    def write_new(self, rel: str, data: bytes, op: str, flags: int) -> None:
        def write(fd: int) -> None:
            self.model.set(rel, b"", op)  # created empty, or truncated: the writes merge into it
            for offset in range(0, len(data), IO_CHUNK):
                piece = data[offset : offset + IO_CHUNK]
                write_all(fd, piece)
                self.model.set(rel, data[: offset + len(piece)], op, merge=True)

        with self.model.locked(rel):
            self.change_file(rel, op, flags, write)

    def create_small(self) -> None:
        if names := self.free():
            self.write_new(
                self.rng.choice(names), self.small_data(), "create", os.O_WRONLY | os.O_CREAT | os.O_EXCL
            )

    def create_big(self) -> None:
        names = self.free()
        if names and self.big_count() < MAX_BIG_PER_WRITER:
            data = self.rng.randbytes(BIG_SIZE)
            self.write_new(self.rng.choice(names), data, "create big", os.O_WRONLY | os.O_CREAT | os.O_EXCL)

    def overwrite(self) -> None:
        """``O_TRUNC`` rewrite; a big file stays big half the time (a new 8 MiB version)."""
        if not (names := self.existing()):
            return
        rel = self.rng.choice(names)
        was_big = len(self.model.get(rel) or b"") >= MiB
        data = self.rng.randbytes(BIG_SIZE) if was_big and self.rng.random() < 0.5 else self.small_data()
        self.write_new(rel, data, "overwrite", os.O_WRONLY | os.O_TRUNC)

    def modify(self, op: str, change: Callable[[int, bytes], bytes], flags: int = os.O_WRONLY) -> None:
        """Open an existing file and let ``change(fd, old)`` write to it and return the new model bytes."""
        if not (names := self.existing()):
            return
        rel = self.rng.choice(names)
        with self.model.locked(rel):
            old = self.model.get(rel)
            if old is None:
                return
            self.change_file(rel, op, flags, lambda fd: self.model.set(rel, change(fd, old), op))

    def pwrite(self) -> None:
        def change(fd: int, old: bytes) -> bytes:
            offset = self.rng.randrange(len(old) + 4 * KiB)  # sometimes past the end: a hole
            piece = self.rng.randbytes(self.rng.randrange(1, 64 * KiB))
            done = 0
            while done < len(piece):
                done += os.pwrite(fd, piece[done:], offset + done)
            return patch(old, offset, piece)

        self.modify("pwrite", change)

    def append(self) -> None:
        def change(fd: int, old: bytes) -> bytes:
            piece = self.rng.randbytes(self.rng.randrange(1, 128 * KiB))
            write_all(fd, piece)
            return old + piece

        self.modify("append", change, os.O_WRONLY | os.O_APPEND)

    def truncate(self) -> None:
        """Shrink or grow; by path (``truncate``) or on an open file (``ftruncate``)."""
        if not (names := self.existing()):
            return
        rel = self.rng.choice(names)
        with self.model.locked(rel):
            old = self.model.get(rel)
            if old is None:
                return
            size = self.rng.choice(
                [0, self.rng.randrange(len(old) + 1), len(old) + self.rng.randrange(64 * KiB)]
            )
            op = "truncate" if self.rng.random() < 0.5 else "ftruncate"
            try:
                if op == "truncate":
                    os.truncate(self.path_of(rel), size)
                    self.model.set(rel, resized(old, size), op)
                else:
                    fd = os.open(self.path_of(rel), os.O_WRONLY)
                    try:
                        os.ftruncate(fd, size)
                        self.model.set(rel, resized(old, size), op)
                        self.after_write(fd, rel, op)
                    finally:
                        os.close(fd)
            except OSError as exc:
                self.fail(op, rel, exc)
                return
            self.findings.count(op)
            self.maybe_read_back(rel, op)

    def rename_to(self, src: str, dst: str, op: str) -> None:
        with self.model.locked(src, dst):
            if self.model.get(src) is None:
                return
            try:
                os.rename(self.path_of(src), self.path_of(dst))
            except OSError as exc:
                self.fail(op, f"{src} -> {dst}", exc)
                self.model.tainted.update((src, dst))
                return
            self.model.rename(src, dst)
            self.findings.count(op)
            if self.rng.random() < 0.35:
                self.verify(src, f"old name after {op}")
                self.verify(dst, f"read after {op}")

    def rename_free(self) -> None:
        names, free = self.existing(), self.free()
        if names and free:
            self.rename_to(self.rng.choice(names), self.rng.choice(free), "rename")

    def rename_onto(self) -> None:
        names = self.existing()
        if len(names) >= 2:
            src, dst = self.rng.sample(names, 2)
            self.rename_to(src, dst, "rename onto existing")

    def delete(self) -> None:
        if not (names := self.existing()):
            return
        rel = self.rng.choice(names)
        with self.model.locked(rel):
            try:
                os.unlink(self.path_of(rel))
            except OSError as exc:
                self.fail("delete", rel, exc)
                return
            self.model.remove(rel, "delete")
            self.findings.count("delete")
            self.maybe_read_back(rel, "delete")

    def read_own(self) -> None:
        if names := self.existing():
            rel = self.rng.choice(names)
            with self.model.locked(rel):
                self.verify(rel, "writer re-read")

    def list_own(self) -> None:
        """The listing of each own directory equals the model (only this thread changes it)."""
        for directory in (self.tree, f"{self.tree}/sub"):
            below = [p[len(directory) + 1 :] for p in self.model.paths(directory + "/")]
            want = {name for name in below if "/" not in name}
            try:
                got = set(os.listdir(self.path_of(directory))) - {"sub"}
            except OSError as exc:
                self.fail("listdir", directory, exc)
                continue
            tainted = {p.rsplit("/", 1)[1] for p in self.model.tainted if p.startswith(directory + "/")}
            if got - tainted != want - tainted:
                self.report_wrong(directory + "/", "listdir", f"names {sorted(want)}", f"names {sorted(got)}")
            self.findings.count("listdir")


class Reader(Worker):
    """Reads files of every writer's tree (and names that must be absent) under the path locks."""

    def __init__(
        self, index: int, root: Path, model: Model, findings: Findings, seed: int, writers: int
    ) -> None:
        super().__init__(f"reader{index}", root, model, findings, seed)
        self.writers = writers

    def step(self) -> None:
        tree = f"w{self.rng.randrange(self.writers)}"
        present = self.model.paths(tree + "/")
        if present and self.rng.random() < 0.9:
            rel = self.rng.choice(present)
        else:  # a pool name, probably absent: deleted names must stay deleted
            rel = f"{tree}/{self.rng.choice(['', 'sub/'])}f{self.rng.randrange(NAMES_PER_DIR)}"
        with self.model.locked(rel):
            self.verify(rel, "reader")


def run_workers(workers: Sequence[Worker], seconds: float, findings: Findings) -> None:
    """Run every worker's ``step`` in its own thread until ``seconds`` have passed."""
    stop = time.monotonic() + seconds

    def loop(worker: Worker) -> None:
        while time.monotonic() < stop:
            try:
                worker.step()
            except Exception as exc:  # a bug of the tool itself: record it, keep the run going
                findings.error(OpError(worker.name, "step", "-", f"{type(exc).__name__}: {exc!r}"))
                time.sleep(0.1)

    threads = [threading.Thread(target=loop, args=(w,), name=w.name, daemon=True) for w in workers]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


# --------------------------------------------------------------------------- memory


class RssSampler:
    """Samples a daemon's VmRSS in the background; :meth:`stop` adds its VmHWM (the kernel's peak)."""

    def __init__(self, pid: int, interval: float = 0.25) -> None:
        self.pid = pid
        self.interval = interval
        self.samples: list[int] = []  # KiB
        self.hwm_kib = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss", daemon=True)

    def _read(self, name: str) -> int | None:
        try:
            return process_status_kib(self.pid, name)
        except (OSError, KeyError):
            return None

    def _run(self) -> None:
        while not self._stop.is_set():
            if (kib := self._read("VmRSS")) is not None:
                self.samples.append(kib)
            self._stop.wait(self.interval)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Stop sampling; call while the daemon still runs, so VmHWM can be read."""
        self.hwm_kib = self._read("VmHWM") or 0
        self._stop.set()
        self._thread.join()

    @property
    def start_mib(self) -> float:
        return self.samples[0] / 1024 if self.samples else 0.0

    @property
    def last_mib(self) -> float:
        return self.samples[-1] / 1024 if self.samples else 0.0

    @property
    def peak_mib(self) -> float:
        return max([self.hwm_kib, *self.samples]) / 1024 if self.samples or self.hwm_kib else 0.0


# --------------------------------------------------------------------------- the run


@dataclass
class StressOptions:
    """Size of one run; ``threads`` splits into ``max(8, threads // 2)`` writers and the rest readers."""

    seconds: float = 60.0
    threads: int = 16
    seed: int = field(default_factory=lambda: random.randrange(1 << 32))
    writeback_delay: str = "1s"
    rss_limit_mib: float = DEFAULT_RSS_LIMIT_MIB
    flush_timeout: float = 600.0
    mount_args: Sequence[str] = ()

    @property
    def writers(self) -> int:
        return max(8, self.threads // 2)

    @property
    def readers(self) -> int:
        return max(0, self.threads - self.writers)


@dataclass
class StressReport:
    """Outcome of :func:`run_stress`; :meth:`problems` is empty exactly when the run passed."""

    options: StressOptions
    bucket: str
    findings: Findings
    final_wrong: list[WrongRead] = field(default_factory=list)  # the read pass after the run
    flush_rc: int | None = None
    flush_seconds: float = 0.0
    flush_output: str = ""
    bucket_keys: int = 0
    missing: list[str] = field(default_factory=list)
    extra: list[str] = field(default_factory=list)
    differing: list[str] = field(default_factory=list)
    conflicts: list[str] = field(default_factory=list)
    rss_start_mib: float = 0.0
    rss_end_mib: float = 0.0
    rss_peak_mib: float = 0.0
    umount_rc: int | None = None
    notes: list[str] = field(default_factory=list)
    log_tail: str = ""
    histories: dict[str, list[str]] = field(default_factory=dict)  # of problem_paths(), at the end

    def problem_paths(self) -> list[str]:
        """Paths with a wrong read or a bucket mismatch, first seen first (conflict keys: their file)."""
        paths = [w.path for w in self.findings.wrong_reads + self.final_wrong]
        paths += [e.path for e in self.findings.errors if e.history]
        paths += [m.split(":", 1)[0] for m in self.differing] + self.missing + self.extra
        paths += [k.split(".conflict-", 1)[0] for k in self.conflicts]
        return list(dict.fromkeys(paths))

    @property
    def mismatches(self) -> list[str]:
        return (
            [f"missing in bucket: {k}" for k in self.missing]
            + [f"extra in bucket: {k}" for k in self.extra]
            + [f"different bytes: {k}" for k in self.differing]
            + [f"conflict key: {k}" for k in self.conflicts]
        )

    def problems(self) -> list[str]:
        out = []
        wrong = len(self.findings.wrong_reads) + len(self.final_wrong)
        if wrong:
            out.append(f"{wrong} wrong reads")
        if self.findings.errors:
            out.append(f"{len(self.findings.errors)} errors")
        if self.flush_rc != 0:
            out.append(f"tierfs flush exited {self.flush_rc}")
        if self.mismatches:
            out.append(f"{len(self.mismatches)} bucket mismatches")
        if self.rss_peak_mib > self.options.rss_limit_mib:
            out.append(f"peak RSS {self.rss_peak_mib:.1f} MiB > {self.options.rss_limit_mib:.0f} MiB")
        return out

    def summary(self) -> str:
        """One screen: what ran, what went wrong (first few of each, in full), memory, verdict."""
        opts, f = self.options, self.findings
        total = sum(v for k, v in f.ops.items() if not k.startswith("verify"))
        reads = sum(v for k, v in f.ops.items() if k.startswith("verify"))
        lines = [
            f"tierfs stress: {opts.seconds:g} s, {opts.writers} writers + {opts.readers} readers, "
            f"seed {opts.seed}, bucket {self.bucket}",
            *(f"  note: {n}" for n in self.notes),
            f"operations: {total} changes, {reads} verified reads ({f.verified_bytes / MiB:.0f} MiB)",
            "  " + ", ".join(f"{k} {v}" for k, v in sorted(f.ops.items())),
        ]
        wrong = f.wrong_reads + self.final_wrong
        per_path = Counter(w.path for w in wrong)
        lines.append(f"wrong reads: {len(wrong)}" + (f" on {len(per_path)} paths" if wrong else ""))
        shown = list({w.path: w for w in reversed(wrong)}.values())[::-1]  # the first of each path
        lines += [f"  ({per_path[w.path]}x) {w.line()}" for w in shown[:SHOWN]]
        lines.append(f"errors: {len(f.errors)}")
        lines += [f"  {e.line()}" for e in f.errors[:SHOWN]]
        lines.append(f"flush: exit {self.flush_rc} after {self.flush_seconds:.1f} s")
        if self.flush_rc != 0 and self.flush_output:
            lines += [f"  {line}" for line in self.flush_output.strip().splitlines()[-5:]]
        lines.append(
            f"bucket: {self.bucket_keys} keys; {len(self.missing)} missing, {len(self.extra)} extra, "
            f"{len(self.differing)} differing, {len(self.conflicts)} .conflict- keys"
        )
        lines += [f"  {m}" for m in self.mismatches[:SHOWN]]
        lines.append(
            f"daemon RSS: peak {self.rss_peak_mib:.1f} MiB (limit {opts.rss_limit_mib:.0f}), "
            f"start {self.rss_start_mib:.1f}, end {self.rss_end_mib:.1f}"
        )
        lines.append(f"umount: exit {self.umount_rc}")
        first: dict[str, WrongRead | OpError] = {}
        items: list[WrongRead | OpError] = [*reversed(f.errors), *reversed(wrong)]
        for item in items:
            first[item.path] = item
        for path in self.problem_paths()[:4]:
            if path in first:
                what = "wrong read" if isinstance(first[path], WrongRead) else "error"
                lines.append(f"history of {path} up to its first {what} (oldest first):")
                lines += [f"  {entry}" for entry in first[path].history]
            elif any(k.startswith(path + ".conflict-") for k in self.conflicts):
                lines.append(f"history of {path} in the 6 s before its conflict copy (oldest first):")
                lines += [f"  {entry}" for entry in self.histories.get(path, [])]
            else:
                lines.append(f"history of {path} at the end (oldest first):")
                lines += [f"  {entry}" for entry in self.histories.get(path, [])]
        problems = self.problems()
        lines.append("result: PASS" if not problems else "result: FAIL (" + "; ".join(problems) + ")")
        return "\n".join(lines)


class StressMount(TierfsSystem):
    """The benchmark's daemon-mode tierfs launcher, writable (the benchmark mounts read-only)."""

    name = "tierfs-stress"

    def command(self) -> list[str]:
        return [arg for arg in super().command() if arg != "--read-only"]


def final_read_pass(root: Path, model: Model, findings: Findings) -> list[WrongRead]:
    """Once the load has stopped, every file read through the mount must equal the model."""
    checker = Worker("final", root, model, Findings(), 0)
    checker.rng = random.Random(0)
    for rel in model.paths():
        checker.verify(rel, "final read pass")
    findings.errors.extend(checker.findings.errors)
    with findings.lock:
        for op, n in checker.findings.ops.items():
            findings.ops[f"verify_final_{op.removeprefix('verify_')}"] += n
    return checker.findings.wrong_reads


def compare_bucket(report: StressReport, client: Any, model: Model) -> None:
    """The bucket must hold exactly the model's files: keys (``dir/`` markers aside) and bytes."""
    keys: set[str] = set()
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=report.bucket):
        keys.update(obj["Key"] for obj in page.get("Contents", ()))
    report.bucket_keys = len(keys)
    report.conflicts = sorted(k for k in keys if ".conflict-" in k)
    files = {k for k in keys if not k.endswith("/") and k not in report.conflicts}
    want = {p: data for p, data in model.snapshot().items() if p not in model.tainted}
    report.missing = sorted(set(want) - files)
    report.extra = sorted(files - set(want) - model.tainted)
    for key in sorted(files & set(want)):
        body = client.get_object(Bucket=report.bucket, Key=key)["Body"].read()
        if body != want[key]:
            report.differing.append(
                f"{key}: model {describe(want[key])}, bucket {describe(body)} {model.identify(body)}"
            )


def run_stress(
    options: StressOptions,
    *,
    endpoint_url: str,
    bucket: str,
    workdir: Path,
    mount_endpoint_url: str | None = None,
    log: Callable[[str], None] = lambda _msg: None,
) -> StressReport:
    """Mount ``bucket`` (through ``mount_endpoint_url``, e.g. a fault proxy, if given), run the load,
    flush and compare the bucket (read directly at ``endpoint_url``). Always unmounts."""
    model, findings = Model(), Findings()
    report = StressReport(options, bucket, findings)
    client = s3_client(endpoint_url, read_timeout=120.0, attempts=5)
    args = ["--writeback-delay", options.writeback_delay, *options.mount_args]
    system = StressMount(workdir, mount_endpoint_url or endpoint_url, bucket, args)
    try:
        with system.mounted(fresh=True) as mounted:
            sampler = RssSampler(mounted.pid)
            sampler.start()
            try:
                root = mounted.path
                writers = [
                    Writer(i, root, model, findings, options.seed * 1000 + i) for i in range(options.writers)
                ]
                for writer in writers:
                    writer.setup()
                readers = [
                    Reader(i, root, model, findings, options.seed * 1000 + 500 + i, options.writers)
                    for i in range(options.readers)
                ]
                log(f"running {len(writers)} writers + {len(readers)} readers for {options.seconds:g} s")
                run_workers([*writers, *readers], options.seconds, findings)
                log("final read pass")
                report.final_wrong = final_read_pass(root, model, findings)
                log("tierfs flush")
                started = time.monotonic()
                try:
                    flush = subprocess.run(
                        [sys.executable, "-m", "tierfs", "flush", str(root)],
                        env=child_env(),
                        capture_output=True,
                        text=True,
                        timeout=options.flush_timeout,
                        check=False,
                    )
                    report.flush_rc, report.flush_output = flush.returncode, flush.stdout + flush.stderr
                except subprocess.TimeoutExpired:
                    report.flush_rc, report.flush_output = -1, f"hung: no exit in {options.flush_timeout:g} s"
                report.flush_seconds = time.monotonic() - started
                log("comparing the bucket with the model")
                compare_bucket(report, client, model)
                report.histories = {p: model.history(p) for p in report.problem_paths()}
                for key in report.conflicts:  # the changes just before tierfs saved the copy
                    path, _, stamp = key.partition(".conflict-")
                    with contextlib.suppress(ValueError):
                        at = datetime.strptime(stamp, "%Y%m%dT%H%M%S.%fZ").replace(tzinfo=UTC).timestamp()
                        report.histories[path] = model.history(path, around=at)
            finally:
                sampler.stop()
                report.rss_start_mib, report.rss_end_mib = sampler.start_mib, sampler.last_mib
                report.rss_peak_mib = sampler.peak_mib
            umount = subprocess.run(
                [sys.executable, "-m", "tierfs", "umount", str(mounted.path)],
                env=child_env(),
                capture_output=True,
                text=True,
                timeout=options.flush_timeout,
                check=False,
            )
            report.umount_rc = umount.returncode
    finally:
        report.log_tail = system.log_tail(40)
        system.cleanup()
    return report


# --------------------------------------------------------------------------- standalone


@contextlib.contextmanager
def busy_loops(count: int) -> Iterator[None]:
    """``count`` CPU-bound processes beside the mount (the issue's contention), killed by pid after."""
    procs = [
        subprocess.Popen([sys.executable, "-c", "while True: pass"], start_new_session=True)
        for _ in range(count)
    ]
    try:
        yield
    finally:
        for proc in procs:
            terminate_process_group(proc, grace=0.5)


@contextlib.contextmanager
def delay_proxy(upstream: str, seed: int, notes: list[str]) -> Iterator[str]:
    """``tools/faultproxy.py`` in front of ``upstream``: 30 % of requests delayed by 0.3-1.5 s.

    Slow requests widen the windows in which a change lands while an upload or copy of
    the same file is in flight (the issue saw wrong versions most under these faults).
    What the proxy did is added to ``notes`` when it stops.
    """
    with FaultProxy(upstream, [Rule("delay", 0.3, delay=(0.3, 1.5))], seed=seed) as proxy:
        try:
            yield proxy.endpoint_url
        finally:
            notes.append(f"fault proxy: {proxy.summary()}")


def keep_logs_only(workdir: Path) -> None:
    """After a failed run, delete everything but the logs: a 10-minute run leaves ~14 GB of
    server volumes (every version ever written) that nobody needs to read the failure."""
    for path in sorted(workdir.rglob("*"), reverse=True):
        if path.is_file() and path.suffix != ".log":
            path.unlink(missing_ok=True)
        elif path.is_dir() and not any(path.iterdir()):
            path.rmdir()


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m tools.stress", description=(__doc__ or "").split("\n\n")[0]
    )
    parser.add_argument("--seconds", type=float, default=60.0, help="how long the load runs (default 60)")
    parser.add_argument("--threads", type=int, default=16, help="writers (>= 8) + readers (default 16)")
    parser.add_argument("--seed", type=int, default=None, help="random seed (default: random, printed)")
    parser.add_argument(
        "--busy", type=int, default=0, metavar="N", help="busy-loop processes beside the mount"
    )
    parser.add_argument("--delay-faults", action="store_true", help="delay 30%% of requests by 0.3-1.5 s")
    parser.add_argument("--writeback-delay", default="1s", help="the mount's --writeback-delay (default 1s)")
    parser.add_argument("--rss-limit", type=float, default=DEFAULT_RSS_LIMIT_MIB, metavar="MIB")
    parser.add_argument("--workdir", type=Path, default=None, help="keep server data, cache and logs here")
    parser.add_argument(
        "--mount-arg",
        action="append",
        default=[],
        metavar="ARG",
        help="extra argument for `tierfs mount` (repeatable), e.g. --mount-arg=--log-level --mount-arg=debug",
    )
    parser.add_argument(
        "--keep",
        action="store_true",
        help="keep the whole work directory (default: only the logs of a failed run)",
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)

    def log(message: str) -> None:
        print(f"[stress {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)

    options = StressOptions(
        seconds=args.seconds,
        threads=args.threads,
        writeback_delay=args.writeback_delay,
        rss_limit_mib=args.rss_limit,
        mount_args=tuple(args.mount_arg),
        **({} if args.seed is None else {"seed": args.seed}),
    )
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="tierfs-stress-"))
    workdir.mkdir(parents=True, exist_ok=True)
    bucket = f"stress-{uuid.uuid4().hex[:10]}"
    report: StressReport | None = None
    notes = [f"busy loops: {args.busy}"]
    try:
        with SeaweedFS(workdir / "seaweed") as server, busy_loops(args.busy):
            log(f"SeaweedFS at {server.endpoint_url}, work directory {workdir}")
            server.create_bucket(bucket)
            with contextlib.ExitStack() as stack:
                mount_url = None
                if args.delay_faults:
                    mount_url = stack.enter_context(delay_proxy(server.endpoint_url, options.seed, notes))
                notes.append(f"delay faults: {'30% of requests +0.3-1.5 s' if mount_url else 'off'}")
                report = run_stress(
                    options,
                    endpoint_url=server.endpoint_url,
                    bucket=bucket,
                    workdir=workdir / "run",
                    mount_endpoint_url=mount_url,
                    log=log,
                )
    finally:
        failed = report is None or bool(report.problems())
        if args.keep:
            log(f"work directory kept: {workdir}")
        elif failed:
            keep_logs_only(workdir)
            log(f"logs kept: {workdir} (mount log: {workdir / 'run' / 'tierfs-stress.log'})")
        elif args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    if report is None:  # run_stress raised: the traceback has already gone out
        return 2
    report.notes.extend(notes)
    print(report.summary())
    if report.problems() and report.log_tail:
        print("--- last lines of the mount log ---\n" + report.log_tail)
    return 1 if report.problems() else 0


if __name__ == "__main__":
    sys.exit(main())
