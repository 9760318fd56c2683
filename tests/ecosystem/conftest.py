"""Fixtures for the data-library tests (``make test-ecosystem``): a real mount holding the files those
libraries read, made with the libraries themselves.

These tests need the ``tierfs[ecosystem]`` extra (pyarrow, pandas, datasets, webdataset,
safetensors) plus ``tierfs[torch]``; ``make test`` leaves this directory out, ``make
test-ecosystem`` installs the extra and runs it. Hugging Face libraries read their settings at
import, so their cache and Hub settings are made here, before any test module imports them: the
Hub is pointed at a dead loopback port (nothing may need it). The offline switches stay unset: in
``datasets`` 5, ``HF_HUB_OFFLINE`` as well as ``HF_DATASETS_OFFLINE`` refuse every non-local URL,
``tierfs://`` included (docs/reader.md; test_hf_datasets.py shows the mount path then works).
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
from mounting import Mount, Mounter, tierfs_ok, wait_until
from readerkit import wait_maintenance

from tierfs.reader import protocol
from tools.servers import SeaweedFS, s3_client

_HF_HOME = tempfile.mkdtemp(prefix="tierfs-hf-")
atexit.register(shutil.rmtree, _HF_HOME, True)
os.environ["HF_HOME"] = _HF_HOME
os.environ["HF_DATASETS_CACHE"] = os.path.join(_HF_HOME, "datasets")
# No Hub: any request to it goes to a loopback port nobody listens on and fails at once, so a test
# that needed the Hub would fail loudly rather than pass on a network this machine may not have.
os.environ["HF_ENDPOINT"] = "http://127.0.0.1:9"
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
for _name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):  # both refuse tierfs:// URLs (docs/reader.md)
    os.environ.pop(_name, None)


@dataclass
class DataMount:
    """A mount and the bytes of every object behind it (path relative to the mount -> bytes)."""

    mount: Mount
    files: dict[str, bytes]

    def path(self, rel: str) -> str:
        return str(self.mount.path / rel)

    def url(self, rel: str) -> str:
        return f"tierfs://{self.path(rel)}"

    def status(self) -> dict[str, Any]:
        return self.mount.status()

    def warm(self, *rels: str) -> None:
        """Put files in the cache (``tierfs prefetch``) and wait until direct readers may use them."""
        tierfs_ok("prefetch", *[self.path(r) for r in rels])
        wait_maintenance(self.mount)


MakeMount = Callable[[dict[str, bytes]], DataMount]


@pytest.fixture
def data_mount(seaweed: SeaweedFS, bucket: Callable[..., str], mounter: Mounter) -> MakeMount:
    """Factory: upload ``files`` to a fresh SeaweedFS bucket, mount it, return once direct readers may start.

    SeaweedFS, not moto: moto serves from a thread of the test process, and a library that holds
    the GIL while it touches mmap'd file pages (safetensors' ``load_file``) would then wait, in the
    page fault, on a GET that the GIL keeps moto from answering (seen here: EIO after --timeout,
    then SIGBUS). A server in its own process is also what users have.
    """

    def make(files: dict[str, bytes]) -> DataMount:
        name = bucket()
        client = s3_client(seaweed.endpoint_url)
        for key, body in files.items():
            client.put_object(Bucket=name, Key=key, Body=body)
        mount = mounter(f"s3://{name}")
        wait_until(lambda: (mount.cache_dir / protocol.READER_FILE).exists(), 15, "reader.json published")
        return DataMount(mount, dict(files))

    return make
