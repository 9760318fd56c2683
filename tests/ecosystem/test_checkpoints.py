"""Checkpoints on a real mount: ``torch.load`` of a state dict and safetensors, through the mount path and
through the direct reader."""

from __future__ import annotations

import io

import pytest
import safetensors.torch
import torch
from conftest import DataMount, MakeMount

from tierfs import reader

pytestmark = pytest.mark.fuse


def state_dict() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(3)
    return {
        "encoder.weight": torch.randn(512, 768, generator=generator),  # 1.5 MiB: more than one cache block
        "encoder.bias": torch.randn(512, generator=generator),
        "head.weight": torch.randn(10, 512, generator=generator).to(torch.float16),
        "step": torch.tensor(1234),
    }


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture
def checkpoints(data_mount: MakeMount) -> DataMount:
    buf = io.BytesIO()
    torch.save(state_dict(), buf)
    return data_mount(
        {"ckpt/model.pt": buf.getvalue(), "ckpt/model.safetensors": safetensors.torch.save(state_dict())}
    )


def test_through_the_mount_path(checkpoints: DataMount) -> None:
    assert same(torch.load(checkpoints.path("ckpt/model.pt"), weights_only=True), state_dict())
    assert same(safetensors.torch.load_file(checkpoints.path("ckpt/model.safetensors")), state_dict())


def test_through_the_direct_reader(checkpoints: DataMount) -> None:
    checkpoints.warm("ckpt/model.pt", "ckpt/model.safetensors")
    before = reader.stats()
    with reader.open(checkpoints.path("ckpt/model.pt")) as f:
        assert same(torch.load(f, weights_only=True), state_dict())
    with reader.open(checkpoints.path("ckpt/model.safetensors")) as f:
        assert same(safetensors.torch.load(f.read()), state_dict())
    after = reader.stats()
    size = sum(len(b) for b in checkpoints.files.values())
    assert after["direct_bytes"] - before["direct_bytes"] >= size, after
    assert after["fallbacks"] == before["fallbacks"]
