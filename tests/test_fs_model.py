"""The file-system core against a reference model of a POSIX tree, in process, without FUSE (issue 23).

:class:`FsMachine` (a Hypothesis ``RuleBasedStateMachine``) drives :class:`tierfs.fs.FileSystem`
directly, built by ``tierfs.daemon.stack.build_stack`` as a mount builds it, over moto on
loopback behind :class:`tierfs.store.faultstore.FaultStore`. Its rules: create (and keep open),
open for write (with and without O_TRUNC), write at an offset (holes included), truncate,
rename (to a free name, onto an existing file, onto an empty or a non-empty directory, a
directory into itself, between hard links of one inode), link, unlink and rmdir (also of
files still open for writing: the handle keeps working), chmod and chown, mkdir, fsync,
close, ``flush`` (the bucket then holds exactly the model's files and directories), armed
store faults (a PUT or COPY whose answer is lost after the server acted, and slow GETs and
PUTs), and ``crash_remount``: the in-memory stack is dropped without a flush (open handles die
with it) and a new one is built on the same cache dir, replaying the journal.

The model is a POSIX tree: paths to nodes, hard links sharing one node, each node with its
bytes, mode, uid and gid. Every refusal must carry the errno the model predicts. After each
step (the invariant) the whole tree is walked through the file system (readdir, lookup,
getattr, open and read) and compared, and every handle open for writing reads its file's
bytes, even after its last name is gone. Not checked: reads through *read-only* handles of
unlinked files (a clean file's object goes with its last name; docs/writeback.md).

Each example gets a fresh bucket and cache dir. It is a plain pytest test of ``make test`` and
runs in seconds; ``TIERFS_FS_MODEL_EXAMPLES`` raises the example count for a longer hunt.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import threading
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import trio
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from tierfs.daemon.stack import Stack, StackSettings, build_stack
from tierfs.errors import StoreError
from tierfs.fs import AttrChanges, Caller, FileSystem
from tierfs.meta.records import ROOT_INO, Inode
from tierfs.store.faultstore import FaultStore
from tierfs.store.objectstore import S3ObjectStore
from tools.servers import MotoS3, s3_client

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

T = TypeVar("T")
NAMES = ("a", "b", "c", "d")
MAX_DEPTH = 2
EXAMPLES = int(os.environ.get("TIERFS_FS_MODEL_EXAMPLES", "10"))
STEPS = 30
CALL_BOUND = 60.0  # seconds one call into the file system may take before the step fails


# -- the reference model ---------------------------------------------------------------------------


@dataclass(eq=False)
class Node:
    """One inode of the model: its hard links are the paths that map to this very object."""

    is_dir: bool
    data: bytearray = field(default_factory=bytearray)
    mode: int = 0o644
    uid: int = 0
    gid: int = 0


@dataclass
class Handle:
    fh: int
    node: Node
    writable: bool


class Model:
    def __init__(self) -> None:
        self.paths: dict[str, Node] = {"": Node(is_dir=True, mode=0o755)}

    def children(self, path: str) -> list[str]:
        prefix = path + "/" if path else ""
        return [p for p in self.paths if p.startswith(prefix) and p != path and "/" not in p[len(prefix) :]]

    def below(self, path: str) -> list[str]:
        return [p for p in self.paths if p.startswith(path + "/")]

    def nlink(self, node: Node) -> int:
        return sum(1 for n in self.paths.values() if n is node)

    def rename_error(self, src: str, dst: str) -> int | None:
        """The errno rename(src, dst) answers, in the file system's order of checks; None: it works."""
        node = self.paths[src]
        if node.is_dir and (dst == src or dst.startswith(src + "/")):
            return None if dst == src else errno.EINVAL
        target = self.paths.get(dst)
        if target is None or target is node:
            return None
        if target.is_dir and not node.is_dir:
            return errno.EISDIR
        if node.is_dir and not target.is_dir:
            return errno.ENOTDIR
        if target.is_dir and self.children(dst):
            return errno.ENOTEMPTY
        return None

    def rename(self, src: str, dst: str) -> None:
        node = self.paths[src]
        if self.paths.get(dst) is node:
            return  # two names of one inode: nothing happens
        self.paths.pop(dst, None)
        moved = [src, *self.below(src)] if node.is_dir else [src]
        for old in moved:
            self.paths[dst + old[len(src) :]] = self.paths.pop(old)


def parent_of(path: str) -> str:
    return path.rpartition("/")[0]


def name_of(path: str) -> str:
    return path.rpartition("/")[2]


# -- a stack on its own trio loop --------------------------------------------------------------------


class Runner:
    """One stack with its write-back executor on a trio loop in a thread; rules call into it."""

    def __init__(self, store: FaultStore, home: Path, bucket: str, prefix: str, delay: float) -> None:
        self.store = store
        self.home = home
        self.bucket = bucket
        self.prefix = prefix
        self.delay = delay
        self.stack: Stack | None = None
        self.failure: BaseException | None = None
        self._token: trio.lowlevel.TrioToken | None = None
        self._stop: trio.Event | None = None
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        if not self._ready.wait(30):
            raise AssertionError("the stack did not start within 30 s")
        if self.failure is not None:
            raise self.failure

    @property
    def fs(self) -> FileSystem:
        assert self.stack is not None
        return self.stack.fs

    def _run(self) -> None:
        try:
            trio.run(self._main)
        except BaseException as exc:
            self.failure = exc
        finally:
            self._ready.set()

    async def _main(self) -> None:
        self._token = trio.lowlevel.current_trio_token()
        self._stop = trio.Event()
        settings = StackSettings(
            bucket=self.bucket,
            root_prefix=self.prefix,
            writeback_delay=self.delay,
            s3_concurrency=8,
            timeout=5.0,
        )
        self.stack = build_stack(self.store, self.home, f"model|s3://{self.bucket}/{self.prefix}", settings)
        try:
            async with trio.open_nursery() as nursery:
                assert self.stack.writeback is not None
                await nursery.start(self.stack.writeback.run)  # replays the journal first
                self._ready.set()
                await self._stop.wait()
                nursery.cancel_scope.cancel()
        finally:
            self.stack.close()

    def call(self, fn: Callable[..., Awaitable[T]], *args: Any) -> T:
        """``fn(*args)`` on the loop, bounded: a hang fails the step (and Hypothesis names it)."""

        async def bounded() -> T:
            with trio.fail_after(CALL_BOUND):
                return await fn(*args)

        return trio.from_thread.run(bounded, trio_token=self._token)

    def sync(self, fn: Callable[..., T], *args: Any) -> T:
        """A plain call on the loop (the file system's synchronous calls run there too)."""
        return trio.from_thread.run_sync(fn, *args, trio_token=self._token)

    def stop(self) -> None:
        """Drop the stack without a flush, as a crash would (open handles die with it)."""
        assert self._stop is not None
        with contextlib.suppress(trio.RunFinishedError):
            trio.from_thread.run_sync(self._stop.set, trio_token=self._token)
        self._thread.join(60)
        assert not self._thread.is_alive(), "the stack did not stop within 60 s"
        if self.failure is not None:
            raise self.failure


# -- the machine -------------------------------------------------------------------------------------


class FsMachine(RuleBasedStateMachine):
    # Set by the test: one bucket, one store client (making a boto3 client costs seconds on a busy
    # machine); each example works under its own prefix with its own cache dir.
    bucket: str
    inner: S3ObjectStore
    client: S3Client
    workdir: Path

    def __init__(self) -> None:
        super().__init__()
        self.model = Model()
        self.handles: list[Handle] = []
        self.prefix = f"ex-{uuid.uuid4().hex[:12]}/"
        self.home = self.workdir / self.prefix
        self.store = FaultStore(self.inner, seed=0)
        self.faults_armed = False
        self.runner: Runner | None = None

    @initialize(delay=st.sampled_from([0.0, 3600.0]))
    def start(self, delay: float) -> None:
        """Uploads at once (racing the next steps) or only on fsync and flush."""
        self.delay = delay
        self.runner = Runner(self.store, self.home, self.bucket, self.prefix, delay)

    def teardown(self) -> None:
        self.store.clear()
        if self.runner is not None:
            self.runner.stop()

    # -- helpers ------------------------------------------------------------------------------------

    @property
    def fs(self) -> FileSystem:
        assert self.runner is not None
        return self.runner.fs

    def call(self, fn: Callable[..., Awaitable[T]], *args: Any) -> T:
        assert self.runner is not None
        return self.runner.call(fn, *args)

    async def listing(self, fh: int) -> list[tuple[str, Inode, int]]:
        """Every entry of an open directory, as the kernel reads it from offset 0."""
        return [entry async for entry in self.fs.readdir(fh, 0)]

    def ino(self, path: str) -> int:
        """The inode of ``path``, looked up through the file system as a kernel would."""
        ino = ROOT_INO
        for part in [p for p in path.split("/") if p]:
            node = self.call(self.fs.lookup, ino, part)
            assert node is not None, f"{path}: {part} not found"
            ino = node.ino
        return ino

    def expect(self, code: int | None, fn: Callable[..., Awaitable[T]], *args: Any) -> T | None:
        """Run ``fn``; it must refuse with ``code``, or succeed when ``code`` is None."""
        try:
            result = self.call(fn, *args)
        except OSError as exc:  # the file system's refusals, and the namespace's ENOTEMPTY
            assert exc.errno == code, f"{fn.__name__}{args}: errno {exc.errno}, model says {code}"
            return None
        assert code is None, f"{fn.__name__}{args} succeeded, model says errno {code}"
        return result

    def draw_path(self, data: st.DataObject, *, dirs: bool | None = None, root: bool = False) -> str:
        paths = sorted(
            p for p, n in self.model.paths.items() if (root or p) and (dirs is None or n.is_dir == dirs)
        )
        return data.draw(st.sampled_from(paths))

    def draw_new_path(self, data: st.DataObject) -> str | None:
        dirs = sorted(
            p for p, n in self.model.paths.items() if n.is_dir and p.count("/") < MAX_DEPTH - 1 + (p == "")
        )
        free = [
            f"{d}/{n}".lstrip("/")
            for d in dirs
            for n in NAMES
            if f"{d}/{n}".lstrip("/") not in self.model.paths
        ]
        return data.draw(st.sampled_from(free)) if free else None

    def has(self, *, dirs: bool | None = None) -> bool:
        return any(p and (dirs is None or n.is_dir == dirs) for p, n in self.model.paths.items())

    # -- rules --------------------------------------------------------------------------------------

    @rule(data=st.data(), body=st.binary(max_size=3000), keep_open=st.booleans())
    def create(self, data: st.DataObject, body: bytes, keep_open: bool) -> None:
        path = self.draw_new_path(data)
        if path is None:
            return
        parent = self.ino(parent_of(path))
        fh, attrs = self.call(self.fs.create, parent, name_of(path), 0o640, Caller(uid=7, gid=8))
        assert stat.S_ISREG(attrs.mode) and attrs.uid == 7 and attrs.gid == 8
        node = Node(is_dir=False, mode=0o640, uid=7, gid=8)
        self.model.paths[path] = node
        if body:
            assert self.call(self.fs.write, fh, 0, body) == len(body)
            node.data[:] = body
        if keep_open:
            self.handles.append(Handle(fh, node, writable=True))
        else:
            self.call(self.fs.release, fh)

    @precondition(lambda self: self.has(dirs=False))
    @rule(data=st.data(), truncate=st.booleans())
    def open_for_write(self, data: st.DataObject, truncate: bool) -> None:
        path = self.draw_path(data, dirs=False)
        flags = os.O_RDWR | (os.O_TRUNC if truncate else 0)
        fh, _ = self.call(self.fs.open, self.ino(path), flags)
        node = self.model.paths[path]
        if truncate:
            node.data.clear()
        self.handles.append(Handle(fh, node, writable=True))

    @precondition(lambda self: any(h.writable for h in self.handles))
    @rule(data=st.data(), body=st.binary(min_size=1, max_size=3000), gap=st.integers(0, 200))
    def write(self, data: st.DataObject, body: bytes, gap: int) -> None:
        handle = data.draw(st.sampled_from([h for h in self.handles if h.writable]))
        offset = data.draw(st.integers(0, len(handle.node.data) + gap))
        assert self.call(self.fs.write, handle.fh, offset, body) == len(body)
        node = handle.node
        if offset > len(node.data):
            node.data.extend(bytes(offset - len(node.data)))
        node.data[offset : offset + len(body)] = body

    @precondition(lambda self: self.has(dirs=False))
    @rule(data=st.data(), size=st.integers(0, 4000))
    def truncate(self, data: st.DataObject, size: int) -> None:
        path = self.draw_path(data, dirs=False)
        self.call(self.fs.setattr, self.ino(path), AttrChanges(size=size))
        node = self.model.paths[path]
        del node.data[size:]
        node.data.extend(bytes(size - len(node.data)))

    @precondition(lambda self: self.handles)
    @rule(data=st.data())
    def close(self, data: st.DataObject) -> None:
        handle = data.draw(st.sampled_from(self.handles))
        self.handles.remove(handle)
        self.call(self.fs.release, handle.fh)

    @precondition(lambda self: self.handles)
    @rule(data=st.data())
    def fsync(self, data: st.DataObject) -> None:
        handle = data.draw(st.sampled_from(self.handles))
        try:
            self.call(self.fs.fsync, handle.fh)
        except StoreError:
            assert self.faults_armed, "fsync failed with no fault injected"

    @precondition(lambda self: self.has())
    @rule(data=st.data(), onto_existing=st.booleans())
    def rename(self, data: st.DataObject, onto_existing: bool) -> None:
        src = self.draw_path(data)
        if onto_existing:
            dst = self.draw_path(data)
        else:
            new = self.draw_new_path(data)
            if new is None:
                return
            dst = new
        code = self.model.rename_error(src, dst)
        args = (self.ino(parent_of(src)), name_of(src), self.ino(parent_of(dst)), name_of(dst), 0)
        self.expect(code, self.fs.rename, *args)
        if code is None:
            self.model.rename(src, dst)

    @precondition(lambda self: self.has(dirs=False))
    @rule(data=st.data())
    def link(self, data: st.DataObject) -> None:
        src = self.draw_path(data, dirs=False)
        dst = self.draw_new_path(data)
        if dst is None:
            return
        self.call(self.fs.link, self.ino(src), self.ino(parent_of(dst)), name_of(dst))
        self.model.paths[dst] = self.model.paths[src]

    @precondition(lambda self: self.has(dirs=False))
    @rule(data=st.data())
    def unlink(self, data: st.DataObject) -> None:
        path = self.draw_path(data, dirs=False)
        self.call(self.fs.unlink, self.ino(parent_of(path)), name_of(path))
        node = self.model.paths.pop(path)
        # Read-only handles of a file whose last name went are not checked (module docstring).
        if node not in self.model.paths.values():
            self.handles = [h for h in self.handles if h.node is not node or h.writable]

    @rule(data=st.data())
    def mkdir(self, data: st.DataObject) -> None:
        path = self.draw_new_path(data)
        if path is None:
            return
        attrs = self.call(
            self.fs.mkdir, self.ino(parent_of(path)), name_of(path), 0o750, Caller(uid=3, gid=4)
        )
        assert stat.S_ISDIR(attrs.mode)
        self.model.paths[path] = Node(is_dir=True, mode=0o750, uid=3, gid=4)

    @precondition(lambda self: self.has(dirs=True))
    @rule(data=st.data())
    def rmdir(self, data: st.DataObject) -> None:
        path = self.draw_path(data, dirs=True)
        code = errno.ENOTEMPTY if self.model.children(path) else None
        self.expect(code, self.fs.rmdir, self.ino(parent_of(path)), name_of(path))
        if code is None:
            del self.model.paths[path]

    @precondition(lambda self: self.has())
    @rule(data=st.data(), mode=st.integers(0, 0o777))
    def chmod(self, data: st.DataObject, mode: int) -> None:
        path = self.draw_path(data)
        attrs = self.call(self.fs.setattr, self.ino(path), AttrChanges(mode=mode))
        assert stat.S_IMODE(attrs.mode) == mode
        self.model.paths[path].mode = mode

    @precondition(lambda self: self.has())
    @rule(data=st.data(), uid=st.integers(0, 2000), gid=st.integers(0, 2000))
    def chown(self, data: st.DataObject, uid: int, gid: int) -> None:
        path = self.draw_path(data)
        self.call(self.fs.setattr, self.ino(path), AttrChanges(uid=uid, gid=gid))
        node = self.model.paths[path]
        node.uid, node.gid = uid, gid

    @precondition(lambda self: not self.faults_armed)
    @rule(method=st.sampled_from(["put_file", "put_bytes", "copy"]), slow=st.booleans())
    def arm_fault(self, method: str, slow: bool) -> None:
        """The next ``method`` is carried out but its answer is lost; optionally GETs and PUTs slow down."""
        self.faults_armed = True
        self.store.act_then_fail(method, times=1)
        if slow:
            self.store.delay("get_range", 0.02, probability=0.5)
            self.store.delay("put_file", 0.02, probability=0.5)

    @rule()
    def flush(self) -> None:
        """Everything reaches the bucket, which then holds exactly the model's tree."""
        assert self.runner is not None and self.runner.stack is not None
        wb = self.runner.stack.writeback
        assert wb is not None
        self.call(lambda: wb.flush_all(timeout=60.0))
        files = {self.prefix + p: bytes(n.data) for p, n in self.model.paths.items() if p and not n.is_dir}
        markers = {self.prefix + p + "/" for p, n in self.model.paths.items() if p and n.is_dir}
        pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=self.prefix)
        keys = {o["Key"] for page in pages for o in page.get("Contents", ())}
        assert {k for k in keys if k.endswith("/")} == markers
        got = {
            k: self.client.get_object(Bucket=self.bucket, Key=k)["Body"].read()
            for k in keys
            if not k.endswith("/")
        }
        assert got == files, (sorted(got), sorted(files))

    @rule()
    def crash_remount(self) -> None:
        """Drop the stack without a flush and build a new one on the same cache dir: every
        acknowledged change survives (the journal replays); open handles die with the process."""
        assert self.runner is not None
        self.runner.stop()
        self.store.clear()
        self.faults_armed = False
        self.handles.clear()
        self.runner = Runner(self.store, self.home, self.bucket, self.prefix, self.delay)

    # -- the invariant ------------------------------------------------------------------------------

    @invariant()
    def tree_matches(self) -> None:
        if self.runner is None:
            return
        for path, node in sorted(self.model.paths.items()):
            ino = self.ino(path)
            attrs = self.runner.sync(self.fs.getattr, ino)
            assert stat.S_ISDIR(attrs.mode) == node.is_dir, path
            assert stat.S_IMODE(attrs.mode) == node.mode, f"{path}: mode {attrs.mode:o}"
            assert (attrs.uid, attrs.gid) == (node.uid, node.gid), path
            if node.is_dir:
                fh = self.call(self.fs.opendir, ino)
                names = [name for name, _, _ in self.call(self.listing, fh)]
                self.runner.sync(self.fs.releasedir, fh)
                assert sorted(names) == sorted(name_of(p) for p in self.model.children(path)), path
                continue
            assert attrs.size == len(node.data), f"{path}: size {attrs.size}, model {len(node.data)}"
            assert attrs.nlink == self.model.nlink(node), path
            fh, _ = self.call(self.fs.open, ino, os.O_RDONLY)
            try:
                got = self.call(self.fs.read, fh, 0, len(node.data) + 1)
            finally:
                self.call(self.fs.release, fh)
            assert got == bytes(node.data), f"{path}: read {len(got)} bytes, model {len(node.data)}"
        for handle in self.handles:
            got = self.call(self.fs.read, handle.fh, 0, len(handle.node.data) + 1)
            assert got == bytes(handle.node.data), "a handle open for writing reads other bytes"


def test_fs_matches_the_posix_model(moto: MotoS3, tmp_path: Path, s3_env: None) -> None:
    FsMachine.bucket = f"fsmodel-{uuid.uuid4().hex[:12]}"
    moto.create_bucket(FsMachine.bucket)
    FsMachine.inner = S3ObjectStore(FsMachine.bucket, endpoint_url=moto.endpoint_url, timeout=5.0, retries=1)
    FsMachine.client = s3_client(moto.endpoint_url)
    FsMachine.workdir = tmp_path
    run_state_machine_as_test(
        FsMachine,
        settings=settings(
            max_examples=EXAMPLES,
            stateful_step_count=STEPS,
            deadline=None,
            suppress_health_check=list(HealthCheck),
            derandomize=os.environ.get("TIERFS_FS_MODEL_RANDOM") is None,
        ),
    )
