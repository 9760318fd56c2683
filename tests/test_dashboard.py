"""The Grafana dashboard (packaging/grafana/tierfs-dashboard.json) queries only metrics a mount serves.

A live mount with every feature the dashboard has a panel for (a shared tier, a cache cap,
write-back, direct reads with a fallback, S3 traffic) is scraped on ``--metrics-addr``; every
``tierfs_*`` name in every panel's PromQL must have a sample there. A renamed or dropped metric
then fails here rather than leaving an operator with an empty panel.
"""

from __future__ import annotations

import json
import os
import re
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from mounting import REPO_ROOT, Mounter, tierfs_ok, wait_until
from readerkit import wait_maintenance

from tierfs.reader import Reader
from tools.servers import MotoS3, free_port, s3_client

DASHBOARD = REPO_ROOT / "packaging" / "grafana" / "tierfs-dashboard.json"
METRIC = re.compile(r"\btierfs_[a-z0-9_]+")


def panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = []
    for panel in dashboard["panels"]:
        found.append(panel)
        found.extend(panel.get("panels", []))
    return found


def queried_metrics(dashboard: dict[str, Any]) -> set[str]:
    names: set[str] = set()
    for panel in panels(dashboard):
        for target in panel.get("targets", []):
            names.update(METRIC.findall(target["expr"]))
    for variable in dashboard["templating"]["list"]:
        names.update(METRIC.findall(json.dumps(variable.get("query", ""))))
    return names


def scraped_names(port: int) -> set[str]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    return {re.split(r"[{ ]", line, maxsplit=1)[0] for line in text.splitlines() if line and line[0] != "#"}


def test_the_dashboard_is_importable_json() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["__inputs"][0]["name"] == "DS_PROMETHEUS"
    ids = [p["id"] for p in panels(dashboard)]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    titles = " ".join(p["title"].lower() for p in panels(dashboard))
    for topic in ("tier", "s3", "latency", "write-back", "direct"):
        assert topic in titles, topic
    for panel in panels(dashboard):
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == "${DS_PROMETHEUS}" and panel["targets"], panel["title"]


@pytest.mark.fuse
def test_every_metric_the_dashboard_queries_is_served_by_a_live_mount(
    tmp_path: Path, moto: MotoS3, bucket: Callable[..., str], mounter: Mounter
) -> None:
    origin, tier = bucket(moto), bucket(moto)
    client = s3_client(moto.endpoint_url)
    for i in range(4):
        client.put_object(Bucket=origin, Key=f"data/{i}.bin", Body=os.urandom(300_000))
    port = free_port()
    options = ["--metrics-addr", f"127.0.0.1:{port}", "--shared-cache", f"s3://{tier}/cache"]
    options += ["--cache-size", "1G", "--writeback-delay", "0"]
    mount = mounter(f"s3://{origin}", *options, endpoint_url=moto.endpoint_url)
    for i in range(2):  # cold (origin, shared fill), then warm (memory)
        for _ in range(2):
            assert len((mount.path / f"data/{i}.bin").read_bytes()) == 300_000
    wait_maintenance(mount)  # reader.json names the mount, so direct reads can be served
    # A reader of its own, not the process's default one that earlier tests' mounts have used:
    # what is tested here is the dashboard, not the reader's state across remounts.
    direct = Reader()
    with direct.open(str(mount.path / "data/0.bin")) as f:
        assert len(f.read()) == 300_000  # cached: a direct read
    with direct.open(str(mount.path / "data/3.bin")) as f:
        assert len(f.read()) == 300_000  # never read: a fallback (miss) through the mount
    assert direct.stats()["direct_reads"] > 0 and direct.stats()["fallbacks"], direct.stats()
    direct.flush()
    (mount.path / "out.bin").write_bytes(b"written")
    tierfs_ok("flush", str(mount.path))
    wait_maintenance(mount)  # the readers' counters reach the daemon
    wait_until(lambda: mount.status()["direct_reads"] > 0, 15, "direct reads counted by the daemon")
    dashboard = json.loads(DASHBOARD.read_text())
    wanted = queried_metrics(dashboard)
    assert len(wanted) >= 30, sorted(wanted)
    served = scraped_names(port)
    missing = sorted(wanted - served)
    assert not missing, f"the dashboard queries metrics the mount does not serve: {missing}"
