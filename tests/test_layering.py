"""The layering of docs/design.md, enforced: a new upward import fails ``make test``.

The contracts live in pyproject.toml (``[tool.importlinter]``, PyPI ``import-linter``): the
layer table as a ``layers`` contract, the file-system core free of pyfuse3, pyfuse3 only in the
FUSE adapter and the daemon, and a direct reader that pulls in neither trio, nor the FUSE
adapter, nor the control server. Each is checked on its own, so a failure names the contract.
A check that cannot fail would be worth nothing, so the last test plants upward imports in a
copy of the tree and requires the same contracts to catch them.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
LINT = Path(sys.executable).with_name("lint-imports")
CONTRACTS = ["layers", "fs-without-fuse", "pyfuse3-in-fuse-and-daemon-only", "light-reader"]


def lint(root: Path, *contracts: str) -> subprocess.CompletedProcess[str]:
    """``lint-imports`` on the ``tierfs`` package found first under ``root``, with ``root``'s config."""
    env = {**os.environ, "PYTHONPATH": str(root)}
    args = [str(LINT), "--no-cache", "--config", str(root / "pyproject.toml")]
    for contract in contracts:
        args += ["--contract", contract]
    return subprocess.run(args, cwd=root, env=env, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("contract", CONTRACTS)
def test_contract_is_kept(contract: str) -> None:
    result = lint(ROOT, contract)
    assert result.returncode == 0, result.stdout + result.stderr


def test_an_upward_import_is_caught(tmp_path: Path) -> None:
    """Plant an upward import (the core reaching up into the FUSE adapter) and a store that imports
    the metadata layer above it, in a copy of the tree: the contracts must break, naming both."""
    shutil.copytree(ROOT / "tierfs", tmp_path / "tierfs", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    with (tmp_path / "tierfs" / "fs" / "handles.py").open("a") as f:
        f.write("\nfrom ..fuse import operations as _upward  # noqa: E402\n")
    with (tmp_path / "tierfs" / "store" / "s3errors.py").open("a") as f:
        f.write("\nfrom ..meta import keys as _upward  # noqa: E402\n")
    result = lint(tmp_path, "layers", "fs-without-fuse")
    assert result.returncode != 0, result.stdout
    assert "tierfs.fs.handles -> tierfs.fuse.operations" in result.stdout, result.stdout
    assert "tierfs.store.s3errors -> tierfs.meta.keys" in result.stdout, result.stdout
    # and the core now reaches pyfuse3, indirectly, through the adapter it imported
    assert "tierfs.fs is not allowed to import pyfuse3" in result.stdout, result.stdout
