"""Which journaled ops may start now: per-key journal order, parallel across keys.

Pure functions of the journal (in order), the ops already running and a readiness test,
so they can be reasoned about and tested without a bucket. Rules (docs/writeback.md):
- an op never starts while an earlier op (running or not) touches one of its keys;
- a ``copy`` touches its source as well as its destination;
- a ``dir/`` delete also waits for every earlier op on a key below it;
- a running op keeps the key it started with (``running`` maps seq -> that key).

Runs on the trio loop: no I/O beyond the short LMDB reads of ``node_key``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from .journal import Op

NODE_OPS = ("put", "marker", "meta")  # ops that act on an inode
NodeKey = Callable[[int], str | None]  # an inode's current key, None if it is gone


def target_key(op: Op, node_key: NodeKey) -> str | None:
    """The key ``op`` writes. Puts carry theirs; markers and metas follow their inode's current key."""
    if op.kind in ("copy", "delete") or (op.kind == "put" and op.key):
        return op.key
    return node_key(op.ino) if op.ino else None


def keys_touched(op: Op, running_key: str | None, node_key: NodeKey) -> set[str]:
    keys = {op.key} if op.key else set()
    if op.src:
        keys.add(op.src)
    if running_key:
        keys.add(running_key)
    elif op.kind in NODE_OPS and op.ino:
        key = node_key(op.ino)
        if key is not None:
            keys.add(key)
    return keys


def startable(
    ops: Sequence[Op],
    running: dict[int, str],
    ready: Callable[[Op], bool],
    node_key: NodeKey,
    limit: int,
) -> list[Op]:
    """The ops to start now, in journal order, at most ``limit - len(running)`` of them.

    Called on every wake-up (each journal append and each finished op), so it is one pass
    that asks ``ready`` once per op and stops as soon as ``limit`` is reached; keys (an LMDB
    read per inode op) are resolved only for ops that precede a ready one: a long journal of
    files still being written costs no key lookups.
    """
    if len(running) >= limit:
        return []
    blocked: set[str] = set()
    earlier: list[str] = []
    start: list[Op] = []
    unresolved: list[Op] = []  # not startable, keys not looked up yet: they matter only before a ready op

    def resolve() -> None:
        for waiting in unresolved:
            keys = keys_touched(waiting, running.get(waiting.seq), node_key)
            earlier.extend(keys)
            blocked.update(keys)
        unresolved.clear()

    for op in ops:
        if op.seq in running or not ready(op):
            unresolved.append(op)
            continue
        resolve()
        keys = keys_touched(op, None, node_key)
        waits = bool(keys & blocked) or (
            op.kind == "delete" and op.key.endswith("/") and any(k.startswith(op.key) for k in earlier)
        )
        earlier.extend(keys)
        blocked |= keys
        if waits:
            continue
        start.append(op)
        if len(running) + len(start) >= limit:
            break
    return start
