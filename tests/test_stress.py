"""The stress test of issue 11 at a small size: 16 threads on one mount, then flush and compare.

Eight writers, each owning its own tree, create, overwrite, patch, append, truncate,
rename (also onto an existing name), delete and fsync small and 8 MiB files, and
eight readers read the other trees, for about 25 s. Every read is checked against an
in-memory model under the path's lock, so any difference is a tierfs bug (a stale or
mixed read), not a race of the test. After ``tierfs flush`` the bucket must hold exactly
the model's keys and bytes, with no ``.conflict-`` key (tierfs conflicting with its own
upload), and the daemon's peak RSS must stay within the issue's 300 MiB.

The load, the model and the checks are ``tools/stress.py`` (its module docstring says
what each part checks and why); ``make stress`` runs the same code for 10 minutes.
The seed is printed in the failure message, and ``python -m tools.stress --seed S``
replays the same choices (thread interleaving, of course, differs).
"""

from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path

import pytest

from tools.servers import SeaweedFS
from tools.stress import StressOptions, run_stress

pytestmark = pytest.mark.fuse

SECONDS = 25.0
THREADS = 16  # 8 writers + 8 readers


def test_sixteen_threads_read_what_they_wrote_and_the_bucket_equals_the_model(
    bucket: Callable[..., str], seaweed: SeaweedFS, tmp_path: Path
) -> None:
    options = StressOptions(seconds=SECONDS, threads=THREADS, seed=random.randrange(1 << 32))
    assert (options.writers, options.readers) == (8, 8)
    report = run_stress(options, endpoint_url=seaweed.endpoint_url, bucket=bucket(), workdir=tmp_path)
    summary = report.summary()
    print(summary)
    reads = sum(n for op, n in report.findings.ops.items() if op.startswith("verify"))
    assert reads > 100, f"the run checked almost nothing:\n{summary}"
    assert report.bucket_keys > 0, f"nothing reached the bucket:\n{summary}"
    assert report.problems() == [], f"{summary}\n--- mount log (tail) ---\n{report.log_tail}"
