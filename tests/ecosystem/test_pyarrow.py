"""pyarrow on a real mount: Parquet with a column subset and a row filter reads only what it needs.

pyarrow resolves URIs with its own filesystems, so ``tierfs://`` goes in through ``filesystem=``
(an fsspec filesystem, which pyarrow wraps) with a plain path; or the mount path is read as a
local file. Either way a projection plus a filter on a multi-row-group file must read a fraction
of the file: cold, the daemon fetches less than the file from the origin; warm, the direct reader
serves less than the file.
"""

from __future__ import annotations

import fsspec
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest
from conftest import DataMount, MakeMount
from datafiles import ROWS_PER_GROUP, parquet_bytes, parquet_table

from tierfs import reader

pytestmark = pytest.mark.fuse


# Rows in the middle of one row group of 8 (a read from the start of a cold file is taken as the start
# of a sequential read, and its whole aligned segment fetched: docs/reader.md).
LOW = 5 * ROWS_PER_GROUP
HIGH = LOW + ROWS_PER_GROUP // 4
FILTERS = [("id", ">=", LOW), ("id", "<", HIGH)]
COLUMNS = ["id", "label"]


@pytest.fixture
def parquet(data_mount: MakeMount) -> tuple[DataMount, pa.Table]:
    table = parquet_table()
    return data_mount({"tables/train.parquet": parquet_bytes(table)}), table


def expected(table: pa.Table) -> pa.Table:
    ids = table["id"]
    return table.select(COLUMNS).filter(pc.and_(pc.greater_equal(ids, LOW), pc.less(ids, HIGH)))


def fetched(data: DataMount) -> int:
    return int(data.status()["s3_bytes_fetched"])


def test_read_table_through_filesystem_fetches_a_fraction_of_a_cold_file(
    parquet: tuple[DataMount, pa.Table],
) -> None:
    data, table = parquet
    size = len(data.files["tables/train.parquet"])
    before = fetched(data)
    got = pq.read_table(
        data.path("tables/train.parquet"), columns=COLUMNS, filters=FILTERS,
        filesystem=fsspec.filesystem("tierfs"),
    )  # fmt: skip
    assert got.equals(expected(table))
    taken = fetched(data) - before
    # Less than the whole file: the row group's column chunks, the footer and the read-ahead
    # around them (an 8 MiB segment at most; 1.6 MB before the cold engine, ~9 MB with it).
    assert 0 < taken < size / 2, f"fetched {taken} of {size} bytes for 2 of 3 columns of 1 of 8 row groups"


def test_dataset_with_projection_and_filter_reads_a_fraction_directly_when_warm(
    parquet: tuple[DataMount, pa.Table],
) -> None:
    data, table = parquet
    size = len(data.files["tables/train.parquet"])
    data.warm("tables/train.parquet")
    before_fetch, before = fetched(data), reader.stats()
    dataset = ds.dataset(
        data.path("tables/train.parquet"), format="parquet", filesystem=fsspec.filesystem("tierfs")
    )
    got = dataset.to_table(columns=COLUMNS, filter=(ds.field("id") >= LOW) & (ds.field("id") < HIGH))
    assert got.equals(expected(table))
    after = reader.stats()
    direct = after["direct_bytes"] - before["direct_bytes"]
    assert 0 < direct < size / 4, f"the direct reader served {direct} of {size} bytes: {before} -> {after}"
    assert after["fallbacks"] == before["fallbacks"], "a warm file must be read directly, with no fallback"
    assert fetched(data) == before_fetch, "nothing may come from the origin for a cached file"


def test_the_mount_path_as_a_local_file(parquet: tuple[DataMount, pa.Table]) -> None:
    data, table = parquet
    size = len(data.files["tables/train.parquet"])
    before = fetched(data)
    got = pq.read_table(data.path("tables/train.parquet"), columns=COLUMNS, filters=FILTERS)
    assert got.equals(expected(table))
    assert 0 < fetched(data) - before < size / 4
    whole = ds.dataset(data.path("tables"), format="parquet").to_table()
    assert whole.equals(table)


def test_a_tierfs_uri_without_filesystem_is_refused_by_pyarrow_as_documented(
    parquet: tuple[DataMount, pa.Table],
) -> None:
    """docs/reader.md says pyarrow needs ``filesystem=``; if pyarrow ever learns fsspec URIs, update it."""
    data, _ = parquet
    with pytest.raises(pa.ArrowInvalid, match="Unrecognized filesystem type"):
        pq.read_table(data.url("tables/train.parquet"))
