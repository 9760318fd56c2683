"""Hugging Face ``datasets`` on a real mount, with no Hub: Parquet through ``tierfs://``, then a DataLoader.

The packaged Parquet builder needs nothing from the Hub (conftest.py points the Hub at a dead
port, so a request to it would fail the test). The offline switches must stay unset for
``tierfs://``: in datasets 5 both ``HF_HUB_OFFLINE=1`` and ``HF_DATASETS_OFFLINE=1`` refuse every
non-local URL; with them, the mount path works (shown below in a fresh interpreter, because
the switches are read at import).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import datasets
import pytest
import torch
from conftest import MakeMount
from datafiles import parquet_bytes, parquet_table
from torch.utils.data import DataLoader

from tools.servers import child_env

pytestmark = pytest.mark.fuse


def test_load_dataset_parquet_from_tierfs_then_a_dataloader(data_mount: MakeMount, tmp_path: Path) -> None:
    assert "HF_HUB_OFFLINE" not in os.environ and "HF_DATASETS_OFFLINE" not in os.environ
    table = parquet_table().select(["id", "label"])
    data = data_mount({"hf/train-0.parquet": parquet_bytes(table.slice(0, 80_000)),
                       "hf/train-1.parquet": parquet_bytes(table.slice(80_000))})  # fmt: skip
    files = [data.url("hf/train-0.parquet"), data.url("hf/train-1.parquet")]
    loaded = datasets.load_dataset("parquet", data_files=files, split="train", cache_dir=str(tmp_path / "hf"))
    assert loaded.num_rows == table.num_rows
    assert loaded[12_345] == {"id": 12_345, "label": 12_345 % 10}
    torch_ds = loaded.with_format("torch")
    seen = 0
    total = torch.zeros((), dtype=torch.int64)
    for batch in DataLoader(torch_ds, batch_size=4096, num_workers=2):
        seen += len(batch["id"])
        total += batch["id"].sum()
    assert seen == table.num_rows and int(total) == sum(range(table.num_rows))


def test_streaming_from_tierfs(data_mount: MakeMount) -> None:
    table = parquet_table().select(["id", "label"])
    data = data_mount({"s/train.parquet": parquet_bytes(table)})
    stream = datasets.load_dataset(
        "parquet", data_files=data.url("s/train.parquet"), split="train", streaming=True
    )
    first = list(stream.take(3))
    assert first == [{"id": n, "label": n % 10} for n in range(3)]
    assert sum(1 for _ in stream) == table.num_rows


OFFLINE_SCRIPT = """
import sys, datasets
from huggingface_hub.errors import OfflineModeIsEnabled
path, cache = sys.argv[1], sys.argv[2]
print(datasets.load_dataset("parquet", data_files=path, split="train", cache_dir=cache).num_rows)
try:
    datasets.load_dataset("parquet", data_files="tierfs://" + path, split="train", cache_dir=cache + "2")
except OfflineModeIsEnabled:
    print("refused")
"""


@pytest.mark.parametrize("switch", ["HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"])
def test_offline_mode_takes_the_mount_path_and_refuses_tierfs_urls(
    data_mount: MakeMount, tmp_path: Path, switch: str
) -> None:
    table = parquet_table().select(["id", "label"]).slice(0, 1000)
    data = data_mount({"off/train.parquet": parquet_bytes(table)})
    env = {**child_env(), switch: "1"}
    done = subprocess.run(
        [sys.executable, "-c", OFFLINE_SCRIPT, data.path("off/train.parquet"), str(tmp_path / "hf")],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["1000", "refused"], done.stdout + done.stderr
