"""The rules that map S3 keys onto POSIX names and back.

S3 keys are arbitrary UTF-8 strings, POSIX names are not: a key such as ``a/../b``,
``a//b`` or one with a NUL byte has no faithful POSIX spelling, and showing it anyway
would let a bucket's content name paths outside the mount or collide with ``.``/``..``.
Such keys are *hidden* (never shown, never touched) rather than mangled, because a
mangled name could collide with a real one and a write through it would land on the
wrong key. Every hiding decision carries a :class:`HiddenReason` so the daemon can
count and report them instead of silently losing objects.

Layout: a mount of ``s3://BUCKET/PREFIX`` has its root at key prefix ``PREFIX`` (``''``
or ending in ``/``); a directory's prefix is ``parent + name + '/'`` and a file's key is
``parent + name``. These functions are pure so that they can be tested exhaustively.
"""

from __future__ import annotations

from enum import StrEnum

#: Linux's NAME_MAX: the kernel refuses longer names, so such keys could never be opened.
NAME_MAX = 255
#: S3 refuses keys longer than this many UTF-8 bytes, so names that would exceed it can't be created.
MAX_KEY_BYTES = 1024
#: tierfs's own objects at the top of a bucket (snapshot manifests, docs/snapshots.md): never
#: shown by a mount of the whole bucket, never part of a snapshot.
OWN_PREFIX = ".tierfs/"


def is_own_key(dir_prefix: str, key: str) -> bool:
    """True for a key below the bucket's top-level ``.tierfs/`` listed at the bucket's root."""
    return dir_prefix == "" and key.startswith(OWN_PREFIX)


class HiddenReason(StrEnum):
    """Why a listed key is not shown; values are stable labels for metrics and logs."""

    MARKER = "marker"  # the directory's own ``dir/`` marker object
    OUTSIDE = "outside"  # the key does not start with the listed prefix (a server bug)
    EMPTY = "empty"  # an empty segment, e.g. ``a//b``
    DOT = "dot"  # a ``.`` or ``..`` segment
    NUL = "nul"  # contains a NUL byte, which no POSIX name may hold
    SLASH = "slash"  # a name that still contains '/', i.e. more than one level down
    TOO_LONG = "too_long"  # over NAME_MAX bytes of UTF-8
    ENCODING = "encoding"  # not encodable as UTF-8 (lone surrogates)


def name_problem(name: str) -> HiddenReason | None:
    """Return why ``name`` can't be a POSIX directory entry, or None if it can."""
    if name == "":
        return HiddenReason.EMPTY
    if name in (".", ".."):
        return HiddenReason.DOT
    if "\0" in name:
        return HiddenReason.NUL
    if "/" in name:
        return HiddenReason.SLASH
    try:
        encoded = name.encode("utf-8")
    except UnicodeEncodeError:
        return HiddenReason.ENCODING
    if len(encoded) > NAME_MAX:
        return HiddenReason.TOO_LONG
    return None


def is_safe_name(name: str) -> bool:
    """True if ``name`` may be shown as, and created from, a directory entry."""
    return name_problem(name) is None


def classify_child(dir_prefix: str, key_or_prefix: str) -> tuple[str, None] | tuple[None, HiddenReason]:
    """Split one ListObjectsV2 result below ``dir_prefix`` into ``(name, None)`` or ``(None, reason)``.

    ``key_or_prefix`` is an object key or a CommonPrefix (ending in '/'). One trailing
    '/' is dropped, so an object ``d/x/`` (a sub-directory's marker that a server listed
    as an object) yields the directory name ``x`` just like the CommonPrefix does.
    """
    if not key_or_prefix.startswith(dir_prefix):
        return None, HiddenReason.OUTSIDE
    rest = key_or_prefix[len(dir_prefix) :]
    if rest == "":
        return None, HiddenReason.MARKER
    if rest.endswith("/"):
        rest = rest[:-1]
    reason = name_problem(rest)
    if reason is not None:
        return None, reason
    return rest, None


def child_name(dir_prefix: str, key_or_prefix: str) -> str | None:
    """The entry name ``key_or_prefix`` yields inside ``dir_prefix``, or None if it must be hidden."""
    return classify_child(dir_prefix, key_or_prefix)[0]


def _checked(name: str) -> str:
    reason = name_problem(name)
    if reason is not None:
        raise ValueError(f"unsafe name {name!r} ({reason.value})")
    return name


def dir_prefix(parent_prefix: str, name: str) -> str:
    """Key prefix of directory ``name`` inside the directory whose prefix is ``parent_prefix``.

    Raises ValueError for an unsafe name: building a key from one would address an
    object the listing rules hide, which is always a caller bug.
    """
    return parent_prefix + _checked(name) + "/"


def file_key(parent_prefix: str, name: str) -> str:
    """Object key of file ``name`` inside the directory whose prefix is ``parent_prefix``."""
    return parent_prefix + _checked(name)


def key_fits(key: str) -> bool:
    """True if S3 accepts ``key`` by length; a create that would exceed it should fail (ENAMETOOLONG)."""
    return len(key.encode("utf-8", "surrogatepass")) <= MAX_KEY_BYTES
