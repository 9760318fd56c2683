"""Write-back conflicts: another client changes a key while our copy of it is dirty.

Neither side may lose data. The bucket's key keeps the other client's bytes (it was
there first, and every other reader already sees it) and ours is uploaded next to it
as ``<key>.conflict-<UTC time>``. This relies on conditional PUTs (If-Match /
If-None-Match), which SeaweedFS honours.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable

import pytest
from mounting import Mounter
from test_posix_write import bucket_keys, flush, get_object

from tools.servers import SeaweedFS, s3_client

pytestmark = pytest.mark.fuse

CONFLICT_NAME = re.compile(r"^(?P<key>.+)\.conflict-\d{8}T\d{6}\.\d{6}Z$")


def conflict_copies(keys: set[str], key: str) -> list[str]:
    return sorted(k for k in keys if (m := CONFLICT_NAME.match(k)) is not None and m["key"] == key)


def test_remote_overwrite_of_a_dirty_file(
    bucket: Callable[..., str], mounter: Mounter, seaweed: SeaweedFS
) -> None:
    name = bucket()
    client = s3_client(seaweed.endpoint_url)
    client.put_object(Bucket=name, Key="shared.txt", Body=b"version 1\n")
    client.put_object(Bucket=name, Key="bystander.txt", Body=b"untouched\n")
    mount = mounter(f"s3://{name}", "--writeback-delay", "300s")
    with open(mount.path / "shared.txt", "r+b") as fh:
        assert fh.read() == b"version 1\n"
        fh.write(b"ours, appended\n")
    (mount.path / "bystander.txt").write_bytes(b"ours, no conflict\n")
    client.put_object(Bucket=name, Key="shared.txt", Body=b"theirs, written meanwhile\n")
    flush(mount)

    keys = bucket_keys(client, name)
    copies = conflict_copies(keys, "shared.txt")
    assert len(copies) == 1, keys
    assert keys == {"shared.txt", "bystander.txt", copies[0]}
    assert get_object(client, name, "shared.txt")[0] == b"theirs, written meanwhile\n"
    body, meta = get_object(client, name, copies[0])
    assert body == b"version 1\nours, appended\n"
    assert meta["file-permissions"] == "0100644"  # ours keeps our POSIX headers
    assert get_object(client, name, "bystander.txt")[0] == b"ours, no conflict\n"
    status = mount.status()
    assert (status["conflicts"], status["uploads_pending"], status["dirty_files"]) == (1, 0, 0)
    # The mount shows both once it lists the directory again.
    assert set(os.listdir(mount.path)) == {"shared.txt", "bystander.txt", copies[0]}
    assert (mount.path / copies[0]).read_bytes() == b"version 1\nours, appended\n"
    assert (mount.path / "shared.txt").read_bytes() == b"theirs, written meanwhile\n"


def test_both_clients_create_the_same_key(
    bucket: Callable[..., str], mounter: Mounter, seaweed: SeaweedFS
) -> None:
    name = bucket()
    client = s3_client(seaweed.endpoint_url)
    mount = mounter(f"s3://{name}", "--writeback-delay", "300s")
    os.mkdir(mount.path / "dir")
    (mount.path / "dir" / "new.bin").write_bytes(b"created in the mount")
    client.put_object(Bucket=name, Key="dir/new.bin", Body=b"created by another client")
    flush(mount)

    keys = bucket_keys(client, name)
    copies = conflict_copies(keys, "dir/new.bin")
    assert len(copies) == 1, keys
    assert keys == {"dir/", "dir/new.bin", copies[0]}
    assert get_object(client, name, "dir/new.bin")[0] == b"created by another client"
    assert get_object(client, name, copies[0])[0] == b"created in the mount"
    assert mount.status()["conflicts"] == 1
