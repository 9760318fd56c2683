"""One journaled op carried out against the bucket (blocking: runs in a worker thread).

Every op is told the key it writes and its *base*: what tierfs believes that key holds
before the op (an ETag, or ``""`` for nothing; see docs/writeback.md, "The life of a key").
The uploader only ever replaces the base:

- a put of a key whose base is an ETag sends ``If-Match: base``, one request and no HEAD
  first (the record already knows the base); a put of a key whose base is nothing sends
  ``If-None-Match: *``. Only a multipart put HEADs first: its condition travels with the
  completion, after all the parts, and moto ignores it there. A 404 to an If-Match PUT
  (AWS, moto: the key was deleted) is handled like a 412;
- every object we write carries ``x-amz-meta-tierfs-op: <cache id>.<seq>``, the name of
  this op. When a condition fails, the key is HEADed: if it carries our own op's name, our
  earlier attempt landed and only its response was lost (a retry, or a crash before the
  journal entry was dropped). If it also holds our bytes (its ETag is what the staging file
  gives) that is success, not a conflict; if a write joined the op since, the object is
  still ours and is replaced (``If-Match`` on its ETag);
- anything else at the key is another writer's: it keeps the key and ours is uploaded as
  ``<key>.conflict-<UTC time>``: both survive.

A 404 from an unconditional or If-None-Match PUT means the bucket itself is gone: that is :class:`Permanent`.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from ..errors import NotFound, Permanent, PreconditionFailed, StoreError
from ..meta import posixmeta
from ..meta.records import Inode
from ..store.objectstore import ObjectInfo, ObjectStore
from .journal import Op
from .stream import Stream

log = logging.getLogger(__name__)

OP_TOKEN_HEADER = "tierfs-op"  # x-amz-meta-tierfs-op: which journaled op wrote this object


@dataclass(frozen=True)
class Outcome:
    """What an op did: the ETag it left at its key, or the conflict name ours went to."""

    etag: str = ""
    size: int = 0
    conflict_key: str = ""
    skipped: bool = False


def headers_of(node: Inode, token: str) -> dict[str, str]:
    meta = posixmeta.encode(
        posixmeta.PosixMeta(
            mode=node.mode, uid=node.uid, gid=node.gid, mtime_ns=node.mtime_ns, atime_ns=node.atime_ns,
            rdev=node.rdev or None,
        )
    )
    meta[OP_TOKEN_HEADER] = token
    return meta


def _is_ours(info: ObjectInfo | None, token: str) -> bool:
    return info is not None and (info.metadata or {}).get(OP_TOKEN_HEADER) == token


class Uploader:
    """Carries out one op; stateless apart from the conflict names it already chose (retries reuse them)."""

    def __init__(
        self,
        store: ObjectStore,
        staging_path: Callable[[int], Path],
        *,
        record_upload: Callable[[int, str, str], None],
    ) -> None:
        self.store = store
        self._staging_path = staging_path
        self._record_upload = record_upload
        self._conflict_names: dict[int, str] = {}

    def _head(self, key: str) -> ObjectInfo | None:
        try:
            return self.store.head(key)
        except NotFound:
            return None

    # -- the ops ---------------------------------------------------------------------------------------

    def delete(self, op: Op) -> Outcome:
        with contextlib.suppress(NotFound):
            self.store.delete(op.key)
        return Outcome()

    def copy(self, op: Op, size: int) -> Outcome:
        try:
            etag = self.store.copy(op.src, op.key)
        except NotFound:
            log.warning("rename source %s vanished before it was copied", op.src)
            return Outcome(skipped=True)
        return Outcome(etag=etag, size=size)

    def marker(self, node: Inode, key: str, token: str) -> Outcome:
        etag = self.store.put_bytes(key, b"", headers_of(node, token))
        return Outcome(etag=etag)

    def meta(self, node: Inode, key: str, base: str, token: str) -> Outcome:
        try:
            etag = self.store.replace_metadata(key, headers_of(node, token), if_match=base or None)
        except PreconditionFailed:
            current = self._head(key)
            if current is not None and _is_ours(current, token):
                return Outcome(etag=current.etag, size=node.size)
            log.warning("metadata change of %s lost a race with another writer; keeping theirs", key)
            return Outcome(conflict_key=key)
        except NotFound:
            return Outcome(skipped=True)
        return Outcome(etag=etag, size=node.size)

    def put(
        self, op: Op, node: Inode, key: str, base: str, token: str, stream: Stream | None = None
    ) -> Outcome:
        """Upload the staging file of ``node`` to ``key``, replacing ``base`` and nothing else.

        With ``stream`` (the file's streamed upload, whose parts are partly in the bucket) only
        the rest is uploaded and that upload completed; if it cannot be, it is aborted and the
        file uploaded as usual.
        """
        path = self._staging_path(node.ino)
        try:
            size = path.stat().st_size
            if stream is not None:
                return self._put_streamed(op, node, key, base, token, path, size, stream)
            return self._put(op, node, key, base, token, path, size)
        except FileNotFoundError:  # unlinked or replaced while we uploaded; its delete is journaled
            log.info("staging file of %s went away before its upload", key)
            return Outcome(skipped=True)

    def _put(self, op: Op, node: Inode, key: str, base: str, token: str, path: Path, size: int) -> Outcome:
        headers = headers_of(node, token)
        if base and self.store.is_multipart(size):
            # A multipart upload sends its condition only at completion, after every part, and
            # not every server honours it there (moto ignores it): one HEAD among many requests
            # keeps a conflict from uploading everything twice, and another writer's object safe.
            current = self._head(key)
            if current is None:
                base = ""  # deleted remotely: nothing of theirs to lose, upload as new
            elif current.etag != base:
                if not _is_ours(current, token):
                    return self._conflict(op, key, base, path, size, headers, current.etag)
                if self._same_bytes(current, path):
                    return Outcome(etag=current.etag, size=current.size)
                base = current.etag  # an earlier attempt of this op, with older bytes: ours to replace
        try:
            # A single PUT carries its condition itself (If-Match: base, or If-None-Match: *):
            # no HEAD first, one request per file. The key is HEADed only when it fails.
            etag = self._send(op, key, path, headers, base)
        except PreconditionFailed:
            current = self._head(key)
            if current is not None and _is_ours(current, token):
                if self._same_bytes(current, path):
                    return Outcome(etag=current.etag, size=current.size)
            elif current is not None and current.etag != base:
                return self._conflict(op, key, base, path, size, headers, current.etag)
            # Our own earlier attempt with older bytes, deleted meanwhile, or the server refused an
            # ETag that does match: once more, replacing exactly what we saw.
            seen = current.etag if current is not None else ""
            try:
                etag = self._send(op, key, path, headers, seen)
            except PreconditionFailed:
                return self._conflict(op, key, base, path, size, headers, "?")
        return Outcome(etag=etag, size=size)

    def _put_streamed(
        self, op: Op, node: Inode, key: str, base: str, token: str, path: Path, size: int, stream: Stream
    ) -> Outcome:
        """Complete ``stream`` as this put: the remaining parts (of the first ``size`` bytes, the
        file as this put found it), then CompleteMultipartUpload with the put's condition.

        The condition is checked by a HEAD first as for any multipart put (moto ignores it on
        completion). Whatever goes wrong, the streamed upload is aborted and the file goes up
        the usual way (a 412) or the op is retried the usual way (anything else).
        """
        try:
            current = self._head(key) if base else None
            if base and (current is None or current.etag != base):
                self.abort(stream)  # deleted, ours from an earlier attempt, or theirs: the usual path
                return self._put(op, node, key, base, token, path, size)
            done = stream.uploaded_parts()
            numbers = range(len(done) + 1, -(-size // self.store.part_size) + 1)
            rest = self.store.upload_parts(key, stream.upload_id, path, numbers, size=size)
            etag = self.store.complete_multipart(key, stream.upload_id, done + rest, base or None, not base)
        except PreconditionFailed:
            self.abort(stream)
            return self._put(op, node, key, base, token, path, size)
        except BaseException:
            self.abort(stream)
            raise
        return Outcome(etag=etag, size=size)

    def abort(self, stream: Stream) -> None:
        """Abort a streamed upload that will not be completed. Its journal record goes with the
        op; if the abort fails, replay aborts it (an aborted upload's abort is a no-op)."""
        with contextlib.suppress(StoreError):
            self.store.abort_multipart(stream.key, stream.upload_id)

    def _same_bytes(self, current: ObjectInfo, path: Path) -> bool:
        """Whether the object holds exactly the staging file's bytes (its ETag is what we would get).

        An op's name alone is not enough: a write made while the op waited for a retry joins
        that same op, so an earlier attempt under its name may hold older bytes. Reading the
        file for its MD5 costs ~1 ms per MiB, and only on this rare path (a lost answer).
        """
        return current.size == path.stat().st_size and current.etag == self.store.expected_etag(path)

    def _send(self, op: Op, key: str, path: Path, headers: dict[str, str], base: str) -> str:
        try:
            return self.store.put_file(
                key,
                path,
                headers,
                if_match=base or None,
                if_none_match=not base,
                on_upload_id=lambda upload_id: self._record_upload(op.seq, key, upload_id),
            )
        except NotFound as exc:
            if base:  # AWS and moto answer If-Match on a missing key with 404: it was deleted remotely
                raise PreconditionFailed(f"PUT {key}: no object to match ({exc})") from exc
            raise Permanent(f"PUT {key}: the bucket is gone ({exc})") from exc

    def _conflict(
        self, op: Op, key: str, base: str, path: Path, size: int, headers: dict[str, str], theirs: str
    ) -> Outcome:
        conflict_key = self._conflict_names.get(op.seq)
        if conflict_key is None:
            stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S.%fZ")
            conflict_key = self._conflict_names[op.seq] = f"{key}.conflict-{stamp}"
        try:
            self.store.put_file(
                conflict_key,
                path,
                headers,
                on_upload_id=lambda upload_id: self._record_upload(op.seq, conflict_key, upload_id),
            )
        except NotFound as exc:
            raise Permanent(f"PUT {conflict_key}: the bucket is gone ({exc})") from exc
        self._conflict_names.pop(op.seq, None)
        log.warning(
            "conflict: %s changed in the bucket (etag %s, ours was based on %s); our version is saved as %s",
            key, theirs or "deleted", base or "no object", conflict_key,
        )  # fmt: skip
        return Outcome(size=size, conflict_key=conflict_key)
