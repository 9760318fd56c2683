"""The Python door stays light (issue 23): a fresh process that imports ``tierfs.reader`` and reads
a file directly pulls in neither trio nor the FUSE adapter nor the control server nor an S3
client. A DataLoader worker with ``persistent_workers=False`` pays its imports every epoch.

How fast that is, is ``tools/bench_door.py``'s business (docs/reader.md); this test checks
what is imported, on a real mount, and that the direct read still serves the right bytes.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from collections.abc import Callable

import pytest
from mounting import Mounter
from readerkit import load, sample_files

from tools.servers import MotoS3

pytestmark = pytest.mark.fuse

# Modules (and packages, with everything under them) a reader process must not import.
FORBIDDEN = (
    "trio",
    "pyfuse3",
    "tierfs.fuse",
    "tierfs.control.protocol",
    "tierfs.control.ops",
    "tierfs.daemon",
    "tierfs.writeback",
    "tierfs.read",
    "boto3",
    "botocore",
    "awscrt",
)

CHILD = """
import hashlib, json, sys
import tierfs.reader

def heavy():
    return sorted(
        m for m in sys.modules
        if any(m == f or m.startswith(f + ".") for f in sys.argv[2].split(","))
    )

after_import = heavy()
with tierfs.reader.open(sys.argv[1], buffering=0) as f:
    digest = hashlib.sha256(f.read()).hexdigest()
print(json.dumps({
    "after_import": after_import, "after_read": heavy(), "sha256": digest,
    "stats": tierfs.reader.stats(),
}))
"""


def test_a_fresh_reader_process_imports_nothing_of_the_daemon(
    moto: MotoS3, bucket: Callable[..., str], mounter: Mounter
) -> None:
    files = sample_files(2, 110 * 1024)
    loaded = load(moto, bucket, mounter, files)
    loaded.warm()
    rel, body = next(iter(files.items()))
    done = subprocess.run(
        [sys.executable, "-c", CHILD, loaded.path(rel), ",".join(FORBIDDEN)],
        capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    report = json.loads(done.stdout)
    assert report["after_import"] == [], report
    assert report["after_read"] == [], report
    assert report["sha256"] == hashlib.sha256(body).hexdigest()
    # Served from the cache directory, not through the mount: the direct path was the one taken.
    assert report["stats"]["direct_reads"] >= 1 and report["stats"]["fallbacks"] == {}, report

