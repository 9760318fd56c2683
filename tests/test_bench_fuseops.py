"""tools.bench_fuseops, the count of FUSE requests per file (issue 21), tested without timing anything.

* The decoder of ``strace -e read=FD`` dumps of ``/dev/fuse``: every request counted once, by the
  opcode in its header, whatever else the trace holds.
* One tiny run against nullfs (root and strace needed): reading a file whole with its dentry
  cached costs exactly one OPEN, one READ and one RELEASE, and the CPU figures are there.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tools.bench_fuseops import requests_in
from tools.servers import child_env

REPO_ROOT = Path(__file__).resolve().parent.parent

TRACE = """\
6975  read(12, "1048576\\n", 31)         = 8
6975  read(3, "8\\0\\0\\0\\3\\0\\0\\0"..., 1052672) = 56
 | 00000  38 00 00 00 03 00 00 00  04 00 00 00 00 00 00 00  8............... |
 | 00010  01 00 00 00 00 00 00 00  00 00 00 00 00 00 00 00  ................ |
6975  read(3, ".\\0\\0\\0\\1\\0\\0\\0"..., 1052672) = 46
 | 00000  2e 00 00 00 01 00 00 00  06 00 00 00 00 00 00 00  ................ |
6976  read(3,  <unfinished ...>
6975  read(3, "P\\0\\0\\0\\16\\0\\0\\0"..., 1052672) = 80
 | 00000  50 00 00 00 0e 00 00 00  08 00 00 00 00 00 00 00  P............... |
6976  <... read resumed>"P\\0\\0\\0\\17\\0\\0\\0"..., 1052672) = 80
6976   | 00000  50 00 00 00 0f 00 00 00  0a 00 00 00 00 00 00 00  P............... |
 | 00000  40 00 00 00 12 00 00 00  0c 00 00 00 00 00 00 00  @............... |
 | 00000  30 00 00 00 63 00 00 00  0d 00 00 00 00 00 00 00  0...c........... |
"""


def test_requests_are_counted_by_the_opcode_of_each_header(tmp_path: Path) -> None:
    trace = tmp_path / "fuse.trace"
    trace.write_text(TRACE)
    counts = requests_in(trace)
    assert counts == {"GETATTR": 1, "LOOKUP": 1, "OPEN": 1, "READ": 1, "RELEASE": 1, "99": 1}


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("strace") is None, reason="needs root and strace")
def test_a_cached_dentry_costs_one_open_one_read_one_release(tmp_path: Path) -> None:
    out = tmp_path / "fuseops.json"
    command = [sys.executable, "-m", "tools.bench_fuseops", "--files", "400", "--size", "4K", "--ops"]
    command += ["--rows", "nullfs warm", "--json-out", str(out)]
    subprocess.run(command, check=True, cwd=REPO_ROOT, env=child_env(), timeout=300, capture_output=True)
    row = json.loads(out.read_text())["rows"]["nullfs warm"]
    assert row["requests_per_file"] == {"OPEN": 1.0, "READ": 1.0, "RELEASE": 1.0}
    assert row["loop_cpu_ms_per_file"] > 0
    assert row["files_per_s"] > 0
