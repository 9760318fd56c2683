"""``tierfs stats``: the figures it computes, its plain output, and the live view in a real terminal.

The live view is driven through tmux as a user would see it: ``tierfs stats MNT`` runs in a
detached tmux pane (a real pty, so rich draws and redraws), a reader thread loads the mount, and
``capture-pane`` snapshots the screen. The test asserts that the screen is redrawn with numbers
that move, and that Ctrl-C (``send-keys C-c``) ends it.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from mounting import REPO_ROOT, Mount, Mounter, run_tierfs, wait_until

from tierfs.stats import frame as statsframe
from tools.servers import MotoS3, child_env, s3_client

FILES = 80
FILE_SIZE = 256 * 1024


# --------------------------------------------------------------------------- the figures


def test_quantile_interpolates_within_the_bucket_like_prometheus() -> None:
    bounds = [0.01, 0.1, 1.0]
    # 10 requests <= 10 ms, 80 more <= 100 ms, 10 more <= 1 s, none beyond
    counts = [10, 90, 100, 100]
    assert statsframe.quantile(0.5, bounds, counts) == (pytest.approx(0.01 + 0.09 * 40 / 80), None)
    assert statsframe.quantile(0.05, bounds, counts) == (pytest.approx(0.005), None)
    assert statsframe.quantile(0.99, bounds, counts) == (pytest.approx(0.1 + 0.9 * 9 / 10), None)
    assert statsframe.quantile(0.99, bounds, [0, 0, 0, 5]) == (None, 1.0)  # beyond the last bound
    assert statsframe.quantile(0.5, bounds, [0, 0, 0, 0]) == (None, None)


def _status(**values: object) -> dict[str, object]:
    base: dict[str, object] = {
        "mountpoint": "/mnt/x", "memory_hits": 0, "memory_hit_bytes": 0, "disk_hits": 0, "disk_hit_bytes": 0,
        "s3_requests": {"get_object": 0}, "s3_bytes_fetched": 0, "cache_hits": 0, "cache_misses": 0,
        "s3_latency_bounds": [0.01, 0.1], "s3_latency_counts": {"get_object": [0, 0, 0]},
    }  # fmt: skip
    base.update(values)
    return base


def test_rates_are_deltas_over_the_interval_and_latency_is_of_the_interval_only() -> None:
    old = statsframe.Snapshot(10.0, _status(
        memory_hits=100, memory_hit_bytes=100 << 20, s3_requests={"get_object": 50}, s3_bytes_fetched=0,
        cache_hits=100, cache_misses=100, s3_latency_counts={"get_object": [0, 0, 50]},
        direct_fallbacks={"miss": 3},
    ))  # fmt: skip
    new = statsframe.Snapshot(12.0, _status(
        memory_hits=300, memory_hit_bytes=300 << 20, disk_hits=20, disk_hit_bytes=20 << 20,
        s3_requests={"get_object": 60}, s3_bytes_fetched=10 << 20, cache_hits=320, cache_misses=110,
        s3_latency_counts={"get_object": [8, 9, 60]}, s3_in_flight=4, direct_reads=10,
        direct_fallbacks={"miss": 5, "dirty": 1}, uploads_pending=3, uploads_running=2, dirty_bytes=5,
        hit_ratio=0.75,
    ))  # fmt: skip
    frame = statsframe.build(old, new)
    rates = {row.tier: (row.reads_per_s, row.bytes_per_s) for row in frame.tiers}
    assert rates == {
        "memory": (100.0, 100 << 20), "local disk": (10.0, 10 << 20), "origin": (5.0, 5 << 20),
    }  # no "shared" row without a shared tier  # fmt: skip
    assert frame.hit_ratio == pytest.approx(220 / 230) and frame.hit_ratio_total == 0.75
    (latency,) = frame.latency
    assert latency.op == "get_object" and latency.requests == 10  # the 50 earlier ones are not in it
    assert latency.percentiles[0] == pytest.approx(0.01 * 5 / 8)  # the 5th of 8 in the first bucket
    assert latency.percentiles[2] is None and latency.over == 0.1
    assert frame.gets_in_flight == 4 and frame.direct_reads_per_s == 5.0
    assert frame.direct_fallbacks_per_s == 1.5 and frame.direct_fallback_reasons == {"miss": 2, "dirty": 1}
    assert (frame.uploads_pending, frame.uploads_running, frame.dirty_bytes) == (3, 2, 5)


def test_every_per_snapshot_entry_the_daemon_reports_gets_a_line() -> None:
    """Snapshot mounts report their own entries; the view shows whatever fields they carry."""
    as_map = {"v1": {"reads": 10, "path": "/mnt/x/@v1"}, "v2": {"reads": 0}}
    as_list = [{"name": "v1", "reads": 30, "path": "/mnt/x/@v1"}, {"name": "v2", "reads": 0}]
    for old, new in ((as_map, {**as_map, "v1": {**as_map["v1"], "reads": 30}}), (as_list, as_list)):
        frame = statsframe.build(
            statsframe.Snapshot(0.0, _status(snapshots=as_map)),
            statsframe.Snapshot(2.0, _status(snapshots=new)),
        )
        rows = {row.name: row for row in frame.snapshots}
        assert set(rows) == {"v1", "v2"}
        assert rows["v1"].values["reads"] == 30 and rows["v1"].rates == {"reads": 10.0}
        assert rows["v1"].values["path"] == "/mnt/x/@v1" and rows["v2"].rates == {}
        del old


def test_a_pinned_snapshot_mount_gets_its_line() -> None:
    """A ``--snapshot`` mount reports the one snapshot it pins as ``status["snapshot"]``."""
    old = _status(snapshot={"name": "v1", "hits": 10, "misses": 2, "files": 5, "versioned": True})
    new = _status(snapshot={"name": "v1", "hits": 30, "misses": 2, "files": 5, "versioned": True})
    (row,) = statsframe.build(statsframe.Snapshot(0.0, old), statsframe.Snapshot(2.0, new)).snapshots
    assert row.name == "v1" and row.values["files"] == 5 and row.rates == {"hits": 10.0}
    plain = statsframe.build(statsframe.Snapshot(0.0, _status()), statsframe.Snapshot(1.0, _status()))
    assert plain.snapshots == []


# --------------------------------------------------------------------------- on a real mount


class Load:
    """A reader thread: first pass cold (origin GETs), then re-reads with the page cache dropped
    for each file (POSIX_FADV_DONTNEED), so every read reaches the daemon's tiers."""

    def __init__(self, mount: Mount) -> None:
        self.mount = mount
        self.stop = threading.Event()
        self.reads = 0
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self.stop.is_set():
            for i in range(FILES):
                if self.stop.is_set():
                    return
                with open(self.mount.path / f"train/{i:04d}.bin", "rb") as f:
                    f.read()
                    os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
                self.reads += 1
                time.sleep(0.01)

    def __enter__(self) -> Load:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(30)


@pytest.fixture
def loaded_mount(moto: MotoS3, bucket: Callable[..., str], mounter: Mounter) -> Mount:
    name = bucket(moto)
    client = s3_client(moto.endpoint_url)
    body = os.urandom(FILE_SIZE)
    for i in range(FILES):
        client.put_object(Bucket=name, Key=f"train/{i:04d}.bin", Body=body[i:] + body[:i])
    return mounter(f"s3://{name}", endpoint_url=moto.endpoint_url)


def plain_figures(text: str) -> dict[str, float]:
    """reads/s of each tier row of the plain output."""
    return {
        m.group(1): float(m.group(2))
        for m in re.finditer(r"^(memory|local disk|shared|origin)\s+([\d.]+)\s+[\d.]+$", text, re.M)
    }


@pytest.mark.fuse
def test_once_prints_one_plain_frame_when_not_a_terminal(loaded_mount: Mount) -> None:
    with Load(loaded_mount):
        done = run_tierfs("stats", str(loaded_mount.path), "--once")
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.count("tierfs stats ") == 1 and "\x1b[" not in done.stdout  # no escape codes
    figures = plain_figures(done.stdout)
    assert set(figures) == {"memory", "local disk", "origin"}
    assert sum(figures.values()) > 0, done.stdout
    for label in ("hit ratio", "s3 in flight", "s3 latency", "direct reader", "write-back", "errors"):
        assert re.search(rf"^{label}\b", done.stdout, re.M), (label, done.stdout)


@pytest.mark.fuse
def test_stats_of_something_not_mounted_is_one_clear_error(tmp_path: Path) -> None:
    done = run_tierfs("stats", str(tmp_path), "--once")
    assert (
        done.returncode == 1 and done.stderr.startswith("tierfs: error:") and "Traceback" not in done.stderr
    )


class Tmux:
    """A private tmux server (its own socket, so nothing else's sessions are touched)."""

    def __init__(self) -> None:
        self.socket = f"tierfs-test-{uuid.uuid4().hex[:8]}"

    def __call__(self, *args: str) -> str:
        done = subprocess.run(
            ["tmux", "-L", self.socket, *args], capture_output=True, text=True, timeout=20, check=True
        )
        return done.stdout

    def capture(self, target: str) -> str:
        return self("capture-pane", "-p", "-t", target)

    def has_session(self, name: str) -> bool:
        done = subprocess.run(
            ["tmux", "-L", self.socket, "has-session", "-t", name], capture_output=True, timeout=20
        )
        return done.returncode == 0

    def close(self) -> None:
        """Stop this server and remove its socket file, which tmux leaves behind (it lives in
        $TMUX_TMPDIR or /tmp, under tmux-UID, named by -L)."""
        subprocess.run(["tmux", "-L", self.socket, "kill-server"], capture_output=True, timeout=20)
        directory = Path(os.environ.get("TMUX_TMPDIR") or "/tmp") / f"tmux-{os.getuid()}"
        (directory / self.socket).unlink(missing_ok=True)


@pytest.fixture
def tmux() -> Iterator[Tmux]:
    if shutil.which("tmux") is None:
        pytest.fail("tmux is not installed: `make deps` installs it (apt-get install tmux)")
    server = Tmux()
    try:
        yield server
    finally:
        server.close()


def screen_figures(screen: str) -> dict[str, tuple[float, float]]:
    """(reads/s, MB/s) of each tier row of rich's table, e.g. ``│ memory │ 78.0 │ 23.39 │``."""
    found: dict[str, tuple[float, float]] = {}
    for m in re.finditer(
        r"(memory|local disk|shared|origin|direct reader)(?: \(6 s\))?\s*│\s*([\d.]+)\s*│\s*([\d.]+)", screen
    ):
        found[m.group(1)] = (float(m.group(2)), float(m.group(3)))
    return found


@pytest.mark.fuse
def test_live_view_in_a_real_terminal_redraws_with_moving_numbers(loaded_mount: Mount, tmux: Tmux) -> None:
    env = child_env()
    exports = " ".join(
        f"{k}={shlex.quote(v)}" for k, v in env.items() if k.startswith(("AWS_", "XDG_", "TIERFS_"))
    )
    command = (
        f"env {exports} TERM=xterm-256color {shlex.quote(sys.executable)} -m tierfs stats {loaded_mount.path}"
    )
    tmux("new-session", "-d", "-s", "stats", "-x", "110", "-y", "45", "-c", str(REPO_ROOT), command)
    wait_until(lambda: "tierfs stats" in tmux.capture("stats"), 30, "the first frame on screen")
    idle = screen_figures(tmux.capture("stats"))
    assert set(idle) >= {"memory", "local disk", "origin", "direct reader"}, tmux.capture("stats")
    screens: list[str] = []
    with Load(loaded_mount) as load:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            time.sleep(1.0)
            screens.append(tmux.capture("stats"))
            moving = [screen_figures(s) for s in screens[-3:]]
            if len(screens) >= 3 and all(sum(r for r, _ in f.values()) > 0 for f in moving):
                break
        assert load.reads > 0
    figures = [screen_figures(s) for s in screens]
    busy = [f for f in figures if sum(r for r, _ in f.values()) > 0]
    assert len(busy) >= 3, "\n----\n".join(screens[-3:])
    assert len({tuple(sorted(f.items())) for f in busy}) >= 2, "the numbers never changed between frames"
    assert any(f["origin"][0] > 0 for f in busy) or any(f["memory"][0] > 0 for f in busy)
    assert any("get_object" in screen for screen in screens), "no S3 latency row while reading cold files"
    last = screens[-1]
    assert "S3 op" in last and "hit ratio" in last, last
    assert last.count("tierfs stats") == 1, "redrawn in place, not scrolled: " + last
    print(last)  # `pytest -s` shows a screen like the one in the README
    tmux("send-keys", "-t", "stats", "C-c")
    wait_until(lambda: not tmux.has_session("stats"), 15, "tierfs stats to exit on Ctrl-C")


@pytest.mark.fuse
def test_a_snapshot_mount_shows_a_line_for_its_snapshot(
    moto: MotoS3, bucket: Callable[..., str], mounter: Mounter
) -> None:
    name = bucket(moto)
    client = s3_client(moto.endpoint_url)
    for i in range(3):
        client.put_object(Bucket=name, Key=f"d/{i}.bin", Body=os.urandom(50_000))
    made = run_tierfs("snapshot", "create", f"s3://{name}", "v1", "--endpoint-url", moto.endpoint_url)
    assert made.returncode == 0, made.stderr
    mount = mounter(f"s3://{name}", "--snapshot", "v1", endpoint_url=moto.endpoint_url)
    for i in range(3):
        assert len((mount.path / f"d/{i}.bin").read_bytes()) == 50_000
    done = run_tierfs("stats", str(mount.path), "--once")
    assert done.returncode == 0, done.stderr
    (line,) = [line for line in done.stdout.splitlines() if line.startswith("snapshot ")]
    assert line.split()[1] == "v1" and "files=3" in line and "misses=3" in line, line
