"""sd_notify against real datagram sockets standing in for systemd's NOTIFY_SOCKET."""

from __future__ import annotations

import logging
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tierfs.daemon import sdnotify


def _receive(sock: socket.socket) -> str:
    sock.settimeout(5)  # a bound on a hang, not a timing assertion: the datagram is already queued
    return sock.recv(4096).decode()


@pytest.fixture
def path_socket(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[socket.socket]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    address = tmp_path / "notify"
    sock.bind(str(address))
    monkeypatch.setenv("NOTIFY_SOCKET", str(address))
    yield sock
    sock.close()


@pytest.fixture
def abstract_socket(monkeypatch: pytest.MonkeyPatch) -> Iterator[socket.socket]:
    name = f"tierfs-test-{uuid.uuid4().hex}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind("\0" + name)
    monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
    yield sock
    sock.close()


def test_ready_with_status_is_one_datagram(path_socket: socket.socket) -> None:
    assert sdnotify.ready("mounted s3://bucket/ at /mnt/data") is True
    assert _receive(path_socket) == "READY=1\nSTATUS=mounted s3://bucket/ at /mnt/data"


def test_abstract_socket(abstract_socket: socket.socket) -> None:
    assert sdnotify.ready() is True
    assert _receive(abstract_socket) == "READY=1"


def test_stopping_and_extend_timeout(path_socket: socket.socket) -> None:
    assert sdnotify.stopping("flushing 3 files") is True
    assert sdnotify.extend_timeout(90) is True
    assert _receive(path_socket) == "STOPPING=1\nSTATUS=flushing 3 files"
    assert _receive(path_socket) == "EXTEND_TIMEOUT_USEC=90000000"


def test_multiline_status_cannot_inject_assignments(path_socket: socket.socket) -> None:
    assert sdnotify.stopping("bad\nREADY=1") is True
    assert _receive(path_socket) == "STOPPING=1\nSTATUS=bad READY=1"


def test_malformed_assignment_is_refused(
    path_socket: socket.socket, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="tierfs.daemon.sdnotify"):
        assert sdnotify.notify("READY=1\nMAINPID=1") is False
    assert "malformed" in caplog.text
    path_socket.setblocking(False)
    with pytest.raises(BlockingIOError):
        path_socket.recv(4096)


def test_noop_without_notify_socket(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    with caplog.at_level(logging.DEBUG, logger="tierfs.daemon.sdnotify"):
        assert sdnotify.ready("x") is False
        assert sdnotify.stopping() is False
    assert caplog.records == []


@pytest.mark.parametrize(
    "value",
    ["relative/path", "vsock:2:1234", "/nonexistent/dir/notify", "/" + "x" * 200, "@" + "y" * 200],
)
def test_undeliverable_warns_and_never_raises(
    value: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", value)
    with caplog.at_level(logging.WARNING, logger="tierfs.daemon.sdnotify"):
        assert sdnotify.ready() is False
    assert [r.levelno for r in caplog.records] == [logging.WARNING]


def test_socket_path_that_is_not_a_socket(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    regular = tmp_path / "plain-file"
    regular.write_text("")
    monkeypatch.setenv("NOTIFY_SOCKET", str(regular))
    with caplog.at_level(logging.WARNING, logger="tierfs.daemon.sdnotify"):
        assert sdnotify.stopping() is False
    assert "could not notify systemd" in caplog.text
