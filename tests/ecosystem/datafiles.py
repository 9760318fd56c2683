"""The files the ecosystem tests read, made with the libraries themselves (deterministic content)."""

from __future__ import annotations

import io
import tarfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

ROW_GROUPS = 8
ROWS_PER_GROUP = 40_000
PAYLOAD = 64  # bytes of random data per row: the column a projection leaves out


def parquet_table() -> pa.Table:
    rows = ROW_GROUPS * ROWS_PER_GROUP
    rng = np.random.default_rng(7)
    payload = rng.integers(0, 256, size=(rows, PAYLOAD), dtype=np.uint8)
    return pa.table(
        {
            "id": pa.array(np.arange(rows, dtype=np.int64)),
            "label": pa.array((np.arange(rows) % 10).astype(np.int32)),
            "payload": pa.array([row.tobytes() for row in payload], type=pa.binary()),
        }
    )


def parquet_bytes(table: pa.Table) -> bytes:
    """One file, ``ROW_GROUPS`` row groups, with statistics (so a filter on ``id`` skips groups)."""
    out = io.BytesIO()
    pq.write_table(table, out, row_group_size=ROWS_PER_GROUP, compression="zstd", write_statistics=True)
    return out.getvalue()


def csv_bytes(rows: int = 5_000) -> bytes:
    lines = ["id,label,name"] + [f"{i},{i % 10},item-{i}" for i in range(rows)]
    return ("\n".join(lines) + "\n").encode()


def tar_shard(first: int, count: int) -> bytes:
    """A WebDataset shard: per sample ``KEY.cls`` (its label as text) and ``KEY.bin`` (bytes)."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w") as tar:
        for n in range(first, first + count):
            for ext, body in (("cls", str(n % 10).encode()), ("bin", bytes([n % 256]) * (1000 + n))):
                info = tarfile.TarInfo(f"sample{n:05d}.{ext}")
                info.size = len(body)
                tar.addfile(info, io.BytesIO(body))
    return out.getvalue()
