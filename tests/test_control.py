"""Control channel: a real ControlServer on a Unix socket talking to the real blocking ControlClient."""

from __future__ import annotations

import io
import json
import os
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio

from tierfs.control import client as control_client
from tierfs.control import registry
from tierfs.control.client import ControlClient
from tierfs.control.progress import ProgressBar, RateMeter, format_eta, format_rate, render_bar, render_line
from tierfs.control.protocol import ControlServer, Handler, ProgressCallback, peer_allowed
from tierfs.control.registry import (
    ControlError,
    ControlTimeout,
    ControlUnavailable,
    lookup,
    mount_holding,
    normalize_mountpoint,
    register,
    registry_paths,
    unregister,
)
from tierfs.errors import FlushFailed

NOBODY = 65534
as_root = pytest.mark.skipif(os.geteuid() != 0, reason="switching to another uid with setpriv needs root")


@pytest.fixture(autouse=True)
def registry_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    directory = tmp_path / "registry"
    monkeypatch.setenv(registry.RUNTIME_DIR_ENV, str(directory))
    return directory


@asynccontextmanager
async def running(server: ControlServer) -> AsyncIterator[None]:
    async with trio.open_nursery() as nursery:
        await nursery.start(server.serve)
        yield
        nursery.cancel_scope.cancel()


async def call(sock: Path, op: str, args: dict[str, Any] | None = None) -> tuple[Any, list[dict[str, Any]]]:
    """Run the blocking client in a worker thread, as a CLI process would from outside."""
    seen: list[dict[str, Any]] = []
    client = ControlClient(sock, mountpoint="/mnt/test")
    result = await trio.to_thread.run_sync(lambda: client.call(op, args, on_progress=seen.append, timeout=30))
    return result, seen


async def status(args: dict[str, Any], progress: ProgressCallback) -> Any:
    return {"state": "ok", "echo": args}


async def counting(args: dict[str, Any], progress: ProgressCallback) -> Any:
    for i in range(int(args["n"])):
        await progress({"done_files": i, "total_files": args["n"]})
    return {"done": args["n"]}


async def failing(args: dict[str, Any], progress: ProgressCallback) -> Any:
    await progress({"done_files": 0})
    raise RuntimeError("bucket on fire\nsecond line")


HANDLERS: dict[str, Handler] = {"status": status, "count": counting, "fail": failing}


async def test_request_and_result(tmp_path: Path) -> None:
    sock = tmp_path / "c.sock"
    async with running(ControlServer(sock, HANDLERS, owner_uid=os.getuid())):
        result, progress = await call(sock, "status", {"x": [1, 2]})
    assert result == {"state": "ok", "echo": {"x": [1, 2]}}
    assert progress == []
    assert not sock.exists()  # removed when the server stops


async def test_progress_lines_arrive_in_order(tmp_path: Path) -> None:
    sock = tmp_path / "c.sock"
    async with running(ControlServer(sock, HANDLERS, owner_uid=os.getuid())):
        result, progress = await call(sock, "count", {"n": 50})
    assert result == {"done": 50}
    assert progress == [{"done_files": i, "total_files": 50} for i in range(50)]


async def test_handler_error_is_a_one_line_reply_and_server_survives(tmp_path: Path) -> None:
    sock = tmp_path / "c.sock"
    async with running(ControlServer(sock, HANDLERS, owner_uid=os.getuid())):
        with pytest.raises(ControlError) as info:
            await call(sock, "fail")
        assert str(info.value) == "RuntimeError: bucket on fire second line"
        assert not isinstance(info.value, ControlUnavailable)
        with pytest.raises(ControlError, match="unknown operation 'nope'"):
            await call(sock, "nope")
        result, _ = await call(sock, "status")
    assert result["state"] == "ok"


async def test_tierfs_errors_keep_their_message(tmp_path: Path) -> None:
    async def refuse(args: dict[str, Any], progress: ProgressCallback) -> Any:
        raise ControlError("not cached: a/b")

    sock = tmp_path / "c.sock"
    async with running(ControlServer(sock, {"evict": refuse}, owner_uid=os.getuid())):
        with pytest.raises(ControlError, match=r"^not cached: a/b$"):
            await call(sock, "evict")


async def test_malformed_requests_get_error_replies(tmp_path: Path) -> None:
    sock = tmp_path / "c.sock"

    def raw(payload: bytes) -> dict[str, Any]:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(30)
            s.connect(str(sock))
            s.sendall(payload)
            reply: dict[str, Any] = json.loads(s.makefile("rb").readline())
            return reply

    async with running(ControlServer(sock, HANDLERS, owner_uid=os.getuid())):
        not_json = await trio.to_thread.run_sync(raw, b"hello\n")
        no_op = await trio.to_thread.run_sync(raw, b'{"args": {}}\n')
        bad_args = await trio.to_thread.run_sync(raw, b'{"op": "status", "args": [1]}\n')
    assert not_json == {"ok": False, "error": "malformed request (not JSON)"}
    assert no_op["ok"] is False and "malformed" in no_op["error"]
    assert bad_args["ok"] is False and "args" in bad_args["error"]


async def test_disconnect_cancels_the_operation(tmp_path: Path) -> None:
    started = trio.Event()
    cancelled = trio.Event()

    async def forever(args: dict[str, Any], progress: ProgressCallback) -> Any:
        started.set()
        try:
            await trio.sleep_forever()
        except trio.Cancelled:
            cancelled.set()
            raise

    sock = tmp_path / "c.sock"
    async with running(ControlServer(sock, {"prefetch": forever}, owner_uid=os.getuid())):
        client = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        await client.connect(str(sock))
        await client.send(b'{"op": "prefetch", "args": {}}\n')
        await started.wait()
        client.close()
        with trio.fail_after(30):  # a bound against hanging, not a timing assertion
            await cancelled.wait()


async def test_unreachable_daemon(tmp_path: Path) -> None:
    with pytest.raises(ControlUnavailable, match=r"^no tierfs mount at /mnt/test$"):
        await call(tmp_path / "missing.sock", "status")
    # A socket file nobody listens on (a crashed daemon) is just as unreachable.
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(str(tmp_path / "dead.sock"))
    dead.close()
    with pytest.raises(ControlUnavailable):
        await call(tmp_path / "dead.sock", "status")


async def test_stale_socket_is_replaced_but_a_live_one_is_not(tmp_path: Path) -> None:
    sock = tmp_path / "c.sock"
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(sock))
    stale.close()
    async with running(ControlServer(sock, HANDLERS, owner_uid=os.getuid())):
        with pytest.raises(ControlError, match="already listening"):
            await ControlServer(sock, HANDLERS, owner_uid=os.getuid()).serve()
        result, _ = await call(sock, "status")  # the first server still owns the socket
        assert result["state"] == "ok"


async def test_refuses_to_replace_a_regular_file(tmp_path: Path) -> None:
    path = tmp_path / "c.sock"
    path.write_text("important")
    with pytest.raises(ControlError, match="not a socket"):
        await ControlServer(path, HANDLERS, owner_uid=os.getuid()).serve()
    assert path.read_text() == "important"


def test_peer_allowed() -> None:
    assert peer_allowed(0, 1000)
    assert peer_allowed(1000, 1000)
    assert not peer_allowed(1001, 1000)
    assert not peer_allowed(NOBODY, 1000)


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A directory another uid can traverse (pytest's tmp_path is 0700)."""
    path = Path(tempfile.mkdtemp(prefix="tierfs-ctl-", dir="/tmp"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path)


CLIENT_SCRIPT = """
import sys
from tierfs.control.client import ControlClient
from tierfs.control.registry import ControlError
try:
    print("OK", ControlClient(sys.argv[1]).call("status", {}, timeout=30)["state"])
except ControlError as exc:
    print("ERR", exc)
"""


async def call_as(uid: int, sock: Path) -> str:
    done = await trio.to_thread.run_sync(
        lambda: subprocess.run(
            ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups",
             sys.executable, "-c", CLIENT_SCRIPT, str(sock)],
            capture_output=True, text=True, timeout=60, check=False, cwd="/",
        )
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


@as_root
async def test_socket_belongs_to_the_owner_who_may_talk(shared_dir: Path) -> None:
    sock = shared_dir / "c.sock"
    async with running(ControlServer(sock, HANDLERS, owner_uid=NOBODY)):
        st = sock.stat()
        assert stat.S_IMODE(st.st_mode) == 0o600
        assert st.st_uid == NOBODY
        assert await call_as(NOBODY, sock) == "OK ok"
        result, _ = await call(sock, "status")  # root may always talk
        assert result["state"] == "ok"


@as_root
async def test_other_uid_is_refused_by_peer_credentials(shared_dir: Path) -> None:
    sock = shared_dir / "c.sock"
    async with running(ControlServer(sock, HANDLERS, owner_uid=4242)):
        # Open the file permissions so that only the SO_PEERCRED check stands in the way.
        sock.chmod(0o666)
        assert await call_as(NOBODY, sock) == "ERR permission denied"
        result, _ = await call(sock, "status")  # and the server carries on
        assert result["state"] == "ok"


@as_root
async def test_file_permissions_keep_other_uids_out_too(shared_dir: Path) -> None:
    sock = shared_dir / "c.sock"
    async with running(ControlServer(sock, HANDLERS, owner_uid=4242)):
        refused = await call_as(NOBODY, sock)
        assert refused == f"ERR permission denied talking to the tierfs mount at {sock}"


# --------------------------------------------------------------------------- registry


def test_register_lookup_unregister(tmp_path: Path, registry_dir: Path) -> None:
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    json_path = register(mnt, source="s3://bkt/", cache_dir="/var/cache/x", uid=1000)
    assert stat.S_IMODE(registry_dir.stat().st_mode) == 0o700
    expected_json, expected_sock = registry_paths(mnt)
    assert json_path == expected_json
    assert json_path.name.removesuffix(".json") == expected_sock.name.removesuffix(".sock")
    record = lookup(str(mnt) + "/")
    assert record == {
        "pid": os.getpid(),
        "mountpoint": str(mnt.resolve()),
        "socket": str(expected_sock),
        "source": "s3://bkt/",
        "cache_dir": "/var/cache/x",
        "uid": 1000,
    }
    assert lookup(tmp_path / "other") is None
    unregister(mnt, pid=os.getpid() + 1)  # someone else's record is left alone
    assert lookup(mnt) is not None
    unregister(mnt)
    assert lookup(mnt) is None
    assert not json_path.exists()


def test_lookup_ignores_records_of_dead_daemons(tmp_path: Path) -> None:
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    register(tmp_path / "mnt", source="s3://bkt/", cache_dir="/c", uid=0, pid=dead.pid)
    assert lookup(tmp_path / "mnt") is None


def test_normalize_resolves_the_parent_but_never_the_mountpoint(tmp_path: Path) -> None:
    real = tmp_path / "real"
    (real / "mnt").mkdir(parents=True)
    (tmp_path / "alias").symlink_to(real)
    (real / "link").symlink_to(real / "mnt")
    resolved = str(real.resolve())
    assert normalize_mountpoint(tmp_path / "alias" / "mnt") == f"{resolved}/mnt"
    # The last component is taken as named: resolving it would stat the mount root.
    assert normalize_mountpoint(tmp_path / "alias" / "link") == f"{resolved}/link"
    assert normalize_mountpoint("/") == "/"


def test_mount_holding_walks_up_without_entering_the_mount(tmp_path: Path) -> None:
    real = tmp_path / "real"
    mnt = real / "mnt"
    mnt.mkdir(parents=True)
    (tmp_path / "alias").symlink_to(real)
    register(mnt, source="s3://bkt/", cache_dir="/c", uid=0)
    # Nothing below mnt exists on disk: mount_holding must not need it to.
    record, rel = mount_holding(tmp_path / "alias" / "mnt" / "a" / "./b//c.txt")
    assert record["mountpoint"] == str(mnt.resolve())
    assert rel == "a/b/c.txt"
    assert mount_holding(mnt)[1] == "."
    assert mount_holding(f"{mnt}/x/../y")[1] == "y"
    with pytest.raises(ControlUnavailable, match="no tierfs mount at"):
        mount_holding(f"{mnt}/../elsewhere")
    with pytest.raises(ControlUnavailable):
        mount_holding(tmp_path / "unrelated")


def test_mount_holding_relative_to_cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    register(mnt, source="s3://bkt/", cache_dir="/c", uid=0)
    monkeypatch.chdir(tmp_path)
    assert mount_holding("mnt/dir/f")[1] == "dir/f"


def test_symlink_loop_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    with pytest.raises(ControlError, match="too many levels"):
        mount_holding(tmp_path / "loop" / "x")


async def test_cli_commands_reach_a_registered_daemon(tmp_path: Path, registry_dir: Path) -> None:
    """End to end: `tierfs status/prefetch` in a subprocess finds the mount through the registry."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    calls: list[dict[str, Any]] = []

    async def prefetch(args: dict[str, Any], progress: ProgressCallback) -> Any:
        calls.append(args)
        await progress({"done_bytes": 10, "total_bytes": 20, "done_files": 1, "total_files": 2})
        return {"done_files": 1, "failed": [{"path": "d/bad", "error": "EIO"}]}

    async def mount_status(args: dict[str, Any], progress: ProgressCallback) -> Any:
        return {"source": "s3://bkt/", "cache": {"used_bytes": 2048}}

    register(mnt, source="s3://bkt/", cache_dir="/c", uid=0)
    _, sock = registry_paths(mnt)
    server = ControlServer(sock, {"status": mount_status, "prefetch": prefetch}, owner_uid=os.getuid())

    def tierfs(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "tierfs", *args], capture_output=True, text=True, timeout=60, check=False
        )

    async with running(server):
        as_json = await trio.to_thread.run_sync(tierfs, "status", str(mnt), "--json")
        table = await trio.to_thread.run_sync(tierfs, "status", str(mnt))
        fetched = await trio.to_thread.run_sync(tierfs, "prefetch", f"{mnt}/d", "-r", "-j", "3")
    assert as_json.returncode == 0, as_json.stderr
    assert json.loads(as_json.stdout) == {"source": "s3://bkt/", "cache": {"used_bytes": 2048}}
    assert table.stdout.splitlines() == ["source            s3://bkt/", "cache.used_bytes  2.0 KiB"]
    assert calls == [{"paths": ["d"], "recursive": True, "jobs": 3}]
    assert fetched.returncode == 1
    assert "tierfs: error: prefetch failed: d/bad: EIO" in fetched.stderr.splitlines()


# --------------------------------------------------------------------------- progress rendering


def test_progress_formatting() -> None:
    assert format_eta(None) == "--:--"
    assert format_eta(65) == "1:05"
    assert format_eta(3725) == "1:02:05"
    assert format_rate(None) == "-- B/s"
    assert format_rate(1536) == "1.5 KiB/s"
    assert render_bar(0.5, width=4) == "[##..]"
    assert render_bar(7.0, width=2) == "[##]"
    line = render_line(
        "prefetch",
        {"done_bytes": 1 << 30, "total_bytes": 2 << 30, "done_files": 3, "total_files": 6},
        rate=float(1 << 20),
    )
    assert line == (
        "prefetch  [############............]  50%  1.0 GiB / 2.0 GiB  3/6 files  1.0 MiB/s  ETA 17:04"
    )
    assert render_line("flush", {"done_bytes": 0}, None) == "flush  0 B  -- B/s"


def test_rate_meter_uses_a_window() -> None:
    meter = RateMeter(window=5)
    assert meter.add(0.0, 0) is None
    assert meter.add(1.0, 100) == 100
    assert meter.add(10.0, 100) == 0  # a stall shows once the window has moved past the burst


def test_plain_output_is_throttled_lines() -> None:
    now = [0.0]
    out = io.StringIO()
    bar = ProgressBar("flush", out, is_tty=False, clock=lambda: now[0], plain_interval=5)
    for step in range(10):
        now[0] = float(step)
        bar.update({"done_files": step, "total_files": 9})
    bar.finish()
    lines = out.getvalue().splitlines()
    assert [line.split("  ")[2] for line in lines] == ["0/9 files", "5/9 files", "9/9 files"]


def test_tty_output_redraws_one_line() -> None:
    out = io.StringIO()
    bar = ProgressBar("prefetch", out, is_tty=True, clock=lambda: 0.0)
    bar.update({"done_bytes": 1, "total_bytes": 2})
    bar.finish()
    text = out.getvalue()
    assert text.startswith("\rprefetch  [")
    assert text.endswith("\x1b[K\n")
    assert text.count("\n") == 1


async def test_umount_flushes_first_and_stops_on_a_failed_flush(tmp_path: Path) -> None:
    """umount asks the daemon to flush before unmounting, and refuses to unmount if that fails."""
    mnt = tmp_path / "mnt"  # a plain directory: the kernel unmount itself must fail
    mnt.mkdir()
    flushes: list[str] = []
    outcome = {"fail": True}

    async def flush(args: dict[str, Any], progress: ProgressCallback) -> Any:
        flushes.append("flush")
        await progress({"done_files": 1, "total_files": 1, "done_bytes": 5, "total_bytes": 5})
        if outcome["fail"]:
            raise ControlError("S3 unreachable")
        return {"uploaded_files": 1}

    register(mnt, source="s3://bkt/", cache_dir="/c", uid=0)
    _, sock = registry_paths(mnt)

    def umount(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "tierfs", "umount", str(mnt), *args],
            capture_output=True, text=True, timeout=120, check=False,
        )  # fmt: skip

    async with running(ControlServer(sock, {"flush": flush}, owner_uid=os.getuid())):
        failed = await trio.to_thread.run_sync(umount)
        outcome["fail"] = False
        flushed = await trio.to_thread.run_sync(umount)
        skipped = await trio.to_thread.run_sync(umount, "--no-flush")
    assert flushes == ["flush", "flush"]
    assert failed.returncode == 1
    assert failed.stderr.splitlines()[-1].startswith(
        "tierfs: error: flush failed, not unmounting: S3 unreachable"
    )
    # The flush succeeded, so the kernel unmount was tried, and it failed on a directory that isn't a mount.
    assert flushed.returncode == 1
    assert flushed.stderr.splitlines()[-1].startswith("tierfs: error: fusermount3 failed:")
    assert skipped.stderr.splitlines() == [flushed.stderr.splitlines()[-1]]


# --------------------------------------------------------------------------- failed and stuck flushes


async def test_flush_failed_crosses_the_socket_with_its_files(tmp_path: Path) -> None:
    """A FlushFailed raised in the daemon is raised again in the client, with every file and error."""
    failures = {"d/a.bin": "AccessDenied: PUT refused\n(403)", "b": "NoSuchBucket: gone"}

    async def flush(args: dict[str, Any], progress: ProgressCallback) -> Any:
        raise FlushFailed(failures, "permanent errors")

    sock = tmp_path / "c.sock"
    async with running(ControlServer(sock, {"flush": flush}, owner_uid=os.getuid())):
        with pytest.raises(FlushFailed) as info:
            await call(sock, "flush")
    assert info.value.reason == "permanent errors"
    assert info.value.failures == {"d/a.bin": "AccessDenied: PUT refused (403)", "b": "NoSuchBucket: gone"}


async def test_concurrent_progress_from_one_handler_all_arrives(tmp_path: Path) -> None:
    """Tasks of one handler may report at the same moment (a flush's heartbeat beside its uploads)."""

    async def parallel(args: dict[str, Any], progress: ProgressCallback) -> Any:
        async def reporter(task: int) -> None:
            for step in range(20):
                await progress({"task": task, "step": step, "pad": "x" * 4096})

        async with trio.open_nursery() as nursery:
            for task in range(8):
                nursery.start_soon(reporter, task)
        return "done"

    sock = tmp_path / "c.sock"
    async with running(ControlServer(sock, {"flush": parallel}, owner_uid=os.getuid())):
        result, seen = await call(sock, "flush")
    assert result == "done"
    assert sorted((p["task"], p["step"]) for p in seen) == [(t, s) for t in range(8) for s in range(20)]


async def test_a_promised_deadline_bounds_the_wait_and_is_not_shown(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A daemon whose operation runs past the deadline it stated, while it keeps sending progress,
    cannot keep the client waiting: the client gives up DEADLINE_GRACE after the deadline."""
    monkeypatch.setattr(control_client, "DEADLINE_GRACE", 0.5)

    async def stuck(args: dict[str, Any], progress: ProgressCallback) -> Any:
        await progress({"deadline": 0.5})
        while True:
            await progress({"done_files": 0, "total_files": 1})
            await trio.sleep(0.05)

    sock = tmp_path / "c.sock"
    async with running(ControlServer(sock, {"flush": stuck}, owner_uid=os.getuid())):
        started = trio.current_time()
        with pytest.raises(ControlTimeout, match="did not finish flush by its deadline") as info:
            await call(sock, "flush")
        waited = trio.current_time() - started
    assert not isinstance(info.value, ControlUnavailable)  # umount must not take it for a dead daemon
    assert 1.0 <= waited < 10.0


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tierfs", *args], capture_output=True, text=True, timeout=120, check=False
    )


async def test_cli_flush_and_umount_name_each_file_that_failed(tmp_path: Path) -> None:
    """`tierfs flush` and `tierfs umount` exit 1 with one line per failed file; umount then does not
    unmount (a plain directory: an unmount attempt would fail with a fusermount3 error line)."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    seen_args: list[dict[str, Any]] = []

    async def flush(args: dict[str, Any], progress: ProgressCallback) -> Any:
        seen_args.append(args)
        await progress({"done_files": 0, "total_files": 2, "done_bytes": 0, "total_bytes": 10})
        raise FlushFailed(
            {"d/a.bin": "AccessDenied: denied", "b c": "NoSuchBucket: gone"}, "permanent errors"
        )

    register(mnt, source="s3://bkt/", cache_dir="/c", uid=0)
    _, sock = registry_paths(mnt)
    async with running(ControlServer(sock, {"flush": flush}, owner_uid=os.getuid())):
        flushed = await trio.to_thread.run_sync(_cli, "flush", str(mnt), "--timeout", "7")
        unmounted = await trio.to_thread.run_sync(_cli, "umount", str(mnt))
    assert seen_args == [{"timeout": 7.0}, {}]
    per_file = [
        "tierfs: error: flush failed: b c: NoSuchBucket: gone",
        "tierfs: error: flush failed: d/a.bin: AccessDenied: denied",
    ]
    assert flushed.returncode == 1
    errors = [line for line in flushed.stderr.splitlines() if line.startswith("tierfs: error:")]
    assert errors == [
        *per_file,
        "tierfs: error: flush failed (permanent errors): 2 files not uploaded; it stays staged and "
        "journaled for a later flush or the next mount",
    ]
    assert unmounted.returncode == 1
    errors = [line for line in unmounted.stderr.splitlines() if line.startswith("tierfs: error:")]
    assert errors[:2] == per_file
    assert errors[2].startswith("tierfs: error: flush failed (permanent errors), not unmounting: 2 files")
    assert "--no-flush" in errors[2]
    assert len(errors) == 3  # and no fusermount3 line: the unmount was not tried


async def test_cli_returns_from_a_stuck_flush_naming_the_failing_files(tmp_path: Path) -> None:
    """A daemon whose flush never ends (0% for ever) still lets `tierfs flush`/`umount` return, with
    the files `status` reports as failing; umount does not unmount."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()

    async def flush(args: dict[str, Any], progress: ProgressCallback) -> Any:
        await progress({"deadline": 1})
        while True:
            await progress({"done_files": 0, "total_files": 1, "done_bytes": 0, "total_bytes": 5})
            await trio.sleep(0.25)

    async def mount_status(args: dict[str, Any], progress: ProgressCallback) -> Any:
        return {"dirty_files": 1, "failing": {"w/f1": "Unavailable: 503 SlowDown"}}

    register(mnt, source="s3://bkt/", cache_dir="/c", uid=0)
    _, sock = registry_paths(mnt)
    handlers: dict[str, Handler] = {"flush": flush, "status": mount_status}
    async with running(ControlServer(sock, handlers, owner_uid=os.getuid())):
        started = trio.current_time()
        flushed = await trio.to_thread.run_sync(_cli, "flush", str(mnt))
        flush_seconds = trio.current_time() - started
        unmounted = await trio.to_thread.run_sync(_cli, "umount", str(mnt))
    assert flushed.returncode == 1
    assert "tierfs: error: flush failed: w/f1: Unavailable: 503 SlowDown" in flushed.stderr.splitlines()
    assert "did not finish flush by its deadline" in flushed.stderr
    assert flush_seconds < 1 + control_client.DEADLINE_GRACE + 20  # generous: a subprocess on a busy machine
    assert unmounted.returncode == 1
    assert "tierfs: error: flush failed: w/f1: Unavailable: 503 SlowDown" in unmounted.stderr.splitlines()
    assert "not unmounting" in unmounted.stderr
    assert "fusermount3" not in unmounted.stderr
