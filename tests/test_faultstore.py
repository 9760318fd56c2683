"""The fault-injecting store wrapper itself, over a real S3ObjectStore on moto.

Other layers' tests trust it to fail exactly the calls they chose, so each selection form
(countdown, probability with a seed, key prefix, times) and each action (fail, delay,
stall/release, act-then-fail) is checked against what actually reached the bucket.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tierfs.errors import NotFound, Permanent, Unavailable
from tierfs.store.faultstore import FaultStore
from tierfs.store.objectstore import ObjectStore, S3ObjectStore
from tools.servers import MotoS3, s3_client


@pytest.fixture
def inner(moto: MotoS3, bucket: Callable[..., str], s3_env: None) -> S3ObjectStore:
    return S3ObjectStore(bucket(moto), endpoint_url=moto.endpoint_url, timeout=5.0, retries=0)


def stored(moto: MotoS3, store: S3ObjectStore) -> set[str]:
    listing = s3_client(moto.endpoint_url).list_objects_v2(Bucket=store.bucket)
    return {o["Key"] for o in listing.get("Contents", ())}


def test_it_is_an_object_store_and_passes_calls_through(inner: S3ObjectStore, tmp_path: Path) -> None:
    faulty: ObjectStore = FaultStore(inner)  # type-checks against the protocol
    etag = faulty.put_bytes("a", b"hello", {"k": "v"})
    assert faulty.head("a").etag == etag
    assert faulty.get_range("a", 0, 5).data == b"hello"
    (page,) = list(faulty.list_dir(""))
    assert [o.key for o in page.objects] == ["a"]
    path = tmp_path / "f"
    path.write_bytes(b"file")
    assert faulty.put_file("b", path, {}) == faulty.expected_etag(path)
    faulty.delete("a")
    with pytest.raises(NotFound):
        faulty.head("a")


def test_countdown_fails_exactly_the_chosen_calls(moto: MotoS3, inner: S3ObjectStore) -> None:
    faulty = FaultStore(inner)
    faulty.fail("put_bytes", Permanent, nth={2, 4})
    outcomes = []
    for i in range(1, 6):
        try:
            faulty.put_bytes(f"k{i}", b"x", {})
            outcomes.append("ok")
        except Permanent:
            outcomes.append("failed")
    assert outcomes == ["ok", "failed", "ok", "failed", "ok"]
    assert stored(moto, inner) == {"k1", "k3", "k5"}  # a failed call never reached the server
    assert (faulty.calls["put_bytes"], faulty.injected["put_bytes"]) == (5, 2)
    assert inner.requests["put_object"] == 3


def test_probability_is_reproducible_with_a_seed(inner: S3ObjectStore) -> None:
    inner.put_bytes("k", b"x", {})

    def pattern(seed: int) -> list[bool]:
        faulty = FaultStore(inner, seed=seed)
        faulty.fail("head", probability=0.5)
        result = []
        for _ in range(40):
            try:
                faulty.head("k")
                result.append(True)
            except Unavailable:
                result.append(False)
        return result

    first = pattern(7)
    assert first == pattern(7)
    assert 5 < first.count(False) < 35  # both outcomes occur at p = 0.5
    assert first != pattern(8)


def test_key_prefix_and_times_narrow_a_rule(moto: MotoS3, inner: S3ObjectStore) -> None:
    faulty = FaultStore(inner)
    faulty.fail("put_bytes", key_prefix="bad/", times=1)
    faulty.put_bytes("good/a", b"x", {})
    with pytest.raises(Unavailable, match="injected"):
        faulty.put_bytes("bad/a", b"x", {})
    faulty.put_bytes("bad/b", b"x", {})  # the rule fired its one time
    assert stored(moto, inner) == {"good/a", "bad/b"}


def test_act_then_fail_stores_the_object_but_loses_the_answer(moto: MotoS3, inner: S3ObjectStore) -> None:
    """The lost-response case: the caller sees Unavailable, yet the bucket holds the object."""
    faulty = FaultStore(inner)
    faulty.act_then_fail("put_bytes", nth=1)
    with pytest.raises(Unavailable):
        faulty.put_bytes("k", b"landed", {})
    assert s3_client(moto.endpoint_url).get_object(Bucket=inner.bucket, Key="k")["Body"].read() == b"landed"


def test_delay_slows_the_call_then_passes_it_through(inner: S3ObjectStore) -> None:
    inner.put_bytes("k", b"x", {})
    faulty = FaultStore(inner)
    faulty.delay("get_range", 0.3, nth=1)
    started = time.monotonic()
    assert faulty.get_range("k", 0, 1).data == b"x"
    assert time.monotonic() - started >= 0.3


def test_a_stall_holds_the_call_until_released(inner: S3ObjectStore) -> None:
    inner.put_bytes("k", b"x", {})
    faulty = FaultStore(inner)
    faulty.stall("head", bound=30.0)
    results: list[int] = []
    worker = threading.Thread(target=lambda: results.append(faulty.head("k").size))
    worker.start()
    assert faulty.wait_stalled(1, timeout=10.0)
    assert results == [] and inner.requests.get("head_object", 0) == 0  # held before the request
    faulty.release()
    worker.join(10.0)
    assert results == [1]
    assert faulty.stalled == 0


def test_a_stall_ends_at_its_bound(inner: S3ObjectStore) -> None:
    inner.put_bytes("k", b"x", {})
    faulty = FaultStore(inner)
    faulty.stall("head", bound=0.2)
    assert faulty.head("k").size == 1


def test_listing_faults_apply_when_iteration_starts(inner: S3ObjectStore) -> None:
    """Like the real store, a listing makes its request when iterated, not when called."""
    faulty = FaultStore(inner)
    faulty.fail("list_tree", nth=1)
    pages = faulty.list_tree("")
    assert faulty.calls["list_tree"] == 0
    with pytest.raises(Unavailable):
        list(pages)
    assert list(faulty.list_tree("")) == []


def test_removing_and_clearing_rules(inner: S3ObjectStore) -> None:
    inner.put_bytes("k", b"x", {})
    faulty = FaultStore(inner)
    rule = faulty.fail("head")
    with pytest.raises(Unavailable):
        faulty.head("k")
    faulty.remove(rule)
    assert faulty.head("k").size == 1
    faulty.fail("head")
    faulty.clear()
    assert faulty.head("k").size == 1
    with pytest.raises(ValueError):
        faulty.fail("no_such_method")
    with pytest.raises(ValueError):
        faulty.fail("head", nth=0)


def test_counts_are_exact_under_concurrency(inner: S3ObjectStore) -> None:
    inner.put_bytes("k", b"x", {})
    faulty = FaultStore(inner, seed=3)
    faulty.fail("head", nth=set(range(1, 201, 2)))  # every odd call
    failures: list[int] = []
    lock = threading.Lock()

    def work() -> None:
        for _ in range(25):
            try:
                faulty.head("k")
            except Unavailable:
                with lock:
                    failures.append(1)

    threads = [threading.Thread(target=work) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert faulty.calls["head"] == 200
    assert len(failures) == faulty.injected["head"] == 100
    assert inner.requests["head_object"] == 100
