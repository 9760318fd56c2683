"""A Hypothesis reference-model test of write-back: reads through the mount equal a dict (issue 11).

What it checks, and why. Write-back keeps a local version of each changed file (staged
data, an upload or copy in flight, a rename, a delete) beside the bucket's version, and
issue 11 showed that version getting lost in races: a read served the previous version,
or a mix of two, and the bucket ended with an older version (the newest at a
``.conflict-`` key). Single-operation tests cannot find such sequences; a state machine
that draws them can. :class:`WritebackMachine` (a Hypothesis ``RuleBasedStateMachine``)
drives one real tierfs mount on SeaweedFS with the rules

* create, write at an offset (holes included), truncate (``truncate`` / ``ftruncate``),
  overwrite (``O_TRUNC``), rename (to a free name, and onto an existing file, also of a
  file still open for writing), delete, mkdir, fsync and close; files may stay open
  across steps, as an application's log or checkpoint would;
* ``concurrent``: 2-4 threads each change a different file at the same moment
  (overwrite, append, truncate, rename to a fresh name or delete), so the write-back
  scheduler sees concurrent changes;
* an **outside writer** that puts and deletes objects directly in the bucket under its
  own top-level prefix (``ext<N>/``), which the mount never writes. Per
  docs/consistency.md a change made through S3 shows once the directory is re-listed:
  after the TTL (60 s here, longer than an example) or at once after ``tierfs refresh``.
  The model is kept simple on purpose: between an outside change and the next
  ``refresh`` rule ``ext<N>/`` is *not checked* (either version would be allowed); after
  the refresh it must equal the bucket exactly;
* ``flush``: ``tierfs flush`` exits 0, and the bucket then equals the model (same keys,
  ``dir/`` markers aside, same bytes, no ``.conflict-`` key);
* ``crash_remount``: ``kill -9`` of the daemon (open handles die with it), then a mount
  on the same cache dir, whose journal replays: every acknowledged change survives
  (docs/writeback.md: the journal entry is committed before the syscall returns);
* ``clean_remount``: ``tierfs umount`` (which flushes, so the bucket must equal the
  model) and a mount on the same cache dir.

After every step (the invariant) every file and directory listing of the example's
tree reads back through the mount exactly as the model says. The model is a dict
path -> bytes plus a set of directories; it is updated when each syscall returns.

The mount and the server are module-scoped (mounting costs a second or two); each
example works in its own directory ``x<N>/`` (and ``ext<N>/``), so an example never
sees what an earlier one left behind. The example budget keeps the test under ~90 s.
Shrinking is off by default because each shrink step replays against a real mount and
would take minutes; set ``TIERFS_MODEL_SHRINK=1`` to get a minimal failing sequence.
Hypothesis prints the failing sequence of steps either way.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import os
import random
import shutil
import threading
import time
import traceback
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

import pytest
from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)
from mounting import Mounter, run_tierfs

from tools.servers import SeaweedFS, s3_client
from tools.stress import describe, read_all, resized, write_all
from tools.stress import patch as patched

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

pytestmark = pytest.mark.fuse
T = TypeVar("T")

MOUNT_ARGS = ("--writeback-delay", "0.3s")  # uploads start (and race) within an example
DIRS = ("", "a", "b", "a/c")  # relative to the example's root; "" is the root itself
NAMES = ("f0", "f1", "f2", "f3")
EXT_NAMES = ("o0", "o1", "o2")
# The budget of `make test` (<= ~90 s); TIERFS_MODEL_EXAMPLES / TIERFS_MODEL_STEPS raise it for a long hunt.
MAX_REMOUNTS = 2  # per example: a remount costs 1-2 s, and without a cap they crowd out the other rules
MAX_EXAMPLES = int(os.environ.get("TIERFS_MODEL_EXAMPLES", "10"))
STEPS = int(os.environ.get("TIERFS_MODEL_STEPS", "30"))

# File sizes: mostly small, sometimes a few blocks (the chunk cache's blocks are 1 MiB).
sizes = st.one_of(st.integers(0, 4096), st.integers(0, 200_000), st.sampled_from([1 << 20, (2 << 20) + 123]))
seeds = st.integers(0, 2**32 - 1)


def content(size: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(size)


FIRST_FAILURE: list[str] = []  # the first failing example's steps and traceback (see traced)
STEP_COUNTS: Counter[str] = Counter()  # how often each rule ran, printed by the test (seen with -s)


def traced(step: Callable[..., None]) -> Callable[..., None]:
    """Log a rule's call in the machine's trace, and keep the trace of the first failure.

    A failure here usually depends on timing (an upload landing mid-change), so
    Hypothesis's replay of the failing example may pass or draw differently, and it then
    reports only "Flaky". The trace kept here is the run that really failed.
    """

    @functools.wraps(step)
    def run(self: WritebackMachine, **kwargs: object) -> None:
        shown = {k: v for k, v in kwargs.items() if k != "data"}
        self.trace.append(f"{step.__name__}({', '.join(f'{k}={v!r}' for k, v in shown.items())})")
        STEP_COUNTS[step.__name__] += 1
        try:
            step(self, **kwargs)
        except BaseException:
            if not FIRST_FAILURE:
                FIRST_FAILURE.append(
                    f"example {self.top}, steps:\n  "
                    + "\n  ".join(self.trace)
                    + "\n"
                    + traceback.format_exc()
                )
            raise

    return run


class MountEnv:
    """The module's SeaweedFS bucket and its (re)mountable tierfs mount, shared by all examples."""

    def __init__(self, mounter: Mounter, client: S3Client, bucket: str) -> None:
        self.mounter = mounter
        self.client = client
        self.bucket = bucket
        self.mount = mounter(f"s3://{bucket}", *MOUNT_ARGS)
        self.examples = itertools.count()

    def remount(self) -> None:
        """Mount again on the same cache dir (the previous mount must be gone)."""
        self.mount = self.mounter(f"s3://{self.bucket}", *MOUNT_ARGS, cache_dir=self.mount.cache_dir)

    def ensure_healthy(self) -> None:
        """After an example that died mid-remount, bring back a live mount for the next one."""
        if self.mount.returncode is None and self.mount.mounted:
            return
        self.mount.force_unmount()
        self.mount.cleanup()
        self.remount()

    def tierfs(self, *args: str) -> None:
        result = run_tierfs(*args, timeout=120)
        assert result.returncode == 0, (
            f"tierfs {' '.join(args)} exited {result.returncode}: {result.stdout}{result.stderr}"
            f"\n--- mount log ---\n{self.mount.log_text()[-4000:]}"
        )

    def bucket_files(self, prefixes: tuple[str, ...]) -> dict[str, bytes]:
        """Every object below ``prefixes`` (``dir/`` markers aside), with its body."""
        out: dict[str, bytes] = {}
        for prefix in prefixes:
            pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix)
            for page in pages:
                for obj in page.get("Contents", ()):
                    key = obj["Key"]
                    if not key.endswith("/"):
                        out[key] = self.client.get_object(Bucket=self.bucket, Key=key)["Body"].read()
        return out


@pytest.fixture(scope="module")
def env(seaweed: SeaweedFS, tmp_path_factory: pytest.TempPathFactory) -> Iterator[MountEnv]:
    """One bucket and one mount for the whole module; always unmounted and stopped at the end."""
    name = f"t-model-{uuid.uuid4().hex[:10]}"
    seaweed.create_bucket(name)
    mounter = Mounter(tmp_path_factory.mktemp("model"), lambda: seaweed.endpoint_url)
    try:
        yield MountEnv(mounter, s3_client(seaweed.endpoint_url, read_timeout=60.0), name)
    finally:
        mounter.cleanup()


@dataclass
class Model:
    """What the example's tree must look like: files (relative path -> bytes) and directories."""

    files: dict[str, bytes] = field(default_factory=dict)
    dirs: set[str] = field(default_factory=lambda: {""})
    ext_bucket: dict[str, bytes] = field(default_factory=dict)  # the outside writer's objects
    ext_visible: bool = True  # False between an outside change and the next refresh


def join(*parts: str) -> str:
    return "/".join(p for p in parts if p)


def parent(rel: str) -> str:
    return rel.rpartition("/")[0]


class WritebackMachine(RuleBasedStateMachine):
    """One example: a fresh directory of the shared mount, driven by the rules below."""

    env: MountEnv  # set by the test before the machine runs

    def __init__(self) -> None:
        super().__init__()
        number = next(self.env.examples)
        self.env.ensure_healthy()
        self.top = f"x{number}"  # this example's tree: mount/x<N>, key prefix x<N>/
        self.ext = f"ext{number}"  # the outside writer's prefix
        self.model = Model()
        self.handles: dict[str, int] = {}  # path -> fd open for writing (it follows renames)
        self.trace: list[str] = []  # the steps so far, with drawn values (see traced)
        self.remounts = 0
        os.mkdir(self.abs(""))

    # -- helpers

    def draw(self, data: st.DataObject, strategy: st.SearchStrategy[T], label: str) -> T:
        """``data.draw``, with the value noted in the trace of the current step."""
        value = data.draw(strategy, label=label)
        self.trace.append(f"    {label} = {value!r}")
        return value

    def abs(self, rel: str) -> str:
        return str(self.env.mount.path / join(self.top, rel))

    def free_names(self) -> list[str]:
        return [
            join(d, n) for d in sorted(self.model.dirs) for n in NAMES if join(d, n) not in self.model.files
        ]

    def closed_files(self) -> list[str]:
        return sorted(p for p in self.model.files if p not in self.handles)

    def fd_for(self, rel: str, flags: int = os.O_WRONLY) -> tuple[int, bool]:
        """The open handle of ``rel``, else a new one; True when the caller must close it."""
        if rel in self.handles:
            return self.handles[rel], False
        return os.open(self.abs(rel), flags), True

    def drop_handles(self) -> None:
        """Close every handle, ignoring errors (after a crash they belong to a dead mount)."""
        for fd in self.handles.values():
            with contextlib.suppress(OSError):
                os.close(fd)
        self.handles.clear()

    @initialize(lengths=st.lists(sizes, min_size=2, max_size=4), seed=seeds)
    @traced
    def populate(self, lengths: list[int], seed: int) -> None:
        """Start with a few closed files, so rules that need files (rename, burst...) run at once."""
        for n, size in enumerate(lengths):
            body = content(size, seed + n)
            Path(self.abs(NAMES[n])).write_bytes(body)
            self.model.files[NAMES[n]] = body

    # -- rules: single-file changes

    @precondition(lambda self: self.free_names())
    @rule(data=st.data(), size=sizes, seed=seeds, keep_open=st.booleans())
    @traced
    def create(self, data: st.DataObject, size: int, seed: int, keep_open: bool) -> None:
        rel = self.draw(data, st.sampled_from(self.free_names()), "path")
        body = content(size, seed)
        fd = os.open(self.abs(rel), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        self.model.files[rel] = b""
        write_all(fd, body)
        self.model.files[rel] = body
        if keep_open:
            self.handles[rel] = fd
        else:
            os.close(fd)

    @precondition(lambda self: self.model.files)
    @rule(data=st.data(), size=sizes, seed=seeds, keep_open=st.booleans())
    @traced
    def overwrite(self, data: st.DataObject, size: int, seed: int, keep_open: bool) -> None:
        """``O_TRUNC`` rewrite with a fresh handle (an open one stays open too)."""
        rel = self.draw(data, st.sampled_from(sorted(self.model.files)), "path")
        body = content(size, seed)
        fd = os.open(self.abs(rel), os.O_WRONLY | os.O_TRUNC)
        self.model.files[rel] = b""
        write_all(fd, body)
        self.model.files[rel] = body
        if keep_open and rel not in self.handles:
            self.handles[rel] = fd
        else:
            os.close(fd)

    @precondition(lambda self: self.model.files)
    @rule(data=st.data(), size=st.integers(1, 70_000), seed=seeds, gap=st.integers(0, 5000))
    @traced
    def write_at(self, data: st.DataObject, size: int, seed: int, gap: int) -> None:
        """pwrite inside the file or past its end (the gap reads as zeros)."""
        rel = self.draw(data, st.sampled_from(sorted(self.model.files)), "path")
        old = self.model.files[rel]
        offset = self.draw(data, st.integers(0, len(old)), "offset") + gap * self.draw(
            data, st.booleans(), "past_end"
        )
        piece = content(size, seed)
        fd, close = self.fd_for(rel)
        try:
            done = 0
            while done < len(piece):
                done += os.pwrite(fd, piece[done:], offset + done)
        finally:
            if close:
                os.close(fd)
        self.model.files[rel] = patched(old, offset, piece)

    @precondition(lambda self: self.model.files)
    @rule(data=st.data(), grow=st.integers(0, 100_000), by_path=st.booleans())
    @traced
    def truncate(self, data: st.DataObject, grow: int, by_path: bool) -> None:
        rel = self.draw(data, st.sampled_from(sorted(self.model.files)), "path")
        old = self.model.files[rel]
        size = self.draw(data, st.sampled_from([0, len(old) // 2, len(old) + grow]), "size")
        if by_path:
            os.truncate(self.abs(rel), size)
        else:
            fd, close = self.fd_for(rel)
            try:
                os.ftruncate(fd, size)
            finally:
                if close:
                    os.close(fd)
        self.model.files[rel] = resized(old, size)

    @precondition(lambda self: self.model.files)
    @rule(data=st.data())
    @traced
    def fsync(self, data: st.DataObject) -> None:
        """fsync returns once the bucket has the file (checked at the next flush rule)."""
        rel = self.draw(data, st.sampled_from(sorted(self.model.files)), "path")
        fd, close = self.fd_for(rel)
        try:
            os.fsync(fd)
        finally:
            if close:
                os.close(fd)

    @precondition(lambda self: self.handles)
    @rule(data=st.data())
    @traced
    def close(self, data: st.DataObject) -> None:
        rel = self.draw(data, st.sampled_from(sorted(self.handles)), "path")
        os.close(self.handles.pop(rel))

    @precondition(lambda self: self.model.files)
    @rule(data=st.data(), onto_existing=st.booleans())
    @traced
    def rename(self, data: st.DataObject, onto_existing: bool) -> None:
        """Rename a file (an open handle follows it) to a free name or onto a closed existing file."""
        src = self.draw(data, st.sampled_from(sorted(self.model.files)), "src")
        targets = [p for p in self.closed_files() if p != src] if onto_existing else self.free_names()
        if not targets:
            return
        dst = self.draw(data, st.sampled_from(targets), "dst")
        os.rename(self.abs(src), self.abs(dst))
        self.model.files[dst] = self.model.files.pop(src)
        if src in self.handles:
            self.handles[dst] = self.handles.pop(src)

    @precondition(lambda self: self.closed_files())
    @rule(data=st.data())
    @traced
    def delete(self, data: st.DataObject) -> None:
        rel = self.draw(data, st.sampled_from(self.closed_files()), "path")
        os.unlink(self.abs(rel))
        del self.model.files[rel]

    @precondition(lambda self: set(DIRS) - self.model.dirs)
    @rule(data=st.data())
    @traced
    def mkdir(self, data: st.DataObject) -> None:
        choices = sorted(d for d in set(DIRS) - self.model.dirs if parent(d) in self.model.dirs)
        if not choices:
            return
        rel = self.draw(data, st.sampled_from(choices), "dir")
        os.mkdir(self.abs(rel))
        self.model.dirs.add(rel)

    # -- concurrency

    @precondition(lambda self: len(self.closed_files()) >= 2)
    @rule(data=st.data(), seed=seeds)
    @traced
    def concurrent(self, data: st.DataObject, seed: int) -> None:
        """2-4 threads change different files at the same moment; each file ends as its thread left it."""
        closed = self.closed_files()
        count = self.draw(data, st.integers(2, min(4, len(closed))), "threads")
        paths = self.draw(data, st.permutations(closed), "paths")[:count]
        free = iter(self.free_names())
        plans: list[tuple[str, str, str | None]] = []  # (action, path, rename target)
        for path in paths:
            action = self.draw(
                data, st.sampled_from(["overwrite", "append", "truncate", "rename", "delete"]), "action"
            )
            target = next(free, None) if action == "rename" else None
            plans.append(("overwrite" if action == "rename" and target is None else action, path, target))
        rng = random.Random(seed)
        bodies = {path: rng.randbytes(rng.choice([rng.randrange(200_000), 1 << 20])) for path in paths}
        barrier = threading.Barrier(len(plans))
        failures: list[BaseException] = []

        def run(action: str, path: str, target: str | None) -> None:
            try:
                barrier.wait(10)
                if action == "overwrite":
                    fd = os.open(self.abs(path), os.O_WRONLY | os.O_TRUNC)
                    try:
                        write_all(fd, bodies[path])
                    finally:
                        os.close(fd)
                elif action == "append":
                    fd = os.open(self.abs(path), os.O_WRONLY | os.O_APPEND)
                    try:
                        write_all(fd, bodies[path][:50_000])
                    finally:
                        os.close(fd)
                elif action == "truncate":
                    os.truncate(self.abs(path), len(self.model.files[path]) // 3)
                elif action == "rename":
                    assert target is not None
                    os.rename(self.abs(path), self.abs(target))
                else:
                    os.unlink(self.abs(path))
            except BaseException as exc:
                failures.append(exc)

        threads = [threading.Thread(target=run, args=plan) for plan in plans]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        if failures:
            raise failures[0]
        for action, path, target in plans:  # every syscall returned: the model follows
            if action == "overwrite":
                self.model.files[path] = bodies[path]
            elif action == "append":
                self.model.files[path] += bodies[path][:50_000]
            elif action == "truncate":
                self.model.files[path] = self.model.files[path][: len(self.model.files[path]) // 3]
            elif action == "rename":
                assert target is not None
                self.model.files[target] = self.model.files.pop(path)
            else:
                del self.model.files[path]

    @rule(seconds=st.sampled_from([0.15, 0.4]))
    @traced
    def pause(self, seconds: float) -> None:
        """Let the write-back delay (0.3 s) pass, so later changes race uploads that are landing."""
        time.sleep(seconds)

    @precondition(lambda self: len(self.closed_files()) >= 2)
    @rule(data=st.data(), seed=seeds, rounds=st.integers(3, 8))
    @traced
    def burst(self, data: st.DataObject, seed: int, rounds: int) -> None:
        """2-4 threads each change their own file over and over for up to ~1 s, reading it back each time.

        The rounds span the write-back delay, so new versions are written (and read) while
        the upload of an earlier one is in flight or landing: the race of issue 11. Each
        thread owns its file, so its final bytes are the model's.
        """
        closed = self.closed_files()
        count = self.draw(data, st.integers(2, min(4, len(closed))), "threads")
        paths = self.draw(data, st.permutations(closed), "paths")[:count]
        final: dict[str, bytes] = {}
        failures: list[str | BaseException] = []

        def run(path: str, rng: random.Random) -> None:
            expected = self.model.files[path]
            try:
                for n in range(rounds):
                    action = rng.choice(["overwrite", "append", "pwrite", "truncate"])
                    if action == "truncate":
                        size = rng.choice([0, len(expected) // 2, len(expected) + rng.randrange(50_000)])
                        os.truncate(self.abs(path), size)
                        expected = resized(expected, size)
                    else:
                        piece = rng.randbytes(rng.choice([rng.randrange(100_000), (1 << 20) + 7]))
                        flags = {"overwrite": os.O_TRUNC, "append": os.O_APPEND, "pwrite": 0}[action]
                        fd = os.open(self.abs(path), os.O_WRONLY | flags)
                        try:
                            if action == "pwrite":
                                offset = rng.randrange(len(expected) + 1)
                                os.lseek(fd, offset, os.SEEK_SET)
                                write_all(fd, piece)
                                expected = patched(expected, offset, piece)
                            else:
                                write_all(fd, piece)
                                expected = piece if action == "overwrite" else expected + piece
                        finally:
                            os.close(fd)
                    got = read_all(self.abs(path))
                    if got != expected:
                        failures.append(
                            f"{path} round {n} ({action}): read {describe(got)}, wrote {describe(expected)}"
                        )
                    time.sleep(rng.uniform(0.0, 0.15))
            except BaseException as exc:
                failures.append(exc)
            final[path] = expected

        rng = random.Random(seed)
        threads = [threading.Thread(target=run, args=(p, random.Random(rng.random()))) for p in paths]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        self.model.files.update(final)
        for failure in failures:
            if isinstance(failure, BaseException):
                raise failure
        assert not failures, f"reads during the burst: {failures}"

    # -- the outside writer, refresh, flush

    @rule(name=st.sampled_from(EXT_NAMES), size=st.integers(0, 100_000), seed=seeds)
    @traced
    def outside_put(self, name: str, size: int, seed: int) -> None:
        """Another S3 client writes ``ext<N>/<name>``; the mount may show it only after a refresh."""
        body = content(size, seed)
        self.env.client.put_object(Bucket=self.env.bucket, Key=f"{self.ext}/{name}", Body=body)
        self.model.ext_bucket[name] = body
        self.model.ext_visible = False

    @precondition(lambda self: self.model.ext_bucket)
    @rule(data=st.data())
    @traced
    def outside_delete(self, data: st.DataObject) -> None:
        name = self.draw(data, st.sampled_from(sorted(self.model.ext_bucket)), "name")
        self.env.client.delete_object(Bucket=self.env.bucket, Key=f"{self.ext}/{name}")
        del self.model.ext_bucket[name]
        self.model.ext_visible = False

    @rule()
    @traced
    def refresh(self) -> None:
        """``tierfs refresh MNT -r``: re-list now; outside changes become visible, local ones stay."""
        self.env.tierfs("refresh", str(self.env.mount.path), "--recursive")
        self.model.ext_visible = True

    @rule()
    @traced
    def flush(self) -> None:
        """``tierfs flush`` exits 0 and the bucket then holds exactly the model."""
        self.env.tierfs("flush", str(self.env.mount.path))
        self.check_bucket("after tierfs flush")

    def check_bucket(self, when: str) -> None:
        got = self.env.bucket_files((f"{self.top}/", f"{self.ext}/"))
        want = {join(self.top, p): b for p, b in self.model.files.items()}
        want.update({f"{self.ext}/{n}": b for n, b in self.model.ext_bucket.items()})
        conflicts = sorted(k for k in got if ".conflict-" in k)
        assert not conflicts, f"{when}: .conflict- keys in the bucket: {conflicts}"
        assert sorted(got) == sorted(want), f"{when}: bucket keys differ from the model"
        wrong = [
            f"{k}: model {describe(want[k])}, bucket {describe(got[k])}" for k in want if got[k] != want[k]
        ]
        assert not wrong, f"{when}: bucket bytes differ from the model: {wrong}"

    # -- remounts

    @precondition(lambda self: self.remounts < MAX_REMOUNTS)
    @rule()
    @traced
    def crash_remount(self) -> None:
        """kill -9, then mount on the same cache dir: the journal replays every acknowledged change."""
        self.remounts += 1
        self.drop_handles()
        self.env.mount.kill9()
        self.env.mount.force_unmount()
        self.env.remount()

    @precondition(lambda self: self.remounts < MAX_REMOUNTS)
    @rule()
    @traced
    def clean_remount(self) -> None:
        """``tierfs umount`` flushes, so the bucket equals the model; then mount the same cache dir."""
        self.remounts += 1
        self.drop_handles()
        self.env.mount.umount()
        self.check_bucket("after tierfs umount")
        self.env.remount()

    # -- the invariant

    @invariant()
    @traced
    def mount_equals_model(self) -> None:
        """Every file and every listing of the example's tree is what the model says, now."""
        for rel, want in sorted(self.model.files.items()):
            try:
                got = read_all(self.abs(rel))
            except OSError as exc:
                raise AssertionError(f"read {rel}: {exc} (model: {describe(want)})") from exc
            assert got == want, f"read {rel}: got {describe(got)}, model {describe(want)}"
        for directory in sorted(self.model.dirs):
            names = set(os.listdir(self.abs(directory)))
            want_names = {p.rpartition("/")[2] for p in self.model.files if parent(p) == directory}
            want_names |= {d.rpartition("/")[2] for d in self.model.dirs if d and parent(d) == directory}
            assert names == want_names, f"listdir {directory or '.'}: {sorted(names)} != {sorted(want_names)}"
        if self.model.ext_visible:
            ext_path = self.env.mount.path / self.ext
            try:
                names = set(os.listdir(ext_path))
            except FileNotFoundError:
                names = set()
            assert names == set(self.model.ext_bucket), (
                f"after refresh, {self.ext}/ lists {sorted(names)}, "
                f"the bucket has {sorted(self.model.ext_bucket)}"
            )
            for name, want in self.model.ext_bucket.items():
                got = read_all(str(ext_path / name))
                assert got == want, f"{self.ext}/{name}: got {describe(got)}, bucket {describe(want)}"

    def teardown(self) -> None:
        """Close what is open and remove the example's tree (best effort: the next uses a new one)."""
        self.drop_handles()
        with contextlib.suppress(OSError):
            shutil.rmtree(self.abs(""))


def shrink_phases() -> tuple[Phase, ...]:
    if os.environ.get("TIERFS_MODEL_SHRINK") == "1":
        return (Phase.generate, Phase.shrink)
    return (Phase.generate,)


@pytest.mark.timeout(max(300, MAX_EXAMPLES * STEPS * 3))  # a long hunt (TIERFS_MODEL_*) gets its time
def test_writeback_matches_the_reference_model(env: MountEnv) -> None:
    WritebackMachine.env = env
    FIRST_FAILURE.clear()
    STEP_COUNTS.clear()
    try:
        run_state_machine_as_test(
            WritebackMachine,
            settings=settings(
                max_examples=MAX_EXAMPLES,
                stateful_step_count=STEPS,
                deadline=None,
                database=None,
                phases=shrink_phases(),
                suppress_health_check=list(HealthCheck),
                print_blob=False,
            ),
        )
    except BaseException as exc:
        if FIRST_FAILURE:
            log = env.mount.log_text()[-3000:]
            raise AssertionError(f"{FIRST_FAILURE[0]}\n--- mount log (tail) ---\n{log}") from exc
        raise
    finally:
        print("steps run:", ", ".join(f"{name} {n}" for name, n in sorted(STEP_COUNTS.items())))


def test_the_model_catches_a_wrong_read(env: MountEnv) -> None:
    """The invariant is not vacuous: a file changed behind the model's back fails it."""
    WritebackMachine.env = env
    machine = WritebackMachine()
    try:
        machine.model.files["f0"] = b"model"
        Path(machine.abs("f0")).write_bytes(b"other")
        with pytest.raises(AssertionError, match="read f0"):
            machine.mount_equals_model()
        machine.model.files["f0"] = b"other"
        machine.mount_equals_model()
        machine.model.files.pop("f0")
        with pytest.raises(AssertionError, match="listdir"):
            machine.mount_equals_model()
    finally:
        machine.teardown()
