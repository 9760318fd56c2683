"""Running ``tierfs mount`` as a real subprocess for tests, and always taking it down again.

Tests mount through the CLI exactly as a user would, so argument parsing, daemonising and
signal handling are exercised too. The :class:`Mounter` records every mount it starts;
its :meth:`Mounter.cleanup` removes each one whatever state it is in (healthy, busy,
hung or killed) and then stops its process by pid, so a failing test never leaves a
mount or a daemon behind for the next one.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tierfs.control.registry import lookup
from tools.servers import (
    child_env,
    force_unmount,
    is_fuse_mounted,
    terminate_pid,
    terminate_process_group,
    wait_pid_exit,
)

REPO_ROOT = Path(__file__).resolve().parent.parent
MOUNT_TIMEOUT = 30.0
FUSE_AVAILABLE = os.path.exists("/dev/fuse")


class MountFailed(AssertionError):
    """``tierfs mount`` exited or timed out before the mount appeared; carries its log."""


def tierfs_command(*args: str) -> list[str]:
    """``python -m tierfs ARGS`` with this interpreter, so tests use the code under test."""
    return [sys.executable, "-m", "tierfs", *args]


# Foreground daemons are children of the test process, and one that has exited stays a
# zombie until we reap it. A zombie still exists for kill(pid, 0), so `tierfs umount`,
# which waits for the daemon's pid to disappear, would wait its whole timeout. Every CLI
# call made through run_tierfs therefore reaps our exited foreground daemons while it waits.
_foreground: list[subprocess.Popen[bytes]] = []


def _reap_foreground() -> None:
    for proc in list(_foreground):
        if proc.poll() is not None:
            _foreground.remove(proc)


def run_tierfs(*args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
    """Run a tierfs CLI command to completion and capture its output (text)."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        command = tierfs_command(*args)
        proc = subprocess.Popen(
            command, env=child_env(), cwd=REPO_ROOT, stdin=subprocess.DEVNULL, stdout=out, stderr=err
        )
        deadline = time.monotonic() + timeout
        while proc.poll() is None:
            _reap_foreground()
            if time.monotonic() > deadline:
                proc.kill()
                proc.wait()
                raise subprocess.TimeoutExpired(proc.args, timeout)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(0.02)
        out.seek(0)
        err.seek(0)
        stdout, stderr = (f.read().decode(errors="replace") for f in (out, err))
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


def wait_until(check: Callable[[], bool], timeout: float, what: str) -> None:
    """Poll ``check`` every 0.1 s; fail with ``what`` if it never holds within ``timeout``."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout} s: {what}")
        time.sleep(0.1)


def tierfs_ok(*args: str) -> dict[str, Any]:
    """Run a tierfs CLI command that must succeed; its --json output (if any) parsed."""
    result = run_tierfs(*args)
    assert result.returncode == 0, (
        f"tierfs {' '.join(args)}: {result.returncode}\n{result.stdout}{result.stderr}"
    )
    try:
        parsed: dict[str, Any] = json.loads(result.stdout)
    except ValueError:
        return {}
    return parsed


class Mount:
    """One tierfs mount made by :class:`Mounter`.

    ``pid`` is the FUSE daemon: the foreground ``tierfs mount -f`` process itself, or, in
    daemon mode, the pid reported by ``tierfs status --json``.
    """

    def __init__(
        self, path: Path, cache_dir: Path, log_path: Path, process: subprocess.Popen[bytes], foreground: bool
    ) -> None:
        self.path = path
        self.cache_dir = cache_dir
        self.log_path = log_path
        self.process = process  # the launched command: the daemon itself only when foreground
        self.foreground = foreground
        self.pid = process.pid

    def log_text(self) -> str:
        """What the mount command printed, plus, in daemon mode, the daemon's own log.

        A daemon detaches from our log file and logs to ``CACHE_DIR/tierfs.log`` unless the
        test passed ``--log-file``.
        """
        parts = [self.log_path] if self.foreground else [self.log_path, self.cache_dir / "tierfs.log"]
        texts = []
        for path in parts:
            with contextlib.suppress(FileNotFoundError):
                texts.append(path.read_text(errors="replace"))
        return "\n".join(texts)

    @property
    def mounted(self) -> bool:
        return is_fuse_mounted(self.path)

    def status(self) -> dict[str, Any]:
        """``tierfs status MNT --json``, parsed."""
        result = run_tierfs("status", str(self.path), "--json")
        if result.returncode != 0:
            raise AssertionError(
                f"tierfs status failed ({result.returncode}):\n{result.stdout}\n{result.stderr}"
                f"\n--- mount log ---\n{self.log_text()}"
            )
        status: dict[str, Any] = json.loads(result.stdout)
        return status

    def umount(self, check: bool = True, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
        """``tierfs umount MNT``; with ``check``, also require success and wait for the daemon to exit.

        Waiting matters: write-back must be finished when the daemon is gone, and tests
        assert on the bucket right after this returns.
        """
        result = run_tierfs("umount", str(self.path), timeout=timeout)
        if not check:
            return result
        if result.returncode != 0:
            raise AssertionError(
                f"tierfs umount failed ({result.returncode}):\n{result.stdout}\n{result.stderr}"
                f"\n--- mount log ---\n{self.log_text()}"
            )
        if not self.wait_exited(timeout):
            raise AssertionError(f"daemon {self.pid} alive {timeout} s after umount\n{self.log_text()}")
        if self.mounted:
            raise AssertionError(f"{self.path} still mounted after a successful umount")
        return result

    def wait_exited(self, timeout: float) -> bool:
        """Wait for the daemon to exit; False if it is still alive after ``timeout``."""
        if self.foreground:
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                return False
            return True
        return wait_pid_exit(self.pid, timeout)

    @property
    def returncode(self) -> int | None:
        """Exit status of a foreground daemon, None while it runs (daemon mode: the launcher's)."""
        return self.process.poll()

    def kill9(self) -> None:
        """SIGKILL the daemon to simulate a crash; the mount stays behind, dead ("not connected")."""
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signal.SIGKILL)
        self.wait_exited(10.0)

    def force_unmount(self) -> None:
        """Remove the mount however broken it is (see :func:`tools.servers.force_unmount`)."""
        force_unmount(self.path)

    def cleanup(self, grace: float = 5.0) -> None:
        """Unmount if still mounted, then stop the daemon: SIGTERM, and SIGKILL after ``grace``.

        The grace period lets a daemon that was still writing back finish as it would on a
        normal shutdown; SIGKILL guarantees nothing outlives the test.
        """
        self.force_unmount()
        if self.foreground:  # the process group we created holds the daemon
            terminate_process_group(self.process, grace=grace)
            return
        if self.process.poll() is None:  # the launcher itself hung
            terminate_process_group(self.process, grace=grace)
        if self.pid != self.process.pid:  # the daemon's pid is known (from status)
            terminate_pid(self.pid, grace)


class Mounter:
    """Factory behind the ``mounter`` fixture; owns every mount it made, in ``tmp_path``."""

    def __init__(self, tmp_path: Path, default_endpoint: Callable[[], str]) -> None:
        self._tmp = tmp_path
        self._default_endpoint = default_endpoint  # a callable, so SeaweedFS starts only if needed
        self._mounts: list[Mount] = []

    def __call__(
        self,
        source: str,
        *extra_args: str,
        cache_dir: Path | None = None,
        foreground: bool = True,
        endpoint_url: str | None = None,
        mountpoint: Path | None = None,
    ) -> Mount:
        """Mount ``source`` (``s3://BUCKET[/PREFIX]``) and return once the kernel lists the mount.

        ``endpoint_url`` defaults to the session's SeaweedFS. Pass an earlier mount's
        ``cache_dir`` to remount onto the same cache (e.g. after :meth:`Mount.kill9`).
        """
        n = len(self._mounts)
        path = mountpoint or self._tmp / f"mnt{n}"
        cache = cache_dir or self._tmp / f"cache{n}"
        log_path = self._tmp / f"mount{n}.log"
        path.mkdir(parents=True, exist_ok=True)
        url = endpoint_url or self._default_endpoint()
        args = ["mount", source, str(path), "--endpoint-url", url, "--cache-dir", str(cache)]
        if foreground:
            args.append("-f")
        with log_path.open("ab") as log:
            log.write(f"=== {' '.join(tierfs_command(*args, *extra_args))}\n".encode())
            log.flush()
            proc = subprocess.Popen(
                tierfs_command(*args, *extra_args),
                env=child_env(),
                cwd=REPO_ROOT,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        mount = Mount(path, cache, log_path, proc, foreground)
        if foreground:
            _foreground.append(proc)
        self._mounts.append(mount)  # registered before waiting, so a failed start is cleaned up too
        if foreground:
            self._wait_mounted(mount)
        else:
            self._wait_daemonised(mount)
        return mount

    def _wait_mounted(self, mount: Mount) -> None:
        """Foreground: until the FUSE mount is there *and* its control socket is registered.

        The daemon registers the socket only after write-back recovery (aborting uploads a
        crash left, sizing staged files), which may end after the kernel mount appears; a
        ``tierfs flush`` sent in between would find "no tierfs mount"."""
        deadline = time.monotonic() + MOUNT_TIMEOUT
        while not (mount.mounted and lookup(mount.path) is not None):
            code = mount.returncode
            if code is not None:
                raise MountFailed(f"tierfs mount exited with {code} before mounting\n{mount.log_text()}")
            if time.monotonic() > deadline:
                raise MountFailed(f"{mount.path} not mounted after {MOUNT_TIMEOUT} s\n{mount.log_text()}")
            time.sleep(0.05)

    def _wait_daemonised(self, mount: Mount) -> None:
        """Daemon mode: the command must exit 0 only once the mount is usable."""
        try:
            code = mount.process.wait(MOUNT_TIMEOUT)
        except subprocess.TimeoutExpired:
            log = mount.log_text()
            raise MountFailed(f"tierfs mount did not return within {MOUNT_TIMEOUT} s\n{log}") from None
        if code != 0:
            raise MountFailed(f"tierfs mount exited with {code}\n{mount.log_text()}")
        if not mount.mounted:
            raise MountFailed(f"tierfs mount exited 0 but {mount.path} is not mounted\n{mount.log_text()}")
        mount.pid = int(mount.status()["pid"])

    def cleanup(self) -> None:
        """Take down every mount, newest first (a later mount may sit inside an earlier one)."""
        errors: list[BaseException] = []
        for mount in reversed(self._mounts):
            try:
                mount.cleanup()
            except Exception as exc:  # keep cleaning the others
                errors.append(exc)
        self._mounts.clear()
        if errors:
            raise errors[0]
