"""Shared fixtures: real S3 servers on loopback, unique buckets, and tierfs mounts.

The servers are session-scoped because SeaweedFS takes seconds to start; isolation
between tests comes from a fresh bucket per test instead. Mounts are per test and are
always removed at teardown, even when the test failed or the daemon hung.
"""

from __future__ import annotations

import os
import re
import signal
import sys
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

# ``tools`` (at the repository root) is not an installed package, and test modules import
# ``mounting`` by its plain name whatever pytest's import mode is.
for _path in (Path(__file__).resolve().parent, Path(__file__).resolve().parent.parent):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

from direct import Bucket  # noqa: E402  (needs the path above)
from mounting import FUSE_AVAILABLE, Mounter  # noqa: E402  (needs the path above)

from tools.servers import MotoS3, S3Server, SeaweedFS, child_env  # noqa: E402


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "fuse: the test makes a FUSE mount and needs /dev/fuse")
    # A CI timeout or `kill` sends SIGTERM, which by default ends Python without running
    # fixture teardown and leaves servers and mounts behind. As KeyboardInterrupt it makes
    # pytest tear everything down first.
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _interrupt)


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"terminated by signal {signum}")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Without /dev/fuse, a third of the suite cannot run: fail loudly rather than pass on the rest.

    A developer on such a machine who knowingly wants only the other tests sets
    TIERFS_TESTS_WITHOUT_FUSE=1; the FUSE tests are then deselected and the run says so.
    """
    if FUSE_AVAILABLE:
        return
    needs_fuse = [i for i in items if "fuse" in i.keywords or "mounter" in getattr(i, "fixturenames", ())]
    if not needs_fuse:
        return
    if os.environ.get("TIERFS_TESTS_WITHOUT_FUSE") != "1":
        pytest.exit(
            f"/dev/fuse is absent: {len(needs_fuse)} tests need FUSE mounts and cannot run here "
            "(set TIERFS_TESTS_WITHOUT_FUSE=1 to run only the others)",
            returncode=1,
        )
    for item in needs_fuse:
        items.remove(item)
    print(f"\nTIERFS_TESTS_WITHOUT_FUSE=1: {len(needs_fuse)} FUSE tests deselected (/dev/fuse is absent)")


@pytest.fixture(scope="session")
def seaweed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedFS]:
    """One SeaweedFS for the session. Tests that stop/freeze it must restart/thaw it before returning."""
    with SeaweedFS(tmp_path_factory.mktemp("seaweed")) as server:
        yield server


@pytest.fixture(autouse=True)
def _restore_seaweed(request: pytest.FixtureRequest) -> Iterator[None]:
    """After a test that stopped or froze the session's SeaweedFS (and failed before undoing
    it), bring the server back so that the failure does not cascade into later tests."""
    yield
    if "seaweed" in request.fixturenames:
        server: SeaweedFS = request.getfixturevalue("seaweed")
        server.ensure_running()


@pytest.fixture(scope="session")
def moto() -> Iterator[MotoS3]:
    """moto's S3, for keys SeaweedFS rejects and for tests that need no volume server."""
    with MotoS3() as server:
        yield server


def _bucket_name(test_name: str) -> str:
    """A valid, unique bucket name that still says which test made it (handy in server logs)."""
    stem = re.sub(r"[^a-z0-9]+", "-", test_name.lower()).strip("-")[:40].strip("-")
    return f"t-{stem}-{uuid.uuid4().hex[:10]}" if stem else f"t-{uuid.uuid4().hex[:10]}"


@pytest.fixture
def s3_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """The test servers' credentials and proxy exclusions, for S3 clients made inside the test process."""
    for key, value in child_env().items():
        if key.startswith(("AWS_", "NO_PROXY", "no_proxy")):
            monkeypatch.setenv(key, value)


@pytest.fixture
def bucket(request: pytest.FixtureRequest) -> Callable[..., str]:
    """Factory: ``bucket()`` makes a fresh bucket on SeaweedFS, ``bucket(moto)`` on moto; returns its name."""

    def make(server: S3Server | None = None) -> str:
        target: S3Server = server if server is not None else request.getfixturevalue("seaweed")
        name = _bucket_name(request.node.name)
        target.create_bucket(name)
        return name

    return make


@pytest.fixture
def where(moto: MotoS3, bucket: Callable[..., str], s3_env: None) -> Iterator[tuple[str, Bucket]]:
    """A fresh moto bucket and a client for it, for the in-process write-back tests (tests/direct.py)."""
    name = bucket(moto)
    yield name, Bucket(moto.endpoint_url, name)


@pytest.fixture
def mounter(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Mounter]:
    """Factory: ``mounter("s3://BUCKET", *extra_args, cache_dir=None, foreground=True) -> Mount``.

    The endpoint defaults to the session's SeaweedFS (pass ``endpoint_url=moto.endpoint_url``
    for moto). Every mount is removed at teardown, and its daemon stopped. Tests using it
    make the run fail where /dev/fuse is absent (see ``pytest_collection_modifyitems``).
    """

    def seaweed_endpoint() -> str:
        server: SeaweedFS = request.getfixturevalue("seaweed")
        return server.endpoint_url

    mounts = Mounter(tmp_path, seaweed_endpoint)
    try:
        yield mounts
    finally:
        mounts.cleanup()
