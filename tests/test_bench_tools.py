"""The benchmark's own machinery, tested without timing anything (issue 21).

* One tiny ``tools.bench`` run over the baselines that need no mount (the copy-first local
  copy, boto3, awscrt, s3torchconnector's DataLoader): every row reads exactly the seeded
  bytes, and the targets come out of the measured numbers.
* The targets logic on a report whose numbers are given: the better peer is the baseline,
  CPU per file and per MiB are compared lower-is-better, epoch one by seconds, RSS by its limit.
* The daemon meter on a real process: CPU from /proc/PID/stat, and a peak RSS that belongs to
  one phase (VmHWM reset through clear_refs).
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tools.bench import RSS_LIMIT_MIB, Report, evaluate_targets
from tools.bench_workloads import MiB, UsageMeter, is_root
from tools.servers import SeaweedFS, child_env

REPO_ROOT = Path(__file__).resolve().parent.parent


def test_one_run_reads_the_same_bytes_on_every_baseline(
    seaweed: SeaweedFS, bucket: Callable[..., str], tmp_path: Path
) -> None:
    name = bucket()
    out = tmp_path / "bench.json"
    command = [sys.executable, "-m", "tools.bench", "--endpoint-url", seaweed.endpoint_url]
    command += ["--quick", "--bucket", name, "--small-files", "40", "--small-size", "8K", "--shards", "1"]
    command += ["--shard-size", "2M", "--model-size", "3M", "--preads", "16", "--workers", "2"]
    command += ["--systems", "local,boto3,crt,s3torch", "--workdir", str(tmp_path / "wd")]
    command += ["--json-out", str(out)]
    result = subprocess.run(
        command, cwd=REPO_ROOT, env=child_env(), capture_output=True, text=True, timeout=240, check=False
    )
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(out.read_text())
    results = report["results"]
    small, large, model = 40 * 8 * 1024, 2 * MiB, 3 * MiB
    for system in ("local", "boto3", "crt"):
        assert results["small_cold"][system]["nbytes"] == small
        assert results["small_cold"][system]["items"] == 40
        assert results["large_cold"][system]["nbytes"] == large
    for system in ("boto3", "crt"):
        assert results["model_cold"][system]["nbytes"] == model
    assert results["loader_cold"]["local"]["nbytes"] == small
    assert results["epoch_one"]["local"]["nbytes"] == small + large  # small files and shards
    if importlib.util.find_spec("s3torchconnector") is not None:
        assert results["loader_cold"]["s3torch"]["nbytes"] == small
    else:
        assert any("s3torch skipped" in w for w in report["warnings"])
    targets = {t["label"]: t for t in report["targets"]}
    # No tierfs in this run: every issue-21 target must say n/a, none may claim a verdict.
    assert targets["DataLoader cold, mount >= 1.0x s3torchconnector"]["verdict"] == "n/a"
    assert targets["small cold, mount >= 1.0x boto3 8 threads"]["verdict"] == "n/a"
    assert "DataLoader, files, cold" in result.stdout and "target" in result.stdout


def _report(results: dict[str, dict[str, float]], usage: list[dict[str, object]]) -> Report:
    report = Report(started="t", dataset={}, machine={}, options={})
    for workload, systems in results.items():
        for system, value in systems.items():
            report.results.setdefault(workload, {})[system] = {"value": value, "unit": "x"}
    report.usage = usage
    return report


def _usage(system: str, phase: str, cpu: float, items: int, mib: float, rss: float) -> dict[str, object]:
    return {
        "system": system,
        "phase": phase,
        "cpu_seconds": cpu,
        "items": items,
        "nbytes": int(mib * MiB),
        "peak_rss_mib": rss,
        "peak_reset": True,
    }


def test_targets_compare_with_the_better_peer_and_lower_is_better_for_cost() -> None:
    report = _report(
        {
            "small_cold": {"tierfs": 600.0, "s3fs": 300.0, "rclone": 500.0, "boto3": 600.0},
            "large_cold": {"tierfs": 500.0, "boto3": 600.0},
            "epoch_one": {"tierfs": 10.0, "local": 11.0},
            "loader_cold": {"tierfs": 900.0, "s3torch": 1000.0},
            "loader_hints_cold": {"tierfs": 1600.0},
        },
        [
            _usage("tierfs", "small_cold", 2.0, 1000, 100.0, 120.0),  # 2 ms per file
            _usage("s3fs", "small_cold", 1.0, 1000, 100.0, 20.0),  # 1 ms per file
            _usage("tierfs", "large_cold", 0.5, 2, 500.0, 310.0),  # 1 ms per MiB
            _usage("s3fs", "large_cold", 1.0, 2, 500.0, 40.0),  # 2 ms per MiB
        ],
    )
    evaluate_targets(report)
    t = {x["label"]: x for x in report.targets}
    peers = t["small cold, mount >= 1.5x max(s3fs, rclone)"]
    assert (peers["against"], peers["ratio"], peers["verdict"]) == ("rclone", 1.2, "MISS")
    assert t["small cold, mount >= 1.0x boto3 8 threads"]["verdict"] == "PASS"  # equal counts as met
    assert t["large seq cold >= 0.9x boto3 8 ranged streams"]["verdict"] == "MISS"  # 0.83
    assert t["large seq cold >= 1.5x max(s3fs, rclone)"]["verdict"] == "n/a"  # no peer measured it
    cpu_file = t["daemon CPU per cold file <= s3fs"]
    assert (cpu_file["ratio"], cpu_file["verdict"]) == (0.5, "MISS")
    cpu_mib = t["daemon CPU per cold MiB (large) <= s3fs"]
    assert (cpu_mib["ratio"], cpu_mib["verdict"]) == (2.0, "PASS")
    assert t["epoch one >= 1.2x copy-first"]["ratio"] == 1.1  # 11 s / 10 s
    assert t["DataLoader cold, mount >= 1.0x s3torchconnector"]["verdict"] == "MISS"
    hints = t["DataLoader cold, dataset+hints >= 1.5x s3torch"]  # against the s3torch loader row
    assert (hints["ratio"], hints["verdict"]) == (1.6, "PASS")
    rss = t[f"tierfs daemon peak RSS <= {RSS_LIMIT_MIB:.0f} MiB in every phase"]
    assert (rss["against"], rss["verdict"]) == ("310 MiB in large_cold", "MISS")


_CHILD = """
import sys, time
held = None
for line in sys.stdin:
    verb, _, arg = line.strip().partition(" ")
    if verb == "alloc":
        held = bytearray(int(arg) << 20)
        for i in range(0, len(held), 4096):
            held[i] = 1
    elif verb == "free":
        held = None
    elif verb == "burn":
        end = time.process_time() + float(arg)
        while time.process_time() < end:
            pass
    print("ok", flush=True)
"""


@pytest.fixture
def child() -> Iterator[subprocess.Popen[str]]:
    proc = subprocess.Popen(
        [sys.executable, "-c", _CHILD], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        yield proc
    finally:
        proc.kill()
        proc.wait(10)


def _ask(proc: subprocess.Popen[str], command: str) -> None:
    assert proc.stdin is not None and proc.stdout is not None
    proc.stdin.write(command + "\n")
    proc.stdin.flush()
    assert proc.stdout.readline().strip() == "ok"


@pytest.mark.skipif(not is_root(), reason="resetting another process's VmHWM needs root")
def test_usage_meter_gives_each_phase_its_own_cpu_and_peak(child: subprocess.Popen[str]) -> None:
    with UsageMeter(child.pid) as big:
        _ask(child, "alloc 150")
        _ask(child, "free")
    time.sleep(0.1)
    with UsageMeter(child.pid) as small:
        _ask(child, "burn 0.3")
    assert big.usage is not None and small.usage is not None
    assert big.usage.peak_rss_mib >= 150
    assert small.usage.peak_reset and small.usage.peak_rss_mib < 100  # the 150 MiB peak was the last phase's
    assert 0.28 <= small.usage.cpu_seconds < 5.0
