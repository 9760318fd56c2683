"""Command-line contract: long options, -o strings, the mount.fuse3 and mount.tierfs forms, errors."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tierfs import cli
from tierfs.cli import apply_environment, format_status, main, mount_helper_main, parse_mount_args
from tierfs.config import MountConfig, Source
from tierfs.errors import ConfigError

GiB = 1 << 30
MiB = 1 << 20


@pytest.fixture(autouse=True)
def _no_ambient_endpoint(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    monkeypatch.setenv("TIERFS_RUNTIME_DIR", str(tmp_path / "registry"))


@pytest.fixture
def mounted(monkeypatch: pytest.MonkeyPatch) -> list[MountConfig]:
    """Configs that would have been handed to the daemon (our own seam, not the daemon's)."""
    seen: list[MountConfig] = []

    def record(config: MountConfig) -> int:
        seen.append(config)
        return 0

    monkeypatch.setattr(cli, "_run_mount", record)
    return seen


def run_tierfs(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tierfs", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **(env or {})},
        check=False,
    )


def test_defaults() -> None:
    config = parse_mount_args(["s3://my-bucket", "/mnt/data"])
    assert config.source == Source("my-bucket", "")
    assert config.mountpoint == Path("/mnt/data")
    assert config.endpoint_url is None
    assert config.cache_max_age == 86400
    assert config.metadata_ttl == 60
    assert config.writeback_delay == 5
    assert config.timeout == 30
    assert config.flush_timeout == 600  # today's SIGTERM flush bound
    assert not config.read_only and not config.allow_other and not config.foreground
    assert not config.nonempty


def test_long_options() -> None:
    config = parse_mount_args(
        [
            "s3://my-bucket/some/prefix/",
            "rel/mnt",
            "--endpoint-url", "http://127.0.0.1:9000",
            "--region", "eu-west-1",
            "--cache-dir", "cache",
            "--cache-size", "200G",
            "--cache-min-free", "15%",
            "--cache-max-age", "2h",
            "--cache-compression", "zstd:19",
            "--metadata-ttl", "indefinite",
            "--read-only",
            "-f",
            "--allow-other",
            "--uid", "root",
            "--gid", "0",
            "--file-mode", "0600",
            "--dir-mode", "700",
            "--timeout", "10s",
            "--retries", "0",
            "--log-level", "debug",
            "--writeback-delay", "500ms",
            "--flush-timeout", "2m",
            "--nonempty",
            "--import-interval", "5m",
            "--metrics-addr", "127.0.0.1:9100",
            "--s3-concurrency", "4",
            "--debug-fuse",
        ]
    )  # fmt: skip
    assert config.source == Source("my-bucket", "some/prefix/")
    assert config.mountpoint == Path(os.getcwd()) / "rel/mnt"
    assert config.cache_dir == Path(os.getcwd()) / "cache"
    assert config.endpoint_url == "http://127.0.0.1:9000"
    assert config.region == "eu-west-1"
    assert config.cache_size == 200 * GiB
    assert config.cache_min_free == pytest.approx(0.15)
    assert config.cache_max_age == 7200
    assert config.cache_compression == 19
    assert math.isinf(config.metadata_ttl)
    assert config.read_only and config.foreground and config.allow_other and config.fuse_debug
    assert (config.uid, config.gid) == (0, 0)
    assert (config.file_mode, config.dir_mode) == (0o600, 0o700)
    assert config.timeout == 10
    assert config.retries == 0
    assert config.log_level == "DEBUG"
    assert config.writeback_delay == pytest.approx(0.5)
    assert config.flush_timeout == 120
    assert config.nonempty
    assert config.import_interval == 300
    assert config.metrics_addr == "127.0.0.1:9100"
    assert config.s3_concurrency == 4


def test_o_options_carry_every_setting() -> None:
    config = parse_mount_args(
        [
            "s3://bkt",
            "/mnt",
            "-o", "endpoint_url=http://x:1,cache_size=200G,allow_other,ro",
            "-o", "cache_min_free=0.2,cache_max_age=indefinite,cache_compression=zstd,metadata_ttl=90",
            "-o", "uid=12,gid=34,file_mode=0640,dir_mode=0750,timeout=5,retries=7,log_level=warning",
            "-o", "writeback_delay=1m,import_interval=off,metrics_addr=:9100,s3_concurrency=32,debug_fuse",
            "-o", "foreground,region=us-east-2,profile=prod,flush_timeout=90,nonempty",
            "-o", "part_size=8M,multipart_threshold=32M,upload_concurrency=4",
        ]
    )  # fmt: skip
    assert config.endpoint_url == "http://x:1"
    assert config.cache_size == 200 * GiB
    assert config.allow_other and config.read_only and config.foreground and config.fuse_debug
    assert config.cache_min_free == pytest.approx(0.2)
    assert math.isinf(config.cache_max_age)
    assert config.cache_compression == 3
    assert config.metadata_ttl == 90
    assert (config.uid, config.gid, config.file_mode, config.dir_mode) == (12, 34, 0o640, 0o750)
    assert (config.timeout, config.retries, config.log_level) == (5, 7, "WARNING")
    assert config.writeback_delay == 60
    assert config.import_interval is None
    assert config.metrics_addr == ":9100"
    assert config.s3_concurrency == 32
    assert (config.region, config.profile) == ("us-east-2", "prod")
    assert config.flush_timeout == 90 and config.nonempty
    assert (config.part_size, config.multipart_threshold, config.upload_concurrency) == (8 * MiB, 32 * MiB, 4)


def test_mount8_and_systemd_options_are_ignored() -> None:
    ignored = (
        "rw,auto,noauto,user,nouser,users,_netdev,nofail,defaults,exec,noexec,suid,nosuid,dev,nodev,"
        "atime,noatime,relatime,default_permissions,x-systemd.automount,x-systemd.requires=network.target,"
        "x-systemd.mount-timeout=30,comment=managed by ansible"
    )
    config = parse_mount_args(["s3://bkt", "/mnt", "-o", ignored])
    assert config == MountConfig(source=Source("bkt"), mountpoint=Path("/mnt"))
    assert not config.read_only


def test_ro_means_read_only_and_rw_changes_nothing() -> None:
    assert parse_mount_args(["s3://bkt", "/mnt", "-o", "ro"]).read_only
    assert parse_mount_args(["s3://bkt", "/mnt", "-o", "rw"]).read_only is False
    assert parse_mount_args(["s3://bkt", "/mnt", "-o", "read_only=yes"]).read_only
    assert parse_mount_args(["s3://bkt", "/mnt", "-o", "allow_other=no"]).allow_other is False


def test_long_option_wins_over_o_and_last_o_wins() -> None:
    config = parse_mount_args(
        ["s3://bkt", "/mnt", "-o", "cache_size=1G,timeout=3", "--cache-size", "2G", "-o", "timeout=4"]
    )
    assert config.cache_size == 2 * GiB
    assert config.timeout == 4


def test_dashes_are_accepted_in_o_names() -> None:
    assert parse_mount_args(["s3://bkt", "/mnt", "-o", "cache-size=1G"]).cache_size == GiB


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ("bogus", "unknown mount option 'bogus'"),
        ("cache_size=big", "-o cache_size: invalid size 'big'"),
        ("cache_size", "-o cache_size: needs a value"),
        ("cache_min_free=150%", "-o cache_min_free"),
        ("cache_min_free=5", "-o cache_min_free"),
        ("cache_compression=lz4", "-o cache_compression: invalid compression"),
        ("cache_compression=zstd:30", "-o cache_compression: invalid zstd level"),
        ("metadata_ttl=soon", "-o metadata_ttl: invalid duration"),
        ("cache_max_age=1y", "-o cache_max_age: invalid duration"),
        ("timeout=0", "--timeout must be positive"),
        ("flush_timeout=0", "--flush-timeout must be positive"),
        ("flush_timeout=soon", "-o flush_timeout: invalid duration"),
        ("nonempty=perhaps", "-o nonempty: invalid boolean"),
        ("file_mode=888", "-o file_mode: invalid mode"),
        ("uid=no-such-user-here", "-o uid: unknown user"),
        ("allow_other=maybe", "-o allow_other: invalid boolean"),
        ("metrics_addr=localhost", "-o metrics_addr: invalid address"),
        ("s3_concurrency=0", "-o s3_concurrency"),
        ("part_size=1M", "--part-size must be within 5 MiB"),
        ("part_size=8M,multipart_threshold=6M", "--multipart-threshold must be at least --part-size"),
        ("upload_concurrency=0", "-o upload_concurrency"),
        ("credentials_file=/nonexistent/creds", "-o credentials_file"),
    ],
)
def test_bad_options_raise_config_error(options: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_mount_args(["s3://bkt", "/mnt", "-o", options])
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_bad_source_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="s3://BUCKET"):
        parse_mount_args(["http://bkt", "/mnt"])


def test_endpoint_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://generic:1")
    assert parse_mount_args(["s3://bkt", "/mnt"]).endpoint_url == "http://generic:1"
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://s3-specific:2")
    assert parse_mount_args(["s3://bkt", "/mnt"]).endpoint_url == "http://s3-specific:2"
    explicit = parse_mount_args(["s3://bkt", "/mnt", "--endpoint-url", "http://explicit:3"])
    assert explicit.endpoint_url == "http://explicit:3"


def test_credentials_file_goes_to_the_environment_not_argv(tmp_path: Path) -> None:
    creds = tmp_path / "creds"
    creds.write_text("[default]\naws_access_key_id = x\naws_secret_access_key = y\n")
    config = parse_mount_args(["s3://bkt", "/mnt", "-o", f"credentials_file={creds}"])
    environ: dict[str, str] = {}
    apply_environment(config, environ)
    assert environ == {"AWS_SHARED_CREDENTIALS_FILE": str(creds)}
    apply_environment(parse_mount_args(["s3://bkt", "/mnt"]), environ := {})
    assert environ == {}


def test_mount_fuse3_form_runs_mount(mounted: list[MountConfig]) -> None:
    # mount.fuse3 runs "tierfs SOURCE MOUNTPOINT -o OPTIONS" without a subcommand.
    assert main(["s3://bkt/pre", "/mnt/x", "-o", "rw,nodev,nosuid,cache_size=1G,allow_other"]) == 0
    [config] = mounted
    assert config.source == Source("bkt", "pre/")
    assert config.mountpoint == Path("/mnt/x")
    assert config.cache_size == GiB and config.allow_other


def test_mount_subcommand(mounted: list[MountConfig]) -> None:
    assert main(["mount", "s3://bkt", "/mnt/y", "--read-only"]) == 0
    assert mounted[0].read_only


def test_mount_helper_form(mounted: list[MountConfig]) -> None:
    code = mount_helper_main(["s3://bkt", "/mnt/z", "-n", "-v", "-o", "rw,_netdev,x-systemd.automount,ro"])
    assert code == 0
    [config] = mounted
    assert config.read_only
    assert config.mountpoint == Path("/mnt/z")


def test_mount_helper_sloppy_and_fake(mounted: list[MountConfig], capsys: pytest.CaptureFixture[str]) -> None:
    assert mount_helper_main(["s3://bkt", "/mnt", "-s", "-f", "-o", "someday_option=1"]) == 0
    assert mounted == []  # -f: everything checked, nothing mounted
    assert mount_helper_main(["s3://bkt", "/mnt", "-o", "someday_option=1"]) == 2
    err = capsys.readouterr().err
    assert err == "mount.tierfs: error: unknown mount option 'someday_option' in -o 'someday_option=1'\n"
    assert mounted == []


def test_usage_errors_are_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["mount", "s3://bkt"]) == 2
    assert main(["mount", "s3://bkt", "/mnt", "--no-such-flag"]) == 2
    assert main(["frobnicate"]) == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 3
    assert all(line.startswith("tierfs: error: ") for line in lines)


def test_unknown_o_option_fails_with_exit_2_and_one_line() -> None:
    done = run_tierfs("mount", "s3://bkt", "/mnt", "-o", "cache_size=1G,frobnicate")
    assert done.returncode == 2
    expected = "tierfs: error: unknown mount option 'frobnicate' in -o 'cache_size=1G,frobnicate'\n"
    assert done.stderr == expected
    assert done.stdout == ""


def test_help_works_without_a_daemon() -> None:
    top = run_tierfs("--help")
    assert top.returncode == 0
    for command in ("mount", "umount", "status", "flush", "prefetch", "evict", "pin", "unpin", "refresh"):
        assert command in top.stdout
    mount = run_tierfs("mount", "--help")
    assert mount.returncode == 0
    for flag in ("--cache-size", "--metadata-ttl", "--writeback-delay", "-o OPT"):
        assert flag in mount.stdout
    script = "import sys; from tierfs.cli import mount_helper_main; sys.exit(mount_helper_main())"
    helper = subprocess.run(
        [sys.executable, "-c", script, "--help"], capture_output=True, text=True, timeout=60, check=False
    )
    assert helper.returncode == 0
    assert "mount.tierfs" in helper.stdout


def test_status_of_a_path_without_mount_is_one_line(tmp_path: Path) -> None:
    done = run_tierfs("status", "/nonexistent", "--json", env={"TIERFS_RUNTIME_DIR": str(tmp_path)})
    assert done.returncode != 0
    assert done.stderr == "tierfs: error: no tierfs mount at /nonexistent\n"
    assert done.stdout == ""


def test_status_table_is_aligned_with_human_sizes() -> None:
    lines = format_status(
        {
            "source": "s3://bkt/",
            "cache": {"used_bytes": 3 * GiB, "size": 512, "bytes_on_disk": 2048, "files": 12},
            "dirty_files": 0,
            "metadata_ttl": math.inf,
            "read_only": False,
        }
    )
    assert lines == [
        "source               s3://bkt/",
        "cache.used_bytes     3.0 GiB",
        "cache.size           512 B",
        "cache.bytes_on_disk  2.0 KiB",
        "cache.files          12",
        "dirty_files          0",
        "metadata_ttl         indefinite",
        "read_only            no",
    ]


def test_status_table_lists_failing_files_one_per_line() -> None:
    """Paths make poor dotted keys: failing files are counted in the table, then listed below it."""
    lines = format_status(
        {
            "dirty_files": 2,
            "failing": {"w/b.bin": "AccessDenied: PUT\nrefused", "a.txt": "NoSuchBucket: gone"},
            "conflicts": 0,
        }
    )
    assert lines == [
        "dirty_files  2",
        "failing      2",
        "  a.txt: NoSuchBucket: gone",
        "  w/b.bin: AccessDenied: PUT refused",
        "conflicts    0",
    ]
    assert format_status({"failing": {}}) == ["failing  0"]


def test_flush_and_umount_take_a_positive_timeout(tmp_path: Path) -> None:
    for args in (
        ["flush", str(tmp_path), "--timeout", "0"],
        ["umount", str(tmp_path), "--flush-timeout", "-1"],
    ):
        done = run_tierfs(*args)
        assert done.returncode == 2
        assert done.stderr.startswith(f"tierfs: error: argument {args[2]}: ")
        assert len(done.stderr.splitlines()) == 1


def test_shared_cache_options_long_and_in_fstab() -> None:
    config = parse_mount_args(["s3://bkt", "/mnt"])
    assert config.shared_cache is None and config.shared_cache_timeout == 0.5
    long_form = parse_mount_args(
        ["s3://bkt", "/mnt", "--shared-cache", "s3://tier/pre/fix", "--shared-cache-endpoint-url",
         "http://10.0.0.5:8333", "--shared-cache-profile", "tier", "--shared-cache-timeout", "0.2"]
    )  # fmt: skip
    fstab = parse_mount_args(
        ["s3://bkt", "/mnt", "-o", "shared_cache=s3://tier/pre/fix,shared_cache_endpoint_url=http://10.0.0.5:8333,"
         "shared_cache_profile=tier,shared_cache_timeout=0.2"]
    )  # fmt: skip
    for c in (long_form, fstab):
        assert c.shared_cache == Source("tier", "pre/fix/")
        assert (c.shared_cache_endpoint_url, c.shared_cache_profile, c.shared_cache_timeout) == (
            "http://10.0.0.5:8333", "tier", 0.2,
        )  # fmt: skip
    with pytest.raises(ConfigError, match="must not be the mounted bucket"):
        parse_mount_args(["s3://bkt/data", "/mnt", "--shared-cache", "s3://bkt/data"])
    with pytest.raises(ConfigError):
        parse_mount_args(["s3://bkt", "/mnt", "--shared-cache", "tier-without-scheme"])
