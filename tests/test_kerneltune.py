"""mountinfo parsing and sysfs knob writing against a fake sysfs tree."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pytest

from tierfs.fuse import kerneltune
from tierfs.fuse.kerneltune import MountInfo, abort_connection, find_mount, parse_mountinfo_line, tune

# Real-looking lines: root fs, a tmpfs, an s3fs FUSE mount, a tierfs mount whose path holds
# a space, a tab and a backslash, a fuseblk mount (block major), and a tmpfs stacked on top
# of /mnt/stacked after a FUSE mount there.
MOUNTINFO = "\n".join(
    [
        "22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw,errors=remount-ro",
        "25 22 0:23 / /mnt/data rw,nosuid shared:5 master:2 - tmpfs tmpfs rw,size=1024k",
        "31 22 0:45 / /mnt/s3fs rw,nosuid,nodev,relatime shared:9 - fuse.s3fs s3fs rw,user_id=0,group_id=0",
        r"40 22 0:52 / /mnt/my\040data\011x\134y rw,nosuid,nodev,relatime shared:12 - fuse.tierfs "
        r"s3://bucket/pre\040fix rw,user_id=0,group_id=0,allow_other",
        "41 22 8:17 / /media/usb rw,relatime - fuseblk /dev/sdb1 rw,user_id=0,group_id=0",
        "50 22 0:60 / /mnt/stacked rw - fuse.tierfs s3://old rw,user_id=0,group_id=0",
        "51 50 0:61 / /mnt/stacked rw - fuse.tierfs s3://new rw,user_id=0,group_id=0",
        "52 22 0:62 / /mnt/tmp-on-top rw - fuse.tierfs s3://under rw",
        "53 52 0:63 / /mnt/tmp-on-top rw - tmpfs tmpfs rw",
        "this line is garbage",
        "",
    ]
)


def test_parse_line_fields() -> None:
    info = parse_mountinfo_line(MOUNTINFO.splitlines()[1])
    assert info == MountInfo(
        mount_id=25,
        parent_id=22,
        major=0,
        minor=23,
        root="/",
        mountpoint="/mnt/data",
        options="rw,nosuid",
        optional_fields=("shared:5", "master:2"),
        fstype="tmpfs",
        source="tmpfs",
        super_options="rw,size=1024k",
    )


@pytest.mark.parametrize("line", ["", "garbage", "1 2 x:y / /a rw - fuse s rw", "1 2 0:5 / /a rw no-sep"])
def test_malformed_lines_are_ignored(line: str) -> None:
    assert parse_mountinfo_line(line) is None


def test_find_mount_unescapes_octal_paths() -> None:
    info = find_mount("/mnt/my data\tx\\y", MOUNTINFO)
    assert info is not None
    assert (info.fstype, info.source, info.bdi_name, info.connection) == (
        "fuse.tierfs",
        "s3://bucket/pre fix",
        "0:52",
        52,
    )
    assert "allow_other" in info.super_options


def test_find_mount_only_matches_fuse() -> None:
    assert find_mount("/mnt/data", MOUNTINFO) is None  # tmpfs
    assert find_mount("/", MOUNTINFO) is None  # ext4
    assert find_mount("/mnt/nothing", MOUNTINFO) is None
    s3fs = find_mount("/mnt/s3fs", MOUNTINFO)
    assert s3fs is not None and s3fs.fstype == "fuse.s3fs"


def test_find_mount_normalises_lexically() -> None:
    info = find_mount("/mnt/./s3fs/", MOUNTINFO)
    assert info is not None and info.mount_id == 31


def test_find_mount_takes_topmost_of_stacked_mounts() -> None:
    info = find_mount("/mnt/stacked", MOUNTINFO)
    assert info is not None and info.source == "s3://new"
    # A non-FUSE mount on top hides nothing from us: the FUSE one below is still reported.
    under = find_mount("/mnt/tmp-on-top", MOUNTINFO)
    assert under is not None and under.source == "s3://under"


def test_fuseblk_connection_folds_in_major() -> None:
    info = find_mount("/media/usb", MOUNTINFO)
    assert info is not None
    assert info.bdi_name == "8:17"
    assert info.connection == (8 << 20) | 17


def test_find_mount_reads_real_mountinfo_without_fuse_entry(tmp_path: Path) -> None:
    # tmp_path is certainly not a FUSE mount; this exercises the /proc/self/mountinfo path.
    assert find_mount(str(tmp_path)) is None


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
