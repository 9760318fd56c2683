"""Write-back faults end to end: a real mount, SeaweedFS, and tools/faultproxy.py between them.

Two rows of issue 11's fault table, through the daemon as a user runs it (tests/direct.py
covers the same rules below the mount, where races can be set up precisely):

- "a PUT stored by the server whose response was lost": the retried ``If-None-Match: *``
  upload got 412 and tierfs saved its own bytes again as ``.conflict-`` objects (12 of 40).
  Now the bucket must hold exactly the files written, with their bytes, and no conflict.
- "kill -9 during a multipart upload": the object was right after replay, but an orphan
  multipart upload stayed in the bucket. The mount has no option to lower the 64 MiB
  multipart threshold, so the file is 80 MiB (five 16 MiB parts); the third part is held by
  the proxy while the daemon is killed, which leaves a created upload with two parts.
"""

from __future__ import annotations

import errno
import hashlib
import os
import random
from collections.abc import Callable

import pytest
from mounting import Mount, Mounter, tierfs_ok, wait_until

from tools.faultproxy import OBJECT_PATH, FaultProxy, Rule
from tools.servers import SeaweedFS, s3_client

MiB = 1 << 20
FILES = 40
BIG_SIZE = 80 * MiB + 12_345  # over the 64 MiB multipart threshold: five 16 MiB parts
pytestmark = pytest.mark.fuse


def bucket_objects(endpoint: str, name: str) -> dict[str, bytes]:
    client = s3_client(endpoint, read_timeout=120.0)
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=name)
    keys = [o["Key"] for page in pages for o in page.get("Contents", ())]
    return {key: client.get_object(Bucket=name, Key=key)["Body"].read() for key in keys}


def multipart_uploads(endpoint: str, name: str) -> list[tuple[str, str]]:
    uploads = s3_client(endpoint).list_multipart_uploads(Bucket=name).get("Uploads", ())
    return [(u["Key"], u["UploadId"]) for u in uploads]


def log_tail(mount: Mount) -> str:
    return f"\n--- mount log ---\n{mount.log_text()[-6000:]}"


def test_lost_put_answers_leave_exactly_our_files_and_no_conflict(
    seaweed: SeaweedFS, bucket: Callable[..., str], mounter: Mounter
) -> None:
    """A third of the object PUTs reach SeaweedFS and store the object, but the answer never
    comes back (the proxy closes the connection). Every retry must recognise the object as
    tierfs's own: exactly the 40 files in the bucket, each with its bytes, no ``.conflict-``."""
    name = bucket()
    rng = random.Random(40)
    files = {f"f{i:02d}": rng.randbytes(rng.randrange(1, 200_000)) for i in range(FILES)}
    rules = [Rule("lose", 0.33, methods={"PUT"}, path=OBJECT_PATH)]
    with FaultProxy(seaweed.endpoint_url, rules, seed=41) as proxy:
        mount = mounter(
            f"s3://{name}", "--writeback-delay", "1h", "--timeout", "10", endpoint_url=proxy.endpoint_url
        )
        for rel, data in files.items():
            (mount.path / rel).write_bytes(data)
        assert bucket_objects(seaweed.endpoint_url, name) == {}, "uploaded before the flush"
        tierfs_ok("flush", str(mount.path))
        lost = proxy.counts["lose"]
        assert lost >= 5, f"only {lost} answers were lost: the test did not exercise the fault"
        stored = bucket_objects(seaweed.endpoint_url, name)
        conflicts = sorted(key for key in stored if ".conflict-" in key)
        assert conflicts == [], f"{len(conflicts)} of {FILES} uploads saved as conflicts: {conflicts[:5]}"
        assert sorted(stored) == sorted(files), log_tail(mount)
        wrong = [key for key, data in files.items() if stored[key] != data]
        assert wrong == [], f"wrong bytes in the bucket for {wrong}"
        status = mount.status()
        assert status["conflicts"] == 0, status
        assert status["uploads_pending"] == 0, status
        for rel, data in files.items():
            assert (mount.path / rel).read_bytes() == data, f"{rel} reads other bytes after the flush"

        # Overwrites are conditional on the version uploaded above (If-Match): a lost answer
        # there must not turn into a conflict either.
        for rel in list(files)[::2]:
            files[rel] = rng.randbytes(rng.randrange(1, 200_000))
            (mount.path / rel).write_bytes(files[rel])
        tierfs_ok("flush", str(mount.path))
        assert proxy.counts["lose"] > lost, "no answer of an overwrite was lost"
        stored = bucket_objects(seaweed.endpoint_url, name)
        assert sorted(stored) == sorted(files), f"after the overwrites: {sorted(set(stored) - set(files))}"
        wrong = [key for key, data in files.items() if stored[key] != data]
        assert wrong == [], f"wrong bytes in the bucket after the overwrites for {wrong}"
        assert mount.status()["conflicts"] == 0
        proxy.set_rules([])
        mount.umount()


def test_a_write_while_a_lost_upload_waits_for_its_retry_reaches_the_bucket(
    seaweed: SeaweedFS, bucket: Callable[..., str], mounter: Mounter
) -> None:
    """The first PUT of ``f`` is stored but its answer lost; with ``--retries 0`` write-back
    retries it a second later. A write made in that second must reach the bucket: the retry's
    412 finds an object named after the same journaled op, but with the bytes of before the
    write (tests/test_writeback_direct.py shows why below the mount)."""
    name = bucket()
    v1, v2 = random.Random(90).randbytes(5000), random.Random(91).randbytes(7000)
    rules = [Rule("lose", methods={"PUT"}, path=rf"^/{name}/f(\?|$)", count=1)]
    with FaultProxy(seaweed.endpoint_url, rules) as proxy:
        mount = mounter(
            f"s3://{name}",
            "--writeback-delay",
            "0s",
            "--retries",
            "0",
            "--timeout",
            "10",
            endpoint_url=proxy.endpoint_url,
        )
        (mount.path / "f").write_bytes(v1)
        wait_until(lambda: proxy.counts["lose"] == 1, 30.0, "the answer to the first PUT of f lost")
        with open(mount.path / "f", "r+b") as fh:  # open before the retry is due, write, close
            fh.write(v2)
        tierfs_ok("flush", str(mount.path))
        stored = bucket_objects(seaweed.endpoint_url, name)
        assert sorted(stored) == ["f"], sorted(stored)
        assert stored["f"] == v2, (
            f"the bucket holds {len(stored['f'])} bytes, not the last write{log_tail(mount)}"
        )
        assert (mount.path / "f").read_bytes() == v2
        assert mount.status()["conflicts"] == 0
        mount.umount()


def test_a_file_renamed_overwritten_and_renamed_again_reads_while_the_first_copy_waits(
    seaweed: SeaweedFS, bucket: Callable[..., str], mounter: Mounter
) -> None:
    """``mv a b`` journals a server-side copy a -> b (held here by the proxy); ``b`` is then
    overwritten and moved to ``c``, whose upload finishes. Reading ``c`` must give the new bytes,
    not EIO: the read must not look for them under the copy's source ``a`` with the ETag of
    ``c``'s object (412), which is what the direct test shows happening below the mount."""
    name = bucket()
    old, new = random.Random(92).randbytes(40_000), random.Random(93).randbytes(30_000)
    with FaultProxy(seaweed.endpoint_url, []) as proxy:
        mount = mounter(
            f"s3://{name}", "--writeback-delay", "0s", "--timeout", "60", endpoint_url=proxy.endpoint_url
        )
        (mount.path / "a").write_bytes(old)
        tierfs_ok("flush", str(mount.path))
        proxy.set_rules([Rule("stall", methods={"PUT"}, path=rf"^/{name}/b(\?|$)", count=1, stall_max=120.0)])
        (mount.path / "a").rename(mount.path / "b")
        wait_until(lambda: proxy.stalled >= 1, 30.0, "the copy a -> b held by the proxy")
        (mount.path / "b").write_bytes(new)
        (mount.path / "b").rename(mount.path / "c")
        wait_until(lambda: "c" in bucket_objects(seaweed.endpoint_url, name), 30.0, "c uploaded")
        staging = mount.cache_dir / "staging"
        wait_until(lambda: not any(p.is_file() for p in staging.iterdir()), 30.0, "c's staging file retired")
        try:
            got = (mount.path / "c").read_bytes()
        finally:
            proxy.release()
        assert got == new, "c reads other bytes than its last write"
        tierfs_ok("flush", str(mount.path))
        stored = bucket_objects(seaweed.endpoint_url, name)
        assert stored == {"c": new}, sorted(stored)
        mount.umount()


def test_fsync_after_a_failed_upload_tries_again(
    seaweed: SeaweedFS, bucket: Callable[..., str], mounter: Mounter
) -> None:
    """fsync(2) returns EIO when its upload fails (here: 503 on every PUT, no retries). Once the
    server answers again, the next fsync must upload the file and succeed, not repeat the error
    recorded by the attempt before (an application retrying fsync would otherwise see EIO until
    the background retry happens to run)."""
    name = bucket()
    data = random.Random(94).randbytes(20_000)
    rules = [Rule("error", methods={"PUT"}, path=OBJECT_PATH, statuses=(503,))]
    with FaultProxy(seaweed.endpoint_url, rules) as proxy:
        mount = mounter(
            f"s3://{name}",
            "--writeback-delay",
            "1h",
            "--retries",
            "0",
            "--timeout",
            "5",
            endpoint_url=proxy.endpoint_url,
        )
        fd = os.open(mount.path / "f", os.O_WRONLY | os.O_CREAT, 0o644)
        try:
            os.write(fd, data)
            with pytest.raises(OSError) as failed:
                os.fsync(fd)
            assert failed.value.errno == errno.EIO
            proxy.set_rules([])
            os.fsync(fd)  # the server is back: this one must upload
        finally:
            os.close(fd)
        assert bucket_objects(seaweed.endpoint_url, name) == {"f": data}
        mount.umount()


def test_kill9_during_a_multipart_upload_leaves_no_orphan_after_replay(
    seaweed: SeaweedFS, bucket: Callable[..., str], mounter: Mounter
) -> None:
    """The daemon dies (SIGKILL) with a multipart upload created and two parts sent; the remount
    on the same cache dir replays the journal: the object is right and no upload is left open."""
    name = bucket()
    data = random.Random(80).randbytes(BIG_SIZE)
    digest = hashlib.sha256(data).hexdigest()
    hold = [Rule("stall", methods={"PUT"}, path=r"[?&]partNumber=3(&|$)", count=1, stall_max=300.0)]
    with FaultProxy(seaweed.endpoint_url, hold) as proxy:
        # The mount's endpoint is the proxy's: a cache dir belongs to one endpoint, and the
        # remount must find its journal.
        mount = mounter(
            f"s3://{name}", "--writeback-delay", "0s", "--timeout", "120", endpoint_url=proxy.endpoint_url
        )
        with open(mount.path / "big", "wb") as fh:
            for offset in range(0, len(data), 4 * MiB):
                fh.write(data[offset : offset + 4 * MiB])
        wait_until(lambda: proxy.stalled >= 1, 120.0, "part 3 of the upload held by the proxy")
        uploads = multipart_uploads(seaweed.endpoint_url, name)
        assert [key for key, _ in uploads] == ["big"], f"no multipart upload in flight: {uploads}"
        mount.kill9()
        assert mount.returncode is not None, "the daemon survived SIGKILL"
        mount.force_unmount()
        proxy.set_rules([])
        proxy.release()  # the held part goes to the server for a client that is gone
        wait_until(lambda: proxy.stalled == 0, 30.0, "the held part released")
        assert multipart_uploads(seaweed.endpoint_url, name) == uploads, "the crash left no upload to clean"
        assert "big" not in bucket_objects(seaweed.endpoint_url, name)

        again = mounter(
            f"s3://{name}",
            "--writeback-delay",
            "1h",
            cache_dir=mount.cache_dir,
            endpoint_url=proxy.endpoint_url,
        )
        tierfs_ok("flush", str(again.path))
        stored = bucket_objects(seaweed.endpoint_url, name)
        assert sorted(stored) == ["big"], sorted(stored)
        assert hashlib.sha256(stored["big"]).hexdigest() == digest, "wrong bytes after replay"
        left = multipart_uploads(seaweed.endpoint_url, name)
        assert left == [], f"orphan multipart uploads after replay: {left}{log_tail(again)}"
        status = again.status()
        assert (status["uploads_pending"], status["dirty_files"], status["conflicts"]) == (0, 0, 0), status
        assert hashlib.sha256((again.path / "big").read_bytes()).hexdigest() == digest
        again.umount()
