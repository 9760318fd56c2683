"""pandas on a real mount: ``read_parquet`` and ``read_csv`` take ``tierfs://`` URLs as they are."""

from __future__ import annotations

import io

import pandas as pd
import pytest
from conftest import MakeMount
from datafiles import csv_bytes, parquet_bytes, parquet_table

from tierfs import reader

pytestmark = pytest.mark.fuse


def test_read_parquet_and_read_csv_with_tierfs_urls(
    data_mount: MakeMount,
) -> None:
    table = parquet_table()
    data = data_mount({"t/train.parquet": parquet_bytes(table), "t/labels.csv": csv_bytes()})
    data.warm("t/train.parquet", "t/labels.csv")
    before_stats = reader.stats()
    before = before_stats["direct_reads"]
    frame = pd.read_parquet(data.url("t/train.parquet"), columns=["id", "label"])
    pd.testing.assert_frame_equal(frame, table.select(["id", "label"]).to_pandas())
    csv = pd.read_csv(data.url("t/labels.csv"))
    pd.testing.assert_frame_equal(csv, pd.read_csv(io.BytesIO(data.files["t/labels.csv"])))
    assert len(csv) == 5_000 and list(csv.columns) == ["id", "label", "name"]
    after = reader.stats()
    assert after["direct_reads"] > before, f"tierfs:// must read directly: {before_stats} -> {after}"


def test_read_csv_of_a_cold_file_falls_back_to_the_mount(
    data_mount: MakeMount,
) -> None:
    data = data_mount({"cold.csv": csv_bytes(100)})
    assert pd.read_csv(data.url("cold.csv"))["id"].tolist() == list(range(100))
