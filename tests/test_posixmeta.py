"""POSIX metadata headers: FSx names, s3fs names, garbage, precedence and the mount defaults."""

from __future__ import annotations

import stat

import pytest

from tierfs.meta.posixmeta import PosixMeta, ResolvedAttrs, decode, encode, resolve

DEFAULTS = {
    "default_uid": 1000,
    "default_gid": 1001,
    "default_file_mode": 0o640,
    "default_dir_mode": 0o750,
    "fallback_mtime_ns": 1_600_000_000_000_000_000,
}


def test_fsx_sample_values() -> None:
    meta = decode(
        {
            "file-permissions": "0100644",
            "file-owner": "1234",
            "file-group": "5678",
            "file-mtime": "1700000000123456789ns",
            "file-atime": "1700000001000000000ns",
        }
    )
    assert meta == PosixMeta(
        mode=0o100644,
        uid=1234,
        gid=5678,
        mtime_ns=1_700_000_000_123_456_789,
        atime_ns=1_700_000_001_000_000_000,
    )
    assert decode({"file-permissions": "0040755"}).mode == stat.S_IFDIR | 0o755
    assert decode({"file-permissions": "0120777"}).mode == stat.S_IFLNK | 0o777


def test_bare_time_is_milliseconds_and_ns_suffix_is_nanoseconds() -> None:
    assert decode({"file-mtime": "1700000000123"}).mtime_ns == 1_700_000_000_123_000_000
    assert decode({"file-mtime": "1700000000123ns"}).mtime_ns == 1_700_000_000_123


@pytest.mark.parametrize(
    "meta",
    [
        PosixMeta(),
        PosixMeta(mode=0o100600, uid=0, gid=0, mtime_ns=0, atime_ns=0),
        PosixMeta(mode=0o040755, uid=65534, gid=65534, mtime_ns=1_700_000_000_123_456_789),
        PosixMeta(mode=0o120777, mtime_ns=5, atime_ns=7),
        PosixMeta(mode=0o104755, uid=(1 << 32) - 2),
    ],
)
def test_round_trip(meta: PosixMeta) -> None:
    assert decode(encode(meta)) == meta


def test_encode_uses_only_fsx_names_and_formats() -> None:
    headers = encode(PosixMeta(mode=0o40755, uid=1, gid=2, mtime_ns=3, atime_ns=4))
    assert headers == {
        "file-permissions": "0040755",
        "file-owner": "1",
        "file-group": "2",
        "file-mtime": "3ns",
        "file-atime": "4ns",
    }
    assert encode(PosixMeta()) == {}


def test_s3fs_only_headers() -> None:
    meta = decode({"mode": "33188", "uid": "1000", "gid": "100", "mtime": "1700000000"})
    assert meta == PosixMeta(mode=0o100644, uid=1000, gid=100, mtime_ns=1_700_000_000_000_000_000)
    assert decode({"mode": "0100755"}).mode == 0o100755  # octal with a leading 0
    assert decode({"mtime": "1700000000.123456789"}).mtime_ns == 1_700_000_000_123_456_789


def test_fsx_wins_over_s3fs() -> None:
    meta = decode(
        {
            "mode": "33188",
            "file-permissions": "0100600",
            "uid": "1",
            "file-owner": "2",
            "gid": "3",
            "file-group": "4",
            "mtime": "10",
            "file-mtime": "20ns",
        }
    )
    assert meta == PosixMeta(mode=0o100600, uid=2, gid=4, mtime_ns=20)


def test_garbage_fsx_value_falls_back_to_s3fs() -> None:
    meta = decode({"file-owner": "root", "uid": "7", "file-mtime": "yesterday", "mtime": "1.5"})
    assert meta.uid == 7
    assert meta.mtime_ns == 1_500_000_000


@pytest.mark.parametrize(
    "headers",
    [
        {"file-permissions": "rw-r--r--"},
        {"file-permissions": "0100689"},
        {"file-permissions": "7777777"},  # beyond 16 bits of st_mode
        {"file-owner": "-1"},
        {"file-owner": "4294967295"},  # (uid_t)-1 is never an owner
        {"file-group": "1.5"},
        {"file-mtime": "12 ns"},
        {"file-mtime": "-5ns"},
        {"file-atime": "0x10ns"},
        {"mode": "abc"},
        {"mode": "999999"},
        {"uid": ""},
        {"mtime": "nan"},
        {"mtime": "inf"},
        {"mtime": "-1"},
        {"mtime": "later"},
    ],
)
def test_garbage_values_are_ignored(headers: dict[str, str]) -> None:
    assert decode(headers) == PosixMeta()


def test_header_names_are_case_insensitive_and_values_trimmed() -> None:
    assert decode({"File-Owner": " 42 "}).uid == 42


def test_resolve_defaults_for_plain_objects() -> None:
    file_attrs = resolve(PosixMeta(), is_dir=False, **DEFAULTS)
    assert file_attrs == ResolvedAttrs(
        mode=stat.S_IFREG | 0o640,
        uid=1000,
        gid=1001,
        mtime_ns=DEFAULTS["fallback_mtime_ns"],
        atime_ns=DEFAULTS["fallback_mtime_ns"],
    )
    dir_attrs = resolve(PosixMeta(), is_dir=True, **DEFAULTS)
    assert dir_attrs.mode == stat.S_IFDIR | 0o750
    assert not dir_attrs.is_symlink


def test_resolve_takes_permissions_and_times_from_headers() -> None:
    attrs = resolve(PosixMeta(mode=0o100600, uid=0, gid=0, mtime_ns=5), is_dir=False, **DEFAULTS)
    assert attrs == ResolvedAttrs(mode=stat.S_IFREG | 0o600, uid=0, gid=0, mtime_ns=5, atime_ns=5)


def test_resolve_symlink_type_comes_from_the_header() -> None:
    attrs = resolve(PosixMeta(mode=0o120777), is_dir=False, **DEFAULTS)
    assert attrs.is_symlink
    assert attrs.mode == stat.S_IFLNK | 0o777


def test_resolve_object_shape_beats_a_wrong_type_in_the_header() -> None:
    # A directory header copied onto a file, and a file/symlink header on a dir/ marker.
    assert resolve(PosixMeta(mode=0o040700), is_dir=False, **DEFAULTS).mode == stat.S_IFREG | 0o700
    assert resolve(PosixMeta(mode=0o100600), is_dir=True, **DEFAULTS).mode == stat.S_IFDIR | 0o600
    assert resolve(PosixMeta(mode=0o120777), is_dir=True, **DEFAULTS).mode == stat.S_IFDIR | 0o777
    # s3fs-style mode without type bits.
    assert resolve(PosixMeta(mode=0o644), is_dir=False, **DEFAULTS).mode == stat.S_IFREG | 0o644


# --------------------------------------------------------------------------- special files (issue 12)


def test_device_numbers_round_trip_in_our_header() -> None:
    import os

    meta = PosixMeta(mode=stat.S_IFBLK | 0o640, rdev=os.makedev(8, 17))
    headers = encode(meta)
    assert headers["tierfs-rdev"] == "8:17" and headers["file-permissions"] == "0060640"
    assert decode(headers).rdev == os.makedev(8, 17)
    assert decode({"tierfs-rdev": "8-17"}).rdev is None  # garbage is ignored


@pytest.mark.parametrize("file_type", [stat.S_IFIFO, stat.S_IFSOCK, stat.S_IFCHR, stat.S_IFBLK])
def test_special_type_bits_count_for_empty_objects_only(file_type: int) -> None:
    meta = PosixMeta(mode=file_type | 0o600, rdev=7)
    empty = resolve(meta, is_dir=False, size=0, **DEFAULTS)
    assert stat.S_IFMT(empty.mode) == file_type
    assert empty.rdev == (7 if file_type in (stat.S_IFCHR, stat.S_IFBLK) else 0)
    with_data = resolve(meta, is_dir=False, size=1, **DEFAULTS)  # a copied header must not hide data
    assert stat.S_IFMT(with_data.mode) == stat.S_IFREG and with_data.rdev == 0
