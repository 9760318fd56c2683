"""Key <-> name rules against hostile keys: nothing outside a directory or unspellable may show."""

from __future__ import annotations

import pytest

from tierfs.meta.keys import (
    MAX_KEY_BYTES,
    NAME_MAX,
    HiddenReason,
    child_name,
    classify_child,
    dir_prefix,
    file_key,
    is_safe_name,
    key_fits,
)


@pytest.mark.parametrize(
    ("prefix", "listed", "expected"),
    [
        ("", "file.txt", "file.txt"),
        ("", "dir/", "dir"),
        ("data/", "data/x.bin", "x.bin"),
        ("data/", "data/sub/", "sub"),
        ("data/", "data/sub", "sub"),  # an object next to a sub/ prefix keeps the same name
        ("", "ünïcødé-名前.txt", "ünïcødé-名前.txt"),
        ("", "with space", "with space"),
        ("", "new\nline", "new\nline"),
        ("", "tab\tand-\x7f", "tab\tand-\x7f"),
        ("", "..hidden", "..hidden"),
        ("", "...", "..."),
        ("", "a" * NAME_MAX, "a" * NAME_MAX),
    ],
)
def test_visible_names(prefix: str, listed: str, expected: str) -> None:
    assert child_name(prefix, listed) == expected
    assert classify_child(prefix, listed) == (expected, None)


@pytest.mark.parametrize(
    ("prefix", "listed", "reason"),
    [
        ("a/", "a/", HiddenReason.MARKER),  # the directory's own marker object
        ("", "", HiddenReason.MARKER),
        ("a/", "a//", HiddenReason.EMPTY),  # CommonPrefix of a//b listed inside a/
        ("", "/", HiddenReason.EMPTY),  # CommonPrefix of /x listed at the root
        ("a/", "a//b", HiddenReason.SLASH),  # an object a//b can't sit directly in a/
        ("a/", "a/../", HiddenReason.DOT),  # a/../b
        ("", "./", HiddenReason.DOT),  # ./x
        ("", "../", HiddenReason.DOT),
        ("x/", "x/.", HiddenReason.DOT),
        ("x/", "x/..", HiddenReason.DOT),
        ("", "nul\0byte", HiddenReason.NUL),
        ("", "é" * 128, HiddenReason.TOO_LONG),  # 256 bytes of UTF-8 in only 128 characters
        ("", "x" * 300, HiddenReason.TOO_LONG),
        ("", "x" * 300 + "/", HiddenReason.TOO_LONG),
        ("a/", "b/c", HiddenReason.OUTSIDE),
        ("", "bad\udcffsurrogate", HiddenReason.ENCODING),
    ],
)
def test_hidden_keys(prefix: str, listed: str, reason: HiddenReason) -> None:
    assert child_name(prefix, listed) is None
    assert classify_child(prefix, listed) == (None, reason)


def test_hidden_reasons_are_stable_labels() -> None:
    assert {r.value for r in HiddenReason} >= {"marker", "empty", "dot", "nul", "too_long", "slash"}
    assert str(HiddenReason.TOO_LONG) == "too_long"


@pytest.mark.parametrize(
    "name",
    ["", ".", "..", "a/b", "/", "nul\0", "x" * 256, "é" * 128, "\udc80"],
)
def test_unsafe_names_are_refused(name: str) -> None:
    assert not is_safe_name(name)
    with pytest.raises(ValueError, match="unsafe name"):
        file_key("p/", name)
    with pytest.raises(ValueError, match="unsafe name"):
        dir_prefix("p/", name)


@pytest.mark.parametrize("name", ["a", "...", ".x", "名前", "sp ace", "x" * 255, "é" * 127])
def test_safe_names(name: str) -> None:
    assert is_safe_name(name)


def test_key_building_round_trips_through_listing() -> None:
    root = "data/"
    sub = dir_prefix(root, "sub dir")
    assert sub == "data/sub dir/"
    key = file_key(sub, "f.txt")
    assert key == "data/sub dir/f.txt"
    assert child_name(root, sub) == "sub dir"
    assert child_name(sub, key) == "f.txt"
    assert file_key("", "top") == "top"
    assert dir_prefix("", "top") == "top/"


def test_key_length_limit_counts_utf8_bytes() -> None:
    assert key_fits("k" * MAX_KEY_BYTES)
    assert not key_fits("k" * (MAX_KEY_BYTES + 1))
    assert not key_fits("é" * (MAX_KEY_BYTES // 2 + 1))
