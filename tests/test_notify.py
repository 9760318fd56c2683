"""The systemd unit's life cycle, end to end, against a fake ``NOTIFY_SOCKET``.

Nothing here runs systemd; instead each test does what systemd does with
packaging/systemd/tierfs@.service: the ExecStartPre/ExecStart/ExecStop lines are read
from the shipped unit and expanded the way systemd expands them (``%f``, ``${VAR}`` as one
word, ``$VAR`` split on spaces) with variables from an EnvironmentFile made from
packaging/systemd/tierfs.env.example, and the daemon runs in the foreground (Type=notify)
with ``NOTIFY_SOCKET`` naming an AF_UNIX datagram socket the test bound. So the unit and
env example that ship are the ones tested.

What Type=notify promises consumers (``After=tierfs@mnt-data.service``): when ``READY=1``
arrives the mount is already live. The test checks the mount table and lists the mount
the moment the datagram is received.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import pytest
from mounting import MOUNT_TIMEOUT, REPO_ROOT, Mount, tierfs_command

from tools.servers import ACCESS_KEY, SECRET_KEY, SeaweedFS, child_env, is_fuse_mounted, s3_client

pytestmark = pytest.mark.fuse

SYSTEMD = REPO_ROOT / "packaging" / "systemd"
PAYLOAD = b"tierfs under systemd\n" * 1000
STOP_TIMEOUT = 60.0
T = TypeVar("T")


# --------------------------------------------------------------------------- the unit, as systemd reads it


def unit_commands() -> dict[str, str]:
    """``ExecStartPre``/``ExecStart``/``ExecStop`` of the shipped unit (each appears once)."""
    commands: dict[str, str] = {}
    for line in (SYSTEMD / "tierfs@.service").read_text().splitlines():
        key, sep, value = line.partition("=")
        if sep and key in ("ExecStartPre", "ExecStart", "ExecStop"):
            assert key not in commands, f"{key} appears twice; this emulation expects one"
            commands[key] = value
    assert set(commands) == {"ExecStartPre", "ExecStart", "ExecStop"}, commands
    return commands


def read_environment_file(text: str) -> dict[str, str]:
    """systemd's EnvironmentFile=: ``KEY=VALUE`` lines, ``#`` comments, one level of quotes stripped."""
    env: dict[str, str] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        key, _, value = line.partition("=")
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        env[key.strip()] = value
    return env


def expand(command: str, env: dict[str, str], path: Path) -> list[str]:
    """systemd's expansion of one Exec line: ``%f``, ``${VAR}`` (one word) and ``$VAR`` (split)."""
    argv: list[str] = []
    for word in command.lstrip("-").split():
        if word == "%f":
            argv.append(str(path))
        elif match := re.fullmatch(r"\$\{(\w+)\}", word):
            argv.append(env[match[1]])
        elif match := re.fullmatch(r"\$(\w+)", word):
            argv.extend(env.get(match[1], "").split())
        else:
            assert "$" not in word and "%" not in word, f"unexpanded {word!r} in {command!r}"
            argv.append(word)
    return argv


def tierfs_argv(argv: list[str]) -> list[str]:
    """The unit runs /usr/local/bin/tierfs; the test runs the code under test the same way."""
    assert Path(argv[0]).name == "tierfs", argv
    return tierfs_command(*argv[1:])


# --------------------------------------------------------------------------- one "service instance"


@dataclass
class Service:
    mount: Mount
    notify: socket.socket
    env: dict[str, str]
    commands: dict[str, str]

    def datagrams_until(self, wanted: str) -> list[str]:
        """Receive notifications until one carries ``wanted`` (e.g. ``STOPPING=1``); returns them all."""
        return self.observe_at(wanted, lambda: None)[0]

    def observe_at(self, wanted: str, observe: Callable[[], T]) -> tuple[list[str], T]:
        """Receive until a datagram carries ``wanted``, then at once call ``observe``.

        ``observe`` runs the instant that datagram has arrived, before anything else, so it
        sees the state that systemd's consumers would see when the unit turns active.
        """
        seen: list[str] = []
        deadline = time.monotonic() + MOUNT_TIMEOUT
        self.notify.settimeout(0.1)
        while time.monotonic() < deadline:
            try:
                message = self.notify.recv(4096).decode()
            except TimeoutError:
                if self.mount.process.poll() is not None and not seen_pending(self.notify):
                    break
                continue
            seen.append(message)
            if wanted in message.split("\n"):
                return seen, observe()
        raise AssertionError(f"no {wanted} among {seen}\n{self.mount.log_text()}")


def seen_pending(sock: socket.socket) -> bool:
    """True if a datagram is still queued (the sender may have exited right after sending)."""
    sock.setblocking(False)
    try:
        sock.recv(4096, socket.MSG_PEEK)
    except BlockingIOError:
        return False
    finally:
        sock.settimeout(0.1)
    return True


@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[tuple[socket.socket, Path]]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    address = tmp_path / "notify"
    sock.bind(str(address))
    try:
        yield sock, address
    finally:
        sock.close()


@pytest.fixture
def instance_env(tmp_path: Path, seaweed: SeaweedFS) -> Callable[[str], dict[str, str]]:
    """``/etc/tierfs/mnt-data.env`` made from the shipped example, pointed at this test's server.

    Credentials come the way the example recommends: ``AWS_PROFILE`` from a root-only
    shared credentials file (the keys are *not* in the daemon's environment).
    """

    def make(source: str) -> dict[str, str]:
        credentials = tmp_path / "credentials"
        credentials.write_text(
            f"[tierfs]\naws_access_key_id = {ACCESS_KEY}\naws_secret_access_key = {SECRET_KEY}\n"
        )
        credentials.chmod(0o600)
        text = (SYSTEMD / "tierfs.env.example").read_text()
        for placeholder, value in {
            "s3://bucket/prefix": source,
            "http://10.0.0.5:8333": seaweed.endpoint_url,
            "/var/cache/tierfs/mnt-data": str(tmp_path / "cache"),
            "/etc/tierfs/credentials": str(credentials),
        }.items():
            assert placeholder in text, f"tierfs.env.example lost {placeholder!r}"
            text = text.replace(placeholder, value)
        return read_environment_file(text)

    return make


@pytest.fixture
def start_service(
    tmp_path: Path, notify_socket: tuple[socket.socket, Path], instance_env: Callable[[str], dict[str, str]]
) -> Iterator[Callable[[str], Service]]:
    """Factory: run the unit's ExecStartPre and ExecStart for ``source`` as systemd would."""
    services: list[Service] = []

    def start(source: str) -> Service:
        path = tmp_path / "mnt-data"
        path.mkdir()
        unit_env = instance_env(source)
        env = child_env()
        for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
            env.pop(name)
        env.update(unit_env, NOTIFY_SOCKET=str(notify_socket[1]))
        commands = unit_commands()
        pre = expand(commands["ExecStartPre"], unit_env, path)  # "-": its failure is ignored
        subprocess.run(pre, env=env, capture_output=True, timeout=STOP_TIMEOUT, check=False)
        log_path = tmp_path / "unit.log"
        with log_path.open("wb") as log:
            proc = subprocess.Popen(
                tierfs_argv(expand(commands["ExecStart"], unit_env, path)),
                env=env,
                cwd="/",
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        service = Service(
            Mount(path, tmp_path / "cache", log_path, proc, True), notify_socket[0], env, commands
        )
        services.append(service)
        return service

    try:
        yield start
    finally:
        for service in services:
            service.mount.cleanup()


@pytest.fixture
def source(seaweed: SeaweedFS, bucket: Callable[..., str]) -> str:
    name = bucket()
    s3_client(seaweed.endpoint_url).put_object(Bucket=name, Key="prefix/data.bin", Body=PAYLOAD)
    return f"s3://{name}/prefix"


# --------------------------------------------------------------------------- tests


def test_ready_arrives_only_once_the_mount_is_live(
    start_service: Callable[[str], Service], source: str
) -> None:
    service = start_service(source)
    path = service.mount.path

    def observe() -> tuple[bool, list[str]]:
        return is_fuse_mounted(path), os.listdir(path)

    _, (live, entries) = service.observe_at("READY=1", observe)
    assert live, "READY=1 arrived before the kernel listed the mount"
    assert entries == ["data.bin"]
    assert (path / "data.bin").read_bytes() == PAYLOAD
    (line,) = [x for x in Path("/proc/self/mountinfo").read_text().splitlines() if f" {path} " in x]
    assert "allow_other" in line.split(" - ")[1]  # --allow-other from $TIERFS_OPTIONS


def test_exec_stop_flushes_write_back_and_reports_stopping(
    start_service: Callable[[str], Service], source: str, seaweed: SeaweedFS
) -> None:
    service = start_service(source)
    service.datagrams_until("READY=1")
    (service.mount.path / "written.txt").write_bytes(b"written just before stop\n")

    stop = subprocess.Popen(
        tierfs_argv(expand(service.commands["ExecStop"], service.env, service.mount.path)),
        env=service.env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    # systemd reaps its main process as soon as it exits; so must we, or `tierfs umount`
    # would keep waiting for a zombie.
    try:
        code = service.mount.process.wait(STOP_TIMEOUT)
    finally:
        out, err = stop.communicate(timeout=STOP_TIMEOUT)
    assert stop.returncode == 0, out + err
    assert code == 0, service.mount.log_text()
    assert not is_fuse_mounted(service.mount.path)
    bucket, _, prefix = source.removeprefix("s3://").partition("/")
    body = s3_client(seaweed.endpoint_url).get_object(Bucket=bucket, Key=f"{prefix}/written.txt")["Body"]
    assert body.read() == b"written just before stop\n"
    service.datagrams_until("STOPPING=1")


def test_sigterm_reports_stopping_and_unmounts(start_service: Callable[[str], Service], source: str) -> None:
    """KillMode=mixed: on stop timeout or `systemctl kill`, SIGTERM goes to the daemon alone."""
    service = start_service(source)
    service.datagrams_until("READY=1")
    service.mount.process.send_signal(signal.SIGTERM)
    service.datagrams_until("STOPPING=1")
    assert service.mount.process.wait(STOP_TIMEOUT) == 0, service.mount.log_text()
    assert not is_fuse_mounted(service.mount.path)


def test_failed_start_never_reports_ready(
    start_service: Callable[[str], Service], seaweed: SeaweedFS, notify_socket: tuple[socket.socket, Path]
) -> None:
    """A unit whose bucket is missing must fail (exit != 0, one line), never look started."""
    service = start_service("s3://no-such-bucket-for-tierfs/prefix")
    assert service.mount.process.wait(MOUNT_TIMEOUT) != 0
    assert not is_fuse_mounted(service.mount.path)
    lines = [line for line in service.mount.log_text().splitlines() if line.strip()]
    assert lines and "no-such-bucket-for-tierfs" in lines[-1] and "does not exist" in lines[-1], lines
    sock = notify_socket[0]
    sock.setblocking(False)
    datagrams = []
    with contextlib.suppress(BlockingIOError):
        while True:
            datagrams.append(sock.recv(4096).decode())
    assert not any("READY=1" in d.split("\n") for d in datagrams), datagrams
