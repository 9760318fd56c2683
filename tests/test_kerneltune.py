"""sysfs knob writing against a fake sysfs tree (the mountinfo it reads: tests/test_mountinfo.py)."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pytest
from test_mountinfo import MOUNTINFO

from tierfs.fuse import kerneltune
from tierfs.fuse.kerneltune import abort_connection, tune


def _fake_sysfs(root: Path, bdi: str, connection: int, *, with_bdi: bool = True) -> None:
    if with_bdi:
        (root / "class" / "bdi" / bdi).mkdir(parents=True)
        (root / "class" / "bdi" / bdi / "read_ahead_kb").write_text("128\n")
    conn = root / "fs" / "fuse" / "connections" / str(connection)
    conn.mkdir(parents=True)
    for name, value in [("max_background", "12\n"), ("congestion_threshold", "9\n"), ("abort", "")]:
        (conn / name).write_text(value)


def test_tune_writes_all_knobs(tmp_path: Path) -> None:
    _fake_sysfs(tmp_path, "0:52", 52)
    applied = tune(
        "/mnt/my data\tx\\y",
        read_ahead_kb=8192,
        max_background=32,
        congestion_threshold=24,
        sysfs_root=str(tmp_path),
        mountinfo_text=MOUNTINFO,
    )
    assert applied == {"read_ahead_kb": 8192, "max_background": 32, "congestion_threshold": 24}
    assert (tmp_path / "class/bdi/0:52/read_ahead_kb").read_text() == "8192\n"
    assert (tmp_path / "fs/fuse/connections/52/max_background").read_text() == "32\n"
    assert (tmp_path / "fs/fuse/connections/52/congestion_threshold").read_text() == "24\n"


def test_tune_defaults(tmp_path: Path) -> None:
    _fake_sysfs(tmp_path, "0:45", 45)
    applied = tune("/mnt/s3fs", sysfs_root=str(tmp_path), mountinfo_text=MOUNTINFO)
    assert applied == {
        "read_ahead_kb": kerneltune.DEFAULT_READ_AHEAD_KB,
        "max_background": kerneltune.DEFAULT_MAX_BACKGROUND,
        "congestion_threshold": kerneltune.DEFAULT_CONGESTION_THRESHOLD,
    }
    assert kerneltune.DEFAULT_CONGESTION_THRESHOLD <= kerneltune.DEFAULT_MAX_BACKGROUND


def test_tune_skips_absent_files_and_never_creates_them(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # No bdi directory at all, and a connection directory lacking congestion_threshold.
    _fake_sysfs(tmp_path, "0:45", 45, with_bdi=False)
    (tmp_path / "fs/fuse/connections/45/congestion_threshold").unlink()
    with caplog.at_level(logging.DEBUG, logger="tierfs.fuse.kerneltune"):
        applied = tune("/mnt/s3fs", sysfs_root=str(tmp_path), mountinfo_text=MOUNTINFO)
    assert applied == {"max_background": kerneltune.DEFAULT_MAX_BACKGROUND}
    assert not (tmp_path / "fs/fuse/connections/45/congestion_threshold").exists()
    skipped = [r for r in caplog.records if "skipping kernel knob" in r.getMessage()]
    assert len(skipped) == 2 and all(r.levelno == logging.DEBUG for r in skipped)


def test_tune_with_nothing_present_returns_empty(tmp_path: Path) -> None:
    assert tune("/mnt/s3fs", sysfs_root=str(tmp_path), mountinfo_text=MOUNTINFO) == {}


def test_tune_without_mount_returns_empty(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    _fake_sysfs(tmp_path, "0:23", 23)
    with caplog.at_level(logging.WARNING, logger="tierfs.fuse.kerneltune"):
        assert tune("/mnt/data", sysfs_root=str(tmp_path), mountinfo_text=MOUNTINFO) == {}
    assert "no FUSE mount" in caplog.text
    assert (tmp_path / "fs/fuse/connections/23/max_background").read_text() == "12\n"


def test_abort_connection(tmp_path: Path) -> None:
    _fake_sysfs(tmp_path, "0:52", 52)
    assert abort_connection(52, sysfs_root=str(tmp_path)) is True
    assert (tmp_path / "fs/fuse/connections/52/abort").read_text() == "1\n"
    assert abort_connection(99, sysfs_root=str(tmp_path)) is False
    assert not (tmp_path / "fs/fuse/connections/99").exists()


def test_tune_unexpected_error_is_logged_not_raised(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    _fake_sysfs(tmp_path, "0:45", 45)
    knob = tmp_path / "fs/fuse/connections/45/max_background"
    knob.unlink()
    knob.mkdir()  # EISDIR: not an expected "not permitted here" case, so it is a warning
    with caplog.at_level(logging.WARNING, logger="tierfs.fuse.kerneltune"):
        applied = tune("/mnt/s3fs", sysfs_root=str(tmp_path), mountinfo_text=MOUNTINFO)
    assert "max_background" not in applied and "read_ahead_kb" in applied
    assert "could not set kernel knob" in caplog.text


class _ListHandler(logging.Handler):
    def __init__(self, sink: list[str]) -> None:
        super().__init__(logging.DEBUG)
        self.sink = sink

    def emit(self, record: logging.LogRecord) -> None:
        self.sink.append(f"{record.levelname} {record.getMessage()}")


def test_tune_as_unprivileged_user_skips_quietly(tmp_path: Path) -> None:
    """A real EACCES: a forked child that became 'nobody' cannot enter pytest's 0700 tmp_path."""
    if os.geteuid() != 0:
        pytest.skip("needs root to fork a child that drops to another user")
    _fake_sysfs(tmp_path, "0:45", 45)
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: drop privileges, tune, report through the pipe, never return into pytest
        status = 1
        try:
            os.close(read_end)
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)
            records: list[str] = []
            handler = _ListHandler(records)
            logger = logging.getLogger("tierfs.fuse.kerneltune")
            logger.addHandler(handler)
            logger.setLevel(logging.DEBUG)
            applied = tune("/mnt/s3fs", sysfs_root=str(tmp_path), mountinfo_text=MOUNTINFO)
            os.write(write_end, json.dumps({"applied": applied, "log": records}).encode())
            status = 0
        finally:
            os._exit(status)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        report = pipe.read()
    _, wait_status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(wait_status) == 0
    result = json.loads(report)
    assert result["applied"] == {}
    assert len(result["log"]) == 3
    assert all(line.startswith("DEBUG skipping kernel knob") for line in result["log"])
    assert all("Permission denied" in line for line in result["log"])
    assert (tmp_path / "fs/fuse/connections/45/max_background").read_text() == "12\n"
