"""A fault-injecting :class:`~tierfs.store.objectstore.ObjectStore` wrapper, for tests without FUSE.

In the style of mountpoint-s3's ``failure_client``: it wraps any store (usually a real
:class:`~tierfs.store.objectstore.S3ObjectStore` on moto or SeaweedFS) and, per method name,
makes chosen calls

- **fail**: raise a chosen :class:`~tierfs.errors.StoreError` instead of calling through;
- **delay**: sleep, then call through;
- **stall**: block until :meth:`FaultStore.release` or a bound, then call through
  (tests can wait for the stall with :meth:`FaultStore.wait_stalled`);
- **act then fail**: call through, then raise Unavailable, the lost response after the
  server has acted (a PUT that is stored although the client saw a timeout).

Which calls: the Nth call(s) of the method (``nth``, counted from 1 since the wrapper was
made, the countdown form), a seeded random draw (``probability``), or every call; a rule
can be narrowed to keys with a prefix and limited to ``times`` firings. Every method is
counted in :attr:`FaultStore.calls`, and fired faults in :attr:`FaultStore.injected`.
All of it is thread-safe; randomness comes from one ``random.Random(seed)``, so a
single-threaded test is reproducible.

Listing methods are lazy like the real store's: the call is counted and its faults are
applied when iteration starts, which is when the real store sends its first request.
"""

from __future__ import annotations

import random
import threading
import time
from collections import Counter
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any, TypeVar

from ..errors import StoreError, Unavailable
from .objectstore import GetResult, ListPage, ObjectInfo, ObjectStore, Part

T = TypeVar("T")

#: Which calls of a method a rule picks by number (1-based): one, several, or None for any.
Nth = int | Collection[int] | None

#: The methods faults can be attached to (``expected_etag`` is local computation, not I/O).
METHODS = frozenset(
    {
        "check_bucket",
        "list_dir",
        "list_tree",
        "head",
        "get_range",
        "put_bytes",
        "put_file",
        "create_multipart",
        "upload_parts",
        "complete_multipart",
        "abort_multipart",
        "list_multipart_uploads",
        "replace_metadata",
        "copy",
        "delete",
    }
)


class Action(Enum):
    FAIL = "fail"
    DELAY = "delay"
    STALL = "stall"
    ACT_THEN_FAIL = "act_then_fail"


@dataclass
class Rule:
    """One injected behaviour. Made by :meth:`FaultStore.fail` and friends; pass it to ``remove``."""

    method: str
    action: Action
    error: Callable[[str], StoreError] = Unavailable
    seconds: float = 0.0  # delay, or the stall's upper bound
    nth: frozenset[int] | None = None  # which calls (1-based per method); None: any call
    probability: float | None = None  # chance per eligible call; None: always
    key_prefix: str | None = None  # only calls whose first argument starts with it
    times: int | None = None  # fire at most this often
    fired: int = 0


class FaultStore:
    """Wraps ``inner`` and injects faults by rule. Satisfies the ObjectStore protocol."""

    def __init__(self, inner: ObjectStore, *, seed: int = 0) -> None:
        self.inner = inner
        self.bucket = inner.bucket
        self.calls: Counter[str] = Counter()
        self.injected: Counter[str] = Counter()
        self._rules: list[Rule] = []
        self._random = random.Random(seed)
        self._lock = threading.Lock()
        self._released = threading.Condition(self._lock)
        self._generation = 0  # bumped by release(): stalls begun before it end
        self._stalled = 0

    # -- rules -------------------------------------------------------------------------------------

    def add(self, rule: Rule) -> Rule:
        if rule.method not in METHODS:
            raise ValueError(f"no such store method: {rule.method!r} (one of {sorted(METHODS)})")
        with self._lock:
            self._rules.append(rule)
        return rule

    def fail(
        self,
        method: str,
        error: Callable[[str], StoreError] = Unavailable,
        *,
        nth: Nth = None,
        probability: float | None = None,
        key_prefix: str | None = None,
        times: int | None = None,
    ) -> Rule:
        """Raise ``error(message)`` instead of calling through."""
        return self.add(
            Rule(method, Action.FAIL, error=error, **_select(nth, probability, key_prefix, times))
        )

    def delay(
        self,
        method: str,
        seconds: float,
        *,
        nth: Nth = None,
        probability: float | None = None,
        key_prefix: str | None = None,
        times: int | None = None,
    ) -> Rule:
        """Sleep ``seconds``, then call through."""
        return self.add(
            Rule(method, Action.DELAY, seconds=seconds, **_select(nth, probability, key_prefix, times))
        )

    def stall(
        self,
        method: str,
        bound: float = 60.0,
        *,
        nth: Nth = None,
        probability: float | None = None,
        key_prefix: str | None = None,
        times: int | None = None,
    ) -> Rule:
        """Block until :meth:`release` (or ``bound`` seconds), then call through."""
        return self.add(
            Rule(method, Action.STALL, seconds=bound, **_select(nth, probability, key_prefix, times))
        )

    def act_then_fail(
        self,
        method: str,
        *,
        nth: Nth = None,
        probability: float | None = None,
        key_prefix: str | None = None,
        times: int | None = None,
    ) -> Rule:
        """Call through, then raise Unavailable: the server acted but the answer was lost."""
        return self.add(Rule(method, Action.ACT_THEN_FAIL, **_select(nth, probability, key_prefix, times)))

    def remove(self, rule: Rule) -> None:
        with self._lock:
            self._rules.remove(rule)

    def clear(self) -> None:
        """Drop every rule and release every stall."""
        with self._lock:
            self._rules.clear()
        self.release()

    def release(self) -> None:
        """End every stall in progress (later stalls still stall)."""
        with self._released:
            self._generation += 1
            self._released.notify_all()

    def wait_stalled(self, count: int = 1, timeout: float = 10.0) -> bool:
        """Wait until at least ``count`` calls are stalled; False after ``timeout``."""
        with self._released:
            return self._released.wait_for(lambda: self._stalled >= count, timeout)

    @property
    def stalled(self) -> int:
        with self._lock:
            return self._stalled

    # -- the mechanism -----------------------------------------------------------------------------

    def _decide(self, method: str, key: str | None) -> list[Rule]:
        """Count the call and pick the rules that fire for it (under the lock, so draws are ordered)."""
        with self._lock:
            self.calls[method] += 1
            number = self.calls[method]
            chosen = []
            for rule in self._rules:
                if rule.method != method or (rule.times is not None and rule.fired >= rule.times):
                    continue
                if rule.key_prefix is not None and (key is None or not key.startswith(rule.key_prefix)):
                    continue
                if rule.nth is not None and number not in rule.nth:
                    continue
                if rule.probability is not None and self._random.random() >= rule.probability:
                    continue
                rule.fired += 1
                self.injected[method] += 1
                chosen.append(rule)
            return chosen

    def _stall(self, bound: float) -> None:
        with self._released:
            generation = self._generation
            self._stalled += 1
            self._released.notify_all()
            try:
                self._released.wait_for(lambda: self._generation != generation, bound)
            finally:
                self._stalled -= 1

    def _invoke(self, method: str, key: str | None, call: Callable[[], T]) -> T:
        rules = self._decide(method, key)
        what = f"injected fault: {method} {key or ''}".rstrip()
        for rule in rules:
            if rule.action is Action.DELAY:
                time.sleep(rule.seconds)
            elif rule.action is Action.STALL:
                self._stall(rule.seconds)
        for rule in rules:
            if rule.action is Action.FAIL:
                raise rule.error(f"{what} (call {self.calls[method]})")
        result = call()
        if any(rule.action is Action.ACT_THEN_FAIL for rule in rules):
            raise Unavailable(f"{what}: done by the server, answer lost")
        return result

    def _lazy(self, method: str, key: str, call: Callable[[], list[T]]) -> Iterator[T]:
        yield from self._invoke(method, key, call)

    # -- the ObjectStore protocol ------------------------------------------------------------------

    @property
    def requests(self) -> Mapping[str, int]:
        """The inner store's request counters (for status), when it keeps them."""
        return getattr(self.inner, "requests", {})  # type: ignore[no-any-return]

    @property
    def bytes_fetched(self) -> int:
        return getattr(self.inner, "bytes_fetched", 0)  # type: ignore[no-any-return]

    @property
    def in_flight(self) -> int:
        return getattr(self.inner, "in_flight", 0)  # type: ignore[no-any-return]

    def check_bucket(self) -> None:
        self._invoke("check_bucket", None, self.inner.check_bucket)

    def list_dir(self, prefix: str) -> Iterator[ListPage]:
        return self._lazy("list_dir", prefix, lambda: list(self.inner.list_dir(prefix)))

    def list_tree(self, prefix: str) -> Iterator[ObjectInfo]:
        return self._lazy("list_tree", prefix, lambda: list(self.inner.list_tree(prefix)))

    def head(self, key: str, *, version_id: str | None = None) -> ObjectInfo:
        return self._invoke("head", key, lambda: self.inner.head(key, version_id=version_id))

    def get_range(
        self,
        key: str,
        start: int,
        length: int,
        if_match: str | None = None,
        *,
        object_size: int | None = None,
        version_id: str | None = None,
    ) -> GetResult:
        return self._invoke(
            "get_range",
            key,
            lambda: self.inner.get_range(
                key, start, length, if_match, object_size=object_size, version_id=version_id
            ),
        )

    def put_bytes(
        self,
        key: str,
        data: bytes,
        metadata: Mapping[str, str],
        if_match: str | None = None,
        if_none_match: bool = False,
    ) -> str:
        return self._invoke(
            "put_bytes", key, lambda: self.inner.put_bytes(key, data, metadata, if_match, if_none_match)
        )

    def put_file(
        self,
        key: str,
        path: Path,
        metadata: Mapping[str, str],
        if_match: str | None = None,
        if_none_match: bool = False,
        *,
        on_upload_id: Callable[[str], None] | None = None,
    ) -> str:
        return self._invoke(
            "put_file",
            key,
            lambda: self.inner.put_file(
                key, path, metadata, if_match, if_none_match, on_upload_id=on_upload_id
            ),
        )

    @property
    def part_size(self) -> int:
        return self.inner.part_size

    def is_multipart(self, size: int) -> bool:
        return self.inner.is_multipart(size)

    def create_multipart(self, key: str, metadata: Mapping[str, str]) -> str:
        return self._invoke("create_multipart", key, lambda: self.inner.create_multipart(key, metadata))

    def upload_parts(
        self, key: str, upload_id: str, path: Path, numbers: Iterable[int], *, size: int | None = None
    ) -> list[Part]:
        numbers = list(numbers)
        return self._invoke(
            "upload_parts", key, lambda: self.inner.upload_parts(key, upload_id, path, numbers, size=size)
        )

    def complete_multipart(
        self, key: str, upload_id: str, parts: list[Part], if_match: str | None, if_none_match: bool
    ) -> str:
        return self._invoke(
            "complete_multipart",
            key,
            lambda: self.inner.complete_multipart(key, upload_id, parts, if_match, if_none_match),
        )

    def abort_multipart(self, key: str, upload_id: str) -> None:
        self._invoke("abort_multipart", key, lambda: self.inner.abort_multipart(key, upload_id))

    def list_multipart_uploads(self, prefix: str) -> list[tuple[str, str]]:
        return self._invoke(
            "list_multipart_uploads", prefix, lambda: self.inner.list_multipart_uploads(prefix)
        )

    def expected_etag(self, path: Path) -> str:
        return self.inner.expected_etag(path)

    def replace_metadata(self, key: str, metadata: Mapping[str, str], if_match: str | None = None) -> str:
        return self._invoke(
            "replace_metadata", key, lambda: self.inner.replace_metadata(key, metadata, if_match)
        )

    def copy(self, src_key: str, dst_key: str) -> str:
        return self._invoke("copy", src_key, lambda: self.inner.copy(src_key, dst_key))

    def delete(self, key: str) -> None:
        self._invoke("delete", key, lambda: self.inner.delete(key))


def _select(nth: Nth, probability: float | None, key_prefix: str | None, times: int | None) -> dict[str, Any]:
    """Validate which calls a rule picks; ``nth`` is one call number or several (from 1)."""
    numbers = None if nth is None else frozenset({nth} if isinstance(nth, int) else nth)
    if numbers is not None and not all(isinstance(n, int) and n >= 1 for n in numbers):
        raise ValueError(f"nth counts calls from 1: {nth!r}")
    if probability is not None and not 0.0 <= probability <= 1.0:
        raise ValueError(f"probability must be within [0, 1], not {probability}")
    return {"nth": numbers, "probability": probability, "key_prefix": key_prefix, "times": times}
